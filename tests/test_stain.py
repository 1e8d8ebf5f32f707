from __future__ import annotations

import logging

import numpy as np
import pytest
import torch

import asign
from asign._encoders import get_encoder
from asign.pp._stain import (
    MACENKO_REFERENCE_HE,
    MACENKO_REFERENCE_MAX_C,
    StainEstimationError,
    apply_od_map,
    apply_od_map_torch,
    macenko_matrix,
    macenko_stains,
    od_scale_matrix,
    rgb_to_od,
    stain_maps,
    tissue_od_mean,
)

SMALL = {"spot": 32, "region": 128, "global": 256}
# two H&E stain matrices (columns H, E; rows R, G, B OD), a purple and a pinker one. Eosin absorbs enough red
# (> 0.2) for pure-eosin pixels to pass Macenko's OD >= 0.15 test in every channel, as in real H&E.
STAIN_A = np.array([[0.650, 0.250], [0.700, 0.850], [0.290, 0.460]])
STAIN_B = np.array([[0.490, 0.300], [0.770, 0.750], [0.410, 0.590]])


def _unit(v):
    return v / np.linalg.norm(v, axis=0, keepdims=True)


def _angle_deg(a, b):
    return np.degrees(np.arccos(np.clip(np.sum(_unit(a) * _unit(b), axis=0), -1, 1)))


def _concentrations(n, rng, max_h=1.6, max_e=0.9):
    """Pure H, pure E and mixed pixels (as in tissue: nuclei, stroma, overlaps)."""
    kind = rng.choice(3, size=n, p=[0.3, 0.3, 0.4])
    h = rng.uniform(0.2, 1.0, n) * max_h
    e = rng.uniform(0.2, 1.0, n) * max_e
    c = np.stack([np.where(kind == 1, 0.0, h), np.where(kind == 0, 0.0, e)], axis=1)
    return c


def _stained_image(stain, conc, side):
    """``(3, side, side)`` uint8 image: OD = C stain^T, plus a white (background) margin."""
    od = conc @ stain.T  # (n, 3)
    rgb = np.clip(np.round(256.0 * np.exp(-od) - 1.0), 0, 255).astype(np.uint8)
    img = rgb.reshape(side, side, 3).transpose(2, 0, 1).copy()
    img[:, :, : side // 8] = 255
    return img


# ------------------------------------------------------------------------------------------------ estimation
def test_macenko_recovers_known_stains():
    rng = np.random.default_rng(0)
    img = _stained_image(STAIN_A, _concentrations(128 * 128, rng), 128)
    od = rgb_to_od(img.reshape(3, -1).T)
    he, max_c = macenko_stains(od)
    ang = _angle_deg(he, STAIN_A)
    assert np.all(ang < 3.0), ang
    # 99th percentile of the true concentrations (scaled to unit stain vectors)
    true_max = np.array([1.6, 0.9]) * np.linalg.norm(STAIN_A, axis=0)
    np.testing.assert_allclose(max_c, true_max, rtol=0.1)
    # haematoxylin first: the vector absorbing more red
    assert he[0, 0] > he[0, 1]


def test_too_little_tissue_raises_or_warns(small_stack, caplog):
    with pytest.raises(StainEstimationError):
        macenko_stains(np.zeros((10_000, 3)))
    with pytest.raises(StainEstimationError):
        tissue_od_mean(np.full((100, 3), 0.5))
    from spatialdata.models import Image2DModel
    from spatialdata.transformations import Identity

    blank = np.full((3, 512, 512), 255, dtype=np.uint8)
    stack = small_stack.tables["table"].uns["asign"]["stack"]
    cs = stack["native_coordinate_system"][1]
    small_stack.images["he_S2"] = Image2DModel.parse(blank, dims=("c", "y", "x"), transformations={cs: Identity()})
    images = {s: small_stack.images[f"he_{s}"] for s in ("S1", "S2", "S3")}
    with caplog.at_level(logging.WARNING, logger="asign"):
        mats, est, target = stain_maps(images, stain_norm="macenko")
    assert "'S2'" in caplog.text
    assert not est["S2"].ok and est["S1"].ok
    np.testing.assert_array_equal(mats["S2"], np.eye(3))
    assert target["source"] == "reference"
    with pytest.raises(ValueError, match="could not be estimated"):
        stain_maps(images, stain_norm="macenko", stain_target="S2")


# ------------------------------------------------------------------------------------------------ normalisation
def test_normalising_a_toward_b_matches_b_statistics():
    rng = np.random.default_rng(1)
    # section A: stain A, lighter staining; section B (the target): stain B, other concentrations
    img_a = _stained_image(STAIN_A, _concentrations(160 * 160, rng, 1.2, 0.9), 160)
    img_b = _stained_image(STAIN_B, _concentrations(160 * 160, rng, 1.8, 1.3), 160)
    od_a, od_b = rgb_to_od(img_a.reshape(3, -1).T), rgb_to_od(img_b.reshape(3, -1).T)
    he_a, mc_a = macenko_stains(od_a)
    he_b, mc_b = macenko_stains(od_b)
    M = macenko_matrix(he_a, mc_a, he_b, mc_b)
    norm = np.round(apply_od_map(img_a, M)).astype(np.uint8)
    od_n = rgb_to_od(norm.reshape(3, -1).T)
    he_n, mc_n = macenko_stains(od_n)
    assert np.all(_angle_deg(he_n, he_b) < 3.0)
    np.testing.assert_allclose(mc_n, mc_b, rtol=0.06)
    tissue = (np.arange(160 * 160) % 160) >= 160 // 8  # not the white margin (same pixels in both images)
    np.testing.assert_allclose(od_n[tissue].mean(axis=0), od_b[tissue].mean(axis=0), rtol=0.05)
    np.testing.assert_allclose(od_n[tissue].std(axis=0), od_b[tissue].std(axis=0), rtol=0.05)
    # before normalisation the statistics differed
    assert np.abs(od_a[tissue].mean(axis=0) / od_b[tissue].mean(axis=0) - 1).max() > 0.2
    # od_scale matches the mean tissue OD by construction
    S = od_scale_matrix(tissue_od_mean(od_a), tissue_od_mean(od_b))
    od_s = rgb_to_od(apply_od_map(img_a, S).reshape(3, -1).T)
    np.testing.assert_allclose(tissue_od_mean(od_s), tissue_od_mean(od_b), rtol=0.03)


def test_white_stays_white_and_device_path_equals_numpy():
    rng = np.random.default_rng(2)
    M = np.stack([macenko_matrix(STAIN_A, [1.0, 0.5], MACENKO_REFERENCE_HE, MACENKO_REFERENCE_MAX_C), np.eye(3)])
    M = np.concatenate([M, rng.uniform(0.5, 1.5, (2, 3, 3))])
    x = rng.integers(0, 256, (4, 3, 16, 16)).astype(np.uint8)
    x[:, :, :4] = 255  # white rows, as padding
    ref = apply_od_map(x, M)
    np.testing.assert_array_equal(ref[:, :, :4], 255.0)
    np.testing.assert_allclose(ref[1], x[1], atol=1e-9)  # identity map
    got = apply_od_map_torch(torch.from_numpy(x).float(), torch.from_numpy(M).float()).numpy()
    np.testing.assert_array_equal(got[:, :, :4], 255.0)
    np.testing.assert_allclose(got, ref, atol=2e-3)


def test_extract_features_stain_norm_per_section(small_stack):
    """Every patch is normalised with its own section's matrix (patches of all sections share batches)."""
    enc = get_encoder(torch.nn.Identity(), input_size=None, dim=3)  # (B, 3, h, w) -> mean colour per channel
    out0 = asign.pp.extract_features(
        small_stack, encoder=enc, scales=SMALL, input_size=None, inplace=False, show_progress_bar=False
    )
    out = asign.pp.extract_features(
        small_stack,
        encoder=enc,
        scales=SMALL,
        input_size=None,
        stain_norm="macenko",
        batch_size=7,
        inplace=False,
        show_progress_bar=False,
    )
    p = out.params
    assert p["stain_norm"] == "macenko" and p["stain_target"] == "reference" and p["tta"] == "none"
    mats = np.asarray(p["stain_matrix"])
    assert mats.shape == (3, 3, 3) and np.asarray(p["stain_estimated"]).all()
    assert not np.allclose(mats[0], mats[1])
    from asign.pp._tiles import image_level0

    table = small_stack.tables["table"]
    codes = np.asarray(table.obs["section"].cat.codes)
    xy = np.asarray(table.obsm["spatial"])
    for i in (0, 2):
        row = int(np.flatnonzero(codes == i)[5])
        img = np.asarray(image_level0(small_stack.images[f"he_S{i + 1}"]).transpose("c", "y", "x").values)
        cx, cy = (np.floor(xy[row] + 0.5)).astype(int)
        patch = img[:, cy - 16 : cy + 16, cx - 16 : cx + 16]
        unnorm = (patch.astype(np.float64).mean(axis=(1, 2)) / 255 - (0.485, 0.456, 0.406)) / (0.229, 0.224, 0.225)
        np.testing.assert_allclose(out0.features_spot[row], unnorm, atol=1e-4)
        want = apply_od_map(patch, mats[i]).mean(axis=(1, 2))
        want = (want / 255 - (0.485, 0.456, 0.406)) / (0.229, 0.224, 0.225)
        np.testing.assert_allclose(out.features_spot[row], want, atol=1e-3)
    # the recorded target reuses: normalising to S1's estimate maps S1 (nearly) onto itself
    out2 = asign.pp.extract_features(
        small_stack,
        encoder=enc,
        scales=SMALL,
        input_size=None,
        stain_norm="od_scale",
        stain_target="S1",
        inplace=False,
        show_progress_bar=False,
    )
    np.testing.assert_allclose(np.asarray(out2.params["stain_matrix"])[0], np.eye(3), atol=1e-12)
    again = asign.pp.extract_features(
        small_stack,
        encoder=enc,
        scales=SMALL,
        input_size=None,
        stain_norm="od_scale",
        stain_target=out2.params["stain_target_params"],
        inplace=False,
        show_progress_bar=False,
    )
    np.testing.assert_allclose(again.params["stain_matrix"], out2.params["stain_matrix"], atol=1e-12)
    # zarr-writable uns
    import anndata as ad

    asign.pp.extract_features(
        small_stack, encoder=enc, scales=SMALL, input_size=None, stain_norm="macenko", show_progress_bar=False
    )
    assert table.uns["asign_features"]["stain_matrix"].shape == (3, 3, 3)
    import tempfile
    from pathlib import Path

    with tempfile.TemporaryDirectory() as d:
        sub = ad.AnnData(np.zeros((1, 1)), uns={"asign_features": dict(table.uns["asign_features"])})
        sub.write_zarr(Path(d) / "t.zarr")
        back = ad.read_zarr(Path(d) / "t.zarr").uns["asign_features"]
        np.testing.assert_allclose(back["stain_matrix"], table.uns["asign_features"]["stain_matrix"])


# ------------------------------------------------------------------------------------------------ TTA
def _small_net():
    torch.manual_seed(0)
    return torch.nn.Sequential(
        torch.nn.Conv2d(3, 8, 3, padding=1), torch.nn.ReLU(), torch.nn.Conv2d(8, 6, 3, stride=2), torch.nn.ReLU()
    )


def test_dihedral_tta_invariance():
    enc = get_encoder(_small_net(), input_size=None, dim=6).to("cpu", channels_last=False)
    x = torch.randint(0, 256, (3, 3, 24, 24), dtype=torch.uint8)
    with torch.inference_mode():
        f = enc(x, tta="dihedral", channels_last=False)
        for k in (1, 2, 3):
            fr = enc(torch.rot90(x, k, dims=(2, 3)), tta="dihedral", channels_last=False)
            torch.testing.assert_close(fr, f, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(enc(torch.flip(x, dims=(2,)), tta="dihedral"), f, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(enc(torch.flip(x, dims=(3,)), tta="flips"), enc(x, tta="flips"), atol=1e-5, rtol=0)
        plain = enc(x)
        assert not torch.allclose(enc(torch.rot90(x, 1, dims=(2, 3))), plain, atol=1e-3)
        # tta is the mean of the views' features
        views = [enc(torch.rot90(x, k, dims=(2, 3))) for k in range(4)]
        views += [enc(torch.rot90(torch.flip(x, dims=(3,)), k, dims=(2, 3))) for k in range(4)]
        torch.testing.assert_close(f, torch.stack(views).mean(0), atol=1e-5, rtol=1e-5)


def test_tta_numpy_encoder_and_extract_features(small_stack):
    calls = []

    def fn(batch):
        calls.append(batch.shape)
        # not rotation invariant: mean of the top-left quadrant
        h = batch.shape[1] // 2
        return batch[:, :h, :h].reshape(len(batch), -1, 3).mean(axis=1)

    from asign._encoders import Encoder

    enc = Encoder(name="quadrant", dim=3, weights="none", fn=fn, input_size=None)
    x = torch.randint(0, 256, (2, 3, 8, 8), dtype=torch.uint8)
    f = enc(x, tta="dihedral")
    assert len(calls) == 8
    torch.testing.assert_close(enc(torch.rot90(x, 1, dims=(2, 3)), tta="dihedral"), f, atol=1e-5, rtol=0)
    torch.testing.assert_close(f, x.float().mean(dim=(2, 3)), atol=1e-4, rtol=0)  # quadrants average to all
    out = asign.pp.extract_features(
        small_stack, encoder=enc, scales=SMALL, input_size=None, tta="flips", inplace=False, show_progress_bar=False
    )
    assert out.params["tta"] == "flips" and out.params["tta_views"] == 4
    assert np.isfinite(out.features_spot).all()
    # numpy encoders get the stain-normalised patch rounded to uint8
    x = torch.full((2, 3, 8, 8), 255, dtype=torch.uint8)
    x[:, :, 4:] = torch.tensor([150, 60, 120], dtype=torch.uint8).view(1, 3, 1, 1)
    M = torch.from_numpy(macenko_matrix(STAIN_A, [1.0, 0.5], MACENKO_REFERENCE_HE, MACENKO_REFERENCE_MAX_C))
    got = enc(x, od_map=M.float().expand(2, 3, 3), tta="dihedral").numpy()  # dihedral: mean of the whole patch
    want = np.round(apply_od_map(x.numpy(), M.numpy())).mean(axis=(2, 3))
    np.testing.assert_allclose(got, want, atol=1e-4)
    assert np.abs(got - x.float().mean(dim=(2, 3)).numpy()).max() > 1.0


# ------------------------------------------------------------------------------------------------ options
def test_bad_options_raise(small_stack):
    kw = {"encoder": "handcrafted", "scales": SMALL, "inplace": False, "show_progress_bar": False}
    with pytest.raises(ValueError, match="macenko"):
        asign.pp.extract_features(small_stack, stain_norm="vahadane", **kw)
    with pytest.raises(ValueError, match="dihedral"):
        asign.pp.extract_features(small_stack, tta="rot90", **kw)
    with pytest.raises(ValueError, match="no fixed reference"):
        asign.pp.extract_features(small_stack, stain_norm="od_scale", stain_target="reference", **kw)
    with pytest.raises(ValueError, match="Unknown `stain_target`"):
        asign.pp.extract_features(small_stack, stain_norm="macenko", stain_target="S9", **kw)
    with pytest.raises(ValueError, match="lacks"):
        asign.pp.extract_features(small_stack, stain_norm="macenko", stain_target={"od_mean": [1, 1, 1]}, **kw)
    with pytest.raises(TypeError, match="`stain_target` must be a string or a mapping, got int"):
        asign.pp.extract_features(small_stack, stain_norm="macenko", stain_target=3, **kw)


# ------------------------------------------------------------------------------------------- degenerate estimates
def _grey_image(side=256, seed=0):
    """A textured grey image repeated to 3 channels: one colour, no two stains."""
    from scipy import ndimage as ndi

    g = ndi.gaussian_filter(np.random.default_rng(seed).random((side, side)), 2)
    g = (40 + 200 * (g - g.min()) / (g.max() - g.min())).astype(np.uint8)
    return np.repeat(g[None], 3, axis=0)


def _dusty_white(side=600, seed=0):
    """A nearly white slide with 1% grey dust."""
    rng = np.random.default_rng(seed)
    img = np.full((3, side, side), 250, np.uint8)
    m = rng.random((side, side)) < 0.01
    d = rng.integers(60, 120, int(m.sum()))
    img[:, m] = np.stack([d, d + 5, d])
    return img


def test_collinear_stain_vectors_are_refused(small_stack, asign_log):
    """A grey image gave H = E; grey dust H and E 0.09 degrees apart and a map sending grey to white."""
    from asign.pp._stain import MIN_STAIN_ANGLE, StainCollinearError, estimate_stain

    for img in (_grey_image(), _dusty_white()):
        with pytest.raises(StainCollinearError, match="degrees apart"):
            macenko_stains(rgb_to_od(img.reshape(3, -1).T))
        est = estimate_stain(img)  # a numpy (c, y, x) array
        assert not est.ok and "one colour, not two stains" in est.error
        assert np.isnan(est.stain_vectors).all()
        # od_scale needs only the mean OD: still estimated
        est = estimate_stain(img, stain_norm="od_scale")
        assert est.ok and np.isfinite(est.od_mean).all() and np.isnan(est.stain_vectors).all()
    # real stains are far apart
    rng = np.random.default_rng(0)
    for stain in (STAIN_A, STAIN_B):
        he, _ = macenko_stains(rgb_to_od(_stained_image(stain, _concentrations(128 * 128, rng), 128).reshape(3, -1).T))
        assert _angle_deg(he[:, :1], he[:, 1:])[0] > 1.4 * MIN_STAIN_ANGLE
    # through extract_features: identity for the grey section, with a warning naming it and why
    from spatialdata.models import Image2DModel
    from spatialdata.transformations import Identity

    cs = small_stack.tables["table"].uns["asign"]["stack"]["native_coordinate_system"][1]
    small_stack.images["he_S2"] = Image2DModel.parse(
        _grey_image(512), dims=("c", "y", "x"), transformations={cs: Identity()}
    )
    kw = {"encoder": get_encoder(torch.nn.Identity(), input_size=None, dim=3), "scales": SMALL, "input_size": None}
    out = asign.pp.extract_features(small_stack, stain_norm="macenko", inplace=False, show_progress_bar=False, **kw)
    assert out.params["stain_estimated"].tolist() == [True, False, True]
    np.testing.assert_array_equal(out.params["stain_matrix"][1], np.eye(3))
    assert "Section 'S2': its stain cannot be estimated (the H and E stain vectors are only" in asign_log.warnings
    plain = asign.pp.extract_features(small_stack, inplace=False, show_progress_bar=False, **kw)
    rows = small_stack.tables["table"].obs["section"].astype(str).to_numpy() == "S2"
    np.testing.assert_allclose(out.features_spot[rows], plain.features_spot[rows], rtol=1e-6, atol=1e-5)


def test_estimate_stain_accepts_numpy_dask_and_dataarray():
    """The docstring promises numpy / dask (c, y, x): numpy raised a TypeError."""
    import dask.array as da
    import xarray as xr

    from asign.pp._stain import estimate_stain

    rng = np.random.default_rng(2)
    img = _stained_image(STAIN_A, _concentrations(96 * 96, rng), 96)
    ref = estimate_stain(xr.DataArray(img, dims=("c", "y", "x")))
    assert ref.ok
    for arr in (img, da.from_array(img, chunks=(3, 32, 32))):
        est = estimate_stain(arr)
        np.testing.assert_array_equal(est.stain_vectors, ref.stain_vectors)
        np.testing.assert_array_equal(est.max_conc, ref.max_conc)
    with pytest.raises(ValueError, match=r"must be \(c, y, x\)"):
        estimate_stain(img[0])
