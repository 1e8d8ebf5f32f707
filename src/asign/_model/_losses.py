"""Losses of ``method.md`` §5.5: spot MSE + (1 - PCC), region/global terms and cross-resolution consistency."""

from __future__ import annotations

import torch

Tensor = torch.Tensor
EPS = 1e-8


def pcc_rows(pred: Tensor, target: Tensor) -> Tensor:
    """Pearson correlation of each row of ``pred`` with the same row of ``target`` (``eps = 1e-8``)."""
    p = pred - pred.mean(dim=1, keepdim=True)
    t = target - target.mean(dim=1, keepdim=True)
    num = (p * t).sum(dim=1)
    den = torch.sqrt((p * p).sum(dim=1) * (t * t).sum(dim=1) + EPS)
    return num / den


def mean_pcc(pred: Tensor, target: Tensor, *, axis: str = "spot", groups: Tensor | None = None) -> Tensor:
    """Mean Pearson correlation of ``pred`` and ``target``.

    ``axis="spot"``: across genes within each spot; ``axis="gene"``: each gene across the spots of each group
    (sections with at least 2 spots; genes that are constant in a group are skipped).
    """
    if pred.shape[0] == 0:
        return pred.new_zeros(())
    if axis == "spot":
        return pcc_rows(pred, target).mean()
    if axis != "gene":
        msg = f"pcc axis must be 'spot' or 'gene', got {axis!r}."
        raise ValueError(msg)
    if groups is None:
        groups = torch.zeros(pred.shape[0], dtype=torch.long, device=pred.device)
    vals = []
    for g in torch.unique(groups):
        m = groups == g
        if int(m.sum()) < 2:
            continue
        p, t = pred[m].T, target[m].T  # (G, n)
        ok = t.std(dim=1) > 1e-6
        if bool(ok.any()):
            vals.append(pcc_rows(p[ok], t[ok]))
    if not vals:
        return pred.new_zeros(())
    return torch.cat(vals).mean()


def spot_loss(pred: Tensor, target: Tensor, *, w_mse: float, w_pcc: float, axis: str, groups: Tensor | None) -> Tensor:
    """``w_mse * MSE + w_pcc * (1 - mean PCC)`` on the loss set."""
    if pred.shape[0] == 0:
        return pred.new_zeros(())
    return w_mse * torch.mean((pred - target) ** 2) + w_pcc * (1.0 - mean_pcc(pred, target, axis=axis, groups=groups))


def asign_loss(
    out: dict[str, Tensor],
    y_target: Tensor,
    loss_rows: Tensor,
    *,
    weights: list[float],
    pcc_axis: str = "spot",
    section: Tensor | None = None,
    y_region: Tensor | None = None,
    y_global: Tensor | None = None,
    spot_region: Tensor | None = None,
    spot_global: Tensor | None = None,
    net_weight: float = 0.0,
) -> tuple[Tensor, dict[str, float]]:
    """The total loss ``gamma_1 L_spot + lambda_1 L_res + lambda_2 L_cons`` and its parts.

    Parameters
    ----------
    out
        The model's outputs (``"pred"``, and ``"region"``/``"global"`` for the three-level model).
    y_target
        ``(N, G)`` labels, read only on ``loss_rows`` (hidden labelled spots); a separate tensor from the model's input.
    loss_rows
        ``(N,)`` bool loss set.
    weights
        ``(w_mse, w_pcc, lambda_1, lambda_2)``.
    pcc_axis
        ``"spot"`` or ``"gene"`` (genes correlated across the loss-set spots of each section).
    section
        Section index of every spot (groups of ``pcc_axis="gene"``).
    y_region, y_global
        Tile targets (NaN for tiles without labels: those never enter the loss); correlated like the spots
        (``pcc_axis``; a tile's section is that of its member spots).
    spot_region, spot_global
        Index maps (tile sections and the consistency term).
    net_weight
        Weight of the same spot loss on the network's own prediction ``out["net"]``.
    """
    w_mse, w_pcc, lam1, lam2 = weights
    rows = torch.nonzero(loss_rows, as_tuple=False).squeeze(1)
    pred = out["pred"].float()
    groups = section[rows] if section is not None else None
    tgt = y_target[rows]
    l_spot = spot_loss(pred[rows], tgt, w_mse=w_mse, w_pcc=w_pcc, axis=pcc_axis, groups=groups)
    total = l_spot
    parts = {"spot": float(l_spot.detach())}
    if net_weight > 0 and "net" in out:
        l_net = spot_loss(out["net"].float()[rows], tgt, w_mse=w_mse, w_pcc=w_pcc, axis=pcc_axis, groups=groups)
        total = total + net_weight * l_net
        parts["net"] = float(l_net.detach())
    if "region" in out and y_region is not None and y_global is not None:
        l_res = pred.new_zeros(())
        for key, yt, idx in (("region", y_region, spot_region), ("global", y_global, spot_global)):
            ok = torch.isfinite(yt).all(dim=1)
            if int(ok.sum()) >= 2:
                tile_groups = None
                if section is not None:
                    tile_groups = torch.zeros(yt.shape[0], dtype=section.dtype, device=section.device)
                    tile_groups = tile_groups.scatter(0, idx, section)[ok]
                l_res = l_res + (1.0 - mean_pcc(out[key].float()[ok], yt[ok], axis=pcc_axis, groups=tile_groups))
        l_cons = pred.new_zeros(())
        if rows.numel():
            for key, idx in (("region", spot_region), ("global", spot_global)):
                l_cons = l_cons + (1.0 - mean_pcc(out[key].float()[idx[rows]], tgt, axis=pcc_axis, groups=groups))
        total = total + lam1 * l_res + lam2 * l_cons
        parts["res"] = float(l_res.detach())
        parts["cons"] = float(l_cons.detach())
    parts["total"] = float(total.detach())
    return total, parts
