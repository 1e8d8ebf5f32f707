"""HER2ST serial sections (Andersson et al. 2021) from a local folder or the public repository."""

from __future__ import annotations

import os
from collections.abc import Sequence
from importlib import resources
from pathlib import Path
from typing import TYPE_CHECKING

from asign._logging import logger
from asign.io._her2st import check_patient

if TYPE_CHECKING:
    from spatialdata import SpatialData

ENV_VAR = "ASIGN_HER2ST"
BASE_URL = "https://github.com/almaan/her2st/raw/master/"
N_SECTIONS = {"A": 6, "B": 6, "C": 6, "D": 6, "E": 3, "F": 3, "G": 3, "H": 3}


def her2st_path(path: str | Path | None = None) -> Path | None:
    """The local HER2ST folder: ``path``, else the ``ASIGN_HER2ST`` environment variable, else `None`.

    A folder counts when it holds ``data/ST-cnts``; an explicit ``path`` that does not is an error.
    """
    if path is not None:
        p = Path(path)
        if p.exists() and not p.is_dir():
            msg = f"{p} is a file, not a HER2ST folder (a directory with data/ST-cnts)."
            raise NotADirectoryError(msg)
        if not (p / "data" / "ST-cnts").is_dir():
            msg = f"{p} is not a HER2ST folder: it has no data/ST-cnts (see the HER2ST layout in asign.io.read_her2st)."
            raise FileNotFoundError(msg)
        return p
    env = os.environ.get(ENV_VAR)
    if env and (Path(env) / "data" / "ST-cnts").is_dir():
        return Path(env)
    if env:
        logger.warning(f"{ENV_VAR}={env} is not a HER2ST folder (no data/ST-cnts); ignoring it.")
    return None


def registry() -> dict[str, str | None]:
    """The files of the public HER2ST repository that asign uses, with their SHA-256 (`None` where unknown)."""
    text = resources.files("asign.datasets").joinpath("her2st_registry.txt").read_text()
    out: dict[str, str | None] = {}
    for line in text.splitlines():
        if not line.strip() or line.startswith("#"):
            continue
        rel, sha = line.split()
        out[rel] = None if sha == "-" else sha
    return out


def _files_for(patient: str, sections: Sequence[str], *, images: bool) -> list[str]:
    reg = registry()
    wanted = []
    for s in sections:
        for rel in (
            f"data/ST-cnts/{s}.tsv.gz",
            f"data/ST-spotfiles/{s}_selection.tsv",
            f"res/ST-cluster/lbl/{s}-cluster-annotation.tsv.gz",
            f"data/ST-pat/lbl/{s}_labeled_coordinates.tsv",
        ):
            if rel in reg:
                wanted.append(rel)
        if images:
            wanted += [r for r in reg if r.startswith(f"data/ST-imgs/{patient}/{s}/")]
    return wanted


def download_her2st(
    patient: str = "C", *, sections: Sequence[str] | None = None, images: bool = True, cache: str | Path | None = None
) -> Path:
    """Download one patient's HER2ST files from the public repository (pooch, verified by SHA-256, cached).

    Parameters
    ----------
    patient
        One of ``A``–``H``.
    sections
        Sections to fetch (default: all of the patient's).
    images
        Also fetch the full-resolution H&E JPEGs (large; those whose checksum asign does not know are fetched
        unverified, with a warning).
    cache
        Folder of the local copy (default: the ``asign`` pooch cache).

    Returns
    -------
    The root of the local copy, in the HER2ST layout read by :func:`asign.io.read_her2st`.

    Raises
    ------
    OSError
        If a file cannot be downloaded (no network, an HTTP error, a full disk): the message names the file and the
        URL and says how to read a copy obtained otherwise. Files downloaded before the failure stay in the cache.
    """
    import pooch

    patient = check_patient(patient)
    root = Path(cache) if cache is not None else Path(pooch.os_cache("asign")) / "her2st"
    available = [f"{patient}{i}" for i in range(1, N_SECTIONS[patient] + 1)]
    if isinstance(sections, str):
        sections = [sections]
    secs = [str(s).upper() for s in sections] if sections is not None else available
    if not secs:
        msg = f"`sections` is empty: pass the sections to fetch, or None for all of patient {patient}'s {available}."
        raise ValueError(msg)
    unknown = [s for s in secs if s not in available]
    if unknown:
        msg = f"Unknown section(s) {unknown} of HER2ST patient {patient}; it has {available}."
        raise ValueError(msg)
    reg = registry()
    for rel in _files_for(patient, secs, images=images):
        sha = reg[rel]
        if sha is None:
            logger.warning(f"Downloading {rel} without a checksum (asign does not know it).")
        try:
            pooch.retrieve(
                BASE_URL + rel,
                known_hash=None if sha is None else f"sha256:{sha}",
                path=root / Path(rel).parent,
                fname=Path(rel).name,
                progressbar=False,
            )
        except OSError as e:  # offline, DNS, HTTP errors (requests' exceptions are OSErrors), a full disk
            msg = (
                f"Could not download HER2ST file {rel!r} of patient {patient} from {BASE_URL + rel} into {root} "
                f"({type(e).__name__}: {e}). Without network access, copy the HER2ST repository "
                "(https://github.com/almaan/her2st) by other means and read it with "
                "`asign.io.read_her2st(path, patient=...)` or `asign.datasets.her2st(patient, path=...)`."
            )
            raise OSError(msg) from e
    return root


def her2st(
    patient: str = "C",
    *,
    path: str | Path | None = None,
    sections: Sequence[str] | None = None,
    images: bool = True,
    download: bool = True,
) -> SpatialData:
    """HER2ST serial sections of one patient as a section stack.

    Parameters
    ----------
    patient
        One of ``A``–``H`` (A–D have 6 sections, E–H 3), case-insensitive.
    path
        Local folder with the HER2ST layout; default: the ``ASIGN_HER2ST`` environment variable.
    sections
        Subset of sections, in cutting order (names are case-insensitive).
    images
        Attach the H&E images that exist (lazily, as multiscale pyramids).
    download
        When no local folder is found, fetch the patient's files from the public repository into the pooch cache
        (verified by SHA-256; see :func:`asign.datasets.download_her2st`). With `False`, a missing folder is an
        error.

    Returns
    -------
    The stack read by :func:`asign.io.read_her2st` (its keys are listed there).
    """
    from asign.io._her2st import read_her2st

    patient = check_patient(patient)
    root = her2st_path(path)
    if root is None:
        if not download:
            msg = (
                f"No HER2ST folder found: pass `path=` or set {ENV_VAR} to the folder that holds data/ST-cnts, "
                "or pass download=True to fetch it from the public repository."
            )
            raise FileNotFoundError(msg)
        try:
            root = download_her2st(patient, sections=sections, images=images)
        except Exception as e:
            msg = (
                f"Could not download HER2ST patient {patient} ({e}); set {ENV_VAR} to a local copy of the HER2ST "
                "folder (with data/ST-cnts) instead."
            )
            raise OSError(msg) from e
    return read_her2st(root, patient=patient, sections=sections, images=images)
