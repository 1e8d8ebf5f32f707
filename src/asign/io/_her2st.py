"""Reader for the HER2ST layout (Andersson et al. 2021)."""

from __future__ import annotations

import functools
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import pandas as pd

from .._constants import Key
from .._logging import logger

if TYPE_CHECKING:
    from spatialdata import SpatialData

HER2ST_PATIENTS = tuple("ABCDEFGH")
HER2ST_SPOT_DIAMETER_UM = 100.0
HER2ST_PITCH_UM = 200.0
HER2ST_THICKNESS_UM = 16.0
HER2ST_DEFAULT_UM_PER_PX = 0.69


@functools.lru_cache(maxsize=2)
def _decode_jpeg(path: str) -> np.ndarray:
    from PIL import Image

    Image.MAX_IMAGE_PIXELS = None
    with Image.open(path) as im:
        return np.asarray(im.convert("RGB"))


def _jpeg_size(path: Path) -> tuple[int, int]:
    from PIL import Image

    Image.MAX_IMAGE_PIXELS = None
    with Image.open(path) as im:
        return im.size  # (width, height), from the header only


def lazy_jpeg(path: str | Path, chunk: int = 1024):
    """A lazy ``(3, y, x)`` dask array of a JPEG: nothing is decoded until a chunk is computed.

    JPEG cannot be decoded by tile, so the first computed chunk decodes the file once; the decoded image is cached
    for the following chunks (the two most recent files are kept).
    """
    import dask
    import dask.array as da

    path = str(path)
    w, h = _jpeg_size(Path(path))
    full = da.from_delayed(dask.delayed(_decode_jpeg, pure=True)(path), shape=(h, w, 3), dtype=np.uint8)
    return full.transpose(2, 0, 1).rechunk((3, chunk, chunk))


def _fit_rigid(src: np.ndarray, dst: np.ndarray) -> np.ndarray:
    """Least-squares 2D affine (3 x 3) mapping ``src`` onto ``dst``."""
    A = np.column_stack([src, np.ones(len(src))])
    sol, *_ = np.linalg.lstsq(A, dst, rcond=None)
    M = np.eye(3)
    M[:2, :] = sol.T
    return M


def _read_transforms(root: Path, sections: Sequence[str]) -> dict[str, np.ndarray]:
    """The published rigid registration: one 3 x 3 matrix per section into its patient's reference section."""
    out: dict[str, np.ndarray] = {}
    table = root / "section_transforms.csv"
    if table.exists():
        df = pd.read_csv(table, index_col="section")
        for s in sections:
            if s in df.index:
                r = df.loc[s]
                out[s] = np.array([[r.a11, r.a12, r.tx], [r.a21, r.a22, r.ty], [0.0, 0.0, 1.0]])
        return out
    # upstream layout: fit the map from the warped spot coordinates of the cluster files
    for s in sections:
        f = root / "res" / "ST-cluster" / "lbl" / f"{s}-cluster-annotation.tsv.gz"
        if f.exists():
            c = pd.read_csv(f, sep="\t")
            out[s] = _fit_rigid(c[["pixel_x", "pixel_y"]].to_numpy(float), c[["warped_x", "warped_y"]].to_numpy(float))
    return out


def _find_image(root: Path, patient: str, section: str) -> Path | None:
    folder = root / "data" / "ST-imgs" / patient / section
    if not folder.is_dir():
        return None
    jpgs = sorted(folder.glob("*.jpg"))
    return jpgs[0] if jpgs else None


def _um_per_px(root: Path, section: str, image: Path | None) -> float:
    manifest = root / "sections.csv"
    if manifest.exists():
        df = pd.read_csv(manifest, index_col="section")
        if section in df.index and np.isfinite(df.loc[section, "px_per_200um"]):
            return HER2ST_PITCH_UM / float(df.loc[section, "px_per_200um"])
    return HER2ST_DEFAULT_UM_PER_PX


def read_her2st(
    path: str | Path,
    *,
    patient: str,
    sections: Sequence[str] | None = None,
    images: bool = True,
    genes: Sequence[str] | None = None,
) -> SpatialData:
    """Read the serial sections of one HER2ST patient into a section stack.

    Parameters
    ----------
    path
        Root of the HER2ST layout: ``data/ST-cnts/<S>.tsv.gz`` (counts), ``data/ST-spotfiles/<S>_selection.tsv``
        (spot pixel centres), ``data/ST-imgs/<P>/<S>/*.jpg`` (full-resolution H&E, optional), and either
        ``section_transforms.csv`` or ``res/ST-cluster/lbl/<S>-cluster-annotation.tsv.gz`` (published registration).
    patient
        One of ``A``–``H``.
    sections
        Sections to read, in cutting order (default: all sections of the patient, ``<P>1, <P>2, ...``).
    images
        Whether to attach the H&E images that exist (read lazily, as multiscale pyramids).
    genes
        Restrict the genes (default: the union of all genes of the patient; a gene absent from a section is 0).

    Returns
    -------
    A section stack. Sections without an image have no image element (``image_key`` empty in the manifest). The
    published rigid registration into the patient's reference section is kept in
    ``obsm['spatial_her2st_reference']`` (reference-frame pixels) and in
    ``uns['asign']['her2st_transforms']``, for evaluation only.
    """
    from .._stack import get_stack
    from ._build import Section, stack_sections

    root = Path(path)
    patient = str(patient).upper()
    if patient not in HER2ST_PATIENTS:
        msg = f"Unknown HER2ST patient {patient!r}; choose one of {list(HER2ST_PATIENTS)}."
        raise ValueError(msg)
    cnt_dir = root / "data" / "ST-cnts"
    if not cnt_dir.is_dir():
        msg = f"{cnt_dir} not found: `path` must be the root of the HER2ST layout (with data/ST-cnts)."
        raise FileNotFoundError(msg)
    available = sorted(
        (p.name.split(".")[0] for p in cnt_dir.glob(f"{patient}*.tsv.gz")), key=lambda s: int(s[len(patient) :])
    )
    if sections is None:
        sections = available
    missing = [s for s in sections if s not in available]
    if missing:
        msg = f"Sections {missing} of patient {patient} not found in {cnt_dir} (available: {available})."
        raise ValueError(msg)
    transforms = _read_transforms(root, sections)
    parts = []
    for s in sections:
        counts = pd.read_csv(cnt_dir / f"{s}.tsv.gz", sep="\t", index_col=0)
        if genes is not None:
            counts = counts.reindex(columns=list(genes), fill_value=0)
        spots = pd.read_csv(root / "data" / "ST-spotfiles" / f"{s}_selection.tsv", sep="\t")
        spots.index = spots["x"].astype(str) + "x" + spots["y"].astype(str)
        absent = counts.index.difference(spots.index)
        if len(absent):
            msg = f"Section {s}: {len(absent)} spots of the count table have no pixel position (e.g. {list(absent[:3])})."
            raise ValueError(msg)
        spots = spots.loc[counts.index]
        xy = spots[["pixel_x", "pixel_y"]].to_numpy(float)
        img_path = _find_image(root, patient, s) if images else None
        obs = pd.DataFrame(
            {"array_row": spots["y"].to_numpy(), "array_col": spots["x"].to_numpy(), "has_image": img_path is not None}
        )
        obsm = {}
        if s in transforms:
            M = transforms[s]
            obsm[Key.HER2ST_REFERENCE] = xy @ M[:2, :2].T + M[:2, 2]
        from anndata import AnnData
        import scipy.sparse as sp

        adata = AnnData(
            X=sp.csr_matrix(counts.to_numpy(dtype=np.float32)), var=pd.DataFrame(index=counts.columns.astype(str))
        )
        parts.append(
            Section(
                name=s,
                spots=xy,
                counts=adata,
                image=lazy_jpeg(img_path) if img_path is not None else None,
                um_per_px=_um_per_px(root, s, img_path),
                spot_ids=list(counts.index.astype(str)),
                obs=obs,
                obsm=obsm,
            )
        )
        logger.debug(f"HER2ST {s}: {len(counts)} spots, image={'yes' if img_path else 'no'}")
    sdata = stack_sections(parts, spot_diameter_um=HER2ST_SPOT_DIAMETER_UM, thickness_um=HER2ST_THICKNESS_UM)
    table = sdata.tables[Key.TABLE]
    table.obs["has_image"] = table.obs["has_image"].astype(bool)
    table.uns[Key.UNS]["her2st_transforms"] = {s: M for s, M in transforms.items()}
    table.uns[Key.UNS]["dataset"] = {"name": "her2st", "patient": patient}
    stack = get_stack(table)
    logger.info(
        f"HER2ST patient {patient}: {len(stack.sections)} sections, {table.n_obs} spots, "
        f"images for {[s for s, k in zip(stack.sections, stack.image_keys, strict=True) if k]}."
    )
    return sdata
