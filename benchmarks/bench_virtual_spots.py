"""Virtual spots on image-only sections: ``asign.pp.make_spots`` + ``asign.tl.impute`` against ground truth.

The package's core use case: a section that has only an H&E image gets a virtual spot grid on its tissue
(:func:`asign.pp.make_spots`) and imputed expression (:func:`asign.tl.impute`). Two parts, each comparing
``mean`` (the known section's mean), ``nearest`` (8-IDW on aligned positions), ``propagation`` (10 iterations on the
3D graph) and ``asign`` (transductive defaults), with the same genes and known section for all:

- ``synthetic``: :func:`asign.datasets.synthetic_stack` (5 sections, seed 0). S3 and S4 become image-only: their
  spots are marked unmeasured and their counts zeroed, then ``make_spots`` replaces those rows with a virtual grid
  (the default pitch, twice the spot diameter). Ground-truth rigid alignment (``align_layers(method="transforms")``),
  EfficientNet-Lite0 features at ``scales_um={"spot": 224, "region": 512, "global": 1024}``,
  ``neighbors_3d(similarity_key="asign_features_spot", radius_um=112)``, known = S1. The virtual spots of S3/S4 are
  scored against the generator's *expected* expression at their positions (domain and gradients of the block at
  the spot's world position, ``exp(base + domain_effect + gradients @ gradient_loading)`` times the mean size
  factor), on the st-net scale ``ln((mu + 1) / sum_genes(mu + 1))``. Beside it, the same pipeline with S3/S4 kept
  as ordinary measured unknown sections, scored against the same truth at their real spots and against their
  sampled counts.
- ``her2st``: HER2ST patient C, C2-C6, asign's own alignment (ANTs rigid), EfficientNet-Lite0 features (default
  scales), ``neighbors_3d(similarity_key="asign_features_spot")``, known = C2. Run twice: with C4 an ordinary
  measured unknown section ("real"), and with C4 image-only ("virtual": its spots marked unmeasured and counts
  zeroed, replaced by ``make_spots``). The virtual C4 spots are scored against the measured C4 spot nearest to
  each of them within ``--radius-um`` (default 100 µm) in C4's own image frame; its normalised values are the
  real run's ``layers['target']`` (same genes, same normalisation).

Scores: per-gene Pearson correlation within a section, averaged over genes (``pcc_gene``, via
:func:`asign.tl.evaluate` with the truth written into ``layers['target']``), and MSE on the same scale.

Writes ``benchmarks/results/virtual_spots.json`` and prints markdown tables.

Usage::

    python benchmarks/bench_virtual_spots.py [--parts synthetic,her2st] [--seeds 0] [--her2st PATH]
    python benchmarks/bench_virtual_spots.py --parts synthetic,her2st --methods mean   # add one method's rows

``--methods`` (default: all of ``mean,nearest,propagation,asign``) runs a subset and merges its rows into the
existing results file: rows of the same method and section are replaced, every other row and the part's settings
are left as they are, the stored gene list is reused, and the run is recorded in the part's ``merged_runs``. The
merge is refused when the new run's virtual spots, their matching or its genes differ from the stored ones.
"""

from __future__ import annotations

import argparse
import importlib.metadata as md
import json
import os
import platform
import time
from pathlib import Path

import numpy as np
import scipy.sparse as sp
from _machine import cpu_name, her2st_path  # benchmarks/ is on sys.path when a script runs
from bench_asign_her2st import align_synthetic_truth, prepare_steps

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "benchmarks" / "results" / "virtual_spots.json"
BASELINES = [
    ("mean", "mean", {}),
    ("nearest 8-IDW", "nearest", {"k": 8, "weights": "idw"}),
    ("propagation", "propagation", {"n_iter": 10}),
]
# --methods names -> row labels (asign: one row per seed, "asign (seed <s>)")
METHODS = {"mean": "mean", "nearest": "nearest 8-IDW", "propagation": "propagation", "asign": "asign"}
SYN_SCALES = {"spot": 224, "region": 512, "global": 1024}
SYN_IMAGE_ONLY = ["S3", "S4"]
OTHERS = ["C3", "C5", "C6"]  # HER2ST: the measured unknown sections of both runs


def _make_image_only(sdata, sections: list[str]) -> dict:
    """Turn measured ``sections`` into image-only ones and lay virtual spots on them.

    ``make_spots`` refuses a section with measured spots and replaces a listed section's unmeasured spots, so the
    measured rows are first marked unmeasured with zero counts (nothing of them reaches the model: make_spots drops
    those rows). Returns the lattice parameters ``make_spots`` recorded.
    """
    import asign

    t = sdata.tables["table"]
    drop = np.isin(t.obs["section"].astype(str).to_numpy(), sections)
    t.obs.loc[drop, "measured"] = False
    keep = (~drop).astype(np.float32)
    t.X = sp.csr_matrix(sp.diags(keep) @ t.X) if sp.issparse(t.X) else t.X * keep[:, None]
    for k in list(t.layers):
        lay = t.layers[k]
        t.layers[k] = sp.csr_matrix(sp.diags(keep) @ lay) if sp.issparse(lay) else np.asarray(lay) * keep[:, None]
    for s in sections:
        asign.pp.make_spots(sdata, section=s)
    t = sdata.tables["table"]
    virt = np.isin(t.obs["section"].astype(str).to_numpy(), sections)
    assert not t.obs["measured"].to_numpy()[virt].any()
    assert t.obs_names[virt].str.contains("_v").all()
    return {s: dict(t.uns["asign"]["make_spots"][s]) for s in sections}


def _impute_all(
    sdata,
    known: str,
    seeds: list[int],
    n_genes: int,
    genes: list[str] | None,
    timings: dict,
    methods: tuple[str, ...] = tuple(METHODS),
) -> dict:
    """Output table per method label (the baselines, then ASIGN per seed), for the ``methods`` (names of
    :data:`METHODS`)."""
    import asign

    labels = {METHODS[m] for m in methods}
    jobs = [(label, m, kw, 0) for label, m, kw in BASELINES if label in labels]
    if "asign" in labels:
        jobs += [(f"asign (seed {s})", "asign", {}, s) for s in seeds]
    outs = {}
    for label, method, kw, seed in jobs:
        t = time.perf_counter()
        out = asign.tl.impute(
            sdata,
            known=known,
            method=method,
            method_kwargs=kw,
            genes=genes,
            n_genes=n_genes,
            inplace=False,
            seed=seed,
            show_progress_bar=False,
        )
        timings[f"impute {label}"] = time.perf_counter() - t
        genes = list(out.var_names)
        outs[label] = out
        print(f"  {label}: {timings[f'impute {label}']:.1f} s", flush=True)
    return outs


def _score(out, section: str, rows: np.ndarray, truth: np.ndarray) -> dict:
    """``asign.tl.evaluate`` of ``section`` with ``truth`` (rows x genes, normalised) as the target of ``rows``."""
    import asign

    o2 = out.copy()
    target = np.full(o2.shape, np.nan)
    target[rows] = truth
    measured = np.zeros(o2.n_obs, dtype=bool)
    measured[rows] = True
    o2.layers["target"] = target
    o2.obs["measured"] = measured
    ev = asign.tl.evaluate(o2, sections=[section], per="section").iloc[0]
    return {"pcc_gene": float(ev["pcc_gene"]), "mse": float(ev["mse"]), "n_spots": int(ev["n_spots"])}


def _measured_score(out, section: str) -> dict:
    import asign

    ev = asign.tl.evaluate(out, sections=[section], per="section").iloc[0]
    return {"pcc_gene": float(ev["pcc_gene"]), "mse": float(ev["mse"]), "n_spots": int(ev["n_spots"])}


# --------------------------------------------------------------------------------------------------- synthetic
def _synthetic_truth(out, syn: dict, stack: dict, section: str) -> tuple[np.ndarray, np.ndarray, int]:
    """Rows of ``section`` inside the block's tissue and the expected expression there (st-net scale).

    The truth is the generator's mean: ``mu = exp(base + domain_effect[domain] + gradients @ gradient_loading)``
    times the mean spot size factor ``exp(0.25**2 / 2)`` (size ~ lognormal(0, 0.25)), at the spot's world position
    (its native pixel through ``native_to_world``), normalised as ``ln((mu + 1) / sum_genes(mu + 1))`` over the
    modelled genes. Spots whose world position lies outside the block's tissue have no truth and are left out.
    """
    from asign.datasets._synthetic import domain_at, gradients_at

    i = list(stack["section"]).index(section)
    z = float(np.asarray(stack["z_um"])[i])
    rows = np.flatnonzero(out.obs["section"].astype(str).to_numpy() == section)
    n2w = np.asarray(syn["native_to_world"])[i]
    p = np.asarray(out.obsm["spatial"][rows], dtype=float)
    w = p @ n2w[:2, :2].T + n2w[:2, 2]
    lab = domain_at(w[:, 0], w[:, 1], z, drift=float(syn["drift"]), variation=float(syn["variation"]))
    inside = lab >= 0
    gidx = [int(g.split("_")[-1]) for g in out.var_names]
    grad = gradients_at(w[inside, 0], w[inside, 1], z)
    base = np.asarray(syn["base_log_mean"])[gidx]
    dom = np.asarray(syn["domain_effect"])[:, gidx]
    load = np.asarray(syn["gradient_loading"])[:, gidx]
    mu = np.exp(base[None, :] + dom[lab[inside]] + grad @ load) * np.exp(0.25**2 / 2)
    norm = np.log((mu + 1.0) / (mu + 1.0).sum(axis=1, keepdims=True))
    return rows[inside], norm, int((~inside).sum())


def _prepare_synthetic(*, image_only: bool, timings: dict):
    import asign

    t0 = time.perf_counter()
    sdata = asign.datasets.synthetic_stack(n_sections=5, seed=0)
    lattice = _make_image_only(sdata, SYN_IMAGE_ONLY) if image_only else {}
    align_synthetic_truth(sdata)
    timings["build_align"] = time.perf_counter() - t0
    prepare_steps(sdata, timings, align=False, features={"scales_um": SYN_SCALES}, graph={"radius_um": 112})
    return sdata, lattice


def run_synthetic(seeds: list[int], methods: tuple[str, ...] = tuple(METHODS), genes: list[str] | None = None) -> dict:
    """The synthetic part for ``methods``; ``genes``: the modelled genes (default: ranked on S1 by the first run)."""
    res: dict = {"known": "S1", "image_only": SYN_IMAGE_ONLY, "scales_um": SYN_SCALES, "radius_um": 112, "runs": {}}
    for mode in ("virtual", "real"):
        timings: dict = {}
        print(f"[synthetic/{mode}] preparing", flush=True)
        sdata, lattice = _prepare_synthetic(image_only=mode == "virtual", timings=timings)
        table = sdata.tables["table"]
        syn = table.uns["asign"]["synthetic"]
        stack = table.uns["asign"]["stack"]
        outs = _impute_all(sdata, "S1", seeds, 50, genes, timings, methods)
        genes = list(next(iter(outs.values())).var_names)
        rows = []
        for label, out in outs.items():
            for s in SYN_IMAGE_ONLY:
                r_idx, truth, n_out = _synthetic_truth(out, syn, stack, s)
                rec = {"method": label, "section": s, "n_outside_tissue": n_out}
                rec.update({f"truth_{k}": v for k, v in _score(out, s, r_idx, truth).items()})
                if mode == "real":
                    rec.update({f"counts_{k}": v for k, v in _measured_score(out, s).items()})
                rows.append(rec)
        res["runs"][mode] = {"rows": rows, "timings": timings, "make_spots": lattice}
        for r in rows:
            print(f"  {mode:7s} {r['method']:16s} {r['section']} PCC(truth) {r['truth_pcc_gene']:.4f}", flush=True)
    res["genes"] = genes
    return res


# ------------------------------------------------------------------------------------------------------ her2st
def _prepare_her2st(path: Path, *, image_only: bool, timings: dict):
    import asign

    t0 = time.perf_counter()
    sdata = asign.io.read_her2st(path, patient="C", sections=["C2", "C3", "C4", "C5", "C6"])
    lattice = _make_image_only(sdata, ["C4"]) if image_only else {}
    timings["read"] = time.perf_counter() - t0
    prepare_steps(sdata, timings)
    return sdata, lattice


def run_her2st(
    path: Path,
    seeds: list[int],
    radius_um: float,
    methods: tuple[str, ...] = tuple(METHODS),
    genes: list[str] | None = None,
) -> dict:
    """The HER2ST part for ``methods``; ``genes``: the modelled genes (default: ranked on C2 by the real run)."""
    from scipy.spatial import cKDTree

    import asign

    res: dict = {"known": "C2", "image_only": ["C4"], "radius_um": radius_um, "runs": {}}
    # real first: its layers['target'] of C4 is the measured truth for the virtual spots
    timings: dict = {}
    print("[her2st/real] preparing", flush=True)
    sdata, _ = _prepare_her2st(path, image_only=False, timings=timings)
    real_outs = _impute_all(sdata, "C2", seeds, 250, genes, timings, methods)
    genes = list(next(iter(real_outs.values())).var_names)
    stack = sdata.tables["table"].uns["asign"]["stack"]
    px = float(np.asarray(stack["um_per_px"])[list(stack["section"]).index("C4")])
    quality = sdata.tables["table"].uns["asign"]["alignment"].get("quality", {})
    rows = []
    for label, out in real_outs.items():
        rec = {"method": label, "section": "C4"}
        rec.update(_measured_score(out, "C4"))
        rec["C3_C5_C6_pcc_gene"] = float(asign.tl.evaluate(out, sections=OTHERS, per="overall").iloc[0]["pcc_gene"])
        rows.append(rec)
    res["runs"]["real"] = {
        "rows": rows,
        "timings": timings,
        "alignment_quality": {k: np.asarray(v).tolist() for k, v in quality.items() if not isinstance(v, str)},
    }
    ref = next(iter(real_outs.values()))
    c4 = np.flatnonzero((ref.obs["section"].astype(str).to_numpy() == "C4") & ref.obs["measured"].to_numpy(bool))
    real_xy = np.asarray(ref.obsm["spatial"][c4], dtype=float)
    real_target = np.asarray(ref.layers["target"][c4], dtype=float)
    del sdata, real_outs

    timings = {}
    print("[her2st/virtual] preparing", flush=True)
    sdata, lattice = _prepare_her2st(path, image_only=True, timings=timings)
    outs = _impute_all(sdata, "C2", seeds, 250, genes, timings, methods)
    quality = sdata.tables["table"].uns["asign"]["alignment"].get("quality", {})
    first = next(iter(outs.values()))
    assert list(first.var_names) == genes
    v_rows = np.flatnonzero(first.obs["section"].astype(str).to_numpy() == "C4")
    v_xy = np.asarray(first.obsm["spatial"][v_rows], dtype=float)
    dist, nn = cKDTree(real_xy).query(v_xy)
    dist_um = dist * px
    ok = dist_um <= radius_um
    matching = {
        "n_virtual": len(v_rows),
        "n_real": len(c4),
        "n_matched": int(ok.sum()),
        "n_distinct_real_matched": int(len(np.unique(nn[ok]))),
        "median_distance_um": float(np.median(dist_um[ok])) if ok.any() else float("nan"),
        "um_per_px": px,
    }
    rows = []
    for label, out in outs.items():
        rec = {"method": label, "section": "C4 (virtual)"}
        rec.update(_score(out, "C4", v_rows[ok], real_target[nn[ok]]))
        rec["C3_C5_C6_pcc_gene"] = float(asign.tl.evaluate(out, sections=OTHERS, per="overall").iloc[0]["pcc_gene"])
        rows.append(rec)
    res["runs"]["virtual"] = {
        "rows": rows,
        "timings": timings,
        "make_spots": lattice,
        "matching": matching,
        "alignment_quality": {k: np.asarray(v).tolist() for k, v in quality.items() if not isinstance(v, str)},
    }
    res["genes"] = genes
    for mode in ("real", "virtual"):
        for r in res["runs"][mode]["rows"]:
            print(f"  {mode:7s} {r['method']:16s} C4 PCC {r['pcc_gene']:.4f} (n={r['n_spots']})", flush=True)
    return res


# ------------------------------------------------------------------------------------------------------- output
def _versions() -> dict:
    out = {"python": platform.python_version()}
    for p in ("asign", "torch", "spatialdata", "anndata", "numpy", "scikit-image", "antspyx"):
        try:
            out[p] = md.version(p)
        except md.PackageNotFoundError:
            pass
    return out


def _with_mean(rows: list[dict], keys: tuple[str, ...] = ("section",)) -> list[dict]:
    """``rows`` plus, where ASIGN ran with several seeds, one row of its mean (and SD of ``pcc_gene``) per key."""
    out = list(rows)
    groups: dict = {}
    for r in rows:
        if r["method"].startswith("asign (seed"):
            groups.setdefault(tuple(r.get(k) for k in keys), []).append(r)
    for grp in groups.values():
        if len(grp) < 2:
            continue
        mean = dict(grp[0])
        for k, v in grp[0].items():
            if isinstance(v, float):
                mean[k] = float(np.mean([g[k] for g in grp]))
        mean["method"] = f"asign (mean of {len(grp)} seeds)"
        out.append(mean)
    return out


def tables(result: dict) -> str:
    L = []
    syn = result.get("synthetic")
    if syn:
        L += [
            "Synthetic (known S1; per-gene PCC / MSE against the generator's expected expression, st-net scale)",
            "",
            "| method | section | virtual spots: PCC | virtual: MSE | real spots: PCC | real: MSE | real: PCC vs counts |",
            "|---|---|---|---|---|---|---|",
        ]
        real = {(r["method"], r["section"]): r for r in _with_mean(syn["runs"].get("real", {}).get("rows", []))}
        for r in _with_mean(syn["runs"]["virtual"]["rows"]):
            q = real.get((r["method"], r["section"]), {})
            L.append(
                f"| {r['method']} | {r['section']} | {r['truth_pcc_gene']:.3f} (n={r['truth_n_spots']}) | "
                f"{r['truth_mse']:.3f} | {q.get('truth_pcc_gene', float('nan')):.3f} (n={q.get('truth_n_spots', 0)}) | "
                f"{q.get('truth_mse', float('nan')):.3f} | {q.get('counts_pcc_gene', float('nan')):.3f} |"
            )
        L.append("")
    her = result.get("her2st")
    if her:
        real = {r["method"]: r for r in _with_mean(her["runs"]["real"]["rows"], ())}
        L += [
            f"HER2ST patient C (known C2; C4 per-gene PCC / MSE against measured C4, st-net scale; virtual spots "
            f"matched to the nearest measured spot within {her['radius_um']:g} µm)",
            "",
            "| method | C4 virtual: PCC | virtual: MSE | C4 real: PCC | real: MSE | C3,C5,C6: real run | C3,C5,C6: virtual run |",
            "|---|---|---|---|---|---|---|",
        ]
        for r in _with_mean(her["runs"]["virtual"]["rows"], ()):
            q = real[r["method"]]
            L.append(
                f"| {r['method']} | {r['pcc_gene']:.3f} (n={r['n_spots']}) | {r['mse']:.3f} | "
                f"{q['pcc_gene']:.3f} (n={q['n_spots']}) | {q['mse']:.3f} | {q['C3_C5_C6_pcc_gene']:.3f} | "
                f"{r['C3_C5_C6_pcc_gene']:.3f} |"
            )
        L.append("")
    return "\n".join(L)


def _rank(row: dict) -> tuple:
    """Sort key of a row: the order of :data:`BASELINES`, then ASIGN by seed (stable within a method)."""
    order = [label for label, _, _ in BASELINES]
    m = row["method"]
    if m in order:
        return (order.index(m), 0)
    if m.startswith("asign (seed "):
        return (len(order), int(m.removeprefix("asign (seed ").rstrip(")")))
    return (len(order) + 1, 0)


def merge_part(old: dict, new: dict, record: dict) -> dict:
    """``old`` (a stored part) with the rows of ``new`` (a run of some methods) merged in.

    Rows of ``new`` replace the rows of ``old`` with the same method and section; every other row, the settings and
    the timings of ``old`` stay as they are; ``record`` (what ran, when) is appended to ``old['merged_runs']``.
    Refused (SystemExit) when ``new`` does not describe the same spots and genes: genes, make_spots lattices and, for
    HER2ST, the virtual-to-measured matching.
    """
    problems = []
    if new["genes"] != old["genes"]:
        problems.append("the modelled genes differ")
    for mode, run in new["runs"].items():
        if mode not in old["runs"]:
            problems.append(f"the stored part has no {mode!r} run")
            continue
        ref = old["runs"][mode]
        if json.dumps(run.get("make_spots", {}), default=float) != json.dumps(ref.get("make_spots", {}), default=float):
            problems.append(f"{mode}: the make_spots lattice differs")
        if "matching" in ref:
            a, b = run.get("matching", {}), ref["matching"]
            if set(a) != set(b) or any(not np.isclose(a[k], b[k], rtol=1e-9, atol=1e-9) for k in b):
                problems.append(f"{mode}: the virtual-to-measured matching differs ({a} vs {b})")
        n_key = next(k for k in ("truth_n_spots", "n_spots") if k in ref["rows"][0])
        stored_n = {r["section"]: r[n_key] for r in ref["rows"]}
        for r in run["rows"]:
            if r["section"] in stored_n and r[n_key] != stored_n[r["section"]]:
                problems.append(
                    f"{mode}: {r['method']} scored {r[n_key]} spots of {r['section']}, not {stored_n[r['section']]}"
                )
    if problems:
        msg = "Not merged into " + str(OUT) + ": " + "; ".join(problems) + "."
        raise SystemExit(msg)
    out = dict(old)
    out["runs"] = {mode: dict(run) for mode, run in old["runs"].items()}
    for mode, run in new["runs"].items():
        replaced = {(r["method"], r["section"]) for r in run["rows"]}
        kept = [r for r in old["runs"][mode]["rows"] if (r["method"], r["section"]) not in replaced]
        out["runs"][mode]["rows"] = sorted(kept + run["rows"], key=_rank)
    record = {**record, "timings": {mode: run["timings"] for mode, run in new["runs"].items()}}
    out["merged_runs"] = [*old.get("merged_runs", []), record]
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--parts", default="synthetic,her2st", help="comma-separated: synthetic, her2st")
    ap.add_argument("--her2st", default=None, help="HER2ST folder (default $ASIGN_HER2ST or ../shared/data/her2st)")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0])
    ap.add_argument("--radius-um", type=float, default=100.0, help="HER2ST: virtual-to-measured matching radius")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument(
        "--methods",
        default=",".join(METHODS),
        help="comma-separated subset of " + ", ".join(METHODS) + "; a subset's rows are merged into the existing "
        "results file (rows of other methods untouched)",
    )
    args = ap.parse_args()
    parts = [p.strip() for p in args.parts.split(",") if p.strip()]
    bad = [p for p in parts if p not in ("synthetic", "her2st")]
    if bad:
        msg = f"unknown part(s) {bad}"
        raise SystemExit(msg)
    methods = tuple(m.strip() for m in args.methods.split(",") if m.strip())
    bad = [m for m in methods if m not in METHODS]
    if bad or not methods:
        msg = f"--methods: unknown method(s) {bad}; choose among {list(METHODS)}"
        raise SystemExit(msg)
    subset = set(methods) != set(METHODS)
    result: dict = json.loads(OUT.read_text()) if OUT.exists() else {}
    missing = [p for p in parts if p not in result]
    if subset and missing:
        msg = f"--methods {args.methods} merges into {OUT}, which has no {missing} part: run all methods first"
        raise SystemExit(msg)
    import torch

    torch.set_num_threads(args.threads)

    def command(part: str) -> str:
        cmd = f"python benchmarks/bench_virtual_spots.py --parts {part} --seeds " + " ".join(map(str, args.seeds))
        return cmd + (f" --methods {','.join(methods)}" if subset else "")

    t0 = time.perf_counter()
    for part in parts:
        t = time.perf_counter()
        genes = result[part]["genes"] if subset else None
        if part == "synthetic":
            new = run_synthetic(args.seeds, methods, genes)
        else:
            new = run_her2st(her2st_path(args.her2st), args.seeds, args.radius_um, methods, genes)
        seconds = time.perf_counter() - t
        if subset:
            record = {
                "methods": [METHODS[m] for m in methods],
                "command": command(part),
                "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
                "machine": {"cpu": cpu_name(), "cores": os.cpu_count(), "torch_threads": torch.get_num_threads()},
                "versions": _versions(),
                "seconds": seconds,
            }
            result[part] = merge_part(result[part], new, record)
        else:
            result[part] = new
            result[part].update(seconds=seconds, seeds=args.seeds, command=command(part))
    if not subset:  # a merge leaves the file's date, machine and versions (those of the full runs) as they are
        result.update(
            {
                "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
                "machine": {"cpu": cpu_name(), "cores": os.cpu_count(), "torch_threads": torch.get_num_threads()},
                "versions": _versions(),
                "last_run_seconds": time.perf_counter() - t0,
            }
        )
    OUT.parent.mkdir(parents=True, exist_ok=True)
    OUT.write_text(json.dumps(result, indent=2, default=float))
    print(tables(result))


if __name__ == "__main__":
    main()
