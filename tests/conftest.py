from __future__ import annotations

import copy
import logging
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


ASIGN_SCALES = {"spot": 32, "region": 128, "global": 256}


def _prepare_for_asign(sd, *, features: bool = True):
    """The synthetic stack's ground-truth rigid alignment (reference: the middle section), handcrafted image features
    at small scales (``features=True``) and the 3D graph: what ``method="asign"`` reads. Modifies ``sd``."""
    import numpy as np

    import asign
    from asign.pp._align import set_alignment

    n2w = np.asarray(sd.tables["table"].uns["asign"]["synthetic"]["native_to_world"])
    st = asign.io.validate_stack(sd)
    m = st.n_sections // 2
    set_alignment(sd, {s: np.linalg.inv(n2w[m]) @ n2w[i] for i, s in enumerate(st.sections)}, reference=st.sections[m])
    if features:
        asign.pp.extract_features(
            sd, encoder="handcrafted", scales=ASIGN_SCALES, input_size=None, show_progress_bar=False
        )
        asign.pp.neighbors_3d(sd, similarity_key="asign_features_spot")
    else:
        asign.pp.neighbors_3d(sd)
    return sd


@pytest.fixture(scope="session")
def prepare_for_asign():
    """``prepare_for_asign(sdata, *, features=True)``: align (ground truth), extract features, build the graph."""
    return _prepare_for_asign


def _named_asign_stacks(names):
    """Small prepared stacks (3 sections, 40 spots, 12 genes; seeds 0, 1, ...), each named by its
    ``uns['asign']['dataset']['patient']`` (the sample's name in messages)."""
    import asign

    out = []
    for seed, patient in enumerate(names):
        sd = asign.datasets.synthetic_stack(
            n_sections=3, n_spots=40, n_genes=12, image_size=256, um_per_px=16.0, seed=seed
        )
        sd.tables["table"].uns["asign"]["dataset"] = {"patient": patient}
        out.append(_prepare_for_asign(sd))
    return out


@pytest.fixture(scope="session")
def named_asign_stacks():
    """``named_asign_stacks(names)``: one small prepared stack per name (align, features, graph), named by it."""
    return _named_asign_stacks


@pytest.fixture
def no_training(monkeypatch):
    """Make ASIGN's member training fail loudly: a check that should refuse before any training but does not."""
    from asign.tl import _asign

    def no_training(*args, **kw):
        msg = "training started"
        raise AssertionError(msg)

    monkeypatch.setattr(_asign, "_train_member", no_training)


def _move_spots(sd, rows, xy):
    """Move spots (table rows) to new pixel centres, in ``obsm['spatial']`` and in their shapes."""
    import geopandas as gpd
    import numpy as np

    t = sd.tables["table"]
    new = np.asarray(t.obsm["spatial"], dtype=float).copy()
    new[rows] = xy
    t.obsm["spatial"] = new
    for key in t.obs["region"].astype(str).unique():
        m = (t.obs["region"].astype(str) == key).to_numpy()
        sd.shapes[key].geometry = gpd.points_from_xy(new[m, 0], new[m, 1])


@pytest.fixture(scope="session")
def move_spots():
    """``move_spots(sdata, rows, xy)``: move spots to new pixel centres in the table and in their shapes."""
    return _move_spots


def _lazy_disk_image(h, w, chunk, centre, radius, calls):
    """A lazy ``(3, h, w)`` uint8 xarray image (dark disk on glass) whose chunks record each computation in ``calls``."""
    import dask.array as da
    import numpy as np
    import xarray as xr

    def gen(block_info=None):
        (c0, c1), (y0, y1), (x0, x1) = block_info[None]["array-location"]
        calls.append((y0, x0))
        yy, xx = np.arange(y0, y1)[:, None], np.arange(x0, x1)[None, :]
        disk = (yy - centre[1]) ** 2 + (xx - centre[0]) ** 2 < radius**2
        return np.repeat(np.where(disk, np.uint8(90), np.uint8(240))[None], c1 - c0, axis=0)

    chunks = tuple(tuple(min(chunk, n - i) for i in range(0, n, chunk)) for n in (h, w))
    return xr.DataArray(da.map_blocks(gen, dtype=np.uint8, chunks=((3,), *chunks)), dims=("c", "y", "x"))


@pytest.fixture(scope="session")
def lazy_disk_image():
    """``lazy_disk_image(h, w, chunk, centre, radius, calls)``: a lazy single-scale image counting chunk reads."""
    return _lazy_disk_image


class LogRecords(logging.Handler):
    """Records of the package logger, with the text of its warnings."""

    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)

    @property
    def warnings(self) -> str:
        return "\n".join(r.getMessage() for r in self.records if r.levelno >= logging.WARNING)


@pytest.fixture
def asign_log():
    """Records of the package logger at every level (it does not propagate to the root logger, so caplog misses
    them)."""
    log = logging.getLogger("asign")
    h = LogRecords()
    level = log.level
    log.addHandler(h)
    log.setLevel(logging.DEBUG)
    try:
        yield h
    finally:
        log.removeHandler(h)
        log.setLevel(level)
