"""Build a section stack (one SpatialData object) from per-section parts."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd
import scipy.sparse as sp

from asign._checks import check_number
from asign._constants import Key
from asign._logging import logger
from asign._stack import StackInfo

if TYPE_CHECKING:
    from anndata import AnnData
    from spatialdata import SpatialData

DEFAULT_SCALE_FACTORS = (2, 2, 2, 2)
MIN_PYRAMID_SIDE = 256
# ``obs`` columns that the stack writes itself; a section's own ``obs`` must not use them
RESERVED_OBS = (Key.SECTION, Key.MEASURED, Key.REGION, Key.INSTANCE, Key.BARCODE)


@dataclass
class Section:
    """One serial section, in memory.

    Parameters
    ----------
    name
        Section name, unique in the stack (e.g. ``"C2"``); a valid SpatialData element name suffix (letters, digits,
        ``_``, ``-``, ``.``).
    spots
        Spot centres ``(n, 2)`` as (x, y) in the section image's own pixels, at least one; or `None` for an
        image-only section: an H&E ``image`` (required then) without spots, which :func:`asign.io.stack_sections`
        places in the manifest without spots and :func:`asign.pp.make_spots` then fills with a virtual spot grid.
        An image-only section takes no ``counts``, ``spot_ids``, ``genes``, ``obs`` or ``obsm``.
    counts
        Raw counts: an :class:`~anndata.AnnData` with one row per spot (in the order of ``spots``; ``layers['counts']``
        is used when present, else ``.X``), a dense or sparse ``(n, genes)`` matrix (then ``genes`` is required), or
        `None` for a section without measured counts (its rows get zero counts and ``measured=False``). Counts need
        ``spots``.
    image
        RGB image: a ``(y, x, 3)`` or ``(3, y, x)`` uint8 numpy or dask array, or an image element
        (:class:`xarray.DataArray` or multiscale :class:`xarray.DataTree`) whose level 0 is in the same pixel frame
        as ``spots``; `None` for a section without image (which then needs ``spots``).
    um_per_px
        Microns per image pixel (required).
    spot_ids
        Stable spot identifiers (default ``0..n-1``); ``obs_names`` become ``"<section>_<spot id>"``.
    genes
        Gene names when ``counts`` is a matrix.
    obs
        Extra per-spot columns, one row per spot in the order of ``spots``; the columns that the stack writes itself
        (``section``, ``measured``, ``region``, ``spot_id``, ``barcode``) are refused.
    obsm
        Extra per-spot arrays ``(n, k)`` (e.g. a published registration); sections without a key get NaN rows. The
        key ``spatial`` is refused: ``obsm['spatial']`` of the stack holds ``spots``.
    """

    name: str
    spots: np.ndarray | None = None
    counts: Any = None
    image: Any = None
    um_per_px: float | None = None
    spot_ids: Sequence[str] | None = None
    genes: Sequence[str] | None = None
    obs: pd.DataFrame | None = None
    obsm: dict[str, np.ndarray] = field(default_factory=dict)


def _pyramid_factors(size: int, scale_factors: Sequence[int] | None) -> list[int]:
    """The leading ``scale_factors`` whose levels keep at least :data:`MIN_PYRAMID_SIDE` px on the shorter side."""
    keep, s = [], 1
    for f in scale_factors or ():
        if size // (s * f) < MIN_PYRAMID_SIDE:
            break
        keep.append(int(f))
        s *= f
    return keep


def _image_where(section: str, source: str | None) -> str:
    """``"Section 'V1': image 'hires_image' (stacked as 'he_V1')"``: how messages name a section's input image."""
    if source is None:
        return f"Section {section!r}: image"
    return f"Section {section!r}: image {source!r} (stacked as {Key.image(section)!r})"


def _check_rgb(shape: tuple[int, ...], channel_axis: int, dtype: Any, where: str) -> None:
    """Refuse an image that is not uint8 RGB, with a message that says how to convert it."""
    n_c = shape[channel_axis]
    if n_c == 1:
        msg = (
            f"{where} is single-channel (greyscale), shape {shape}; the stack needs uint8 RGB: repeat the channel to "
            f"three, e.g. `np.repeat(img, 3, axis={channel_axis})`."
        )
        raise ValueError(msg)
    if n_c == 4:
        msg = f"{where} must have 3 (RGB) channels, got shape {shape}; drop the alpha channel."
        raise ValueError(msg)
    if n_c != 3:
        msg = f"{where} must have 3 (RGB) channels, got shape {shape} ({n_c} channels)."
        raise ValueError(msg)
    if np.dtype(dtype) != np.uint8:
        msg = f"{where} dtype is {dtype}; convert it to uint8 RGB (e.g. skimage.util.img_as_ubyte)."
        raise ValueError(msg)


def _retarget_image(image: Any, coordinate_system: str, section: str | None = None, source: str | None = None):
    """A new image element with the data of ``image`` and only ``Identity`` to ``coordinate_system``.

    In-memory (numpy-backed) levels are wrapped in dask arrays, as image elements require. ``source`` names the
    user's image element (SpatialData inputs) in error messages.
    """
    import dask.array as da
    import xarray as xr
    from spatialdata.transformations import Identity, set_transformation

    def _level(old: xr.DataArray) -> xr.DataArray:
        if set(old.dims) != {"c", "y", "x"}:
            if section is None:
                where = "image element"
            else:
                where = _image_where(section, source) + ("" if source is not None else " element")
            msg = f"{where} must have dims ('c', 'y', 'x'), got {old.dims}."
            raise ValueError(msg)
        old = old.transpose("c", "y", "x")
        data = old.data
        if not isinstance(data, da.Array):
            data = da.from_array(np.asarray(data), chunks=(-1, 1024, 1024))
        return xr.DataArray(data, dims=old.dims, coords=old.coords, name=old.name or "image")

    if isinstance(image, xr.DataTree):
        nodes = {}
        for name in sorted(image.children, key=lambda n: int(n.removeprefix("scale"))):
            new = _level(next(iter(image[name].values())))
            nodes[name] = xr.Dataset({new.name: new})
        out = xr.DataTree.from_dict(nodes)
    else:
        out = _level(image)
    set_transformation(out, {coordinate_system: Identity()}, set_all=True)
    return out


def _parse_image(
    image: Any, name: str, coordinate_system: str, scale_factors: Sequence[int] | None, source: str | None = None
):
    """The image element ``he_<name>`` from an array or an image element (``source``: the user's element name)."""
    import dask.array as da
    import xarray as xr
    from spatialdata.models import Image2DModel
    from spatialdata.transformations import Identity

    where = _image_where(name, source)
    if isinstance(image, xr.DataArray | xr.DataTree):
        out = _retarget_image(image, coordinate_system, section=name, source=source)
        level = _highest_level(out)
        _check_rgb(tuple(level.shape), 0, level.dtype, where)
        try:
            Image2DModel().validate(out)
        except (ValueError, TypeError) as e:
            elem = where if source is not None else f"Section {name!r}: the image element"
            msg = f"{elem} is not a valid spatialdata image: {e}"
            raise ValueError(msg) from e
        return out
    arr = image if isinstance(image, da.Array) else np.asarray(image)
    if arr.ndim != 3:
        msg = (
            f"{where} must be RGB, (y, x, 3) or (3, y, x), got shape {arr.shape}; convert greyscale images to RGB "
            "(e.g. `np.repeat(img[..., None], 3, axis=-1)` for a (y, x) image)."
        )
        raise ValueError(msg)
    if arr.shape[-1] in (1, 3, 4) and arr.shape[0] not in (1, 3, 4):
        channel_axis = 2
    elif arr.shape[0] in (1, 3, 4):
        channel_axis = 0
    else:  # neither end looks like channels: the shorter one, for the message
        channel_axis = 2 if arr.shape[-1] < arr.shape[0] else 0
    _check_rgb(tuple(arr.shape), channel_axis, arr.dtype, where)
    if channel_axis == 2:
        arr = arr.transpose(2, 0, 1)
    keep = _pyramid_factors(min(arr.shape[1:]), scale_factors)
    return Image2DModel.parse(
        arr,
        dims=("c", "y", "x"),
        scale_factors=keep or None,
        c_coords=["r", "g", "b"],
        chunks=(3, 1024, 1024),
        transformations={coordinate_system: Identity()},
    )


def _counts_to_anndata(sec: Section) -> AnnData | None:
    from anndata import AnnData

    if sec.counts is None:
        return None
    if isinstance(sec.counts, AnnData):
        a = sec.counts
    else:
        if sec.genes is None:
            msg = f"Section {sec.name!r}: `counts` is a matrix, so `genes` must name its columns."
            raise ValueError(msg)
        X = sec.counts
        X = X.tocsr() if sp.issparse(X) else sp.csr_matrix(np.asarray(X))
        if X.shape[1] != len(sec.genes):
            msg = f"Section {sec.name!r}: counts have {X.shape[1]} columns for {len(sec.genes)} genes."
            raise ValueError(msg)
        a = AnnData(X=X, var=pd.DataFrame(index=[str(g) for g in sec.genes]))
    if a.X is None and Key.COUNTS not in a.layers:
        msg = (
            f"Section {sec.name!r}: counts AnnData has no .X and no layers['{Key.COUNTS}']; put the raw counts in "
            "one of them."
        )
        raise ValueError(msg)
    if not a.var_names.is_unique:
        d = a.var_names[a.var_names.duplicated()][:5].tolist()
        msg = f"Section {sec.name!r}: duplicate gene names {d}; make them unique (`var_names_make_unique`)."
        raise ValueError(msg)
    return a


def _highest_level(image):
    from xarray import DataTree

    if isinstance(image, DataTree):
        return next(iter(image["scale0"].values()))
    return image


# physical spot diameters (µm) of the platforms whose circles a SpatialData input usually carries
KNOWN_SPOT_DIAMETERS_UM = {"ST": 100.0, "Visium": 55.0}
# relative difference between the given and the circles' spot radius above which `um_per_px` is questioned
RADIUS_MISMATCH = 0.2


def _check_um_per_px_against_radius(
    name: str,
    *,
    um_per_px: float,
    spot_diameter_um: float,
    radius_px: float,
    image_key: str | None,
    shapes_key: str,
) -> None:
    """Warn when the user's ``um_per_px`` and the input circles' radius disagree on the spot size (the value is kept)."""
    r_given = float(spot_diameter_um) / (2.0 * float(um_per_px))
    if not (np.isfinite(radius_px) and radius_px > 0) or abs(r_given - radius_px) <= RADIUS_MISMATCH * radius_px:
        return
    um_from_radius = float(spot_diameter_um) / (2.0 * radius_px)
    frame = f"image {image_key!r}" if image_key is not None else f"the coordinates of shapes {shapes_key!r} (no image)"
    # the spot diameter that the circles have at the user's pixel size: a known platform's one blames the diameter
    d_circles = 2.0 * radius_px * float(um_per_px)
    platform = [
        (k, d)
        for k, d in KNOWN_SPOT_DIAMETERS_UM.items()
        if d != float(spot_diameter_um) and abs(d_circles - d) <= RADIUS_MISMATCH * d
    ]
    if platform:
        k, d = platform[0]
        culprit = (
            f"At {um_per_px:.4g} µm/px the circles are {d_circles:.4g} µm wide, like {k} spots ({d:g} µm): "
            f"`spot_diameter_um` = {spot_diameter_um:g} is probably wrong (ST: 100, Visium: 55)."
        )
    else:
        culprit = (
            f"`um_per_px` is probably not the pixel size of {frame} (e.g. the full-resolution pixel size given for "
            "a downscaled image); pass that image's pixel size, or leave `um_per_px` out to derive it from the "
            "circles. Otherwise check `spot_diameter_um` (ST: 100, Visium: 55)."
        )
    logger.warning(
        f"Section {name!r}: `um_per_px` = {um_per_px:.4g} µm/px and `spot_diameter_um` = {spot_diameter_um:g} give a "
        f"spot radius of {r_given:.4g} px in {frame}, but the input circles {shapes_key!r} have radius "
        f"{radius_px:.4g} px there, which implies {um_from_radius:.4g} µm/px. {culprit} The given `um_per_px` is kept."
    )


def _spatialdata_obsm(adata: AnnData) -> tuple[dict[str, np.ndarray], list[str]]:
    """The numeric ``(n, k)`` obsm arrays of a SpatialData input's table, and the keys that are dropped."""
    keep: dict[str, np.ndarray] = {}
    dropped: list[str] = []
    for k, v in adata.obsm.items():
        if k == Key.SPATIAL:
            dropped.append(f"obsm[{k!r}] (the stack's obsm[{k!r}] holds the circles' centres in the image's pixels)")
            continue
        arr = v.to_numpy() if isinstance(v, pd.DataFrame) else v
        if sp.issparse(arr) or not isinstance(arr, np.ndarray) or arr.ndim != 2 or arr.dtype.kind not in "biuf":
            dropped.append(f"obsm[{k!r}] (not a numeric (n_spots, k) array)")
            continue
        keep[str(k)] = arr
    return keep, dropped


def _examples(values: Any, n: int = 3) -> str:
    head = [v.item() if isinstance(v, np.generic) else v for v in list(values[:n])]
    return ", ".join(repr(v) for v in head) + (", ..." if len(values) > n else "")


def _match_instances(ids: pd.Series, index: pd.Index, *, name: str, table_key: str, shapes_key: str) -> np.ndarray:
    """The table row of every circle of ``index``, from the table's instance ids ``ids`` (unique).

    When no id matches and the ids and the shapes index differ in type (e.g. ``'0', '1'`` strings for an integer
    index, as a CSV or an object column gives), they are compared as strings; that match is used, with an INFO
    line, when it is one-to-one. Otherwise the error names both types.
    """
    values, keys = ids.to_numpy(), index.to_numpy()
    order = pd.Index(values).get_indexer(keys)
    if len(keys) and (order < 0).all():
        id_type = pd.api.types.infer_dtype(values, skipna=True)
        index_type = pd.api.types.infer_dtype(keys, skipna=True)
        if id_type != index_type:
            s_values = pd.Index(values.astype(str))
            s_keys = pd.Index(keys.astype(str))
            by_str = s_values.get_indexer(s_keys) if s_values.is_unique and s_keys.is_unique else None
            if by_str is not None and not (by_str < 0).any():
                logger.info(
                    f"Section {name!r}: the instance ids of table {table_key!r} ({id_type}: "
                    f"{_examples(values)}) and the index of shapes {shapes_key!r} ({index_type}: {_examples(keys)}) "
                    "differ in type only; matched them as strings."
                )
                return by_str
            msg = (
                f"Section {name!r}: no instance id of table {table_key!r} ({id_type}: {_examples(values)}) matches "
                f"the index of shapes {shapes_key!r} ({index_type}: {_examples(keys)}), and comparing them as "
                "strings does not match every spot either; give the table's instance ids the type and values of the "
                "shapes index."
            )
            raise ValueError(msg)
    if (order < 0).any():
        missing = keys[order < 0]
        msg = (
            f"Section {name!r}: the table does not annotate every spot of {shapes_key!r} ({len(missing)} missing, "
            f"e.g. {_examples(missing)}); table {table_key!r} needs one row per circle, whose instance id is the "
            "circle's index."
        )
        raise ValueError(msg)
    return order


def _from_spatialdata(
    sdata: SpatialData,
    *,
    name: str | None,
    um_per_px: float | None,
    image_key: str | None,
    spot_diameter_um: float,
) -> tuple[Section, str | None]:
    """Turn a single-section SpatialData (e.g. spatialdata-io's Visium reader) into a :class:`Section`.

    Returns the section and the name of the chosen image element (`None` without image).
    """
    from spatialdata.models import get_table_keys
    from spatialdata.transformations import get_transformation, get_transformation_between_coordinate_systems

    circles = [k for k, v in sdata.shapes.items() if "radius" in v.columns]
    if len(circles) != 1:
        msg = (
            f"Expected exactly one circles shapes element (Point geometry + 'radius') per section SpatialData, "
            f"found {circles} among shapes {list(sdata.shapes)}."
        )
        raise ValueError(msg)
    shapes_key = circles[0]
    shapes = sdata.shapes[shapes_key]
    tables = []
    for tkey, t in sdata.tables.items():
        try:
            region = get_table_keys(t)[0]
        except (KeyError, ValueError):
            continue
        if shapes_key in [str(r) for r in np.atleast_1d(region)]:
            tables.append((tkey, t))
    if len(tables) != 1:
        msg = (
            f"Expected one table annotating shapes {shapes_key!r}, found {len(tables)} (tables: {list(sdata.tables)})."
        )
        raise ValueError(msg)
    table_key, table = tables[0]
    _, region_key, instance_key = get_table_keys(table)
    name = name or shapes_key
    rows = table[(table.obs[region_key].astype(str) == shapes_key).to_numpy()]
    ids = rows.obs[instance_key]
    if ids.duplicated().any():
        dup = pd.unique(ids[ids.duplicated(keep=False)])
        msg = (
            f"Section {name!r}: table {table_key!r} has duplicate instance ids in obs[{instance_key!r}] for shapes "
            f"{shapes_key!r}: {int(len(dup))} id(s) annotate more than one row (e.g. {dup[:5].tolist()}); every spot "
            "needs exactly one row (drop or fix the duplicated rows)."
        )
        raise ValueError(msg)
    if image_key is None and sdata.images:
        # the highest-resolution image
        image_key = max(sdata.images, key=lambda k: int(np.prod(_highest_level(sdata.images[k]).shape)))
    elif image_key is not None and image_key not in sdata.images:
        msg = f"Section {name!r}: image {image_key!r} not found (images: {list(sdata.images)})."
        raise KeyError(msg)
    xy = np.column_stack([shapes.geometry.x.to_numpy(), shapes.geometry.y.to_numpy()])
    radius = shapes["radius"].to_numpy(dtype=float)
    image = None
    if image_key is not None:
        # express spot centres (and radii) in the chosen image's pixel frame
        try:
            t = get_transformation_between_coordinate_systems(sdata, shapes, sdata.images[image_key])
        except RuntimeError as e:
            cs_shapes = sorted(get_transformation(shapes, get_all=True) or {})
            cs_image = sorted(get_transformation(sdata.images[image_key], get_all=True) or {})
            msg = (
                f"Section {name!r}: no transformation maps shapes {shapes_key!r} (coordinate systems {cs_shapes}) "
                f"into image {image_key!r} (coordinate systems {cs_image}) ({e}); pick an image that shares a "
                "coordinate system with the spots (`image_key=`), or add a transformation between the two elements "
                "(spatialdata.transformations.set_transformation)."
            )
            raise ValueError(msg) from e
        m = t.to_affine_matrix(input_axes=("x", "y"), output_axes=("x", "y"))
        xy = xy @ m[:2, :2].T + m[:2, 2]
        radius = radius * float(np.sqrt(abs(np.linalg.det(m[:2, :2]))))
        image = sdata.images[image_key]
    order = _match_instances(ids, shapes.index, name=name, table_key=table_key, shapes_key=shapes_key)
    if len(rows) > len(order):
        n_extra = len(rows) - len(order)
        logger.warning(
            f"Section {name!r}: {n_extra} row(s) of table {table_key!r} annotate instance ids in "
            f"obs[{instance_key!r}] that have no circle in {shapes_key!r}; they are not stacked."
        )
    adata = rows[order].copy()
    spot_ids = [str(i) for i in adata.obs_names]
    r_med = float(np.median(radius))
    if um_per_px is None:
        # the circles carry the physical spot diameter in pixels
        um_per_px = float(spot_diameter_um / (2.0 * r_med))
        hint = " (ST; Visium spots are 55 µm)" if float(spot_diameter_um) == KNOWN_SPOT_DIAMETERS_UM["ST"] else ""
        logger.info(
            f"Section {name!r}: um_per_px = {um_per_px:.4g} from the spot radius ({r_med:.4g} px) and "
            f"spot_diameter_um = {spot_diameter_um}{hint}; pass `um_per_px=` if the spots do not have that diameter."
        )
    else:
        _check_um_per_px_against_radius(
            name,
            um_per_px=um_per_px,
            spot_diameter_um=spot_diameter_um,
            radius_px=r_med,
            image_key=image_key,
            shapes_key=shapes_key,
        )
    extra = adata.obs.drop(columns=[c for c in (region_key, instance_key) if c in adata.obs.columns])
    extra = extra.reset_index(drop=True)
    extra["spot_radius_px"] = radius
    obsm, dropped = _spatialdata_obsm(adata)
    layers = [k for k in adata.layers if k != Key.COUNTS]
    if layers:
        dropped.append(
            f"layers {layers} (the stack keeps the raw counts only, from layers[{Key.COUNTS!r}] when present, else .X)"
        )
    if dropped:
        logger.info(f"Section {name!r}: not stacked from table {table_key!r}: " + "; ".join(dropped) + ".")
    return (
        Section(
            name=name,
            spots=xy,
            counts=adata,
            image=image,
            um_per_px=um_per_px,
            spot_ids=spot_ids,
            obs=extra,
            obsm=obsm,
        ),
        image_key,
    )


def _per_section(value: Any, n: int, what: str) -> list[Any]:
    if value is None or isinstance(value, str) or np.ndim(value) == 0:
        return [value] * n
    out = list(value)
    if len(out) != n:
        msg = f"`{what}` has {len(out)} values for {n} sections."
        raise ValueError(msg)
    return out


def _check_image_only(s: Section) -> None:
    """Refuse an image-only section (``spots=None``) without an image, or with per-spot parts."""
    if s.image is None:
        msg = (
            f"Section {s.name!r} needs spots or an image: both `spots` and `image` are None. Pass the spot centres "
            "as `spots`, or the H&E image as `image` for an image-only section (filled by `asign.pp.make_spots` "
            "after stacking)."
        )
        raise ValueError(msg)
    if s.counts is not None:
        msg = (
            f"Section {s.name!r}: `counts` given without `spots`; counts need one row per spot centre. Pass the "
            "centres as `spots`, or leave `counts` out for an image-only section."
        )
        raise ValueError(msg)
    per_spot = [
        k
        for k, v in (("spot_ids", s.spot_ids), ("genes", s.genes), ("obs", s.obs), ("obsm", s.obsm or None))
        if v is not None
    ]
    if per_spot:
        msg = (
            f"Section {s.name!r}: `{'`, `'.join(per_spot)}` describe(s) spots, but `spots` is None (an image-only "
            "section); pass the spot centres as `spots`, or leave them out (the virtual spots of "
            "`asign.pp.make_spots` get their own ids)."
        )
        raise ValueError(msg)


def _check_section(s: Section) -> np.ndarray | None:
    """The spot centres ``(n, 2)`` of a checked section; `None` for an image-only section (``spots=None``)."""
    from spatialdata import sanitize_name

    if not isinstance(s.name, str) or not s.name or sanitize_name(s.name) != s.name:
        msg = f"Section name {s.name!r} is not a valid element name; use e.g. {sanitize_name(str(s.name))!r}."
        raise ValueError(msg)
    if s.spots is None:
        _check_image_only(s)
        spots = None
    else:
        spots = np.asarray(s.spots, dtype=float)
        if spots.ndim != 2 or spots.shape[1] != 2:
            msg = (
                f"Section {s.name!r}: `spots` must be an (n, 2) array of (x, y) pixel centres, got shape {spots.shape}."
            )
            raise ValueError(msg)
        if len(spots) == 0:
            msg = (
                f"Section {s.name!r}: has no spots (`spots` is empty); for a section that has only an image pass "
                "`spots=None` (an image-only section) and fill it with `asign.pp.make_spots` after stacking."
            )
            raise ValueError(msg)
        if not np.all(np.isfinite(spots)):
            msg = f"Section {s.name!r}: `spots` has non-finite coordinates."
            raise ValueError(msg)
    if s.um_per_px is not None:
        try:
            check_number("um_per_px", s.um_per_px)
        except TypeError:
            msg = (
                f"Section {s.name!r}: `um_per_px` must be a number (µm per image pixel), got {s.um_per_px!r} "
                f"({type(s.um_per_px).__name__}); e.g. um_per_px=1.0."
            )
            raise TypeError(msg) from None
    if s.um_per_px is None or not (np.isfinite(s.um_per_px) and float(s.um_per_px) > 0):
        msg = f"Section {s.name!r}: `um_per_px` must be a positive pixel size in µm, got {s.um_per_px}."
        raise ValueError(msg)
    return spots


N_EXAMPLES = 3


def _check_gene_names(measured: list[tuple[str, pd.Index]], n_measured: np.ndarray, genes: pd.Index) -> None:
    """Warn about gene names that differ only by case between sections, and sections sharing no gene with the others.

    ``measured``: (section, gene names) of the measured sections; ``n_measured``: per gene of ``genes``, the number of
    measured sections that have it. Nothing is renamed.
    """
    if len(measured) < 2:
        return
    # lower-cased name -> {section: spellings}; only names with several spellings in the gene axis can clash
    lower = pd.Series(genes.astype(str), dtype=object).str.lower()
    clashing = set(lower[lower.duplicated(keep=False)])
    spellings: dict[str, dict[str, set[str]]] = {}
    for sec, names in measured if clashing else ():
        for g in names:
            if (k := str(g).lower()) in clashing:
                spellings.setdefault(k, {}).setdefault(sec, set()).add(str(g))
    order = {sec: i for i, (sec, _) in enumerate(measured)}
    clashes: dict[tuple[str, str], list[tuple[str, str]]] = {}
    for per_sec in spellings.values():
        if len(per_sec) < 2 or len(set().union(*per_sec.values())) < 2:
            continue
        secs = sorted(per_sec, key=order.__getitem__)
        for i, a in enumerate(secs):
            for b in secs[i + 1 :]:
                sa, sb = per_sec[a], per_sec[b]
                if sa != sb:
                    clashes.setdefault((a, b), []).append((min(sa - sb or sa), min(sb - sa or sb)))
    if clashes:
        pairs = sorted(clashes, key=lambda ab: (order[ab[0]], order[ab[1]]))
        parts = [
            f"{a!r} vs {b!r}: {len(clashes[a, b])} genes (e.g. "
            + ", ".join(f"{x!r}/{y!r}" for x, y in sorted(clashes[a, b])[:N_EXAMPLES])
            + ")"
            for a, b in pairs[:5]
        ]
        more = f"; and {len(pairs) - 5} more section pairs" if len(pairs) > 5 else ""
        logger.warning(
            "Gene names differ only by case between sections, so they are stacked as different genes (each unmeasured "
            f"in the other section): {'; '.join(parts)}{more}. If they are the same genes, harmonise the names (e.g. "
            "upper-case the var_names) before stacking."
        )
    alone = [
        (sec, names) for sec, names in measured if len(names) and (n_measured[genes.get_indexer(names)] <= 1).all()
    ]
    if alone:
        detail = "; ".join(
            f"{sec!r}: {len(names)} genes, e.g. {[str(g) for g in names[:N_EXAMPLES]]}" for sec, names in alone
        )
        logger.warning(
            f"Section(s) {[sec for sec, _ in alone]} share no gene with any other measured section (of "
            f"{[sec for sec, _ in measured]}): {detail}. Their genes are unmeasured in every other section, so nothing "
            "can be learnt from or scored against them across sections; check the gene naming (symbols vs ids, case)."
        )


def _concat_obs(frames: list[pd.DataFrame], columns: Sequence[str]) -> pd.DataFrame:
    """Concatenate per-section ``obs`` frames, keeping the dtypes of the extra ``columns`` (see `stack_sections`).

    A column that some sections lack, or whose dtype differs between sections, would otherwise become ``object``:
    bool -> nullable ``boolean``, integers -> nullable ``Int64`` (only where a section lacks the column or one is
    already nullable), categoricals -> categorical with the union of the categories, strings that some sections lack
    -> categorical (an ``object`` column writes its NaN as the string ``'nan'``, and anndata refuses to write pandas'
    ``string`` dtype by default); other dtypes (float, strings everywhere) are left to :func:`pandas.concat`.
    """
    from pandas.api.types import infer_dtype, is_bool_dtype, is_integer_dtype, union_categoricals

    frames = [f.copy() for f in frames]
    for c in columns:
        present = [f[c] for f in frames if c in f.columns]
        missing = len(present) < len(frames)
        dtypes = [x.dtype for x in present]
        target: Any = None
        if all(isinstance(d, pd.CategoricalDtype) for d in dtypes):
            same = all(d == dtypes[0] for d in dtypes)
            if same and not missing:
                continue
            if same:
                target = dtypes[0]
            else:
                try:
                    u = union_categoricals([x.array for x in present], ignore_order=True)
                except TypeError:  # categories of different types (e.g. str and int): left to pandas.concat
                    continue
                target = pd.CategoricalDtype(u.categories)
        elif all(is_bool_dtype(d) for d in dtypes):
            if not missing and all(d == np.bool_ for d in dtypes):
                continue
            target = "boolean"
        elif all(is_integer_dtype(d) for d in dtypes):
            if not missing and all(isinstance(d, np.dtype) for d in dtypes):
                continue
            target = "Int64"
        elif missing and all(infer_dtype(x, skipna=True) in ("string", "empty") for x in present):
            values = pd.unique(pd.concat([x.dropna() for x in present]).astype(str))
            if not len(values):
                continue
            target = pd.CategoricalDtype(sorted(values))
        else:
            continue
        for f in frames:
            f[c] = f[c].astype(target) if c in f.columns else pd.Series(pd.NA, index=f.index, dtype=target)
    return pd.concat(frames)


def stack_sections(
    sections: Sequence[Section | SpatialData],
    *,
    names: Sequence[str] | None = None,
    spot_diameter_um: float = 100.0,
    thickness_um: float = 16.0,
    z_um: float | Sequence[float] | None = None,
    um_per_px: float | Sequence[float] | None = None,
    image_key: str | Sequence[str | None] | None = None,
    scale_factors: Sequence[int] | None = DEFAULT_SCALE_FACTORS,
    table_key: str = Key.TABLE,
    validate: bool = True,
) -> SpatialData:
    """Build a valid section stack from per-section parts.

    Parameters
    ----------
    sections
        The sections in cutting order: :class:`asign.io.Section` objects (images, spot centres and counts in
        memory), or single-section :class:`spatialdata.SpatialData` objects such as spatialdata-io's Visium reader
        returns (one circles shapes element, the table annotating it, and images). For a SpatialData input, the
        spot centres and radii are mapped into the pixel frame of the chosen image (``image_key``, default the
        largest image) with the transformation between the two elements. Of its table (whose ``instance_key``
        column must be unique), the rows are reordered to the shapes' index (rows whose instance id has no circle
        are not stacked, with a WARNING giving their number and section; instance ids that differ from the shapes
        index only in type, such as strings ``'0', '1'`` for an integer index, are matched as strings when that
        matches every circle one-to-one, with an INFO line, and otherwise refused with an error naming both types)
        and kept are: the raw counts (``layers['counts']`` when present, else ``.X``), the extra ``obs`` columns,
        and the numeric ``(n, k)`` ``obsm`` arrays except ``obsm['spatial']`` (replaced by the centres in the chosen
        image's pixels); other ``layers``, non-numeric ``obsm`` entries, ``varm``, ``obsp`` and ``uns`` are dropped
        (an INFO line names the dropped ``layers`` and ``obsm`` keys).

        A ``Section`` with ``spots=None`` and an ``image`` is image-only (an H&E image of a section whose
        transcriptome was not measured): it is placed in the manifest at its z with its image ``he_<section>``,
        but gets no shapes element and no table rows, and a WARNING names the image-only sections and the call that
        fills them, ``asign.pp.make_spots(sdata, section=[...])`` (a virtual spot grid over each tissue); every
        other step needs that first. Refused: a section with neither spots nor image, ``counts`` (or ``spot_ids``,
        ``genes``, ``obs``, ``obsm``) without spots, and a stack where every section is image-only (nothing to
        impute from).
    names
        Section names for :class:`~spatialdata.SpatialData` inputs (default: the shapes element's name).
    spot_diameter_um
        Physical spot diameter in µm (ST: 100, Visium: 55): a number.
    thickness_um
        Section thickness: section ``i`` (0-based) gets ``z = i * thickness_um`` unless ``z_um`` is given.
    z_um
        Explicit z position of every section in µm (increasing in cutting order): a sequence of one value per
        section (a single number is accepted for a single section).
    um_per_px
        Pixel size of the chosen image for :class:`~spatialdata.SpatialData` inputs (one number or one per section;
        a string such as ``"1.0"`` is refused). Default: derived from the circles' radius,
        ``spot_diameter_um / (2 * radius_px)``. A given value is kept, but a WARNING is logged when the spot radius it
        implies, ``spot_diameter_um / (2 * um_per_px)``, differs from the circles' radius in the chosen image's pixels
        by more than 20 % (a full-resolution pixel size given for a downscaled image, or the wrong
        ``spot_diameter_um``).
    image_key
        For :class:`~spatialdata.SpatialData` inputs: the image to use (one name or one per section); default the
        image with the most pixels.
    scale_factors
        Pyramid downscale factors for array images (levels below 256 px on the shorter side are dropped).
    table_key
        Key of the table written.
    validate
        Run :func:`asign.io.validate_stack` on the result (image-only sections may have no spots there).

    Returns
    -------
    A :class:`spatialdata.SpatialData` with images ``he_<section>`` (uint8 RGB; multiscale with the levels of
    ``scale_factors`` for array images, while an image element, such as a SpatialData input's image, keeps its own
    levels: a single-scale image stays single-scale), circles
    ``spots_<section>`` (radius = ``spot_diameter_um / 2`` in the section's pixels; index = spot id ``0..n-1``), both
    with :class:`~spatialdata.transformations.Identity` to the coordinate system named like the section, and one
    table ``table_key`` annotating every ``spots_<section>`` (rows by section, then shapes index) with
    ``obs['section']`` (ordered categorical; its categories are all sections, image-only ones included),
    ``obs['measured']``, ``obs['region']``, ``obs['spot_id']``, ``obs['barcode']`` (the given spot id),
    ``obs['spot_radius_px']`` (SpatialData inputs only: the input circles' radius in the chosen image's pixels; NaN
    for other sections), the sections' extra ``obs`` columns and ``obsm`` arrays, ``obsm['spatial']``, raw counts in
    ``.X`` (CSR float32; one gene axis, the union of the sections' genes, a gene absent from a section being 0 there;
    ``var['n_sections_measured']``, and the absent genes of each measured section in
    ``uns['asign']['unmeasured_genes']``, so that they are neither trained on nor scored there) and the manifest
    ``uns['asign']['stack']`` (every section, in cutting order). An image-only section has its image ``he_<section>``
    and its manifest entry (its ``shapes_key`` ``spots_<section>`` names the circles that
    :func:`asign.pp.make_spots` adds), but no ``spots_<section>`` element yet, no rows, and the table's ``region``
    (``obs['region']`` categories and the TableModel region list) leaves its shapes out until then. Such a stack
    passes ``validate_stack(..., allow_empty=[...image-only sections])`` and writes to / reads back from zarr.

    Extra ``obs`` columns keep their dtype across sections, also through a zarr round trip: a bool column that some
    sections lack becomes pandas' nullable ``boolean`` (``<NA>`` there), an integer column that some sections lack
    nullable ``Int64``, categoricals become one categorical with the union of the sections' categories (unordered
    unless every section has the same ordered categories), and a string column that some sections lack becomes a
    categorical of its strings (NaN there: an ``object`` column would be written with the string ``'nan'``, and
    anndata does not write pandas' ``string`` dtype by default); strings in every section stay ``object`` strings,
    floats get NaN where missing. An extra ``obsm`` array is NaN in the sections without it.

    Gene names are matched exactly: names that differ only by case between sections (``Gene00`` / ``GENE00``) stay
    different genes, with a WARNING naming the sections and example pairs; a WARNING also names a measured section
    that shares no gene with any other measured section. Nothing is renamed.
    """
    import anndata as ad
    from spatialdata import SpatialData
    from spatialdata.models import ShapesModel, TableModel
    from spatialdata.transformations import Identity

    if len(sections) == 0:
        msg = "stack_sections needs at least one section."
        raise ValueError(msg)
    n_sec = len(sections)
    ums = _per_section(um_per_px, n_sec, "um_per_px")
    for i, u in enumerate(ums):
        if u is not None:
            check_number("um_per_px" if n_sec == 1 else f"um_per_px[{i}]", u)
    check_number("spot_diameter_um", spot_diameter_um)
    if not (np.isfinite(spot_diameter_um) and spot_diameter_um > 0):
        msg = f"`spot_diameter_um` must be positive, got {spot_diameter_um}."
        raise ValueError(msg)
    ikeys = _per_section(image_key, n_sec, "image_key")
    sec_names_in = _per_section(names, n_sec, "names") if names is not None else [None] * n_sec
    secs: list[Section] = []
    image_sources: list[str | None] = []  # the user's image element of a SpatialData input, for messages
    for i, s in enumerate(sections):
        if isinstance(s, Section):
            secs.append(s)
            image_sources.append(None)
        elif isinstance(s, SpatialData):
            sec, src = _from_spatialdata(
                s, name=sec_names_in[i], um_per_px=ums[i], image_key=ikeys[i], spot_diameter_um=spot_diameter_um
            )
            secs.append(sec)
            image_sources.append(src)
        else:
            msg = f"sections[{i}] is a {type(s).__name__}; pass asign.io.Section or spatialdata.SpatialData objects."
            raise TypeError(msg)
    sec_names = [s.name for s in secs]
    dup = sorted({str(n) for n in sec_names if sec_names.count(n) > 1})
    if dup:
        msg = (
            f"Duplicate section names {dup}; every section needs a unique name (pass `names=` for SpatialData inputs)."
        )
        raise ValueError(msg)
    if z_um is None:
        z = np.arange(n_sec, dtype=float) * float(thickness_um)
    else:
        z = np.asarray(z_um, dtype=float)
        if z.ndim == 0 and n_sec == 1:
            z = z.reshape(1)
        if z.shape != (n_sec,):
            got = "a single number" if z.ndim == 0 else f"{z.size} values"
            msg = f"`z_um` must be a sequence of one z position (µm) per section: {n_sec} values, got {got}."
            raise ValueError(msg)
    if n_sec > 1 and not np.all(np.diff(z) > 0):
        msg = f"z positions {z.tolist()} must increase in cutting order (check `thickness_um` / `z_um`)."
        raise ValueError(msg)

    # every section checked before any image is parsed; image-only sections (spots=None) get no shapes and no rows
    checked = [_check_section(s) for s in secs]
    image_only = [s.name for s, spots in zip(secs, checked, strict=True) if spots is None]
    if len(image_only) == n_sec:
        msg = (
            f"Every section is image-only ({image_only}: `spots` is None): with no spots at all there is nothing to "
            "impute from. Stack at least one section with spots (and measured counts) alongside the image-only "
            "sections, which `asign.pp.make_spots` then fills."
        )
        raise ValueError(msg)

    images: dict[str, Any] = {}
    shapes: dict[str, Any] = {}
    image_keys: list[str | None] = []
    genes: pd.Index | None = None
    parts = []
    for s, src, spots in zip(secs, image_sources, checked, strict=True):
        if spots is None:  # image-only: its image, at its z in the manifest; make_spots lays its spots later
            ikey = Key.image(s.name)
            images[ikey] = _parse_image(s.image, s.name, s.name, scale_factors, source=src)
            image_keys.append(ikey)
            continue
        n = spots.shape[0]
        ids = [str(i) for i in (s.spot_ids if s.spot_ids is not None else range(n))]
        if len(ids) != n:
            msg = f"Section {s.name!r}: {len(ids)} spot ids for {n} spots."
            raise ValueError(msg)
        if len(set(ids)) != n:
            msg = f"Section {s.name!r}: spot ids are not unique; `obs_names` ('<section>_<spot id>') must be unique."
            raise ValueError(msg)
        radius_px = 0.5 * float(spot_diameter_um) / float(s.um_per_px)
        skey = Key.shapes(s.name)
        shapes[skey] = ShapesModel.parse(
            spots,
            geometry=0,
            radius=np.full(n, radius_px),
            index=pd.RangeIndex(n),
            transformations={s.name: Identity()},
        )
        if s.image is not None:
            ikey = Key.image(s.name)
            images[ikey] = _parse_image(s.image, s.name, s.name, scale_factors, source=src)
            image_keys.append(ikey)
        else:
            image_keys.append(None)
        a = _counts_to_anndata(s)
        if a is not None and a.n_obs != n:
            msg = f"Section {s.name!r}: counts have {a.n_obs} rows for {n} spots."
            raise ValueError(msg)
        if s.obs is not None and len(s.obs) != n:
            msg = f"Section {s.name!r}: `obs` has {len(s.obs)} rows for {n} spots."
            raise ValueError(msg)
        clash = [c for c in (s.obs.columns if s.obs is not None else ()) if c in RESERVED_OBS]
        if clash:
            msg = (
                f"Section {s.name!r}: `obs` columns {clash} are reserved (the stack writes {list(RESERVED_OBS)} "
                "itself); rename them (e.g. `obs.rename(columns={...})`, in the table for a SpatialData input)."
            )
            raise ValueError(msg)
        if Key.SPATIAL in s.obsm:
            msg = (
                f"Section {s.name!r}: obsm[{Key.SPATIAL!r}] is reserved: the stack's obsm[{Key.SPATIAL!r}] holds the "
                "spot centres given as `spots` (pixels of the section's image); pass the centres as `spots`, or store "
                "other coordinates under another key (e.g. 'spatial_fullres')."
            )
            raise ValueError(msg)
        for k, v in s.obsm.items():
            if np.asarray(v).ndim != 2 or len(v) != n:
                msg = f"Section {s.name!r}: obsm[{k!r}] must be (n_spots, k) with n_spots = {n}, got {np.shape(v)}."
                raise ValueError(msg)
        parts.append((s, a, ids, spots, skey))
        if a is not None:
            genes = pd.Index(a.var_names) if genes is None else genes.union(a.var_names, sort=False)
    if genes is None:
        genes = pd.Index([], dtype=str)
    # one gene axis for all sections; a gene missing from a section is 0 there (and recorded in var)
    blocks, obs_frames, obsm_extra = [], [], {}
    n_measured = np.zeros(len(genes), dtype=np.int64)
    unmeasured: dict[str, list[str]] = {}
    for s, a, ids, spots, skey in parts:
        n = spots.shape[0]
        if a is None:
            blocks.append(sp.csr_matrix((n, len(genes)), dtype=np.float32))
        else:
            absent = genes.difference(a.var_names, sort=False)
            if len(absent):
                unmeasured[s.name] = [str(g) for g in absent]
            X = a.layers[Key.COUNTS] if Key.COUNTS in a.layers else a.X
            X = sp.csr_matrix(X, dtype=np.float32)
            idx = genes.get_indexer(a.var_names)
            M = sp.csr_matrix(
                (np.ones(len(idx), dtype=np.float32), (np.arange(len(idx)), idx)), shape=(len(idx), len(genes))
            )
            blocks.append((X @ M).tocsr())
            n_measured[idx] += 1
        obs = pd.DataFrame(
            {
                Key.SECTION: s.name,
                Key.MEASURED: a is not None,
                Key.REGION: skey,
                Key.INSTANCE: np.arange(n, dtype=np.int64),
                Key.BARCODE: ids,
            },
            index=[f"{s.name}_{i}" for i in ids],
        )
        if s.obs is not None:
            extra = s.obs.reset_index(drop=True)
            extra.index = obs.index
            obs = obs.join(extra.drop(columns=[c for c in extra.columns if c in obs.columns]))
        obs_frames.append(obs)
        for k, v in s.obsm.items():
            obsm_extra.setdefault(k, []).append((s.name, np.asarray(v, dtype=float)))
    extra_cols = list(dict.fromkeys(c for f in obs_frames for c in f.columns if c not in RESERVED_OBS))
    obs = _concat_obs(obs_frames, extra_cols)
    obs[Key.SECTION] = pd.Categorical(obs[Key.SECTION], categories=sec_names, ordered=True)
    # the table annotates the shapes that exist: not those of image-only sections (as make_spots expects)
    regions = [Key.shapes(n) for n in sec_names if n not in image_only]
    obs[Key.REGION] = pd.Categorical(obs[Key.REGION], categories=regions)
    obs[Key.MEASURED] = obs[Key.MEASURED].astype(bool)
    X = sp.vstack(blocks, format="csr", dtype=np.float32)
    var = pd.DataFrame({"n_sections_measured": n_measured}, index=genes.astype(str))
    adata = ad.AnnData(X=X, obs=obs, var=var)
    adata.obsm[Key.SPATIAL] = np.vstack([p[3] for p in parts])
    section_of_row = obs[Key.SECTION].astype(str).to_numpy()
    for k, vals in obsm_extra.items():
        width = {v.shape[1] for _, v in vals}
        if len(width) != 1:
            msg = f"obsm[{k!r}] has different widths {sorted(width)} across sections."
            raise ValueError(msg)
        full = np.full((adata.n_obs, width.pop()), np.nan)
        for name, v in vals:
            full[section_of_row == name] = v
        adata.obsm[k] = full
    stack = StackInfo(
        sections=sec_names,
        shapes_keys=[Key.shapes(n) for n in sec_names],
        image_keys=image_keys,
        coordinate_systems=sec_names,
        z_um=z,
        um_per_px=np.array([float(s.um_per_px) for s in secs]),
        spot_diameter_um=float(spot_diameter_um),
    )
    adata.uns[Key.UNS] = {Key.STACK: stack.to_uns()}
    _check_gene_names([(p[0].name, p[1].var_names) for p in parts if p[1] is not None], n_measured, genes)
    if unmeasured:  # genes a measured section lacks: 0 in its counts, but no truth (see asign._stack.unmeasured_genes)
        adata.uns[Key.UNS][Key.UNMEASURED_GENES] = unmeasured
    table = TableModel.parse(adata, region=regions, region_key=Key.REGION, instance_key=Key.INSTANCE)
    sdata = SpatialData(images=images, shapes=shapes, tables={table_key: table})
    n_only = f" ({len(image_only)} image-only)" if image_only else ""
    logger.info(f"Stacked {n_sec} sections{n_only}, {adata.n_obs} spots, {adata.n_vars} genes.")
    if validate:
        from ._validate import StackValidationError, validate_stack

        try:
            validate_stack(sdata, table_key=table_key, allow_empty=image_only)
        except StackValidationError as e:
            # name the user's image elements of SpatialData inputs next to the stack's ones
            renames = {Key.image(n): src for n, src in zip(sec_names, image_sources, strict=True) if src is not None}
            if not renames:
                raise
            problems = list(e.problems)
            for new, src in renames.items():
                problems = [p.replace(f"image {new!r}", f"image {new!r} (from input image {src!r})") for p in problems]
            raise StackValidationError(problems) from e
    if image_only:
        table_arg = "" if table_key == Key.TABLE else f", table_key={table_key!r}"
        one = len(image_only) == 1
        label = f"Section {image_only[0]!r} has" if one else f"Sections {image_only} have"
        they, their = ("it", "its image") if one else ("them", "their images")
        logger.warning(
            f"{label} an image and no spots (image-only): in the manifest at {their.split()[0]} z, with {their}, "
            f"but every other step needs spots in every section; fill {they} with "
            f"`asign.pp.make_spots(sdata, section={image_only!r}{table_arg})`."
        )
    return sdata
