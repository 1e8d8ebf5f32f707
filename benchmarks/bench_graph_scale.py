"""Scaling of spot overlaps and 3D neighbour graphs, 10^3 to 10^6 spots (issue 3, "Must show").

Synthetic point stacks (no images): every section is an ST-like square spot grid (200 µm pitch, 0.69 µm/px, so
290 px) inside a disc, placed on its slide by a random rigid transform (rotation up to 180°, shift); the known
transforms ``T_s`` map each section into the middle section's pixels. Footprint radius: the default 112 px.

Each configuration runs in a fresh subprocess so that its peak resident memory (``ru_maxrss``) is clean. Stages
timed (seconds) and recorded:

- ``overlap``: :func:`asign.pp._graph._overlap_matrix` (the core of ``spot_overlaps``; adjacent sections);
- ``graph``: :func:`asign.pp._graph._graph_3d` (the core of ``neighbors_3d``: within-section kNN k=12 with
  inverse-distance weights, cross-section top-12 by IoU, symmetric union, distances);
- ``propagation``: 10 iterations of :func:`asign._model._propagation.label_propagation` on that graph (if present);
- ``public``: :func:`asign.pp.spot_overlaps` + :func:`asign.pp.neighbors_3d` on a real SpatialData stack (sizes up
  to 10^5), validation included.

Usage::

    python benchmarks/bench_graph_scale.py            # all sizes, writes the JSON and the docs table
    python benchmarks/bench_graph_scale.py --max 1e5  # quick run
    python benchmarks/bench_graph_scale.py --doc-only # rewrite the table from the saved JSON
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import resource
import subprocess
import sys
import time
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("MKL_NUM_THREADS", "1")
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results" / "graph_scale.json"
DOC = ROOT / "docs" / "benchmarks" / "graphs.md"

PITCH_UM = 200.0
UM_PER_PX = 0.69
N_GENES_PROP = 16

# (n_spots, n_sections): 10^4 spots per section from 10^5 up, 100 sections at 10^6
SIZES = [(1_000, 5), (10_000, 5), (100_000, 10), (300_000, 30), (1_000_000, 100)]


def _rigid(theta: float, shift: np.ndarray) -> np.ndarray:
    T = np.eye(3)
    c, s = np.cos(theta), np.sin(theta)
    T[:2, :2] = [[c, -s], [s, c]]
    T[:2, 2] = shift
    return T


def make_points(n_spots: int, n_sections: int, seed: int = 0):
    """Coordinates (native px), section codes and the known transforms of a synthetic point stack."""
    rng = np.random.default_rng(seed)
    n_per = n_spots // n_sections
    pitch = PITCH_UM / UM_PER_PX
    radius = pitch * np.sqrt(n_per / np.pi) * 1.02
    coords, codes, n2w = [], [], []
    for s in range(n_sections):
        off = rng.uniform(0, pitch, 2)
        m = int(np.ceil(radius / pitch)) + 1
        g = np.arange(-m, m + 1) * pitch
        gx, gy = np.meshgrid(g + off[0], g + off[1])
        world = np.column_stack([gx.ravel(), gy.ravel()])
        d = np.hypot(world[:, 0], world[:, 1])
        world = world[np.argsort(d, kind="stable")[:n_per]]  # the n_per grid points nearest the block centre
        # random placement on the slide: native = R world + t  (px)
        w2n = _rigid(rng.uniform(-np.pi, np.pi), rng.uniform(-2000, 2000, 2) + radius + 500)
        native = world @ w2n[:2, :2].T + w2n[:2, 2]
        coords.append(native)
        codes.append(np.full(n_per, s))
        n2w.append(np.linalg.inv(w2n))
    ref = n_sections // 2
    T = np.stack([np.linalg.inv(n2w[ref]) @ n2w[s] for s in range(n_sections)])
    return np.concatenate(coords), np.concatenate(codes), T


NOTES = [
    "## Notes",
    "",
    "- **Footprint radius.** 112 native px, half the 224 px spot patch (method.md §3.1): the overlap measures how much "
    "the *image patches* the model reads share tissue, not the physical spots (100 µm ST spots at 200 µm pitch "
    "never overlap). `radius_um=` gives a physical radius instead.",
    "- **Exact or polygon IoU.** Rigid transforms keep circles, so these runs use the closed form; affine transforms "
    "switch to 100-gons intersected with shapely 2 in chunks of 20,000 pairs (about 10^5 pairs per second on one "
    "core).",
    "- **Cross-section candidates.** The method (§4.2) draws partners from *every* other section. An exhaustive "
    "candidate search costs about N x S pairs: 418 s at 10^6 spots in 100 sections on this machine. When all "
    "footprints are circles of one radius (rigid or one-scale similarity alignment, the usual case) IoU decreases "
    "with distance, so `neighbors_3d` takes the candidates from one KD-tree nearest-neighbour query per section, "
    "with the same result (tested) and a cost that no longer grows with S. `adjacent_only=True` limits partners to "
    "the adjacent sections.",
    "- **Memory.** Everything is sparse (CSR, explicit indices); no N x N array is built. The graph stages peak "
    "at the RSS listed under 'graphs' (before torch is imported); the last column adds torch and the propagation.",
    "- **Propagation.** `asign._model._propagation.label_propagation` gathers one row of Y per edge, so its memory "
    "is about (directed edges) x (genes) x 4 bytes: with 2.5e7 directed edges at 10^6 spots that is 1.6 GB for the "
    f"{N_GENES_PROP} genes used here, but 25 GB for 250 genes. A sparse matrix product (`torch.sparse.mm` with the CSR "
    "adjacency) would need only N x G.",
    "- Timings were taken while other jobs shared the 2 cores, so they carry noise of a factor up to about 2.",
]


def _rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def worker(n_spots: int, n_sections: int, mode: str, *, adjacent_only: bool) -> dict:
    """One configuration (runs in its own process)."""
    from asign.pp import _graph as g

    out: dict = {"n_spots": n_spots, "n_sections": n_sections, "mode": mode, "adjacent_only": adjacent_only}
    coords, codes, T = make_points(n_spots, n_sections)
    n = coords.shape[0]
    out["n_spots"] = int(n)
    out["rss_before_mb"] = _rss_mb()
    um = np.full(n_sections, UM_PER_PX)
    if mode == "core":
        t0 = time.perf_counter()
        M = g._overlap_matrix(coords, codes, T, 112.0, adjacent_only=True)
        out["overlap_s"] = time.perf_counter() - t0
        out["overlap_nnz"] = int(M.nnz)
        out["fraction_with_partner"] = float((np.diff(M.indptr) > 0).mean())
        del M
        al_px = g.aligned_centres(coords, codes, T)
        z = codes * 16.0
        alignment = g._Alignment(
            transforms=T,
            active=np.ones(n_sections, dtype=bool),
            um_per_px=UM_PER_PX,
            spatial_aligned=al_px * UM_PER_PX,
            z=z.astype(float),
        )
        t0 = time.perf_counter()
        W, D, n_within, n_cross = g._graph_3d(
            coords, codes, um, 12, 12, alignment=alignment, radius_px=112.0, adjacent_only=adjacent_only
        )
        out["graph_s"] = time.perf_counter() - t0
        out["graph_nnz"] = int(W.nnz)
        out["edges_within"] = n_within
        out["edges_across"] = n_cross
        out["isolated"] = int((np.diff(W.indptr) == 0).sum())
        out["rss_after_graph_mb"] = _rss_mb()
        try:
            import torch

            from asign._model._propagation import label_propagation
        except ImportError:
            out["propagation_s"] = None
        else:
            torch.set_num_threads(1)
            coo = W.tocoo()
            ei = torch.from_numpy(np.vstack([coo.col, coo.row]).astype(np.int64))
            ew = torch.from_numpy(coo.data.astype(np.float32))
            del coo
            rng = np.random.default_rng(1)
            y = torch.full((n, N_GENES_PROP), float("nan"))
            known = codes == 0
            y[torch.from_numpy(known)] = torch.from_numpy(
                rng.normal(-6, 1, (int(known.sum()), N_GENES_PROP)).astype(np.float32)
            )
            t0 = time.perf_counter()
            res = label_propagation(y, ei, ew, n_iter=10)
            out["propagation_s"] = time.perf_counter() - t0
            out["propagation_finite"] = bool(torch.isfinite(res).all())
            out["propagation_genes"] = N_GENES_PROP
    else:  # public API on a SpatialData stack
        import asign.pp as pp
        from asign._logging import logger
        from asign.io import Section, stack_sections

        logger.setLevel("WARNING")
        secs = [Section(name=f"P{s}", spots=coords[codes == s], um_per_px=UM_PER_PX) for s in range(n_sections)]
        sdata = stack_sections(secs, spot_diameter_um=100.0, thickness_um=16.0)
        names = [f"P{s}" for s in range(n_sections)]
        t0 = time.perf_counter()
        try:
            from asign.pp._align import set_alignment

            set_alignment(sdata, dict(zip(names, T, strict=True)), reference=names[n_sections // 2])
            out["alignment_writer"] = "set_alignment"
        except ImportError:  # pragma: no cover - the contract written by hand
            table = sdata.tables["table"]
            al_px = g.aligned_centres(coords, codes, T)
            table.obsm["spatial_aligned"] = al_px * UM_PER_PX
            table.obs["z"] = codes * 16.0
            table.uns["asign"]["alignment"] = {"transforms": dict(zip(names, T, strict=True)), "um_per_px": UM_PER_PX}
            out["alignment_writer"] = "manual"
        out["set_alignment_s"] = time.perf_counter() - t0
        out["rss_before_mb"] = _rss_mb()
        t0 = time.perf_counter()
        pp.spot_overlaps(sdata)
        out["public_overlap_s"] = time.perf_counter() - t0
        t0 = time.perf_counter()
        pp.neighbors_3d(sdata, adjacent_only=adjacent_only)
        out["public_graph_s"] = time.perf_counter() - t0
        out["graph_nnz"] = int(sdata.tables["table"].obsp["asign_connectivities"].nnz)
    out["peak_rss_mb"] = _rss_mb()
    return out


def _versions() -> dict:
    import importlib.metadata as md

    v = {"python": platform.python_version()}
    for p in ("numpy", "scipy", "shapely", "torch", "spatialdata", "anndata"):
        try:
            v[p] = md.version(p)
        except md.PackageNotFoundError:  # pragma: no cover
            v[p] = "absent"
    return v


def _run(n: int, s: int, mode: str, *, adjacent_only: bool, timeout: int) -> dict:
    cmd = [sys.executable, __file__, "--worker", str(n), str(s), mode, str(int(adjacent_only))]
    t0 = time.perf_counter()
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, check=False)
    if p.returncode != 0:
        return {"n_spots": n, "n_sections": s, "mode": mode, "adjacent_only": adjacent_only, "error": p.stderr[-2000:]}
    res = json.loads(p.stdout.strip().splitlines()[-1])
    res["process_wall_s"] = time.perf_counter() - t0
    return res


def _fmt(v, nd=2):
    if v is None:
        return "–"
    if isinstance(v, float):
        return f"{v:.{nd}f}"
    return f"{v:,}" if isinstance(v, int) else str(v)


def write_doc(payload: dict) -> None:
    rows = payload["runs"]
    lines = [
        "# Graph construction at scale",
        "",
        "Generated by `benchmarks/bench_graph_scale.py` (raw numbers: `benchmarks/results/graph_scale.json`).",
        "",
        f"- Machine: {payload['machine']['cpus']} CPU cores ({payload['machine']['processor']}), "
        f"{payload['machine']['platform']}; single-threaded BLAS/torch. Date: {payload['date']}.",
        "- Versions: " + ", ".join(f"{k} {v}" for k, v in payload["versions"].items()) + ".",
        "- Data: synthetic point stacks, ST-like square grids (200 µm pitch, 0.69 µm/px), 10^4 spots per section "
        "from 10^5 spots up (100 sections at 10^6), random rigid placement (rotation up to 180°) with the known "
        "transforms. Footprint radius 112 native px (the default).",
        "- Graph: within-section kNN k = 12 with inverse-distance weights; cross-section top-12 partners by IoU; "
        "symmetric union; distances in µm. Propagation: 10 iterations of label propagation "
        f"({N_GENES_PROP} genes, first section known).",
        "- Peak RSS: `ru_maxrss` of a fresh process per configuration (includes the Python interpreter, numpy, scipy "
        "and, for propagation, torch).",
        "",
    ]
    for adj, title in (
        (True, "adjacent sections (`adjacent_only=True`)"),
        (False, "every other section (method default)"),
    ):
        sel = [r for r in rows if r.get("mode") == "core" and r.get("adjacent_only") == adj]
        if not sel:
            continue
        lines += [
            f"## Array cores, cross-section candidates from {title}",
            "",
            "| spots | sections | spot_overlaps core (s) | neighbors_3d core (s) | µs / spot (graph) | graph nnz | "
            "peak RSS, graphs (MB) | propagation ×10 (s) | peak RSS, + torch propagation (MB) |",
            "|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
        ]
        for r in sel:
            if "error" in r:
                lines.append(f"| {r['n_spots']:,} | {r['n_sections']} | failed | | | | | | |")
                continue
            lines.append(
                f"| {r['n_spots']:,} | {r['n_sections']} | {_fmt(r['overlap_s'])} | {_fmt(r['graph_s'])} | "
                f"{_fmt(1e6 * r['graph_s'] / r['n_spots'], 1)} | {r['graph_nnz']:,} | "
                f"{_fmt(r['rss_after_graph_mb'], 0)} | {_fmt(r.get('propagation_s'))} | {_fmt(r['peak_rss_mb'], 0)} |"
            )
        slope = payload.get(f"loglog_slope_{'adjacent' if adj else 'all'}")
        if slope is not None:
            lines += ["", f"Log-log slope of (overlap + graph) time against spots: **{slope:.2f}** (1 = linear)."]
        lines.append("")
    pub = [r for r in rows if r.get("mode") == "public"]
    if pub:
        lines += [
            "## Public API (`asign.pp.spot_overlaps` + `asign.pp.neighbors_3d` on a SpatialData stack)",
            "",
            "| spots | sections | cross candidates | spot_overlaps (s) | neighbors_3d (s) | peak RSS (MB) |",
            "|---:|---:|---|---:|---:|---:|",
        ]
        for r in pub:
            if "error" in r:
                lines.append(f"| {r['n_spots']:,} | {r['n_sections']} | | failed | | |")
                continue
            lines.append(
                f"| {r['n_spots']:,} | {r['n_sections']} | {'adjacent' if r['adjacent_only'] else 'all'} | "
                f"{_fmt(r['public_overlap_s'])} | {_fmt(r['public_graph_s'])} | {_fmt(r['peak_rss_mb'], 0)} |"
            )
        lines.append("")
    lines += NOTES
    DOC.parent.mkdir(parents=True, exist_ok=True)
    DOC.write_text("\n".join(lines) + "\n")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--max", type=float, default=1e6, help="largest number of spots")
    ap.add_argument("--public-max", type=float, default=1e5, help="largest size for the public-API timing")
    ap.add_argument("--all-max", type=float, default=1e6, help="largest size for all-section cross candidates")
    ap.add_argument("--timeout", type=int, default=1800)
    ap.add_argument("--doc-only", action="store_true", help="rewrite the docs table from the saved JSON")
    ap.add_argument("--worker", nargs=4, metavar=("N", "S", "MODE", "ADJ"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        n, s, mode, adj = args.worker
        print(json.dumps(worker(int(n), int(s), mode, adjacent_only=bool(int(adj)))))
        return
    if args.doc_only:
        write_doc(json.loads(RESULTS.read_text()))
        print(f"wrote {DOC}")
        return
    runs = []
    for n, s in SIZES:
        if n > args.max:
            continue
        configs = [("core", True)]
        if n <= args.all_max:
            configs.append(("core", False))
        if n <= args.public_max:
            configs += [("public", True), ("public", False)]
        for mode, adj in configs:
            r = _run(n, s, mode, adjacent_only=adj, timeout=args.timeout)
            runs.append(r)
            print(json.dumps({k: v for k, v in r.items() if k != "error"}), r.get("error", ""), flush=True)
    payload = {
        "date": dt.date.today().isoformat(),
        "machine": {
            "cpus": os.cpu_count(),
            "processor": platform.processor() or platform.machine(),
            "platform": platform.platform(),
        },
        "versions": _versions(),
        "runs": runs,
    }
    for adj, name in ((True, "adjacent"), (False, "all")):
        # slope over sizes >= 10^4 (below, fixed costs dominate)
        core = [
            r
            for r in runs
            if r.get("mode") == "core" and r.get("adjacent_only") == adj and "error" not in r and r["n_spots"] >= 10_000
        ]
        if len(core) >= 2:
            x = np.log([r["n_spots"] for r in core])
            y = np.log([r["graph_s"] + r["overlap_s"] for r in core])
            payload[f"loglog_slope_{name}"] = float(np.polyfit(x, y, 1)[0])
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(payload, indent=1))
    write_doc(payload)
    print(f"wrote {RESULTS} and {DOC}")


if __name__ == "__main__":
    main()
