"""Command-line entry point: ``asign demo``."""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
import warnings
from pathlib import Path

HER2ST_PATIENTS = tuple("ABCDEFGH")
# the demo writes this record into the spot table; an existing store that has it is the output of an earlier demo
DEMO_RECORD = ("tables", "table", "uns", "asign", "demo")
# set to 1 (or pass --debug) for the full traceback of an error that the command line reports in one line
DEBUG_ENV = "ASIGN_DEBUG"


def _user_errors() -> tuple[type[BaseException], ...]:
    """Errors that describe a problem of the input (arguments, files, data, disk): one line, no traceback.

    Other exceptions are bugs of asign and keep their traceback.
    """
    from asign.io import StackValidationError

    return (OSError, ValueError, KeyError, StackValidationError)


def _message(e: BaseException) -> str:
    text = str(e.args[0]) if isinstance(e, KeyError) and len(e.args) == 1 else str(e)
    return text or type(e).__name__


def _check_out(parser: argparse.ArgumentParser, out: Path) -> None:
    """``--out`` can be written: not a file, and its nearest existing parent is a folder in which we can create files."""
    if out.exists() and not out.is_dir():
        parser.error(f"--out {out} is a file; the demo writes a zarr store (a folder): choose another path.")
    parent = out.absolute().parent
    while not parent.exists() and not parent.is_symlink() and parent != parent.parent:
        parent = parent.parent
    if not parent.is_dir():
        parser.error(f"--out {out} cannot be created: {parent} is a file, not a folder; choose another path.")
    try:  # creating a file is the reliable test of write permission (os.access is not: ACLs, root)
        with tempfile.TemporaryFile(dir=parent):
            pass
    except OSError as e:
        parser.error(f"--out {out} cannot be created: {parent} is not writable ({e.strerror or e}).")


def _is_demo_store(path: Path) -> bool:
    return (path / "zarr.json").is_file() and path.joinpath(*DEMO_RECORD).is_dir()


def _check_args(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """Refuse bad arguments before any work (argparse's usage error, exit status 2)."""
    from asign._encoders import available_encoders

    out = Path(args.out)
    _check_out(parser, out)
    if out.exists() and not args.overwrite and not _is_demo_store(out):
        parser.error(
            f"--out {out} exists and is not the store of an earlier `asign demo`; choose another path or pass "
            "--overwrite to replace it (everything at that path is deleted)."
        )
    if args.n_sections < 2:
        parser.error(f"--n-sections must be at least 2 (one known section and one to impute), got {args.n_sections}.")
    if args.encoder not in available_encoders() and not args.encoder.startswith("timm:"):
        parser.error(f"unknown --encoder {args.encoder!r}; available: {', '.join(available_encoders())}.")
    if args.her2st is not None:
        cnt = Path(args.her2st) / "data" / "ST-cnts"
        if not cnt.is_dir():
            parser.error(f"--her2st {args.her2st} is not a HER2ST folder (no {cnt}); see asign.datasets.her2st.")
        if not any(cnt.glob(f"{args.patient}[0-9]*.tsv*")):
            parser.error(f"--her2st {args.her2st} has no count files of patient {args.patient} in {cnt}.")


def _demo(args: argparse.Namespace) -> int:
    import asign

    t0 = time.perf_counter()
    steps: list[tuple[str, float]] = []

    def step(name: str, t: float) -> None:
        steps.append((name, time.perf_counter() - t))

    t = time.perf_counter()
    left_out: list[str] = []
    if args.her2st:
        # a section without an image cannot be aligned, so it has no place in the 3D stack: find the sections with an
        # image from the file names and read only those (one read)
        from asign.io._her2st import _find_image, _warn_sections_without_counts, patient_sections

        available = patient_sections(Path(args.her2st), args.patient)
        with_image = [s for s in available if _find_image(Path(args.her2st), args.patient, s) is not None]
        if not with_image:
            msg = f"HER2ST patient {args.patient} has no section with an H&E image; the demo needs images."
            raise ValueError(msg)
        if len(with_image) < 2:
            msg = (
                f"HER2ST patient {args.patient} has an H&E image for {with_image} only (sections {available}); the "
                "demo needs at least two sections with images (one known, one to impute): choose another --patient."
            )
            raise ValueError(msg)
        left_out = [s for s in available if s not in with_image]
        if left_out:  # the sections are named: read_her2st does not report those skipped for want of a count file
            _warn_sections_without_counts(Path(args.her2st), args.patient)
        sdata = asign.datasets.her2st(patient=args.patient, path=args.her2st, sections=with_image if left_out else None)
        stack = asign.io.validate_stack(sdata)
        sections = [s for s, k in zip(stack.sections, stack.image_keys, strict=True) if k]
        known = [sections[0]]
    else:
        sdata = asign.datasets.synthetic_stack(n_sections=args.n_sections, seed=args.seed)
        stack = asign.io.validate_stack(sdata)
        sections = stack.sections
        known = [sections[0]]
    step("load", t)

    t = time.perf_counter()
    asign.pp.align_layers(sdata, sections=sections, show_progress_bar=False)
    step("align_layers", t)

    t = time.perf_counter()
    # the pixel defaults suit H&E at ~0.5 µm/px (HER2ST); the synthetic images are coarse (4 µm/px): sizes in µm
    feat_kw = {} if args.her2st else {"scales_um": {"spot": 224, "region": 512, "global": 1024}}
    graph_kw = {} if args.her2st else {"radius_um": 112.0}  # the spot patch's footprint (method.md §3.1)
    asign.pp.extract_features(sdata, encoder=args.encoder, sections=sections, show_progress_bar=False, **feat_kw)
    step("extract_features", t)

    # the graph after the features, so that cross-section edges weigh image similarity beside footprint overlap (the
    # pipeline of the benchmarks)
    t = time.perf_counter()
    asign.pp.neighbors_3d(sdata, similarity_key="asign_features_spot", **graph_kw)
    step("neighbors_3d", t)

    results = {}
    # the baselines as defined, the two strongest also with ASIGN's default gene projection (gene_rank=10), then ASIGN
    runs = [
        ("mean", "mean", {}),
        ("nearest", "nearest", {}),
        ("nearest + gene_rank 10", "nearest", {"gene_rank": 10}),
        ("propagation", "propagation", {}),
        ("propagation + gene_rank 10", "propagation", {"gene_rank": 10}),
        ("ridge", "ridge", {}),
        ("asign", "asign", {}),
    ]
    for label, method, kwargs in runs:
        t = time.perf_counter()
        key = "asign" if method == "asign" else "asign_" + label.replace(" + ", "_").replace(" ", "_")
        asign.tl.impute(
            sdata,
            known=known,
            method=method,
            method_kwargs=kwargs,
            key_added=key,
            n_genes=min(250, sdata.tables["table"].n_vars),
            seed=args.seed,
            show_progress_bar=False,
        )
        step(f"impute[{label}]", t)
        df = asign.tl.evaluate(sdata, key=key)
        overall = df[(df["level"] == "overall")].iloc[0]
        results[label] = overall

    print()
    print(f"asign {asign.__version__} demo: {'HER2ST ' + args.patient if args.her2st else 'synthetic stack'}")
    print(f"sections {sections}, known {known}, spots {sdata.tables['table'].n_obs}")
    if left_out:
        print(f"left out (no H&E image, so they cannot be aligned): {left_out}")
    table = sdata.tables["table"]
    q = table.uns["asign"]["alignment"]["quality"]
    print(
        f"alignment ({table.uns['asign']['alignment']['transform']}, reference {table.uns['asign']['alignment']['reference']}):"
    )
    for i, pair in enumerate(q["pair"]):
        print(
            f"  {pair:<10} rotation {float(q['rotation_deg'][i]):7.1f} deg   tissue Dice "
            f"{float(q['dice_before'][i]):.3f} -> {float(q['dice_after'][i]):.3f}   NMI "
            f"{float(q['nmi_before'][i]):.3f} -> {float(q['nmi_after'][i]):.3f}"
        )
    if "synthetic" in table.uns["asign"]:
        err = _synthetic_alignment_error(sdata)
        print("  median spot-centre error vs ground truth (um): " + ", ".join(f"{k} {v:.1f}" for k, v in err.items()))
    print(
        f"imputation of the unknown sections ({table.uns['asign'].get('dataset', {}).get('name', 'synthetic')}), top genes, ST-Net scale:"
    )
    print(f"{'method':<26} {'per-gene PCC':>13} {'MSE':>8} {'MAE':>8} {'per-spot PCC (legacy)':>22}")
    for m, r in results.items():
        print(f"{m:<26} {r['pcc_gene']:>13.3f} {r['mse']:>8.3f} {r['mae']:>8.3f} {r['pcc_spot_legacy']:>22.3f}")
    for name, dt in steps:
        print(f"  {name:<34} {dt:6.1f} s")
    out = Path(args.out)
    table.uns["asign"]["demo"] = {
        "version": asign.__version__,
        "data": f"HER2ST {args.patient}" if args.her2st else "synthetic",
    }
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*autosharding.*")
        asign.io.persist(sdata, path=out, overwrite=True)
    print(f"wrote {out} in {time.perf_counter() - t0:.1f} s total")
    return 0


def _synthetic_alignment_error(sdata) -> dict[str, float]:
    """Median distance (µm) between aligned spot centres and the synthetic ground truth, per section."""
    import numpy as np

    table = sdata.tables["table"]
    al = table.uns["asign"]["alignment"]
    n2w = np.asarray(table.uns["asign"]["synthetic"]["native_to_world"])
    sections = list(table.uns["asign"]["stack"]["section"])
    ref = n2w[sections.index(al["reference"])]
    xy = np.asarray(table.obsm["spatial_aligned"]) / float(al["um_per_px"])
    world = xy @ ref[:2, :2].T + ref[:2, 2]
    d = np.linalg.norm(world - np.asarray(table.obsm["spatial_world"]), axis=1)
    sec = table.obs["section"].astype(str).to_numpy()
    return {s: float(np.median(d[sec == s])) for s in sections}


def main(argv: list[str] | None = None) -> int:
    """Run the ``asign`` command line."""
    parser = argparse.ArgumentParser(prog="asign", description="3D spatial transcriptomics imputation (ASIGN).")
    sub = parser.add_subparsers(dest="command", required=True)
    demo = sub.add_parser("demo", help="run the whole pipeline on the embedded synthetic stack (or HER2ST)")
    demo.add_argument(
        "--out",
        default="asign_demo.zarr",
        help="zarr store to write (default: asign_demo.zarr); an existing path is replaced only if it is the store of "
        "an earlier demo, or with --overwrite",
    )
    demo.add_argument("--overwrite", action="store_true", help="replace whatever exists at --out")
    demo.add_argument("--seed", type=int, default=0, help="random seed of the data and the models (default: 0)")
    demo.add_argument(
        "--n-sections", type=int, default=5, help="sections of the synthetic stack, at least 2 (default: 5)"
    )
    demo.add_argument(
        "--encoder",
        default="efficientnet_lite0",
        help="image encoder of extract_features (default: efficientnet_lite0)",
    )
    demo.add_argument("--her2st", default=None, help="HER2ST folder: run on real data instead of the synthetic stack")
    demo.add_argument(
        "--patient", default="C", choices=HER2ST_PATIENTS, help="HER2ST patient, with --her2st (default: C)"
    )
    demo.add_argument(
        "--debug",
        action="store_true",
        help=f"show the full traceback of an error (also with the environment variable {DEBUG_ENV}=1)",
    )
    args = parser.parse_args(argv)
    if args.command == "demo":
        _check_args(demo, args)
        try:
            return _demo(args)
        except _user_errors() as e:
            if args.debug or os.environ.get(DEBUG_ENV, "") not in ("", "0"):
                raise
            print(f"asign: error: {_message(e)}", file=sys.stderr)
            return 1
    return 1  # pragma: no cover


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
