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
    resolve_scales,
    tile_table_key,
    write_tiles,
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
    skipped = [s for s in stack.sections if s not in sections]
    if skipped:
        logger.warning(f"Sections {skipped} are not processed (`sections=`); their spots and tiles get NaN features.")
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
    (256 px) and 1024 px global tiles from the 4x level (256 px). Patches are padded with white (255) where they
    cross the image border, resized to ``input_size`` with antialiased bilinear interpolation — batched on
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
        checkpoint file (``.safetensors`` too).
    scales
        Patch/tile sides in native pixels, default ``{"spot": 224, "region": 512, "global": 1024}`` (for images of
        about 0.5 µm/px); the global side must be an integer multiple of the region side. A warning names the
        sections where a spot patch in pixels is more than 3 spot diameters wide (coarse images: pass
        ``scales_um``).
    scales_um
        Sides in µm instead (converted per section with its ``um_per_px``), so datasets of different resolution
        are treated alike.
    input_size
        Side the patches are resized to before the encoder; `None` feeds them at native size (as the paper).
    batch_size
        Patches per batch (reduced for large native-size inputs); `None`: 64, or 16 on a CPU running one torch
        thread (there small batches stay in the caches and run about a quarter faster; with more threads larger
        batches amortise the synchronisation between them).
    device
        Torch device; `None` picks CUDA when available.
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
        Prefix of the keys written.
    sections
        Sections to process (default: all; every one needs an image). Spots and tiles of other sections get NaN
        features.
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
    - ``.uns['{key_added}_features']``: ``encoder``, ``weights``, ``dim``, ``input_size``, ``mean``, ``std``,
      ``scales_px`` / ``scales_um`` (per level, one entry per section), ``unit``, ``sections`` (processed),
      ``levels`` (``["spot", "region", "global"]``), ``device``, ``mixed_precision``, ``pyramid``, ``resize``,
      ``pyramid_level`` / ``read_px`` (per level, one entry per section: the pyramid level ``scale<k>`` read and
      the patch side in its pixels; -1 / 0 for sections not processed), ``batch_size``, ``torch_version``,
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
    from asign._encoders import get_encoder
    from asign._patches import ImageSource, PatchJob, embed_patches, level_window, pick_level
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
            obsm=tuple(Key.features(key_added, lev) for lev in ("spot", "region", "global")),
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
    dev = resolve_device(device)
    if batch_size is None:
        batch_size = 16 if dev.type == "cpu" and torch.get_num_threads() == 1 else 64
    codes = section_codes(table, stack)
    xy = np.asarray(table.obsm[Key.SPATIAL], dtype=np.float64)
    n, nr, ng = table.n_obs, regions.n_obs, globals_.n_obs
    spot_side = np.asarray(px["spot"], dtype=np.int64)[codes]
    sx0, sy0 = _spot_corners(xy, spot_side)
    padded = np.zeros(n, dtype=bool)

    sources: list[ImageSource] = []
    source_section: list[str] = []
    jobs: list[PatchJob] = []
    used_level = {lev: [-1] * stack.n_sections for lev in LEVELS}
    read_px = {lev: [0] * stack.n_sections for lev in LEVELS}
    r_codes = np.asarray(regions.obs[Key.SECTION].cat.codes)
    g_codes = np.asarray(globals_.obs[Key.SECTION].cat.codes)
    for s in todo:
        i = stack.index(s)
        levels = image_levels(sdata.images[stack.image_keys[i]])
        usable = [k == 0 or pyramid == "always" or (pyramid == "auto" and lv.stored) for k, lv in enumerate(levels)]
        scales_k = [0.5 * (lv.scale_y + lv.scale_x) if ok else None for lv, ok in zip(levels, usable, strict=True)]
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
            k = pick_level(side, enc.input_size, scales_k)
            lv = levels[k]
            if k not in level_source:
                sources.append(ImageSource(lv.data))
                source_section.append(s)
                level_source[k] = len(sources) - 1
            xk, yk, side_k = level_window(x0, y0, side, lv.scale_y, lv.scale_x)
            jobs.append(PatchJob(level_source[k], xk, yk, side_k, rows, f"{s} {lev}"))
            used_level[lev][i], read_px[lev][i] = int(k), int(side_k)
    n_patches = int(sum(len(j.rows) for j in jobs))
    stain_params: dict[str, Any] = {}
    od_maps = None
    t_stain = time.perf_counter()
    if stain_norm != "none":
        mats, estimates, target = stain_maps(
            {s: sdata.images[stack.image_keys[stack.index(s)]] for s in todo},
            stain_norm=stain_norm,
            stain_target=stain_target,
        )
        od_maps = np.stack([mats[s] for s in source_section]) if sources else None
        stain_params = stain_uns(stack.sections, stain_norm, mats, estimates, target)
        stain_params["stain_seconds"] = float(time.perf_counter() - t_stain)
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
        "encoder": enc.name,
        "weights": enc.weights,
        "dim": int(enc.dim),
        "input_size": int(enc.input_size) if enc.input_size is not None else 0,
        "mean": [float(v) for v in enc.mean],
        "std": [float(v) for v in enc.std],
        "scales_px": {k: [int(v) for v in vs] for k, vs in px.items()},
        "scales_um": {k: [float(v) for v in vs] for k, vs in um.items()},
        "unit": unit,
        "sections": list(todo),
        "levels": list(LEVELS),
        "device": str(dev),
        "mixed_precision": mp,
        "pyramid": str(pyramid),
        "resize": str(resize),
        "pyramid_level": used_level,
        "read_px": read_px,
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
    write_tiles(sdata, table_key, key_added, r_index, g_index, regions, globals_, tile_params)
    for lev, arr in (("spot", out.features_spot), ("region", out.features_region), ("global", out.features_global)):
        table.obsm[Key.features(key_added, lev)] = arr
    views_key = Key.views(Key.features(key_added, "spot"))
    if out.spot_views is not None:
        table.obsm[views_key] = out.spot_views
    elif views_key in table.obsm:
        del table.obsm[views_key]  # views of an earlier run would not match the new features
    table.obs[f"{key_added}_spot_padded"] = padded
    table.uns[f"{key_added}_features"] = params
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


def feature_space_id(table, key: str = Key.ADDED) -> dict[str, Any]:
    """What identifies the feature space of ``uns['{key}_features']``, so that models refuse features of another.

    The fields are the encoder, weights, input size, scales, stain normalisation and test-time augmentation.
    Fields absent from the record are left out (zarr-writable result), except ``stain_norm`` and ``tta``, which
    default to ``"none"`` for features extracted before these options existed.
    """
    info = table.uns.get(f"{key}_features", {})
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
