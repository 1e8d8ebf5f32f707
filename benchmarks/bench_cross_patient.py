"""Does a second patient's labelled image data help the image->expression map? (issue 6, development data only).

HER2ST has full-resolution images for patient C (C2-C6) and for one section of patient B (B4). ASIGN's
transductive mode learns the image->expression map from the known section alone (C2, 187 spots); B4 (283 spots)
could add labelled examples. Asked first of the image-only regression, which is cheap: each of the 4 spatial
blocks of C2 (k-means on the spot positions, as ``bench_asign_dev.py``) is predicted from the rest of C2 by ridge on
the EfficientNet-Lite0 spot features, with and without every B4 spot added to the training set; and the same the
other way round (B4 blocks, with and without C2). Each sample's features and labels are centred on its own training
spots (patients differ in stain and in mean expression); genes are the top 250 by mean raw count on the target's
training spots, ``st-net`` normalised; alpha by ``RidgeCV`` (efficient leave-one-out) on the training rows. The
score is the per-gene PCC over the block's spots. No label of C3-C6 is read.

Usage::

    python benchmarks/bench_cross_patient.py [--her2st PATH] [--cache DIR] [--threads 2]

Writes ``benchmarks/results/cross_patient_ridge.json``.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
from _machine import dev_parser, dev_start, her2st_path, machine, spatial_blocks

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "benchmarks" / "results" / "cross_patient_ridge.json"
N_BLOCKS = 4
N_GENES = 250
ALPHAS = np.logspace(-1, 5, 13)


def prepared(path: Path, patient: str, section: str, cache: Path | None, timings: dict):
    """One section read with ``io.read_her2st`` and its default features (cached as zarr)."""
    import spatialdata as sd

    import asign

    target = cache / f"cross_patient_{section}.zarr" if cache else None
    if target is not None and target.exists():
        return sd.read_zarr(target)
    t = time.perf_counter()
    sdata = asign.io.read_her2st(path, patient=patient, sections=[section])
    asign.pp.extract_features(sdata, encoder="efficientnet_lite0", show_progress_bar=False)
    timings[f"features_{section}"] = time.perf_counter() - t
    if target is not None:
        target.parent.mkdir(parents=True, exist_ok=True)
        sdata.write(target, overwrite=True)
    return sdata


def arrays(sdata) -> tuple[np.ndarray, np.ndarray, np.ndarray, list[str]]:
    t = sdata.tables["table"]
    counts = t.X.toarray() if hasattr(t.X, "toarray") else np.asarray(t.X)
    return (
        np.asarray(t.obsm["spatial"], dtype=np.float64),
        np.asarray(t.obsm["asign_features_spot"], dtype=np.float64),
        np.asarray(counts, dtype=np.float64),
        [str(g) for g in t.var_names],
    )


def pcc_gene(pred: np.ndarray, truth: np.ndarray) -> float:
    """Mean over genes of the Pearson correlation across spots (genes constant in either are skipped)."""
    p = pred - pred.mean(0)
    y = truth - truth.mean(0)
    den = np.sqrt((p**2).sum(0) * (y**2).sum(0))
    ok = den > 0
    return float(np.mean((p * y).sum(0)[ok] / den[ok]))


def block_fits(target: tuple, other: tuple, name: str) -> list[dict]:
    from sklearn.linear_model import RidgeCV

    from asign.pp._genes import normalize_counts

    xy, X, C, genes = target
    _, Xo, Co, genes_o = other
    col = {g: i for i, g in enumerate(genes_o)}
    blocks = spatial_blocks(xy, N_BLOCKS)
    rows = []
    for b in range(N_BLOCKS):
        tr, te = blocks != b, blocks == b
        top = np.argsort(-C[tr].mean(0), kind="stable")[:N_GENES]
        Y = normalize_counts(C[:, top], "st-net")
        Yo = normalize_counts(Co[:, [col[genes[i]] for i in top]], "st-net")
        Xc, Yc = X - X[tr].mean(0), Y - Y[tr].mean(0)
        Xoc, Yoc = Xo - Xo.mean(0), Yo - Yo.mean(0)
        own = RidgeCV(alphas=ALPHAS).fit(Xc[tr], Yc[tr])
        both = RidgeCV(alphas=ALPHAS).fit(np.vstack([Xc[tr], Xoc]), np.vstack([Yc[tr], Yoc]))
        alone = RidgeCV(alphas=ALPHAS).fit(Xoc, Yoc)
        row = {
            "target": name,
            "block": b,
            "n_train": int(tr.sum()),
            "n_test": int(te.sum()),
            "own": pcc_gene(own.predict(Xc[te]), Y[te]),
            "own+other": pcc_gene(both.predict(Xc[te]), Y[te]),
            "other only": pcc_gene(alone.predict(Xc[te]), Y[te]),
            "alpha": {"own": float(own.alpha_), "own+other": float(both.alpha_), "other only": float(alone.alpha_)},
        }
        print(json.dumps(row), flush=True)
        rows.append(row)
    return rows


def main() -> None:
    ap = dev_parser(__doc__.splitlines()[0])
    args = ap.parse_args()
    dev_start(args, OUT)
    if args.table:
        rec = json.loads(OUT.read_text())
        print(json.dumps(rec["summary"], indent=1))
        return
    path = her2st_path(args.her2st)
    cache = Path(args.cache) if args.cache else None
    timings: dict = {}
    data = {s: arrays(prepared(path, s[0], s, cache, timings)) for s in ("C2", "B4")}
    rows = block_fits(data["C2"], data["B4"], "C2") + block_fits(data["B4"], data["C2"], "B4")
    gain = np.array([r["own+other"] - r["own"] for r in rows])
    summary = {k: float(np.mean([r[k] for r in rows])) for k in ("own", "own+other", "other only")} | {
        "gain_own+other_vs_own": float(gain.mean()),
        "gain_se": float(gain.std(ddof=1) / np.sqrt(gain.size)),
        "fits_up": int((gain > 0).sum()),
        "fits": int(gain.size),
    }
    print(json.dumps(summary))
    OUT.write_text(
        json.dumps(
            {
                "machine": machine(),
                "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
                "timings": timings,
                "rows": rows,
                "summary": summary,
            },
            indent=1,
        )
    )


if __name__ == "__main__":
    main()
