"""A procedural 3D tissue cut into serial sections: the embedded default dataset with ground truth."""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np
import pandas as pd
from scipy import ndimage as ndi

from asign._constants import Key

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


def _rotation(theta_deg: float) -> np.ndarray:
    t = np.deg2rad(theta_deg)
    return np.array([[np.cos(t), -np.sin(t)], [np.sin(t), np.cos(t)]])


def domain_at(x: np.ndarray, y: np.ndarray, z: float | np.ndarray) -> np.ndarray:
    """Domain label of 3D points in µm (-1 outside the tissue)."""
    z = np.asarray(z, dtype=float)
    # the block: an ellipse whose outline changes slowly with depth
    a, b = 1500.0 + 2.0 * z, 1180.0 - 1.5 * z
    wob = 1.0 + 0.06 * np.sin(np.arctan2(y, x) * 3 + z / 40.0)
    inside = (x / a) ** 2 + (y / b) ** 2 <= wob**2
    # tumour ellipsoid drifting with depth, fat lobule, immune rim around the tumour
    tum = ((x + 380.0 - 4.0 * z) / 620.0) ** 2 + ((y - 180.0) / (460.0 + 2.0 * z)) ** 2
    fat = ((x - 650.0) / 420.0) ** 2 + ((y + 420.0 + 3.0 * z) / 340.0) ** 2
    lab = np.zeros(np.broadcast(x, y).shape, dtype=np.int8)
    lab[(tum > 1.0) & (tum <= 1.45)] = 3
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
    world_xy: np.ndarray, z: float, rng: np.random.Generator, shape: tuple[int, int], *, z_anatomy: float | None = None
) -> np.ndarray:
    h, w = shape
    lab = domain_at(world_xy[..., 0], world_xy[..., 1], z if z_anatomy is None else z_anatomy)
    g1 = gradients_at(world_xy[..., 0], world_xy[..., 1], z if z_anatomy is None else z_anatomy)[..., 0].astype(np.float32)
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
    drift: float = 1.0,
    seed: int = 0,
) -> SpatialData:
    """A procedural 3D tissue block cut into serial sections, with ground truth.

    A block with four anatomical domains (stroma, tumour, fat, an immune rim) whose shapes drift with depth, and
    two smooth expression gradients. Each section gets an H&E-like RGB image (colour, texture and nucleus density
    depend on the domain; staining intensity follows one gradient), a square spot grid laid on the slide inside the
    tissue, negative-binomial counts whose means depend on domain and gradients, and a random rigid placement on
    the slide (rotation up to ``max_rotation_deg``, shift up to ``max_shift_um``).

    Parameters
    ----------
    n_sections
        Number of serial sections.
    n_spots
        Approximate number of spots per section (sets the grid pitch; the spot diameter is half the pitch).
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
        How fast the images change with depth: 1 (default) moves the tumour centre by 4 µm and the fat lobule by
        3 µm per µm of z, turns the outline's wobble by about 0.5° per µm and shifts the staining ramp of gradient 1
        by 6 µm per µm (tens of µm between 16 µm sections); 0 gives every section the same anatomy and staining
        (the expression still changes with z). Image-based alignment can only be scored against
        ``native_to_world`` where this drift between sections is small.
    seed
        Random seed; the output is a deterministic function of all arguments.

    Returns
    -------
    A section stack (see the data contract). Ground truth: ``obs['domain']``, ``obsm['spatial_world']`` (x, y in
    µm in the block's frame), ``table.uns['asign']['synthetic']`` with ``native_to_world`` (one 3 x 3 matrix per
    section mapping native pixels to block µm), ``rotation_deg``, the gene ``domain_effect`` and
    ``gradient_loading`` matrices and ``base_log_mean``.
    """
    from asign.io._build import Section, stack_sections

    if n_sections < 1 or n_spots < 4 or n_genes < 1:
        msg = "synthetic_stack needs n_sections >= 1, n_spots >= 4 and n_genes >= 1."
        raise ValueError(msg)
    # independent streams: rendering images (or not) never changes the counts
    rng, rng_img = (np.random.default_rng(s) for s in np.random.SeedSequence(seed).spawn(2))
    names = [f"S{i + 1}" for i in range(n_sections)]
    z_um = np.arange(n_sections) * thickness_um
    tissue_area = np.pi * 1500.0 * 1180.0
    pitch_um = float(np.sqrt(tissue_area / n_spots))
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
        lab = domain_at(wxy[:, 0], wxy[:, 1], drift * z_um[i])
        keep = lab >= 0
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
            img = _render(world_pix, z_um[i], rng_img, (image_size, image_size), z_anatomy=drift * z_um[i])
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
        "image_side_um": float(side_um),
    }
    return sdata
