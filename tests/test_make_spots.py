"""asign.pp.make_spots: virtual spot grids on the tissue of sections without measured spots."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp
from scipy.spatial import cKDTree
from spatialdata.models import Image2DModel, TableModel
from spatialdata.transformations import Identity, get_transformation

from asign._stack import get_stack
from asign.datasets._synthetic import domain_at
from asign.io import validate_stack
from asign.pp import make_spots
from asign.pp._make_spots import tissue_mask

UM_PER_PX = 8.0


def _drop_section(sdata, section):
    """Remove a section's spots (shapes and table rows); it keeps its image and its manifest entry."""
    t = sdata.tables["table"]
    keep = t[(t.obs["section"].astype(str) != section).to_numpy()].copy()
    keep.obs["region"] = keep.obs["region"].cat.remove_unused_categories()
    del keep.uns["spatialdata_attrs"]
    del sdata.tables["table"]
    del sdata.shapes[f"spots_{section}"]
    sdata.tables["table"] = TableModel.parse(
        keep, region=list(keep.obs["region"].cat.categories), region_key="region", instance_key="spot_id"
    )


def _world(t, section, xy):
    stack = get_stack(t)
    M = t.uns["asign"]["synthetic"]["native_to_world"][stack.index(section)]
    return xy @ M[:2, :2].T + M[:2, 2], float(stack.z_um[stack.index(section)])


def _tissue_area_um2(t, section, size=512):
    yy, xx = np.mgrid[0:size, 0:size] + 0.5
    w, z = _world(t, section, np.column_stack([xx.ravel(), yy.ravel()]))
    return float((domain_at(w[:, 0], w[:, 1], z) >= 0).sum()) * UM_PER_PX**2


def _rows(t, section):
    return (t.obs["section"].astype(str) == section).to_numpy()


@pytest.fixture
def emptied(small_stack):
    _drop_section(small_stack, "S2")
    return small_stack


def test_tissue_mask_matches_ground_truth(small_stack):
    t = small_stack.tables["table"]
    mask, factor = tissue_mask(small_stack.images["he_S3"], pixel_um=UM_PER_PX)
    assert factor == 1.0  # 512 px: level 0 is small enough
    yy, xx = np.mgrid[0 : mask.shape[0], 0 : mask.shape[1]] + 0.5
    w, z = _world(t, "S3", np.column_stack([xx.ravel(), yy.ravel()]) * factor)
    truth = (domain_at(w[:, 0], w[:, 1], z) >= 0).reshape(mask.shape)
    assert truth[mask].mean() > 0.95  # precision
    assert mask[truth].mean() > 0.95  # recall (pale fat counts as tissue)
    # min_resolution_um only bounds the mask's pixel size: a 512 px image is masked at level 0 all the same
    coarse, f2 = tissue_mask(small_stack.images["he_S3"], pixel_um=UM_PER_PX, min_resolution_um=100.0)
    assert f2 == 1.0
    np.testing.assert_array_equal(coarse, mask)


def test_make_spots_square_grid_on_tissue(emptied):
    stack = get_stack(emptied)
    make_spots(emptied, section="S2")
    validate_stack(emptied, require_images=True)
    t = emptied.tables["table"]
    m = _rows(t, "S2")
    n = int(m.sum())
    assert list(t.obs["section"].cat.categories) == ["S1", "S2", "S3"]
    assert list(t.obs["section"].astype(str).drop_duplicates()) == ["S1", "S2", "S3"]  # rows in cutting order
    assert not t.obs.loc[m, "measured"].any() and t.obs.loc[~m, "measured"].all()
    assert sp.issparse(t.X) and t.X[m].nnz == 0
    assert list(t.obs_names[m][:2]) == ["S2_v0", "S2_v1"]
    np.testing.assert_array_equal(t.obs.loc[m, "spot_id"], np.arange(n))
    # spots lie in tissue (ground truth) and their number is about tissue area / pitch^2
    xy = t.obsm["spatial"][m]
    w, z = _world(t, "S2", xy)
    assert (domain_at(w[:, 0], w[:, 1], z) >= 0).mean() > 0.95
    pitch = 2.0 * stack.spot_diameter_um
    expected = _tissue_area_um2(t, "S2") / pitch**2
    print(f"make_spots: {n} virtual spots, tissue area / pitch^2 = {expected:.1f}")
    assert abs(n - expected) < 0.2 * expected
    # a square grid at the pitch; circles with the stack's spot diameter
    d, _ = cKDTree(xy).query(xy, k=2)
    np.testing.assert_allclose(d[:, 1], pitch / UM_PER_PX, rtol=1e-6)
    shapes = emptied.shapes["spots_S2"]
    np.testing.assert_allclose(shapes["radius"], stack.spot_diameter_um / 2 / UM_PER_PX)
    np.testing.assert_allclose(np.column_stack([shapes.geometry.x, shapes.geometry.y]), xy)
    assert set(get_transformation(shapes, get_all=True)) == {"S2"}
    # other per-spot values of the new rows are missing, not made up
    assert t.obs.loc[m, "domain"].isna().all()
    assert np.isnan(t.obsm["spatial_world"][m]).all()
    assert t.uns["asign"]["make_spots"]["S2"]["n_spots"] == n


def test_make_spots_hex_grid_and_spacing(emptied):
    make_spots(emptied, section="S2", grid="hex", spacing_um=150.0, diameter_um=60.0)
    validate_stack(emptied)
    t = emptied.tables["table"]
    xy = t.obsm["spatial"][_rows(t, "S2")]
    d, _ = cKDTree(xy).query(xy, k=7)
    np.testing.assert_allclose(d[:, 1], 150.0 / UM_PER_PX, rtol=1e-6)
    inner = d[:, 6] < 150.0 / UM_PER_PX * 1.01
    assert inner.sum() > 0.5 * len(xy)  # interior spots have 6 neighbours at one pitch
    expected = _tissue_area_um2(t, "S2") / (150.0**2 * np.sqrt(3) / 2)
    assert abs(len(xy) - expected) < 0.15 * expected
    np.testing.assert_allclose(emptied.shapes["spots_S2"]["radius"], 30.0 / UM_PER_PX)
    w, z = _world(t, "S2", xy)
    assert (domain_at(w[:, 0], w[:, 1], z) >= 0).mean() > 0.95


def test_make_spots_replaces_virtual_spots_and_keeps_measured(emptied):
    make_spots(emptied, section="S2")
    n1 = int(_rows(emptied.tables["table"], "S2").sum())
    make_spots(emptied, section="S2", spacing_um=0.5 * 2 * get_stack(emptied).spot_diameter_um)
    t = emptied.tables["table"]
    assert int(_rows(t, "S2").sum()) > 3 * n1
    validate_stack(emptied)
    with pytest.raises(ValueError, match="Section 'S1' has measured spots; make_spots never replaces them"):
        make_spots(emptied, section="S1")


def test_make_spots_not_inplace(emptied):
    before = emptied.tables["table"].n_obs
    out = make_spots(emptied, section="S2", inplace=False)
    assert emptied.tables["table"].n_obs == before
    assert "spots_S2" not in emptied.shapes
    assert out.tables["table"].n_obs > before
    validate_stack(out)
    assert out.images["he_S1"] is emptied.images["he_S1"]  # unchanged elements are shared


def test_make_spots_new_section(small_stack):
    img = small_stack.images["he_S2"]["scale0"]["image"].values
    small_stack.images["he_new"] = Image2DModel.parse(
        img, dims=("c", "y", "x"), scale_factors=[2], transformations={"global": Identity()}
    )
    with pytest.raises(ValueError, match="pass `um_per_px`"):
        make_spots(small_stack, section="N", image_key="he_new")
    with pytest.raises(ValueError, match="z_um=16.0 is already taken"):
        make_spots(small_stack, section="N", image_key="he_new", um_per_px=UM_PER_PX, z_um=16.0)
    with pytest.raises(KeyError, match="image 'he_N' not found"):
        make_spots(small_stack, section="N", um_per_px=UM_PER_PX, z_um=24.0)
    with pytest.raises(ValueError, match="already belongs to another section"):
        make_spots(small_stack, section="N", image_key="he_S2", um_per_px=UM_PER_PX, z_um=24.0)
    make_spots(small_stack, section="N", image_key="he_new", um_per_px=UM_PER_PX, z_um=24.0)
    stack = validate_stack(small_stack, require_images=True)
    assert stack.sections == ["S1", "S2", "N", "S3"]
    assert stack.image_keys == ["he_S1", "he_S2", "he_new", "he_S3"]
    np.testing.assert_allclose(stack.z_um, [0.0, 16.0, 24.0, 32.0])
    assert set(get_transformation(small_stack.images["he_new"], get_all=True)) == {"global", "N"}
    t = small_stack.tables["table"]
    assert list(t.obs["section"].astype(str).drop_duplicates()) == ["S1", "S2", "N", "S3"]
    # same image as S2, so the same tissue: spots in S2's ground-truth tissue
    xy = t.obsm["spatial"][_rows(t, "N")]
    w, z = _world(t, "S2", xy)
    assert (domain_at(w[:, 0], w[:, 1], z) >= 0).mean() > 0.95
    # measured counts of the other sections are untouched
    assert t.obs.loc[~_rows(t, "N"), "measured"].all()


def test_make_spots_errors(emptied):
    with pytest.raises(ValueError, match="grid must be 'square' or 'hex'"):
        make_spots(emptied, section="S2", grid="triangle")
    with pytest.raises(ValueError, match="no tissue found"):
        make_spots(emptied, section="S2", tissue_threshold=1e-3)
    px = float(get_stack(emptied.tables["table"]).um_per_px[1])
    with pytest.raises(ValueError, match=r"the pitch spacing_um=.* is smaller than a pixel of image 'he_S2'"):
        make_spots(emptied, section="S2", spacing_um=0.5 * px)
    del emptied.images["he_S2"]
    emptied.tables["table"].uns["asign"]["stack"]["image_key"] = ["he_S1", "", "he_S3"]
    with pytest.raises(ValueError, match="Section 'S2' has no image"):
        make_spots(emptied, section="S2")


def test_make_spots_drops_stale_graphs(emptied):
    t = emptied.tables["table"]
    t.obsp["asign_connectivities"] = sp.identity(t.n_obs, format="csr")
    t.obsp["asign_distances"] = sp.identity(t.n_obs, format="csr")
    t.obsp["asign_overlap"] = sp.identity(t.n_obs, format="csr")
    t.uns["asign_neighbors"] = {"connectivities_key": "asign_connectivities", "distances_key": "asign_distances"}
    t.uns["asign_overlap"] = {"params": {"radius_px": 1.0}}
    t.uns["unrelated"] = {"connectivities_key": "elsewhere"}
    values = pd.DataFrame(np.arange(t.n_obs * 2.0).reshape(-1, 2), index=t.obs_names, columns=["g1", "g2"])
    t.obsm["asign_normalized"] = values  # a DataFrame, as pp.normalize writes
    t.obs["z"] = np.where(t.obs["section"].astype(str) == "S1", 0.0, 32.0)  # as align_layers writes
    make_spots(emptied, section="S2", tissue_threshold=0.95)
    t = emptied.tables["table"]
    assert not set(t.obsp) & {"asign_connectivities", "asign_distances", "asign_overlap"}
    assert _rows(t, "S2").sum() > 10
    # the records of the dropped graphs go with them; other uns entries stay
    assert "asign_neighbors" not in t.uns and "asign_overlap" not in t.uns and "unrelated" in t.uns
    # DataFrame obsm entries are kept: old rows unchanged, new rows NaN, same columns
    kept = t.obsm["asign_normalized"]
    assert isinstance(kept, pd.DataFrame) and list(kept.columns) == ["g1", "g2"]
    pd.testing.assert_frame_equal(kept.loc[values.index], values)
    assert kept[_rows(t, "S2")].isna().all().all()
    # the new rows get their section's z from the manifest
    np.testing.assert_allclose(t.obs.loc[_rows(t, "S2"), "z"], 16.0)


@pytest.mark.slow
@pytest.mark.real_data
def test_make_spots_her2st_c2(her2st_path):
    from asign.io import read_her2st

    sdata = read_her2st(her2st_path, patient="C", sections=["C1", "C2", "C3"])
    t = sdata.tables["table"]
    measured = t.obsm["spatial"][_rows(t, "C2")]
    _drop_section(sdata, "C2")
    make_spots(sdata, section="C2")
    t = sdata.tables["table"]
    virtual = t.obsm["spatial"][_rows(t, "C2")]
    pitch_px = 200.0 / get_stack(sdata).um_per_px[1]
    print(f"HER2ST C2: {len(virtual)} virtual spots for {len(measured)} measured")
    assert abs(len(virtual) - len(measured)) < 0.1 * len(measured)
    # every measured spot has a virtual spot within one pitch, and vice versa
    assert (cKDTree(virtual).query(measured)[0] < pitch_px).mean() > 0.95
    assert (cKDTree(measured).query(virtual)[0] < pitch_px).mean() > 0.95
    validate_stack(sdata)


def test_spots_laid_after_alignment_warn_and_evaluate_names_unscored_sections(caplog):
    """Virtual spots laid after align_layers have no aligned position (warned); evaluate says that unmeasured
    sections are predicted but not scored."""
    import logging

    from spatialdata.models import Image2DModel
    from spatialdata.transformations import Identity

    import asign
    from asign.pp._tiles import image_level0

    sdata = asign.datasets.synthetic_stack(n_sections=3, n_spots=60, n_genes=6, image_size=512, um_per_px=8.0, seed=0)
    n2w = dict(
        zip(
            sdata.tables["table"].uns["asign"]["stack"]["section"],
            sdata.tables["table"].uns["asign"]["synthetic"]["native_to_world"],
            strict=True,
        )
    )
    asign.pp.align_layers(sdata, method="transforms", transforms=n2w)
    with caplog.at_level(logging.WARNING, logger="asign"):
        rgb = np.asarray(image_level0(sdata.images["he_S3"]).values)
        sdata.images["he_S4"] = Image2DModel.parse(rgb, dims=("c", "y", "x"), transformations={"S4": Identity()})
        asign.pp.make_spots(sdata, section="S4", image_key="he_S4", um_per_px=8.0, z_um=1000.0)
    assert "have no aligned position yet" in caplog.text
    asign.pp.align_layers(sdata, method="transforms", transforms={**n2w, "S4": n2w["S3"]})
    asign.tl.impute(sdata, known=["S1"], method="nearest", show_progress_bar=False)
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="asign"):
        ev = asign.tl.evaluate(sdata)
    assert "Sections ['S4'] have no measured spot" in caplog.text
    assert set(ev[ev.level == "section"].section) == {"S2", "S3"}


def test_make_spots_finds_no_tissue_in_noise(emptied):
    """Otsu's threshold splits pure scanner noise in two: a white image with faint noise got 196 'tissue' spots."""
    import warnings

    img = emptied.images["he_S2"]["scale0"]["image"].values
    noise = (255 - np.random.default_rng(0).integers(0, 4, img.shape)).astype(np.uint8)
    emptied.images["he_S2"] = Image2DModel.parse(
        noise, dims=("c", "y", "x"), scale_factors=[2], transformations={"S2": Identity()}
    )
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no numpy warnings on an image without tissue
        with pytest.raises(ValueError, match="no tissue found in image 'he_S2'"):
            make_spots(emptied, section="S2")
        blank = np.full_like(img, 255)
        emptied.images["he_S2"] = Image2DModel.parse(blank, dims=("c", "y", "x"), transformations={"S2": Identity()})
        with pytest.raises(ValueError, match="no tissue found in image 'he_S2'"):
            make_spots(emptied, section="S2")


def test_make_spots_overlapping_pitch_warns(emptied, asign_log):
    d = float(get_stack(emptied.tables["table"]).spot_diameter_um)
    make_spots(emptied, section="S2", spacing_um=0.8 * d, tissue_threshold=0.95)
    assert "is smaller than the spot diameter" in asign_log.warnings and "overlap" in asign_log.warnings


def test_tissue_mask_of_a_large_single_scale_image_by_block_means(lazy_disk_image):
    """No level <= 2048 px: the mask comes from lazy float32 block means, never from the whole image in float64."""
    import tracemalloc

    import dask

    tissue_mask(lazy_disk_image(4200, 64, 512, (30, 30), 10, []), pixel_um=1.0)  # warm up (imports)
    calls = []
    # 16384 x 256 px at 1 µm/px: a band of tissue from y = 5000 to 11000
    el = lazy_disk_image(16384, 256, 512, (128.0, 8000.0), 3000.0, calls)
    with dask.config.set(scheduler="synchronous"):
        tracemalloc.start()
        try:
            mask, factor = tissue_mask(el, pixel_um=1.0)
            peak = tracemalloc.get_traced_memory()[1]
        finally:
            tracemalloc.stop()
    assert sorted(calls) == sorted(set(calls)) and len(calls) == 32  # every chunk once
    assert peak < el.nbytes / 2, (peak, el.nbytes)  # the level is 12 MiB as uint8 (96 MiB as float64)
    assert factor == 8.0 and mask.shape == (2048, 32)
    ys = np.nonzero(mask.any(axis=1))[0]
    assert abs(ys.min() * factor - 5000) <= factor and abs((ys.max() + 1) * factor - 11000) <= factor
    # min_resolution_um still bounds the mask's pixel size (4 µm: 4 x 4 blocks, a 4096 px mask)
    fine, f4 = tissue_mask(el, pixel_um=1.0, min_resolution_um=4.0)
    assert f4 == 4.0 and fine.shape == (4096, 64)


def test_make_spots_fills_nullable_obs_columns(emptied, asign_log):
    """Nullable extension columns (stack_sections writes Int64 for an integer column some sections lack) crashed
    np.full; they get <NA>, numpy columns keep their documented fill."""
    t = emptied.tables["table"]
    n = t.n_obs
    t.obs["n_int"] = pd.array(np.arange(n), dtype="Int64")
    t.obs["n_float"] = pd.array(np.arange(n) / 2, dtype="Float64")
    t.obs["n_uint8"] = pd.array(np.arange(n) % 7, dtype="UInt8")
    t.obs["n_bool"] = pd.array(np.arange(n) % 2 == 0, dtype="boolean")
    t.obs["n_str"] = pd.array([f"s{i}" for i in range(n)], dtype="string")
    t.obs["np_int"] = np.arange(n, dtype=np.int32)
    t.obs["np_bool"] = np.ones(n, dtype=bool)
    t.obs["np_obj"] = np.array(["a"] * n, dtype=object)
    t.obs["cat"] = pd.Categorical(["x"] * n, categories=["x", "y"])
    t.obs["array_row"] = pd.array(np.arange(n), dtype="Int64")  # grid indices into a nullable column
    before = t.obs.copy()
    make_spots(emptied, section="S2")
    validate_stack(emptied)
    t = emptied.tables["table"]
    m = _rows(t, "S2")
    for c in ("n_int", "n_float", "n_uint8", "n_bool", "n_str", "np_int", "np_bool", "np_obj", "cat", "array_row"):
        assert t.obs[c].dtype == before[c].dtype, c
        pd.testing.assert_series_equal(t.obs.loc[~m, c], before[c], check_names=False)
    for c in ("n_int", "n_float", "n_uint8", "n_bool", "n_str", "cat"):
        assert t.obs.loc[m, c].isna().all(), c
    assert (t.obs.loc[m, "np_int"] == -1).all() and not t.obs.loc[m, "np_bool"].any()
    assert (t.obs.loc[m, "np_obj"] == "").all()
    assert t.obs.loc[m, "array_row"].notna().all() and t.obs.loc[m, "array_row"].min() == 0
    assert "integer obs columns ['np_int']" in asign_log.warnings  # only the numpy integer column is set to -1


def test_make_spots_nullable_column_made_by_stack_sections():
    """The reviewer's case: an integer obs column in one section only becomes Int64 in the stack."""
    from asign.io import Section, stack_sections

    rng = np.random.default_rng(0)
    img = np.full((512, 512, 3), 240, np.uint8)
    img[100:400, 100:400] = 120
    spots, counts = rng.uniform(120, 380, size=(50, 2)), rng.poisson(3, size=(50, 5))
    genes = [f"g{i}" for i in range(5)]
    obs = pd.DataFrame({"cluster": np.arange(50) % 3})
    s1 = Section("S1", spots=spots, counts=counts, genes=genes, image=img, um_per_px=4.0, obs=obs)
    s2 = Section("S2", spots=spots, counts=counts, genes=genes, image=img, um_per_px=4.0)
    sdata = stack_sections([s1, s2], z_um=[0.0, 16.0])
    assert sdata.tables["table"].obs["cluster"].dtype == "Int64"
    sdata.images["he_S3"] = Image2DModel.parse(
        img.transpose(2, 0, 1), dims=("c", "y", "x"), transformations={"S3": Identity()}
    )
    make_spots(sdata, section="S3", um_per_px=4.0, z_um=32.0)
    t = sdata.tables["table"]
    assert _rows(t, "S3").sum() > 10 and t.obs.loc[_rows(t, "S3"), "cluster"].isna().all()
    assert t.obs["cluster"].dtype == "Int64"


def _image(rgb, **kw):
    return Image2DModel.parse(rgb, dims=("c", "y", "x"), **kw)


@pytest.mark.parametrize(
    ("case", "pattern"),
    [
        ("float32", r"section 'N': image 'he_N' has dtype float32; convert it to uint8 RGB"),
        ("rgba", r"section 'N': image 'he_N' must be RGB \(c, y, x\) with 3 channels, got \{'c': 4"),
        ("grey", r"section 'N': image 'he_N' must be RGB \(c, y, x\) with 3 channels, got \{'c': 1"),
        ("scaled", r"section 'N': image 'he_N' has a transformation to the section's native coordinate system 'N' "),
        ("z_nan", r"New section 'N': `z_um` must be a finite number, got nan"),
    ],
)
def test_make_spots_checks_a_new_section_before_changing_sdata(small_stack, case, pattern):
    """A bad image or z of a new section was caught only by the final validation, after sdata had changed."""
    from spatialdata.transformations import Scale

    rgb = small_stack.images["he_S2"]["scale0"]["image"].values
    z = 24.0
    tf = {"N": Identity()}
    if case == "float32":
        rgb = rgb.astype(np.float32)
    elif case == "rgba":
        rgb = np.concatenate([rgb, np.full_like(rgb[:1], 255)])
    elif case == "grey":
        rgb = rgb[:1]
    elif case == "scaled":
        tf = {"N": Scale([2.0, 2.0], axes=("y", "x"))}
    else:
        z = float("nan")
    small_stack.images["he_N"] = _image(rgb, transformations=tf)
    table, shapes, image = small_stack.tables["table"], dict(small_stack.shapes), small_stack.images["he_N"]
    with pytest.raises(ValueError, match=pattern):
        make_spots(small_stack, section="N", um_per_px=UM_PER_PX, z_um=z)
    assert small_stack.tables["table"] is table and dict(small_stack.shapes) == shapes
    assert small_stack.images["he_N"] is image
    validate_stack(small_stack)


def test_make_spots_checks_the_image_of_an_empty_section_first(emptied):
    """The same checks for a manifest section without spots (validate_stack skips a section allowed empty)."""
    table = emptied.tables["table"]
    rgb = emptied.images["he_S2"]["scale0"]["image"].values
    emptied.images["he_S2"] = _image(rgb.astype(np.float32), transformations={"S2": Identity()})
    with pytest.raises(ValueError, match=r"(?s)make_spots cannot use image 'he_S2' of section 'S2'.*dtype float32"):
        make_spots(emptied, section="S2")
    emptied.images["he_S2"] = _image(rgb, transformations={"global": Identity()})
    with pytest.raises(ValueError, match=r"image 'he_S2' has no transformation to the section's native coordinate"):
        make_spots(emptied, section="S2")
    assert emptied.tables["table"] is table and "spots_S2" not in emptied.shapes


@pytest.mark.parametrize("threshold", [200, 1.5, 0.0, -0.1])
def test_make_spots_tissue_threshold_on_the_0_1_scale(emptied, threshold):
    """200 (a 0-255 value) made every pixel, glass included, tissue."""
    with pytest.raises(ValueError, match=r"`tissue_threshold` must be in \(0, 1\].*0-1 scale .*not 0-255"):
        make_spots(emptied, section="S2", tissue_threshold=threshold)
    with pytest.raises(ValueError, match=r"`tissue_threshold` must be in \(0, 1\]"):
        tissue_mask(emptied.images["he_S2"], pixel_um=UM_PER_PX, tissue_threshold=threshold)
    assert "spots_S2" not in emptied.shapes


@pytest.mark.parametrize("order", [("S2", "S3"), ("S3", "S2")])
def test_make_spots_fills_two_empty_sections_in_either_order(small_stack, asign_log, order):
    """Each call's validation complained about the other empty section: two image-only sections were a dead end."""
    _drop_section(small_stack, "S2")
    _drop_section(small_stack, "S3")
    first, second = order
    make_spots(small_stack, section=first)
    assert f"Sections [{second!r}] still have an image and no spots" in asign_log.warnings
    t = small_stack.tables["table"]
    assert _rows(t, first).sum() > 10 and _rows(t, second).sum() == 0
    validate_stack(small_stack, allow_empty=[second])
    with pytest.raises(ValueError, match=f"section {second!r}: has zero spots"):
        validate_stack(small_stack)
    asign_log.records.clear()
    make_spots(small_stack, section=second)
    assert "still have an image and no spots" not in asign_log.warnings
    stack = validate_stack(small_stack, require_images=True)
    t = small_stack.tables["table"]
    assert list(t.obs["section"].astype(str).drop_duplicates()) == stack.sections == ["S1", "S2", "S3"]
    assert _rows(t, "S2").sum() > 10 and _rows(t, "S3").sum() > 10


def test_make_spots_ignores_black_padding(emptied):
    """The optical density of black padding (the corners of a rotated scan) made it tissue."""
    rgb = emptied.images["he_S2"]["scale0"]["image"].values.copy()
    clean, _ = tissue_mask(emptied.images["he_S2"], pixel_um=UM_PER_PX)
    yy, xx = np.mgrid[0:512, 0:512]
    corner = (xx + yy) < 120
    assert not clean[corner].any()  # glass there
    rgb[:, corner] = np.uint8(3)  # near-black, as a scanner's padding
    emptied.images["he_S2"] = _image(rgb, transformations={"S2": Identity()})
    mask, factor = tissue_mask(emptied.images["he_S2"], pixel_um=UM_PER_PX)
    assert factor == 1.0 and not mask[corner].any()
    assert (mask != clean).mean() < 0.01  # the tissue is found as without the padding
    manual, _ = tissue_mask(emptied.images["he_S2"], pixel_um=UM_PER_PX, tissue_threshold=0.9)
    assert not manual[corner].any()
    make_spots(emptied, section="S2")
    t = emptied.tables["table"]
    xy = t.obsm["spatial"][_rows(t, "S2")]
    assert len(xy) > 10 and not corner[xy[:, 1].astype(int), xy[:, 0].astype(int)].any()


@pytest.fixture(scope="module")
def _four_sections():
    from asign.datasets import synthetic_stack

    return synthetic_stack(n_sections=4, n_spots=60, n_genes=20, image_size=512, um_per_px=8.0, seed=0)


@pytest.fixture
def three_empty(_four_sections):
    """4 sections: S1 measured, S2, S3 and S4 with an image and no spots (a deep copy per test)."""
    import copy

    sdata = copy.deepcopy(_four_sections)
    for s in ("S2", "S3", "S4"):
        _drop_section(sdata, s)
    return sdata


def _assert_same_stack(a, b, sections):
    """Same spots (shapes), same table (obs_names, obs, obsm, X, layers), same manifest and make_spots records."""
    assert list(a.shapes) == list(b.shapes)
    for s in sections:
        sa, sb = a.shapes[f"spots_{s}"], b.shapes[f"spots_{s}"]
        assert sa.shape == sb.shape
        np.testing.assert_array_equal(
            np.column_stack([sa.geometry.x, sa.geometry.y]), np.column_stack([sb.geometry.x, sb.geometry.y])
        )
        np.testing.assert_array_equal(sa["radius"], sb["radius"])
        assert get_transformation(sa, get_all=True) == get_transformation(sb, get_all=True)
    ta, tb = a.tables["table"], b.tables["table"]
    assert list(ta.obs_names) == list(tb.obs_names)
    pd.testing.assert_frame_equal(ta.obs, tb.obs)
    assert list(ta.obsm) == list(tb.obsm)
    for k in ta.obsm:
        np.testing.assert_array_equal(np.asarray(ta.obsm[k]), np.asarray(tb.obsm[k]))
    assert (ta.X != tb.X).nnz == 0
    assert list(ta.layers) == list(tb.layers)
    for k in ta.layers:
        la, lb = ta.layers[k], tb.layers[k]
        np.testing.assert_array_equal(la.toarray() if sp.issparse(la) else la, lb.toarray() if sp.issparse(lb) else lb)
    ua, ub = ta.uns["asign"], tb.uns["asign"]
    assert list(ua["make_spots"].items()) == list(ub["make_spots"].items())  # same records, same order
    assert get_stack(ta).sections == get_stack(tb).sections
    assert set(a.images) == set(b.images)


def test_make_spots_several_sections_equal_one_call_each(three_empty, asign_log):
    """section=[...] gives the table, shapes and records of one call per section, in the order given."""
    import copy

    order = ["S4", "S2", "S3"]  # not the cutting order
    one_by_one = copy.deepcopy(three_empty)
    for s in order:
        make_spots(one_by_one, section=s, grid="hex", spacing_um=250.0, tissue_threshold=0.9)
    out = make_spots(three_empty, section=order, grid="hex", spacing_um=250.0, tissue_threshold=0.9, inplace=False)
    assert "spots_S2" not in three_empty.shapes and three_empty.tables["table"].n_obs < out.tables["table"].n_obs
    _assert_same_stack(out, one_by_one, order)
    asign_log.records.clear()
    assert make_spots(three_empty, section=tuple(order), grid="hex", spacing_um=250.0, tissue_threshold=0.9) is None
    _assert_same_stack(three_empty, one_by_one, order)
    stack = validate_stack(three_empty, require_images=True)
    t = three_empty.tables["table"]
    assert list(t.obs["section"].astype(str).drop_duplicates()) == stack.sections == ["S1", "S2", "S3", "S4"]
    assert list(t.uns["asign"]["make_spots"]) == order
    assert all(_rows(t, s).sum() > 10 for s in order)
    # every section filled: no section is left empty, so no warning says so
    assert "still have an image and no spots" not in asign_log.warnings


def test_make_spots_several_sections_warn_once(three_empty, asign_log):
    """The still-empty warning names only the sections this call leaves empty; the aligned-position and other-table
    warnings come once per call, naming every section filled."""
    import anndata as ad

    t = three_empty.tables["table"]
    t.obsm["spatial_aligned"] = np.asarray(t.obsm["spatial"], dtype=float).copy()  # as align_layers writes
    three_empty.tables["other"] = ad.AnnData(np.zeros((2, 1), dtype=np.float32))
    make_spots(three_empty, section=["S2", "S3"], tissue_threshold=0.9)
    warnings = asign_log.warnings
    assert "Sections ['S4'] still have an image and no spots" in warnings
    assert warnings.count("still have an image and no spots") == 1
    assert warnings.count("have no aligned position yet") == 1
    assert "The new spots of sections ['S2', 'S3'] have no aligned position yet" in warnings
    assert warnings.count("do not cover the new spots") == 1
    assert "Tables ['other'] do not cover the new spots of sections ['S2', 'S3']" in warnings
    validate_stack(three_empty, allow_empty=["S4"])


def _snapshot(sdata):
    import copy

    t = sdata.tables["table"]
    return t, dict(sdata.shapes), dict(sdata.images), copy.deepcopy(t.uns["asign"])


@pytest.mark.parametrize("case", ["no_tissue", "float32", "no_image", "pitch", "measured"])
def test_make_spots_error_in_third_section_leaves_sdata_unchanged(three_empty, case):
    """Every listed section is checked (and filled, on a copy) before sdata changes: an error in the third leaves it
    exactly as it was, and names the section."""
    rgb = three_empty.images["he_S4"]["scale0"]["image"].values
    kw: dict = {}
    if case == "no_tissue":  # found only once S2 and S3 have their spots (on the candidate)
        three_empty.images["he_S4"] = _image(np.full_like(rgb, 255), transformations={"S4": Identity()})
        pattern = r"Section 'S4': no tissue found in image 'he_S4'"
    elif case == "float32":
        three_empty.images["he_S4"] = _image(rgb.astype(np.float32), transformations={"S4": Identity()})
        pattern = r"(?s)make_spots cannot use image 'he_S4' of section 'S4'.*dtype float32"
    elif case == "no_image":
        del three_empty.images["he_S4"]
        three_empty.tables["table"].uns["asign"]["stack"]["image_key"] = ["he_S1", "he_S2", "he_S3", ""]
        pattern = "Section 'S4' has no image"
    elif case == "pitch":  # S4's pixels are coarser than the others'
        three_empty.images["he_S4"] = _image(rgb[:, ::4, ::4].copy(), transformations={"S4": Identity()})
        three_empty.tables["table"].uns["asign"]["stack"]["um_per_px"] = np.array([8.0, 8.0, 8.0, 64.0])
        kw = {"spacing_um": 50.0}
        pattern = r"Section 'S4': the pitch spacing_um=50 is smaller than a pixel of image 'he_S4'"
    else:
        pattern = "Section 'S1' has measured spots"
    sections = ["S2", "S3", "S1" if case == "measured" else "S4"]
    before = _snapshot(three_empty)
    obs, n_obs = before[0].obs.copy(), before[0].n_obs
    for inplace in (True, False):
        with pytest.raises(ValueError, match=pattern):
            make_spots(three_empty, section=sections, inplace=inplace, **kw)
        table, shapes, images, uns = _snapshot(three_empty)
        assert table is before[0] and table.n_obs == n_obs
        pd.testing.assert_frame_equal(table.obs, obs)
        assert shapes.keys() == before[1].keys() and all(shapes[k] is v for k, v in before[1].items())
        assert images.keys() == before[2].keys() and all(images[k] is v for k, v in before[2].items())
        assert list(uns) == list(before[3]) and "make_spots" not in uns
    validate_stack(three_empty, allow_empty=["S2", "S3", "S4"])


def test_make_spots_section_list_refusals(three_empty):
    """A list fills manifest sections only, each named once; a new section keeps its own call."""
    table = three_empty.tables["table"]
    with pytest.raises(ValueError, match=r"`image_key`, `um_per_px`, `z_um` describe\(s\) one new section"):
        make_spots(three_empty, section=["S2", "N"], image_key="he_N", um_per_px=UM_PER_PX, z_um=60.0)
    with pytest.raises(ValueError, match=r"`z_um` describe\(s\) one new section.*\['N'\].*its own call"):
        make_spots(three_empty, section=["N"], z_um=60.0)
    with pytest.raises(ValueError, match=r"`section` lists \['S3'\] more than once"):
        make_spots(three_empty, section=["S2", "S3", "S4", "S3"])
    with pytest.raises(ValueError, match=r"Section 'N' is not in the manifest \(sections \['S1', 'S2', 'S3', 'S4'\]\)"):
        make_spots(three_empty, section=["S2", "N"])
    with pytest.raises(ValueError, match="`section` is an empty list"):
        make_spots(three_empty, section=[])
    with pytest.raises(TypeError, match=r"`section` must be a section name or a list of section names, got 3 \(int\)"):
        make_spots(three_empty, section=["S2", 3])
    with pytest.raises(TypeError, match="got set"):
        make_spots(three_empty, section={"S2", "S3"})
    assert three_empty.tables["table"] is table and "spots_S2" not in three_empty.shapes


def test_make_spots_measured_section_while_another_is_empty(emptied):
    """With S2 still empty, asking for S1 (measured) failed validation on the table's section categories instead of
    saying that S1 has measured spots."""
    table = emptied.tables["table"]
    with pytest.raises(ValueError, match="Section 'S1' has measured spots; make_spots never replaces them"):
        make_spots(emptied, section="S1")
    with pytest.raises(ValueError, match="Section 'S1' has measured spots; make_spots never replaces them"):
        make_spots(emptied, section=["S2", "S1"])
    assert emptied.tables["table"] is table and "spots_S2" not in emptied.shapes


def _rekey(sdata, *, instance_key="spot", region_key="reg", prefix="vis_"):
    """The stack with its own key names, as a user may build it: the table parsed with another instance / region
    key and the shapes elements named ``<prefix><section>`` in the manifest."""
    from spatialdata.models import get_table_keys

    t = sdata.tables["table"]
    _, old_region_key, old_instance_key = get_table_keys(t)
    a = t.copy()
    del a.uns["spatialdata_attrs"]
    a.obs = a.obs.rename(columns={old_instance_key: instance_key, old_region_key: region_key})
    rename = {f"spots_{s}": f"{prefix}{s}" for s in a.uns["asign"]["stack"]["section"]}
    a.obs[region_key] = a.obs[region_key].cat.rename_categories(lambda k: rename[str(k)])
    a.uns["asign"]["stack"]["shapes_key"] = [rename[k] for k in a.uns["asign"]["stack"]["shapes_key"]]
    for old, new in rename.items():
        if old in sdata.shapes:
            sdata.shapes[new] = sdata.shapes[old]
            del sdata.shapes[old]
    del sdata.tables["table"]
    sdata.tables["table"] = TableModel.parse(
        a, region=list(a.obs[region_key].cat.categories), region_key=region_key, instance_key=instance_key
    )
    return sdata


def test_make_spots_keeps_the_tables_own_keys(emptied, asign_log):
    """A table parsed with instance_key='spot' (validate_stack accepts it) crashed make_spots with
    IntCastingNaNError after warning that 'spot' was set to -1; the rebuilt table keeps the user's key names and
    the manifest's shapes names."""
    from spatialdata.models import get_table_keys

    _rekey(emptied)
    validate_stack(emptied, allow_empty=["S2"])
    before = emptied.tables["table"].obs.copy()
    make_spots(emptied, section="S2")
    stack = validate_stack(emptied, require_images=True)
    assert stack.shapes_keys == ["vis_S1", "vis_S2", "vis_S3"]
    t = emptied.tables["table"]
    region, region_key, instance_key = get_table_keys(t)
    assert (sorted(region), region_key, instance_key) == (["vis_S1", "vis_S2", "vis_S3"], "reg", "spot")
    assert not {"spot_id", "region"} & set(t.obs.columns)
    assert "vis_S2" in emptied.shapes and "spots_S2" not in emptied.shapes
    m = _rows(t, "S2")
    np.testing.assert_array_equal(t.obs.loc[m, "spot"].to_numpy(), np.arange(int(m.sum())))
    assert t.obs["spot"].dtype == np.int64
    assert (t.obs.loc[m, "reg"].astype(str) == "vis_S2").all()
    pd.testing.assert_series_equal(t.obs.loc[~m, "spot"], before["spot"], check_names=False, check_dtype=False)
    assert "integer obs columns" not in asign_log.warnings  # the instance ids are not "set to -1"


def test_make_spots_string_instance_ids(emptied):
    """Instance ids that are strings (shapes indexed by e.g. barcodes) were cast to int and the result failed
    validation; the new circles get string ids too."""
    t = emptied.tables["table"]
    a = t.copy()
    del a.uns["spatialdata_attrs"]
    a.obs["spot_id"] = [f"bc{i}" for i in a.obs["spot_id"]]
    for s in ("S1", "S3"):
        shapes = emptied.shapes[f"spots_{s}"]
        shapes.index = pd.Index([f"bc{i}" for i in shapes.index])
        emptied.shapes[f"spots_{s}"] = shapes
    del emptied.tables["table"]
    emptied.tables["table"] = TableModel.parse(
        a, region=list(a.obs["region"].cat.categories), region_key="region", instance_key="spot_id"
    )
    validate_stack(emptied, allow_empty=["S2"])
    make_spots(emptied, section="S2")
    validate_stack(emptied)
    t = emptied.tables["table"]
    m = _rows(t, "S2")
    assert t.obs.loc[m, "spot_id"].tolist() == [str(i) for i in range(int(m.sum()))]
    assert t.obs.loc[~m, "spot_id"].tolist() == a.obs["spot_id"].tolist()
    assert emptied.shapes["spots_S2"].index.tolist() == [str(i) for i in range(int(m.sum()))]


def _reparse(sdata, a):
    """Put the AnnData ``a`` (no ``spatialdata_attrs``) back as the table, annotating the shapes its rows name."""
    del sdata.tables["table"]
    sdata.tables["table"] = TableModel.parse(
        a, region=list(a.obs["region"].cat.categories), region_key="region", instance_key="spot_id"
    )


@pytest.mark.parametrize("kind", ["int", "str"])
def test_make_spots_keeps_categorical_instance_ids(emptied, kind):
    """Instance ids stored as a categorical (TableModel and validate_stack accept it) were all cast to strings, so the
    existing ids no longer matched the integer shapes indexes and the final validation failed; the existing ids are
    never rewritten and the new ones are added categories (integers or strings as the shapes indexes are)."""
    a = emptied.tables["table"].copy()
    del a.uns["spatialdata_attrs"]
    if kind == "str":
        a.obs["spot_id"] = [f"bc{i}" for i in a.obs["spot_id"]]
        for s in ("S1", "S3"):
            shapes = emptied.shapes[f"spots_{s}"]
            shapes.index = pd.Index([f"bc{i}" for i in shapes.index])
            emptied.shapes[f"spots_{s}"] = shapes
    a.obs["spot_id"] = a.obs["spot_id"].astype("category")
    _reparse(emptied, a)
    validate_stack(emptied, allow_empty=["S2"])
    before = emptied.tables["table"].obs["spot_id"].copy()
    make_spots(emptied, section="S2")
    make_spots(emptied, section="S2", spacing_um=150.0)  # its virtual spots replaced: the ids of the rows are kept
    validate_stack(emptied)
    t = emptied.tables["table"]
    m = _rows(t, "S2")
    ids = t.obs["spot_id"]
    assert isinstance(ids.dtype, pd.CategoricalDtype)
    assert pd.api.types.is_integer_dtype(ids.cat.categories) == (kind == "int")
    assert ids[~m].tolist() == before.tolist()
    new = list(range(int(m.sum())))
    assert ids[m].tolist() == (new if kind == "int" else [str(i) for i in new])
    assert emptied.shapes["spots_S2"].index.tolist() == ids[m].tolist()


def test_make_spots_unsigned_integer_columns(emptied, asign_log):
    """An unsigned obs column (uint32 instance ids, a user uint16 column) crashed with OverflowError (fill -1): the
    ids keep their dtype, another unsigned column becomes the nullable UInt<k> with <NA> in the new rows."""
    a = emptied.tables["table"].copy()
    del a.uns["spatialdata_attrs"]
    a.obs["spot_id"] = a.obs["spot_id"].astype(np.uint32)
    a.obs["n_cells"] = np.arange(a.n_obs, dtype=np.uint16) % 5
    a.obs["array_row"] = a.obs["array_row"].astype(np.uint32) if "array_row" in a.obs else np.zeros(a.n_obs, np.uint32)
    _reparse(emptied, a)
    validate_stack(emptied, allow_empty=["S2"])
    before = emptied.tables["table"].obs.copy()
    make_spots(emptied, section="S2")
    validate_stack(emptied)
    t = emptied.tables["table"]
    m = _rows(t, "S2")
    assert t.obs["spot_id"].dtype == np.uint32 and t.obs["array_row"].dtype == np.uint32
    np.testing.assert_array_equal(t.obs.loc[m, "spot_id"].to_numpy(), np.arange(int(m.sum())))
    assert t.obs["n_cells"].dtype == "UInt16"
    assert t.obs.loc[m, "n_cells"].isna().all()
    assert t.obs.loc[~m, "n_cells"].tolist() == before["n_cells"].tolist()
    assert t.obs.loc[~m, "spot_id"].tolist() == before["spot_id"].tolist()
    assert "integer obs columns" not in asign_log.warnings
    assert "(numpy signed integer columns, with a warning naming" in " ".join(make_spots.__doc__.split())


def test_make_spots_new_section_never_replaces_a_shapes_element(small_stack):
    """A new section's spots silently replaced an existing shapes element of its name (spots_<section>), the user's
    own or another section's."""
    from spatialdata.models import ShapesModel

    small_stack.images["he_N"] = small_stack.images["he_S3"]
    theirs = ShapesModel.parse(
        np.array([[1.0, 2.0], [3.0, 4.0]]), geometry=0, radius=np.ones(2), transformations={"global": Identity()}
    )
    small_stack.shapes["spots_N"] = theirs
    table = small_stack.tables["table"]
    kw = {"image_key": "he_N", "um_per_px": UM_PER_PX, "z_um": 48.0}
    with pytest.raises(ValueError, match=r"New section 'N': .* sdata.shapes already has an element 'spots_N'"):
        make_spots(small_stack, section="N", **kw)
    assert small_stack.shapes["spots_N"] is theirs and small_stack.tables["table"] is table
    # the manifest gives 'spots_N' to section S3
    del small_stack.shapes["spots_N"]
    a = table.copy()
    del a.uns["spatialdata_attrs"]
    a.obs["region"] = a.obs["region"].cat.rename_categories(lambda k: "spots_N" if k == "spots_S3" else k)
    a.uns["asign"]["stack"]["shapes_key"] = [
        k if k != "spots_S3" else "spots_N" for k in a.uns["asign"]["stack"]["shapes_key"]
    ]
    small_stack.shapes["spots_N"] = small_stack.shapes["spots_S3"]
    del small_stack.shapes["spots_S3"]
    _reparse(small_stack, a)
    validate_stack(small_stack)
    with pytest.raises(
        ValueError, match=r"New section 'N': .* shapes 'spots_N', which the manifest gives to section 'S3'"
    ):
        make_spots(small_stack, section="N", **kw)
    make_spots(small_stack, section="N2", **kw)  # another name is fine
    assert "spots_N2" in small_stack.shapes and len(small_stack.shapes["spots_N"]) == int(
        _rows(small_stack.tables["table"], "S3").sum()
    )
