from __future__ import annotations

import dask.array as da
import numpy as np
import pytest
import torch

import asign
from asign._encoders import IMAGENET_MEAN, IMAGENET_STD

SMALL = {"spot": 32, "region": 128, "global": 256}
WHITE = (1.0 - np.asarray(IMAGENET_MEAN)) / np.asarray(IMAGENET_STD)


# ---------------------------------------------------------------------------------------------- tiny test encoders
class CentrePixel(torch.nn.Module):
    def forward(self, x):
        return x[:, :, x.shape[2] // 2, x.shape[3] // 2]


class Corner(torch.nn.Module):
    def forward(self, x):
        return x[:, :, 0, 0]


class MeanColour(torch.nn.Module):
    def forward(self, x):
        return x  # (B, 3, h, w): average-pooled by the engine


class MarkerPosition(torch.nn.Module):
    """(row, col) of the reddest pixel."""

    def forward(self, x):
        score = (x[:, 0] - x[:, 1]).flatten(1)
        idx = score.argmax(dim=1)
        return torch.stack([idx // x.shape[3], idx % x.shape[3]], dim=1).float()


class InputSize(torch.nn.Module):
    def forward(self, x):
        return torch.tensor([[x.shape[2], x.shape[3]]], dtype=torch.float32).repeat(x.shape[0], 1)


def set_image(sd, section, arr, *, chunks=None):
    """Replace a section's image by ``arr`` (3, y, x) uint8 (numpy or dask), single scale."""
    from spatialdata.models import Image2DModel
    from spatialdata.transformations import Identity

    stack = sd.tables["table"].uns["asign"]["stack"]
    i = list(stack["section"]).index(section)
    cs, key = stack["native_coordinate_system"][i], stack["image_key"][i]
    kw = {"chunks": chunks} if chunks is not None else {}
    sd.images[key] = Image2DModel.parse(arr, dims=("c", "y", "x"), transformations={cs: Identity()}, **kw)


def image_array(sd, section):
    from asign.pp._tiles import image_level0

    return np.asarray(image_level0(sd.images[f"he_{section}"]).transpose("c", "y", "x").values)


def rows_of(sd, section):
    return np.flatnonzero((sd.tables["table"].obs["section"].astype(str) == section).to_numpy())


# ------------------------------------------------------------------------------------------------------- tests
def test_keys_shapes_and_uns(small_stack, tmp_path):
    sd = small_stack
    asign.pp.extract_features(sd, encoder=MeanColour(), scales=SMALL, input_size=None, show_progress_bar=False)
    t = sd.tables["table"]
    reg, gl = sd.tables["asign_regions"], sd.tables["asign_globals"]
    for lev in ("spot", "region", "global"):
        f = t.obsm[f"asign_features_{lev}"]
        assert f.shape == (t.n_obs, 3) and f.dtype == np.float32
        assert np.isfinite(f).all()
    np.testing.assert_array_equal(t.obsm["asign_features_region"], reg.obsm["features"][t.obs["asign_region"]])
    np.testing.assert_array_equal(t.obsm["asign_features_global"], gl.obsm["features"][t.obs["asign_global"]])
    assert t.obs["asign_spot_padded"].dtype == bool
    info = t.uns["asign_features"]
    assert info["encoder"] == "MeanColour" and info["dim"] == 3
    assert info["scales_px"] == {"spot": [32] * 3, "region": [128] * 3, "global": [256] * 3}
    assert info["scales_um"]["spot"] == [256.0] * 3
    assert info["sections"] == ["S1", "S2", "S3"]
    assert info["n_patches"] == t.n_obs + reg.n_obs + gl.n_obs
    # region features are the mean colour of the (white-padded) 128 px tile, read from the image at native size
    img = image_array(sd, "S1")
    r0 = 0
    c, r = int(reg.obs["tile_col"].iloc[r0]), int(reg.obs["tile_row"].iloc[r0])
    tile = np.full((3, 128, 128), 255, np.uint8)
    part = img[:, r * 128 : (r + 1) * 128, c * 128 : (c + 1) * 128]
    tile[:, : part.shape[1], : part.shape[2]] = part
    expect = (tile.reshape(3, -1).mean(1) / 255 - IMAGENET_MEAN) / IMAGENET_STD
    np.testing.assert_allclose(reg.obsm["features"][r0], expect, atol=1e-5)
    # everything written is zarr-writable
    t.write_zarr(tmp_path / "t.zarr")
    reg.write_zarr(tmp_path / "r.zarr")


def test_patch_is_centred_on_the_rounded_spot(small_stack):
    sd = small_stack
    rows = rows_of(sd, "S2")
    img = image_array(sd, "S2").copy()
    xy = np.asarray(sd.tables["table"].obsm["spatial"])[rows]
    # paint a pure red pixel at each of three spots' rounded centres
    sel = rows[[0, 5, 10]]
    for x, y in xy[[0, 5, 10]]:
        img[:, int(np.floor(y + 0.5)), int(np.floor(x + 0.5))] = [255, 0, 0]
    set_image(sd, "S2", img)
    res = asign.pp.extract_features(
        sd,
        encoder=MarkerPosition(),
        sections=["S2"],
        scales=SMALL,
        input_size=32,
        show_progress_bar=False,
        inplace=False,
    )
    # the marker lies at pixel (16, 16) of the 32 px patch: [c - 16, c + 16)
    np.testing.assert_array_equal(res.features_spot[sel], np.full((3, 2), 16.0))


def test_border_patches_are_padded_white_and_flagged(small_stack, move_spots):
    sd = small_stack
    rows = rows_of(sd, "S1")
    move_spots(sd, rows[:2], [[2.0, 3.0], [509.6, 300.0]])
    asign.pp.extract_features(sd, encoder=Corner(), scales=SMALL, input_size=32, show_progress_bar=False)
    t = sd.tables["table"]
    padded = t.obs["asign_spot_padded"].to_numpy()
    assert padded[rows[0]] and padded[rows[1]]
    # flag = patch [c - 16, c + 16) leaves the 512 px image
    xy = np.floor(np.asarray(t.obsm["spatial"]) + 0.5)
    expect = ((xy - 16) < 0).any(axis=1) | ((xy + 16) > 512).any(axis=1)
    np.testing.assert_array_equal(padded, expect)
    # the top-left pixel of the first spot's patch lies outside the image: white
    np.testing.assert_allclose(t.obsm["asign_features_spot"][rows[0]], WHITE, atol=1e-5)
    assert t.uns["asign_features"]["n_spot_padded"] == int(expect.sum())


class CountingSlide:
    """A huge virtual RGB slide: records every region read and refuses reads larger than a few chunks."""

    def __init__(self, size: int, max_pixels: int):
        self.shape = (3, size, size)
        self.dtype = np.dtype(np.uint8)
        self.ndim = 3
        self.max_pixels = max_pixels
        self.pixels_read = 0

    def __getitem__(self, key):
        ys, xs = key[1], key[2]
        h, w = ys.stop - ys.start, xs.stop - xs.start
        if h * w > self.max_pixels:
            msg = f"read of {h} x {w} px: the slide is being loaded whole"
            raise MemoryError(msg)
        self.pixels_read += h * w
        yy, xx = np.mgrid[ys, xs]
        v = ((xx // 7 + yy // 5) % 200).astype(np.uint8)
        return np.stack([v, 255 - v, np.full_like(v, 128)])[key[0]]


def test_lazy_reading_of_a_100k_slide():
    from asign.io import Section, stack_sections

    slide = CountingSlide(100_000, max_pixels=1024 * 1024)
    arr = da.from_array(slide, chunks=(3, 1024, 1024), asarray=False, fancy=False)
    rng = np.random.default_rng(0)
    spots = rng.uniform(10_000, 90_000, (12, 2))
    counts = rng.poisson(3.0, (12, 4)).astype(np.float32)
    sec = Section(name="big", spots=spots, counts=counts, genes=list("abcd"), image=arr, um_per_px=0.5)
    sd = stack_sections([sec], spot_diameter_um=55.0, z_um=[0.0])
    asign.pp.extract_features(sd, encoder=MeanColour(), input_size=32, show_progress_bar=False)
    f = sd.tables["table"].obsm["asign_features_global"]
    assert np.isfinite(f).all()
    # 12 spots x (224 px patch: <= 4 chunks, 512 and 1024 px tiles on the 1024 px chunk grid: 1 chunk each)
    assert slide.pixels_read <= 12 * 6 * 1024 * 1024
    assert slide.pixels_read < 1e-2 * 100_000**2


def test_deterministic_and_same_patch_same_feature_in_any_section(small_stack, move_spots):
    """method.md §8 defect 1: one frozen encoder for every section (no per-section random projection)."""
    sd = small_stack
    set_image(sd, "S2", image_array(sd, "S1"))
    r1, r2 = rows_of(sd, "S1"), rows_of(sd, "S2")
    xy1 = np.asarray(sd.tables["table"].obsm["spatial"])[r1[:3]]
    move_spots(sd, r2[:3], xy1)
    kw = {"scales": SMALL, "input_size": 32, "sections": ["S1", "S2"], "show_progress_bar": False, "inplace": False}
    a = asign.pp.extract_features(sd, **kw)
    b = asign.pp.extract_features(sd, **kw)
    np.testing.assert_array_equal(a.features_spot, b.features_spot)
    np.testing.assert_array_equal(a.tiles.regions.obsm["features"], b.tiles.regions.obsm["features"])
    assert a.params["encoder"] == "efficientnet_lite0" and a.params["dim"] == 1280
    np.testing.assert_allclose(a.features_spot[r2[:3]], a.features_spot[r1[:3]], rtol=1e-5, atol=1e-5)
    # tiles at the same grid position of the two (identical) images have the same features
    reg = a.tiles.regions
    key = reg.obs["tile_col"].astype(str) + "_" + reg.obs["tile_row"].astype(str)
    s1 = dict(zip(key[reg.obs["section"] == "S1"], np.flatnonzero(reg.obs["section"] == "S1"), strict=True))
    pairs = [
        (s1[k], j) for k, j in zip(key, range(reg.n_obs), strict=True) if reg.obs["section"].iloc[j] == "S2" and k in s1
    ]
    assert len(pairs) >= 3
    i, j = np.asarray(pairs).T
    np.testing.assert_allclose(reg.obsm["features"][j], reg.obsm["features"][i], rtol=1e-5, atol=1e-5)
    # a different patch gives a different feature
    assert not np.allclose(a.features_spot[r1[0]], a.features_spot[r1[1]])
    # S3 was not processed
    assert np.isnan(a.features_spot[rows_of(sd, "S3")]).all()


def test_section_without_image(small_stack):
    sd = small_stack
    stack = sd.tables["table"].uns["asign"]["stack"]
    keys = list(stack["image_key"])
    del sd.images[keys[2]]
    keys[2] = ""
    stack["image_key"] = keys
    with pytest.raises(ValueError, match=r"\['S3'\] have no image.*sections=\['S1', 'S2'\]"):
        asign.pp.extract_features(sd, encoder=MeanColour(), scales=SMALL, input_size=32, show_progress_bar=False)
    with pytest.raises(ValueError, match="no image"):
        asign.pp.extract_features(sd, encoder=MeanColour(), sections=["S3"], scales=SMALL, show_progress_bar=False)
    with pytest.raises(ValueError, match="not in the stack"):
        asign.pp.extract_features(sd, encoder=MeanColour(), sections=["S9"], scales=SMALL, show_progress_bar=False)
    asign.pp.extract_features(
        sd, encoder=MeanColour(), sections=["S1", "S2"], scales=SMALL, input_size=32, show_progress_bar=False
    )
    t = sd.tables["table"]
    f = t.obsm["asign_features_spot"]
    assert np.isnan(f[rows_of(sd, "S3")]).all()
    assert np.isfinite(f[rows_of(sd, "S1")]).all()
    # tiles exist for every section (they need spots, not images); S3 tiles have NaN features
    reg = sd.tables["asign_regions"]
    assert np.isnan(reg.obsm["features"][(reg.obs["section"] == "S3").to_numpy()]).all()
    assert (t.obs["asign_region"] >= 0).all()


@pytest.mark.parametrize(("kind", "pattern"), [("alpha", "3 channels"), ("uint16", "uint8")])
def test_bad_images_are_rejected(small_stack, kind, pattern):
    sd = small_stack
    img = image_array(sd, "S1")
    if kind == "alpha":
        bad = np.concatenate([img, np.full_like(img[:1], 255)])
    else:
        bad = img.astype(np.uint16) * 257
    from spatialdata.models import Image2DModel
    from spatialdata.transformations import Identity

    sd.images["he_S1"] = Image2DModel.parse(bad, dims=("c", "y", "x"), transformations={"S1": Identity()})
    with pytest.raises(ValueError, match=pattern):
        asign.pp.extract_features(sd, encoder=MeanColour(), scales=SMALL, show_progress_bar=False)


def test_spot_outside_image_is_rejected(small_stack, move_spots):
    sd = small_stack
    move_spots(sd, [0], [[600.0, 10.0]])
    with pytest.raises(ValueError, match="outside image"):
        asign.pp.extract_features(sd, encoder=MeanColour(), scales=SMALL, show_progress_bar=False)


def test_scales_um_native_size_and_inplace_false(small_stack):
    sd = small_stack
    before = set(sd.tables["table"].obsm)
    res = asign.pp.extract_features(
        sd,
        encoder=InputSize(),
        scales_um={"spot": 256.0, "region": 1024.0, "global": 2048.0},
        input_size=None,
        show_progress_bar=False,
        inplace=False,
    )
    assert set(sd.tables["table"].obsm) == before
    assert "asign_regions" not in sd.tables
    # 8 µm/px: patches of 32 / 128 / 256 px reach the encoder at native size
    assert (res.features_spot == 32).all()
    assert (res.features_region == 128).all()
    assert (res.features_global == 256).all()
    assert res.params["unit"] == "um" and res.params["input_size"] == 0
    # resized to input_size otherwise
    res = asign.pp.extract_features(
        sd, encoder=InputSize(), scales=SMALL, input_size=48, show_progress_bar=False, inplace=False
    )
    assert (res.features_global == 48).all()


def test_pixel_scales_on_a_coarse_image_warn(small_stack, caplog):
    """8 µm/px, spot diameter ~152 µm: a 64 px spot patch (512 µm) covers many spots; scales_um= is suggested."""
    import logging

    sd = small_stack
    kw = {"encoder": CentrePixel(), "input_size": 16, "show_progress_bar": False, "inplace": False}
    with caplog.at_level(logging.WARNING, logger="asign"):
        asign.pp.extract_features(sd, scales=SMALL, **kw)  # 32 px = 256 µm: fine
        asign.pp.extract_features(sd, scales_um={"spot": 512.0, "region": 1024.0, "global": 2048.0}, **kw)
    assert "spot diameter" not in caplog.text
    with caplog.at_level(logging.WARNING, logger="asign"):
        asign.pp.extract_features(sd, scales={"spot": 64, "region": 128, "global": 256}, sections=["S1", "S3"], **kw)
    assert "Sections ['S1', 'S3'] have spot patches more than 3x the spot diameter" in caplog.text
    assert "64 px x 8 µm/px = 512 µm" in caplog.text and "scales_um=" in caplog.text


def test_workers_give_the_same_features(small_stack):
    sd = small_stack
    kw = {"encoder": CentrePixel(), "scales": SMALL, "input_size": 32, "show_progress_bar": False, "inplace": False}
    a = asign.pp.extract_features(sd, num_workers=0, batch_size=16, **kw)
    b = asign.pp.extract_features(sd, num_workers=2, batch_size=7, **kw)
    np.testing.assert_array_equal(a.features_spot, b.features_spot)
    np.testing.assert_array_equal(a.features_global, b.features_global)


def test_handcrafted_encoder_runs(small_stack):
    sd = small_stack
    res = asign.pp.extract_features(
        sd, encoder="handcrafted", sections=["S1"], scales=SMALL, input_size=32, show_progress_bar=False, inplace=False
    )
    f = res.features_spot[rows_of(sd, "S1")]
    assert f.shape[1] == res.params["dim"] == 73
    assert np.isfinite(f).all() and f.std(axis=0).max() > 0


def test_bad_arguments(small_stack):
    with pytest.raises(ValueError, match="Unknown encoder"):
        asign.pp.extract_features(small_stack, encoder="vgg", show_progress_bar=False)
    with pytest.raises(ValueError, match="batch_size"):
        asign.pp.extract_features(small_stack, encoder=MeanColour(), batch_size=0, show_progress_bar=False)
    # a module carries its own weights: weights= with one used to be ignored (uns recorded 'user module')
    for w in ("r18.pth", "random"):
        with pytest.raises(ValueError, match=rf"`weights='{w}'` cannot be used with a torch.nn.Module"):
            asign.pp.extract_features(small_stack, encoder=MeanColour(), weights=w, show_progress_bar=False)


@pytest.mark.slow
@pytest.mark.real_data
def test_her2st_patches_match_the_decoded_jpeg(her2st_path):
    from PIL import Image

    from asign.io._her2st import _find_image

    sd = asign.io.read_her2st(her2st_path, patient="C", sections=["C2", "C3"])
    res = asign.pp.extract_features(sd, encoder=CentrePixel(), input_size=None, show_progress_bar=False, inplace=False)
    t = sd.tables["table"]
    assert np.isfinite(res.features_spot).all() and np.isfinite(res.features_global).all()
    assert res.tiles.regions.obs["n_spots"].sum() == t.n_obs
    # the centre pixel of each spot patch is the JPEG's pixel at the rounded spot centre
    rows = rows_of(sd, "C3")
    Image.MAX_IMAGE_PIXELS = None
    img = np.asarray(Image.open(_find_image(her2st_path, "C", "C3")).convert("RGB"))
    xy = np.floor(np.asarray(t.obsm["spatial"])[rows] + 0.5).astype(int)
    px = img[xy[:, 1], xy[:, 0]] / 255.0
    expect = (px - np.asarray(IMAGENET_MEAN)) / np.asarray(IMAGENET_STD)
    np.testing.assert_allclose(res.features_spot[rows], expect, atol=1e-5)


def set_pyramid(sd, section, levels):
    """Replace a section's image by a multiscale element whose levels are the given (3, y, x) uint8 arrays, each
    its own dask array (a stored pyramid, as read from zarr)."""
    import xarray as xr
    from spatialdata.models import Image2DModel
    from spatialdata.transformations import Identity, set_transformation

    h0, w0 = levels[0].shape[1:]
    nodes = {}
    for k, a in enumerate(levels):
        h, w = a.shape[1:]
        coords = {"c": ["r", "g", "b"], "y": (np.arange(h) + 0.5) * h0 / h, "x": (np.arange(w) + 0.5) * w0 / w}
        arr = xr.DataArray(da.from_array(a, chunks=(3, 128, 128)), dims=("c", "y", "x"), coords=coords, name="image")
        nodes[f"scale{k}"] = xr.Dataset({"image": arr})
    tree = xr.DataTree.from_dict(nodes)
    set_transformation(tree, {section: Identity()}, set_all=True)
    Image2DModel().validate(tree)
    sd.images[f"he_{section}"] = tree


def box_pyramid(img, n_levels):
    levels = [img]
    for _ in range(n_levels - 1):
        a = levels[-1].astype(np.float32)
        levels.append(np.round(a.reshape(3, a.shape[1] // 2, 2, a.shape[2] // 2, 2).mean((2, 4))).astype(np.uint8))
    return levels


def normalised(v):
    return (v / 255.0 - np.asarray(IMAGENET_MEAN)) / np.asarray(IMAGENET_STD)


def test_tiles_are_read_from_the_coarsest_sufficient_level(small_stack):
    sd = small_stack
    img = image_array(sd, "S1")
    # 4 stored levels (1, 2, 4, 8x); levels 1-3 are constant colours 50, 100, 150 so features reveal the level read
    levels = [img] + [np.full((3, 512 >> k, 512 >> k), 50 * k, np.uint8) for k in (1, 2, 3)]
    set_pyramid(sd, "S1", levels)
    kw = {"encoder": MeanColour(), "sections": ["S1"], "scales": SMALL, "input_size": 32, "show_progress_bar": False}
    res = asign.pp.extract_features(sd, inplace=False, **kw)
    rows = rows_of(sd, "S1")
    # spot 32 px -> 32 px input: full resolution; region 128 px: 4x level (32 px); global 256 px: 8x level (32 px)
    assert res.params["pyramid_level"] == {"spot": [0, -1, -1], "region": [2, -1, -1], "global": [3, -1, -1]}
    assert res.params["read_px"] == {"spot": [32, 0, 0], "region": [32, 0, 0], "global": [32, 0, 0]}
    assert res.params["pyramid"] == "auto" and res.params["resize"] == "device"
    np.testing.assert_allclose(res.features_region[rows], np.tile(normalised(100.0), (len(rows), 1)), atol=1e-5)
    np.testing.assert_allclose(res.features_global[rows], np.tile(normalised(150.0), (len(rows), 1)), atol=1e-5)
    assert not np.allclose(res.features_spot[rows], normalised(0.0), atol=0.1)  # the real image at level 0
    # a larger input needs a finer level: 64 px from the 2x level (64 px read) for regions, 4x for globals
    res = asign.pp.extract_features(sd, inplace=False, **{**kw, "input_size": 64})
    assert res.params["pyramid_level"]["region"][0] == 1 and res.params["pyramid_level"]["global"][0] == 2
    np.testing.assert_allclose(res.features_region[rows], np.tile(normalised(50.0), (len(rows), 1)), atol=1e-5)
    # pyramid='never' and native-size input read full resolution
    for extra in ({"pyramid": "never"}, {"input_size": None}):
        res = asign.pp.extract_features(sd, inplace=False, **{**kw, **extra})
        assert res.params["pyramid_level"]["global"][0] == 0
        assert not np.allclose(res.features_global[rows], normalised(150.0), atol=0.05)


def test_pyramid_features_are_close_to_the_full_resolution_path(small_stack):
    sd = small_stack
    img = image_array(sd, "S1")
    set_pyramid(sd, "S1", box_pyramid(img, 4))
    kw = {"sections": ["S1"], "scales": SMALL, "input_size": 32, "show_progress_bar": False, "inplace": False}
    rows = rows_of(sd, "S1")
    a = asign.pp.extract_features(sd, encoder=MeanColour(), **kw)
    b = asign.pp.extract_features(sd, encoder=MeanColour(), pyramid="never", **kw)
    assert a.params["pyramid_level"]["global"][0] == 3 and b.params["pyramid_level"]["global"][0] == 0
    # mean colour: the box pyramid keeps it (up to uint8 rounding)
    np.testing.assert_allclose(a.features_global[rows], b.features_global[rows], atol=0.02)
    np.testing.assert_array_equal(a.features_spot, b.features_spot)
    # a real encoder at a 64 px input: regions from the 2x, globals from the 4x box level (64 px read, no resize) vs
    # the full-resolution tiles resized to 64 px (antialiased bilinear)
    kw["input_size"] = 64
    a = asign.pp.extract_features(sd, encoder="efficientnet_lite0", **kw)
    b = asign.pp.extract_features(sd, encoder="efficientnet_lite0", pyramid="never", **kw)
    assert a.params["pyramid_level"]["region"][0] == 1 and a.params["pyramid_level"]["global"][0] == 2
    for tab in ("regions", "globals_"):
        fa, fb = getattr(a.tiles, tab).obsm["features"], getattr(b.tiles, tab).obsm["features"]
        keep = np.isfinite(fa).all(axis=1)
        fa, fb = fa[keep], fb[keep]
        cos = (fa[:, None] * fb[None]).sum(-1) / np.linalg.norm(fa, axis=1)[:, None] / np.linalg.norm(fb, axis=1)
        same, other = np.diag(cos), cos[~np.eye(len(cos), dtype=bool)]
        assert same.mean() > 0.96 and same.min() > 0.93
        # each tile is closer to itself at full resolution than to any other tile
        assert (np.argmax(cos, axis=1) == np.arange(len(cos))).all() and other.mean() < 0.7


def test_in_memory_pyramid_levels_are_used_only_when_asked(small_stack):
    sd = small_stack
    # small_stack's images are parsed in memory: scale1 is computed from scale0 by dask on the fly
    kw = {"encoder": MeanColour(), "scales": SMALL, "input_size": 32, "show_progress_bar": False, "inplace": False}
    auto = asign.pp.extract_features(sd, **kw)
    always = asign.pp.extract_features(sd, pyramid="always", **kw)
    assert auto.params["pyramid_level"]["region"] == [0, 0, 0]
    assert always.params["pyramid_level"]["region"] == [1, 1, 1]
    assert always.params["read_px"]["global"] == [128] * 3
    np.testing.assert_allclose(always.features_region, auto.features_region, atol=0.02)
    with pytest.raises(ValueError, match="pyramid"):
        asign.pp.extract_features(sd, pyramid="yes", **kw)
    with pytest.raises(ValueError, match="resize"):
        asign.pp.extract_features(sd, resize="gpu", **kw)


def test_an_encoder_object_records_its_own_input_size(small_stack):
    """Patches are resized to the Encoder's input size; that, not the argument's default, is recorded."""
    from asign._encoders import Encoder

    seen = []

    def fn(batch):
        seen.append(batch.shape[1:3])
        return batch.reshape(len(batch), -1, 3).mean(axis=1)

    enc = Encoder(name="mean16", dim=3, weights="none", fn=fn, input_size=16)
    res = asign.pp.extract_features(
        small_stack,
        encoder=enc,
        scales={"spot": 32, "region": 128, "global": 256},
        show_progress_bar=False,
        inplace=False,
    )
    assert set(seen) == {(16, 16)}
    assert res.params["input_size"] == 16


def test_multiscale_and_single_scale_sections_give_the_same_features(small_stack, move_spots, asign_log):
    """A section with a stored pyramid and one without: every scale is read at the same downscale factor in both.

    The pyramid section used to read region / global tiles from its 4x / 8x level and the other from full resolution
    (resized on the device), so identical patches got different features.
    """
    sd = small_stack
    img = image_array(sd, "S1")
    set_pyramid(sd, "S1", box_pyramid(img, 4))
    set_image(sd, "S2", img)  # the same image, single scale
    r1, r2 = rows_of(sd, "S1"), rows_of(sd, "S2")
    k = min(len(r1), len(r2))
    move_spots(sd, r2[:k], np.asarray(sd.tables["table"].obsm["spatial"])[r1[:k]])
    kw = {"scales": SMALL, "input_size": 32, "show_progress_bar": False, "inplace": False}
    res = asign.pp.extract_features(sd, encoder=CentrePixel(), sections=["S1", "S2"], **kw)
    assert res.params["pyramid_level"]["global"][:2] == [0, 0]
    assert res.params["downscale"]["global"] == [1.0, 1.0, 0.0]
    for lev in ("spot", "region", "global"):
        f = getattr(res, f"features_{lev}")
        np.testing.assert_array_equal(f[r2[:k]], f[r1[:k]])
    assert "Sections ['S2'] lack pyramid levels that the images of other sections have" in asign_log.warnings
    assert "global patches of 'S1' at 1x instead of 8x" in asign_log.warnings
    # on its own, S1 still reads its pyramid (and says nothing)
    asign_log.records.clear()
    alone = asign.pp.extract_features(sd, encoder=CentrePixel(), sections=["S1"], **kw)
    assert alone.params["pyramid_level"]["global"][0] == 3 and alone.params["downscale"]["global"][0] == 8.0
    assert "lack pyramid levels" not in asign_log.warnings


def _tile_features(sd, level):
    tab = sd.tables[f"asign_{level}s"]
    key = list(zip(tab.obs["section"].astype(str), tab.obs["tile_row"], tab.obs["tile_col"], strict=True))
    return dict(zip(key, np.asarray(tab.obsm["features"]), strict=True))


@pytest.mark.parametrize(
    "options",
    [
        {"encoder": "handcrafted"},
        {"encoder": Corner(), "tta": "flips", "keep_views": True, "stain_norm": "macenko"},
    ],
    ids=["handcrafted", "views-stain"],
)
def test_features_of_several_calls_equal_one_call(small_stack, asign_log, options):
    """extract_features(sections=['S1']) then (sections=['S2', 'S3']) used to erase S1's features."""
    import copy

    kw = {"scales": SMALL, "input_size": 32, "show_progress_bar": False, **options}
    one = copy.deepcopy(small_stack)
    asign.pp.extract_features(one, **kw)
    sd = small_stack
    asign.pp.extract_features(sd, sections=["S1"], **kw)
    asign.pp.extract_features(sd, sections=["S2", "S3"], **kw)
    assert "discarded" not in asign_log.warnings
    t, t1 = sd.tables["table"], one.tables["table"]
    keys = ["asign_features_spot", "asign_features_region", "asign_features_global"]
    keys += ["asign_features_spot_views"] if options.get("keep_views") else []
    for k in keys:
        assert np.isfinite(t.obsm[k]).all()
        np.testing.assert_array_equal(t.obsm[k], t1.obsm[k])
    np.testing.assert_array_equal(t.obs["asign_spot_padded"], t1.obs["asign_spot_padded"])
    for level in ("region", "global"):
        a, b = _tile_features(sd, level), _tile_features(one, level)
        assert a.keys() == b.keys()
        for key in a:
            np.testing.assert_array_equal(a[key], b[key])
    info, info1 = t.uns["asign_features"], t1.uns["asign_features"]
    assert info["sections"] == ["S1", "S2", "S3"]
    for f in ("pyramid_level", "read_px", "downscale", "n_spot_padded"):
        assert info[f] == info1[f]
    if "stain_norm" in options:
        for f in ("stain_matrix", "stain_vectors", "stain_estimated", "stain_n_pixels"):
            np.testing.assert_array_equal(info[f], info1[f])
    # a section processed again is replaced, the others kept
    asign.pp.extract_features(sd, sections=["S2"], **kw)
    assert t.uns["asign_features"]["sections"] == ["S1", "S2", "S3"]
    np.testing.assert_array_equal(t.obsm["asign_features_spot"], t1.obsm["asign_features_spot"])


def test_features_of_an_earlier_call_with_other_settings_are_discarded_with_a_warning(small_stack, asign_log):
    sd = small_stack
    kw = {"scales": SMALL, "input_size": 32, "show_progress_bar": False}
    asign.pp.extract_features(sd, encoder="handcrafted", sections=["S1"], **kw)
    asign.pp.extract_features(sd, encoder=MeanColour(), sections=["S2"], **kw)
    w = asign_log.warnings
    assert "Earlier features of sections ['S1'] (key_added='asign') are discarded because the settings differ" in w
    assert "encoder: 'handcrafted' != 'MeanColour'" in w
    assert "Sections ['S1', 'S3'] are not processed" in w
    t = sd.tables["table"]
    assert t.uns["asign_features"]["sections"] == ["S2"]
    assert np.isnan(t.obsm["asign_features_spot"][rows_of(sd, "S1")]).all()
    assert np.isfinite(t.obsm["asign_features_spot"][rows_of(sd, "S2")]).all()
    # other scales: discarded too
    asign_log.records.clear()
    asign.pp.extract_features(sd, encoder=MeanColour(), sections=["S3"], **{**kw, "scales": {**SMALL, "spot": 48}})
    assert "scales_px" in asign_log.warnings and "discarded" in asign_log.warnings


def test_coarse_images_and_bad_scales_are_reported(small_stack, asign_log):
    """8 µm/px: 100 µm is a 13 px spot patch (warned); bools and non-positive sides are refused."""
    kw = {"encoder": MeanColour(), "input_size": 16, "show_progress_bar": False, "inplace": False}
    asign.pp.extract_features(small_stack, scales_um={"spot": 256.0, "region": 1024.0, "global": 2048.0}, **kw)
    assert "too coarse" not in asign_log.warnings
    asign.pp.extract_features(small_stack, scales_um={"spot": 100.0, "region": 1024.0, "global": 2048.0}, **kw)
    assert "Sections ['S1', 'S2', 'S3'] are too coarse for the requested scales_um" in asign_log.warnings
    assert "'S1': spot 100 µm -> 13 px = 104 µm" in asign_log.warnings
    for bad in (True, 0, -32, "32"):
        with pytest.raises(ValueError, match=r"`scales\['spot'\]` must be a positive number"):
            asign.pp.extract_features(small_stack, scales={**SMALL, "spot": bad}, **kw)
    with pytest.raises(ValueError, match=r"`scales_um\['region'\]` must be a positive number.*a bool"):
        asign.pp.extract_features(small_stack, scales_um={"region": False}, **kw)


def test_non_finite_encoder_output_is_an_error(small_stack):
    """A module returning NaN used to give all-NaN features without an error."""

    class NaNs(torch.nn.Module):
        def forward(self, x):
            return x.mean(dim=(2, 3)) * float("nan")

    class InfOnRegions(torch.nn.Module):
        def forward(self, x):  # native size: region tiles are the 128 px inputs
            out = x.mean(dim=(2, 3))
            return out + float("inf") if x.shape[2] == 128 else out

    kw = {"scales": SMALL, "show_progress_bar": False, "inplace": False}
    with pytest.raises(ValueError, match=r"NaN or infinite features for \d+ patch.*spot patches of section 'S1'"):
        asign.pp.extract_features(small_stack, encoder=NaNs(), sections=["S1", "S2"], input_size=32, **kw)
    with pytest.raises(ValueError, match="region patches of section 'S2'") as e:
        asign.pp.extract_features(small_stack, encoder=InfOnRegions(), sections=["S2"], input_size=None, **kw)
    assert "spot patches" not in str(e.value) and "global patches" not in str(e.value)


def test_several_calls_read_every_section_at_the_same_pyramid_level(small_stack, asign_log):
    """Kept features fix the downscale factor of later calls, or are discarded when a new section lacks it."""
    import copy

    img = image_array(small_stack, "S1")
    kw = {"encoder": CentrePixel(), "scales": SMALL, "input_size": 32, "show_progress_bar": False}
    # S1 single scale first, then S2 with a stored pyramid: S2 is read at full resolution, as in one call
    sd = copy.deepcopy(small_stack)
    set_pyramid(sd, "S2", box_pyramid(image_array(sd, "S2"), 4))
    one = copy.deepcopy(sd)
    asign.pp.extract_features(one, sections=["S1", "S2"], **kw)
    asign.pp.extract_features(sd, sections=["S1"], **kw)
    asign.pp.extract_features(sd, sections=["S2"], **kw)
    assert "discarded" not in asign_log.warnings
    info = sd.tables["table"].uns["asign_features"]
    assert info["sections"] == ["S1", "S2"] and info["pyramid_level"]["global"] == [0, 0, -1]
    np.testing.assert_array_equal(
        sd.tables["table"].obsm["asign_features_global"], one.tables["table"].obsm["asign_features_global"]
    )
    # S1 with a pyramid first (read at 8x), then S3 without: S1's features are discarded, with the reason
    sd = copy.deepcopy(small_stack)
    set_pyramid(sd, "S1", box_pyramid(img, 4))
    asign.pp.extract_features(sd, sections=["S1"], **kw)
    assert sd.tables["table"].uns["asign_features"]["downscale"]["global"] == [8.0, 0.0, 0.0]
    asign.pp.extract_features(sd, sections=["S3"], **kw)
    w = asign_log.warnings
    assert "Earlier features of sections ['S1'] (key_added='asign') are discarded" in w
    assert "global patches of sections ['S1'] were read at downscale [8.0], but with sections ['S3'] they would" in w
    assert sd.tables["table"].uns["asign_features"]["sections"] == ["S3"]


def _point_shapes():
    import geopandas as gpd
    from shapely.geometry import Point
    from spatialdata.models import ShapesModel

    return ShapesModel.parse(gpd.GeoDataFrame(geometry=[Point(0, 0)], data={"radius": [1.0]}))


def _written(table, key="asign"):
    """The keys that extract_features writes into the spot table."""
    return sorted(
        [f"obs:{c}" for c in table.obs if c.startswith(key + "_")]
        + [f"obsm:{c}" for c in table.obsm if c.startswith(key + "_")]
        + [f"uns:{c}" for c in table.uns if c.startswith(key + "_")]
    )


@pytest.mark.parametrize("name", ["asign_regions", "Asign_Regions", "asign_GLOBALS"])
def test_an_element_named_like_a_tile_table_is_refused_before_any_work(small_stack, asign_log, name):
    """spatialdata refused the tile table only after all the feature work, leaving obs/uns keys without features."""
    sd = small_stack
    sd.shapes[name] = _point_shapes()
    kw = {"encoder": MeanColour(), "scales": SMALL, "input_size": None, "show_progress_bar": False}
    for _ in range(2):  # a rerun fails the same way
        with pytest.raises(ValueError, match=rf"key_added='asign' would write the table .*sdata\.shapes\['{name}'\]"):
            asign.pp.extract_features(sd, **kw)
        assert _written(sd.tables["table"]) == []
        assert not any("Extracting" in r.getMessage() for r in asign_log.records)
    asign.pp.extract_features(sd, key_added="img", **kw)
    assert "img_features_spot" in sd.tables["table"].obsm and name in sd.shapes


def test_a_failed_write_leaves_no_keys_and_a_rerun_is_still_checked(small_stack, monkeypatch):
    """A write that fails (here: a clash the check is made to miss) leaves the spot table as it was; a leftover
    `uns['asign_tiles']` of such a run (as earlier versions left it) does not switch the clash check off."""
    import anndata as ad

    from asign.pp import _features

    sd = small_stack
    kw = {"encoder": MeanColour(), "scales": SMALL, "input_size": None, "show_progress_bar": False}
    sd.shapes["asign_globals"] = _point_shapes()
    monkeypatch.setattr(_features, "check_output_keys", lambda *a, **k: None)
    with pytest.raises(KeyError, match="not unique"):
        asign.pp.extract_features(sd, **kw)
    monkeypatch.undo()
    t = sd.tables["table"]
    assert _written(t) == [] and "asign_regions" not in sd.tables  # both tables or neither
    # what earlier versions left: the index columns and uns['asign_tiles'], no features, no tables
    t.obs["asign_region"], t.obs["asign_global"] = 0, 0
    t.uns["asign_tiles"] = {"region_table": "asign_regions", "global_table": "asign_globals"}
    with pytest.raises(ValueError, match=r"sdata\.shapes\['asign_globals'\]"):
        asign.pp.extract_features(sd, **kw)
    del sd.shapes["asign_globals"]
    user = ad.AnnData(np.ones((2, 2)))
    sd.tables["asign_regions"] = user  # a user's table is not made asign's by the leftover record
    with pytest.raises(ValueError, match=r"would overwrite table 'asign_regions', which no earlier asign run"):
        asign.pp.extract_features(sd, **kw)
    assert sd.tables["asign_regions"] is user
    del sd.tables["asign_regions"]
    asign.pp.extract_features(sd, **kw)  # the leftover columns are asign's: replaced
    assert t.obsm["asign_features_spot"].shape[0] == t.n_obs and "asign_features" in t.uns
    asign.pp.extract_features(sd, **kw)  # its own earlier run: replaced
