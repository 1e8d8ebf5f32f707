"""Label propagation on a weighted spot graph (NumPy/SciPy), method.md §5.3 (cross-layer imputation).

This is the reference implementation used by the ``"propagation"`` baseline; the model's torch version must agree
with it.
"""

from __future__ import annotations

import numpy as np
import scipy.sparse as sp


def row_normalize(W: sp.spmatrix | np.ndarray) -> sp.csr_matrix:
    """``P = D^{-1} W`` as CSR; a row with zero degree gets ``P_ii = 1`` so an isolated node keeps its value.

    Parameters
    ----------
    W
        Square, non-negative weighted adjacency (self-edges are kept as given).

    Returns
    -------
    The row-stochastic transition matrix (float64).
    """
    W = sp.csr_matrix(W, dtype=np.float64)
    n = W.shape[0]
    if W.shape != (n, n):
        msg = f"The adjacency must be square, got shape {W.shape}."
        raise ValueError(msg)
    if W.nnz and (not np.all(np.isfinite(W.data)) or W.data.min() < 0):
        msg = "The adjacency must have finite, non-negative weights."
        raise ValueError(msg)
    deg = np.asarray(W.sum(axis=1)).ravel()
    isolated = deg <= 0
    inv = np.divide(1.0, deg, out=np.zeros_like(deg), where=~isolated)
    P = sp.diags(inv) @ W
    if isolated.any():
        idx = np.flatnonzero(isolated)
        P = P + sp.csr_matrix((np.ones(len(idx)), (idx, idx)), shape=(n, n))
    P = sp.csr_matrix(P)
    P.eliminate_zeros()
    return P


def propagate(
    W: sp.spmatrix | np.ndarray,
    Y0: np.ndarray,
    clamp_mask: np.ndarray,
    n_iter: int = 10,
) -> np.ndarray:
    """Iterate ``Y <- P Y`` with the clamped rows reset to ``Y0`` after every step.

    Parameters
    ----------
    W
        ``(n, n)`` non-negative weighted adjacency (scipy sparse or dense); it is row-normalised here.
    Y0
        ``(n, G)`` initial values: the labels on clamped rows, the initial guess elsewhere. Must be finite.
    clamp_mask
        Boolean ``(n,)``: rows kept at their ``Y0`` value (the visible / known spots).
    n_iter
        Number of iterations ``T`` (method.md: 10).

    Returns
    -------
    ``Y^{(T)}`` as a float64 ``(n, G)`` array. Vectorised over the ``G`` columns.
    """
    Y0 = np.asarray(Y0, dtype=np.float64)
    squeeze = Y0.ndim == 1
    if squeeze:
        Y0 = Y0[:, None]
    clamp = np.asarray(clamp_mask, dtype=bool)
    if Y0.shape[0] != W.shape[0] or clamp.shape != (W.shape[0],):
        msg = f"Shapes disagree: W {W.shape}, Y0 {Y0.shape}, clamp_mask {clamp.shape}."
        raise ValueError(msg)
    if not np.all(np.isfinite(Y0)):
        msg = "Y0 must be finite (initialise unknown rows, e.g. with the known mean, before propagating)."
        raise ValueError(msg)
    if n_iter < 0:
        msg = f"n_iter must be >= 0, got {n_iter}."
        raise ValueError(msg)
    P = row_normalize(W)
    Y = Y0.copy()
    fixed = Y0[clamp]
    for _ in range(int(n_iter)):
        Y = np.asarray(P @ Y)
        Y[clamp] = fixed
    return Y[:, 0] if squeeze else Y


def label_propagation(
    W: sp.spmatrix | np.ndarray,
    Y: np.ndarray,
    known: np.ndarray,
    n_iter: int = 10,
) -> np.ndarray:
    """Cross-layer imputation: clamp the known rows of ``Y``, initialise the others with the known mean, propagate.

    Parameters
    ----------
    W
        ``(n, n)`` weighted adjacency.
    Y
        ``(n, G)`` labels; only the ``known`` rows are read (others may be NaN).
    known
        Boolean ``(n,)`` mask of the visible spots.
    n_iter
        Number of iterations.

    Returns
    -------
    The propagated ``(n, G)`` values; known rows equal their labels.
    """
    known = np.asarray(known, dtype=bool)
    if not known.any():
        msg = "Label propagation needs at least one known spot."
        raise ValueError(msg)
    Y = np.asarray(Y, dtype=np.float64)
    mean = Y[known].mean(axis=0)
    Y0 = np.where(known[:, None], Y, mean[None, :])
    return propagate(W, Y0, known, n_iter=n_iter)
