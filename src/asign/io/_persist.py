"""Write results to a zarr store without ever losing the user's data."""

from __future__ import annotations

import shutil
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Literal

from .._logging import logger

if TYPE_CHECKING:
    from spatialdata import SpatialData

TMP_SUFFIX = "_asign_tmp"


def _check_table(sdata_disk: SpatialData, name: str, table) -> None:
    got = sdata_disk.tables[name]
    if got.shape != table.shape or list(got.obs_names) != list(table.obs_names) or set(got.layers) != set(table.layers):
        msg = f"Verification of table {name!r} written to disk failed: shape/keys differ from the in-memory table."
        raise OSError(msg)


def recover(sdata: SpatialData) -> list[str]:
    """Restore tables left under a temporary name by an interrupted :func:`persist`; returns the restored names."""
    from spatialdata import read_zarr

    if sdata.path is None:
        return []
    disk = read_zarr(sdata.path, selection=("tables",))
    restored = []
    for tmp in [k for k in disk.tables if k.endswith(TMP_SUFFIX)]:
        name = tmp[: -len(TMP_SUFFIX)]
        if name not in disk.tables:
            sdata.tables[name] = disk.tables[tmp]
            sdata.write_element(name)
            restored.append(name)
            logger.warning(f"Restored table {name!r} from {tmp!r} left by an interrupted write.")
        sdata.delete_element_from_disk(tmp) if tmp in sdata else _delete_tmp(sdata, tmp)
    return restored


def _delete_tmp(sdata: SpatialData, tmp: str) -> None:
    p = Path(sdata.path) / "tables" / tmp
    if p.exists():
        shutil.rmtree(p)


def persist(
    sdata: SpatialData,
    elements: str | Sequence[str] | None = None,
    *,
    path: str | Path | None = None,
    strategy: Literal["temp_element", "new_store"] = "temp_element",
    overwrite: bool = False,
) -> None:
    """Write asign's results to disk, safely.

    Parameters
    ----------
    sdata
        The stack. If it is not backed by a store, ``path`` is required and the whole object is written there.
    elements
        Names of tables to (re)write in the object's own store (default: every table that is not yet on disk or
        that differs in memory). Transformations are always written (a metadata-only operation).
    path
        Target store for an object that is not backed, or for ``strategy="new_store"``.
    strategy
        ``"temp_element"``: each table is first written under ``<name>_asign_tmp``, verified, then the original is
        replaced and verified, then the temporary copy is removed; an interrupted run is repaired by the next call.
        ``"new_store"``: the whole object is written to ``<path>.asign_tmp``, verified, and renamed into place.
    overwrite
        Allow replacing an existing store at ``path``.

    Returns
    -------
    Nothing; the store is updated.
    """
    from spatialdata import read_zarr

    if sdata.path is None or strategy == "new_store":
        if path is None:
            msg = "`sdata` is not backed by a zarr store: pass `path=` to write it."
            raise ValueError(msg)
        path = Path(path)
        if path.exists() and not overwrite:
            msg = f"{path} exists; pass overwrite=True to replace it (the old store is kept until the new one is verified)."
            raise FileExistsError(msg)
        if sdata.path is not None and Path(sdata.path).resolve() == path.resolve():
            msg = "strategy='new_store' needs a `path` other than the object's own store."
            raise ValueError(msg)
        tmp = path.with_name(path.name + ".asign_tmp")
        if tmp.exists():
            shutil.rmtree(tmp)
        sdata.write(tmp)
        disk = read_zarr(tmp)
        for name, t in sdata.tables.items():
            _check_table(disk, name, t)
        old = None
        if path.exists():
            old = path.with_name(path.name + ".asign_old")
            path.rename(old)
        tmp.rename(path)
        if old is not None:
            shutil.rmtree(old)
        logger.info(f"Wrote the stack to {path}.")
        return

    recover(sdata)
    names = [elements] if isinstance(elements, str) else list(elements or sdata.tables)
    disk_tables = set(read_zarr(sdata.path, selection=("tables",)).tables)
    for name in names:
        if name not in sdata.tables:
            msg = f"persist writes tables only; {name!r} is not a table of this object."
            raise KeyError(msg)
        table = sdata.tables[name]
        if name not in disk_tables:
            sdata.write_element(name)
            _check_table(read_zarr(sdata.path, selection=("tables",)), name, table)
            continue
        tmp = name + TMP_SUFFIX
        sdata.tables[tmp] = table
        try:
            sdata.write_element(tmp)
            _check_table(read_zarr(sdata.path, selection=("tables",)), tmp, table)
            sdata.delete_element_from_disk(name)
            sdata.write_element(name)
            _check_table(read_zarr(sdata.path, selection=("tables",)), name, table)
            sdata.delete_element_from_disk(tmp)
        finally:
            del sdata.tables[tmp]
    if sdata.path is not None:
        sdata.write_transformations()
        sdata.write_consolidated_metadata()
    logger.info(f"Persisted tables {names} and transformations to {sdata.path}.")
