"""The ASIGN model's options in one typed dataclass, with the named presets of ``method.md`` §5–6."""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any, Literal

PRESETS = ("default", "paper_code")


@dataclass
class ASIGNConfig:
    """Every option of the ASIGN model and its training loop.

    The defaults are asign's (``preset="default"``, ``method.md`` §5–6); :meth:`from_preset` gives the released code's
    hyper-parameters with ``preset="paper_code"``. The object is plain data: :meth:`to_dict` gives a zarr- and
    ``weights_only``-safe dict and :meth:`from_dict` rebuilds it.

    Attributes
    ----------
    hidden_dim
        Width ``d`` of every token (1024 in the paper; smaller widths suit CPU runs and small data).
    attn_heads
        Heads of the cross-attention and transformer layers (must divide ``hidden_dim``).
    gat_heads
        Heads of each GATv2 layer, concatenated to ``hidden_dim`` (must divide ``hidden_dim``).
    gnn_layers
        Number of stacked GATv2 layers in each graph block (3 in the paper), each refined by one transformer layer.
    dropout
        Dropout of attention, GATv2 and feed-forward layers.
    input_dropout
        Dropout on the standardised frozen features before the level MLPs (regularisation for small data).
    feature_scaling
        How each level's frozen features are scaled before the MLP (after centring on their mean over the training
        samples' spots and tiles): ``"dimension"`` divides every feature dimension by its own standard deviation;
        ``"global"`` divides all dimensions by one number (the root mean variance), so dimensions keep their relative
        scale and nearly constant, noisy dimensions are not amplified.
    levels
        ``"spot_region_global"`` (the paper's three branches) or ``"spot"`` (spot branch only; the cross-attention then
        attends over the spot token and its graph-neighbour mean, so it still sees two tokens).
    net_baseline
        ``"visible_mean"``: every head predicts a deviation from the mean of the visible labels of the sample (so each
        sample's known layer sets the level and the network learns the spatial pattern); ``"propagation"``: the spot
        head predicts a correction of the (detached) propagated labels, so the network is a residual on top of the
        cross-layer imputation; ``"none"``: heads predict absolute values (bias initialised to the training mean).
        *asign decision*.
    use_propagation
        Cross-layer label propagation and the per-gene mixing (``False`` gives the image-only "ASIGN 2D" variant).
    lp_iterations
        Propagation iterations ``T`` (10 in the supplement, 20 in the released code).
    lp_init
        Initial value of unlabelled spots: ``"mean"`` (visible-label mean) or ``"network"`` (detached network output).
    lp_linear
        Learned ``Linear(G, G)`` after the propagation, initialised to the identity.
    alpha_init
        Initial per-gene mixing logit ``alpha`` (``sigmoid(0.5) ~ 0.62`` on the propagation).
    loss_weights
        ``(w_mse, w_pcc, lambda_1, lambda_2)``: spot MSE, spot ``1 - PCC``, region/global and consistency weights.
    net_loss_weight
        Weight of an extra spot loss (same MSE + PCC form) on the network's own prediction, so that the network is
        also a stand-alone image/graph predictor (0 = the paper's loss on the mixed output only). *asign decision*.
    pcc_axis
        ``"spot"`` correlates across genes within each spot (the released code); ``"gene"`` correlates each gene across
        the loss-set spots of each section (closer to the primary metric).
    mask
        ``"section"``: one labelled section visible per step, the others hidden; ``"spot"``: each labelled spot visible
        with probability ``visible_fraction``; ``"block"``: contiguous patches of labelled spots (a random spot and its
        within-section graph neighbours, repeated) visible up to ``visible_fraction``, so that the hidden spots lie
        away from every visible label, as an unknown section does. Samples with a single labelled section use
        ``"spot"`` under ``"section"``.
    visible_fraction
        ``p`` of ``mask="spot"`` and ``mask="block"``.
    known_policy
        ``"random"`` (a new visible section each step) or ``"first"`` (always the first labelled section).
    optimizer
        ``"adamw"`` (asign) or ``"sgd"`` (released code: momentum 0.9, poly decay).
    lr, weight_decay, momentum
        Optimiser settings.
    schedule
        ``"cosine"`` or ``"poly"`` (``(1 - it / poly_iters) ** 0.9``).
    poly_iters
        Horizon of the poly schedule in optimiser steps (at least 1); the learning rate is 0 from there on.
    max_epochs
        Upper bound on epochs; one epoch is one pass over the training samples in a seeded random order.
    steps_per_epoch
        Masked steps per sample and epoch (a single small sample needs several masks per epoch).
    patience
        Early-stopping patience in epochs: training stops once the validation score (per-gene PCC) has not improved
        for ``patience`` epochs. 0 turns off the stopping only: all ``max_epochs`` epochs run, and with validation
        (a validation sample or a hold-out, see ``holdout_fraction``) the weights of the epoch with the best
        validation score are still restored at the end, not the last epoch's.
    min_epochs
        Epochs before early stopping may trigger.
    holdout_fraction
        With no validation sample (transductive training, or ``method_kwargs={"validation": "holdout"}`` of
        :func:`asign.tl.impute` / :func:`asign.tl.fit`), the fraction of labelled spots held out for validation:
        they are never visible and never in the loss during training, and they score every epoch; the weights of
        the best-scoring epoch are kept (and with ``patience > 0`` the score also stops training early). The hold-out
        is taken whatever ``patience`` is. ``method_kwargs={"validation": "none"}`` takes none: training uses every
        labelled spot, runs all ``max_epochs`` epochs and keeps the last epoch's weights.
    grad_clip
        Gradient-norm clip (0: no clipping).
    amp
        Mixed precision (bfloat16 autocast) on CUDA; ignored on CPU.
    seed
        Seed of the initialisation, masks and sample order (a non-negative integer).
    label_input
        Feed the spot branch, besides its image features, with inputs computed inside the forward pass from the
        *visible* labels of the step only: the leave-one-out cross-layer propagation of the visible labels
        (standardised with the visible mean and sd) and the damped propagated visible mass ("reach", about
        ``0.5 ** hops`` to the nearest visible spot).
        Off by default. ``method_kwargs={"feature_key": None}`` of ``impute(method="asign")`` turns it on and runs
        the model without image features (spot level only). *asign decision*.
    subgraph
        Training graph scope (:mod:`asign._model._sampling`): ``"auto"`` trains on the whole-sample graph when the
        estimated training memory (:func:`~asign._model._sampling.estimate_training_bytes`) fits ``memory_limit_gb``
        and on neighbour-sampled subgraphs otherwise; ``"never"`` always uses the whole graph; ``"always"`` always
        uses subgraphs. Decided per training sample.
    batch_size
        Seed spots (loss rows) per subgraph step; the step's graph is their ``L``-hop neighbourhood.
    fanout
        Per-hop cap of the neighbourhood expansion: each node brings in at most its ``fanout`` heaviest in-edges'
        sources (0: every neighbour, so seed outputs equal the whole-graph ones).
    seed_order
        How a masked step's seed spots are split into batches: ``"local"`` cuts the graph's reverse Cuthill-McKee
        order (from a random offset, batches in random order), so a batch is a compact 3D block whose neighbourhoods
        overlap and the subgraph stays small; ``"random"`` draws seeds uniformly (their neighbourhoods barely
        overlap, so each subgraph is much larger).
    memory_limit_gb
        Memory budget of ``subgraph="auto"`` and of automatic batched inference, in GiB; 0: half the GPU's memory
        on CUDA, a quarter of the physical memory on the CPU.
    inference_batch_size
        Seed spots per batch of exact batched inference (full ``L``-hop neighbourhoods); 0: the whole graph,
        unless ``subgraph="auto"`` finds that it does not fit (then ``4 * batch_size``).
    finetune_encoder
        Compute the spot features inside training with a trainable copy of the image encoder from the spot patches
        (:mod:`asign._model._finetune`); region/global levels keep their frozen features. GPU recommended.
    encoder_lr
        Learning rate of the encoder's parameters (the rest of the model uses ``lr``).
    encoder_freeze
        Fraction of the encoder's parameter tensors, from the input side, kept frozen (0: all trainable). The
        default 0.75 leaves about the backbone's last stage and its head trainable, as ``method.md`` §5 specifies.
    encoder_augment
        Random flips and 90-degree rotations of the patches during fine-tuning.
    encoder_chunk
        Patches per encoder call (bounds the transient memory of the encoder).
    encoder_checkpoint
        Activation checkpointing of the encoder per chunk: only the features of the patches that carry gradients are
        kept, and each chunk's activations are recomputed in the backward pass (about one more encoder forward pass),
        so the encoder's memory is that of one chunk instead of ``batch_size`` patches.
    view_augment
        When the samples carry per-view features (``pp.extract_features(tta=..., keep_views=True)``), each training
        step feeds every spot and tile the features of one randomly drawn view instead of the views' mean;
        validation and prediction read the mean (test-time augmentation). No effect without stored views.
        *asign decision*.
    view_consistency
        With view augmentation: weight of a consistency term (Pi-model style, label-free) that runs the step twice
        with two independent view draws and penalises the mean squared difference of the two network outputs on
        the spots whose labels the step does not show (the unknown sections and the hidden known spots). 0 (default)
        runs each step once. Doubles the cost of a step; no gain measured on the HER2ST C2-block development
        protocol (``docs/benchmarks/asign.md``). *asign decision*.
    predict_views
        With stored per-view features: the final prediction averages the model's outputs over the views (view ``v``
        of every spot and tile together, for each ``v``) instead of running once on the views' mean features, so
        that prediction sees inputs of the kind training saw. Costs one inference per view; validation during
        training still reads the mean. No effect without stored views. ``impute`` records the number of views
        averaged in ``uns['asign']['result']['predicted_over_views']`` (0: one pass on the mean). On by default:
        +0.0030 ± 0.0009 (7 of 8 seed x block pairs up) on the HER2ST C2-block development protocol
        (``docs/benchmarks/asign.md``). *asign decision*.
    """

    hidden_dim: int = 256
    attn_heads: int = 8
    gat_heads: int = 4
    gnn_layers: int = 3
    dropout: float = 0.1
    input_dropout: float = 0.1
    feature_scaling: Literal["dimension", "global"] = "dimension"
    levels: Literal["spot_region_global", "spot"] = "spot_region_global"
    net_baseline: Literal["visible_mean", "propagation", "none"] = "visible_mean"
    use_propagation: bool = True
    lp_iterations: int = 10
    lp_init: Literal["mean", "network"] = "mean"
    lp_linear: bool = False
    alpha_init: float = 0.5
    loss_weights: list[float] = field(default_factory=lambda: [1.0, 1.0, 0.25, 0.25])
    net_loss_weight: float = 0.0
    pcc_axis: Literal["spot", "gene"] = "gene"
    mask: Literal["section", "spot", "block"] = "section"
    visible_fraction: float = 0.2
    known_policy: Literal["random", "first"] = "random"
    optimizer: Literal["adamw", "sgd"] = "adamw"
    lr: float = 1e-4
    weight_decay: float = 1e-4
    momentum: float = 0.9
    schedule: Literal["cosine", "poly"] = "cosine"
    poly_iters: int = 25000
    max_epochs: int = 100
    steps_per_epoch: int = 1
    patience: int = 10
    min_epochs: int = 1
    holdout_fraction: float = 0.2
    grad_clip: float = 1.0
    amp: bool = True
    seed: int = 0
    # --- label input / non-image mode (issue 6; defaults keep the image model unchanged) ---------------------------
    label_input: bool = False
    # --- subgraph training and encoder fine-tuning (issue 6; _sampling.py / _finetune.py; defaults keep the
    # whole-graph, frozen-feature behaviour for samples that fit) --------------------------------------------------
    subgraph: Literal["auto", "never", "always"] = "auto"
    batch_size: int = 512
    fanout: int = 0
    seed_order: Literal["local", "random"] = "local"
    memory_limit_gb: float = 0.0
    inference_batch_size: int = 0
    finetune_encoder: bool = False
    encoder_lr: float = 1e-5
    encoder_freeze: float = 0.75
    encoder_augment: bool = True
    encoder_chunk: int = 64
    encoder_checkpoint: bool = True
    # --- train-time view augmentation from stored test-time-augmentation views (off without stored views) ---------
    view_augment: bool = True
    view_consistency: float = 0.0
    predict_views: bool = True

    def _check_types(self) -> None:
        """Integer, float and boolean options must have that type.

        ``"2"`` or ``1.5`` for an integer option fail here, not deep inside training.
        """
        import numbers

        import numpy as np

        kinds = {"int": numbers.Integral, "float": numbers.Real, "bool": bool}
        words = {"int": "an integer", "float": "a number", "bool": "True or False"}
        for f in dataclasses.fields(self):
            kind = kinds.get(str(f.type))
            if kind is None:
                continue
            value = getattr(self, f.name)
            if f.type == "bool":
                ok = isinstance(value, bool | np.bool_)
            else:
                ok = isinstance(value, kind) and not isinstance(value, bool)
            if not ok:
                msg = f"ASIGNConfig.{f.name}={value!r} must be {words[str(f.type)]}."
                raise TypeError(msg)

    def __post_init__(self) -> None:
        self.loss_weights = [float(w) for w in self.loss_weights]
        self.validate()

    def validate(self) -> None:
        """Raise a :class:`TypeError` or :class:`ValueError` naming the first inconsistent option."""
        self._check_types()
        choices = {
            "levels": ("spot_region_global", "spot"),
            "net_baseline": ("visible_mean", "propagation", "none"),
            "lp_init": ("mean", "network"),
            "pcc_axis": ("spot", "gene"),
            "mask": ("section", "spot", "block"),
            "known_policy": ("random", "first"),
            "feature_scaling": ("dimension", "global"),
            "optimizer": ("adamw", "sgd"),
            "schedule": ("cosine", "poly"),
        }
        for name, allowed in choices.items():
            if getattr(self, name) not in allowed:
                msg = f"ASIGNConfig.{name}={getattr(self, name)!r} is not one of {list(allowed)}."
                raise ValueError(msg)
        if self.hidden_dim < 1:
            msg = f"ASIGNConfig.hidden_dim={self.hidden_dim} must be at least 1."
            raise ValueError(msg)
        for name in ("attn_heads", "gat_heads"):
            h = getattr(self, name)
            if h < 1 or self.hidden_dim % h:
                msg = f"ASIGNConfig.{name}={h} must divide hidden_dim={self.hidden_dim}."
                raise ValueError(msg)
        if self.gnn_layers < 1:
            msg = f"ASIGNConfig.gnn_layers={self.gnn_layers} must be at least 1."
            raise ValueError(msg)
        if len(self.loss_weights) != 4:
            msg = f"ASIGNConfig.loss_weights must have 4 entries (w_mse, w_pcc, lambda_1, lambda_2), got {self.loss_weights}."
            raise ValueError(msg)
        w = self.loss_weights
        if not all(0.0 <= v < math.inf for v in w) or not any(v > 0.0 for v in w):
            msg = (
                f"ASIGNConfig.loss_weights={w} must be finite numbers >= 0 with at least one > 0 (all 0: nothing to "
                "train on)."
            )
            raise ValueError(msg)
        self._check_ranges()
        if not 0.0 < self.visible_fraction < 1.0:
            msg = f"ASIGNConfig.visible_fraction={self.visible_fraction} must lie in (0, 1)."
            raise ValueError(msg)
        if not 0.0 <= self.holdout_fraction < 1.0:
            msg = f"ASIGNConfig.holdout_fraction={self.holdout_fraction} must lie in [0, 1)."
            raise ValueError(msg)
        if self.net_baseline == "propagation" and (self.lp_init == "network" or not self.use_propagation):
            msg = "net_baseline='propagation' needs use_propagation=True and lp_init='mean'."
            raise ValueError(msg)
        if self.lp_iterations < 0 or self.max_epochs < 1 or self.steps_per_epoch < 1:
            msg = "ASIGNConfig.lp_iterations must be >= 0, max_epochs and steps_per_epoch >= 1."
            raise ValueError(msg)
        if not (self.view_consistency >= 0.0 and math.isfinite(self.view_consistency)):
            msg = f"ASIGNConfig.view_consistency={self.view_consistency} must be a finite number >= 0."
            raise ValueError(msg)
        # subgraph training / encoder fine-tuning
        for name, allowed in (("subgraph", ("auto", "never", "always")), ("seed_order", ("local", "random"))):
            if getattr(self, name) not in allowed:
                msg = f"ASIGNConfig.{name}={getattr(self, name)!r} is not one of {list(allowed)}."
                raise ValueError(msg)
        if self.batch_size < 1 or self.fanout < 0 or self.inference_batch_size < 0 or self.encoder_chunk < 1:
            msg = "ASIGNConfig.batch_size and encoder_chunk must be >= 1, fanout and inference_batch_size >= 0."
            raise ValueError(msg)
        if not 0.0 <= self.encoder_freeze <= 1.0:
            msg = f"ASIGNConfig.encoder_freeze={self.encoder_freeze} must lie in [0, 1]."
            raise ValueError(msg)

    def _check_ranges(self) -> None:
        """Numeric options must lie in their range (NaN lies in none): a :class:`ValueError` naming the first that does not."""
        unit = "a number in [0, 1)"
        positive, non_negative = "a finite number > 0", "a finite number >= 0"
        ranges = (
            ("dropout", unit, lambda v: 0.0 <= v < 1.0),
            ("input_dropout", unit, lambda v: 0.0 <= v < 1.0),
            ("alpha_init", "a finite number", math.isfinite),
            ("net_loss_weight", non_negative, lambda v: 0.0 <= v < math.inf),
            ("lr", positive, lambda v: 0.0 < v < math.inf),
            ("weight_decay", non_negative, lambda v: 0.0 <= v < math.inf),
            ("momentum", unit, lambda v: 0.0 <= v < 1.0),
            ("poly_iters", "at least 1", lambda v: v >= 1),
            ("patience", ">= 0 (0: no early stopping)", lambda v: v >= 0),
            ("min_epochs", ">= 0", lambda v: v >= 0),
            ("grad_clip", f"{non_negative} (0: no clipping)", lambda v: 0.0 <= v < math.inf),
            ("seed", ">= 0", lambda v: v >= 0),
            ("memory_limit_gb", f"{non_negative} (0: the automatic budget)", lambda v: 0.0 <= v < math.inf),
            ("encoder_lr", positive, lambda v: 0.0 < v < math.inf),
        )
        for name, what, ok in ranges:
            value = getattr(self, name)
            if not ok(value):
                msg = f"ASIGNConfig.{name}={value!r} must be {what}."
                raise ValueError(msg)

    @classmethod
    def from_preset(cls, preset: str = "default", **overrides: Any) -> ASIGNConfig:
        """The named preset with ``overrides`` applied.

        ``"default"`` is asign's configuration. ``"paper_code"`` takes the released code's *hyper-parameters*
        (``method.md`` §6.4): SGD with momentum 0.9, learning rate 1e-3, poly decay over 25,000 iterations, 51 epochs,
        ``mask="spot"`` with ``p = 0.25``, ``T = 20``, loss weights (0.75, 0.25, 0.125, 0.125), per-spot PCC and
        hidden width 1024. Its graph settings (within-section ``k = 4``, cross-section ``k = 12``) belong to
        :func:`asign.pp.neighbors_3d`. None of the released code's defects are reproduced.
        """
        if preset == "default":
            base: dict[str, Any] = {}
        elif preset == "paper_code":
            base = {
                "hidden_dim": 1024,
                "optimizer": "sgd",
                "lr": 1e-3,
                "momentum": 0.9,
                "weight_decay": 0.0,
                "schedule": "poly",
                "poly_iters": 25000,
                "max_epochs": 51,
                "patience": 0,
                "mask": "spot",
                "visible_fraction": 0.25,
                "lp_iterations": 20,
                "loss_weights": [0.75, 0.25, 0.125, 0.125],
                "pcc_axis": "spot",
                "net_baseline": "none",
                "input_dropout": 0.0,
            }
        else:
            msg = f"Unknown preset {preset!r}; choose one of {list(PRESETS)}."
            raise ValueError(msg)
        unknown = set(overrides) - {f.name for f in dataclasses.fields(cls)}
        if unknown:
            msg = f"Unknown ASIGN option(s) {sorted(unknown)}; valid options: {sorted(f.name for f in dataclasses.fields(cls))}."
            raise ValueError(msg)
        base.update(overrides)
        return cls(**base)

    def to_dict(self) -> dict[str, Any]:
        """Plain ``dict`` of str / int / float / bool / list values."""
        return {
            f.name: (list(v) if isinstance(v := getattr(self, f.name), tuple | list) else v)
            for f in dataclasses.fields(self)
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ASIGNConfig:
        """Rebuild from :meth:`to_dict` output (unknown keys are rejected)."""
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = set(d) - names
        if unknown:
            msg = f"Unknown ASIGN option(s) {sorted(unknown)} in the stored configuration."
            raise ValueError(msg)
        return cls(**d)

    def replace(self, **changes: Any) -> ASIGNConfig:
        """A copy with ``changes`` applied."""
        return dataclasses.replace(self, **changes)
