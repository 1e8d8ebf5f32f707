"""ASIGN without images on all 8 HER2ST patients, with patient-level folds (issue 6).

HER2ST has full-resolution images for patient C (C2-C6) and B4 only, so the image model cannot run on the other
patients. This benchmark runs ASIGN's non-image mode (``method_kwargs={"feature_key": None}``: the spot branch reads
the cross-layer propagation of the *visible* labels, a reach score and graph descriptors, spot level only) beside the
baselines ``mean``, ``nearest`` and ``propagation``, on every patient read from counts (no images), aligned with the
published rigid registration, with the whole-sample 3D graph of ``asign.pp.neighbors_3d`` (as
``bench_her2st_baselines.py``).

Two uses, both with known = section 1 of the test patient and every other section scored:

- **transductive** (``impute(sdata, known=<section 1>, method="asign")``): the model trains on the test patient's
  known section only (spot masking; ensemble of ``--n-models``, default 1, the transductive default is 3); genes
  ranked on that known section. Each patient is its own fold; mean ± sd over the 8 patients.
- **inductive** (``tl.cross_validate(method="asign")``, folds {A,E}, {B,F}, {C,G}, {D,H}): the model trains on the 6
  other patients (the last one validates), then predicts each test patient from its known section; genes ranked per
  fold on the training patients and the test patients' known sections. Mean ± sd over the 4 folds.

Writes ``benchmarks/results/asign_cv_noimage.json`` (the markdown section lives in ``docs/benchmarks/asign.md``).

Usage::

    python benchmarks/bench_asign_cv.py [--her2st PATH] [--patients ABCDEFGH] [--skip-inductive] [--threads 1]
    python benchmarks/bench_asign_cv.py --seeds 0 --json run0.json        # transductive seed 0 + inductive
    python benchmarks/bench_asign_cv.py --seeds 1 --skip-inductive --merge run0.json   # adds seed 1
    python benchmarks/bench_asign_cv.py --skip-transductive --inductive-asign '{"gene_rank": 10, "nearest_blend": 0.5}' \
        --json benchmarks/results/asign_cv_inductive_gene_rank_blend.json   # the post-processing steps, inductively

These commands run today's defaults (``gene_rank=10``, ``nearest_blend=0.5``). ``asign_cv_noimage.json`` predates
both steps: add ``--baseline-rank 0`` and ``--asign`` / ``--inductive-asign '{"gene_rank": null, "nearest_blend": 0}'``
to reproduce it (docs/benchmarks/asign.md, "Reproduce").

``--baseline-rank`` (default 10) adds each baseline projected on that many gene axes, in both uses. ASIGN rows also
record the per-gene PCC of the network alone, of the prediction before the gene projection (``full_rank``) and, with
a blend, before the blend (``unblended``).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import pandas as pd
from _machine import find_her2st
from bench_asign_her2st import gene_rank_projected
from bench_her2st_baselines import load_patient, machine_info

ROOT = Path(__file__).resolve().parents[1]
BASELINES = [
    ("mean", "mean", {}),
    ("nearest 5-IDW", "nearest", {"k": 5, "weights": "idw"}),
    ("nearest 8-IDW", "nearest", {"k": 8, "weights": "idw"}),
    ("propagation", "propagation", {"n_iter": 10}),
]
# the non-image mode; transductive: the transductive defaults of tl/_asign.py plus what the dev protocol chose
TRANSDUCTIVE_KW: dict = {"feature_key": None}
# inductive: mask="section", validation on the last training patient, nearest_blend 0.5 and gene_rank 10 (the
# inductive defaults since session 8; the runs before it had neither step), at the size and
# optimiser of the transductive defaults (d = 256, lr 1e-4 and 100 epochs are GPU-sized); set a priori, not tuned
INDUCTIVE_KW: dict = {
    "feature_key": None,
    "hidden_dim": 32,
    "attn_heads": 4,
    "lr": 1e-3,
    "weight_decay": 1e-2,
    "net_loss_weight": 1.0,
    "steps_per_epoch": 2,
    "max_epochs": 30,
    "patience": 8,
}
METRICS = ("pcc_gene", "pcc_spot_legacy", "mse", "mae")
# patients whose scores informed the design of the non-image mode (docs/benchmarks/asign.md). The others were clean
# until session 7, when B, D, G, H decided the blend weight (nearest_blend=0.5) and all 8 the gene projection: the
# subset is therefore called "not_dev" (outside A, E, F), not "clean"
DEV_PATIENTS = ("A", "E", "F")


def _row(ev: pd.Series) -> dict:
    return {m: float(ev[m]) for m in METRICS} | {"n_spots": int(ev["n_spots"])}


def _layer_scores(out) -> dict:
    """Per-gene PCC of ASIGN's extra layers: the network alone, the prediction before the gene projection
    (``full_rank``) and, with a nearest-neighbour blend, the prediction before the blend (``unblended``,
    recovered exactly from the blend: ``(full_rank - w * nearest) / (1 - w)``)."""
    import asign

    layers = {k: out.layers[k] for k in ("network", "full_rank") if k in out.layers}
    w = float(out.uns["asign"]["result"].get("nearest_blend", 0.0))
    if 0 < w < 1 and "nearest" in out.layers:
        before = out.layers["full_rank"] if "full_rank" in out.layers else out.layers["imputed"]
        layers["unblended"] = (np.asarray(before) - w * np.asarray(out.layers["nearest"])) / (1.0 - w)
    scores = {}
    for name, layer in layers.items():
        o2 = out.copy()
        o2.layers["imputed"] = layer
        scores[f"pcc_gene_{name}"] = float(asign.tl.evaluate(o2, per="overall").iloc[0]["pcc_gene"])
    return scores


def transductive(
    samples: dict, *, n_models: int, seeds: list[int], baseline_rank: int | None = None, asign_kw: dict | None = None
) -> list[dict]:
    import asign

    rows = []
    for name, sdata in samples.items():
        first = asign.io.validate_stack(sdata).sections[0]
        runs = [(lab, m, kw, 0) for lab, m, kw in BASELINES]
        kw_asign = {**TRANSDUCTIVE_KW, "n_models": n_models, **(asign_kw or {})}
        runs += [("ASIGN (no image)", "asign", kw_asign, s) for s in seeds]
        for label, method, kw, seed in runs:
            t, c = time.perf_counter(), time.process_time()
            out = asign.tl.impute(
                sdata,
                known=first,
                method=method,
                method_kwargs=kw,
                n_genes=250,
                inplace=False,
                seed=seed,
                show_progress_bar=False,
            )
            rec = {
                "use": "transductive",
                "patient": name,
                "method": label,
                "seed": seed,
                "seconds": time.perf_counter() - t,
                "cpu_seconds": time.process_time() - c,
                **_row(asign.tl.evaluate(out, per="overall").iloc[0]),
            }
            if method == "asign":
                rec.update(_layer_scores(out))
                rec["epochs"] = int(out.uns["asign"]["result"]["training"]["epochs_run"])
            rows.append(rec)
            print(f"[transductive] {name} {label} seed {seed}: per-gene PCC {rec['pcc_gene']:.3f}", flush=True)
            if baseline_rank and method not in ("asign", "mean"):  # the baseline with ASIGN's gene projection
                projected = gene_rank_projected(out, baseline_rank)
                rows.append(
                    {
                        **rec,
                        "method": f"{label} + gene_rank {baseline_rank}",
                        **_row(asign.tl.evaluate(projected, per="overall").iloc[0]),
                    }
                )
    return rows


def inductive(
    samples: dict, *, seed: int, baseline_rank: int | None = None, asign_kw: dict | None = None
) -> list[dict]:
    import asign

    rows = []
    runs = [(lab, m, kw) for lab, m, kw in BASELINES]
    # each baseline with ASIGN's gene projection; since session 8 the axes come from the known spots of the sample
    # being imputed (tl._gene_rank.known_rows), not from every label of the fold (the first run's pooled axes)
    if baseline_rank:
        runs += [
            (f"{lab} + gene_rank {baseline_rank}", m, {**kw, "gene_rank": baseline_rank})
            for lab, m, kw in BASELINES[1:]
        ]
    runs += [("ASIGN (no image)", "asign", {**INDUCTIVE_KW, **(asign_kw or {})})]
    for label, method, kw in runs:
        t, c = time.perf_counter(), time.process_time()
        key = "asign_cv_out" if method == "asign" else None
        df = asign.tl.cross_validate(
            samples,
            method=method,
            method_kwargs=kw,
            n_genes=250,
            per="section",
            seed=seed,
            key_added=key,
            overwrite=True,
            show_progress_bar=False,
        )
        secs, cpu = time.perf_counter() - t, time.process_time() - c
        for _, r in df[df.level == "sample"].iterrows():
            rec = {"use": "inductive", "patient": r["sample"], "fold": int(r["fold"]), "method": label, "seed": seed}
            rec.update(_row(r))
            if key is not None:  # the layers before the post-processing steps, scored like the transductive rows
                out = samples[r["sample"]].tables.pop(key)
                rec.update(_layer_scores(out))
            rows.append(rec)
        for _, r in df[df.level == "fold"].iterrows():
            rows.append(
                {
                    "use": "inductive_fold",
                    "fold": int(r["fold"]),
                    "method": label,
                    "seed": seed,
                    "seconds_all_folds": secs,
                    "cpu_seconds_all_folds": cpu,
                    **_row(r),
                }
            )
        print(f"[inductive] {label}: {secs:.0f} s", flush=True)
    return rows


def summarise(rows: list[dict]) -> list[dict]:
    """Mean ± sd over patients (transductive; seeds averaged first) and over folds (inductive)."""
    df = pd.DataFrame(rows)
    out = []
    for use, unit in (("transductive", "patient"), ("inductive_fold", "fold")):
        d = df[df.use == use]
        if d.empty:
            continue
        for subset, pats in (("all", None), ("not_dev", [p for p in "ABCDEFGH" if p not in DEV_PATIENTS])):
            if subset == "not_dev" and use != "transductive":
                continue
            for method, g in d.groupby("method", sort=False):
                if pats is not None:
                    g = g[g.patient.isin(pats)]
                per_unit = g.groupby(unit)[list(METRICS)].mean()
                rec = {"use": use.replace("_fold", ""), "subset": subset, "method": method, "n_units": len(per_unit)}
                for m in METRICS:
                    rec[m] = float(per_unit[m].mean())
                    rec[f"{m}_sd"] = float(per_unit[m].std(ddof=1)) if len(per_unit) > 1 else float("nan")
                for extra in ("pcc_gene_network", "pcc_gene_full_rank", "pcc_gene_unblended"):
                    if extra in g and g[extra].notna().any():
                        rec[extra] = float(g.groupby(unit)[extra].mean().mean())
                if use == "transductive" and method.startswith("ASIGN"):
                    seed_means = g.groupby("seed")["pcc_gene"].mean()
                    rec["pcc_gene_seed_sd"] = float(seed_means.std(ddof=1)) if len(seed_means) > 1 else float("nan")
                    rec["seconds_per_run"] = float(g["seconds"].mean())
                    rec["cpu_seconds_per_run"] = float(g["cpu_seconds"].mean())
                out.append(rec)
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--her2st", type=Path, default=find_her2st())
    parser.add_argument("--patients", default="ABCDEFGH")
    parser.add_argument("--n-models", type=int, default=1)
    parser.add_argument("--seeds", default="0")
    parser.add_argument("--skip-transductive", action="store_true")
    parser.add_argument("--skip-inductive", action="store_true")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument(
        "--baseline-rank",
        type=int,
        default=10,
        help="also score the baselines projected on this many gene axes (0: no)",
    )
    parser.add_argument("--asign", default="{}", help="JSON method_kwargs added to the transductive ASIGN runs")
    parser.add_argument("--inductive-asign", default="{}", help="JSON method_kwargs added to the inductive ASIGN run")
    parser.add_argument("--merge", type=Path, nargs="*", default=[], help="earlier result files whose rows to keep")
    parser.add_argument("--json", type=Path, default=ROOT / "benchmarks" / "results" / "asign_cv_noimage.json")
    args = parser.parse_args(argv)
    if args.her2st is None:
        parser.error("HER2ST folder not found; pass --her2st or set ASIGN_HER2ST")
    import torch

    torch.set_num_threads(args.threads)
    t0, c0 = time.perf_counter(), time.process_time()
    samples = {p: load_patient(args.her2st, p) for p in args.patients}
    rows: list[dict] = []
    seeds = [int(s) for s in args.seeds.split(",")]
    if not args.skip_transductive:
        rows += transductive(
            samples,
            n_models=args.n_models,
            seeds=seeds,
            baseline_rank=args.baseline_rank or None,
            asign_kw=json.loads(args.asign),
        )
    if not args.skip_inductive:
        rows += inductive(
            samples,
            seed=seeds[0],
            baseline_rank=args.baseline_rank or None,
            asign_kw=json.loads(args.inductive_asign),
        )
    merged = [json.loads(Path(p).read_text()) for p in args.merge]
    if merged:  # rows of earlier runs first; a row of this run with the same key (baselines rerun) is dropped
        old = [r for m in merged for r in m["rows"]]
        key = ("use", "patient", "fold", "method", "seed")
        seen = {tuple(r.get(k) for k in key) for r in old}
        rows = old + [r for r in rows if tuple(r.get(k) for k in key) not in seen]
    tables = [s.tables["table"] for s in samples.values()]
    res = {
        "machine": machine_info(),
        "settings": {
            "patients": list(args.patients),
            "known": "section 1 of each test patient",
            "n_genes": 250,
            "normalization": "st-net",
            "alignment": "published rigid registration (method='transforms')",
            "graph": "asign.pp.neighbors_3d defaults (no image features: cross-section score = IoU)",
            "baselines": [{"label": lab, "method": m, "method_kwargs": kw} for lab, m, kw in BASELINES],
            "transductive_method_kwargs": {**TRANSDUCTIVE_KW, "n_models": args.n_models, **json.loads(args.asign)},
            "inductive_method_kwargs": {**INDUCTIVE_KW, **json.loads(args.inductive_asign)},
            "inductive_folds": [["A", "E"], ["B", "F"], ["C", "G"], ["D", "H"]],
            "seeds": seeds,
            "merged_runs": [
                {"file": str(p), "date": m["machine"]["date"], "settings_seeds": m["settings"]["seeds"]}
                for p, m in zip(args.merge, merged, strict=True)
            ],
            "dev_patients": list(DEV_PATIENTS),
            "torch_threads": args.threads,
        },
        "n_spots_total": int(sum(t.n_obs for t in tables)),
        "rows": rows,
        "summary": summarise(rows),
        "seconds_total": time.perf_counter() - t0,
        "cpu_seconds_total": time.process_time() - c0,
    }
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(res, indent=1, default=float))
    for r in res["summary"]:
        print(
            f"{r['use']:12s} {r['subset']:5s} {r['method']:18s} pcc_gene {r['pcc_gene']:.3f} ± {r['pcc_gene_sd']:.3f} "
            f"legacy {r['pcc_spot_legacy']:.3f} mse {r['mse']:.3f} mae {r['mae']:.3f}"
        )
    print(f"total {res['seconds_total']:.0f} s (CPU {res['cpu_seconds_total']:.0f} s)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
