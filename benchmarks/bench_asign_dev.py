"""ASIGN settings on development data that never uses a label of C3-C6: spatial blocks of HER2ST C2 (issue 6).

The transductive defaults of ``method="asign"`` were chosen in session 1 on the C2 hold-out while the C3-C6 scores
were printed beside it (docs/benchmarks/asign.md says so). This benchmark gives a label-clean protocol for such
choices: the whole HER2ST C2-C6 stack is prepared as in ``bench_asign_her2st.py`` (asign's alignment, default
EfficientNet-Lite0 features, the 3D graph), C2's spots are cut into 4 spatial blocks (k-means on the spot
positions), and each block in turn is imputed from the rest of C2 (``known`` = C2 minus the block) through the
public API. The score is the per-gene PCC over the block's spots (``tl.evaluate(sections=["C2"])``: the only
unknown measured spots it reads are the block's), averaged over the 4 blocks. C3-C6 stay unlabelled; their images
and graph positions are used as in the real task, their counts never: ``tl.impute`` normalises every measured spot
into ``layers['target']``, C3-C6 included, but the predictions do not depend on those rows (the poisoned-counts
tests of ``tests/test_impute.py`` and ``tests/test_asign_impute.py``) and the script scores only the held-out C2
block.

A block's interior is far from any label (the nearest labelled spots are across the block boundary, and C3-C6
carry none), which is what imputing C4-C6 from C2 asks of the model; it is a proxy, not the task itself.

Usage::

    python benchmarks/bench_asign_dev.py [--configs default,members1,...] [--seeds 0 1] [--cache DIR] [--table]
    python benchmarks/bench_asign_dev.py --features '{"tta": "dihedral", "keep_views": true}' --tag _tta_dihedral_views \
        --configs default,views_off --seeds 0 1     # train-time view augmentation on and off

Every fit also records the per-gene PCC of its full-rank prediction (``layers['full_rank']`` where ASIGN projected,
else ``imputed``) and of that prediction projected on the first 5, 10, 20 and 40 principal gene axes of the known
spots (the ``gene_rank`` option); where ASIGN blended in the aligned neighbours it also records
``pcc_gene_by_blend``: the network's prediction re-blended post hoc with weights 0, 0.25, 0.5 and 0.75 and projected
on 10 gene axes, as ``nearest_blend=w`` would give, and ``pcc_gene_by_nearest_k``: the same at the fit's own weight
with the blend partner's k-IDW over 8, 16 and 32 known spots. Every ASIGN fit also records
``pcc_gene_by_ridge_blend``: its prediction before the projection mixed with the image ridge baseline of the same
known spots, ``(1 - v) * ASIGN + v * ridge`` for v = 0 (the fit itself), 0.1, 0.2 and 0.3, projected on 10 gene
axes, and ``pcc_gene_by_z_smooth``: its final prediction mixed with the mean prediction of each spot's unknown
neighbours in other sections (the 3D graph's cross-section edges), ``(1 - u) * own + u * mean`` for u = 0, 0.25,
0.5 and 0.75. Every fit also records ``pcc_gene_by_soft``: its full-rank prediction shrunk on all the known spots'
gene axes with weights ``s_i^2 / (s_i^2 + c median(s)^2)`` for c = 4, 8 and 16 instead of cut at a rank.
``--table`` prints the paired gains. The ``gene_rank`` default
was chosen with::

    python benchmarks/bench_asign_dev.py --tag _gene_rank --configs baselines,default --seeds 0 1
    python benchmarks/bench_asign_dev.py --features '{"encoder": "efficientnet_lite0_multidepth", "tta": "dihedral",
        "keep_views": true}' --tag _multidepth_tta_dihedral_views_gene_rank --configs baselines,default

Writes ``benchmarks/results/asign_dev_blocks{tag}.json`` (updated after every configuration); ``--features`` are
``pp.extract_features`` options of the prepared stack (cached under the same tag). Rows of seeds other than 0 are
labelled ``<config>@seed<k>`` and compared with ``default@seed<k>``.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import numpy as np
from _machine import cpu_name, her2st_path, spatial_blocks  # benchmarks/ is on sys.path when a script runs
from bench_asign_her2st import gene_rank_projected, prepare_her2st

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "benchmarks" / "results" / "asign_dev_blocks.json"
N_BLOCKS = 4
RANKS = (5, 10, 20, 40)  # gene_rank values scored post hoc on every fit's full-rank prediction
BLENDS = (0.0, 0.25, 0.5, 0.75)  # nearest_blend weights scored post hoc (then projected on 10 gene axes)
NEAREST_KS = (8, 16, 32)  # neighbours of the blend's IDW partner, scored post hoc at the fit's own weight (session 13)
RIDGE_BLENDS = (0.1, 0.2, 0.3)  # the image ridge baseline's share in the prediction, scored post hoc (session 14)
Z_SMOOTH = (0.25, 0.5, 0.75)  # share of the unknown cross-section neighbours' mean prediction, post hoc (session 14)
SOFT_C = (4.0, 8.0, 16.0)  # soft gene projection: axis i kept with weight s_i^2 / (s_i^2 + c median(s)^2) (session 16)
BASELINES = {
    "propagation": ("propagation", {"n_iter": 10}),
    "nearest 8-IDW": ("nearest", {"k": 8, "weights": "idw"}),
    "ridge": ("ridge", {}),
}
# ASIGN configurations: the transductive defaults and one change each
CONFIGS = {
    "default": {},
    "members1": {"n_models": 1},
    "visible0.5": {"visible_fraction": 0.5},
    "hidden64": {"hidden_dim": 64},
    "dropout0.2": {"input_dropout": 0.2},
    "lp20": {"lp_iterations": 20},
    "members4": {"n_models": 4},
    "members5": {"n_models": 5},
    "members10": {"n_models": 10},
    "views_off": {"view_augment": False},  # with stored per-view features (--features keep_views)
    "dropout0.3": {"input_dropout": 0.3},
    "viewcons1": {"view_consistency": 1.0},  # with stored per-view features
    "predict_views": {"predict_views": True},  # with stored per-view features
    "fscale_global": {"feature_scaling": "global"},  # one scale for all feature dimensions (session 9)
    "lpinit_net": {"lp_init": "network"},  # unknown spots start the propagation from the network (session 10)
    "mask_block": {"mask": "block"},  # contiguous visible patches instead of random visible spots (session 10)
    "fscale_dimension": {"feature_scaling": "dimension"},  # per-dimension scaling (e.g. handcrafted features)
    "pcc2": {"loss_weights": [1.0, 2.0, 0.25, 0.25]},  # the per-gene PCC term weighted twice (session 11)
    "dropout0.7": {"input_dropout": 0.7},  # stronger input dropout (session 13)
}


def blocks_of(table, section: str = "C2") -> np.ndarray:
    """Block index (0..N_BLOCKS-1) of each spot of ``section`` (k-means on the spot positions), -1 elsewhere."""
    sec = table.obs["section"].astype(str).to_numpy()
    rows = np.flatnonzero(sec == section)
    xy = np.asarray(table.obsm["spatial"], dtype=np.float64)[rows]
    out = np.full(table.n_obs, -1)
    out[rows] = spatial_blocks(xy, N_BLOCKS)
    return out


def score(sdata, known: np.ndarray, method: str, kw: dict, seed: int) -> dict:
    import asign

    t = time.perf_counter()
    out = asign.tl.impute(
        sdata,
        known=known,
        method=method,
        method_kwargs=kw,
        n_genes=250,
        inplace=False,
        seed=seed,
        show_progress_bar=False,
    )
    secs = time.perf_counter() - t
    ev = asign.tl.evaluate(out, sections=["C2"], per="overall").iloc[0]
    rec = {"pcc_gene": float(ev["pcc_gene"]), "n_spots": int(ev["n_spots"]), "seconds": secs}
    # the prediction before any gene_rank projection, and its projection on RANKS gene axes (the known spots' axes)
    full = out.copy()
    if "full_rank" in out.layers:
        full.layers["imputed"] = out.layers["full_rank"]
    rec["pcc_gene_full_rank"] = _c2_pcc(full)
    rec["pcc_gene_by_rank"] = {str(k): _c2_pcc(gene_rank_projected(full, k)) for k in RANKS}
    rec["pcc_gene_by_soft"] = {str(c): _c2_pcc(soft_projected(full, c)) for c in SOFT_C}
    # ASIGN with a blend: the network's prediction before it (undone from full_rank = (1 - w) net + w nearest),
    # re-blended post hoc with other weights and projected on 10 gene axes, as impute would with that nearest_blend
    w = float(out.uns.get("asign", {}).get("result", {}).get("nearest_blend", 0.0) or 0.0)
    if "nearest" in out.layers and 0.0 < w < 1.0:
        near = np.asarray(out.layers["nearest"], dtype=np.float64)
        net = (np.asarray(full.layers["imputed"], dtype=np.float64) - w * near) / (1.0 - w)
        rec["pcc_gene_by_blend"] = {}
        for wb in BLENDS:
            blended = full.copy()
            blended.layers["imputed"] = ((1.0 - wb) * net + wb * near).astype(np.float32)
            rec["pcc_gene_by_blend"][str(wb)] = _c2_pcc(gene_rank_projected(blended, 10))
        # the blend partner with more neighbours (k-IDW of the same known spots), at the fit's own weight
        rec["pcc_gene_by_nearest_k"] = {}
        for k in NEAREST_KS:
            near_k = asign.tl.impute(
                sdata, known=known, method="nearest", method_kwargs={"k": k, "weights": "idw"}, n_genes=250,
                inplace=False, show_progress_bar=False,
            )  # fmt: skip
            if list(near_k.var_names) != list(out.var_names):
                msg = "the nearest baseline modelled other genes than ASIGN"
                raise RuntimeError(msg)
            blended = full.copy()
            near_k_pred = np.asarray(near_k.layers["imputed"], dtype=np.float64)
            blended.layers["imputed"] = ((1.0 - w) * net + w * near_k_pred).astype(np.float32)
            rec["pcc_gene_by_nearest_k"][str(k)] = _c2_pcc(gene_rank_projected(blended, 10))
    if method == "asign":
        # a third partner: the image ridge baseline (fitted on the same known spots) mixed into the fit's prediction
        # before the projection, (1 - v) * prediction + v * ridge, projected on 10 gene axes
        ridge = asign.tl.impute(
            sdata, known=known, method="ridge", n_genes=250, inplace=False, seed=seed, show_progress_bar=False
        )
        if list(ridge.var_names) != list(out.var_names):
            msg = "the ridge baseline modelled other genes than ASIGN"
            raise RuntimeError(msg)
        ridge_pred = np.asarray(ridge.layers["imputed"], dtype=np.float64)
        rec["pcc_gene_ridge"] = _c2_pcc(ridge)
        rec["pcc_gene_by_z_smooth"] = {
            str(u): _c2_pcc(_z_smoothed(out, sdata.tables["table"], known, u)) for u in (0.0, *Z_SMOOTH)
        }
        rec["pcc_gene_by_ridge_blend"] = {}
        for v in (0.0, *RIDGE_BLENDS):
            blended = full.copy()
            pred = np.asarray(full.layers["imputed"], dtype=np.float64)
            blended.layers["imputed"] = ((1.0 - v) * pred + v * ridge_pred).astype(np.float32)
            rec["pcc_gene_by_ridge_blend"][str(v)] = _c2_pcc(gene_rank_projected(blended, 10))
    return rec


def soft_projected(out, c: float):
    """``out`` with ``imputed`` shrunk on every principal axis of the known spots' labels instead of cut at a rank:
    axis i keeps the weight ``s_i^2 / (s_i^2 + c * median(s)^2)`` (``s``: the singular values of the centred known
    labels), a Wiener-like filter whose noise level is the median axis (session 16)."""
    known = out.obs["known"].to_numpy(dtype=bool)
    Y = np.asarray(out.layers["target"][known], dtype=np.float64)
    mu = Y.mean(axis=0)
    _, s, vt = np.linalg.svd(Y - mu, full_matrices=False)
    w = s**2 / (s**2 + c * np.median(s) ** 2)
    pred = np.asarray(out.layers["imputed"], dtype=np.float64)
    o2 = out.copy()
    o2.layers["imputed"] = (mu + ((pred - mu) @ vt.T * w) @ vt).astype(np.float32)
    return o2


def _z_smoothed(out, table, known: np.ndarray, u: float):
    """``out`` with every spot's prediction mixed with the weighted mean prediction of its unknown neighbours in
    other sections (the 3D graph's cross-section edges): ``(1 - u) * own + u * mean``; spots without one unchanged."""
    import scipy.sparse as sp

    if list(out.obs_names) != list(table.obs_names):
        msg = "the prediction's rows are not the stack table's"
        raise RuntimeError(msg)
    W = sp.csr_matrix(table.obsp["asign_connectivities"], dtype=np.float64)
    sec = table.obs["section"].astype(str).to_numpy()
    W = W.tocoo()
    keep = (sec[W.row] != sec[W.col]) & ~np.asarray(known, dtype=bool)[W.col]
    W = sp.csr_matrix((W.data[keep], (W.row[keep], W.col[keep])), shape=W.shape)
    deg = np.asarray(W.sum(axis=1)).ravel()
    pred = np.asarray(out.layers["imputed"], dtype=np.float64)
    mean = np.divide(W @ pred, deg[:, None], out=pred.copy(), where=deg[:, None] > 0)
    o2 = out.copy()
    o2.layers["imputed"] = ((1.0 - u) * pred + u * mean).astype(np.float32)
    return o2


def _c2_pcc(out) -> float:
    import asign

    return float(asign.tl.evaluate(out, sections=["C2"], per="overall").iloc[0]["pcc_gene"])


def run(sdata, name: str, method: str, kw: dict, blocks: np.ndarray, seed: int = 0) -> dict:
    measured = blocks >= 0
    per_block = []
    for b in range(N_BLOCKS):
        r = score(sdata, measured & (blocks != b), method, kw, seed)
        per_block.append(r)
        print(f"{name:14s} block {b}: per-gene PCC {r['pcc_gene']:.4f} ({r['n_spots']} spots, {r['seconds']:.0f} s)")
    v = np.array([r["pcc_gene"] for r in per_block])
    return {
        "method": method,
        "method_kwargs": kw,
        "pcc_gene_mean": float(v.mean()),
        "pcc_gene_se": float(v.std(ddof=1) / np.sqrt(len(v))),
        "per_block": per_block,
    }


def _label(name: str, seed: int) -> str:
    return name if seed == 0 else f"{name}@seed{seed}"


def table(res: dict) -> str:
    rows = res.get("results", {})
    lines = [
        "| setting | per-gene PCC on the held-out C2 block (mean of 4) | Δ vs ASIGN defaults (paired, ± s.e.) | s per fit |",
        "|---|---:|---:|---:|",
    ]
    for name, r in rows.items():
        v = np.array([b["pcc_gene"] for b in r["per_block"]])
        delta = "—"
        seed = name.split("@")[1] if "@" in name else ""
        base = rows.get("default" + (f"@{seed}" if seed else ""), {}).get("per_block")
        if base is not None and name.split("@")[0] != "default":
            d = v - np.array([b["pcc_gene"] for b in base])
            delta = f"{d.mean():+.4f} ± {d.std(ddof=1) / np.sqrt(len(d)):.4f}"
        secs = np.mean([b["seconds"] for b in r["per_block"]])
        kw = ", ".join(f"{k}={v!r}" for k, v in r["method_kwargs"].items())
        label = name if r["method"] != "asign" else f"ASIGN ({kw})" if kw else "ASIGN (defaults)"
        if seed and r["method"] == "asign":
            label += f", {seed.replace('seed', 'seed ')}"
        lines.append(f"| {label} | {r['pcc_gene_mean']:.3f} | {delta} | {secs:.0f} |")
    return "\n".join(lines)


def rank_table(res: dict) -> str:
    """Per-gene PCC of every fit's full-rank prediction and its gain from a gene_rank projection (paired)."""
    lines = [
        "| setting | full rank | " + " | ".join(f"gene_rank {k}: Δ (± s.e., blocks up)" for k in RANKS) + " |",
        "|---|---:|" + "---:|" * len(RANKS),
    ]
    for name, r in res.get("results", {}).items():
        blocks = r["per_block"]
        if "pcc_gene_by_rank" not in blocks[0]:
            continue
        full = np.array([b["pcc_gene_full_rank"] for b in blocks])
        cells = []
        for k in RANKS:
            d = np.array([b["pcc_gene_by_rank"][str(k)] for b in blocks]) - full
            cells.append(f"{d.mean():+.4f} ± {d.std(ddof=1) / np.sqrt(len(d)):.4f} ({int((d > 0).sum())}/{len(d)})")
        lines.append(f"| {name} | {full.mean():.3f} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--her2st", default=None)
    ap.add_argument(
        "--cache", default=None, help="folder for the prepared HER2ST stack (shared with bench_asign_her2st)"
    )
    ap.add_argument("--configs", default=",".join(["baselines", *CONFIGS]))
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0], help="seeds of the ASIGN configurations")
    ap.add_argument("--features", default="{}", help="JSON options of pp.extract_features for the prepared stack")
    ap.add_argument("--tag", default="", help="suffix of the result file and the cache (for non-default --features)")
    ap.add_argument("--table", action="store_true", help="print the markdown table of the stored results and exit")
    args = ap.parse_args()
    out_path = OUT.with_name(f"asign_dev_blocks{args.tag}.json")
    res = json.loads(out_path.read_text()) if out_path.exists() else {}
    if args.table:
        print(table(res))
        print()
        print(rank_table(res))
        return
    import torch

    torch.set_num_threads(args.threads)
    os.environ.setdefault("ASIGN_LOGLEVEL", "WARNING")
    timings: dict = {}
    features = json.loads(args.features)
    sdata = prepare_her2st(
        her2st_path(args.her2st), Path(args.cache) if args.cache else None, timings, features, args.tag
    )
    blocks = blocks_of(sdata.tables["table"])
    res.update(
        {
            "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
            "machine": {"cpu": cpu_name(), "cores": os.cpu_count(), "torch_threads": args.threads},
            "protocol": f"HER2ST C2-C6 prepared as bench_asign_her2st.py; C2 cut into {N_BLOCKS} k-means blocks; "
            "known = C2 minus one block; per-gene PCC over that block's spots; C3-C6 counts never used "
            "(tl.impute normalises them into layers['target'], but only the held-out C2 block is scored)",
            "block_sizes": [int(np.sum(blocks == b)) for b in range(N_BLOCKS)],
            "features": {"encoder": "efficientnet_lite0", **features},
        }
    )
    res.setdefault("results", {})
    for name in args.configs.split(","):
        if name == "baselines":
            jobs = [(label, method, kw, 0) for label, (method, kw) in BASELINES.items()]
        else:
            jobs = [(_label(name, seed), "asign", CONFIGS[name], seed) for seed in args.seeds]
        for label, method, kw, seed in jobs:
            res["results"][label] = run(sdata, label, method, kw, blocks, seed)
            out_path.write_text(json.dumps(res, indent=1))
    print(table(res))


if __name__ == "__main__":
    main()
