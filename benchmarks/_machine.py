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


def her2st_path(arg: str | None = None) -> Path:
    """The HER2ST folder: ``arg``, else ``$ASIGN_HER2ST``, else ``../shared/data/her2st`` beside the repository."""
    import os

    for p in [arg, os.environ.get("ASIGN_HER2ST"), str(ROOT.parent / "shared" / "data" / "her2st")]:
        if p and (Path(p) / "data" / "ST-cnts").is_dir():
            return Path(p)
    msg = "HER2ST folder not found; pass --her2st or set ASIGN_HER2ST."
    raise SystemExit(msg)
