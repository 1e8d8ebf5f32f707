"""Reader for the HER2ST layout (Andersson et al. 2021)."""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import pandas as pd

from asign._constants import Key
from asign._logging import logger

if TYPE_CHECKING:
    from spatialdata import SpatialData

HER2ST_PATIENTS = tuple("ABCDEFGH")


def check_patient(patient: str) -> str:
    """A HER2ST patient letter, upper-cased; a TypeError or ValueError naming the patients otherwise."""
    if not isinstance(patient, str):
        msg = f"`patient` must be one of {list(HER2ST_PATIENTS)} (a string), got {patient!r}."
        raise TypeError(msg)
    patient = patient.upper()
    if patient not in HER2ST_PATIENTS:
        msg = f"Unknown HER2ST patient {patient!r}; choose one of {list(HER2ST_PATIENTS)}."
        raise ValueError(msg)
    return patient


HER2ST_SPOT_DIAMETER_UM = 100.0
HER2ST_PITCH_UM = 200.0
HER2ST_THICKNESS_UM = 16.0
HER2ST_DEFAULT_UM_PER_PX = 0.69
# patient A's images are smaller (about 217 px per 200 µm grid step)
HER2ST_DEFAULT_UM_PER_PX_A = 0.92
HER2ST_PYRAMID = (2, 2, 2, 2)

# decoded JPEG levels, most recent last; bounded by bytes so that at most ~2 full-resolution images stay in memory
_CACHE_BYTES = 640 * 2**20
_cache: OrderedDict[tuple[str, int, int], np.ndarray] = OrderedDict()
_cache_lock = threading.Lock()


def _decode_jpeg(path: str, height: int, width: int) -> np.ndarray:
    """Decode a JPEG at ``(height, width)``: reduced levels use the JPEG DCT scaling (`draft`), never the full image."""
    from PIL import Image

    key = (path, height, width)
    with _cache_lock:
        if key in _cache:
            _cache.move_to_end(key)
            return _cache[key]
        Image.MAX_IMAGE_PIXELS = None
        try:
            with Image.open(path) as im:
                if (width, height) != im.size:
                    im.draft("RGB", (width, height))  # the smallest DCT scale that is still >= the requested size
                im = im.convert("RGB")
                if im.size != (width, height):
                    im = im.resize((width, height), Image.Resampling.BOX)
                arr = np.asarray(im)
        except OSError as e:  # PIL names no file in e.g. "image file is truncated"
            msg = f"Could not decode the JPEG {path}: {e}"
            raise OSError(msg) from e
        _cache[key] = arr
        while sum(a.nbytes for a in _cache.values()) > _CACHE_BYTES and len(_cache) > 1:
            _cache.popitem(last=False)
        return arr


# a complete JPEG ends with the end-of-image marker; searched in the last bytes (some writers append a trailer)
_JPEG_EOI = b"\xff\xd9"
_JPEG_TAIL = 64 * 2**10


def _check_jpeg_complete(path: Path) -> None:
    """Refuse a truncated JPEG when it is opened (decoding it would fail only when a chunk is computed)."""
    with open(path, "rb") as fh:
        size = fh.seek(0, 2)
        fh.seek(max(size - _JPEG_TAIL, 0))
        tail = fh.read()
    if _JPEG_EOI not in tail:
        msg = f"{path} is truncated or not a complete JPEG (no end-of-image marker): replace the file."
        raise ValueError(msg)


def _jpeg_size(path: Path) -> tuple[int, int]:
    from PIL import Image

    Image.MAX_IMAGE_PIXELS = None
    with Image.open(path) as im:
        size = im.size  # (width, height), from the header only
    _check_jpeg_complete(path)
    return size


def _lazy_level(path: str, height: int, width: int, chunk: int):
    import dask
    import dask.array as da

    full = da.from_delayed(
        dask.delayed(_decode_jpeg, pure=True)(path, height, width), shape=(height, width, 3), dtype=np.uint8
    )
    return full.transpose(2, 0, 1).rechunk((3, chunk, chunk))


def lazy_jpeg(path: str | Path, *, chunk: int = 1024):
    """A lazy ``(3, y, x)`` dask array of a JPEG at full resolution: nothing is decoded until a chunk is computed.

    JPEG cannot be decoded by tile, so the first computed chunk decodes the file once; decoded images are cached
    (about two full-resolution images at most) for the following chunks.
    """
    path = str(path)
    w, h = _jpeg_size(Path(path))
    return _lazy_level(path, h, w, chunk)


def lazy_jpeg_pyramid(
    path: str | Path,
    *,
    coordinate_system: str,
    scale_factors: Sequence[int] = HER2ST_PYRAMID,
    chunk: int = 1024,
):
    """A multiscale image element of a JPEG whose every level is decoded lazily and on its own.

    Level ``k`` is decoded directly at its size with the JPEG decoder's DCT scaling (1/2, 1/4, 1/8), so reading a
    thumbnail never decodes the full-resolution image. Levels follow ``scale_factors`` (levels under 256 px on the
    shorter side are dropped, as in :func:`asign.io.stack_sections`); the element has the transformation
    :class:`~spatialdata.transformations.Identity` to ``coordinate_system``.
    """
    import xarray as xr
    from spatialdata.models import Image2DModel
    from spatialdata.transformations import Identity, set_transformation

    from asign.io._build import _pyramid_factors

    path = str(path)
    w, h = _jpeg_size(Path(path))
    sizes = [(h, w)]
    for f in _pyramid_factors(min(h, w), scale_factors):
        sizes.append((sizes[-1][0] // f, sizes[-1][1] // f))
    nodes = {}
    for k, (hk, wk) in enumerate(sizes):
        coords = {"c": ["r", "g", "b"], "y": (np.arange(hk) + 0.5) * (h / hk), "x": (np.arange(wk) + 0.5) * (w / wk)}
        arr = xr.DataArray(_lazy_level(path, hk, wk, chunk), dims=("c", "y", "x"), coords=coords, name="image")
        nodes[f"scale{k}"] = xr.Dataset({"image": arr})
    tree = xr.DataTree.from_dict(nodes)
    set_transformation(tree, {coordinate_system: Identity()}, set_all=True)
    Image2DModel().validate(tree)
    return tree


def _read_counts(path: Path, section: str | None = None) -> tuple[list[str], list[str], np.ndarray]:
    """Spot ids, gene names and the ``(spots, genes)`` float32 matrix of a HER2ST count table (``.tsv.gz``).

    A file that is not a complete gzip-compressed table, a row with more or fewer values than genes, or a value that
    is not a number raises a :class:`ValueError` naming the file (and ``section``).
    """
    import gzip
    import io
    import re
    import zlib

    where = f"Section {section}: count table {path}" if section is not None else f"Count table {path}"
    try:
        with gzip.open(path, "rb") as fh:
            header = fh.readline().decode().rstrip("\r\n").split("\t")[1:]
            body = fh.read()
    except (gzip.BadGzipFile, EOFError, zlib.error, UnicodeDecodeError) as e:
        msg = f"{where} cannot be read: it is not a complete gzip-compressed table ({type(e).__name__}: {e})."
        raise ValueError(msg) from e
    lines = [ln for ln in body.splitlines() if ln.strip()]
    if not lines:
        msg = f"{where} has no spots (a header only)."
        raise ValueError(msg)
    ids = [ln.split(b"\t", 1)[0].decode(errors="replace").strip('"') for ln in lines]
    n = len(header)
    for i, ln in enumerate(lines):
        k = ln.count(b"\t")
        if k < n or (k > n and any(v.strip() for v in ln.split(b"\t")[n + 1 :])):
            msg = f"{where}: the row of spot {ids[i]!r} has {k} values for the {n} genes of the header."
            raise ValueError(msg)
    try:
        X = np.loadtxt(
            io.BytesIO(b"\n".join(lines)), delimiter="\t", usecols=range(1, n + 1), dtype=np.float32, ndmin=2
        )
    except ValueError as e:
        m = re.search(r"at row (\d+), column (\d+)", str(e))
        spot = f" (spot {ids[int(m.group(1))]!r}, gene {header[int(m.group(2)) - 2]!r})" if m else ""
        msg = f"{where} has a value that is not a number{spot}: {e}"
        raise ValueError(msg) from e
    genes = [g.strip('"') for g in header]
    if len(set(genes)) != len(genes):
        import anndata as ad

        genes = list(ad.utils.make_index_unique(pd.Index(genes)))
        logger.warning(f"{path.name}: duplicate gene names were made unique (suffix '-1', '-2', ...).")
    return ids, genes, X


def _fit_rigid(src: np.ndarray, dst: np.ndarray) -> np.ndarray:
    """Least-squares rigid map (rotation + translation, 3 x 3 homogeneous) of ``src`` points onto ``dst`` (Kabsch)."""
    mu_s, mu_d = src.mean(axis=0), dst.mean(axis=0)
    H = (src - mu_s).T @ (dst - mu_d)
    U, _, Vt = np.linalg.svd(H)
    d = np.sign(np.linalg.det(Vt.T @ U.T))
    R = Vt.T @ np.diag([1.0, d]) @ U.T
    M = np.eye(3)
    M[:2, :2] = R
    M[:2, 2] = mu_d - R @ mu_s
    return M


def _read_transforms(root: Path, sections: Sequence[str]) -> tuple[dict[str, np.ndarray], dict[str, str]]:
    """The published rigid registration: one 3 x 3 matrix per section into its patient's reference section.

    From ``section_transforms.csv`` when present, else fitted on the cluster files of the upstream layout. Returns
    the matrices and the reference section of each section.
    """
    if (root / "section_transforms.csv").exists():
        return _read_transforms_from_csv(root, sections)
    return _read_transforms_from_clusters(root, sections)


def _read_transforms_from_csv(root: Path, sections: Sequence[str]) -> tuple[dict[str, np.ndarray], dict[str, str]]:
    out: dict[str, np.ndarray] = {}
    refs: dict[str, str] = {}
    df = pd.read_csv(root / "section_transforms.csv", index_col="section")
    for s in sections:
        if s in df.index:
            r = df.loc[s]
            out[s] = np.array([[r.a11, r.a12, r.tx], [r.a21, r.a22, r.ty], [0.0, 0.0, 1.0]], dtype=float)
            if "reference" in df.columns:
                refs[s] = str(r.reference)
    return out, refs


def _read_transforms_from_clusters(root: Path, sections: Sequence[str]) -> tuple[dict[str, np.ndarray], dict[str, str]]:
    """Fit the rigid map of every section from the warped spot coordinates of the upstream cluster files."""
    out: dict[str, np.ndarray] = {}
    refs: dict[str, str] = {}
    for s in sections:
        f = root / "res" / "ST-cluster" / "lbl" / f"{s}-cluster-annotation.tsv.gz"
        if f.exists():
            c = pd.read_csv(f, sep="\t")
            src = c[["pixel_x", "pixel_y"]].to_numpy(float)
            dst = c[["warped_x", "warped_y"]].to_numpy(float)
            M = _fit_rigid(src, dst)
            res = np.abs(src @ M[:2, :2].T + M[:2, 2] - dst).max()
            if res > 2.0:
                logger.warning(f"HER2ST {s}: the published registration is not rigid (max residual {res:.1f} px).")
            out[s] = M
    # the reference section is the one that the registration leaves in place
    identity = [s for s, M in out.items() if np.allclose(M, np.eye(3), atol=1e-3)]
    if len(identity) == 1:
        refs = dict.fromkeys(out, identity[0])
    return out, refs


def patient_sections(root: Path, patient: str) -> list[str]:
    """A HER2ST patient's sections in cutting order, from the names of its count files ``<P><n>.tsv.gz`` only."""
    names = [p.name[: -len(".tsv.gz")] for p in (root / "data" / "ST-cnts").glob(f"{patient}*.tsv.gz")]
    return sorted((s for s in names if s[len(patient) :].isdigit()), key=lambda s: int(s[len(patient) :]))


def _sections_without_counts(root: Path, patient: str) -> dict[str, list[Path]]:
    """Sections of a patient with a spot file or an image folder but no count file: ``{section: files found}``."""
    found: dict[str, list[Path]] = {}
    for f in (root / "data" / "ST-spotfiles").glob(f"{patient}*_selection.tsv"):
        found.setdefault(f.name[: -len("_selection.tsv")], []).append(f)
    img_dir = root / "data" / "ST-imgs" / patient
    if img_dir.is_dir():
        for d in img_dir.iterdir():
            if d.is_dir() and any(d.glob("*.jpg")):
                found.setdefault(d.name, []).append(d)
    cnt_dir = root / "data" / "ST-cnts"
    names = [s for s in found if s[len(patient) :].isdigit() and not (cnt_dir / f"{s}.tsv.gz").exists()]
    return {s: found[s] for s in sorted(names, key=lambda s: int(s[len(patient) :]))}


def _warn_sections_without_counts(root: Path, patient: str) -> list[str]:
    """Warn about the sections that are skipped because their count file is missing; returns their names."""
    skipped = _sections_without_counts(root, patient)
    if skipped:
        files = [str(root / "data" / "ST-cnts" / f"{s}.tsv.gz") for s in skipped]
        logger.warning(
            f"HER2ST patient {patient}: sections {list(skipped)} are skipped: their count files {files} are missing "
            "(their spot file or image exists)."
        )
    return list(skipped)


def _find_image(root: Path, patient: str, section: str) -> Path | None:
    """The section's H&E JPEG (the only ``*.jpg`` in its folder), `None` if there is none; several are an error."""
    folder = root / "data" / "ST-imgs" / patient / section
    if not folder.is_dir():
        return None
    jpgs = sorted(folder.glob("*.jpg"))
    if len(jpgs) > 1:
        msg = (
            f"HER2ST section {section}: {len(jpgs)} JPEG files in {folder} ({[p.name for p in jpgs]}); it must hold "
            "only the section's H&E image: move the others away."
        )
        raise ValueError(msg)
    return jpgs[0] if jpgs else None


def _um_per_px(root: Path, section: str, spots: pd.DataFrame) -> float:
    """Pixel size: ``sections.csv`` when present, else the spot grid (200 µm pitch) fitted on the spot file."""
    manifest = root / "sections.csv"
    if manifest.exists():
        df = pd.read_csv(manifest, index_col="section")
        if section in df.index and "px_per_200um" in df.columns and np.isfinite(df.loc[section, "px_per_200um"]):
            return HER2ST_PITCH_UM / float(df.loc[section, "px_per_200um"])
    grid = spots[["x", "y"]].to_numpy(float)
    px = spots[["pixel_x", "pixel_y"]].to_numpy(float)
    ok = np.isfinite(grid).all(axis=1) & np.isfinite(px).all(axis=1)
    if ok.sum() >= 10:
        A = np.column_stack([grid[ok], np.ones(int(ok.sum()))])
        sol, *_ = np.linalg.lstsq(A, px[ok], rcond=None)
        px_per_step = float(np.sqrt(abs(np.linalg.det(sol[:2]))))
        if np.isfinite(px_per_step) and px_per_step > 0:
            return HER2ST_PITCH_UM / px_per_step
    return HER2ST_DEFAULT_UM_PER_PX_A if section.startswith("A") else HER2ST_DEFAULT_UM_PER_PX


def _layers(root: Path, patient: str, sections: Sequence[str]) -> np.ndarray:
    """Layer number (1-based cutting position) of each section: ``sections.csv`` when present, else the name's digits."""
    layer: dict[str, int] = {}
    manifest = root / "sections.csv"
    if manifest.exists():
        df = pd.read_csv(manifest, index_col="section")
        if "layer" in df.columns:
            layer = {str(k): int(v) for k, v in df["layer"].dropna().items()}
    return np.array([layer.get(s, int(s[len(patient) :])) for s in sections], dtype=int)


def _read_spots(spot_file: Path, section: str) -> pd.DataFrame:
    """A section's spot file, indexed by the spot ids ``"<x>x<y>"``.

    Rows repeated identically are dropped with a warning; different rows for one spot are an error, as are missing
    columns and grid coordinates that are not numbers.
    """
    try:
        spots = pd.read_csv(spot_file, sep="\t")
    except (ValueError, UnicodeDecodeError) as e:  # pandas' ParserError and EmptyDataError are ValueErrors
        msg = f"Section {section}: cannot read the spot file {spot_file}: {e}"
        raise ValueError(msg) from e
    absent = [c for c in ("x", "y", "pixel_x", "pixel_y") if c not in spots.columns]
    if absent:
        msg = (
            f"Section {section}: the spot file {spot_file} has no column {absent} (columns: {list(spots.columns)}); "
            "it needs x, y (ST array grid) and pixel_x, pixel_y (spot centres in image pixels)."
        )
        raise ValueError(msg)
    text = [c for c in ("pixel_x", "pixel_y") if not pd.api.types.is_numeric_dtype(spots[c])]
    if text:
        msg = f"Section {section}: the columns {text} of the spot file {spot_file} hold values that are not numbers."
        raise ValueError(msg)
    try:
        spots.index = spots["x"].astype(int).astype(str) + "x" + spots["y"].astype(int).astype(str)
    except (TypeError, ValueError) as e:
        msg = f"Section {section}: the columns x, y of the spot file {spot_file} must be integer grid positions: {e}"
        raise ValueError(msg) from e
    repeated = spots.duplicated()
    if repeated.any():
        logger.warning(
            f"Section {section}: {int(repeated.sum())} rows of the spot file {spot_file} are repeated identically "
            f"(e.g. spots {list(dict.fromkeys(spots.index[repeated]))[:3]}); the copies are ignored."
        )
        spots = spots[~repeated]
    conflict = spots.index.duplicated(keep=False)
    if conflict.any():
        ids = list(dict.fromkeys(spots.index[conflict]))
        msg = (
            f"Section {section}: the spot file {spot_file} has different rows for the same spot ({len(ids)} spots, "
            f"e.g. {ids[:3]}): its pixel position is ambiguous; keep one row per spot."
        )
        raise ValueError(msg)
    return spots


def _pathologist_labels(root: Path, section: str, index: pd.Index) -> pd.Series | None:
    f = root / "data" / "ST-pat" / "lbl" / f"{section}_labeled_coordinates.tsv"
    if not f.exists():
        return None
    lab = pd.read_csv(f, sep="\t").dropna(subset=["x", "y"])
    key = lab["x"].round().astype(int).astype(str) + "x" + lab["y"].round().astype(int).astype(str)
    lab = pd.Series(lab["label"].astype(str).to_numpy(), index=key)
    lab = lab[~lab.index.duplicated()]
    return lab.reindex(index)


def read_her2st(
    path: str | Path,
    *,
    patient: str,
    sections: str | Sequence[str] | None = None,
    images: bool = True,
    genes: str | Sequence[str] | None = None,
) -> SpatialData:
    """Read the serial sections of one HER2ST patient into a section stack.

    Parameters
    ----------
    path
        Root of the HER2ST layout: ``data/ST-cnts/<S>.tsv.gz`` (counts), ``data/ST-spotfiles/<S>_selection.tsv``
        (spot pixel centres), ``data/ST-imgs/<P>/<S>/*.jpg`` (full-resolution H&E, optional), and either
        ``section_transforms.csv`` or ``res/ST-cluster/lbl/<S>-cluster-annotation.tsv.gz`` (published registration).
        Optional: ``sections.csv`` (pixel size from its ``px_per_200um`` column) and
        ``data/ST-pat/lbl/<S>_labeled_coordinates.tsv`` (pathologist labels). A malformed file (a count table that is
        not complete gzip or has non-numeric values or ragged rows, a spot file without the needed columns or with
        different rows for one spot, a truncated JPEG, several JPEGs in one section's folder) raises an error that
        names the file and the section.
    patient
        One of ``A``–``H``.
    sections
        Sections to read, in cutting order: one name (``"E1"``, case-insensitive) or a non-empty sequence (default:
        all sections of the patient that have a count file, ``<P>1, <P>2, ...``; a section with a spot file or an
        image but no count file is skipped with a warning, and naming it is an error).
    images
        Whether to attach the H&E images that exist. They are multiscale pyramids whose levels are decoded lazily
        and separately (a low-resolution level never decodes the full-resolution image).
    genes
        Restrict the genes: one name or a sequence (default: the union of all genes of the read sections; a gene
        absent from a section is 0 there). ``var`` is that of the unrestricted read, limited to these genes in the
        given order; a gene found in none of the read sections is left out with a warning naming it, and a
        :class:`ValueError` is raised when none of the genes is found.

    Returns
    -------
    A section stack (see :func:`asign.io.stack_sections`) with sections ``<P>1, <P>2, ...``, each at
    ``z = (layer - 1) * 16`` µm, ``layer`` being its cutting position (``sections.csv``'s ``layer``, else the number in
    its name: E1 and E3 are 32 µm apart, also when E2 is not read). Sections without an image have no image element
    (``image_key`` empty in the manifest, ``obs['has_image']`` False). Also written:
    ``obs['array_row']``, ``obs['array_col']`` (ST grid), ``obs['pathologist_label']`` (where published), the
    published rigid registration into the patient's reference section in ``obsm['spatial_her2st_reference']``
    (reference-frame pixels; NaN where unknown) and ``uns['asign']['her2st_transforms']`` ({section: 3 x 3 matrix
    native px -> reference px}), and ``uns['asign']['dataset']`` (name, patient, reference section). The
    registration is for evaluation only. The pixel size comes from ``sections.csv`` when present, else from the
    spot grid (200 µm pitch).
    """
    import scipy.sparse as sp
    from anndata import AnnData

    from ._build import Section, stack_sections

    root = Path(path)
    patient = check_patient(patient)
    if isinstance(sections, str):
        sections = [sections]
    if sections is not None:
        sections = [str(s).upper() for s in sections]  # section names as in the files ("C2"); "c2" is accepted
        if not sections:
            msg = (
                "`sections` is empty: pass the sections to read (e.g. ['C1', 'C2']), or None for all sections of "
                f"patient {patient}."
            )
            raise ValueError(msg)
    if root.exists() and not root.is_dir():
        msg = f"HER2ST path {root} is a file, not a directory; pass the root folder of the HER2ST layout."
        raise NotADirectoryError(msg)
    if not root.is_dir():
        msg = f"HER2ST folder {root} does not exist; pass the root of the HER2ST layout (with data/ST-cnts)."
        raise FileNotFoundError(msg)
    cnt_dir = root / "data" / "ST-cnts"
    if not cnt_dir.is_dir():
        msg = f"{cnt_dir} not found: `path` must be the root of the HER2ST layout (with data/ST-cnts)."
        raise FileNotFoundError(msg)
    available = patient_sections(root, patient)
    if not available:
        msg = f"No count files of patient {patient} in {cnt_dir} (expected {patient}1.tsv.gz, ...)."
        raise FileNotFoundError(msg)
    if isinstance(genes, str):
        genes = [genes]
    if genes is not None:
        genes = list(dict.fromkeys(str(g) for g in genes))
    if sections is None:
        _warn_sections_without_counts(root, patient)
    sections = list(available if sections is None else sections)
    missing = [s for s in sections if s not in available]
    no_counts = [s for s in missing if s in _sections_without_counts(root, patient)]
    if no_counts:
        files = [str(cnt_dir / f"{s}.tsv.gz") for s in no_counts]
        msg = (
            f"Sections {no_counts} of patient {patient} have no count file: {files} not found (their spot file or "
            f"image exists; sections with counts: {available})."
        )
        raise FileNotFoundError(msg)
    if missing:
        msg = f"Sections {missing} of patient {patient} not found in {cnt_dir} (available: {available})."
        raise ValueError(msg)
    layers = _layers(root, patient, sections)
    if np.any(np.diff(layers) <= 0):
        msg = (
            f"Sections {sections} of patient {patient} are not in cutting order (layers {layers.tolist()}); pass each "
            f"section once, in cutting order (e.g. {sorted(set(sections), key=lambda s: int(s[len(patient) :]))})."
        )
        raise ValueError(msg)
    transforms, refs = _read_transforms(root, sections)
    found: set[str] = set()
    parts = []
    for s in sections:
        ids, gene_names, X = _read_counts(cnt_dir / f"{s}.tsv.gz", s)
        counts_index = pd.Index(ids)
        if genes is not None:
            # only the requested genes that this section measures: the others count as not measured here
            present = pd.Index(gene_names)
            gene_names = [g for g in genes if g in present]
            X = X[:, present.get_indexer(gene_names)]
            found.update(gene_names)
        spot_file = root / "data" / "ST-spotfiles" / f"{s}_selection.tsv"
        if not spot_file.exists():
            msg = f"Section {s}: spot file {spot_file} not found; it gives the spots' pixel positions."
            raise FileNotFoundError(msg)
        spots = _read_spots(spot_file, s)
        absent = counts_index.difference(spots.index)
        if len(absent):
            msg = (
                f"Section {s}: {len(absent)} spots of the count table have no pixel position in {spot_file.name} "
                f"(e.g. {list(absent[:3])})."
            )
            raise ValueError(msg)
        um_per_px = _um_per_px(root, s, spots)
        spots = spots.loc[counts_index]
        xy = spots[["pixel_x", "pixel_y"]].to_numpy(float)
        bad = ~np.isfinite(xy).all(axis=1)
        if bad.any():
            msg = (
                f"Section {s}: {int(bad.sum())} spots of the count table have no finite pixel_x / pixel_y in "
                f"{spot_file} (e.g. {list(counts_index[bad][:3])})."
            )
            raise ValueError(msg)
        img_path = _find_image(root, patient, s) if images else None
        obs = pd.DataFrame(
            {
                "array_row": spots["y"].to_numpy(int),
                "array_col": spots["x"].to_numpy(int),
                "has_image": img_path is not None,
            }
        )
        labels = _pathologist_labels(root, s, counts_index)
        if labels is not None:
            obs["pathologist_label"] = labels.to_numpy()
        obsm = {}
        if s in transforms:
            M = transforms[s]
            obsm[Key.HER2ST_REFERENCE] = xy @ M[:2, :2].T + M[:2, 2]
        else:
            logger.warning(f"HER2ST {s}: no published registration found; obsm['{Key.HER2ST_REFERENCE}'] is NaN.")
        image = None
        if img_path is not None:
            try:
                image = lazy_jpeg_pyramid(img_path, coordinate_system=s)
            except (OSError, ValueError) as e:
                detail = (str(e) if str(img_path) in str(e) else f"{img_path}: {e}").rstrip(".")
                msg = f"Section {s}: cannot read its H&E image ({detail}); pass images=False to read it without."
                raise ValueError(msg) from e
        adata = AnnData(X=sp.csr_matrix(X), var=pd.DataFrame(index=gene_names))
        parts.append(
            Section(
                name=s,
                spots=xy,
                counts=adata,
                image=image,
                um_per_px=um_per_px,
                spot_ids=list(counts_index),
                obs=obs,
                obsm=obsm,
            )
        )
        logger.debug(f"HER2ST {s}: {len(ids)} spots, image={'yes' if img_path else 'no'}")
    if genes is not None:
        absent = [g for g in genes if g not in found]
        if len(absent) == len(genes):
            msg = (
                f"None of the genes {absent[:10]} is measured in sections {sections} of patient {patient}; check the "
                "gene symbols (HER2ST uses HGNC symbols, e.g. 'ERBB2'), or pass genes=None for all genes."
            )
            raise ValueError(msg)
        if absent:
            logger.warning(
                f"HER2ST patient {patient}: genes {absent} are measured in none of the sections {sections}; they are "
                "left out."
            )
    if not transforms:
        for p in parts:
            p.obsm[Key.HER2ST_REFERENCE] = np.full((len(p.spots), 2), np.nan)
    sdata = stack_sections(parts, spot_diameter_um=HER2ST_SPOT_DIAMETER_UM, z_um=(layers - 1) * HER2ST_THICKNESS_UM)
    table = sdata.tables[Key.TABLE]
    if genes is not None:
        order = [g for g in genes if g in found]
        if list(table.var_names) != order:  # the union follows the sections; keep the requested order
            table = sdata.tables[Key.TABLE] = table[:, order].copy()
    table.obs["has_image"] = table.obs["has_image"].astype(bool)
    if "pathologist_label" in table.obs:
        table.obs["pathologist_label"] = table.obs["pathologist_label"].astype("category")
    table.uns[Key.UNS]["her2st_transforms"] = {s: np.asarray(M, dtype=float) for s, M in transforms.items()}
    ref = sorted(set(refs.values()))
    table.uns[Key.UNS]["dataset"] = {
        "name": "her2st",
        "patient": patient,
        "reference_section": ref[0] if len(ref) == 1 else "",
    }
    with_img = [s for s, p in zip(sections, parts, strict=True) if p.image is not None]
    logger.info(f"HER2ST patient {patient}: {len(sections)} sections, {table.n_obs} spots, images for {with_img}.")
    return sdata
