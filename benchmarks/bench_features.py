"""Image features on HER2ST patient C (issue 5): extraction time, image baselines, CPU throughput.

1. Throughput on the CPU (``--threads`` cores): the full pipeline (lazy patch reading from the HER2ST JPEG pyramid,
   white padding, resizing, normalisation, DataLoader, encoder) against the encoder's bare forward pass on random
   tensors of the same shape (batch, 3, 224, 224), for spot patches (224 px, no resize) and region tiles (512 px,
   resized to 224). Runs are interleaved (bare, pipeline, bare, pipeline, ...) and medians compared, because the
   machine may be shared.
2. ``asign.pp.extract_features`` on C2–C6 (every spot, all three scales, EfficientNet-Lite0 ImageNet weights),
   wall and CPU time.
3. Baselines with C2 known, scored on C3–C6 (top-250 genes by mean over C2, ST-Net normalisation; per-gene PCC
   within each section, averaged; ``asign.tl.evaluate``): ``ridge`` and ``similarity`` on spot features and on
   spot + region + global features, next to ``mean`` and ``nearest`` (5-NN IDW in the published registration).

Writes ``benchmarks/results/features.json`` and ``docs/benchmarks/features.md``.

Usage::

    python benchmarks/bench_features.py [--her2st PATH] [--threads 2] [--repeats 3] [--n-patches 192]
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SECTIONS = ["C2", "C3", "C4", "C5", "C6"]
METHODS = [
    ("mean", "mean", {}),
    ("nearest 5-IDW (published registration)", "nearest", {"k": 5, "weights": "idw"}),
    ("similarity (spot)", "similarity", {}),
    ("similarity (spot+region+global)", "similarity", {"levels": ["spot", "region", "global"]}),
    ("ridge (spot)", "ridge", {}),
    ("ridge (spot+region+global)", "ridge", {"levels": ["spot", "region", "global"]}),
]


def _default_her2st() -> Path | None:
    env = os.environ.get("ASIGN_HER2ST")
    for p in ([Path(env)] if env else []) + [ROOT.parent / "shared" / "data" / "her2st"]:
        if (p / "data" / "ST-cnts").is_dir():
            return p
    return None


def throughput(sdata, *, n_patches: int, batch_size: int, repeats: int) -> list[dict]:
    """Pipeline vs bare forward, patches/s, on one HER2ST section image."""
    import numpy as np
    import torch

    from asign._encoders import ImageSource, PatchJob, deterministic_cpu, embed_patches, get_encoder
    from asign.pp._tiles import image_level0

    table = sdata.tables["table"]
    sec = "C3"
    img = image_level0(sdata.images[f"he_{sec}"]).transpose("c", "y", "x").data
    xy = np.asarray(table.obsm["spatial"])[(table.obs["section"] == sec).to_numpy()]
    rng = np.random.default_rng(0)
    # real spot positions (cycled, jittered so that patches differ)
    pos = xy[np.arange(n_patches) % len(xy)] + rng.uniform(-40, 40, (n_patches, 2))
    enc = get_encoder("efficientnet_lite0", input_size=224).to("cpu")
    out = []
    for level, side in (("spot", 224), ("region", 512)):
        src = ImageSource(img)
        src.read([0], [0], 8)  # decode the JPEG once (it cannot be read by tile); cached afterwards
        cx = np.floor(pos + 0.5).astype(np.int64)
        job = PatchJob(0, cx[:, 0] - side // 2, cx[:, 1] - side // 2, side, np.arange(n_patches))
        x = torch.randn(batch_size, 3, 224, 224).contiguous(memory_format=torch.channels_last)
        n_batches = -(-n_patches // batch_size)

        def bare(x=x, n_batches=n_batches) -> tuple[float, float]:
            t, c = time.perf_counter(), time.process_time()
            with torch.inference_mode(), deterministic_cpu():
                for _ in range(n_batches):
                    enc.module(x)
            n = n_batches * batch_size
            return n / (time.perf_counter() - t), n / (time.process_time() - c)

        def pipe(src=src, job=job) -> tuple[float, float]:
            t, c = time.perf_counter(), time.process_time()
            embed_patches(enc, [src], [job], n_patches, batch_size=batch_size, device="cpu", show_progress_bar=False)
            return n_patches / (time.perf_counter() - t), n_patches / (time.process_time() - c)

        bare()  # warm-up (oneDNN primitive creation)
        pipe()
        b, p, bc, pc = [], [], [], []
        for _ in range(repeats):
            w, c = bare()
            b.append(w)
            bc.append(c)
            w, c = pipe()
            p.append(w)
            pc.append(c)
        rec = {
            "level": level,
            "patch_px": side,
            "input_px": 224,
            "batch_size": batch_size,
            "n_patches": n_patches,
            "bare_patches_per_s": float(np.median(b)),
            "pipeline_patches_per_s": float(np.median(p)),
            "bare_runs": b,
            "pipeline_runs": p,
            "bare_patches_per_cpu_s": float(np.median(bc)),
            "pipeline_patches_per_cpu_s": float(np.median(pc)),
        }
        rec["ratio"] = rec["pipeline_patches_per_s"] / rec["bare_patches_per_s"]
        rec["cpu_ratio"] = rec["pipeline_patches_per_cpu_s"] / rec["bare_patches_per_cpu_s"]
        print(
            f"throughput {level:6s} ({side} px -> 224): bare {rec['bare_patches_per_s']:.1f} patches/s, "
            f"pipeline {rec['pipeline_patches_per_s']:.1f} patches/s, ratio {rec['ratio']:.2f}; per CPU second: "
            f"{rec['bare_patches_per_cpu_s']:.1f} vs {rec['pipeline_patches_per_cpu_s']:.1f}, ratio {rec['cpu_ratio']:.2f}"
        )
        out.append(rec)
    return out


def extract(sdata, *, batch_size: int) -> dict:
    import asign

    t0, c0 = time.perf_counter(), time.process_time()
    asign.pp.extract_features(sdata, encoder="efficientnet_lite0", batch_size=batch_size, show_progress_bar=False)
    wall, cpu = time.perf_counter() - t0, time.process_time() - c0
    info = sdata.tables["table"].uns["asign_features"]
    res = {
        "wall_s": wall,
        "cpu_s": cpu,
        "n_spots": int(sdata.tables["table"].n_obs),
        "n_regions": int(sdata.tables["asign_regions"].n_obs),
        "n_globals": int(sdata.tables["asign_globals"].n_obs),
        "n_patches": int(info["n_patches"]),
        "n_spot_padded": int(info["n_spot_padded"]),
        "n_regions_padded": int(sdata.tables["asign_regions"].obs["padded"].sum()),
        "n_globals_padded": int(sdata.tables["asign_globals"].obs["padded"].sum()),
        "encoder": str(info["encoder"]),
        "weights": str(info["weights"]),
        "dim": int(info["dim"]),
    }
    print(
        f"extract_features C2-C6: {res['n_patches']} patches ({res['n_spots']} spots, {res['n_regions']} regions, "
        f"{res['n_globals']} globals) in {wall:.1f} s wall, {cpu:.1f} s CPU"
    )
    return res


def baselines(sdata) -> list[dict]:
    import asign

    table = sdata.tables["table"]
    asign.pp.align_layers(
        sdata, method="transforms", transforms=table.uns["asign"]["her2st_transforms"], show_progress_bar=False
    )
    rows = []
    for label, method, kw in METHODS:
        t = time.perf_counter()
        asign.tl.impute(
            sdata,
            known="C2",
            method=method,
            method_kwargs=kw,
            key_added="bench",
            overwrite=True,
            show_progress_bar=False,
        )
        secs = time.perf_counter() - t
        df = asign.tl.evaluate(sdata, key="bench", per=["section", "overall"])
        ov = df[df["level"] == "overall"].iloc[0]
        per_sec = df[df["level"] == "section"].set_index("section")["pcc_gene"].to_dict()
        res = sdata.tables["bench"].uns["asign"]["result"]
        row = {
            "method": label,
            "pcc_gene": float(ov["pcc_gene"]),
            "mse": float(ov["mse"]),
            "mae": float(ov["mae"]),
            "pcc_spot_legacy": float(ov["pcc_spot_legacy"]),
            "per_section_pcc_gene": {k: float(v) for k, v in per_sec.items()},
            "seconds": secs,
        }
        if method == "ridge":
            row["alpha"] = float(res["alpha"])
            row["n_components"] = int(res["n_components"])
        rows.append(row)
        print(
            f"{label:45s} per-gene PCC {row['pcc_gene']:.3f}  MSE {row['mse']:.3f}  per-spot {row['pcc_spot_legacy']:.3f}"
        )
    return rows


def write_markdown(results: dict, path: Path) -> None:
    ex, tp, bl = results["extract"], results["throughput"], results["baselines"]
    lines = [
        "# Image features: HER2ST patient C and throughput",
        "",
        f"Generated by `benchmarks/bench_features.py` on {results['date']} ({results['machine']}, "
        f"torch {results['torch']}, {results['threads']} CPU threads; the machine was shared with other jobs, so "
        "wall times are upper bounds — CPU time is given beside them).",
        "",
        "## Extraction: C2–C6, every spot, three scales, EfficientNet-Lite0 (ImageNet) on the CPU",
        "",
        "| sections | spots | region tiles (512 px) | global tiles (1024 px) | patches | wall (s) | CPU (s) |",
        "|---|---|---|---|---|---|---|",
        f"| C2–C6 | {ex['n_spots']} | {ex['n_regions']} ({ex['n_regions_padded']} padded) | {ex['n_globals']} "
        f"({ex['n_globals_padded']} padded) | {ex['n_patches']} | {ex['wall_s']:.0f} | {ex['cpu_s']:.0f} |",
        "",
        f"Encoder `{ex['encoder']}`, weights {ex['weights']}, {ex['dim']}-d features; spot patches 224 px, region and "
        "global tiles resized to 224 px (antialiased) before the encoder. "
        f"{ex['n_spot_padded']} spot patches cross an image border (padded white). Images are read lazily from "
        "the JPEG-backed dask pyramid (a JPEG is decoded once per file; only the chunks a patch needs are sliced).",
        "",
        "## Image baselines: C2 known, C3–C6 scored",
        "",
        "Top 250 genes by mean over C2, ST-Net normalisation ln((c+1)/Σ(c+1)); per-gene PCC within each section, "
        "averaged over genes and then sections (`asign.tl.evaluate`). `nearest` uses the published rigid "
        "registration (`align_layers(method='transforms')`), the others use no registration.",
        "",
        "| method | per-gene PCC | C3 | C4 | C5 | C6 | MSE | MAE | per-spot PCC (legacy) |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in bl:
        ps = r["per_section_pcc_gene"]
        extra = f" (alpha {r['alpha']:g}, {r['n_components']} PCs)" if "alpha" in r else ""
        lines.append(
            f"| {r['method']}{extra} | **{r['pcc_gene']:.3f}** | "
            + " | ".join(f"{ps.get(s, float('nan')):.3f}" for s in SECTIONS[1:])
            + f" | {r['mse']:.3f} | {r['mae']:.3f} | {r['pcc_spot_legacy']:.3f} |"
        )
    lines += [
        "",
        "Ridge: features → StandardScaler → PCA (≤ 256 components, fitted on C2 only) → ridge; alpha chosen by "
        "5-fold CV over spatial blocks of C2 (k-means on spot coordinates), never on C3–C6. Similarity: mean of the "
        "20 C2 spots with the highest cosine similarity of the frozen features (C2 spots: leave-one-out). "
        "method.md §7.6 quotes 0.198 for EfficientNet-Lite0 + ridge trained on four sections (leave-one-layer-out); "
        "here a single section (187 spots) trains it.",
        "",
        "## Throughput on the CPU: pipeline vs bare forward",
        "",
        "Bare: `encoder.module(x)` on random float tensors (batch, 3, 224, 224), channels-last, inference mode. "
        "Pipeline: `embed_patches` — lazy reading of real spot positions of C3 from the dask image (chunk cache), "
        "white padding, antialiased uint8 resize, DataLoader (`num_workers=0`), normalisation, channels-last, "
        "the same encoder. Medians of interleaved runs.",
        "",
        "| level | patch → input | batch | patches | bare (patches/s) | pipeline (patches/s) | pipeline / bare "
        "| bare (patches / CPU s) | pipeline (patches / CPU s) | pipeline / bare (CPU time) |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in tp:
        lines.append(
            f"| {r['level']} | {r['patch_px']} → {r['input_px']} px | {r['batch_size']} | {r['n_patches']} | "
            f"{r['bare_patches_per_s']:.1f} | {r['pipeline_patches_per_s']:.1f} | **{r['ratio']:.2f}** | "
            f"{r['bare_patches_per_cpu_s']:.1f} | {r['pipeline_patches_per_cpu_s']:.1f} | **{r['cpu_ratio']:.2f}** |"
        )
    if tp:
        lines += [
            "",
            "Wall-clock runs vary by ±30 % on the shared machine (all runs are in `benchmarks/results/features.json`); "
            "CPU time per patch is the steadier comparison. Either way, reading, padding and resizing cost little "
            "next to the encoder on a CPU.",
        ]
    gpu_file = ROOT / "benchmarks" / "results" / "gpu_features.json"
    lines += ["", "## Throughput on a GPU: pipeline vs bare forward", ""]
    if gpu_file.exists():
        g = json.loads(gpu_file.read_text())
        lines += [
            f"`benchmarks/gpu_features.py` on {g['device']} (torch {g['torch']}), {g['encoder']}, autocast "
            f"{g['autocast'].replace('torch.', '')}, channels-last, batch {g['batch_size']}, {g['n_patches']} patches "
            f"per run at random positions of a synthetic {g['slide']} slide, {g['workers']} DataLoader workers "
            "writing into a page-locked shared-memory ring (DMA on a side stream). End to end includes starting the "
            "workers and page-locking the ring; 'after the first batch' is the rate once the first batch has "
            "arrived. Pipeline features equal those of a direct read + forward of the same patches "
            f"(max |diff| {g['max_abs_diff_vs_direct']:.1e}).",
            "",
            "| level | patch → input | bare (patches/s) | pipeline end to end | ratio | after the first batch | ratio |",
            "|---|---|---|---|---|---|---|",
        ]
        for r in g["levels"]:
            lines.append(
                f"| {r['level']} | {r['patch_px']} → 224 px | {r['bare_patches_per_s']:.0f} | "
                f"{r['pipeline_patches_per_s']:.0f} | **{r['ratio']:.2f}** | {r['pipeline_steady_patches_per_s']:.0f} | "
                f"**{r['steady_ratio']:.2f}** |"
            )
        lv = {r["level"]: r for r in g["levels"]}
        sp = lv.get("spot", {"ratio": float("nan"), "steady_ratio": float("nan")})
        lines += [
            "",
            f"Spot patches (no resize) reach {sp['ratio']:.2f} of the bare forward end to end and "
            f"{sp['steady_ratio']:.2f} once running. Region tiles "
            "are resized 512 → 224 px on the CPU inside the workers (antialiased uint8 interpolation); with 16 cores "
            "that resize, not reading, caps them at about a third of an H100's EfficientNet-Lite0 rate. Resizing on "
            "the GPU (transfer native tiles, interpolate there) would lift that limit at the cost of about 5x more "
            "host-to-device traffic and pinned memory; not done yet.",
        ]
    else:
        lines += ["Not run yet: `PYTHONPATH=src python benchmarks/gpu_features.py` on a CUDA machine."]
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(lines) + "\n")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--her2st", type=Path, default=_default_her2st())
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--n-patches", type=int, default=192)
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--skip-throughput", action="store_true")
    ap.add_argument(
        "--only-throughput", action="store_true", help="rerun the throughput part only, keep the other results"
    )
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "features.json")
    ap.add_argument("--doc", type=Path, default=ROOT / "docs" / "benchmarks" / "features.md")
    args = ap.parse_args()
    os.environ.setdefault("OMP_NUM_THREADS", str(args.threads))
    import torch

    torch.set_num_threads(args.threads)
    import asign

    if args.her2st is None:
        msg = "HER2ST folder not found; pass --her2st or set ASIGN_HER2ST."
        raise SystemExit(msg)
    sdata = asign.io.read_her2st(args.her2st, patient="C", sections=SECTIONS)
    results = {
        "date": dt.datetime.now().strftime("%Y-%m-%d %H:%M"),
        "machine": f"{platform.machine()}, {os.cpu_count()} CPUs",
        "torch": torch.__version__,
        "threads": args.threads,
    }
    results["throughput"] = (
        []
        if args.skip_throughput
        else throughput(sdata, n_patches=args.n_patches, batch_size=args.batch_size, repeats=args.repeats)
    )
    if args.only_throughput:
        old = json.loads(args.out.read_text())
        results["extract"], results["baselines"] = old["extract"], old["baselines"]
    else:
        results["extract"] = extract(sdata, batch_size=args.batch_size)
        results["baselines"] = baselines(sdata)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2))
    write_markdown(results, args.doc)
    print(f"wrote {args.out} and {args.doc}")


if __name__ == "__main__":
    main()
