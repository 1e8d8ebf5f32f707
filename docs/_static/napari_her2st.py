"""Make ``docs/_static/napari_her2st.png``: imputed expression over the aligned HER2ST sections of patient C in napari.

Needs the ``napari`` extra and a display (or Xvfb)::

    xvfb-run -a -s "-screen 0 1920x1080x24" env QT_QPA_PLATFORM=xcb QT_API=pyqt6 \
        python docs/_static/napari_her2st.py --her2st /path/to/her2st --method propagation

The stack is aligned with the published HER2ST registration (``method="transforms"``), the first section C1 is the
known section, and the others are imputed with the chosen method.
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--her2st", default=os.environ.get("ASIGN_HER2ST", "../shared/data/her2st"))
    parser.add_argument("--method", default="propagation")
    parser.add_argument("--gene", default="ERBB2")
    parser.add_argument("--out", default=str(Path(__file__).with_name("napari_her2st.png")))
    parser.add_argument("--size", default="1800,1000")
    args = parser.parse_args()

    import asign

    sdata = asign.io.read_her2st(args.her2st, patient="C")
    table = sdata.tables["table"]
    asign.pp.align_layers(sdata, method="transforms", transforms=table.uns["asign"]["her2st_transforms"])
    asign.pp.neighbors_3d(sdata)  # the 3D graph (used by "propagation" and "asign")
    if args.gene not in table.var_names:
        msg = f"Gene {args.gene!r} is not measured in HER2ST patient C."
        raise SystemExit(msg)
    asign.tl.impute(sdata, known="C1", method=args.method, n_genes=250, show_progress_bar=False)
    out = sdata.tables["asign"]
    gene = args.gene
    if gene not in out.var_names:
        msg = f"Gene {gene!r} is not among the 250 modelled genes; pick one of {list(out.var_names[:10])}, ..."
        raise SystemExit(msg)
    stack = asign._stack.get_stack(sdata)
    with_images = [s for s in stack.sections if stack.image_key(s) is not None]
    width, height = (int(v) for v in args.size.split(","))
    app = asign.pl.interactive(
        sdata, gene=gene, sections=with_images, grid=True, headless=True, window_size=(width, height)
    )
    shot = app.screenshot()
    from PIL import Image

    # a 256-colour palette keeps the committed PNG small (pre-commit's check-added-large-files)
    Image.fromarray(shot[..., :3]).quantize(colors=256).save(args.out, optimize=True)
    size_kb = Path(args.out).stat().st_size / 1024
    print(
        f"wrote {args.out} ({shot.shape[1]} x {shot.shape[0]} px, {size_kb:.0f} kB), gene {gene}, method {args.method}"
    )
    app._viewer.close()


if __name__ == "__main__":
    main()
