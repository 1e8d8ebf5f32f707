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
