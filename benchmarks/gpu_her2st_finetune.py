"""Encoder fine-tuning on real data: HER2ST C, known C2 -> C3-C6, frozen vs fine-tuned EfficientNet-Lite0 (issue 6).

The paper fine-tunes its spot encoder; asign's ``finetune_encoder=True`` does the same but is far too slow on a CPU
(every training step runs the encoder on all 910 spot patches). This script splits the experiment so that the
GPU machine, which has neither anndata nor spatialdata nor the HER2ST images, only trains:

1. ``pack`` (here, with the development environment and ``ASIGN_HER2ST``): prepares HER2ST C2-C6 exactly as
   ``asign.tl.impute(known="C2", method="asign")`` would (asign's alignment, default features, the 3D graph, the top
   250 genes of C2), captures the method's context through a registered stand-in method, and writes the transductive
   ASIGN members' training samples and validation sets (each member's own hold-out split, as ``fit_contexts`` draws
   them), the prediction sample and the 910 spot patches (JPEG, quality 90) to ``.gpu_carry/her2st_C/`` (~25 MB;
   the labels of C3-C6 are not in it). The scoring template (with the C3-C6 targets) stays in ``/tmp``.
2. ``run`` (on the GPU, ``PYTHONPATH=src``, EfficientNet-Lite0 packages from ``.gpu_carry``): for each variant
   (``frozen``: the pipeline's features; ``finetune``: ``finetune_encoder=True`` with the default encoder settings)
   trains the 3 members with :func:`asign._model._member.train_member` and predicts C2-C6, averaging the members as
   ``predict_context`` does; writes ``gpu_her2st_finetune.npz`` (predictions) and ``.json`` (times, epochs,
   validation scores, peak memory) to ``$OUT``.
3. ``score`` (here): per-gene PCC (and the legacy metric) of each variant on C3-C6 with ``asign.tl.evaluate``, as
   the members' average, projected on 10 gene axes of C2, and blended with the aligned 8-IDW then projected (the
   ``nearest_blend`` and ``gene_rank`` defaults of ``impute``), written to ``benchmarks/results/gpu_her2st_finetune.json``.

The choice between the variants may only use the validation scores on held-out C2 spots (printed by ``run``);
the C3-C6 figures are for reporting.

Usage::

    python benchmarks/gpu_her2st_finetune.py pack [--her2st PATH]            # here, ~2 min
    python benchmarks/gpu_her2st_finetune.py run [--out DIR] [--smoke]       # GPU (about 2 min on an H100)
    python benchmarks/gpu_her2st_finetune.py score --preds DIR/gpu_her2st_finetune.npz
"""

from __future__ import annotations

import argparse
import io
import json
import os
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
PACK = ROOT / ".gpu_carry" / "her2st_C"
TEMPLATE = Path("/tmp/asign_her2st_C_template.h5ad")
RESULT = ROOT / "benchmarks" / "results" / "gpu_her2st_finetune.json"
KNOWN = "C2"
VARIANTS = ("frozen", "finetune")


# ------------------------------------------------------------------------------------------------------ pack
def pack(args: argparse.Namespace) -> None:
    import dataclasses

    import torch
    from _machine import her2st_path
    from PIL import Image

    import asign
    from asign._device import spawn_seeds
    from asign.tl._asign import _context_patches, _member_data, sample_tensors, split_params, tensor_options
    from asign.tl._registry import ImputeResult, register_method

    t0 = time.perf_counter()
    sdata = asign.io.read_her2st(her2st_path(args.her2st), patient="C", sections=["C2", "C3", "C4", "C5", "C6"])
    asign.pp.align_layers(sdata, show_progress_bar=False)
    asign.pp.extract_features(sdata, encoder="efficientnet_lite0", show_progress_bar=False)
    asign.pp.neighbors_3d(sdata, similarity_key="asign_features_spot")
    captured = {}

    @register_method("_capture_context")
    def _capture(ctx):  # the context impute(method="asign") would get; predicts nothing useful
        captured["ctx"] = ctx
        return ImputeResult(imputed=np.zeros((ctx.table.n_obs, len(ctx.genes)), dtype=np.float32))

    template = asign.tl.impute(
        sdata, known=KNOWN, method="_capture_context", n_genes=250, inplace=False, show_progress_bar=False
    )
    ctx = captured["ctx"]
    cfg, opts = split_params({}, seed=args.seed, transductive=True)
    tkw = tensor_options(cfg, opts)
    pred = sample_tensors(ctx, tile_targets=False, **tkw)
    members = []
    for seed in spawn_seeds(int(cfg.seed), int(opts["n_models"])):
        mcfg = cfg.replace(seed=seed)
        (train,), (val,) = _member_data([ctx], mcfg, tkw, "holdout")  # one sample; it also validates
        assert val.sample is train
        # only what differs from the prediction sample (labels, tile targets): the file stays small
        diff = {}
        for f in dataclasses.fields(train):
            a, b = getattr(train, f.name), getattr(pred, f.name)
            same = a is b or (torch.is_tensor(a) and torch.is_tensor(b) and a.shape == b.shape and torch.equal(a, b))
            if not same:
                diff[f.name] = a
        members.append({"config": mcfg, "train_diff": diff, "eval_rows": val.eval_rows})
    y_eval = val.y_eval  # the same for every member: the known labels (NaN -> 0), read only at hold-out rows
    patches = _context_patches(ctx, opts["feature_key"], 224).numpy()
    jpeg = []
    for p in patches:
        buf = io.BytesIO()
        Image.fromarray(np.ascontiguousarray(p.transpose(1, 2, 0))).save(buf, format="JPEG", quality=90)
        jpeg.append(buf.getvalue())
    PACK.mkdir(parents=True, exist_ok=True)
    torch.save(
        {
            "members": members,
            "predict": pred,
            "y_eval": y_eval,
            "n_genes": len(ctx.genes),
            "genes": list(ctx.genes),
            "encoder": {"encoder": "efficientnet_lite0", "weights": None, "input_size": 224},
            "patches_jpeg": jpeg,
            "sections": [str(x) for x in np.asarray(ctx.section_codes)],
        },
        PACK / "pack.pt",
    )
    template.write_h5ad(TEMPLATE)
    size = (PACK / "pack.pt").stat().st_size / 2**20
    print(
        f"packed {len(members)} members, {len(jpeg)} patches -> {PACK / 'pack.pt'} ({size:.1f} MiB) in "
        f"{time.perf_counter() - t0:.0f} s; template {TEMPLATE}"
    )


# ------------------------------------------------------------------------------------------------------- run
def _decode(jpeg: list[bytes]):
    import torch
    from PIL import Image

    arr = np.stack([np.asarray(Image.open(io.BytesIO(b)).convert("RGB")) for b in jpeg])
    return torch.from_numpy(arr).permute(0, 3, 1, 2).contiguous()


def run(args: argparse.Namespace) -> None:
    import torch

    from asign._model import ValidationSet, predict_sample
    from asign._model._member import rebuild_member, replace_samples, train_member

    cuda = torch.cuda.is_available()
    device = "cuda" if cuda else "cpu"
    data = torch.load(PACK / "pack.pt", weights_only=False)  # our own file, written by `pack`
    patches = _decode(data["patches_jpeg"])
    out_dir = Path(args.out or os.environ.get("OUT") or "/tmp")
    out_dir.mkdir(parents=True, exist_ok=True)
    record = {
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "device": torch.cuda.get_device_name(0) if cuda else "cpu",
        "torch": torch.__version__,
        "smoke": bool(args.smoke),
        "variants": {},
    }
    preds = {}
    for variant in args.variants.split(","):
        t_var = time.perf_counter()
        if cuda:
            torch.cuda.reset_peak_memory_stats()
        outs, recs = [], []
        for m in data["members"]:
            cfg = m["config"].replace(finetune_encoder=variant == "finetune")
            if args.smoke:
                cfg = cfg.replace(max_epochs=1, steps_per_epoch=1)
            train = [data["predict"].replace(**m["train_diff"])]
            validation = [ValidationSet(sample=train[0], y_eval=data["y_eval"], eval_rows=m["eval_rows"])]
            spec = None
            if variant == "finetune":
                train, validation = replace_samples(train, validation, lambda s: s.replace(patches=patches))
                spec = data["encoder"]
            dims, state, rec = train_member(train, validation, cfg, data["n_genes"], device, finetune=spec)
            model = rebuild_member(data["n_genes"], dims, cfg, state, rec)
            s = data["predict"]
            if "spot_encoder" in rec:
                s = s.replace(patches=patches, x_spot=torch.zeros((s.n_spots, rec["spot_encoder"]["dim"])))
            outs.append(predict_sample(model, s, device=device, amp=cfg.amp))
            recs.append({k: rec.get(k) for k in ("seed", "epochs_run", "best_epoch", "best_score", "seconds")})
            print(variant, json.dumps(recs[-1]), flush=True)
        preds.update({f"{variant}_{k}": np.mean([o[k] for o in outs], axis=0) for k in outs[0]})
        record["variants"][variant] = {
            "members": recs,
            "validation_pcc_mean": float(np.mean([r["best_score"] for r in recs])),
            "seconds": time.perf_counter() - t_var,
            "peak_gpu_memory_gib": torch.cuda.max_memory_allocated() / 2**30 if cuda else None,
        }
        np.savez_compressed(out_dir / "gpu_her2st_finetune.npz", **preds)  # after every variant
        (out_dir / "gpu_her2st_finetune.json").write_text(json.dumps(record, indent=1))
    print(json.dumps({v: r["validation_pcc_mean"] for v, r in record["variants"].items()}), "->", out_dir)


# ----------------------------------------------------------------------------------------------------- score
def score(args: argparse.Namespace) -> None:
    import anndata as ad
    from bench_asign_her2st import gene_rank_projected

    import asign
    from asign.tl._asign import TRANSDUCTIVE_OPTIONS
    from asign.tl._baselines import idw_nearest

    tpl = ad.read_h5ad(TEMPLATE)
    preds = np.load(args.preds)
    run_rec = json.loads(Path(args.preds).with_suffix(".json").read_text())
    result = {"run": run_rec, "scores": {}}
    for variant in VARIANTS:
        if f"{variant}_pred" not in preds:
            continue
        out = tpl.copy()
        out.layers["imputed"] = preds[f"{variant}_pred"].astype(np.float32)
        overall = asign.tl.evaluate(out, per="overall").iloc[0]
        per_sec = asign.tl.evaluate(out, per="section")
        # the members' average is the full-rank prediction; impute's transductive default then blends it with the
        # aligned 8-IDW of the known spots (nearest_blend: TRANSDUCTIVE_OPTIONS, 0.25 since session 9; 0.5 before) and
        # projects it on 10 gene axes of the known spots (gene_rank=10): scored projected alone and blended + projected
        projected = asign.tl.evaluate(gene_rank_projected(out, 10), per="overall").iloc[0]
        known = out.obs["known"].to_numpy(dtype=bool)
        Y = np.where(known[:, None], np.asarray(out.layers["target"], dtype=np.float64), np.nan)
        near, _ = idw_nearest(np.asarray(out.obsm["spatial_aligned"], dtype=np.float64), Y, known, k=8)
        by_blend = {}
        for w in sorted({float(TRANSDUCTIVE_OPTIONS["nearest_blend"]), 0.5}):
            blended = out.copy()
            blended.layers["imputed"] = ((1 - w) * out.layers["imputed"] + w * near).astype(np.float32)
            by_blend[w] = asign.tl.evaluate(gene_rank_projected(blended, 10), per="overall").iloc[0]
        default = by_blend[float(TRANSDUCTIVE_OPTIONS["nearest_blend"])]
        result["scores"][variant] = {
            "pcc_gene": float(overall["pcc_gene"]),
            "pcc_spot_legacy": float(overall["pcc_spot_legacy"]),
            "mse": float(overall["mse"]),
            "per_section": {str(r["section"]): float(r["pcc_gene"]) for _, r in per_sec.iterrows()},
            "pcc_gene_rank10": float(projected["pcc_gene"]),
            "pcc_spot_legacy_rank10": float(projected["pcc_spot_legacy"]),
            "pcc_gene_default": float(default["pcc_gene"]),
            "pcc_spot_legacy_default": float(default["pcc_spot_legacy"]),
            "nearest_blend_default": float(TRANSDUCTIVE_OPTIONS["nearest_blend"]),
            "pcc_gene_by_blend": {str(w): float(r["pcc_gene"]) for w, r in by_blend.items()},
        }
        print(variant, json.dumps(result["scores"][variant]))
    target = Path("/tmp/gpu_her2st_finetune_smoke.json") if run_rec.get("smoke") else RESULT  # no smoke numbers here
    target.write_text(json.dumps(result, indent=1))
    print("->", target)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("step", choices=["pack", "run", "score"])
    ap.add_argument("--her2st", default=None)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default=None)
    ap.add_argument("--preds", default=None)
    ap.add_argument("--smoke", action="store_true", help="one step per member (checks the script, no numbers)")
    ap.add_argument("--variants", default=",".join(VARIANTS), help="run: which of frozen,finetune")
    args = ap.parse_args()
    sys.path.insert(0, str(ROOT / "benchmarks"))
    {"pack": pack, "run": run, "score": score}[args.step](args)


if __name__ == "__main__":
    main()
