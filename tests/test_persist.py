"""asign.io.persist: results reach the store, and no interruption loses data."""

from __future__ import annotations

import copy
import shutil
from pathlib import Path

import numpy as np
import pytest
from spatialdata import SpatialData, read_zarr
from spatialdata.models import ShapesModel
from spatialdata.transformations import Affine, Identity, get_transformation, set_transformation

from asign.datasets import synthetic_stack
from asign.io import _persist, persist, recover, validate_stack
from asign.io._persist import TMP_SUFFIX


@pytest.fixture(scope="module")
def _tiny():
    return synthetic_stack(n_sections=2, n_spots=30, n_genes=5, image_size=256, um_per_px=16.0, seed=2)


@pytest.fixture
def tiny(_tiny):
    return copy.deepcopy(_tiny)


@pytest.fixture(scope="module")
def _store(_tiny, tmp_path_factory):
    path = tmp_path_factory.mktemp("store") / "stack.zarr"
    copy.deepcopy(_tiny).write(path)
    return path


@pytest.fixture
def backed(_store, tmp_path):
    path = tmp_path / "stack.zarr"
    shutil.copytree(_store, path)
    return read_zarr(path)


def _pixels(image):
    return (image["scale0"]["image"] if "scale0" in getattr(image, "children", {}) else image).values


def _tables_on_disk(path):
    return sorted(p.name for p in (path / "tables").iterdir() if p.is_dir())


def _change(sdata):
    t = sdata.tables["table"]
    t.obs["asign_test"] = np.arange(t.n_obs, dtype=float)
    t.obsm["asign_test"] = np.ones((t.n_obs, 2))
    t.X = t.X * 2
    return t


def _assert_changed(path, expected):
    t = read_zarr(path).tables["table"]
    np.testing.assert_array_equal(t.obs["asign_test"], np.arange(t.n_obs))
    np.testing.assert_array_equal(t.X.toarray(), expected.X.toarray())


def test_unbacked_needs_a_path(tiny):
    with pytest.raises(ValueError, match="not backed by a zarr store: pass `path=`"):
        persist(tiny)


def test_unbacked_object_is_written(tiny, tmp_path):
    path = tmp_path / "new.zarr"
    persist(tiny, path=path)
    assert tiny.path == path
    back = read_zarr(path)
    validate_stack(back)
    np.testing.assert_array_equal(back.tables["table"].X.toarray(), tiny.tables["table"].X.toarray())
    assert not (tmp_path / "new.zarr.asign_tmp").exists()
    with pytest.raises(ValueError, match="other than the object's own store"):
        persist(tiny, path=path, strategy="new_store", overwrite=True)
    tiny.path = None
    with pytest.raises(FileExistsError, match="pass overwrite=True"):
        persist(tiny, path=path)


def test_backed_table_rewritten(backed):
    img_before = _pixels(backed.images["he_S1"])
    t = _change(backed)
    persist(backed)
    _assert_changed(backed.path, t)
    assert _tables_on_disk(backed.path) == ["table"]
    back = read_zarr(backed.path)
    validate_stack(back)
    np.testing.assert_array_equal(_pixels(back.images["he_S1"]), img_before)
    np.testing.assert_array_equal(back.tables["table"].obsm["asign_test"], 1.0)


@pytest.mark.parametrize("strategy", ["temp_element", "temp_store"])
def test_interrupted_after_delete_is_restored_by_next_call(backed, monkeypatch, strategy):
    path = backed.path
    t = _change(backed)
    real_write = SpatialData.write_element

    def crash_on_final_write(self, element_name, *args, **kwargs):
        if element_name == "table":
            msg = "simulated crash"
            raise RuntimeError(msg)
        return real_write(self, element_name, *args, **kwargs)

    monkeypatch.setattr(SpatialData, "write_element", crash_on_final_write)
    with pytest.raises(RuntimeError, match="simulated crash"):
        persist(backed, "table", strategy=strategy)
    # the original was deleted, the verified copy is on disk
    assert "table" not in _tables_on_disk(path)
    if strategy == "temp_element":
        assert _tables_on_disk(path) == ["table" + TMP_SUFFIX]
    else:
        assert (path.parent / (path.name + ".asign_tmp")).exists()
    monkeypatch.setattr(SpatialData, "write_element", real_write)
    # a fresh session finds the copy and restores it: no data lost
    fresh = read_zarr(path)
    assert recover(fresh) == ["table"]
    assert list(fresh.tables) == ["table"]
    assert _tables_on_disk(path) == ["table"]
    assert not (path.parent / (path.name + ".asign_tmp")).exists()
    _assert_changed(path, t)
    validate_stack(read_zarr(path))


def test_interrupted_same_session_next_persist_completes(backed, monkeypatch):
    path = backed.path
    t = _change(backed)
    real_write = SpatialData.write_element
    calls = []

    def crash_once(self, element_name, *args, **kwargs):
        calls.append(element_name)
        if element_name == "table" and calls.count("table") == 1:
            msg = "simulated crash"
            raise RuntimeError(msg)
        return real_write(self, element_name, *args, **kwargs)

    monkeypatch.setattr(SpatialData, "write_element", crash_once)
    with pytest.raises(RuntimeError):
        persist(backed)
    assert "table" not in _tables_on_disk(path)
    t.obs["asign_test2"] = 1.0  # the session goes on
    persist(backed)
    assert _tables_on_disk(path) == ["table"]
    _assert_changed(path, t)
    assert "asign_test2" in read_zarr(path).tables["table"].obs


def test_interrupted_before_the_original_is_touched_keeps_it(backed, monkeypatch):
    path = backed.path
    before = read_zarr(path).tables["table"].X.toarray()
    _change(backed)
    real_journal = _persist._journal

    def crash(folder, state, **kwargs):
        if state == "replacing":
            msg = "simulated crash before the original is touched"
            raise RuntimeError(msg)
        return real_journal(folder, state)

    monkeypatch.setattr(_persist, "_journal", crash)
    with pytest.raises(RuntimeError, match="before the original"):
        persist(backed)
    monkeypatch.undo()
    assert _tables_on_disk(path) == ["table", "table" + TMP_SUFFIX]
    fresh = read_zarr(path)
    assert recover(fresh) == []  # the original is intact: only the copy is removed
    assert _tables_on_disk(path) == ["table"]
    np.testing.assert_array_equal(read_zarr(path).tables["table"].X.toarray(), before)


def _persist_crashing_in_delete(sdata, monkeypatch) -> None:
    """``persist(sdata)`` with ``delete_element_from_disk`` raising: a crash after the verified copy is written."""

    def crash(self, element_name):
        msg = "simulated crash in delete"
        raise RuntimeError(msg)

    monkeypatch.setattr(SpatialData, "delete_element_from_disk", crash)
    with pytest.raises(RuntimeError, match="in delete"):
        persist(sdata)
    monkeypatch.undo()


def test_interrupted_delete_is_rolled_forward(backed, monkeypatch):
    path = backed.path
    t = _change(backed)
    _persist_crashing_in_delete(backed, monkeypatch)
    # the journal says the original was being replaced: the verified copy (the new content) wins
    assert recover(path) == ["table"]
    assert _tables_on_disk(path) == ["table"]
    _assert_changed(path, t)


@pytest.mark.parametrize("via", ["path", "object"])
def test_original_cut_off_mid_write_is_restored(backed, monkeypatch, via):
    """A table cut off while anndata writes it may still read: the journal, not readability, decides."""
    import anndata._io.specs.registry as registry

    path = backed.path
    t = _change(backed)
    t.uns["asign_test"] = {"a": 1}
    armed = {"on": False}
    real_delete = SpatialData.delete_element_from_disk
    real_write_elem = registry.Writer.write_elem

    def delete(self, name):
        real_delete(self, name)
        armed["on"] = name == "table"

    def write_elem(self, store, key, elem, *args, **kwargs):
        if armed["on"] and key == "uns":
            raise KeyboardInterrupt
        return real_write_elem(self, store, key, elem, *args, **kwargs)

    monkeypatch.setattr(SpatialData, "delete_element_from_disk", delete)
    monkeypatch.setattr(registry.Writer, "write_elem", write_elem)
    with pytest.raises(KeyboardInterrupt):
        persist(backed)
    monkeypatch.undo()
    assert sorted(_tables_on_disk(path)) == ["table", "table" + TMP_SUFFIX]
    if via == "path":  # the store cannot be opened by spatialdata any more; the repair works on the files
        assert recover(path) == ["table"]
    else:
        fresh = read_zarr(path, selection=("images", "shapes"))
        assert recover(fresh) == ["table"]
        assert fresh.tables["table"].uns["asign_test"] == {"a": 1}  # read back into memory
    assert _tables_on_disk(path) == ["table"]
    back = read_zarr(path)
    assert back.tables["table"].uns["asign_test"] == {"a": 1}
    _assert_changed(path, t)
    validate_stack(back)


def test_unreadable_leftover_copy_is_discarded(backed):
    path = backed.path
    junk = path / "tables" / ("table" + TMP_SUFFIX)
    junk.mkdir()
    (junk / "zarr.json").write_text("{ not json")
    # persist journals the elements it replaces before it writes their copies: this one is persist's
    replaced = {"elements": {}, "replaced": {"tables/table": {}}, "done": []}
    _persist._store_journal(path, _persist.TRANSFORMS_JOURNAL, "pending", replaced)
    assert recover(backed) == []
    assert _tables_on_disk(path) == ["table"]


def test_shapes_new_elements_and_transformations(backed):
    path = backed.path
    # a changed shapes element (eager) is rewritten safely
    old = backed.shapes["spots_S2"]
    moved = ShapesModel.parse(
        np.column_stack([old.geometry.x + 1.0, old.geometry.y]),
        geometry=0,
        radius=old["radius"].to_numpy(),
        index=old.index,
        transformations={"S2": Identity()},
    )
    backed.shapes["spots_S2"] = moved
    # a new element only in memory is written as is
    backed.shapes["extra"] = ShapesModel.parse(
        np.array([[1.0, 2.0]]), geometry=0, radius=np.array([1.0]), transformations={"S1": Identity()}
    )
    # a new transformation (metadata) reaches the disk
    A = Affine(np.array([[0.0, -1.0, 5.0], [1.0, 0.0, 2.0], [0.0, 0.0, 1.0]]), ("x", "y"), ("x", "y"))
    set_transformation(backed.images["he_S1"], A, to_coordinate_system="aligned")
    persist(backed, "spots_S2")
    back = read_zarr(path)
    np.testing.assert_allclose(back.shapes["spots_S2"].geometry.x, old.geometry.x + 1.0)
    assert "extra" in back.shapes
    tf = get_transformation(back.images["he_S1"], get_all=True)
    assert set(tf) == {"S1", "aligned"}
    np.testing.assert_allclose(tf["aligned"].to_affine_matrix(("x", "y"), ("x", "y")), A.matrix)
    assert not any(n.endswith(TMP_SUFFIX) for n in _tables_on_disk(path))


def test_write_new_false_writes_only_the_named_elements(backed):
    import anndata as ad

    path = backed.path
    t = _change(backed)
    backed.tables["zz"] = ad.AnnData(np.ones((3, 2), dtype=np.float32))  # another pending result
    backed.shapes["extra"] = ShapesModel.parse(
        np.array([[1.0, 2.0]]), geometry=0, radius=np.array([1.0]), transformations={"S1": Identity()}
    )
    A = Affine(np.array([[0.0, -1.0, 5.0], [1.0, 0.0, 2.0], [0.0, 0.0, 1.0]]), ("x", "y"), ("x", "y"))
    set_transformation(backed.images["he_S1"], A, to_coordinate_system="aligned")
    persist(backed, "table", write_new=False)
    _assert_changed(path, t)
    back = read_zarr(path)
    assert "zz" not in back.tables and "extra" not in back.shapes
    assert "aligned" not in get_transformation(back.images["he_S1"], get_all=True)
    # a named element only in memory is written
    persist(backed, "zz", write_new=False)
    back = read_zarr(path)
    assert "zz" in back.tables and "extra" not in back.shapes


def test_no_autosharding_warnings(backed):
    import warnings

    _change(backed)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        persist(backed)
    assert not [w for w in caught if "autosharding" in str(w.message)]


def test_images_on_disk_are_never_rewritten(backed):
    with pytest.raises(ValueError, match="persist never rewrites images"):
        persist(backed, "he_S1")
    with pytest.raises(KeyError, match="'nope' is not an element"):
        persist(backed, "nope")
    with pytest.raises(ValueError, match="Unknown strategy"):
        persist(backed, strategy="yolo")


def test_new_store_swaps_atomically(backed, tmp_path, monkeypatch):
    target = tmp_path / "copy.zarr"
    persist(backed, path=target, strategy="new_store")
    assert backed.path == target
    validate_stack(read_zarr(target))
    # never over the object's own store, never over an existing store without overwrite=True
    with pytest.raises(ValueError, match="other than the object's own store"):
        persist(backed, path=target, strategy="new_store", overwrite=True)
    other = tmp_path / "other.zarr"
    other.mkdir()
    (other / "keep.txt").write_text("user data")
    with pytest.raises(FileExistsError, match="pass overwrite=True"):
        persist(backed, path=other, strategy="new_store")
    assert (other / "keep.txt").read_text() == "user data"
    # a failed write leaves the existing store as it was
    t = _change(backed)

    def crash(self, *args, **kwargs):
        msg = "disk full"
        raise OSError(msg)

    monkeypatch.setattr(SpatialData, "write", crash)
    with pytest.raises(OSError, match="disk full"):
        persist(backed, path=other, strategy="new_store", overwrite=True)
    monkeypatch.undo()
    assert (other / "keep.txt").exists()
    assert not (tmp_path / "other.zarr.asign_new").exists()
    # a swap interrupted between its two renames is completed by the next call
    real_rename = type(other).rename

    def rename(self, target):
        if str(self).endswith(".asign_new"):
            msg = "simulated crash between the renames"
            raise RuntimeError(msg)
        return real_rename(self, target)

    monkeypatch.setattr(type(other), "rename", rename)
    with pytest.raises(RuntimeError, match="between the renames"):
        persist(backed, path=other, strategy="new_store", overwrite=True)
    monkeypatch.undo()
    assert not other.exists()
    assert (tmp_path / "other.zarr.asign_old").exists() and (tmp_path / "other.zarr.asign_new").exists()
    assert recover(other) == []  # the verified new store is swapped in
    assert not (tmp_path / "other.zarr.asign_old").exists()
    assert not (tmp_path / "other.zarr.asign_new").exists()
    assert not (other / "keep.txt").exists()
    assert not (other / _persist.JOURNAL).exists()
    _assert_changed(other, t)
    validate_stack(read_zarr(other))
    # an unfinished new store (no journal) is discarded and the existing store kept
    unfinished = tmp_path / "other.zarr.asign_new"
    unfinished.mkdir()
    persist(backed, path=tmp_path / "third.zarr", strategy="new_store")
    assert recover(other) == [] and not unfinished.exists() and other.exists()


def test_a_file_at_path_is_refused_and_kept(tiny, tmp_path):
    """A file at `path` is the user's: refused up front, never renamed or deleted (it was moved to .asign_old and
    the write failed in rmtree before)."""
    afile = tmp_path / "out"
    afile.write_text("user file")
    for kwargs in ({}, {"overwrite": True}):
        with pytest.raises(FileExistsError, match="is a file, not a zarr store"):
            persist(tiny, path=afile, **kwargs)
        assert afile.read_text() == "user file"
        assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]
        assert tiny.path is None
    with pytest.raises(FileExistsError, match="is a file, not a zarr store"):
        recover(afile)
    assert afile.read_text() == "user file"


@pytest.mark.parametrize("leftover", [_persist.OLD_STORE_SUFFIX, _persist.NEW_STORE_SUFFIX])
def test_a_leftover_file_next_to_the_store_is_removed(tiny, tmp_path, leftover):
    """A file left as `<path>.asign_old` / `.asign_new` (by an earlier version) no longer blocks recover and persist."""
    path = tmp_path / "s.zarr"
    persist(tiny, path=path)
    stray = tmp_path / ("s.zarr" + leftover)
    stray.write_text("left over")
    assert recover(path) == []
    assert not stray.exists()
    stray.write_text("left over")
    tiny.path = None
    persist(tiny, path=path, overwrite=True)
    assert not stray.exists() and tiny.path == path
    validate_stack(read_zarr(path))


def _moved(shapes, dx=1.0):
    return ShapesModel.parse(
        np.column_stack([shapes.geometry.x + dx, shapes.geometry.y]),
        geometry=0,
        radius=shapes["radius"].to_numpy(),
        index=shapes.index,
        transformations={"S2": Identity()},
    )


def test_changed_shapes_not_named_are_reported(backed, asign_log):
    """A shapes element changed in memory but not named is not written: a warning says so and how to write it (the
    store was left disagreeing with the object without a word before)."""
    path = backed.path
    _change(backed)
    persist(backed)
    assert not asign_log.warnings  # nothing left out
    old = backed.shapes["spots_S2"]
    backed.shapes["spots_S2"] = _moved(old)
    persist(backed)
    assert "Shapes ['spots_S2'] differ from those in" in asign_log.warnings
    assert "elements=[..., 'spots_S2']" in asign_log.warnings
    np.testing.assert_allclose(read_zarr(path).shapes["spots_S2"].geometry.x, old.geometry.x)  # not written
    asign_log.records.clear()
    persist(backed, ["table", "spots_S2"])
    assert not asign_log.warnings
    np.testing.assert_allclose(read_zarr(path).shapes["spots_S2"].geometry.x, old.geometry.x + 1.0)
    # a change of another column (not of the geometry) counts too
    backed.shapes["spots_S1"]["radius"] = backed.shapes["spots_S1"]["radius"] * 2
    persist(backed, "table", write_new=False)
    assert "Shapes ['spots_S1'] differ" in asign_log.warnings


def test_replaced_image_is_reported(backed, asign_log):
    from spatialdata.models import Image2DModel

    backed.images["he_S1"] = Image2DModel.parse(
        np.zeros((3, 64, 64), dtype=np.uint8), dims=("c", "y", "x"), transformations={"S1": Identity()}
    )
    persist(backed)
    assert "images ['he_S1'] in memory are not the ones in" in asign_log.warnings
    assert "strategy='new_store'" in asign_log.warnings
    assert _pixels(read_zarr(backed.path).images["he_S1"]).any()  # the store keeps its image


def test_objects_written_from_memory_are_not_reported(tiny, tmp_path, asign_log):
    """The images that persist wrote from memory are what the store holds (no false alarm on the next persist)."""
    from asign.io._persist import _unwritten_changes

    path = tmp_path / "s.zarr"
    persist(tiny, path=path)
    _change(tiny)
    persist(tiny)
    persist(copy.deepcopy(tiny))
    assert not asign_log.warnings
    assert _unwritten_changes(read_zarr(path), path, set()) == {}


def _v2_store(tiny, path):
    """A stack written in the Zarr v2 layout (spatialdata's container format 0.1), read back."""
    from spatialdata._io.format import SpatialDataContainerFormatV01

    tiny.write(path, sdata_formats=[SpatialDataContainerFormatV01()])
    assert (path / ".zgroup").is_file() and not (path / "zarr.json").exists()
    return read_zarr(path)


@pytest.mark.parametrize("strategy", ["temp_element", "temp_store"])
def test_interrupted_while_the_copy_is_deleted_keeps_the_rewritten_original(backed, monkeypatch, strategy):
    """The copy is deleted folder by folder once the original is rewritten; an interruption part-way used to leave
    it journalled as "replacing", and the next recover moved the half-deleted copy over the good table."""
    path = backed.path
    t = _change(backed)
    copy = (
        path / "tables" / ("table" + TMP_SUFFIX) if strategy == "temp_element" else path.parent / "stack.zarr.asign_tmp"
    )
    real_rmtree = shutil.rmtree

    def rmtree(target, *args, **kwargs):
        # once the copy is complete and journalled (deletions while it is written pass), die after its obs/ is
        # gone and before its journal is
        if any(copy.rglob(_persist.JOURNAL)) and str(target).rstrip("/") == str(copy):
            real_rmtree(next(copy.rglob("obs")))
            msg = "simulated crash while the copy is deleted"
            raise RuntimeError(msg)
        return real_rmtree(target, *args, **kwargs)

    monkeypatch.setattr(shutil, "rmtree", rmtree)
    with pytest.raises(RuntimeError, match="while the copy is deleted"):  # (zarr runs its deletions in a thread)
        persist(backed, strategy=strategy)
    monkeypatch.undo()
    assert copy.exists() and not list(copy.rglob("obs"))
    assert recover(path) == []  # the journal says the original was rewritten: the copy is only removed
    assert not copy.exists()
    assert _tables_on_disk(path) == ["table"]
    _assert_changed(path, t)
    validate_stack(read_zarr(path))


def test_replacing_copy_that_does_not_verify_is_refused(backed, monkeypatch):
    """A copy journalled as "replacing" is moved into place only if it matches what was verified; otherwise an
    error, and nothing is changed (the good original used to be deleted and replaced by it)."""
    path = backed.path
    _change(backed)
    _persist_crashing_in_delete(backed, monkeypatch)
    copy = path / "tables" / ("table" + TMP_SUFFIX)
    assert _persist._journal_state(copy) == "replacing"
    shutil.rmtree(copy / "obsm" / "asign_test")  # the copy lost a part after it was verified: it still reads
    before = sorted(p.relative_to(path) for p in path.rglob("*"))
    with pytest.raises(OSError, match=r"is not moved into place: what it holds differs.*Nothing was changed"):
        recover(path)
    with pytest.raises(OSError, match="is not moved into place"):
        persist(read_zarr(path, selection=("images", "shapes")))
    assert sorted(p.relative_to(path) for p in path.rglob("*")) == before


def test_temp_store_keeps_a_zarr_v2_store_v2(tiny, tmp_path, monkeypatch):
    """strategy="temp_store" wrote its copy in Zarr v3; moved into a v2 store by recover, the store no longer
    opened. The copy is now written in the store's own format."""
    path = tmp_path / "v2.zarr"
    sdata = _v2_store(tiny, path)
    t = _change(sdata)
    real_write = SpatialData.write_element
    calls = []

    def crash_on_final_write(self, element_name, *args, **kwargs):
        calls.append(element_name)
        if element_name == "table" and self.path == path:
            msg = "simulated crash"
            raise RuntimeError(msg)
        return real_write(self, element_name, *args, **kwargs)

    monkeypatch.setattr(SpatialData, "write_element", crash_on_final_write)
    with pytest.raises(RuntimeError, match="simulated crash"):
        persist(sdata, strategy="temp_store")
    monkeypatch.undo()
    copy = tmp_path / "v2.zarr.asign_tmp" / "tables" / "table"
    assert (copy / ".zgroup").is_file() and not (copy / "zarr.json").exists()
    assert "table" not in _tables_on_disk(path)
    assert recover(path) == ["table"]
    assert (path / "tables" / "table" / ".zgroup").is_file()
    _assert_changed(path, t)
    # a complete write keeps the store in Zarr v2 too
    sdata = read_zarr(path)
    sdata.tables["table"].obs["asign_test"] = 2.0
    persist(sdata, strategy="temp_store")
    back = read_zarr(path)
    np.testing.assert_array_equal(back.tables["table"].obs["asign_test"], 2.0)
    assert not list(path.rglob("zarr.json")) and not (tmp_path / "v2.zarr.asign_tmp").exists()
    validate_stack(back)


def test_copy_in_another_zarr_format_is_refused(tiny, tmp_path):
    """A Zarr v3 copy (left by an earlier version's temp_store) is never moved into a Zarr v2 store."""
    path = tmp_path / "v2.zarr"
    sdata = _v2_store(tiny, path)
    tstore = tmp_path / "v2.zarr.asign_tmp"
    SpatialData(tables={"table": sdata.tables["table"]}).write(tstore)  # Zarr v3
    _persist._journal(tstore / "tables" / "table", "replacing")
    with pytest.raises(OSError, match=r"written in Zarr v3 and the store in Zarr v2.*Nothing was changed"):
        recover(path)
    assert (tstore / "tables" / "table").is_dir() and (path / "tables" / "table" / ".zgroup").is_file()


def test_temp_store_refused_for_a_store_of_unknown_format(backed):
    import zarr

    root = zarr.open_group(backed.path, mode="r+", use_consolidated=False)
    root.attrs["spatialdata_attrs"] = {"version": "9.9"}
    _change(backed)
    with pytest.raises(ValueError, match="strategy='temp_store' cannot write its copy.*Use strategy='temp_element'"):
        persist(backed, strategy="temp_store")
    assert not (backed.path.parent / "stack.zarr.asign_tmp").exists()
    assert _tables_on_disk(backed.path) == ["table"]


# ---------------------------------------------------------------------------------------------------------------
# the transformations change with the tables; an element written from memory is never left half-written
# ---------------------------------------------------------------------------------------------------------------
def _new_transformations(sdata):
    """Give he_S1 and spots_S1 a new coordinate system "aligned" (every transformation type) and return them."""
    from spatialdata.transformations import MapAxis, Scale, Sequence, Translation

    A = Affine(np.array([[0.6, -0.8, 123.456789012345], [0.8, 0.6, -7.1], [0.0, 0.0, 1.0]]), ("x", "y"), ("x", "y"))
    t = Sequence(
        [
            get_transformation(sdata["he_S1"], "S1"),
            Scale([1.0 / 3.0, 2.0], axes=("x", "y")),
            Translation([np.pi, -1e-17], axes=("x", "y")),
            MapAxis({"x": "y", "y": "x"}),
            A,
        ]
    )
    for name in ("he_S1", "spots_S1"):
        set_transformation(sdata[name], t, to_coordinate_system="aligned")
    return t


def _same_transformation(a, b):
    """Exact equality (spatialdata's == compares matrices up to rounding)."""
    return a.to_affine_matrix(("x", "y"), ("x", "y")).tobytes() == b.to_affine_matrix(("x", "y"), ("x", "y")).tobytes()


def test_transformations_journal_round_trips_exactly():
    from spatialdata.transformations import MapAxis, Scale, Sequence, Translation

    ts = [
        Identity(),
        MapAxis({"x": "y", "y": "x"}),
        Translation([0.1, 1e-300], axes=("x", "y")),
        Scale([1.0 / 3.0, 7.0], axes=("y", "x")),
        Affine(np.array([[np.pi, 0.0, -1.0 / 7.0], [np.e, 1.0, 2.0], [0.0, 0.0, 1.0]]), ("x", "y"), ("x", "y")),
    ]
    ts.append(Sequence([*ts, Sequence(ts[1:3])]))
    import json

    for t in ts:
        back = _persist._transformation_from_json(json.loads(json.dumps(_persist._transformation_to_json(t))))
        assert type(back) is type(t) and back == t and _same_transformation(back, t)
        assert _persist._transformation_to_json(back) == _persist._transformation_to_json(t)


@pytest.mark.parametrize("via", ["recover", "persist"])
def test_interrupted_between_tables_and_transformations_is_completed(backed, monkeypatch, via):
    """persist wrote the tables, then the transformations: a crash in between left the new table with the old
    transformations (a mixed store that recover did not notice). The journal completes the transformations."""
    path = backed.path
    t = _change(backed)
    new = _new_transformations(backed)

    def crash(self, element_name=None):
        raise KeyboardInterrupt

    monkeypatch.setattr(SpatialData, "write_transformations", crash)
    with pytest.raises(KeyboardInterrupt):
        persist(backed)
    monkeypatch.undo()
    assert (path / _persist.TRANSFORMS_JOURNAL).is_file()
    mixed = read_zarr(path)  # the table is the new one, the transformations the old ones
    assert "asign_test" in mixed.tables["table"].obs and "aligned" not in mixed.coordinate_systems
    if via == "recover":
        assert recover(mixed) == []
        for name in ("he_S1", "spots_S1"):  # also in memory
            assert _same_transformation(get_transformation(mixed[name], "aligned"), new)
    else:  # the same session persists again: the repair runs first
        persist(backed)
    assert not (path / _persist.TRANSFORMS_JOURNAL).exists()
    back = read_zarr(path)
    _assert_changed(path, t)
    for name in ("he_S1", "spots_S1"):
        tf = get_transformation(back[name], get_all=True)
        assert set(tf) == {"S1", "aligned"} and _same_transformation(tf["aligned"], new)
    assert "aligned" not in get_transformation(back["he_S2"], get_all=True)
    validate_stack(back)


@pytest.mark.parametrize("when", ["before_journal", "before_replacing", "while_replacing"])
def test_interrupted_persist_leaves_tables_and_transformations_that_agree(backed, monkeypatch, when):
    """Before the journal or before the table is touched: the old table and transformations. Once the table is
    being replaced (its verified copy journalled): the new table and the new transformations."""
    path = backed.path
    before = read_zarr(path).tables["table"].X.toarray()
    t = _change(backed)
    new = _new_transformations(backed)
    real_store_journal, real_journal = _persist._store_journal, _persist._journal

    def store_journal(store, name, state, payload=None):
        if when == "before_journal" and name == _persist.TRANSFORMS_JOURNAL:
            raise KeyboardInterrupt
        return real_store_journal(store, name, state, payload)

    def journal(folder, state, **kwargs):
        if when == "before_replacing" and state == "replacing":
            raise KeyboardInterrupt
        return real_journal(folder, state, **kwargs)

    def delete(self, element_name):
        raise KeyboardInterrupt

    monkeypatch.setattr(_persist, "_store_journal", store_journal)
    monkeypatch.setattr(_persist, "_journal", journal)
    if when == "while_replacing":
        monkeypatch.setattr(SpatialData, "delete_element_from_disk", delete)
    with pytest.raises(KeyboardInterrupt):
        persist(backed)
    monkeypatch.undo()
    assert (path / _persist.TRANSFORMS_JOURNAL).is_file() == (when != "before_journal")
    assert recover(path) == (["table"] if when == "while_replacing" else [])
    assert not (path / _persist.TRANSFORMS_JOURNAL).exists()
    back = read_zarr(path)
    validate_stack(back)
    if when == "while_replacing":
        _assert_changed(path, t)
        assert _same_transformation(get_transformation(back["spots_S1"], "aligned"), new)
    else:
        np.testing.assert_array_equal(back.tables["table"].X.toarray(), before)
        assert "asign_test" not in back.tables["table"].obs and "aligned" not in back.coordinate_systems


def test_interrupted_write_of_a_new_element_is_removed(backed, monkeypatch, asign_log):
    """A crash while persist wrote a table that existed only in memory left a partial table with no journal; the
    repair now removes it (and says so), and the next persist writes it whole."""
    import anndata as ad
    import anndata._io.specs.registry as registry

    path = backed.path
    zz = ad.AnnData(np.ones((3, 2), dtype=np.float32), obs={"a": ["x", "y", "z"]}, uns={"k": {"v": 1}})
    backed.tables["zz"] = zz
    real_write_elem = registry.Writer.write_elem

    def write_elem(self, store, key, elem, *args, **kwargs):
        if key == "uns" and "zz" in str(getattr(store, "path", store)):
            raise KeyboardInterrupt
        return real_write_elem(self, store, key, elem, *args, **kwargs)

    monkeypatch.setattr(registry.Writer, "write_elem", write_elem)
    with pytest.raises(KeyboardInterrupt):
        persist(backed)
    monkeypatch.undo()
    assert (path / "tables" / "zz").is_dir() and (path / _persist.NEW_ELEMENT_JOURNAL).is_file()
    assert recover(path) == []
    assert "Removed tables/zz" in asign_log.warnings
    assert not (path / "tables" / "zz").exists() and not (path / _persist.NEW_ELEMENT_JOURNAL).exists()
    back = read_zarr(path)
    assert list(back.tables) == ["table"]
    validate_stack(back)
    persist(backed)  # the object still holds it: written whole
    back = read_zarr(path)
    assert back.tables["zz"].uns["k"] == {"v": 1} and list(back.tables["zz"].obs["a"]) == ["x", "y", "z"]


def _new_image(sdata):
    from spatialdata.models import Image2DModel

    pix = np.random.default_rng(0).integers(1, 255, size=(3, 32, 32)).astype(np.uint8)
    sdata.images["mask_S1"] = Image2DModel.parse(pix, dims=("c", "y", "x"), transformations={"S1": Identity()})
    return pix


def test_new_element_written_whole_is_kept_by_the_repair(backed, monkeypatch):
    """A new image written whole, the process dies before its journal is dropped: a new session's persist used to
    remove the folder that its freshly read image reads from, then write the image back as zeros."""
    path = backed.path
    pix = _new_image(backed)

    def drop(store, name):
        raise KeyboardInterrupt

    monkeypatch.setattr(_persist, "_drop_store_journal", drop)
    with pytest.raises(KeyboardInterrupt):
        persist(backed)
    monkeypatch.undo()
    assert (path / _persist.NEW_ELEMENT_JOURNAL).read_text().startswith("written")
    sd2 = read_zarr(path)
    persist(sd2)
    assert not (path / _persist.NEW_ELEMENT_JOURNAL).exists()
    np.testing.assert_array_equal(_pixels(read_zarr(path).images["mask_S1"]), pix)


def test_element_read_from_a_removed_partial_element_is_refused(backed, monkeypatch):
    """The repair removes a partial new image; an object that reads it lazily from the removed folder must not be
    written (Zarr would fill the missing chunks with zeros)."""
    path = backed.path
    _new_image(backed)
    real = _persist._store_journal

    def store_journal(store, name, state, payload=None):
        if state == "written":
            raise KeyboardInterrupt  # written, but not yet journalled as whole: the repair removes it
        return real(store, name, state, payload)

    monkeypatch.setattr(_persist, "_store_journal", store_journal)
    with pytest.raises(KeyboardInterrupt):
        persist(backed)
    monkeypatch.undo()
    sd2 = read_zarr(path)
    assert "mask_S1" in sd2.images
    with pytest.raises(OSError, match=r"images/mask_S1 .*only partly written by an interrupted persist"):
        persist(sd2)
    assert not (path / "images" / "mask_S1").exists()
    with pytest.raises(OSError, match="images/mask_S1"):  # also when the repair ran in an earlier call
        persist(sd2)
    del sd2.images["mask_S1"]
    persist(sd2)
    assert "mask_S1" not in read_zarr(path).images


@pytest.mark.parametrize("when", ["before_replacing", "after_replaced"])
def test_pending_transformations_follow_the_journals_not_the_table_content(backed, monkeypatch, when):
    """Only obs values change (same columns, same X): the table's fingerprint cannot tell old from new, so the
    repair used to roll the new transformations forward onto the old table. The journals decide now."""
    path = backed.path
    t = backed.tables["table"]
    old_obs = read_zarr(path).tables["table"].obs.copy()
    col = old_obs.columns[0]
    t.obs[col] = t.obs[col].iloc[::-1].to_numpy()  # new values, same keys and sums
    new = _new_transformations(backed)
    real_journal, real_store_journal = _persist._journal, _persist._store_journal

    def journal(folder, state, **kwargs):
        if when == "before_replacing" and state == "replacing":
            raise KeyboardInterrupt
        return real_journal(folder, state, **kwargs)

    def store_journal(store, name, state, payload=None):
        if when == "after_replaced" and name == _persist.TRANSFORMS_JOURNAL and state == "writing":
            raise KeyboardInterrupt  # the table is replaced, its copy deleted; transformations not yet written
        return real_store_journal(store, name, state, payload)

    monkeypatch.setattr(_persist, "_journal", journal)
    monkeypatch.setattr(_persist, "_store_journal", store_journal)
    with pytest.raises(KeyboardInterrupt):
        persist(backed)
    monkeypatch.undo()
    recover(path)
    back = read_zarr(path)
    assert not (path / _persist.TRANSFORMS_JOURNAL).exists()
    if when == "before_replacing":
        assert back.tables["table"].obs[col].tolist() == old_obs[col].tolist()
        assert "aligned" not in back.coordinate_systems
    else:
        assert back.tables["table"].obs[col].tolist() == t.obs[col].tolist()
        assert _same_transformation(get_transformation(back["spots_S1"], "aligned"), new)


def test_persist_of_a_store_read_after_a_crash(backed, monkeypatch):
    """read_zarr lists the leftover copy as a table; persist took it into the names before dropping it."""
    path = backed.path
    t = _change(backed)

    def journal(folder, state, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(_persist, "_journal", journal)
    with pytest.raises(KeyboardInterrupt):
        persist(backed)
    monkeypatch.undo()
    sd2 = read_zarr(path)
    assert "table" + TMP_SUFFIX in sd2.tables
    persist(sd2)
    assert list(sd2.tables) == ["table"] and _tables_on_disk(path) == ["table"]
    persist(backed)
    _assert_changed(path, t)


def test_users_element_ending_in_the_temp_suffix_is_kept(backed, asign_log):
    import anndata as ad

    path = backed.path
    backed.tables["qc" + TMP_SUFFIX] = ad.AnnData(np.arange(6, dtype=np.float32).reshape(3, 2))
    backed.write_element("qc" + TMP_SUFFIX)
    assert recover(path) == []
    assert "qc" + TMP_SUFFIX in _tables_on_disk(path)
    assert "no copy journalled by persist" in asign_log.warnings
    sd2 = read_zarr(path)
    persist(sd2)
    assert "qc" + TMP_SUFFIX in sd2.tables and "qc" + TMP_SUFFIX in _tables_on_disk(path)


@pytest.mark.skipif(not Path("/proc/self/fd").is_dir(), reason="needs /proc to name synced files")
def test_copy_and_rewritten_original_are_synced_before_their_journal(backed, monkeypatch):
    import os

    path = backed.path
    _change(backed)
    events, real_fsync, real_journal = [], os.fsync, _persist._journal

    def fsync(fd):
        events.append(("fsync", os.readlink(f"/proc/self/fd/{fd}")))
        return real_fsync(fd)

    def journal(folder, state, **kwargs):
        events.append(("journal", state))
        return real_journal(folder, state, **kwargs)

    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(_persist, "_journal", journal)
    persist(backed)
    monkeypatch.undo()
    replacing, done = events.index(("journal", "replacing")), events.index(("journal", "done"))
    copy, original = str(path / "tables" / ("table" + TMP_SUFFIX)), str(path / "tables" / "table")
    synced_copy = {f for e, f in events[:replacing] if e == "fsync" and f.startswith(copy + "/")}
    synced_orig = {f for e, f in events[replacing:done] if e == "fsync" and f.startswith(original + "/")}
    for synced in (synced_copy, synced_orig):  # the data and the metadata of the table, not only the journal
        assert any("/X/" in f for f in synced) and any(f.endswith(("zarr.json", ".zattrs")) for f in synced)
