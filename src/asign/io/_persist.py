"""Write results to a zarr store without ever losing the user's data.

``SpatialData.write_element(name, overwrite=True)`` refuses to overwrite an element inside the object's own store
(spatialdata#1237), and ``delete_element_from_disk`` followed by ``write_element`` loses the element if the process
dies in between. :func:`persist` therefore always keeps a verified copy on disk while an element is replaced, with a
journal file in the copy that says when the original starts to change, and :func:`recover` (whose file-level repair
every :func:`persist` runs first) restores an element from that copy after an interruption.
"""

from __future__ import annotations

import shutil
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import numpy as np

from asign._logging import logger

if TYPE_CHECKING:
    from spatialdata import SpatialData

TMP_SUFFIX = "_asign_tmp"
TMP_STORE_SUFFIX = ".asign_tmp"
NEW_STORE_SUFFIX = ".asign_new"
OLD_STORE_SUFFIX = ".asign_old"
# journal file inside a verified copy: "verified", then "replacing" once the original is about to be deleted
JOURNAL = "asign_persist_journal"
# element types that are eager in memory and can be rewritten safely (images, labels and points are lazy: their
# data may still be read from the files that a rewrite would delete)
_REWRITABLE = ("tables", "shapes")
# lazy element types: persist never rewrites them once they are on disk
_LAZY = ("images", "labels", "points")
# per store (resolved path): the dask names of the lazy elements that persist wrote there from memory (such an element
# is not read back, so it is not backed by the store's files although it is what the store holds)
_WRITTEN_LAZY: dict[str, dict[tuple[str, str], tuple[str, ...]]] = {}


def _disk_names(store: Path, kind: str) -> list[str]:
    folder = Path(store) / kind
    if not folder.is_dir():
        return []
    return sorted(p.name for p in folder.iterdir() if p.is_dir())


def _element_kind(sdata: SpatialData, name: str) -> str | None:
    for kind in ("images", "labels", "points", "shapes", "tables"):
        if name in getattr(sdata, kind):
            return kind
    return None


def _read_disk(store: Path, kind: str, name: str) -> Any | None:
    """Read one table or shapes element from a store, or `None` if it is absent or unreadable."""
    path = Path(store) / kind / name
    if not path.is_dir():
        return None
    try:
        if kind == "tables":
            import anndata as ad

            table = ad.read_zarr(path)
            attrs = table.uns.get("spatialdata_attrs")
            if isinstance(attrs, dict) and isinstance(attrs.get("region"), np.ndarray):
                attrs["region"] = attrs["region"].tolist()  # as spatialdata's reader returns it
            return table
        from spatialdata import read_zarr

        return read_zarr(store, selection=(kind,))[name]
    except Exception as e:  # noqa: BLE001 - any failure to read means the copy is not usable
        logger.warning(f"Could not read {kind}/{name} from {store}: {e}")
        return None


def _same(disk: Any, mem: Any) -> bool:
    """Cheap but content-sensitive comparison of an element read back from disk with the in-memory one."""
    from anndata import AnnData

    if disk is None:
        return False
    if isinstance(mem, AnnData):
        if disk.shape != mem.shape or not disk.obs_names.equals(mem.obs_names):
            return False
        if not disk.var_names.equals(mem.var_names):
            return False
        if set(disk.obs.columns) != set(mem.obs.columns) or set(disk.obsm) != set(mem.obsm):
            return False
        if set(disk.layers) != set(mem.layers) or set(disk.obsp) != set(mem.obsp) or set(disk.uns) != set(mem.uns):
            return False
        for a, b in [(disk.X, mem.X)] + [(disk.layers[k], mem.layers[k]) for k in mem.layers]:
            if (a is None) != (b is None):
                return False
            if a is not None and not np.isclose(_nansum(a), _nansum(b), rtol=1e-6, atol=1e-6):
                return False
        return True
    # shapes
    if len(disk) != len(mem) or not np.array_equal(disk.index.to_numpy(), mem.index.to_numpy()):
        return False
    return bool(np.allclose(disk.total_bounds, mem.total_bounds, equal_nan=True))


def _nansum(X) -> float:
    import scipy.sparse as sp

    data = X.data if sp.issparse(X) else np.asarray(X)
    return float(np.nansum(np.asarray(data, dtype=float)))


def _verify(store: Path, kind: str, name: str, element: Any) -> None:
    if not _same(_read_disk(store, kind, name), element):
        msg = (
            f"Verification of {kind}/{name} written to {store} failed: what was read back differs from the "
            "in-memory element. Nothing else was changed; check the disk and retry."
        )
        raise OSError(msg)


def _temp_store(store: Path) -> Path:
    store = Path(store)
    return store.with_name(store.name + TMP_STORE_SUFFIX)


def _journal(path: Path, state: str) -> None:
    """Record the state of a verified copy in a small file inside it (atomic: written, then renamed)."""
    tmp = Path(path) / (JOURNAL + ".part")
    tmp.write_text(state + "\n")
    tmp.replace(Path(path) / JOURNAL)


def _journal_state(path: Path) -> str | None:
    """The journal state of a copy.

    ``"verified"`` (the copy is complete; its original was not touched yet), ``"replacing"`` (the original may be
    partly deleted or rewritten) or `None` (no journal: the copy itself may be incomplete).
    """
    f = Path(path) / JOURNAL
    if not f.is_file():
        return None
    state = f.read_text().strip()
    return state if state in ("verified", "replacing") else None


def _drop_journal(path: Path) -> None:
    for name in (JOURNAL, JOURNAL + ".part"):
        (Path(path) / name).unlink(missing_ok=True)


def _remove(path: Path) -> None:
    """Remove a leftover of an earlier write: a folder with its content, or a file."""
    path = Path(path)
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    elif path.exists() or path.is_symlink():
        path.unlink()


def _move_into_place(copy: Path, target: Path) -> None:
    """Replace ``target`` by the verified ``copy`` (a rename on the same file system)."""
    if target.exists():
        _remove(target)
    copy.rename(target)
    _drop_journal(target)


def _reconsolidate(store: Path) -> None:
    """Rewrite the store's consolidated metadata from what is on disk (public API only needs ``path``)."""
    from spatialdata import SpatialData

    empty = SpatialData()
    empty.path = Path(store)
    empty.write_consolidated_metadata()


def _swap_in(new: Path, path: Path, old: Path) -> None:
    """Put the verified store ``new`` at ``path``, keeping the previous one as ``old`` (two renames)."""
    if path.exists():
        if old.exists():
            _remove(old)
        path.rename(old)
    new.rename(path)
    _drop_journal(path)


def _repair_new_store(path: Path) -> bool:
    """Finish or undo an interrupted ``strategy="new_store"`` swap of ``path``; `True` if anything was done."""
    path = Path(path)
    new, old = _sibling(path, NEW_STORE_SUFFIX), _sibling(path, OLD_STORE_SUFFIX)
    done = False
    if new.exists():
        if _journal_state(new) is not None:  # verified: complete the swap
            _swap_in(new, path, old)
            logger.warning(f"Completed the interrupted replacement of {path} with its verified new version.")
        else:  # the new store was not finished: the existing one is untouched
            _remove(new)
        done = True
    if old.exists():
        if path.exists():
            _remove(old)
        else:  # cannot happen with the journal, but never lose the only copy
            old.rename(path)
            logger.warning(f"Restored {path} from {old} left by an interrupted write.")
        done = True
    return done


def _repair_files(store: Path) -> list[str]:
    """File-level repair of a store after an interrupted :func:`persist`; returns the restored element names.

    A copy whose journal says ``"replacing"`` is moved into place (its original may be incomplete); any other
    leftover copy is removed (the original was not touched). Reads nothing with spatialdata, so it also works on a
    store that :func:`spatialdata.read_zarr` can no longer open.
    """
    store = Path(store)
    restored: list[str] = []
    changed = False
    for kind in _REWRITABLE:
        for tmp in [n for n in _disk_names(store, kind) if n.endswith(TMP_SUFFIX)]:
            name = tmp[: -len(TMP_SUFFIX)]
            if _journal_state(store / kind / tmp) == "replacing":
                _move_into_place(store / kind / tmp, store / kind / name)
                restored.append(name)
            else:
                shutil.rmtree(store / kind / tmp)
            changed = True
        for name in _disk_names(store, kind):  # a journal left inside an element after a completed restore
            if (store / kind / name / JOURNAL).exists():
                _drop_journal(store / kind / name)
    tstore = _temp_store(store)
    if tstore.exists():
        for kind in _REWRITABLE:
            for name in _disk_names(tstore, kind):
                if _journal_state(tstore / kind / name) == "replacing":
                    (store / kind).mkdir(parents=True, exist_ok=True)
                    _move_into_place(tstore / kind / name, store / kind / name)
                    restored.append(name)
        _remove(tstore)
        changed = True
    if changed:
        _reconsolidate(store)
    for name in restored:
        logger.warning(f"Restored {name!r} in {store} from the verified copy left by an interrupted write.")
    return restored


def recover(sdata: SpatialData | str | Path) -> list[str]:
    """Repair a store after an interrupted :func:`asign.io.persist`.

    :func:`persist` writes a verified copy of an element before it touches the original, and journals when it starts
    replacing the original. A copy whose original was being replaced is moved into place (the original may be
    incomplete); a copy whose original was not touched yet, or that is itself incomplete, is removed; an interrupted
    ``strategy="new_store"`` swap is completed (or undone if the new store was not finished). Then the consolidated
    metadata are rewritten from what is on disk.

    Parameters
    ----------
    sdata
        A stack backed by a zarr store (others are left alone), or the path of a store. Give the path when
        :func:`spatialdata.read_zarr` cannot open the store: the repair works on the files.

    Returns
    -------
    The names of the restored elements. For a stack, restored elements are also read back into memory (the object
    may hold what was read from the incomplete original).
    """
    if not hasattr(sdata, "tables"):
        path = Path(sdata)
        _refuse_file(path)
        _repair_new_store(path)
        if not path.exists():
            msg = f"{path} does not exist (and no interrupted write of it was found)."
            raise FileNotFoundError(msg)
        return _repair_files(path)
    if sdata.path is None:
        return []
    store = Path(sdata.path)
    restored = _repair_files(store)
    for name in restored:
        kind = _element_kind(sdata, name) or _kind_on_disk(store, name)
        element = _read_disk(store, kind, name)
        if element is None:
            msg = f"{kind}/{name} in {store} was restored from its verified copy but cannot be read back."
            raise OSError(msg)
        getattr(sdata, kind)[name] = element
    for kind in _REWRITABLE:  # copies read by read_zarr as elements of their own
        for name in [n for n in getattr(sdata, kind) if n.endswith(TMP_SUFFIX)]:
            del getattr(sdata, kind)[name]
    return restored


def _kind_on_disk(store: Path, name: str) -> str:
    for kind in _REWRITABLE:
        if name in _disk_names(store, kind):
            return kind
    msg = f"{name!r} not found in {store}."
    raise KeyError(msg)


def _sibling(path: Path, suffix: str) -> Path:
    return path.with_name(path.name + suffix)


def _refuse_file(path: Path) -> None:
    """A zarr store is a folder: a file at ``path`` is the user's and is never replaced or moved."""
    if path.exists() and not path.is_dir():
        msg = f"{path} is a file, not a zarr store (a folder); persist never replaces a file: choose another path."
        raise FileExistsError(msg)


def _write_new_store(sdata: SpatialData, path: Path, *, overwrite: bool) -> None:
    if sdata.path is not None and Path(sdata.path).resolve() == path.resolve():
        msg = (
            "strategy='new_store' needs a `path` other than the object's own store (its lazy data are read from "
            "there); write to a new path."
        )
        raise ValueError(msg)
    _refuse_file(path)
    _repair_new_store(path)
    if path.exists() and not overwrite:
        msg = (
            f"{path} exists; pass overwrite=True to replace it (the old store is kept until the new one is "
            "written and verified)."
        )
        raise FileExistsError(msg)
    new, old = _sibling(path, NEW_STORE_SUFFIX), _sibling(path, OLD_STORE_SUFFIX)
    if new.exists() or new.is_symlink():
        _remove(new)
    sdata.write(new, update_sdata_path=False)
    for kind in _REWRITABLE:
        for name, el in getattr(sdata, kind).items():
            _verify(new, kind, name, el)
    _journal(new, "verified")  # from here on, an interrupted swap is completed by the next call
    _swap_in(new, path, old)
    if old.exists():
        _remove(old)
    sdata.path = path
    _WRITTEN_LAZY[str(path.resolve())] = {
        (kind, name): _lazy_token(el) for kind in _LAZY for name, el in getattr(sdata, kind).items()
    }
    logger.info(f"Wrote the stack to {path}.")


def _lazy_token(element: Any) -> tuple[str, ...]:
    """The dask names of a lazy element's data (every scale of a multiscale image): they change with its data."""
    from xarray import DataArray, DataTree

    if isinstance(element, DataTree):
        arrays = [v.data for node in element.subtree for v in node.ds.data_vars.values()]
    elif isinstance(element, DataArray):
        arrays = [element.data]
    else:  # points (a dask data frame)
        arrays = [element]
    return tuple(str(getattr(a, "_name", None) or getattr(a, "name", None) or id(a)) for a in arrays)


def _backed_by(element: Any, folder: Path) -> bool | None:
    """Whether every file that a lazy element reads is in ``folder``; `None` if the dask graph cannot tell."""
    from spatialdata._io._utils import get_dask_backing_files

    try:
        files = get_dask_backing_files(element)
    except Exception as e:  # noqa: BLE001 - an unknown graph layout: no verdict rather than a false alarm
        logger.debug(f"Could not find the files that {folder.name} is read from: {e}")
        return None
    folder = folder.resolve()
    return bool(files) and all(Path(f).resolve().is_relative_to(folder) for f in files)


def _same_shapes(disk: Any, mem: Any) -> bool:
    """Exact comparison of a shapes element on disk with the in-memory one: index, geometry and the other columns."""
    if len(disk) != len(mem) or not disk.index.equals(mem.index) or list(disk.columns) != list(mem.columns):
        return False
    dg, mg = disk.geometry, mem.geometry
    if (dg.geom_type == "Point").all() and (mg.geom_type == "Point").all():
        if not (np.array_equal(dg.x.to_numpy(), mg.x.to_numpy()) and np.array_equal(dg.y.to_numpy(), mg.y.to_numpy())):
            return False
    elif not bool(np.all(dg.geom_equals_exact(mg, tolerance=0.0, align=False))):
        return False
    for col in disk.columns:
        if col == disk.geometry.name:
            continue
        a, b = disk[col].to_numpy(), mem[col].to_numpy()
        numeric = a.dtype.kind in "biuf" and b.dtype.kind in "biuf"
        if a.shape != b.shape or not (np.array_equal(a, b, equal_nan=True) if numeric else np.array_equal(a, b)):
            return False
    return True


def _unwritten_changes(sdata: SpatialData, store: Path, skip: set[str]) -> dict[str, list[str]]:
    """Elements on disk, not in ``skip``, whose in-memory version is not what the store holds: ``{kind: names}``.

    Shapes elements are compared with the disk (index, geometry, other columns); an image, labels or points element
    counts as unchanged when it reads its data from its own folder of the store, or when :func:`persist` wrote it
    there from memory and its data were not replaced since.
    """
    out: dict[str, list[str]] = {}
    names = [n for n in set(_disk_names(store, "shapes")) & set(sdata.shapes) if n not in skip]
    if names:
        from spatialdata import read_zarr

        try:
            disk = read_zarr(store, selection=("shapes",)).shapes
        except Exception as e:  # noqa: BLE001 - no verdict rather than a failed write
            logger.warning(f"Could not read the shapes of {store} to compare them with the object: {e}")
            disk = {}
        changed = [n for n in sorted(names) if n in disk and not _same_shapes(disk[n], sdata.shapes[n])]
        if changed:
            out["shapes"] = changed
    written = _WRITTEN_LAZY.get(str(Path(store).resolve()), {})
    for kind in _LAZY:
        changed = []
        for name in sorted(set(_disk_names(store, kind)) & set(getattr(sdata, kind))):
            element = getattr(sdata, kind)[name]
            if name in skip or written.get((kind, name)) == _lazy_token(element):
                continue
            if _backed_by(element, store / kind / name) is False:
                changed.append(name)
        if changed:
            out[kind] = changed
    return out


def _warn_unwritten(store: Path, changes: dict[str, list[str]]) -> None:
    if "shapes" in changes:
        names = changes["shapes"]
        logger.warning(
            f"Shapes {names} differ from those in {store} and were not written (persist rewrites only the named "
            f"elements; default: the tables), so the store disagrees with the object: write them with "
            f"`persist(sdata, elements=[..., {', '.join(map(repr, names))}])`."
        )
    lazy = {k: v for k, v in changes.items() if k != "shapes"}
    if lazy:
        what = ", ".join(f"{kind} {names}" for kind, names in lazy.items())
        logger.warning(
            f"{what} in memory are not the ones in {store} (replaced or recomputed) and were not written: persist "
            "never rewrites images, labels or points that are on disk (their lazy data may be read from those files). "
            "Write the whole object to a new store with `persist(sdata, path=..., strategy='new_store')`."
        )


def _rewrite(sdata: SpatialData, kind: str, name: str, *, strategy: str) -> None:
    from spatialdata import SpatialData as SD

    store = Path(sdata.path)
    element = getattr(sdata, kind)[name]
    if strategy == "temp_element":
        tmp = name + TMP_SUFFIX
        getattr(sdata, kind)[tmp] = element
        try:
            sdata.write_element(tmp)
        finally:
            del getattr(sdata, kind)[tmp]
        _verify(store, kind, tmp, element)
        copy = store / kind / tmp
    else:
        tstore = _temp_store(store)
        SD(**{kind: {name: element}}).write(tstore, overwrite=True, update_sdata_path=False)
        _verify(tstore, kind, name, element)
        copy = tstore / kind / name
    # a verified copy is on disk; journal that the original is about to change, then replace it
    _journal(copy, "replacing")
    sdata.delete_element_from_disk(name)
    sdata.write_element(name)
    _verify(store, kind, name, element)
    if strategy == "temp_element":
        sdata.delete_element_from_disk(name + TMP_SUFFIX)  # also updates the consolidated metadata
    else:
        shutil.rmtree(_temp_store(store))


def persist(
    sdata: SpatialData,
    elements: str | Sequence[str] | None = None,
    *,
    path: str | Path | None = None,
    strategy: Literal["temp_element", "temp_store", "new_store"] = "temp_element",
    overwrite: bool = False,
    write_new: bool = True,
) -> None:
    """Write asign's results to disk, safely.

    After one :func:`asign.tl.impute`, ``persist(sdata, elements="asign")`` rewrites only that table (much faster
    than rewriting every table, the default).

    Parameters
    ----------
    sdata
        The stack. If it is not backed by a store, ``path`` is required and the whole object is written there
        (as with ``strategy="new_store"``).
    elements
        Names of tables or shapes elements to (re)write in the object's own store (default: every table; name a
        shapes element that you changed). Elements that are in memory but not yet on disk are written too (any type)
        unless ``write_new=False``. Images, labels and points already on disk are never rewritten (their lazy data
        may be read from the files). The transformations of all elements on disk are written (metadata only; only
        those of ``elements`` with ``write_new=False``), then the metadata are consolidated. Changes that are left
        out are reported with a warning naming the elements: a shapes element that differs from the one on disk
        (index, geometry or columns) and is not named, and an image, labels or points element that was replaced in
        memory (it no longer reads its data from its folder in the store, nor is it the one that persist wrote
        there). An element computed lazily from its own files in the store is not detected.
    path
        Target store for an object that is not backed, or for ``strategy="new_store"``.
    strategy
        How an element that exists on disk is replaced:

        - ``"temp_element"``: the element is first written under ``<name>_asign_tmp`` in the same store and
          verified (read back and compared), then the original is deleted, rewritten and verified, then the copy is
          removed.
        - ``"temp_store"``: the same, with the copy in a separate store ``<store>.asign_tmp`` next to the main one.
        - ``"new_store"``: the whole object is written to ``<path>.asign_new``, verified, journalled, and swapped
          into place with renames (the previous store is kept as ``<path>.asign_old`` until the swap is done).

        An interrupted run is repaired by the next call (see :func:`asign.io.recover`): a copy whose original was
        being replaced is moved into place (the interrupted write is completed); any other copy is discarded.
    overwrite
        Allow replacing an existing store at ``path`` (``"new_store"`` or an object that is not backed).
    write_new
        Whether elements that are only in memory (not named in ``elements``) are written too, and the
        transformations of every element. With `False`, only ``elements`` (new or existing) and their
        transformations are written; other pending results stay in memory only. Ignored when the whole object is
        written to a new store.

    Returns
    -------
    Nothing; the store is updated and ``sdata.path`` points to it.
    """
    # zarr warns once per array that autosharding will become the default: hundreds of lines per write
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*autosharding.*")
        _persist(sdata, elements, path=path, strategy=strategy, overwrite=overwrite, write_new=write_new)


def _persist(
    sdata: SpatialData,
    elements: str | Sequence[str] | None,
    *,
    path: str | Path | None,
    strategy: str,
    overwrite: bool,
    write_new: bool,
) -> None:
    if strategy not in ("temp_element", "temp_store", "new_store"):
        msg = f"Unknown strategy {strategy!r}; use 'temp_element', 'temp_store' or 'new_store'."
        raise ValueError(msg)
    if sdata.path is None or strategy == "new_store":
        if path is None:
            msg = (
                "`sdata` is not backed by a zarr store: pass `path=` to write it."
                if sdata.path is None
                else "strategy='new_store' needs `path=` (the new store)."
            )
            raise ValueError(msg)
        _write_new_store(sdata, Path(path), overwrite=overwrite)
        return
    if path is not None and Path(path).resolve() != Path(sdata.path).resolve():
        msg = f"`sdata` is backed by {sdata.path}; `path` {path} is only used with strategy='new_store'."
        raise ValueError(msg)

    store = Path(sdata.path)
    # finish an earlier interrupted write on disk first; the in-memory elements stay as they are (they hold what
    # that write was writing, or newer changes) and are written below
    _repair_files(store)
    for kind in _REWRITABLE:
        for name in [n for n in getattr(sdata, kind) if n.endswith(TMP_SUFFIX)]:
            del getattr(sdata, kind)[name]
    if elements is None:
        names = list(sdata.tables)
    else:
        names = [elements] if isinstance(elements, str) else list(elements)
    # what differs from the disk and is not written by this call: reported once the write is done
    unwritten = _unwritten_changes(sdata, store, set(names))
    written = []
    # first: every element only in memory (new, nothing to lose); with write_new=False only the named ones
    for kind in ("images", "labels", "points", "shapes", "tables"):
        on_disk = set(_disk_names(store, kind))
        for name in getattr(sdata, kind):
            if name not in on_disk and (write_new or name in names):
                sdata.write_element(name)
                if kind in _REWRITABLE:
                    _verify(store, kind, name, getattr(sdata, kind)[name])
                else:
                    token = _lazy_token(getattr(sdata, kind)[name])
                    _WRITTEN_LAZY.setdefault(str(store.resolve()), {})[kind, name] = token
                written.append(name)
    for name in names:
        kind = _element_kind(sdata, name)
        if kind is None:
            msg = f"{name!r} is not an element of this object (elements: {list(sdata.elements_paths_in_memory())})."
            raise KeyError(msg)
        if name in written:
            continue
        if kind not in _REWRITABLE:
            msg = (
                f"{kind}/{name} is already on disk and persist never rewrites {kind} (their lazy data may be read "
                "from those files); write the object to a new store with strategy='new_store'."
            )
            raise ValueError(msg)
        _rewrite(sdata, kind, name, strategy=strategy)
        written.append(name)
    if write_new:
        sdata.write_transformations()
    else:
        for name in written:
            if _element_kind(sdata, name) != "tables":  # tables have no transformations
                sdata.write_transformations(name)
    sdata.write_consolidated_metadata()
    logger.info(f"Persisted {written} and the transformations to {store}.")
    _warn_unwritten(store, unwritten)
