"""Plane geometry for spot footprints: affine helpers, circle polygons and circle/polygon IoU.

All functions are vectorised over arrays of points, circles or polygon pairs; none loops over spots in Python.
Points are ``(x, y)`` in the last axis. Affine transforms are homogeneous ``3 x 3`` matrices acting on column vectors
(``p' = T @ [x, y, 1]``), the convention of :class:`spatialdata.transformations.Affine`.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

#: Default footprint radius in native pixels: half the 224 px spot patch (method.md §2.3 and §3.1).
PATCH_RADIUS_PX = 112.0
_POLYGON_CHUNK = 20_000  # pairs per shapely batch (~ 2 x 32 MB of vertices at 100 vertices)


def as_affine(T) -> np.ndarray:
    """Validate and return ``T`` as a float ``3 x 3`` homogeneous affine matrix.

    Raises
    ------
    ValueError
        If ``T`` is not ``3 x 3``, not finite, its last row is not ``[0, 0, 1]`` or its linear part is singular.
    """
    M = np.asarray(T, dtype=float)
    if M.shape != (3, 3):
        msg = f"An affine transform must be a 3 x 3 homogeneous matrix, got shape {M.shape}."
        raise ValueError(msg)
    if not np.all(np.isfinite(M)):
        msg = "The affine transform has non-finite entries."
        raise ValueError(msg)
    if not np.allclose(M[2], [0.0, 0.0, 1.0], atol=1e-9):
        msg = f"The last row of an affine transform must be [0, 0, 1], got {M[2].tolist()}."
        raise ValueError(msg)
    if abs(np.linalg.det(M[:2, :2])) < 1e-12:
        msg = "The affine transform's linear part is singular (it collapses the plane)."
        raise ValueError(msg)
    return M


def apply_affine(T: np.ndarray, points: np.ndarray) -> np.ndarray:
    """Map points ``(..., 2)`` by the homogeneous ``3 x 3`` matrix ``T``.

    Computed element-wise (no BLAS call), so each point's result is bit-identical whatever the other points are:
    graphs built on it do not depend on spot order.
    """
    p = np.asarray(points, dtype=float)
    x, y = p[..., 0], p[..., 1]
    out = np.empty(p.shape, dtype=float)
    out[..., 0] = T[0, 0] * x + T[0, 1] * y + T[0, 2]
    out[..., 1] = T[1, 0] * x + T[1, 1] * y + T[1, 2]
    return out


def singular_values(T: np.ndarray) -> np.ndarray:
    """Singular values ``(sigma_max, sigma_min)`` of the linear part of an affine matrix."""
    return np.linalg.svd(np.asarray(T, dtype=float)[:2, :2], compute_uv=False)


def similarity_scale(T: np.ndarray, *, rtol: float = 1e-6) -> float | None:
    """The isotropic scale of ``T`` if its linear part is a similarity (``A^T A = s^2 I``), else `None`.

    Rotations, reflections, uniform scalings and their compositions are similarities: they map circles to circles.
    """
    s = singular_values(T)
    if s[0] - s[1] <= rtol * s[0]:
        return float(np.sqrt(s[0] * s[1]))
    return None


def circle_polygon(centres: np.ndarray, radius, *, n_vertices: int = 100) -> np.ndarray:
    """Vertices ``(n, n_vertices, 2)`` of regular polygons inscribed in circles (not closed, not rounded)."""
    if n_vertices < 3:
        msg = f"A polygon needs at least 3 vertices, got n_vertices={n_vertices}."
        raise ValueError(msg)
    c = np.asarray(centres, dtype=float).reshape(-1, 2)
    r = np.broadcast_to(np.asarray(radius, dtype=float), (c.shape[0],))
    t = 2.0 * np.pi * np.arange(n_vertices) / n_vertices
    unit = np.stack([np.cos(t), np.sin(t)], axis=-1)
    return c[:, None, :] + r[:, None, None] * unit[None, :, :]


def ellipse_polygon(centres: np.ndarray, radius, linear: np.ndarray, *, n_vertices: int = 100) -> np.ndarray:
    """Vertices of circles of ``radius`` mapped by the ``2 x 2`` linear map ``linear`` and centred on ``centres``.

    ``centres`` are already in the target frame: this is the image of a native circle under an affine map whose
    linear part is ``linear``.
    """
    c = np.asarray(centres, dtype=float).reshape(-1, 2)
    r = np.broadcast_to(np.asarray(radius, dtype=float), (c.shape[0],))
    t = 2.0 * np.pi * np.arange(n_vertices) / n_vertices
    unit = np.stack([np.cos(t), np.sin(t)], axis=-1) @ np.asarray(linear, dtype=float).T
    return c[:, None, :] + r[:, None, None] * unit[None, :, :]


def circle_intersection_area(d, r1, r2) -> np.ndarray:
    """Area of the intersection of two discs of radii ``r1``, ``r2`` whose centres are ``d`` apart (vectorised).

    For equal radii this is ``2 r^2 arccos(d / 2r) - (d / 2) sqrt(4 r^2 - d^2)`` (method.md §3.1).
    """
    d, r1, r2 = np.broadcast_arrays(*(np.asarray(a, dtype=float) for a in (d, r1, r2)))
    out = np.zeros(d.shape, dtype=float)
    rmin = np.minimum(r1, r2)
    inside = d <= np.abs(r1 - r2)
    out[inside] = np.pi * rmin[inside] ** 2
    lens = ~inside & (d < r1 + r2)
    if np.any(lens):
        dd, a, b = d[lens], r1[lens], r2[lens]
        c1 = np.clip((dd * dd + a * a - b * b) / (2.0 * dd * a), -1.0, 1.0)
        c2 = np.clip((dd * dd + b * b - a * a) / (2.0 * dd * b), -1.0, 1.0)
        k = (-dd + a + b) * (dd + a - b) * (dd - a + b) * (dd + a + b)
        out[lens] = a * a * np.arccos(c1) + b * b * np.arccos(c2) - 0.5 * np.sqrt(np.clip(k, 0.0, None))
    return out


def circle_iou(d, r1, r2=None) -> np.ndarray:
    """Exact IoU of two discs of radii ``r1`` and ``r2`` (default ``r1``) whose centres are ``d`` apart."""
    r2 = r1 if r2 is None else r2
    inter = circle_intersection_area(d, r1, r2)
    union = np.pi * np.asarray(r1, dtype=float) ** 2 + np.pi * np.asarray(r2, dtype=float) ** 2 - inter
    return inter / union


def polygon_iou(P: np.ndarray, Q: np.ndarray, *, chunk_size: int = 50_000) -> np.ndarray:
    """IoU of polygon pairs ``P[i]``, ``Q[i]`` given as vertex arrays ``(m, n_vertices, 2)``.

    Uses shapely 2's vectorised ``polygons``, ``intersection`` and ``area``, in chunks of ``chunk_size`` pairs
    so that memory stays bounded.
    """
    import shapely

    P = np.asarray(P, dtype=float)
    Q = np.asarray(Q, dtype=float)
    if P.shape != Q.shape or P.ndim != 3 or P.shape[-1] != 2:
        msg = f"polygon_iou needs two (m, n_vertices, 2) arrays of the same shape, got {P.shape} and {Q.shape}."
        raise ValueError(msg)
    out = np.empty(P.shape[0], dtype=float)
    for start in range(0, P.shape[0], chunk_size):
        sl = slice(start, start + chunk_size)
        a = shapely.polygons(P[sl])
        b = shapely.polygons(Q[sl])
        inter = shapely.area(shapely.intersection(a, b))
        union = shapely.area(a) + shapely.area(b) - inter
        with np.errstate(invalid="ignore", divide="ignore"):
            out[sl] = np.where(union > 0, inter / union, 0.0)
    return out


@dataclass(frozen=True)
class Footprints:
    """Per-section spot-footprint geometry in the aligned frame (arrays indexed by section code).

    A footprint is a disc of ``radius_px`` native pixels mapped by the section's ``T_s``: a circle where ``T_s`` is a
    similarity, an ellipse otherwise.
    """

    radius_px: np.ndarray  # (S,) footprint radius in the section's native pixels
    linear: np.ndarray  # (S, 2, 2) linear part of T_s
    exact: np.ndarray  # (S,) bool: T_s is a similarity, so the footprint stays a circle
    radius_aligned: np.ndarray  # (S,) circle radius in aligned px where exact (nan otherwise)
    bound: np.ndarray  # (S,) radius of a disc that contains the footprint (rho * sigma_max), aligned px

    @classmethod
    def from_transforms(cls, transforms: np.ndarray, radius_px: np.ndarray) -> Footprints:
        transforms = np.asarray(transforms, dtype=float).reshape(-1, 3, 3)
        radius_px = np.broadcast_to(np.asarray(radius_px, dtype=float), (transforms.shape[0],)).copy()
        scales = [similarity_scale(T) for T in transforms]
        exact = np.array([s is not None for s in scales], dtype=bool)
        scale = np.array([np.nan if s is None else s for s in scales], dtype=float)
        smax = np.array([np.linalg.svd(T[:2, :2], compute_uv=False)[0] for T in transforms])
        return cls(
            radius_px=radius_px,
            linear=transforms[:, :2, :2].copy(),
            exact=exact,
            radius_aligned=radius_px * scale,
            bound=radius_px * smax,
        )


def aligned_centres(coords: np.ndarray, codes: np.ndarray, transforms: np.ndarray) -> np.ndarray:
    """Spot centres mapped by their section's ``T_s`` (element-wise, so order-independent to the bit)."""
    out = np.empty((coords.shape[0], 2), dtype=float)
    for s in range(transforms.shape[0]):
        m = codes == s
        if m.any():
            out[m] = apply_affine(transforms[s], coords[m])
    return out


def pairs_iou(
    centres: np.ndarray, codes: np.ndarray, fp: Footprints, i: np.ndarray, j: np.ndarray, *, n_vertices: int = 100
) -> np.ndarray:
    """IoU of the footprints of spot pairs ``(i, j)``: closed form where both stay circles, 100-gons otherwise."""
    si, sj = codes[i], codes[j]
    out = np.empty(i.shape[0], dtype=float)
    exact = fp.exact[si] & fp.exact[sj]
    if exact.any():
        a, b = i[exact], j[exact]
        d = np.hypot(centres[a, 0] - centres[b, 0], centres[a, 1] - centres[b, 1])
        out[exact] = circle_iou(d, fp.radius_aligned[si[exact]], fp.radius_aligned[sj[exact]])
    poly = np.flatnonzero(~exact)
    if poly.size:
        t = 2.0 * np.pi * np.arange(n_vertices) / n_vertices
        unit = np.stack([np.cos(t), np.sin(t)], axis=-1)  # (V, 2)
        # per-section vertex templates: rho_s * A_s @ u, in aligned px relative to the centre
        templ = fp.radius_px[:, None, None] * np.einsum("sij,vj->svi", fp.linear, unit)
        for start in range(0, poly.size, _POLYGON_CHUNK):
            sel = poly[start : start + _POLYGON_CHUNK]
            P = centres[i[sel]][:, None, :] + templ[si[sel]]
            Q = centres[j[sel]][:, None, :] + templ[sj[sel]]
            out[sel] = polygon_iou(P, Q, chunk_size=_POLYGON_CHUNK)
    return out
