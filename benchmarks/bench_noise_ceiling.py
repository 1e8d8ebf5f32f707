"""How high can the per-gene PCC of a section go? A counting-noise ceiling for HER2ST (context for issue 6's 0.36).

A spot's measured count is a draw around the spot's true expression. Even a perfect predictor of the true
expression correlates with the measured values only up to the measurement's reliability. This script estimates that
ceiling for the primary metric (per-gene PCC within a section, averaged over genes) by **binomial thinning**: every
count ``c`` is split into ``c1 ~ Binomial(c, 1/2)`` and ``c2 = c - c1``, two independent half-depth measurements of
the same spots when counts are Poisson given the expression. Both halves are normalised like the task
(``st-net`` over the modelled genes). The per-gene correlation ``r`` of the halves is the reliability of a
half-depth measurement. The Spearman-Brown formula ``2r / (1 + r)`` extends it to full depth, and its square root is
the correlation of the true expression with one full-depth measurement: the ceiling.

The estimator is checked on simulated counts whose true expression is known (``--check``): Poisson counts drawn
around a spatially smoothed version of a real section, with the exact ceiling computed by Monte Carlo.

This reads the counts of every section it reports, held-out ones included. It describes the data. It selects nothing:
no option, model or gene list comes from it. The genes are the task's: the top 250 by mean raw count on the known
section (C2 for patient C, ``<P>1`` for the other patients).

Usage::

    python benchmarks/bench_noise_ceiling.py [--her2st PATH] [--patients C] [--draws 5] [--check] [--table]

Writes ``benchmarks/results/noise_ceiling.json``.
"""

from __future__ import annotations

import json
import time

import numpy as np
from _machine import ROOT, her2st_path, machine  # benchmarks/ is on sys.path when a script runs

OUT = ROOT / "benchmarks" / "results" / "noise_ceiling.json"
N_GENES = 250
PATIENTS = "ABCDEFGH"


def known_section(patient: str) -> str:
    """The known layer of the task: C2 for patient C (C1 has no image), else the first section."""
    return "C2" if patient == "C" else f"{patient}1"


def section_counts(sdata, genes: list[str] | None = None) -> tuple[dict[str, np.ndarray], dict, list[str]]:
    """Dense raw counts ``(spots, genes)`` per section, the spots' array positions, and the gene list."""
    table = sdata.tables["table"]
    names = list(map(str, table.var_names))
    cols = [names.index(g) for g in genes] if genes is not None else list(range(len(names)))
    X = table.layers["counts"] if "counts" in table.layers else table.X
    sec = table.obs["section"].astype(str).to_numpy()
    out, pos = {}, {}
    for s in dict.fromkeys(sec):
        rows = np.flatnonzero(sec == s)
        block = X[rows][:, cols]
        out[s] = np.asarray(block.toarray() if hasattr(block, "toarray") else block, dtype=np.int64)
        pos[s] = table.obs.iloc[rows][["array_row", "array_col"]].to_numpy(dtype=np.float64)
    return out, pos, [names[c] for c in cols]


def top_genes(counts: np.ndarray, names: list[str], n: int = N_GENES) -> list[str]:
    """The ``n`` genes with the largest mean raw count (method.md §2.1), ties by name."""
    mean = counts.mean(axis=0)
    order = sorted(range(len(names)), key=lambda j: (-mean[j], names[j]))
    return [names[j] for j in order[:n]]


def split_half_ceiling(counts: np.ndarray, rng: np.random.Generator, draws: int) -> dict[str, np.ndarray]:
    """Per-gene half-depth reliability ``r`` and the full-depth ceiling ``sqrt(2r / (1 + r))`` (0 where r <= 0)."""
    from asign.pp._genes import st_net
    from asign.tl._evaluate import pearson

    rs = []
    for _ in range(draws):
        c1 = rng.binomial(counts, 0.5)
        r, _, _ = pearson(st_net(c1), st_net(counts - c1), axis=0)
        rs.append(r)
    r = np.mean(rs, axis=0)
    rel = np.where(r > 0, 2 * r / (1 + r), 0.0)
    return {"r_half": r, "ceiling": np.sqrt(rel)}


def check_estimator(counts: np.ndarray, pos: np.ndarray, rng: np.random.Generator, draws: int) -> dict:
    """Simulated section with known expression: the thinning estimate against the exact Monte Carlo ceiling."""
    from scipy.spatial import cKDTree

    from asign.pp._genes import st_net
    from asign.tl._evaluate import pearson

    # true expression: each spot's counts averaged with its 6 nearest array neighbours (a smooth, realistic truth)
    _, nb = cKDTree(pos).query(pos, k=7)
    lam = counts[nb].mean(axis=1)
    expected = np.mean([st_net(rng.poisson(lam)) for _ in range(400)], axis=0)  # E[y | expression]
    exact, est = [], []
    for _ in range(5):
        sim = rng.poisson(lam)
        exact.append(pearson(expected, st_net(sim), axis=0)[0])
        est.append(split_half_ceiling(sim, rng, draws)["ceiling"])
    exact_g, est_g = np.mean(exact, axis=0), np.mean(est, axis=0)
    return {
        "exact_ceiling": float(exact_g.mean()),
        "estimated_ceiling": float(est_g.mean()),
        "per_gene_abs_error_mean": float(np.abs(est_g - exact_g).mean()),
        "n_spots": int(counts.shape[0]),
    }


def table(res: dict) -> str:
    lines = [
        "| patient | known section (genes from) | section | spots | mean count per spot (250 genes) | half-depth r | "
        "ceiling of the per-gene PCC |",
        "|---|---|---|---:|---:|---:|---:|",
    ]
    for p, r in res.get("patients", {}).items():
        for s, v in r["sections"].items():
            lines.append(
                f"| {p} | {r['known']} | {s} | {v['n_spots']} | {v['mean_count']:.0f} | {v['r_half']:.3f} | "
                f"{v['ceiling']:.3f} |"
            )
    return "\n".join(lines)


def main() -> None:
    import argparse

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--her2st", default=None)
    ap.add_argument("--patients", default=PATIENTS)
    ap.add_argument("--draws", type=int, default=5, help="thinning draws averaged per section")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--check", action="store_true", help="also check the estimator on simulated counts (C2)")
    ap.add_argument("--table", action="store_true", help="print the markdown table of the stored results and exit")
    args = ap.parse_args()
    res = json.loads(OUT.read_text()) if OUT.exists() else {}
    if args.table:
        print(table(res))
        return
    import asign

    root = her2st_path(args.her2st)
    rng = np.random.default_rng(args.seed)
    res.update({"date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "machine": machine()})
    res.setdefault("patients", {})
    res["method"] = (
        f"binomial thinning (p = 1/2, {args.draws} draws), st-net over the top {N_GENES} genes of the known section, "
        "per-gene PCC of the halves within the section, Spearman-Brown to full depth, square root"
    )
    for p in args.patients:
        sdata = asign.io.read_her2st(root, patient=p, images=False)
        counts, pos, names = section_counts(sdata)
        known = known_section(p)
        genes = top_genes(counts[known], names)
        counts, pos, _ = section_counts(sdata, genes)
        entry = {"known": known, "sections": {}}
        for s, c in counts.items():
            est = split_half_ceiling(c, rng, args.draws)
            entry["sections"][s] = {
                "n_spots": int(c.shape[0]),
                "mean_count": float(c.sum(axis=1).mean()),
                "r_half": float(est["r_half"].mean()),
                "ceiling": float(est["ceiling"].mean()),
            }
        # the task's unknown sections: every other section (for C: C3-C6; C1 has no image and is not in the task)
        unknown = [v["ceiling"] for s, v in entry["sections"].items() if s != known and s != "C1"]
        entry["ceiling_unknown_sections"] = float(np.mean(unknown))
        res["patients"][p] = entry
        print(f"patient {p}: ceiling over the unknown sections {entry['ceiling_unknown_sections']:.3f}", flush=True)
        if args.check and p == "C":
            res["check"] = check_estimator(counts[known], pos[known], rng, args.draws)
            print("check on simulated C2:", res["check"], flush=True)
        OUT.write_text(json.dumps(res, indent=1))
    print(table(res))


if __name__ == "__main__":
    main()
