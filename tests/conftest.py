from __future__ import annotations

import copy
import os
from pathlib import Path

import pytest

os.environ.setdefault("MPLBACKEND", "agg")
os.environ.setdefault("ITK_GLOBAL_DEFAULT_NUMBER_OF_THREADS", "1")

HER2ST_ENV = "ASIGN_HER2ST"


def her2st_root() -> Path | None:
    p = os.environ.get(HER2ST_ENV)
    if p and (Path(p) / "data" / "ST-cnts").is_dir():
        return Path(p)
    default = Path(__file__).resolve().parents[2] / "shared" / "data" / "her2st"
    return default if (default / "data" / "ST-cnts").is_dir() else None


@pytest.fixture(scope="session")
def _small_stack():
    from asign.datasets import synthetic_stack

    return synthetic_stack(n_sections=3, n_spots=60, n_genes=20, image_size=512, um_per_px=8.0, seed=0)


@pytest.fixture
def small_stack(_small_stack):
    """3 sections x ~60 spots, 20 genes, 512 px images, known rigid transforms (deep copy per test)."""
    return copy.deepcopy(_small_stack)


@pytest.fixture(scope="session")
def her2st_path() -> Path:
    root = her2st_root()
    if root is None:
        pytest.skip(f"HER2ST folder not found; set {HER2ST_ENV}")
    return root
