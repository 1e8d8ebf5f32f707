"""Region and global tiles: explicit integer index maps spot -> region -> global (method.md §2.3)."""

from __future__ import annotations

from collections.abc import Mapping
from numbers import Real
from typing import TYPE_CHECKING, Any, NamedTuple

import numpy as np

from asign._checks import check_reserved_keys
from asign._constants import Key
from asign._logging import logger

if TYPE_CHECKING:
    from anndata import AnnData
    from spatialdata import SpatialData

    from asign._stack import StackInfo

LEVELS = ("spot", "region", "global")
DEFAULT_SCALES_PX = {"spot": 224, "region": 512, "global": 1024}
TILE_LEVELS = ("region", "global")


class Tiles(NamedTuple):
    """Result of :func:`make_tiles` with ``inplace=False``."""

    region_index: np.ndarray
    """``(n_spots,)`` int64 row of each spot's region tile in ``regions``."""
    global_index: np.ndarray
    """``(n_spots,)`` int64 row of each spot's global tile in ``globals_``."""
    regions: AnnData
    """Region tile table."""
    globals_: AnnData
    """Global tile table."""
    scales_px: dict[str, list[int]]
    """Tile (and spot patch) side in native pixels per level, one entry per section of the manifest."""


def tile_table_key(key_added: str, level: str) -> str:
    """Name of the tile table of ``level`` (``"asign_regions"``, ``"asign_globals"``)."""
    return f"{key_added}_{level}s"


def index_key(key_added: str, level: str) -> str:
    """Column of the spot table with the spot's tile row (``"asign_region"``, ``"asign_global"``)."""
    return f"{key_added}_{level}"


def resolve_scales(
    stack: StackInfo,
    scales: Mapping[str, float] | None,
    scales_um: Mapping[str, float] | None,
    *,
    levels: tuple[str, ...] = LEVELS,
) -> tuple[dict[str, list[int]], dict[str, list[float]], str]:
    """Patch/tile sides per level and section in native pixels (and µm).

    ``scales`` (pixels) and ``scales_um`` (µm, converted with each section's ``um_per_px``) are exclusive; missing
    levels take the defaults (224 / 512 / 1024 px), with a warning when the others are given in µm. The global side must be an integer multiple of the region side
    in every section, so that the global grid nests the region grid.
    """
    if scales is not None and scales_um is not None:
        msg = "Pass either `scales` (native pixels) or `scales_um` (µm), not both."
        raise ValueError(msg)
    given = scales if scales is not None else scales_um
    given = dict(given or {})
    unknown = sorted(set(given) - set(LEVELS))
    if unknown:
        msg = f"Unknown scale level(s) {unknown}; use keys {list(LEVELS)}."
        raise ValueError(msg)
    name = "scales" if scales is not None else "scales_um"
    unit_name = "pixels" if scales is not None else "µm"
    for k, v in given.items():
        if isinstance(v, bool | np.bool_) or not isinstance(v, Real) or not (np.isfinite(float(v)) and float(v) > 0):
            msg = (
                f"`{name}[{k!r}]` must be a positive number (the side in {unit_name}), got {v!r}"
                + (" (a bool, not a size)" if isinstance(v, bool | np.bool_) else "")
                + "."
            )
            raise ValueError(msg)
    um = np.asarray(stack.um_per_px, dtype=float)
    px: dict[str, list[int]] = {}
    if scales_um is None:
        for lev in levels:
            v = float(given.get(lev, DEFAULT_SCALES_PX[lev]))
            if v != int(v):
                msg = f"`scales[{lev!r}]` must be a whole number of pixels, got {v}; or pass `scales_um=`."
                raise ValueError(msg)
            px[lev] = [int(v)] * stack.n_sections
        unit = "px"
    else:
        for lev in levels:
            if lev in given:
                px[lev] = [max(1, int(np.floor(float(given[lev]) / u + 0.5))) for u in um]
            else:
                px[lev] = [DEFAULT_SCALES_PX[lev]] * stack.n_sections
        if "region" in levels and "global" in levels and "region" in given and "global" in given:
            ratio = float(given["global"]) / float(given["region"])
            if abs(ratio - round(ratio)) > 1e-9 or round(ratio) < 1:
                msg = (
                    f"scales_um: global ({given['global']}) must be an integer multiple of region "
                    f"({given['region']}) so that the global grid nests the region grid."
                )
                raise ValueError(msg)
            # keep the nesting exact in pixels after rounding
            px["global"] = [int(round(ratio)) * r for r in px["region"]]
        unit = "um"
    if "region" in px and "global" in px:
        for s, r, g in zip(stack.sections, px["region"], px["global"], strict=True):
            if g % r != 0:
                msg = (
                    f"section {s!r}: global tile side {g} px is not an integer multiple of the region side {r} px; "
                    "the global grid must nest the region grid (default: global = 2 x region)."
                )
                raise ValueError(msg)
    um_sides = {lev: [float(p * u) for p, u in zip(px[lev], um, strict=True)] for lev in px}
    if scales_um is not None:
        _warn_collapsed_sides(stack, {lev: float(given[lev]) for lev in levels if lev in given}, px, um_sides)
    missing = [lev for lev in levels if lev not in given]
    if scales_um is not None and missing:
        sides = ", ".join(f"{lev} {px[lev][0]} px = {um_sides[lev][0]:.4g} µm" for lev in missing)
        logger.warning(
            f"scales_um gives no {missing}: those levels take the pixel defaults ({sides} in section "
            f"{stack.sections[0]!r}), which suit images of about 0.5 µm/px; give every level in µm, e.g. "
            "scales_um={'spot': 112, 'region': 256, 'global': 512} (the defaults at 0.5 µm/px)."
        )
    return px, um_sides, unit


# a patch side below this many pixels, or off the requested µm by more than this fraction after rounding to whole
# pixels, no longer shows what scales_um asked for (a coarse image: e.g. 224 µm at 50 µm/px is a 4 px, 200 µm patch)
MIN_SIDE_PX = 16
MAX_SIDE_ERROR = 0.10


def _warn_collapsed_sides(
    stack: StackInfo, requested: Mapping[str, float], px: dict[str, list[int]], um_sides: dict[str, list[float]]
) -> None:
    """Warn about sections whose sides given in µm become fewer than 16 px, or more than 10% off, in pixels."""
    bad: dict[str, list[str]] = {}
    for lev, want in requested.items():
        for s, p, got in zip(stack.sections, px[lev], um_sides[lev], strict=True):
            if p < MIN_SIDE_PX or abs(got - want) > MAX_SIDE_ERROR * want:
                bad.setdefault(s, []).append(f"{lev} {want:g} µm -> {p} px = {got:.4g} µm")
    if bad:
        detail = "; ".join(f"{s!r}: {', '.join(v)}" for s, v in bad.items())
        logger.warning(
            f"Sections {list(bad)} are too coarse for the requested scales_um: {detail}. Patch sides under "
            f"{MIN_SIDE_PX} px, or more than {MAX_SIDE_ERROR:.0%} off the requested size after rounding to whole "
            "pixels, show little of the tissue or another area than asked; use larger sides or a finer image."
        )


def _image_size(sdata: SpatialData, image_key: str | None) -> tuple[int, int] | None:
    """(height, width) of level 0 of an image element, from metadata only (nothing is computed)."""
    if image_key is None or image_key not in sdata.images:
        return None
    img = image_level0(sdata.images[image_key])
    return int(img.sizes["y"]), int(img.sizes["x"])


def image_level0(image: Any):
    """Level 0 (full resolution) :class:`xarray.DataArray` of an image element (multiscale or not)."""
    from xarray import DataTree

    if isinstance(image, DataTree):
        node = image["scale0"]
        if "image" in node.ds:
            return node.ds["image"]
        return next(iter(node.ds.data_vars.values()))
    return image


class ImageLevel(NamedTuple):
    """One level of an image pyramid, see :func:`image_levels`."""

    name: str
    """Node name (``"scale0"``, ``"scale1"``, ...)."""
    data: Any
    """``(3, y, x)`` array (numpy or dask) of the level."""
    scale_y: float
    """Pixel height in level-0 pixels (level-0 height / level height)."""
    scale_x: float
    """Pixel width in level-0 pixels."""
    stored: bool
    """Whether reading the level leaves level 0 alone: level 0 itself, a numpy level, or a dask level whose graph
    shares no layer with level 0's (read from its own zarr array or JPEG decode). `False` for levels that dask
    computes from level 0 on the fly (pyramids built in memory by :class:`spatialdata.models.Image2DModel`)."""


def _graph_layers(arr: Any) -> set[str] | None:
    graph = getattr(arr, "dask", None)
    layers = getattr(graph, "layers", None)
    return set(layers) if layers is not None else None


def image_levels(image: Any) -> list[ImageLevel]:
    """The levels of an image element, finest first, with their pixel sizes in level-0 pixels.

    Scales are the ratios of level-0 to level sizes per axis (for spatialdata pyramids these equal the ``Scale`` of
    each level's transformation; for the HER2ST JPEG pyramid, 2.0002 rather than 2 where a side is odd). A single
    scale image gives one level, and so does a plain numpy or dask array, taken as ``(c, y, x)``.
    """
    from xarray import DataTree

    def arr(node) -> Any:
        ds = node.ds
        da = ds["image"] if "image" in ds else next(iter(ds.data_vars.values()))
        return da.transpose("c", "y", "x").data

    if not isinstance(image, DataTree):
        data = image.transpose("c", "y", "x").data if hasattr(image, "dims") else image
        if getattr(data, "ndim", None) != 3:
            msg = f"An image must be (c, y, x), got shape {tuple(getattr(data, 'shape', ()))}."
            raise ValueError(msg)
        return [ImageLevel("scale0", data, 1.0, 1.0, stored=True)]
    names = sorted(image.children, key=lambda n: int(str(n).removeprefix("scale")))
    data = [arr(image[n]) for n in names]
    h0, w0 = int(data[0].shape[1]), int(data[0].shape[2])
    base = _graph_layers(data[0])
    out = []
    for k, (n, a) in enumerate(zip(names, data, strict=True)):
        layers = _graph_layers(a)
        stored = k == 0 or layers is None or base is None or not (layers & base)
        out.append(ImageLevel(str(n), a, h0 / int(a.shape[1]), w0 / int(a.shape[2]), bool(stored)))
    return out


def _tile_table(
    section_codes: np.ndarray,
    rows: np.ndarray,
    cols: np.ndarray,
    counts: np.ndarray,
    side: np.ndarray,
    stack: StackInfo,
    sizes: list[tuple[int, int] | None],
    level: str,
) -> AnnData:
    import pandas as pd
    from anndata import AnnData

    sections = np.asarray(stack.sections)[section_codes]
    names = [f"{s}_{level}_{r}_{c}" for s, r, c in zip(sections, rows, cols, strict=True)]
    centre = np.column_stack([(cols + 0.5) * side, (rows + 0.5) * side]).astype(np.float64)
    padded = np.zeros(len(rows), dtype=bool)
    for code, hw in enumerate(sizes):
        if hw is None:
            continue
        m = section_codes == code
        h, w = hw
        padded[m] = (cols[m] * side[m] < 0) | (rows[m] * side[m] < 0)
        padded[m] |= ((cols[m] + 1) * side[m] > w) | ((rows[m] + 1) * side[m] > h)
    obs = pd.DataFrame(
        {
            Key.SECTION: pd.Categorical(sections, categories=stack.sections, ordered=True),
            "tile_col": cols.astype(np.int64),
            "tile_row": rows.astype(np.int64),
            "n_spots": counts.astype(np.int64),
            "tile_size_px": side.astype(np.int64),
            "padded": padded,
        },
        index=pd.Index(names, dtype=str),
    )
    ad = AnnData(obs=obs)
    ad.obsm[Key.SPATIAL] = centre
    return ad


def _unique_tiles(codes: np.ndarray, rows: np.ndarray, cols: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Unique (section, row, col) sorted by section, row, col; returns (unique keys (k, 3), inverse (n,))."""
    keys = np.column_stack([codes, rows, cols]).astype(np.int64)
    uniq, inverse = np.unique(keys, axis=0, return_inverse=True)
    return uniq, np.asarray(inverse).ravel().astype(np.int64)


def compute_tiles(
    table: AnnData,
    stack: StackInfo,
    px: dict[str, list[int]],
    sizes: list[tuple[int, int] | None],
    key_added: str = Key.ADDED,
) -> tuple[np.ndarray, np.ndarray, AnnData, AnnData]:
    """Index maps and tile tables from spot centres ``obsm['spatial']`` (native px of each spot's section)."""
    from asign._stack import section_codes

    codes = section_codes(table, stack)
    xy = np.asarray(table.obsm[Key.SPATIAL], dtype=np.float64)
    r_side = np.asarray(px["region"], dtype=np.int64)[codes]
    g_side = np.asarray(px["global"], dtype=np.int64)[codes]
    factor = g_side // r_side
    # r(i) = (floor(x / R), floor(y / R)); q(r) = (floor(a / k), floor(b / k)) = floor(x / (k R)) exactly
    rc = np.floor(xy[:, 0] / r_side).astype(np.int64)
    rr = np.floor(xy[:, 1] / r_side).astype(np.int64)
    gc = np.floor_divide(rc, factor)
    gr = np.floor_divide(rr, factor)
    r_keys, r_index = _unique_tiles(codes, rr, rc)
    g_keys, g_index = _unique_tiles(codes, gr, gc)
    r_counts = np.bincount(r_index, minlength=len(r_keys))
    g_counts = np.bincount(g_index, minlength=len(g_keys))
    r_sides = np.asarray(px["region"], dtype=np.int64)[r_keys[:, 0]]
    g_sides = np.asarray(px["global"], dtype=np.int64)[g_keys[:, 0]]
    regions = _tile_table(r_keys[:, 0], r_keys[:, 1], r_keys[:, 2], r_counts, r_sides, stack, sizes, "region")
    globals_ = _tile_table(g_keys[:, 0], g_keys[:, 1], g_keys[:, 2], g_counts, g_sides, stack, sizes, "global")
    # q(r) for every region tile: the global row of any of its member spots (all agree by construction)
    region_to_global = np.empty(len(r_keys), dtype=np.int64)
    region_to_global[r_index] = g_index
    regions.obs[index_key(key_added, "global")] = region_to_global
    globals_.obs["n_regions"] = np.bincount(region_to_global, minlength=len(g_keys)).astype(np.int64)
    return r_index, g_index, regions, globals_


def _copy_manifest(src: AnnData, dst: AnnData, params: dict[str, Any]) -> None:
    from asign._stack import copy_stack_uns

    copy_stack_uns(src, dst)
    dst.uns[Key.UNS]["tiles"] = params


# a region tile wider than this many spot diameters covers far more spots than intended: the 512 px default spans
# 256 µm (~2.5 diameters of a 100 µm spot) at 0.5 µm/px, and 7 diameters make it fire above ~1.37 µm/px, the same
# pixel size as the 3-diameter warning on the 224 px spot patch of `extract_features` (silent on HER2ST, 0.7-0.9 µm/px)
LARGE_REGION_DIAMETERS = 7.0


def warn_large_region_tiles(stack: StackInfo, region_px: list[int]) -> None:
    """Warn about sections whose region tile (side given in pixels) spans more than 7 spot diameters."""
    from asign._stack import wide_detail, wider_than_spots

    d = float(stack.spot_diameter_um)
    big = wider_than_spots(stack, region_px, factor=LARGE_REGION_DIAMETERS)
    if big:
        detail = wide_detail(stack, big)
        logger.warning(
            f"Sections {list(big)} have region tiles more than {LARGE_REGION_DIAMETERS:g}x the spot diameter "
            f"({d:.0f} µm): {detail}, so each tile covers far more spots than intended. The tile sides are in pixels "
            f"(the defaults, {DEFAULT_SCALES_PX['region']} and {DEFAULT_SCALES_PX['global']} px, suit images of about "
            "0.5 µm/px); pass `scales_um=` instead, e.g. scales_um={'region': 256, 'global': 512} (the defaults at "
            "0.5 µm/px)."
        )


def make_tiles(
    sdata: SpatialData,
    *,
    scales: Mapping[str, int] | None = None,
    scales_um: Mapping[str, float] | None = None,
    table_key: str = Key.TABLE,
    key_added: str = Key.ADDED,
    inplace: bool = True,
) -> Tiles | None:
    """Lay the region and global tile grids over every section and index each spot's tiles.

    The grids start at each section image's origin (0, 0) with stride equal to the tile side (method.md §2.3):
    ``r(i) = (floor(x_i / R), floor(y_i / R))`` and ``q(i) = (floor(x_i / G), floor(y_i / G))`` with
    ``G = k R`` for an integer ``k`` (default 512 and 1024 px), so ``q(r) = floor(r / k)``. Tiles without spots are
    dropped; tiles that extend past the right or bottom image border are kept (their images are padded with white
    when features are extracted) and flagged in ``obs['padded']``. Tiles are defined by spot positions only, so
    sections without an image get tiles too.

    Parameters
    ----------
    sdata
        The section stack.
    scales
        Tile sides in native pixels, ``{"region": 512, "global": 1024}`` by default (a ``"spot"`` entry is
        accepted and ignored here). These suit images of about 0.5 µm/px: a region side in pixels that spans more
        than 7 spot diameters (a coarse image) logs a warning that suggests ``scales_um``.
    scales_um
        Tile sides in µm instead, converted per section with its ``um_per_px`` (e.g. ``{"region": 353,
        "global": 706}``); the global side must be an integer multiple of the region side.
    table_key
        The spot table.
    key_added
        Prefix of the keys written.
    inplace
        Write into ``sdata`` (and return `None`) or return the result.

    Returns
    -------
    If ``inplace = False``, a :class:`Tiles` tuple. Otherwise writes

    - ``sdata.tables[table_key].obs['{key_added}_region']``, ``.obs['{key_added}_global']``: int64 row indices
      into the tile tables;
    - ``sdata.tables['{key_added}_regions']`` and ``sdata.tables['{key_added}_globals']``: one row per non-empty
      tile, sorted by section, row and column, with ``obs['section']`` (ordered categorical), ``obs['tile_col']``,
      ``obs['tile_row']``, ``obs['n_spots']``, ``obs['tile_size_px']``, ``obs['padded']``, ``obsm['spatial']``
      (tile centre, native px); the region table also has ``obs['{key_added}_global']`` (its global tile's row)
      and the global table ``obs['n_regions']``; both carry the manifest and ``uns['asign']['tiles']``;
    - ``sdata.tables[table_key].uns['{key_added}_tiles']``: scales in px and µm per section, table names.

    Tile tables of an earlier run with the same ``key_added`` are replaced; any other element (image, labels,
    points, shapes or table) named like a tile table, case-insensitively, is refused before any work. Where the
    replaced tables held the image features of :func:`asign.pp.extract_features`, a warning says that those features
    are gone (extract them again: ``extract_features`` lays its tiles itself, so ``make_tiles`` is only needed for
    tiles without features).
    """
    from asign.io import validate_stack

    stack = validate_stack(sdata, table_key=table_key)
    table = sdata.tables[table_key]
    sc = {k: v for k, v in (scales or {}).items() if k != "spot"} if scales is not None else None
    sc_um = {k: v for k, v in (scales_um or {}).items() if k != "spot"} if scales_um is not None else None
    px, um, unit = resolve_scales(stack, sc, sc_um, levels=TILE_LEVELS)
    if sc_um is None or "region" not in sc_um:
        warn_large_region_tiles(stack, px["region"])
    sizes = [_image_size(sdata, k) for k in stack.image_keys]
    if inplace:
        check_output_keys(sdata, table_key, key_added)
    r_index, g_index, regions, globals_ = compute_tiles(table, stack, px, sizes, key_added)
    params = _tile_params(stack, px, um, unit, key_added)
    _copy_manifest(table, regions, params)
    _copy_manifest(table, globals_, params)
    if not inplace:
        return Tiles(r_index, g_index, regions, globals_, px)
    _warn_replaced_features(sdata, table_key, key_added)
    write_tiles(sdata, table_key, key_added, r_index, g_index, regions, globals_, params)
    return None


def _warn_replaced_features(sdata: SpatialData, table_key: str, key_added: str) -> None:
    """Warn when :func:`make_tiles` replaces tile tables that hold the image features of ``extract_features``."""
    held = [
        k
        for k in (tile_table_key(key_added, lev) for lev in ("region", "global"))
        if k in sdata.tables and "features" in sdata.tables[k].obsm
    ]
    if not held:
        return
    spot_keys = [
        k for k in (f"{key_added}_features_region", f"{key_added}_features_global") if k in sdata.tables[table_key].obsm
    ]
    logger.warning(
        f"Replacing tables {held}, which held the region/global image features of `asign.pp.extract_features` "
        f"(key_added={key_added!r}): those features are gone"
        + (f", and `.obsm` {spot_keys} of table {table_key!r} no longer match the new tiles" if spot_keys else "")
        + ". Run `asign.pp.extract_features` again (it lays the tiles itself) before `asign.tl.impute(method='asign')`."
    )


def _tile_params(
    stack: StackInfo, px: dict[str, list[int]], um: dict[str, list[float]], unit: str, key_added: str
) -> dict[str, Any]:
    return {
        "sections": list(stack.sections),
        "scales_px": {k: [int(v) for v in vs] for k, vs in px.items()},
        "scales_um": {k: [float(v) for v in vs] for k, vs in um.items()},
        "unit": unit,
        "region_table": tile_table_key(key_added, "region"),
        "global_table": tile_table_key(key_added, "global"),
        "region_key": index_key(key_added, "region"),
        "global_key": index_key(key_added, "global"),
    }


def check_output_keys(
    sdata: SpatialData, table_key: str, key_added: str, *, obsm: tuple[str, ...] = (), obs: tuple[str, ...] = ()
) -> None:
    """Refuse a ``key_added`` whose outputs would clash with elements or columns that asign did not write.

    The tile tables ``'{key_added}_regions'`` / ``'{key_added}_globals'`` must be valid SpatialData element names
    that differ, case-insensitively, from every element of ``sdata`` (images, labels, points, shapes, tables) other
    than tile tables of an earlier run with the same ``key_added``: the table itself carries the tile record
    ``uns['asign']['tiles']`` naming it, and the spot table records the run in ``uns['{key_added}_tiles']``. The
    columns ``obs`` / ``obsm`` of the spot table may be replaced only when that record exists; anything else of the
    same name belongs to the user. Keys reserved by the stack contract are refused
    (:func:`asign._checks.check_reserved_keys`). Checked before any work, so that a clash is not found after the
    features are computed.
    """
    from spatialdata._core.validation import check_valid_name

    columns = (index_key(key_added, "region"), index_key(key_added, "global"), *obs)
    check_reserved_keys(key_added, table_key, obs=columns, obsm=obsm, uns=(f"{key_added}_tiles",))
    table = sdata.tables[table_key]
    recorded = table.uns.get(f"{key_added}_tiles")
    recorded = recorded if isinstance(recorded, Mapping) else None
    names = {tile_table_key(key_added, lev): lev for lev in TILE_LEVELS}
    for name in names:
        try:
            check_valid_name(name)
        except (TypeError, ValueError) as e:
            msg = (
                f"key_added={key_added!r} gives the tile table name {name!r}, which is not a valid SpatialData "
                f"element name ({e.args[0]}); pass a key_added of letters, digits, '_', '-' and '.', e.g. 'asign'."
            )
            raise ValueError(msg) from None
    clashes = []
    for kind, name, _ in sdata.gen_elements():
        out = next((k for k in names if k.lower() == name.lower()), None)
        if out is None:
            continue
        if kind == "tables" and name == out and name != table_key:
            if _is_earlier_tile_table(sdata.tables[name], recorded, names[name]):
                continue  # a tile table of an earlier run with this key_added: replaced
            clashes.append(f"would overwrite table {name!r}, which no earlier asign run with this key wrote")
        elif name == table_key:
            clashes.append(f"would write the table {out!r}, which clashes with the spot table {name!r}")
        else:
            clashes.append(
                f"would write the table {out!r}, which clashes with the element sdata.{kind}[{name!r}] (element "
                "names must differ, case-insensitively)"
            )
    if clashes:
        msg = (
            f"key_added={key_added!r} {'; and '.join(clashes)}. Choose another `key_added`, or rename or remove "
            "the element."
        )
        raise ValueError(msg)
    if recorded is not None:
        return
    taken = [f"`.obs[{c!r}]`" for c in columns if c in table.obs]
    taken += [f"`.obsm[{c!r}]`" for c in obsm if c in table.obsm]
    if taken:
        msg = (
            f"key_added={key_added!r} would overwrite {', '.join(taken)} of table {table_key!r}, which no earlier "
            f"asign run with this key wrote (no `.uns['{key_added}_tiles']`); choose another key_added or remove them."
        )
        raise ValueError(msg)


def _is_earlier_tile_table(existing: AnnData, recorded: Mapping[str, Any] | None, level: str) -> bool:
    """Whether ``existing`` is the ``level`` tile table of the run recorded in the spot table (``recorded``)."""
    if recorded is None:
        return False
    name = recorded.get(f"{level}_table")
    info = existing.uns.get(Key.UNS, {})
    own = info.get("tiles") if isinstance(info, Mapping) else None
    return isinstance(own, Mapping) and name is not None and str(own.get(f"{level}_table")) == str(name)


def write_tile_tables(sdata: SpatialData, key_added: str, regions: AnnData, globals_: AnnData) -> None:
    """Put both tile tables into ``sdata``, or neither: a failed write restores the tables that were there before."""
    new = {tile_table_key(key_added, "region"): regions, tile_table_key(key_added, "global"): globals_}
    before = {k: sdata.tables[k] for k in new if k in sdata.tables}
    try:
        for k, ad in new.items():
            sdata.tables[k] = ad
    except BaseException:
        for k in new:
            if k in sdata.tables:
                del sdata.tables[k]
            if k in before:
                sdata.tables[k] = before[k]
        raise


def write_tile_index(table: AnnData, key_added: str, r_index: np.ndarray, g_index: np.ndarray) -> None:
    """Write the spots' tile rows ``obs['{key_added}_region']`` / ``obs['{key_added}_global']``."""
    table.obs[index_key(key_added, "region")] = np.asarray(r_index, dtype=np.int64)
    table.obs[index_key(key_added, "global")] = np.asarray(g_index, dtype=np.int64)


def log_tiles_written(key_added: str, regions: AnnData, globals_: AnnData) -> None:
    """Log the index columns and tile tables written under ``key_added``."""
    rk, gk = tile_table_key(key_added, "region"), tile_table_key(key_added, "global")
    logger.info(
        f"Adding `.obs['{index_key(key_added, 'region')}']`, `.obs['{index_key(key_added, 'global')}']` and tables "
        f"{rk!r} ({regions.n_obs} tiles), {gk!r} ({globals_.n_obs} tiles)."
    )


def write_tiles(
    sdata: SpatialData,
    table_key: str,
    key_added: str,
    r_index: np.ndarray,
    g_index: np.ndarray,
    regions: AnnData,
    globals_: AnnData,
    params: dict[str, Any],
) -> None:
    """Write the tile tables, then the index maps and ``uns['{key_added}_tiles']`` of the spot table.

    The tables go first (both or neither), so that a failed write leaves no spot-table keys of a run without tables.
    """
    table = sdata.tables[table_key]
    write_tile_tables(sdata, key_added, regions, globals_)
    write_tile_index(table, key_added, r_index, g_index)
    table.uns[f"{key_added}_tiles"] = params
    log_tiles_written(key_added, regions, globals_)


def tile_members(index: np.ndarray, n_tiles: int) -> list[np.ndarray]:
    """Spot rows of every tile (inverse of an index map), e.g. to sum member counts."""
    order = np.argsort(index, kind="stable")
    bounds = np.searchsorted(index[order], np.arange(n_tiles + 1))
    return [order[bounds[t] : bounds[t + 1]] for t in range(n_tiles)]
