"""Spot-footprint overlaps (method.md §3.1) and the whole-sample 3D graph (method.md §4)."""

from __future__ import annotations

import logging
import tracemalloc
from dataclasses import replace

import numpy as np
import pytest
import scipy.sparse as sp

from asign._geometry import (
    Footprints,
    aligned_centres,
    apply_affine,
    circle_intersection_area,
    circle_iou,
    circle_polygon,
    pairs_iou,
    polygon_iou,
    similarity_scale,
)
from asign._stack import get_stack, section_codes
from asign.pp._graph import (
    SpatialNeighbors3D,
    _cross_edges,
    _overlap_matrix,
    _within_graph,
    cross_section_edges,
    neighbors_3d,
    spot_overlaps,
)

RHO = 112.0


def _section_rows(sdata, section: str) -> np.ndarray:
    return (sdata.tables["table"].obs["section"].astype(str) == section).to_numpy()


def _rot(deg: float, scale: float = 1.0, shift=(0.0, 0.0), *, mirror: bool = False) -> np.ndarray:
    t = np.deg2rad(deg)
    T = np.eye(3)
    T[:2, :2] = scale * np.array([[np.cos(t), -np.sin(t)], [np.sin(t), np.cos(t)]])
    if mirror:
        T[:2, 0] *= -1
    T[:2, 2] = shift
    return T


def _about(T: np.ndarray, centre) -> np.ndarray:
    """``T`` applied about ``centre`` instead of the origin."""
    C = np.eye(3)
    C[:2, 2] = centre
    return C @ T @ np.linalg.inv(C)


def method_oracle_iou(delta, rho):
    """method.md §3.1, written out independently of asign._geometry."""
    delta = np.asarray(delta, dtype=float)
    a = np.where(
        delta < 2 * rho,
        2 * rho**2 * np.arccos(np.minimum(delta / (2 * rho), 1.0))
        - delta / 2 * np.sqrt(np.maximum(4 * rho**2 - delta**2, 0.0)),
        0.0,
    )
    return a / (2 * np.pi * rho**2 - a)


def write_alignment(sdata, transforms: dict[str, np.ndarray], reference: str) -> None:
    """Write the alignment contract keys (ALIGNMENT_CONTRACT.md) from known matrices."""
    t = sdata.tables["table"]
    st = get_stack(t)
    codes = section_codes(t, st)
    xy = np.asarray(t.obsm["spatial"], dtype=float)
    al = np.full_like(xy, np.nan)
    for i, s in enumerate(st.sections):
        if s in transforms:
            al[codes == i] = apply_affine(transforms[s], xy[codes == i])
    um = float(st.um_per_px[st.sections.index(reference)])
    t.obsm["spatial_aligned"] = al * um
    t.obs["z"] = st.z_um[codes]
    t.obsm["spatial_3d"] = np.column_stack([al * um, st.z_um[codes]])
    t.uns["asign"]["alignment"] = {
        "reference": reference,
        "method": "transforms",
        "transform": "rigid",
        "key_added": "aligned",
        "um_per_px": um,
        "transforms": {s: np.asarray(T, dtype=float) for s, T in transforms.items()},
    }


def ground_truth_transforms(sdata) -> tuple[dict[str, np.ndarray], str]:
    t = sdata.tables["table"]
    st = get_stack(t)
    n2w = np.asarray(t.uns["asign"]["synthetic"]["native_to_world"])
    m = st.n_sections // 2
    return {s: np.linalg.inv(n2w[m]) @ n2w[i] for i, s in enumerate(st.sections)}, st.sections[m]


def grid_stack(n_sections=3, side=9, pitch_px=20.0, um_per_px=2.0, perms=None, jitter=0.0, seed=0):
    """Square-grid sections (no images); ``perms[s]`` reorders section s's spots (same spot ids)."""
    from asign.io import Section, stack_sections

    rng = np.random.default_rng(seed)
    g = np.arange(side) * pitch_px + 50.0
    gx, gy = np.meshgrid(g, g)
    grid = np.column_stack([gx.ravel(), gy.ravel()])
    secs = []
    for s in range(n_sections):
        xy = grid + rng.uniform(-jitter, jitter, grid.shape)
        ids = np.array([str(i) for i in range(len(xy))])
        order = np.arange(len(xy)) if perms is None else perms[s]
        secs.append(
            Section(
                name=f"G{s + 1}",
                spots=xy[order],
                counts=np.ones((len(xy), 2), dtype=np.float32),
                genes=["a", "b"],
                um_per_px=um_per_px,
                spot_ids=list(ids[order]),
            )
        )
    return stack_sections(secs, spot_diameter_um=pitch_px * um_per_px / 2, thickness_um=10.0)


@pytest.fixture
def aligned_stack(small_stack):
    T, ref = ground_truth_transforms(small_stack)
    write_alignment(small_stack, T, ref)
    return small_stack


# ------------------------------------------------------------------------------------------------------------------
# geometry
# ------------------------------------------------------------------------------------------------------------------


def test_circle_iou_equals_method_formula():
    delta = np.linspace(0, 2.5 * RHO, 301)
    np.testing.assert_allclose(circle_iou(delta, RHO), method_oracle_iou(delta, RHO), atol=1e-12)
    assert circle_iou(0.0, RHO) == pytest.approx(1.0)
    assert circle_iou(2 * RHO, RHO) == 0.0
    # unequal radii: containment and symmetry
    assert circle_intersection_area(1.0, 5.0, 2.0) == pytest.approx(np.pi * 4.0)
    np.testing.assert_allclose(circle_iou(3.0, 2.0, 1.5), circle_iou(3.0, 1.5, 2.0))


@pytest.mark.parametrize("angle", [0.0, 37.0, 180.0])
def test_100gon_iou_matches_closed_form(angle):
    """method.md §3.1 oracle: the 100-gon agrees with the closed form within 1e-2 for many distances."""
    delta = np.linspace(0, 2.2 * RHO, 200)
    u = np.array([np.cos(np.deg2rad(angle)), np.sin(np.deg2rad(angle))])
    ci = np.zeros((delta.size, 2)) + 500.0
    cj = ci + delta[:, None] * u
    iou = polygon_iou(circle_polygon(ci, RHO), circle_polygon(cj, RHO))
    np.testing.assert_allclose(iou, method_oracle_iou(delta, RHO), atol=1e-2)
    assert np.abs(iou - method_oracle_iou(delta, RHO)).max() < 2e-3


def test_similarity_detection():
    assert similarity_scale(_rot(33, 1.7, mirror=True)) == pytest.approx(1.7)
    shear = np.array([[1.0, 0.4, 0.0], [0.0, 1.0, 0.0], [0.0, 0.0, 1.0]])
    assert similarity_scale(shear) is None


# ------------------------------------------------------------------------------------------------------------------
# overlap cores
# ------------------------------------------------------------------------------------------------------------------


def _random_two_sections(rng, n=400, side=3000.0):
    coords = rng.uniform(0, side, (2 * n, 2))
    codes = np.repeat([0, 1], n)
    return coords, codes


def test_exact_and_polygon_paths_agree_for_rigid():
    rng = np.random.default_rng(1)
    coords, codes = _random_two_sections(rng)
    T = np.stack([_rot(0), _about(_rot(71, 1.0, (20.0, -15.0), mirror=True), (1500.0, 1500.0))])
    fp = Footprints.from_transforms(T, RHO)
    assert fp.exact.all()
    M = _overlap_matrix(coords, codes, T, RHO, adjacent_only=True)
    coo = sp.triu(M).tocoo()
    assert coo.nnz > 100
    centres = aligned_centres(coords, codes, T)
    poly = pairs_iou(centres, codes, replace(fp, exact=np.array([False, False])), coo.row, coo.col)
    np.testing.assert_allclose(poly, coo.data, atol=1e-2)
    # and both equal the closed form on the aligned distances
    d = np.linalg.norm(centres[coo.row] - centres[coo.col], axis=1)
    np.testing.assert_allclose(coo.data, method_oracle_iou(d, RHO), atol=1e-10)


def test_similarity_with_different_scales_is_exact():
    coords = np.array([[0.0, 0.0], [150.0, 0.0]])
    codes = np.array([0, 1])
    T = np.stack([_rot(0, 1.0), _rot(0, 2.0, (-150.0, 0.0))])  # spot 1 -> (150, 0), radius 2 rho
    M = _overlap_matrix(coords, codes, T, RHO)
    want = circle_iou(150.0, RHO, 2 * RHO)
    assert M[0, 1] == pytest.approx(want)


def test_affine_path_common_shear_preserves_native_iou():
    """IoU is invariant under a common affine map: the polygon path must give the native circle IoU."""
    rng = np.random.default_rng(2)
    coords, codes = _random_two_sections(rng, n=300, side=2000.0)
    A = np.array([[1.3, 0.5, 10.0], [-0.2, 0.8, -30.0], [0.0, 0.0, 1.0]])
    T = np.stack([A, A])
    assert not Footprints.from_transforms(T, RHO).exact.any()
    M = sp.triu(_overlap_matrix(coords, codes, T, RHO)).tocoo()
    ref = sp.triu(_overlap_matrix(coords, codes, np.stack([np.eye(3)] * 2), RHO)).tocoo()
    assert M.nnz > 50
    # same pair set (up to the inscribed-polygon tolerance at the tangent boundary)
    mp = {(int(a), int(b)): v for a, b, v in zip(M.row, M.col, M.data, strict=True)}
    rp = {(int(a), int(b)): v for a, b, v in zip(ref.row, ref.col, ref.data, strict=True)}
    common = sorted(set(mp) & set(rp))
    assert len(common) >= 0.98 * len(rp)
    assert all(rp[p] < 1e-2 for p in set(rp) - set(mp))
    np.testing.assert_allclose([mp[p] for p in common], [rp[p] for p in common], atol=1e-2)


def test_affine_path_against_monte_carlo():
    """Different non-similarity transforms: ellipse IoU estimated by dense point sampling (independent oracle)."""
    coords = np.array([[0.0, 0.0], [0.0, 0.0]])
    codes = np.array([0, 1])
    A0 = np.array([[2.0, 0.0, 0.0], [0.0, 0.5, 0.0], [0.0, 0.0, 1.0]])  # wide ellipse
    A1 = np.array([[0.6, 0.3, 150.0], [0.0, 1.8, 40.0], [0.0, 0.0, 1.0]])  # tall sheared ellipse
    T = np.stack([A0, A1])
    M = _overlap_matrix(coords, codes, T, RHO)
    # the centres are 155 px apart, beyond 2 rho sigma_min: the sigma_max candidate radius must still find them
    assert M.nnz == 2
    xs = np.linspace(-300, 400, 1400)
    X, Y = np.meshgrid(xs, xs)
    P = np.stack([X.ravel(), Y.ravel()], axis=1)

    def inside(Tm):
        q = (P - Tm[:2, 2]) @ np.linalg.inv(Tm[:2, :2]).T
        return np.hypot(q[:, 0], q[:, 1]) <= RHO

    a, b = inside(A0), inside(A1)
    mc = (a & b).sum() / (a | b).sum()
    assert M[0, 1] == pytest.approx(mc, abs=5e-3)
    assert M[0, 1] > 0.05


def test_overlap_matrix_structure_and_memory():
    """Symmetric CSR, zero diagonal, cross-section pairs only; 3e4 spots never allocate anything N x N."""
    rng = np.random.default_rng(3)
    n_per, S = 10_000, 3
    side = np.sqrt(n_per) * 290.0
    coords = rng.uniform(0, side, (n_per * S, 2))
    codes = np.repeat(np.arange(S), n_per)
    c0 = (side / 2, side / 2)
    T = np.stack([_rot(0), _about(_rot(20, 1.0, (30, 10)), c0), _about(_rot(-40, 1.0, (-60, 5)), c0)])
    tracemalloc.start()
    M = _overlap_matrix(coords, codes, T, RHO, adjacent_only=True)
    W = _within_graph(coords, codes, 12)
    r, c, v = _cross_edges(coords, codes, T, RHO, 12)
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    assert peak < 300e6  # a dense 3e4 x 3e4 float matrix would be 7.2 GB
    assert sp.issparse(M) and M.format == "csr" and W.format == "csr"
    assert abs(M - M.T).max() == 0
    assert M.diagonal().max() == 0
    coo = M.tocoo()
    assert np.all(codes[coo.row] != codes[coo.col])
    assert np.all(np.abs(codes[coo.row] - codes[coo.col]) == 1)  # adjacent only
    assert np.all((coo.data > 0) & (coo.data <= 1))
    assert np.all(codes[r] != codes[c])
    assert np.bincount(r, minlength=codes.size).max() <= 12


# ------------------------------------------------------------------------------------------------------------------
# spot_overlaps on the synthetic stack
# ------------------------------------------------------------------------------------------------------------------


def test_spot_overlaps_match_ground_truth(aligned_stack):
    """Compare against IoU computed from the synthetic block coordinates (µm), not from any asign transform."""
    t = aligned_stack.tables["table"]
    st = get_stack(t)
    r_um = st.spot_diameter_um  # footprint radius in µm
    spot_overlaps(aligned_stack, radius_um=r_um)
    M = t.obsp["asign_overlap"]
    codes = section_codes(t, st)
    w = np.asarray(t.obsm["spatial_world"])
    d = np.linalg.norm(w[:, None, :] - w[None, :, :], axis=-1)
    want = method_oracle_iou(d, r_um)
    want[np.abs(codes[:, None] - codes[None, :]) != 1] = 0.0
    np.testing.assert_allclose(M.toarray(), want, atol=1e-9)
    params = t.uns["asign_overlap"]["params"]
    assert params["footprint"] == "circle"
    np.testing.assert_allclose(params["radius_px"], r_um / st.um_per_px)
    for i, s in enumerate(st.sections):
        assert params["fraction_with_partner"][s] == pytest.approx((M[codes == i].getnnz(axis=1) > 0).mean())
    # all pairs of sections, and the default radius (112 native px)
    M_all = spot_overlaps(aligned_stack, radius_um=r_um, adjacent_only=False, inplace=False)
    coo = M_all.tocoo()
    assert np.any(np.abs(codes[coo.row] - codes[coo.col]) == 2)
    want_all = method_oracle_iou(d, r_um)
    want_all[codes[:, None] == codes[None, :]] = 0.0
    np.testing.assert_allclose(M_all.toarray(), want_all, atol=1e-9)
    M_def = spot_overlaps(aligned_stack, inplace=False)  # default: 112 native px (8 um/px here)
    want_def = method_oracle_iou(d, 112.0 * st.um_per_px[0])
    want_def[np.abs(codes[:, None] - codes[None, :]) != 1] = 0.0
    np.testing.assert_allclose(M_def.toarray(), want_def, atol=1e-9)


def test_spot_overlaps_inplace_false_leaves_table(aligned_stack):
    t = aligned_stack.tables["table"]
    M = spot_overlaps(aligned_stack, radius_um=100.0, inplace=False)
    assert sp.issparse(M)
    assert "asign_overlap" not in t.obsp and "asign_overlap" not in t.uns


def test_pixel_footprint_radius_on_a_coarse_image_warns(aligned_stack, asign_log):
    """8 µm/px, spot diameter ~152 µm: the default 112 px radius (896 µm) is far too wide; radius_um is suggested."""

    def warned():
        return [
            r.getMessage() for r in asign_log.records if r.levelno == logging.WARNING and "footprints" in r.getMessage()
        ]

    spot_overlaps(aligned_stack, radius_um=100.0, inplace=False)
    spot_overlaps(aligned_stack, radius_px=20.0, inplace=False)  # 320 µm across: fine
    neighbors_3d(aligned_stack, radius_um=100.0, inplace=False)
    assert not warned()
    spot_overlaps(aligned_stack, inplace=False)
    neighbors_3d(aligned_stack, inplace=False)
    msgs = warned()
    assert len(msgs) == 2
    assert "Sections ['S1', 'S2', 'S3'] have spot footprints more than 3x the spot diameter" in msgs[0]
    assert "radius 112 px x 8 µm/px = 896 µm" in msgs[0] and "radius_um=" in msgs[0]


# ------------------------------------------------------------------------------------------------------------------
# neighbors_3d
# ------------------------------------------------------------------------------------------------------------------


def test_within_section_knn_weights_on_grid():
    sdata = grid_stack(n_sections=1, side=13, pitch_px=20.0, um_per_px=2.0)
    t = sdata.tables["table"]
    neighbors_3d(sdata, n_neighs=12, n_neighs_across=0)
    W, D = t.obsp["asign_connectivities"], t.obsp["asign_distances"]
    xy = np.asarray(t.obsm["spatial"])
    # 4 pitches from the border: no spot picks them from farther than 2 pitches, so the union adds nothing
    interior = np.flatnonzero(np.all((xy >= 50 + 4 * 20) & (xy <= 50 + 8 * 20), axis=1))
    assert interior.size == 25
    for i in interior:
        w = np.sort(W[i].data)[::-1]
        # 4 at one pitch (weight 1), 4 diagonals (1/sqrt2), 4 at two pitches (1/2)
        np.testing.assert_allclose(w, [1] * 4 + [2**-0.5] * 4 + [0.5] * 4, rtol=1e-12)
        np.testing.assert_allclose(np.sort(D[i].data), np.sort(40.0 / W[i].data))  # µm = pitch 20 px * 2 um/px
    assert W.diagonal().max() == 0 and abs(W - W.T).max() == 0
    assert (W != 0).nnz == (D != 0).nnz == W.nnz
    # every edge of the union weighs median NN distance / its length (median NN = one pitch = 40 um)
    np.testing.assert_allclose(W.data * D.data, 40.0, rtol=1e-12)
    assert set(t.uns["asign_neighbors"]) == {"connectivities_key", "distances_key", "params"}
    binary = neighbors_3d(sdata, n_neighs=4, n_neighs_across=0, weights="binary", inplace=False)
    assert set(np.unique(binary.connectivities.data)) == {1.0}
    assert binary.connectivities[interior].getnnz(axis=1).tolist() == [4] * interior.size


def test_small_sections_link_all_their_spots(caplog):
    """A section of n_neighs spots or fewer gets all its pairs; the other sections' graphs are untouched."""
    from asign.io import Section, stack_sections

    big = grid_stack(n_sections=1, side=6)
    xy_big = np.asarray(big.tables["table"].obsm["spatial"], dtype=float)
    tiny = np.array([[50.0, 50.0], [70.0, 50.0], [50.0, 90.0]])

    def sec(name, xy):
        n = len(xy)
        return Section(name=name, spots=xy, counts=np.ones((n, 2), np.float32), genes=["a", "b"], um_per_px=2.0)

    sd = stack_sections(
        [sec("G1", xy_big), sec("G2", tiny), sec("G3", tiny[:1])], spot_diameter_um=20.0, thickness_um=10.0
    )
    with caplog.at_level(logging.WARNING, logger="asign"):
        res = neighbors_3d(sd, n_neighs=12, n_neighs_across=0, radius_um=10, inplace=False)
    (msg,) = [r.getMessage() for r in caplog.records if "n_neighs=12" in r.getMessage()]
    assert "G2 (3 spots)" in msg and "G3 (1 spots)" in msg and "G1" not in msg
    W, D = res.connectivities, res.distances
    rows = {s: np.flatnonzero(_section_rows(sd, s)) for s in ("G1", "G2", "G3")}
    assert W[rows["G2"]].getnnz(axis=1).tolist() == [2, 2, 2]
    assert W[rows["G3"]].nnz == 0
    # G2's weights: median nearest-neighbour distance of G2 (40 um) over each pair's length
    sub = W[rows["G2"]][:, rows["G2"]].toarray()
    d = np.linalg.norm(tiny[:, None] - tiny[None], axis=-1) * 2.0
    off = ~np.eye(3, dtype=bool)
    np.testing.assert_allclose(sub[off], 40.0 / d[off], rtol=1e-12)
    np.testing.assert_allclose(D[rows["G2"]][:, rows["G2"]].toarray(), d, rtol=1e-12)
    alone = neighbors_3d(big, n_neighs=12, n_neighs_across=0, radius_um=10, inplace=False).connectivities
    g1 = rows["G1"]
    assert abs(W[g1][:, g1] - alone).max() == 0


def test_neighbors_3d_on_synthetic_stack(aligned_stack):
    t = aligned_stack.tables["table"]
    st = get_stack(t)
    codes = section_codes(t, st)
    r_um = 0.5 * st.spot_diameter_um * 2
    neighbors_3d(aligned_stack, radius_um=r_um)
    W, D = t.obsp["asign_connectivities"], t.obsp["asign_distances"]
    assert W.format == "csr" and D.format == "csr"
    assert abs(W - W.T).max() == 0 and abs(D - D.T).max() < 1e-9 and W.diagonal().max() == 0
    assert np.array_equal(W.indptr, D.indptr) and np.array_equal(W.indices, D.indices)
    cross = cross_section_edges(W, t.obs["section"]).tocoo()
    xr, xc = cross.row[cross.data], cross.col[cross.data]
    assert xr.size > 0 and np.all(codes[xr] != codes[xc])
    # cross-section weights are IoU of the footprints (closed form from the block coordinates)
    w_world = np.asarray(t.obsm["spatial_world"])
    d_world = np.linalg.norm(w_world[xr] - w_world[xc], axis=1)
    np.testing.assert_allclose(W[xr, xc].A1, method_oracle_iou(d_world, r_um), atol=1e-9)
    # cross-section distances are 3D distances in µm
    s3 = np.asarray(t.obsm["spatial_3d"])
    np.testing.assert_allclose(D[xr, xc].A1, np.linalg.norm(s3[xr] - s3[xc], axis=1), rtol=1e-9)
    # top partner of every spot (highest IoU) is spatially close: median < half the pitch in the block frame
    pitch = np.sqrt(np.pi * 1500.0 * 1180.0 / 60)
    Wx = sp.csr_matrix((W[xr, xc].A1, (xr, xc)), shape=W.shape)
    has = Wx.getnnz(axis=1) > 0
    top = np.asarray(Wx.argmax(axis=1)).ravel()
    d_top = np.linalg.norm(w_world[has] - w_world[top[has]], axis=1)
    assert has.mean() > 0.95
    assert np.median(d_top) < 0.5 * pitch
    params = t.uns["asign_neighbors"]["params"]
    assert params["across"] == "overlap" and params["n_neighs_across"] == 12
    assert all(v is not None and not isinstance(v, tuple) for v in params.values())


def test_wrong_alignment_puts_partners_far_apart(small_stack):
    """Negative control for the test above: identity transforms (no alignment) give far partners."""
    st = get_stack(small_stack.tables["table"])
    write_alignment(small_stack, {s: np.eye(3) for s in st.sections}, st.sections[1])
    t = small_stack.tables["table"]
    res = neighbors_3d(small_stack, radius_um=st.spot_diameter_um, n_neighs=4, inplace=False)
    cross = cross_section_edges(res.connectivities, t.obs["section"])
    Wx = res.connectivities.multiply(cross).tocsr()
    has = Wx.getnnz(axis=1) > 0
    top = np.asarray(Wx.argmax(axis=1)).ravel()
    w = np.asarray(t.obsm["spatial_world"])
    pitch = np.sqrt(np.pi * 1500.0 * 1180.0 / 60)
    assert np.median(np.linalg.norm(w[has] - w[top[has]], axis=1)) > pitch


def test_top_partner_is_nearest_adjacent_spot(aligned_stack):
    """With equal circles IoU decreases with distance: the best partner is the nearest spot of an adjacent section."""
    t = aligned_stack.tables["table"]
    st = get_stack(t)
    codes = section_codes(t, st)
    res = neighbors_3d(
        aligned_stack, n_neighs=4, n_neighs_across=1, adjacent_only=True, radius_um=st.spot_diameter_um, inplace=False
    )
    w = np.asarray(t.obsm["spatial_world"])
    d = np.linalg.norm(w[:, None] - w[None], axis=-1)
    d[np.abs(codes[:, None] - codes[None, :]) != 1] = np.inf
    nearest = d.argmin(axis=1)
    W = res.connectivities.tocsr()
    for i in range(t.n_obs):
        assert W[i, nearest[i]] > 0


def _permuted_grid_graphs(**kw):
    side, S = 8, 3
    rng = np.random.default_rng(5)
    perms = [rng.permutation(side * side) for _ in range(S)]
    out = []
    for p in (None, perms):
        sd = grid_stack(n_sections=S, side=side, pitch_px=20.0, perms=p)
        st = get_stack(sd.tables["table"])
        T = {s: _rot(25 * i, 1.0, (7.0 * i, -3.0 * i)) for i, s in enumerate(st.sections)}
        write_alignment(sd, T, st.sections[1])
        out.append((sd.tables["table"], neighbors_3d(sd, radius_um=30.0, inplace=False, **kw)))
    return out


@pytest.mark.parametrize("n_neighs", [6, 12])
def test_permutation_invariance_public(n_neighs):
    """Rows reordered (same spots, same obs_names) -> the same graph, including ties on the square grid."""
    (t0, g0), (t1, g1) = _permuted_grid_graphs(n_neighs=n_neighs, n_neighs_across=5)
    idx = t1.obs_names.get_indexer(t0.obs_names)
    assert not np.array_equal(idx, np.arange(idx.size))
    for a, b in zip(g0, g1, strict=True):
        b = b[idx][:, idx]
        assert (a != b).nnz == 0
        assert np.array_equal((a != 0).toarray(), (b != 0).toarray())


def test_permutation_invariance_cores_interleaved_sections():
    """Array cores with rows of all sections shuffled together: permuted input -> permuted graph."""
    rng = np.random.default_rng(7)
    n_per, S = 150, 4
    g = np.arange(13) * 25.0
    grid = np.stack(np.meshgrid(g, g), -1).reshape(-1, 2)[:n_per]
    coords = np.concatenate([grid + rng.uniform(-2, 2, grid.shape) * (s % 2) for s in range(S)])
    codes = np.repeat(np.arange(S), n_per)
    T = np.stack([_rot(15 * s, 1.0, (3.0 * s, 0.0)) for s in range(S)])
    feats = rng.random((coords.shape[0], 8))
    key = rng.permutation(coords.shape[0])  # stable identity of each spot
    perm = rng.permutation(coords.shape[0])

    def graph(c, k, f, cd):
        W = _within_graph(c, cd, 7, key=k)
        r, cc, v = _cross_edges(c, cd, T, 20.0, 5, score="combined", features=f, key=k)
        X = sp.csr_matrix((v, (r, cc)), shape=W.shape)
        return W, X.maximum(X.T)

    W0, X0 = graph(coords, key, feats, codes)
    W1, X1 = graph(coords[perm], key[perm], feats[perm], codes[perm])
    for a, b in ((W0, W1), (X0, X1)):
        a = a[perm][:, perm]
        assert (a != b).nnz == 0 or abs(a - b).max() < 1e-12
        assert np.array_equal((a != 0).toarray(), (b != 0).toarray())


@pytest.mark.parametrize("radius", [60.0, 200.0])
def test_nearest_fast_path_equals_exhaustive_search(radius):
    """All-section overlap partners from one kNN query equal those of the exhaustive candidate search."""
    rng = np.random.default_rng(11)
    S, side = 6, 12
    g = np.arange(side) * 50.0
    grid = np.stack(np.meshgrid(g, g), -1).reshape(-1, 2)
    coords = np.concatenate([grid + (rng.uniform(0, 50, 2) if s % 2 else 0) for s in range(S)])
    codes = np.repeat(np.arange(S), grid.shape[0])
    T = np.stack([_about(_rot(30 * s, 1.0, (5.0 * s, 0.0)), (275.0, 275.0)) for s in range(S)])
    key = rng.permutation(coords.shape[0])
    active = np.ones(S, dtype=bool)
    active[4] = False
    fast = _cross_edges(coords, codes, T, radius, 5, key=key, active=active)
    slow = _cross_edges(coords, codes, T, radius, 5, key=key, active=active, knn_fast_path=False)
    n = coords.shape[0]
    A, B = (sp.csr_matrix((v, (r, c)), shape=(n, n)) for r, c, v in (fast, slow))
    assert A.nnz == B.nnz > 0 and (A != B).nnz == 0
    assert not np.isin(codes[fast[0]], [4]).any() and not np.isin(codes[fast[1]], [4]).any()
    assert np.all(codes[fast[0]] != codes[fast[1]])


def test_combined_score_matches_brute_force(aligned_stack):
    t = aligned_stack.tables["table"]
    st = get_stack(t)
    codes = section_codes(t, st)
    rng = np.random.default_rng(0)
    t.obsm["feat"] = rng.random((t.n_obs, 16)) ** 3  # non-negative features
    k = 5
    r_um = st.spot_diameter_um
    res = neighbors_3d(
        aligned_stack, n_neighs=3, n_neighs_across=k, similarity_key="feat", radius_um=r_um, inplace=False
    )
    # brute force: dense IoU + cosine, other sections only, top-k per row, union keeping the larger
    w = np.asarray(t.obsm["spatial_world"])
    iou = method_oracle_iou(np.linalg.norm(w[:, None] - w[None], axis=-1), r_um)
    F = t.obsm["feat"] / np.linalg.norm(t.obsm["feat"], axis=1, keepdims=True)
    score = iou + F @ F.T
    score[codes[:, None] == codes[None, :]] = -np.inf
    top = np.argsort(-score, axis=1, kind="stable")[:, :k]
    want = np.zeros_like(score)
    rows = np.repeat(np.arange(t.n_obs), k)
    want[rows, top.ravel()] = score[rows, top.ravel()]
    want = np.maximum(want, want.T)
    got = res.connectivities.multiply(cross_section_edges(res.connectivities, t.obs["section"])).toarray()
    np.testing.assert_allclose(got, want, atol=1e-9)
    # similarity only: every spot has exactly k partners chosen by cosine, weights = cosine
    res_s = neighbors_3d(aligned_stack, n_neighs=3, across="similarity", similarity_key="feat", inplace=False)
    got_s = res_s.connectivities.multiply(cross_section_edges(res_s.connectivities, t.obs["section"])).toarray()
    cos = F @ F.T
    cos[codes[:, None] == codes[None, :]] = -np.inf
    top_s = np.argsort(-cos, axis=1, kind="stable")[:, :12]
    assert all(np.all(got_s[i, top_s[i]] > 0) for i in range(t.n_obs))
    nz = got_s > 0
    np.testing.assert_allclose(got_s[nz], (F @ F.T)[nz], atol=1e-12)


def test_outputs_are_zarr_writable(aligned_stack, tmp_path):
    import anndata as ad

    t = aligned_stack.tables["table"]
    spot_overlaps(aligned_stack, radius_um=100.0)
    neighbors_3d(aligned_stack, radius_um=100.0)
    t.write_zarr(tmp_path / "t.zarr")
    back = ad.read_zarr(tmp_path / "t.zarr")
    for k in ("asign_overlap", "asign_connectivities", "asign_distances"):
        assert (back.obsp[k] != t.obsp[k]).nnz == 0
    assert back.uns["asign_neighbors"]["connectivities_key"] == "asign_connectivities"
    assert back.uns["asign_overlap"]["params"]["footprint"] == "circle"


def test_self_loops_and_inplace_false(aligned_stack):
    t = aligned_stack.tables["table"]
    res = neighbors_3d(aligned_stack, self_loops=True, radius_um=100.0, inplace=False)
    assert isinstance(res, SpatialNeighbors3D)
    assert "asign_connectivities" not in t.obsp and "asign_neighbors" not in t.uns
    assert np.all(res.connectivities.diagonal() == 1.0)
    assert np.array_equal(res.connectivities.indptr, res.distances.indptr)
    assert np.array_equal(res.connectivities.indices, res.distances.indices)
    assert np.all(res.distances.diagonal() == 0.0)


def test_isolated_spots_warning(small_stack, asign_log):
    st = get_stack(small_stack.tables["table"])
    T, ref = ground_truth_transforms(small_stack)
    T[st.sections[2]] = T[st.sections[2]] @ _rot(0, 1.0, (5000.0, 0.0))  # S3 moved far away from the others
    write_alignment(small_stack, T, ref)
    neighbors_3d(small_stack, n_neighs=0, adjacent_only=True, radius_um=st.spot_diameter_um)
    msgs = [r.getMessage() for r in asign_log.records if r.levelno == logging.WARNING]
    codes = section_codes(small_stack.tables["table"], st)
    n3 = int((codes == 2).sum())
    assert any(f"{n3} spot(s) have no neighbour" in m and "S3" in m for m in msgs)
    assert small_stack.tables["table"].uns["asign_neighbors"]["params"]["n_isolated"] == n3


def test_polygon_path_in_neighbors_3d(small_stack):
    """Non-similarity transforms take the polygon path; partners still follow the (sheared) geometry."""
    T, ref = ground_truth_transforms(small_stack)
    shear = np.array([[1.1, 0.15, 0.0], [0.0, 0.95, 0.0], [0.0, 0.0, 1.0]])
    T = {s: shear @ M for s, M in T.items()}
    write_alignment(small_stack, T, ref)
    st = get_stack(small_stack.tables["table"])
    M = spot_overlaps(small_stack, radius_um=st.spot_diameter_um, inplace=False)
    # a common affine map preserves IoU: equal to the unsheared ground truth within the polygon tolerance
    t = small_stack.tables["table"]
    codes = section_codes(t, st)
    w = np.asarray(t.obsm["spatial_world"])
    want = method_oracle_iou(np.linalg.norm(w[:, None] - w[None], axis=-1), st.spot_diameter_um)
    want[np.abs(codes[:, None] - codes[None, :]) != 1] = 0.0
    np.testing.assert_allclose(M.toarray(), want, atol=1e-2)
    spot_overlaps(small_stack, radius_um=st.spot_diameter_um)
    assert t.uns["asign_overlap"]["params"]["footprint"] == "polygon"
    # neighbors_3d weighs its cross-section edges by the same polygon IoU (circles on the sheared centres would be
    # off by ~0.05)
    W = neighbors_3d(small_stack, radius_um=st.spot_diameter_um, inplace=False).connectivities
    cross = cross_section_edges(W, t.obs["section"]).tocoo()
    xr, xc = cross.row[cross.data], cross.col[cross.data]
    assert xr.size > t.n_obs
    d_world = np.linalg.norm(w[xr] - w[xc], axis=1)
    np.testing.assert_allclose(W[xr, xc].A1, method_oracle_iou(d_world, st.spot_diameter_um), atol=1e-2)


def test_set_alignment_integration(small_stack):
    """The same graph whether the keys come from asign.pp._align.set_alignment or are written by hand."""
    import copy

    from asign.pp import _align as align

    other = copy.deepcopy(small_stack)
    t = small_stack.tables["table"]
    st = get_stack(t)
    n2w = np.asarray(t.uns["asign"]["synthetic"]["native_to_world"])
    align.set_alignment(small_stack, {s: n2w[i] for i, s in enumerate(st.sections)}, reference=st.sections[1])
    T, ref = ground_truth_transforms(other)
    write_alignment(other, T, ref)
    a = neighbors_3d(small_stack, radius_um=100.0, inplace=False)
    b = neighbors_3d(other, radius_um=100.0, inplace=False)
    for x, y in zip(a, b, strict=True):
        assert (x != 0).nnz == (y != 0).nnz
        assert abs(x - y).max() < 1e-6


# ------------------------------------------------------------------------------------------------------------------
# bad input
# ------------------------------------------------------------------------------------------------------------------


def test_bad_inputs(small_stack):
    with pytest.raises(KeyError, match="align_layers"):
        spot_overlaps(small_stack)
    with pytest.raises(KeyError, match="align_layers") as err:
        neighbors_3d(small_stack)
    # the hint names the public way to known transforms, not a private helper
    assert 'method="transforms", transforms=' in str(err.value) and "._align" not in str(err.value)
    # without cross-section edges no alignment is needed
    assert neighbors_3d(small_stack, n_neighs_across=0, inplace=False).connectivities.nnz > 0
    T, ref = ground_truth_transforms(small_stack)
    write_alignment(small_stack, T, ref)
    del small_stack.tables["table"].obsm["spatial_aligned"]
    with pytest.raises(KeyError, match="spatial_aligned"):
        neighbors_3d(small_stack)
    write_alignment(small_stack, T, ref)
    aligned_stack = small_stack
    with pytest.raises(KeyError, match="extract_features"):
        neighbors_3d(aligned_stack, similarity_key="nope")
    with pytest.raises(ValueError, match="similarity_key"):
        neighbors_3d(aligned_stack, across="similarity")
    smallest = str(aligned_stack.tables["table"].obs["section"].value_counts().idxmin())
    feat = np.ones((aligned_stack.tables["table"].n_obs, 3))
    feat[_section_rows(aligned_stack, smallest)] = np.nan  # what extract_features(sections=...) leaves
    aligned_stack.tables["table"].obsm["partial"] = feat
    with pytest.raises(ValueError, match=rf"non-finite values for \d+ spots \(per section: \{{'{smallest}'") as err:
        neighbors_3d(aligned_stack, similarity_key="partial")
    assert "asign.pp.make_spots" in str(err.value)  # the other way to NaN features: virtual spots added since
    with pytest.raises(ValueError, match="across='combined'"):
        aligned_stack.tables["table"].obsm["f"] = np.ones((aligned_stack.tables["table"].n_obs, 3))
        neighbors_3d(aligned_stack, across="overlap", similarity_key="f")
    with pytest.raises(ValueError, match="not both"):
        spot_overlaps(aligned_stack, radius_px=10.0, radius_um=10.0)
    with pytest.raises(ValueError, match="non-negative integer"):
        neighbors_3d(aligned_stack, n_neighs=-1)
    with pytest.raises(ValueError, match="weights"):
        neighbors_3d(aligned_stack, weights="gaussian")
    bad = aligned_stack.tables["table"].uns["asign"]["alignment"]["transforms"]
    bad["S1"] = np.zeros((3, 3))
    with pytest.raises(ValueError, match="S1"):
        spot_overlaps(aligned_stack)


# ------------------------------------------------------------------------------------------------------------------
# the alignment a stored graph was built on; coincident spots
# ------------------------------------------------------------------------------------------------------------------


def _realigned_grid():
    """A 3-section grid aligned with S1 shifted by 3 pitches and a graph on it; then aligned again correctly."""
    import asign

    sd = grid_stack(n_sections=3, side=7, pitch_px=10.0, um_per_px=1.0)
    wrong = np.eye(3)
    wrong[0, 2] = 30.0
    ids = {"G1": wrong, "G2": np.eye(3), "G3": np.eye(3)}
    asign.pp.align_layers(sd, method="transforms", transforms=ids, show_progress_bar=False)
    neighbors_3d(sd, n_neighs=4, n_neighs_across=4, radius_px=10.0)
    old = sd.tables["table"].obsp["asign_connectivities"].copy()
    asign.pp.align_layers(sd, method="transforms", transforms=dict.fromkeys(ids, np.eye(3)), show_progress_bar=False)
    return sd, old


def test_stale_graph_after_realignment_is_refused():
    """A graph built before `align_layers` ran again is refused by propagation and by method 'asign', naming the
    obsp key and what to run; once `neighbors_3d` ran again both accept it."""
    import asign
    from asign.pp._graph import check_graph_alignment
    from asign.tl._asign import check_sample_inputs

    sd, old = _realigned_grid()
    t = sd.tables["table"]
    fp = t.uns["asign_neighbors"]["params"]["alignment_fingerprint"]
    assert isinstance(fp, str) and len(fp) == 40
    assert (t.obsp["asign_connectivities"] != old).nnz == 0  # still the old graph
    stale = r"`\.obsp\['asign_connectivities'\]` of table 'table' was built on an earlier alignment.*neighbors_3d"
    with pytest.raises(ValueError, match=stale):
        asign.tl.impute(sd, known="G2", method="propagation", genes=["a", "b"], inplace=False)
    with pytest.raises(ValueError, match=stale):
        check_sample_inputs(t, sd.tables, "table", "", levels="spot", feature_key=None, graph_key="asign")
    with pytest.raises(ValueError, match=stale):  # method 'asign' refuses it before any training
        asign.tl.impute(
            sd,
            known="G2",
            method="asign",
            genes=["a", "b"],
            method_kwargs={"feature_key": None, "levels": "spot"},
            inplace=False,
        )
    neighbors_3d(sd, n_neighs=4, n_neighs_across=4, radius_px=10.0)
    assert t.uns["asign_neighbors"]["params"]["alignment_fingerprint"] != fp
    assert (t.obsp["asign_connectivities"] != old).nnz > 0
    check_graph_alignment(t)
    check_sample_inputs(t, sd.tables, "table", "", levels="spot", feature_key=None, graph_key="asign")
    out = asign.tl.impute(sd, known="G2", method="propagation", genes=["a", "b"], inplace=False)
    assert np.isfinite(out.layers["imputed"]).all()


def test_graph_without_fingerprint_or_cross_part_passes(asign_log):
    """A graph of an older version (no fingerprint) passes with an info message; a graph without cross-section
    edges records an empty fingerprint and does not depend on the alignment."""
    import asign
    from asign.pp._graph import check_graph_alignment

    sd, _ = _realigned_grid()
    t = sd.tables["table"]
    del t.uns["asign_neighbors"]["params"]["alignment_fingerprint"]
    check_graph_alignment(t)
    assert any("records no `alignment_fingerprint`" in r.getMessage() for r in asign_log.records)
    asign.tl.impute(sd, known="G2", method="propagation", genes=["a", "b"], inplace=False)
    neighbors_3d(sd, n_neighs=4, n_neighs_across=0)
    assert t.uns["asign_neighbors"]["params"]["alignment_fingerprint"] == ""
    shift = np.eye(3)
    shift[1, 2] = 20.0
    tr = {"G1": shift, "G2": np.eye(3), "G3": np.eye(3)}
    asign.pp.align_layers(sd, method="transforms", transforms=tr, show_progress_bar=False)
    check_graph_alignment(t)


def test_alignment_fingerprint_survives_copy_permutation_and_zarr(tmp_path):
    """Harmless differences keep the fingerprint: a copy, permuted rows, aligned positions NaN (with any bit pattern)
    or changed (the connectivities do not read them), a round trip of the SpatialData object through zarr; the
    transforms and the spots' native positions change it."""
    import spatialdata

    from asign.pp._graph import alignment_fingerprint, check_graph_alignment

    sd = grid_stack(n_sections=3, side=6, pitch_px=10.0, um_per_px=1.0)
    write_alignment(sd, {"G1": _rot(5.0, shift=(3.0, -2.0)), "G2": np.eye(3)}, "G2")  # G3: NaN aligned positions
    t = sd.tables["table"]
    assert np.isnan(t.obsm["spatial_aligned"]).any()
    neighbors_3d(sd, n_neighs=4, n_neighs_across=4, radius_px=10.0)
    fp = t.uns["asign_neighbors"]["params"]["alignment_fingerprint"]
    assert alignment_fingerprint(t) == fp
    assert alignment_fingerprint(t.copy()) == fp
    perm = np.random.default_rng(0).permutation(t.n_obs)
    assert alignment_fingerprint(t[perm].copy()) == fp
    t2 = t.copy()
    other_nan = np.array(t2.obsm["spatial_aligned"], dtype=float)
    bits = other_nan.view(np.uint64)
    bits[np.isnan(other_nan)] |= np.uint64(0x8000_0000_0000_0001)  # negative NaN with a payload
    t2.obsm["spatial_aligned"] = other_nan
    assert alignment_fingerprint(t2) == fp
    del t2.obsm["spatial_aligned"]
    assert alignment_fingerprint(t2) == fp
    sd.write(tmp_path / "s.zarr")
    back = spatialdata.read_zarr(tmp_path / "s.zarr").tables["table"]
    assert back.uns["asign_neighbors"]["params"]["alignment_fingerprint"] == fp
    assert alignment_fingerprint(back) == fp
    check_graph_alignment(back)
    # what the connectivities depend on changes the fingerprint
    for change in ("transform", "new transform", "no alignment", "spot moved", "renamed"):
        t3 = t.copy()
        if change == "transform":
            t3.uns["asign"]["alignment"]["transforms"]["G1"] = _rot(6.0)
        elif change == "new transform":
            t3.uns["asign"]["alignment"]["transforms"]["G3"] = np.eye(3)
        elif change == "no alignment":
            del t3.uns["asign"]["alignment"]
        elif change == "spot moved":
            xy = np.array(t3.obsm["spatial"], dtype=float)
            xy[3, 0] += 1e-6
            t3.obsm["spatial"] = xy
        else:
            t3.obs_names = [f"x{n}" for n in t3.obs_names]
        assert alignment_fingerprint(t3) != fp, change
        with pytest.raises(ValueError, match="earlier alignment"):
            check_graph_alignment(t3)


def test_coincident_spots_weigh_at_most_two(asign_log):
    """Two spots of a section at the same position get weight 2 (distance floored at half the section's median NN
    distance), not 1000; the warning names the section, the spots and the weight; propagation is not stuck."""
    import asign
    from asign.io import Section, stack_sections

    rng = np.random.default_rng(0)
    g = np.array([[x, y] for y in range(0, 70, 10) for x in range(0, 70, 10)], float) + 100

    def counts(xy):
        lam = np.column_stack([np.exp((xy[:, 0] - 100) / 15), np.full(len(xy), 20.0), np.exp((160 - xy[:, 0]) / 15)])
        return rng.poisson(5 * lam).astype(np.float32)

    def build(s1):
        secs = [
            Section(name=f"S{i + 1}", spots=xy, counts=counts(xy), genes=["a", "b", "c"], um_per_px=1.0)
            for i, xy in enumerate([s1, g, g])
        ]
        sd = stack_sections(secs, spot_diameter_um=20, thickness_um=10)
        asign.pp.align_layers(sd, method="transforms", transforms=dict.fromkeys(("S1", "S2", "S3"), np.eye(3)))
        neighbors_3d(sd, n_neighs=8, n_neighs_across=4, radius_px=10.0)
        out = asign.tl.impute(sd, known="S2", method="propagation", genes=["a", "b", "c"], inplace=False)
        return sd, out

    sd, out = build(np.vstack([g, g[[6]]]))  # S1 spot 6 duplicated as row 49
    t = sd.tables["table"]
    W = t.obsp["asign_connectivities"]
    assert W[6, 49] == 2.0 and W[6, 5] == 1.0
    (msg,) = [r.getMessage() for r in asign_log.records if "closer than 0.5" in r.getMessage()]
    assert "['S1']" in msg and t.obs_names[6] in msg and t.obs_names[49] in msg and "capped at 2" in msg
    _, out0 = build(g)
    # the duplicated unknown pair follows its neighbours as without the duplicate, far from the known mean
    known_mean = out.layers["target"][out.obs["known"].to_numpy()].mean(0)[0]
    a, a0 = out.layers["imputed"][6, 0], out0.layers["imputed"][6, 0]
    assert abs(a - a0) < 0.25 * abs(a0 - known_mean)


def test_within_weights_unchanged_on_a_jittered_lattice(asign_log):
    """Where every nearest-neighbour distance lies within ±20% of the median the floor never applies: each weight
    is median NN distance / distance, as without the floor, and nothing is warned."""
    sd = grid_stack(n_sections=1, side=12, pitch_px=20.0, um_per_px=2.0, jitter=1.8, seed=3)
    t = sd.tables["table"]
    xy = np.asarray(t.obsm["spatial"], dtype=float) * 2.0
    d = np.linalg.norm(xy[:, None] - xy[None], axis=-1)
    np.fill_diagonal(d, np.inf)
    nn = d.min(axis=1)
    med = np.median(nn)
    assert np.all(np.abs(nn / med - 1) <= 0.2) and np.ptp(nn) > 0.1 * med
    res = neighbors_3d(sd, n_neighs=12, n_neighs_across=0, radius_um=10.0, inplace=False)
    W, D = res.connectivities, res.distances
    np.testing.assert_allclose(W.data, med / D.data, rtol=1e-12)
    assert not asign_log.warnings


def test_stale_similarity_features_are_refused(tmp_path, asign_log):
    """A graph whose cross-section similarity read features that were replaced afterwards (features extracted again
    with other options) is refused by imputation, naming the obsm key and what to run; a copy, permuted rows and a
    zarr round trip keep the fingerprint; removed features pass with a warning; running `neighbors_3d` again fixes
    it. An overlap-only graph records an empty similarity fingerprint."""
    import spatialdata

    import asign
    from asign.pp._graph import check_graph_alignment, similarity_fingerprint

    sd = grid_stack(n_sections=3, side=7, pitch_px=10.0, um_per_px=1.0)
    asign.pp.align_layers(
        sd, method="transforms", transforms=dict.fromkeys(["G1", "G2", "G3"], np.eye(3)), show_progress_bar=False
    )
    t = sd.tables["table"]
    rng = np.random.default_rng(0)
    t.obsm["feat"] = rng.normal(size=(t.n_obs, 5)).astype(np.float32)
    neighbors_3d(sd, n_neighs=4, n_neighs_across=4, radius_px=10.0, similarity_key="feat")
    fp = t.uns["asign_neighbors"]["params"]["similarity_fingerprint"]
    assert isinstance(fp, str) and len(fp) == 40 and fp == similarity_fingerprint(t, "feat")
    perm = rng.permutation(t.n_obs)
    assert similarity_fingerprint(t[perm].copy(), "feat") == fp
    sd.write(tmp_path / "s.zarr")
    back = spatialdata.read_zarr(tmp_path / "s.zarr").tables["table"]
    assert similarity_fingerprint(back, "feat") == fp
    check_graph_alignment(back)
    asign.tl.impute(sd, known="G2", method="propagation", genes=["a", "b"], inplace=False)

    t.obsm["feat"] = rng.normal(size=(t.n_obs, 5)).astype(np.float32)  # extracted again, other features
    stale = r"`\.obsp\['asign_connectivities'\]` of table 'table' was built on other image features.*obsm\['feat'\]"
    with pytest.raises(ValueError, match=stale):
        asign.tl.impute(sd, known="G2", method="propagation", genes=["a", "b"], inplace=False)
    del t.obsm["feat"]
    check_graph_alignment(t)
    assert any("no longer holds" in r.getMessage() for r in asign_log.records)
    t.obsm["feat"] = rng.normal(size=(t.n_obs, 5)).astype(np.float32)
    neighbors_3d(sd, n_neighs=4, n_neighs_across=4, radius_px=10.0, similarity_key="feat")
    check_graph_alignment(t)
    neighbors_3d(sd, n_neighs=4, n_neighs_across=4, radius_px=10.0)
    assert t.uns["asign_neighbors"]["params"]["similarity_fingerprint"] == ""
    t.obsm["feat"] = rng.normal(size=(t.n_obs, 5)).astype(np.float32)
    check_graph_alignment(t)


def test_spot_overlaps_refuses_reserved_key_added(aligned_stack):
    """key_added='asign' used to replace uns['asign'] (the manifest and the alignment): the stack no longer validated."""
    t = aligned_stack.tables["table"]
    before = dict(t.uns["asign"])
    with pytest.raises(ValueError, match=r"key_added='asign' would overwrite `\.uns\['asign'\]` of table 'table'"):
        spot_overlaps(aligned_stack, radius_um=100.0, key_added="asign")
    assert dict(t.uns["asign"]).keys() == before.keys()
    assert "asign" not in t.obsp
    from asign.io import validate_stack

    validate_stack(aligned_stack)
    # not written with inplace=False; a repeat call under the same (free) key replaces its own output
    assert spot_overlaps(aligned_stack, radius_um=100.0, key_added="asign", inplace=False).nnz > 0
    spot_overlaps(aligned_stack, radius_um=100.0, key_added="my_overlap")
    spot_overlaps(aligned_stack, radius_um=50.0, key_added="my_overlap")
    assert t.uns["my_overlap"]["params"]["radius_px"].size == 3


def test_similarity_check_tolerates_float_noise_and_refuses_non_finite_features():
    """Features extracted again with the same options but another batch size differ by float noise (~1e-5): the graph
    stays valid. Features made NaN afterwards (e.g. `extract_features(sections=...)` with other options left the
    other sections NaN) are refused for propagation, which has no feature check of its own; the message counts them."""
    import asign
    from asign.pp._graph import SIGNATURE_ATOL, check_graph_alignment

    sd = grid_stack(n_sections=3, side=7, pitch_px=10.0, um_per_px=1.0)
    asign.pp.align_layers(
        sd, method="transforms", transforms=dict.fromkeys(["G1", "G2", "G3"], np.eye(3)), show_progress_bar=False
    )
    t = sd.tables["table"]
    rng = np.random.default_rng(0)
    base = rng.normal(size=(t.n_obs, 64)).astype(np.float32)
    t.obsm["feat"] = base.copy()
    neighbors_3d(sd, n_neighs=4, n_neighs_across=4, radius_px=10.0, similarity_key="feat")
    sig = t.uns["asign_neighbors"]["params"]["similarity_signature"]
    assert sig.shape == (t.n_obs, 4) and sig.dtype == np.float32
    t.obsm["feat"] = base + rng.normal(scale=1e-5, size=base.shape).astype(np.float32)  # float noise
    check_graph_alignment(t)
    asign.tl.impute(sd, known="G2", method="propagation", genes=["a", "b"], inplace=False)
    moved = base.copy()
    moved[5] = rng.normal(size=64)  # one spot's features really changed
    t.obsm["feat"] = moved
    with pytest.raises(ValueError, match="built on other image features"):
        check_graph_alignment(t)
    assert SIGNATURE_ATOL < 0.01
    nan = base.copy()
    nan[3] = np.nan
    t.obsm["feat"] = nan
    with pytest.raises(ValueError, match=r"non-finite values in 1 spots"):
        asign.tl.impute(sd, known="G2", method="propagation", genes=["a", "b"], inplace=False)
