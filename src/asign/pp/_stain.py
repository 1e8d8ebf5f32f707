"""Stain normalisation of H&E sections in optical-density space, and test-time augmentation views.

Every section's stain is estimated from its own image only (tissue pixels of a coarse pyramid level; never from
expression), and normalising a pixel is then a fixed linear map in optical-density (OD) space per section,
``OD' = OD @ M`` with a ``3 x 3`` matrix ``M``, so that it can run batched on the encoder's device (one matrix per
patch; patches of several sections share a batch). White (OD 0) stays white, so white padding is unaffected.

OD convention (used throughout, both directions): ``OD = -ln((I + 1) / 256)`` for 8-bit intensities ``I``, inverse
``I = 256 exp(-OD) - 1`` clipped to ``[0, 255]``: ``I = 255`` gives ``OD = 0`` exactly.

Methods
-------
``"macenko"`` (Macenko et al. 2009, "A method for normalizing histology slides for quantitative analysis"):
    tissue pixels with every channel's OD at least ``beta = 0.15``; the plane of the two leading eigenvectors of their
    OD covariance; the 1st and 99th percentiles of the angle of the pixels' projections in that plane give the two
    stain vectors (haematoxylin = the one absorbing more red); per-pixel concentrations by least squares, and their
    99th percentiles as the maximal concentrations. Normalisation maps concentrations ``C = OD pinv(HE_s)^T`` to
    ``C (maxC_t / maxC_s)`` and back through the target's stain vectors:
    ``M = pinv(HE_s)^T diag(maxC_t / maxC_s) HE_t^T``. The OD component off the section's stain plane is dropped
    (as in the original method).
``"od_scale"``:
    a white-preserving analogue of Reinhard colour transfer in OD space: each RGB channel's OD is scaled so that
    the mean OD of the section's tissue pixels (at least ``beta`` in some channel) matches the target's,
    ``M = diag(od_t / od_s)``. (Reinhard's transfer proper matches means and spreads in Lab space; it is not a
    linear map of OD and does not keep white white, so it is not offered.)

Targets (``stain_target``)
--------------------------
``"reference"`` (``"macenko"`` only): the fixed standard of the reference implementation of Macenko's method
(M. Veta's ``normalizeStaining.m``, carried unchanged into ``schaugf/HEnorm_python`` and ``torchstain``):
stain vectors ``HE_ref`` = H (0.5626, 0.7201, 0.4062), E (0.2159, 0.8012, 0.5581) and maximal concentrations
``maxC_ref`` = (1.9705, 1.0308). They were estimated with a background intensity of 240 rather than 256, which
only shifts OD by ``ln(256 / 240) = 0.065``. A fixed target keeps features comparable between stacks (a model
trained on one stack applies to another), so it is the default. ``"median"``: the element-wise median of the
processed sections' estimates (stain vectors renormalised) — consistent within one stack, but it changes with the
stack. A section name: that section's estimate. A mapping as recorded in ``uns['{key_added}_features']
['stain_target_params']`` reuses the target of another stack (e.g. the training stack's).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from asign._logging import logger

if TYPE_CHECKING:
    import torch

STAIN_NORMS = ("none", "macenko", "od_scale")
"""Accepted values of ``stain_norm``."""
TTA_VIEWS = {"none": 1, "flips": 4, "dihedral": 8}
"""Accepted values of ``tta`` and their number of views (identity; + horizontal, vertical and both flips; + the
four rotations by 90° of the patch and of its mirror image)."""
OD_DENOM = 256.0
"""OD = -ln((I + 1) / OD_DENOM)."""
BETA = 0.15
"""Pixels with OD below this (in every channel for ``od_scale``, in any for ``macenko``) count as background."""
ALPHA = 1.0
"""Percentile of the stain-vector angles (1st and 99th)."""
MAX_CONC_PERCENTILE = 99.0
MIN_PIXELS = 500
"""Fewer usable tissue pixels than this and a section's stain is not estimated (identity, with a warning)."""
MAX_PIXELS = 200_000
"""Tissue pixels used for the estimate (a seeded random subset beyond this)."""
ESTIMATE_SIDE = 1000
MIN_STAIN_ANGLE = 10.0
"""Smallest angle (degrees) between the estimated H and E vectors for a Macenko estimate to be used. Real H&E pairs
lie about 15-40 degrees apart (Macenko's reference pair: 22 degrees, condition number 5.1), while one colour gives
a pair less than 10 degrees apart: 0.1 degrees for grey dust on a blank slide, about 7 with +-8 levels of noise per
channel. Two unit vectors ``t`` apart have singular values ``sqrt(1 +- cos t)``, so condition number
``cot(t / 2)``: below 10 degrees it exceeds 11 and ``pinv(HE)`` amplifies OD noise more than 8-fold, and the map
(which divides by the source's concentrations) sends grey to colours, white or black."""
"""The stain is estimated on the coarsest pyramid level whose longer side has at least this many pixels."""
MACENKO_REFERENCE_HE = np.array([[0.5626, 0.2159], [0.7201, 0.8012], [0.4062, 0.5581]])
"""Reference stain vectors (columns H, E; rows R, G, B OD) of Macenko's reference implementation."""
MACENKO_REFERENCE_MAX_C = np.array([1.9705, 1.0308])
"""Reference maximal (99th-percentile) H and E concentrations of the same implementation."""


class StainEstimationError(ValueError):
    """A section's stain cannot be estimated (too little tissue, or no two distinct stains)."""


class StainCollinearError(StainEstimationError):
    """The Macenko H and E vectors are (nearly) collinear: the tissue pixels show one colour, not two stains."""


# ------------------------------------------------------------------------------------------------- option checks
def _check_choice(value: str | None, choices: Sequence[str] | Mapping[str, Any], name: str) -> str:
    """``value`` (`None` -> ``"none"``) if it is one of ``choices``; a ValueError listing them otherwise."""
    out = "none" if value is None else value
    if not isinstance(out, str) or out not in choices:
        msg = f"Unknown `{name}` {value!r}; choose one of {list(choices)} (or None)."
        raise ValueError(msg)
    return out


def check_stain_norm(stain_norm: str | None) -> str:
    """Normalise and validate ``stain_norm`` (`None` -> ``"none"``)."""
    return _check_choice(stain_norm, STAIN_NORMS, "stain_norm")


def check_tta(tta: str | None) -> str:
    """Normalise and validate ``tta`` (`None` -> ``"none"``)."""
    return _check_choice(tta, TTA_VIEWS, "tta")


_TARGET_SHAPES = {"stain_vectors": (3, 2), "max_conc": (2,), "od_mean": (3,)}


def check_stain_target(stain_norm: str, stain_target: Any, sections: Sequence[str]) -> None:
    """Everything about ``stain_target`` that can be checked before any image is read.

    Its type; ``"reference"`` only with ``"macenko"`` (``"od_scale"`` has no fixed standard); a section name among
    the processed ``sections``; a mapping with the entries (and shapes) that ``stain_norm`` needs. Whether the named
    section's stain can be estimated is known only later (:func:`resolve_target`).
    """
    if isinstance(stain_target, Mapping):
        if stain_norm == "none":
            return
        need = ("stain_vectors", "max_conc") if stain_norm == "macenko" else ("od_mean",)
        missing = [k for k in need if k not in stain_target]
        if missing:
            msg = (
                f"`stain_target` mapping lacks {missing} needed by stain_norm={stain_norm!r}; pass the "
                "`uns['<key_added>_features']['stain_target_params']` of a stack normalised with the same method."
            )
            raise ValueError(msg)
        for k, shp in _TARGET_SHAPES.items():
            if k in stain_target and np.asarray(stain_target[k]).shape != shp:
                msg = f"`stain_target['{k}']` must have shape {shp}, got {np.asarray(stain_target[k]).shape}."
                raise ValueError(msg)
        return
    if not isinstance(stain_target, str):
        msg = f"`stain_target` must be a string or a mapping, got {type(stain_target).__name__}."
        raise TypeError(msg)
    if stain_norm == "none" or stain_target in ("auto", "median"):
        return
    if stain_target == "reference":
        if stain_norm != "macenko":
            msg = (
                f"stain_norm={stain_norm!r} has no fixed reference; use stain_target='median', a section name or a "
                "recorded target mapping (or stain_norm='macenko')."
            )
            raise ValueError(msg)
        return
    if stain_target not in sections:
        msg = (
            f"Unknown `stain_target` {stain_target!r}; use 'auto', 'reference', 'median', a processed section "
            f"({list(sections)}) or a recorded target mapping."
        )
        raise ValueError(msg)


# ---------------------------------------------------------------------------------------------- OD conversions
def rgb_to_od(rgb: np.ndarray) -> np.ndarray:
    """``-ln((I + 1) / 256)`` of 8-bit intensities (any shape), float64."""
    return -np.log((np.asarray(rgb, dtype=np.float64) + 1.0) / OD_DENOM)


def od_to_rgb(od: np.ndarray) -> np.ndarray:
    """Inverse of :func:`rgb_to_od`, clipped to ``[0, 255]`` (float64, not rounded)."""
    return np.clip(OD_DENOM * np.exp(-np.asarray(od, dtype=np.float64)) - 1.0, 0.0, 255.0)


# ---------------------------------------------------------------------------------------------- estimation
def _unit_columns(v: np.ndarray) -> np.ndarray:
    v = np.asarray(v, dtype=np.float64)
    return v / np.maximum(np.linalg.norm(v, axis=0, keepdims=True), 1e-12)


def macenko_stains(
    od: np.ndarray, *, beta: float = BETA, alpha: float = ALPHA, min_pixels: int = MIN_PIXELS
) -> tuple[np.ndarray, np.ndarray]:
    """Macenko stain vectors ``(3, 2)`` (columns H, E; unit length) and 99th-percentile concentrations ``(2,)``.

    ``od`` is ``(n, 3)``: optical densities of tissue pixels. Raises :class:`StainEstimationError` when fewer than
    ``min_pixels`` pixels have every channel's OD at least ``beta``, and :class:`StainCollinearError` when the two
    vectors are less than ``MIN_STAIN_ANGLE`` degrees apart (one colour, not two stains).
    """
    od = np.asarray(od, dtype=np.float64).reshape(-1, 3)
    fg = od[np.all(od >= beta, axis=1)]
    if len(fg) < min_pixels:
        msg = f"only {len(fg)} stained pixels (OD >= {beta} in every channel; {min_pixels} needed)"
        raise StainEstimationError(msg)
    _, vecs = np.linalg.eigh(np.cov(fg.T))
    V = vecs[:, [2, 1]].copy()  # the two leading eigenvectors
    V[:, V[0] < 0] *= -1.0  # orientation does not change the plane; fixed for reproducible angles
    proj = fg @ V
    phi = np.arctan2(proj[:, 1], proj[:, 0])
    lo, hi = np.percentile(phi, [alpha, 100.0 - alpha])
    v_lo = V @ np.array([np.cos(lo), np.sin(lo)])
    v_hi = V @ np.array([np.cos(hi), np.sin(hi)])
    he = np.stack([v_lo, v_hi], axis=1) if v_lo[0] > v_hi[0] else np.stack([v_hi, v_lo], axis=1)
    he[:, he.sum(axis=0) < 0] *= -1.0
    he = _unit_columns(he)
    angle = float(np.degrees(np.arccos(np.clip(he[:, 0] @ he[:, 1], -1.0, 1.0))))
    if not angle >= MIN_STAIN_ANGLE:  # also NaN
        cond = np.linalg.cond(he)
        msg = (
            f"the H and E stain vectors are only {angle:.2g} degrees apart (fewer than {MIN_STAIN_ANGLE:g}; condition "
            f"number {cond:.3g}): the tissue pixels show one colour, not two stains (a grey image, or dust on a blank "
            "slide?)"
        )
        raise StainCollinearError(msg)
    conc = np.linalg.lstsq(he, od.T, rcond=None)[0]
    max_c = np.percentile(conc, MAX_CONC_PERCENTILE, axis=1)
    if not np.all(np.isfinite(he)) or not np.all(max_c > 0):
        msg = f"degenerate stain estimate (maximal concentrations {max_c.tolist()})"
        raise StainEstimationError(msg)
    return he, max_c


def tissue_od_mean(od: np.ndarray, *, beta: float = BETA, min_pixels: int = MIN_PIXELS) -> np.ndarray:
    """Mean OD ``(3,)`` of the pixels with OD at least ``beta`` in some channel."""
    od = np.asarray(od, dtype=np.float64).reshape(-1, 3)
    fg = od[np.any(od >= beta, axis=1)]
    if len(fg) < min_pixels:
        msg = f"only {len(fg)} stained pixels (OD >= {beta} in some channel; {min_pixels} needed)"
        raise StainEstimationError(msg)
    m = fg.mean(axis=0)
    if not np.all(m > 0):
        msg = f"degenerate mean OD {m.tolist()}"
        raise StainEstimationError(msg)
    return m


@dataclass
class SectionStain:
    """A section's stain estimate (NaN where not estimated)."""

    stain_vectors: np.ndarray
    """``(3, 2)`` unit H and E OD vectors."""
    max_conc: np.ndarray
    """``(2,)`` 99th-percentile H and E concentrations."""
    od_mean: np.ndarray
    """``(3,)`` mean OD of stained tissue pixels."""
    n_pixels: int
    """Tissue pixels used."""
    level: int
    """Pyramid level read."""
    error: str = ""
    """Why the estimate failed ('' when it succeeded)."""

    @property
    def ok(self) -> bool:
        return not self.error


def _read_level(image: Any) -> tuple[np.ndarray, int]:
    """``(h, w, 3)`` uint8 RGB of the coarsest level with a longer side of at least ``ESTIMATE_SIDE`` px."""
    from asign.pp._tiles import image_levels

    levels = image_levels(image)
    k = 0
    for i, lv in enumerate(levels):
        if lv.stored and max(lv.data.shape[1:]) >= ESTIMATE_SIDE:
            k = i
    arr = levels[k].data
    step = max(1, int(max(arr.shape[1:]) // (4 * ESTIMATE_SIDE)))  # a huge single-level image: strided subsample
    arr = arr[:3, ::step, ::step]
    arr = np.asarray(arr.compute() if hasattr(arr, "compute") else arr)
    if arr.dtype != np.uint8:
        top = 255.0 if float(np.nanmax(arr)) > 1.0 else 1.0
        arr = np.clip(np.round(np.asarray(arr, dtype=np.float64) / top * 255.0), 0, 255).astype(np.uint8)
    return np.moveaxis(arr, 0, -1), k


def tissue_pixels(rgb: np.ndarray, *, seed: int = 0) -> np.ndarray:
    """OD ``(n, 3)`` of the tissue pixels of a ``(h, w, 3)`` uint8 image (asign's registration tissue mask).

    At most ``MAX_PIXELS`` pixels, a seeded random subset.
    """
    from asign._registration import tissue_grey, tissue_mask

    rgb = np.asarray(rgb)
    mask = tissue_mask(tissue_grey(rgb.astype(np.float32) / 255.0))
    px = rgb[mask]
    if len(px) > MAX_PIXELS:
        px = px[np.sort(np.random.default_rng(seed).choice(len(px), MAX_PIXELS, replace=False))]
    return rgb_to_od(px)


def estimate_stain(image: Any, *, section: str = "", stain_norm: str = "macenko") -> SectionStain:
    """Estimate a section's stain from its image element.

    The element is a numpy/dask ``(c, y, x)`` array, a :class:`xarray.DataArray` with dims ``c, y, x`` or a
    multiscale DataTree. Never raises for too little tissue or collinear stain vectors: the returned estimate then
    has NaN values and ``error`` set. With ``stain_norm="od_scale"`` (which needs only the mean OD) collinear stain vectors leave the
    stain vectors and maximal concentrations NaN but the estimate usable.
    """
    rgb, level = _read_level(image)
    od = tissue_pixels(rgb)
    nan3, nan2 = np.full(3, np.nan), np.full(2, np.nan)
    try:
        try:
            he, max_c = macenko_stains(od)
        except StainCollinearError:
            if stain_norm != "od_scale":
                raise
            he, max_c = np.full((3, 2), np.nan), nan2
        m = tissue_od_mean(od)
    except StainEstimationError as e:
        return SectionStain(np.full((3, 2), np.nan), nan2, nan3, len(od), level, str(e) or "failed")
    logger.debug(f"Stain of section {section}: H {he[:, 0].round(3)}, E {he[:, 1].round(3)}, max C {max_c.round(3)}.")
    return SectionStain(he, max_c, m, len(od), level)


# ---------------------------------------------------------------------------------------------- maps and targets
def macenko_matrix(he_s: np.ndarray, max_c_s: np.ndarray, he_t: np.ndarray, max_c_t: np.ndarray) -> np.ndarray:
    """``M`` with ``OD' = OD @ M`` (row vectors): Macenko normalisation of source stains onto target stains."""
    scale = np.asarray(max_c_t, dtype=np.float64) / np.asarray(max_c_s, dtype=np.float64)
    return np.linalg.pinv(np.asarray(he_s, dtype=np.float64)).T @ np.diag(scale) @ np.asarray(he_t, dtype=np.float64).T


def od_scale_matrix(od_s: np.ndarray, od_t: np.ndarray) -> np.ndarray:
    """``M = diag(od_t / od_s)``: per-channel OD scaling matching mean tissue OD."""
    return np.diag(np.asarray(od_t, dtype=np.float64) / np.asarray(od_s, dtype=np.float64))


def reference_target() -> dict[str, Any]:
    """The fixed Macenko standard as a target mapping (no ``od_mean``: ``od_scale`` has no fixed standard)."""
    return {
        "source": "reference",
        "stain_vectors": MACENKO_REFERENCE_HE.tolist(),
        "max_conc": MACENKO_REFERENCE_MAX_C.tolist(),
    }


def _target_from(est: SectionStain, source: str) -> dict[str, Any]:
    return {
        "source": source,
        "stain_vectors": np.asarray(est.stain_vectors).tolist(),
        "max_conc": np.asarray(est.max_conc).tolist(),
        "od_mean": np.asarray(est.od_mean).tolist(),
    }


def resolve_target(
    stain_norm: str, stain_target: str | Mapping[str, Any], estimates: Mapping[str, SectionStain]
) -> dict[str, Any]:
    """The target mapping (``source``, ``stain_vectors``, ``max_conc``, and ``od_mean`` where defined).

    ``stain_target`` must have passed :func:`check_stain_target` (with the sections of ``estimates``).
    """
    ok = {s: e for s, e in estimates.items() if e.ok}
    if isinstance(stain_target, Mapping):
        out = {"source": str(stain_target.get("source", "given"))}
        for k in _TARGET_SHAPES:
            if k in stain_target:
                out[k] = np.asarray(stain_target[k], dtype=np.float64).tolist()
        return out
    if stain_target == "auto":
        stain_target = "reference" if stain_norm == "macenko" else "median"
    if stain_target == "reference":
        return reference_target()
    if stain_target == "median":
        if not ok:
            msg = "stain_target='median': no section's stain could be estimated (see the warnings above)."
            raise ValueError(msg)
        # od_scale estimates may lack stain vectors (collinear): the median of those that have them, or NaN
        vec = [e for e in ok.values() if np.all(np.isfinite(e.stain_vectors))]
        he = (
            _unit_columns(np.median(np.stack([e.stain_vectors for e in vec]), axis=0))
            if vec
            else np.full((3, 2), np.nan)
        )
        max_c = np.median(np.stack([e.max_conc for e in vec]), axis=0) if vec else np.full(2, np.nan)
        return {
            "source": "median",
            "stain_vectors": he.tolist(),
            "max_conc": max_c.tolist(),
            "od_mean": np.median(np.stack([e.od_mean for e in ok.values()]), axis=0).tolist(),
        }
    est = estimates[stain_target]
    if not est.ok:
        msg = f"stain_target={stain_target!r}: that section's stain could not be estimated ({est.error})."
        raise ValueError(msg)
    return _target_from(est, stain_target)


def section_matrix(stain_norm: str, est: SectionStain, target: Mapping[str, Any]) -> np.ndarray:
    """The ``3 x 3`` OD map of one section (identity when its estimate failed)."""
    if stain_norm == "none" or not est.ok:
        return np.eye(3)
    if stain_norm == "macenko":
        return macenko_matrix(est.stain_vectors, est.max_conc, target["stain_vectors"], target["max_conc"])
    return od_scale_matrix(est.od_mean, target["od_mean"])


def stain_maps(
    images: Mapping[str, Any],
    *,
    stain_norm: str,
    stain_target: str | Mapping[str, Any] = "auto",
) -> tuple[dict[str, np.ndarray], dict[str, SectionStain], dict[str, Any]]:
    """Estimate every section's stain and its OD map toward the target.

    Sections whose stain cannot be estimated get the identity map and a warning naming them.

    Returns
    -------
    ``(matrices, estimates, target)``: per section the ``3 x 3`` matrix and the :class:`SectionStain`, and the
    target mapping.
    """
    stain_norm = check_stain_norm(stain_norm)
    check_stain_target(stain_norm, stain_target, list(images))  # before any image is read
    estimates = {s: estimate_stain(img, section=s, stain_norm=stain_norm) for s, img in images.items()}
    for s, e in estimates.items():
        if not e.ok:
            logger.warning(
                f"Section {s!r}: its stain cannot be estimated ({e.error}); it is not stain-normalised (identity)."
            )
    target = resolve_target(stain_norm, stain_target, estimates)
    mats = {s: section_matrix(stain_norm, e, target) for s, e in estimates.items()}
    return mats, estimates, target


# ---------------------------------------------------------------------------------------------- application
def apply_od_map(x: np.ndarray, M: np.ndarray) -> np.ndarray:
    """Apply ``OD' = OD @ M`` to 8-bit RGB ``(..., 3, h, w)`` (channel axis third from last); float64 0-255.

    ``M`` is ``(3, 3)`` or ``(B, 3, 3)`` for a batch ``(B, 3, h, w)``.
    """
    od = rgb_to_od(x)
    M = np.asarray(M, dtype=np.float64)
    out = np.einsum("bchw,bcd->bdhw", od, M) if M.ndim == 3 else np.einsum("...chw,cd->...dhw", od, M)
    return od_to_rgb(out)


def apply_od_map_torch(x: torch.Tensor, M: torch.Tensor) -> torch.Tensor:
    """Batched :func:`apply_od_map` on ``x``'s device: float ``(B, 3, h, w)`` in 0-255, ``M`` ``(B, 3, 3)``."""
    import torch

    od = -torch.log((x.float() + 1.0) / OD_DENOM)
    od = torch.einsum("bchw,bcd->bdhw", od, M.to(dtype=od.dtype))
    return (OD_DENOM * torch.exp(-od) - 1.0).clamp_(0.0, 255.0)


def tta_views_torch(x: torch.Tensor, tta: str) -> list[torch.Tensor]:
    """The views of a ``(B, C, h, w)`` batch: identity (``"none"``), the 4 flips or the 8 dihedral transforms."""
    import torch

    if tta == "none":
        return [x]
    if tta == "flips":
        return [x, torch.flip(x, dims=(3,)), torch.flip(x, dims=(2,)), torch.flip(x, dims=(2, 3))]
    m = torch.flip(x, dims=(3,))
    return [torch.rot90(x, k, dims=(2, 3)) for k in range(4)] + [torch.rot90(m, k, dims=(2, 3)) for k in range(4)]


def tta_views_numpy(x: np.ndarray, tta: str) -> list[np.ndarray]:
    """:func:`tta_views_torch` for a channels-last ``(B, h, w, C)`` numpy batch."""
    if tta == "none":
        return [x]
    if tta == "flips":
        return [x, x[:, :, ::-1], x[:, ::-1, :], x[:, ::-1, ::-1]]
    m = x[:, :, ::-1]
    return [np.rot90(x, k, axes=(1, 2)) for k in range(4)] + [np.rot90(m, k, axes=(1, 2)) for k in range(4)]


def stain_uns(
    sections: Sequence[str],
    stain_norm: str,
    matrices: Mapping[str, np.ndarray],
    estimates: Mapping[str, SectionStain],
    target: Mapping[str, Any],
) -> dict[str, Any]:
    """The zarr-writable ``uns`` entries of a stain normalisation (one row per stack section)."""
    n = len(sections)
    mats = np.tile(np.eye(3), (n, 1, 1))
    vecs, maxc, odm = np.full((n, 3, 2), np.nan), np.full((n, 2), np.nan), np.full((n, 3), np.nan)
    ok, level, npx = np.zeros(n, bool), np.full(n, -1, np.int64), np.zeros(n, np.int64)
    for i, s in enumerate(sections):
        if s in estimates:
            e = estimates[s]
            mats[i] = matrices[s]
            vecs[i], maxc[i], odm[i] = e.stain_vectors, e.max_conc, e.od_mean
            ok[i], level[i], npx[i] = e.ok, e.level, e.n_pixels
    return {
        "stain_target": str(target.get("source", "given")),
        "stain_target_params": {
            k: (v if isinstance(v, str) else np.asarray(v, dtype=np.float64)) for k, v in target.items()
        },
        "stain_matrix": mats,
        "stain_vectors": vecs,
        "stain_max_conc": maxc,
        "stain_od_mean": odm,
        "stain_estimated": ok,
        "stain_level": level,
        "stain_n_pixels": npx,
        "stain_beta": float(BETA),
        "stain_alpha": float(ALPHA),
        "stain_od": "OD = -ln((I + 1) / 256); OD' = OD @ stain_matrix[section]",
    }
