from __future__ import annotations

import logging

import numpy as np
import pytest

import asign
from asign._constants import Key
from asign.pp._align import compose_to_reference, registration_pairs, set_alignment


class _Records(logging.Handler):
    def __init__(self):
        super().__init__(logging.DEBUG)
        self.records: list[logging.LogRecord] = []

    def emit(self, record):
        self.records.append(record)

    @property
    def warnings(self) -> str:
        return "\n".join(r.getMessage() for r in self.records if r.levelno >= logging.WARNING)


@pytest.fixture
def asign_log():
    """Records of the package logger (it does not propagate to the root logger, so caplog misses them)."""
    log = logging.getLogger("asign")
    h = _Records()
    log.addHandler(h)
    try:
        yield h
    finally:
        log.removeHandler(h)


def _world_error_um(sdata, key_added="aligned"):
    """Per-section median distance (µm) between aligned spots mapped to the block frame and the ground truth."""
    table = sdata.tables["table"]
    al = table.uns["asign"]["alignment"]
    secs = list(table.uns["asign"]["stack"]["section"])
    n2w = table.uns["asign"]["synthetic"]["native_to_world"]
    ref = secs.index(al["reference"])
    um = al["um_per_px"]
    px = np.asarray(table.obsm["spatial_aligned"]) / um
    world = px @ n2w[ref][:2, :2].T + n2w[ref][:2, 2]
    err = np.linalg.norm(world - np.asarray(table.obsm["spatial_world"]), axis=1)
    sec = table.obs["section"].astype(str).to_numpy()
    return {s: float(np.median(err[sec == s])) for s in secs}


def _ground_truth(sdata):
    table = sdata.tables["table"]
    secs = list(table.uns["asign"]["stack"]["section"])
    n2w = table.uns["asign"]["synthetic"]["native_to_world"]
    return {s: n2w[i] for i, s in enumerate(secs)}


# ---------------------------------------------------------------------------------------------------------------
# contract: set_alignment / method="transforms"
# ---------------------------------------------------------------------------------------------------------------
def test_pairs_and_composition():
    secs = ["A", "B", "C", "D", "E"]
    assert registration_pairs(secs, "C") == [("B", "C"), ("A", "B"), ("D", "C"), ("E", "D")]
    rng = np.random.default_rng(0)
    B = {s: np.vstack([rng.normal(size=(2, 3)), [0, 0, 1]]) for s in secs}
    pairwise = {(m, f): np.linalg.inv(B[f]) @ B[m] for m, f in registration_pairs(secs, "C")}
    T = compose_to_reference(pairwise, secs, "C")
    for s in secs:
        np.testing.assert_allclose(T[s], np.linalg.inv(B["C"]) @ B[s], atol=1e-9)


def test_transforms_method_writes_contract(small_stack):
    from spatialdata.transformations import Identity, Sequence, get_transformation

    sdata = small_stack
    gt = _ground_truth(sdata)
    asign.pp.align_layers(sdata, method="transforms", transforms=gt)
    table = sdata.tables["table"]
    al = table.uns["asign"]["alignment"]
    assert al["reference"] == "S2"  # middle of 3
    assert al["method"] == "transforms" and al["key_added"] == "aligned"
    assert al["transform"] == "rigid"
    assert al["um_per_px"] == pytest.approx(8.0)
    np.testing.assert_allclose(al["transforms"]["S2"], np.eye(3))
    for s in ("S1", "S3"):
        np.testing.assert_allclose(al["transforms"][s], np.linalg.inv(gt["S2"]) @ gt[s], atol=1e-9)
    # exact ground truth: aligned spots map to the block frame without error
    err = _world_error_um(sdata)
    assert max(err.values()) < 1e-6
    # z and 3D
    np.testing.assert_allclose(table.obs["z"].to_numpy(), table.obsm["spatial_3d"][:, 2])
    np.testing.assert_allclose(table.obsm["spatial_3d"][:, :2], table.obsm["spatial_aligned"])
    assert set(np.unique(table.obs["z"])) == {0.0, 16.0, 32.0}
    # transformations: Sequence([native, Affine]) for images and shapes, Identity for the reference, natives kept
    for s in ("S1", "S2", "S3"):
        for name in (f"he_{s}", f"spots_{s}"):
            ts = get_transformation(sdata[name], get_all=True)
            assert s in ts and "aligned" in ts
            assert isinstance(ts["aligned"], Sequence)
            if s == "S2":
                assert isinstance(ts["aligned"].transformations[-1], Identity)
            M = ts["aligned"].to_affine_matrix(input_axes=("x", "y"), output_axes=("x", "y"))
            np.testing.assert_allclose(M, al["transforms"][s], atol=1e-9)
    # spatialdata's own centroids agree with obsm['spatial_aligned']
    import spatialdata as sd

    c = sd.get_centroids(sdata["spots_S1"], coordinate_system="aligned").compute()
    rows = (table.obs["section"] == "S1").to_numpy()
    np.testing.assert_allclose(c[["x", "y"]].to_numpy() * 8.0, table.obsm["spatial_aligned"][rows], atol=1e-6)


def test_transforms_any_common_frame_and_other_reference(small_stack):
    sdata = small_stack
    gt = _ground_truth(sdata)
    # an arbitrary extra similarity on the common frame changes nothing
    G = np.array([[0.0, -2.0, 500.0], [2.0, 0.0, -30.0], [0.0, 0.0, 1.0]])
    out = asign.pp.align_layers(
        sdata, method="transforms", transforms={s: G @ M for s, M in gt.items()}, reference="S1", inplace=False
    )
    assert "aligned" not in sdata.coordinate_systems and "alignment" not in sdata.tables["table"].uns["asign"]
    for s in ("S2", "S3"):
        np.testing.assert_allclose(out["transforms"][s], np.linalg.inv(gt["S1"]) @ gt[s], atol=1e-9)
    np.testing.assert_allclose(out["transforms"]["S1"], np.eye(3))


def test_set_alignment_partial_keeps_existing_transformations(small_stack, asign_log):
    from spatialdata.transformations import Scale, get_transformation, set_transformation

    sdata = small_stack
    set_transformation(sdata["he_S1"], Scale([2.0, 2.0], axes=("x", "y")), to_coordinate_system="microscope")
    gt = _ground_truth(sdata)
    T = {s: np.linalg.inv(gt["S2"]) @ gt[s] for s in ("S2", "S3")}
    set_alignment(sdata, T, reference="S2")
    assert "S1" in asign_log.warnings
    table = sdata.tables["table"]
    rows = (table.obs["section"] == "S1").to_numpy()
    assert np.isnan(table.obsm["spatial_aligned"][rows]).all()
    assert np.isfinite(table.obsm["spatial_aligned"][~rows]).all()
    ts = get_transformation(sdata["he_S1"], get_all=True)
    assert set(ts) == {"S1", "microscope"}
    assert "aligned" in get_transformation(sdata["he_S3"], get_all=True)


def test_set_alignment_backed_writes_to_disk(small_stack, tmp_path):
    import spatialdata as sd
    from spatialdata.transformations import get_transformation

    path = tmp_path / "stack.zarr"
    small_stack.write(path)
    sdata = sd.read_zarr(path)
    gt = _ground_truth(small_stack)
    asign.pp.align_layers(sdata, method="transforms", transforms=gt)
    back = sd.read_zarr(path)
    assert Key.SPATIAL_ALIGNED in back.tables["table"].obsm
    np.testing.assert_allclose(
        back.tables["table"].obsm["spatial_aligned"], sdata.tables["table"].obsm["spatial_aligned"]
    )
    for name in ("he_S1", "spots_S3"):
        ts = get_transformation(back[name], get_all=True)
        assert {"aligned", name.split("_")[1]} <= set(ts)
    M = get_transformation(back["spots_S3"], "aligned").to_affine_matrix(("x", "y"), ("x", "y"))
    np.testing.assert_allclose(M, np.linalg.inv(gt["S2"]) @ gt["S3"], atol=1e-6)


def test_transforms_bad_input(small_stack):
    gt = _ground_truth(small_stack)
    with pytest.raises(ValueError, match="transforms"):
        asign.pp.align_layers(small_stack, method="transforms")
    with pytest.raises(KeyError, match="S9"):
        asign.pp.align_layers(small_stack, method="transforms", transforms={**gt, "S9": np.eye(3)})
    with pytest.raises(ValueError, match="S3"):
        asign.pp.align_layers(small_stack, method="transforms", transforms={"S1": gt["S1"], "S2": gt["S2"]})
    with pytest.raises(ValueError, match="3 x 3"):
        asign.pp.align_layers(small_stack, method="transforms", transforms={**gt, "S1": np.eye(4)})
    with pytest.raises(KeyError, match="reference"):
        asign.pp.align_layers(small_stack, method="transforms", transforms=gt, reference="nope")


# ---------------------------------------------------------------------------------------------------------------
# registration internals: geometry conventions
# ---------------------------------------------------------------------------------------------------------------
def _blob_image(size=400, seed=0):
    """A textured, asymmetric 'tissue' grey image (tissue bright) and its mask."""
    from scipy import ndimage as ndi

    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:size, 0:size].astype(float)
    c = size / 2
    body = ((xx - c) / (0.33 * size)) ** 2 + ((yy - c) / (0.22 * size)) ** 2 <= 1
    arm = (np.abs(yy - c + 0.05 * size) < 0.05 * size) & (xx > c) & (xx < c + 0.45 * size)
    mask = body | arm
    tex = ndi.gaussian_filter(rng.standard_normal((size, size)), 3)
    grey = np.where(mask, 0.6 + 0.3 * tex / tex.std(), 0.0).clip(0, 1).astype(np.float32)
    return grey, mask


def test_ants_refine_recovers_known_transform():
    """ANTs direction, parameters and axes: register an image onto a copy moved by a known map."""
    from asign import _registration as R

    grey, mask = _blob_image()
    moving = R.WorkImage("m", grey, mask, np.eye(3), 1.0)
    A_true = R.translation(215, 190) @ R.rotation(23.0) @ R.translation(-200, -205)
    fixed = R.WorkImage(
        "f", R.warp(grey, A_true, grey.shape), R.warp(mask.astype(np.float32), A_true, grey.shape) > 0.5, np.eye(3), 1.0
    )
    start = R.translation(6, -5) @ A_true @ R.rotation(-4.0)
    A = R.ants_refine(moving, fixed, start, transform="rigid", seed=0)
    pts = np.array([[100.0, 120.0], [300.0, 250.0], [200.0, 200.0]])
    got = pts @ A[:2, :2].T + A[:2, 2]
    want = pts @ A_true[:2, :2].T + A_true[:2, 2]
    assert np.abs(got - want).max() < 0.5  # px
    # the whole pair pipeline (coarse search from nothing) finds it too, also through a 160 degree turn
    A_big = R.translation(200, 200) @ R.rotation(160.0) @ R.translation(-205, -195)
    fixed2 = R.WorkImage(
        "f", R.warp(grey, A_big, grey.shape), R.warp(mask.astype(np.float32), A_big, grey.shape) > 0.5, np.eye(3), 1.0
    )
    res = R.register_pair(moving, fixed2, transform="rigid", seed=0)
    got = pts @ res.A_full[:2, :2].T + res.A_full[:2, 2]
    want = pts @ A_big[:2, :2].T + A_big[:2, 2]
    assert np.abs(got - want).max() < 1.0
    assert res.dice_after > 0.97 and res.dice_after > res.dice_before


def test_working_image_geometry():
    """Pyramid level choice and resampling: a bright dot lands where `to_full` says, for several pixel sizes."""
    from spatialdata.models import Image2DModel
    from spatialdata.transformations import Identity

    from asign import _registration as R

    img = np.full((3, 1200, 1000), 245, np.uint8)
    x0, y0 = 613.0, 377.0
    yy, xx = np.mgrid[0:1200, 0:1000]
    blob = (xx - x0) ** 2 + (yy - y0) ** 2 <= 40**2
    img[:, blob] = 60
    el = Image2DModel.parse(img, dims=("c", "y", "x"), scale_factors=[2, 2], transformations={"s": Identity()})
    for px_um in (0.5, 1.3, 2.0, 3.7):
        w = R.load_work_image(el, section="s", um_per_px=0.5, px_um=px_um)
        ys, xs = np.nonzero(w.grey > 0.5)
        c = np.array([xs.mean(), ys.mean(), 1.0])
        full = w.to_full @ c
        k = px_um / 0.5
        assert abs(full[0] - x0) < 0.6 * k + 1 and abs(full[1] - y0) < 0.6 * k + 1
        assert w.mask[int(round(c[1])), int(round(c[0]))]
    assert R.load_work_image(el, section="s", um_per_px=0.5, px_um=2.0).level == 2
    assert R.load_work_image(el, section="s", um_per_px=0.5, px_um=1.9).level == 1


def test_full_resolution_conversion_between_pixel_sizes():
    from asign import _registration as R

    g = np.zeros((10, 10), np.float32)
    m = R.WorkImage("m", g, g > 0, np.array([[2.0, 0, 0.5], [0, 2.0, 0.5], [0, 0, 1]]), 1.0)
    f = R.WorkImage("f", g, g > 0, np.array([[3.0, 0, 1.0], [0, 3.0, 1.0], [0, 0, 1]]), 1.0)
    A_full = R.translation(10, -4) @ R.rotation(30, scale=1.5)
    np.testing.assert_allclose(R.to_full_resolution(R.to_working(A_full, m, f), m, f), A_full, atol=1e-12)


@pytest.mark.parametrize("kind", ["rigid", "similarity", "affine"])
def test_fit_transform(kind):
    from asign import _registration as R

    rng = np.random.default_rng(1)
    src = rng.uniform(0, 100, (6, 2))
    M = R.translation(5, 7) @ R.rotation(40, scale=1.0 if kind == "rigid" else 1.3)
    if kind == "affine":
        M = M @ np.array([[1.0, 0.2, 0], [0, 0.8, 0], [0, 0, 1]])
    dst = src @ M[:2, :2].T + M[:2, 2]
    np.testing.assert_allclose(R.fit_transform(src, dst, kind=kind), M, atol=1e-9)
    with pytest.raises(ValueError, match="differ in number"):
        R.fit_transform(src, dst[:3], kind=kind)
