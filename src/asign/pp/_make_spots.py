"""Virtual spot grids on sections that have an H&E image but no measured spots."""

from __future__ import annotations

import copy
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, Literal

import numpy as np
import pandas as pd
import scipy.sparse as sp

from asign._constants import Key
from asign._logging import logger

if TYPE_CHECKING:
    from anndata import AnnData
    from spatialdata import SpatialData

# a pixel is tissue when its optical density exceeds the background's by this many robust standard deviations
# (capped by Otsu's threshold): pale tissue (fat, loose stroma) counts as tissue, glass does not
_BG_SIGMAS = 8.0
# optical density by which the median tissue pixel must exceed the background's (pale tissue ~0.1 and more; scanner
# noise on glass ~0.01): below it the image holds no tissue
_MIN_OD_CONTRAST = 0.05
_MAX_MASK_SIDE = 2048
# pixels darker than this in every channel (of 255) are not tissue: the black padding of rotated or cropped scans
# (stained tissue, even dense haematoxylin, stays well above it)
_BLACK = 10.0


def _check_tissue_threshold(tissue_threshold: float | None) -> float | None:
    from asign._checks import check_number

    if tissue_threshold is None:
        return None
    thr = check_number("tissue_threshold", tissue_threshold)
    if not 0.0 < thr <= 1.0:
        msg = (
            f"`tissue_threshold` must be in (0, 1], got {tissue_threshold!r}: it is a greyscale intensity on the 0-1 "
            "scale (white = 1), not 0-255 (e.g. 0.8 for 204 of 255)."
        )
        raise ValueError(msg)
    return thr


def _levels(image) -> list[Any]:
    from xarray import DataTree

    if isinstance(image, DataTree):
        names = sorted(image.children, key=lambda n: int(n.removeprefix("scale")))
        return [next(iter(image[n].values())) for n in names]
    return [image]


def tissue_mask(
    image,
    *,
    pixel_um: float,
    tissue_threshold: float | None = None,
    min_resolution_um: float | None = None,
) -> tuple[np.ndarray, float]:
    """Tissue mask of an H&E image element, computed on a downsampled pyramid level.

    The mask has at most ``2048`` px along its longer side (unless ``min_resolution_um`` needs more): a level above
    that is reduced lazily by block means (:func:`asign._lazy.block_mean`, float32, chunk by chunk), so the full
    resolution is never held in memory.

    Parameters
    ----------
    image
        Image element (``(c, y, x)`` RGB, multiscale or not).
    pixel_um
        Microns per level-0 pixel.
    tissue_threshold
        Greyscale intensity in ``(0, 1]`` (the 0-1 scale, not 0-255): pixels darker than it are tissue. Default:
        automatic, from the optical density (Otsu's threshold, lowered to 8 robust standard deviations above the
        background when the background is cleaner, so pale tissue counts). Either way, near-black pixels (every
        channel below 10 of 255, i.e. about 0.04 on the 0-1 scale: the black padding of rotated or cropped scans)
        are never tissue, and are left out of the automatic threshold.
    min_resolution_um
        The mask's pixels must be at most this size in µm (picks the coarsest pyramid level that satisfies it).

    Returns
    -------
    The boolean mask and the factor from mask pixels to level-0 pixels.
    """
    from scipy import ndimage as ndi
    from skimage import morphology
    from skimage.filters import threshold_otsu

    tissue_threshold = _check_tissue_threshold(tissue_threshold)
    levels = _levels(image)
    h0 = levels[0].sizes["y"]
    chosen = levels[0]
    for lev in levels:
        f = h0 / lev.sizes["y"]
        fine_enough = min_resolution_um is None or f * pixel_um <= min_resolution_um
        if fine_enough and max(lev.sizes["y"], lev.sizes["x"]) >= 256:
            chosen = lev
        if max(lev.sizes["y"], lev.sizes["x"]) <= _MAX_MASK_SIDE and fine_enough:
            chosen = lev
            break
    factor = h0 / chosen.sizes["y"]
    # a level still above _MAX_MASK_SIDE (a single-scale image, or a pyramid that stops early) is reduced lazily by
    # f x f block means, as far as min_resolution_um allows; mask px i then covers level-0 px [i F, (i + 1) F)
    block = -(-max(int(chosen.sizes["y"]), int(chosen.sizes["x"])) // _MAX_MASK_SIDE)
    if min_resolution_um is not None:
        block = min(block, int(np.floor(min_resolution_um / (factor * pixel_um) * (1.0 + 1e-9))))
    if block >= 2:
        from asign._lazy import block_mean

        small, (by, _) = block_mean(chosen, factor=block, channels=3, dtype=np.float32)
        rgb = np.moveaxis(np.asarray(small.compute()), 0, -1)
        factor *= by
    else:
        rgb = np.asarray(chosen.transpose("y", "x", "c").values, dtype=float)[..., :3]
    # near-black padding (rotated / cropped scans) is not tissue, and its optical density (~5.5) would skew Otsu
    valid = ~(rgb < _BLACK).all(axis=-1)
    if tissue_threshold is not None:
        grey = rgb @ np.array([0.2125, 0.7154, 0.0721]) / 255.0
        mask = (grey < tissue_threshold) & valid
    else:
        od = (-np.log((rgb + 1.0) / 256.0)).mean(axis=-1)
        vals = od[valid]
        if vals.size == 0:
            otsu = -np.inf  # an all-black image: no tissue
        else:
            otsu = threshold_otsu(vals) if float(vals.max() - vals.min()) > 0 else float(vals.max())
        bg = vals[vals < otsu]
        if bg.size == 0:  # a uniform image: nothing stands out
            mask = np.zeros(od.shape, dtype=bool)
        else:
            med = float(np.median(bg))
            sigma = 1.4826 * float(np.median(np.abs(bg - med)))
            thr = min(otsu, med + _BG_SIGMAS * max(sigma, 1e-3))
            mask = (od > thr) & valid
            # Otsu splits any image in two, pure noise too: the tissue must be visibly darker than the background
            if mask.any() and float(np.median(od[mask])) - med < _MIN_OD_CONTRAST:
                mask[:] = False
    # clean: close small gaps, drop debris, fill small holes (all scaled to ~100 µm)
    px_um = factor * pixel_um
    r = max(1, round(25.0 / px_um))
    mask = ndi.binary_closing(mask, structure=morphology.disk(r), border_value=0)
    area = max(4, round((100.0 / px_um) ** 2))
    mask = _remove_small(morphology.remove_small_objects, mask, area, "min_size")
    mask = _remove_small(morphology.remove_small_holes, mask, 4 * area, "area_threshold")
    return mask, float(factor)


def _remove_small(func, mask: np.ndarray, size: int, old_name: str) -> np.ndarray:
    # scikit-image 0.26 renamed min_size / area_threshold to max_size
    try:
        return func(mask, max_size=size)
    except TypeError:  # pragma: no cover - scikit-image < 0.26
        return func(mask, **{old_name: size})


def _grid(mask: np.ndarray, factor: float, pitch_px: float, grid: str, shape0: tuple[int, int]) -> np.ndarray:
    """Grid points (x, y) in level-0 px, centred on the tissue's bounding box, whose centre is tissue."""
    ys, xs = np.nonzero(mask)
    if len(xs) == 0:
        return np.zeros((0, 2)), np.zeros((0, 2), dtype=int)
    x0, x1 = xs.min() * factor, (xs.max() + 1) * factor
    y0, y1 = ys.min() * factor, (ys.max() + 1) * factor
    dy = pitch_px * (np.sqrt(3.0) / 2.0 if grid == "hex" else 1.0)
    nx = int(np.floor((x1 - x0) / pitch_px)) + 1
    ny = int(np.floor((y1 - y0) / dy)) + 1
    ox = x0 + ((x1 - x0) - (nx - 1) * pitch_px) / 2.0
    oy = y0 + ((y1 - y0) - (ny - 1) * dy) / 2.0
    rows, cols = np.mgrid[0:ny, 0:nx]
    x = ox + cols * pitch_px + (0.5 * pitch_px * (rows % 2) if grid == "hex" else 0.0)
    y = oy + rows * dy
    pts = np.column_stack([x.ravel(), y.ravel()])
    rc = np.column_stack([rows.ravel(), cols.ravel()])
    h0, w0 = shape0
    inside = (pts[:, 0] >= 0) & (pts[:, 0] < w0) & (pts[:, 1] >= 0) & (pts[:, 1] < h0)
    pts, rc = pts[inside], rc[inside]
    mi = np.clip((pts[:, 1] / factor).astype(int), 0, mask.shape[0] - 1)
    mj = np.clip((pts[:, 0] / factor).astype(int), 0, mask.shape[1] - 1)
    keep = mask[mi, mj]
    return pts[keep], rc[keep]


def _missing(dt: Any, n: int) -> Any:
    """``n`` missing values of a pandas extension dtype (``<NA>``, ``NaT`` ...); `None` if it has no missing value."""
    for na in (pd.NA, None):
        try:
            return pd.array([na] * n, dtype=dt)
        except (TypeError, ValueError):
            continue
    return None


def _fill_obs(
    obs: pd.DataFrame, index: pd.Index, skip: Sequence[str] = ()
) -> tuple[pd.DataFrame, list[str], dict[str, Any]]:
    """Empty rows with the dtypes of ``obs``; returns them, the columns set to -1 and the columns to upcast.

    Missing category (categoricals), ``<NA>`` (pandas' nullable extension dtypes: ``Int64``, ``Float64``,
    ``boolean``, ``string`` ...; and numpy unsigned integers, which have no missing value and cannot hold -1: the
    column becomes the nullable ``UInt<k>`` of the same width, returned as ``{column: dtype}`` for the caller to cast
    the existing rows, whose values are kept), NaN (numpy floats), False (numpy bool), -1 (numpy signed integers,
    which have no missing value) and ``""`` (anything else). The columns of ``skip`` (those the caller sets itself:
    instance ids, region, grid indices) are not filled: they hold missing categories (categoricals) or `None`.
    """
    out, reset, upcast = {}, [], {}
    for c in obs.columns:
        dt = obs[c].dtype
        n = len(index)
        if isinstance(dt, pd.CategoricalDtype):
            out[c] = pd.Categorical([None] * n, categories=dt.categories, ordered=dt.ordered)
        elif c in skip:
            out[c] = np.full(n, None, dtype=object)
        elif isinstance(dt, pd.api.extensions.ExtensionDtype) and (na := _missing(dt, n)) is not None:
            out[c] = na
        elif pd.api.types.is_bool_dtype(dt):
            out[c] = np.zeros(n, dtype=bool)
        elif pd.api.types.is_unsigned_integer_dtype(dt) and isinstance(dt, np.dtype):
            upcast[c] = pd.api.types.pandas_dtype(f"UInt{8 * dt.itemsize}")
            out[c] = pd.array([pd.NA] * n, dtype=upcast[c])
        elif pd.api.types.is_integer_dtype(dt) and isinstance(dt, np.dtype):
            out[c] = np.full(n, -1, dtype=dt)
            reset.append(c)
        elif pd.api.types.is_float_dtype(dt) and isinstance(dt, np.dtype):
            out[c] = np.full(n, np.nan, dtype=dt)
        else:
            out[c] = np.array([""] * n, dtype=object)
    return pd.DataFrame(out, index=index), reset, upcast


def _with_native_cs(image, cs: str):
    """The image element, with an added Identity to ``cs`` when it has none (a new object; data shared)."""
    from spatialdata.transformations import Identity, get_transformation, set_transformation

    from asign.io._build import _retarget_image

    existing = dict(get_transformation(image, get_all=True) or {})
    if cs in existing:
        return image
    new = _retarget_image(image, cs)
    set_transformation(new, {**existing, cs: Identity()}, set_all=True)
    return new


def _integer_ids(sdata: SpatialData, table: AnnData) -> bool:
    """Whether the new circles get integer instance ids (otherwise the strings ``'0'``, ``'1'`` ...).

    Read from the indexes of the shapes elements that the table annotates: integers when every non-empty one has an
    integer index, strings (e.g. barcodes) when any has another; without a non-empty one, from the table's own
    ``instance_key`` column (a categorical's categories).
    """
    from spatialdata.models import get_table_keys

    region, _, instance_key = get_table_keys(table)
    keys = [region] if isinstance(region, str) else list(region)
    indexes = [sdata.shapes[k].index for k in keys if k in sdata.shapes and len(sdata.shapes[k])]
    if indexes:
        return all(pd.api.types.is_integer_dtype(i.dtype) for i in indexes)
    dt = table.obs[instance_key].dtype
    if isinstance(dt, pd.CategoricalDtype):
        dt = dt.categories.dtype
    return bool(pd.api.types.is_integer_dtype(dt))


def _new_instance_ids(old: pd.Series, n: int, *, integer: bool) -> tuple[Any, Any]:
    """The instance ids ``0 .. n - 1`` of ``n`` new rows, and the dtype of the whole instance id column.

    Integers, or the strings ``'0'``, ``'1'`` ... (``integer=False``), in the dtype of the existing ids ``old``
    where it can hold them: a categorical gets the new ids as added categories, a numpy integer dtype too narrow for
    them is widened to int64, a dtype that cannot hold them becomes ``object``. The existing ids keep their values
    (the caller casts them to the returned dtype).
    """
    values = np.arange(n, dtype=np.int64) if integer else np.arange(n).astype(str).astype(object)
    dt = old.dtype
    if isinstance(dt, pd.CategoricalDtype):
        new_dt = pd.CategoricalDtype(dt.categories.append(pd.Index(values)).unique(), ordered=dt.ordered)
        return pd.Categorical(values, dtype=new_dt), new_dt
    if integer and isinstance(dt, np.dtype) and dt.kind in "iu":
        if n == 0 or np.iinfo(dt).max >= n - 1:
            return values.astype(dt), dt
        return values, np.dtype(np.int64)
    try:
        return pd.array(values).astype(dt), dt
    except (TypeError, ValueError):
        return values, np.dtype(object)


def _rebuild_table(
    old: AnnData,
    *,
    section: str,
    sections: list[str],
    shapes_keys: list[str],
    xy: np.ndarray,
    grid_rc: np.ndarray,
    integer_ids: bool,
    empty: Sequence[str] = (),
) -> tuple[AnnData, list[str], list[str]]:
    """The table with the rows of ``section`` replaced by the virtual spots ``xy``.

    ``shapes_keys``: each section's shapes element (the manifest's, in the order of ``sections``). ``empty``: sections
    without rows, which the table does not annotate yet. ``integer_ids``: whether the new rows get integer instance
    ids (:func:`_integer_ids`), else strings; the existing rows keep theirs. The table keeps its own region and
    instance key columns (:func:`spatialdata.models.get_table_keys`, e.g. ``instance_key='spot'``). Also returns the
    numpy signed integer obs columns set to -1 in the new rows and the entries dropped (``obsm`` / ``obsp`` /
    ``uns``), for the caller to warn about once the whole call has succeeded.
    """
    import anndata as ad
    from spatialdata.models import TableModel, get_table_keys

    _, region_key, instance_key = get_table_keys(old)
    shapes_of = dict(zip(sections, shapes_keys, strict=True))
    n_new = len(xy)
    sec_str = old.obs[Key.SECTION].astype(str).to_numpy()
    ids = [f"v{i}" for i in range(n_new)]
    new_index = pd.Index([f"{section}_{i}" for i in ids])
    grid_cols = [c for c in ("array_row", "array_col") if c in old.obs.columns]
    new_obs, reset, upcast = _fill_obs(old.obs, new_index, skip=[instance_key, region_key, *grid_cols])
    new_obs[Key.MEASURED] = False
    new_ids, id_dtype = _new_instance_ids(old.obs[instance_key], n_new, integer=integer_ids)
    new_obs[instance_key] = new_ids
    if id_dtype != old.obs[instance_key].dtype:
        upcast[instance_key] = id_dtype
    new_obs[Key.BARCODE] = ids
    for col in grid_cols:
        # astype through pandas: the column may be a nullable Int64 (stack_sections writes one when some
        # sections lack it)
        j = 0 if col == "array_row" else 1
        new_obs[col] = pd.Series(grid_rc[:, j], index=new_index).astype(old.obs[col].dtype)
    old_obs = old.obs
    if upcast:  # the existing rows keep their values, in the dtype that the new rows need too
        old_obs = old.obs.copy()
        for c, dt in upcast.items():
            old_obs[c] = old_obs[c].astype(dt)
    blocks = []  # (obs, X, obsm, layers) per section in order
    for s in sections:
        if s == section:
            blocks.append(("new", None))
        else:
            rows = np.where(sec_str == s)[0]
            blocks.append(("old", rows))
    obs_parts, X_parts = [], []
    obsm_parts: dict[str, list[Any]] = {k: [] for k in old.obsm}
    layer_parts: dict[str, list[Any]] = {k: [] for k in old.layers}
    dropped = []
    for k in list(obsm_parts):
        v = old.obsm[k]
        if not (isinstance(v, np.ndarray) and v.ndim == 2) and not isinstance(v, pd.DataFrame):
            dropped.append(f"obsm[{k!r}]")
            del obsm_parts[k]
    for kind, rows in blocks:
        if kind == "old":
            obs_parts.append(old_obs.iloc[rows])
            X_parts.append(sp.csr_matrix(old.X[rows], dtype=np.float32))
            for k in obsm_parts:
                v = old.obsm[k]
                obsm_parts[k].append(v.iloc[rows] if isinstance(v, pd.DataFrame) else np.asarray(v[rows], dtype=float))
            for k in layer_parts:
                lay = old.layers[k][rows]
                layer_parts[k].append(sp.csr_matrix(lay) if sp.issparse(lay) else np.asarray(lay, dtype=float))
        else:
            obs_parts.append(new_obs)
            X_parts.append(sp.csr_matrix((n_new, old.n_vars), dtype=np.float32))
            for k in obsm_parts:
                v = old.obsm[k]
                if isinstance(v, pd.DataFrame):  # e.g. pp.normalize's values: NaN rows, same columns
                    obsm_parts[k].append(pd.DataFrame(np.nan, index=new_index, columns=v.columns))
                    continue
                fill = xy if k == Key.SPATIAL else np.full((n_new, v.shape[1]), np.nan)
                obsm_parts[k].append(np.asarray(fill, dtype=float))
            for k in layer_parts:
                if sp.issparse(old.layers[k]):
                    layer_parts[k].append(sp.csr_matrix((n_new, old.n_vars), dtype=old.layers[k].dtype))
                elif k == Key.COUNTS:
                    layer_parts[k].append(np.zeros((n_new, old.n_vars)))
                else:
                    layer_parts[k].append(np.full((n_new, old.n_vars), np.nan))
    if Key.SPATIAL not in obsm_parts:
        msg = f"obsm['{Key.SPATIAL}'] is missing from the table."
        raise KeyError(msg)
    obs = pd.concat(obs_parts)
    obs[Key.SECTION] = pd.Categorical(obs[Key.SECTION].astype(str), categories=sections, ordered=True)
    obs.loc[new_index, Key.SECTION] = section
    region = [shapes_of[s] for s in sections if s not in empty]
    obs[region_key] = pd.Categorical([shapes_of[s] for s in obs[Key.SECTION].astype(str)], categories=region)
    obs[Key.MEASURED] = obs[Key.MEASURED].astype(bool)
    uns = copy.deepcopy(dict(old.uns))
    uns.pop("spatialdata_attrs", None)
    if len(old.obsp):
        dropped += [f"obsp[{k!r}]" for k in old.obsp]
        # the records of the dropped graphs would point at nothing: uns[<obsp key>] (e.g. spot_overlaps' params)
        # and neighbour records naming them (squidpy-style `connectivities_key` / `distances_key`)
        graphs = set(old.obsp)
        stale = [
            k
            for k, v in uns.items()
            if k in graphs or (isinstance(v, dict) and {v.get("connectivities_key"), v.get("distances_key")} & graphs)
        ]
        for k in stale:
            del uns[k]
        dropped += [f"uns[{k!r}]" for k in stale]
    X = sp.vstack(X_parts, format="csr", dtype=np.float32)
    layers = {k: (sp.vstack(v, format="csr") if sp.issparse(v[0]) else np.vstack(v)) for k, v in layer_parts.items()}
    adata = ad.AnnData(
        X=X,
        obs=obs,
        var=old.var.copy(),
        uns=uns,
        obsm={k: (pd.concat(v) if isinstance(v[0], pd.DataFrame) else np.vstack(v)) for k, v in obsm_parts.items()},
        layers=layers,
        varm={k: np.asarray(v).copy() for k, v in old.varm.items()},
    )
    table = TableModel.parse(adata, region=region, region_key=region_key, instance_key=instance_key)
    return table, reset, dropped


def make_spots(
    sdata: SpatialData,
    *,
    section: str | Sequence[str],
    spacing_um: float | None = None,
    diameter_um: float | None = None,
    grid: Literal["square", "hex"] = "square",
    tissue_threshold: float | None = None,
    image_key: str | None = None,
    um_per_px: float | None = None,
    z_um: float | None = None,
    table_key: str = Key.TABLE,
    inplace: bool = True,
) -> SpatialData | None:
    """Lay a virtual spot grid over the tissue of sections that have an H&E image but no measured spots.

    The tissue mask comes from a downsampled pyramid level of the section's image (optical density, Otsu's threshold
    lowered towards the background so pale tissue counts; near-black pixels, every channel below 10 of 255, such as
    the padding of rotated or cropped scans, are never tissue; closing, debris removal and small holes filled). A
    square or hexagonal grid, centred on the tissue, keeps the points whose centre lies on tissue. This is how a user
    asks for expression on an unmeasured section; asign never adds spots unasked.

    Each section's image is checked first (uint8 RGB ``(c, y, x)`` with 3 channels; its transformation to the
    section's coordinate system, if any, ``Identity``), and ``sdata`` changes only once every listed section has
    passed its checks, got its spots and the result has passed :func:`asign.io.validate_stack`: an error in any
    section leaves ``sdata`` as it was.

    Parameters
    ----------
    sdata
        A :class:`spatialdata.SpatialData` section stack (see the data contract page).
    section
        The section, or a list of sections. A section listed in the manifest must have an image and no measured
        spots (its unmeasured spots, if any, are replaced). A single name may also be a new section: then
        ``image_key``, ``um_per_px`` and ``z_um`` describe it and it is inserted into the stack at its z (one new
        section per call); its spots go to ``shapes['spots_<section>']``, which must not exist yet (an existing
        element of that name is refused, never replaced). A list (e.g. ``["S3", "S4", "S5"]``, each named once)
        fills sections already in the manifest, all with the same options, and gives the same result as one call
        per section in the order given.
        Other sections that have an image and no spots may stay empty meanwhile (a WARNING names them): fill them in
        this call or in later calls, in any order.
    spacing_um
        Grid pitch (centre-to-centre) in µm; default twice the spot diameter (ST: 200 µm for 100 µm spots).
    diameter_um
        Spot diameter in µm; default the manifest's ``spot_diameter_um``.
    grid
        ``"square"`` (ST) or ``"hex"`` (Visium: rows ``pitch * sqrt(3) / 2`` apart, every other row shifted by half
        a pitch).
    tissue_threshold
        Greyscale intensity in ``(0, 1]`` (the 0-1 scale, not 0-255) below which a pixel is tissue; default
        automatic.
    image_key
        For a new section (a single name only): its image element in ``sdata.images`` (default ``he_<section>``). The
        image gets an ``Identity`` transformation to the coordinate system ``section`` (its native frame) if it has
        none.
    um_per_px
        For a new section (a single name only): microns per image pixel (required).
    z_um
        For a new section (a single name only): its z position in µm (required, finite; sets its place in the
        cutting order).
    table_key
        Key of the table in :attr:`spatialdata.SpatialData.tables` that annotates the spots of all sections.
    inplace
        If `True`, modify ``sdata`` in memory and return `None`; otherwise leave it untouched and return a new
        :class:`~spatialdata.SpatialData` that shares the unchanged elements.

    Returns
    -------
    If ``inplace = False``, a new SpatialData; otherwise `None` and ``sdata`` gets, for each section, the circles
    ``shapes[<the section's shapes_key>]`` (the manifest's, ``'spots_<section>'`` for a new section; radius
    ``diameter_um / 2`` in the section's pixels, Identity to the section's coordinate system), and a rebuilt
    ``tables[table_key]`` (annotating the shapes under the table's own region and instance keys, e.g.
    ``instance_key='spot'``) whose new rows (``obs_names`` ``'<section>_v<i>'``) have ``obs['measured'] = False``,
    their index in the new circles as instance id (integers when the indexes of the existing shapes are integers, else
    the strings ``'0'``, ``'1'`` ...; in the dtype of the table's ids, e.g. as added categories of a categorical; the
    ids of the existing rows are never rewritten), zero counts, ``obsm['spatial']`` and, when present,
    ``obs['array_row']`` / ``obs['array_col']`` (grid indices), and ``obs['z']`` (the section's z) where the table
    has that column; other per-spot values of the new rows are NaN
    (``obsm`` arrays and DataFrames, numpy float columns and layers other than ``counts``), missing categories
    (categorical columns), ``<NA>`` (pandas' nullable columns: ``Int64``, ``Float64``, ``boolean``, ``string`` ...),
    False (numpy bool columns), ``""`` (object columns) or -1 (numpy signed integer columns, with a warning naming
    them); a numpy unsigned integer column (which cannot hold -1) becomes the nullable ``UInt<k>`` of the same width,
    its existing values kept and ``<NA>`` in the new rows (the instance id column and ``array_row`` / ``array_col``
    keep their dtype: they are set).
    ``obsp`` graphs are dropped (rerun the steps that wrote them), and so are the ``uns`` records that describe them
    (``uns[<obsp key>]``, and records whose ``connectivities_key`` or ``distances_key`` names one, such as
    ``neighbors_3d``'s); ``obsm`` entries that are neither 2-D arrays nor DataFrames are dropped too, with a warning
    that lists everything dropped. A new section is added to the manifest ``uns['asign']['stack']``, and the
    lattice's parameters are recorded in ``uns['asign']['make_spots'][section]`` for each section (``spacing_um``,
    ``diameter_um``, ``grid``, ``n_spots``, ``tissue_threshold``).
    """
    if grid not in ("square", "hex"):
        msg = f"grid must be 'square' or 'hex', got {grid!r}."
        raise ValueError(msg)
    tissue_threshold = _check_tissue_threshold(tissue_threshold)
    sections = _as_sections(section, image_key=image_key, um_per_px=um_per_px, z_um=z_um)
    if not isinstance(section, str):
        # the cheap checks of every listed section first, so that a bad image in the last one fails before any mask
        _check_listed(sdata, sections, spacing_um=spacing_um, diameter_um=diameter_um, table_key=table_key)
    empty_before = _image_only_sections(sdata, table_key)
    # chained on candidate objects (as one call per section would be): sdata changes only after the last section
    candidate, records = sdata, []
    for s in sections:
        candidate, record = _lay_spots(
            candidate,
            section=s,
            spacing_um=spacing_um,
            diameter_um=diameter_um,
            grid=grid,
            tissue_threshold=tissue_threshold,
            image_key=image_key,
            um_per_px=um_per_px,
            z_um=z_um,
            table_key=table_key,
        )
        records.append(record)

    # the warnings once per call, naming every section they concern
    label = _label(sections)
    spacing, diameter = records[0]["spacing"], records[0]["diameter"]
    if spacing < diameter:
        logger.warning(
            f"{label}: the pitch spacing_um={spacing:g} is smaller than the spot diameter {diameter:g} µm, "
            "so the virtual spots overlap (measured ST / Visium spots never do: pitch 200 / 100 µm)."
        )
    reset_secs = [r["section"] for r in records if r["reset"]]
    if reset_secs:
        cols = list(dict.fromkeys(c for r in records for c in r["reset"]))
        logger.warning(
            f"Virtual spots of {_label(reset_secs, capital=False)} get -1 in integer obs columns {cols}; "
            "recompute them."
        )
    dropped = list(dict.fromkeys(d for r in records for d in r["dropped"]))
    if dropped:
        logger.warning(f"Dropped {dropped}: they do not cover the new spots; recompute them.")
    others = [k for k in sdata.tables if k != table_key]
    if others:
        logger.warning(
            f"Tables {others} do not cover the new spots of {_label(sections, capital=False)}; recompute them."
        )
    if Key.SPATIAL_ALIGNED in sdata.tables[table_key].obsm:
        logger.warning(
            f"The new spots of {_label(sections, capital=False)} have no aligned position yet (NaN in "
            f"`obsm['{Key.SPATIAL_ALIGNED}']`, no transformation to the aligned coordinate system): rerun "
            "`asign.pp.align_layers`, then the features, graph and imputation."
        )
    still_empty = [s for s in empty_before if s not in sections]
    if still_empty:
        logger.warning(
            f"Sections {still_empty} still have an image and no spots; fill them with `asign.pp.make_spots` too "
            "(every other step needs spots in every section)."
        )
    for r in records:
        logger.info(
            f"Adding {r['n_spots']} virtual spots ({grid} grid, pitch {spacing:g} µm) to section {r['section']!r}: "
            f"`shapes['{r['shapes_key']}']` and rows of `tables['{table_key}']` with obs['measured'] = False."
        )
    if not inplace:
        return candidate
    for k, image in candidate.images.items():
        if k not in sdata.images or image is not sdata.images[k]:
            sdata.images[k] = image
    for r in records:
        sdata.shapes[r["shapes_key"]] = candidate.shapes[r["shapes_key"]]
    sdata.tables[table_key] = candidate.tables[table_key]
    return None


def _label(sections: Sequence[str], *, capital: bool = True) -> str:
    """``"Section 'S3'"`` or ``"Sections ['S3', 'S4']"`` (``"section ..."`` with ``capital=False``)."""
    word = "Section" if capital else "section"
    return f"{word} {sections[0]!r}" if len(sections) == 1 else f"{word}s {list(sections)}"


def _as_sections(
    section: str | Sequence[str], *, image_key: str | None, um_per_px: float | None, z_um: float | None
) -> list[str]:
    """The section names of ``make_spots(section=...)``: one name, or a list of distinct names (no new section)."""
    if isinstance(section, str):
        return [section]
    if not isinstance(section, Sequence | np.ndarray | pd.Index):
        msg = f"`section` must be a section name or a list of section names, got {type(section).__name__}."
        raise TypeError(msg)
    names = list(section)
    bad = [n for n in names if not isinstance(n, str)]
    if bad:
        msg = f"`section` must be a section name or a list of section names, got {bad[0]!r} ({type(bad[0]).__name__})."
        raise TypeError(msg)
    names = [str(n) for n in names]
    if not names:
        msg = "`section` is an empty list; pass a section name or a list of section names."
        raise ValueError(msg)
    dups = list(dict.fromkeys(n for n in names if names.count(n) > 1))
    if dups:
        msg = f"`section` lists {dups} more than once; name each section once."
        raise ValueError(msg)
    passed = [k for k, v in (("image_key", image_key), ("um_per_px", um_per_px), ("z_um", z_um)) if v is not None]
    if passed:
        msg = (
            f"`{'`, `'.join(passed)}` describe(s) one new section, so they cannot go with a list of sections "
            f"({names}): add a new section in its own call (`section='<name>'` with `image_key`, `um_per_px` and "
            "`z_um`), and fill the manifest's sections with a list."
        )
        raise ValueError(msg)
    return names


def _spacing(stack: Any, spacing_um: float | None, diameter_um: float | None) -> tuple[float, float]:
    """The grid pitch and the spot diameter in µm (defaults: twice the manifest's diameter, the manifest's)."""
    diameter = float(diameter_um) if diameter_um is not None else stack.spot_diameter_um
    spacing = float(spacing_um) if spacing_um is not None else 2.0 * diameter
    if not (diameter > 0 and spacing > 0):
        msg = f"spacing_um and diameter_um must be positive (got {spacing}, {diameter})."
        raise ValueError(msg)
    return spacing, diameter


def _check_pitch(section: str, ikey: str, spacing: float, px: float) -> None:
    if spacing < px:
        msg = (
            f"Section {section!r}: the pitch spacing_um={spacing:g} is smaller than a pixel of image {ikey!r} "
            f"({px:g} µm): neighbouring virtual spots would share pixels. Use a pitch of at least one pixel."
        )
        raise ValueError(msg)


def _raise_problems(problems: list[str], section: str, ikey: str) -> None:
    if problems:  # the checks validate_stack applies to images, before any work
        lines = "\n".join(f"  - {p}" for p in problems)
        msg = f"make_spots cannot use image {ikey!r} of section {section!r}:\n{lines}"
        raise ValueError(msg)


def _manifest_section(
    sdata: SpatialData, stack: Any, section: str, image_key: str | None, table_key: str
) -> tuple[str, float, str]:
    """Image key, µm per pixel and coordinate system of a manifest section that make_spots may fill; checked."""
    from asign.io._validate import _image_problems, _transformations

    table = sdata.tables[table_key]
    sec = (table.obs[Key.SECTION].astype(str) == section).to_numpy()
    if sec.any() and table.obs[Key.MEASURED].to_numpy()[sec].any():
        msg = (
            f"Section {section!r} has measured spots; make_spots never replaces them. Use it on a section "
            "without measured spots, or add a new section with `image_key`, `um_per_px` and `z_um`."
        )
        raise ValueError(msg)
    i = stack.index(section)
    ikey = stack.image_keys[i]
    if ikey is None:
        msg = f"Section {section!r} has no image; make_spots needs one to find the tissue."
        raise ValueError(msg)
    if image_key is not None and image_key != ikey:
        msg = f"Section {section!r} is in the manifest with image {ikey!r}; do not pass a different `image_key`."
        raise ValueError(msg)
    cs = stack.coordinate_systems[i]
    problems = _image_problems(sdata.images[ikey], section=section, image_key=ikey, identity_to=cs)
    if cs not in (tfs := _transformations(sdata.images[ikey])):
        problems.append(
            f"section {section!r}: image {ikey!r} has no transformation to the section's native coordinate "
            f"system {cs!r} (found {sorted(tfs)})."
        )
    _raise_problems(problems, section, ikey)
    return ikey, float(stack.um_per_px[i]), cs


def _new_section(
    sdata: SpatialData,
    stack: Any,
    section: str,
    image_key: str | None,
    um_per_px: float | None,
    z_um: float | None,
) -> tuple[str, float, str, Any]:
    """Image key, µm per pixel, coordinate system and the new manifest of a new section; checked."""
    from spatialdata import sanitize_name

    from asign._checks import check_number
    from asign._stack import StackInfo
    from asign.io._validate import _image_problems

    ikey = image_key or Key.image(section)
    if ikey not in sdata.images:
        msg = (
            f"New section {section!r}: image {ikey!r} not found in sdata.images ({list(sdata.images)}); "
            "add the image element first or pass `image_key=`."
        )
        raise KeyError(msg)
    if um_per_px is None or z_um is None:
        msg = f"New section {section!r}: pass `um_per_px` (pixel size) and `z_um` (z position in µm)."
        raise ValueError(msg)
    for name, value in (("um_per_px", um_per_px), ("z_um", z_um)):
        try:
            check_number(name, value)
        except (TypeError, ValueError) as e:
            msg = f"New section {section!r}: {e}"
            raise type(e)(msg) from None
    if not um_per_px > 0:
        msg = f"New section {section!r}: `um_per_px` must be positive, got {um_per_px}."
        raise ValueError(msg)
    if np.any(np.isclose(stack.z_um, float(z_um))):
        msg = f"New section {section!r}: z_um={z_um} is already taken by another section."
        raise ValueError(msg)
    if ikey in [k for k in stack.image_keys if k]:
        msg = f"New section {section!r}: image {ikey!r} already belongs to another section."
        raise ValueError(msg)
    if sanitize_name(section) != section:
        msg = f"Section name {section!r} is not a valid element name; use e.g. {sanitize_name(section)!r}."
        raise ValueError(msg)
    skey = Key.shapes(section)
    owner = next((s for s, k in zip(stack.sections, stack.shapes_keys, strict=True) if k == skey), None)
    if owner is not None:
        msg = (
            f"New section {section!r}: its spots would go to shapes {skey!r}, which the manifest gives to section "
            f"{owner!r}; name the new section otherwise."
        )
        raise ValueError(msg)
    if skey in sdata.shapes:
        msg = (
            f"New section {section!r}: its spots would go to shapes {skey!r}, but sdata.shapes already has an "
            f"element {skey!r} (not in the manifest), which make_spots would replace. Rename or delete it "
            f"(`del sdata.shapes[{skey!r}]`), or name the new section otherwise."
        )
        raise ValueError(msg)
    px = float(um_per_px)
    cs = section
    _raise_problems(_image_problems(sdata.images[ikey], section=section, image_key=ikey, identity_to=cs), section, ikey)
    pos = int(np.searchsorted(stack.z_um, float(z_um)))
    new_stack = StackInfo(
        sections=[*stack.sections[:pos], section, *stack.sections[pos:]],
        shapes_keys=[*stack.shapes_keys[:pos], Key.shapes(section), *stack.shapes_keys[pos:]],
        image_keys=[*stack.image_keys[:pos], ikey, *stack.image_keys[pos:]],
        coordinate_systems=[*stack.coordinate_systems[:pos], cs, *stack.coordinate_systems[pos:]],
        z_um=np.insert(stack.z_um, pos, float(z_um)),
        um_per_px=np.insert(stack.um_per_px, pos, px),
        spot_diameter_um=stack.spot_diameter_um,
    )
    return ikey, px, cs, new_stack


def _check_listed(
    sdata: SpatialData,
    sections: list[str],
    *,
    spacing_um: float | None,
    diameter_um: float | None,
    table_key: str,
) -> None:
    """Check every listed section, before any tissue mask.

    In the manifest, no measured spots, an image without problems, a pitch of at least one of its pixels.
    """
    from asign.io._validate import validate_stack

    stack = validate_stack(sdata, table_key=table_key, allow_empty=_allow_empty(sdata, table_key, sections))
    for s in sections:
        if s not in stack.sections:
            msg = (
                f"Section {s!r} is not in the manifest (sections {list(stack.sections)}): a list of sections fills "
                "sections already there. Add a new section in its own call, with `image_key`, `um_per_px` and `z_um`."
            )
            raise ValueError(msg)
    spacing, _ = _spacing(stack, spacing_um, diameter_um)
    for s in sections:
        ikey, px, _ = _manifest_section(sdata, stack, s, None, table_key)
        _check_pitch(s, ikey, spacing, px)


def _lay_spots(
    sdata: SpatialData,
    *,
    section: str,
    spacing_um: float | None,
    diameter_um: float | None,
    grid: str,
    tissue_threshold: float | None,
    image_key: str | None,
    um_per_px: float | None,
    z_um: float | None,
    table_key: str,
) -> tuple[SpatialData, dict[str, Any]]:
    """One section's virtual spots: a new, validated SpatialData (``sdata`` is left untouched) and what to report."""
    from spatialdata import SpatialData
    from spatialdata.models import ShapesModel
    from spatialdata.transformations import Identity

    from asign.io._validate import StackValidationError, validate_stack

    # every section with an image and no spots may stay empty meanwhile
    still_empty = [s for s in _image_only_sections(sdata, table_key) if s != section]
    stack = validate_stack(sdata, table_key=table_key, allow_empty=_allow_empty(sdata, table_key, [section]))
    table = sdata.tables[table_key]
    images = dict(sdata.images)
    if section in stack.sections:
        ikey, px, cs = _manifest_section(sdata, stack, section, image_key, table_key)
        new_stack = stack
    else:
        ikey, px, cs, new_stack = _new_section(sdata, stack, section, image_key, um_per_px, z_um)
        images[ikey] = _with_native_cs(sdata.images[ikey], cs)

    skey = new_stack.shapes_key(section)
    spacing, diameter = _spacing(stack, spacing_um, diameter_um)
    _check_pitch(section, ikey, spacing, px)
    image = images[ikey]
    level0 = _levels(image)[0]
    mask, factor = tissue_mask(image, pixel_um=px, tissue_threshold=tissue_threshold, min_resolution_um=spacing / 4.0)
    xy, rc = _grid(mask, factor, spacing / px, grid, (int(level0.sizes["y"]), int(level0.sizes["x"])))
    if len(xy) == 0:
        msg = (
            f"Section {section!r}: no tissue found in image {ikey!r} (or the pitch {spacing:g} µm is larger than the "
            "tissue); check the image or pass `tissue_threshold=`."
        )
        raise ValueError(msg)

    integer_ids = _integer_ids(sdata, table)
    shapes = ShapesModel.parse(
        xy,
        geometry=0,
        radius=np.full(len(xy), 0.5 * diameter / px),
        index=pd.RangeIndex(len(xy)) if integer_ids else pd.Index(np.arange(len(xy)).astype(str)),
        transformations={cs: Identity()},
    )
    new_table, reset, dropped = _rebuild_table(
        table,
        section=section,
        sections=list(new_stack.sections),
        shapes_keys=list(new_stack.shapes_keys),
        xy=xy,
        grid_rc=rc,
        integer_ids=integer_ids,
        empty=still_empty,
    )
    if Key.Z in new_table.obs:  # the section's z is known from the manifest (align_layers writes the column)
        rows = (new_table.obs[Key.SECTION] == section).to_numpy()
        new_table.obs.loc[rows, Key.Z] = float(new_stack.z_um[list(new_stack.sections).index(section)])
    new_table.uns.setdefault(Key.UNS, {})
    new_table.uns[Key.UNS][Key.STACK] = new_stack.to_uns()
    new_table.uns[Key.UNS].setdefault("make_spots", {})[section] = {
        "spacing_um": spacing,
        "diameter_um": diameter,
        "grid": grid,
        "n_spots": len(xy),
        "tissue_threshold": -1.0 if tissue_threshold is None else float(tissue_threshold),
    }
    # the result is checked before anything is handed back: a failure leaves sdata as it was
    candidate = SpatialData(
        images=images,
        labels=dict(sdata.labels),
        points=dict(sdata.points),
        shapes={**dict(sdata.shapes), skey: shapes},
        tables={**{k: v for k, v in sdata.tables.items() if k != table_key}, table_key: new_table},
    )
    try:
        validate_stack(candidate, table_key=table_key, allow_empty=still_empty)
    except StackValidationError:  # pragma: no cover - a bug in make_spots, not a user error
        logger.error("make_spots produced an invalid stack (the input is left unchanged); please report this.")
        raise
    record = {
        "section": section,
        "shapes_key": skey,
        "n_spots": len(xy),
        "spacing": spacing,
        "diameter": diameter,
        "reset": reset,
        "dropped": dropped,
    }
    return candidate, record


def _allow_empty(sdata: SpatialData, table_key: str, sections: Sequence[str]) -> list[str]:
    """The sections that may have no spots before make_spots fills ``sections``.

    Every image-only section, and those of ``sections`` without rows; not one that has rows (the table's section
    categories may leave out only sections without rows).
    """
    try:
        present = set(sdata.tables[table_key].obs[Key.SECTION].astype(str))
    except (KeyError, AttributeError):  # validate_stack says what is wrong
        present = set()
    empty = _image_only_sections(sdata, table_key)
    return [*empty, *(s for s in sections if s not in present and s not in empty)]


def _image_only_sections(sdata: SpatialData, table_key: str) -> list[str]:
    """The manifest's sections that have an image element and no row in the table (those make_spots can fill)."""
    from asign._stack import StackInfo

    try:
        table = sdata.tables[table_key]
        stack = StackInfo.from_uns(table.uns[Key.UNS][Key.STACK])
        present = set(table.obs[Key.SECTION].astype(str))
    except (KeyError, TypeError, ValueError, IndexError, AttributeError):  # validate_stack says what is wrong
        return []
    return [
        s
        for s, k in zip(stack.sections, stack.image_keys, strict=False)
        if k and k in sdata.images and s not in present
    ]
