"""Cross-section spot overlaps and whole-sample 3D neighbour graphs (method.md §3.1 and §4).

The public functions read the section manifest and the alignment written by :func:`asign.pp.align_layers`, then call
array cores that work on bare coordinates (``_knn_within``, ``_overlap_matrix``, ``_cross_edges``) so that
benchmarks can time them without SpatialData overhead. Every core is vectorised: Python loops run over sections
(and chunks of pairs), never over spots, and no dense ``N x N`` array is ever built.

Order invariance: ties (equal distances, equal scores) are broken by a stable per-spot key, the rank of the spot's
``obs_names``, never by its row position, so permuting the rows of the table permutes the graph and nothing else.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal, NamedTuple

import numpy as np
import pandas as pd
import scipy.sparse as sp
from scipy.spatial import cKDTree

from asign._checks import check_number, check_reserved_keys
from asign._constants import Key
from asign._docs import inject_docs
from asign._geometry import PATCH_RADIUS_PX, Footprints, aligned_centres, as_affine, pairs_iou
from asign._logging import logger
from asign._stack import nonfinite_rows, wider_than_spots

if TYPE_CHECKING:
    from anndata import AnnData
    from spatialdata import SpatialData

    from asign._stack import StackInfo

__all__ = ["SpatialNeighbors3D", "neighbors_3d", "spot_overlaps"]

_ALIGN_HINT = (
    'run `asign.pp.align_layers` first (with `method="transforms", transforms=...` when the transforms are known)'
)
_SIM_BLOCK = 1 << 23  # entries of one cosine block (64 MB in float64)


class SpatialNeighbors3D(NamedTuple):
    """The whole-sample 3D spot graph returned by :func:`asign.pp.neighbors_3d` with ``inplace=False``."""

    connectivities: sp.csr_matrix
    """Symmetric edge weights (``n_obs x n_obs``)."""
    distances: sp.csr_matrix
    """Edge lengths in µm, same sparsity pattern as ``connectivities`` (3D distance for cross-section edges)."""


# --------------------------------------------------------------------------------------------------------------------
# array cores
# --------------------------------------------------------------------------------------------------------------------


def _partner_sections(n_sections: int, s: int, *, adjacent_only: bool, both_directions: bool) -> list[int]:
    if adjacent_only:
        cand = [s + 1, s - 1] if both_directions else [s + 1]
    else:
        cand = [t for t in range(n_sections) if t != s] if both_directions else list(range(s + 1, n_sections))
    return [t for t in cand if 0 <= t < n_sections]


def _candidate_pairs(
    centres: np.ndarray,
    codes: np.ndarray,
    fp: Footprints,
    *,
    adjacent_only: bool,
    both_directions: bool,
    active: np.ndarray | None = None,
) -> Iterator[tuple[int, np.ndarray, np.ndarray]]:
    """Yield ``(s, i, j)`` per section ``s`` with candidate pairs of footprints that may overlap.

    ``i`` are spots of ``s`` and ``j`` spots of a partner section whose footprints' bounding discs intersect
    (KD-trees on the aligned centres). Memory is bounded by one section's candidates.
    """
    n_sections = fp.bound.shape[0]
    active = np.ones(n_sections, dtype=bool) if active is None else active
    members = [np.flatnonzero(codes == s) if active[s] else np.empty(0, dtype=np.int64) for s in range(n_sections)]
    trees: dict[int, cKDTree] = {}

    def tree(s: int) -> cKDTree:
        if s not in trees:
            trees[s] = cKDTree(centres[members[s]])
        return trees[s]

    big = None
    if not adjacent_only:
        keep = np.flatnonzero(active[codes])
        big = (cKDTree(centres[keep]), keep)
    bmax = float(np.max(fp.bound[active])) if active.any() else 0.0
    for s in range(n_sections):
        partners = [
            t
            for t in _partner_sections(n_sections, s, adjacent_only=adjacent_only, both_directions=both_directions)
            if active[t]
        ]
        if not active[s] or not partners or members[s].size == 0:
            continue
        if adjacent_only:
            ii, jj = [], []
            for t in partners:
                if members[t].size == 0:
                    continue
                res = tree(s).sparse_distance_matrix(tree(t), fp.bound[s] + fp.bound[t], output_type="ndarray")
                ii.append(members[s][res["i"]])
                jj.append(members[t][res["j"]])
            if not ii:
                continue
            i, j = np.concatenate(ii), np.concatenate(jj)
        else:
            res = tree(s).sparse_distance_matrix(big[0], fp.bound[s] + bmax, output_type="ndarray")
            i, j = members[s][res["i"]], big[1][res["j"]]
            cj = codes[j]
            ok = np.isin(cj, partners)
            i, j = i[ok], j[ok]
        if i.size:
            d = np.hypot(centres[i, 0] - centres[j, 0], centres[i, 1] - centres[j, 1])
            ok = d < fp.bound[codes[i]] + fp.bound[codes[j]]
            i, j = i[ok], j[ok]
        if i.size:
            yield s, i, j


def _overlap_matrix(
    coords: np.ndarray,
    codes: np.ndarray,
    transforms: np.ndarray,
    radius_px: np.ndarray | float,
    *,
    adjacent_only: bool = True,
    n_vertices: int = 100,
    active: np.ndarray | None = None,
) -> sp.csr_matrix:
    """Symmetric sparse IoU of footprints of spots in different sections (array core of :func:`spot_overlaps`).

    Parameters
    ----------
    coords
        ``(n, 2)`` spot centres in each section's native pixels.
    codes
        ``(n,)`` section code (cutting order, ``0..S-1``) of every spot.
    transforms
        ``(S, 3, 3)`` maps native px -> aligned px.
    radius_px
        Footprint radius in native pixels (scalar or one per section).
    adjacent_only
        Only pairs of consecutive sections (else every pair of sections).
    n_vertices
        Polygon vertices where a transform is not a similarity.
    active
        ``(S,)`` bool: sections taking part (default all).
    """
    n = coords.shape[0]
    transforms = np.asarray(transforms, dtype=float).reshape(-1, 3, 3)
    fp = Footprints.from_transforms(transforms, radius_px)
    centres = aligned_centres(coords, codes, transforms)
    rows, cols, vals = [], [], []
    for _s, i, j in _candidate_pairs(
        centres, codes, fp, adjacent_only=adjacent_only, both_directions=False, active=active
    ):
        iou = pairs_iou(centres, codes, fp, i, j, n_vertices=n_vertices)
        ok = iou > 0
        rows.append(i[ok])
        cols.append(j[ok])
        vals.append(iou[ok])
    if not rows:
        return sp.csr_matrix((n, n), dtype=float)
    r, c, v = np.concatenate(rows), np.concatenate(cols), np.concatenate(vals)
    upper = sp.csr_matrix((v, (r, c)), shape=(n, n))
    out = (upper + upper.T).tocsr()
    out.sort_indices()
    return out


def _topk_rows(rows: np.ndarray, cols: np.ndarray, score: np.ndarray, k: int, key: np.ndarray) -> np.ndarray:
    """Positions of the ``k`` best entries of every row: highest score first, ties by the partner's stable key."""
    if rows.size == 0:
        return np.empty(0, dtype=np.int64)
    order = np.lexsort((key[cols], -score, rows))
    r = rows[order]
    first = np.flatnonzero(np.r_[True, r[1:] != r[:-1]])
    run = np.repeat(first, np.diff(np.r_[first, r.size]))
    rank = np.arange(r.size) - run
    return order[rank < k]


def _knn_query_exact(tree: cKDTree, xy: np.ndarray, k: int, key: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The ``k`` nearest other points of every point of the tree, ties broken by ``(distance, key)``.

    The query is widened for rows whose k-th distance is tied with the farthest point returned, so the tie-break
    sees every tied candidate (order-independent result on regular grids).
    """
    m = xy.shape[0]
    out_c = np.empty((m, k), dtype=np.int64)
    out_d = np.empty((m, k), dtype=float)
    todo = np.arange(m)
    kq = min(m, k + 2)
    while todo.size:
        d, j = tree.query(xy[todo], k=kq)
        d = d.reshape(todo.size, kq)
        j = j.reshape(todo.size, kq)
        far = d[:, -1].copy()
        d = np.where(j == todo[:, None], np.inf, d)  # drop self
        order = np.lexsort((key[j], d), axis=-1)[:, :k]
        ds = np.take_along_axis(d, order, axis=-1)
        js = np.take_along_axis(j, order, axis=-1)
        done = (kq >= m) | (far > ds[:, -1])
        out_c[todo[done]] = js[done]
        out_d[todo[done]] = ds[done]
        todo = todo[~done]
        kq = min(m, 2 * kq)
    return out_c, out_d


def _knn_within(
    coords: np.ndarray, codes: np.ndarray, k: int, *, key: np.ndarray | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """Within-section kNN on each section's own coordinates (array core of :func:`neighbors_3d`).

    Returns ``(cols, dist)``, both ``(n, k)``: the ``k`` nearest spots of the same section for every spot, sorted
    by ``(distance, key)``, self excluded. In a section of ``k`` spots or fewer every spot gets all the others and
    the unused slots hold ``-1`` / ``inf``.
    """
    n = coords.shape[0]
    key = np.arange(n) if key is None else np.asarray(key)
    cols = np.full((n, k), -1, dtype=np.int64)
    dist = np.full((n, k), np.inf, dtype=float)
    if k == 0:
        return cols, dist
    for s in np.unique(codes):
        idx = np.flatnonzero(codes == s)
        ks = min(k, idx.size - 1)
        if ks <= 0:
            continue
        xy = coords[idx]
        c, d = _knn_query_exact(cKDTree(xy), xy, ks, key[idx])
        cols[idx, :ks] = idx[c]
        dist[idx, :ks] = d
    return cols, dist


def _within_graph(
    coords: np.ndarray,
    codes: np.ndarray,
    k: int,
    *,
    um_per_px: np.ndarray | float = 1.0,
    weights: Literal["inverse_distance", "binary"] = "inverse_distance",
    key: np.ndarray | None = None,
    names: np.ndarray | None = None,
    section_names: Sequence[str] | None = None,
) -> sp.csr_matrix:
    """Symmetric within-section kNN weights ``w_ij = m / max(d_ij, m / 2)`` (or 1), ``m`` the median NN distance.

    ``m`` is the median nearest-neighbour distance of the spot's section: a neighbour one median pitch away weighs
    1, and the distance is floored at half the pitch, so two spots at the same position (or closer than half a
    pitch) weigh at most 2 and do not swamp their other neighbours (a warning names the sections and spots).
    Symmetrised by union keeping the larger weight. ``coords`` are native px; ``um_per_px`` (scalar or per section
    code) converts them to µm so the weights are physical ratios. ``names`` (``obs_names``) and ``section_names``
    (by code) are used only in the warning.
    """
    n = coords.shape[0]
    if k == 0 or n == 0:
        return sp.csr_matrix((n, n), dtype=float)
    cols, dist = _knn_within(coords, codes, k, key=key)
    valid = cols >= 0  # a section of k spots or fewer links each spot to all the others only
    um = np.asarray(um_per_px, dtype=float)
    dist = dist * (um[codes][:, None] if um.ndim else um)
    if weights == "binary":
        w = np.ones_like(dist)
    else:
        nn = np.where(valid[:, 0], dist[:, 0], np.nan)
        med = pd.Series(nn).groupby(codes).median()
        scale = med.to_numpy()[np.searchsorted(med.index.to_numpy(), codes)]
        scale = np.nan_to_num(np.where(scale > 0, scale, np.nan), nan=1.0)
        floor = WITHIN_DISTANCE_FLOOR * scale
        close = valid[:, 0] & (dist[:, 0] < floor)
        if close.any():
            _warn_close_spots(close, dist[:, 0] <= 0, codes, names, section_names)
        w = scale[:, None] / np.maximum(dist, floor[:, None])
    rows = np.repeat(np.arange(n), k).reshape(n, k)
    W = sp.csr_matrix((w[valid], (rows[valid], cols[valid])), shape=(n, n))
    return W.maximum(W.T).tocsr()


# within-section distances are floored at this fraction of the section's median NN distance (weight <= 2)
WITHIN_DISTANCE_FLOOR = 0.5


def _warn_close_spots(
    close: np.ndarray,
    same: np.ndarray,
    codes: np.ndarray,
    names: np.ndarray | None,
    section_names: Sequence[str] | None,
) -> None:
    """Warn about spots closer than half their section's median NN distance to another spot of that section."""
    idx = np.flatnonzero(close)
    secs = [str(section_names[c]) if section_names is not None else str(c) for c in np.unique(codes[idx])]
    shown = [str(names[i]) if names is not None else str(i) for i in idx[:5]]
    more = f" and {idx.size - 5} more" if idx.size > 5 else ""
    n_same = int(same[idx].sum())
    logger.warning(
        f"{idx.size} spots of section(s) {secs} lie closer than {WITHIN_DISTANCE_FLOOR:g} x their section's median "
        f"nearest-neighbour distance to another spot of the same section ({n_same} at the very same position): "
        f"{shown}{more}. Their within-section edge weight is capped at {1 / WITHIN_DISTANCE_FLOOR:g} (the distance "
        f"is floored at {WITHIN_DISTANCE_FLOOR:g} x that median; a neighbour one median distance away weighs 1). "
        "Duplicated spots?"
    )


def _normalise_rows(F: np.ndarray) -> np.ndarray:
    F = np.asarray(F, dtype=float)
    norm = np.sqrt(np.einsum("ij,ij->i", F, F))
    return F / np.where(norm > 0, norm, 1.0)[:, None]


def _cosine_pairs(Fn: np.ndarray, i: np.ndarray, j: np.ndarray) -> np.ndarray:
    out = np.empty(i.size, dtype=float)
    step = max(1, _SIM_BLOCK // max(1, Fn.shape[1]))
    for start in range(0, i.size, step):
        a, b = i[start : start + step], j[start : start + step]
        out[start : start + step] = np.einsum("ij,ij->i", Fn[a], Fn[b])
    return out


def _cosine_topk_candidates(
    Fn: np.ndarray, rows: np.ndarray, pool: np.ndarray, k: int
) -> tuple[np.ndarray, np.ndarray]:
    """For each spot of ``rows``, the spots of ``pool`` with the ``k`` highest cosine (all ties at the k-th kept)."""
    if rows.size == 0 or pool.size == 0 or k == 0:
        return np.empty(0, dtype=np.int64), np.empty(0, dtype=np.int64)
    kk = min(k, pool.size)
    P = Fn[pool].T
    step = max(1, _SIM_BLOCK // pool.size)
    ii, jj = [], []
    for start in range(0, rows.size, step):
        r = rows[start : start + step]
        S = Fn[r] @ P
        thr = -np.partition(-S, kk - 1, axis=1)[:, kk - 1]
        a, b = np.nonzero(S >= thr[:, None])
        ii.append(r[a])
        jj.append(pool[b])
    return np.concatenate(ii), np.concatenate(jj)


def _nearest_other_section(
    centres: np.ndarray, codes: np.ndarray, r: float, k: int, active: np.ndarray
) -> Iterator[tuple[int, np.ndarray, np.ndarray]]:
    """Yield ``(s, i, j)`` with the nearest other-section spots ``j`` of every spot ``i`` of section ``s``.

    Only spots closer than ``2 r`` count; every row gets at least its ``k`` nearest, with every tie (and a 1e-9
    relative margin) at the k-th distance. The query is widened per row until the farthest point returned lies
    beyond that distance (or beyond ``2 r``).
    """
    pool = np.flatnonzero(active[codes])
    if pool.size == 0:
        return
    tree = cKDTree(centres[pool])
    pcodes = codes[pool]
    reach = 2.0 * r
    for s in np.flatnonzero(active):
        rows = np.flatnonzero(codes == s)
        if rows.size == 0:
            continue
        todo = np.arange(rows.size)
        kq = min(pool.size, 2 * k + 2)
        out_i, out_j = [], []
        while todo.size:
            d, jj = tree.query(centres[rows[todo]], k=kq, distance_upper_bound=reach)
            d, jj = d.reshape(todo.size, kq), jj.reshape(todo.size, kq)
            found = jj < pool.size
            valid = found & (pcodes[np.minimum(jj, pool.size - 1)] != s)
            # k-th valid distance per row (inf when fewer than k valid)
            dv = np.where(valid, d, np.inf)
            dk = np.partition(dv, k - 1, axis=1)[:, k - 1] if kq >= k else np.full(todo.size, np.inf)
            limit = np.minimum(dk * (1.0 + 1e-9), reach)
            last = np.where(found[:, -1], d[:, -1], np.inf)  # not found: every point within reach was returned
            done = (last > limit) | (kq >= pool.size)
            keep = valid & (d <= limit[:, None]) & done[:, None]
            a, b = np.nonzero(keep)
            out_i.append(rows[todo[a]])
            out_j.append(pool[jj[a, b]])
            todo = todo[~done]
            kq = min(pool.size, 2 * kq)
        i, j = np.concatenate(out_i), np.concatenate(out_j)
        if i.size:
            yield int(s), i, j


def _cross_edges(
    coords: np.ndarray,
    codes: np.ndarray,
    transforms: np.ndarray,
    radius_px: np.ndarray | float,
    k: int,
    *,
    score: Literal["overlap", "similarity", "combined"] = "overlap",
    features: np.ndarray | None = None,
    similarity_weight: float = 1.0,
    adjacent_only: bool = False,
    n_vertices: int = 100,
    key: np.ndarray | None = None,
    active: np.ndarray | None = None,
    knn_fast_path: bool = True,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Directed top-``k`` cross-section partners of every spot (array core of :func:`neighbors_3d`).

    Scores: ``overlap`` = IoU (pairs with IoU > 0), ``similarity`` = cosine of ``features``, ``combined`` =
    IoU + ``similarity_weight`` * cosine. For ``combined`` the exact top-k lies in the union of the IoU > 0 pairs
    and the top-k pairs by cosine (a pair outside both has IoU 0 and k better cosines), so only those are scored.
    Pairs scoring <= 0 are dropped. Returns ``(rows, cols, scores)``, at most ``k`` per row.

    With ``score="overlap"`` over every other section and footprints that are circles of one radius (similarity
    transforms of one scale, the usual case), the candidates are the nearest other-section centres from one
    KD-tree query per section (``knn_fast_path``), so the cost does not grow with the number of sections; the
    result is the same as the exhaustive candidate search.
    """
    n = coords.shape[0]
    key = np.arange(n) if key is None else np.asarray(key)
    transforms = np.asarray(transforms, dtype=float).reshape(-1, 3, 3)
    n_sections = transforms.shape[0]
    active = np.ones(n_sections, dtype=bool) if active is None else np.asarray(active, dtype=bool)
    use_iou = score in ("overlap", "combined")
    use_cos = score in ("similarity", "combined")
    Fn = _normalise_rows(features) if use_cos else None
    out_r, out_c, out_v = [], [], []

    def finish(i: np.ndarray, j: np.ndarray, v: np.ndarray) -> None:
        ok = v > 0
        i, j, v = i[ok], j[ok], v[ok]
        sel = _topk_rows(i, j, v, k, key)
        out_r.append(i[sel])
        out_c.append(j[sel])
        out_v.append(v[sel])

    if k == 0:
        return np.empty(0, dtype=np.int64), np.empty(0, dtype=np.int64), np.empty(0)
    overlap_blocks: Iterator[tuple[int, np.ndarray, np.ndarray]] = iter(())
    if use_iou:
        fp = Footprints.from_transforms(transforms, radius_px)
        centres = aligned_centres(coords, codes, transforms)
        overlap_blocks = _candidate_pairs(
            centres, codes, fp, adjacent_only=adjacent_only, both_directions=True, active=active
        )
    if not use_cos:
        r_al = fp.radius_aligned[active]
        equal_circles = bool(fp.exact[active].all()) and float(np.ptp(r_al)) <= 1e-9 * float(r_al.max())
        if equal_circles and not adjacent_only and knn_fast_path:
            # IoU of equal circles decreases with distance: top-k by IoU = k nearest other-section centres
            overlap_blocks = _nearest_other_section(centres, codes, float(r_al[0]), k, active)
        for _s, i, j in overlap_blocks:
            finish(i, j, pairs_iou(centres, codes, fp, i, j, n_vertices=n_vertices))
    else:
        # the generator yields sections in increasing order, possibly skipping some: walk both together
        pending = next(overlap_blocks, None)
        for s in range(n_sections):
            if not active[s]:
                continue
            rows = np.flatnonzero(codes == s)
            partners = [
                t
                for t in _partner_sections(n_sections, s, adjacent_only=adjacent_only, both_directions=True)
                if active[t]
            ]
            pool = np.flatnonzero(np.isin(codes, partners))
            ci, cj = _cosine_topk_candidates(Fn, rows, pool, k)
            oi = oj = iou = np.empty(0)
            if pending is not None and pending[0] == s:
                _s, oi, oj = pending
                pending = next(overlap_blocks, None)
                iou = pairs_iou(centres, codes, fp, oi, oj, n_vertices=n_vertices)
                pos = iou > 0
                oi, oj, iou = oi[pos], oj[pos], iou[pos]
            okey = oi.astype(np.int64) * n + oj.astype(np.int64)
            pk = np.unique(np.concatenate([ci.astype(np.int64) * n + cj, okey]))
            i, j = pk // n, pk % n
            v = similarity_weight * _cosine_pairs(Fn, i, j)
            if okey.size:
                order = np.argsort(okey)
                loc = np.searchsorted(okey[order], pk).clip(max=okey.size - 1)
                found = okey[order][loc] == pk
                v = v + np.where(found, iou[order][loc], 0.0)
            finish(i, j, v)
    if not out_r:
        return np.empty(0, dtype=np.int64), np.empty(0, dtype=np.int64), np.empty(0)
    return np.concatenate(out_r), np.concatenate(out_c), np.concatenate(out_v)


def _symmetric_union(rows: np.ndarray, cols: np.ndarray, vals: np.ndarray, n: int) -> sp.csr_matrix:
    W = sp.csr_matrix((vals, (rows, cols)), shape=(n, n))
    W = W.maximum(W.T).tocsr()
    W.sort_indices()
    return W


def _edge_distances(
    W: sp.csr_matrix,
    codes: np.ndarray,
    coords_um: np.ndarray,
    aligned_um: np.ndarray | None,
    z_um: np.ndarray | None,
) -> sp.csr_matrix:
    """Distances in µm on the pattern of ``W``: native (physical) distance within a section, 3D across sections.

    Explicit zeros are kept, so the sparsity pattern always equals that of ``W``.
    """
    W = W.tocsr()
    n = W.shape[0]
    rows = np.repeat(np.arange(n), np.diff(W.indptr))
    cols = W.indices
    d = np.hypot(coords_um[rows, 0] - coords_um[cols, 0], coords_um[rows, 1] - coords_um[cols, 1])
    cross = codes[rows] != codes[cols]
    if cross.any():
        r, c = rows[cross], cols[cross]
        dxy2 = (aligned_um[r, 0] - aligned_um[c, 0]) ** 2 + (aligned_um[r, 1] - aligned_um[c, 1]) ** 2
        d[cross] = np.sqrt(dxy2 + (z_um[r] - z_um[c]) ** 2)
    return sp.csr_matrix((d, W.indices.copy(), W.indptr.copy()), shape=W.shape)


def _graph_3d(
    coords: np.ndarray,
    codes: np.ndarray,
    um_per_px: np.ndarray,
    n_neighs: int,
    n_neighs_across: int,
    *,
    alignment: _Alignment | None,
    radius_px: np.ndarray | float = 112.0,
    weights: Literal["inverse_distance", "binary"] = "inverse_distance",
    across: Literal["overlap", "similarity", "combined"] = "overlap",
    features: np.ndarray | None = None,
    similarity_weight: float = 1.0,
    cross_weight: float = 1.0,
    adjacent_only: bool = False,
    n_vertices: int = 100,
    key: np.ndarray | None = None,
    names: np.ndarray | None = None,
    section_names: Sequence[str] | None = None,
) -> tuple[sp.csr_matrix, sp.csr_matrix, int, int]:
    """Array core of :func:`neighbors_3d`: ``(connectivities, distances, n within edges, n cross edges)``.

    ``coords`` are native px, ``um_per_px`` one value per section code; ``alignment`` gives the transforms,
    aligned positions (µm) and z (µm); without it no cross-section edge is built. ``names`` / ``section_names``
    only name spots and sections in warnings.
    """
    n = coords.shape[0]
    W_in = _within_graph(
        coords,
        codes,
        n_neighs,
        um_per_px=um_per_px,
        weights=weights,
        key=key,
        names=names,
        section_names=section_names,
    )
    W_x = sp.csr_matrix((n, n), dtype=float)
    if alignment is not None and n_neighs_across > 0 and cross_weight > 0:
        r, c, v = _cross_edges(
            coords,
            codes,
            alignment.transforms,
            radius_px,
            n_neighs_across,
            score=across,
            features=features,
            similarity_weight=similarity_weight,
            adjacent_only=adjacent_only,
            n_vertices=n_vertices,
            key=key,
            active=alignment.active,
        )
        W_x = _symmetric_union(r, c, cross_weight * v, n)
        del r, c, v
    n_within, n_cross = int(W_in.nnz // 2), int(W_x.nnz // 2)
    W = (W_in + W_x).tocsr()
    del W_in, W_x
    W.sort_indices()
    coords_um = coords * np.asarray(um_per_px, dtype=float)[codes][:, None]
    D = _edge_distances(
        W,
        codes,
        coords_um,
        None if alignment is None else alignment.spatial_aligned,
        None if alignment is None else alignment.z,
    )
    return W, D, n_within, n_cross


def cross_section_edges(matrix: sp.spmatrix, sections) -> sp.csr_matrix:
    """Boolean mask, on the pattern of ``matrix``, of edges whose ends lie in different sections.

    ``sections`` is ``obs['section']`` (or any per-spot labels). This is how the edge attribute "cross-section"
    is derived from a stored graph: ``cross = codes[row] != codes[col]``.
    """
    codes = pd.Categorical(np.asarray(sections)).codes
    coo = sp.coo_matrix(matrix)
    cross = codes[coo.row] != codes[coo.col]
    return sp.csr_matrix((cross, (coo.row, coo.col)), shape=coo.shape, dtype=bool)


# --------------------------------------------------------------------------------------------------------------------
# reading the stack and the alignment
# --------------------------------------------------------------------------------------------------------------------


def _stable_key(table: AnnData) -> np.ndarray:
    """Rank of every spot's ``obs_name``: a tie-breaker that does not depend on row order."""
    order = np.argsort(np.asarray(table.obs_names, dtype=str), kind="stable")
    key = np.empty(order.size, dtype=np.int64)
    key[order] = np.arange(order.size)
    return key


def _footprint_radius(stack: StackInfo, radius_px: float | None, radius_um: float | None) -> np.ndarray:
    if radius_px is not None and radius_um is not None:
        msg = "Give the footprint radius as `radius_px` or as `radius_um`, not both."
        raise ValueError(msg)
    if radius_um is not None:
        if not (np.isfinite(radius_um) and radius_um > 0):
            msg = f"`radius_um` must be a positive number of microns, got {radius_um}."
            raise ValueError(msg)
        return float(radius_um) / np.asarray(stack.um_per_px, dtype=float)
    r = PATCH_RADIUS_PX if radius_px is None else radius_px
    if not (np.isfinite(r) and r > 0):
        msg = f"`radius_px` must be a positive number of native pixels, got {r}."
        raise ValueError(msg)
    _warn_large_footprints(stack, float(r))
    return np.full(stack.n_sections, float(r))


# a footprint wider than this many spot diameters overlaps many spots of the next section
LARGE_FOOTPRINT_DIAMETERS = 3.0


def _warn_large_footprints(stack: StackInfo, radius_px: float) -> None:
    """Warn about sections where a footprint radius in pixels spans more than 3 spot diameters across."""
    d = float(stack.spot_diameter_um)
    big = list(wider_than_spots(stack, 2.0 * radius_px, factor=LARGE_FOOTPRINT_DIAMETERS))
    if big:
        u = float(stack.um_per_px[stack.index(big[0])])
        logger.warning(
            f"Sections {big} have spot footprints more than {LARGE_FOOTPRINT_DIAMETERS:g}x the spot diameter "
            f"({d:.0f} µm) across (radius {radius_px:g} px x {u:g} µm/px = {radius_px * u:.0f} µm in {big[0]}), so "
            "each footprint overlaps many spots of the next section. The radius is in pixels (the default, half "
            "the 224 px spot patch, suits images of about 0.5 µm/px); pass `radius_um=` instead, e.g. half the "
            "spot patch side given to `asign.pp.extract_features(scales_um=...)` (56 for a 112 µm patch)."
        )


@dataclass(frozen=True)
class _Alignment:
    transforms: np.ndarray  # (S, 3, 3); identity where missing
    active: np.ndarray  # (S,) sections with a transform
    um_per_px: float
    spatial_aligned: np.ndarray  # (n, 2) µm
    z: np.ndarray  # (n,) µm


def _read_alignment(table: AnnData, stack: StackInfo, table_key: str) -> _Alignment:
    """The transforms, aligned positions and z written by :func:`asign.pp.align_layers`."""
    al = table.uns.get(Key.UNS, {}).get(Key.ALIGNMENT) if isinstance(table.uns.get(Key.UNS), dict) else None
    if not isinstance(al, dict) or "transforms" not in al:
        msg = (
            f"Table {table_key!r} has no alignment (`uns['{Key.UNS}']['{Key.ALIGNMENT}']['transforms']`); "
            f"{_ALIGN_HINT}."
        )
        raise KeyError(msg)
    for where, ok in (
        (f"obsm['{Key.SPATIAL_ALIGNED}']", Key.SPATIAL_ALIGNED in table.obsm),
        (f"obs['{Key.Z}']", Key.Z in table.obs.columns),
    ):
        if not ok:
            msg = f"Table {table_key!r} has an alignment but no {where}; {_ALIGN_HINT}."
            raise KeyError(msg)
    raw = al["transforms"]
    T = np.tile(np.eye(3), (stack.n_sections, 1, 1))
    active = np.zeros(stack.n_sections, dtype=bool)
    for i, s in enumerate(stack.sections):
        if s in raw:
            try:
                T[i] = as_affine(raw[s])
            except ValueError as e:
                msg = f"Section {s!r}: the alignment transform is invalid ({e}); {_ALIGN_HINT}."
                raise ValueError(msg) from None
            active[i] = True
    missing = [s for s, a in zip(stack.sections, active, strict=True) if not a]
    if not active.any():
        msg = f"The alignment in table {table_key!r} has no transform for any section {stack.sections}; {_ALIGN_HINT}."
        raise ValueError(msg)
    if missing:
        logger.warning(f"Sections {missing} have no alignment transform; they get no cross-section edges.")
    um = float(np.asarray(al.get("um_per_px", np.nan)).item())
    if not (np.isfinite(um) and um > 0):
        msg = f"`uns['{Key.UNS}']['{Key.ALIGNMENT}']['um_per_px']` must be a positive pixel size; {_ALIGN_HINT}."
        raise ValueError(msg)
    return _Alignment(
        transforms=T,
        active=active,
        um_per_px=um,
        spatial_aligned=np.asarray(table.obsm[Key.SPATIAL_ALIGNED], dtype=float)[:, :2],
        z=np.asarray(table.obs[Key.Z], dtype=float),
    )


ALIGNMENT_FINGERPRINT = "alignment_fingerprint"
"""Key in ``uns['<key_added>_neighbors']['params']`` of the alignment a 3D graph was built on."""


def _canonical_float(a: np.ndarray) -> np.ndarray:
    """Contiguous float64 with one bit pattern per value: every NaN the same, ``-0.0`` as ``0.0``."""
    a = np.asarray(a, dtype=np.float64) + 0.0
    return np.ascontiguousarray(np.where(np.isnan(a), np.nan, a))


def alignment_fingerprint(table: AnnData) -> str:
    """SHA-1 (hex) of the spots and the alignment that the connectivities of :func:`neighbors_3d` depend on.

    The edges and weights follow from each spot's native position ``obsm['spatial']`` (within a section) and from
    the section transforms ``uns['asign']['alignment']['transforms']`` (the footprints across sections); they do not
    read ``obsm['spatial_aligned']`` or ``obs['z']`` (only the distances do), so those are not covered and the
    fingerprint does not depend on NaN aligned positions. Covered: spot by spot in the order of the sorted
    ``obs_names`` (so a table with its rows permuted, and its graph with them, still matches), the names and
    ``obsm['spatial'][:, :2]``, then every transform by section name. Values are hashed as float64 with NaN and
    ``-0.0`` canonicalised, so a copy of the table or a round trip through zarr gives the same fingerprint. A missing
    entry is hashed as missing.
    """
    import hashlib

    h = hashlib.sha1(usedforsecurity=False)
    names, order = _sorted_order(table)
    h.update(b"names\0" + "\0".join(names[order].tolist()).encode("utf-8", "surrogatepass"))
    if Key.SPATIAL in table.obsm:
        xy = np.asarray(table.obsm[Key.SPATIAL], dtype=np.float64).reshape(table.n_obs, -1)[:, :2]
        h.update(b"\0spatial\0" + _canonical_float(xy[order]).tobytes())
    else:
        h.update(b"\0spatial: missing")
    uns = table.uns.get(Key.UNS)
    al = uns.get(Key.ALIGNMENT) if isinstance(uns, dict) else None
    raw = al.get("transforms") if isinstance(al, dict) else None
    if isinstance(raw, dict):
        for sec in sorted(raw, key=str):
            try:
                T = as_affine(raw[sec])
            except (TypeError, ValueError):
                T = np.asarray(raw[sec], dtype=object).astype(str)
                h.update(f"\0transform {sec}: invalid {T.shape} {T.tolist()}".encode())
                continue
            h.update(f"\0transform {sec}\0".encode() + _canonical_float(T).tobytes())
    else:
        h.update(b"\0transforms: missing")
    return h.hexdigest()


SIMILARITY_FINGERPRINT = "similarity_fingerprint"
"""Key in ``uns['<key_added>_neighbors']['params']`` of the spots and feature shape a 3D graph's similarity read."""
SIMILARITY_SIGNATURE = "similarity_signature"
"""Key in ``uns['<key_added>_neighbors']['params']`` of the per-spot signature of those features."""
SIGNATURE_DIM = 4
"""Columns of :func:`similarity_signature`."""
SIGNATURE_ATOL = 1e-3
"""Largest difference between two signatures of the same features (float noise of a re-extraction is ~1e-5)."""


def _sorted_order(table: AnnData) -> tuple[np.ndarray, np.ndarray]:
    names = np.asarray(table.obs_names, dtype=str)
    order = np.argsort(names, kind="stable")
    return names, order


def similarity_fingerprint(table: AnnData, similarity_key: str) -> str:
    """SHA-1 (hex) of the spots and the shape of the features ``obsm[similarity_key]`` that :func:`neighbors_3d` scored.

    The sorted ``obs_names``, the key and the array's shape: a copy, permuted rows or a round trip through zarr keep
    it. The values are compared through :func:`similarity_signature`, which tolerates float noise.
    """
    import hashlib

    h = hashlib.sha1(usedforsecurity=False)
    names, order = _sorted_order(table)
    h.update(b"names\0" + "\0".join(names[order].tolist()).encode("utf-8", "surrogatepass"))
    F = np.asarray(table.obsm[similarity_key]).reshape(table.n_obs, -1)
    h.update(f"\0{similarity_key}\0{F.shape}".encode())
    return h.hexdigest()


def similarity_signature(table: AnnData, similarity_key: str) -> np.ndarray:
    """``(n_obs, 4)`` float32 signature of the features ``obsm[similarity_key]``, rows in sorted ``obs_names`` order.

    Each spot's feature vector, scaled to unit length (the cosine of the similarity score reads only its direction),
    projected on 4 fixed Gaussian directions (seed 0). Features extracted again with the same options but another
    batch size or thread count differ by float noise (about 1e-5 here), below :data:`SIGNATURE_ATOL`; another
    encoder, scale or stain option moves every spot's direction by far more. A row with NaN stays NaN.
    """
    _, order = _sorted_order(table)
    F = np.asarray(table.obsm[similarity_key], dtype=np.float64).reshape(table.n_obs, -1)[order]
    norm = np.linalg.norm(F, axis=1, keepdims=True)
    F = np.divide(F, norm, out=np.zeros_like(F), where=norm > 0)
    R = np.random.default_rng(0).standard_normal((F.shape[1], SIGNATURE_DIM))
    return (F @ R).astype(np.float32)


def _check_graph_features(table: AnnData, params: dict[str, Any], ckey: str, graph_key: str, table_key: str) -> None:
    """Refuse a graph whose cross-section similarity read other features than ``obsm[similarity_key]`` holds now."""
    skey = params.get("similarity_key")
    skey = "" if skey is None else str(np.asarray(skey).item()) if not isinstance(skey, str) else skey
    stored = params.get(SIMILARITY_FINGERPRINT)
    signature = params.get(SIMILARITY_SIGNATURE)
    if skey == "" or stored is None:
        return
    stored = str(np.asarray(stored).item()) if not isinstance(stored, str) else stored
    if stored == "":
        return
    rerun = (
        f"Run `asign.pp.neighbors_3d(sdata, key_added={graph_key!r}, similarity_key={skey!r})` again (with the "
        "same options) before imputing."
    )
    if skey not in table.obsm:
        logger.warning(
            f"`.obsp['{ckey}']` of table {table_key!r} scored cross-section pairs by the features in "
            f"`.obsm['{skey}']`, which the table no longer holds: it cannot be checked against them. {rerun}"
        )
        return
    same = stored == similarity_fingerprint(table, skey)
    if same and signature is not None:
        signature = np.asarray(signature, dtype=np.float32)
        now = similarity_signature(table, skey)
        same = signature.shape == now.shape and bool(
            np.allclose(signature, now, rtol=0.0, atol=SIGNATURE_ATOL, equal_nan=True)
        )
    if not same:
        n_bad = int((~np.isfinite(np.asarray(table.obsm[skey], dtype=float)).all(axis=1)).sum())
        nan_note = f" (it now has non-finite values in {n_bad} spots)" if n_bad else ""
        msg = (
            f"`.obsp['{ckey}']` of table {table_key!r} was built on other image features: `.obsm['{skey}']` has "
            f"changed{nan_note} since `asign.pp.neighbors_3d` scored cross-section pairs by their similarity (e.g. "
            f"`asign.pp.extract_features` ran again with other options), so its edges are stale. {rerun}"
        )
        raise ValueError(msg)


def check_graph_alignment(table: AnnData, graph_key: str = Key.ADDED, *, table_key: str = Key.TABLE) -> None:
    """Refuse a 3D graph built on an earlier alignment, or on other similarity features, than the table holds now.

    Compares ``uns['<graph_key>_neighbors']['params']['alignment_fingerprint']``, recorded by :func:`neighbors_3d`,
    with :func:`alignment_fingerprint` of ``table`` now, and, for a graph whose cross-section scores read image
    features (``across="similarity"`` or ``"combined"``), ``params['similarity_fingerprint']`` and
    ``params['similarity_signature']`` with :func:`similarity_fingerprint` and :func:`similarity_signature` of
    ``obsm[params['similarity_key']]`` (the signature within :data:`SIGNATURE_ATOL`, so features extracted again
    with the same options but another batch size pass). Used wherever the stored graph is read
    (the ``"propagation"`` baseline, method ``"asign"``). A graph that records no fingerprint (written by an older
    version) passes, with an info message; an empty fingerprint means the graph has no cross-section part (or no
    similarity score) and does not depend on the alignment (or the features). A graph whose features are no longer
    in ``.obsm`` passes with a warning.

    Raises
    ------
    ValueError
        If the fingerprints differ: ``align_layers`` ran again with other transforms (or the spots or their native
        positions changed), or the similarity features were extracted again differently, after the graph was built.
    """
    ckey, nkey = Key.connectivities(graph_key), Key.neighbors(graph_key)
    rec = table.uns.get(nkey)
    params = rec.get("params") if isinstance(rec, dict) else None
    if isinstance(params, dict):
        _check_graph_features(table, params, ckey, graph_key, table_key)
    stored = params.get(ALIGNMENT_FINGERPRINT) if isinstance(params, dict) else None
    if stored is None:
        logger.info(
            f"`.uns['{nkey}']['params']` of table {table_key!r} records no `{ALIGNMENT_FINGERPRINT}` (a graph from an "
            f"older version): `.obsp['{ckey}']` is used without checking that it follows the current alignment."
        )
        return
    stored = str(np.asarray(stored).item()) if not isinstance(stored, str) else stored
    if stored == "":
        return
    if stored != alignment_fingerprint(table):
        msg = (
            f"`.obsp['{ckey}']` of table {table_key!r} was built on an earlier alignment: the section transforms "
            f"(`uns['{Key.UNS}']['{Key.ALIGNMENT}']['transforms']`) or the spots (`obs_names`, "
            f"`obsm['{Key.SPATIAL}']`) have changed since `asign.pp.neighbors_3d` ran (e.g. `asign.pp.align_layers` "
            f"ran again), so its edges are stale. Run `asign.pp.neighbors_3d(sdata, key_added={graph_key!r})` again "
            "(with the same options) before imputing."
        )
        raise ValueError(msg)


def _check_consistency(table: AnnData, codes: np.ndarray, centres_px: np.ndarray, al: _Alignment) -> None:
    """Warn when ``obsm['spatial_aligned']`` disagrees with the stored transforms (a stale alignment)."""
    rows = al.active[codes]
    if not rows.any():
        return
    diff = np.abs(centres_px[rows] * al.um_per_px - al.spatial_aligned[rows])
    bad = np.nanmax(diff) if np.isfinite(diff).any() else 0.0
    if bad > max(1.0, 1.0 * al.um_per_px):
        logger.warning(
            f"obsm['{Key.SPATIAL_ALIGNED}'] differs from the stored transforms by up to {bad:.3g} µm; "
            "the footprints follow the transforms. Re-run `asign.pp.align_layers` if the alignment changed."
        )


def _isolated_warning(W: sp.csr_matrix, table: AnnData) -> int:
    deg = np.diff(W.indptr) - (W.diagonal() != 0)
    iso = np.flatnonzero(deg == 0)
    if iso.size:
        per = table.obs[Key.SECTION].iloc[iso].astype(str).value_counts().sort_index()
        logger.warning(
            f"{iso.size} spot(s) have no neighbour in the graph, by section: {per.to_dict()}. "
            "They keep their initial value in label propagation; check the alignment or raise `n_neighs_across`."
        )
    return int(iso.size)


# --------------------------------------------------------------------------------------------------------------------
# public API
# --------------------------------------------------------------------------------------------------------------------

_radius_doc = """radius_px
    Footprint radius in each section's native pixels. Default: 112 px, half the 224 px spot patch (method.md
    §3.1): the overlap is that of the *image patches* the model reads, not of the physical spots. A warning names
    the sections where a footprint in pixels is more than 3 spot diameters across (coarse images: pass
    ``radius_um``).
radius_um
    Footprint radius in µm instead (converted with each section's ``um_per_px``); exclusive with ``radius_px``.
n_vertices
    Vertices of the polygons that approximate footprints where a transform is not a similarity (an affine map
    turns circles into ellipses). Where both transforms are similarities (rigid, scaled, mirrored) the exact
    circle IoU is used."""


@inject_docs(radius=_radius_doc)
def spot_overlaps(
    sdata: SpatialData,
    *,
    table_key: str = Key.TABLE,
    radius_px: float | None = None,
    radius_um: float | None = None,
    n_vertices: int = 100,
    key_added: str = Key.OVERLAP,
    adjacent_only: bool = True,
    inplace: bool = True,
) -> sp.csr_matrix | None:
    """Overlap (IoU) of the spot footprints of different sections in the aligned frame.

    Each spot's footprint is a disc of radius ``radius_px`` around its centre in its section's native pixels,
    mapped into the aligned frame by the section's transform ``T_s``. Candidate pairs come from KD-trees on the
    aligned centres (pairs whose footprints' bounding discs do not meet have IoU exactly 0), so the cost is
    near-linear in the number of spots and no dense ``N x N`` array is built.

    Parameters
    ----------
    {sdata}
    {table_key}
    {radius}
    key_added
        Key of the matrix in ``.obsp`` and of its record in ``.uns``. A key reserved by the stack contract (e.g.
        ``"asign"``, which holds the manifest and the alignment in ``.uns``) is refused before any work.
    adjacent_only
        Only pairs of consecutive sections (cutting order). If `False`, pairs of every two sections.
    {inplace}

    Returns
    -------
    If ``inplace = False``, the IoU as a symmetric :class:`scipy.sparse.csr_matrix` (``n_obs x n_obs``, zero
    diagonal, cross-section pairs with IoU > 0 only). Otherwise modifies ``sdata.tables[table_key]`` with
    ``.obsp['{{key_added}}']`` (that matrix) and ``.uns['{{key_added}}']['params']``: ``radius_px`` (per
    section), ``n_vertices``, ``adjacent_only``, ``footprint`` (``"circle"`` or ``"polygon"``),
    ``fraction_with_partner`` (per section: the share of its spots with a cross-section partner of IoU > 0) and
    ``alignment_key`` (the coordinate system of the alignment used, its ``key_added``).
    """
    from asign._stack import section_codes
    from asign.io._validate import validate_stack

    if inplace:
        check_reserved_keys(key_added, table_key, obsp=(key_added,), uns=(key_added,))
    stack = validate_stack(sdata, table_key=table_key, check_counts=False)
    table = sdata.tables[table_key]
    if n_vertices < 3:
        msg = f"`n_vertices` must be at least 3, got {n_vertices}."
        raise ValueError(msg)
    radius = _footprint_radius(stack, radius_px, radius_um)
    al = _read_alignment(table, stack, table_key)
    codes = section_codes(table, stack)
    coords = np.asarray(table.obsm[Key.SPATIAL], dtype=float)
    _check_consistency(table, codes, aligned_centres(coords, codes, al.transforms), al)
    M = _overlap_matrix(
        coords, codes, al.transforms, radius, adjacent_only=adjacent_only, n_vertices=n_vertices, active=al.active
    )
    has = np.diff(M.indptr) > 0
    frac = {s: float(has[codes == i].mean()) for i, s in enumerate(stack.sections)}
    fp = Footprints.from_transforms(al.transforms, radius)
    logger.info(
        f"Spot overlaps: {M.nnz // 2} cross-section pairs with IoU > 0; share of spots with a partner per section: "
        + ", ".join(f"{s} {f:.2f}" for s, f in frac.items())
    )
    if not inplace:
        return M
    table.obsp[key_added] = M
    table.uns[key_added] = {
        "params": {
            "radius_px": radius.astype(float),
            "n_vertices": int(n_vertices),
            "adjacent_only": bool(adjacent_only),
            "footprint": "circle" if bool(fp.exact[al.active].all()) else "polygon",
            "fraction_with_partner": frac,
            "alignment_key": str(table.uns[Key.UNS][Key.ALIGNMENT].get("key_added", Key.ALIGNED)),
        }
    }
    logger.info(f"Adding `.obsp['{key_added}']` and `.uns['{key_added}']`.")
    return None


@inject_docs(radius=_radius_doc)
def neighbors_3d(
    sdata: SpatialData,
    *,
    table_key: str = Key.TABLE,
    n_neighs: int = 12,
    n_neighs_across: int = 12,
    weights: Literal["inverse_distance", "binary"] = "inverse_distance",
    across: Literal["overlap", "similarity", "combined"] | None = None,
    similarity_key: str | None = None,
    similarity_weight: float = 1.0,
    cross_weight: float = 1.0,
    adjacent_only: bool = False,
    radius_px: float | None = None,
    radius_um: float | None = None,
    n_vertices: int = 100,
    key_added: str = Key.ADDED,
    self_loops: bool = False,
    inplace: bool = True,
) -> SpatialNeighbors3D | None:
    """Whole-sample 3D spot graph: kNN within sections plus top-k partners across sections (method.md §4).

    Built once on every spot of every section; the result does not depend on the order of the spots (ties are
    broken by distance or score, then by ``obs_names``).

    - **Within a section**: the ``n_neighs`` nearest spots on the section's own coordinates (the supplement's "top
      12 nearest spots": on the ST square grid the 4 + 4 + 4 neighbours up to two pitches, on a Visium hexagonal
      grid the 6 + 6 up to sqrt(3) pitches), weighted by ``median NN distance of the section / distance`` so the
      nearest neighbours weigh about 1 (``weights="binary"``: 1). The distance is floored at half the section's
      median NN distance, so spots at the same position (duplicates) weigh at most 2; a warning names them.
    - **Across sections**: for every spot, the ``n_neighs_across`` spots of the *other* sections (every other
      section, or only the adjacent ones with ``adjacent_only=True``) with the highest score: ``"overlap"`` = IoU
      of the footprints in the aligned frame (:func:`asign.pp.spot_overlaps`; only pairs with IoU > 0),
      ``"similarity"`` = cosine of the image features in ``obsm[similarity_key]``, ``"combined"`` = IoU +
      ``similarity_weight`` x cosine (the method's default score once features exist). Edge weight
      ``cross_weight`` x score.
    - Both parts are made symmetric by union keeping the larger weight. Whether an edge is a cross-section edge
      follows from ``obs['section']`` of its two ends (``asign.pp._graph.cross_section_edges``).

    Parameters
    ----------
    {sdata}
    {table_key}
    n_neighs
        Neighbours within a section (12 as in the paper's supplement; its Table 2 used 8, the released code 4).
        0 gives no within-section edges. In a section of ``n_neighs`` spots or fewer every spot is linked to all the
        others (with a warning naming the section).
    n_neighs_across
        Cross-section partners per spot (12, the paper's Table 2). 0 gives a per-section (2D) graph.
    weights
        Within-section edge weights.
    across
        Cross-section score; default ``"combined"`` when ``similarity_key`` is given, otherwise ``"overlap"``.
    similarity_key
        Key in ``.obsm`` of per-spot image features (e.g. ``'asign_features_spot'`` from
        :func:`asign.pp.extract_features`), used by ``"similarity"`` and ``"combined"``.
    similarity_weight
        Weight of the cosine in the ``"combined"`` score.
    cross_weight
        Factor applied to the cross-section score to give the edge weight (beta_x, 1 in the method).
    adjacent_only
        Restrict cross-section partners to the adjacent sections. The method's default (`False`) considers every
        other section. With the overlap score and circular footprints of one radius (rigid or one-scale alignment)
        the candidates come from one KD-tree nearest-neighbour query per section, so the cost stays near-linear in
        the number of spots; otherwise (affine alignment, similarity scores) it grows with ``N x S``.
    {radius}
    key_added
        Prefix of the keys written.
    self_loops
        Store self-loops (weight 1, distance 0). The stored graph of the method has none; the GNN adds its own.
    {inplace}

    Returns
    -------
    If ``inplace = False``, a ``SpatialNeighbors3D(connectivities, distances)`` named tuple. Otherwise modifies
    ``sdata.tables[table_key]`` with ``.obsp['{{key_added}}_connectivities']`` (symmetric CSR weights),
    ``.obsp['{{key_added}}_distances']`` (µm on the same pattern: physical distance within a section, 3D distance
    from ``obsm['spatial_aligned']`` and ``obs['z']`` across sections) and ``.uns['{{key_added}}_neighbors']`` =
    ``{{'connectivities_key', 'distances_key', 'params'}}`` (squidpy's scheme). ``params`` holds the options, the
    edge counts (``n_edges_within``, ``n_edges_across``, ``n_isolated``) and ``alignment_fingerprint``: the SHA-1
    of the alignment the graph was built on (the section transforms, with ``obs_names`` and ``obsm['spatial']``;
    :func:`asign.pp._graph.alignment_fingerprint`), ``""`` when the graph has no cross-section part. Imputation
    (``"propagation"``, ``"asign"``) refuses a graph whose fingerprint no longer matches the table, e.g. after
    :func:`asign.pp.align_layers` ran again with other transforms. With ``similarity_key``, ``params`` also holds
    ``similarity_fingerprint``, the SHA-1 of the spots and the shape of the features scored
    (:func:`asign.pp._graph.similarity_fingerprint`; ``""`` without them), and ``similarity_signature``, a
    ``(n_obs, 4)`` float32 summary of each spot's feature direction (:func:`asign.pp._graph.similarity_signature`);
    imputation refuses the graph once ``.obsm[similarity_key]`` has changed by more than float noise.
    """
    from asign._stack import section_codes
    from asign.io._validate import validate_stack

    stack = validate_stack(sdata, table_key=table_key, check_counts=False)
    table = sdata.tables[table_key]
    for name, val in (("n_neighs", n_neighs), ("n_neighs_across", n_neighs_across)):
        if not isinstance(val, int | np.integer) or isinstance(val, bool) or val < 0:
            msg = f"`{name}` must be a non-negative integer, got {val!r}."
            raise ValueError(msg)
    if weights not in ("inverse_distance", "binary"):
        msg = f"`weights` must be 'inverse_distance' or 'binary', got {weights!r}."
        raise ValueError(msg)
    if across is None:
        across = "combined" if similarity_key is not None else "overlap"
    if across not in ("overlap", "similarity", "combined"):
        msg = f"`across` must be 'overlap', 'similarity' or 'combined', got {across!r}."
        raise ValueError(msg)
    if across == "overlap" and similarity_key is not None:
        msg = f"`similarity_key={similarity_key!r}` is not used with across='overlap'; use across='combined'."
        raise ValueError(msg)
    if across != "overlap" and similarity_key is None:
        msg = f"across={across!r} needs `similarity_key`, the `.obsm` key of per-spot image features."
        raise ValueError(msg)
    for name, val in (("similarity_weight", similarity_weight), ("cross_weight", cross_weight)):
        if not (np.isfinite(check_number(name, val)) and val >= 0):
            msg = f"`{name}` must be a non-negative number, got {val!r}."
            raise ValueError(msg)
    if check_number("n_vertices", n_vertices, integer=True) < 3:
        msg = f"`n_vertices` must be at least 3, got {n_vertices}."
        raise ValueError(msg)
    radius = _footprint_radius(stack, radius_px, radius_um)

    codes = section_codes(table, stack)
    counts = np.bincount(codes, minlength=stack.n_sections)
    small = [f"{s} ({c} spots)" for s, c in zip(stack.sections, counts, strict=True) if c <= n_neighs]
    if small and n_neighs > 0:
        logger.warning(
            f"Sections {small} have no more than n_neighs={n_neighs} spots: within them every spot is linked to "
            "all the other spots of its section (a single spot has no within-section neighbour)."
        )
    features = None
    if similarity_key is not None:
        if similarity_key not in table.obsm:
            msg = (
                f"`.obsm['{similarity_key}']` not found in table {table_key!r} (present: {list(table.obsm)}); "
                "run `asign.pp.extract_features` first or pass another `similarity_key`."
            )
            raise KeyError(msg)
        features = np.asarray(table.obsm[similarity_key], dtype=float)
        if features.ndim != 2 or features.shape[0] != table.n_obs:
            msg = f"`.obsm['{similarity_key}']` must be an (n_obs, n_features) array, got {features.shape}."
            raise ValueError(msg)
        n_bad, per = nonfinite_rows(table, features)
        if n_bad:
            msg = (
                f"`.obsm['{similarity_key}']` has non-finite values for {n_bad} spots (per section: {per}); "
                "`asign.pp.extract_features(sections=...)` leaves the sections it skips NaN, and spots added by "
                "`asign.pp.make_spots` have none until the features are extracted again (after `align_layers`): "
                "extract features for every section, or pass `similarity_key=None`."
            )
            raise ValueError(msg)

    n = table.n_obs
    key = _stable_key(table)
    coords = np.asarray(table.obsm[Key.SPATIAL], dtype=float)
    al = None
    if n_neighs_across > 0 and stack.n_sections > 1:
        al = _read_alignment(table, stack, table_key)
        _check_consistency(table, codes, aligned_centres(coords, codes, al.transforms), al)
    W, D, n_within, n_cross = _graph_3d(
        coords,
        codes,
        np.asarray(stack.um_per_px, dtype=float),
        n_neighs,
        n_neighs_across,
        alignment=al,
        radius_px=radius,
        weights=weights,
        across=across,
        features=features,
        similarity_weight=similarity_weight,
        cross_weight=cross_weight,
        adjacent_only=adjacent_only,
        n_vertices=n_vertices,
        key=key,
        names=np.asarray(table.obs_names),
        section_names=list(stack.sections),
    )
    n_iso = _isolated_warning(W, table)
    if self_loops:
        W = (W + sp.identity(n, format="csr")).tocsr()
        D = _with_zero_diagonal(D)
    W.sort_indices()
    logger.info(f"3D graph: {n_within} within-section and {n_cross} cross-section edges on {n} spots.")
    if not inplace:
        return SpatialNeighbors3D(W, D)
    ckey, dkey = Key.connectivities(key_added), Key.distances(key_added)
    table.obsp[ckey] = W
    table.obsp[dkey] = D
    scored = features is not None and al is not None  # cross-section scores read the features
    params: dict[str, Any] = {
        "n_neighbors": int(n_neighs),
        "n_neighs": int(n_neighs),
        "n_neighs_across": int(n_neighs_across),
        "weights": str(weights),
        "across": str(across),
        "similarity_key": "" if similarity_key is None else str(similarity_key),
        "similarity_weight": float(similarity_weight),
        "cross_weight": float(cross_weight),
        "adjacent_only": bool(adjacent_only),
        "radius_px": radius.astype(float),
        "n_vertices": int(n_vertices),
        "self_loops": bool(self_loops),
        "coord_type": "generic",
        "n_edges_within": n_within,
        "n_edges_across": n_cross,
        "n_isolated": n_iso,
        "distances_unit": "um",
        "edge_type": "cross-section where obs['section'] differs between the two ends",
        ALIGNMENT_FINGERPRINT: "" if al is None else alignment_fingerprint(table),
        SIMILARITY_FINGERPRINT: "" if not scored else similarity_fingerprint(table, str(similarity_key)),
    }
    if scored:
        params[SIMILARITY_SIGNATURE] = similarity_signature(table, str(similarity_key))
    table.uns[Key.neighbors(key_added)] = {"connectivities_key": ckey, "distances_key": dkey, "params": params}
    logger.info(f"Adding `.obsp['{ckey}']`, `.obsp['{dkey}']` and `.uns['{Key.neighbors(key_added)}']`.")
    return None


def _with_zero_diagonal(D: sp.csr_matrix) -> sp.csr_matrix:
    """Add explicit zero entries on the diagonal (self-loop distances), keeping every other entry."""
    n = D.shape[0]
    coo = D.tocoo()
    rows = np.concatenate([coo.row, np.arange(n)])
    cols = np.concatenate([coo.col, np.arange(n)])
    vals = np.concatenate([coo.data, np.zeros(n)])
    order = np.lexsort((cols, rows))
    rows, cols, vals = rows[order], cols[order], vals[order]
    indptr = np.r_[0, np.cumsum(np.bincount(rows, minlength=n))]
    return sp.csr_matrix((vals, cols, indptr), shape=D.shape)
