"""Image registration of serial sections: working images, tissue masks, coarse search, ANTs refinement.

Conventions used throughout (see ``method.md`` §3):

- Points are (x, y) = (column, row); a pixel's centre has integer coordinates (``numpy`` / ``scipy.ndimage``).
  spatialdata's pyramid levels are related by ``Scale`` on pixel *corners*, so a level pixel ``l`` of scale ``s``
  has its centre at full-resolution ``x = s (l + 1/2) - 1/2``.
- Matrices are 3 x 3 homogeneous maps acting on column vectors ``(x, y, 1)``.
- A pairwise map ``A`` always maps **moving** points into the **fixed** frame. ANTs' *forward* transform maps
  fixed points to moving points (the pull-back used to resample images), so ``A`` is its inverse.
- ANTs images are built from ``array.T`` so that ANTs' physical axis 0 is the image's x (column) axis.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np
from scipy import ndimage as ndi

from ._logging import logger

if TYPE_CHECKING:
    from spatialdata import SpatialData

    from ._stack import StackInfo

ANTS_TYPES = {"rigid": "Rigid", "similarity": "Similarity", "affine": "Affine"}
# small copies used by the coarse rotation search (longer side in pixels)
SEARCH_SIZE = 256
# ANTs schedule: three levels shrunk 4f, 2f and f times, f = longer side // 400 (8, 4, 2 for 1000 px working images:
# the coarsest level keeps at least 100 px, and the finest, at half the working resolution, is fine enough for the
# accuracy needed, a working pixel or two, at about 1 s of one CPU core per pair)
ANTS_ITERATIONS = (200, 100, 50)
ANTS_SMOOTHING = (3, 2, 1)
ANTS_SAMPLING = 0.25
# ANTs' metric region: the tissue masks dilated by this fraction of the working image's longer side, so that the
# tissue outline still counts and far-away slide marks do not
MASK_MARGIN = 0.05
# a further coarse start is refined only if its Dice is this close to the best refined Dice so far
START_MARGIN = 0.02
# a refinement may lower the coarse start's mask Dice by at most this much and still be kept
DICE_TOLERANCE = 0.02
# a section cut at its image's border: the mask Dice cannot tell where the piece belongs (it fits in several
# places), so among the placements within this much of the best Dice the one whose grey images correlate best
# within the tissue overlap is kept
CUT_DICE_MARGIN = 0.1
# content-matched starts need the tissue overlap to cover at least this fraction of the smaller tissue mask
MIN_CONTENT_OVERLAP = 0.5


# --------------------------------------------------------------------------------------------------------------------
# small matrix helpers
# --------------------------------------------------------------------------------------------------------------------
def translation(tx: float, ty: float) -> np.ndarray:
    """3 x 3 translation."""
    M = np.eye(3)
    M[:2, 2] = (tx, ty)
    return M


def rotation(theta_deg: float, *, mirror: bool = False, scale: float = 1.0) -> np.ndarray:
    """3 x 3 rotation by ``theta_deg`` (counter-clockwise in (x, y)), after a mirror of x if ``mirror``."""
    t = np.deg2rad(theta_deg)
    R = np.eye(3)
    R[:2, :2] = scale * np.array([[np.cos(t), -np.sin(t)], [np.sin(t), np.cos(t)]])
    if mirror:
        R = R @ np.diag([-1.0, 1.0, 1.0])
    return R


def decompose(A: np.ndarray) -> dict[str, float]:
    """Rotation (degrees), mean scale, anisotropy and reflection of the linear part of ``A``."""
    L = np.asarray(A, dtype=float)[:2, :2]
    det = float(np.linalg.det(L))
    U, sv, Vt = np.linalg.svd(L)
    R = U @ Vt
    return {
        "rotation_deg": float(np.degrees(np.arctan2(R[1, 0], R[0, 0]))),
        "scale": float(np.sqrt(abs(det))),
        "anisotropy": float(sv[0] / sv[1]) if sv[1] > 0 else float("inf"),
        "mirrored": bool(det < 0),
    }


def _swap_xy(A: np.ndarray) -> np.ndarray:
    P = np.array([[0.0, 1.0, 0.0], [1.0, 0.0, 0.0], [0.0, 0.0, 1.0]])
    return P @ A @ P


def warp(image: np.ndarray, A: np.ndarray, shape: tuple[int, int], *, order: int = 1, cval: float = 0.0) -> np.ndarray:
    """Resample ``image`` into an output grid of ``shape`` so that output point ``A p`` shows input point ``p``."""
    inv = _swap_xy(np.linalg.inv(A))  # output (row, col) -> input (row, col)
    return ndi.affine_transform(
        np.asarray(image, dtype=np.float32),
        inv[:2, :2],
        offset=inv[:2, 2],
        output_shape=tuple(int(v) for v in shape),
        order=order,
        mode="constant",
        cval=cval,
        prefilter=False,
    )


def fit_transform(
    src: np.ndarray,
    dst: np.ndarray,
    *,
    kind: str = "rigid",
    allow_mirror: bool = False,
    src_um_per_px: float = 1.0,
    dst_um_per_px: float = 1.0,
) -> np.ndarray:
    """Least-squares map of ``src`` points onto ``dst`` points (``(n, 2)`` each): rigid, similarity or affine.

    Rigid and similarity use Umeyama's closed form (a reflection only if ``allow_mirror``). The fit is done in
    microns: the points are scaled by their pixel sizes ``src_um_per_px`` and ``dst_um_per_px`` (so a rigid map keeps
    physical lengths between sections stored at different pixel sizes), and the returned matrix maps ``src`` pixels
    to ``dst`` pixels: ``diag(1 / dst_um) R diag(src_um)``, ``R`` the map fitted in microns. With equal pixel sizes
    this is the fit in pixels; similarity and affine fits do not depend on the pixel sizes.
    """
    src = np.asarray(src, dtype=float)
    dst = np.asarray(dst, dtype=float)
    u_src, u_dst = float(src_um_per_px), float(dst_um_per_px)
    if not (np.isfinite(u_src) and np.isfinite(u_dst) and u_src > 0 and u_dst > 0):
        msg = f"Pixel sizes must be positive and finite, got {u_src:g} and {u_dst:g} µm/px."
        raise ValueError(msg)
    for name, pts in (("src", src), ("dst", dst)):
        if pts.ndim != 2 or pts.shape[1] != 2:
            msg = f"Landmarks `{name}` must be an (n, 2) array of (x, y), got shape {pts.shape}."
            raise ValueError(msg)
    if src.shape != dst.shape:
        msg = f"Landmarks differ in number: {len(src)} and {len(dst)} points; row k of each must be the same point."
        raise ValueError(msg)
    need = 3 if kind == "affine" else 2
    if len(src) < need:
        msg = f"A {kind} fit needs at least {need} landmark pairs, got {len(src)}."
        raise ValueError(msg)
    if not (np.all(np.isfinite(src)) and np.all(np.isfinite(dst))):
        msg = "Landmarks must be finite."
        raise ValueError(msg)
    to_px = np.diag([1.0 / u_dst, 1.0 / u_dst, 1.0])
    from_px = np.diag([u_src, u_src, 1.0])
    src, dst = src * u_src, dst * u_dst
    M = np.eye(3)
    if kind == "affine":
        X = np.column_stack([src, np.ones(len(src))])
        sol, *_ = np.linalg.lstsq(X, dst, rcond=None)
        M[:2, :] = sol.T
        return to_px @ M @ from_px
    ms, md = src.mean(0), dst.mean(0)
    s0, d0 = src - ms, dst - md
    C = d0.T @ s0 / len(src)
    U, S, Vt = np.linalg.svd(C)
    D = np.eye(2)
    if np.linalg.det(U @ Vt) < 0 and not allow_mirror:
        D[1, 1] = -1.0
    R = U @ D @ Vt
    c = 1.0
    if kind == "similarity":
        var = (s0**2).sum() / len(src)
        c = float(np.trace(np.diag(S) @ D) / var) if var > 0 else 1.0
    M[:2, :2] = c * R
    M[:2, 2] = md - c * R @ ms
    return to_px @ M @ from_px


# --------------------------------------------------------------------------------------------------------------------
# working images
# --------------------------------------------------------------------------------------------------------------------
@dataclass
class WorkImage:
    """A section's image at the working resolution: grey scale (tissue bright), tissue mask, and its geometry."""

    section: str
    grey: np.ndarray  # (h, w) float32 in [0, 1]
    mask: np.ndarray  # (h, w) bool
    to_full: np.ndarray  # 3 x 3: working px -> full-resolution (native) px
    px_um: float  # working pixel size in µm
    level: int = 0
    rgb: np.ndarray | None = field(default=None, repr=False)  # (h, w, 3) float32 in [0, 1]

    @property
    def shape(self) -> tuple[int, int]:
        return self.grey.shape

    @property
    def tissue_area_um2(self) -> float:
        return float(self.mask.sum()) * self.px_um**2


def image_levels(image) -> list:
    """The pyramid levels of an image element (``DataArray``s with dims ``(c, y, x)``), finest first."""
    from xarray import DataTree

    if isinstance(image, DataTree):
        keys = sorted(image.children, key=lambda k: int(str(k).removeprefix("scale")))
        return [next(iter(image[k].values())) for k in keys]
    return [image]


def full_size(image) -> tuple[int, int]:
    """(height, width) of an image element's full-resolution level."""
    lev = image_levels(image)[0]
    return int(lev.sizes["y"]), int(lev.sizes["x"])


def working_pixel_size(shapes_px: Sequence[tuple[int, int]], um_per_px: Sequence[float], target_size: int) -> float:
    """One working pixel size (µm) for all sections: the largest image's longer side spans ``target_size`` pixels.

    Never finer than the coarsest native pixel (images are not upsampled).
    """
    long_um = [max(h, w) * u for (h, w), u in zip(shapes_px, um_per_px, strict=True)]
    return float(max(max(long_um) / float(target_size), max(um_per_px)))


def tissue_grey(rgb: np.ndarray) -> np.ndarray:
    """Grey scale with tissue bright: inverted luminance minus the background level, scaled to [0, 1]."""
    lum = rgb[..., 0] * 0.299 + rgb[..., 1] * 0.587 + rgb[..., 2] * 0.114
    t = 1.0 - lum
    h, w = t.shape
    b = max(1, int(0.04 * min(h, w)))
    border = np.concatenate([t[:b].ravel(), t[-b:].ravel(), t[:, :b].ravel(), t[:, -b:].ravel()])
    bg = float(np.median(border))
    # the bright end: a high percentile of the pixels that stand out from the background (however little tissue)
    fg = t[t > bg + 0.05]
    hi = float(np.percentile(fg, 99.0)) if fg.size >= 16 else float(t.max())
    if hi - bg <= 0.02:
        return np.zeros_like(t, dtype=np.float32)
    return np.clip((t - bg) / (hi - bg), 0.0, 1.0).astype(np.float32)


def tissue_mask(grey: np.ndarray, *, min_fraction: float = 0.05) -> np.ndarray:
    """Tissue mask: Otsu's threshold on the smoothed grey image, opened, small pieces dropped, holes filled.

    Returns an all-False mask if no tissue stands out (a blank image).
    """
    from skimage.filters import threshold_otsu

    g = ndi.gaussian_filter(np.asarray(grey, dtype=np.float32), 1.5)
    if float(g.max() - g.min()) < 0.05:
        return np.zeros(g.shape, dtype=bool)
    m = g > threshold_otsu(g)
    m = ndi.binary_opening(m, structure=np.ones((3, 3), bool), iterations=1)
    lab, n = ndi.label(m)
    if n == 0:
        return np.zeros(g.shape, dtype=bool)
    sizes = ndi.sum_labels(m, lab, index=np.arange(1, n + 1))
    keep = np.flatnonzero(sizes >= min_fraction * sizes.max()) + 1
    m = np.isin(lab, keep)
    m = ndi.binary_closing(m, structure=np.ones((3, 3), bool), iterations=2, border_value=0)
    return ndi.binary_fill_holes(m)


def load_work_image(image, *, section: str, um_per_px: float, px_um: float, keep_rgb: bool = False) -> WorkImage:
    """Read an image element at the working pixel size ``px_um``.

    The coarsest pyramid level that is at least as fine as the working resolution is read and resampled (with an
    anti-aliasing blur) onto the working grid. When that level is still finer than the working grid by an integer
    factor ``f >= 2`` (a single-scale image, or a pyramid that stops too early), it is first reduced lazily by
    ``f x f`` block means (:func:`asign._lazy.block_mean`), chunk by chunk: the full level is never held in memory.
    """
    from ._lazy import block_mean

    levels = image_levels(image)
    h0, w0 = int(levels[0].sizes["y"]), int(levels[0].sizes["x"])
    k = px_um / um_per_px  # full-resolution px per working px
    chosen, li = levels[0], 0
    for i, lev in enumerate(levels):
        s = max(h0 / lev.sizes["y"], w0 / lev.sizes["x"])
        if s <= k * (1.0 + 1e-6):
            chosen, li = lev, i
    sy, sx = h0 / chosen.sizes["y"], w0 / chosen.sizes["x"]
    # level px per working px; an integer part >= 2 is taken off by block means before the array is read
    f = int(np.floor(min(k / sy, k / sx) * (1.0 + 1e-6)))
    if f >= 2:
        import dask

        small, (by, bx) = block_mean(chosen, factor=f, channels=3)
        # the level's own maximum (not the block means'), read in the same pass
        top = 255 if chosen.dtype == np.uint8 else chosen.transpose("c", "y", "x").data[:3].max()
        small, top = dask.compute(small, top)
        rgb = np.ascontiguousarray(np.moveaxis(np.asarray(small), 0, -1))
        if chosen.dtype == np.uint8:
            rgb /= 255.0
        elif rgb.size and float(top) > 1.0:
            rgb /= float(top)
        # block px i has its centre at level px (i + 1/2) b - 1/2: a level b times coarser than the one read
        sy, sx = sy * by, sx * bx
    else:
        arr = chosen.transpose("y", "x", "c").data
        arr = np.asarray(arr.compute() if hasattr(arr, "compute") else arr)
        rgb = arr[..., :3].astype(np.float32)
        if arr.dtype == np.uint8:
            rgb /= 255.0
        elif rgb.size and rgb.max() > 1.0:
            rgb /= float(rgb.max())
    # working px u -> full x = k (u + 1/2) - 1/2 -> level l = (x + 1/2) / s - 1/2 = (k / s) u + (k / s - 1) / 2
    fy, fx = k / sy, k / sx
    h, w = max(1, int(np.ceil(h0 / k))), max(1, int(np.ceil(w0 / k)))
    sig = (max(0.0, (fy - 1.0) / 2.0), max(0.0, (fx - 1.0) / 2.0))
    out = np.empty((h, w, rgb.shape[2]), dtype=np.float32)
    for c in range(rgb.shape[2]):
        ch = ndi.gaussian_filter(rgb[..., c], sig) if max(sig) > 0.1 else rgb[..., c]
        out[..., c] = ndi.affine_transform(
            ch,
            np.diag([fy, fx]),
            offset=((fy - 1.0) / 2.0, (fx - 1.0) / 2.0),
            output_shape=(h, w),
            order=1,
            mode="nearest",
            prefilter=False,
        )
    grey = tissue_grey(out)
    mask = tissue_mask(grey)
    to_full = np.array([[k, 0.0, (k - 1.0) / 2.0], [0.0, k, (k - 1.0) / 2.0], [0.0, 0.0, 1.0]])
    return WorkImage(section, grey, mask, to_full, float(px_um), li, out if keep_rgb else None)


def to_full_resolution(A_work: np.ndarray, moving: WorkImage, fixed: WorkImage) -> np.ndarray:
    """A map between working grids as a map between full-resolution pixels: ``S_f A S_m^{-1}``."""
    return fixed.to_full @ A_work @ np.linalg.inv(moving.to_full)


def to_working(A_full: np.ndarray, moving: WorkImage, fixed: WorkImage) -> np.ndarray:
    """A map between full-resolution pixels as a map between working grids."""
    return np.linalg.inv(fixed.to_full) @ A_full @ moving.to_full


# --------------------------------------------------------------------------------------------------------------------
# similarity figures
# --------------------------------------------------------------------------------------------------------------------
def dice(a: np.ndarray, b: np.ndarray) -> float:
    """Dice coefficient of two boolean masks (0 if both are empty)."""
    a, b = np.asarray(a, bool), np.asarray(b, bool)
    s = int(a.sum()) + int(b.sum())
    return float(2.0 * np.logical_and(a, b).sum() / s) if s else 0.0


def nmi(a: np.ndarray, b: np.ndarray, *, bins: int = 32, mask: np.ndarray | None = None) -> float:
    """Normalised mutual information ``2 I(a; b) / (H(a) + H(b))`` of two images with values in [0, 1]."""
    a = np.asarray(a, dtype=float).ravel()
    b = np.asarray(b, dtype=float).ravel()
    if mask is not None:
        m = np.asarray(mask, bool).ravel()
        a, b = a[m], b[m]
    if a.size == 0:
        return 0.0
    h, _, _ = np.histogram2d(np.clip(a, 0, 1), np.clip(b, 0, 1), bins=bins, range=[[0, 1], [0, 1]])
    p = h / h.sum()
    pa, pb = p.sum(1), p.sum(0)

    def ent(q):
        q = q[q > 0]
        return float(-(q * np.log(q)).sum())

    ha, hb, hab = ent(pa), ent(pb), ent(p.ravel())
    if ha + hb <= 0:
        return 0.0
    return float(max(0.0, 2.0 * (ha + hb - hab) / (ha + hb)))


def pair_scores(moving: WorkImage, fixed: WorkImage, A_work: np.ndarray) -> tuple[float, float]:
    """(mask Dice, NMI of the grey images) of the moving image mapped by ``A_work`` onto the fixed one."""
    wm = warp(moving.mask.astype(np.float32), A_work, fixed.shape, order=1) > 0.5
    wg = warp(moving.grey, A_work, fixed.shape, order=1)
    return dice(wm, fixed.mask), nmi(wg, fixed.grey)


# --------------------------------------------------------------------------------------------------------------------
# coarse search
# --------------------------------------------------------------------------------------------------------------------
def _centroid(mask: np.ndarray) -> np.ndarray:
    ys, xs = np.nonzero(mask)
    if len(xs) == 0:
        h, w = mask.shape
        return np.array([(w - 1) / 2.0, (h - 1) / 2.0])
    return np.array([xs.mean(), ys.mean()])


def _shrink(mask: np.ndarray, f: float) -> np.ndarray:
    """A mask shrunk ``f`` times (anti-aliased, values in [0, 1]): small = (x + 1/2) / f - 1/2."""
    if f == 1.0:
        return mask.astype(np.float32)
    S = np.diag([1.0 / f, 1.0 / f, 1.0])
    S[:2, 2] = (1.0 / f - 1.0) / 2.0
    shape = (max(1, int(np.ceil(mask.shape[0] / f))), max(1, int(np.ceil(mask.shape[1] / f))))
    small = ndi.gaussian_filter(mask.astype(np.float32), max(0.0, (f - 1) / 2))
    return warp(small, S, shape, order=1)


def _touches_border(mask: np.ndarray, *, margin: int = 4, min_fraction: float = 0.05) -> bool:
    """Whether a tissue mask runs along its image's border.

    Tissue within ``margin`` px of an edge over at least ``min_fraction`` of that edge (the mask's clean-up erodes
    a cut edge by a pixel or two; stray pixels do not count).
    """
    m = np.asarray(mask, dtype=bool)
    k = max(1, min(margin, min(m.shape) // 4))
    edges = (m[:k].any(axis=0), m[-k:].any(axis=0), m[:, :k].any(axis=1), m[:, -k:].any(axis=1))
    return any(e.mean() >= min_fraction for e in edges)


def overlap_shift(moved: np.ndarray, target: np.ndarray) -> tuple[float, float]:
    """The shift ``(dx, dy)`` in pixels of ``moved`` that maximises its overlap with ``target`` (same shape).

    FFT cross-correlation on grids padded to twice the size, so that shifts do not wrap around.
    """
    h, w = target.shape
    return _peak_shift(_xcorr(target, moved, (2 * h, 2 * w)), (h, w))


def _xcorr(a: np.ndarray, b: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """``c[s] = sum_x a(x + s) b(x)`` for every shift ``s`` (FFT on grids of ``size``, no wrap-around if large)."""
    return np.fft.irfft2(np.fft.rfft2(a, s=size) * np.conj(np.fft.rfft2(b, s=size)), s=size)


def _peak_shift(score: np.ndarray, shape: tuple[int, int]) -> tuple[float, float]:
    """The shift ``(dx, dy)`` at the maximum of a correlation map of :func:`_xcorr` over an image of ``shape``."""
    h, w = shape
    iy, ix = np.unravel_index(int(np.argmax(score)), score.shape)
    return float(ix if ix < w else ix - score.shape[1]), float(iy if iy < h else iy - score.shape[0])


def content_shift(
    moved: np.ndarray,
    moved_mask: np.ndarray,
    target: np.ndarray,
    target_mask: np.ndarray,
    *,
    min_overlap: float = MIN_CONTENT_OVERLAP,
) -> tuple[float, float, float]:
    """The shift ``(dx, dy)`` of ``moved`` that maximises its masked normalised cross-correlation with ``target``.

    The correlation of the two grey images is taken over the overlap of the two masks only, for every shift at
    once (six FFT cross-correlations, Padfield's masked NCC), among shifts whose overlap covers at least
    ``min_overlap`` of the smaller mask. Returns ``(dx, dy, ncc)``; ``ncc = -inf`` if no shift qualifies.
    """
    h, w = target.shape
    size = (2 * h, 2 * w)
    fm, mm = np.asarray(target_mask, np.float64), np.asarray(moved_mask, np.float64)
    f, m = np.asarray(target, np.float64) * fm, np.asarray(moved, np.float64) * mm
    n = _xcorr(fm, mm, size)
    sf, sm = _xcorr(f, mm, size), _xcorr(fm, m, size)
    nn = np.maximum(n, 1e-9)
    num = _xcorr(f, m, size) - sf * sm / nn
    var_f = np.maximum(_xcorr(f * f, mm, size) - sf**2 / nn, 1e-12)
    var_m = np.maximum(_xcorr(fm, m * m, size) - sm**2 / nn, 1e-12)
    ncc = np.where(n >= min_overlap * min(fm.sum(), mm.sum()), num / np.sqrt(var_f * var_m), -np.inf)
    return (*_peak_shift(ncc, (h, w)), float(ncc.max()))


def overlap_ncc(moving: WorkImage, fixed: WorkImage, A_work: np.ndarray) -> float:
    """Pearson correlation of the two grey images over their tissue overlap (-1 if it is under 50 px)."""
    wm = warp(moving.mask.astype(np.float32), A_work, fixed.shape, order=1) > 0.5
    o = wm & fixed.mask
    if o.sum() < 50:
        return -1.0
    a = warp(moving.grey, A_work, fixed.shape, order=1)[o].astype(np.float64)
    b = fixed.grey[o].astype(np.float64)
    a, b = a - a.mean(), b - b.mean()
    den = float(np.sqrt((a * a).sum() * (b * b).sum()))
    return float((a * b).sum() / den) if den > 0 else -1.0


def is_cut_pair(moving: WorkImage, fixed: WorkImage) -> bool:
    """Whether either tissue mask runs along its image's border (a section that may be cut there)."""
    return _touches_border(moving.mask) or _touches_border(fixed.mask)


def coarse_search(
    moving: WorkImage,
    fixed: WorkImage,
    *,
    step_deg: float = 10.0,
    mirror: bool = False,
    scale: float = 1.0,
    n_best: int = 1,
) -> list[tuple[float, np.ndarray, dict[str, Any]]]:
    """Rotation search on the tissue masks: rotations in ``step_deg`` steps over 360°, two ways to translate.

    ``"centroid"``: the mask centroids matched. Only when a mask touches its image's border (tissue that may be
    cut there, which moves its centroid, and a piece that fits in several places of the other mask), two more:
    ``"overlap"``, shifted to the largest mask overlap (FFT cross-correlation), and ``"content"``, shifted to the
    best masked normalised cross-correlation of the grey images (:func:`content_shift`; the angles ranked by it).
    For the first two ways the best angles (at least ``2 * step_deg`` apart) are refined to 1° by a local search.
    Returns up to ``n_best`` starts of each way ``(Dice, A_work, info)``, sorted by decreasing Dice.
    """
    # both masks shrunk by one factor so that the larger has SEARCH_SIZE px; S maps small px to working px
    f = max(1.0, max(*moving.shape, *fixed.shape) / float(SEARCH_SIZE))
    ms, fs = _shrink(moving.mask, f), _shrink(fixed.mask, f)
    S = np.diag([f, f, 1.0])
    S[:2, 2] = (f - 1.0) / 2.0
    S_inv = np.linalg.inv(S)
    fb = fs > 0.5
    cm, cf = _centroid(moving.mask), _centroid(fixed.mask)

    def start(theta: float, mir: bool, how: str) -> np.ndarray:  # noqa: FBT001
        A = translation(*cf) @ rotation(theta, mirror=mir, scale=scale) @ translation(*(-cm))
        if how == "overlap":
            dx, dy = overlap_shift(warp(ms, S_inv @ A @ S, fs.shape, order=1), fs)
            A = S @ translation(dx, dy) @ S_inv @ A
        return A

    def score(A: np.ndarray) -> float:
        A_small = S_inv @ A @ S
        return dice(warp(ms, A_small, fs.shape, order=1) > 0.5, fb)

    flips = (False, True) if mirror else (False,)
    angles = np.arange(0.0, 360.0, step_deg)
    out = []
    # a mask that touches its image's border may be cut there, which moves its centroid: search by overlap too
    cut = is_cut_pair(moving, fixed)
    for how in ("centroid", "overlap") if cut else ("centroid",):
        grid = [(score(start(t, mir, how)), t, mir) for mir in flips for t in angles]
        grid.sort(key=lambda r: -r[0])
        picked: list[tuple[float, float, bool]] = []
        for d, t, mir in grid:
            if all(mir != pm or _angle_gap(t, pt) >= 2 * step_deg - 1e-9 for _, pt, pm in picked):
                picked.append((d, t, mir))
            if len(picked) == n_best:
                break
        for d, t, mir in picked:
            best = (d, t)
            for dt in np.arange(-step_deg / 2.0, step_deg / 2.0 + 1e-9, 1.0):
                dd = score(start(t + dt, mir, how))
                if dd > best[0]:
                    best = (dd, t + dt)
            A = start(best[1], mir, how)
            out.append((best[0], A, {"rotation_deg": float(best[1]), "mirrored": bool(mir), "translation": how}))
    if cut:
        mg, fg = _shrink(moving.grey, f), _shrink(fixed.grey, f)
        ranked = []
        for mir in flips:
            for t in angles:
                A = start(t, mir, "centroid")
                A_small = S_inv @ A @ S
                wm = warp(ms, A_small, fs.shape, order=1) > 0.5
                dx, dy, c = content_shift(warp(mg, A_small, fs.shape, order=1), wm, fg, fb)
                if np.isfinite(c):
                    ranked.append((c, t, mir, S @ translation(dx, dy) @ S_inv @ A))
        ranked.sort(key=lambda r: -r[0])
        kept: list[tuple[float, float, bool, np.ndarray]] = []
        for c, t, mir, A in ranked:
            if all(mir != pm or _angle_gap(t, pt) >= 2 * step_deg - 1e-9 for _, pt, pm, _ in kept):
                kept.append((c, t, mir, A))
            if len(kept) == n_best:
                break
        for c, t, mir, A in kept:
            info = {"rotation_deg": float(t), "mirrored": bool(mir), "translation": "content", "ncc": float(c)}
            out.append((score(A), A, info))
    out.sort(key=lambda r: -r[0])
    return out


def _angle_gap(a: float, b: float) -> float:
    d = abs(a - b) % 360.0
    return min(d, 360.0 - d)


# --------------------------------------------------------------------------------------------------------------------
# ANTs
# --------------------------------------------------------------------------------------------------------------------
@contextlib.contextmanager
def _ants_environment(seed: int):
    """Single-threaded ITK and a fixed ANTs seed for the duration of a registration.

    antspyx passes ``--random-seed`` to ``antsRegistration`` only from ``ants.config._random_seed`` (its public
    setter, ``ants.set_ants_deterministic``, also forbids the non-"Repro" transform types), so the seed is set there
    and restored afterwards; ``ANTS_RANDOM_SEED`` is set as well for ANTs builds that read it.
    """
    ants = import_ants()

    keys = {"ANTS_RANDOM_SEED": str(int(seed) + 1)}
    old = {k: os.environ.get(k) for k in keys}
    old_seed = getattr(ants.config, "_random_seed", None)
    os.environ.update(keys)
    ants.config._random_seed = int(seed) + 1  # ANTs treats 0 as "no seed"
    try:
        yield
    finally:
        ants.config._random_seed = old_seed
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def shrink_factors(long_side: int) -> tuple[int, int, int]:
    """ANTs shrink factors of the three levels for working images whose longer side is ``long_side`` px."""
    f = max(1, int(long_side) // 400)  # the coarsest level keeps at least 100 px
    return (4 * f, 2 * f, f)


def import_ants():
    """Import antspyx, making ITK single-threaded unless the user chose otherwise.

    ITK reads ``ITK_GLOBAL_DEFAULT_NUMBER_OF_THREADS`` once, when it first creates a multi-threader, so it must be
    set before ANTs is first used in the process; multi-threaded metric sums make registrations irreproducible.
    """
    os.environ.setdefault("ITK_GLOBAL_DEFAULT_NUMBER_OF_THREADS", "1")
    import ants

    return ants


def _to_ants(image: np.ndarray):
    ants = import_ants()

    # ANTs' axis 0 is physical x: hand it (x, y)-ordered arrays
    return ants.from_numpy(np.ascontiguousarray(np.asarray(image, dtype=np.float32).T))


def _write_ants_affine(F: np.ndarray, path: str) -> None:
    ants = import_ants()

    tx = ants.create_ants_transform(
        transform_type="AffineTransform",
        precision="float",
        dimension=2,
        matrix=np.asarray(F[:2, :2], dtype=float),
        offset=np.asarray(F[:2, 2], dtype=float),
    )
    ants.write_transform(tx, path)


def _read_ants_affine(path: str) -> np.ndarray:
    """The homogeneous matrix of an ANTs linear transform file, by mapping three points."""
    ants = import_ants()

    tx = ants.read_transform(path)
    pts = np.array([[0.0, 0.0], [1000.0, 0.0], [0.0, 1000.0]])
    mapped = np.array([ants.apply_ants_transform_to_point(tx, tuple(p)) for p in pts], dtype=float)
    return fit_transform(pts, mapped, kind="affine")


def ants_refine(
    moving: WorkImage,
    fixed: WorkImage,
    A0_work: np.ndarray,
    *,
    transform: str = "rigid",
    seed: int = 0,
    masked: bool = True,
) -> np.ndarray:
    """Refine a start ``A0_work`` (moving -> fixed working px) with :func:`ants.registration`.

    Single-threaded with a fixed seed. Returns the refined moving -> fixed map in working pixels.
    """
    ants = import_ants()

    if transform not in ANTS_TYPES:
        msg = f"Unknown transform {transform!r}; choose one of {list(ANTS_TYPES)}."
        raise ValueError(msg)
    fi = _to_ants(fixed.grey)
    mi = _to_ants(moving.grey)
    kw: dict[str, Any] = {}
    if masked and fixed.mask.any() and moving.mask.any():
        # the metric region: the tissue of either image with a margin (background texture and slide marks ignored)
        r = max(8, int(MASK_MARGIN * max(*fixed.shape, *moving.shape)))
        fm = ndi.distance_transform_edt(~fixed.mask) <= r
        mm = ndi.distance_transform_edt(~moving.mask) <= r
        kw = {"mask": _to_ants(fm.astype(np.float32)), "moving_mask": _to_ants(mm.astype(np.float32))}
    with tempfile.TemporaryDirectory(prefix="asign_ants_") as tmp, _ants_environment(seed):
        init = os.path.join(tmp, "init.mat")
        # ANTs wants the fixed -> moving map
        _write_ants_affine(np.linalg.inv(A0_work), init)
        reg = ants.registration(
            fixed=fi,
            moving=mi,
            type_of_transform=ANTS_TYPES[transform],
            initial_transform=[init],
            outprefix=os.path.join(tmp, "reg_"),
            aff_metric="mattes",
            aff_sampling=32,
            aff_random_sampling_rate=ANTS_SAMPLING,
            aff_iterations=ANTS_ITERATIONS,
            aff_shrink_factors=shrink_factors(max(*fixed.shape, *moving.shape)),
            aff_smoothing_sigmas=ANTS_SMOOTHING,
            verbose=False,
            **kw,
        )
        fwd = [p for p in reg["fwdtransforms"] if str(p).endswith(".mat")]
        if len(fwd) != 1:
            msg = f"ANTs returned unexpected transforms {reg['fwdtransforms']}."
            raise RuntimeError(msg)
        F = _read_ants_affine(fwd[0])
    return np.linalg.inv(F)


# --------------------------------------------------------------------------------------------------------------------
# pose graph: section poses that agree best with all pairwise maps
# --------------------------------------------------------------------------------------------------------------------
PAIR_MODES = ("adjacent", "second")
# a pair's weight in the pose graph is 1 / max(1 - Dice, DICE_FLOOR): tissue masks that disagree pin a pair down less
DICE_FLOOR = 0.005
# tissue points per section used by the pose graph (a regular subsample of the working mask)
POSE_POINTS = 400


def stack_pairs(sections: Sequence[str], reference: str, pairs: str = "adjacent") -> list[tuple[str, str]]:
    """``(moving, fixed)`` pairs to register.

    The consecutive pairs towards the reference, then (``pairs="second"``) every second neighbour ``(i, i + 2)``,
    the section farther from the reference moving (the later one on a tie).
    """
    from .pp._align import registration_pairs

    if pairs not in PAIR_MODES:
        msg = f"Unknown pairs={pairs!r}; choose one of {list(PAIR_MODES)}."
        raise ValueError(msg)
    out = registration_pairs(sections, reference)
    if pairs == "second":
        r = list(sections).index(reference)
        for i in range(len(sections) - 2):
            a, b = sections[i], sections[i + 2]
            out.append((a, b) if abs(i - r) > abs(i + 2 - r) else (b, a))
    return out


def pair_weight(dice_after: float) -> float:
    """Weight of a registered pair in the pose graph: ``1 / max(1 - Dice, DICE_FLOOR)`` (1 without images)."""
    if not np.isfinite(dice_after):
        return 1.0
    return float(1.0 / max(1.0 - float(dice_after), DICE_FLOOR))


def tissue_points(work: WorkImage, n: int = POSE_POINTS) -> np.ndarray:
    """About ``n`` points (x, y) on a regular grid over the tissue mask, in full-resolution (native) pixels."""
    ys, xs = np.nonzero(work.mask)
    if len(xs) == 0:
        h, w = work.shape
        ys, xs = np.mgrid[0:h, 0:w].reshape(2, -1)
    step = max(1, int(np.sqrt(len(xs) / float(n))))
    keep = (xs % step == 0) & (ys % step == 0)
    p = np.column_stack([xs[keep], ys[keep], np.ones(int(keep.sum()))]).astype(float)
    return (p @ work.to_full.T)[:, :2]


def _pose_update(q: np.ndarray, centre: np.ndarray, transform: str) -> np.ndarray:
    """A small map about ``centre``: rotation ``q[0]`` (rad), shift ``q[1:3]``, then log-scale or linear terms."""
    c, s = np.cos(q[0]), np.sin(q[0])
    L = np.array([[c, -s], [s, c]])
    if transform == "similarity":
        L = L * np.exp(q[3])
    elif transform == "affine":
        L = L @ (np.eye(2) + np.array([[q[3], q[4]], [q[4], q[5]]]))
    D = np.eye(3)
    D[:2, :2] = L
    D[:2, 2] = centre + q[1:3] - L @ centre
    return D


def solve_pose_graph(
    pairwise: Mapping[tuple[str, str], np.ndarray],
    points: Mapping[str, np.ndarray],
    weights: Mapping[tuple[str, str], float],
    sections: Sequence[str],
    reference: str,
    *,
    transform: str = "rigid",
    init: Mapping[str, np.ndarray] | None = None,
) -> dict[str, np.ndarray]:
    """Section maps ``T_s`` (native px -> reference px, ``T_ref = I``) that agree best with all pairwise maps.

    Minimises ``sum_(m, f) w_mf mean_p |T_m p - T_f A_mf p|^2`` over the moving section's tissue points ``p``, where
    ``A_mf`` maps ``m``'s native pixels into ``f``'s: weighted least squares on point displacements, so a pair that
    disagrees with the others is outvoted in proportion to its weight. Every ``T_s`` is the start ``init[s]``
    (default: the consecutive maps composed towards the reference) followed by a rigid, similarity or affine
    correction about the section's tissue centre; rigid corrections keep each map's scale (the ratio of pixel sizes).
    """
    from scipy.optimize import least_squares

    from .pp._align import compose_to_reference

    if init is None:
        init = compose_to_reference(pairwise, sections, reference)
    free = [s for s in sections if s != reference]
    npar = {"rigid": 3, "similarity": 4, "affine": 6}[transform]
    centre = {s: np.asarray(points[s], dtype=float).mean(axis=0) for s in sections}
    terms = []
    for (m, f), A in pairwise.items():
        P = np.asarray(points[m], dtype=float)
        AP = P @ A[:2, :2].T + A[:2, 2]
        terms.append((m, f, P, AP, np.sqrt(float(weights[(m, f)]) / len(P))))

    def poses(x: np.ndarray) -> dict[str, np.ndarray]:
        T = {reference: np.asarray(init[reference], dtype=float)}
        for i, s in enumerate(free):
            T[s] = init[s] @ _pose_update(x[i * npar : (i + 1) * npar], centre[s], transform)
        return T

    def residuals(x: np.ndarray) -> np.ndarray:
        T = poses(x)
        out = []
        for m, f, P, AP, w in terms:
            a = P @ T[m][:2, :2].T + T[m][:2, 2]
            b = AP @ T[f][:2, :2].T + T[f][:2, 2]
            out.append((w * (a - b)).ravel())
        return np.concatenate(out)

    x0 = np.zeros(npar * len(free))
    if free:
        sol = least_squares(residuals, x0, method="lm" if len(residuals(x0)) >= len(x0) else "trf", xtol=1e-12)
        x0 = sol.x
    T = poses(x0)
    ref_inv = np.linalg.inv(T[reference])
    return {s: ref_inv @ M for s, M in T.items()}


def pair_residuals_um(
    pairwise: Mapping[tuple[str, str], np.ndarray],
    points: Mapping[str, np.ndarray],
    transforms: Mapping[str, np.ndarray],
    um_per_px: float,
) -> dict[tuple[str, str], float]:
    """Median displacement (µm) between each pair's map and the stack's maps: ``|T_m p - T_f A_mf p|``."""
    out = {}
    for (m, f), A in pairwise.items():
        P = np.asarray(points[m], dtype=float)
        a = P @ transforms[m][:2, :2].T + transforms[m][:2, 2]
        AP = P @ A[:2, :2].T + A[:2, 2]
        b = AP @ transforms[f][:2, :2].T + transforms[f][:2, 2]
        out[(m, f)] = float(np.median(np.linalg.norm(a - b, axis=1))) * float(um_per_px)
    return out


# --------------------------------------------------------------------------------------------------------------------
# one pair, one stack
# --------------------------------------------------------------------------------------------------------------------
@dataclass
class PairResult:
    """The registration of one moving section onto its fixed neighbour."""

    moving: str
    fixed: str
    A_full: np.ndarray  # moving native px -> fixed native px
    dice_before: float
    dice_after: float
    nmi_before: float
    nmi_after: float
    dice_start: float
    refined: bool
    start: str
    info: dict[str, Any]


def register_pair(
    moving: WorkImage,
    fixed: WorkImage,
    *,
    transform: str = "rigid",
    mirror: bool = False,
    landmark_start: np.ndarray | None = None,
    refine: bool = True,
    rotation_step: float = 10.0,
    n_starts: int = 3,
    seed: int = 0,
) -> PairResult:
    """Register ``moving`` onto ``fixed``: coarse start (or landmarks), ANTs refinement, robustness check."""
    I_work = to_working(np.eye(3), moving, fixed)
    d0, n0 = pair_scores(moving, fixed, I_work)
    scale = 1.0
    if transform != "rigid" and moving.mask.any() and fixed.mask.any():
        scale = float(np.sqrt(fixed.tissue_area_um2 / moving.tissue_area_um2))
    if landmark_start is not None:
        A = to_working(landmark_start, moving, fixed)
        starts = [(pair_scores(moving, fixed, A)[0], A, {"start": "landmarks"})]
    elif moving.mask.any() and fixed.mask.any():
        starts = [
            (d, A, {**info, "start": "rotation_search"})
            for d, A, info in coarse_search(
                moving, fixed, step_deg=rotation_step, mirror=mirror, scale=scale, n_best=n_starts
            )
        ]
    else:
        starts = [(d0, I_work, {"start": "identity"})]
    # a cut section: every start is refined and the placement chosen by image content among near-best Dice
    cut = landmark_start is None and moving.mask.any() and fixed.mask.any() and is_cut_pair(moving, fixed)
    cands = []
    best = None
    for d_start, A_start, info in starts:
        if not cut and best is not None and d_start < best[0] - START_MARGIN:
            continue
        A, refined = A_start, False
        d_s, n_s = pair_scores(moving, fixed, A_start)
        if refine:
            try:
                A_ref = ants_refine(moving, fixed, A_start, transform=transform, seed=seed)
            except (RuntimeError, ValueError, np.linalg.LinAlgError) as e:
                logger.debug(f"ANTs failed for {moving.section} -> {fixed.section}: {e}")
            else:
                d_r, n_r = pair_scores(moving, fixed, A_ref)
                if np.all(np.isfinite(A_ref)) and d_r >= d_s - DICE_TOLERANCE:
                    A, refined, d_s, n_s = A_ref, True, d_r, n_r
        cand = (d_s, n_s, A, refined, d_start, info)
        cands.append(cand)
        # the best by Dice; near-ties (within the tolerance) are decided by NMI
        if best is None or d_s > best[0] + DICE_TOLERANCE or (d_s > best[0] - DICE_TOLERANCE and n_s > best[1]):
            best = cand
    if cut and len(cands) > 1:
        d_max = max(c[0] for c in cands)
        near = [c for c in cands if c[0] >= d_max - CUT_DICE_MARGIN]
        scores = [overlap_ncc(moving, fixed, c[2]) for c in near]
        best = near[int(np.argmax(scores))]
        best = (*best[:5], {**best[5], "overlap_ncc": float(max(scores))})
    d1, n1, A, refined, d_start, info = best
    A_full = to_full_resolution(A, moving, fixed)
    info = {**info, **decompose(A_full)}
    return PairResult(
        moving=moving.section,
        fixed=fixed.section,
        A_full=A_full,
        dice_before=d0,
        dice_after=d1,
        nmi_before=n0,
        nmi_after=n1,
        dice_start=float(d_start),
        refined=bool(refined),
        start=str(info.get("start", "")),
        info=info,
    )


@dataclass
class StackRegistration:
    """Pairwise maps (native px of moving -> native px of fixed), quality columns and parameters."""

    pairwise: dict[tuple[str, str], np.ndarray]
    quality: dict[str, Any]
    params: dict[str, Any]
    transforms: dict[str, np.ndarray] = field(default_factory=dict)  # T_s: native px -> reference px


def check_pixel_sizes(
    work: Mapping[str, WorkImage],
    pairs: Sequence[tuple[str, str]],
    um_per_px: Mapping[str, float],
    *,
    transform: str,
    max_scale_ratio: float,
) -> None:
    """Stop (rigid) or warn (similarity, affine) when two neighbours' tissue differs wildly in physical size."""
    for m, f in pairs:
        am, af = work[m].tissue_area_um2, work[f].tissue_area_um2
        if am <= 0 or af <= 0:
            continue
        r = float(np.sqrt(max(am, af) / min(am, af)))
        if r <= max_scale_ratio:
            continue
        small = m if am < af else f
        if _touches_border(work[small].mask):
            # a section cut at its image's border is smaller without being scaled: no reason to stop
            logger.warning(
                f"Sections {m!r} and {f!r}: their tissue differs in linear size by a factor {r:.2f} "
                f"(> max_scale_ratio={max_scale_ratio}), and the tissue of {small!r} runs along its image's border: it "
                "may be a partial (cut) section rather than a scaled one, so the alignment goes on; a partial "
                "section can be placed wrongly (its mask fits in several places), so check it with "
                "`asign.pl.alignment` and give `landmarks=` if needed. If the pixel sizes are wrong instead, fix "
                "`um_per_px` in the manifest (`uns['asign']['stack']`)."
            )
            continue
        msg = (
            f"Sections {m!r} and {f!r}: their tissue differs in linear size by a factor {r:.2f} "
            f"(> max_scale_ratio={max_scale_ratio}) at the manifest's pixel sizes "
            f"({um_per_px[m]:g} and {um_per_px[f]:g} µm/px). The pixel sizes are probably wrong or defaulted: fix "
            "`um_per_px` in the manifest (`uns['asign']['stack']`)"
        )
        if transform == "rigid":
            msg += ", or use transform='similarity' to estimate the scale, or raise `max_scale_ratio`."
            raise ValueError(msg)
        logger.warning(msg + "; the scale is estimated from the images.")


QUALITY_COLUMNS = (
    "pair",
    "moving",
    "fixed",
    "start",
    "dice_before",
    "dice_after",
    "nmi_before",
    "nmi_after",
    "dice_start",
    "refined",
    "rotation_deg",
    "scale",
    "anisotropy",
    "mirrored",
)


def quality_columns(rows: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """Per-pair rows as zarr-writable columns (lists of str, bool and float arrays)."""
    quality: dict[str, Any] = {}
    for c in QUALITY_COLUMNS:
        vals = [r[c] for r in rows]
        if c in ("pair", "moving", "fixed", "start"):
            quality[c] = [str(v) for v in vals]
        elif c in ("refined", "mirrored"):
            quality[c] = np.asarray(vals, dtype=bool)
        else:
            quality[c] = np.asarray(vals, dtype=float)
    return quality


def load_work_images(
    sdata: SpatialData, stack: StackInfo, sections: Sequence[str], *, target_size: int
) -> tuple[dict[str, WorkImage], float]:
    """Working images (one shared pixel size) of the sections that have an image."""
    with_image = [s for s in sections if stack.image_key(s) is not None and stack.image_key(s) in sdata.images]
    work: dict[str, WorkImage] = {}
    if not with_image:
        return work, float("nan")
    um = {s: float(stack.um_per_px[stack.index(s)]) for s in with_image}
    sizes = [full_size(sdata.images[stack.image_key(s)]) for s in with_image]
    px_um = working_pixel_size(sizes, [um[s] for s in with_image], target_size)
    for s in with_image:
        work[s] = load_work_image(sdata.images[stack.image_key(s)], section=s, um_per_px=um[s], px_um=px_um)
        if not work[s].mask.any():
            logger.warning(f"Section {s!r}: no tissue found in image {stack.image_key(s)!r} (blank image?).")
    return work, px_um


def _given_pair_row(work: Mapping[str, WorkImage], m: str, f: str, A_full: np.ndarray, *, start: str) -> dict:
    row: dict[str, Any] = {"pair": f"{m}->{f}", "moving": m, "fixed": f, "start": start}
    if m in work and f in work:
        d0, n0 = pair_scores(work[m], work[f], to_working(np.eye(3), work[m], work[f]))
        d1, n1 = pair_scores(work[m], work[f], to_working(A_full, work[m], work[f]))
    else:
        d0 = n0 = d1 = n1 = float("nan")
    row.update(dice_before=d0, dice_after=d1, nmi_before=n0, nmi_after=n1, dice_start=d1, refined=False)
    row.update(decompose(A_full))
    return row


def evaluate_transforms(
    sdata: SpatialData,
    stack: StackInfo,
    sections: Sequence[str],
    transforms: Mapping[str, np.ndarray],
    *,
    reference: str,
    target_size: int = 1000,
    start: str = "given",
) -> dict[str, Any]:
    """Quality columns of given maps ``T_s`` (native -> reference px) for the consecutive pairs towards the reference.

    The pair map is ``A = T_fixed^{-1} T_moving``; pairs with a section without image get NaN figures.
    """
    from .pp._align import registration_pairs

    work, _ = load_work_images(sdata, stack, sections, target_size=target_size)
    rows = []
    for m, f in registration_pairs(sections, reference):
        A = np.linalg.inv(transforms[f]) @ transforms[m]
        rows.append(_given_pair_row(work, m, f, A, start=start))
    return quality_columns(rows)


def register_stack(
    sdata: SpatialData,
    stack: StackInfo,
    sections: Sequence[str],
    *,
    reference: str,
    transform: str = "rigid",
    method: str = "ants",
    mirror: bool = False,
    landmarks: Mapping[str, Any] | None = None,
    target_size: int = 1000,
    rotation_step: float = 10.0,
    max_scale_ratio: float = 1.5,
    pairs: str = "adjacent",
    seed: int = 0,
    show_progress_bar: bool = True,
) -> StackRegistration:
    """Register ``sections`` pairwise and place them in the reference's frame (see :func:`asign.pp.align_layers`).

    With ``pairs="adjacent"`` the consecutive maps are composed towards the reference; with ``pairs="second"`` the
    second neighbours are registered too and the poses come from :func:`solve_pose_graph`.
    """
    from tqdm.auto import tqdm

    from .pp._align import compose_to_reference, registration_pairs

    adjacent = registration_pairs(sections, reference)
    all_pairs = stack_pairs(sections, reference, pairs)
    landmarks = {str(k): np.asarray(v, dtype=float) for k, v in (landmarks or {}).items()}
    unknown = [s for s in landmarks if s not in stack.sections]
    if unknown:
        msg = f"Landmarks given for unknown sections {unknown}; the stack has sections {stack.sections}."
        raise KeyError(msg)
    for s, pts in landmarks.items():
        if pts.ndim != 2 or pts.shape[1] != 2 or not np.isfinite(pts).all():
            msg = (
                f"Landmarks for section {s!r} must be a finite (n, 2) array of (x, y) in the section's own image "
                f"pixels, got shape {pts.shape}{'' if np.isfinite(pts).all() else ' with non-finite values'}."
            )
            raise ValueError(msg)
    if method == "landmarks":
        lacking = sorted({s for p in adjacent for s in p if s not in landmarks})
        if lacking:
            msg = f"method='landmarks' needs landmarks for every section to align; missing for {lacking}."
            raise ValueError(msg)
    need = 3 if transform == "affine" else 2
    for m, f in all_pairs:
        if m not in landmarks or f not in landmarks:
            continue
        if len(landmarks[m]) != len(landmarks[f]):
            msg = (
                f"Landmarks of sections {m!r} and {f!r} differ in number: {len(landmarks[m])} and "
                f"{len(landmarks[f])} points; row k of every section must be the same anatomical point."
            )
            raise ValueError(msg)
        if len(landmarks[m]) < need:
            msg = (
                f"Landmarks of sections {m!r} and {f!r}: a {transform} fit needs at least {need} points, got "
                f"{len(landmarks[m])}."
            )
            raise ValueError(msg)
    no_image = [s for s in sections if stack.image_key(s) is None or stack.image_key(s) not in sdata.images]
    if no_image and method == "ants":
        msg = (
            f"Sections {no_image} have no image, so they cannot be registered from images; align the others with "
            f"`sections={[s for s in sections if s not in no_image]}`, or use method='landmarks' / 'transforms'."
        )
        raise ValueError(msg)
    um = {s: float(stack.um_per_px[stack.index(s)]) for s in sections}
    work, px_um = load_work_images(sdata, stack, sections, target_size=target_size)
    if method == "ants":
        check_pixel_sizes(work, adjacent, um, transform=transform, max_scale_ratio=max_scale_ratio)

    pairwise: dict[tuple[str, str], np.ndarray] = {}
    rows: list[dict[str, Any]] = []
    it = tqdm(all_pairs, desc="Registering sections", disable=not show_progress_bar)
    for m, f in it:
        lm = None
        if m in landmarks and f in landmarks:
            # fitted in microns: a rigid map keeps physical lengths between sections of different pixel sizes
            lm = fit_transform(
                landmarks[m],
                landmarks[f],
                kind=transform,
                allow_mirror=mirror,
                src_um_per_px=um[m],
                dst_um_per_px=um[f],
            )
        if method == "landmarks":
            A_full = lm
            row = _given_pair_row(work, m, f, A_full, start="landmarks")
        else:
            res = register_pair(
                work[m],
                work[f],
                transform=transform,
                mirror=mirror,
                landmark_start=lm,
                rotation_step=rotation_step,
                seed=seed,
            )
            A_full = res.A_full
            row = {
                "pair": f"{m}->{f}",
                "moving": m,
                "fixed": f,
                "start": res.start,
                "dice_before": res.dice_before,
                "dice_after": res.dice_after,
                "nmi_before": res.nmi_before,
                "nmi_after": res.nmi_after,
                "dice_start": res.dice_start,
                "refined": res.refined,
                **{k: res.info[k] for k in ("rotation_deg", "scale", "anisotropy", "mirrored")},
            }
        pairwise[(m, f)] = A_full
        rows.append(row)
        logger.debug(f"{row['pair']}: Dice {row['dice_before']:.3f} -> {row['dice_after']:.3f}")
    params = {
        "working_um_per_px": float(px_um) if np.isfinite(px_um) else -1.0,
        "working_levels": {s: int(w.level) for s, w in work.items()},
        "ants_type": ANTS_TYPES[transform],
        "dice_tolerance": DICE_TOLERANCE,
        "landmarks": sorted(landmarks),
        "pairs": str(pairs),
    }
    if pairs == "adjacent":
        T = compose_to_reference(pairwise, sections, reference)
        return StackRegistration(pairwise=pairwise, quality=quality_columns(rows), params=params, transforms=T)

    # pose graph: every pair votes for the poses, weighted by how well its tissue masks agree
    points = {s: tissue_points(work[s]) if s in work else _spot_points(sdata, stack, s) for s in sections}
    weights = {(r["moving"], r["fixed"]): pair_weight(r["dice_after"]) for r in rows}
    T = solve_pose_graph(pairwise, points, weights, sections, reference, transform=transform)
    um_ref = um[reference]
    resid = pair_residuals_um(pairwise, points, T, um_ref)
    final = {}
    for r in rows:
        m, f = r["moving"], r["fixed"]
        A = np.linalg.inv(T[f]) @ T[m]
        if m in work and f in work:
            final[(m, f)] = pair_scores(work[m], work[f], to_working(A, work[m], work[f]))
        else:
            final[(m, f)] = (float("nan"), float("nan"))
    params["pose_graph"] = {
        "pair": [r["pair"] for r in rows],
        "kind": ["adjacent" if (r["moving"], r["fixed"]) in adjacent else "second" for r in rows],
        "weight": np.asarray([weights[(r["moving"], r["fixed"])] for r in rows], dtype=float),
        "dice_pair": np.asarray([r["dice_after"] for r in rows], dtype=float),
        "nmi_pair": np.asarray([r["nmi_after"] for r in rows], dtype=float),
        "dice_final": np.asarray([final[(r["moving"], r["fixed"])][0] for r in rows], dtype=float),
        "nmi_final": np.asarray([final[(r["moving"], r["fixed"])][1] for r in rows], dtype=float),
        "residual_um": np.asarray([resid[(r["moving"], r["fixed"])] for r in rows], dtype=float),
        "dice_floor": DICE_FLOOR,
    }
    # the consecutive pairs' figures describe the maps returned (the pose graph's), the pair's own ones are kept
    adj_rows = []
    for r in rows:
        m, f = r["moving"], r["fixed"]
        if (m, f) not in adjacent:
            continue
        A = np.linalg.inv(T[f]) @ T[m]
        adj_rows.append(
            {
                **r,
                "dice_after": final[(m, f)][0],
                "nmi_after": final[(m, f)][1],
                **decompose(A),
            }
        )
    quality = quality_columns(adj_rows)
    quality["dice_pair"] = np.asarray([r["dice_after"] for r in rows if (r["moving"], r["fixed"]) in adjacent])
    quality["nmi_pair"] = np.asarray([r["nmi_after"] for r in rows if (r["moving"], r["fixed"]) in adjacent])
    quality["residual_um"] = np.asarray([resid[(r["moving"], r["fixed"])] for r in adj_rows])
    return StackRegistration(pairwise=pairwise, quality=quality, params=params, transforms=T)


def _spot_points(sdata: SpatialData, stack: StackInfo, section: str) -> np.ndarray:
    """Spot centres (x, y) of a section in its native pixels (for sections without an image)."""
    shapes = sdata.shapes[stack.shapes_key(section)]
    return np.column_stack([shapes.geometry.x.to_numpy(), shapes.geometry.y.to_numpy()]).astype(float)
