"""Make ``docs/_static/napari_her2st.png``: imputed expression over the aligned HER2ST sections of patient C in napari.

The stack is the one of the HER2ST tutorial and benchmark: sections C2-C6 (C1 has no image), asign's own alignment
(``align_layers``, ANTs rigid), EfficientNet-Lite0 features, the 3D graph with image similarity, C2 known and C3-C6
imputed with ``--method`` (default ``asign``, default options, seed 0).

Two stages, so that the model and the viewer may live in different environments:

- ``predict`` (needs torch, i.e. asign's own dependencies): prepares the stack, imputes, and writes the stack without
  its images (shapes and tables, alignment included) to ``--work``;
- ``view`` (needs the ``napari`` extra and a display, or Xvfb): reads the HER2ST images again, restores the
  alignment and the output table from ``--work``, and saves the screenshot.

``all`` runs both in one process. Example with two environments::

    python docs/_static/napari_her2st.py predict --her2st /path/to/her2st --work /tmp/her2st_napari
    xvfb-run -a -s "-screen 0 1920x1080x24" env QT_QPA_PLATFORM=xcb QT_API=pyqt6 \
        /path/to/napari-venv/bin/python docs/_static/napari_her2st.py view --her2st /path/to/her2st \
        --work /tmp/her2st_napari

``--prepared`` reuses a stack that is already aligned, with features and the graph, without images (for example
the cache written by ``benchmarks/bench_asign_her2st.py --cache``): ``predict`` then only imputes.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import warnings
from pathlib import Path

SECTIONS = ["C2", "C3", "C4", "C5", "C6"]
KNOWN = "C2"


def _light(sdata):
    """The stack without images (shapes and tables); the manifest then lists no image, as the contract requires."""
    from spatialdata import SpatialData

    out = SpatialData(shapes=dict(sdata.shapes), tables=dict(sdata.tables))
    stack = out.tables["table"].uns["asign"]["stack"]
    stack["image_key"] = [""] * len(stack["section"])
    return out


def predict(args: argparse.Namespace) -> Path:
    import spatialdata as sd
    import torch

    import asign

    torch.set_num_threads(args.threads)
    if args.prepared and Path(args.prepared).exists():
        sdata = _light(sd.read_zarr(args.prepared))
        print(f"prepared stack read from {args.prepared}")
    else:
        sdata = asign.io.read_her2st(args.her2st, patient="C", sections=SECTIONS)
        asign.pp.align_layers(sdata, show_progress_bar=False)
        asign.pp.extract_features(sdata, encoder="efficientnet_lite0", show_progress_bar=False)
        asign.pp.neighbors_3d(sdata, similarity_key="asign_features_spot")
        sdata = _light(sdata)
    asign.tl.impute(sdata, known=KNOWN, method=args.method, n_genes=250, seed=0, show_progress_bar=False)
    ev = asign.tl.evaluate(sdata, key="asign", per="overall").iloc[0]
    print(f"{args.method}: per-gene PCC on {', '.join(SECTIONS[1:])} = {ev['pcc_gene']:.3f}")
    target = Path(args.work) / f"her2st_C_{args.method}.zarr"
    target.parent.mkdir(parents=True, exist_ok=True)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="zarr v3 autosharding")  # zarr's notice of a future default
        sdata.write(target, overwrite=True)
    return target


def view(args: argparse.Namespace) -> None:
    import numpy as np
    import spatialdata as sd

    import asign

    light = sd.read_zarr(Path(args.work) / f"her2st_C_{args.method}.zarr")
    alignment = light.tables["table"].uns["asign"]["alignment"]
    sdata = asign.io.read_her2st(args.her2st, patient="C", sections=SECTIONS)
    # the alignment computed in `predict`, re-applied to the images (no new registration)
    asign.pp.align_layers(
        sdata,
        method="transforms",
        transforms={s: np.asarray(m) for s, m in alignment["transforms"].items()},
        reference=str(alignment["reference"]),
        show_progress_bar=False,
    )
    out = light.tables["asign"]
    sdata.tables["asign"] = out
    gene = args.gene
    if gene not in out.var_names:
        msg = f"Gene {gene!r} is not among the 250 modelled genes; pick one of {list(out.var_names[:10])}, ..."
        raise SystemExit(msg)
    width, height = (int(v) for v in args.size.split(","))
    app = asign.pl.interactive(sdata, gene=gene, grid=True, headless=True, window_size=(width, height))
    shot = app.screenshot()
    from PIL import Image

    # a 256-colour palette keeps the committed PNG small (pre-commit's check-added-large-files)
    Image.fromarray(shot[..., :3]).quantize(colors=256).save(args.out, optimize=True)
    size_kb = Path(args.out).stat().st_size / 1024
    print(
        f"wrote {args.out} ({shot.shape[1]} x {shot.shape[0]} px, {size_kb:.0f} kB), gene {gene}, method {args.method}"
    )
    app._viewer.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("stage", nargs="?", default="all", choices=["all", "predict", "view"])
    parser.add_argument("--her2st", default=os.environ.get("ASIGN_HER2ST", "../shared/data/her2st"))
    parser.add_argument("--method", default="asign")
    parser.add_argument("--gene", default="ERBB2")
    parser.add_argument(
        "--work",
        default=str(Path(tempfile.gettempdir()) / "asign_her2st_napari"),
        help="folder for the stack without images",
    )
    parser.add_argument("--prepared", default=None, help="aligned stack with features and graph, no images")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", default=str(Path(__file__).with_name("napari_her2st.png")))
    parser.add_argument("--size", default="1800,1000")
    args = parser.parse_args()
    if args.stage in ("all", "predict"):
        predict(args)
    if args.stage in ("all", "view"):
        view(args)


if __name__ == "__main__":
    main()
