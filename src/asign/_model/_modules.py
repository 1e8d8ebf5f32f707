"""Building blocks of the ASIGN network (``method.md`` §5.1–5.2): MLP, multi-token cross-attention, GNNT block, heads."""

from __future__ import annotations

import warnings

import torch
from torch import nn

Tensor = torch.Tensor


class InputDropout(nn.Module):
    """Inverted dropout of the input features.

    The mask comes from :func:`torch.rand_like`, 2-3x faster on the CPU than :class:`torch.nn.Dropout`'s Bernoulli
    sampler on wide frozen-feature inputs, with the same distribution.
    """

    def __init__(self, p: float = 0.0) -> None:
        super().__init__()
        if not 0.0 <= p < 1.0:
            msg = f"Input dropout must be in [0, 1), got {p}."
            raise ValueError(msg)
        self.p = float(p)

    def forward(self, x: Tensor) -> Tensor:
        if not self.training or self.p == 0.0:
            return x
        keep = torch.rand_like(x) >= self.p
        return x * keep * (1.0 / (1.0 - self.p))

    def extra_repr(self) -> str:
        return f"p={self.p}"


class MLP(nn.Module):
    """Two-layer projection ``F -> d -> d`` (GELU, dropout) with an optional input dropout."""

    def __init__(self, in_dim: int, out_dim: int, *, dropout: float = 0.1, input_dropout: float = 0.0) -> None:
        super().__init__()
        self.net = nn.Sequential(
            InputDropout(input_dropout),
            nn.Linear(in_dim, out_dim),
            nn.GELU(),
            nn.Dropout(dropout),
            nn.Linear(out_dim, out_dim),
        )

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x)


class CrossAttention(nn.Module):
    """``LN(q + MHA(q; [tokens]))`` followed by a residual feed-forward sub-layer.

    The query is one vector per node; keys/values are a list of **at least two** tokens per node, each with a learned
    type embedding, so the attention weights depend on the query and the node's own token keeps a residual path
    (``method.md`` §8 defect 3: one key token makes attention a constant).
    """

    def __init__(
        self, dim: int, n_tokens: int, *, heads: int = 8, dropout: float = 0.1, feedforward: bool = True
    ) -> None:
        super().__init__()
        if n_tokens < 2:
            msg = f"Cross-attention needs at least two key tokens, got {n_tokens} (a softmax over one token is 1)."
            raise ValueError(msg)
        self.n_tokens = n_tokens
        self.type_embedding = nn.Parameter(torch.zeros(n_tokens, dim))
        nn.init.normal_(self.type_embedding, std=0.02)
        self.attn = nn.MultiheadAttention(dim, heads, dropout=dropout, batch_first=True)
        self.norm = nn.LayerNorm(dim)
        self.ff = (
            nn.Sequential(nn.Linear(dim, 4 * dim), nn.GELU(), nn.Dropout(dropout), nn.Linear(4 * dim, dim))
            if feedforward
            else None
        )
        self.ff_norm = nn.LayerNorm(dim) if feedforward else None
        self.last_weights: Tensor | None = None

    def forward(self, query: Tensor, tokens: list[Tensor], *, keep_weights: bool = False) -> Tensor:
        if len(tokens) != self.n_tokens:
            msg = f"CrossAttention expects {self.n_tokens} tokens, got {len(tokens)}."
            raise ValueError(msg)
        kv = torch.stack(tokens, dim=1) + self.type_embedding.unsqueeze(0)  # (N, k, d), node-major
        out, w = self.attn(query.unsqueeze(1), kv, kv, need_weights=keep_weights)
        self.last_weights = w.detach() if keep_weights and w is not None else None
        x = self.norm(query + out.squeeze(1))
        if self.ff is not None:
            x = self.ff_norm(x + self.ff(x))
        return x


class GNNT(nn.Module):
    """Graph block of ``method.md`` §5.2.

    ``H^l = H^{l-1} + ELU(GATv2_l(H^{l-1}; A, e))`` for stacked layers (self-loops, edge features
    ``e_ij = [w_ij, cross_ij]``); each node's layer outputs form a length-L token sequence (built node-major with
    :func:`torch.stack`), refined by an L-layer transformer encoder with learned layer embeddings; the refined tokens
    are combined with ``softmax(b)`` weights (``b`` initialised to 0).
    """

    def __init__(
        self, dim: int, *, n_layers: int = 3, gat_heads: int = 4, attn_heads: int = 8, dropout: float = 0.1
    ) -> None:
        super().__init__()
        with warnings.catch_warnings():
            # torch-geometric's own import-time notice about torch.jit.script: nothing a user can act on, and in
            # the ensemble's worker processes it would reach the notebook once per worker
            warnings.filterwarnings("ignore", message=".*torch.jit.script.*", category=FutureWarning)
            from torch_geometric.nn import GATv2Conv

        self.n_layers = n_layers
        self.gats = nn.ModuleList(
            GATv2Conv(
                dim,
                dim // gat_heads,
                heads=gat_heads,
                concat=True,
                dropout=dropout,
                add_self_loops=True,
                edge_dim=2,
                fill_value="mean",
            )
            for _ in range(n_layers)
        )
        self.gat_norms = nn.ModuleList(nn.LayerNorm(dim) for _ in range(n_layers))
        self.layer_embedding = nn.Parameter(torch.zeros(n_layers, dim))
        nn.init.normal_(self.layer_embedding, std=0.02)
        layer = nn.TransformerEncoderLayer(
            dim, attn_heads, dim_feedforward=4 * dim, dropout=dropout, batch_first=True, norm_first=True
        )
        self.transformer = nn.TransformerEncoder(layer, num_layers=n_layers, enable_nested_tensor=False)
        self.out_norm = nn.LayerNorm(dim)
        self.layer_logits = nn.Parameter(torch.zeros(n_layers))

    def forward(self, x: Tensor, edge_index: Tensor, edge_attr: Tensor) -> Tensor:
        h = x
        outs = []
        for gat, norm in zip(self.gats, self.gat_norms, strict=True):
            h = h + nn.functional.elu(gat(norm(h), edge_index, edge_attr))
            outs.append(h)
        seq = torch.stack(outs, dim=1) + self.layer_embedding.unsqueeze(0)  # (N, L, d), node-major
        seq = self.out_norm(self.transformer(seq))
        beta = torch.softmax(self.layer_logits, dim=0)
        return torch.einsum("l,nld->nd", beta.to(seq.dtype), seq)


class Head(nn.Module):
    """``LayerNorm -> Linear(d, G)``: one per level."""

    def __init__(self, dim: int, n_genes: int) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(dim)
        self.linear = nn.Linear(dim, n_genes)

    def forward(self, z: Tensor) -> Tensor:
        return self.linear(self.norm(z))


def edge_attributes(edge_weight: Tensor, edge_cross: Tensor) -> Tensor:
    """``e_ij = [w_ij, 1{s(i) != s(j)}]`` as an ``(E, 2)`` tensor."""
    return torch.stack([edge_weight, edge_cross], dim=1)


def neighbour_mean(x: Tensor, edge_index: Tensor, edge_weight: Tensor) -> Tensor:
    """Weighted mean of each node's in-neighbours (the node's own value where it has none)."""
    src, dst = edge_index
    n = x.shape[0]
    w = edge_weight.to(x.dtype)
    deg = torch.zeros(n, dtype=x.dtype, device=x.device).index_add_(0, dst, w)
    agg = torch.zeros_like(x).index_add_(0, dst, w.unsqueeze(1) * x[src])
    has = deg > 0
    return torch.where(has.unsqueeze(1), agg / deg.clamp_min(1e-12).unsqueeze(1), x)
