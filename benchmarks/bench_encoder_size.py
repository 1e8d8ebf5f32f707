"""EfficientNet-Lite0 vs the larger Lite1 and Lite2 (offline ImageNet wheels): the development protocol of
bench_stain_tta / bench_encoder_depth.

Compares the multi-depth features of ``efficientnet_lite0`` (the reference, chosen in session 3),
``efficientnet_lite1`` and ``efficientnet_lite2`` (``encoder="efficientnet_lite{v}_multidepth"``: pooled last block
of the stride-8, 16 and 32 stages and the 1280-channel head, one pass), all at ``input_size=224`` as the default
encoder. The plain 1280-d head of each network is the last 1280 columns of its multi-depth matrix (a checked
identity, see bench_encoder_depth), so it is compared at no extra cost.

Development data only (HER2ST B4 and C2; never C3-C6), with the functions of ``bench_encoder_depth.py``:

- Dev A (cross-patient): ridge on spot features trained on B4 predicting C2, and trained on C2 predicting B4.
- Dev B (within C2): 4 spatial k-means blocks; ridge trained on 3 blocks predicts the 4th.

Reported: mean per-gene PCC, the per-gene paired difference to Lite0 multi-depth with its standard error, and the
feature time (wall and CPU) of B4 and C2. Writes ``benchmarks/results/encoder_size.json``.

Usage::

    python benchmarks/bench_encoder_size.py [--threads 2] [--cache DIR]
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
from _machine import dev_parser, dev_start, her2st_path, machine  # benchmarks/ is on sys.path when a script runs
from bench_encoder_depth import HEAD, deltas, extract_all, score_all
from bench_stain_tta import load

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "benchmarks" / "results" / "encoder_size.json"
ENCODERS = ("efficientnet_lite0_multidepth", "efficientnet_lite1_multidepth", "efficientnet_lite2_multidepth")
REF = ENCODERS[0]
SECTIONS = ("B4", "C2")


def variants(feats: dict) -> dict[str, dict[str, np.ndarray]]:
    """Spot feature matrices per section: each multi-depth set, then each network's 1280-d head columns."""
    out = {enc: {s: feats[(enc, s)]["spot"] for s in SECTIONS} for enc in ENCODERS}
    for enc in ENCODERS:
        out[enc.removesuffix("_multidepth") + " (head columns)"] = {s: m[:, -HEAD:] for s, m in out[enc].items()}
    return out


def table(res: dict) -> str:
    lines = [
        "| features | dim | B4→C2 | C2→B4 | Dev A mean | Δ B4→C2 | Δ C2→B4 | C2 blocks | Δ C2 blocks | feature s (B4+C2) |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    base = res["dev"][REF]
    for name, r in res["dev"].items():
        d = ["—", "—", "—"] if name == REF else deltas(r, base)
        t = res["feature_timing"].get(name)
        secs = f"{sum(v['wall_s'] for v in t.values()):.0f}" if t else "—"
        lines.append(
            f"| {name} | {r['dim']} | {r['B4->C2']:.3f} | {r['C2->B4']:.3f} | **{r['dev_a_mean']:.3f}** | {d[0]} | "
            f"{d[1]} | {r['C2 blocks']:.3f} | {d[2]} | {secs} |"
        )
    return "\n".join(lines)


def main() -> None:
    ap = dev_parser(__doc__.splitlines()[0])
    args = ap.parse_args()
    res = dev_start(args, OUT)
    if args.table:
        print(table(res))
        return
    path = her2st_path(args.her2st)
    cache = Path(args.cache) if args.cache else None
    data = {"B4": load(path, "B", "B4"), "C2": load(path, "C", "C2")}
    feats, timing = extract_all(data, ENCODERS, cache)
    res = {
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "machine": machine(),
        "threads": args.threads,
        "protocol": "bench_stain_tta Dev A (B4->C2, C2->B4) and Dev B (C2, 4 spatial blocks); spot features, "
        "ridge = StandardScaler + PCA 256 + alpha by spatial CV; 250 genes; no C3-C6 label used; input_size 224",
        "feature_timing": timing,
        "dev": {},
    }
    score_all(data, variants(feats), res, OUT)
    print(table(res))


if __name__ == "__main__":
    main()
