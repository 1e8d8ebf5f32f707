"""Multi-resolution frozen image features of spots, region tiles and global tiles (method.md §2.3, §2.5)."""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any, Literal, NamedTuple

import numpy as np

from asign._checks import check_number
from asign._constants import Key
from asign._logging import logger
from asign._stack import wide_detail, wider_than_spots
from asign.pp._stain import TTA_VIEWS
from asign.pp._tiles import (
    LEVELS,
    Tiles,
    _copy_manifest,
    _tile_params,
    check_output_keys,
    compute_tiles,
    image_level0,
    image_levels,
    index_key,
    log_tiles_written,
    resolve_scales,
    tile_table_key,
    write_tile_index,
    write_tile_tables,
)

if TYPE_CHECKING:
    import torch
    from spatialdata import SpatialData

    from asign._encoders import Encoder


class ImageFeatures(NamedTuple):
    """Result of :func:`extract_features` with ``inplace=False``."""

    features_spot: np.ndarray
    """``(n_spots, dim)`` float32 features of the spot patches (NaN for sections not processed)."""
    features_region: np.ndarray
    """``(n_spots, dim)`` features of each spot's region tile."""
    features_global: np.ndarray
    """``(n_spots, dim)`` features of each spot's global tile."""
    spot_padded: np.ndarray
    """``(n_spots,)`` whether the spot patch crosses the image border (padded with white)."""
    tiles: Tiles
    """Index maps and tile tables (with ``obsm['features']``)."""
    params: dict[str, Any]
    """What would be written to ``uns['{key_added}_features']``."""
    spot_views: np.ndarray | None = None
    """With ``keep_views=True``: ``(n_spots, n_views, dim)`` features of every test-time-augmentation view of the
    spot patches (the tiles' views are in the tile tables' ``obsm['features_views']``)."""


def _spot_corners(xy: np.ndarray, side: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Top-left corners of ``side`` px patches centred on the spot centres rounded to the nearest pixel."""
    cx = np.floor(xy[:, 0] + 0.5).astype(np.int64)
    cy = np.floor(xy[:, 1] + 0.5).astype(np.int64)
    return cx - side // 2, cy - side // 2


def _select_sections(stack, sections: Sequence[str] | None) -> list[str]:
    no_image = [s for s, k in zip(stack.sections, stack.image_keys, strict=True) if k is None]
    if sections is None:
        if no_image:
            with_image = [s for s in stack.sections if s not in no_image]
            msg = (
                f"Sections {no_image} have no image, so their spots cannot get image features. Add their images, "
                f"or exclude them with `sections={with_image}` (their spots then get NaN features)."
            )
            raise ValueError(msg)
        return list(stack.sections)
    if isinstance(sections, str):
        sections = [sections]
    sections = [str(s) for s in sections]
    unknown = [s for s in sections if s not in stack.sections]
    if unknown:
        msg = f"`sections` {unknown} are not in the stack; it has sections {stack.sections}."
        raise ValueError(msg)
    bad = [s for s in sections if s in no_image]
    if bad:
        msg = f"Sections {bad} have no image; remove them from `sections=` (their spots then get NaN features)."
        raise ValueError(msg)
    if not sections:
        msg = "`sections` is empty; pass at least one section with an image."
        raise ValueError(msg)
    return [s for s in stack.sections if s in sections]


# a spot patch wider than this many spot diameters covers many spots: pixel scales meant for ~0.5 µm/px images
LARGE_PATCH_DIAMETERS = 3.0


def _warn_large_spot_patches(stack, sections: Sequence[str], spot_px: Sequence[int]) -> None:
    """Warn about sections whose spot patch (given in pixels) spans more than 3 spot diameters."""
    d = float(stack.spot_diameter_um)
    big = wider_than_spots(stack, spot_px, sections, factor=LARGE_PATCH_DIAMETERS)
    if big:
        detail = wide_detail(stack, big)
        logger.warning(
            f"Sections {list(big)} have spot patches more than {LARGE_PATCH_DIAMETERS:g}x the spot diameter "
            f"({d:.0f} µm): {detail}, so each patch covers many spots. The scales are in pixels (the defaults suit "
            "images of about 0.5 µm/px); pass `scales_um=` instead, e.g. "
            "scales_um={'spot': 112, 'region': 256, 'global': 512} (the defaults at 0.5 µm/px)."
        )


# pyramid levels of two sections whose pixel sizes (in level-0 pixels) differ by less than this fraction count as the
# same downscale factor (level sides are rounded to whole pixels: a 1201 px image's 2x level has 600 or 601 px)
LEVEL_FACTOR_TOL = 0.02


def _usable_scales(levels: Sequence[Any], pyramid: str) -> list[float | None]:
    """Each level's pixel size in level-0 pixels, `None` for levels ``pyramid`` does not allow."""
    ok = [k == 0 or pyramid == "always" or (pyramid == "auto" and lv.stored) for k, lv in enumerate(levels)]
    return [_level_factor(lv) if u else None for lv, u in zip(levels, ok, strict=True)]


def _matching_level(scales: Sequence[float | None], factor: float) -> int | None:
    """The usable level whose pixel size is ``factor`` (within ``LEVEL_FACTOR_TOL``), or `None`."""
    best, err = None, LEVEL_FACTOR_TOL
    for k, sc in enumerate(scales):
        if sc is not None and abs(sc / factor - 1.0) <= err:
            best, err = k, abs(sc / factor - 1.0)
    return best


def _choose_levels(
    levels_of: Mapping[str, Sequence[Any]],
    sides: Mapping[str, Mapping[str, int]],
    target: int | None,
    pyramid: str,
    cap: Mapping[str, float] | None = None,
) -> tuple[dict[str, dict[str, int]], dict[str, dict[str, int]]]:
    """The pyramid level every section reads each scale from, and the level it would read on its own.

    On its own a section reads a scale from its coarsest usable level that still gives at least ``target`` px
    across the patch (:func:`asign._patches.pick_level`). So that the same patch gives the same feature in any
    section, the levels are chosen among the downscale factors that *every* section offers: a section without a
    2x level makes the others read 1x, where they would read 2x on their own. Sections with the same pyramid get
    what they would get on their own. ``target=None`` (native-size input) reads level 0. ``cap`` (per scale)
    bounds the factor (the factor that kept features of an earlier call were read at).

    Returns ``(choice, natural)``: ``{section: {scale: level index}}`` each (``natural`` within ``cap`` too).
    """
    from asign._patches import pick_level

    usable = {s: _usable_scales(levels, pyramid) for s, levels in levels_of.items()}
    first = next(iter(usable.values()), [])
    common = [sc for sc in first if sc is not None and all(_matching_level(u, sc) is not None for u in usable.values())]
    choice: dict[str, dict[str, int]] = {}
    natural: dict[str, dict[str, int]] = {}
    for s, u_all in usable.items():
        choice[s], natural[s] = {}, {}
        for lev, side in sides[s].items():
            top = float("inf") if cap is None or lev not in cap else cap[lev] * (1.0 + LEVEL_FACTOR_TOL)
            u = [sc if sc is not None and sc <= top else None for sc in u_all]
            natural[s][lev] = pick_level(side, target, u)
            best, best_scale = 0, 1.0
            if target is not None:
                for f in common:
                    k = _matching_level(u, f)
                    if (
                        k is not None
                        and k > 0
                        and round(side / float(u[k])) >= int(target)
                        and float(u[k]) > best_scale
                    ):
                        best, best_scale = k, float(u[k])
            choice[s][lev] = best
    return choice, natural


def _level_factor(level: Any) -> float:
    return float(0.5 * (level.scale_y + level.scale_x))


def _recorded_factors(
    earlier: Mapping[str, Any], stack, kept: Sequence[str], levels_of: Mapping[str, Sequence[Any]]
) -> dict[str, dict[str, float | None]]:
    """Per kept section and scale, the downscale factor its earlier features were read at (`None`: unknown)."""
    ds, pl = earlier.get("downscale"), earlier.get("pyramid_level")
    out: dict[str, dict[str, float | None]] = {}
    for s in kept:
        i, out[s] = stack.index(s), {}
        for lev in LEVELS:
            f = None
            if isinstance(ds, Mapping) and len(np.atleast_1d(ds.get(lev, []))) == stack.n_sections:
                f = float(np.atleast_1d(ds[lev])[i]) or None
            elif isinstance(pl, Mapping) and s in levels_of and len(np.atleast_1d(pl.get(lev, []))) == stack.n_sections:
                k = int(np.atleast_1d(pl[lev])[i])  # recorded before `downscale` existed
                f = _level_factor(levels_of[s][k]) if 0 <= k < len(levels_of[s]) else None
            out[s][lev] = f
    return out


def _warn_finer_levels(
    levels_of: Mapping[str, Sequence[Any]],
    choice: Mapping[str, Mapping[str, int]],
    natural: Mapping[str, Mapping[str, int]],
    pyramid: str,
) -> None:
    """Warn when sections read a scale from a finer level than their own pyramid offers (another lacks the level)."""
    finer: list[str] = []
    lacking: set[str] = set()
    for s, levels in levels_of.items():
        for lev, k in choice[s].items():
            kn = natural[s][lev]
            if kn == k:
                continue
            f_own, f_used = _level_factor(levels[kn]), _level_factor(levels[k])
            finer.append(f"{lev} patches of {s!r} at {f_used:.3g}x instead of {f_own:.3g}x")
            lacking |= {t for t, lv in levels_of.items() if _matching_level(_usable_scales(lv, pyramid), f_own) is None}
    if finer:
        missing = [s for s in levels_of if s in lacking]
        logger.warning(
            f"Sections {missing} lack pyramid levels that the images of other sections have, so those read finer "
            f"levels too: {'; '.join(finer)}. Every scale is read at the same downscale factor in "
            "every section, so that the same patch gives the same feature; it is slower. Give the images of "
            f"{missing} a stored pyramid (e.g. `Image2DModel.parse(..., scale_factors=[2, 2])`, written to zarr), "
            + ("or pass pyramid='always' to use in-memory levels too." if pyramid == "auto" else "or leave them out.")
        )


def _earlier_sections(table, key_added: str, stack, todo: Sequence[str]) -> tuple[list[str], Mapping[str, Any]]:
    """Sections with features of an earlier call under ``key_added`` that this call does not process, and its record."""
    info = table.uns.get(f"{key_added}_features")
    if not isinstance(info, Mapping):
        return [], {}
    done = {str(s) for s in np.atleast_1d(np.asarray(info.get("sections", []), dtype=object))}
    return [s for s in stack.sections if s in done and s not in todo], info


def _plain(v: Any) -> Any:
    """A recorded value as plain python (mappings, lists, floats), for comparison."""
    if isinstance(v, Mapping):
        return {str(k): _plain(x) for k, x in v.items()}
    if isinstance(v, np.ndarray | np.generic | list | tuple):
        return np.asarray(v).tolist()
    return v


def _same(a: Any, b: Any) -> bool:
    try:
        return bool(np.array_equal(np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64), equal_nan=True))
    except (TypeError, ValueError):
        return _plain(a) == _plain(b)


def _earlier_differences(earlier: Mapping[str, Any], space: Mapping[str, Any], stack, kept: Sequence[str]) -> list[str]:
    """Why an earlier call's features (``earlier``, its ``uns`` record) are not of this call's feature space."""
    out = feature_space_difference(_space_of(earlier), _space_of(space))
    for f in ("mean", "std", "keep_views", "resize"):
        a = earlier.get(f, {"keep_views": False, "resize": "device"}.get(f))
        if not _same(a, space[f]):
            out.append(f"{f}: {_plain(a)!r} != {_plain(space[f])!r}")
    idx = [stack.index(s) for s in kept]
    rec = earlier.get("scales_px", {})
    for lev, sides in space["scales_px"].items():
        old = np.asarray(rec.get(lev, []) if isinstance(rec, Mapping) else [])
        if len(old) != stack.n_sections or not np.array_equal(old[idx], np.asarray(sides)[idx]):
            out.append(f"scales_px[{lev!r}] of {list(kept)}: {_plain(old)!r} != {list(sides)!r}")
    if space["stain_norm"] != "none":
        a, b = earlier.get("stain_target_params", {}), space["stain_target_params"]
        a = a if isinstance(a, Mapping) else {}
        keys = sorted(k for k in set(a) | set(b) if k != "source")
        if any(k not in a or k not in b or not _same(a[k], b[k]) for k in keys):
            out.append(
                f"stain target: {a.get('source')!r} != {b.get('source')!r} (other stain vectors or concentrations; a "
                "'median' target follows the processed sections: pass the earlier call's `stain_target_params`)"
            )
    return out


def _earlier_missing(
    sdata, table_key: str, key_added: str, kept: Sequence[str], regions, globals_, space: Mapping[str, Any], n: int
) -> list[str]:
    """What is missing of the earlier features of the ``kept`` sections (the arrays, or their tiles)."""
    table = sdata.tables[table_key]
    dim, views = int(space["dim"]), bool(space["keep_views"])
    keys = [Key.features(key_added, "spot")] + ([Key.views(Key.features(key_added, "spot"))] if views else [])
    out = [f"`.obsm[{k!r}]` is gone" for k in keys if k not in table.obsm or np.shape(table.obsm[k])[0] != n]
    out += [f"`.obsm[{k!r}]` has another width" for k in keys if k in table.obsm and np.shape(table.obsm[k])[-1] != dim]
    for lev, new in (("region", regions), ("global", globals_)):
        tk = tile_table_key(key_added, lev)
        need = [Key.TILE_FEATURES] + ([Key.views(Key.TILE_FEATURES)] if views else [])
        if tk not in sdata.tables or any(k not in sdata.tables[tk].obsm for k in need):
            out.append(f"table {tk!r} holds no features (replaced by `make_tiles`?)")
        elif _kept_tile_rows(new, sdata.tables[tk], kept) is None:
            out.append(f"table {tk!r} lacks tiles of {list(kept)} (other spots or tile sides)")
    return out


def _kept_tile_rows(new, old, kept: Sequence[str]) -> tuple[np.ndarray, np.ndarray] | None:
    """Rows of the ``kept`` sections' tiles in ``new`` and of the same tiles in the earlier table ``old``.

    Tiles are matched by section, tile row and tile column; `None` if one is missing in ``old``.
    """

    def keys(ad, rows):
        sec = ad.obs[Key.SECTION].astype(str).to_numpy()
        r, c = ad.obs["tile_row"].to_numpy(), ad.obs["tile_col"].to_numpy()
        return [(sec[i], int(r[i]), int(c[i])) for i in rows]

    if not {Key.SECTION, "tile_row", "tile_col"} <= set(old.obs.columns):
        return None
    old_row = {k: i for i, k in enumerate(keys(old, range(old.n_obs)))}
    rows = np.flatnonzero(new.obs[Key.SECTION].astype(str).isin(list(kept)).to_numpy())
    found = [old_row.get(k) for k in keys(new, rows)]
    if any(i is None for i in found):
        return None
    return rows, np.asarray(found, dtype=np.int64)


def _fill_kept(
    sdata,
    table_key: str,
    key_added: str,
    kept: Sequence[str],
    codes: np.ndarray,
    stack,
    regions,
    globals_,
    feats: np.ndarray,
    views: np.ndarray | None,
    padded: np.ndarray,
) -> None:
    """Copy the earlier features of the ``kept`` sections into this call's rows (spots by row, tiles by position)."""
    table = sdata.tables[table_key]
    n, nr = table.n_obs, regions.n_obs
    m = np.isin(codes, [stack.index(s) for s in kept])
    feats[:n][m] = np.asarray(table.obsm[Key.features(key_added, "spot")])[m]
    if views is not None:
        views[:n][m] = np.asarray(table.obsm[Key.views(Key.features(key_added, "spot"))])[m]
    col = f"{key_added}_spot_padded"
    if col in table.obs:
        padded[m] = table.obs[col].to_numpy(dtype=bool)[m]
    for lev, new, offset in (("region", regions, n), ("global", globals_, n + nr)):
        old = sdata.tables[tile_table_key(key_added, lev)]
        rows, old_rows = _kept_tile_rows(new, old, kept)
        feats[offset + rows] = np.asarray(old.obsm[Key.TILE_FEATURES])[old_rows]
        if views is not None:
            views[offset + rows] = np.asarray(old.obsm[Key.views(Key.TILE_FEATURES)])[old_rows]


_STAIN_PER_SECTION = (
    "stain_matrix",
    "stain_vectors",
    "stain_max_conc",
    "stain_od_mean",
    "stain_estimated",
    "stain_level",
    "stain_n_pixels",
)


def _copy_kept_stain(params: dict[str, Any], earlier: Mapping[str, Any], stack, kept: Sequence[str]) -> None:
    """Copy the per-section stain records of the ``kept`` sections from the earlier call's record."""
    idx = [stack.index(s) for s in kept]
    for k in _STAIN_PER_SECTION:
        if k in params and k in earlier and len(np.asarray(earlier[k])) == stack.n_sections:
            params[k][idx] = np.asarray(earlier[k])[idx]


def extract_features(
    sdata: SpatialData,
    *,
    encoder: str | torch.nn.Module | Encoder = "efficientnet_lite0",
    weights: str | None = None,
    scales: Mapping[str, int] | None = None,
    scales_um: Mapping[str, float] | None = None,
    input_size: int | None = 224,
    batch_size: int | None = None,
    device: str | torch.device | None = None,
    num_workers: int = 0,
    mixed_precision: bool | None = None,
    pyramid: Literal["auto", "always", "never"] = "auto",
    resize: Literal["device", "reader"] = "device",
    stain_norm: Literal["none", "macenko", "od_scale"] | None = "none",
    stain_target: str | Mapping[str, Any] = "auto",
    tta: Literal["none", "flips", "dihedral"] | None = "none",
    keep_views: bool = False,
    table_key: str = Key.TABLE,
    key_added: str = Key.ADDED,
    sections: Sequence[str] | None = None,
    show_progress_bar: bool = True,
    inplace: bool = True,
) -> ImageFeatures | None:
    """Frozen-encoder features of every spot at three scales: spot patch, region tile and global tile.

    Spot patches are centred on each spot centre (``obsm['spatial']``, rounded to the nearest pixel); region and
    global tiles are the non-overlapping grids of :func:`asign.pp.make_tiles` (index maps spot -> region -> global).
    Each patch is read lazily (only the image chunks it overlaps are computed) from the coarsest pyramid level of
    its section's image that still gives at least ``input_size`` pixels across it (``pyramid``): with the default
    scales and a 224 px input, spot patches come from full resolution, 512 px region tiles from the 2x level
    (256 px) and 1024 px global tiles from the 4x level (256 px). Levels are chosen among the downscale factors
    that every processed section offers, so the same patch gives the same feature in any section, pyramid or not
    (a section without the level makes the others read a finer one, with a warning). Patches are padded with white
    (255) where they cross the image border, resized to ``input_size`` with antialiased bilinear interpolation — batched on
    ``device`` by default, so the readers only read (``resize``) — normalised with the encoder's mean/std
    (ImageNet by default) and embedded in batches by **one** frozen encoder, identical for every section and every
    level (no per-section projection, method.md §8 defect 1). Inference runs in eval mode under
    :func:`torch.inference_mode`, channels-last, with autocast on CUDA (``mixed_precision``) and deterministic
    algorithms on the CPU.

    Parameters
    ----------
    sdata
        The section stack.
    encoder
        Registry name (``"efficientnet_lite0"``, ``"efficientnet_lite0_multidepth"``, the larger
        ``"efficientnet_lite1"`` / ``"efficientnet_lite2"`` and their ``_multidepth`` forms, ``"resnet50"``,
        ``"resnet50_layer3"``, ``"handcrafted"``, or a histopathology foundation model: ``"uni"``, ``"uni2-h"``,
        ``"virchow"``, ``"virchow2"``, ``"h-optimus-0"``), ``"timm:<model_name>"``, a :class:`torch.nn.Module`
        (input: normalised ``(B, 3, H, W)``; output ``(B, dim)`` or a feature map that is average-pooled) or an
        ``asign._encoders.Encoder``. See ``docs/encoders.md``. A module passed in is used in place: it is left in
        eval mode with frozen parameters, on ``device`` (pass ``copy.deepcopy(module)`` to keep yours as it was).
    weights
        `None` for the encoder's default pretrained weights (offline for the built-in CNNs; the gated Hugging Face
        hub for the foundation models), ``"random"`` for a seeded random initialisation, or a local state-dict /
        checkpoint file (``.safetensors`` too; recorded as its absolute path with the SHA-256 of its content). Refused
        with a module or an ``Encoder``, which carry their own weights.
    scales
        Patch/tile sides in native pixels, default ``{"spot": 224, "region": 512, "global": 1024}`` (for images of
        about 0.5 µm/px); the global side must be an integer multiple of the region side. A warning names the
        sections where a spot patch in pixels is more than 3 spot diameters wide (coarse images: pass
        ``scales_um``).
    scales_um
        Sides in µm instead (converted per section with its ``um_per_px``), so datasets of different resolution
        are treated alike.
    input_size
        Side the patches are resized to before the encoder; `None` feeds them at native size (as the paper). An
        ``Encoder`` object keeps its own input size (a different value logs a warning).
    batch_size
        Patches per batch (reduced for large native-size inputs); `None`: 64, or 16 on a CPU running one torch
        thread (there small batches stay in the caches and run about a quarter faster; with more threads larger
        batches amortise the synchronisation between them).
    device
        Torch device; `None` picks CUDA when available. Checked before the encoder is built (a device this machine
        lacks is an error at once).
    num_workers
        :class:`torch.utils.data.DataLoader` reader processes (0: read in the main process).
    mixed_precision
        Autocast (bfloat16/float16) on CUDA; `None` enables it on CUDA. Ignored on the CPU.
    pyramid
        Which levels of a multiscale image patches may be read from: ``"auto"`` the stored levels (full resolution,
        levels read from their own zarr arrays or JPEG decodes), not levels that dask computes from full resolution
        on the fly (in-memory pyramids of :class:`spatialdata.models.Image2DModel`, whose coarse chunks cost more
        to compute than the full-resolution pixels they replace); ``"always"`` any level; ``"never"`` full
        resolution only. A level is used only if the patch still spans at least ``input_size`` of its pixels, and
        never with ``input_size=None``.
    resize
        Where patches are resized to ``input_size``: ``"device"`` (batched on ``device``, float32) or
        ``"reader"`` (on uint8 in the reader processes, as before device resizing).
    stain_norm
        Stain normalisation (:mod:`asign.pp._stain`, ``docs/encoders.md``): ``"none"`` (or `None`), ``"macenko"``
        (Macenko's H&E stain vectors and maximal concentrations mapped onto the target's) or ``"od_scale"``
        (per-channel optical-density scaling matching the mean tissue OD). Each section's stain is estimated from its
        own image only (tissue pixels of a pyramid level about 1000 px across); each patch is then normalised on
        ``device`` by its section's fixed linear map in OD space (``OD' = OD @ M``; white stays white). A section
        whose stain cannot be estimated (too little tissue) keeps its colours (identity) with a warning naming it.
    stain_target
        What sections are normalised to: ``"auto"`` (``"reference"`` for ``"macenko"``, ``"median"`` for
        ``"od_scale"``), ``"reference"`` (the fixed standard of Macenko's reference implementation, the same for
        every stack), ``"median"`` (the median estimate of the processed sections), a section name, or the
        ``uns['{key_added}_features']['stain_target_params']`` mapping of another stack (to normalise new data to
        the target a model was trained with).
    tta
        Test-time augmentation: ``"none"`` (or `None`), ``"flips"`` (mean features over the patch and its
        horizontal, vertical and double flips: 4 encoder passes) or ``"dihedral"`` (the 8 flips and 90° rotations),
        at every scale, on ``device``.
    keep_views
        With ``tta`` other than ``"none"``: also keep each view's features, so that :func:`asign.tl.impute`
        (``method="asign"``) can train on a randomly drawn view per spot and tile at every step (train-time
        augmentation, ``ASIGNConfig.view_augment``) and average its prediction over the views
        (``ASIGNConfig.predict_views``). Costs ``n_views`` times the feature memory.
    table_key
        The spot table.
    key_added
        Prefix of the keys written. The tile tables ``'{key_added}_regions'`` and ``'{key_added}_globals'`` must not
        clash with another element's name (of any type, compared case-insensitively) or with a table that no earlier
        asign run with this ``key_added`` wrote; a clash is refused before any work.
    sections
        Sections to process (default: all; every one needs an image). With ``inplace=True``, sections processed by
        an earlier call with this ``key_added`` keep their features if that call had the same settings (encoder,
        weights, input size, scales, stain normalisation and target, ``tta``, ``keep_views``, ``resize`` and the
        pyramid levels read), so extracting sections in several calls gives the features of one call; otherwise a
        warning says they are discarded and why. Spots and tiles of the other sections get NaN features.
    show_progress_bar
        Show a progress bar.
    inplace
        Write into ``sdata`` (and return `None`) or return an :class:`ImageFeatures` tuple.

    Returns
    -------
    If ``inplace = False``, an :class:`ImageFeatures` tuple. Otherwise modifies ``sdata.tables[table_key]`` with

    - ``.obsm['{key_added}_features_spot']``, ``.obsm['{key_added}_features_region']``,
      ``.obsm['{key_added}_features_global']``: float32 ``(n_spots, dim)`` (region/global: the features of the
      spot's tile);
    - ``.obs['{key_added}_region']``, ``.obs['{key_added}_global']``: int64 rows into the tile tables;
    - ``.obs['{key_added}_spot_padded']``: the spot patch crosses the image border;
    - ``.uns['{key_added}_features']``: ``encoder``, ``weights``, ``weights_sha256`` (the first 16 hex digits of
      a weights file's SHA-256, ``""`` otherwise), ``dim``, ``input_size``, ``mean``, ``std``,
      ``scales_px`` / ``scales_um`` (per level, one entry per section), ``unit``, ``sections`` (with features: this
      call's and those kept from an earlier call),
      ``levels`` (``["spot", "region", "global"]``), ``device``, ``mixed_precision``, ``pyramid``, ``resize``,
      ``pyramid_level`` / ``read_px`` (per level, one entry per section: the pyramid level ``scale<k>`` read and
      the patch side in its pixels; -1 / 0 for sections not processed), ``downscale`` (per level, one entry per
      section: the pixel size of the level read in full-resolution pixels; 0 if not processed), ``batch_size``,
      ``torch_version``,
      ``n_patches``, ``seconds``, ``n_spot_padded`` (spots whose patch crosses the image border),
      ``region_table`` / ``global_table`` (the tile tables), ``region_key`` / ``global_key`` (the index columns);
      ``stain_norm``, ``tta``, ``tta_views``, ``keep_views``; with a stain normalisation also ``stain_target``
      (the target's source), ``stain_target_params`` (``source``, ``stain_vectors`` ``(3, 2)``, ``max_conc``
      ``(2,)``, ``od_mean`` ``(3,)`` where defined),
      ``stain_matrix`` ``(n_sections, 3, 3)`` (identity for sections not processed or not estimated),
      ``stain_vectors`` ``(n_sections, 3, 2)``, ``stain_max_conc`` ``(n_sections, 2)``, ``stain_od_mean``
      ``(n_sections, 3)`` (NaN where not estimated), ``stain_estimated``, ``stain_level``, ``stain_n_pixels``
      (per section), ``stain_beta``, ``stain_alpha``, ``stain_od`` (the OD convention), ``stain_seconds``;
    - ``.uns['{key_added}_tiles']`` (see :func:`asign.pp.make_tiles`);
    - with ``keep_views=True``, ``.obsm['{key_added}_features_spot_views']``: float32 ``(n_spots, n_views, dim)``
      (without it, the key of an earlier run is removed);

    and writes the tile tables ``sdata.tables['{key_added}_regions']`` / ``['{key_added}_globals']`` (see
    :func:`asign.pp.make_tiles`) with ``obsm['features']`` (and, with ``keep_views=True``,
    ``obsm['features_views']``, ``(n_tiles, n_views, dim)``).
    """
    import torch

    from asign._device import resolve_device
    from asign._encoders import get_encoder, refuse_weights_of_a_module
    from asign._patches import ImageSource, PatchJob, embed_patches, level_window
    from asign._stack import section_codes
    from asign.io import validate_stack
    from asign.pp._stain import check_stain_norm, check_stain_target, check_tta, stain_maps, stain_uns

    stack = validate_stack(sdata, table_key=table_key)
    stain_norm = check_stain_norm(stain_norm)
    tta = check_tta(tta)
    if keep_views and tta == "none":
        msg = (
            "`keep_views=True` keeps the features of each test-time-augmentation view; pass tta='flips' or 'dihedral'."
        )
        raise ValueError(msg)
    table = sdata.tables[table_key]
    if inplace:
        check_output_keys(
            sdata,
            table_key,
            key_added,
            obsm=(
                *(Key.features(key_added, lev) for lev in ("spot", "region", "global")),
                Key.views(Key.features(key_added, "spot")),
            ),
            obs=(f"{key_added}_spot_padded",),
        )
    todo = _select_sections(stack, sections)
    check_stain_target(stain_norm, stain_target, todo)
    if batch_size is not None:
        batch_size = check_number("batch_size", batch_size, integer=True, minimum=1)
    if input_size is not None:
        input_size = check_number("input_size", input_size, integer=True, minimum=1)
    if pyramid not in ("auto", "always", "never"):
        msg = f"`pyramid` must be 'auto', 'always' or 'never', got {pyramid!r}."
        raise ValueError(msg)
    if resize not in ("device", "reader"):
        msg = f"`resize` must be 'device' or 'reader', got {resize!r}."
        raise ValueError(msg)
    refuse_weights_of_a_module(encoder, weights)
    # the device before the encoder: building one can take a minute (a foundation model may first try the hub)
    dev = resolve_device(device)
    px, um, unit = resolve_scales(stack, scales, scales_um)
    if scales_um is None or "spot" not in scales_um:
        _warn_large_spot_patches(stack, todo, px["spot"])
    sizes = []
    for k in stack.image_keys:
        img = image_level0(sdata.images[k]) if k is not None else None
        sizes.append(None if img is None else (int(img.sizes["y"]), int(img.sizes["x"])))
    tile_px = {lev: px[lev] for lev in ("region", "global")}
    r_index, g_index, regions, globals_ = compute_tiles(table, stack, tile_px, sizes, key_added)

    enc = get_encoder(encoder, weights=weights, input_size=input_size)
    if batch_size is None:
        batch_size = 16 if dev.type == "cpu" and torch.get_num_threads() == 1 else 64
    codes = section_codes(table, stack)
    xy = np.asarray(table.obsm[Key.SPATIAL], dtype=np.float64)
    n, nr, ng = table.n_obs, regions.n_obs, globals_.n_obs
    spot_side = np.asarray(px["spot"], dtype=np.int64)[codes]
    sx0, sy0 = _spot_corners(xy, spot_side)
    padded = np.zeros(n, dtype=bool)

    stain_params: dict[str, Any] = {}
    mats: dict[str, np.ndarray] = {}
    t_stain = time.perf_counter()
    if stain_norm != "none":
        mats, estimates, target = stain_maps(
            {s: sdata.images[stack.image_keys[stack.index(s)]] for s in todo},
            stain_norm=stain_norm,
            stain_target=stain_target,
        )
        stain_params = stain_uns(stack.sections, stain_norm, mats, estimates, target)
        stain_params["stain_seconds"] = float(time.perf_counter() - t_stain)
    space = {
        **_encoder_record(enc, px),
        "stain_norm": stain_norm,
        "tta": tta,
        "keep_views": bool(keep_views),
        "resize": str(resize),
    }
    if stain_norm != "none":
        space["stain_target_params"] = stain_params["stain_target_params"]

    # sections processed by an earlier call with this key_added and not now keep their features if they are of the
    # same feature space and were read at the same pyramid levels as this call would read them
    kept: list[str] = []
    earlier: Mapping[str, Any] = {}
    reasons: list[str] = []
    if inplace:
        kept, earlier = _earlier_sections(table, key_added, stack, todo)
        if kept:
            reasons = _earlier_differences(earlier, space, stack, kept)
            if not reasons:
                reasons = _earlier_missing(sdata, table_key, key_added, kept, regions, globals_, space, n)
    with_image = [s for s in kept if stack.image_keys[stack.index(s)] is not None]
    levels_of = {s: image_levels(sdata.images[stack.image_keys[stack.index(s)]]) for s in [*todo, *with_image]}
    sides = {s: {lev: int(px[lev][stack.index(s)]) for lev in LEVELS} for s in levels_of}
    cap: dict[str, float] | None = None
    if kept and not reasons:
        # read every scale at most at the factor the kept features were read at, and check that they would be read
        # at that factor now (a new section without that pyramid level would make them differ)
        recorded = _recorded_factors(earlier, stack, kept, levels_of)
        unknown = [s for s in kept if any(f is None for f in recorded[s].values())]
        if unknown:
            reasons.append(f"the pyramid levels that the features of sections {unknown} were read from are unknown")
        else:
            cap = {lev: min(recorded[s][lev] for s in kept) for lev in LEVELS}
            choice, natural = _choose_levels(levels_of, sides, enc.input_size, pyramid, cap=cap)
            for lev in LEVELS:
                moved = [
                    s
                    for s in with_image
                    if abs(_level_factor(levels_of[s][choice[s][lev]]) / recorded[s][lev] - 1.0) > LEVEL_FACTOR_TOL
                ]
                if moved:
                    reasons.append(
                        f"{lev} patches of sections {moved} were read at downscale "
                        f"{[round(recorded[s][lev], 3) for s in moved]}, but with sections {todo} they would be read "
                        f"at {[round(_level_factor(levels_of[s][choice[s][lev]]), 3) for s in moved]}"
                    )
    if reasons:
        logger.warning(
            f"Earlier features of sections {kept} (key_added={key_added!r}) are discarded because the settings "
            f"differ from this call's ({'; '.join(reasons)}); their spots and tiles get NaN features. Extract them "
            "again with the same settings, or extract every section in one call."
        )
        kept, with_image, cap = [], [], None
        levels_of = {s: levels_of[s] for s in todo}
        sides = {s: sides[s] for s in todo}
    if cap is None:
        choice, natural = _choose_levels(levels_of, sides, enc.input_size, pyramid)
    else:
        free, _ = _choose_levels({s: levels_of[s] for s in todo}, sides, enc.input_size, pyramid)
        coarser = sorted(
            {
                lev
                for s in todo
                for lev in LEVELS
                if free[s][lev] != choice[s][lev] and natural[s][lev] == choice[s][lev]
            }
        )
        if coarser:
            logger.info(
                f"Scales {coarser} of sections {todo} are read at the downscale factors of the kept features of "
                f"sections {kept} ({ {lev: round(cap[lev], 3) for lev in coarser} }), where coarser pyramid levels "
                "exist: extract every section in one call to read those (faster)."
            )
    if kept:
        logger.info(
            f"Sections {kept} keep their features of an earlier call (key_added={key_added!r}, the same settings)."
        )
    skipped = [s for s in stack.sections if s not in todo and s not in kept]
    if skipped:
        logger.warning(f"Sections {skipped} are not processed (`sections=`); their spots and tiles get NaN features.")
    _warn_finer_levels(levels_of, choice, natural, pyramid)

    sources: list[ImageSource] = []
    source_section: list[str] = []
    jobs: list[PatchJob] = []
    used_level = {lev: [-1] * stack.n_sections for lev in LEVELS}
    read_px = {lev: [0] * stack.n_sections for lev in LEVELS}
    downscale = {lev: [0.0] * stack.n_sections for lev in LEVELS}
    r_codes = np.asarray(regions.obs[Key.SECTION].cat.codes)
    g_codes = np.asarray(globals_.obs[Key.SECTION].cat.codes)
    for s in [*todo, *with_image]:
        i = stack.index(s)
        levels = levels_of[s]
        level_source: dict[int, int] = {}
        m = np.flatnonzero(codes == i)
        S = int(px["spot"][i])
        h0, w0 = sizes[i]
        padded[m] = (sx0[m] < 0) | (sy0[m] < 0) | (sx0[m] + S > w0) | (sy0[m] + S > h0)
        patches = [("spot", sx0[m], sy0[m], S, m)]
        for lev, tab, tcodes, offset in (("region", regions, r_codes, n), ("global", globals_, g_codes, n + nr)):
            t = np.flatnonzero(tcodes == i)
            side = int(px[lev][i])
            x0 = tab.obs["tile_col"].to_numpy()[t] * side
            y0 = tab.obs["tile_row"].to_numpy()[t] * side
            patches.append((lev, x0, y0, side, offset + t))
        for lev, x0, y0, side, rows in patches:
            k = choice[s][lev]
            lv = levels[k]
            xk, yk, side_k = level_window(x0, y0, side, lv.scale_y, lv.scale_x)
            used_level[lev][i], read_px[lev][i] = int(k), int(side_k)
            downscale[lev][i] = _level_factor(lv)
            if s not in todo:
                continue  # kept: its features come from the earlier call
            if k not in level_source:
                sources.append(ImageSource(lv.data))
                source_section.append(s)
                level_source[k] = len(sources) - 1
            jobs.append(PatchJob(level_source[k], xk, yk, side_k, rows, f"{lev} patches of section {s!r}"))
    n_patches = int(sum(len(j.rows) for j in jobs))
    od_maps = np.stack([mats[s] for s in source_section]) if stain_norm != "none" and sources else None
    logger.info(
        f"Extracting {enc.name} features ({enc.dim}-d, weights {enc.weights}) of {n_patches} patches "
        f"({n} spots, {nr} regions, {ng} globals) in {len(todo)} section(s) on {dev} (stain_norm={stain_norm!r}, "
        f"tta={tta!r})."
    )
    t0 = time.perf_counter()
    feats = embed_patches(
        enc,
        sources,
        jobs,
        n + nr + ng,
        batch_size=batch_size,
        device=dev,
        num_workers=num_workers,
        mixed_precision=mixed_precision,
        resize=resize,
        show_progress_bar=show_progress_bar,
        desc="extract_features",
        od_maps=od_maps,
        tta=tta,
        keep_views=bool(keep_views),
    )
    seconds = time.perf_counter() - t0
    views = None
    if keep_views:
        views, feats = feats, feats.mean(axis=1, dtype=np.float64).astype(np.float32)
    if kept:
        _fill_kept(sdata, table_key, key_added, kept, codes, stack, regions, globals_, feats, views, padded)
        if stain_norm != "none":
            _copy_kept_stain(stain_params, earlier, stack, kept)
    if views is not None:
        regions.obsm[Key.views(Key.TILE_FEATURES)] = views[n : n + nr]
        globals_.obsm[Key.views(Key.TILE_FEATURES)] = views[n + nr :]
    f_spot, f_region, f_global = feats[:n], feats[n : n + nr], feats[n + nr :]
    regions.obsm[Key.TILE_FEATURES] = f_region
    globals_.obsm[Key.TILE_FEATURES] = f_global
    mp = bool(mixed_precision if mixed_precision is not None else dev.type == "cuda") and dev.type == "cuda"
    tile_params = _tile_params(stack, tile_px, {k: um[k] for k in tile_px}, unit, key_added)
    _copy_manifest(table, regions, tile_params)
    _copy_manifest(table, globals_, tile_params)
    params: dict[str, Any] = {
        **_encoder_record(enc, px),
        "scales_um": {k: [float(v) for v in vs] for k, vs in um.items()},
        "unit": unit,
        "sections": [s for s in stack.sections if s in todo or s in kept],
        "levels": list(LEVELS),
        "device": str(dev),
        "mixed_precision": mp,
        "pyramid": str(pyramid),
        "resize": str(resize),
        "pyramid_level": used_level,
        "read_px": read_px,
        "downscale": downscale,
        "batch_size": int(batch_size),
        "torch_version": str(torch.__version__),
        "n_patches": n_patches,
        "seconds": float(seconds),
        "n_spot_padded": int(padded.sum()),
        "region_table": tile_table_key(key_added, "region"),
        "global_table": tile_table_key(key_added, "global"),
        "region_key": index_key(key_added, "region"),
        "global_key": index_key(key_added, "global"),
        "stain_norm": stain_norm,
        "tta": tta,
        "tta_views": int(TTA_VIEWS[tta]),
        "keep_views": bool(keep_views),
        **stain_params,
    }
    logger.info(f"Embedded {n_patches} patches in {seconds:.1f} s ({n_patches / max(seconds, 1e-9):.1f} patches/s).")
    tiles = Tiles(r_index, g_index, regions, globals_, tile_px)
    out = ImageFeatures(
        f_spot, f_region[r_index], f_global[g_index], padded, tiles, params, None if views is None else views[:n]
    )
    if not inplace:
        return out
    # everything is computed: the tile tables first (both or neither), then the spot table's keys, its uns records
    # last, so that a failed write leaves no keys of a run without features
    write_tile_tables(sdata, key_added, regions, globals_)
    for lev, arr in (("spot", out.features_spot), ("region", out.features_region), ("global", out.features_global)):
        table.obsm[Key.features(key_added, lev)] = arr
    views_key = Key.views(Key.features(key_added, "spot"))
    if out.spot_views is not None:
        table.obsm[views_key] = out.spot_views
    elif views_key in table.obsm:
        del table.obsm[views_key]  # views of an earlier run would not match the new features
    write_tile_index(table, key_added, r_index, g_index)
    table.obs[f"{key_added}_spot_padded"] = padded
    table.uns[f"{key_added}_tiles"] = tile_params
    table.uns[f"{key_added}_features"] = params
    log_tiles_written(key_added, regions, globals_)
    logger.info(
        f"Adding `.obsm['{Key.features(key_added, 'spot')}']`, `['{Key.features(key_added, 'region')}']`, "
        f"`['{Key.features(key_added, 'global')}']`, `.obs['{key_added}_spot_padded']` and "
        f"`.uns['{key_added}_features']`."
    )
    return None


def feature_matrix(
    table,
    *,
    key: str = Key.ADDED,
    levels: Sequence[Literal["spot", "region", "global"]] | str = ("spot",),
) -> np.ndarray:
    """Concatenate ``obsm['{key}_features_<level>']`` over ``levels`` (float64); raises if features are missing."""
    if isinstance(levels, str):
        levels = [levels]
    mats = []
    for lev in levels:
        if lev not in LEVELS:
            msg = f"Unknown feature level {lev!r}; choose from {list(LEVELS)}."
            raise ValueError(msg)
        k = Key.features(key, lev)
        if k not in table.obsm:
            msg = f"`obsm['{k}']` not found; run `asign.pp.extract_features(sdata, key_added={key!r})` first."
            raise KeyError(msg)
        mats.append(np.asarray(table.obsm[k], dtype=np.float64))
    return np.concatenate(mats, axis=1)


_FEATURE_SPACE_FIELDS = ("encoder", "weights", "dim", "input_size", "scales_px", "stain_norm", "tta")


def _encoder_record(enc: Encoder, px: Mapping[str, Any]) -> dict[str, Any]:
    """The encoder and patch sides of a feature record (zarr-writable), shared by ``uns`` and the space check."""
    return {
        "encoder": enc.name,
        "weights": enc.weights,
        "weights_sha256": str(enc.weights_sha256),
        "dim": int(enc.dim),
        "input_size": int(enc.input_size) if enc.input_size is not None else 0,
        "mean": [float(v) for v in enc.mean],
        "std": [float(v) for v in enc.std],
        "scales_px": {k: [int(v) for v in vs] for k, vs in px.items()},
    }


def feature_space_id(table, key: str = Key.ADDED) -> dict[str, Any]:
    """What identifies the feature space of ``uns['{key}_features']``, so that models refuse features of another.

    The fields are the encoder, weights, input size, scales, stain normalisation and test-time augmentation. Weights
    read from a file are identified by the SHA-256 of its content (``uns['{key}_features']['weights_sha256']``), not
    by its path, so moving the file keeps the space and another file of the same name does not. Fields absent from
    the record are left out (zarr-writable result), except ``stain_norm`` and ``tta``, which default to ``"none"``
    for features extracted before these options existed.
    """
    return _space_of(table.uns.get(f"{key}_features", {}))


def _space_of(info: Any) -> dict[str, Any]:
    """:func:`feature_space_id` of a ``uns['{key}_features']`` record."""
    out: dict[str, Any] = {}
    for f in _FEATURE_SPACE_FIELDS:
        v = info.get(f) if isinstance(info, Mapping) else None
        if isinstance(v, Mapping):
            v = {k: np.asarray(x).tolist() for k, x in v.items()}
        elif isinstance(v, np.ndarray | np.generic):
            v = v.tolist()
        if v is None and f in ("stain_norm", "tta"):
            v = "none"
        if v is not None:
            out[f] = v
    sha = info.get("weights_sha256") if isinstance(info, Mapping) else None
    if sha is not None and str(sha):  # a weights file: its content, not its path, identifies the weights
        out["weights"] = f"sha256:{sha}"
    if isinstance(out.get("scales_px"), dict):  # sections differ between samples: compare the distinct sides only
        out["scales_px"] = {k: sorted(set(np.atleast_1d(v).tolist())) for k, v in out["scales_px"].items()}
    return out


def feature_space_difference(a: Mapping[str, Any], b: Mapping[str, Any]) -> list[str]:
    """Fields in which two :func:`feature_space_id` records differ, as ``"field: a != b"`` strings."""
    return [f"{f}: {a.get(f)!r} != {b.get(f)!r}" for f in sorted(set(a) | set(b)) if a.get(f) != b.get(f)]


def common_feature_space(contexts: Sequence[Any], key: str, *, method: str) -> dict[str, Any]:
    """The feature space shared by training samples (objects with ``.table`` and ``.sample``).

    Raises a ValueError naming the first sample whose features come from another space, and the fields that differ.
    """
    spaces = [feature_space_id(c.table, key) for c in contexts]
    for c, sp in zip(contexts[1:], spaces[1:], strict=True):
        if diff := feature_space_difference(spaces[0], sp):
            msg = (
                f"{method}: Training sample {c.sample!r} has features from another space than {contexts[0].sample!r} "
                f"({'; '.join(diff)}); extract every sample's features with the same options."
            )
            raise ValueError(msg)
    return spaces[0]


def check_feature_space(expected: Mapping[str, Any], table, key: str, *, method: str, sample: str) -> None:
    """Raise a ValueError naming the differing fields if ``table``'s features are not from the ``expected`` space."""
    if diff := feature_space_difference(dict(expected), feature_space_id(table, key)):
        msg = (
            f"{method}: the features of sample {sample!r} differ from those the model was trained on "
            f"({'; '.join(diff)}); extract them with the model's options."
        )
        raise ValueError(msg)
