"""HER2ST serial sections (Andersson et al. 2021) from a local folder or the public repository."""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from spatialdata import SpatialData

ENV_VAR = "ASIGN_HER2ST"
_BASE_URL = "https://github.com/almaan/her2st/raw/master/"


def her2st_path(path: str | Path | None = None) -> Path | None:
    """The local HER2ST folder: ``path``, else the ``ASIGN_HER2ST`` environment variable, else `None`."""
    p = path or os.environ.get(ENV_VAR)
    if p is None:
        return None
    p = Path(p)
    return p if (p / "data" / "ST-cnts").is_dir() else None


def _download(patient: str, sections: list[str] | None) -> Path:  # pragma: no cover - needs the network
    import pooch

    cache = Path(pooch.os_cache("asign")) / "her2st"
    n = 6 if patient in "ABCD" else 3
    secs = sections or [f"{patient}{i}" for i in range(1, n + 1)]
    for s in secs:
        for rel in (
            f"data/ST-cnts/{s}.tsv.gz",
            f"data/ST-spotfiles/{s}_selection.tsv",
            f"res/ST-cluster/lbl/{s}-cluster-annotation.tsv.gz",
        ):
            pooch.retrieve(_BASE_URL + rel, known_hash=None, path=cache / Path(rel).parent, fname=Path(rel).name)
    return cache


def her2st(
    patient: str = "C",
    *,
    path: str | Path | None = None,
    sections: list[str] | None = None,
    images: bool = True,
    download: bool = False,
) -> SpatialData:
    """HER2ST serial sections of one patient as a section stack.

    Parameters
    ----------
    patient
        One of ``A``–``H``.
    path
        Local folder with the HER2ST layout; default: the ``ASIGN_HER2ST`` environment variable.
    sections
        Subset of sections, in cutting order.
    images
        Attach the H&E images that exist (lazily).
    download
        When no local folder is found, fetch counts, spot files and the published registration from the public
        repository into the pooch cache (images are not public there in full resolution).

    Returns
    -------
    See :func:`asign.io.read_her2st`.
    """
    from ..io._her2st import read_her2st

    root = her2st_path(path)
    if root is None:
        if not download:
            msg = (
                f"No HER2ST folder found: pass `path=` or set {ENV_VAR} to the folder that holds data/ST-cnts, "
                "or pass download=True to fetch it from the public repository."
            )
            raise FileNotFoundError(msg)
        root = _download(patient, sections)
    return read_her2st(root, patient=patient, sections=sections, images=images)
