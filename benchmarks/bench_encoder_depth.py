"""Multi-depth EfficientNet-Lite0 features vs the plain 1280-d head: the development protocol of bench_stain_tta.

Compares ``encoder="efficientnet_lite0"`` (global average pool of the 1280-channel head) with
``encoder="efficientnet_lite0_multidepth"`` (the same network and weights, one forward pass; global average pools of
the last block of the stride-8, 16 and 32 stages, 40 + 112 + 320 channels, and of the head, concatenated: 1752-d).
The tapped depths were fixed before any score was seen: one tap per output resolution, as a feature pyramid (timm's
``features_only`` ``out_indices=(2, 3, 4)``).

Development data only (HER2ST B4 and C2; never C3-C6), with the functions of ``bench_stain_tta.py`` (imported):

- Dev A (cross-patient): ridge on spot features trained on B4 predicting C2, and trained on C2 predicting B4.
- Dev B (within C2): 4 spatial k-means blocks; ridge trained on 3 blocks predicts the 4th.

The ridge is asign's image baseline (StandardScaler, PCA 256, alpha by spatially blocked CV). Reported: mean per-gene
PCC, the per-gene paired difference to the plain encoder with its standard error over genes (Dev B: over
block x gene pairs), Dev A at fixed alphas, and the feature time (wall and CPU, 1 thread). Two derived feature sets
come from the same multi-depth matrices at no extra cost: ``head`` (its last 1280 columns: must equal the plain
features, a check) and ``stages`` (the 472 stage columns without the head).

With ``--headline`` it runs once the project's headline ridge (HER2ST C, known C2 -> C3-C6, public API) with the
plain and the multi-depth encoder (same call, same machine); those numbers are not used for any choice. Writes ``benchmarks/results/encoder_depth.json``.

Usage::

    python benchmarks/bench_encoder_depth.py [--threads 1] [--cache DIR]
    python benchmarks/bench_encoder_depth.py --headline  # once, only if Dev A (both ways) and Dev B improved
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
from bench_stain_tta import FIXED_ALPHAS, cross_patient_splits, expression, load, ridge_headline, ridge_pcc, top_genes

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "benchmarks" / "results" / "encoder_depth.json"
PLAIN, MULTI = "efficientnet_lite0", "efficientnet_lite0_multidepth"
HEAD = 1280
NOTE = (
    "HER2ST C, known C2 -> C3-C6, ridge (public API: read_her2st, align_layers(method='transforms', the published "
    "registration), extract_features(encoder=...), impute(method='ridge', known='C2', n_genes=250), evaluate), plain "
    "and multi-depth in the same call. Run once, after Dev A/B showed the multi-depth features better in all three "
    "comparisons; not used for any choice. Plain figure reported before: 0.179."
)


def extract(sdata, encoder: str, cache: Path | None = None) -> dict:
    """Spot / region / global features of a one-section stack with ``encoder`` (cached as a pickle)."""
    import pickle

    import asign

    if cache is not None and cache.exists():
        return pickle.loads(cache.read_bytes())
    t, c = time.perf_counter(), time.process_time()
    out = asign.pp.extract_features(sdata, encoder=encoder, inplace=False, show_progress_bar=False)
    res = {
        "spot": np.asarray(out.features_spot, dtype=np.float32),
        "region": np.asarray(out.features_region, dtype=np.float32),
        "global": np.asarray(out.features_global, dtype=np.float32),
        "wall_s": time.perf_counter() - t,
        "cpu_s": time.process_time() - c,
        "n_patches": int(out.params["n_patches"]),
    }
    if cache is not None:
        cache.parent.mkdir(parents=True, exist_ok=True)
        cache.write_bytes(pickle.dumps(res))
    return res


def extract_all(data: dict, encoders, cache: Path | None) -> tuple[dict, dict]:
    """Features of every section of ``data`` with each encoder (``{(encoder, section): ...}``) and their timings."""
    feats, timing = {}, {}
    for enc in encoders:
        for s in data:
            r = extract(data[s], enc, cache=None if cache is None else cache / f"{enc}_{s}.pkl")
            feats[(enc, s)] = r
            timing.setdefault(enc, {})[s] = {k: r[k] for k in ("wall_s", "cpu_s", "n_patches")}
            print(enc, s, timing[enc][s], flush=True)
    return feats, timing


def score_all(data: dict, feature_sets: dict[str, dict[str, np.ndarray]], res: dict, out: Path) -> None:
    """Dev A and Dev B of every feature set into ``res["dev"]``, written to ``out`` after each."""
    for name, X in feature_sets.items():
        r = {"dim": int(X["B4"].shape[1])}
        r.update(dev_a(data, X))
        r.update(dev_b(data, X))
        r["dev_a_mean"] = float(np.mean([r["B4->C2"], r["C2->B4"]]))
        res["dev"][name] = r
        print(name, {k: v for k, v in r.items() if "per " not in k}, flush=True)
        out.write_text(json.dumps(res, indent=1))


def variants(feats: dict) -> dict[str, dict[str, np.ndarray]]:
    """Spot feature matrices per section for each compared feature set."""
    out = {
        PLAIN: {s: feats[(PLAIN, s)]["spot"] for s in ("B4", "C2")},
        MULTI: {s: feats[(MULTI, s)]["spot"] for s in ("B4", "C2")},
    }
    out["multidepth: head columns"] = {s: m[:, -HEAD:] for s, m in out[MULTI].items()}
    out["multidepth: stage columns"] = {s: m[:, :-HEAD] for s, m in out[MULTI].items()}
    return out


def dev_a(data, X: dict[str, np.ndarray]) -> dict:
    out = {}
    for tr, te, Ytr, Yte, xy in cross_patient_splits(data):
        Xtr, Xte = np.asarray(X[tr], np.float64), np.asarray(X[te], np.float64)
        r = ridge_pcc(Xtr, Ytr, xy, Xte, Yte)
        out[f"{tr}->{te}"] = float(np.mean(r))
        out[f"{tr}->{te} per gene"] = r.tolist()
        out[f"{tr}->{te} fixed alphas"] = [float(np.mean(ridge_pcc(Xtr, Ytr, xy, Xte, Yte, [a]))) for a in FIXED_ALPHAS]
    return out


def dev_b(data, X: dict[str, np.ndarray], n_blocks: int = 4) -> dict:
    """Within C2, the blocks of ``bench_stain_tta.dev_b``; keeps the per-gene PCC of each block."""
    t = data["C2"].tables["table"]
    xy = np.asarray(t.obsm["spatial"], dtype=np.float64)
    blocks = spatial_blocks(xy, n_blocks)
    Xc = np.asarray(X["C2"], np.float64)
    per_block = []
    for b in range(n_blocks):
        tr, te = np.flatnonzero(blocks != b), np.flatnonzero(blocks == b)
        genes = top_genes(t, tr, list(t.var_names))
        Y = expression(t, genes)
        per_block.append(ridge_pcc(Xc[tr], Y[tr], xy[tr], Xc[te], Y[te]).tolist())
    return {
        "C2 blocks": float(np.mean([np.mean(r) for r in per_block])),
        "C2 blocks per block": [float(np.mean(r)) for r in per_block],
        "C2 blocks per gene": [v for r in per_block for v in r],
    }


def paired(a, b) -> tuple[float, float]:
    d = np.asarray(a) - np.asarray(b)
    return float(d.mean()), float(d.std(ddof=1) / np.sqrt(len(d)))


def deltas(r: dict, base: dict) -> list[str]:
    """Paired per-gene differences of ``r`` to ``base`` (± s.e.): B4->C2, C2->B4, C2 blocks."""
    keys = ("B4->C2 per gene", "C2->B4 per gene", "C2 blocks per gene")
    return ["{:+.4f} ± {:.4f}".format(*paired(r[k], base[k])) for k in keys]


def forward_cost(repeat: int = 5, batch: int = 32) -> dict:
    """Seconds per forward pass of a (batch, 3, 224, 224) float batch (CPU, current threads; median of ``repeat``)."""
    import torch

    from asign._encoders import get_encoder

    x = torch.randint(0, 256, (batch, 3, 224, 224), dtype=torch.uint8)
    out = {}
    for name in (PLAIN, MULTI, PLAIN, MULTI):  # interleaved, twice, against drift on a shared machine
        enc = get_encoder(name).to("cpu")
        with torch.inference_mode():
            enc(x)
            ts = []
            for _ in range(repeat):
                t = time.perf_counter()
                enc(x)
                ts.append(time.perf_counter() - t)
        out.setdefault(name, []).append(float(np.median(ts)))
    return {k: float(min(v)) for k, v in out.items()} | {"batch": batch, "input": 224}


def table(res: dict) -> str:
    lines = [
        "| features | dim | B4→C2 | C2→B4 | Dev A mean | Δ B4→C2 | Δ C2→B4 | Dev A fixed α | C2 blocks | Δ C2 blocks |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    base = res["dev"][PLAIN]
    for name, r in res["dev"].items():
        d = ["—", "—", "—"] if name == PLAIN else deltas(r, base)
        fixed = float(np.mean([r["B4->C2 fixed alphas"], r["C2->B4 fixed alphas"]]))
        lines.append(
            f"| {name} | {r['dim']} | {r['B4->C2']:.3f} | {r['C2->B4']:.3f} | **{r['dev_a_mean']:.3f}** | {d[0]} | "
            f"{d[1]} | {fixed:.3f} | {r['C2 blocks']:.3f} | {d[2]} |"
        )
    return "\n".join(lines)


def headline(path: Path) -> dict:
    """HER2ST C, known C2 -> C3-C6, ridge through the public API, plain and multi-depth (run once; no choice)."""
    out = {}
    for enc in (PLAIN, MULTI):
        out[enc] = ridge_headline(path, encoder=enc)
        print("headline", enc, out[enc], flush=True)
    return out


def main() -> None:
    ap = dev_parser(__doc__.splitlines()[0])
    ap.add_argument("--headline", action="store_true", help="run the C2 -> C3-C6 ridge once (plain and multi-depth)")
    args = ap.parse_args()
    res = dev_start(args, OUT)
    if args.table:
        print(table(res))
        return
    path = her2st_path(args.her2st)
    if args.headline:
        res["headline"] = {
            "note": NOTE,
            "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
            "threads": args.threads,
            "results": headline(path),
        }
        OUT.write_text(json.dumps(res, indent=1))
        print(json.dumps(res["headline"]), flush=True)
        return
    cache = Path(args.cache) if args.cache else None
    data = {"B4": load(path, "B", "B4"), "C2": load(path, "C", "C2")}
    feats, timing = extract_all(data, (PLAIN, MULTI), cache)
    diff = {s: float(np.abs(feats[(MULTI, s)]["spot"][:, -HEAD:] - feats[(PLAIN, s)]["spot"]).max()) for s in data}
    res = {
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "machine": machine(),
        "threads": args.threads,
        "protocol": "bench_stain_tta Dev A (B4->C2, C2->B4) and Dev B (C2, 4 spatial blocks); spot features, "
        "ridge = StandardScaler + PCA 256 + alpha by spatial CV; 250 genes; no C3-C6 label used",
        "taps": "efficientnet_lite0 blocks 4, 10, 15 (end of the stride-8/16/32 stages: 40, 112, 320 ch) + head 1280",
        "feature_timing": timing,
        "head_columns_max_abs_diff_to_plain": diff,
        "forward_s_per_batch": forward_cost(),
        "dev": {},
        **({"headline": res["headline"]} if "headline" in res else {}),
    }
    score_all(data, variants(feats), res, OUT)
    print(table(res))


if __name__ == "__main__":
    main()
