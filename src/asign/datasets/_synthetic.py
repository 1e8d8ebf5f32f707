"""A procedural 3D tissue cut into serial sections: the embedded default dataset with ground truth."""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np
import pandas as pd
from scipy import ndimage as ndi

from asign._checks import check_number
from asign._constants import Key
from asign._logging import logger

if TYPE_CHECKING:
    from spatialdata import SpatialData

DOMAINS = ("stroma", "tumour", "fat", "immune")
# H&E-like RGB per domain (background is near white)
_DOMAIN_RGB = np.array(
    [
        [226, 150, 190],  # stroma: pink eosin
        [150, 86, 165],  # tumour: dense purple nuclei
        [244, 226, 234],  # fat: pale
        [118, 70, 150],  # immune: dark, small nuclei
    ],
    dtype=float,
)
_NUCLEUS_DENSITY = np.array([0.002, 0.012, 0.0005, 0.02])
# the block's tissue: an ellipse of these semi-axes (µm), its outline wobbling by up to 6 %
_TISSUE_SEMI_AXES_UM = (1500.0, 1180.0)


def _rotation(theta_deg: float) -> np.ndarray:
    t = np.deg2rad(theta_deg)
    return np.array([[np.cos(t), -np.sin(t)], [np.sin(t), np.cos(t)]])


# Section-to-section variation without a coherent motion. Every boundary of the block is roughened by its own smooth
# random field of (x, y, z): a sum of in-plane waves (wavelengths 120-400 µm) whose amplitudes swell and fade with
# depth (periods 40-120 µm), RMS 1. Neighbouring sections 16 µm apart get different local bays and bulges along their
# edges, but the crests never move, so no structure travels anywhere. The structures' sizes also change (zero-mean,
# quasi-periodic functions of depth) and small nests move their own way (``_islands``). The block itself is fixed:
# the same for every seed.
_N_MODES = 48


def _modes(seed: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    r = np.random.default_rng(seed)
    lam = r.uniform(120.0, 400.0, _N_MODES)
    phi = r.uniform(0.0, 2.0 * np.pi, _N_MODES)
    k = (2.0 * np.pi / lam)[:, None] * np.column_stack([np.cos(phi), np.sin(phi)])
    kz = 2.0 * np.pi / r.uniform(40.0, 120.0, _N_MODES)
    return k, kz, r.uniform(0.0, 2.0 * np.pi, _N_MODES), r.uniform(0.0, 2.0 * np.pi, _N_MODES)


def _mode_terms(name: str, z: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """In-plane wave vectors, amplitudes at depth ``z`` and phases of field ``name``.

    Standing waves in depth: a mode's amplitude ``2 cos(kz z + psi) / sqrt(J)`` swells and fades with z but its
    crests stay where they are (a travelling wave would move boundary features along the outline with depth, which
    registration reads as a turn of the whole section).
    """
    k, kz, ph, psi = _FIELDS[name]
    return k, 2.0 / np.sqrt(_N_MODES) * np.cos(kz * float(z) + psi), ph


_FIELDS = {"outline": _modes(101), "tumour": _modes(202), "fat": _modes(303)}


def _field(name: str, x: np.ndarray, y: np.ndarray, z: float) -> np.ndarray:
    """Rough field ``name`` at points ``(x, y)`` µm of depth ``z``: ``sum_j amp_j(z) cos(k_j . (x, y) + ph_j)``."""
    k, amp, ph = _mode_terms(name, z)
    x, y = np.broadcast_arrays(np.asarray(x, dtype=float), np.asarray(y, dtype=float))
    out = np.zeros(x.shape)
    for j in range(_N_MODES):
        out += amp[j] * np.cos(k[j, 0] * x + k[j, 1] * y + ph[j])
    return out


def _field_on_pixels(name: str, pixel_to_world: np.ndarray, shape: tuple[int, int], z: float) -> np.ndarray:
    """The same field on a pixel grid whose world position is affine in the pixel (x, y): separable exponentials."""
    k, amp, ph = _mode_terms(name, z)
    h, w = shape
    M = np.asarray(pixel_to_world, dtype=float)
    # k . world(u, v) = (k . M[:, 0]) u + (k . M[:, 1]) v + k . M[:, 2]
    au, av, a0 = k @ M[:2, 0], k @ M[:2, 1], k @ M[:2, 2]
    eu = np.exp(1j * np.outer(np.arange(w, dtype=float), au))  # (w, J)
    ev = np.exp(1j * np.outer(np.arange(h, dtype=float), av))  # (h, J)
    c = amp * np.exp(1j * (a0 + ph))
    return ((ev * c) @ eu.T).real


def _islands(n: int = 40, seed: int = 404) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Small tumour nests and immune aggregates in the stroma: tubes through the block, each tilted its own way.

    Returns centres at z = 0 (µm), radii (µm), lateral motion per µm of depth (the tilts, zero-mean jitter: the part
    of them that a rigid motion of the whole set explains, a shift and a turn, is removed, so the nests move
    independently without taking the anatomy anywhere) and domain codes.
    """
    r = np.random.default_rng(seed)
    t = r.uniform(0.0, 2.0 * np.pi, n)
    rad = 0.85 * np.sqrt(r.uniform(0.05, 1.0, n))
    c = np.column_stack([1500.0 * rad * np.cos(t), 1180.0 * rad * np.sin(t)])
    tilt = r.normal(0.0, 0.25, (n, 2))
    # remove the rigid part (shift + turn about the centroid) of the tilts' velocity field
    d = c - c.mean(axis=0)
    X = np.zeros((2 * n, 3))
    X[0::2, 0], X[1::2, 1] = 1.0, 1.0
    X[0::2, 2], X[1::2, 2] = -d[:, 1], d[:, 0]
    coef, *_ = np.linalg.lstsq(X, tilt.ravel(), rcond=None)
    tilt = tilt - (X @ coef).reshape(n, 2)
    return c, r.uniform(40.0, 110.0, n), tilt, np.where(r.random(n) < 0.5, 1, 3).astype(np.int8)


_ISLANDS = _islands()


def _island_discs(z: float, variation: float, size_change: float) -> list[tuple[float, float, float, int]]:
    """(x, y, radius, domain) of every nest at depth ``z``."""
    ic, ir, itilt, idom = _ISLANDS
    out = []
    for j in range(len(ir)):
        cx, cy = ic[j] + variation * itilt[j] * z
        rj = ir[j] * (1.0 + size_change * np.sin(z / (9.0 + j % 7) + j))
        out.append((float(cx), float(cy), float(rj), int(idom[j])))
    return out


def _islands_on_pixels(pixel_to_world: np.ndarray, shape: tuple[int, int], z: float, variation: float) -> np.ndarray:
    """Nest labels (-1 elsewhere) on a pixel grid whose world position is affine in the pixel (x, y)."""
    h, w = shape
    M = np.asarray(pixel_to_world, dtype=float)
    inv = np.linalg.inv(M)
    px_um = float(np.sqrt(abs(np.linalg.det(M[:2, :2]))))
    out = np.full(shape, -1, dtype=np.int8)
    for cx, cy, rj, dom in _island_discs(z, variation, VARIATION["structure_axes"] * variation):
        u, v = inv[:2, :2] @ (cx, cy) + inv[:2, 2]
        rp = rj / px_um + 1.0
        u0, u1 = max(int(np.floor(u - rp)), 0), min(int(np.ceil(u + rp)) + 1, w)
        v0, v1 = max(int(np.floor(v - rp)), 0), min(int(np.ceil(v + rp)) + 1, h)
        if u0 >= u1 or v0 >= v1:
            continue
        vv, uu = np.mgrid[v0:v1, u0:u1].astype(float)
        x = M[0, 0] * uu + M[0, 1] * vv + M[0, 2]
        y = M[1, 0] * uu + M[1, 1] * vv + M[1, 2]
        sub = out[v0:v1, u0:u1]
        sub[(x - cx) ** 2 + (y - cy) ** 2 <= rj * rj] = dom
    return out


# zero-mean, quasi-periodic functions of depth (RMS 1, no trend) for the structures' sizes: periods in µm, phases
_WIGGLE = {
    "outline_a": ((13.7, 0.3), (29.1, 2.1)),
    "outline_b": ((11.3, 1.7), (23.9, 4.0)),
    "tumour_a": ((12.1, 0.5), (31.3, 2.9)),
    "tumour_b": ((9.7, 3.8), (22.3, 0.7)),
    "rim": ((13.1, 4.1), (26.9, 1.9)),
    "fat_a": ((10.9, 5.0), (28.3, 1.4)),
    "fat_b": ((12.7, 3.1), (16.1, 0.8)),
}
#: Amplitudes (RMS over the block) of the section-to-section variation at ``variation=1``: boundary roughness in µm
#: (outline, tumour and fat lobule), relative size changes of the outline's and the structures' semi-axes, and of
#: the immune rim's width.
VARIATION = {
    "roughness_um": 12.0,
    "outline_axes": 0.005,
    "structure_axes": 0.02,
    "rim": 0.05,
}
#: Staining strength per section: SD of a factor common to the three channels and of one per channel
STAIN_SD = (0.06, 0.03)


def _wiggle(name: str, z: np.ndarray) -> np.ndarray:
    return sum(np.sin(z / period + phase) for period, phase in _WIGGLE[name])


def domain_at(x: np.ndarray, y: np.ndarray, z: float, *, drift: float = 0.0, variation: float = 1.0) -> np.ndarray:
    """Domain label of points ``(x, y)`` in µm of the section at depth ``z`` µm (-1 outside the tissue).

    The block is a fixed 3D object; ``drift`` and ``variation`` are as in :func:`synthetic_stack`: ``drift`` scales
    a coherent lateral motion of the anatomy with depth (the tumour centre moves ``4 drift`` µm and the fat lobule
    ``3 drift`` µm per µm of z, the outline's 3-fold wobble turns by ``0.48 drift`` ° per µm and its semi-axes grow
    and shrink by 2 and 1.5 µm per µm), ``variation`` the zero-mean changes (boundary roughness, sizes and the small
    nests' own motion; amplitudes ``VARIATION``) that make neighbouring sections differ without any trend.
    """
    return _domain_at(x, y, z, drift=drift, variation=variation)


def _domain_at(
    x: np.ndarray,
    y: np.ndarray,
    z: float,
    *,
    drift: float,
    variation: float,
    _fields: dict[str, np.ndarray] | None = None,
) -> np.ndarray:
    """:func:`domain_at`, optionally with the rough fields and nest labels precomputed on the points."""
    z = float(z)
    zd, v = drift * z, float(variation)
    V = VARIATION
    x, y = np.broadcast_arrays(np.asarray(x, dtype=float), np.asarray(y, dtype=float))

    def field(name: str) -> np.ndarray:
        return _fields[name] if _fields is not None and name in _fields else _field(name, x, y, z)

    # the block: an ellipse whose outline changes with depth
    a = (1500.0 + 2.0 * zd) * (1.0 + v * V["outline_axes"] * _wiggle("outline_a", z))
    b = (1180.0 - 1.5 * zd) * (1.0 + v * V["outline_axes"] * _wiggle("outline_b", z))
    ang = np.arctan2(y, x)
    wob = 1.0 + 0.06 * np.sin(ang * 3 + zd / 40.0)
    rough = v * V["roughness_um"]
    if rough:  # the outline's radius moves by about roughness_um * field
        wob = wob + rough / np.sqrt(a * b) * field("outline")
    inside = (x / a) ** 2 + (y / b) ** 2 <= wob**2
    # tumour ellipse (with an immune rim around it) and fat lobule
    s = V["structure_axes"] * v
    ta = 620.0 * (1.0 + s * _wiggle("tumour_a", z))
    tb = (460.0 + 2.0 * zd) * (1.0 + s * _wiggle("tumour_b", z))
    tum = ((x + 380.0 - 4.0 * zd) / ta) ** 2 + ((y - 180.0) / tb) ** 2
    fa = 420.0 * (1.0 + s * _wiggle("fat_a", z))
    fb = 340.0 * (1.0 + s * _wiggle("fat_b", z))
    fat = ((x - 650.0) / fa) ** 2 + ((y + 420.0 + 3.0 * zd) / fb) ** 2
    if rough:  # a level r^2 = 1 moves by about roughness_um * field when the level shifts by 2 roughness / radius
        tum = tum - 2.0 * rough / np.sqrt(ta * tb) * field("tumour")
        fat = fat - 2.0 * rough / np.sqrt(fa * fb) * field("fat")
    rim = 1.45 * (1.0 + V["rim"] * v * _wiggle("rim", z))
    lab = np.zeros(x.shape, dtype=np.int8)
    # small nests and aggregates, each moving its own way with depth (zero-mean jitter, scaled by variation)
    isl = _fields["islands"] if _fields is not None and "islands" in _fields else None
    if isl is None:
        for cx, cy, rj, dom in _island_discs(z, v, s):
            lab[(x - cx) ** 2 + (y - cy) ** 2 <= rj * rj] = dom
    else:
        lab[isl >= 0] = isl[isl >= 0]
    lab[(tum > 1.0) & (tum <= rim)] = 3
    lab[tum <= 1.0] = 1
    lab[fat <= 1.0] = 2
    lab[~inside] = -1
    return lab


def gradients_at(x: np.ndarray, y: np.ndarray, z: float | np.ndarray) -> np.ndarray:
    """Two smooth expression gradients (n, 2) at 3D points in µm."""
    z = np.asarray(z, dtype=float)
    g1 = np.tanh(x / 1200.0 + z / 200.0)
    g2 = np.sin(y / 450.0 + z / 60.0)
    return np.stack(np.broadcast_arrays(g1, g2), axis=-1)


def _render(
    world_xy: np.ndarray,
    z: float,
    rng: np.random.Generator,
    shape: tuple[int, int],
    *,
    drift: float = 0.0,
    variation: float = 1.0,
    stain: np.ndarray | None = None,
    pixel_to_world: np.ndarray | None = None,
) -> np.ndarray:
    h, w = shape
    fields = None
    if pixel_to_world is not None and variation * VARIATION["roughness_um"] > 0:
        fields = {name: _field_on_pixels(name, pixel_to_world, shape, z) for name in _FIELDS}
    if pixel_to_world is not None:
        fields = {**(fields or {}), "islands": _islands_on_pixels(pixel_to_world, shape, z, variation)}
    lab = _domain_at(world_xy[..., 0], world_xy[..., 1], z, drift=drift, variation=variation, _fields=fields)
    # the staining ramp follows gradient 1 where it was at depth drift * z (fixed in the block for drift = 0)
    g1 = gradients_at(world_xy[..., 0], world_xy[..., 1], drift * z)[..., 0].astype(np.float32)
    tissue = lab >= 0
    rgb = _DOMAIN_RGB.astype(np.float32)
    img = np.where(tissue[..., None], rgb[np.clip(lab, 0, None)], np.float32(246.0))
    # gradient 1 modulates staining intensity, so the image also carries the smooth signal
    img -= (18.0 * g1 * tissue)[..., None]
    # smooth staining noise, drawn at 1/4 resolution and interpolated (the same texture scale, 16x cheaper)
    coarse = ndi.gaussian_filter(rng.standard_normal((max(h // 4, 1), max(w // 4, 1)), dtype=np.float32), 1.5)
    noise = ndi.zoom(coarse, (h / coarse.shape[0], w / coarse.shape[1]), order=1, grid_mode=True, mode="nearest")
    noise /= noise.std() + 1e-9
    img += (8.0 * noise * tissue)[..., None]
    # nuclei: dark dots whose density depends on the domain
    dens = np.where(tissue, _NUCLEUS_DENSITY[np.clip(lab, 0, None)], 0.0)
    nuc = (rng.random((h, w), dtype=np.float32) < dens).astype(np.float32)
    nuc = np.clip(ndi.gaussian_filter(nuc, 1.2) * 12.0, 0, 1)
    img -= nuc[..., None] * np.array([90.0, 110.0, 40.0], dtype=np.float32)
    if stain is not None:  # the section's staining strength per channel: absorbance (255 - value) scaled
        img = np.where(tissue[..., None], 255.0 - (255.0 - img) * stain.astype(np.float32), img)
    img += rng.standard_normal(img.shape, dtype=np.float32) * 3.0
    return np.clip(img, 0, 255).astype(np.uint8)


def synthetic_stack(
    *,
    n_sections: int = 5,
    n_spots: int = 150,
    n_genes: int = 50,
    image_size: int = 1024,
    um_per_px: float = 4.0,
    thickness_um: float = 16.0,
    max_rotation_deg: float = 180.0,
    max_shift_um: float = 250.0,
    dispersion: float = 6.0,
    images: bool = True,
    drift: float = 0.0,
    variation: float = 1.0,
    seed: int = 0,
) -> SpatialData:
    """A procedural 3D tissue block cut into serial sections, with ground truth.

    A fixed 3D block with four anatomical domains (stroma, a tumour with an immune rim, a fat lobule, and small tumour
    nests and immune aggregates scattered in the stroma) and two smooth expression gradients. Each section gets an
    H&E-like RGB image (colour, texture and nucleus density depend on the domain; staining intensity follows one
    gradient), a square spot grid laid on the slide inside the tissue, negative-binomial counts whose means depend on
    domain and gradients, and a random rigid placement on the slide (rotation up to ``max_rotation_deg``, shift up to
    ``max_shift_um``).

    Neighbouring sections differ as serial sections do, without the anatomy travelling with depth (``variation``):
    every boundary (outline, tumour, fat lobule) is roughened by a smooth random field whose features swell and fade
    with depth in place (RMS ``VARIATION['roughness_um']`` = 12 µm), the structures' sizes change by a few per cent,
    each small nest moves its own way (tilted tubes, about 4 µm per 16 µm, with no net shift or turn of the set) and
    every section's staining strength varies (``STAIN_SD``). At the defaults the tissue-mask Dice of neighbouring
    sections placed by the ground truth is 0.97-0.98, the level of HER2ST patient C's neighbours after alignment.

    Before this version the default was ``drift=1``: the whole anatomy moved coherently with depth, by tens of µm
    between 16 µm sections, which images cannot tell from a misregistration; ``drift=1`` brings that motion back as
    a stress test (the small nests, new in this version, stay in place unless ``variation`` moves them), and
    ``drift=0, variation=0`` gives a block that is the same at every depth.

    Parameters
    ----------
    n_sections
        Number of serial sections.
    n_spots
        Approximate number of spots per section (sets the grid pitch; the spot diameter is half the pitch), reached
        when the images hold the whole tissue (``image_size * um_per_px`` at least about ``3200 + 2 max_shift_um``
        µm; the default images are 4096 µm wide). Smaller images cut the tissue: fewer spots, with a warning when a
        section gets less than half of ``n_spots``, and an error when one gets none.
    n_genes
        Number of genes.
    image_size
        Side of each section's square image in pixels.
    um_per_px
        Pixel size in µm.
    thickness_um
        Distance between consecutive sections in µm.
    max_rotation_deg
        Largest absolute rotation of a section on its slide.
    max_shift_um
        Largest shift of a section on its slide.
    dispersion
        Negative-binomial dispersion (larger is closer to Poisson).
    images
        Whether to render images.
    drift
        Coherent lateral motion of the anatomy with depth (a stress test for alignment): 1 moves the tumour centre by
        4 µm and the fat lobule by 3 µm per µm of z, turns the outline's wobble by about 0.5° per µm, changes the
        outline's semi-axes by 2 and -1.5 µm per µm and shifts the staining ramp of gradient 1 by 6 µm per µm (tens
        of µm between 16 µm sections, which no image registration can tell from a misplacement of the section);
        0 (default) keeps the anatomy in place. The expression gradients change with z whatever the value.
    variation
        Scale of the section-to-section differences without a trend (boundary roughness, size changes, the nests'
        own motion, staining strength); 0 removes them.
    seed
        Random seed; the output is a deterministic function of all arguments (the block itself is the same for every
        seed: the seed draws the placements on the slides, the image noise, the spot grids and the counts).

    Returns
    -------
    A section stack (see the data contract). Ground truth: ``obs['domain']``, ``obsm['spatial_world']`` (x, y in
    µm in the block's frame), ``table.uns['asign']['synthetic']`` with ``native_to_world`` (one 3 x 3 matrix per
    section mapping native pixels to block µm), ``rotation_deg`` and ``shift_um`` (each section's placement on its
    slide), the gene matrices ``domain_effect`` (one row per domain, in the order of ``domains``, the domain names)
    and ``gradient_loading`` (one row per gradient), ``base_log_mean``, ``drift``, ``variation``, ``stain`` (per
    section and channel), ``seed`` and ``image_side_um`` (the side of each section's image in µm).
    """
    from asign.io._build import Section, stack_sections

    n_sections = check_number("n_sections", n_sections, integer=True)
    n_spots = check_number("n_spots", n_spots, integer=True)
    n_genes = check_number("n_genes", n_genes, integer=True)
    if n_sections < 1 or n_spots < 4 or n_genes < 1:
        msg = "synthetic_stack needs n_sections >= 1, n_spots >= 4 and n_genes >= 1."
        raise ValueError(msg)
    image_size = check_number("image_size", image_size, integer=True, minimum=1)
    um_per_px = check_number("um_per_px", um_per_px, minimum=0.0, strict=True)
    thickness_um = check_number("thickness_um", thickness_um, minimum=0.0)
    max_rotation_deg = check_number("max_rotation_deg", max_rotation_deg, minimum=0.0)
    max_shift_um = check_number("max_shift_um", max_shift_um, minimum=0.0)
    dispersion = check_number("dispersion", dispersion, minimum=0.0, strict=True)
    drift = check_number("drift", drift)
    variation = check_number("variation", variation)
    seed = check_number("seed", seed, integer=True, minimum=0)
    # independent streams: rendering images (or not) never changes the counts
    rng, rng_img, rng_stain = (np.random.default_rng(s) for s in np.random.SeedSequence(seed).spawn(3))
    if drift < 0 or variation < 0:
        msg = f"synthetic_stack needs drift >= 0 and variation >= 0, got drift={drift}, variation={variation}."
        raise ValueError(msg)
    names = [f"S{i + 1}" for i in range(n_sections)]
    z_um = np.arange(n_sections) * thickness_um
    tissue_area = np.pi * _TISSUE_SEMI_AXES_UM[0] * _TISSUE_SEMI_AXES_UM[1]
    pitch_um = float(np.sqrt(tissue_area / n_spots))
    # the image side that holds the whole tissue wherever the section is placed on its slide
    side_needed_um = 2.0 * (1.06 * _TISSUE_SEMI_AXES_UM[0] + max_shift_um)
    diameter_um = pitch_um / 2.0

    # gene programme
    base = rng.uniform(-0.5, 2.5, n_genes)
    dom_eff = rng.normal(0.0, 1.0, (len(DOMAINS), n_genes)) * (rng.random((len(DOMAINS), n_genes)) < 0.5)
    dom_eff[0] = 0.0
    grad_load = rng.normal(0.0, 0.6, (2, n_genes))
    genes = [f"gene_{g:03d}" for g in range(n_genes)]

    side_um = image_size * um_per_px
    centre_px = np.array([image_size / 2.0, image_size / 2.0])
    sections, n2w = [], []
    rotations = rng.uniform(-max_rotation_deg, max_rotation_deg, n_sections)
    shifts = rng.uniform(-max_shift_um, max_shift_um, (n_sections, 2))
    yy, xx = np.mgrid[0:image_size, 0:image_size].astype(float)
    # staining strength per section and channel (its own stream: counts and textures do not depend on it)
    stains = 1.0 + variation * (
        STAIN_SD[0] * rng_stain.standard_normal((n_sections, 1))
        + STAIN_SD[1] * rng_stain.standard_normal((n_sections, 3))
    )
    stains = np.clip(stains, 0.5, 1.5)
    for i, name in enumerate(names):
        R = _rotation(rotations[i])
        # native px p = (R @ world + shift) / um + centre  <=>  world = R^T ((p - centre) * um - shift)
        w2n = np.eye(3)
        w2n[:2, :2] = R / um_per_px
        w2n[:2, 2] = shifts[i] / um_per_px + centre_px
        native_to_world = np.linalg.inv(w2n)
        n2w.append(native_to_world)
        # spot grid on the slide (native frame), kept where there is tissue
        step = pitch_um / um_per_px
        off = rng.uniform(0, step, 2)
        gx, gy = np.meshgrid(np.arange(off[0], image_size, step), np.arange(off[1], image_size, step))
        grid = np.column_stack([gx.ravel(), gy.ravel()])
        wxy = grid @ native_to_world[:2, :2].T + native_to_world[:2, 2]
        lab = domain_at(wxy[:, 0], wxy[:, 1], z_um[i], drift=drift, variation=variation)
        keep = lab >= 0
        if not keep.any():
            msg = (
                f"synthetic_stack: section {name} has no spot: its image ({image_size} px * {um_per_px:g} µm/px = "
                f"{image_size * um_per_px:g} µm a side) holds too little of the tissue (about "
                f"{2 * _TISSUE_SEMI_AXES_UM[0]:g} x {2 * _TISSUE_SEMI_AXES_UM[1]:g} µm) for a spot grid of pitch "
                f"{pitch_um:.0f} µm (from n_spots={n_spots}); use image_size * um_per_px >= {side_needed_um:.0f} µm."
            )
            raise ValueError(msg)
        spots, wxy, lab = grid[keep], wxy[keep], lab[keep]
        grad = gradients_at(wxy[:, 0], wxy[:, 1], z_um[i])
        log_mu = base[None, :] + dom_eff[lab] + grad @ grad_load
        size = rng.lognormal(0.0, 0.25, (len(spots), 1))
        mu = np.exp(log_mu) * size
        lam = rng.gamma(dispersion, mu / dispersion)
        counts = rng.poisson(lam).astype(np.float32)
        img = None
        if images:
            pix = np.stack([xx, yy], axis=-1)
            world_pix = pix @ native_to_world[:2, :2].T + native_to_world[:2, 2]
            img = _render(
                world_pix,
                z_um[i],
                rng_img,
                (image_size, image_size),
                drift=drift,
                variation=variation,
                stain=stains[i] if variation > 0 else None,
                pixel_to_world=native_to_world,
            )
        obs = pd.DataFrame({"domain": pd.Categorical(np.asarray(DOMAINS)[lab], categories=DOMAINS)})
        sections.append(
            Section(
                name=name,
                spots=spots,
                counts=counts,
                genes=genes,
                image=img,
                um_per_px=um_per_px,
                spot_ids=[f"{j}" for j in range(len(spots))],
                obs=obs,
                obsm={"spatial_world": wxy},
            )
        )
    obtained = [len(sec.spots) for sec in sections]
    if min(obtained) < 0.5 * n_spots:
        logger.warning(
            f"synthetic_stack: the sections have {obtained} spots instead of about n_spots={n_spots}: the images "
            f"({image_size * um_per_px:g} µm a side, image_size * um_per_px) cut off much of the tissue (about "
            f"{2 * _TISSUE_SEMI_AXES_UM[0]:g} x {2 * _TISSUE_SEMI_AXES_UM[1]:g} µm); use image_size * um_per_px >= "
            f"{side_needed_um:.0f} µm for the requested number."
        )
    sdata = stack_sections(sections, spot_diameter_um=diameter_um, z_um=z_um)
    table = sdata.tables[Key.TABLE]
    table.obs["domain"] = pd.Categorical(table.obs["domain"].astype(str), categories=DOMAINS)
    table.uns[Key.UNS]["synthetic"] = {
        "native_to_world": np.stack(n2w),
        "rotation_deg": rotations,
        "shift_um": shifts,
        "base_log_mean": base,
        "domain_effect": dom_eff,
        "gradient_loading": grad_load,
        "domains": list(DOMAINS),
        "seed": int(seed),
        "drift": float(drift),
        "variation": float(variation),
        "stain": stains,
        "image_side_um": float(side_um),
    }
    return sdata
