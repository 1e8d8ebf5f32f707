"""Stain normalisation and test-time augmentation of frozen image features: the development protocol.

Defaults are chosen on development data only (HER2ST B4 and C2; never C3-C6):

- Dev A (cross-patient): ridge on frozen spot features trained on B4 predicting C2, and trained on C2 predicting B4
  (each a separate stack, features extracted per stack). Genes: the 250 with the largest mean raw count on the
  training section among the genes both sections share; ST-Net normalisation.
- Dev B (within C2): 4 spatial blocks (k-means on spot positions); ridge trained on 3 blocks predicts the 4th
  (genes ranked on the training blocks).

The ridge is asign's image baseline (``tl._image_baselines._fit_ridge``: StandardScaler, PCA 256, alpha by CV over 5
spatial blocks of the training spots). Metric: mean per-gene Pearson correlation (constant genes count as 0). Because
the CV choice of alpha on ~200 training spots is itself noisy, Dev A is also scored at fixed alphas (1e4, 1e5, 1e6;
mean over the three), and the per-gene differences to the plain features are given with their standard error.

Stain targets: ``reference`` (the fixed Macenko standard) or ``train`` (the training section's own estimate,
transferred to the test stack through ``stain_target=<uns['asign_features']['stain_target_params']>``).

With ``--headline`` it also runs, once, the project's headline ridge (HER2ST C, known C2, predict C3-C6, public
API) with the old feature options and the given ones (the chosen defaults, and options reported beside them); those
numbers are not used to choose anything.

Writes ``benchmarks/results/stain_tta.json``.

Usage::

    python benchmarks/bench_stain_tta.py [--threads 1] [--cache DIR] [--only none/-/none,...] [--table]
    python benchmarks/bench_stain_tta.py --headline STAIN/TARGET/TTA[,...]   # once, after choosing
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
from _machine import (  # benchmarks/ is on sys.path when a script runs
    dev_parser,
    dev_start,
    her2st_path,
    machine,
    spatial_blocks,
)

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "benchmarks" / "results" / "stain_tta.json"
# (stain_norm, target, tta), in the order they are run (cheapest and most informative first)
CONFIGS = [
    ("none", "-", "none"),
    ("macenko", "reference", "none"),
    ("macenko", "train", "none"),
    ("od_scale", "train", "none"),
    ("none", "-", "flips"),
    ("none", "-", "dihedral"),
    ("macenko", "reference", "flips"),
    ("macenko", "reference", "dihedral"),
    ("od_scale", "train", "dihedral"),
    ("macenko", "train", "dihedral"),
]
LEVELS = {"spot": ["spot"], "all": ["spot", "region", "global"]}
FIXED_ALPHAS = (1e4, 1e5, 1e6)


def label(cfg) -> str:
    return "/".join(cfg)


def load(path: Path, patient: str, section: str):
    import asign

    return asign.io.read_her2st(path, patient=patient, sections=[section])


def extract(sdata, cfg, target_params=None, cache: Path | None = None) -> dict:
    """Features of one single-section stack; returns spot/region/global matrices, timings and the stain target."""
    import pickle

    import asign

    if cache is not None and cache.exists():
        return pickle.loads(cache.read_bytes())

    stain, target, tta = cfg
    if stain == "none":
        st = "auto"
    elif target == "reference":
        st = "reference"
    else:
        st = target_params if target_params is not None else "median"  # a 1-section stack: its own estimate
    t, c = time.perf_counter(), time.process_time()
    out = asign.pp.extract_features(
        sdata, stain_norm=stain, stain_target=st, tta=tta, inplace=False, show_progress_bar=False
    )
    res = {
        "spot": out.features_spot,
        "region": out.features_region,
        "global": out.features_global,
        "wall_s": time.perf_counter() - t,
        "cpu_s": time.process_time() - c,
        "n_patches": out.params["n_patches"],
        "target": out.params.get("stain_target_params"),
    }
    if stain != "none":
        res["matrix"] = np.asarray(out.params["stain_matrix"][0]).round(4).tolist()
    if cache is not None:
        cache.parent.mkdir(parents=True, exist_ok=True)
        cache.write_bytes(pickle.dumps(res))
    return res


def expression(table, genes):
    from asign.pp._genes import counts_block, st_net

    block, _ = counts_block(table, np.arange(table.n_obs), genes)
    return st_net(block)


def top_genes(table, rows, candidates, n=250):
    from asign.pp._genes import gene_indices

    X = table.X[rows][:, gene_indices(table, candidates)]
    means = np.asarray(X.mean(axis=0)).ravel()
    order = np.argsort(-means, kind="stable")[:n]
    return [candidates[i] for i in order]


def ridge_pcc(Xtr, Ytr, xy_tr, Xte, Yte, alphas=None) -> np.ndarray:
    from asign.tl._evaluate import pearson
    from asign.tl._image_baselines import DEFAULT_ALPHAS, _fit_ridge, _spatial_groups

    groups = _spatial_groups(xy_tr, 5, 0)
    alphas = DEFAULT_ALPHAS if alphas is None else np.asarray(alphas, dtype=float)
    model, _ = _fit_ridge(Xtr, Ytr, groups, n_components=256, alphas=alphas, cv=5, seed=0)
    r, _, _ = pearson(Yte, model.predict(Xte), axis=0)
    return r


def features(f, levels):
    return np.concatenate([np.asarray(f[lv], dtype=np.float64) for lv in LEVELS[levels]], axis=1)


def cross_patient_splits(data):
    """Dev A's two directions, B4 -> C2 and C2 -> B4: ``(train, test, Y_train, Y_test, xy_train)`` each, with the
    top genes of the training section among the genes both sections measured."""
    for tr, te in (("B4", "C2"), ("C2", "B4")):
        ttr, tte = data[tr].tables["table"], data[te].tables["table"]
        common = [g for g in ttr.var_names if g in set(tte.var_names)]
        genes = top_genes(ttr, np.arange(ttr.n_obs), common)
        xy = np.asarray(ttr.obsm["spatial"], dtype=np.float64)
        yield tr, te, expression(ttr, genes), expression(tte, genes), xy


def dev_a(data, feats) -> dict:
    """Cross-patient: B4 -> C2 and C2 -> B4."""
    out = {}
    for tr, te, Ytr, Yte, xy in cross_patient_splits(data):
        for lv in LEVELS:
            Xtr = features(feats[(tr, "self")], lv)
            Xte = features(feats[(te, f"from_{tr}")], lv)
            r = ridge_pcc(Xtr, Ytr, xy, Xte, Yte)
            out[f"{tr}->{te} {lv}"] = float(np.mean(r))
            out[f"{tr}->{te} {lv} per gene"] = r.tolist()
            if lv == "spot":  # robustness: fixed alphas (the CV choice of alpha on ~200 spots is itself noisy)
                fixed = [float(np.mean(ridge_pcc(Xtr, Ytr, xy, Xte, Yte, [a]))) for a in FIXED_ALPHAS]
                out[f"{tr}->{te} spot fixed alphas"] = fixed
    return out


def dev_b(data, feats, n_blocks=4) -> dict:
    """Within C2: spatially blocked CV (k-means blocks on spot positions)."""
    t = data["C2"].tables["table"]
    xy = np.asarray(t.obsm["spatial"], dtype=np.float64)
    blocks = spatial_blocks(xy, n_blocks)
    out = {}
    for lv in LEVELS:
        X = features(feats[("C2", "self")], lv)
        scores = []
        for b in range(n_blocks):
            tr, te = np.flatnonzero(blocks != b), np.flatnonzero(blocks == b)
            genes = top_genes(t, tr, list(t.var_names))
            Y = expression(t, genes)
            scores.append(float(np.mean(ridge_pcc(X[tr], Y[tr], xy[tr], X[te], Y[te]))))
        out[f"C2 blocks {lv}"] = float(np.mean(scores))
        out[f"C2 blocks {lv} per block"] = scores
    return out


def run_config(data, cfg, cache: Path | None) -> dict:
    feats, timing = {}, {}

    def where(name):
        return None if cache is None else cache / f"{label(cfg).replace('/', '_')}_{name}.pkl"

    for s in ("B4", "C2"):
        r = extract(data[s], cfg, cache=where(s))
        feats[(s, "self")] = r
        timing[s] = {"wall_s": r["wall_s"], "cpu_s": r["cpu_s"], "n_patches": r["n_patches"]}
    for s, other in (("B4", "C2"), ("C2", "B4")):
        if cfg[0] != "none" and cfg[1] == "train":
            r = extract(data[s], cfg, target_params=feats[(other, "self")]["target"], cache=where(f"{s}_from_{other}"))
            feats[(s, f"from_{other}")] = r
            timing[f"{s} (target {other})"] = {"wall_s": r["wall_s"], "cpu_s": r["cpu_s"]}
        else:
            feats[(s, f"from_{other}")] = feats[(s, "self")]
    res = {"config": label(cfg), "timing": timing}
    res.update(dev_a(data, feats))
    res.update(dev_b(data, feats))
    res["dev_a_spot_mean"] = float(np.mean([res["B4->C2 spot"], res["C2->B4 spot"]]))
    res["dev_a_spot_fixed_alpha_mean"] = float(
        np.mean([res["B4->C2 spot fixed alphas"], res["C2->B4 spot fixed alphas"]])
    )
    res["matrices"] = {k[0] + " " + k[1]: v.get("matrix") for k, v in feats.items() if v.get("matrix") is not None}
    return res


def paired(res: dict, cfg: str, base: str = "none/-/none") -> dict:
    """Dev A, spot features: mean per-gene PCC difference to ``base`` and its standard error over genes."""
    out = {}
    for d in ("B4->C2", "C2->B4"):
        a = np.asarray(res["dev"][cfg][f"{d} spot per gene"])
        b = np.asarray(res["dev"][base][f"{d} spot per gene"])
        diff = a - b
        out[d] = (float(diff.mean()), float(diff.std(ddof=1) / np.sqrt(len(diff))))
    return out


def table(res: dict) -> str:
    """Markdown table of the development figures."""
    lines = [
        "| stain_norm / target / tta | B4→C2 | C2→B4 | Dev A mean | Δ vs none (± s.e. over genes) | "
        "Dev A, fixed α | C2 blocks | Dev A mean, 3 scales | C2 blocks, 3 scales | features s (B4 + C2) |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for cfg, r in res["dev"].items():
        pr = paired(res, cfg) if "none/-/none" in res["dev"] else {}
        delta = ", ".join(f"{m:+.3f}±{e:.3f}" for m, e in pr.values()) if cfg != "none/-/none" else "—"
        secs = r["timing"]["B4"]["wall_s"] + r["timing"]["C2"]["wall_s"]
        all_a = 0.5 * (r["B4->C2 all"] + r["C2->B4 all"])
        lines.append(
            f"| {cfg} | {r['B4->C2 spot']:.3f} | {r['C2->B4 spot']:.3f} | **{r['dev_a_spot_mean']:.3f}** | {delta} | "
            f"{r.get('dev_a_spot_fixed_alpha_mean', float('nan')):.3f} | "
            f"{r['C2 blocks spot']:.3f} | {all_a:.3f} | {r['C2 blocks all']:.3f} | {secs:.0f} |"
        )
    return "\n".join(lines)


def cost(path: Path, repeat: int = 2) -> dict:
    """Seconds of extract_features on C2 alone (wall, CPU, stain estimation) per option, at the current threads."""
    import torch

    import asign
    from asign.pp._stain import apply_od_map_torch

    sdata = load(path, "C", "C2")
    out: dict = {}
    for _ in range(repeat):
        for sn in ("none", "macenko", "od_scale"):
            t, c = time.perf_counter(), time.process_time()
            r = asign.pp.extract_features(sdata, stain_norm=sn, inplace=False, show_progress_bar=False)
            out.setdefault(sn, []).append(
                {
                    "wall_s": time.perf_counter() - t,
                    "cpu_s": time.process_time() - c,
                    "stain_estimation_s": float(r.params.get("stain_seconds", 0.0)),
                }
            )
    x = torch.randint(0, 256, (16, 3, 224, 224)).float()
    M = torch.eye(3).expand(16, 3, 3).contiguous()
    t = time.perf_counter()
    for _ in range(10):
        apply_od_map_torch(x, M)
    out["od_map_s_per_16x224px_batch"] = (time.perf_counter() - t) / 10
    return out


def ridge_headline(path: Path, **feature_options) -> dict:
    """HER2ST C, known C2 -> C3-C6: ``extract_features(**feature_options)`` and the ridge baseline through the public
    API, scored with ``tl.evaluate`` (run once per option set; never used for a choice). The ridge reads only the
    spot features, so the stack is not aligned.
    """
    import asign

    sdata = asign.io.read_her2st(path, patient="C", sections=["C2", "C3", "C4", "C5", "C6"])
    t, c = time.perf_counter(), time.process_time()
    asign.pp.extract_features(sdata, **feature_options, show_progress_bar=False)
    wall, cpu = time.perf_counter() - t, time.process_time() - c
    asign.tl.impute(sdata, known="C2", method="ridge", n_genes=250, key_added="ridge", show_progress_bar=False)
    scores = asign.tl.evaluate(sdata, key="ridge")
    overall = scores[scores["level"] == "overall"].iloc[0]
    return {"pcc_gene": float(overall["pcc_gene"]), "features_wall_s": wall, "features_cpu_s": cpu}


def headline(path: Path, cfgs) -> dict:
    """The headline ridge (:func:`ridge_headline`) for each stain/target/tta configuration."""
    out = {}
    for cfg in cfgs:
        stain, target, tta = cfg
        out[label(cfg)] = ridge_headline(
            path, stain_norm=stain, stain_target="auto" if stain == "none" else target, tta=tta
        )
        print("headline", label(cfg), out[label(cfg)], flush=True)
    return out


def main() -> None:
    ap = dev_parser(__doc__.splitlines()[0])
    ap.add_argument("--only", default=None, help="comma-separated config labels (stain/target/tta)")
    ap.add_argument("--cost", action="store_true", help="only time the stain options on C2 (1 section)")
    ap.add_argument("--headline", default=None, help="chosen config stain/target/tta: run the C2 -> C3-C6 ridge once")
    args = ap.parse_args()
    res = dev_start(args, OUT)
    if args.table:
        print(table(res))
        return
    path = her2st_path(args.her2st)
    res.update(
        {
            "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
            "machine": machine(),
            "encoder": "efficientnet_lite0 (ImageNet), spot 224 / region 512 / global 1024 px, input 224",
        }
    )
    res.setdefault("dev", {})
    if args.cost:
        res["cost_C2"] = {"threads": args.threads, **cost(path)}
        OUT.write_text(json.dumps(res, indent=1))
        print(json.dumps(res["cost_C2"]))
        return
    if args.headline is None or args.only is not None:
        data = {"B4": load(path, "B", "B4"), "C2": load(path, "C", "C2")}
        todo = CONFIGS if args.only is None else [tuple(c.split("/")) for c in args.only.split(",")]
        for cfg in todo:
            r = run_config(data, cfg, Path(args.cache) if args.cache else None)
            r["threads"] = args.threads
            res["dev"][label(cfg)] = r
            print(json.dumps({k: v for k, v in r.items() if "per gene" not in k and k != "matrices"}), flush=True)
            OUT.write_text(json.dumps(res, indent=1))
    if args.headline is not None:
        chosen = [tuple(c.split("/")) for c in args.headline.split(",")]
        cfgs = [("none", "-", "none")] + [c for c in chosen if c != ("none", "-", "none")]
        res["headline"] = {
            "note": "HER2ST C, known C2 -> C3-C6, ridge (public API). Run once after the defaults were chosen on "
            "Dev A/B; not used for any choice.",
            "threads": args.threads,
            "results": headline(path, cfgs),
        }
        OUT.write_text(json.dumps(res, indent=1))


if __name__ == "__main__":
    main()
