"""Datasets: the synthetic section stack (embedded default) and HER2ST."""

from __future__ import annotations

from ._her2st import download_her2st, her2st
from ._synthetic import synthetic_stack

__all__ = ["download_her2st", "her2st", "synthetic_stack"]
