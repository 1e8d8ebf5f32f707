"""Stand-in samples as plain tensors (tests, smoke runs and the GPU benchmark; no SpatialData needed).

Spots lie on a square grid per section inside a disc; expression is a smooth 3D field plus noise; features are a
noisy random linear image of the local expression field; graphs follow ``method.md`` §4 (within-section kNN with
inverse-distance weights, cross-section top-k by proximity, within-section tile graphs).
"""

from __future__ import annotations

import numpy as np
import scipy.sparse as sp
import torch
from scipy.spatial import cKDTree

from ._data import VIEW_FIELDS, SampleTensors, edges_from_sparse, normalise_sums, tile_graph, tile_targets


def _field(xy: np.ndarray, z: float, n_genes: int, rng_proj: np.random.Generator) -> np.ndarray:
    basis = np.stack(
        [
            np.sin(xy[:, 0] / 300.0 + z / 50.0),
            np.cos(xy[:, 1] / 250.0 - z / 70.0),
            np.tanh((xy[:, 0] - xy[:, 1]) / 400.0),
            np.exp(-((xy**2).sum(1)) / (2 * 500.0**2)),
            np.sin((xy[:, 0] + xy[:, 1]) / 180.0),
        ],
        axis=1,
    )
    w = rng_proj.normal(0, 1.0, (basis.shape[1], n_genes))
    return basis @ w


def random_sample(
    *,
    n_sections: int = 3,
    spots_per_section: int = 60,
    n_genes: int = 20,
    feature_dim: int = 32,
    k_within: int = 12,
    k_cross: int = 12,
    known_sections: list[int] | None = None,
    tiles: bool = True,
    seed: int = 0,
    name: str = "synthetic",
) -> tuple[SampleTensors, np.ndarray]:
    """A synthetic sample and its full ground-truth labels.

    Parameters
    ----------
    n_sections, spots_per_section, n_genes, feature_dim
        Sizes.
    k_within, k_cross
        Neighbours per spot within a section and across sections.
    known_sections
        Sections whose labels go into ``sample.y`` (default: all).
    tiles
        Build region (512 px) and global (1024 px) tiles, their features, graphs and targets.
    seed
        Seed.
    name
        Sample name.

    Returns
    -------
    ``(sample, y_full)`` where ``y_full`` holds the labels of every spot (for scoring only).
    """
    rng = np.random.default_rng(seed)
    proj_rng = np.random.default_rng(12345)  # same gene programme and image model for every sample
    side = int(np.ceil(np.sqrt(spots_per_section * 4 / np.pi)))
    pitch = 100.0  # px (= um at 1 um/px)
    xy_all, sec_all, counts_all = [], [], []
    mean_field = proj_rng.normal(-1.0, 1.0, n_genes)
    for s in range(n_sections):
        g = (np.arange(side) - (side - 1) / 2) * pitch
        xx, yy = np.meshgrid(g, g)
        pts = np.stack([xx.ravel(), yy.ravel()], 1)
        r = np.sqrt((pts**2).sum(1))
        pts = pts[np.argsort(r, kind="stable")[:spots_per_section]]
        pts = pts + rng.normal(0, 3.0, pts.shape)
        f = _field(pts, 16.0 * s, n_genes, np.random.default_rng(7))
        lam = np.exp(np.clip(mean_field + 0.6 * f, -5, 6)) * 20.0
        counts_all.append(rng.poisson(lam))
        xy_all.append(pts)
        sec_all.append(np.full(len(pts), s))
    xy = np.concatenate(xy_all)
    xy = xy - xy.min(0) + 10.0  # native px, positive
    section = np.concatenate(sec_all)
    counts = np.concatenate(counts_all).astype(float)
    y_full = normalise_sums(counts)
    n = len(xy)
    # features: a fixed random linear map of the (noisy) local expression, non-negative like pooled CNN features
    a = proj_rng.normal(0, 1.0, (n_genes, feature_dim)) / np.sqrt(n_genes)
    yz = (y_full - y_full.mean(0)) / (y_full.std(0) + 1e-9)
    x_spot = np.maximum(yz @ a + rng.normal(0, 1.0, (n, feature_dim)), 0).astype(np.float32)
    # within-section kNN, inverse distance / median nn distance, symmetric by union (max weight)
    rows, cols, vals = [], [], []
    for s in range(n_sections):
        idx = np.flatnonzero(section == s)
        k = min(k_within + 1, idx.size)
        d, nb = cKDTree(xy[idx]).query(xy[idx], k=k)
        med = np.median(d[:, 1]) if k > 1 else 1.0
        for j in range(1, k):
            rows.append(idx)
            cols.append(idx[nb[:, j]])
            vals.append(med / np.maximum(d[:, j], 1e-9))
        # cross-section: nearest spots of the other sections, weight = 1 - d / (2 pitch), clipped
        oth = np.flatnonzero(section != s)
        if oth.size and k_cross:
            kc = min(k_cross, oth.size)
            d2, nb2 = cKDTree(xy[oth]).query(xy[idx], k=kc)
            d2, nb2 = d2.reshape(len(idx), kc), nb2.reshape(len(idx), kc)
            for j in range(kc):
                rows.append(idx)
                cols.append(oth[nb2[:, j]])
                vals.append(np.clip(1.0 - d2[:, j] / (2 * pitch), 0.05, 1.0) + 0.5)
    w = sp.coo_matrix((np.concatenate(vals), (np.concatenate(rows), np.concatenate(cols))), shape=(n, n)).tocsr()
    w = w.maximum(w.T)
    edge_index, edge_weight, edge_cross = edges_from_sparse(w, section)
    known = np.ones(n, bool) if known_sections is None else np.isin(section, known_sections)
    y = np.where(known[:, None], y_full, np.nan).astype(np.float32)
    kw: dict = {}
    if tiles:
        reg = np.floor(xy / 512.0).astype(int)
        glo = np.floor(xy / 1024.0).astype(int)
        rkey = np.stack([section, reg[:, 0], reg[:, 1]], 1)
        rtab, spot_region = np.unique(rkey, axis=0, return_inverse=True)
        gkey = np.stack([section, glo[:, 0], glo[:, 1]], 1)
        gtab, spot_global = np.unique(gkey, axis=0, return_inverse=True)
        rg_key = np.stack([rtab[:, 0], rtab[:, 1] // 2, rtab[:, 2] // 2], 1)
        lookup = {tuple(t): i for i, t in enumerate(gtab)}
        region_global = np.array([lookup[tuple(t)] for t in rg_key])
        spot_region, spot_global = spot_region.ravel(), spot_global.ravel()

        def tile_feat(idx: np.ndarray, n_t: int) -> np.ndarray:
            acc = np.zeros((n_t, feature_dim))
            np.add.at(acc, idx, x_spot)
            return (acc / np.bincount(idx, minlength=n_t)[:, None]).astype(np.float32)

        rei, rew = tile_graph(rtab[:, 1], rtab[:, 2], rtab[:, 0])
        gei, gew = tile_graph(gtab[:, 1], gtab[:, 2], gtab[:, 0])
        kc = counts[known]
        kw = {
            "x_region": torch.as_tensor(tile_feat(spot_region, len(rtab))),
            "x_global": torch.as_tensor(tile_feat(spot_global, len(gtab))),
            "spot_region": torch.as_tensor(spot_region, dtype=torch.long),
            "spot_global": torch.as_tensor(spot_global, dtype=torch.long),
            "region_global": torch.as_tensor(region_global, dtype=torch.long),
            "region_edge_index": rei,
            "region_edge_weight": rew,
            "global_edge_index": gei,
            "global_edge_weight": gew,
            "y_region": torch.as_tensor(tile_targets(kc, known, spot_region, len(rtab)), dtype=torch.float32),
            "y_global": torch.as_tensor(tile_targets(kc, known, spot_global, len(gtab)), dtype=torch.float32),
        }
    sample = SampleTensors(
        x_spot=torch.as_tensor(x_spot),
        edge_index=edge_index,
        edge_weight=edge_weight,
        edge_cross=edge_cross,
        section=torch.as_tensor(section, dtype=torch.long),
        y=torch.as_tensor(y),
        name=name,
        **kw,
    )
    return sample, y_full.astype(np.float32)


def with_random_views(sample: SampleTensors, *, n_views: int = 8, seed: int = 0) -> SampleTensors:
    """``sample`` with stand-in per-view features: each level's features plus unit Gaussian noise per view."""
    g = torch.Generator().manual_seed(seed)
    kw = {}
    for name, base in VIEW_FIELDS.items():
        x = getattr(sample, base)
        if x is not None:
            kw[name] = x.unsqueeze(1) + torch.randn(x.shape[0], n_views, x.shape[1], generator=g)
    return sample.replace(**kw)
