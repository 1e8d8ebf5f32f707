"""The stack builder and the contract's round trip through a zarr store."""

from __future__ import annotations

import dask.array as da
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp
from anndata import AnnData
from spatialdata import SpatialData, read_zarr
from spatialdata.models import Image2DModel, ShapesModel, TableModel
from spatialdata.transformations import Identity, Scale, get_transformation

from asign._stack import get_stack, section_masks
from asign.io import Section, stack_sections, validate_stack


def _level0(image):
    return next(iter(image["scale0"].values())) if "scale0" in getattr(image, "children", {}) else image


def _affine(t):
    return t.to_affine_matrix(input_axes=("x", "y"), output_axes=("x", "y"))


# --- round trip


def test_contract_round_trips_through_zarr(small_stack, tmp_path):
    path = tmp_path / "stack.zarr"
    small_stack.write(path)
    back = read_zarr(path)
    validate_stack(back)
    a, b = small_stack.tables["table"], back.tables["table"]
    # table: counts, obs, obsm, manifest
    assert sp.issparse(b.X)
    assert b.X.dtype == np.float32
    np.testing.assert_array_equal(a.X.toarray(), b.X.toarray())
    pd.testing.assert_frame_equal(a.obs, b.obs)
    pd.testing.assert_frame_equal(a.var, b.var)
    assert b.obs["section"].cat.ordered
    assert set(a.obsm) == set(b.obsm)
    for k in a.obsm:
        np.testing.assert_array_equal(a.obsm[k], b.obsm[k])
    ma, mb = a.uns["asign"]["stack"], b.uns["asign"]["stack"]
    assert set(ma) == set(mb)
    for k in ma:
        np.testing.assert_array_equal(np.asarray(ma[k]), np.asarray(mb[k]))
    sa, sb = get_stack(small_stack), get_stack(back)
    assert sa.sections == sb.sections and sa.image_keys == sb.image_keys and sa.shapes_keys == sb.shapes_keys
    np.testing.assert_array_equal(sa.z_um, sb.z_um)
    syn_a, syn_b = a.uns["asign"]["synthetic"], b.uns["asign"]["synthetic"]
    np.testing.assert_array_equal(syn_a["native_to_world"], syn_b["native_to_world"])
    # shapes: centres, radius, index, transformations
    for key in small_stack.shapes:
        sa_, sb_ = small_stack.shapes[key], back.shapes[key]
        np.testing.assert_array_equal(sa_.index.to_numpy(), sb_.index.to_numpy())
        np.testing.assert_allclose(sa_.geometry.x, sb_.geometry.x)
        np.testing.assert_allclose(sa_.geometry.y, sb_.geometry.y)
        np.testing.assert_allclose(sa_["radius"], sb_["radius"])
        ta, tb = get_transformation(sa_, get_all=True), get_transformation(sb_, get_all=True)
        assert set(ta) == set(tb)
        for cs in ta:
            np.testing.assert_allclose(_affine(ta[cs]), _affine(tb[cs]))
    # images: every pyramid level, pixel for pixel, and transformations
    for key in small_stack.images:
        ia, ib = small_stack.images[key], back.images[key]
        assert list(ia.children) == list(ib.children)
        for level in ia.children:
            va = next(iter(ia[level].values()))
            vb = next(iter(ib[level].values()))
            assert vb.dtype == np.uint8
            np.testing.assert_array_equal(va.values, vb.values)
        ta, tb = get_transformation(ia, get_all=True), get_transformation(ib, get_all=True)
        assert set(ta) == set(tb) == {key.removeprefix("he_")}


# --- in-memory sections


def test_sections_with_different_genes_and_no_counts():
    img = np.full((64, 64, 3), 220, dtype=np.uint8)
    a = Section(
        name="A",
        spots=[[10, 10], [20, 30]],
        counts=np.array([[1, 2], [3, 4]]),
        genes=["g1", "g2"],
        image=img,
        um_per_px=2.0,
    )
    b_counts = AnnData(X=sp.csr_matrix(np.array([[5.0, 6.0]])), var=pd.DataFrame(index=["g2", "g3"]))
    b = Section(name="B", spots=[[5, 5]], counts=b_counts, image=None, um_per_px=2.0, spot_ids=["x7"])
    c = Section(name="C", spots=[[1, 1], [2, 2]], counts=None, image=img, um_per_px=2.0)
    sdata = stack_sections([a, b, c], spot_diameter_um=8.0, z_um=[0.0, 10.0, 30.0])
    t = sdata.tables["table"]
    assert list(t.var_names) == ["g1", "g2", "g3"]
    np.testing.assert_array_equal(t.X.toarray(), [[1, 2, 0], [3, 4, 0], [0, 5, 6], [0, 0, 0], [0, 0, 0]])
    np.testing.assert_array_equal(t.var["n_sections_measured"], [1, 2, 1])
    assert list(t.obs_names) == ["A_0", "A_1", "B_x7", "C_0", "C_1"]
    np.testing.assert_array_equal(t.obs["measured"], [True, True, True, False, False])
    assert t.obs["measured"].dtype == bool
    np.testing.assert_array_equal(t.obs["spot_id"], [0, 1, 0, 0, 1])
    stack = get_stack(sdata)
    assert stack.image_keys == ["he_A", None, "he_C"]
    assert t.uns["asign"]["stack"]["image_key"] == ["he_A", "", "he_C"]
    np.testing.assert_allclose(stack.z_um, [0.0, 10.0, 30.0])
    assert sdata.shapes["spots_A"]["radius"].iloc[0] == pytest.approx(2.0)  # 8 µm / 2 / 2 µm/px
    masks = section_masks(t)
    assert [int(m.sum()) for m in masks.values()] == [2, 1, 2]


def test_image_inputs_are_parsed_lazily_and_retargeted(small_stack):
    arr = da.from_array(np.full((3, 600, 700), 200, dtype=np.uint8), chunks=(3, 256, 256))
    tree = small_stack.images["he_S1"]  # an already parsed image, to the coordinate system "S1"
    sdata = stack_sections(
        [
            Section(name="X", spots=[[100.0, 100.0]], counts=None, image=arr, um_per_px=1.0),
            Section(name="Y", spots=[[100.0, 100.0]], counts=None, image=tree, um_per_px=8.0),
        ],
        spot_diameter_um=10.0,
    )
    x = sdata.images["he_X"]
    assert list(x.children) == ["scale0", "scale1"]  # 600 -> 300 -> (150 < 256: dropped)
    assert isinstance(_level0(x).data, da.Array)
    y = sdata.images["he_Y"]
    assert set(get_transformation(y, get_all=True)) == {"Y"}
    assert set(get_transformation(tree, get_all=True)) == {"S1"}  # the input is left untouched
    np.testing.assert_array_equal(_level0(y).values, _level0(tree).values)
    validate_stack(sdata, require_images=True)


# --- per-section SpatialData objects (spatialdata-io's Visium layout)


def _visium_like(seed: int, *, fullres: bool = True) -> tuple[SpatialData, np.ndarray]:
    """A section shaped like spatialdata-io's Visium reader output: full-res + hires images, circles, table."""
    rng = np.random.default_rng(seed)
    n, size, scalef = 12, 400, 0.25
    xy = rng.uniform(40, size - 40, (n, 2)).round()
    full = np.full((3, size, size), 235, dtype=np.uint8)
    for x, y in xy.astype(int):  # a dark dot under every spot
        full[:, y - 6 : y + 7, x - 6 : x + 7] = 30
    hires = full.reshape(3, size // 4, 4, size // 4, 4).mean(axis=(2, 4)).astype(np.uint8)
    name = f"vis{seed}"
    images = {
        f"{name}_hires_image": Image2DModel.parse(
            hires, dims=("c", "y", "x"), transformations={"global": Scale([1 / scalef, 1 / scalef], axes=("y", "x"))}
        )
    }
    if fullres:
        images[f"{name}_full_image"] = Image2DModel.parse(
            full, dims=("c", "y", "x"), scale_factors=[2], transformations={"global": Identity()}
        )
    barcodes = [f"AAAC{seed}{i:03d}-1" for i in range(n)]
    shapes = ShapesModel.parse(
        xy, geometry=0, radius=np.full(n, 10.0), index=pd.RangeIndex(n), transformations={"global": Identity()}
    )
    counts = rng.poisson(3, (n, 4)).astype(np.float32)
    rev = np.arange(n)[::-1]  # table rows in another order than the shapes
    obs = pd.DataFrame(
        {
            "in_tissue": np.ones(n, dtype=int),
            "array_row": rev,
            "region": pd.Categorical([name] * n),
            "spot_id": rev,
        },
        index=[barcodes[i] for i in rev],
    )
    adata = AnnData(X=sp.csr_matrix(counts[rev]), obs=obs, var=pd.DataFrame(index=list("ABCD")))
    adata.obsm["spatial"] = xy[::-1]
    table = TableModel.parse(adata, region=name, region_key="region", instance_key="spot_id")
    sdata = SpatialData(images=images, shapes={name: shapes}, tables={"table": table})
    return sdata, counts


def test_stack_sections_from_visium_like_spatialdata():
    (s1, c1), (s2, c2) = _visium_like(1), _visium_like(2)
    sdata = stack_sections([s1, s2], names=["V1", "V2"], spot_diameter_um=55.0)
    stack = validate_stack(sdata, require_images=True)
    assert stack.sections == ["V1", "V2"]
    t = sdata.tables["table"]
    # the full-resolution image is chosen; spots land on their dark dots
    for sec, src in (("V1", s1), ("V2", s2)):
        m = (t.obs["section"] == sec).to_numpy()
        xy = t.obsm["spatial"][m]
        orig = src.shapes[next(iter(src.shapes))]
        np.testing.assert_allclose(xy, np.column_stack([orig.geometry.x, orig.geometry.y]))
        img = _level0(sdata.images[f"he_{sec}"]).values
        assert img.shape == (3, 400, 400)
        assert (img[:, xy[:, 1].astype(int), xy[:, 0].astype(int)] == 30).all()
        assert set(get_transformation(sdata.images[f"he_{sec}"], get_all=True)) == {sec}
    # counts follow the shapes order although the input table rows were reversed
    np.testing.assert_array_equal(t.X.toarray()[t.obs["section"] == "V1"], c1)
    np.testing.assert_array_equal(t.X.toarray()[t.obs["section"] == "V2"], c2)
    assert t.obs_names[0] == "V1_AAAC1000-1"
    assert "in_tissue" in t.obs and "array_row" in t.obs
    # pixel size from the circles: 55 µm / 20 px
    np.testing.assert_allclose(stack.um_per_px, 55.0 / 20.0)


def test_stack_sections_from_spatialdata_chosen_image():
    (s1, _), (s2, _) = _visium_like(1), _visium_like(2, fullres=False)
    sdata = stack_sections([s1, s2], names=["V1", "V2"], image_key=["vis1_hires_image", None], spot_diameter_um=55.0)
    t = sdata.tables["table"]
    stack = get_stack(sdata)
    for sec, src in (("V1", s1), ("V2", s2)):
        xy = t.obsm["spatial"][(t.obs["section"] == sec).to_numpy()]
        orig = src.shapes[next(iter(src.shapes))]
        np.testing.assert_allclose(xy, 0.25 * np.column_stack([orig.geometry.x, orig.geometry.y]))
        img = _level0(sdata.images[f"he_{sec}"]).values
        assert img.shape == (3, 100, 100)
        # each spot sits on its (downsampled) dark dot
        assert (img[:, np.floor(xy[:, 1]).astype(int), np.floor(xy[:, 0]).astype(int)] < 100).all()
    np.testing.assert_allclose(stack.um_per_px, 55.0 / 5.0)  # radius 10 full-res px = 2.5 hires px
    np.testing.assert_allclose(sdata.shapes["spots_V1"]["radius"], 2.5)


def test_stack_sections_from_spatialdata_errors():
    s1, _ = _visium_like(1)
    with pytest.raises(KeyError, match="image 'nope' not found"):
        stack_sections([s1], image_key="nope")
    with pytest.raises(ValueError, match="Duplicate section names"):
        stack_sections([s1, _visium_like(2)[0]], names=["V", "V"])
    with pytest.raises(ValueError, match="`names` has 1 values for 2 sections"):
        stack_sections([s1, _visium_like(2)[0]], names=["V"])
    two = SpatialData(shapes={"a": s1.shapes["vis1"], "b": s1.shapes["vis1"]})
    with pytest.raises(ValueError, match="exactly one circles shapes element"):
        stack_sections([two])
    no_table = SpatialData(shapes={"vis1": s1.shapes["vis1"]})
    with pytest.raises(ValueError, match="Expected one table annotating shapes 'vis1'"):
        stack_sections([no_table])


# --- input errors name the section and the fix


def _section(name: str = "A", n: int = 6, **kw) -> Section:
    rng = np.random.default_rng(0)
    parts = {
        "spots": rng.uniform(5, 55, (n, 2)),
        "counts": rng.poisson(2, (n, 3)).astype(np.float32),
        "genes": ["g1", "g2", "g3"],
        "image": np.full((64, 64, 3), 200, dtype=np.uint8),
        "um_per_px": 1.0,
    }
    return Section(name=name, **{**parts, **kw})


@pytest.mark.parametrize("column", ["region", "barcode", "measured", "section", "spot_id"])
def test_stack_sections_refuses_reserved_obs_columns(column):
    obs = pd.DataFrame({column: [f"v{i}" for i in range(6)], "label": 1})
    with pytest.raises(ValueError, match=rf"Section 'A': `obs` columns \['{column}'\] are reserved.*rename"):
        stack_sections([_section(obs=obs)])
    # other columns pass through
    t = stack_sections([_section(obs=obs.drop(columns=column))]).tables["table"]
    np.testing.assert_array_equal(t.obs["label"], 1)


def test_stack_sections_refuses_obsm_spatial():
    a = _section(obsm={"spatial": np.zeros((6, 2))})
    with pytest.raises(ValueError, match=r"Section 'A': obsm\['spatial'\] is reserved.*pass the centres as `spots`"):
        stack_sections([a, _section("B")])


def test_stack_sections_z_um_scalar_for_one_section():
    stack = get_stack(stack_sections([_section()], z_um=5.0))
    np.testing.assert_array_equal(stack.z_um, [5.0])
    with pytest.raises(ValueError, match=r"`z_um` must be a sequence of one z position .* 2 values, got a single"):
        stack_sections([_section("A"), _section("B")], z_um=5.0)
    with pytest.raises(ValueError, match=r"`z_um` must be a sequence .* 2 values, got 3 values"):
        stack_sections([_section("A"), _section("B")], z_um=[0.0, 1.0, 2.0])


def test_stack_sections_counts_anndata_without_x():
    a = AnnData(obs=pd.DataFrame(index=[str(i) for i in range(6)]), var=pd.DataFrame(index=["g1", "g2"]))
    with pytest.raises(ValueError, match=r"Section 'A': counts AnnData has no .X and no layers\['counts'\]"):
        stack_sections([_section(counts=a)])
    a.layers["counts"] = np.ones((6, 2), dtype=np.float32)  # the layer alone is enough
    np.testing.assert_array_equal(stack_sections([_section(counts=a)]).tables["table"].X.toarray(), 1.0)


def test_in_memory_image_elements_are_accepted():
    import xarray as xr

    rgb = np.random.default_rng(1).integers(0, 255, (64, 64, 3), dtype=np.uint8)
    computed = Image2DModel.parse(rgb.transpose(2, 0, 1), dims=("c", "y", "x")).compute()  # numpy-backed
    assert not isinstance(computed.data, da.Array)
    yxc = xr.DataArray(rgb, dims=("y", "x", "c"))
    sdata = stack_sections([_section("A", image=computed), _section("B", image=yxc)])
    for key in ("he_A", "he_B"):
        level = _level0(sdata.images[key])
        assert isinstance(level.data, da.Array)
        np.testing.assert_array_equal(level.values, rgb.transpose(2, 0, 1))
    validate_stack(sdata, require_images=True)
    with pytest.raises(ValueError, match=r"Section 'C': image element must have dims \('c', 'y', 'x'\)"):
        stack_sections([_section("C", image=xr.DataArray(rgb, dims=("a", "b", "c")))])


def test_stack_sections_from_spatialdata_without_shared_coordinate_system():
    from spatialdata.transformations import set_transformation

    s1, _ = _visium_like(1, fullres=False)
    set_transformation(s1.images["vis1_hires_image"], {"other": Identity()}, set_all=True)
    with pytest.raises(
        ValueError,
        match=r"Section 'V1': no transformation maps shapes 'vis1' \(coordinate systems \['global'\]\) into image "
        r"'vis1_hires_image' \(coordinate systems \['other'\]\).*`image_key=`",
    ):
        stack_sections([s1], names=["V1"], spot_diameter_um=55.0)


def test_stack_sections_spot_radius_px_for_spatialdata_inputs():
    s1, _ = _visium_like(1)
    t = stack_sections([s1, _section("B", spots=[[10.0, 10.0]], counts=None)], names=["V1", None]).tables["table"]
    np.testing.assert_allclose(t.obs.loc[t.obs["section"] == "V1", "spot_radius_px"], 10.0)
    assert t.obs.loc[t.obs["section"] == "B", "spot_radius_px"].isna().all()


# --- input handling: pixel size vs circles, gene names, obs dtypes, duplicate ids, images, argument types


def test_stack_sections_warns_when_um_per_px_disagrees_with_the_circles(asign_log):
    # the hires image only: the circles' radius is 10 full-res px = 2.5 hires px, i.e. 55 µm / 5 px = 11 µm/px
    s1, _ = _visium_like(1, fullres=False)
    sdata = stack_sections([s1], names=["V1"], spot_diameter_um=55.0, um_per_px=2.75)  # the full-res pixel size
    w = asign_log.warnings
    assert "Section 'V1'" in w and "image 'vis1_hires_image'" in w
    assert "radius of 10 px" in w and "radius 2.5 px" in w and "2.75 µm/px" in w and "implies 11 µm/px" in w
    assert "`um_per_px` is probably not the pixel size of image 'vis1_hires_image'" in w
    np.testing.assert_allclose(get_stack(sdata).um_per_px, 2.75)  # the user's value is kept
    np.testing.assert_allclose(sdata.shapes["spots_V1"]["radius"], 10.0)
    # the right pixel size with the ST diameter: the circles are 55 µm wide, so the diameter is blamed
    asign_log.records.clear()
    stack_sections([_visium_like(1, fullres=False)[0]], names=["V1"], um_per_px=11.0)
    assert "like Visium spots (55 µm): `spot_diameter_um` = 100 is probably wrong" in asign_log.warnings
    # within 20 %: silent
    asign_log.records.clear()
    stack_sections([_visium_like(1, fullres=False)[0]], names=["V1"], spot_diameter_um=55.0, um_per_px=12.0)
    assert asign_log.warnings == ""
    # derived pixel size: the INFO line hints at Visium only with the ST diameter
    asign_log.records.clear()
    stack_sections([_visium_like(1, fullres=False)[0]], names=["V1"])
    assert any("Visium spots are 55 µm" in r.getMessage() for r in asign_log.records)
    asign_log.records.clear()
    stack_sections([_visium_like(1, fullres=False)[0]], names=["V1"], spot_diameter_um=55.0)
    assert not any("Visium" in r.getMessage() for r in asign_log.records)


def test_stack_sections_warns_about_gene_names_differing_by_case(asign_log):
    upper = ["G1", "G2", "G3"]
    t = stack_sections([_section("A"), _section("B", genes=upper), _section("C", genes=upper)]).tables["table"]
    assert t.n_vars == 6  # nothing is renamed
    w = asign_log.warnings
    assert "differ only by case" in w
    assert "'A' vs 'B': 3 genes (e.g. 'g1'/'G1', 'g2'/'G2', 'g3'/'G3')" in w and "'A' vs 'C'" in w
    assert "'B' vs 'C'" not in w
    assert "Section(s) ['A'] share no gene with any other measured section" in w
    # consistent names, or one measured section: silent
    asign_log.records.clear()
    stack_sections([_section("A"), _section("B"), _section("C", genes=upper, counts=None)])
    assert asign_log.warnings == ""


def test_stack_sections_obs_dtypes_survive_a_zarr_round_trip(tmp_path):
    obs_a = pd.DataFrame(
        {
            "qc": np.ones(6, dtype=bool),
            "ctype": pd.Categorical(["a"] * 6),
            "n": np.arange(6),
            "label": [f"l{i}" for i in range(6)],
            "ok": np.ones(6, dtype=bool),
        }
    )
    obs_b = pd.DataFrame({"ctype": pd.Categorical(["b"] * 6), "ok": np.zeros(6, dtype=bool)})
    sdata = stack_sections([_section("A", obs=obs_a), _section("B", obs=obs_b)])
    path = tmp_path / "obs.zarr"
    sdata.write(path)
    for obs in (sdata.tables["table"].obs, read_zarr(path).tables["table"].obs):
        assert obs["qc"].dtype == "boolean"
        assert obs["qc"].tolist() == [True] * 6 + [pd.NA] * 6
        assert obs["n"].dtype == "Int64"
        assert obs["n"].tolist() == list(range(6)) + [pd.NA] * 6
        assert isinstance(obs["ctype"].dtype, pd.CategoricalDtype)
        assert list(obs["ctype"].cat.categories) == ["a", "b"]
        assert obs["ctype"].astype(str).tolist() == ["a"] * 6 + ["b"] * 6
        assert obs["ok"].dtype == bool  # present everywhere: plain bool
        # strings that a section lacks: categorical (an object column would come back with the string 'nan')
        assert isinstance(obs["label"].dtype, pd.CategoricalDtype)
        assert obs["label"].iloc[0] == "l0" and obs["label"].isna().sum() == 6
    # strings in every section stay strings
    t = stack_sections([_section("A", obs=obs_a[["label"]]), _section("B", obs=obs_a[["label"]])]).tables["table"]
    assert t.obs["label"].dtype == object


def test_stack_sections_refuses_duplicate_instance_ids():
    s1, _ = _visium_like(1)
    t = s1.tables["table"]
    t.obs["spot_id"] = np.r_[3, 3, np.arange(4, 14)]
    with pytest.raises(
        ValueError,
        match=r"Section 'V1': table 'table' has duplicate instance ids in obs\['spot_id'\] for shapes 'vis1': "
        r"1 id\(s\) .*\(e.g. \[3\]\)",
    ):
        stack_sections([s1], names=["V1"], spot_diameter_um=55.0)


@pytest.mark.parametrize(
    ("shape", "pattern"),
    [
        ((64, 64, 1), r"image is single-channel \(greyscale\), shape \(64, 64, 1\).*np.repeat\(img, 3, axis=2\)"),
        ((1, 64, 64), r"image is single-channel \(greyscale\).*axis=0"),
        ((64, 64, 4), r"image must have 3 \(RGB\) channels, got shape .*; drop the alpha channel"),  # unchanged
    ],
)
def test_stack_sections_image_channel_messages(shape, pattern):
    with pytest.raises(ValueError, match=rf"Section 'A': {pattern}"):
        stack_sections([_section(image=np.zeros(shape, dtype=np.uint8))])


def test_stack_sections_image_errors_name_the_input_image_element():
    from spatialdata.transformations import set_transformation

    s1, _ = _visium_like(1, fullres=False)
    tf = {"global": Scale([4.0, 4.0], axes=("y", "x"))}
    s1.images["vis1_hires_image"] = Image2DModel.parse(
        np.zeros((1, 100, 100), dtype=np.uint8), dims=("c", "y", "x"), transformations=tf
    )
    with pytest.raises(
        ValueError, match=r"Section 'V1': image 'vis1_hires_image' \(stacked as 'he_V1'\) is single-channel"
    ):
        stack_sections([s1], names=["V1"], spot_diameter_um=55.0)
    s1.images["vis1_hires_image"] = Image2DModel.parse(
        np.zeros((3, 100, 100), dtype=np.float32), dims=("c", "y", "x"), transformations=tf
    )
    with pytest.raises(ValueError, match=r"image 'vis1_hires_image' \(stacked as 'he_V1'\) dtype is float32"):
        stack_sections([s1], names=["V1"], spot_diameter_um=55.0)
    # a problem that the contract check finds: the stack's image is named with the input one
    small = Image2DModel.parse(np.zeros((3, 20, 20), dtype=np.uint8), dims=("c", "y", "x"))
    set_transformation(small, tf, set_all=True)
    s1.images["vis1_hires_image"] = small
    with pytest.raises(ValueError, match=r"outside image 'he_V1' \(from input image 'vis1_hires_image'\)"):
        stack_sections([s1], names=["V1"], spot_diameter_um=55.0)


def test_stack_sections_refuses_non_numeric_pixel_sizes():
    s1, _ = _visium_like(1)
    with pytest.raises(TypeError, match=r"`um_per_px` must be a number, got '1.0' \(str\)"):
        stack_sections([s1], um_per_px="1.0")
    with pytest.raises(TypeError, match=r"`um_per_px\[1\]` must be a number, got '2'"):
        stack_sections([s1, _visium_like(2)[0]], names=["V1", "V2"], um_per_px=[1.0, "2"])
    with pytest.raises(TypeError, match=r"Section 'A': `um_per_px` must be a number .*got '1.0' \(str\)"):
        stack_sections([_section(um_per_px="1.0")])
    with pytest.raises(TypeError, match=r"`spot_diameter_um` must be a number, got '55'"):
        stack_sections([_section()], spot_diameter_um="55")


def test_stack_sections_keeps_obsm_of_spatialdata_tables(asign_log):
    s1, _ = _visium_like(1)
    t = s1.tables["table"]
    t.obsm["X_pca"] = np.arange(24.0).reshape(12, 2)  # rows follow the (reversed) table, not the shapes
    t.layers["counts"] = t.X.copy()
    t.layers["norm"] = t.X.copy()
    out = stack_sections([s1, _section("B", counts=None)], names=["V1", None]).tables["table"]
    pca = out.obsm["X_pca"]
    np.testing.assert_array_equal(pca[:12], t.obsm["X_pca"][::-1])  # spot_id i sits in table row 11 - i
    assert np.isnan(pca[12:]).all()
    np.testing.assert_allclose(
        out.obsm["spatial"][:12], np.column_stack([s1.shapes["vis1"].geometry.x, s1.shapes["vis1"].geometry.y])
    )
    info = "\n".join(r.getMessage() for r in asign_log.records)
    assert "Section 'V1': not stacked from table 'table': obsm['spatial']" in info and "layers ['norm']" in info


def test_stack_sections_warns_about_table_rows_without_a_circle(asign_log):
    """Rows whose instance id has no circle were dropped without a word."""
    s1, counts = _visium_like(1)
    t = s1.tables["table"]
    extra = AnnData(
        X=sp.csr_matrix(np.ones((3, 4), dtype=np.float32)),
        obs=pd.DataFrame(
            {"in_tissue": 1, "array_row": 0, "region": pd.Categorical(["vis1"] * 3), "spot_id": [100, 101, 102]},
            index=["x100", "x101", "x102"],
        ),
        var=t.var.copy(),
    )
    adata = AnnData(X=sp.vstack([t.X, extra.X]).tocsr(), obs=pd.concat([t.obs, extra.obs]), var=t.var.copy())
    adata.obs["region"] = pd.Categorical(adata.obs["region"].astype(str))
    del s1.tables["table"]
    s1.tables["table"] = TableModel.parse(adata, region="vis1", region_key="region", instance_key="spot_id")
    sdata = stack_sections([s1], names=["V1"], spot_diameter_um=55.0)
    assert sdata.tables["table"].n_obs == 12
    np.testing.assert_array_equal(sdata.tables["table"].X.toarray(), counts)
    assert (
        "Section 'V1': 3 row(s) of table 'table' annotate instance ids in obs['spot_id'] that have no circle in "
        "'vis1'; they are not stacked." in asign_log.warnings
    )


def test_stack_sections_matches_instance_ids_that_differ_in_type_only(asign_log):
    """String ids '0', '1', ... for an integer shapes index gave 'does not annotate every spot' without a hint."""
    s1, counts = _visium_like(1)
    t = s1.tables["table"]
    t.obs["spot_id"] = t.obs["spot_id"].astype(str)
    sdata = stack_sections([s1], names=["V1"], spot_diameter_um=55.0)
    np.testing.assert_array_equal(sdata.tables["table"].X.toarray(), counts)  # rows follow the shapes order
    info = "\n".join(r.getMessage() for r in asign_log.records)
    assert "(string: '11', '10', '9', ...) and the index of shapes 'vis1' (integer: 0, 1, 2, ...)" in info
    assert "differ in type only; matched them as strings" in info
    # no one-to-one match as strings either: the error names both types
    s2, _ = _visium_like(2)
    s2.tables["table"].obs["spot_id"] = [f"spot{i}" for i in range(12)]
    with pytest.raises(ValueError, match=r"no instance id of table 'table' \(string: 'spot0', .*\(integer: 0, 1, 2"):
        stack_sections([s2], names=["V2"], spot_diameter_um=55.0)
    # same type, some circles unannotated: the count and examples
    s3, _ = _visium_like(3)
    s3.tables["table"].obs["spot_id"] = np.r_[np.arange(20, 22), np.arange(9, -1, -1)]
    with pytest.raises(ValueError, match=r"does not annotate every spot of 'vis3' \(2 missing, e.g. 10, 11\)"):
        stack_sections([s3], names=["V3"], spot_diameter_um=55.0)


# --- image-only sections (an H&E image, no spots): stacked empty, filled by make_spots


def _image_only_sections_from(sdata, image_only):
    """The sections of a synthetic stack as Sections; those in ``image_only`` keep only their image."""
    t = sdata.tables["table"]
    st = get_stack(sdata)
    parts = []
    for i, s in enumerate(st.sections):
        image, um = sdata.images[st.image_keys[i]], float(st.um_per_px[i])
        if s in image_only:
            parts.append(Section(s, image=image, um_per_px=um))
            continue
        rows = (t.obs["section"].astype(str) == s).to_numpy()
        xy = np.asarray(t.obsm["spatial"][rows])
        parts.append(Section(s, spots=xy, counts=t.X[rows], genes=list(t.var_names), image=image, um_per_px=um))
    return parts, st


@pytest.mark.parametrize(("image_only", "table_key"), [(["S2"], "table"), (["S1", "S3"], "spots_table")])
def test_stack_sections_image_only_sections_then_make_spots(small_stack, tmp_path, asign_log, image_only, table_key):
    """`stack_sections` needed spots for every section: an image-only section had to be added by hand afterwards."""
    from asign.pp import make_spots
    from asign.pp._make_spots import _image_only_sections

    parts, st = _image_only_sections_from(small_stack, image_only)
    out = stack_sections(parts, spot_diameter_um=st.spot_diameter_um, z_um=st.z_um, table_key=table_key)
    measured = [s for s in st.sections if s not in image_only]
    # the manifest lists every section at its z; image-only ones have their image, no shapes and no rows
    stack = get_stack(out, table_key=table_key)
    assert stack.sections == st.sections and stack.shapes_keys == [f"spots_{s}" for s in st.sections]
    assert stack.image_keys == [f"he_{s}" for s in st.sections]
    np.testing.assert_allclose(stack.z_um, st.z_um)
    np.testing.assert_allclose(stack.um_per_px, st.um_per_px)
    assert sorted(out.shapes) == [f"spots_{s}" for s in measured]
    for s in image_only:  # same image handling as a section with spots: Identity to its own frame, same pyramid
        img, src = out.images[f"he_{s}"], small_stack.images[f"he_{s}"]
        assert set(get_transformation(img, get_all=True)) == {s}
        assert _affine(get_transformation(img, to_coordinate_system=s)).tolist() == np.eye(3).tolist()
        assert list(img.children) == list(src.children)
        np.testing.assert_array_equal(_level0(img).values, _level0(src).values)
    t = out.tables[table_key]
    assert list(t.obs["section"].cat.categories) == st.sections and t.obs["section"].cat.ordered
    assert sorted(set(t.obs["section"].astype(str))) == measured
    # the table annotates the shapes that exist, as make_spots leaves a section that is still empty
    assert list(t.obs["region"].cat.categories) == [f"spots_{s}" for s in measured]
    assert t.uns["spatialdata_attrs"]["region"] == [f"spots_{s}" for s in measured]
    call = f"`asign.pp.make_spots(sdata, section={image_only!r}" + (
        ")`" if table_key == "table" else f", table_key={table_key!r})`"
    )
    assert call in asign_log.warnings and "an image and no spots (image-only)" in asign_log.warnings
    with pytest.raises(ValueError, match=f"section {image_only[0]!r}: has zero spots .*asign.pp.make_spots"):
        validate_stack(out, table_key=table_key)
    validate_stack(out, table_key=table_key, allow_empty=image_only)
    assert _image_only_sections(out, table_key) == image_only
    # through zarr and back, then filled by make_spots's existing path
    filled = make_spots(out, section=image_only, table_key=table_key, inplace=False)
    out.write(tmp_path / "image_only.zarr")
    back = read_zarr(tmp_path / "image_only.zarr")
    validate_stack(back, table_key=table_key, allow_empty=image_only)
    assert _image_only_sections(back, table_key) == image_only
    make_spots(back, section=image_only, table_key=table_key)
    for sd in (filled, back):
        stack = validate_stack(sd, table_key=table_key, require_images=True)
        t = sd.tables[table_key]
        assert list(t.obs["section"].astype(str).drop_duplicates()) == stack.sections == st.sections
        for s in image_only:
            rows = (t.obs["section"].astype(str) == s).to_numpy()
            assert rows.sum() > 10 and not t.obs["measured"].to_numpy()[rows].any()
            assert t.X[rows].nnz == 0
        assert t.obs["measured"].sum() == sum((small_stack.tables["table"].obs["section"] == s).sum() for s in measured)
    pd.testing.assert_frame_equal(filled.tables[table_key].obs, back.tables[table_key].obs)


def test_stack_sections_image_only_section_filled_and_aligned(small_stack):
    """The filled stack of an image-only section runs the whole pipeline: align_layers, features, graph, ASIGN."""
    import asign

    parts, st = _image_only_sections_from(small_stack, ["S2"])
    out = stack_sections(parts, spot_diameter_um=st.spot_diameter_um, z_um=st.z_um)
    asign.pp.make_spots(out, section=["S2"])
    asign.pp.align_layers(out, seed=0, show_progress_bar=False)
    al = out.tables["table"].uns["asign"]["alignment"]
    assert al["reference"] == "S2" and np.all(al["quality"]["passed"])
    assert np.isfinite(np.asarray(out.tables["table"].obsm["spatial_aligned"])).all()
    # and the rest of the route: features, the 3D graph and ASIGN impute every virtual spot of S2
    asign.pp.extract_features(
        out,
        encoder="handcrafted",
        scales={"spot": 32, "region": 128, "global": 256},
        input_size=None,
        show_progress_bar=False,
    )
    asign.pp.neighbors_3d(out, similarity_key="asign_features_spot")
    tiny = {"hidden_dim": 16, "attn_heads": 4, "gat_heads": 4, "max_epochs": 2, "steps_per_epoch": 2, "n_models": 1}
    res = asign.tl.impute(
        out, known=["S1", "S3"], method="asign", n_genes=8, method_kwargs=tiny, inplace=False, show_progress_bar=False
    )
    virtual = (res.obs["section"] == "S2").to_numpy()
    assert virtual.any() and not res.obs["measured"].to_numpy()[virtual].any()
    assert np.isfinite(res.layers["imputed"][virtual]).all() and np.isnan(res.layers["target"][virtual]).all()


def test_stack_sections_image_only_array_image_is_parsed_like_the_others():
    arr = da.from_array(np.full((3, 600, 700), 200, dtype=np.uint8), chunks=(3, 256, 256))
    sdata = stack_sections([_section("A"), Section("B", image=arr, um_per_px=1.0)])
    b = sdata.images["he_B"]
    assert list(b.children) == ["scale0", "scale1"]  # as for a section with spots (600 -> 300 -> 150 dropped)
    assert set(get_transformation(b, get_all=True)) == {"B"}
    assert "spots_B" not in sdata.shapes and get_stack(sdata).image_keys == ["he_A", "he_B"]


_IMG = np.full((64, 64, 3), 200, dtype=np.uint8)


@pytest.mark.parametrize(
    ("section", "message"),
    [
        (Section("B", um_per_px=1.0), r"Section 'B' needs spots or an image: both `spots` and `image` are None"),
        (
            Section("B", image=_IMG, counts=np.ones((2, 3)), genes=["g1", "g2", "g3"], um_per_px=1.0),
            r"Section 'B': `counts` given without `spots`; counts need one row per spot",
        ),
        (
            Section("B", image=_IMG, spot_ids=["a"], obs=pd.DataFrame({"x": [1]}), um_per_px=1.0),
            r"Section 'B': `spot_ids`, `obs` describe\(s\) spots, but `spots` is None \(an image-only section\)",
        ),
        (Section("B", image=_IMG), "Section 'B': `um_per_px` must be a positive pixel size"),
        (Section("B", image=_IMG.astype(np.float32), um_per_px=1.0), "Section 'B': image dtype is float32"),
        (
            Section("B", spots=np.zeros((0, 2)), image=_IMG, um_per_px=1.0),
            r"Section 'B': has no spots \(`spots` is empty\); .* pass `spots=None` \(an image-only section\)",
        ),
    ],
)
def test_stack_sections_image_only_refusals(section, message):
    with pytest.raises(ValueError, match=message):
        stack_sections([_section("A"), section])


def test_stack_sections_refuses_a_stack_of_image_only_sections():
    secs = [Section("A", image=_IMG, um_per_px=1.0), Section("B", image=_IMG, um_per_px=1.0)]
    with pytest.raises(ValueError, match=r"Every section is image-only \(\['A', 'B'\].*nothing to impute from"):
        stack_sections(secs)
    with pytest.raises(ValueError, match=r"Every section is image-only \(\['A'\]"):
        stack_sections(secs[:1])
    # a section with spots but no counts is enough to stack (today's rule for unmeasured sections)
    sdata = stack_sections([_section("A", counts=None, genes=None), secs[1]])
    assert get_stack(sdata).sections == ["A", "B"]
