from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

import asign
from asign._stack import section_codes
from asign.pp._tiles import tile_members


def _floor_maps(table, side):
    xy = np.asarray(table.obsm["spatial"], dtype=float)
    return np.floor(xy[:, 0] / side).astype(int), np.floor(xy[:, 1] / side).astype(int)


@pytest.mark.parametrize(("region", "glob"), [(128, 256), (100, 300), (512, 1024)])
def test_index_maps_follow_floor_formula_and_nest(small_stack, region, glob):
    sd = small_stack
    asign.pp.make_tiles(sd, scales={"region": region, "global": glob})
    t = sd.tables["table"]
    reg, gl = sd.tables["asign_regions"], sd.tables["asign_globals"]
    r, q = t.obs["asign_region"].to_numpy(), t.obs["asign_global"].to_numpy()
    assert r.dtype == np.int64 and q.dtype == np.int64
    rc, rr = _floor_maps(t, region)
    gc, gr = _floor_maps(t, glob)
    np.testing.assert_array_equal(reg.obs["tile_col"].to_numpy()[r], rc)
    np.testing.assert_array_equal(reg.obs["tile_row"].to_numpy()[r], rr)
    np.testing.assert_array_equal(gl.obs["tile_col"].to_numpy()[q], gc)
    np.testing.assert_array_equal(gl.obs["tile_row"].to_numpy()[q], gr)
    # tiles belong to the spot's own section
    assert (reg.obs["section"].to_numpy()[r] == t.obs["section"].to_numpy()).all()
    assert (gl.obs["section"].to_numpy()[q] == t.obs["section"].to_numpy()).all()
    # q(r): the region table's global index agrees with every member spot and with floor(r / k)
    k = glob // region
    q_of_r = reg.obs["asign_global"].to_numpy()
    np.testing.assert_array_equal(q_of_r[r], q)
    np.testing.assert_array_equal(gl.obs["tile_col"].to_numpy()[q_of_r], reg.obs["tile_col"].to_numpy() // k)
    np.testing.assert_array_equal(gl.obs["tile_row"].to_numpy()[q_of_r], reg.obs["tile_row"].to_numpy() // k)
    # no empty tile, counts add up, members recover the index
    assert (reg.obs["n_spots"] > 0).all() and (gl.obs["n_spots"] > 0).all()
    assert reg.obs["n_spots"].sum() == t.n_obs == gl.obs["n_spots"].sum()
    np.testing.assert_array_equal(np.bincount(r, minlength=reg.n_obs), reg.obs["n_spots"].to_numpy())
    assert gl.obs["n_regions"].sum() == reg.n_obs
    members = tile_members(r, reg.n_obs)
    assert all((r[m] == i).all() for i, m in enumerate(members))
    # every tile is distinct and sorted by section, row, col
    codes = reg.obs["section"].cat.codes.to_numpy()
    key = np.column_stack([codes, reg.obs["tile_row"], reg.obs["tile_col"]])
    assert len(np.unique(key, axis=0)) == len(key)
    assert (np.lexsort(key[:, ::-1].T) == np.arange(len(key))).all()
    # tile centres
    np.testing.assert_allclose(reg.obsm["spatial"][:, 0], (reg.obs["tile_col"] + 0.5) * region)
    np.testing.assert_allclose(gl.obsm["spatial"][:, 1], (gl.obs["tile_row"] + 0.5) * glob)


def test_tile_tables_contract(small_stack):
    sd = small_stack
    asign.pp.make_tiles(sd, scales={"region": 128, "global": 256})
    t = sd.tables["table"]
    for key in ("asign_regions", "asign_globals"):
        tab = sd.tables[key]
        assert isinstance(tab.obs["section"].dtype, pd.CategoricalDtype)
        assert tab.obs["section"].cat.ordered
        assert list(tab.obs["section"].cat.categories) == list(t.obs["section"].cat.categories)
        for col in ("tile_col", "tile_row", "n_spots", "tile_size_px", "padded"):
            assert col in tab.obs
        assert tab.n_vars == 0
        assert tab.obs_names.is_unique
        assert tab.uns["asign"]["stack"]["section"] == ["S1", "S2", "S3"]
    info = t.uns["asign_tiles"]
    assert info["scales_px"] == {"region": [128] * 3, "global": [256] * 3}
    assert info["region_table"] == "asign_regions"


def test_boundary_and_partial_strips_kept(small_stack, move_spots):
    sd = small_stack
    t = sd.tables["table"]
    # a spot exactly on a tile boundary goes to the tile on its right/below; one in the last, partial strip is kept
    move_spots(sd, [0, 1], [[200.0, 400.0], [511.0, 511.0]])
    asign.pp.make_tiles(sd, scales={"region": 200, "global": 400})
    reg = sd.tables["asign_regions"]
    r = t.obs["asign_region"].to_numpy()
    assert (reg.obs["tile_col"].iloc[r[0]], reg.obs["tile_row"].iloc[r[0]]) == (1, 2)
    assert (reg.obs["tile_col"].iloc[r[1]], reg.obs["tile_row"].iloc[r[1]]) == (2, 2)
    # 512 px image: tiles in column/row 2 span 400-600 and are padded
    assert bool(reg.obs["padded"].iloc[r[1]])
    padded = reg.obs["padded"].to_numpy()
    ext = (reg.obs["tile_col"].to_numpy() + 1) * 200 > 512
    ext |= (reg.obs["tile_row"].to_numpy() + 1) * 200 > 512
    np.testing.assert_array_equal(padded, ext)
    assert (r >= 0).all()


def test_scales_um_are_converted_per_section(small_stack):
    sd = small_stack
    # 8 µm/px: 1024 µm = 128 px, 2048 µm = 256 px
    asign.pp.make_tiles(sd, scales_um={"region": 1024.0, "global": 2048.0})
    info = sd.tables["table"].uns["asign_tiles"]
    assert info["scales_px"]["region"] == [128, 128, 128]
    assert info["scales_px"]["global"] == [256, 256, 256]
    assert info["unit"] == "um"
    rc, _ = _floor_maps(sd.tables["table"], 128)
    reg = sd.tables["asign_regions"]
    np.testing.assert_array_equal(reg.obs["tile_col"].to_numpy()[sd.tables["table"].obs["asign_region"]], rc)


def test_bad_scales(small_stack):
    with pytest.raises(ValueError, match="integer multiple"):
        asign.pp.make_tiles(small_stack, scales={"region": 128, "global": 200})
    with pytest.raises(ValueError, match="either"):
        asign.pp.make_tiles(small_stack, scales={"region": 128}, scales_um={"region": 100.0})
    with pytest.raises(ValueError, match="Unknown scale"):
        asign.pp.make_tiles(small_stack, scales={"tile": 128})
    with pytest.raises(ValueError, match="positive"):
        asign.pp.make_tiles(small_stack, scales={"region": 0})
    with pytest.raises(ValueError, match="integer multiple"):
        asign.pp.make_tiles(small_stack, scales_um={"region": 100.0, "global": 250.0})


def test_inplace_false_leaves_sdata_untouched(small_stack):
    sd = small_stack
    before = set(sd.tables)
    res = asign.pp.make_tiles(sd, scales={"region": 128, "global": 256}, inplace=False)
    assert set(sd.tables) == before
    assert "asign_region" not in sd.tables["table"].obs
    assert res.region_index.shape == (sd.tables["table"].n_obs,)
    assert res.regions.n_obs == res.region_index.max() + 1
    codes = section_codes(sd.tables["table"])
    assert (res.globals_.obs["section"].cat.codes.to_numpy()[res.global_index] == codes).all()


def test_key_added(small_stack):
    sd = small_stack
    asign.pp.make_tiles(sd, scales={"region": 128, "global": 256}, key_added="hr")
    assert "hr_regions" in sd.tables and "hr_globals" in sd.tables
    assert "hr_region" in sd.tables["table"].obs and "hr_global" in sd.tables["hr_regions"].obs
    asign.pp.make_tiles(sd, scales={"region": 64, "global": 192}, key_added="hr")  # its own earlier run: replaced
    assert sd.tables["table"].uns["hr_tiles"]["scales_px"]["global"][0] == 192


def test_key_added_never_overwrites_user_data(small_stack):
    """Tables and columns of the same name that no asign run wrote belong to the user: refused before any work."""
    import anndata as ad

    sd = small_stack
    user = ad.AnnData(np.ones((3, 2)))
    sd.tables["my_regions"] = user
    with pytest.raises(ValueError, match=r"would overwrite table 'my_regions'"):
        asign.pp.make_tiles(sd, key_added="my")
    assert asign.pp.make_tiles(sd, key_added="my", inplace=False).regions.n_obs > 0  # writes nothing: allowed
    with pytest.raises(ValueError, match=r"would overwrite table 'my_regions'"):
        asign.pp.extract_features(sd, encoder="handcrafted", key_added="my", show_progress_bar=False)
    assert sd.tables["my_regions"] is user
    sd.tables["table"].obs["user_region"] = 1
    with pytest.raises(ValueError, match=r"`.obs\['user_region'\]`"):
        asign.pp.make_tiles(sd, key_added="user")
    assert (sd.tables["table"].obs["user_region"] == 1).all() and "user_regions" not in sd.tables


def test_image_levels_scales_and_stored_flag(small_stack, tmp_path):
    import dask.array as da
    import xarray as xr

    from asign.pp._tiles import image_levels

    sd = small_stack
    lv = image_levels(sd.images["he_S1"])
    assert [x.name for x in lv] == ["scale0", "scale1"]
    assert [(x.scale_y, x.scale_x) for x in lv] == [(1.0, 1.0), (2.0, 2.0)]
    assert lv[0].data.shape == (3, 512, 512) and lv[1].data.shape == (3, 256, 256)
    # parsed in memory: scale1 is computed from scale0 by dask, so it does not count as stored
    assert lv[0].stored and not lv[1].stored
    # written and read back: every level is its own zarr array
    import spatialdata as sdt

    sdt.SpatialData(images={"he": sd.images["he_S1"]}).write(tmp_path / "x.zarr")
    back = sdt.read_zarr(tmp_path / "x.zarr")
    assert [x.stored for x in image_levels(back.images["he"])] == [True, True]
    # odd sides give non-integer scales (ratios of sizes per axis); a single-scale image is one stored level
    odd = xr.DataTree.from_dict(
        {
            "scale0": xr.Dataset({"image": (("c", "y", "x"), da.zeros((3, 1001, 999), dtype=np.uint8))}),
            "scale1": xr.Dataset({"image": (("c", "y", "x"), da.zeros((3, 500, 499), dtype=np.uint8))}),
        }
    )
    lv = image_levels(odd)
    assert lv[1].scale_y == 1001 / 500 and lv[1].scale_x == 999 / 499 and lv[1].stored
    single = image_levels(odd["scale0"].ds["image"])
    assert len(single) == 1 and single[0].stored and single[0].scale_x == 1.0


def _region_warnings(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.levelname == "WARNING" and "region tiles" in r.getMessage()]


def test_pixel_tile_defaults_on_a_coarse_image_warn(small_stack, caplog):
    """8 µm/px, spot diameter ~152 µm: the default 512 px region tile (4096 µm) covers far too many spots."""
    import logging

    sd = small_stack
    with caplog.at_level(logging.WARNING, logger="asign"):
        asign.pp.make_tiles(sd, inplace=False)
    msgs = _region_warnings(caplog)
    assert len(msgs) == 1
    assert "Sections ['S1', 'S2', 'S3'] have region tiles more than 7x the spot diameter (152 µm)" in msgs[0]
    assert "S1: 512 px x 8 µm/px = 4096 µm" in msgs[0] and "pass `scales_um=`" in msgs[0]
    caplog.clear()
    # a scales_um without a region side falls back to the pixel default too
    with caplog.at_level(logging.WARNING, logger="asign"):
        asign.pp.make_tiles(sd, scales_um={"spot": 112.0}, inplace=False)
    assert len(_region_warnings(caplog)) == 1


def test_tile_sides_in_um_or_on_fine_images_are_silent(small_stack, caplog):
    import dataclasses
    import logging

    from asign._stack import get_stack
    from asign.pp._tiles import warn_large_region_tiles

    sd = small_stack
    with caplog.at_level(logging.WARNING, logger="asign"):
        asign.pp.make_tiles(sd, scales_um={"region": 1024.0, "global": 2048.0}, inplace=False)
        asign.pp.make_tiles(sd, scales={"region": 128, "global": 256}, inplace=False)  # 1024 µm: under 7 x 152 µm
    assert not _region_warnings(caplog)
    # the threshold: silent on HER2ST-like images (100 µm spots, 0.5-0.92 µm/px), loud on the synthetic 4 µm/px
    stack = get_stack(sd)
    with caplog.at_level(logging.WARNING, logger="asign"):
        warn_large_region_tiles(
            dataclasses.replace(stack, um_per_px=np.array([0.5, 0.69, 0.92]), spot_diameter_um=100.0), [512] * 3
        )
    assert not _region_warnings(caplog)
    with caplog.at_level(logging.WARNING, logger="asign"):
        warn_large_region_tiles(
            dataclasses.replace(stack, um_per_px=np.array([0.5, 4.0, 4.0]), spot_diameter_um=96.0), [512] * 3
        )
    msgs = _region_warnings(caplog)
    assert len(msgs) == 1 and "Sections ['S2', 'S3']" in msgs[0] and "512 px x 4 µm/px = 2048 µm" in msgs[0]


def test_make_tiles_after_extract_features_warns_that_the_tile_features_are_gone(small_stack, asign_log):
    sd = small_stack
    asign.pp.make_tiles(sd, scales_um={"region": 400.0, "global": 800.0})
    assert "held the region/global image features" not in asign_log.warnings  # no features yet: silent
    asign.pp.extract_features(
        sd, encoder="handcrafted", scales_um={"spot": 150.0, "region": 400.0, "global": 800.0}, show_progress_bar=False
    )
    assert "features" in sd.tables["asign_regions"].obsm
    asign.pp.make_tiles(sd, scales_um={"region": 400.0, "global": 800.0})
    w = asign_log.warnings
    assert "Replacing tables ['asign_regions', 'asign_globals'], which held the region/global image features" in w
    assert "['asign_features_region', 'asign_features_global'] of table 'table' no longer match" in w
    assert "features" not in sd.tables["asign_regions"].obsm  # what the warning says


def test_a_partial_scales_um_says_which_levels_stay_in_pixels(small_stack, asign_log):
    """scales_um={'spot': ...} recorded unit 'um' while region/global silently took 512 / 1024 px."""
    asign.pp.extract_features(small_stack, encoder="handcrafted", scales_um={"spot": 150.0}, show_progress_bar=False)
    assert "scales_um gives no ['region', 'global']: those levels take the pixel defaults (region 512 px" in (
        asign_log.warnings
    )
    asign_log.records.clear()
    asign.pp.make_tiles(small_stack, scales_um={"region": 400.0, "global": 800.0})
    assert "scales_um gives no" not in asign_log.warnings


def _point_shapes():
    import geopandas as gpd
    from shapely.geometry import Point
    from spatialdata.models import ShapesModel

    return ShapesModel.parse(gpd.GeoDataFrame(geometry=[Point(0, 0)], data={"radius": [1.0]}))


def _spot_keys(table, key="asign"):
    return (
        {c for c in table.obs if c.startswith(key)} | {c for c in table.uns if c.startswith(key + "_")},
        set(table.obsm),
    )


@pytest.mark.parametrize("name", ["asign_regions", "Asign_Globals"])
def test_an_element_of_another_type_named_like_a_tile_table_is_refused(small_stack, name):
    """A shapes element named like a tile table (or a case variant) was found by spatialdata only when writing."""
    sd = small_stack
    sd.shapes[name] = _point_shapes()
    before = _spot_keys(sd.tables["table"])
    with pytest.raises(ValueError, match=rf"clashes with the element sdata\.shapes\['{name}'\].*another `key_added`"):
        asign.pp.make_tiles(sd, scales={"region": 128, "global": 256})
    assert _spot_keys(sd.tables["table"]) == before
    assert "asign_regions" not in sd.tables and "asign_globals" not in sd.tables
    asign.pp.make_tiles(sd, scales={"region": 128, "global": 256}, key_added="other")  # another key: fine
    assert "other_regions" in sd.tables


def test_a_case_variant_table_or_a_leftover_record_does_not_allow_overwriting(small_stack):
    import anndata as ad

    sd = small_stack
    sd.tables["ASIGN_regions"] = ad.AnnData(np.ones((2, 2)))
    with pytest.raises(ValueError, match=r"the table 'asign_regions', which clashes with the element sdata\.tables"):
        asign.pp.make_tiles(sd)
    del sd.tables["ASIGN_regions"]
    # a record of an earlier run left without its tables (a failed run) does not make a user's table asign's
    sd.tables["table"].uns["asign_tiles"] = {"region_table": "asign_regions", "global_table": "asign_globals"}
    user = ad.AnnData(np.ones((2, 2)))
    sd.tables["asign_regions"] = user
    with pytest.raises(ValueError, match=r"would overwrite table 'asign_regions', which no earlier asign run"):
        asign.pp.make_tiles(sd)
    assert sd.tables["asign_regions"] is user
    # the tables of an earlier run are replaced
    del sd.tables["asign_regions"]
    asign.pp.make_tiles(sd, scales={"region": 128, "global": 256})
    asign.pp.make_tiles(sd, scales={"region": 64, "global": 192})
    assert sd.tables["table"].uns["asign_tiles"]["scales_px"]["global"][0] == 192


def test_a_failed_tile_write_leaves_no_keys(small_stack, monkeypatch):
    """The tables are written first, both or neither; the spot table's keys only after them."""
    from asign.pp import _tiles

    sd = small_stack
    t = sd.tables["table"]
    res = asign.pp.make_tiles(sd, scales={"region": 64, "global": 192}, inplace=False)
    args = (res.region_index, res.global_index, res.regions, res.globals_, {})
    sd.shapes["new_globals"] = _point_shapes()  # a clash that the check would have refused: the second write fails
    with pytest.raises(KeyError, match="not unique"):
        _tiles.write_tiles(sd, "table", "new", *args)
    assert "new_regions" not in sd.tables and "new_region" not in t.obs and "new_tiles" not in t.uns
    # an earlier run's tables are put back
    asign.pp.make_tiles(sd, scales={"region": 128, "global": 256})
    old = sd.tables["asign_regions"], sd.tables["asign_globals"]
    index, record = t.obs["asign_region"].copy(), t.uns["asign_tiles"]
    real = _tiles.tile_table_key
    monkeypatch.setattr(_tiles, "tile_table_key", lambda k, lev: real(k, lev) if lev == "region" else "new_globals")
    with pytest.raises(KeyError, match="not unique"):
        _tiles.write_tiles(sd, "table", "asign", *args)
    monkeypatch.undo()
    assert sd.tables["asign_regions"] is old[0] and sd.tables["asign_globals"] is old[1]
    assert t.uns["asign_tiles"] is record
    pd.testing.assert_series_equal(t.obs["asign_region"], index)
