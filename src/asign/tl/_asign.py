"""``method="asign"``: the ASIGN model behind :func:`asign.tl.impute` (method.md §5–6).

This module turns SpatialData / AnnData into the plain tensors of :mod:`asign._model` (features, index maps, graphs,
visible labels, tile targets) and back. The torch core never sees a SpatialData object.

Modes
-----
- **inductive** (``impute(..., train=[...])``, :func:`asign.tl.cross_validate`, :func:`asign.tl.fit` on several
  samples): the model is trained on other, fully labelled samples (``mask="section"``: one visible section per step),
  early-stopped on a validation sample (the last training sample whose labels span two sections; without one, on a
  held-out fraction of every sample's labelled spots), then applied to the test sample with its known section(s) as
  the visible set.
- **transductive** (``impute(sdata, known=[...], method="asign")`` without training samples): the model is trained
  on the known spots of the sample itself with spot masking (each step a random fraction ``visible_fraction`` of the
  known spots is visible and the others form the loss set); the unknown sections take part in the graph without
  labels. A fraction ``holdout_fraction`` of the known spots is held out for early stopping. Results are labelled
  ``mode="transductive"`` in ``uns``.
"""

from __future__ import annotations

import dataclasses
import time
from typing import TYPE_CHECKING, Any

import numpy as np

from asign._checks import check_method_option
from asign._constants import Key
from asign._logging import logger
from asign._stack import nonfinite_rows

from ._gene_rank import check_gene_rank, project_result
from ._registry import FitContext, ImputeContext, ImputeResult, register_method

if TYPE_CHECKING:
    from collections.abc import Mapping, Sequence

    import torch
    from anndata import AnnData
    from spatialdata import SpatialData

    from asign._model import ASIGNConfig, SampleTensors

    from ._fit import ASIGNFit

# options of the method that are not ASIGNConfig fields
OPTIONS = {
    "preset": "default",
    "feature_key": Key.ADDED,
    "graph_key": Key.ADDED,
    "validation": "auto",
    "tile_radius": 2.1,
    "tile_max_neighbors": 12,
    "n_models": 1,
    "n_jobs": "auto",
    # weight of the aligned nearest known spots (8-IDW in obsm['spatial_aligned']) blended into the prediction, which
    # is then projected on the first gene_rank principal axes of the known spots' expression (_gene_rank). Transductive
    # defaults (TRANSDUCTIVE_OPTIONS): w first chosen on the non-image development patients and confirmed by a
    # pre-declared rule on four others (0.5); lowered to 0.25 in session 9 with the stronger network (C2-block protocol,
    # pre-declared rule: +0.029 +- 0.010 over 0.5, 6 of 8 fits up); the rank chosen on the C2-block protocol.
    # Inductive: both confirmed by a pre-declared rule in the non-image patient folds (+0.035 +- 0.005, 8 of 8
    # patients up). docs/benchmarks/asign.md
    "gene_rank": 10,
    "nearest_blend": 0.5,
    # encoder fine-tuning (ASIGNConfig.finetune_encoder): "" = the encoder and input size of extract_features;
    # `encoder` may also be a registry name or a torch.nn.Module. Refused without finetune_encoder=True
    # (_check_finetune_options)
    "encoder": "",
    "encoder_weights": "",
    "encoder_input_size": 0,
}
# transductive defaults (one small labelled section, ~150-200 spots): a narrow, strongly regularised network that is
# also trained as a stand-alone predictor, several masked steps per epoch, a faster learning rate and a longer
# patience; every value can be overridden through method_kwargs (chosen on the known-section hold-out and on the
# synthetic stack, see docs/benchmarks/asign.md)
TRANSDUCTIVE_DEFAULTS: dict[str, Any] = {
    "mask": "spot",
    "visible_fraction": 0.2,
    "steps_per_epoch": 4,
    "lr": 1e-3,
    "weight_decay": 1e-2,
    "hidden_dim": 32,
    "attn_heads": 4,
    "input_dropout": 0.5,
    # one scale for all feature dimensions of a level (ASIGNConfig.feature_scaling): per-dimension standardisation
    # amplifies near-constant, noisy encoder dimensions. Pre-declared rule met on the C2-block protocol (session 9:
    # +0.0096 +- 0.0046, 7 of 8 seed x block fits up)
    "feature_scaling": "global",
    "net_loss_weight": 1.0,
    "max_epochs": 50,
    "patience": 10,
}
# ... an ensemble of three members (averaging removes much of the variance of a network trained on ~150 spots), and a
# quarter of the aligned nearest known spots blended in (see OPTIONS; the image model only: the non-image mode keeps
# the 0.5 its own rule confirmed)
TRANSDUCTIVE_OPTIONS: dict[str, Any] = {"n_models": 3, "nearest_blend": 0.25}
# non-image mode (method_kwargs feature_key=None, issue 6): no image features; the spot branch reads the label input
# (ASIGNConfig.label_input: propagated VISIBLE labels and reach), spot level only. Further defaults of this mode
# (applied before the user's method_kwargs) were chosen on the synthetic stack and on HER2ST patients A, E, F only
# (docs/benchmarks/asign.md, "HER2ST, all 8 patients, without images")
NOIMAGE_DEFAULTS: dict[str, Any] = {"levels": "spot", "label_input": True, "input_dropout": 0.1}


# ----------------------------------------------------------------------------------------------- options
def _option_defaults(params: dict[str, Any], *, transductive: bool) -> dict[str, Any]:
    """The data options' defaults of the mode.

    :data:`OPTIONS`, with :data:`TRANSDUCTIVE_OPTIONS` on top in the transductive mode. The blend weight 0.25 was
    chosen for the image model of the default preset (the network of :data:`TRANSDUCTIVE_DEFAULTS`); the
    transductive non-image mode (``feature_key=None``) and other presets keep the blend weight of :data:`OPTIONS`.
    """
    if not transductive:
        return dict(OPTIONS)
    out = {**OPTIONS, **TRANSDUCTIVE_OPTIONS}
    image_model = params.get("feature_key", OPTIONS["feature_key"]) is not None
    if not image_model or params.get("preset", OPTIONS["preset"]) != "default":
        out["nearest_blend"] = OPTIONS["nearest_blend"]
    return out


def split_params(params: dict[str, Any], *, seed: int, transductive: bool) -> tuple[ASIGNConfig, dict[str, Any]]:
    """Split ``method_kwargs`` into an :class:`~asign._model.ASIGNConfig` and the data options of :data:`OPTIONS`.

    Checks every option before any data is read: the configuration (:meth:`~asign._model.ASIGNConfig.validate`),
    ``n_models`` (integer >= 1), ``tile_radius`` (finite, > 0), ``tile_max_neighbors`` (integer >= 1), ``gene_rank``,
    ``nearest_blend``, ``validation`` and the encoder options (:func:`_check_finetune_options`).
    """
    from asign._model import ASIGNConfig

    fields = {f.name for f in dataclasses.fields(ASIGNConfig)}
    params = dict(params)
    unknown = sorted(set(params) - fields - set(OPTIONS))
    if unknown:
        msg = (
            f"Unknown option(s) {unknown} for method 'asign'. Model options: {sorted(fields)}; "
            f"data options: {sorted(OPTIONS)}."
        )
        raise ValueError(msg)
    defaults = _option_defaults(params, transductive=transductive)
    opts = {k: params.pop(k, v) for k, v in defaults.items()}
    opts["n_models"] = check_method_option("asign", "n_models", opts["n_models"], integer=True, minimum=1)
    opts["tile_radius"] = check_method_option("asign", "tile_radius", opts["tile_radius"], minimum=0, strict=True)
    opts["tile_max_neighbors"] = check_method_option(
        "asign", "tile_max_neighbors", opts["tile_max_neighbors"], integer=True, minimum=1
    )
    opts["gene_rank"] = check_gene_rank(opts["gene_rank"])
    opts["nearest_blend"] = check_nearest_blend(opts["nearest_blend"])
    if opts["validation"] not in ("auto", "holdout", "none"):
        msg = f"validation={opts['validation']!r} must be 'auto', 'holdout' or 'none'."
        raise ValueError(msg)
    overrides = dict(TRANSDUCTIVE_DEFAULTS) if transductive and opts["preset"] == "default" else {}
    if opts["feature_key"] is None:
        for name, forced in (("levels", "spot"), ("label_input", True)):
            if name in params and params[name] != forced:
                msg = (
                    f"method 'asign' without image features (feature_key=None) needs {name}={forced!r}, got "
                    f"{params[name]!r}; pass a feature_key to use the image model."
                )
                raise ValueError(msg)
        overrides.update(NOIMAGE_DEFAULTS)
    overrides.update(params)
    overrides.setdefault("seed", int(seed))
    cfg = ASIGNConfig.from_preset(opts["preset"], **overrides)
    _check_finetune_options(cfg, opts)
    return cfg, opts


def _check_finetune_options(cfg: ASIGNConfig, opts: dict[str, Any]) -> None:
    """The encoder options of :data:`OPTIONS` apply to fine-tuning only; fine-tuning needs image features.

    A ValueError, before any work, for ``encoder`` / ``encoder_weights`` / ``encoder_input_size`` without
    ``finetune_encoder=True`` (they would be ignored, while ``uns`` recorded the encoder as used), for
    ``finetune_encoder=True`` with ``feature_key=None``, and for an ``encoder`` name that is not in the registry.
    """

    def unset(v: Any, default: Any) -> bool:  # the default ("" / 0), or None
        return v is None or (isinstance(v, str | int | np.integer) and not isinstance(v, bool) and v == default)

    given = [k for k in ("encoder", "encoder_weights", "encoder_input_size") if not unset(opts[k], OPTIONS[k])]
    if not cfg.finetune_encoder:
        if given:
            shown = ", ".join(
                f"{k}={opts[k]!r}" if isinstance(opts[k], str | int) else f"{k}=<{type(opts[k]).__name__}>"
                for k in given
            )
            msg = (
                f"method 'asign': {shown} applies to encoder fine-tuning only (finetune_encoder=True); without it the "
                "model reads the stored features of `asign.pp.extract_features` and no encoder runs. Pass "
                f"finetune_encoder=True, or leave out {given}."
            )
            raise ValueError(msg)
        return
    if opts["feature_key"] is None:
        msg = (
            "method 'asign': finetune_encoder=True needs image features (feature_key): the encoder is fine-tuned on "
            "the spot patches cut as `asign.pp.extract_features` cut them, and the region/global levels read its "
            "features; it cannot run without image features (feature_key=None)."
        )
        raise ValueError(msg)
    from asign._encoders import ENCODERS, available_encoders

    enc = opts["encoder"]
    if isinstance(enc, str) and enc and enc not in ENCODERS and not enc.startswith("timm:"):
        msg = (
            f"method 'asign': finetune_encoder=True with encoder={enc!r}, which is not in the encoder registry; "
            f"available: {available_encoders()} or a torch.nn.Module."
        )
        raise ValueError(msg)


# ------------------------------------------------------------------------------------------------ tensors
def _tile_codes(tiles, stack) -> np.ndarray:
    import pandas as pd

    cat = pd.Categorical(tiles.obs[Key.SECTION].astype(str), categories=stack.sections)
    return np.asarray(cat.codes, dtype=np.int64)


def _feature_keys(feature_key: str, levels: str) -> list[str]:
    """``obsm`` keys of the spot table's image features that the model of ``levels`` reads."""
    return [Key.features(feature_key, lev) for lev in (("spot",) if levels == "spot" else ("spot", "region", "global"))]


def _lacking(where: str, container: Any, keys: Sequence[str]) -> list[str]:
    return [f"`{where}['{k}']`" for k in keys if k not in container]


def check_sample_inputs(
    table: AnnData,
    tables: Mapping[str, AnnData] | None,
    table_key: str,
    sample: str,
    *,
    levels: str,
    feature_key: str | None,
    graph_key: str,
    for_predict: bool = False,
    **_: Any,
) -> None:
    """Raise an error naming what a sample lacks for method ``"asign"``, its table and what to run to add it.

    The one statement of what a sample needs, for the sample to impute (the method's check, before any training or
    logging), every training sample (:func:`fit_contexts`) and :func:`sample_tensors`: the image features
    ``obsm['{feature_key}_features_<level>']`` of every level of the model (none with ``feature_key=None``); at
    ``levels="spot_region_global"`` also the tile rows ``obs['{feature_key}_region' / '_global']`` and the tile
    tables ``'{feature_key}_regions'`` / ``'_globals'`` with ``obsm['features']`` (the region table with its
    ``obs['{feature_key}_global']``); and the graph ``obsp['{graph_key}_connectivities']``. The feature arrays are
    read only to check that they are finite (a ValueError names the rows that are not).

    Parameters
    ----------
    table
        The spot table.
    tables
        The stack's tables (``sdata.tables``); `None` leaves the tile tables unchecked.
    table_key, sample
        Key of the spot table and name of the sample (``""`` if unnamed), for the messages.
    levels, feature_key, graph_key
        As in :func:`sample_tensors` (further options of :func:`tensor_options` are ignored).
    for_predict
        The check of :func:`asign.tl.predict`, whose model fixes ``levels`` and the features: missing features are
        to be extracted as the model was trained (no hint that ``levels='spot'`` runs without tile tables).
    """
    who = f"method 'asign': {f'sample {sample!r}' if sample else 'the sample'} (table {table_key!r}) has no"
    if feature_key is None and levels != "spot":
        msg = "Without image features (feature_key=None) the model runs at the spot level only (levels='spot')."
        raise ValueError(msg)
    missing = [] if feature_key is None else _lacking(".obsm", table.obsm, _feature_keys(feature_key, levels))
    if levels == "spot_region_global":
        rkey, gkey, gcol = f"{feature_key}_regions", f"{feature_key}_globals", f"{feature_key}_global"
        missing += _lacking(".obs", table.obs, [f"{feature_key}_region", gcol])
        for name, cols in ((rkey, [gcol]), (gkey, [])) if tables is not None else ():
            if name not in tables:
                missing.append(f"tile table `sdata.tables['{name}']`")
                continue
            missing += _lacking(f"sdata.tables['{name}'].obsm", tables[name].obsm, [Key.TILE_FEATURES])
            missing += _lacking(f"sdata.tables['{name}'].obs", tables[name].obs, cols)
    if missing:
        msg = f"{who} {', '.join(missing)}; run `asign.pp.extract_features(sdata, key_added={feature_key!r})` on it first."
        if for_predict:  # the model fixes the levels and the feature space
            msg += (
                f" tl.predict applies the model as it was trained (levels={levels!r}): extract the features with the "
                "options the model was trained with (its `options['feature_space']`)."
            )
        elif levels != "spot" and Key.features(feature_key, "spot") in table.obsm:
            msg += " Tile tables are read at levels='spot_region_global' only: levels='spot' runs without them."
        raise KeyError(msg)
    ckey = Key.connectivities(graph_key)
    if ckey not in table.obsp:
        msg = f"{who} `.obsp['{ckey}']`; run `asign.pp.neighbors_3d(sdata, key_added={graph_key!r})` on it first."
        raise KeyError(msg)
    from asign.pp._graph import check_graph_alignment

    # non-finite features first: that message names the spots (the graph check would call them changed features)
    _check_finite_features(table, tables, sample, table_key, levels=levels, feature_key=feature_key)
    check_graph_alignment(table, graph_key, table_key=table_key)


def _check_finite_features(
    table: AnnData,
    tables: Mapping[str, AnnData] | None,
    sample: str,
    table_key: str,
    *,
    levels: str,
    feature_key: str | None,
) -> None:
    """A ValueError naming the features with NaN/inf rows: one such row would turn the whole model into NaN."""
    if feature_key is None:
        return
    where = f"method 'asign': {f'sample {sample!r}' if sample else 'the sample'}"
    bad_parts = []
    for k in _feature_keys(feature_key, levels):
        n_bad, per = nonfinite_rows(table, table.obsm[k])
        if n_bad:
            bad_parts.append(f"table {table_key!r} `.obsm['{k}']` in {n_bad} spots (per section: {per})")
    if levels == "spot_region_global" and tables is not None:
        for name in (f"{feature_key}_regions", f"{feature_key}_globals"):
            bad = ~np.isfinite(np.asarray(tables[name].obsm[Key.TILE_FEATURES])).all(axis=1)
            if bad.any():
                bad_parts.append(f"table {name!r} `.obsm['{Key.TILE_FEATURES}']` in {int(bad.sum())} tiles")
    if bad_parts:
        msg = (
            f"{where} has non-finite image features: {'; '.join(bad_parts)}. One such row would make every "
            "prediction NaN; extract the features again for those sections (`asign.pp.extract_features`), or drop the "
            "spots."
        )
        raise ValueError(msg)


def sample_tensors(
    ctx: ImputeContext,
    *,
    levels: str,
    feature_key: str | None = Key.ADDED,
    graph_key: str = Key.ADDED,
    tile_targets: bool = True,
    labelled: np.ndarray | None = None,
    min_tile_fraction: float = 1.0,
    tile_radius: float = 2.1,
    tile_max_neighbors: int = 12,
    views: bool = False,
) -> SampleTensors:
    """The plain tensors of one stack.

    Parameters
    ----------
    ctx
        The stack's context; its ``Y`` (NaN outside ``known``) is the only source of spot labels.
    levels
        ``"spot_region_global"`` (needs :func:`asign.pp.extract_features`' tile tables) or ``"spot"``.
    feature_key
        Prefix of ``obsm['{feature_key}_features_<level>']``, ``obs['{feature_key}_region']`` and the tile tables;
        `None`: no image features (the spot feature tensor has width 0; ``levels`` must be ``"spot"``).
    graph_key
        Prefix of ``obsp['{graph_key}_connectivities']`` (:func:`asign.pp.neighbors_3d`).
    tile_targets
        Compute region/global targets (training only): raw counts of the labelled rows (never any other row) of
        the stack's count matrix for the modelled genes, summed per tile, then normalised (method.md §2.4).
    labelled
        Rows whose labels the tensors may carry (default ``ctx.known``); must be a subset of ``ctx.known``.
    min_tile_fraction
        A tile target needs at least this fraction of labelled members (see :func:`asign._model.tile_targets`).
    tile_radius, tile_max_neighbors
        Within-section tile graph (method.md §4.3).
    views
        Also load the per-view features of ``pp.extract_features(keep_views=True)`` where they are stored
        (``obsm['{feature_key}_features_spot_views']``, the tile tables' ``obsm['features_views']``), for train-time
        view augmentation (``ASIGNConfig.view_augment``) and view-averaged prediction (``ASIGNConfig.predict_views``).
    """
    import torch

    from asign._model import SampleTensors, edges_from_sparse, tile_graph
    from asign._model import tile_targets as _tile_targets
    from asign.pp._genes import counts_block

    table = ctx.table
    labelled = ctx.known if labelled is None else np.asarray(labelled, dtype=bool)
    if (labelled & ~ctx.known).any():
        msg = "sample_tensors: `labelled` must be a subset of the known spots."
        raise ValueError(msg)
    check_sample_inputs(
        table, ctx.sdata.tables, ctx.table_key, ctx.sample, levels=levels, feature_key=feature_key, graph_key=graph_key
    )
    if feature_key is None:
        x_spot = np.zeros((table.n_obs, 0), dtype=np.float32)
    else:  # a copy: the array may be read-only (zarr-backed, or memory-mapped by joblib in a worker process)
        x_spot = np.array(table.obsm[Key.features(feature_key, "spot")], dtype=np.float32)
    view_kw: dict[str, Any] = {}
    vkey = None if feature_key is None else Key.views(Key.features(feature_key, "spot"))
    if views and vkey is not None and vkey in table.obsm:
        view_kw["x_spot_views"] = torch.from_numpy(np.array(table.obsm[vkey], dtype=np.float32))
    ckey = Key.connectivities(graph_key)
    codes = np.asarray(ctx.section_codes, dtype=np.int64)
    edge_index, edge_weight, edge_cross = edges_from_sparse(table.obsp[ckey], codes)
    y = np.where(labelled[:, None], ctx.Y, np.nan).astype(np.float32)
    kw: dict[str, Any] = {}
    if levels == "spot_region_global":
        rkey, gkey = f"{feature_key}_regions", f"{feature_key}_globals"
        ri_key, gi_key = f"{feature_key}_region", f"{feature_key}_global"
        regions, globals_ = ctx.sdata.tables[rkey], ctx.sdata.tables[gkey]
        spot_region = table.obs[ri_key].to_numpy(dtype=np.int64)
        spot_global = table.obs[gi_key].to_numpy(dtype=np.int64)
        region_global = regions.obs[gi_key].to_numpy(dtype=np.int64)
        r_codes, g_codes = _tile_codes(regions, ctx.stack), _tile_codes(globals_, ctx.stack)
        rei, rew = tile_graph(
            regions.obs["tile_col"].to_numpy(),
            regions.obs["tile_row"].to_numpy(),
            r_codes,
            radius=tile_radius,
            max_neighbors=tile_max_neighbors,
        )
        gei, gew = tile_graph(
            globals_.obs["tile_col"].to_numpy(),
            globals_.obs["tile_row"].to_numpy(),
            g_codes,
            radius=tile_radius,
            max_neighbors=tile_max_neighbors,
        )
        n_r, n_g, g = regions.n_obs, globals_.n_obs, len(ctx.genes)
        y_r, y_g = np.full((n_r, g), np.nan), np.full((n_g, g), np.nan)
        if tile_targets and labelled.any():
            rows = np.flatnonzero(labelled)
            # the only read of raw counts: the labelled rows, modelled genes (method.md §2.4)
            block, total = counts_block(ctx.sdata.tables[ctx.table_key], rows, ctx.genes)
            lib = total if ctx.normalization == "log1p" else None
            y_r = _tile_targets(
                block, labelled, spot_region, n_r, scale=ctx.normalization, library=lib, min_fraction=min_tile_fraction
            )
            y_g = _tile_targets(
                block, labelled, spot_global, n_g, scale=ctx.normalization, library=lib, min_fraction=min_tile_fraction
            )
        kw = {
            # copies: the tile tables' arrays may be read-only (zarr-backed or memory-mapped in a worker process)
            "x_region": torch.from_numpy(np.array(regions.obsm[Key.TILE_FEATURES], dtype=np.float32)),
            "x_global": torch.from_numpy(np.array(globals_.obsm[Key.TILE_FEATURES], dtype=np.float32)),
            "spot_region": torch.as_tensor(spot_region),
            "spot_global": torch.as_tensor(spot_global),
            "region_global": torch.as_tensor(region_global),
            "region_edge_index": rei,
            "region_edge_weight": rew,
            "global_edge_index": gei,
            "global_edge_weight": gew,
            "y_region": torch.as_tensor(y_r, dtype=torch.float32),
            "y_global": torch.as_tensor(y_g, dtype=torch.float32),
        }
        tv = Key.views(Key.TILE_FEATURES)
        if view_kw and tv in regions.obsm and tv in globals_.obsm:
            view_kw["x_region_views"] = torch.from_numpy(np.array(regions.obsm[tv], dtype=np.float32))
            view_kw["x_global_views"] = torch.from_numpy(np.array(globals_.obsm[tv], dtype=np.float32))
    return SampleTensors(
        x_spot=torch.as_tensor(x_spot),
        edge_index=edge_index,
        edge_weight=edge_weight,
        edge_cross=edge_cross,
        section=torch.as_tensor(codes),
        y=torch.as_tensor(y),
        name=ctx.sample or "sample",
        **kw,
        **view_kw,
    )


# ---------------------------------------------------------------------------------------------------- fit
def tensor_options(cfg: ASIGNConfig, opts: dict[str, Any]) -> dict[str, Any]:
    """The keyword arguments of :func:`sample_tensors` that the configuration and data options fix."""
    return {
        "levels": cfg.levels,
        "feature_key": opts["feature_key"],
        "graph_key": opts["graph_key"],
        "tile_radius": opts["tile_radius"],
        "tile_max_neighbors": opts["tile_max_neighbors"],
    }


def _holdout(labelled: np.ndarray, fraction: float, rng: np.random.Generator) -> np.ndarray:
    idx = np.flatnonzero(labelled)
    n = int(round(fraction * idx.size))
    out = np.zeros(labelled.size, dtype=bool)
    if n >= 2 and idx.size - n >= 2:
        out[rng.choice(idx, size=n, replace=False)] = True
    return out


def _sample_split(ctx: ImputeContext) -> tuple[np.ndarray, np.ndarray]:
    """Visible and scored rows of a validation sample: its first labelled section visible, its other labels scored."""
    codes = np.asarray(ctx.section_codes)
    if not ctx.known.any():
        return ctx.known.copy(), ctx.known.copy()
    vis = ctx.known & (codes == codes[ctx.known].min())
    return vis, ctx.known & ~vis


def _validation_sample(contexts: list[ImputeContext]) -> int | None:
    """Index of the last training sample that can validate by section (``validation="sample"``), or `None`.

    Its labelled spots outside its first labelled section must give a score: a section with at least two of them and
    a gene that varies there (the per-gene PCC of these training labels with themselves is finite).
    """
    from asign._model import per_gene_pcc

    for i in range(len(contexts) - 1, -1, -1):
        c = contexts[i]
        _, rows = _sample_split(c)
        if rows.any():
            y, codes = c.Y[rows], np.asarray(c.section_codes)[rows]
            if np.isfinite(per_gene_pcc(y, y, codes)):
                return i
    return None


def _member_data(
    contexts: list[ImputeContext], cfg: ASIGNConfig, tkw: dict[str, Any], mode_val: str
) -> tuple[list[SampleTensors], list[Any]]:
    """Training samples and validation sets of one ensemble member (its hold-out split is drawn from its seed)."""
    import torch

    from asign._model import ValidationSet

    rng = np.random.default_rng(cfg.seed)
    validation: list[ValidationSet] = []
    train: list[SampleTensors] = []
    if mode_val == "sample":
        # the last training sample validates (fit_contexts puts one that can last): its first labelled section
        # visible, the others scored
        val_ctx = contexts[-1]
        vis, rows = _sample_split(val_ctx)
        vs = sample_tensors(val_ctx, labelled=vis, tile_targets=False, **tkw)
        validation.append(
            ValidationSet(
                sample=vs,
                y_eval=torch.as_tensor(np.nan_to_num(val_ctx.Y).astype(np.float32)),
                eval_rows=torch.as_tensor(rows),
            )
        )
        train = [sample_tensors(c, views=cfg.view_augment, **tkw) for c in contexts[:-1]]
        return train, validation
    for c in contexts:
        ho = _holdout(c.known, cfg.holdout_fraction, rng) if mode_val == "holdout" else np.zeros_like(c.known)
        if mode_val == "holdout" and not ho.any():
            logger.warning(
                f"validation='holdout': {int(c.known.sum())} known spots of sample {c.sample!r} are too few to hold "
                f"out {cfg.holdout_fraction:g} of them (at least 2 held out and 2 kept); training runs without early "
                f"stopping, for max_epochs={cfg.max_epochs}."
            )
        s = sample_tensors(
            c, labelled=c.known & ~ho, min_tile_fraction=0.5 if ho.any() else 1.0, views=cfg.view_augment, **tkw
        )
        train.append(s)
        if ho.any():
            validation.append(
                ValidationSet(
                    sample=s,
                    y_eval=torch.as_tensor(np.nan_to_num(c.Y).astype(np.float32)),
                    eval_rows=torch.as_tensor(ho),
                )
            )
    return train, validation


def _resolve_n_jobs(n_jobs: Any, *, n_models: int, device: Any) -> int:
    """Worker processes for the ensemble members: ``"auto"`` = one per member up to the usable CPU cores (CPU only)."""
    import os

    if n_models == 1 or getattr(device, "type", str(device)) != "cpu":
        return 1
    if n_jobs == "auto":
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
        return max(1, min(n_models, cores))
    if isinstance(n_jobs, bool) or not isinstance(n_jobs, int | np.integer) or n_jobs < 1:
        msg = f"n_jobs={n_jobs!r} must be 'auto' or a positive integer."
        raise ValueError(msg)
    return min(int(n_jobs), n_models)


# ------------------------------------------------------------------------------- encoder fine-tuning (issue 6)
def _context_patches(ctx: ImputeContext, feature_key: str, input_size: int) -> torch.Tensor:
    """The uint8 spot patches ``(N, 3, s, s)`` of one stack, cut like :func:`asign.pp.extract_features` cut them."""
    from asign._model._finetune import read_spot_patches
    from asign.pp._tiles import image_level0

    uns = _features_uns(ctx.table, feature_key)
    images = [
        None if k is None else image_level0(ctx.sdata.images[k]).transpose("c", "y", "x").data
        for k in ctx.stack.image_keys
    ]
    xy = np.asarray(ctx.table.obsm[Key.SPATIAL], dtype=np.float64)
    sides = [int(v) for v in uns["scales_px"]["spot"]]
    return read_spot_patches(images, np.asarray(ctx.section_codes), xy, sides, input_size=int(input_size))


def _features_uns(table, feature_key: str | None) -> dict[str, Any]:
    key = f"{feature_key}_features"
    if feature_key is None or key not in table.uns:
        msg = (
            f"finetune_encoder=True needs the spot patch sizes of `asign.pp.extract_features` (`.uns['{key}']`); "
            "run it first (and keep feature_key)."
        )
        raise KeyError(msg)
    return table.uns[key]


def _finetune_setup(contexts: list[ImputeContext], cfg: ASIGNConfig, opts: dict[str, Any]) -> dict[str, Any] | None:
    """Encoder source, weights, input size and every context's spot patches (read once), or `None`."""
    if not cfg.finetune_encoder:
        return None
    from asign._encoders import ENCODERS, available_encoders

    uns = _features_uns(contexts[0].table, opts["feature_key"])
    encoder = opts["encoder"] if not isinstance(opts["encoder"], str) or opts["encoder"] else str(uns["encoder"])
    if isinstance(encoder, str) and encoder not in ENCODERS and not encoder.startswith("timm:"):
        if opts["encoder"]:  # a name given (split_params refuses it before any work; kept for direct callers)
            msg = (
                f"finetune_encoder=True with encoder={encoder!r}, which is not in the encoder registry; available: "
                f"{available_encoders()} or a torch.nn.Module."
            )
        else:
            msg = (
                f"finetune_encoder=True without `encoder`: the features were extracted with {encoder!r}, which is not "
                f"in the encoder registry (available: {available_encoders()}); pass method_kwargs / config "
                "{'encoder': <registry name or torch.nn.Module>}."
            )
        raise ValueError(msg)
    weights = opts["encoder_weights"] or ("random" if str(uns.get("weights", "")) == "random" else None)
    size = int(opts["encoder_input_size"]) or int(uns.get("input_size", 0))
    if size <= 0:
        sides = {int(v) for v in uns["scales_px"]["spot"]}
        if len(sides) != 1:
            msg = f"Spot patches have different native sizes {sorted(sides)}; pass encoder_input_size=<pixels>."
            raise ValueError(msg)
        size = sides.pop()
    logger.info(f"Reading the spot patches of {len(contexts)} sample(s) at {size} px for encoder fine-tuning.")
    patches = [_context_patches(c, opts["feature_key"], size) for c in contexts]
    return {"encoder": encoder, "weights": weights, "input_size": size, "patches": patches}


def _attach_patches(
    contexts: list[ImputeContext],
    train: list[SampleTensors],
    validation: list[Any],
    mode_val: str,
    ft: dict[str, Any],
) -> tuple[list[SampleTensors], list[Any]]:
    """The member's samples with their contexts' spot patches (read once in :func:`_finetune_setup`)."""
    from asign._model._member import replace_samples

    index = {id(s): i for i, s in enumerate(train)}  # train[i] is contexts[i] in every validation mode
    if mode_val == "sample":
        index[id(validation[0].sample)] = len(contexts) - 1
    return replace_samples(train, validation, lambda s: s.replace(patches=ft["patches"][index[id(s)]]))


def _train_member(
    contexts: list[ImputeContext],
    cfg: ASIGNConfig,
    tkw: dict[str, Any],
    mode_val: str,
    n_genes: int,
    device: str,
    *,
    show_progress_bar: bool,
    n_threads: int | None = None,
    finetune: dict[str, Any] | None = None,
) -> tuple[dict[str, int], dict[str, Any], dict[str, Any]]:
    """Train one ensemble member; top-level so that a worker process can run it.

    Prepares the member's samples (its hold-out split drawn from ``cfg.seed``) and trains them with
    :func:`asign._model._member.train_member`. Returns the feature widths, the trained weights (CPU state dict) and
    the training record. The result depends only on the inputs and ``cfg.seed`` (and on the thread count only through
    floating-point summation order).
    """
    import torch

    from asign._model._member import train_member

    if n_threads is not None:  # in a worker process
        torch.set_num_threads(int(n_threads))
    t0 = time.perf_counter()
    train, validation = _member_data(contexts, cfg, tkw, mode_val)
    spec = None
    if finetune is not None:
        train, validation = _attach_patches(contexts, train, validation, mode_val, finetune)
        spec = {k: finetune[k] for k in ("encoder", "weights", "input_size")}
    t_data = time.perf_counter() - t0
    dims, state, rec = train_member(
        train, validation, cfg, n_genes, device, finetune=spec, show_progress_bar=show_progress_bar
    )
    rec["seconds_setup"] = float(rec["seconds_setup"] + t_data)
    return dims, state, rec


def fit_contexts(
    contexts: list[ImputeContext],
    *,
    params: dict[str, Any],
    seed: int,
    device: Any,
    show_progress_bar: bool,
    transductive: bool,
) -> ASIGNFit:
    """Train fresh model(s) (seeded by ``seed``) on labelled contexts; return the fitted model object.

    With ``n_models = K > 1`` an ensemble of K independently initialised members is trained, each with its own seed
    (spawned from ``seed``) and, for hold-out validation, its own hold-out split; predictions are averaged.

    ``validation="auto"`` with several contexts validates on a sample (its first labelled section visible, its other
    labelled sections scored): the last context whose labels outside its first labelled section can be scored (see
    :func:`_validation_sample`). When none can, e.g. every sample labelled in one section only, it falls back to
    ``"holdout"`` with a warning, so early stopping never watches a score that is NaN by construction.
    """
    import copy

    import torch

    from asign._device import resolve_device, spawn_seeds
    from asign._model._member import rebuild_member

    from ._fit import ASIGNFit

    cfg, opts = split_params(params, seed=seed, transductive=transductive)
    n_models = opts["n_models"]
    _check_enough_known(contexts, transductive=transductive)
    tkw = tensor_options(cfg, opts)
    for c in contexts:  # missing features, tile tables or graph: fail before any work or logging
        check_sample_inputs(c.table, c.sdata.tables, c.table_key, c.sample, **tkw)
    dev = resolve_device(device)
    genes = list(contexts[0].genes)
    for c in contexts[1:]:
        if list(c.genes) != genes or c.normalization != contexts[0].normalization:
            msg = "All training samples must share the modelled genes and the normalisation."
            raise ValueError(msg)
    if opts["feature_key"] is not None:
        from asign.pp._features import common_feature_space

        opts["feature_space"] = common_feature_space(contexts, opts["feature_key"], method="asign")
        _check_training_feature_widths(contexts, opts["feature_key"], cfg.levels)
    names = [c.sample or f"sample_{i}" for i, c in enumerate(contexts)]
    mode_val = opts["validation"]
    if mode_val == "auto":
        mode_val = "sample" if len(contexts) >= 2 else "holdout"
    val_sample = ""
    if mode_val == "sample":
        v = _validation_sample(contexts)
        if v is None:
            logger.warning(
                f"validation='auto': no training sample among {names} has labels in a second section to score "
                "(each is labelled in one section only, or its other labelled sections have fewer than 2 spots or no "
                f"varying gene), so none can validate by section; early stopping uses a held-out fraction "
                f"{cfg.holdout_fraction:g} of every sample's labelled spots instead (validation='holdout')."
            )
            mode_val = "holdout"
        else:
            if v != len(contexts) - 1:
                logger.warning(
                    f"validation='auto': the last training sample {names[-1]!r} has no labels in a second section to "
                    f"score; sample {names[v]!r} validates instead (its first labelled section visible, the others "
                    "scored)."
                )
                contexts = [c for i, c in enumerate(contexts) if i != v] + [contexts[v]]
            val_sample = names[v]
    seeds = [int(cfg.seed)] if n_models == 1 else spawn_seeds(int(cfg.seed), n_models)
    n_jobs = _resolve_n_jobs(opts["n_jobs"], n_models=n_models, device=dev)
    logger.info(
        f"Training ASIGN ({'transductive' if transductive else 'inductive'}; d={cfg.hidden_dim}, "
        f"levels={cfg.levels!r}" + (f", ensemble of {n_models}" if n_models > 1 else "") + f") on {len(contexts)} "
        f"sample(s), {int(sum(int(np.sum(c.known)) for c in contexts))} labelled spots, validation={mode_val!r}, "
        f"device={dev}" + (f", {n_jobs} worker processes" if n_jobs > 1 else "") + "."
    )
    t_all = time.perf_counter()
    ft = _finetune_setup(contexts, cfg, opts)
    enc_src = ft["encoder"] if ft is not None else opts["encoder"]
    opts["encoder"] = enc_src if isinstance(enc_src, str) else type(enc_src).__name__  # plain, for uns
    jobs = [(contexts, cfg.replace(seed=s), tkw, mode_val, len(genes), str(dev)) for s in seeds]
    if n_jobs > 1:
        from joblib import Parallel, delayed

        threads = max(1, torch.get_num_threads() // n_jobs)
        results = Parallel(n_jobs=n_jobs, backend="loky")(
            delayed(_train_member)(*job, show_progress_bar=False, n_threads=threads, finetune=ft) for job in jobs
        )
    else:
        results = [_train_member(*job, show_progress_bar=show_progress_bar, finetune=ft) for job in jobs]
    models, members = [], []
    for (_, mcfg, *_rest), (dims, state, rec) in zip(jobs, results, strict=True):
        # a fine-tuned user module: each member gets its own copy of the architecture
        module = None if ft is None or isinstance(ft["encoder"], str) else copy.deepcopy(ft["encoder"])
        models.append(rebuild_member(len(genes), dims, mcfg, state, rec, module=module))
        members.append(rec)
    logger.info(f"ASIGN has {models[0].n_parameters():,} parameters per member.")
    training = dict(members[0])
    training["validation"] = mode_val
    training["validation_sample"] = val_sample
    training["n_models"] = n_models
    training["seconds_all_members"] = float(time.perf_counter() - t_all)
    if n_models > 1:
        training["members"] = {
            k: [m[k] for m in members] for k in ("seed", "best_epoch", "best_score", "epochs_run", "seconds")
        }
        # every member's curve (the top-level ``curve`` is member 1's): members stop at different epochs
        training["member_curves"] = {f"member_{i + 1}": m["curve"] for i, m in enumerate(members)}
    return ASIGNFit(
        models=models,
        config=cfg,
        genes=genes,
        normalization=contexts[0].normalization,
        options=dict(opts),
        training=training,
        mode="transductive" if transductive else "inductive",
        train_samples=names,
    )


def _check_enough_known(contexts: list[ImputeContext], *, transductive: bool) -> None:
    """A ValueError naming the sample, its known sections and count when it has fewer than 2 known spots.

    A masked training step needs a visible spot and a hidden one in its loss set.
    """
    for i, c in enumerate(contexts):
        n = int(np.sum(c.known))
        if n >= 2:
            continue
        if transductive:
            who, fix = "the sample to impute" + (f" {c.sample!r}" if c.sample else ""), " or train on other samples"
        else:
            who, fix = f"training sample {c.sample or f'sample_{i}'!r}", ""
        msg = (
            f"method 'asign': {who} has {n} known spot(s) (section(s) {c.known_sections()}); training needs at least 2 "
            f"(one visible, one hidden in the loss of each step). Give more known spots{fix}."
        )
        raise ValueError(msg)


def _fit(fctx: FitContext) -> ASIGNFit:
    return fit_contexts(
        fctx.train,
        params=fctx.params,
        seed=fctx.seed,
        device=fctx.device,
        show_progress_bar=fctx.show_progress_bar,
        transductive=False,
    )


# ------------------------------------------------------------------------------------------------ predict
def predict_context(fitted: ASIGNFit, ctx: ImputeContext, *, device: Any = None) -> tuple[dict[str, np.ndarray], int]:
    """Deterministic inference on one stack: the known spots are the visible set; no counts are read.

    An ensemble's outputs are averaged over its members. Returns the outputs and the number of feature views they
    were averaged over (0: one pass on the mean features).
    """
    from asign._device import resolve_device
    from asign._model import predict_sample
    from asign._model._data import n_views

    if list(ctx.genes) != list(fitted.genes):
        msg = (
            f"The model was trained on {len(fitted.genes)} genes that differ from the {len(ctx.genes)} requested; "
            "predict with genes=model.genes."
        )
        raise ValueError(msg)
    if ctx.normalization != fitted.normalization:
        msg = f"The model was trained on normalization={fitted.normalization!r}, not {ctx.normalization!r}."
        raise ValueError(msg)
    if fitted.options.get("feature_space") and fitted.options["feature_key"] is not None:
        from asign.pp._features import check_feature_space

        check_feature_space(
            fitted.options["feature_space"], ctx.table, fitted.options["feature_key"], method="asign", sample=ctx.sample
        )
    views = fitted.config.predict_views
    s = sample_tensors(ctx, tile_targets=False, views=views, **tensor_options(fitted.config, fitted.options))
    from asign._model._finetune import spot_encoder
    from asign._model._member import feature_dims

    enc = spot_encoder(fitted.model)
    if enc is not None:  # fine-tuned encoder: spot features from the patches (computed in predict_sample)
        import torch

        patches = _context_patches(ctx, fitted.options["feature_key"], enc.input_size)
        s = s.replace(patches=patches, x_spot=torch.zeros((s.n_spots, enc.dim)), x_spot_views=None)
    dims = feature_dims(s)
    if dims != fitted.model.feature_dims:
        msg = f"Feature widths {dims} differ from the model's {fitted.model.feature_dims}; use the same encoder."
        raise ValueError(msg)
    dev = resolve_device(device)
    outs = [predict_sample(m, s, device=dev, amp=fitted.config.amp, views=views) for m in fitted.models]
    return {k: np.mean([o[k] for o in outs], axis=0) for k in outs[0]}, (n_views(s) if views else 0)


def check_nearest_blend(w: Any) -> float:
    """A weight in [0, 1] for :func:`aligned_nearest`, else a ValueError."""
    if isinstance(w, bool) or not isinstance(w, int | float | np.integer | np.floating) or not 0.0 <= float(w) <= 1.0:
        msg = f"nearest_blend={w!r} must be a number in [0, 1] (0: no blend)."
        raise ValueError(msg)
    return float(w)


def aligned_nearest(ctx: ImputeContext, *, k: int = 8) -> np.ndarray:
    """The ``"nearest"`` baseline's prediction (``k``-IDW of the known spots in ``obsm['spatial_aligned']``)."""
    from ._baselines import idw_nearest

    coords = np.asarray(ctx.table.obsm[Key.SPATIAL_ALIGNED], dtype=np.float64)
    return idw_nearest(coords, ctx.Y, ctx.known, k=k)[0]


def _check_blend_coordinates(table: AnnData, w: float, table_key: str) -> None:
    if w <= 0:
        return
    if Key.SPATIAL_ALIGNED not in table.obsm:
        msg = (
            f"nearest_blend={w} needs `obsm['{Key.SPATIAL_ALIGNED}']` in table {table_key!r}; run "
            "`asign.pp.align_layers` first, or leave nearest_blend at 0."
        )
        raise KeyError(msg)
    coords = np.asarray(table.obsm[Key.SPATIAL_ALIGNED], dtype=np.float64)
    bad = ~np.isfinite(coords).all(axis=1)
    if bad.any():
        where = sorted(set(table.obs[Key.SECTION].astype(str).to_numpy()[bad])) if Key.SECTION in table.obs else []
        msg = (
            f"nearest_blend={w} needs finite `obsm['{Key.SPATIAL_ALIGNED}']` in table {table_key!r}, but "
            f"{int(bad.sum())} spots have none (section(s) {where}: `asign.pp.align_layers` could not place them); "
            "align them, leave them out of the stack (a section without an image cannot be aligned; e.g. "
            "`asign.datasets.her2st(..., sections=[...])`), or pass nearest_blend=0."
        )
        raise ValueError(msg)


def _blend_weight(params: dict, model_options: dict | None = None, *, transductive: bool = False) -> float:
    """The ``nearest_blend`` weight to apply.

    ``method_kwargs`` (tl.predict's override) first, then a trained model's option (0 for models saved before the
    option existed), then the default of the mode.
    """
    if model_options is None:
        default = _option_defaults(params, transductive=transductive)["nearest_blend"]
    else:
        default = model_options.get("nearest_blend", 0.0)
    return check_nearest_blend(params.get("nearest_blend", default))


def _check_sample_to_impute(
    table: AnnData,
    params: dict,
    table_key: str,
    *,
    train: Sequence[tuple[str, AnnData]] = (),
    sample: str = "",
    sdata: SpatialData | None = None,
) -> None:
    """The inputs of a sample to impute (:func:`check_sample_inputs`) and its blend coordinates, before any training.

    With ``train`` (``(name, spot table)`` of the training samples) its features must also have the training samples'
    widths and feature space (:func:`asign.pp._features.feature_space_id`). Without ``sdata`` (the stack, for its tile
    tables) the tile tables are left to the checks of training and prediction.
    """
    cfg, opts = split_params(params, seed=0, transductive=not train)  # bad options first: they need no data
    check_sample_inputs(table, None if sdata is None else sdata.tables, table_key, sample, **tensor_options(cfg, opts))
    if opts["feature_key"] is not None:
        _check_same_features(table, train, opts["feature_key"], cfg.levels, sample=sample)
    # without training samples the check runs before a transductive fit: that mode's blend default applies
    _check_blend_coordinates(table, _blend_weight(params, transductive=not train), table_key)


def _feature_width_difference(
    table: AnnData, others: Sequence[tuple[str, AnnData]], feature_key: str, levels: str
) -> tuple[str, str, int, int] | None:
    """The first feature array of ``table`` whose width differs from that of one of ``others``, or `None`.

    ``others`` are ``(name, spot table)`` pairs; the arrays are those of the model's ``levels``. Returns ``(name, obsm
    key, width in table, width in the other)``. Keys that a table lacks are skipped (:func:`check_sample_inputs`
    names them).
    """
    for name, t in others:
        for k in _feature_keys(feature_key, levels):
            if k in table.obsm and k in t.obsm and (w := np.shape(table.obsm[k])[1]) != (w2 := np.shape(t.obsm[k])[1]):
                return name, k, int(w), int(w2)
    return None


def _check_training_feature_widths(contexts: Sequence[ImputeContext], feature_key: str, levels: str) -> None:
    """A ValueError naming two training samples, the ``obsm`` key and the widths when their features differ in width.

    One model has one input width per level; without this the first training step would fail inside torch.
    """
    names = [c.sample or f"sample_{i}" for i, c in enumerate(contexts)]
    first = [(names[0], contexts[0].table)]
    for name, c in zip(names[1:], contexts[1:], strict=True):
        if diff := _feature_width_difference(c.table, first, feature_key, levels):
            _, k, w, w0 = diff
            msg = (
                f"method 'asign': training samples {names[0]!r} and {name!r} have features of different widths in "
                f"`.obsm['{k}']` ({w0} and {w} columns); one model cannot be trained on both. Extract every sample's "
                f"features with the same encoder and options (`asign.pp.extract_features(sdata, key_added="
                f"{feature_key!r})`), then build its graph again (`asign.pp.neighbors_3d`)."
            )
            raise ValueError(msg)


def _check_same_features(
    table: AnnData, train: Sequence[tuple[str, AnnData]], feature_key: str, levels: str, *, sample: str
) -> None:
    """A ValueError naming the samples when the features of the sample to impute differ from a training sample's."""
    from asign.pp._features import feature_space_difference, feature_space_id

    who = "the sample to impute" + (f" {sample!r}" if sample else "")
    space = feature_space_id(table, feature_key)
    for name, t in train:
        if diff := _feature_width_difference(table, [(name, t)], feature_key, levels):
            _, k, w, w_train = diff
            msg = (
                f"method 'asign': {who} has {w} feature columns in `.obsm['{k}']`, training sample {name!r} has "
                f"{w_train}; the model could not be applied to it. Extract every sample's features with the same "
                f"encoder and options (`asign.pp.extract_features(sdata, key_added={feature_key!r})`)."
            )
            raise ValueError(msg)
        if diff := feature_space_difference(feature_space_id(t, feature_key), space):
            msg = (
                f"method 'asign': the features of {who} differ from those "
                f"of training sample {name!r} ({'; '.join(diff)}); extract every sample's features with the same "
                "options."
            )
            raise ValueError(msg)


@register_method("asign", fit=_fit, check=_check_sample_to_impute)
def impute_asign(ctx: ImputeContext) -> ImputeResult:
    """ASIGN: network prediction mixed per gene with cross-layer label propagation (see the module docstring)."""
    from ._fit import ASIGNFit

    t0 = time.perf_counter()
    fitted = ctx.fitted
    if fitted is not None and not isinstance(fitted, ASIGNFit):
        msg = f"ctx.fitted must be an ASIGNFit, got {type(fitted).__name__}."
        raise TypeError(msg)
    # the post-processing (blend weight, and gene rank below) as _blend_weight resolves it; the blend before any
    # training, so that bad blend input fails first
    w = _blend_weight(ctx.params, None if fitted is None else fitted.options, transductive=fitted is None)
    _check_blend_coordinates(ctx.table, w, ctx.table_key)
    if fitted is None:
        fitted = fit_contexts(
            [ctx],
            params=ctx.params,
            seed=ctx.seed,
            device=ctx.device,
            show_progress_bar=ctx.show_progress_bar,
            transductive=True,
        )
    out, n_views_predicted = predict_context(fitted, ctx, device=ctx.device)
    extra = {Key.NETWORK: out["net"]}
    if "lp" in out:
        extra["propagation"] = out["lp"]
    uns = fitted.summary()
    uns["predicted_over_views"] = int(n_views_predicted)
    pred = out["pred"]
    if w > 0:  # blended before the projection (which is linear: the same as blending the projected predictions)
        extra["nearest"] = aligned_nearest(ctx)
        pred = (1.0 - w) * pred + w * extra["nearest"]
    uns["nearest_blend"] = w
    rank = check_gene_rank(ctx.params["gene_rank"]) if "gene_rank" in ctx.params else fitted.options.get("gene_rank")
    res = project_result(ctx, ImputeResult(imputed=pred, extra_layers=extra, uns=uns), rank)
    res.uns["seconds_total"] = float(time.perf_counter() - t0)
    return res
