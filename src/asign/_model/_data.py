"""Plain tensors of one sample: what the ASIGN model reads (built by :mod:`asign.tl._fit` from a SpatialData).

Only torch, numpy and scipy are used here, so the model runs where spatialdata/anndata are not installed.
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Any

import numpy as np
import scipy.sparse as sp
import torch

Tensor = torch.Tensor


@dataclass
class SampleTensors:
    """One sample (a stack of sections) as tensors; graphs are whole-sample graphs built once.

    Attributes
    ----------
    x_spot
        ``(N, F)`` frozen spot features.
    edge_index
        ``(2, E)`` spot graph (source, target); symmetric, no self-edges (the GNN adds its own).
    edge_weight
        ``(E,)`` edge weights ``w_ij`` (within-section inverse distance, cross-section IoU + cosine).
    edge_cross
        ``(E,)`` 1.0 for cross-section edges (from the section index, never from names or values), else 0.0.
    section
        ``(N,)`` section index of every spot (cutting order within the sample).
    y
        ``(N, G)`` normalised labels the sample may use, NaN elsewhere. For a test sample only the known section(s)
        are filled; labels of unknown sections are never put into any tensor.
    x_region, x_global
        ``(R, F)``, ``(Q, F)`` tile features, or `None` for a spot-only model.
    spot_region, spot_global, region_global
        Integer index maps ``r(i)``, ``q(i)``, ``q(r)`` (``method.md`` §2.3).
    region_edge_index, region_edge_weight, global_edge_index, global_edge_weight
        Within-section tile graphs.
    y_region, y_global
        ``(R, G)``, ``(Q, G)`` tile targets (sums of member raw counts, then normalised); NaN for tiles without labels.
    name
        Sample name (for logs).
    visible_mean
        ``(1, G)`` mean of the visible labels of the *whole* sample, set on subgraphs
        (:mod:`asign._model._sampling`) so that the heads' level equals the whole-sample one; `None`: the model
        takes the mean of the visible rows it is given.
    label_inputs
        ``(N, C)`` precomputed label input of the spot branch (``ASIGNConfig.label_input``), set on subgraphs from
        the whole-sample graph; `None`: the model computes it from the graph it is given.
    patches
        ``(N, 3, S, S)`` uint8 spot patches at the encoder's input size, for end-to-end encoder fine-tuning
        (``ASIGNConfig.finetune_encoder``); kept on the CPU by :meth:`to` and moved to the device per step.
    x_spot_views, x_region_views, x_global_views
        ``(N, V, F)``, ``(R, V, F)``, ``(Q, V, F)`` features of each test-time-augmentation view
        (``pp.extract_features(keep_views=True)``; ``x_spot`` etc. are their means), drawn from per training step
        (``ASIGNConfig.view_augment``, :func:`draw_views`) and taken in turn for view-averaged prediction
        (``ASIGNConfig.predict_views``, :func:`select_view`); kept on the CPU by :meth:`to`.
    """

    x_spot: Tensor
    edge_index: Tensor
    edge_weight: Tensor
    edge_cross: Tensor
    section: Tensor
    y: Tensor
    x_region: Tensor | None = None
    x_global: Tensor | None = None
    spot_region: Tensor | None = None
    spot_global: Tensor | None = None
    region_global: Tensor | None = None
    region_edge_index: Tensor | None = None
    region_edge_weight: Tensor | None = None
    global_edge_index: Tensor | None = None
    global_edge_weight: Tensor | None = None
    y_region: Tensor | None = None
    y_global: Tensor | None = None
    name: str = "sample"
    visible_mean: Tensor | None = None
    label_inputs: Tensor | None = None
    patches: Tensor | None = None
    x_spot_views: Tensor | None = None
    x_region_views: Tensor | None = None
    x_global_views: Tensor | None = None

    def __post_init__(self) -> None:
        self.check()

    @property
    def n_spots(self) -> int:
        return int(self.x_spot.shape[0])

    @property
    def n_genes(self) -> int:
        return int(self.y.shape[1])

    @property
    def has_tiles(self) -> bool:
        return self.x_region is not None and self.x_global is not None

    @property
    def labelled(self) -> Tensor:
        """``(N,)`` bool: spots whose labels are all finite."""
        return torch.isfinite(self.y).all(dim=1)

    def check(self) -> None:
        """Raise a :class:`ValueError` when shapes or index maps are inconsistent."""
        n = self.n_spots
        if self.edge_index.ndim != 2 or self.edge_index.shape[0] != 2:
            msg = f"Sample {self.name!r}: edge_index must have shape (2, E), got {tuple(self.edge_index.shape)}."
            raise ValueError(msg)
        e = self.edge_index.shape[1]
        if self.edge_weight.shape != (e,) or self.edge_cross.shape != (e,):
            msg = f"Sample {self.name!r}: edge_weight and edge_cross must have shape ({e},)."
            raise ValueError(msg)
        if e and (int(self.edge_index.min()) < 0 or int(self.edge_index.max()) >= n):
            msg = f"Sample {self.name!r}: edge_index refers to spots outside [0, {n})."
            raise ValueError(msg)
        if e and bool((self.edge_index[0] == self.edge_index[1]).any()):
            msg = f"Sample {self.name!r}: the stored spot graph must not contain self-edges (method.md §4)."
            raise ValueError(msg)
        if self.section.shape != (n,) or self.y.shape[0] != n:
            msg = f"Sample {self.name!r}: section and y must have {n} rows."
            raise ValueError(msg)
        tiles = [self.x_region, self.x_global, self.spot_region, self.spot_global, self.region_global]
        if any(t is not None for t in tiles) and any(t is None for t in tiles):
            msg = f"Sample {self.name!r}: give all of x_region, x_global, spot_region, spot_global, region_global or none."
            raise ValueError(msg)
        if self.has_tiles:
            r, q = self.x_region.shape[0], self.x_global.shape[0]
            for name, idx, hi in (
                ("spot_region", self.spot_region, r),
                ("spot_global", self.spot_global, q),
                ("region_global", self.region_global, q),
            ):
                if idx.numel() and (int(idx.min()) < 0 or int(idx.max()) >= hi):
                    msg = f"Sample {self.name!r}: {name} has indices outside [0, {hi})."
                    raise ValueError(msg)
            if not torch.equal(self.region_global[self.spot_region], self.spot_global):
                msg = f"Sample {self.name!r}: the index maps are inconsistent (q(r(i)) != q(i))."
                raise ValueError(msg)
        for name in ("label_inputs", "patches"):
            v = getattr(self, name)
            if v is not None and v.shape[0] != n:
                msg = f"Sample {self.name!r}: {name} must have {n} rows, got {v.shape[0]}."
                raise ValueError(msg)
        if self.patches is not None and (self.patches.ndim != 4 or self.patches.dtype != torch.uint8):
            msg = f"Sample {self.name!r}: patches must be a uint8 (N, 3, S, S) tensor."
            raise ValueError(msg)
        for name, base in VIEW_FIELDS.items():
            v, x = getattr(self, name), getattr(self, base)
            if v is None:
                continue
            if x is None or v.ndim != 3 or v.shape[0] != x.shape[0] or v.shape[2] != x.shape[1]:
                want = "no views (no tile features)" if x is None else f"({x.shape[0]}, n_views, {x.shape[1]})"
                msg = f"Sample {self.name!r}: {name} must have shape {want}, got {tuple(v.shape)}."
                raise ValueError(msg)

    def to(self, device: torch.device | str, dtype: torch.dtype = torch.float32) -> SampleTensors:
        """A copy on ``device`` (floating tensors cast to ``dtype``)."""
        kw: dict[str, Any] = {}
        for f in fields(self):
            v = getattr(self, f.name)
            if f.name == "patches" or f.name in VIEW_FIELDS:
                pass  # uint8 patches and per-view features stay on the CPU (drawn / moved per step)
            elif isinstance(v, torch.Tensor):
                v = v.to(device=device, dtype=dtype) if v.is_floating_point() else v.to(device=device)
            kw[f.name] = v
        return SampleTensors(**kw)

    def with_labels(self, y: Tensor) -> SampleTensors:
        """A shallow copy whose labels are ``y``."""
        return self.replace(y=y)

    def replace(self, **changes: Any) -> SampleTensors:
        """A shallow copy with ``changes`` applied (checked again)."""
        kw = {f.name: getattr(self, f.name) for f in fields(self)}
        kw.update(changes)
        return SampleTensors(**kw)

    def permute(self, perm: np.ndarray | Tensor) -> SampleTensors:
        """The same sample with spots reordered: new spot ``k`` is old spot ``perm[k]`` (used by equivariance tests)."""
        perm = torch.as_tensor(np.asarray(perm), dtype=torch.long)
        inv = torch.empty_like(perm)
        inv[perm] = torch.arange(perm.numel())
        kw = {f.name: getattr(self, f.name) for f in fields(self)}
        for name in ("x_spot", "section", "y", "spot_region", "spot_global", "label_inputs", "patches", "x_spot_views"):
            if kw[name] is not None:
                kw[name] = kw[name][perm]
        kw["edge_index"] = inv[self.edge_index]
        return SampleTensors(**kw)


VIEW_FIELDS = {"x_spot_views": "x_spot", "x_region_views": "x_region", "x_global_views": "x_global"}
"""Per-view feature fields of :class:`SampleTensors` and the mean-feature field each one stands for."""


def has_views(sample: SampleTensors) -> bool:
    """Whether ``sample`` carries per-view features (at any level)."""
    return any(getattr(sample, name) is not None for name in VIEW_FIELDS)


def _with_view_rows(sample: SampleTensors, pick) -> SampleTensors:
    """``sample`` with each mean-feature field replaced by ``views[arange(n), pick(views)]`` (views on the CPU)."""
    changes: dict[str, Any] = dict.fromkeys(VIEW_FIELDS)
    for name, base in VIEW_FIELDS.items():
        views, x = getattr(sample, name), getattr(sample, base)
        if views is None:
            continue
        k = pick(views)
        changes[base] = views[torch.arange(views.shape[0]), k].to(device=x.device, dtype=x.dtype)
    return sample.replace(**changes)


def draw_views(sample: SampleTensors, generator: torch.Generator) -> SampleTensors:
    """``sample`` with the features of one uniformly drawn view per spot and per tile (train-time augmentation).

    The views (on the CPU) are indexed on the CPU with ``generator`` and the drawn rows moved to the device and
    dtype of the mean features they replace; the per-view fields are dropped from the result.
    """
    return _with_view_rows(sample, lambda v: torch.randint(0, v.shape[1], (v.shape[0],), generator=generator))


def n_views(sample: SampleTensors) -> int:
    """The largest number of stored views of any level of ``sample`` (0 without views)."""
    return max(
        (int(getattr(sample, name).shape[1]) for name in VIEW_FIELDS if getattr(sample, name) is not None), default=0
    )


def select_view(sample: SampleTensors, view: int) -> SampleTensors:
    """``sample`` with view ``view`` of every spot and tile (modulo each level's number of views); views dropped."""
    return _with_view_rows(sample, lambda v: torch.full((v.shape[0],), view % v.shape[1], dtype=torch.long))


def edges_from_sparse(w: sp.spmatrix, section: np.ndarray) -> tuple[Tensor, Tensor, Tensor]:
    """Edge list of a sparse weighted adjacency ``w`` (diagonal dropped) and the cross-section flag of each edge.

    Returns ``edge_index`` (2, E) as (source = column, target = row), so that ``target`` aggregates over its row of
    ``w`` (identical for the symmetric graphs asign stores), ``edge_weight`` and ``edge_cross``.
    """
    w = sp.coo_matrix(w)
    keep = (w.row != w.col) & (w.data != 0)
    row, col, val = w.row[keep], w.col[keep], w.data[keep].astype(np.float32)
    order = np.lexsort((col, row))
    row, col, val = row[order], col[order], val[order]
    section = np.asarray(section)
    cross = (section[row] != section[col]).astype(np.float32)
    edge_index = torch.as_tensor(np.stack([col, row]).astype(np.int64))
    return edge_index, torch.as_tensor(val), torch.as_tensor(cross)


def tile_graph(
    col: np.ndarray, row: np.ndarray, section: np.ndarray, *, radius: float = 2.1, max_neighbors: int = 12
) -> tuple[Tensor, Tensor]:
    """Within-section tile graph (``method.md`` §4.3).

    Tiles within ``radius`` grid units, at most ``max_neighbors`` nearest per tile (ties by index), symmetric by union,
    weights ``1 / distance`` in grid units, no self-edges.
    """
    from scipy.spatial import cKDTree

    col = np.asarray(col, dtype=float)
    row = np.asarray(row, dtype=float)
    section = np.asarray(section)
    n = col.size
    rows, cols, vals = [], [], []
    for s in np.unique(section):
        idx = np.flatnonzero(section == s)
        if idx.size < 2:
            continue
        pts = np.stack([col[idx], row[idx]], axis=1)
        k = min(max_neighbors + 1, idx.size)
        dist, nb = cKDTree(pts).query(pts, k=k, distance_upper_bound=radius + 1e-9)
        dist, nb = np.atleast_2d(dist), np.atleast_2d(nb)
        for a in range(idx.size):
            ok = (nb[a] < idx.size) & (nb[a] != a) & np.isfinite(dist[a])
            cand = sorted(zip(dist[a][ok], nb[a][ok], strict=True))[:max_neighbors]
            for d, b in cand:
                rows.append(idx[a])
                cols.append(idx[b])
                vals.append(1.0 / max(d, 1e-9))
    w = sp.coo_matrix((vals, (rows, cols)), shape=(n, n)).tocsr()
    w = w.maximum(w.T).tocoo()
    edge_index = torch.as_tensor(np.stack([w.col, w.row]).astype(np.int64))
    return edge_index, torch.as_tensor(w.data.astype(np.float32))


def normalise_sums(counts: np.ndarray, library: np.ndarray | None = None, *, scale: str = "st-net") -> np.ndarray:
    """Normalise summed raw counts (``method.md`` §2.2/§2.4).

    ``"st-net"``: ln-proportions over the modelled genes with the pseudo-count added after summation; ``"log1p"``:
    CP10k with the summed library sizes ``library``.
    """
    counts = np.asarray(counts, dtype=np.float64)
    if scale in ("st-net", "stnet", "st_net"):
        c1 = counts + 1.0
        return np.log(c1 / c1.sum(axis=1, keepdims=True))
    if scale == "log1p":
        if library is None:
            msg = "normalise_sums(scale='log1p') needs the summed library sizes."
            raise ValueError(msg)
        lib = np.asarray(library, dtype=np.float64).reshape(-1, 1)
        return np.log1p(1e4 * counts / np.maximum(lib, 1e-12))
    msg = f"Unknown normalisation {scale!r}; use 'st-net' or 'log1p'."
    raise ValueError(msg)


def tile_targets(
    counts: np.ndarray,
    labelled: np.ndarray,
    spot_tile: np.ndarray,
    n_tiles: int,
    *,
    scale: str = "st-net",
    library: np.ndarray | None = None,
    min_fraction: float = 1.0,
) -> np.ndarray:
    """Tile targets: member raw counts summed, then normalised.

    A tile's target is the normalised sum over its *labelled* member spots; it is NaN unless at least
    ``min_fraction`` of its members are labelled (default 1: every member), so unknown sections' tiles stay NaN.
    ``min_fraction < 1`` serves internal hold-out splits: held-out spots are then simply not counted.

    ``counts`` has rows only for ``labelled`` spots (``counts.shape[0] == labelled.sum()``), so unlabelled counts are
    never read.
    """
    labelled = np.asarray(labelled, dtype=bool)
    spot_tile = np.asarray(spot_tile, dtype=np.int64)
    counts = np.asarray(counts, dtype=np.float64)
    if counts.shape[0] != int(labelled.sum()):
        msg = "tile_targets: `counts` must hold exactly the labelled spots' rows."
        raise ValueError(msg)
    g = counts.shape[1]
    sums = np.zeros((n_tiles, g))
    np.add.at(sums, spot_tile[labelled], counts)
    lib = None
    if library is not None:
        lib = np.zeros(n_tiles)
        np.add.at(lib, spot_tile[labelled], np.asarray(library, dtype=np.float64))
    n_all = np.bincount(spot_tile, minlength=n_tiles)
    n_lab = np.bincount(spot_tile[labelled], minlength=n_tiles)
    complete = (n_lab >= min_fraction * n_all - 1e-9) & (n_lab > 0)
    out = np.full((n_tiles, g), np.nan)
    if complete.any():
        out[complete] = normalise_sums(sums[complete], None if lib is None else lib[complete], scale=scale)
    return out
