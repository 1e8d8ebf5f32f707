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


def _move_into_place(copy: Path, target: Path) -> None:
    """Replace ``target`` by the verified ``copy`` (a rename on the same file system)."""
    if target.exists():
        shutil.rmtree(target)
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
            shutil.rmtree(old)
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
            shutil.rmtree(new)
        done = True
    if old.exists():
        if path.exists():
            shutil.rmtree(old)
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
        shutil.rmtree(tstore)
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


def _write_new_store(sdata: SpatialData, path: Path, *, overwrite: bool) -> None:
    if sdata.path is not None and Path(sdata.path).resolve() == path.resolve():
        msg = (
            "strategy='new_store' needs a `path` other than the object's own store (its lazy data are read from "
            "there); write to a new path."
        )
        raise ValueError(msg)
    _repair_new_store(path)
    if path.exists() and not overwrite:
        msg = (
            f"{path} exists; pass overwrite=True to replace it (the old store is kept until the new one is "
            "written and verified)."
        )
        raise FileExistsError(msg)
    new, old = _sibling(path, NEW_STORE_SUFFIX), _sibling(path, OLD_STORE_SUFFIX)
    if new.exists():
        shutil.rmtree(new)
    sdata.write(new, update_sdata_path=False)
    for kind in _REWRITABLE:
        for name, el in getattr(sdata, kind).items():
            _verify(new, kind, name, el)
    _journal(new, "verified")  # from here on, an interrupted swap is completed by the next call
    _swap_in(new, path, old)
    if old.exists():
        shutil.rmtree(old)
    sdata.path = path
    logger.info(f"Wrote the stack to {path}.")


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
        those of ``elements`` with ``write_new=False``), then the metadata are consolidated.
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
    written = []
    # first: every element only in memory (new, nothing to lose); with write_new=False only the named ones
    for kind in ("images", "labels", "points", "shapes", "tables"):
        on_disk = set(_disk_names(store, kind))
        for name in getattr(sdata, kind):
            if name not in on_disk and (write_new or name in names):
                sdata.write_element(name)
                if kind in _REWRITABLE:
                    _verify(store, kind, name, getattr(sdata, kind)[name])
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
