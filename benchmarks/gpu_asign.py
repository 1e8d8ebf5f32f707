"""ASIGN training cost on a HER2-sized stand-in: seconds per epoch and peak GPU memory.

Self-contained: needs only torch, torch_geometric, numpy, scipy and ``asign._model`` (no spatialdata / anndata).
Builds 8 synthetic samples shaped like HER2ST (4 x 6 + 4 x 3 = 36 sections, ~13,600 spots, 250 genes, spot / 512 px
region / 1024 px global tiles, frozen-feature width 1024 like the paper's ResNet-50 features, within-section
k = 12 and cross-section k = 12 graphs), trains the full three-level model with the paper's width d = 1024 on one
fold (6 training samples, 1 validation sample, whole-sample graphs, ``mask="section"``) and records seconds per epoch
and ``torch.cuda.max_memory_allocated`` beside the paper's 45 s and 24.7 GB (supplement Table 1, batch 128 spot
subgraphs, ResNet-50 fine-tuned; asign trains on cached frozen features, so the numbers are not like for like).

Without CUDA it runs a tiny size on the CPU (a smoke test).

Usage::

    python benchmarks/gpu_asign.py [--out results.json] [--epochs 3] [--feature-dim 1024] [--hidden-dim 1024]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from asign._model import ASIGNConfig, ValidationSet, make_model, predict_sample, train_model
from asign._model._synthetic import random_sample

PAPER = {"seconds_per_epoch": 45.0, "gpu_memory_gb": 24.7, "n_parameters": 59.45e6}
# HER2ST: patients A-D have 6 sections, E-H 3; 13,620 spots over 36 sections (~378 per section)
HER2_LAYOUT = [6, 6, 6, 6, 3, 3, 3, 3]


def build_samples(layout: list[int], spots: int, genes: int, fdim: int, seed: int):
    samples, truths = [], []
    for i, n_sec in enumerate(layout):
        s, y = random_sample(
            n_sections=n_sec,
            spots_per_section=spots,
            n_genes=genes,
            feature_dim=fdim,
            seed=seed + i,
            name=f"P{i}",
        )
        samples.append(s)
        truths.append(y)
    return samples, truths


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument(
        "--out",
        default=os.path.join(
            os.environ.get("OUT") or str(Path(__file__).resolve().parent / "results"), "gpu_asign.json"
        ),
        help="JSON path (default: $OUT/gpu_asign.json, else benchmarks/results/gpu_asign.json)",
    )
    ap.add_argument("--epochs", type=int, default=None)
    ap.add_argument("--feature-dim", type=int, default=None)
    ap.add_argument("--hidden-dim", type=int, default=None)
    ap.add_argument("--spots-per-section", type=int, default=None)
    ap.add_argument("--no-amp", action="store_true")
    ap.add_argument("--device", default=None)
    args = ap.parse_args()

    cuda = torch.cuda.is_available() and args.device != "cpu"
    device = torch.device(args.device or ("cuda" if cuda else "cpu"))
    if cuda:
        layout, spots, fdim, d, epochs = HER2_LAYOUT, 378, 1024, 1024, 3
    else:  # tiny CPU smoke size
        torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))
        layout, spots, fdim, d, epochs = [3, 3, 2], 30, 64, 32, 2
    spots = args.spots_per_section or spots
    fdim = args.feature_dim or fdim
    d = args.hidden_dim or d
    epochs = args.epochs or epochs
    genes = 250

    t0 = time.perf_counter()
    samples, truths = build_samples(layout, spots, genes, fdim, seed=0)
    t_build = time.perf_counter() - t0
    n_spots = sum(s.n_spots for s in samples)
    n_sections = sum(layout)
    print(f"built {len(samples)} samples, {n_sections} sections, {n_spots} spots in {t_build:.1f} s", flush=True)

    # one fold: last sample = test (unused here), second to last = validation (its first section known)
    train, val_sample, val_truth = samples[:-2], samples[-2], truths[-2]
    known = (val_sample.section == 0).unsqueeze(1)
    y_vis = torch.where(known, torch.as_tensor(val_truth), torch.full_like(val_sample.y, float("nan")))
    val = ValidationSet(
        sample=val_sample.with_labels(y_vis), y_eval=torch.as_tensor(val_truth), eval_rows=(val_sample.section > 0)
    )

    cfg = ASIGNConfig(
        hidden_dim=d, max_epochs=epochs, patience=0, amp=not args.no_amp, attn_heads=8, gat_heads=4, seed=0
    )
    model = make_model(genes, {"spot": fdim, "region": fdim, "global": fdim}, cfg)
    n_params = model.n_parameters()
    print(f"model: {n_params / 1e6:.2f} M parameters, d={d}, device={device}", flush=True)

    # warm-up (CUDA kernels, allocator), not timed
    warm = ASIGNConfig(**{**cfg.to_dict(), "max_epochs": 1})
    wmodel = make_model(genes, {"spot": fdim, "region": fdim, "global": fdim}, warm)
    train_model(wmodel, train[:1], device=device, show_progress_bar=False)
    del wmodel
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)

    # training epochs (no validation inside, so the time is training only)
    t0 = time.perf_counter()
    res = train_model(model, train, device=device, show_progress_bar=True)
    if cuda:
        torch.cuda.synchronize()
    t_train = time.perf_counter() - t0
    peak = torch.cuda.max_memory_allocated(device) if cuda else 0

    # validation / inference pass on one sample (whole graph)
    t0 = time.perf_counter()
    pred = predict_sample(model, val.sample, device=device, amp=cfg.amp)["pred"]
    if cuda:
        torch.cuda.synchronize()
    t_inf = time.perf_counter() - t0
    finite = bool(np.isfinite(pred).all())

    result = {
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "host": platform.node(),
        "cpu_count": os.cpu_count(),
        "device": torch.cuda.get_device_name(device) if cuda else platform.processor() or "cpu",
        "torch": torch.__version__,
        "amp_bf16": bool(cfg.amp and cuda),
        "n_samples_train": len(train),
        "n_sections_total": n_sections,
        "n_spots_total": n_spots,
        "n_spots_train": int(sum(s.n_spots for s in train)),
        "n_genes": genes,
        "feature_dim": fdim,
        "hidden_dim": d,
        "n_parameters": n_params,
        "epochs": res.epochs_run,
        "steps": res.n_steps,
        "seconds_train_total": t_train,
        "seconds_per_epoch": t_train / max(res.epochs_run, 1),
        "peak_gpu_memory_gb": peak / 1e9,
        "seconds_inference_one_sample": t_inf,
        "prediction_finite": finite,
        "loss_first_epoch": res.curve[0].get("loss_total"),
        "loss_last_epoch": res.curve[-1].get("loss_total"),
        "paper": PAPER,
        "note": "asign: whole-sample graphs, frozen cached features; paper: 128-spot subgraphs, fine-tuned encoder",
    }
    print(json.dumps(result, indent=2), flush=True)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
