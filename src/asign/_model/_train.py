"""Training and inference loops (``method.md`` §6): masking, optimiser, early stopping, seeded.

Whole-graph steps, or neighbour-sampled subgraph steps when a sample does not fit (:mod:`._sampling`); optional
encoder fine-tuning (:mod:`._finetune`).
"""

from __future__ import annotations

import contextlib
import copy
import math
import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from asign._logging import logger

from ._config import ASIGNConfig
from ._data import SampleTensors, draw_views, has_views, n_views, select_view
from ._finetune import encode_step, encoder_bytes_per_patch, spot_encoder, warn_if_cpu, with_encoded_features
from ._losses import asign_loss
from ._model import ASIGNModel
from ._sampling import (
    NeighbourSampler,
    expected_batches,
    inference_batch_size,
    plan_training,
    predict_batched,
    receptive_hops,
)

Tensor = torch.Tensor


@dataclass
class ValidationSet:
    """A sample used for early stopping.

    ``sample.y`` holds the visible labels only (NaN elsewhere); the score is the per-gene PCC of the prediction on
    ``eval_rows`` against ``y_eval`` (a separate tensor).
    """

    sample: SampleTensors
    y_eval: Tensor
    eval_rows: Tensor


@dataclass
class TrainResult:
    """What training produced besides the weights."""

    curve: list[dict[str, float]] = field(default_factory=list)
    best_epoch: int = -1
    best_score: float = float("nan")
    epochs_run: int = 0
    n_steps: int = 0
    seconds: float = 0.0
    seconds_per_epoch: float = 0.0
    peak_memory_bytes: int = 0
    subgraph: list[bool] = field(default_factory=list)
    memory_estimate_bytes: list[int] = field(default_factory=list)
    memory_limit_bytes: int = 0
    view_augmented: bool = False

    def to_uns(self) -> dict[str, Any]:
        """Zarr-writable summary (curve as arrays)."""
        keys = sorted({k for row in self.curve for k in row})
        curve = {k: np.asarray([row.get(k, np.nan) for row in self.curve], dtype=float) for k in keys}
        return {
            "curve": curve,
            "best_epoch": int(self.best_epoch),
            "best_score": float(self.best_score) if np.isfinite(self.best_score) else float("nan"),
            "epochs_run": int(self.epochs_run),
            "n_steps": int(self.n_steps),
            "seconds": float(self.seconds),
            "seconds_per_epoch": float(self.seconds_per_epoch),
            "peak_memory_bytes": int(self.peak_memory_bytes),
            "subgraph": [bool(v) for v in self.subgraph],
            "memory_estimate_bytes": [int(v) for v in self.memory_estimate_bytes],
            "memory_limit_bytes": int(self.memory_limit_bytes),
            "view_augmented": bool(self.view_augmented),
        }


def make_model(n_genes: int, feature_dims: dict[str, int], config: ASIGNConfig) -> ASIGNModel:
    """A freshly initialised model: the weights depend only on ``config.seed`` (fresh init per fold, defect 9)."""
    state = torch.random.get_rng_state()
    try:
        torch.manual_seed(int(config.seed))
        return ASIGNModel(n_genes, feature_dims, config)
    finally:
        torch.random.set_rng_state(state)


def per_gene_pcc(pred: np.ndarray, target: np.ndarray, groups: np.ndarray) -> float:
    """Mean over groups (sections) of the mean per-gene PCC over the genes that vary in the group.

    Constant predictions count as 0.
    """
    scores = []
    for g in np.unique(groups):
        m = groups == g
        if m.sum() < 2:
            continue
        p, t = pred[m].astype(np.float64), target[m].astype(np.float64)
        t_c, p_c = t - t.mean(0), p - p.mean(0)
        t_sd, p_sd = np.sqrt((t_c**2).sum(0)), np.sqrt((p_c**2).sum(0))
        ok = t_sd > 1e-12
        if not ok.any():
            continue
        r = np.where(p_sd[ok] > 1e-12, (p_c[:, ok] * t_c[:, ok]).sum(0) / (p_sd[ok] * t_sd[ok] + 1e-300), 0.0)
        scores.append(float(r.mean()))
    return float(np.mean(scores)) if scores else float("nan")


def _block_visible(sample: SampleTensors, fraction: float, gen: torch.Generator) -> Tensor:
    """Visible set of ``mask="block"``: contiguous patches of labelled spots, the rest hidden.

    A random labelled spot that is not yet visible becomes visible together with its labelled within-section graph
    neighbours (one hop on the edges of ``sample.edge_index`` that do not cross sections), until ``fraction`` of the
    labelled spots are visible. The hidden spots then lie in contiguous regions away from every visible label, as
    the spots of an unknown section are at prediction; with ``mask="spot"`` every hidden spot has visible neighbours.
    As under ``mask="spot"``, at least one labelled spot stays hidden (a random one, when the last patch covered
    every labelled spot), so that every step has a loss set; a large ``fraction`` (e.g. 0.99) gives steps with few
    hidden spots.
    """
    labelled = sample.labelled
    idx = torch.nonzero(labelled).squeeze(1)
    target = max(1, int(round(fraction * idx.numel())))
    src, dst = sample.edge_index
    within = sample.edge_cross < 0.5
    src, dst = src[within], dst[within]
    visible = torch.zeros_like(labelled)
    order = idx[torch.randperm(idx.numel(), generator=gen).to(idx.device)]
    for centre in order.tolist():
        if int(visible.sum()) >= target:
            break
        if bool(visible[centre]):
            continue
        patch = torch.cat([torch.tensor([centre], device=src.device), dst[src == centre], src[dst == centre]])
        visible[patch] = True
        visible &= labelled
    if idx.numel() >= 2 and bool(visible[idx].all()):
        visible[idx[int(torch.randint(idx.numel(), (1,), generator=gen))]] = False
    return visible


def _draw_mask(sample: SampleTensors, cfg: ASIGNConfig, gen: torch.Generator) -> tuple[Tensor, Tensor]:
    """Visible set and loss set of one step (``method.md`` §6.3)."""
    labelled = sample.labelled
    sec = sample.section
    lab_sections = torch.unique(sec[labelled]).tolist()
    if cfg.mask == "section" and len(lab_sections) >= 2:
        if cfg.known_policy == "first":
            s = min(lab_sections)
        else:
            s = lab_sections[int(torch.randint(len(lab_sections), (1,), generator=gen))]
        visible = labelled & (sec == s)
    elif cfg.mask == "block":
        visible = _block_visible(sample, cfg.visible_fraction, gen)
    else:
        r = torch.rand(sample.n_spots, generator=gen).to(labelled.device)
        visible = labelled & (r < cfg.visible_fraction)
        idx = torch.nonzero(labelled).squeeze(1)
        if idx.numel() >= 2 and not bool(visible.any()):
            visible[idx[int(torch.randint(idx.numel(), (1,), generator=gen))]] = True
        if idx.numel() >= 2 and bool(visible[labelled].all()):
            visible[idx[int(torch.randint(idx.numel(), (1,), generator=gen))]] = False
    return visible, labelled & ~visible


def _lr_lambda(cfg: ASIGNConfig, total_steps: int):
    if cfg.schedule == "poly":
        return lambda it: max(0.0, 1.0 - it / cfg.poly_iters) ** 0.9
    return lambda it: 0.5 * (1.0 + math.cos(math.pi * min(it, total_steps) / max(total_steps, 1)))


def _autocast(device: torch.device, *, enabled: bool):
    return torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=enabled and device.type == "cuda")


@torch.no_grad()
def predict_sample(
    model: ASIGNModel,
    sample: SampleTensors,
    *,
    device: torch.device | str = "cpu",
    amp: bool = True,
    batch_size: int | None = None,
    views: bool = False,
) -> dict[str, np.ndarray]:
    """Deterministic inference: ``model.eval()``, the whole-sample graph, ``sample.y`` as the visible set.

    With a fine-tuned spot encoder the spot features are computed from ``sample.patches``. ``batch_size`` (default:
    :func:`~asign._model._sampling.inference_batch_size`, 0 for samples that fit) switches to exact batched
    inference on full ``L``-hop subgraphs (:func:`~asign._model._sampling.predict_batched`). With ``views`` and
    per-view features in ``sample``, the outputs are averaged over the views (:func:`~asign._model._data.select_view`
    for each view index) instead of computed once from the mean features.
    """
    device = torch.device(device)
    home = next(model.parameters()).device  # a fitted model is kept on the CPU: moved for this call, then back
    model.to(device)
    model.eval()
    try:
        s = sample.to(device)
        bs = inference_batch_size(model, s, device=device) if batch_size is None else int(batch_size)
        n = n_views(s) if views else 0
        outs = []
        with _autocast(device, enabled=amp):
            s = with_encoded_features(model, s)  # once: a fine-tuned encoder's spot features do not depend on the view
            for view in range(max(n, 1)):
                sv = select_view(s, view) if n else s  # one view's features on the device at a time
                out = predict_batched(model, sv, sv.y, batch_size=bs) if 0 < bs < sv.n_spots else model(sv, sv.y)
                outs.append({k: v.float().cpu().numpy() for k, v in out.items()})
    finally:
        model.to(home)
    return {k: np.mean([o[k] for o in outs], axis=0, dtype=np.float64).astype(np.float32) for k in outs[0]}


def evaluate(model: ASIGNModel, val: ValidationSet, *, device: torch.device, amp: bool) -> float:
    """Per-gene PCC of the prediction on the validation rows."""
    pred = predict_sample(model, val.sample, device=device, amp=amp)["pred"]
    rows = val.eval_rows.cpu().numpy()
    return per_gene_pcc(pred[rows], val.y_eval.cpu().numpy()[rows], val.sample.section.cpu().numpy()[rows])


def _optimizer(model: ASIGNModel, cfg: ASIGNConfig) -> tuple[torch.optim.Optimizer, list[Tensor]]:
    """AdamW / SGD over the trainable parameters; a fine-tuned encoder gets its own group with ``encoder_lr``."""
    enc = spot_encoder(model)
    enc_ids = {id(p) for p in enc.parameters()} if enc is not None else set()
    main = [p for p in model.parameters() if p.requires_grad and id(p) not in enc_ids]
    groups: list[dict[str, Any]] = [{"params": main}]
    enc_params = [p for p in enc.parameters() if p.requires_grad] if enc is not None else []
    if enc_params:
        groups.append({"params": enc_params, "lr": cfg.encoder_lr})
    params = main + enc_params
    if cfg.optimizer == "sgd":
        opt: torch.optim.Optimizer = torch.optim.SGD(
            groups, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay
        )
    else:
        opt = torch.optim.AdamW(groups, lr=cfg.lr, weight_decay=cfg.weight_decay, foreach=True)
    return opt, params


@contextlib.contextmanager
def deterministic_algorithms(device: torch.device | str):
    """On the CPU, torch's deterministic algorithms for the duration of the block (the previous mode is restored).

    With several CPU threads some scatter/index-add reductions of the graph layers' backward pass otherwise change in
    the last bits from run to run, and training amplifies that (same seed, predictions differing by ~1e-6). The first
    use in a process costs about a second (torch imports its compiler package) and training runs ~10 % slower, so it
    is only switched on with more than one CPU thread (one thread is deterministic as it is). GPUs are left as they
    are.
    """
    if torch.device(device).type != "cpu" or torch.get_num_threads() == 1:
        yield
        return
    prev, prev_warn = (
        torch.are_deterministic_algorithms_enabled(),
        torch.is_deterministic_algorithms_warn_only_enabled(),
    )
    torch.use_deterministic_algorithms(mode=True, warn_only=True)
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(mode=prev, warn_only=prev_warn)


def train_model(
    model: ASIGNModel,
    train: list[SampleTensors],
    *,
    validation: list[ValidationSet] | None = None,
    device: torch.device | str = "cpu",
    show_progress_bar: bool = True,
) -> TrainResult:
    """Train ``model`` in place on whole-sample graphs, or on neighbour-sampled subgraphs when a sample does not fit.

    Each step processes one training sample with a visible set drawn by the mask (``config.mask``); hidden labels are
    NaN in the tensor the model and the propagation receive, and the loss reads a separate target tensor on the
    hidden labelled rows only; every step has at least one hidden labelled row (a ValueError names the mask options
    if an epoch makes no step). Early stopping (``config.patience``) uses the validation per-gene PCC (the mean over
    the validation sets that give a score); the best epoch's weights are restored, also with ``patience=0`` (which
    runs every epoch). Epochs before the first finite score do not count towards ``patience``. Without validation
    sets, or when no epoch gives a finite score (a warning is logged), the last epoch's weights are kept.

    ``config.subgraph`` decides per sample (``"auto"``: :func:`~asign._model._sampling.plan_training`, whole graph
    when the memory estimate fits ``memory_limit_gb``). On subgraphs a masked step is split into batches of
    ``batch_size`` seed spots (the loss rows, shuffled), each an optimiser step on the induced subgraph of the seeds'
    ``L``-hop neighbourhood (:class:`~asign._model._sampling.NeighbourSampler`); the loss reads the seed rows only.

    With a fine-tuned spot encoder (``model.spot_encoder``, :mod:`asign._model._finetune`) the spot features of each
    step are computed from ``sample.patches``; the loss rows carry gradients into the encoder.

    On the CPU the run uses torch's deterministic algorithms (:func:`deterministic_algorithms`), so the same seed gives
    the same weights whatever the thread count's effect on summation order within one configuration.
    """
    with deterministic_algorithms(device):
        return _train(model, train, validation=validation, device=device, show_progress_bar=show_progress_bar)


def _add_view_consistency(
    model: ASIGNModel,
    s_views: SampleTensors,
    s_step: SampleTensors,
    y_step: Tensor,
    out: dict[str, Tensor],
    loss: Tensor,
    parts: dict[str, float],
    generator: torch.Generator,
) -> tuple[Tensor, dict[str, float]]:
    """``loss`` plus ``view_consistency`` x the mean squared difference of the network outputs of a second view draw.

    Read on the rows whose labels the step does not show (NaN in ``y_step``); no label enters the term. With a
    fine-tuned encoder the spot features of ``s_step`` are kept and only the tile views are drawn again.
    """
    cfg = model.config
    second = draw_views(s_views, generator)
    if spot_encoder(model) is not None:
        second = second.replace(x_spot=s_step.x_spot)
    with _autocast(s_step.x_spot.device, enabled=cfg.amp):
        out2 = model(second, y_step)
    rows = ~torch.isfinite(y_step).all(dim=1)
    if not bool(rows.any()):
        return loss, parts
    term = (out["net"][rows].float() - out2["net"][rows].float()).pow(2).mean()
    parts = {
        **parts,
        "view_consistency": float(term.detach()),
        "total": parts["total"] + cfg.view_consistency * float(term.detach()),
    }
    return loss + cfg.view_consistency * term, parts


def _train(
    model: ASIGNModel,
    train: list[SampleTensors],
    *,
    validation: list[ValidationSet] | None,
    device: torch.device | str,
    show_progress_bar: bool,
) -> TrainResult:
    from tqdm.auto import tqdm

    cfg = model.config
    device = torch.device(device)
    if not train:
        msg = "train_model needs at least one training sample."
        raise ValueError(msg)
    for s in train:
        if int(s.labelled.sum()) < 2:
            msg = f"Training sample {s.name!r} has fewer than 2 labelled spots."
            raise ValueError(msg)
    enc = spot_encoder(model)
    if enc is not None:
        missing = [s.name for s in train if s.patches is None]
        if missing:
            msg = f"The model fine-tunes its spot encoder but training sample(s) {missing} have no patches."
            raise ValueError(msg)
        warn_if_cpu(device)
    model.to(device)
    if enc is not None and device.type == "cuda":
        enc.net.to(memory_format=torch.channels_last)
    train_dev = [s.to(device) for s in train]
    gen = torch.Generator().manual_seed(int(cfg.seed) + 1)
    rng = np.random.default_rng(int(cfg.seed) + 2)
    torch.manual_seed(int(cfg.seed) + 3)  # dropout
    aug_gen = torch.Generator().manual_seed(int(cfg.seed) + 4) if enc is not None and cfg.encoder_augment else None
    views = cfg.view_augment and all(has_views(s) for s in train_dev)
    view_gen = torch.Generator().manual_seed(int(cfg.seed) + 5) if views else None
    if cfg.view_augment and not views and any(has_views(s) for s in train_dev):
        logger.warning("Some training samples carry per-view features and some do not; training on the mean features.")
    res = TrainResult(view_augmented=views)
    if views:
        counts = sorted({n_views(s) for s in train_dev})
        logger.info(f"Training on randomly drawn feature views ({'/'.join(map(str, counts))} per input).")
    # whole graph or subgraphs, per sample (with a fine-tuned encoder the estimate counts its activations too)
    enc_bytes = encoder_bytes_per_patch(enc, device=device) if enc is not None else 0.0
    samplers: list[NeighbourSampler | None] = []
    for s in train_dev:
        n_lab = int(s.labelled.sum())
        plan = plan_training(
            model,
            s,
            device=device,
            encoder_bytes_per_patch=enc_bytes,
            n_encoder_patches=min(n_lab, cfg.encoder_chunk) if cfg.encoder_checkpoint else n_lab,
        )
        res.subgraph.append(plan["subgraph"])
        res.memory_estimate_bytes.append(plan["estimate_bytes"])
        res.memory_limit_bytes = plan["limit_bytes"]
        samplers.append(
            NeighbourSampler(s, hops=receptive_hops(cfg), tile_hops=cfg.gnn_layers, fanout=cfg.fanout)
            if plan["subgraph"]
            else None
        )
        if plan["subgraph"]:
            logger.info(
                f"Sample {s.name!r}: training on subgraphs of {cfg.batch_size} seed spots ({receptive_hops(cfg)} hops"
                + (f", fan-out {cfg.fanout}" if cfg.fanout else "")
                + f"); whole-graph estimate {plan['estimate_bytes'] / 2**30:.2f} GiB, budget "
                f"{plan['limit_bytes'] / 2**30:.2f} GiB."
            )
    opt, params = _optimizer(model, cfg)
    steps_per_epoch = sum(
        cfg.steps_per_epoch * (1 if sm is None else expected_batches(s, cfg))
        for s, sm in zip(train_dev, samplers, strict=True)
    )
    sched = torch.optim.lr_scheduler.LambdaLR(opt, _lr_lambda(cfg, cfg.max_epochs * steps_per_epoch))
    best_state: dict[str, Tensor] | None = None
    bad = 0
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    t0 = time.perf_counter()
    bar = tqdm(range(cfg.max_epochs), desc="ASIGN", disable=not show_progress_bar, leave=False)
    for epoch in bar:
        model.train()
        losses: list[dict[str, float]] = []
        for i in rng.permutation(len(train_dev)):
            s, sampler = train_dev[int(i)], samplers[int(i)]
            for _ in range(cfg.steps_per_epoch):
                visible, loss_rows = _draw_mask(s, cfg, gen)
                if not bool(loss_rows.any()):
                    continue
                y_in = torch.where(visible.unsqueeze(1), s.y, torch.full_like(s.y, float("nan")))
                if sampler is None:
                    steps = iter([(s, y_in, loss_rows)])
                else:
                    steps = sampler.steps(
                        model,
                        y_in,
                        loss_rows,
                        batch_size=cfg.batch_size,
                        generator=gen,
                        local=cfg.seed_order == "local",
                    )
                for s_step, y_step, rows_step in steps:
                    s_views = s_step
                    if view_gen is not None:
                        s_step = draw_views(s_views, view_gen)
                    with _autocast(device, enabled=cfg.amp):
                        if enc is not None:
                            s_step = encode_step(model, s_step, rows_step, generator=aug_gen)
                        out = model(s_step, y_step)
                    loss, parts = asign_loss(
                        out,
                        s_step.y,
                        rows_step,
                        weights=cfg.loss_weights,
                        pcc_axis=cfg.pcc_axis,
                        section=s_step.section,
                        y_region=s_step.y_region,
                        y_global=s_step.y_global,
                        spot_region=s_step.spot_region,
                        spot_global=s_step.spot_global,
                        net_weight=cfg.net_loss_weight,
                    )
                    if view_gen is not None and cfg.view_consistency > 0:
                        loss, parts = _add_view_consistency(model, s_views, s_step, y_step, out, loss, parts, view_gen)
                    if not bool(torch.isfinite(loss)):  # never train on (and keep) NaN weights
                        msg = (
                            f"ASIGN training: the loss on sample {s.name!r} became non-finite at epoch {epoch} "
                            f"(step {res.n_steps}); check the inputs for NaN/inf values, or lower the learning rate."
                        )
                        raise FloatingPointError(msg)
                    opt.zero_grad(set_to_none=True)
                    loss.backward()
                    if cfg.grad_clip > 0:
                        torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip)
                    opt.step()
                    sched.step()
                    res.n_steps += 1
                    losses.append(parts)
        if not losses:  # every step's loss set was empty: the epoch would leave the model untrained, silently
            msg = (
                f"ASIGN training made no step in epoch {epoch}: no masked step left a labelled spot hidden for the "
                f"loss (mask={cfg.mask!r}, visible_fraction={cfg.visible_fraction:g}, "
                f"steps_per_epoch={cfg.steps_per_epoch}); lower visible_fraction."
            )
            raise ValueError(msg)
        row: dict[str, float] = {"epoch": float(epoch)}
        for k in sorted({k for p in losses for k in p}):
            row[f"loss_{k}"] = float(np.mean([p[k] for p in losses if k in p]))
        row["lr"] = float(sched.get_last_lr()[0])
        if validation:
            scores = [evaluate(model, v, device=device, amp=cfg.amp) for v in validation]
            finite = [v for v in scores if np.isfinite(v)]
            score = float(np.mean(finite)) if finite else float("nan")
            row["val_pcc"] = score
            if np.isfinite(score) and (best_state is None or score > res.best_score + 1e-6):
                res.best_score, res.best_epoch = score, epoch
                best_state = copy.deepcopy({k: v.detach().clone() for k, v in model.state_dict().items()})
                bad = 0
            elif best_state is not None:  # no score yet (NaN) is no reason to stop
                bad += 1
        res.curve.append(row)
        res.epochs_run = epoch + 1
        bar.set_postfix(
            loss=f"{row.get('loss_total', float('nan')):.4f}", val=f"{row.get('val_pcc', float('nan')):.4f}"
        )
        if validation and cfg.patience > 0 and epoch + 1 >= cfg.min_epochs and bad >= cfg.patience:
            logger.debug(f"Early stopping at epoch {epoch} (best {res.best_epoch}: {res.best_score:.4f}).")
            break
    bar.close()
    if best_state is not None:
        model.load_state_dict(best_state)
    else:
        if validation:
            logger.warning(
                "The validation set scored nothing in any epoch (per-gene PCC NaN: no section with two scored spots "
                f"and a varying gene); no early stopping, the weights of the last epoch ({res.epochs_run - 1}) are kept."
            )
        res.best_epoch = res.epochs_run - 1
    res.seconds = time.perf_counter() - t0
    res.seconds_per_epoch = res.seconds / max(res.epochs_run, 1)
    if device.type == "cuda":
        res.peak_memory_bytes = int(torch.cuda.max_memory_allocated(device))
    model.eval()
    return res
