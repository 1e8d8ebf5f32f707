"""Baselines without images (method.md §7.3): ``"mean"``, ``"nearest"`` and ``"propagation"``.

Each is registered with :func:`asign.tl._registry.register_method` and runs through :func:`asign.tl.impute`.
They read only ``ctx.Y`` (labels of the known spots) and the table's coordinates / graph.

Every baseline (and the image baselines) also takes ``method_kwargs={"gene_rank": k}``: the prediction is projected
on the first ``k`` principal axes of the known spots' normalised expression, the unprojected prediction kept in
``layers['full_rank']`` (:mod:`asign.tl._gene_rank`, method.md §6 item 8).
"""

from __future__ import annotations

from typing import Any

import numpy as np

from asign._checks import check_method_option
from asign._constants import Key
from asign._logging import logger

from ._gene_rank import gene_rank_option
from ._registry import ImputeContext, ImputeResult, register_method


def _params(ctx: ImputeContext, method: str, defaults: dict[str, Any]) -> dict[str, Any]:
    unknown = sorted(set(ctx.params) - set(defaults))
    if unknown:
        msg = f"Method {method!r} got unknown parameter(s) {unknown}; it accepts {sorted(defaults)}."
        raise ValueError(msg)
    return {**defaults, **ctx.params}


@register_method("mean")
@gene_rank_option
def mean_baseline(ctx: ImputeContext) -> ImputeResult:
    """Every spot gets the mean normalised expression of the known spots (a constant: per-gene PCC 0)."""
    _params(ctx, "mean", {})
    mu = ctx.known_mean()
    return ImputeResult(imputed=np.broadcast_to(mu, (ctx.n_obs, ctx.n_genes)).copy())


def idw_nearest(
    coords: np.ndarray,
    Y: np.ndarray,
    known: np.ndarray,
    *,
    k: int = 8,
    weights: str = "idw",
    p: float = 1.0,
    eps: float = 1.0,
) -> tuple[np.ndarray, int]:
    """Distance-weighted mean of the ``k`` nearest known spots of every spot.

    Unknown spots use all known spots; a known spot uses the other known spots (leave-one-out), so its value is
    a genuine estimate. Weights are ``1 / (d + eps) ** p`` (``weights="idw"``) or uniform.

    Returns
    -------
    The prediction ``(n, G)`` and the ``k`` actually used.
    """
    from scipy.spatial import cKDTree

    known = np.asarray(known, dtype=bool)
    kidx = np.flatnonzero(known)
    n_known = kidx.size
    if weights not in ("idw", "uniform"):
        msg = f"weights must be 'idw' or 'uniform', got {weights!r}."
        raise ValueError(msg)
    if int(k) < 1:
        msg = f"k must be >= 1, got {k}."
        raise ValueError(msg)
    if eps < 0 or p < 0:
        msg = f"eps and p must be non-negative, got eps={eps}, p={p}."
        raise ValueError(msg)
    k_unknown = min(int(k), n_known)
    if k_unknown < int(k):
        logger.warning(f"Only {n_known} known spots: using k={k_unknown} instead of {k}.")
    tree = cKDTree(coords[kidx])
    Yk = Y[kidx]
    out = np.empty((coords.shape[0], Y.shape[1]))

    def _combine(d: np.ndarray, j: np.ndarray) -> np.ndarray:
        if weights == "idw":
            with np.errstate(divide="ignore"):
                w = 1.0 / (d + eps) ** p
            hit = np.isinf(w)
            rows = hit.any(axis=1)
            w[rows] = hit[rows].astype(np.float64)  # eps = 0 and a coinciding spot: take it (them) alone
        else:
            w = np.ones_like(d)
        w = w / w.sum(axis=1, keepdims=True)
        return np.einsum("nk,nkg->ng", w, Yk[j])

    uidx = np.flatnonzero(~known)
    if uidx.size:
        d, j = _query_sorted(tree, coords[uidx], k_unknown, n_known)
        out[uidx] = _combine(d, j)
    if n_known >= 2:
        kk = min(int(k), n_known - 1)
        d, j = _query_sorted(tree, coords[kidx], kk + 1, n_known, exclude=np.arange(n_known))
        out[kidx] = _combine(d, j)
    else:
        out[kidx] = Yk
    return out, k_unknown


def _query_sorted(
    tree, xy: np.ndarray, k: int, n_points: int, *, exclude: np.ndarray | None = None, extra: int = 8
) -> tuple[np.ndarray, np.ndarray]:
    """The ``k`` nearest points (``k - 1`` when ``exclude`` drops each query's own index).

    Ties at equal distance go to the lower index, so the result does not depend on the tree's internal order: the
    tree is asked for ``extra`` more points, and again for twice as many while some query's last returned point still
    lies at its ``k``-th distance (more tied points may lie beyond).
    """
    kq = min(k + extra, n_points)
    keep = k - 1 if exclude is not None else k
    while True:
        d_raw, j = tree.query(xy, k=kq)
        d_raw, j = d_raw.reshape(len(xy), -1), j.reshape(len(xy), -1)
        d = np.where(j == exclude[:, None], np.inf, d_raw) if exclude is not None else d_raw
        order = np.lexsort((j, d), axis=1)[:, :keep]
        dk = np.take_along_axis(d, order, axis=1)
        if kq >= n_points or keep == 0 or not np.any(d_raw[:, -1] <= dk[:, -1]):
            break
        kq = min(2 * kq, n_points)
    return dk, np.take_along_axis(j, order, axis=1)


@register_method("nearest")
@gene_rank_option
def nearest_baseline(ctx: ImputeContext) -> ImputeResult:
    """Inverse-distance weighted mean of the ``k`` nearest known spots in the aligned frame.

    Parameters (``method_kwargs``): ``k`` (8), ``weights`` (``"idw"`` or ``"uniform"`` for a plain k-NN mean),
    ``p`` (1: weights ``1 / (d + eps) ** p``), ``eps`` (1 µm), ``coordinates`` (``"spatial_aligned"``; any
    ``obsm`` key, e.g. ``"spatial_3d"``), ``gene_rank`` (`None`; see the module docstring).
    """
    prm = _params(ctx, "nearest", {"k": 8, "weights": "idw", "p": 1.0, "eps": 1.0, "coordinates": Key.SPATIAL_ALIGNED})
    k = check_method_option("nearest", "k", prm["k"], integer=True, minimum=1)
    p = check_method_option("nearest", "p", prm["p"], minimum=0.0)
    eps = check_method_option("nearest", "eps", prm["eps"], minimum=0.0)
    key = prm["coordinates"]
    if key not in ctx.table.obsm:
        hint = "run `asign.pp.align_layers` first" if key in (Key.SPATIAL_ALIGNED, Key.SPATIAL_3D) else "add it"
        msg = f"`obsm['{key}']` not found in table {ctx.table_key!r}; {hint}."
        raise KeyError(msg)
    coords = np.asarray(ctx.table.obsm[key], dtype=np.float64)
    bad = ~np.all(np.isfinite(coords), axis=1)
    if bad.any():
        secs = ctx.sections_of(bad)
        msg = (
            f"`obsm['{key}']` has non-finite coordinates for {int(bad.sum())} spots of section(s) {secs}; every spot "
            "needs an aligned position (were these sections left out of `asign.pp.align_layers`? A section without an "
            "image cannot be aligned from images: leave it out of the stack, or align it with landmarks or transforms)."
        )
        raise ValueError(msg)
    pred, k_used = idw_nearest(
        coords,
        ctx.Y,
        ctx.known,
        k=k,
        weights=str(prm["weights"]),
        p=p,
        eps=eps,
    )
    return ImputeResult(imputed=pred, uns={"k_used": int(k_used), "coordinates": key})


@register_method("propagation")
@gene_rank_option
def propagation_baseline(ctx: ImputeContext) -> ImputeResult:
    """Label propagation (cross-layer imputation, method.md §5.3) on the stored 3D graph.

    Known spots are clamped, unknown spots start at the known mean, ``Y <- D^{-1} W Y`` for ``n_iter`` steps.

    Parameters (``method_kwargs``): ``graph_key`` (``"asign"``: reads ``obsp['asign_connectivities']`` written by
    :func:`asign.pp.neighbors_3d`), ``n_iter`` (10; an integer >= 1, as 0 steps would leave every unknown spot at
    the known mean, the ``"mean"`` baseline), ``gene_rank`` (`None`). The result's ``uns`` records
    ``connectivities_key``, ``n_edges`` and ``n_unreached``: spots with no graph path to any known spot, which keep
    the known mean (a warning names their sections). A graph built on an earlier alignment than the table's current
    one is refused (:func:`asign.pp._graph.check_graph_alignment`).
    """
    from asign._propagation import label_propagation
    from asign.pp._graph import check_graph_alignment

    prm = _params(ctx, "propagation", {"graph_key": Key.ADDED, "n_iter": 10})
    n_iter = check_method_option("propagation", "n_iter", prm["n_iter"], integer=True, minimum=1)
    ckey = Key.connectivities(str(prm["graph_key"]))
    if ckey not in ctx.table.obsp:
        msg = f"`obsp['{ckey}']` not found in table {ctx.table_key!r}; run `asign.pp.neighbors_3d` first."
        raise KeyError(msg)
    check_graph_alignment(ctx.table, str(prm["graph_key"]), table_key=ctx.table_key)
    W = ctx.table.obsp[ckey]
    unreached = _unreached(W, ctx.known)
    if unreached.any():
        secs = ctx.sections_of(unreached)
        logger.warning(
            f"{int(unreached.sum())} spots of section(s) {secs} have no path to any known spot in `.obsp['{ckey}']` "
            "(no edges across sections to them?): propagation leaves them at the known mean."
        )
    pred = label_propagation(W, ctx.Y, ctx.known, n_iter=n_iter)
    uns = {"connectivities_key": ckey, "n_edges": int(W.nnz), "n_unreached": int(unreached.sum())}
    return ImputeResult(imputed=pred, uns=uns)


def _unreached(W, known: np.ndarray) -> np.ndarray:
    """Spots in connected components of the graph ``W`` without any known spot."""
    from scipy.sparse.csgraph import connected_components

    _, comp = connected_components(W, directed=False)
    has_known = np.zeros(comp.max() + 1, dtype=bool)
    has_known[comp[np.asarray(known, dtype=bool)]] = True
    return ~has_known[comp]
