"""The ASIGN network (``method.md`` §5): three branches, graph blocks, label propagation and per-gene mixing."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from ._config import ASIGNConfig
from ._data import SampleTensors
from ._modules import GNNT, MLP, CrossAttention, Head, edge_attributes, neighbour_mean
from ._propagation import IdentityLinear, label_propagation, propagate_step, transition_matrix

Tensor = torch.Tensor
LEVELS = ("spot", "region", "global")
# label input (config.label_input): G standardised propagated labels + reach
N_LABEL_DESCRIPTORS = 1


class ASIGNModel(nn.Module):
    """Anatomy-aware spatial imputation graph network.

    Global branch: ``Z^G = GNNT_G(MLP_G(phi^G), A^G)``; region branch: ``x^R = CA_R(t^R; [t^R, z^G_{q(r)}])``,
    ``Z^R = GNNT_R(x^R, A^R)``; spot branch: ``x_i = CA_S(h_i; [h_i, z^R_{r(i)}, z^G_{q(i)}])``,
    ``Z = GNNT_S(x, W)``; one ``LayerNorm -> Linear`` head per level. The spot prediction is mixed per gene with
    cross-layer label propagation: ``y = sigmoid(alpha) * Y^LP + (1 - sigmoid(alpha)) * Y^net``.

    Parameters
    ----------
    n_genes
        Number of modelled genes ``G``.
    feature_dims
        Input feature width per level, e.g. ``{"spot": 1280, "region": 1280, "global": 1280}``.
    config
        Model options (:class:`~asign._model.ASIGNConfig`).
    """

    def __init__(self, n_genes: int, feature_dims: dict[str, int], config: ASIGNConfig | None = None) -> None:
        super().__init__()
        cfg = config or ASIGNConfig()
        self.config = cfg
        self.n_genes = int(n_genes)
        self.feature_dims = {k: int(v) for k, v in feature_dims.items()}
        self.three_levels = cfg.levels == "spot_region_global"
        levels = LEVELS if self.three_levels else ("spot",)
        for lvl in levels:
            if lvl not in self.feature_dims:
                msg = f"feature_dims has no {lvl!r} entry (levels={cfg.levels!r})."
                raise ValueError(msg)
        d = cfg.hidden_dim
        kw = {
            "n_layers": cfg.gnn_layers,
            "gat_heads": cfg.gat_heads,
            "attn_heads": cfg.attn_heads,
            "dropout": cfg.dropout,
        }
        in_dims = dict(self.feature_dims)
        if cfg.label_input:
            in_dims["spot"] = in_dims["spot"] + self.n_label_inputs
        self.mlp = nn.ModuleDict(
            {lvl: MLP(in_dims[lvl], d, dropout=cfg.dropout, input_dropout=cfg.input_dropout) for lvl in levels}
        )
        self.gnnt = nn.ModuleDict({lvl: GNNT(d, **kw) for lvl in levels})
        self.head = nn.ModuleDict({lvl: Head(d, self.n_genes) for lvl in levels})
        if self.three_levels:
            self.ca_region = CrossAttention(d, 2, heads=cfg.attn_heads, dropout=cfg.dropout, feedforward=False)
            self.ca_spot = CrossAttention(d, 3, heads=cfg.attn_heads, dropout=cfg.dropout, feedforward=True)
        else:
            # spot-only: the spot token and its graph-neighbour mean (two tokens, so attention still depends on the query)
            self.ca_spot = CrossAttention(d, 2, heads=cfg.attn_heads, dropout=cfg.dropout, feedforward=True)
        if cfg.use_propagation:
            self.alpha = nn.Parameter(torch.full((self.n_genes,), float(cfg.alpha_init)))
            self.lp_linear = IdentityLinear(self.n_genes) if cfg.lp_linear else None
        for lvl in levels:
            self.register_buffer(f"feat_mean_{lvl}", torch.zeros(self.feature_dims[lvl]))
            self.register_buffer(f"feat_std_{lvl}", torch.ones(self.feature_dims[lvl]))

    # ------------------------------------------------------------------ set-up
    def set_feature_stats(self, level: str, mean: Tensor, std: Tensor) -> None:
        """Store the feature standardisation of ``level`` (fitted once on training data, shared by all sections)."""
        getattr(self, f"feat_mean_{level}").copy_(torch.as_tensor(mean, dtype=torch.float32))
        getattr(self, f"feat_std_{level}").copy_(torch.as_tensor(std, dtype=torch.float32).clamp_min(1e-6))

    def init_head_bias(self, mean: Tensor) -> None:
        """Set every head's bias (absolute predictions, ``net_baseline="none"``) to the training mean."""
        with torch.no_grad():
            for head in self.head.values():
                head.linear.bias.copy_(torch.as_tensor(mean, dtype=torch.float32))

    def n_parameters(self) -> int:
        """Number of trainable parameters of the instantiated model."""
        return int(sum(p.numel() for p in self.parameters() if p.requires_grad))

    def _features(self, level: str, x: Tensor) -> Tensor:
        return (x - getattr(self, f"feat_mean_{level}")) / getattr(self, f"feat_std_{level}")

    @property
    def n_label_inputs(self) -> int:
        """Width of the label input (``config.label_input``): ``G`` propagated labels and the reach."""
        return self.n_genes + N_LABEL_DESCRIPTORS

    @torch.no_grad()
    def label_features(self, sample: SampleTensors, y_visible: Tensor | None) -> Tensor:
        """The spot branch's label input, computed from the visible labels ``y_visible`` only (NaN rows are hidden).

        Columns: the leave-one-out label propagation of the visible labels (``config.lp_iterations`` steps on the
        whole-sample graph; a visible spot gets one more step from its neighbours, never its own label), minus the
        visible mean and divided by the visible sd per gene; the propagated visible mass ("reach": 1 on visible
        spots, about ``0.5 ** hops`` away from them, 0 where no visible label arrives; a visible spot's own value is
        one step from its neighbours). Hidden rows of ``y_visible`` are never read, and ``sample.y`` is not read at all.
        (No section-distance or degree descriptors: in transductive training the section distance is constant, so
        its weights stay untrained and shift the unknown sections' predictions; log-degree inputs destabilised early
        training on the synthetic stack.)
        """
        n, g = sample.n_spots, self.n_genes
        dev = sample.x_spot.device
        if y_visible is None:
            y_visible = torch.full((n, g), float("nan"), device=dev)
        with torch.autocast(device_type=dev.type, enabled=False):
            y = y_visible.to(torch.float32)
            visible = torch.isfinite(y).all(dim=1)
            ei, ew = sample.edge_index, sample.edge_weight.to(torch.float32)
            t = self.config.lp_iterations
            if bool(visible.any()):
                yv = y[visible]
                mu = yv.mean(dim=0, keepdim=True)
                sd = yv.std(dim=0, unbiased=False, keepdim=True).clamp_min(1e-2) if yv.shape[0] > 1 else None
                lp = label_propagation(y, ei, ew, n_iter=t, leave_one_out=True) - mu
                lp = lp / sd if sd is not None else lp
                # damped propagation of the visible indicator: about 0.5 ** (hops to the nearest visible spot)
                mat, isolated = transition_matrix(ei, ew, n)
                ind = visible.to(torch.float32).unsqueeze(1)
                reach = torch.zeros((n, 1), device=dev)
                for _ in range(max(t, 1)):
                    reach = torch.maximum(ind, 0.5 * propagate_step(reach, mat, isolated))
                reach = torch.where(visible.unsqueeze(1), 0.5 * propagate_step(reach, mat, isolated), reach)
            else:
                lp = torch.zeros((n, g), device=dev)
                reach = torch.zeros((n, 1), device=dev)
            return torch.cat([lp, reach], dim=1)

    # ------------------------------------------------------------------ forward
    def forward(
        self, sample: SampleTensors, y_visible: Tensor | None = None, *, keep_attention: bool = False
    ) -> dict[str, Tensor]:
        """Predict every spot of ``sample``.

        Parameters
        ----------
        sample
            The sample's tensors (graphs, features, index maps). Its ``y`` is **not** read here.
        y_visible
            ``(N, G)`` labels of the visible set, NaN elsewhere (the only label tensor the model and the propagation
            see). `None` means no visible spot.
        keep_attention
            Keep the spot cross-attention weights in ``ca_spot.last_weights``.

        Returns
        -------
        ``{"pred", "net", "lp" (with propagation), "region", "global" (three-level model)}``.
        """
        cfg = self.config
        n, g = sample.n_spots, self.n_genes
        dev = sample.x_spot.device
        if y_visible is None:
            y_visible = torch.full((n, g), float("nan"), device=dev)
        visible = torch.isfinite(y_visible).all(dim=1)
        if cfg.net_baseline == "visible_mean" and sample.visible_mean is not None:
            base = sample.visible_mean.float().view(1, g)  # a subgraph: its whole sample's mean (_sampling.py)
        elif cfg.net_baseline == "visible_mean" and bool(visible.any()):
            base = y_visible[visible].float().mean(dim=0, keepdim=True)
        else:
            base = torch.zeros((1, g), device=dev)
        e_spot = edge_attributes(sample.edge_weight, sample.edge_cross)
        out: dict[str, Tensor] = {}
        x_in = self._features("spot", sample.x_spot)
        if cfg.label_input:
            lab = sample.label_inputs if sample.label_inputs is not None else self.label_features(sample, y_visible)
            x_in = torch.cat([x_in, lab.to(x_in.dtype)], dim=1)
        h = self.mlp["spot"](x_in)
        if self.three_levels:
            if not sample.has_tiles:
                msg = f"Sample {sample.name!r} has no region/global tiles; the three-level model needs them (levels='spot' does not)."
                raise ValueError(msg)
            zero_g = torch.zeros_like(sample.global_edge_weight)
            t_g = self.mlp["global"](self._features("global", sample.x_global))
            z_g = self.gnnt["global"](t_g, sample.global_edge_index, edge_attributes(sample.global_edge_weight, zero_g))
            out["global"] = self.head["global"](z_g) + base
            t_r = self.mlp["region"](self._features("region", sample.x_region))
            x_r = self.ca_region(t_r, [t_r, z_g[sample.region_global]])
            zero_r = torch.zeros_like(sample.region_edge_weight)
            z_r = self.gnnt["region"](x_r, sample.region_edge_index, edge_attributes(sample.region_edge_weight, zero_r))
            out["region"] = self.head["region"](z_r) + base
            x = self.ca_spot(h, [h, z_r[sample.spot_region], z_g[sample.spot_global]], keep_weights=keep_attention)
        else:
            x = self.ca_spot(
                h, [h, neighbour_mean(h, sample.edge_index, sample.edge_weight)], keep_weights=keep_attention
            )
        z = self.gnnt["spot"](x, sample.edge_index, e_spot)
        net = self.head["spot"](z).float() + base
        out["net"] = net
        out.update(self.mix(net, y_visible, sample))
        return out

    def mix(self, net: Tensor, y_visible: Tensor, sample: SampleTensors) -> dict[str, Tensor]:
        """Per-gene mixing of the network output with the cross-layer label propagation of the visible labels.

        Returns ``{"lp", "pred"}`` with ``pred = sigmoid(alpha) * LP + (1 - sigmoid(alpha)) * net`` on the whole
        graph of ``sample``, or ``{"pred": net}`` without propagation (``config.use_propagation``).
        """
        cfg = self.config
        if not cfg.use_propagation:
            return {"pred": net}
        init = net.detach() if cfg.lp_init == "network" else None
        lp = label_propagation(y_visible, sample.edge_index, sample.edge_weight, n_iter=cfg.lp_iterations, init=init)
        if self.lp_linear is not None:
            lp = self.lp_linear(lp)
        a = torch.sigmoid(self.alpha).unsqueeze(0)
        return {"lp": lp, "pred": a * lp + (1.0 - a) * net}

    def describe(self) -> dict[str, Any]:
        """Plain summary: parameter count, levels, width, mixing weights."""
        d: dict[str, Any] = {
            "n_parameters": self.n_parameters(),
            "levels": self.config.levels,
            "hidden_dim": self.config.hidden_dim,
            "n_genes": self.n_genes,
        }
        if self.config.use_propagation:
            d["sigmoid_alpha_mean"] = float(torch.sigmoid(self.alpha.detach()).mean())
        for lvl, blk in self.gnnt.items():
            d[f"layer_weights_{lvl}"] = [float(v) for v in torch.softmax(blk.layer_logits.detach(), 0)]
        return d
