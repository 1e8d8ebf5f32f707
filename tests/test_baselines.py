from __future__ import annotations

import numpy as np
import pytest
import scipy.sparse as sp

import asign
from asign._propagation import label_propagation, propagate, row_normalize
from asign.tl._baselines import idw_nearest


def _add_aligned(sdata):
    # the synthetic ground truth already holds every spot in block µm (native_to_world applied to obsm['spatial'])
    t = sdata.tables["table"]
    t.obsm["spatial_aligned"] = np.asarray(t.obsm["spatial_world"], dtype=float).copy()
    return sdata


def _knn_graph(coords: np.ndarray, k: int) -> sp.csr_matrix:
    from scipy.spatial import cKDTree

    d, j = cKDTree(coords).query(coords, k=k + 1)
    n = len(coords)
    W = sp.csr_matrix((1.0 / d[:, 1:].ravel(), (np.repeat(np.arange(n), k), j[:, 1:].ravel())), shape=(n, n))
    return W.maximum(W.T).tocsr()


@pytest.fixture
def stack():
    s = _add_aligned(asign.datasets.synthetic_stack(n_sections=4, n_spots=120, n_genes=30, images=False, seed=2))
    t = s.tables["table"]
    z = t.obs["section"].cat.codes.to_numpy() * 100.0
    t.obsp["asign_connectivities"] = _knn_graph(np.column_stack([t.obsm["spatial_aligned"], z]), 8)
    return s


# ----------------------------------------------------------------------------- propagation (array level)
def _dense_reference(W, Y0, clamp, n_iter):
    W = np.asarray(W.todense() if sp.issparse(W) else W, dtype=float)
    deg = W.sum(axis=1)
    P = np.zeros_like(W)
    for i in range(len(W)):
        if deg[i] > 0:
            P[i] = W[i] / deg[i]
        else:
            P[i, i] = 1.0
    Y = Y0.copy()
    for _ in range(n_iter):
        Y = P @ Y
        Y[clamp] = Y0[clamp]
    return Y


def test_propagate_matches_dense_loop():
    rng = np.random.default_rng(0)
    n, g = 40, 5
    W = sp.random(n, n, density=0.15, random_state=1, format="csr")
    W = (W + W.T).tocsr()
    W.setdiag(0)
    W.eliminate_zeros()
    # an isolated node
    W = W.tolil()
    W[7, :] = 0
    W[:, 7] = 0
    W = W.tocsr()
    Y0 = rng.normal(size=(n, g))
    clamp = rng.random(n) < 0.3
    got = propagate(W, Y0, clamp, n_iter=10)
    np.testing.assert_allclose(got, _dense_reference(W, Y0, clamp, 10), atol=1e-12)
    np.testing.assert_array_equal(got[clamp], Y0[clamp])
    np.testing.assert_array_equal(got[7], Y0[7])
    assert np.isfinite(got).all()
    # vector input and zero iterations
    np.testing.assert_allclose(propagate(W, Y0[:, 0], clamp, n_iter=3), _dense_reference(W, Y0, clamp, 3)[:, 0])
    np.testing.assert_array_equal(propagate(W, Y0, clamp, n_iter=0), Y0)


def test_row_normalize_and_errors():
    W = sp.csr_matrix(np.array([[0, 2.0, 2.0], [1.0, 0, 0], [0, 0, 0]]))
    P = row_normalize(W).toarray()
    np.testing.assert_allclose(P, [[0, 0.5, 0.5], [1, 0, 0], [0, 0, 1]])
    with pytest.raises(ValueError, match="non-negative"):
        row_normalize(sp.csr_matrix(np.array([[0, -1.0], [1.0, 0]])))
    with pytest.raises(ValueError, match="square"):
        row_normalize(sp.csr_matrix(np.ones((2, 3))))
    with pytest.raises(ValueError, match="finite"):
        propagate(W, np.array([np.nan, 0, 0]), np.array([True, False, False]))


def test_label_propagation_initialises_with_known_mean():
    # a chain 0-1-2 and a separate pair 3-4 with no known spot: 3, 4 keep the known mean
    W = sp.csr_matrix(np.array([[0, 1, 0, 0, 0], [1, 0, 1, 0, 0], [0, 1, 0, 0, 0], [0, 0, 0, 0, 1], [0, 0, 0, 1, 0.0]]))
    Y = np.array([[1.0], [np.nan], [np.nan], [np.nan], [np.nan]])
    known = np.array([True, False, False, False, False])
    out = label_propagation(W, Y, known, n_iter=50)
    np.testing.assert_allclose(out[:3, 0], 1.0, atol=1e-6)
    np.testing.assert_allclose(out[3:, 0], 1.0)
    Y2 = np.array([[1.0], [np.nan], [np.nan], [3.0], [np.nan]])
    known2 = np.array([True, False, False, True, False])
    out2 = label_propagation(W, Y2, known2, n_iter=1)
    # unknown spots start at the known mean 2; one step: node 1 = mean(1, 2), node 2 = 2, node 4 = 3
    np.testing.assert_allclose(out2[:, 0], [1.0, 1.5, 2.0, 3.0, 3.0])


# -------------------------------------------------------------------------------------- nearest (array level)
def _brute_nearest(coords, Y, known, k, weights, p, eps):
    kidx = np.flatnonzero(known)
    out = np.zeros((len(coords), Y.shape[1]))
    for i in range(len(coords)):
        cand = kidx[kidx != i]
        d = np.linalg.norm(coords[cand] - coords[i], axis=1)
        order = np.lexsort((cand, d))[: min(k, len(cand))]
        w = 1 / (d[order] + eps) ** p if weights == "idw" else np.ones(len(order))
        out[i] = (w / w.sum()) @ Y[cand[order]]
    return out


@pytest.mark.parametrize(
    ("k", "weights", "p"), [(1, "idw", 1.0), (5, "idw", 1.0), (5, "uniform", 1.0), (8, "idw", 2.0)]
)
def test_idw_nearest_matches_brute_force(k, weights, p):
    rng = np.random.default_rng(k)
    coords = rng.uniform(0, 100, (60, 2))
    Y = rng.normal(size=(60, 4))
    known = rng.random(60) < 0.4
    got, k_used = idw_nearest(coords, np.where(known[:, None], Y, np.nan), known, k=k, weights=weights, p=p, eps=0.5)
    assert k_used == k
    np.testing.assert_allclose(got, _brute_nearest(coords, Y, known, k, weights, p, 0.5), atol=1e-10)


def test_idw_nearest_eps_zero_and_too_few_known():
    coords = np.array([[0.0, 0.0], [0.0, 0.0], [5.0, 0.0], [9.0, 0.0]])
    Y = np.array([[1.0], [np.nan], [3.0], [np.nan]])
    known = np.array([True, False, True, False])
    got, k_used = idw_nearest(coords, Y, known, k=5, eps=0.0)
    assert k_used == 2
    assert got[1, 0] == 1.0  # coincides with known spot 0
    np.testing.assert_allclose(got[3, 0], (1 / 9 * 1 + 1 / 4 * 3) / (1 / 9 + 1 / 4))
    np.testing.assert_allclose(got[[0, 2], 0], [3.0, 1.0])  # leave-one-out for known spots


# ------------------------------------------------------------------------------------- through tl.impute
def test_baselines_through_impute(stack):
    t = stack.tables["table"]
    known = (t.obs["section"] == "S1").to_numpy()
    res = {}
    for m, kw in [("mean", {}), ("nearest", {"k": 5}), ("propagation", {"n_iter": 10})]:
        out = asign.tl.impute(stack, known="S1", method=m, n_genes=15, method_kwargs=kw, inplace=False)
        res[m] = out
    Y = np.asarray(res["mean"].layers["target"], dtype=float)
    np.testing.assert_allclose(res["mean"].layers["imputed"], np.tile(Y[known].mean(axis=0), (t.n_obs, 1)), atol=1e-5)
    # nearest == the brute-force IDW on the aligned coordinates
    exp = _brute_nearest(np.asarray(t.obsm["spatial_aligned"]), Y, known, 5, "idw", 1.0, 1.0)
    np.testing.assert_allclose(res["nearest"].layers["imputed"], exp, atol=1e-4)
    # propagation == dense loop on the stored graph; known rows clamped
    Y0 = np.where(known[:, None], Y, Y[known].mean(axis=0))
    exp = _dense_reference(t.obsp["asign_connectivities"], Y0, known, 10)
    np.testing.assert_allclose(res["propagation"].layers["imputed"], exp, atol=1e-4)
    np.testing.assert_allclose(res["propagation"].layers["imputed"][known], Y[known], atol=1e-5)
    # on the synthetic block (smooth expression in 3D), both spatial baselines beat the mean on per-gene PCC
    scores = {m: asign.tl.evaluate(o, per="overall")["pcc_gene"].iloc[0] for m, o in res.items()}
    assert scores["mean"] == 0.0
    assert scores["nearest"] > 0.2 and scores["propagation"] > 0.2, scores


def test_propagation_on_neighbors_3d_graph():
    sdata = _add_aligned(asign.datasets.synthetic_stack(n_sections=3, n_spots=60, n_genes=12, images=False, seed=4))
    t = sdata.tables["table"]
    del t.obsm["spatial_aligned"]
    pytest.importorskip("asign.pp._graph")
    from asign.pp._align import set_alignment

    n2w = t.uns["asign"]["synthetic"]["native_to_world"]
    um = float(t.uns["asign"]["stack"]["um_per_px"][0])
    # aligned px = world µm / um_per_px of the reference
    ref = 1
    transforms = {s: np.diag([1 / um, 1 / um, 1.0]) @ n2w[i] for i, s in enumerate(["S1", "S2", "S3"])}
    set_alignment(sdata, transforms, reference=["S1", "S2", "S3"][ref])
    asign.pp.neighbors_3d(sdata)
    out = asign.tl.impute(sdata, known="S1", method="propagation", n_genes=8, inplace=False)
    assert out.uns["asign"]["result"]["connectivities_key"] == "asign_connectivities"
    assert np.isfinite(out.layers["imputed"]).all()
    assert asign.tl.evaluate(out, per="overall")["pcc_gene"].iloc[0] > 0.1


def test_baselines_name_the_sections_they_cannot_serve(stack, caplog):
    """Propagation warns about spots that no known spot can reach (a graph without edges to a section) and records
    how many; nearest refuses non-finite aligned coordinates naming their section."""
    import logging

    t = stack.tables["table"]
    sec = t.obs["section"].astype(str).to_numpy()
    W = t.obsp["asign_connectivities"].tolil()
    s4 = np.flatnonzero(sec == "S4")
    others = np.flatnonzero(sec != "S4")
    W[np.ix_(s4, others)] = 0
    W[np.ix_(others, s4)] = 0
    t.obsp["asign_connectivities"] = W.tocsr()
    with caplog.at_level(logging.WARNING, logger="asign"):
        out = asign.tl.impute(stack, known="S1", method="propagation", n_genes=15, inplace=False)
    assert out.uns["asign"]["result"]["n_unreached"] == s4.size
    assert f"{s4.size} spots of section(s) ['S4'] have no path to any known spot" in caplog.text
    t.obsm["spatial_aligned"][s4[:3]] = np.nan
    with pytest.raises(ValueError, match=r"non-finite coordinates for 3 spots of section\(s\) \['S4'\].*leave it out"):
        asign.tl.impute(stack, known="S1", method="nearest", n_genes=15, inplace=False)


def test_nearest_ties_go_to_the_lower_index_beyond_the_first_query():
    """Many known spots at the same distance (more than the tree is first asked for): the lowest indices win."""
    from scipy.spatial import cKDTree

    from asign.tl._baselines import _query_sorted

    rng = np.random.default_rng(0)
    pts = rng.integers(0, 2, size=(200, 2)).astype(float)  # 4 positions, ~50 points on each
    q = rng.integers(0, 2, size=(30, 2)).astype(float)
    tree = cKDTree(pts)
    for k in (1, 5, 20):
        d, j = _query_sorted(tree, q, k, len(pts))
        dist = np.linalg.norm(q[:, None] - pts[None], axis=2)
        expect = np.lexsort((np.broadcast_to(np.arange(len(pts)), dist.shape), dist), axis=1)[:, :k]
        np.testing.assert_array_equal(j, expect)
        np.testing.assert_allclose(d, np.take_along_axis(dist, expect, axis=1))
    # with each query's own index excluded (known spots leave themselves out)
    d, j = _query_sorted(tree, pts[:30], 6, len(pts), exclude=np.arange(30))
    dist = np.linalg.norm(pts[:30, None] - pts[None], axis=2)
    dist[np.arange(30), np.arange(30)] = np.inf
    expect = np.lexsort((np.broadcast_to(np.arange(len(pts)), dist.shape), dist), axis=1)[:, :5]
    np.testing.assert_array_equal(j, expect)


def test_baseline_method_kwargs_are_checked(stack, asign_log):
    """`n_iter` of propagation and `k`, `p`, `eps` of nearest must be numbers of the right kind and range; the
    message names the method and the parameter (a float n_iter was truncated: 0.5 ran as the mean baseline)."""
    for bad, err, what in (
        (0.5, TypeError, r"`n_iter` must be an integer, got 0.5"),
        ("10", TypeError, r"`n_iter` must be an integer, got '10'"),
        (True, TypeError, r"`n_iter` must be an integer"),
        (0, ValueError, r"`n_iter` must be >= 1, got 0"),
        (-3, ValueError, r"`n_iter` must be >= 1, got -3"),
    ):
        with pytest.raises(err, match=rf"method 'propagation': {what}"):
            asign.tl.impute(stack, known="S1", method="propagation", method_kwargs={"n_iter": bad}, inplace=False)
    for kw, err, what in (
        ({"k": 2.5}, TypeError, r"`k` must be an integer, got 2.5"),
        ({"k": 0}, ValueError, r"`k` must be >= 1, got 0"),
        ({"p": -1.0}, ValueError, r"`p` must be >= 0"),
        ({"eps": float("nan")}, ValueError, r"`eps` must be a finite number"),
    ):
        with pytest.raises(err, match=rf"method 'nearest': {what}"):
            asign.tl.impute(stack, known="S1", method="nearest", method_kwargs=kw, inplace=False)
    out = asign.tl.impute(stack, known="S1", method="propagation", method_kwargs={"n_iter": np.int64(3)}, inplace=False)
    assert np.isfinite(out.layers["imputed"]).all()
    # this hand-made graph records no alignment fingerprint (as an older version's): used, with an info message
    assert any("records no `alignment_fingerprint`" in r.getMessage() for r in asign_log.records)
