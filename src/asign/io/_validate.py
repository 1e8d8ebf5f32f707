"""Check a SpatialData object against the section-stack contract."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

import numpy as np
import pandas as pd
import scipy.sparse as sp

from .._constants import Key
from .._stack import STACK_FIELDS, StackInfo

if TYPE_CHECKING:
    from spatialdata import SpatialData


class StackValidationError(ValueError):
    """A SpatialData object does not follow the section-stack contract; ``problems`` lists every violation."""

    def __init__(self, problems: list[str]):
        self.problems = problems
        lines = "\n".join(f"  - {p}" for p in problems)
        super().__init__(f"The section stack is invalid ({len(problems)} problem(s)):\n{lines}")


def _image_level0(image):
    from xarray import DataTree

    if isinstance(image, DataTree):
        return next(iter(image["scale0"].values()))
    return image


def validate_stack(
    sdata: SpatialData,
    *,
    table_key: str = Key.TABLE,
    require_images: bool | Sequence[str] = False,
    check_counts: bool = True,
) -> StackInfo:
    """Check that ``sdata`` is a valid section stack.

    Every problem found is reported at once, each naming the element or section and how to fix it.

    Parameters
    ----------
    sdata
        The stack.
    table_key
        Key of the table that annotates the spots of all sections.
    require_images
        `True` to require an image for every section, or the names of the sections that need one.
    check_counts
        Check that measured counts are finite and non-negative (reads the count matrix once).

    Returns
    -------
    The section manifest as a :class:`~asign._stack.StackInfo`.

    Raises
    ------
    StackValidationError
        A :class:`ValueError` listing every problem.
    """
    problems: list[str] = []
    if table_key not in sdata.tables:
        raise StackValidationError(
            [f"table {table_key!r} not found in sdata.tables (present: {list(sdata.tables)}); pass `table_key=`."]
        )
    table = sdata.tables[table_key]
    uns = table.uns.get(Key.UNS, {})
    raw = uns.get(Key.STACK) if isinstance(uns, dict) else None
    if raw is None:
        raise StackValidationError(
            [
                f"table {table_key!r} has no section manifest `uns['{Key.UNS}']['{Key.STACK}']`; "
                "build the stack with `asign.io.stack_sections`."
            ]
        )
    missing = [f for f in (*STACK_FIELDS, "spot_diameter_um") if f not in raw]
    if missing:
        raise StackValidationError([f"section manifest lacks the field(s) {missing}."])
    lengths = {f: len(np.atleast_1d(raw[f])) for f in STACK_FIELDS}
    if len(set(lengths.values())) != 1:
        raise StackValidationError([f"section manifest fields have unequal lengths {lengths}; one entry per section."])
    stack = StackInfo.from_uns(raw)
    secs = stack.sections
    if len(secs) == 0:
        raise StackValidationError(["section manifest lists no section."])
    dup = sorted({s for s in secs if secs.count(s) > 1})
    if dup:
        problems.append(f"duplicate section names {dup} in the manifest; every section needs a unique name.")
    if not np.all(np.isfinite(stack.z_um)):
        problems.append(f"manifest `z_um` has non-finite values {stack.z_um.tolist()}; give every section a z in µm.")
    elif np.any(np.diff(stack.z_um) <= 0):
        problems.append(f"manifest `z_um` {stack.z_um.tolist()} is not increasing in cutting order.")
    bad_px = [s for s, u in zip(secs, stack.um_per_px, strict=True) if not (np.isfinite(u) and u > 0)]
    if bad_px:
        problems.append(f"sections {bad_px}: `um_per_px` must be a positive pixel size in µm.")
    if not (np.isfinite(stack.spot_diameter_um) and stack.spot_diameter_um > 0):
        problems.append(f"`spot_diameter_um` must be positive, got {stack.spot_diameter_um}.")

    # --- table obs
    obs = table.obs
    if not obs.index.is_unique:
        d = obs.index[obs.index.duplicated()][:5].tolist()
        problems.append(f"table {table_key!r}: obs_names are not unique (e.g. {d}); use '<section>_<spot id>'.")
    for col in (Key.SECTION, Key.MEASURED, Key.REGION, Key.INSTANCE):
        if col not in obs.columns:
            problems.append(f"table {table_key!r}: obs[{col!r}] is missing.")
    if problems and any("is missing" in p for p in problems):
        raise StackValidationError(problems)
    section = obs[Key.SECTION]
    if not isinstance(section.dtype, pd.CategoricalDtype) or not section.cat.ordered:
        problems.append(
            f"table {table_key!r}: obs['{Key.SECTION}'] must be an ordered categorical in cutting order; "
            f"use pd.Categorical(..., categories={secs}, ordered=True)."
        )
    elif list(section.cat.categories) != secs:
        problems.append(
            f"table {table_key!r}: the order of obs['{Key.SECTION}'] categories {list(section.cat.categories)} "
            f"differs from the manifest's section order {secs}."
        )
    unknown = sorted(set(section.astype(str)) - set(secs))
    if unknown:
        problems.append(f"table {table_key!r}: spots belong to sections {unknown} that are not in the manifest.")
    if obs[Key.MEASURED].dtype != bool:
        problems.append(f"table {table_key!r}: obs['{Key.MEASURED}'] must be boolean.")
    if Key.SPATIAL not in table.obsm:
        problems.append(f"table {table_key!r}: obsm['{Key.SPATIAL}'] (spot x, y in image pixels) is missing.")
        xy = None
    else:
        xy = np.asarray(table.obsm[Key.SPATIAL], dtype=float)
        if xy.ndim != 2 or xy.shape[1] != 2:
            problems.append(f"table {table_key!r}: obsm['{Key.SPATIAL}'] must be (n_spots, 2), got {xy.shape}.")
            xy = None
        elif not np.all(np.isfinite(xy)):
            problems.append(f"table {table_key!r}: obsm['{Key.SPATIAL}'] has non-finite coordinates.")

    # --- counts
    if check_counts:
        X = table.layers[Key.COUNTS] if Key.COUNTS in table.layers else table.X
        if X is not None:
            data = X.data if sp.issparse(X) else np.asarray(X)
            if data.size and not np.all(np.isfinite(data)):
                rows = _bad_rows(X, lambda v: ~np.isfinite(v))
                problems.append(
                    f"counts contain NaN/inf in sections {_sections_of(section, rows)}; raw counts must be finite."
                )
            elif data.size and np.any(data < 0):
                rows = _bad_rows(X, lambda v: v < 0)
                problems.append(
                    f"counts contain negative values in sections {_sections_of(section, rows)}; asign needs raw counts."
                )

    # --- table annotation
    from spatialdata.models import get_table_keys

    try:
        region, region_key, instance_key = get_table_keys(table)
    except (KeyError, ValueError):
        problems.append(f"table {table_key!r} is not parsed with TableModel (no region/region_key/instance_key).")
        raise StackValidationError(problems) from None
    region = [str(r) for r in np.atleast_1d(region)]
    required = _required_images(require_images, secs)
    for i, s in enumerate(secs):
        mask = (section.astype(str) == s).to_numpy()
        skey = stack.shapes_keys[i]
        if mask.sum() == 0:
            problems.append(f"section {s!r}: has zero spots in table {table_key!r}; every section needs spots.")
            continue
        if skey not in region:
            problems.append(
                f"section {s!r}: table {table_key!r} does not annotate shapes {skey!r} (its region is {region})."
            )
        regs = set(obs.loc[mask, region_key].astype(str))
        if regs != {skey}:
            problems.append(f"section {s!r}: its table rows annotate {sorted(regs)} instead of {skey!r}.")
        if skey not in sdata.shapes:
            problems.append(f"section {s!r}: shapes element {skey!r} is missing from sdata.shapes.")
        else:
            shapes = sdata.shapes[skey]
            if "radius" not in shapes.columns or not (shapes.geometry.geom_type == "Point").all():
                problems.append(f"section {s!r}: shapes {skey!r} are not circles (Point geometry + 'radius' column).")
            ids = obs.loc[mask, instance_key].to_numpy()
            if len(ids) != len(shapes) or not np.array_equal(np.asarray(ids), shapes.index.to_numpy()):
                problems.append(
                    f"section {s!r}: table obs['{instance_key}'] does not match the index of shapes {skey!r} "
                    f"({len(ids)} rows vs {len(shapes)} shapes); rows must follow the shapes order."
                )
        ikey = stack.image_keys[i]
        if ikey is None:
            if s in required:
                problems.append(f"section {s!r}: has no image, but this step needs one; add an image element.")
            continue
        if ikey not in sdata.images:
            problems.append(f"section {s!r}: image {ikey!r} listed in the manifest is missing from sdata.images.")
            continue
        img = _image_level0(sdata.images[ikey])
        if "c" not in img.dims or img.sizes["c"] != 3:
            problems.append(
                f"section {s!r}: image {ikey!r} must be RGB with 3 channels, got dims {dict(img.sizes)}; "
                "drop the alpha channel or convert greyscale to RGB."
            )
        if img.dtype != np.uint8:
            problems.append(f"section {s!r}: image {ikey!r} has dtype {img.dtype}; convert it to uint8 RGB.")
        if xy is not None:
            h, w = img.sizes["y"], img.sizes["x"]
            p = xy[mask]
            out = (p[:, 0] < 0) | (p[:, 0] >= w) | (p[:, 1] < 0) | (p[:, 1] >= h)
            if out.any():
                problems.append(
                    f"section {s!r}: {int(out.sum())} spot centres lie outside image {ikey!r} ({w} x {h} px); "
                    "obsm['spatial'] must be in the image's own pixels."
                )
    if problems:
        raise StackValidationError(problems)
    return stack


def _required_images(require: bool | Sequence[str], secs: list[str]) -> set[str]:
    if require is True:
        return set(secs)
    if require is False:
        return set()
    return set(require)


def _bad_rows(X, pred) -> np.ndarray:
    if sp.issparse(X):
        X = X.tocoo()
        return np.unique(X.row[pred(X.data)])
    return np.where(pred(np.asarray(X)).any(axis=1))[0]


def _sections_of(section: pd.Series, rows: np.ndarray) -> list[str]:
    return sorted(set(section.astype(str).to_numpy()[rows]))
