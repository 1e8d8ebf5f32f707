"""Neighbour-sampled subgraphs of a sample's 3D spot graph: training when the graph does not fit, batched inference.

A training step normally processes one sample's whole graph. When that does not fit the memory budget, the step is
split into mini-batches of **seed** spots (loss rows). Each batch is trained on the induced subgraph of the seeds'
``L``-hop neighbourhood, where ``L`` is the receptive field of the spot graph block (:func:`receptive_hops`), together
with the region/global tiles that its spots point to and their ``L``-hop tile-graph neighbourhoods. The subgraph is a
smaller :class:`~asign._model.SampleTensors` (spots, edges and tiles re-indexed), so the model and the cross-layer
label propagation run on it unchanged:

- the loss reads the seed rows only (and the seeds' own region/global tiles; the targets of the other tiles of the
  subgraph are NaN there);
- the propagation sees only the visible labels that lie in the subgraph;
- the heads' level (``net_baseline="visible_mean"``) and the label input (``label_input``) are those of the whole
  sample (``SampleTensors.visible_mean`` / ``label_inputs``), computed from the visible labels only.

Seeds are batched in a graph-local order (``seed_order="local"``: runs of the reverse Cuthill-McKee order of the
spot graph, from a random offset, batches in random order), so the neighbourhoods of a batch overlap: on a 20k-spot,
5-section synthetic stack (503k edges) a 512-seed batch has a 3-hop subgraph of about 2.8k-3.7k spots, against
almost the whole sample for 512 uniformly drawn seeds; a fan-out cap of 8 halves it again.

Without a fan-out cap the seeds' network outputs equal the whole-graph ones: every node within ``L - 1`` hops of a
seed keeps all its in-edges. :func:`predict_batched` uses this for exact batched inference, and runs the
(parameter-free, cheap) propagation and the per-gene mixing on the whole graph.

Only torch and ``torch_geometric.utils`` (``k_hop_subgraph``, ``subgraph``) are used; no ``NeighborLoader`` or
pyg-lib.
"""

from __future__ import annotations

import math
import os
from collections.abc import Iterator
from dataclasses import dataclass, fields
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from ._data import SampleTensors

if TYPE_CHECKING:
    from ._config import ASIGNConfig
    from ._model import ASIGNModel

Tensor = torch.Tensor
GiB = 2**30


# ------------------------------------------------------------------------------------------------ receptive field
def receptive_hops(config: ASIGNConfig) -> int:
    """Hops of the spot graph that a spot's network output depends on.

    ``L = gnn_layers`` stacked GATv2 layers; the spot-only model (``levels="spot"``) adds one hop for the
    graph-neighbour mean token of its cross-attention.
    """
    return int(config.gnn_layers) + (0 if config.levels == "spot_region_global" else 1)


def fanout_mask(edge_index: Tensor, edge_weight: Tensor, n_nodes: int, fanout: int) -> Tensor:
    """``(E,)`` bool: each target node's ``fanout`` heaviest in-edges (ties: the smaller source index).

    ``fanout <= 0`` keeps every edge.
    """
    e = int(edge_index.shape[1])
    if fanout <= 0 or e == 0:
        return torch.ones(e, dtype=torch.bool, device=edge_index.device)
    src, dst = edge_index.detach().cpu().numpy()
    w = edge_weight.detach().float().cpu().numpy()
    order = np.lexsort((src, -w, dst))
    d_sorted = dst[order]
    rank = np.arange(e) - np.searchsorted(d_sorted, d_sorted, side="left")
    keep = np.zeros(e, dtype=bool)
    keep[order[rank < fanout]] = True
    return torch.as_tensor(keep, device=edge_index.device)


# ------------------------------------------------------------------------------------------------------ subgraphs
@dataclass
class Subgraph:
    """A re-indexed subgraph of one sample.

    Attributes
    ----------
    sample
        The subgraph's tensors (spots, spot edges, tiles and tile edges re-indexed; ``y_region`` / ``y_global`` NaN
        outside the seeds' own tiles).
    nodes
        ``(n,)`` original spot index of every subgraph spot (sorted).
    seeds
        ``(b,)`` positions of the seed spots in ``sample`` (in the order of the sorted original seed indices).
    regions, globals_
        Original region / global tile index of every subgraph tile (sorted), or `None` without tiles.
    seed_regions, seed_globals
        Positions (in the subgraph's tile tables) of the tiles the seeds point to.
    """

    sample: SampleTensors
    nodes: Tensor
    seeds: Tensor
    regions: Tensor | None = None
    globals_: Tensor | None = None
    seed_regions: Tensor | None = None
    seed_globals: Tensor | None = None

    @property
    def seed_mask(self) -> Tensor:
        """``(n,)`` bool: the seed spots."""
        m = torch.zeros(self.nodes.numel(), dtype=torch.bool, device=self.nodes.device)
        m[self.seeds] = True
        return m


def _khop(seeds: Tensor, hops: int, edge_index: Tensor, n: int) -> Tensor:
    from torch_geometric.utils import k_hop_subgraph

    if hops <= 0 or edge_index.shape[1] == 0:
        return torch.unique(seeds)
    subset, _, _, _ = k_hop_subgraph(seeds, hops, edge_index, num_nodes=n, flow="source_to_target")
    return subset


def _induced(nodes: Tensor, edge_index: Tensor, n: int) -> tuple[Tensor, Tensor]:
    from torch_geometric.utils import subgraph

    ei, _, mask = subgraph(nodes, edge_index, relabel_nodes=True, num_nodes=n, return_edge_mask=True)
    return ei, mask


class NeighbourSampler:
    """Builds re-indexed ``L``-hop subgraphs of one sample around batches of seed spots.

    Parameters
    ----------
    sample
        The whole sample (on any device; subgraphs are built there).
    hops
        Spot-graph hops (:func:`receptive_hops`).
    tile_hops
        Tile-graph hops of the region/global graph blocks (``gnn_layers``).
    fanout
        Per-hop cap: a node brings in at most its ``fanout`` heaviest in-neighbours when the neighbourhood is
        expanded (0: all, exact). The subgraph is then the induced subgraph of the reached spots (all their edges
        among each other).
    """

    def __init__(self, sample: SampleTensors, *, hops: int, tile_hops: int | None = None, fanout: int = 0) -> None:
        self.sample = sample
        self.hops = int(hops)
        self.tile_hops = int(hops if tile_hops is None else tile_hops)
        self.fanout = int(fanout)
        self.n = sample.n_spots
        self._rank: Tensor | None = None
        keep = fanout_mask(sample.edge_index, sample.edge_weight, self.n, self.fanout)
        self._expand = sample.edge_index if bool(keep.all()) else sample.edge_index[:, keep]

    def rank(self) -> Tensor:
        """Position of every spot in the reverse Cuthill-McKee order of the spot graph (graph-local ordering)."""
        if self._rank is None:
            from scipy.sparse import csr_matrix
            from scipy.sparse.csgraph import reverse_cuthill_mckee

            src, dst = self.sample.edge_index.detach().cpu().numpy()
            a = csr_matrix((np.ones(src.size, dtype=np.float32), (dst, src)), shape=(self.n, self.n))
            order = np.asarray(reverse_cuthill_mckee(a, symmetric_mode=True), dtype=np.int64)
            rank = np.empty(self.n, dtype=np.int64)
            rank[order] = np.arange(self.n)
            self._rank = torch.as_tensor(rank, device=self.sample.edge_index.device)
        return self._rank

    def batches(
        self,
        rows: Tensor,
        batch_size: int,
        *,
        generator: torch.Generator | None = None,
        local: bool = True,
    ) -> list[Tensor]:
        """Seed batches of at most ``batch_size`` rows (``rows``: a bool mask or indices).

        ``local``: consecutive runs of the graph-local :meth:`rank` order, so each batch is a compact block of the
        3D graph (with ``generator``: from a random offset, in random batch order); otherwise uniformly shuffled
        by ``generator``.
        """
        idx = torch.nonzero(rows, as_tuple=False).squeeze(1) if rows.dtype == torch.bool else rows.long()
        if idx.numel() <= 1:
            return [idx] if idx.numel() else []
        if local:
            idx = idx[torch.argsort(self.rank().to(idx.device)[idx], stable=True)]
            if generator is not None:
                idx = torch.roll(idx, -int(torch.randint(idx.numel(), (1,), generator=generator)))
            chunks = list(idx.split(int(batch_size)))
            if generator is not None:
                chunks = [chunks[int(i)] for i in torch.randperm(len(chunks), generator=generator)]
            return chunks
        if generator is not None:
            idx = idx[torch.randperm(idx.numel(), generator=generator).to(idx.device)]
        return list(idx.split(int(batch_size)))

    def nodes(self, seeds: Tensor) -> Tensor:
        """Sorted spots of the (capped) ``hops``-hop neighbourhood of ``seeds``, the seeds included."""
        dev = self.sample.edge_index.device
        return _khop(seeds.to(dev).long(), self.hops, self._expand, self.n)

    def subgraph(
        self, seeds: Tensor, *, visible_mean: Tensor | None = None, label_inputs: Tensor | None = None
    ) -> Subgraph:
        """The re-indexed subgraph around ``seeds``.

        Parameters
        ----------
        seeds
            Original spot indices of the seed spots.
        visible_mean
            ``(1, G)`` whole-sample visible-label mean, stored on the subgraph (see the module docstring).
        label_inputs
            ``(N, C)`` whole-sample label input; its subgraph rows are stored on the subgraph.
        """
        s = self.sample
        dev = s.edge_index.device
        seeds = torch.unique(seeds.to(dev).long())
        nodes = self.nodes(seeds)
        ei, emask = _induced(nodes, s.edge_index, self.n)
        kw: dict[str, Any] = {f.name: getattr(s, f.name) for f in fields(s)}
        kw.update(
            x_spot=s.x_spot[nodes],
            edge_index=ei,
            edge_weight=s.edge_weight[emask],
            edge_cross=s.edge_cross[emask],
            section=s.section[nodes],
            y=s.y[nodes],
            name=f"{s.name}[{nodes.numel()} of {self.n} spots]",
            visible_mean=visible_mean,
            label_inputs=None if label_inputs is None else label_inputs[nodes],
            patches=_rows(s.patches, nodes),
            x_spot_views=_rows(s.x_spot_views, nodes),
        )
        out = Subgraph(sample=None, nodes=nodes, seeds=torch.searchsorted(nodes, seeds))  # type: ignore[arg-type]
        if s.has_tiles:
            n_r, n_g = int(s.x_region.shape[0]), int(s.x_global.shape[0])
            regions = _khop(torch.unique(s.spot_region[nodes]), self.tile_hops, s.region_edge_index, n_r)
            globals_ = _khop(torch.unique(s.region_global[regions]), self.tile_hops, s.global_edge_index, n_g)
            r_loc = torch.full((n_r,), -1, dtype=torch.long, device=dev)
            r_loc[regions] = torch.arange(regions.numel(), device=dev)
            g_loc = torch.full((n_g,), -1, dtype=torch.long, device=dev)
            g_loc[globals_] = torch.arange(globals_.numel(), device=dev)
            rei, rmask = _induced(regions, s.region_edge_index, n_r)
            gei, gmask = _induced(globals_, s.global_edge_index, n_g)
            seed_r = r_loc[torch.unique(s.spot_region[seeds])]
            seed_g = g_loc[torch.unique(s.spot_global[seeds])]

            def core(y: Tensor | None, tiles: Tensor, keep: Tensor) -> Tensor | None:
                if y is None:
                    return None
                sub = torch.full((tiles.numel(), y.shape[1]), float("nan"), dtype=y.dtype, device=y.device)
                sub[keep] = y[tiles[keep]]
                return sub

            kw.update(
                x_region=s.x_region[regions],
                x_global=s.x_global[globals_],
                x_region_views=_rows(s.x_region_views, regions),
                x_global_views=_rows(s.x_global_views, globals_),
                spot_region=r_loc[s.spot_region[nodes]],
                spot_global=g_loc[s.spot_global[nodes]],
                region_global=g_loc[s.region_global[regions]],
                region_edge_index=rei,
                region_edge_weight=s.region_edge_weight[rmask],
                global_edge_index=gei,
                global_edge_weight=s.global_edge_weight[gmask],
                y_region=core(s.y_region, regions, seed_r),
                y_global=core(s.y_global, globals_, seed_g),
            )
            out.regions, out.globals_, out.seed_regions, out.seed_globals = regions, globals_, seed_r, seed_g
        out.sample = SampleTensors(**kw)
        return out

    def steps(
        self,
        model: ASIGNModel,
        y_visible: Tensor,
        loss_rows: Tensor,
        *,
        batch_size: int,
        generator: torch.Generator | None = None,
        local: bool = True,
    ) -> Iterator[tuple[SampleTensors, Tensor, Tensor]]:
        """``(subgraph sample, its visible labels, its loss rows)`` for every seed batch of one masked step.

        The seeds are the loss rows (batched by :meth:`batches`); the visible-label mean and the label input are
        computed once on the whole sample from ``y_visible`` (visible rows only).
        """
        visible_mean, label_inputs = whole_sample_context(model, self.sample, y_visible)
        for seeds in self.batches(loss_rows, batch_size, generator=generator, local=local):
            sub = self.subgraph(seeds, visible_mean=visible_mean, label_inputs=label_inputs)
            yield sub.sample, y_visible[sub.nodes], sub.seed_mask


def _rows(t: Tensor | None, idx: Tensor) -> Tensor | None:
    """Rows ``idx`` of an optional tensor kept on its own device (CPU-held patches and per-view features)."""
    return None if t is None else t[idx.to(t.device)]


def whole_sample_context(
    model: ASIGNModel, sample: SampleTensors, y_visible: Tensor
) -> tuple[Tensor | None, Tensor | None]:
    """The visible-label mean and (with ``label_input``) the label input of the whole sample, from visible rows only."""
    visible = torch.isfinite(y_visible).all(dim=1)
    mean = y_visible[visible].float().mean(dim=0, keepdim=True) if bool(visible.any()) else None
    lab = model.label_features(sample, y_visible) if getattr(model.config, "label_input", False) else None
    return mean, lab


# ---------------------------------------------------------------------------------------------- batched inference
@torch.no_grad()
def predict_batched(
    model: ASIGNModel, sample: SampleTensors, y_visible: Tensor, *, batch_size: int
) -> dict[str, Tensor]:
    """Exact batched inference: the network on full ``L``-hop subgraphs, propagation and mixing on the whole graph.

    Every seed batch's network output (and its seeds' region/global outputs) equals the whole-graph forward pass
    up to floating-point summation order. Returns the same keys as :meth:`ASIGNModel.forward`.
    """
    cfg = model.config
    n, g = sample.n_spots, model.n_genes
    dev = sample.x_spot.device
    sampler = NeighbourSampler(sample, hops=receptive_hops(cfg), tile_hops=cfg.gnn_layers, fanout=0)
    visible_mean, label_inputs = whole_sample_context(model, sample, y_visible)
    net = torch.full((n, g), float("nan"), device=dev)
    tiles: dict[str, Tensor] = {}
    for seeds in sampler.batches(torch.arange(n, device=dev), batch_size):
        sub = sampler.subgraph(seeds, visible_mean=visible_mean, label_inputs=label_inputs)
        out = model(sub.sample, y_visible[sub.nodes])
        net[sub.nodes[sub.seeds]] = out["net"][sub.seeds].float()
        for key, orig, local in (("region", sub.regions, sub.seed_regions), ("global", sub.globals_, sub.seed_globals)):
            if key in out and orig is not None:
                if key not in tiles:
                    n_t = int((sample.x_region if key == "region" else sample.x_global).shape[0])
                    tiles[key] = torch.full((n_t, g), float("nan"), device=dev)
                tiles[key][orig[local]] = out[key][local].float()
    return {"net": net, **tiles, **model.mix(net, y_visible, sample)}


# ------------------------------------------------------------------------------------------------ memory estimate
# Autograd-saved floats per element, fitted by least squares to torch.autograd.graph.saved_tensors_hooks byte counts
# of training steps on synthetic samples (1.2k-6k spots, 10k-150k edges, d = 32-128, G = 50-250; the estimate
# without SAFETY is 0.90-0.99 of the measurement; tests/test_sampling.py keeps it within 0.7-1.4). On a 20k-spot,
# 503k-edge sample (d = 32, G = 100) the whole-graph estimate is 2.58 GiB and the process's peak RSS grew by 2.4 GiB:
#   per GATv2 layer: ~C_EDGE floats per (edge + self-loop) x width (x_i + x_j, leaky-ReLU, attention-weighted
#   messages, dropout masks) and ~C_NODE_GAT floats per node x width (LayerNorm, residual, ELU, projections);
#   per transformer layer over the node's L tokens: ~C_TOKEN floats per token x width (attention projections,
#   softmax, feed-forward 4d, norms, dropout masks);
#   per node outside the graph blocks: input MLP, cross-attention, head: ~C_NODE_OTHER floats x width, plus
#   ~C_GENE floats per gene (heads, mixing, loss).
C_EDGE = 6.0
C_NODE_GAT = 6.0
C_TOKEN = 18.0
C_NODE_OTHER = 24.0
C_GENE = 6.0
SAFETY = 1.5  # transient buffers (softmax, scatter, allocator slack) on top of the saved activations


def _block_floats(config: ASIGNConfig, n: int, e: int, *, dim: int) -> float:
    """Saved-activation floats of one graph block (GATv2 stack + transformer refinement) on ``n`` nodes."""
    L = int(config.gnn_layers)
    gat = L * (C_EDGE * (e + n) * dim + C_NODE_GAT * n * dim)
    tr = L * C_TOKEN * n * L * dim
    return gat + tr


def estimate_training_bytes(
    config: ASIGNConfig,
    *,
    n_spots: int,
    n_edges: int,
    n_genes: int,
    feature_dim: int,
    n_regions: int = 0,
    n_region_edges: int = 0,
    n_globals: int = 0,
    n_global_edges: int = 0,
    n_parameters: int = 0,
    encoder_bytes_per_patch: float = 0.0,
    n_encoder_patches: int = 0,
) -> int:
    """Estimated peak memory (bytes) of one training step on a graph of this size.

    ``4 * SAFETY * (activations) + 16 * n_parameters`` (weights, gradients and two AdamW moments), where the
    activations are the saved tensors of the spot, region and global graph blocks (:data:`C_EDGE`,
    :data:`C_NODE_GAT`, :data:`C_TOKEN` per element and width ``d``), ``C_NODE_OTHER * d + C_GENE * G + F``
    floats per spot for the input MLP, cross-attention, heads, propagation and loss, and, when fine-tuning the
    encoder, ``encoder_bytes_per_patch`` (measured once per encoder by
    :func:`asign._model._finetune.encoder_bytes_per_patch`) for each of the ``n_encoder_patches`` patches whose
    activations are alive at once: every loss row of the step, or one chunk of ``encoder_chunk`` patches with
    ``encoder_checkpoint`` (activation checkpointing).
    """
    d = int(config.hidden_dim)
    floats = _block_floats(config, n_spots, n_edges, dim=d)
    floats += n_spots * (C_NODE_OTHER * d + C_GENE * n_genes + 2 * feature_dim)
    if config.levels == "spot_region_global":
        floats += _block_floats(config, n_regions, n_region_edges, dim=d)
        floats += _block_floats(config, n_globals, n_global_edges, dim=d)
        floats += (n_regions + n_globals) * (C_NODE_OTHER * d + C_GENE * n_genes + 2 * feature_dim)
    act = 4.0 * SAFETY * floats + encoder_bytes_per_patch * n_encoder_patches
    return int(act + 16 * n_parameters)


def estimate_inference_bytes(config: ASIGNConfig, *, n_spots: int, n_edges: int, n_genes: int, feature_dim: int) -> int:
    """Estimated peak memory (bytes) of a whole-graph forward pass without gradients.

    Only one layer's buffers are alive at a time: the largest GATv2 layer (``C_EDGE`` floats per edge and width
    plus ``C_NODE_GAT`` per node), the token sequence of the transformer, the inputs and the outputs.
    """
    d = int(config.hidden_dim)
    L = int(config.gnn_layers)
    floats = C_EDGE * (n_edges + n_spots) * d + (C_NODE_GAT + C_TOKEN + L) * n_spots * d
    floats += n_spots * (feature_dim + 4 * n_genes)
    return int(4.0 * SAFETY * floats)


def sample_size(sample: SampleTensors) -> dict[str, int]:
    """The sizes :func:`estimate_training_bytes` needs, read from a sample."""
    out = {
        "n_spots": sample.n_spots,
        "n_edges": int(sample.edge_index.shape[1]),
        "n_genes": sample.n_genes,
        "feature_dim": int(sample.x_spot.shape[1]),
    }
    if sample.has_tiles:
        out.update(
            n_regions=int(sample.x_region.shape[0]),
            n_region_edges=int(sample.region_edge_index.shape[1]) if sample.region_edge_index is not None else 0,
            n_globals=int(sample.x_global.shape[0]),
            n_global_edges=int(sample.global_edge_index.shape[1]) if sample.global_edge_index is not None else 0,
        )
    return out


def memory_limit_bytes(config: ASIGNConfig, device: torch.device | str) -> int:
    """The memory budget: ``memory_limit_gb``, or half the GPU's memory on CUDA / a quarter of the RAM on the CPU."""
    if config.memory_limit_gb > 0:
        return int(config.memory_limit_gb * GiB)
    device = torch.device(device)
    if device.type == "cuda":
        return int(0.5 * torch.cuda.get_device_properties(device).total_memory)
    try:
        phys = int(os.sysconf("SC_PAGE_SIZE")) * int(os.sysconf("SC_PHYS_PAGES"))
    except (ValueError, OSError, AttributeError):  # pragma: no cover - non-POSIX
        phys = 16 * GiB
    return int(0.25 * phys)


def plan_training(
    model: ASIGNModel,
    sample: SampleTensors,
    *,
    device: torch.device | str,
    encoder_bytes_per_patch: float = 0.0,
    n_encoder_patches: int = 0,
) -> dict[str, Any]:
    """Whether ``sample`` is trained on the whole graph or on subgraphs (``config.subgraph``), with the estimate.

    ``encoder_bytes_per_patch`` and ``n_encoder_patches``: the fine-tuned encoder's saved bytes per patch and the
    number of patches whose activations are alive at once (see :func:`estimate_training_bytes`).

    Returns ``{"subgraph": bool, "estimate_bytes": int, "limit_bytes": int}``.
    """
    cfg = model.config
    est = estimate_training_bytes(
        cfg,
        **sample_size(sample),
        n_parameters=model.n_parameters(),
        encoder_bytes_per_patch=encoder_bytes_per_patch,
        n_encoder_patches=int(n_encoder_patches),
    )
    limit = memory_limit_bytes(cfg, device)
    use = cfg.subgraph == "always" or (cfg.subgraph == "auto" and est > limit)
    return {"subgraph": bool(use), "estimate_bytes": int(est), "limit_bytes": int(limit)}


def inference_batch_size(model: ASIGNModel, sample: SampleTensors, *, device: torch.device | str) -> int:
    """Seeds per batch of exact batched inference, or 0 for one whole-graph pass.

    ``config.inference_batch_size`` when set; otherwise, with ``subgraph="auto"``, ``4 * batch_size`` when the
    whole-graph forward pass is estimated not to fit the memory budget.
    """
    cfg = model.config
    if cfg.inference_batch_size > 0:
        return int(cfg.inference_batch_size)
    if cfg.subgraph != "auto":
        return 0
    size = sample_size(sample)
    est = estimate_inference_bytes(
        cfg,
        n_spots=size["n_spots"],
        n_edges=size["n_edges"],
        n_genes=size["n_genes"],
        feature_dim=size["feature_dim"],
    )
    return 4 * int(cfg.batch_size) if est > memory_limit_bytes(cfg, device) else 0


def expected_batches(sample: SampleTensors, config: ASIGNConfig) -> int:
    """Expected seed batches of one masked step (for the learning-rate schedule)."""
    lab = int(sample.labelled.sum())
    n_sec = int(torch.unique(sample.section[sample.labelled]).numel())
    if config.mask == "section" and n_sec >= 2:
        n_loss = lab * (1.0 - 1.0 / n_sec)
    else:
        n_loss = lab * (1.0 - config.visible_fraction)
    return max(1, math.ceil(n_loss / int(config.batch_size)))
