"""ASIGN against the baselines: the synthetic stack and HER2ST patient C (issue 6).

Two parts, each run end to end through the public API:

- ``synthetic``: :func:`asign.datasets.synthetic_stack` (5 sections), the ground-truth rigid alignment
  (``align_layers(method="transforms")``), frozen features (``--encoder``, default ``handcrafted``), the method's 3D
  graph (``neighbors_3d`` with IoU + cosine), section 1 known; every baseline and ASIGN (transductive), per-gene PCC
  on the unknown sections.
- ``her2st``: HER2ST patient C, sections C2-C6 (C1 has no image), asign's own alignment (``align_layers``, ANTs
  rigid), EfficientNet-Lite0 features, the 3D graph with IoU + cosine; known = C2, predict C3-C6; every baseline
  (mean, nearest k=1 / 5-IDW / 8-IDW, propagation, ridge, similarity) and ASIGN (transductive, several seeds),
  per-gene PCC (primary) and the legacy per-spot PCC.

Writes ``benchmarks/results/asign_<part>.json``. The prepared HER2ST stack (tables and shapes, no images) is cached
under ``--cache`` so that reruns skip alignment and feature extraction.

Usage::

    python benchmarks/bench_asign_her2st.py [synthetic|her2st|all] [--seeds 0 1 2] [--cache DIR] [--her2st PATH]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
from pathlib import Path

import numpy as np
from _machine import cpu_name, her2st_path  # benchmarks/ is on sys.path when a script runs

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
BASELINES = [
    ("mean", "mean", {}),
    ("nearest k=1", "nearest", {"k": 1, "weights": "uniform"}),
    ("nearest 5-IDW", "nearest", {"k": 5, "weights": "idw"}),
    ("nearest 8-IDW", "nearest", {"k": 8, "weights": "idw"}),
    ("propagation", "propagation", {"n_iter": 10}),
    ("ridge", "ridge", {}),
    ("similarity", "similarity", {}),
]
METRICS = ("pcc_gene", "pcc_gene_varying", "mse", "mae", "pcc_spot_legacy", "mse_pooled", "mae_pooled")


def _light(sdata):
    """The stack without images (tables and shapes): all that imputation reads once features exist.

    The manifest then lists no image (``image_key`` = ``""``), as the data contract requires.
    """
    from spatialdata import SpatialData

    out = SpatialData(shapes=dict(sdata.shapes), tables=dict(sdata.tables))
    for t in out.tables.values():
        stack = t.uns.get("asign", {}).get("stack") if isinstance(t.uns.get("asign"), dict) else None
        if stack is not None:
            stack["image_key"] = [""] * len(stack["section"])
    return out


def prepare_steps(
    sdata, timings: dict, *, align: bool = True, features: dict | None = None, graph: dict | None = None
) -> None:
    """asign's own alignment (unless ``align=False``), ``extract_features`` (EfficientNet-Lite0 unless ``features``
    says otherwise) and the 3D graph on the spot features, each timed into ``timings``."""
    import asign

    if align:
        t = time.perf_counter()
        asign.pp.align_layers(sdata, show_progress_bar=False)
        timings["align_layers"] = time.perf_counter() - t
    t = time.perf_counter()
    asign.pp.extract_features(sdata, **{"encoder": "efficientnet_lite0", **(features or {})}, show_progress_bar=False)
    timings["extract_features"] = time.perf_counter() - t
    t = time.perf_counter()
    asign.pp.neighbors_3d(sdata, similarity_key="asign_features_spot", **(graph or {}))
    timings["neighbors_3d"] = time.perf_counter() - t


def prepare_her2st(
    path: Path, cache: Path | None, timings: dict, features: dict | None = None, tag: str = ""
) -> object:
    import spatialdata as sd

    import asign

    target = cache / f"her2st_C2-C6_prepared{tag}.zarr" if cache else None
    if target is not None and target.exists():
        t = time.perf_counter()
        out = _light(sd.read_zarr(target))
        timings["read_cache"] = time.perf_counter() - t
        timings["cached"] = True
        return out
    t0 = time.perf_counter()
    sdata = asign.io.read_her2st(path, patient="C", sections=["C2", "C3", "C4", "C5", "C6"])
    timings["read"] = time.perf_counter() - t0
    prepare_steps(sdata, timings, features=features)
    timings["cached"] = False
    light = _light(sdata)
    if target is not None:
        target.parent.mkdir(parents=True, exist_ok=True)
        light.write(target, overwrite=True)
    return light


def align_synthetic_truth(sdata) -> None:
    """``align_layers(method="transforms")`` with the synthetic stack's ground-truth maps (middle section as reference)."""
    import asign

    n2w = np.asarray(sdata.tables["table"].uns["asign"]["synthetic"]["native_to_world"])
    st = asign.io.validate_stack(sdata)
    m = st.n_sections // 2
    transforms = {s: np.linalg.inv(n2w[m]) @ n2w[i] for i, s in enumerate(st.sections)}
    asign.pp.align_layers(sdata, method="transforms", transforms=transforms, show_progress_bar=False)


def prepare_synthetic(encoder: str, timings: dict) -> object:
    import asign

    t0 = time.perf_counter()
    sdata = asign.datasets.synthetic_stack(n_sections=5, seed=0)
    align_synthetic_truth(sdata)
    timings["build_align"] = time.perf_counter() - t0
    prepare_steps(sdata, timings, align=False, features={"encoder": encoder})
    return _light(sdata)


def _evaluated(label: str, method: str, seed: int, secs: float, out) -> tuple[dict, list[dict]]:
    """The overall metrics of one output table and its per-section per-gene PCC."""
    import asign

    ev = asign.tl.evaluate(out, per="overall").iloc[0]
    rec = {"method": label, "name": method, "seed": seed, "seconds": secs, "n_spots": int(ev["n_spots"])}
    rec.update({m: float(ev[m]) for m in METRICS})
    per_sec = asign.tl.evaluate(out, per="section")
    sections = [
        {"method": label, "section": r["section"], "pcc_gene": float(r["pcc_gene"])} for _, r in per_sec.iterrows()
    ]
    return rec, sections


def _layer_score(out, layer: str) -> float:
    import asign

    o2 = out.copy()
    o2.layers["imputed"] = out.layers[layer]
    return float(asign.tl.evaluate(o2, per="overall").iloc[0]["pcc_gene"])


def gene_rank_projected(out, rank: int):
    """A baseline's output table with ``imputed`` projected as ASIGN's ``gene_rank`` option does: on the first
    ``rank`` principal axes of the known spots' normalised expression (the labels the baseline was given)."""
    from asign.tl._gene_rank import gene_basis

    known = out.obs["known"].to_numpy(dtype=bool)
    basis = gene_basis(np.asarray(out.layers["target"][known], dtype=np.float64), rank)
    o2 = out.copy()
    if basis is not None:
        o2.layers["imputed"] = basis.project(out.layers["imputed"])
    return o2


def run_methods(
    sdata, known: str, seeds: list[int], asign_kwargs: dict, baseline_rank: int | None = None
) -> tuple[list[dict], list[dict]]:
    """Every baseline (and, with ``baseline_rank``, each baseline projected on that many gene axes as a row of its
    own), then ASIGN once per seed."""
    import asign

    rows, sections = [], []
    jobs = [(label, m, kw, 0) for label, m, kw in BASELINES]
    jobs += [(f"asign (seed {s})", "asign", asign_kwargs, s) for s in seeds]
    genes = None
    for label, method, kw, seed in jobs:
        t = time.perf_counter()
        try:
            out = asign.tl.impute(
                sdata,
                known=known,
                method=method,
                method_kwargs=kw,
                genes=genes,
                n_genes=250,
                inplace=False,
                seed=seed,
                show_progress_bar=False,
            )
        except Exception as e:  # noqa: BLE001 - a missing optional baseline must not stop the benchmark
            print(f"{label}: failed ({type(e).__name__}: {e})", flush=True)
            continue
        secs = time.perf_counter() - t
        genes = list(out.var_names)
        results = [(label, method, out)]
        if method != "asign" and baseline_rank and method != "mean":
            results.append(
                (f"{label} + gene_rank {baseline_rank}", f"{method}+gene_rank", gene_rank_projected(out, baseline_rank))
            )
        for lab, name, o in results:
            rec, per_sec = _evaluated(lab, name, seed, secs, o)
            if method == "asign":
                res = o.uns["asign"]["result"]
                rec["epochs_run"] = int(res["training"]["epochs_run"])
                rec["best_epoch"] = int(res["training"]["best_epoch"])
                rec["n_parameters"] = int(res["model"]["n_parameters"])
                rec["sigmoid_alpha_mean"] = float(res["model"].get("sigmoid_alpha_mean", float("nan")))
                rec["gene_rank"] = int(res.get("gene_rank", {}).get("rank", 0))
                for layer in ("network", "propagation", "full_rank"):
                    if layer in o.layers:
                        rec[f"pcc_gene_{layer}_only"] = _layer_score(o, layer)
            rows.append(rec)
            sections.extend(per_sec)
            print(
                f"{lab:30s} per-gene PCC {rec['pcc_gene']:.4f}  legacy per-spot {rec['pcc_spot_legacy']:.4f}  "
                f"MSE {rec['mse']:.4f}  ({secs:.1f} s)",
                flush=True,
            )
    return rows, sections


def summarise(rows: list[dict]) -> dict:
    base = [r for r in rows if r["name"] != "asign"]
    ours = [r for r in rows if r["name"] == "asign"]
    out: dict = {}
    if ours:
        for m in ("pcc_gene", "pcc_spot_legacy", "mse", "seconds"):
            v = np.array([r[m] for r in ours])
            out[f"asign_{m}_mean"] = float(v.mean())
            out[f"asign_{m}_sd"] = float(v.std(ddof=1)) if len(v) > 1 else 0.0
    if base and ours:
        best = max(base, key=lambda r: r["pcc_gene"])
        out["best_baseline"] = best["method"]
        out["best_baseline_pcc_gene"] = best["pcc_gene"]
        out["margin_pcc_gene"] = out["asign_pcc_gene_mean"] - best["pcc_gene"]
        best_l = max(base, key=lambda r: r["pcc_spot_legacy"])
        out["best_baseline_legacy"] = best_l["method"]
        out["margin_pcc_spot_legacy"] = out["asign_pcc_spot_legacy_mean"] - best_l["pcc_spot_legacy"]
    return out


def machine() -> dict:
    import torch

    cpu = cpu_name()
    return {
        "cpu": cpu,
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "python": platform.python_version(),
        "torch": torch.__version__,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("part", nargs="?", default="all", choices=["synthetic", "her2st", "all"])
    ap.add_argument("--her2st", default=None)
    ap.add_argument("--cache", default=None, help="folder for the prepared HER2ST stack (no images)")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--encoder", default="handcrafted", help="encoder of the synthetic part")
    ap.add_argument("--asign", default="{}", help="JSON method_kwargs for asign")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument(
        "--features",
        default="{}",
        help='JSON options of extract_features for the HER2ST part (e.g. \'{"tta": "dihedral"}\')',
    )
    ap.add_argument("--tag", default="", help="suffix of the result file and the cache (for non-default --features)")
    ap.add_argument(
        "--baseline-rank",
        type=int,
        default=10,
        help="also score every baseline projected on this many gene axes (ASIGN's gene_rank default); 0: none",
    )
    args = ap.parse_args()
    import torch

    torch.set_num_threads(args.threads)
    kw = json.loads(args.asign)
    RESULTS.mkdir(parents=True, exist_ok=True)
    parts = ["synthetic", "her2st"] if args.part == "all" else [args.part]
    for part in parts:
        timings: dict = {}
        t0 = time.perf_counter()
        if part == "her2st":
            feats = json.loads(args.features)
            sdata = prepare_her2st(
                her2st_path(args.her2st), Path(args.cache) if args.cache else None, timings, feats, args.tag
            )
            known = "C2"
        else:
            sdata = prepare_synthetic(args.encoder, timings)
            known = "S1"
        timings["prepare_total"] = time.perf_counter() - t0
        print(f"[{part}] prepared in {timings['prepare_total']:.1f} s: {timings}", flush=True)
        rows, sections = run_methods(sdata, known, args.seeds, kw, args.baseline_rank or None)
        summary = summarise(rows)
        result = {
            "part": part,
            "known": known,
            "asign_method_kwargs": kw,
            "baseline_gene_rank": args.baseline_rank,
            "feature_options": json.loads(args.features) if part == "her2st" else {},
            "timings": timings,
            "rows": rows,
            "per_section": sections,
            "summary": summary,
            "machine": machine(),
            "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        }
        if part == "her2st":
            tab = sdata.tables["table"]
            result["alignment_quality"] = {
                k: (np.asarray(v).tolist() if not isinstance(v, str) else v)
                for k, v in tab.uns["asign"]["alignment"].get("quality", {}).items()
            }
        (RESULTS / f"asign_{part}{args.tag}.json").write_text(json.dumps(result, indent=2, default=float))
        print(json.dumps(summary, indent=2), flush=True)


if __name__ == "__main__":
    main()
