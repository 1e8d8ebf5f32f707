"""Read access to the section-stack contract: the manifest, per-section elements and spot order.

Every asign function finds sections through :func:`get_stack` (the manifest in
``table.uns['asign']['stack']``) and ``obs['section']``, never by parsing element names.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd

from ._constants import Key

if TYPE_CHECKING:
    from anndata import AnnData
    from spatialdata import SpatialData

STACK_FIELDS = ("section", "shapes_key", "image_key", "native_coordinate_system", "z_um", "um_per_px")


@dataclass(frozen=True)
class StackInfo:
    """The section manifest of a stack, ordered by cutting order."""

    sections: list[str]
    shapes_keys: list[str]
    image_keys: list[str | None]
    coordinate_systems: list[str]
    z_um: np.ndarray
    um_per_px: np.ndarray
    spot_diameter_um: float

    @property
    def n_sections(self) -> int:
        return len(self.sections)

    def index(self, section: str) -> int:
        """Position of ``section`` in cutting order."""
        try:
            return self.sections.index(section)
        except ValueError:
            msg = f"Unknown section {section!r}; the stack has sections {self.sections}."
            raise KeyError(msg) from None

    def image_key(self, section: str) -> str | None:
        return self.image_keys[self.index(section)]

    def shapes_key(self, section: str) -> str:
        return self.shapes_keys[self.index(section)]

    def coordinate_system(self, section: str) -> str:
        return self.coordinate_systems[self.index(section)]

    def to_uns(self) -> dict[str, Any]:
        """The zarr-writable manifest (no `None`: a missing image is stored as ``""``)."""
        return {
            "section": list(self.sections),
            "shapes_key": list(self.shapes_keys),
            "image_key": [k or "" for k in self.image_keys],
            "native_coordinate_system": list(self.coordinate_systems),
            "z_um": np.asarray(self.z_um, dtype=float),
            "um_per_px": np.asarray(self.um_per_px, dtype=float),
            "spot_diameter_um": float(self.spot_diameter_um),
        }

    @classmethod
    def from_uns(cls, stack: dict[str, Any]) -> StackInfo:
        """Read the manifest as stored in ``uns`` (lists or arrays, also after a zarr round trip)."""

        def strings(key: str) -> list[str]:
            return [str(s) for s in np.atleast_1d(np.asarray(stack[key], dtype=object))]

        return cls(
            sections=strings("section"),
            shapes_keys=strings("shapes_key"),
            image_keys=[s or None for s in strings("image_key")],
            coordinate_systems=strings("native_coordinate_system"),
            z_um=np.atleast_1d(np.asarray(stack["z_um"], dtype=float)),
            um_per_px=np.atleast_1d(np.asarray(stack["um_per_px"], dtype=float)),
            spot_diameter_um=float(np.asarray(stack["spot_diameter_um"], dtype=float).reshape(-1)[0]),
        )


def get_table(sdata: SpatialData, table_key: str = Key.TABLE) -> AnnData:
    """Return ``sdata.tables[table_key]`` or raise a :class:`KeyError` that lists the tables present."""
    if table_key not in sdata.tables:
        msg = (
            f"Table {table_key!r} not found in sdata.tables (present: {list(sdata.tables)}); "
            "build a stack with `asign.io.stack_sections` or pass `table_key=`."
        )
        raise KeyError(msg)
    return sdata.tables[table_key]


def get_stack(sdata_or_table: SpatialData | AnnData, table_key: str = Key.TABLE) -> StackInfo:
    """Return the :class:`StackInfo` manifest stored in ``table.uns['asign']['stack']``."""
    from anndata import AnnData

    table = sdata_or_table if isinstance(sdata_or_table, AnnData) else get_table(sdata_or_table, table_key)
    try:
        stack = table.uns[Key.UNS][Key.STACK]
    except (KeyError, TypeError):
        msg = (
            f"`uns['{Key.UNS}']['{Key.STACK}']` (the section manifest) not found in table {table_key!r}; "
            "build the stack with `asign.io.stack_sections` or `asign.io.read_her2st`."
        )
        raise KeyError(msg) from None
    return StackInfo.from_uns(stack)


def section_codes(table: AnnData, stack: StackInfo | None = None) -> np.ndarray:
    """Integer position (cutting order) of every spot's section."""
    stack = stack or get_stack(table)
    sec = pd.Categorical(table.obs[Key.SECTION].astype(str), categories=stack.sections)
    codes = np.asarray(sec.codes)
    if (codes < 0).any():
        bad = sorted(set(table.obs[Key.SECTION].astype(str)[codes < 0]))
        msg = f"obs['{Key.SECTION}'] has sections {bad} that are not in the stack manifest {stack.sections}."
        raise ValueError(msg)
    return codes


def section_masks(table: AnnData, stack: StackInfo | None = None) -> dict[str, np.ndarray]:
    """Boolean row mask of every section, in cutting order."""
    stack = stack or get_stack(table)
    codes = section_codes(table, stack)
    return {s: codes == i for i, s in enumerate(stack.sections)}


def counts_matrix(table: AnnData):
    """The raw counts of the table (``layers['counts']`` if present, else ``.X``), never a copy to modify."""
    if Key.COUNTS in table.layers:
        return table.layers[Key.COUNTS]
    return table.X


def wider_than_spots(
    stack: StackInfo, width_px: Any, sections: Any = None, *, factor: float = 3.0
) -> dict[str, tuple[float, float]]:
    """Sections where a width given in pixels spans more than ``factor`` spot diameters.

    ``width_px`` is one number or one per section of the stack (cutting order). Returns ``{section: (width_px,
    width_um)}`` for those sections, in the order of ``sections`` (default: all): pixel defaults meant for images of
    about 0.5 µm/px then cover many spots on a coarse image.
    """
    widths = np.broadcast_to(np.asarray(width_px, dtype=float), (stack.n_sections,))
    limit = factor * float(stack.spot_diameter_um)
    out = {}
    for s in stack.sections if sections is None else sections:
        i = stack.index(s)
        um = float(widths[i]) * float(stack.um_per_px[i])
        if um > limit:
            out[s] = (float(widths[i]), um)
    return out


def wide_detail(stack: StackInfo, wide: dict[str, tuple[float, float]]) -> str:
    """``"S1: 224 px x 4 µm/px = 896 µm, ..."`` for the result of :func:`wider_than_spots` (warning messages)."""
    return ", ".join(
        f"{s}: {p:g} px x {float(stack.um_per_px[stack.index(s)]):g} µm/px = {w:.0f} µm" for s, (p, w) in wide.items()
    )


def nonfinite_rows(table: AnnData, values: Any) -> tuple[int, dict[str, int]]:
    """Rows of ``values`` (one per spot of ``table``) holding NaN or inf: their number and their count per section."""
    bad = ~np.isfinite(np.asarray(values)).all(axis=1)
    secs = table.obs[Key.SECTION].astype(str).to_numpy()[bad]
    return int(bad.sum()), {s: int((secs == s).sum()) for s in dict.fromkeys(secs)}


def unmeasured_genes(table: AnnData) -> dict[str, set[str]]:
    """``{section: genes}`` that a measured section lacks (0 in its counts, but never measured there).

    Read from ``uns['asign']['unmeasured_genes']`` (written by :func:`asign.io.stack_sections`); a table without the
    record has every gene measured in every measured section.
    """
    rec = table.uns.get(Key.UNS, {})
    rec = rec.get(Key.UNMEASURED_GENES, {}) if isinstance(rec, dict) else {}
    if not isinstance(rec, dict):
        return {}
    return {str(s): {str(g) for g in np.atleast_1d(np.asarray(genes, dtype=object))} for s, genes in rec.items()}


def genes_lacking(table: AnnData, rows: np.ndarray, genes: Any) -> dict[str, list[str]]:
    """``{section: genes}``: the genes of ``genes`` that the sections of the spots in ``rows`` never measured.

    ``rows`` is a boolean spot mask; genes keep the order of ``genes`` (:func:`unmeasured_genes` gives the record).
    Only sections lacking a gene are listed, in the order of their first spot.
    """
    absent = unmeasured_genes(table)
    if not absent:
        return {}
    sec = table.obs[Key.SECTION].astype(str).to_numpy()[np.asarray(rows, dtype=bool)]
    lacking = {s: [str(g) for g in genes if str(g) in absent.get(s, set())] for s in dict.fromkeys(sec.tolist())}
    return {s: g for s, g in lacking.items() if g}


def unmeasured_mask(table: AnnData, genes: Any, stack: StackInfo | None = None) -> np.ndarray | None:
    """Boolean ``(n_obs, len(genes))``: True where a spot's section never measured the gene; `None` if nowhere."""
    rec = unmeasured_genes(table)
    if not rec:
        return None
    genes = [str(g) for g in genes]
    stack = stack or get_stack(table)
    secs = stack.sections
    codes = section_codes(table, stack)
    by_section = np.zeros((len(secs), len(genes)), dtype=bool)
    for i, s in enumerate(secs):
        absent = rec.get(s)
        if absent:
            by_section[i] = [g in absent for g in genes]
    if not by_section.any():
        return None
    return by_section[codes]


def copy_stack_uns(src: AnnData, dst: AnnData) -> None:
    """Copy the section manifest from ``src`` to ``dst`` (every derived table carries it)."""
    dst.uns.setdefault(Key.UNS, {})
    dst.uns[Key.UNS][Key.STACK] = dict(src.uns[Key.UNS][Key.STACK])
