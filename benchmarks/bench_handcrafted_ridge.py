"""Hand-crafted image statistics against EfficientNet-Lite0 features for the image-only ridge (development data).

The 73 ``"handcrafted"`` features (colour, texture, haematoxylin nucleus-density proxy) beside the 1280 default
EfficientNet-Lite0 features, for the spot patches of HER2ST C2 and B4 (the sections with a full-resolution image
outside C3-C6): ridge (``RidgeCV``, alpha by efficient leave-one-out) from

- **within a section** (Dev B of docs/encoders.md): each of the 4 spatial blocks of C2 and of B4 from the other
  three (8 fits);
- **across patients** (Dev A): all of B4 -> C2 and all of C2 -> B4.

Each feature set is centred; the hand-crafted columns are also standardised (their units differ); each set is
divided by its root total variance, so that in the combination both sets weigh alike. Within a section these
statistics come from the training spots. Across patients each section is centred, standardised and scaled on its
own spots: the test section on all of its spots (their features only, no labels), which is a per-section
normalisation of the test images, not statistics carried over from the training section. Genes: the top 250 by
mean raw count on the training spots, ``st-net``. Score: per-gene PCC over the predicted spots. No label of C3-C6
is read.

Usage::

    python benchmarks/bench_handcrafted_ridge.py [--her2st PATH] [--cache DIR]

Writes ``benchmarks/results/handcrafted_ridge.json``.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
from _machine import dev_parser, dev_start, her2st_path, machine, spatial_blocks
from bench_cross_patient import ALPHAS, N_BLOCKS, N_GENES, arrays, pcc_gene, prepared

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "benchmarks" / "results" / "handcrafted_ridge.json"
SETS = ("lite0", "handcrafted", "lite0+handcrafted")


def _scaled(M: np.ndarray, tr: np.ndarray, *, standardize: bool) -> np.ndarray:
    M = M - M[tr].mean(0)
    if standardize:
        sd = M[tr].std(0)
        M = M / np.where(sd > 0, sd, 1.0)
    return M / np.sqrt((M[tr] ** 2).sum(1).mean())


def _scores(feats: dict, C: np.ndarray, genes: list[str], tr: np.ndarray, te: np.ndarray, test=None) -> dict:
    """Ridge of each feature set, trained on rows ``tr`` (of ``feats``/``C``), scored on ``te`` (of ``test``)."""
    from sklearn.linear_model import RidgeCV

    from asign.pp._genes import normalize_counts

    top = np.argsort(-C[tr].mean(0), kind="stable")[:N_GENES]
    names = [genes[i] for i in top]
    Y = normalize_counts(C[:, top], "st-net")
    if test is None:
        test_feats, Yt = feats, Y
    else:
        test_feats, Ct, genes_t = test
        col = {g: i for i, g in enumerate(genes_t)}
        Yt = normalize_counts(Ct[:, [col[g] for g in names]], "st-net")
    out = {}
    for name in SETS:
        parts, parts_t = [], []
        for key in name.split("+"):
            std = key == "handcrafted"
            parts.append(_scaled(feats[key], tr, standardize=std))
            all_t = np.ones(len(test_feats[key]), dtype=bool)
            parts_t.append(parts[-1] if test is None else _scaled(test_feats[key], all_t, standardize=std))
        X, Xt = np.hstack(parts), np.hstack(parts_t)
        model = RidgeCV(alphas=ALPHAS).fit(X[tr], Y[tr] - Y[tr].mean(0))
        out[name] = pcc_gene(model.predict(Xt[te]), Yt[te])
    return out


def main() -> None:
    import asign

    ap = dev_parser(__doc__.splitlines()[0])
    args = ap.parse_args()
    dev_start(args, OUT)
    if args.table:
        print(json.dumps(json.loads(OUT.read_text())["summary"], indent=1))
        return
    path = her2st_path(args.her2st)
    cache = Path(args.cache) if args.cache else None
    timings: dict = {}
    data = {}
    for sec in ("C2", "B4"):
        sdata = prepared(path, sec[0], sec, cache, timings)
        xy, X, C, genes = arrays(sdata)
        t = time.perf_counter()
        hc = asign.pp.extract_features(
            sdata, encoder="handcrafted", key_added="hc", inplace=False, show_progress_bar=False
        ).features_spot
        timings[f"handcrafted_{sec}"] = time.perf_counter() - t
        data[sec] = {"xy": xy, "C": C, "genes": genes, "feats": {"lite0": X, "handcrafted": np.asarray(hc, float)}}
    rows = []
    for sec, d in data.items():
        blocks = spatial_blocks(d["xy"], N_BLOCKS)
        for b in range(N_BLOCKS):
            row = {"protocol": "within", "section": sec, "block": b}
            row |= _scores(d["feats"], d["C"], d["genes"], blocks != b, blocks == b)
            print(json.dumps(row), flush=True)
            rows.append(row)
    for src, dst in (("B4", "C2"), ("C2", "B4")):
        s, d = data[src], data[dst]
        n_src, n_dst = len(s["C"]), len(d["C"])
        row = {"protocol": "across", "train": src, "test": dst}
        row |= _scores(
            s["feats"], s["C"], s["genes"], np.ones(n_src, bool), np.ones(n_dst, bool), (d["feats"], d["C"], d["genes"])
        )
        print(json.dumps(row), flush=True)
        rows.append(row)
    within = [r for r in rows if r["protocol"] == "within"]
    summary: dict = {}
    for proto, rs in (("within", within), ("across", [r for r in rows if r["protocol"] == "across"])):
        summary[proto] = {k: float(np.mean([r[k] for r in rs])) for k in SETS}
    for other in ("handcrafted", "lite0+handcrafted"):
        g = np.array([r[other] - r["lite0"] for r in within])
        summary[f"within_gain_{other}_vs_lite0"] = {
            "mean": float(g.mean()),
            "se": float(g.std(ddof=1) / np.sqrt(g.size)),
            "up": int((g > 0).sum()),
            "fits": int(g.size),
        }
    print(json.dumps(summary, indent=1))
    record = {
        "machine": machine(),
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "timings": timings,
        "rows": rows,
        "summary": summary,
    }
    OUT.write_text(json.dumps(record, indent=1))


if __name__ == "__main__":
    main()
