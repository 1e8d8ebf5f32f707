"""Training one ensemble member from prepared tensors (no AnnData or SpatialData needed).

:func:`asign.tl.impute` / :func:`asign.tl.fit` prepare each member's training samples and validation sets from the
user's stacks (``asign.tl._asign``) and call :func:`train_member`; a bare GPU machine can call it on samples
prepared elsewhere (``benchmarks/gpu_her2st_finetune.py``).
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch

    from ._config import ASIGNConfig
    from ._data import SampleTensors
    from ._model import ASIGNModel
    from ._train import ValidationSet


def feature_dims(sample: SampleTensors) -> dict[str, int]:
    """Input width per level."""
    dims = {"spot": int(sample.x_spot.shape[1])}
    if sample.has_tiles:
        dims["region"] = int(sample.x_region.shape[1])
        dims["global"] = int(sample.x_global.shape[1])
    return dims


def feature_stats(
    samples: list[SampleTensors], level: str, scaling: str = "dimension"
) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean and scale of the level's input features over ``samples`` (the model's input scaling).

    ``scaling="dimension"``: the standard deviation of every dimension; ``"global"``: the root mean variance over
    the dimensions, the same for all (``ASIGNConfig.feature_scaling``).
    """
    attr = {"spot": "x_spot", "region": "x_region", "global": "x_global"}[level]
    import torch

    x = torch.cat([getattr(s, attr) for s in samples], dim=0)
    if x.shape[1] == 0:  # no image features (feature_key=None)
        return x.new_zeros(0), x.new_ones(0)
    sd = x.std(dim=0, unbiased=False)
    if scaling == "global":
        sd = sd.square().mean().sqrt().expand_as(sd).clone()
    return x.mean(dim=0), sd


def replace_samples(
    train: list[SampleTensors], validation: list[ValidationSet], fn: Callable[[SampleTensors], SampleTensors]
) -> tuple[list[SampleTensors], list[ValidationSet]]:
    """``fn`` applied once to every distinct sample of ``train`` and of the validation sets.

    A sample that is both a training sample and a validation set's sample (hold-out validation) stays one object.
    """
    new: dict[int, SampleTensors] = {}
    for s in [*train, *(v.sample for v in validation)]:
        if id(s) not in new:
            new[id(s)] = fn(s)
    return [new[id(s)] for s in train], [dataclasses.replace(v, sample=new[id(v.sample)]) for v in validation]


def rebuild_member(
    n_genes: int,
    dims: dict[str, int],
    cfg: ASIGNConfig,
    state: dict[str, Any],
    rec: dict[str, Any],
    *,
    module: Any = None,
) -> ASIGNModel:
    """The trained model of a :func:`train_member` result, in eval mode.

    A fine-tuned encoder's architecture is rebuilt from ``rec["spot_encoder"]`` (with ``module`` for a user module)
    before the weights are loaded.
    """
    from ._finetune import attach_encoder, spot_encoder_from_spec
    from ._train import make_model

    model = make_model(n_genes, dims, cfg)
    if "spot_encoder" in rec:
        attach_encoder(model, spot_encoder_from_spec(rec["spot_encoder"], module=module))
    model.load_state_dict(state)
    model.eval()
    return model


def with_trainable_encoder(
    train: list[SampleTensors], validation: list[ValidationSet], cfg: ASIGNConfig, finetune: dict[str, Any], device: str
) -> tuple[list[SampleTensors], list[ValidationSet], Any]:
    """A fresh trainable spot encoder, and the samples' spot features recomputed by it from their ``patches``.

    ``finetune`` holds ``encoder`` (registry name or module), ``weights`` and ``input_size``; every sample must
    carry its uint8 ``patches``. A sample that is both a training sample and a validation set's sample stays one
    object.
    """
    import copy

    from ._finetune import build_spot_encoder, embed_all, freeze_early

    src = finetune["encoder"] if isinstance(finetune["encoder"], str) else copy.deepcopy(finetune["encoder"])
    enc = build_spot_encoder(src, weights=finetune["weights"], input_size=finetune["input_size"])
    freeze_early(enc, cfg.encoder_freeze)

    def embedded(s: SampleTensors) -> SampleTensors:
        if s.patches is None:
            msg = "finetune_encoder=True needs every training and validation sample to carry its spot patches."
            raise ValueError(msg)
        # the stored spot views belong to the frozen encoder's feature space: dropped (tile views stay)
        x = embed_all(enc, s.patches, device=device, chunk=cfg.encoder_chunk).cpu()
        return s.replace(x_spot=x, x_spot_views=None)

    train, validation = replace_samples(train, validation, embedded)
    return train, validation, enc


def train_member(
    train: list[SampleTensors],
    validation: list[ValidationSet],
    cfg: ASIGNConfig,
    n_genes: int,
    device: str,
    *,
    finetune: dict[str, Any] | None = None,
    show_progress_bar: bool = False,
) -> tuple[dict[str, int], dict[str, Any], dict[str, Any]]:
    """Train one fresh model (seeded by ``cfg.seed``) on prepared samples.

    Returns the feature widths, the trained weights (CPU state dict) and the training record. With ``finetune``
    (see :func:`with_trainable_encoder`) the spot encoder is trained too and its :meth:`spec` joins the record.
    """
    import torch

    from ._finetune import attach_encoder
    from ._train import make_model, train_model

    t0 = time.perf_counter()
    enc = None
    if finetune is not None:
        train, validation, enc = with_trainable_encoder(train, validation, cfg, finetune, device)
    dims = feature_dims(train[0])
    model = make_model(n_genes, dims, cfg)
    if enc is not None:
        attach_encoder(model, enc)
    for lvl in dims:
        model.set_feature_stats(lvl, *feature_stats(train + [v.sample for v in validation], lvl, cfg.feature_scaling))
    if cfg.net_baseline == "none":
        model.init_head_bias(torch.nanmean(torch.cat([s.y for s in train]), dim=0))
    res = train_model(model, train, validation=validation or None, device=device, show_progress_bar=show_progress_bar)
    model.to("cpu")
    rec = res.to_uns()
    rec["seed"] = int(cfg.seed)
    rec["seconds_setup"] = float(time.perf_counter() - t0 - res.seconds)
    if enc is not None:
        rec["spot_encoder"] = enc.spec()
    return dims, {k: v.detach().cpu() for k, v in model.state_dict().items()}, rec
