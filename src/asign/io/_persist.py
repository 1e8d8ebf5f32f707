"""Write results to a zarr store without ever losing the user's data.

``SpatialData.write_element(name, overwrite=True)`` refuses to overwrite an element inside the object's own store
(spatialdata#1237), and ``delete_element_from_disk`` followed by ``write_element`` loses the element if the process
dies in between. :func:`persist` therefore always keeps a verified copy on disk while an element is replaced, with a
journal file in the copy that says when the original starts to change, and :func:`recover` (whose file-level repair
every :func:`persist` runs first) restores an element from that copy after an interruption.

The journal (``asign_persist_journal``, written to a temporary file, synced and renamed, so that a reader sees one
whole state) holds one of these states; each says which version of the element is whole:

- no journal: the copy may be incomplete; its original was not touched. Repair: remove the copy.
- ``"replacing"``, with a fingerprint of the element: the copy is whole and verified; the original may be partly
  deleted or partly written. Repair: move the copy into place, only if it reads back in the store's Zarr format and
  matches the fingerprint (otherwise an error, and nothing is touched).
- ``"done"``: the original was rewritten and verified; the copy may be partly deleted. Repair: remove the copy.

``strategy="temp_element"`` and ``"temp_store"`` go through: copy written, verified and synced (no journal) ->
``"replacing"`` -> original deleted, rewritten, verified and synced -> ``"done"`` -> element recorded as done in
the transformations journal (below) -> copy deleted (a partly deleted copy says
``"done"``, or nothing once its journal file is gone: both mean "remove it"). The copy is never deleted while it says
``"replacing"``; the repair removes the original and renames the whole copy into place, then drops the journal. The
temporary store of ``"temp_store"`` is written in the target store's own spatialdata container (and Zarr) format.
``strategy="new_store"``: ``<path>.asign_new`` written and verified (no journal: discarded by the repair) ->
``"verified"`` -> ``<path>`` renamed to ``<path>.asign_old`` -> the new store renamed to ``<path>`` and its journal
dropped -> ``<path>.asign_old`` removed. A journalled new store is only ever renamed, never deleted, and
``<path>.asign_old`` is deleted only while ``<path>`` exists.

Two more journals are files in the store's root folder, written in the same way:

- ``asign_persist_new_element`` (with the element's type and name): ``"writing"`` (an element that was only in
  memory is being written) -> ``"written"`` (it is whole, verified for tables and shapes, and synced) -> file
  removed. Repair of ``"writing"``: remove what was written of it (its folder did not exist before); persist then
  refuses to write an in-memory element that reads its lazy data from the removed folder (its missing chunks would
  be written as zeros). Repair of ``"written"``: keep the element, drop the journal.
- ``asign_persist_transformations``, with the transformations of every element that persist writes them for
  (exact JSON, see :func:`_transformation_to_json`), the elements it replaces (``"replaced"``, with fingerprints)
  and those already replaced (``"done"``): ``"pending"`` (written before the first copy; the transformations on
  disk are the earlier ones; rewritten as each element is done) -> ``"writing"`` (every replaced element is
  written and verified) -> transformations written -> ``"done"`` -> file removed. Repair of ``"pending"``, decided
  from the journals before the copies above are repaired (never from the content, which a fingerprint cannot fully
  tell): if every replaced element is listed as done or its copy says ``"replacing"`` (moved into place by the same
  repair) or ``"done"``, finish as for ``"writing"``; otherwise drop the journal (the store keeps the earlier
  transformations). Repair of ``"writing"``: write the journalled transformations, then drop the journal.
  ``"done"``: drop the journal. A ``*_asign_tmp`` folder is treated as a copy only when it holds a journal or this
  journal lists its element; any other is the user's and is left alone, with a warning.

Guarantee: each replaced element is replaced atomically (after any interruption it is whole, the old or the new
version), and the transformations on disk agree with the tables: the new ones only when every replaced table is
new. Several tables are not replaced as one transaction: an interruption between two of them can leave the first
new and the second old (with the earlier transformations); persisting again from the object completes the write.
Every copy and every rewritten or new element is synced (files and folders) before the journal state that relies
on it, so this also holds after a power loss, as far as the file system honours ``fsync``.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import warnings
from collections.abc import Callable, Sequence
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
# journal file inside a verified copy (see the module docstring): "replacing" once the original is about to be deleted,
# "done" once it is rewritten and verified ("verified" for a new store about to be swapped in)
JOURNAL = "asign_persist_journal"
_STATES = ("verified", "replacing", "done")
# store-level journals in the store's root folder (see the module docstring)
NEW_ELEMENT_JOURNAL = "asign_persist_new_element"
TRANSFORMS_JOURNAL = "asign_persist_transformations"
_TRANSFORM_STATES = ("pending", "writing", "done")
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
    return _read_element(Path(store) / kind / name, kind)


def _read_element(path: Path, kind: str) -> Any | None:
    """Read the table or shapes element in the folder ``path``, or `None` if it is absent or unreadable."""
    path = Path(path)
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
        # what spatialdata.read_zarr runs for each shapes element; reads only this folder (not the whole store,
        # whose other elements may be the incomplete ones)
        from spatialdata._io.io_shapes import _read_shapes

        return _read_shapes(path)
    except Exception as e:  # noqa: BLE001 - any failure to read means the copy is not usable
        logger.warning(f"Could not read {kind}/{path.name} from {path.parent.parent}: {e}")
        return None


def _digest(values: Any) -> str:
    """A short hash of a sequence of labels (index values, names)."""
    return hashlib.sha1("\x1f".join(map(str, values)).encode(), usedforsecurity=False).hexdigest()


def _fingerprint(element: Any) -> dict[str, Any]:
    """Cheap but content-sensitive summary of a table or shapes element (JSON-serialisable, stored in the journal).

    A table: shape, digests of obs and var names, the keys of obs, var, obsm, varm, layers, obsp, varp and uns,
    whether it has raw, and the sums of X and of every layer. A shapes element: length, digest of the index, bounds.
    """
    from anndata import AnnData

    if isinstance(element, AnnData):
        sums = {"X": None if element.X is None else _nansum(element.X)}
        sums.update({f"layers/{k}": _nansum(v) for k, v in element.layers.items()})
        return {
            "type": "table",
            "shape": [int(n) for n in element.shape],
            "obs_names": _digest(element.obs_names),
            "var_names": _digest(element.var_names),
            **{
                key: sorted(map(str, keys))
                for key, keys in [
                    ("obs", element.obs.columns),
                    ("var", element.var.columns),
                    ("obsm", element.obsm),
                    ("varm", element.varm),
                    ("layers", element.layers),
                    ("obsp", element.obsp),
                    ("varp", element.varp),
                    ("uns", element.uns),
                ]
            },
            "raw": element.raw is not None,
            "sums": sums,
        }
    return {
        "type": "shapes",
        "n": len(element),
        "index": _digest(element.index),
        "bounds": [float(b) for b in element.total_bounds],
    }


def _matches(found: dict[str, Any], expected: dict[str, Any]) -> bool:
    """Whether two fingerprints agree (sums and bounds up to rounding, everything else exactly)."""
    if found.keys() != expected.keys():
        return False
    for key, a in found.items():
        b = expected[key]
        if key == "sums":
            if a.keys() != b.keys():
                return False
            for k, x in a.items():
                y = b[k]
                if (x is None) != (y is None) or (x is not None and not np.isclose(x, y, rtol=1e-6, atol=1e-6)):
                    return False
        elif key == "bounds":
            if len(a) != len(b) or not np.allclose(a, b, equal_nan=True):
                return False
        elif a != b:
            return False
    return True


def _same(disk: Any, mem: Any) -> bool:
    """Cheap but content-sensitive comparison of an element read back from disk with the in-memory one."""
    return disk is not None and _matches(_fingerprint(disk), _fingerprint(mem))


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


def _journal(path: Path, state: str, *, fingerprint: dict[str, Any] | None = None) -> None:
    """Record the state of a verified copy in a small file inside it.

    Atomic and ordered: written to a temporary file, synced, renamed over the journal, and the folder synced, so
    the state is on disk before the step that it allows begins. ``fingerprint`` (see :func:`_fingerprint`) goes on
    the second line.
    """
    text = state + "\n" + ("" if fingerprint is None else json.dumps(fingerprint) + "\n")
    _write_journal_file(Path(path) / JOURNAL, text)


def _write_journal_file(file: Path, text: str) -> None:
    """Write a journal file atomically: a temporary file, synced, renamed over ``file``, the folder synced."""
    file = Path(file)
    tmp = file.with_name(file.name + ".part")
    with open(tmp, "w") as fh:
        fh.write(text)
        fh.flush()
        os.fsync(fh.fileno())
    tmp.replace(file)
    _fsync_path(file.parent)


def _fsync_path(path: Path | str) -> None:
    """Sync a folder's entries (a rename in it), or a file's content, to disk, where the platform allows it."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:  # e.g. Windows: folders cannot be opened
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _fsync_tree(path: Path) -> None:
    """Sync every file and folder under ``path``, and its parent folder, to disk (before a journal relies on it).

    A journal state that says a folder is whole (``"replacing"``, ``"done"``, ``"written"``) must not reach the disk
    before the folder's own content does, or a power loss could leave a journal that points at missing data.
    """
    path = Path(path)
    if path.is_dir() and not path.is_symlink():
        for root, _dirs, files in os.walk(path, topdown=False):
            for f in files:
                _fsync_path(os.path.join(root, f))
            _fsync_path(Path(root))
    _fsync_path(path.parent)


def _journal_lines(path: Path) -> list[str]:
    f = Path(path) / JOURNAL
    return f.read_text().splitlines() if f.is_file() else []


def _journal_state(path: Path) -> str | None:
    """The journal state of a copy (see the module docstring).

    ``"verified"`` (a new store, complete; the existing store was not touched yet), ``"replacing"`` (the copy is
    complete; its original may be partly deleted or rewritten), ``"done"`` (the original was rewritten and verified;
    the copy may be partly deleted) or `None` (no journal: the copy itself may be incomplete).
    """
    lines = _journal_lines(path)
    state = lines[0].strip() if lines else None
    return state if state in _STATES else None


def _journal_fingerprint(path: Path) -> dict[str, Any] | None:
    """The fingerprint recorded with a ``"replacing"`` journal; `None` if there is none (an older journal).

    Raises
    ------
    ValueError
        If the fingerprint line cannot be parsed.
    """
    lines = _journal_lines(path)
    if len(lines) < 2 or not lines[1].strip():
        return None
    fingerprint = json.loads(lines[1])
    if not isinstance(fingerprint, dict):
        msg = f"the journal's fingerprint is not a mapping: {lines[1][:80]!r}"
        raise ValueError(msg)
    return fingerprint


def _zarr_format(folder: Path) -> int | None:
    """The Zarr format of the group in ``folder`` (2 or 3), or `None` if it has no group metadata."""
    folder = Path(folder)
    if (folder / "zarr.json").is_file():
        return 3
    if (folder / ".zgroup").is_file():
        return 2
    return None


def _copy_problem(copy: Path, kind: str, store: Path) -> str | None:
    """Why the journalled ``copy`` cannot replace its original in ``store``, or `None` if it can."""
    found, wanted = _zarr_format(copy), _zarr_format(store)
    if found is None:
        return "it has no Zarr group metadata (it is incomplete)"
    if wanted is not None and found != wanted:
        return f"it is written in Zarr v{found} and the store in Zarr v{wanted} (the store would no longer open)"
    try:
        expected = _journal_fingerprint(copy)
    except ValueError as e:
        return f"its journal cannot be read ({e})"
    element = _read_element(copy, kind)
    if element is None:
        return "it cannot be read"
    if expected is not None and not _matches(_fingerprint(element), expected):
        return "what it holds differs from what was verified when it was written (it was changed or partly deleted)"
    return None


def _check_copy(copy: Path, target: Path, kind: str, store: Path) -> None:
    """Refuse a ``"replacing"`` copy that does not read back as the element it was verified as.

    Raises
    ------
    OSError
        Naming the copy, its element and the problem; nothing is changed.
    """
    problem = _copy_problem(copy, kind, store)
    if problem is None:
        return
    msg = (
        f"The copy {copy}, journalled as the verified new content of {kind}/{target.name} in {store} (the original "
        f"may be incomplete), is not moved into place: {problem}. Nothing was changed. Inspect the copy (it may hold "
        f"the only complete version of {kind}/{target.name}), then move it into place or remove it by hand before "
        "calling persist or recover on this store again."
    )
    raise OSError(msg)


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
    """Replace ``target`` by the verified ``copy`` (a rename on the same file system).

    The caller checks the copy first (:func:`_check_copy`). The copy stays whole and journalled until the rename: an
    interruption while ``target`` is deleted is repaired again from it; one after the rename leaves only a journal
    inside ``target``, which the repair drops.
    """
    target.parent.mkdir(parents=True, exist_ok=True)
    if target.exists() or target.is_symlink():
        _remove(target)
    copy.rename(target)
    _drop_journal(target)


def _reconsolidate(store: Path) -> None:
    """Rewrite the store's consolidated metadata from what is on disk (public API only needs ``path``)."""
    from spatialdata import SpatialData

    empty = SpatialData()
    empty.path = Path(store)
    empty.write_consolidated_metadata()


# --------------------------------------------------------------------------------------------------------------------
# store-level journals: an element written from memory, the transformations (see the module docstring)
# --------------------------------------------------------------------------------------------------------------------
def _store_journal(store: Path, name: str, state: str, payload: dict[str, Any] | None = None) -> None:
    """Record ``state`` (and ``payload``, JSON on the second line) in the journal file ``name`` in the store's root."""
    text = state + "\n" + ("" if payload is None else json.dumps(payload) + "\n")
    _write_journal_file(Path(store) / name, text)


def _read_store_journal(store: Path, name: str, states: Sequence[str]) -> tuple[str | None, dict[str, Any]]:
    """The state and payload of the journal file ``name`` in the store's root; ``(None, {})`` when there is none.

    Raises
    ------
    OSError
        If the file exists but cannot be read as one of ``states`` and a JSON mapping (it was not written by
        persist); nothing is changed.
    """
    file = Path(store) / name
    if not file.is_file():
        return None, {}
    lines = file.read_text().splitlines()
    state = lines[0].strip() if lines else ""
    try:
        payload = json.loads(lines[1]) if len(lines) > 1 and lines[1].strip() else {}
    except ValueError:
        payload = None
    if state not in states or not isinstance(payload, dict):
        msg = (
            f"The journal {file} of an interrupted persist cannot be read (state {state!r}, expected one of "
            f"{list(states)} and a JSON mapping). Nothing was changed; inspect the store and remove the file by hand "
            "before calling persist or recover on it again."
        )
        raise OSError(msg)
    return state, payload


def _drop_store_journal(store: Path, name: str) -> None:
    for n in (name, name + ".part"):
        (Path(store) / n).unlink(missing_ok=True)
    _fsync_path(Path(store))


def _write_new_element(sdata: SpatialData, store: Path, kind: str, name: str) -> None:
    """Write an element that is only in memory; journalled so that a partial one is removed by the repair.

    ``"writing"`` before the write; ``"written"`` once it is whole on disk (verified for tables and shapes, synced),
    so that the repair keeps it; then the journal is dropped.
    """
    _store_journal(store, NEW_ELEMENT_JOURNAL, "writing", {"kind": kind, "name": name})
    sdata.write_element(name)
    element = getattr(sdata, kind)[name]
    if kind in _REWRITABLE:
        _verify(store, kind, name, element)
    else:
        _WRITTEN_LAZY.setdefault(str(store.resolve()), {})[kind, name] = _lazy_token(element)
    _fsync_tree(store / kind / name)
    _store_journal(store, NEW_ELEMENT_JOURNAL, "written", {"kind": kind, "name": name})
    _drop_store_journal(store, NEW_ELEMENT_JOURNAL)


def _repair_new_element(store: Path) -> str | None:
    """Remove an element whose first write was interrupted; returns ``"<kind>/<name>"`` of a removed one or `None`.

    ``"writing"``: the element may be incomplete and is removed. ``"written"``: it is whole and verified and is kept
    (only the journal is dropped).
    """
    store = Path(store)
    (store / (NEW_ELEMENT_JOURNAL + ".part")).unlink(missing_ok=True)
    state, payload = _read_store_journal(store, NEW_ELEMENT_JOURNAL, ("writing", "written"))
    if state is None:
        return None
    kind, name = payload.get("kind"), payload.get("name")
    if kind not in ("images", "labels", "points", "shapes", "tables") or not _plain_name(name):
        msg = (
            f"The journal {store / NEW_ELEMENT_JOURNAL} names no element of the store ({kind!r}, {name!r}). Nothing "
            "was changed; inspect the store and remove the file by hand."
        )
        raise OSError(msg)
    target = store / kind / name
    if state == "written":  # whole and verified: only the journal was left
        _drop_store_journal(store, NEW_ELEMENT_JOURNAL)
        return None
    removed = target.exists() or target.is_symlink()
    if removed:
        _remove(target)
    _drop_store_journal(store, NEW_ELEMENT_JOURNAL)
    if not removed:
        return None
    logger.warning(
        f"Removed {kind}/{name} from {store}: an interrupted persist was writing it (it was only in memory before), "
        "so it may be incomplete. Write it again with `asign.io.persist` from the object that holds it."
    )
    return f"{kind}/{name}"


def _plain_name(name: Any) -> bool:
    return isinstance(name, str) and bool(name) and name not in (".", "..") and "/" not in name and "\\" not in name


def _transformation_to_json(t: Any) -> dict[str, Any]:
    """A spatialdata transformation as JSON that reads back exactly (:func:`_transformation_from_json`).

    Floats are written by :mod:`json` as their shortest round-tripping representation, so matrices come back
    bit-for-bit.
    """
    from spatialdata.transformations import Affine, Identity, MapAxis, Scale, Sequence, Translation

    if isinstance(t, Identity):
        return {"type": "identity"}
    if isinstance(t, MapAxis):
        return {"type": "map_axis", "map_axis": [[str(k), str(v)] for k, v in t.map_axis.items()]}
    if isinstance(t, Translation):
        return {"type": "translation", "translation": np.asarray(t.translation).tolist(), "axes": list(t.axes)}
    if isinstance(t, Scale):
        return {"type": "scale", "scale": np.asarray(t.scale).tolist(), "axes": list(t.axes)}
    if isinstance(t, Affine):
        return {
            "type": "affine",
            "matrix": np.asarray(t.matrix).tolist(),
            "input_axes": list(t.input_axes),
            "output_axes": list(t.output_axes),
        }
    if isinstance(t, Sequence):
        return {"type": "sequence", "transformations": [_transformation_to_json(u) for u in t.transformations]}
    msg = f"Cannot journal a transformation of type {type(t).__name__}: {t!r}."
    raise TypeError(msg)


def _transformation_from_json(d: dict[str, Any]) -> Any:
    """The spatialdata transformation written by :func:`_transformation_to_json`."""
    from spatialdata.transformations import Affine, Identity, MapAxis, Scale, Sequence, Translation

    kind = d["type"]
    if kind == "identity":
        return Identity()
    if kind == "map_axis":
        return MapAxis(dict(d["map_axis"]))
    if kind == "translation":
        return Translation(np.asarray(d["translation"], dtype=float), axes=tuple(d["axes"]))
    if kind == "scale":
        return Scale(np.asarray(d["scale"], dtype=float), axes=tuple(d["axes"]))
    if kind == "affine":
        return Affine(
            np.asarray(d["matrix"], dtype=float), input_axes=tuple(d["input_axes"]), output_axes=tuple(d["output_axes"])
        )
    if kind == "sequence":
        return Sequence([_transformation_from_json(u) for u in d["transformations"]])
    msg = f"Unknown transformation type {kind!r} in the journal."
    raise ValueError(msg)


def _transformations_payload(sdata: SpatialData, names: Sequence[str]) -> dict[str, Any]:
    """``{name: {"kind": ..., "transformations": {coordinate system: JSON}}}`` of the elements ``names``."""
    from spatialdata.transformations import get_transformation

    out = {}
    for name in names:
        kind = _element_kind(sdata, name)
        element = getattr(sdata, kind)[name]
        ts = get_transformation(element, get_all=True)
        out[name] = {"kind": kind, "transformations": {cs: _transformation_to_json(t) for cs, t in ts.items()}}
    return out


def _write_journalled_transformations(store: Path, elements: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """Write the transformations of a journal's payload to the elements on disk; returns ``{name: transformations}``.

    The elements are read with :func:`spatialdata.read_zarr` (only their types, lazily) and their transformations
    written with :meth:`~spatialdata.SpatialData.write_transformations` (metadata only).
    """
    from spatialdata import read_zarr
    from spatialdata.transformations import set_transformation

    todo = {
        name: (v["kind"], {cs: _transformation_from_json(t) for cs, t in v["transformations"].items()})
        for name, v in elements.items()
        if name in _disk_names(store, v["kind"])
    }
    if not todo:
        return {}
    try:
        sdata = read_zarr(store, selection=tuple(sorted({kind for kind, _ in todo.values()})))
    except Exception as e:
        msg = (
            f"{store} cannot be read to finish an interrupted write of the transformations of {sorted(todo)}: {e}. "
            f"The journal {store / TRANSFORMS_JOURNAL} is kept; repair the store and call recover again."
        )
        raise OSError(msg) from e
    for name, (kind, ts) in todo.items():
        set_transformation(getattr(sdata, kind)[name], dict(ts), set_all=True)
        sdata.write_transformations(name)
    return {name: ts for name, (_, ts) in todo.items()}


def _settled(store: Path) -> dict[str, bool] | None:
    """Before the copies are repaired: for each element that a ``"pending"`` journal replaces, whether it ends new.

    New when the journal records it as done, or when its copy's journal says ``"replacing"`` (the same repair moves
    the copy into place, or refuses before any change) or ``"done"``; otherwise the original was not touched and
    stays. Decided from the journals, never from the content (a fingerprint cannot see every change). `None` when
    there is no ``"pending"`` journal, or an older one without the ``"done"`` list (then the content decides).
    """
    store = Path(store)
    state, payload = _read_store_journal(store, TRANSFORMS_JOURNAL, _TRANSFORM_STATES)
    if state != "pending" or not isinstance(payload.get("done"), list):
        return None
    done = set(payload["done"])
    tstore = _temp_store(store)
    out = {}
    for key in payload.get("replaced", {}):
        kind, name = key.split("/", 1)
        states = {_journal_state(store / kind / (name + TMP_SUFFIX)), _journal_state(tstore / kind / name)}
        out[key] = key in done or bool(states & {"replacing", "done"})
    return out


def _repair_transformations(store: Path, settled: dict[str, bool] | None = None) -> dict[str, dict[str, Any]]:
    """Finish or drop an interrupted write of the transformations; returns ``{name: transformations written}``.

    ``"pending"``: if every element that persist was replacing ends with its new content (``settled``, decided from
    the journals by :func:`_settled` before the copies were repaired), the transformations are written; otherwise
    the journal is dropped and the store keeps the earlier transformations. ``"writing"``: they are written.
    ``"done"``: the journal is dropped.
    """
    store = Path(store)
    (store / (TRANSFORMS_JOURNAL + ".part")).unlink(missing_ok=True)
    state, payload = _read_store_journal(store, TRANSFORMS_JOURNAL, _TRANSFORM_STATES)
    if state is None:
        return {}
    if state == "pending":
        new, old = [], []
        for key, fingerprint in payload.get("replaced", {}).items():
            if settled is not None:
                (new if settled.get(key, False) else old).append(key)
                continue
            kind, name = key.split("/", 1)  # an older journal: its content decides
            disk = _read_disk(store, kind, name)
            (new if disk is not None and _matches(_fingerprint(disk), fingerprint) else old).append(key)
        if old:
            _drop_store_journal(store, TRANSFORMS_JOURNAL)
            if new:
                logger.warning(
                    f"An interrupted persist had replaced {new} in {store} but not {old}; the transformations on disk "
                    "are the earlier ones. Call `asign.io.persist` again from the object that holds the results."
                )
            return {}
    written = {}
    if state != "done":
        written = _write_journalled_transformations(store, payload.get("elements", {}))
        _store_journal(store, TRANSFORMS_JOURNAL, "done")
    _drop_store_journal(store, TRANSFORMS_JOURNAL)
    if written:
        logger.warning(
            f"Completed the interrupted write of the transformations of {sorted(written)} in {store}, so that they "
            "agree with the tables written before the interruption."
        )
    return written


def _repair_store(store: Path) -> tuple[list[str], dict[str, dict[str, Any]], str | None]:
    """Every repair of a store after an interrupted :func:`persist`, in order; consolidates the metadata after.

    First the journals decide whether an interrupted write of the transformations rolls forward (:func:`_settled`),
    then the copies of replaced elements are settled (:func:`_repair_files`; an error before any change if a copy
    cannot be moved into place), then a partial element written from memory is removed, then the transformations are
    finished or dropped as decided. Returns the restored element names, ``{name: transformations}`` of the elements
    whose transformations were written, and ``"<kind>/<name>"`` of a removed partial element (or `None`).
    """
    store = Path(store)
    had_journal = (store / TRANSFORMS_JOURNAL).exists() or (store / NEW_ELEMENT_JOURNAL).exists()
    settled = _settled(store)
    restored = _repair_files(store)
    removed = _repair_new_element(store)
    written = _repair_transformations(store, settled)
    if removed is not None or written or had_journal:
        _reconsolidate(store)
    return restored, written, removed


def _persist_copies(store: Path) -> set[tuple[str, str]]:
    """``(kind, folder name)`` of the ``*_asign_tmp`` copies in ``store`` that an interrupted persist wrote.

    A copy is persist's when it holds a journal or the store's transformations journal lists its element as replaced
    (written before the first copy). A folder whose name merely ends in the suffix is the user's.
    """
    store = Path(store)
    try:
        _, payload = _read_store_journal(store, TRANSFORMS_JOURNAL, _TRANSFORM_STATES)
    except OSError:
        payload = {}
    listed = {tuple(key.split("/", 1)) for key in payload.get("replaced", {})}
    out = set()
    for kind in _REWRITABLE:
        for tmp in [n for n in _disk_names(store, kind) if n.endswith(TMP_SUFFIX)]:
            folder = store / kind / tmp
            journalled = (folder / JOURNAL).exists() or (folder / (JOURNAL + ".part")).exists()
            if journalled or (kind, tmp[: -len(TMP_SUFFIX)]) in listed:
                out.add((kind, tmp))
    return out


def _drop_copies_in_memory(sdata: SpatialData, copies: set[tuple[str, str]]) -> None:
    """Drop from memory the persist copies that read_zarr read as elements of their own (they are gone on disk)."""
    for kind, name in copies:
        if name in getattr(sdata, kind):
            del getattr(sdata, kind)[name]


def _reads_missing_files(element: Any, store: Path) -> bool | None:
    """Whether a lazy element reads files in ``store`` that no longer exist; `None` if the dask graph cannot tell."""
    from spatialdata._io._utils import get_dask_backing_files

    try:
        files = get_dask_backing_files(element)
    except Exception as e:  # noqa: BLE001 - an unknown graph layout
        logger.debug(f"Could not find the files that an element is read from: {e}")
        return None
    root = Path(store).resolve()
    return any(Path(f).resolve().is_relative_to(root) and not Path(f).exists() for f in files)


def _check_not_read_from_removed(
    sdata: SpatialData, store: Path, removed: str | None, only: set[str] | None = None
) -> None:
    """Refuse, before any write, an element to be written from memory whose lazy data are in deleted store files.

    Such an element (read from a partial element that the repair removed) would be written back from missing
    chunks, which Zarr fills with zeros. ``only``: the names to be written (`None`: every element not on disk).

    Raises
    ------
    OSError
        Naming the element.
    """
    for kind in _LAZY:
        on_disk = set(_disk_names(store, kind))
        for name, element in getattr(sdata, kind).items():
            if name in on_disk or (only is not None and name not in only):
                continue
            missing = _reads_missing_files(element, store)
            if missing is False:
                continue
            if missing is None and removed != f"{kind}/{name}":
                continue
            why = (
                "it was only partly written by an interrupted persist and has been removed from the store"
                if removed == f"{kind}/{name}"
                else "its folder in the store no longer exists"
            )
            msg = (
                f"{kind}/{name} in memory reads its data lazily from {store / kind / name}, but {why}: writing it "
                "would write zeros for the missing data. Nothing was written; re-create the element (or re-read the "
                f"store, which no longer holds it, and drop it from the object), then call persist again."
            )
            raise OSError(msg)


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
    if old.exists() or old.is_symlink():
        if path.exists():
            _remove(old)
        else:  # cannot happen with the journal, but never lose the only copy
            old.rename(path)
            logger.warning(f"Restored {path} from {old} left by an interrupted write.")
        done = True
    if path.is_dir() and ((path / JOURNAL).exists() or (path / (JOURNAL + ".part")).exists()):
        _drop_journal(path)  # left by a swap interrupted right after its last rename
    return done


def _repair_files(store: Path) -> list[str]:
    """File-level repair of a store after an interrupted :func:`persist`; returns the restored element names.

    A copy whose journal says ``"replacing"`` is moved into place (its original may be incomplete), after checking
    that it reads back in the store's Zarr format and matches the fingerprint journalled with it; if any such copy
    fails that check, an error is raised before anything is changed. Any other leftover copy is removed: without a
    journal its original was not touched, with ``"done"`` its original was rewritten and verified (the copy may be
    partly deleted). Reads nothing with spatialdata.read_zarr, so it also works on a store that it cannot open.

    Raises
    ------
    OSError
        If a ``"replacing"`` copy does not read back or verify (see :func:`_check_copy`); nothing is changed.
    """
    store = Path(store)
    moves: list[tuple[Path, Path, str]] = []  # (copy, original, kind)
    leftovers: list[Path] = []
    ours = _persist_copies(store)
    for kind in _REWRITABLE:
        for tmp in [n for n in _disk_names(store, kind) if n.endswith(TMP_SUFFIX)]:
            copy = store / kind / tmp
            if (kind, tmp) not in ours:
                logger.warning(
                    f"{kind}/{tmp} in {store} ends in {TMP_SUFFIX!r} but is no copy journalled by persist; it is left "
                    "alone. Rename it if it is yours (persist uses that suffix for its temporary copies)."
                )
                continue
            if _journal_state(copy) == "replacing":
                moves.append((copy, store / kind / tmp[: -len(TMP_SUFFIX)], kind))
            else:
                leftovers.append(copy)
    tstore = _temp_store(store)
    if tstore.exists() or tstore.is_symlink():
        for kind in _REWRITABLE:
            for name in _disk_names(tstore, kind):
                if _journal_state(tstore / kind / name) == "replacing":
                    moves.append((tstore / kind / name, store / kind / name, kind))
        leftovers.append(tstore)
    for copy, target, kind in moves:  # every check before the first change
        _check_copy(copy, target, kind, store)
    restored: list[str] = []
    for copy, target, _ in moves:
        _move_into_place(copy, target)
        restored.append(target.name)
    for leftover in leftovers:
        _remove(leftover)
    for kind in _REWRITABLE:
        for name in _disk_names(store, kind):  # a journal left inside an element after a completed restore
            if (store / kind / name / JOURNAL).exists() or (store / kind / name / (JOURNAL + ".part")).exists():
                _drop_journal(store / kind / name)
    if moves or leftovers:
        _reconsolidate(store)
    for name in restored:
        logger.warning(f"Restored {name!r} in {store} from the verified copy left by an interrupted write.")
    return restored


def recover(sdata: SpatialData | str | Path) -> list[str]:
    """Repair a store after an interrupted :func:`asign.io.persist`.

    :func:`persist` writes a verified copy of an element before it touches the original, and journals when it starts
    replacing the original. A copy whose original was being replaced is moved into place (the original may be
    incomplete), once it is checked to read back in the store's Zarr format and to match what was verified; a copy
    whose original was not touched yet, that is itself incomplete, or whose original was already rewritten and
    verified (the copy was being deleted) is removed; an interrupted ``strategy="new_store"`` swap is completed (or
    undone if the new store was not finished). An element that persist was writing from memory when it was
    interrupted (it may be incomplete) is removed, with a warning naming it; one journalled as whole is kept. An
    interrupted write of the transformations is completed from its journal when the journals say that every element
    that persist was replacing ends new (otherwise the store keeps the earlier transformations). Each element ends
    whole, old or new; when several tables were being replaced, some may end new and others old (the
    transformations are then the earlier ones). A ``*_asign_tmp`` element that no journal marks as persist's copy is
    left alone, with a warning. Then the consolidated metadata are rewritten from what is on disk.

    Parameters
    ----------
    sdata
        A stack backed by a zarr store (others are left alone), or the path of a store. Give the path when
        :func:`spatialdata.read_zarr` cannot open the store: the repair works on the files.

    Returns
    -------
    The names of the restored elements. For a stack, restored elements are also read back into memory (the object
    may hold what was read from the incomplete original), and the elements whose transformations were completed
    get them in memory too.

    Raises
    ------
    OSError
        If a copy that should be moved into place does not read back or does not match what was verified when it
        was written; nothing is changed and the message names the copy. Also if a journal in the store's root
        cannot be read, or the store cannot be read to complete the transformations (the journal is kept).
    """
    if not hasattr(sdata, "tables"):
        path = Path(sdata)
        _refuse_file(path)
        _repair_new_store(path)
        if not path.exists():
            msg = f"{path} does not exist (and no interrupted write of it was found)."
            raise FileNotFoundError(msg)
        return _repair_store(path)[0]
    if sdata.path is None:
        return []
    store = Path(sdata.path)
    copies = _persist_copies(store)
    restored, transformations, removed = _repair_store(store)
    _set_in_memory(sdata, transformations)
    if removed is not None:
        kind, name = removed.split("/", 1)
        if name in getattr(sdata, kind) and _reads_missing_files(getattr(sdata, kind)[name], store) is not False:
            logger.warning(
                f"{removed} in memory was read from the partial element that was removed; persist refuses to write "
                "it (its data are gone). Re-create it, or drop it from the object."
            )
    for name in restored:
        kind = _element_kind(sdata, name) or _kind_on_disk(store, name)
        element = _read_disk(store, kind, name)
        if element is None:
            msg = f"{kind}/{name} in {store} was restored from its verified copy but cannot be read back."
            raise OSError(msg)
        getattr(sdata, kind)[name] = element
    _drop_copies_in_memory(sdata, copies)  # copies read by read_zarr as elements of their own
    return restored


def _set_in_memory(sdata: SpatialData, transformations: dict[str, dict[str, Any]]) -> None:
    """Give the in-memory elements the transformations that a repair wrote to their store."""
    from spatialdata.transformations import set_transformation

    for name, ts in transformations.items():
        kind = _element_kind(sdata, name)
        if kind is not None and kind != "tables":
            set_transformation(getattr(sdata, kind)[name], dict(ts), set_all=True)


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


def _container_format(store: Path) -> Any:
    """The spatialdata container format of the store (it fixes the Zarr format), for the copies of ``"temp_store"``.

    Raises
    ------
    ValueError
        If the store's format cannot be told or is not one that spatialdata writes (use ``"temp_element"``).
    """
    import zarr
    from spatialdata._io.format import SpatialDataContainerFormats

    version = None
    try:
        attrs = zarr.open_group(Path(store), mode="r", use_consolidated=False).attrs.asdict()
        version = (attrs.get("spatialdata_attrs") or {}).get("version")
    except Exception as e:  # noqa: BLE001 - reported below as an unknown format
        logger.debug(f"Could not read the root metadata of {store}: {e}")
    fmt = SpatialDataContainerFormats.get(version) if isinstance(version, str) else None
    zarr_format = _zarr_format(store)
    if fmt is None or fmt.zarr_format != zarr_format:
        msg = (
            f"strategy='temp_store' cannot write its copy in the format of {store} (spatialdata container format "
            f"{version!r}, Zarr v{zarr_format}): a copy in another format would break the store when it is moved "
            "into place. Use strategy='temp_element' (the copy is written inside the store, in its own format)."
        )
        raise ValueError(msg)
    return fmt


def _write_temp_store(tstore: Path, kind: str, name: str, element: Any, container_format: Any) -> None:
    """Write ``element`` alone to the temporary store ``tstore``, in the target store's format.

    The container format (hence the Zarr format) is the target's, and the element format spatialdata's default for
    that container, so that the copy can be moved into the target store as it is.
    """
    from spatialdata import SpatialData as SD

    SD(**{kind: {name: element}}).write(
        tstore, overwrite=True, update_sdata_path=False, sdata_formats=[container_format]
    )


def _rewrite(
    sdata: SpatialData,
    kind: str,
    name: str,
    *,
    strategy: str,
    fingerprint: dict[str, Any] | None = None,
    on_done: Callable[[], None] | None = None,
) -> None:
    """Replace ``kind/name`` in the object's store by the in-memory element, through a verified copy.

    The journal steps are described in the module docstring: copy written, verified and synced -> ``"replacing"``
    -> original deleted, rewritten, verified and synced -> ``"done"`` -> ``on_done()`` (persist records the element
    as replaced in the store's transformations journal) -> copy deleted.
    """
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
        _write_temp_store(tstore, kind, name, element, _container_format(store))
        _verify(tstore, kind, name, element)
        copy = tstore / kind / name
    found, wanted = _zarr_format(copy), _zarr_format(store)
    if found != wanted:  # recovery would refuse to move it into place: stop before the original is touched
        msg = (
            f"The verified copy {copy} of {kind}/{name} is written in Zarr v{found}, the store {store} in Zarr "
            f"v{wanted}; nothing in the store was changed. Use strategy='temp_element'."
        )
        raise OSError(msg)
    # a verified copy is on disk; journal that the original is about to change (with what the copy holds, checked
    # again before a repair moves it into place), then replace it
    _fsync_tree(copy)  # the copy's content is on disk before its journal allows the original to be deleted
    _journal(copy, "replacing", fingerprint=_fingerprint(element) if fingerprint is None else fingerprint)
    sdata.delete_element_from_disk(name)
    sdata.write_element(name)
    _verify(store, kind, name, element)
    _fsync_tree(store / kind / name)
    # the original is whole and verified again: from here on the copy is a leftover, which may be partly deleted
    _journal(copy, "done")
    if on_done is not None:
        on_done()
    if strategy == "temp_element":
        sdata.delete_element_from_disk(name + TMP_SUFFIX)  # also updates the consolidated metadata
    else:
        _remove(_temp_store(store))


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
        - ``"temp_store"``: the same, with the copy in a separate store ``<store>.asign_tmp`` next to the main one,
          written in the main store's spatialdata container (and Zarr) format; a store whose format cannot be
          told is refused before anything is written (use ``"temp_element"``).
        - ``"new_store"``: the whole object is written to ``<path>.asign_new``, verified, journalled, and swapped
          into place with renames (the previous store is kept as ``<path>.asign_old`` until the swap is done).

        An interrupted run is repaired by the next call (see :func:`asign.io.recover`): a copy whose original was
        being replaced is moved into place once it is checked (the interrupted write is completed); any other copy,
        including one whose original was already rewritten and verified, is discarded. An element written from
        memory is journalled while it is written: a partial one is removed by the repair (an object that reads it
        lazily from the removed folder is then refused with an error naming it), a whole one is kept. The
        transformations to write are journalled (in the store's root folder) before the first element is replaced
        and written once every replaced element is verified; the repair completes them when the journals say that
        every replaced element ends new, and keeps the earlier ones otherwise. Each element is replaced atomically
        (old or new); several tables are not replaced as one transaction, so an interruption between two can leave
        one new and one old, with the earlier transformations: call persist again.
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
    if strategy == "temp_store":
        _container_format(store)  # refused before any work if the copy cannot be written in the store's format
    # finish an earlier interrupted write on disk first; the in-memory elements stay as they are (they hold what
    # that write was writing, or newer changes) and are written below. The copies of that write that read_zarr
    # read as elements of their own are dropped from memory before the names are taken
    copies = _persist_copies(store)
    _, _, removed = _repair_store(store)
    _drop_copies_in_memory(sdata, copies)
    if elements is None:
        names = list(sdata.tables)
    else:
        names = [elements] if isinstance(elements, str) else list(elements)
    _check_names(sdata, store, names)
    _check_not_read_from_removed(sdata, store, removed, None if write_new else set(names))
    # what differs from the disk and is not written by this call: reported once the write is done
    unwritten = _unwritten_changes(sdata, store, set(names))
    written = []
    # first: every element only in memory (new, nothing to lose); with write_new=False only the named ones. Each is
    # journalled while it is written, so that a partial one is removed by the repair
    for kind in ("images", "labels", "points", "shapes", "tables"):
        on_disk = set(_disk_names(store, kind))
        for name in getattr(sdata, kind):
            if name not in on_disk and (write_new or name in names):
                _write_new_element(sdata, store, kind, name)
                written.append(name)
    replace = [(_element_kind(sdata, name), name) for name in names if name not in written]
    # the transformations to write: of every element on disk (only of the elements written here with
    # write_new=False); journalled with the fingerprints of the elements about to be replaced, before the first of
    # them changes, so that an interruption anywhere leaves tables and transformations that agree once repaired
    if write_new:
        targets = [n for kind, n, _ in sdata.gen_spatial_elements() if n in _disk_names(store, kind)]
    else:
        targets = [n for n in written + [n for _, n in replace] if _element_kind(sdata, n) != "tables"]
    fingerprints = {f"{kind}/{name}": _fingerprint(getattr(sdata, kind)[name]) for kind, name in replace}
    # "done": the replaced elements whose original was rewritten and verified (recorded before their copy is
    # deleted); the repair rolls the transformations forward only if every replaced element got there
    payload = {"elements": _transformations_payload(sdata, targets), "replaced": fingerprints, "done": []}
    if targets or replace:  # also lists the copies about to be written, so that the repair knows them as persist's
        _store_journal(store, TRANSFORMS_JOURNAL, "pending" if replace else "writing", payload)
    for kind, name in replace:
        key = f"{kind}/{name}"

        def mark_done(key: str = key) -> None:
            payload["done"].append(key)
            _store_journal(store, TRANSFORMS_JOURNAL, "pending", payload)

        _rewrite(sdata, kind, name, strategy=strategy, fingerprint=fingerprints[key], on_done=mark_done)
        written.append(name)
    if targets or replace:
        if replace:  # every replaced element is written and verified: the transformations follow
            _store_journal(store, TRANSFORMS_JOURNAL, "writing", payload)
        for name in targets:
            sdata.write_transformations(name)
        _store_journal(store, TRANSFORMS_JOURNAL, "done")
        _drop_store_journal(store, TRANSFORMS_JOURNAL)
    sdata.write_consolidated_metadata()
    logger.info(f"Persisted {written} and the transformations to {store}.")
    _warn_unwritten(store, unwritten)


def _check_names(sdata: SpatialData, store: Path, names: Sequence[str]) -> None:
    """Refuse, before any write, a name that is no element of the object, or a lazy element that is on disk."""
    for name in names:
        kind = _element_kind(sdata, name)
        if kind is None:
            msg = f"{name!r} is not an element of this object (elements: {list(sdata.elements_paths_in_memory())})."
            raise KeyError(msg)
        if kind not in _REWRITABLE and name in _disk_names(store, kind):
            msg = (
                f"{kind}/{name} is already on disk and persist never rewrites {kind} (their lazy data may be read "
                "from those files); write the object to a new store with strategy='new_store'."
            )
            raise ValueError(msg)
