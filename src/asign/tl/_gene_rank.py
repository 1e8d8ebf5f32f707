"""Low-rank gene projection of a prediction: the principal axes of the labelled spots' expression (method.md §6).

A prediction of 250 genes made spot by spot carries noise that differs from gene to gene: a weakly expressed gene's
output, learned from a few hundred noisy counts, is less reliable than its correlation with the strong programmes
(immune, stromal, tumour) suggests. Projecting every spot's predicted vector onto the first ``rank`` principal axes
of the *labelled* spots' normalised expression keeps the gene programmes that the labels show and drops the rest,
so each gene borrows strength from the genes it co-varies with. The axes come from the known spots of the sample
being imputed (not from training samples, whose gene programmes may differ), never from the spots to impute.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from asign._logging import logger

if TYPE_CHECKING:
    from ._registry import ImputeContext, ImputeResult


@dataclass(frozen=True)
class GeneBasis:
    """Mean and orthonormal principal axes ``(rank, n_genes)`` of labelled expression, and the variance they hold."""

    mean: np.ndarray
    axes: np.ndarray
    explained_variance_ratio: float
    n_labelled: int

    @property
    def rank(self) -> int:
        return int(self.axes.shape[0])

    def project(self, pred: np.ndarray) -> np.ndarray:
        """``mean + (pred - mean) A^T A``: every row of ``pred`` ``(n, n_genes)`` on the span of the axes."""
        centred = np.asarray(pred, dtype=np.float64) - self.mean
        return (self.mean + (centred @ self.axes.T) @ self.axes).astype(np.asarray(pred).dtype, copy=False)


def check_gene_rank(rank: object) -> int | None:
    """``None`` or a positive integer, else a ValueError that says what was passed."""
    if rank is None:
        return None
    if isinstance(rank, bool) or not isinstance(rank, int | np.integer) or rank < 1:
        msg = f"gene_rank={rank!r} must be None (no projection) or a positive integer."
        raise ValueError(msg)
    return int(rank)


def gene_basis(labelled: np.ndarray, rank: int) -> GeneBasis | None:
    """The first ``rank`` principal axes of ``labelled`` ``(n_spots, n_genes)`` normalised expression.

    Returns `None` (no projection, with a warning) when the labels cannot support ``rank`` axes: fewer than
    ``rank + 1`` labelled spots. A ``rank`` of at least the number of genes is the identity, also `None`.
    """
    Y = np.asarray(labelled, dtype=np.float64)
    if Y.ndim != 2 or not np.all(np.isfinite(Y)):
        msg = f"The labelled expression must be a finite (spots, genes) matrix; got shape {Y.shape}."
        raise ValueError(msg)
    n, g = Y.shape
    if rank >= g:
        return None
    if n <= rank:
        logger.warning(
            f"gene_rank={rank} needs more than {rank} labelled spots; there are {n}. The prediction is not projected."
        )
        return None
    mean = Y.mean(axis=0)
    _, s, vt = np.linalg.svd(Y - mean, full_matrices=False)
    var = s**2
    total = float(var.sum())
    ratio = float(var[:rank].sum() / total) if total > 0 else 1.0
    # a deterministic sign per axis (largest loading positive), so that saved axes compare across runs
    signs = np.sign(vt[:rank][np.arange(rank), np.abs(vt[:rank]).argmax(axis=1)])
    signs[signs == 0] = 1.0
    return GeneBasis(mean=mean, axes=vt[:rank] * signs[:, None], explained_variance_ratio=ratio, n_labelled=n)


def known_rows(ctx: ImputeContext) -> np.ndarray:
    """Normalised expression of the known spots of the sample being imputed: the rows the gene axes come from.

    Training samples' spots are left out on purpose: in the inductive HER2ST patient folds, axes fitted to six other
    patients' expression lowered the per-gene PCC on all eight test patients (docs/benchmarks/asign.md); the test
    sample's own known section describes its gene programmes.
    """
    return ctx.Y[ctx.known]


def project_result(ctx: ImputeContext, res: ImputeResult, rank: int | None) -> ImputeResult:
    """``res`` with ``imputed`` projected on ``rank`` gene axes of :func:`known_rows` (in place, and returned).

    The prediction before the projection goes to the extra layer ``'full_rank'``; ``res.uns['gene_rank']`` records
    the rank used (0: no projection) and the share of the labels' variance the axes hold.
    """
    basis = gene_basis(known_rows(ctx), rank) if rank else None
    if basis is not None:
        res.extra_layers["full_rank"] = res.imputed
        res.imputed = basis.project(res.imputed)
        logger.info(
            f"Projected the prediction on {basis.rank} principal gene axes of {basis.n_labelled} labelled spots "
            f"({basis.explained_variance_ratio:.0%} of their variance)."
        )
    res.uns["gene_rank"] = {
        "rank": 0 if basis is None else basis.rank,
        "explained_variance_ratio": float("nan") if basis is None else basis.explained_variance_ratio,
    }
    return res


def gene_rank_option(fn: Callable[[ImputeContext], ImputeResult]) -> Callable[[ImputeContext], ImputeResult]:
    """Give a registered method the ``gene_rank`` keyword (default `None`).

    The method runs without the keyword; its prediction is then projected with :func:`project_result`.
    """

    @functools.wraps(fn)
    def wrapped(ctx: ImputeContext) -> ImputeResult:
        if "gene_rank" not in ctx.params:
            return fn(ctx)
        params = dict(ctx.params)
        rank = check_gene_rank(params.pop("gene_rank"))
        return project_result(ctx, fn(dataclasses.replace(ctx, params=params)), rank)

    return wrapped


def without_gene_rank(params: dict) -> dict:
    """A method's keyword arguments without ``gene_rank``.

    For the ``fit`` of a method wrapped by :func:`gene_rank_option`, which sees the same ``method_kwargs``.
    """
    return {k: v for k, v in params.items() if k != "gene_rank"}
