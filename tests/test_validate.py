"""The section-stack contract check: every malformed input is rejected with a message naming problem and place."""

from __future__ import annotations

import geopandas as gpd
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp
from spatialdata.models import Image2DModel, ShapesModel, TableModel
from spatialdata.transformations import Identity, Scale, set_transformation

from asign.io import Section, StackValidationError, stack_sections, validate_stack


def _table(sdata):
    return sdata.tables["table"]


def _rows(sdata, section):
    return (_table(sdata).obs["section"].astype(str) == section).to_numpy()


def _invalid(sdata, *fragments, **kwargs) -> StackValidationError:
    with pytest.raises(StackValidationError) as info:
        validate_stack(sdata, **kwargs)
    msg = str(info.value)
    for f in fragments:
        assert f in msg, f"{f!r} not in:\n{msg}"
    return info.value


def _drop_section_rows(sdata, section):
    t = _table(sdata)
    keep = t[~_rows(sdata, section)].copy()
    keep.obs["region"] = keep.obs["region"].cat.remove_unused_categories()
    keep.obs["section"] = keep.obs["section"].cat.set_categories(list(t.obs["section"].cat.categories), ordered=True)
    del keep.uns["spatialdata_attrs"]
    del sdata.tables["table"]
    sdata.tables["table"] = TableModel.parse(
        keep, region=list(keep.obs["region"].cat.categories), region_key="region", instance_key="spot_id"
    )


def test_valid_stack_passes(small_stack):
    stack = validate_stack(small_stack)
    assert stack.sections == ["S1", "S2", "S3"]
    assert stack.image_keys == ["he_S1", "he_S2", "he_S3"]
    assert stack.coordinate_systems == ["S1", "S2", "S3"]
    np.testing.assert_allclose(stack.um_per_px, 8.0)
    assert validate_stack(small_stack, require_images=True).n_sections == 3


# --- the table and its manifest


def test_missing_table(small_stack):
    _invalid(small_stack, "table 'counts' not found", table_key="counts")


def test_missing_manifest(small_stack):
    del _table(small_stack).uns["asign"]["stack"]
    _invalid(small_stack, "no section manifest", "uns['asign']['stack']")


def test_manifest_missing_field(small_stack):
    del _table(small_stack).uns["asign"]["stack"]["um_per_px"]
    _invalid(small_stack, "lacks the field(s) ['um_per_px']")


def test_unequal_manifest_lengths(small_stack):
    _table(small_stack).uns["asign"]["stack"]["z_um"] = np.array([0.0, 16.0])
    _invalid(small_stack, "unequal lengths", "'z_um': 2", "'section': 3")


def test_duplicate_section_names(small_stack):
    _table(small_stack).uns["asign"]["stack"]["section"] = ["S1", "S1", "S3"]
    _invalid(small_stack, "duplicate section names ['S1']")


@pytest.mark.parametrize("z", [[0.0, 32.0, 16.0], [0.0, 16.0, 16.0]])
def test_non_increasing_z(small_stack, z):
    _table(small_stack).uns["asign"]["stack"]["z_um"] = np.array(z)
    _invalid(small_stack, "`z_um`", "not strictly increasing")


def test_non_positive_um_per_px(small_stack):
    _table(small_stack).uns["asign"]["stack"]["um_per_px"] = np.array([8.0, 0.0, -1.0])
    _invalid(small_stack, "sections ['S2', 'S3']", "non-positive `um_per_px`")


def test_non_positive_spot_diameter(small_stack):
    _table(small_stack).uns["asign"]["stack"]["spot_diameter_um"] = 0.0
    _invalid(small_stack, "`spot_diameter_um` must be positive")


# --- obs / obsm


def test_duplicate_obs_names(small_stack):
    t = _table(small_stack)
    names = t.obs_names.to_list()
    names[1] = names[0]
    t.obs_names = names
    _invalid(small_stack, "obs_names are not unique", "S1_0")


def test_duplicate_var_names(small_stack):
    """Duplicate gene names passed validation and failed only later, in gene selection."""
    t = _table(small_stack)
    names = t.var_names.to_list()
    names[5] = names[4]
    names[9] = names[8]
    t.var_names = names
    err = _invalid(
        small_stack,
        f"table 'table': var_names are not unique (e.g. {sorted([names[4], names[8]])})",
        "call `table.var_names_make_unique()`",
    )
    assert len(err.problems) == 1
    t.var_names_make_unique()
    validate_stack(small_stack)


def test_section_not_ordered_categorical(small_stack):
    t = _table(small_stack)
    t.obs["section"] = t.obs["section"].astype(str)
    _invalid(small_stack, "obs['section'] must be an ordered categorical")


def test_section_unordered_categorical(small_stack):
    t = _table(small_stack)
    t.obs["section"] = t.obs["section"].cat.as_unordered()
    _invalid(small_stack, "obs['section'] must be an ordered categorical")


def test_unknown_section_order(small_stack):
    t = _table(small_stack)
    t.obs["section"] = t.obs["section"].cat.reorder_categories(["S2", "S1", "S3"], ordered=True)
    _invalid(small_stack, "categories ['S2', 'S1', 'S3']", "differs from the manifest's section order")


def test_spots_of_unknown_section(small_stack):
    t = _table(small_stack)
    sec = t.obs["section"].astype(str).to_numpy()
    sec[sec == "S3"] = "S9"
    t.obs["section"] = pd.Categorical(sec, categories=["S1", "S2", "S9"], ordered=True)
    _invalid(small_stack, "sections ['S9'] that are not in the manifest")


def test_rows_not_grouped_by_section(small_stack):
    t = _table(small_stack)
    s1 = np.where(_rows(small_stack, "S1"))[0]
    order = np.r_[s1[:-1], np.where(~_rows(small_stack, "S1"))[0], s1[-1]]
    small_stack.tables["table"] = t[order].copy()
    _invalid(small_stack, "rows are not grouped by section")


def test_measured_not_boolean(small_stack):
    _table(small_stack).obs["measured"] = 1
    _invalid(small_stack, "obs['measured'] must be boolean")


def test_missing_obs_column(small_stack):
    del _table(small_stack).obs["measured"]
    _invalid(small_stack, "obs columns ['measured'] are missing")


def test_missing_spatial(small_stack):
    del _table(small_stack).obsm["spatial"]
    _invalid(small_stack, "obsm['spatial']", "is missing")


def test_non_finite_spatial(small_stack):
    t = _table(small_stack)
    xy = t.obsm["spatial"].copy()
    xy[np.where(_rows(small_stack, "S3"))[0][0]] = np.nan
    t.obsm["spatial"] = xy
    _invalid(small_stack, "non-finite coordinates in sections ['S3']")


def test_spatial_differs_from_shapes(small_stack):
    t = _table(small_stack)
    xy = t.obsm["spatial"].copy()
    xy[_rows(small_stack, "S2")] += 3.0
    t.obsm["spatial"] = xy
    _invalid(small_stack, "section 'S2'", "differs from the centres of shapes 'spots_S2'")


# --- counts


def test_nan_counts(small_stack):
    t = _table(small_stack)
    X = t.X.tocsr().copy()
    row = np.where(_rows(small_stack, "S2"))[0][3]
    X[row, 0] = np.nan
    t.X = X
    _invalid(small_stack, "NaN/inf in sections ['S2']")


def test_negative_counts(small_stack):
    t = _table(small_stack)
    X = t.X.toarray()
    X[np.where(_rows(small_stack, "S3"))[0][:2], 1] = -2
    t.X = sp.csr_matrix(X)
    _invalid(small_stack, "negative values in sections ['S3']", "raw counts")


def test_counts_layer_is_checked(small_stack):
    t = _table(small_stack)
    lay = t.X.toarray()
    lay[0, 0] = -1
    t.layers["counts"] = lay
    _invalid(small_stack, "counts in layers['counts']", "sections ['S1']")
    validate_stack(small_stack, check_counts=False)


def test_normalised_counts_warn(small_stack, caplog):
    import logging

    t = _table(small_stack)
    with caplog.at_level(logging.WARNING, logger="asign"):
        validate_stack(small_stack)  # the synthetic counts are integers: no warning
    assert "not integers" not in caplog.text
    raw = t.X.copy()
    t.X = raw.log1p()  # sparse, log1p-transformed
    with caplog.at_level(logging.WARNING, logger="asign"):
        validate_stack(small_stack)  # a warning, not an error
    assert "table 'table': counts in .X are not integers" in caplog.text and "raw counts" in caplog.text
    caplog.clear()
    t.X = raw
    t.layers["counts"] = np.log1p(raw.toarray())  # dense layer: checked instead of .X
    with caplog.at_level(logging.WARNING, logger="asign"):
        validate_stack(small_stack)
    assert "counts in layers['counts'] are not integers" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="asign"):
        validate_stack(small_stack, check_counts=False)
    assert "not integers" not in caplog.text


# --- table annotation and shapes


def test_table_not_annotating_a_section(small_stack):
    _table(small_stack).uns["spatialdata_attrs"]["region"] = ["spots_S1", "spots_S3"]
    _invalid(small_stack, "section 'S2'", "does not annotate shapes 'spots_S2'")


def test_table_not_parsed(small_stack):
    del _table(small_stack).uns["spatialdata_attrs"]
    _invalid(small_stack, "not parsed with TableModel")


def test_rows_annotate_wrong_region(small_stack):
    t = _table(small_stack)
    reg = t.obs["region"].astype(str).to_numpy()
    reg[np.where(_rows(small_stack, "S2"))[0][0]] = "spots_S3"
    t.obs["region"] = pd.Categorical(reg, categories=t.obs["region"].cat.categories)
    _invalid(small_stack, "section 'S2'", "annotate ['spots_S2', 'spots_S3'] instead of 'spots_S2'")


def test_missing_shapes(small_stack):
    del small_stack.shapes["spots_S3"]
    _invalid(small_stack, "section 'S3'", "shapes element 'spots_S3'", "missing from sdata.shapes")


def test_shapes_not_circles(small_stack):
    old = small_stack.shapes["spots_S2"]
    poly = gpd.GeoDataFrame(geometry=old.geometry.buffer(4.0), index=old.index)
    small_stack.shapes["spots_S2"] = ShapesModel.parse(poly, transformations={"S2": Identity()})
    _invalid(small_stack, "section 'S2'", "shapes 'spots_S2' are not circles")


def test_mismatched_instance_ids(small_stack):
    t = _table(small_stack)
    ids = t.obs["spot_id"].to_numpy().copy()
    m = _rows(small_stack, "S2")
    ids[m] = ids[m][::-1]
    t.obs["spot_id"] = ids
    _invalid(small_stack, "section 'S2'", "obs['spot_id'] does not match the index of shapes 'spots_S2'")


def test_zero_spots_in_a_section(small_stack):
    _drop_section_rows(small_stack, "S2")
    _invalid(small_stack, "section 'S2': has zero spots", "asign.pp.make_spots")
    # make_spots may ask for an empty section explicitly
    validate_stack(small_stack, allow_empty=["S2"])


def test_shapes_without_native_transformation(small_stack):
    set_transformation(small_stack.shapes["spots_S1"], {"global": Identity()}, set_all=True)
    _invalid(small_stack, "section 'S1'", "shapes 'spots_S1' have no transformation", "'S1'")


# --- images


def test_missing_image_listed_in_manifest(small_stack):
    del small_stack.images["he_S2"]
    _invalid(small_stack, "section 'S2'", "image 'he_S2' listed in the manifest is missing")


def _replace_image(sdata, key, arr, cs):
    sdata.images[key] = Image2DModel.parse(arr, dims=("c", "y", "x"), transformations={cs: Identity()})


@pytest.mark.parametrize("channels", [4, 1])
def test_non_rgb_image(small_stack, channels):
    _replace_image(small_stack, "he_S3", np.full((channels, 512, 512), 200, dtype=np.uint8), "S3")
    _invalid(small_stack, "section 'S3'", "image 'he_S3' must be RGB", "3 channels")


def test_16bit_image(small_stack):
    _replace_image(small_stack, "he_S1", np.full((3, 512, 512), 40000, dtype=np.uint16), "S1")
    _invalid(small_stack, "section 'S1'", "image 'he_S1' has dtype uint16", "uint8")


def test_spots_outside_the_image(small_stack):
    small_img = small_stack.images["he_S2"]["scale1"]["image"].values  # 256 px: the spots no longer fit
    _replace_image(small_stack, "he_S2", small_img, "S2")
    _invalid(small_stack, "section 'S2'", "spot centres lie outside image 'he_S2' (256 x 256 px)")


def test_image_in_another_pixel_frame(small_stack):
    set_transformation(small_stack.images["he_S3"], {"S3": Scale([2.0, 2.0], axes=("y", "x"))}, set_all=True)
    _invalid(small_stack, "section 'S3'", "image 'he_S3' and shapes 'spots_S3' are not in the same pixel frame")


def test_native_transformation_must_be_identity(small_stack):
    """Registration works in the image's own pixels: another native map would misplace the section."""
    from spatialdata.transformations import Translation

    for key in ("he_S2", "spots_S2"):
        set_transformation(small_stack[key], Translation([100.0, 50.0], axes=("x", "y")), to_coordinate_system="S2")
    _invalid(small_stack, "section 'S2'", "shapes 'spots_S2'", "not Identity", "Identity() to 'S2'")


def test_image_without_native_transformation(small_stack):
    set_transformation(small_stack.images["he_S3"], {"global": Identity()}, set_all=True)
    _invalid(small_stack, "image 'he_S3' has no transformation to the section's native coordinate system 'S3'")


def test_require_images(small_stack):
    del small_stack.images["he_S2"]
    small_stack.tables["table"].uns["asign"]["stack"]["image_key"] = ["he_S1", "", "he_S3"]
    validate_stack(small_stack)  # a section may have no image ...
    _invalid(small_stack, "section 'S2': has no image, but this step needs one", require_images=["S2"])
    _invalid(small_stack, "section 'S2': has no image", require_images=True)
    validate_stack(small_stack, require_images=["S1", "S3"])


def test_every_problem_reported_at_once(small_stack):
    t = _table(small_stack)
    t.obs["measured"] = 0
    del small_stack.images["he_S1"]
    _table(small_stack).uns["asign"]["stack"]["um_per_px"] = np.array([8.0, 8.0, 0.0])
    err = _invalid(
        small_stack,
        "obs['measured'] must be boolean",
        "section 'S1': image 'he_S1' listed in the manifest is missing",
        "sections ['S3'] have a non-positive `um_per_px`",
    )
    assert len(err.problems) == 3
    assert isinstance(err, ValueError)


# --- stack_sections input errors


def _section(name="A", n=5, n_genes=3, **kw):
    rng = np.random.default_rng(0)
    defaults = {
        "spots": rng.uniform(10, 90, (n, 2)),
        "counts": rng.poisson(2, (n, n_genes)),
        "genes": [f"g{i}" for i in range(n_genes)],
        "image": np.full((100, 100, 3), 230, dtype=np.uint8),
        "um_per_px": 1.0,
    }
    return Section(name=name, **{**defaults, **kw})


def test_stack_sections_minimal():
    sdata = stack_sections([_section("A"), _section("B", n=4)], spot_diameter_um=10.0)
    stack = validate_stack(sdata)
    assert stack.sections == ["A", "B"]
    np.testing.assert_allclose(stack.z_um, [0.0, 16.0])
    assert sdata.shapes["spots_A"]["radius"].iloc[0] == pytest.approx(5.0)


def test_stack_sections_duplicate_names():
    with pytest.raises(ValueError, match=r"Duplicate section names \['A'\]"):
        stack_sections([_section("A"), _section("A")])


def test_stack_sections_counts_rows_differ_from_spots():
    with pytest.raises(ValueError, match="Section 'B': counts have 6 rows for 5 spots"):
        stack_sections([_section("A"), _section("B", counts=np.ones((6, 3)))])


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"genes": None}, "`genes` must name its columns"),
        ({"genes": ["g0", "g1"]}, "counts have 3 columns for 2 genes"),
        ({"genes": ["g0", "g0", "g1"]}, r"duplicate gene names \['g0'\]"),
        ({"spots": np.zeros((5, 3))}, r"`spots` must be an \(n, 2\) array"),
        ({"spots": np.zeros((0, 2)), "counts": None}, "has no spots"),
        ({"um_per_px": None}, "`um_per_px` must be a positive pixel size"),
        ({"image": np.zeros((100, 100, 4), dtype=np.uint8)}, r"3 \(RGB\) channels"),
        ({"image": np.zeros((100, 100), dtype=np.uint8)}, "image must be RGB"),
        ({"image": np.zeros((100, 100, 3), dtype=np.uint16)}, "convert it to uint8"),
        ({"spot_ids": ["a", "a", "b", "c", "d"]}, "spot ids are not unique"),
        ({"obs": pd.DataFrame({"x": [1, 2]})}, "`obs` has 2 rows for 5 spots"),
    ],
)
def test_stack_sections_bad_section(kwargs, message):
    with pytest.raises(ValueError, match=message):
        stack_sections([_section("A"), _section("B", **kwargs)])


def test_stack_sections_bad_name():
    with pytest.raises(ValueError, match="not a valid element name"):
        stack_sections([_section("A b")])


def test_stack_sections_bad_z():
    with pytest.raises(
        ValueError, match=r"`z_um` must be a sequence of one z position \(µm\) per section: 2 values, got 1"
    ):
        stack_sections([_section("A"), _section("B")], z_um=[0.0])
    with pytest.raises(ValueError, match="must increase in cutting order"):
        stack_sections([_section("A"), _section("B")], z_um=[10.0, 5.0])


def test_stack_sections_spots_outside_image():
    s = _section("A", spots=np.array([[10.0, 10.0], [150.0, 20.0]]), counts=np.ones((2, 3)))
    with pytest.raises(StackValidationError, match="1 spot centres lie outside image 'he_A'"):
        stack_sections([s])


def test_stack_sections_rejects_other_inputs():
    with pytest.raises(TypeError, match="pass asign.io.Section or spatialdata.SpatialData"):
        stack_sections([{"name": "A"}])
    with pytest.raises(ValueError, match="at least one section"):
        stack_sections([])
