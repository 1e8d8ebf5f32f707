"""Check a SpatialData object against the section-stack contract."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd
import scipy.sparse as sp

from asign._constants import Key
from asign._logging import logger
from asign._stack import STACK_FIELDS, StackInfo

if TYPE_CHECKING:
    from spatialdata import SpatialData

_ALL_FIELDS = (*STACK_FIELDS, "spot_diameter_um")


class StackValidationError(ValueError):
    """A SpatialData object does not follow the section-stack contract; ``problems`` lists every violation."""

    def __init__(self, problems: list[str]):
        self.problems = list(problems)
        lines = "\n".join(f"  - {p}" for p in self.problems)
        super().__init__(f"The section stack is invalid ({len(self.problems)} problem(s)):\n{lines}")


def _image_level0(image):
    from xarray import DataTree

    if isinstance(image, DataTree):
        return next(iter(image["scale0"].values()))
    return image


def _transformations(element) -> dict[str, Any]:
    from spatialdata.transformations import get_transformation

    try:
        return dict(get_transformation(element, get_all=True) or {})
    except (KeyError, ValueError, TypeError):
        return {}


def _affine(t) -> np.ndarray:
    return np.asarray(t.to_affine_matrix(input_axes=("x", "y"), output_axes=("x", "y")), dtype=float)


def _check_manifest(raw: Any, table_key: str) -> StackInfo:
    """Structural checks of the manifest that make it unusable; raise at once."""
    where = f"table {table_key!r}: manifest `uns['{Key.UNS}']['{Key.STACK}']`"
    if not isinstance(raw, Mapping):
        raise StackValidationError([f"{where} must be a dict of per-section lists, got {type(raw).__name__}."])
    missing = [f for f in _ALL_FIELDS if f not in raw]
    if missing:
        raise StackValidationError(
            [f"{where} lacks the field(s) {missing}; rebuild it with `asign.io.stack_sections`."]
        )
    lengths = {f: int(np.size(raw[f])) for f in STACK_FIELDS}
    if len(set(lengths.values())) != 1:
        raise StackValidationError([f"{where} fields have unequal lengths {lengths}; give one entry per section."])
    try:
        stack = StackInfo.from_uns(raw)
    except (TypeError, ValueError, IndexError) as e:
        raise StackValidationError([f"{where} cannot be read: {e}."]) from None
    if stack.n_sections == 0:
        raise StackValidationError([f"{where} lists no section."])
    return stack


def validate_stack(
    sdata: SpatialData,
    *,
    table_key: str = Key.TABLE,
    require_images: bool | Sequence[str] = False,
    check_counts: bool = True,
    allow_empty: Sequence[str] = (),
) -> StackInfo:
    """Check that ``sdata`` is a valid section stack.

    Every problem found is reported at once, each naming the problem, the section or element, and how to fix it.
    Checked: the table and its manifest ``uns['asign']['stack']`` (fields, equal lengths, unique section names,
    increasing ``z_um``, positive ``um_per_px`` and spot diameter); ``obs_names`` and ``var_names`` unique;
    ``obs['section']`` an ordered categorical whose categories are the manifest's sections in order; rows grouped by
    section in cutting order; ``obs['measured']`` boolean; ``obsm['spatial']`` finite ``(n, 2)`` and equal to the
    circles' centres; counts finite and non-negative; the table parsed with ``TableModel`` and annotating every
    section's shapes element; per section: at least one spot, circles (Point + ``radius``) whose index matches the
    table's instance key column (``obs['spot_id']`` in a stack built by asign) in row order, a transformation to the
    section's native coordinate system; per image: present when listed, uint8 RGB ``(c, y, x)``
    with 3 channels, in the same pixel frame as the spots, every spot centre inside it.

    Parameters
    ----------
    sdata
        The stack.
    table_key
        Key of the table that annotates the spots of all sections.
    require_images
        `True` to require an image for every section, or the names of the sections that need one.
    check_counts
        Check that counts (``layers['counts']`` if present, else ``.X``) are finite and non-negative (reads the
        count matrix once), and log a warning when they are not integers (checked on a sample of at most 100,000
        nonzero values): asign expects raw counts, and normalised input would be normalised again.
    allow_empty
        Sections that may have no spots yet (no rows and possibly no shapes element), e.g. a section that
        :func:`asign.pp.make_spots` is about to fill.

    Returns
    -------
    The section manifest (a ``StackInfo``: sections, shapes and image keys, coordinate systems, z, µm per pixel and
    spot diameter, in cutting order).

    Raises
    ------
    StackValidationError
        A :class:`ValueError` listing every problem (also in its ``problems`` attribute).
    """
    if table_key not in sdata.tables:
        raise StackValidationError(
            [
                f"table {table_key!r} not found in sdata.tables (present: {list(sdata.tables)}); pass `table_key=` "
                "or build the stack with `asign.io.stack_sections`."
            ]
        )
    table = sdata.tables[table_key]
    uns = table.uns.get(Key.UNS, None)
    raw = uns.get(Key.STACK) if isinstance(uns, Mapping) else None
    if raw is None:
        raise StackValidationError(
            [
                f"table {table_key!r} has no section manifest `uns['{Key.UNS}']['{Key.STACK}']`; "
                "build the stack with `asign.io.stack_sections`."
            ]
        )
    stack = _check_manifest(raw, table_key)
    problems: list[str] = []
    secs = stack.sections

    # --- manifest values
    dup = sorted({s for s in secs if secs.count(s) > 1})
    if dup:
        problems.append(f"manifest: duplicate section names {dup}; every section needs a unique name.")
    for field in ("shapes_keys", "image_keys"):
        keys = [k for k in getattr(stack, field) if k]
        dk = sorted({k for k in keys if keys.count(k) > 1})
        if dk:
            problems.append(f"manifest: {field[:-1]} {dk} is listed for several sections; one element per section.")
    if not np.all(np.isfinite(stack.z_um)):
        problems.append(f"manifest: `z_um` has non-finite values {stack.z_um.tolist()}; give every section a z in µm.")
    elif np.any(np.diff(stack.z_um) <= 0):
        problems.append(
            f"manifest: `z_um` {stack.z_um.tolist()} is not strictly increasing in cutting order {secs}; "
            "reorder the sections or fix their z."
        )
    bad_px = [s for s, u in zip(secs, stack.um_per_px, strict=True) if not (np.isfinite(u) and u > 0)]
    if bad_px:
        problems.append(f"manifest: sections {bad_px} have a non-positive `um_per_px`; give the pixel size in µm.")
    if not (np.isfinite(stack.spot_diameter_um) and stack.spot_diameter_um > 0):
        problems.append(f"manifest: `spot_diameter_um` must be positive, got {stack.spot_diameter_um}.")

    # --- table obs
    obs = table.obs
    if not obs.index.is_unique:
        d = obs.index[obs.index.duplicated()][:5].tolist()
        problems.append(f"table {table_key!r}: obs_names are not unique (e.g. {d}); use '<section>_<spot id>'.")
    if not table.var_names.is_unique:
        d = sorted({str(g) for g in table.var_names[table.var_names.duplicated()]})
        problems.append(
            f"table {table_key!r}: var_names are not unique (e.g. {d[:5]}); call `table.var_names_make_unique()`."
        )
    absent = [c for c in (Key.SECTION, Key.MEASURED) if c not in obs.columns]
    if absent:
        problems.append(
            f"table {table_key!r}: obs columns {absent} are missing; build the stack with `asign.io.stack_sections`."
        )
        raise StackValidationError(problems)
    section = obs[Key.SECTION]
    sec_str = section.astype(str).to_numpy()
    if not isinstance(section.dtype, pd.CategoricalDtype) or not section.cat.ordered:
        problems.append(
            f"table {table_key!r}: obs['{Key.SECTION}'] must be an ordered categorical in cutting order; "
            f"use pd.Categorical(..., categories={secs}, ordered=True)."
        )
    elif [str(c) for c in section.cat.categories] not in (secs, [s for s in secs if s not in allow_empty]):
        problems.append(
            f"table {table_key!r}: the order of obs['{Key.SECTION}'] categories {list(section.cat.categories)} "
            f"differs from the manifest's section order {secs}."
        )
    unknown = sorted(set(sec_str) - set(secs))
    if unknown:
        problems.append(f"table {table_key!r}: spots belong to sections {unknown} that are not in the manifest {secs}.")
    else:
        codes = pd.Categorical(sec_str, categories=list(dict.fromkeys(secs))).codes
        if np.any(np.diff(codes) < 0):
            problems.append(
                f"table {table_key!r}: rows are not grouped by section in cutting order {secs}; sort the rows by "
                "section, then by the shapes index."
            )
    if obs[Key.MEASURED].dtype != bool:
        problems.append(f"table {table_key!r}: obs['{Key.MEASURED}'] must be boolean, got {obs[Key.MEASURED].dtype}.")
    xy = None
    if Key.SPATIAL not in table.obsm:
        problems.append(f"table {table_key!r}: obsm['{Key.SPATIAL}'] (spot x, y in image pixels) is missing.")
    else:
        xy = np.asarray(table.obsm[Key.SPATIAL], dtype=float)
        if xy.ndim != 2 or xy.shape[1] != 2:
            problems.append(f"table {table_key!r}: obsm['{Key.SPATIAL}'] must be (n_spots, 2), got {xy.shape}.")
            xy = None
        elif not np.all(np.isfinite(xy)):
            rows = np.where(~np.isfinite(xy).all(axis=1))[0]
            problems.append(
                f"table {table_key!r}: obsm['{Key.SPATIAL}'] has non-finite coordinates in sections "
                f"{sorted(set(sec_str[rows]))}."
            )
            xy = None

    # --- counts
    if check_counts:
        X = table.layers[Key.COUNTS] if Key.COUNTS in table.layers else table.X
        where = f"layers['{Key.COUNTS}']" if Key.COUNTS in table.layers else ".X"
        if X is None:
            problems.append(f"table {table_key!r}: has no counts (.X is None and no layers['{Key.COUNTS}']).")
        else:
            data = X.data if sp.issparse(X) else np.asarray(X)
            if data.size and not np.all(np.isfinite(data)):
                rows = _bad_rows(X, lambda v: ~np.isfinite(v))
                problems.append(
                    f"table {table_key!r}: counts in {where} contain NaN/inf in sections {sorted(set(sec_str[rows]))}; "
                    "raw counts must be finite."
                )
            with np.errstate(invalid="ignore"):
                neg = data.size and np.any(data < 0)
            if neg:
                rows = _bad_rows(X, lambda v: v < 0)
                problems.append(
                    f"table {table_key!r}: counts in {where} contain negative values in sections "
                    f"{sorted(set(sec_str[rows]))}; asign needs raw counts."
                )
            elif (value := _non_integer_value(data)) is not None:
                logger.warning(
                    f"table {table_key!r}: counts in {where} are not integers (e.g. {value:.4g}); asign expects raw "
                    "counts and normalises them itself, so normalised values (e.g. log1p) are normalised again and "
                    f"give wrong results. Put the raw counts in .X or layers['{Key.COUNTS}']."
                )

    # --- table annotation
    from spatialdata.models import get_table_keys

    try:
        region, region_key, instance_key = get_table_keys(table)
    except (KeyError, ValueError, TypeError):
        problems.append(
            f"table {table_key!r} is not parsed with TableModel (no region / region_key / instance_key); use "
            f"TableModel.parse(adata, region=[...], region_key='{Key.REGION}', instance_key='{Key.INSTANCE}')."
        )
        raise StackValidationError(problems) from None
    region = [str(r) for r in np.atleast_1d(region)]
    for col in (region_key, instance_key):
        if col not in obs.columns:
            problems.append(f"table {table_key!r}: obs[{col!r}] (the table's region/instance key) is missing.")
    if any(col not in obs.columns for col in (region_key, instance_key)):
        raise StackValidationError(problems)

    required = _required_images(secs, require=require_images)
    missing_req = sorted(set(required) - set(secs))
    if missing_req:
        problems.append(f"require_images names sections {missing_req} that are not in the stack {secs}.")
    for i, s in enumerate(secs):
        mask = sec_str == s
        skey = stack.shapes_keys[i]
        cs = stack.coordinate_systems[i]
        if mask.sum() == 0:
            if s in allow_empty:
                continue
            problems.append(
                f"section {s!r}: has zero spots in table {table_key!r}; every section needs spots "
                "(use `asign.pp.make_spots` for a section that has only an image)."
            )
            continue
        if skey not in region:
            problems.append(
                f"section {s!r}: table {table_key!r} does not annotate shapes {skey!r} (its region is {region}); "
                "parse the table with TableModel listing every section's shapes element."
            )
        regs = set(obs.loc[mask, region_key].astype(str))
        if regs != {skey}:
            problems.append(
                f"section {s!r}: its rows of table {table_key!r} annotate {sorted(regs)} instead of {skey!r}."
            )
        shapes_tf: np.ndarray | None = None
        if skey not in sdata.shapes:
            problems.append(
                f"section {s!r}: shapes element {skey!r} listed in the manifest is missing from sdata.shapes."
            )
        else:
            shapes = sdata.shapes[skey]
            is_point = bool(len(shapes)) and bool((shapes.geometry.geom_type == "Point").all())
            if "radius" not in shapes.columns or not is_point:
                problems.append(
                    f"section {s!r}: shapes {skey!r} are not circles (Point geometry + 'radius' column); "
                    "store spot centres with ShapesModel.parse(xy, geometry=0, radius=...)."
                )
            ids = obs.loc[mask, instance_key].to_numpy()
            if len(ids) != len(shapes) or not np.array_equal(ids, shapes.index.to_numpy()):
                problems.append(
                    f"section {s!r}: table obs['{instance_key}'] does not match the index of shapes {skey!r} "
                    f"({len(ids)} rows vs {len(shapes)} shapes); rows must follow the shapes order."
                )
            elif is_point and xy is not None:
                centres = np.column_stack([shapes.geometry.x.to_numpy(), shapes.geometry.y.to_numpy()])
                if not np.allclose(centres, xy[mask], rtol=0, atol=1e-3):
                    problems.append(
                        f"section {s!r}: obsm['{Key.SPATIAL}'] differs from the centres of shapes {skey!r}; both hold "
                        "the spots' pixel positions in the section's own image."
                    )
            tfs = _transformations(shapes)
            if cs not in tfs:
                problems.append(
                    f"section {s!r}: shapes {skey!r} have no transformation to the section's native coordinate "
                    f"system {cs!r} (found {sorted(tfs)}); set Identity() to {cs!r}."
                )
            else:
                shapes_tf = _affine(tfs[cs])
                if not np.allclose(shapes_tf, np.eye(3), atol=1e-9):
                    problems.append(
                        f"section {s!r}: shapes {skey!r} have a transformation to the section's native coordinate "
                        f"system {cs!r} that is not Identity (affine {np.round(shapes_tf, 6).tolist()}); asign "
                        "registers in the image's own pixels, so the image and its spots need Identity() to "
                        f"{cs!r} (put other placements in another coordinate system)."
                    )
        ikey = stack.image_keys[i]
        if ikey is None:
            if s in required:
                problems.append(
                    f"section {s!r}: has no image, but this step needs one; add an image element "
                    f"'{Key.image(s)}' and list it in the manifest."
                )
            continue
        if ikey not in sdata.images:
            problems.append(f"section {s!r}: image {ikey!r} listed in the manifest is missing from sdata.images.")
            continue
        img = _image_level0(sdata.images[ikey])
        problems += _image_problems(sdata.images[ikey], section=s, image_key=ikey)
        tfs = _transformations(sdata.images[ikey])
        if cs not in tfs:
            problems.append(
                f"section {s!r}: image {ikey!r} has no transformation to the section's native coordinate system "
                f"{cs!r} (found {sorted(tfs)})."
            )
        elif shapes_tf is not None and not np.allclose(_affine(tfs[cs]), shapes_tf, atol=1e-6):
            problems.append(
                f"section {s!r}: image {ikey!r} and shapes {skey!r} are not in the same pixel frame (their "
                f"transformations to {cs!r} differ); spots must be in the image's own pixels."
            )
        if xy is not None and "x" in img.dims and "y" in img.dims:
            h, w = img.sizes["y"], img.sizes["x"]
            p = xy[mask]
            out = (p[:, 0] < 0) | (p[:, 0] >= w) | (p[:, 1] < 0) | (p[:, 1] >= h)
            if out.any():
                problems.append(
                    f"section {s!r}: {int(out.sum())} spot centres lie outside image {ikey!r} ({w} x {h} px); "
                    f"obsm['{Key.SPATIAL}'] must be in the image's own pixels."
                )
    if problems:
        raise StackValidationError(problems)
    return stack


def _image_problems(image: Any, *, section: str, image_key: str, identity_to: str | None = None) -> list[str]:
    """The problems of a section's image element that :func:`validate_stack` reports (empty if none).

    Checked: level 0 is RGB ``(c, y, x)`` with 3 channels and uint8; with ``identity_to``, a transformation to that
    coordinate system, when present, is ``Identity`` (the section's spots are laid in the image's own pixels).
    """
    img = _image_level0(image)
    problems = []
    if tuple(img.dims) != ("c", "y", "x") or img.sizes["c"] != 3:
        problems.append(
            f"section {section!r}: image {image_key!r} must be RGB (c, y, x) with 3 channels, got {dict(img.sizes)}; "
            "drop an alpha channel or convert greyscale to RGB."
        )
    if img.dtype != np.uint8:
        problems.append(
            f"section {section!r}: image {image_key!r} has dtype {img.dtype}; convert it to uint8 RGB "
            "(e.g. skimage.util.img_as_ubyte)."
        )
    tfs = _transformations(image)
    if identity_to is not None and identity_to in tfs:
        m = _affine(tfs[identity_to])
        if not np.allclose(m, np.eye(3), atol=1e-9):
            problems.append(
                f"section {section!r}: image {image_key!r} has a transformation to the section's native coordinate "
                f"system {identity_to!r} that is not Identity (affine {np.round(m, 6).tolist()}); asign registers in "
                f"the image's own pixels, so the image and its spots need Identity() to {identity_to!r} (put other "
                "placements in another coordinate system)."
            )
    return problems


def _required_images(secs: list[str], *, require: bool | Sequence[str]) -> list[str]:
    if require is True:
        return list(secs)
    if require is False or require is None:
        return []
    if isinstance(require, str):
        return [require]
    return [str(r) for r in require]


def _non_integer_value(data: np.ndarray, max_values: int = 100_000) -> float | None:
    """A non-integer value among (a sample of at most ``max_values``) finite nonzero ``data``, or `None`."""
    flat = np.asarray(data).ravel()
    if flat.size > 10 * max_values:  # a regular sample of the dense entries, most of which may be zero
        flat = flat[:: flat.size // (10 * max_values)]
    with np.errstate(invalid="ignore"):
        nz = flat[(flat != 0) & np.isfinite(flat)]
    if nz.size > max_values:
        nz = nz[:: nz.size // max_values]
    if not np.issubdtype(nz.dtype, np.floating):
        return None
    bad = np.abs(nz - np.round(nz)) > 1e-4
    return float(nz[np.argmax(bad)]) if bad.any() else None


def _bad_rows(X, pred) -> np.ndarray:
    if sp.issparse(X):
        X = X.tocoo()
        with np.errstate(invalid="ignore"):
            return np.unique(X.row[pred(X.data)])
    with np.errstate(invalid="ignore"):
        return np.where(pred(np.asarray(X)).any(axis=1))[0]
