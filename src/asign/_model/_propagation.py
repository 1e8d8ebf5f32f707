"""Cross-layer imputation by label propagation (``method.md`` §5.3), in torch."""

from __future__ import annotations

import torch
from torch import nn

Tensor = torch.Tensor


def transition_matrix(edge_index: Tensor, edge_weight: Tensor, n: int) -> tuple[Tensor, Tensor]:
    """Row-normalised ``P = D^{-1} W`` as a coalesced sparse COO tensor (row = target node) and the degree-0 mask."""
    src, dst = edge_index
    w = edge_weight.detach().to(torch.float32)
    deg = torch.zeros(n, dtype=w.dtype, device=w.device).index_add_(0, dst, w)
    p = w / deg.clamp_min(1e-12)[dst]
    mat = torch.sparse_coo_tensor(torch.stack([dst, src]), p, (n, n), check_invariants=True).coalesce()
    return mat, deg <= 0


def propagate_step(y: Tensor, mat: Tensor, isolated: Tensor) -> Tensor:
    """One step ``Y <- P Y``; rows of degree 0 keep their value (``P_ii = 1``), so they never become NaN."""
    return torch.where(isolated.unsqueeze(1), y, torch.sparse.mm(mat, y))


def label_propagation(
    y_visible: Tensor,
    edge_index: Tensor,
    edge_weight: Tensor,
    *,
    n_iter: int = 10,
    init: Tensor | None = None,
    leave_one_out: bool = True,
) -> Tensor:
    """Propagate visible labels over the weighted graph with the visible rows clamped.

    Parameters
    ----------
    y_visible
        ``(N, G)``; rows with any NaN are not visible. Hidden rows are never read.
    edge_index, edge_weight
        The whole-sample weighted adjacency (no self-loops).
    n_iter
        Iterations ``T``.
    init
        ``(N, G)`` initial values of the non-visible rows (e.g. the detached network prediction); default: the mean of
        the visible rows (never 0, which lies far outside the ln-proportion range).
    leave_one_out
        If `True`, the returned value of a *visible* row is one more propagation step from its neighbours (its own
        label excluded), so the output never copies a visible label; visible rows without neighbours get the visible
        mean. If `False`, visible rows return their clamped labels.

    Returns
    -------
    ``(N, G)`` propagated values (float32).
    """
    with torch.autocast(device_type=y_visible.device.type, enabled=False):
        return _label_propagation(y_visible, edge_index, edge_weight, n_iter, init, leave_one_out=leave_one_out)


def _label_propagation(
    y_visible: Tensor, edge_index: Tensor, edge_weight: Tensor, n_iter: int, init: Tensor | None, *, leave_one_out: bool
) -> Tensor:
    n = y_visible.shape[0]
    y_visible = y_visible.to(torch.float32)
    visible = torch.isfinite(y_visible).all(dim=1)
    y_clamp = torch.where(visible.unsqueeze(1), y_visible, torch.zeros_like(y_visible))
    if bool(visible.any()):
        mean = y_clamp[visible].mean(dim=0, keepdim=True)
    else:
        mean = torch.zeros((1, y_visible.shape[1]), dtype=y_visible.dtype, device=y_visible.device)
    start = mean.expand_as(y_visible) if init is None else init.detach().to(torch.float32)
    y = torch.where(visible.unsqueeze(1), y_clamp, start)
    mat, isolated = transition_matrix(edge_index, edge_weight, n)
    for _ in range(n_iter):
        y = propagate_step(y, mat, isolated)
        y = torch.where(visible.unsqueeze(1), y_clamp, y)
    if leave_one_out and bool(visible.any()):
        loo = propagate_step(y, mat, isolated)
        loo = torch.where(isolated.unsqueeze(1), mean.expand_as(y), loo)
        y = torch.where(visible.unsqueeze(1), loo, y)
    return y


class IdentityLinear(nn.Linear):
    """``Linear(G, G)`` initialised to the identity (the "Linear" after propagation in the paper's Fig. 2)."""

    def __init__(self, n: int) -> None:
        super().__init__(n, n)
        with torch.no_grad():
            self.weight.copy_(torch.eye(n))
            self.bias.zero_()
