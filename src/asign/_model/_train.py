"""Training and inference loops (``method.md`` §6): masking, optimiser, early stopping, seeded, full-graph."""

from __future__ import annotations

import copy
import math
import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from asign._logging import logger

from ._config import ASIGNConfig
from ._data import SampleTensors
from ._losses import asign_loss
from ._model import ASIGNModel

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
    model: ASIGNModel, sample: SampleTensors, *, device: torch.device | str = "cpu", amp: bool = True
) -> dict[str, np.ndarray]:
    """Deterministic inference: ``model.eval()``, the whole-sample graph, ``sample.y`` as the visible set."""
    device = torch.device(device)
    model.eval()
    s = sample.to(device)
    with _autocast(device, enabled=amp):
        out = model(s, s.y)
    return {k: v.float().cpu().numpy() for k, v in out.items()}


def evaluate(model: ASIGNModel, val: ValidationSet, *, device: torch.device, amp: bool) -> float:
    """Per-gene PCC of the prediction on the validation rows."""
    pred = predict_sample(model, val.sample, device=device, amp=amp)["pred"]
    rows = val.eval_rows.cpu().numpy()
    return per_gene_pcc(pred[rows], val.y_eval.cpu().numpy()[rows], val.sample.section.cpu().numpy()[rows])


def train_model(
    model: ASIGNModel,
    train: list[SampleTensors],
    *,
    validation: list[ValidationSet] | None = None,
    device: torch.device | str = "cpu",
    show_progress_bar: bool = True,
) -> TrainResult:
    """Train ``model`` in place on whole-sample graphs.

    Each step processes one training sample with a visible set drawn by the mask (``config.mask``); hidden labels are
    NaN in the tensor the model and the propagation receive, and the loss reads a separate target tensor on the
    hidden labelled rows only. Early stopping (``config.patience``) uses the validation per-gene PCC; the best
    epoch's weights are restored. Without validation sets the last epoch's weights are kept.
    """
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
    model.to(device)
    train_dev = [s.to(device) for s in train]
    gen = torch.Generator().manual_seed(int(cfg.seed) + 1)
    rng = np.random.default_rng(int(cfg.seed) + 2)
    torch.manual_seed(int(cfg.seed) + 3)  # dropout
    params = [p for p in model.parameters() if p.requires_grad]
    if cfg.optimizer == "sgd":
        opt: torch.optim.Optimizer = torch.optim.SGD(
            params, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay
        )
    else:
        opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay, foreach=True)
    total = cfg.max_epochs * cfg.steps_per_epoch * len(train)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, _lr_lambda(cfg, total))
    res = TrainResult()
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
            s = train_dev[int(i)]
            for _ in range(cfg.steps_per_epoch):
                visible, loss_rows = _draw_mask(s, cfg, gen)
                if not bool(loss_rows.any()):
                    continue
                y_in = torch.where(visible.unsqueeze(1), s.y, torch.full_like(s.y, float("nan")))
                with _autocast(device, enabled=cfg.amp):
                    out = model(s, y_in)
                loss, parts = asign_loss(
                    out,
                    s.y,
                    loss_rows,
                    weights=cfg.loss_weights,
                    pcc_axis=cfg.pcc_axis,
                    section=s.section,
                    y_region=s.y_region,
                    y_global=s.y_global,
                    spot_region=s.spot_region,
                    spot_global=s.spot_global,
                    net_weight=cfg.net_loss_weight,
                )
                opt.zero_grad(set_to_none=True)
                loss.backward()
                if cfg.grad_clip > 0:
                    torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip)
                opt.step()
                sched.step()
                res.n_steps += 1
                losses.append(parts)
        row: dict[str, float] = {"epoch": float(epoch)}
        for k in sorted({k for p in losses for k in p}):
            row[f"loss_{k}"] = float(np.mean([p[k] for p in losses if k in p]))
        row["lr"] = float(sched.get_last_lr()[0])
        if validation:
            score = float(np.nanmean([evaluate(model, v, device=device, amp=cfg.amp) for v in validation]))
            row["val_pcc"] = score
            if np.isfinite(score) and (best_state is None or score > res.best_score + 1e-6):
                res.best_score, res.best_epoch = score, epoch
                best_state = copy.deepcopy({k: v.detach().clone() for k, v in model.state_dict().items()})
                bad = 0
            else:
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
    elif not validation:
        res.best_epoch = res.epochs_run - 1
    res.seconds = time.perf_counter() - t0
    res.seconds_per_epoch = res.seconds / max(res.epochs_run, 1)
    if device.type == "cuda":
        res.peak_memory_bytes = int(torch.cuda.max_memory_allocated(device))
    model.eval()
    return res
