"""Shared by the benchmark scripts: a readable name of this machine's processor, and where the HER2ST data lie."""

from __future__ import annotations

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
