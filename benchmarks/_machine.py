"""Shared by the benchmark scripts: a readable name of this machine's processor, where the HER2ST data lie, and the
command-line start of the development-data feature benchmarks."""

from __future__ import annotations

import argparse
import json
import os
import platform
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def cpu_name() -> str:
    """The ``model name`` of ``/proc/cpuinfo`` where it exists, else what :mod:`platform` reports."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine() -> dict:
    """Processor name, core count and platform: the ``machine`` entry of every result file."""
    return {"cpu": cpu_name(), "cores": os.cpu_count(), "platform": platform.platform()}


def find_her2st(arg: str | Path | None = None) -> Path | None:
    """The HER2ST folder: ``arg``, else ``$ASIGN_HER2ST``, else ``../shared/data/her2st`` beside the repository;
    `None` when none of them holds the data."""
    import os

    for p in [arg, os.environ.get("ASIGN_HER2ST"), ROOT.parent / "shared" / "data" / "her2st"]:
        if p and (Path(p) / "data" / "ST-cnts").is_dir():
            return Path(p)
    return None


def her2st_path(arg: str | Path | None = None) -> Path:
    """:func:`find_her2st`, exiting with a message when the data are not found."""
    path = find_her2st(arg)
    if path is None:
        msg = "HER2ST folder not found; pass --her2st or set ASIGN_HER2ST."
        raise SystemExit(msg)
    return path


def dev_parser(description: str) -> argparse.ArgumentParser:
    """The options shared by the feature benchmarks on development data: --her2st, --threads, --cache, --table."""
    ap = argparse.ArgumentParser(description=description)
    ap.add_argument("--her2st", default=None)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--cache", default=None, help="folder caching the extracted features (pickles)")
    ap.add_argument("--table", action="store_true", help="print the markdown table of the stored results and exit")
    return ap


def dev_start(args: argparse.Namespace, out: Path) -> dict:
    """Torch threads from ``--threads``, quiet asign logging, and the results stored in ``out`` so far."""
    import torch

    torch.set_num_threads(args.threads)
    os.environ.setdefault("ASIGN_LOGLEVEL", "WARNING")
    return json.loads(out.read_text()) if out.exists() else {}


def spatial_blocks(xy, n_blocks: int = 4):
    """Spatial blocks of spots for blocked cross-validation: k-means labels of the positions ``xy`` (seeded)."""
    from sklearn.cluster import KMeans

    return KMeans(n_clusters=n_blocks, n_init=4, random_state=0).fit_predict(xy)
