"""The ASIGN network, its propagation, losses and training loop (torch, torch-geometric, numpy, scipy only)."""

from __future__ import annotations

from ._config import PRESETS, ASIGNConfig
from ._data import SampleTensors, edges_from_sparse, normalise_sums, tile_graph, tile_targets
from ._losses import asign_loss, mean_pcc
from ._model import ASIGNModel
from ._modules import GNNT, MLP, CrossAttention, Head
from ._propagation import IdentityLinear, label_propagation
from ._train import TrainResult, ValidationSet, evaluate, make_model, per_gene_pcc, predict_sample, train_model

__all__ = [
    "GNNT",
    "MLP",
    "PRESETS",
    "ASIGNConfig",
    "ASIGNModel",
    "CrossAttention",
    "Head",
    "IdentityLinear",
    "SampleTensors",
    "TrainResult",
    "ValidationSet",
    "asign_loss",
    "edges_from_sparse",
    "evaluate",
    "label_propagation",
    "make_model",
    "mean_pcc",
    "normalise_sums",
    "per_gene_pcc",
    "predict_sample",
    "tile_graph",
    "tile_targets",
    "train_model",
]
