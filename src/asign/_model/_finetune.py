"""End-to-end fine-tuning of the spot encoder on patches (``ASIGNConfig.finetune_encoder``; issue 6).

The spot level's input features are computed inside training by a trainable copy of an image encoder of the
registry (:func:`asign._encoders.get_encoder`: ``efficientnet_lite0``, ``resnet50``, ``timm:<name>``, or a user
:class:`torch.nn.Module`). The spot patches are read once from the images (uint8, ``(N, 3, S, S)`` at the encoder's
input size, kept in CPU memory: about ``150 kB`` per spot at 224 px) and passed through the encoder for the spots of
each (sub)graph step. Region and global tiles keep their frozen cached features, as in the paper (only the spot
encoder is updated).

- Gradients flow through the encoder for the step's loss rows (the seeds of a subgraph step); the other spots of the
  step are embedded by the same, current encoder without gradient. With ``encoder_checkpoint`` (default) the
  encoder runs in chunks of ``encoder_chunk`` patches under activation checkpointing, so its activation memory is
  that of one chunk (about 85 MiB per 224 px patch for EfficientNet-Lite0 and 170 MiB for ResNet-50 in float32,
  measured by :func:`encoder_bytes_per_patch`), at the price of a second forward pass of the loss rows.
- The encoder has its own (lower) learning rate ``encoder_lr``; ``encoder_freeze`` keeps a leading fraction of its
  parameter tensors frozen; batch-norm layers keep their running statistics (always in eval mode).
- Training augments patches with random flips and 90-degree rotations (``encoder_augment``), channels-last, under
  the training loop's bfloat16 autocast on CUDA. On the CPU it works but is slow, and a warning says so.
- The encoder is attached to the :class:`~asign._model.ASIGNModel` as the submodule ``spot_encoder``, so its
  weights are part of the model's ``state_dict`` (saved by :meth:`asign.tl.ASIGNFit.save`); :meth:`SpotEncoder.spec`
  is the plain description needed to rebuild its architecture when loading.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch import nn

from asign._logging import logger

if TYPE_CHECKING:
    from ._data import SampleTensors
    from ._model import ASIGNModel

Tensor = torch.Tensor


class SpotEncoder(nn.Module):
    """A trainable image encoder: uint8 patches ``(B, 3, S, S)`` to float32 features ``(B, dim)``.

    Parameters
    ----------
    net
        Module mapping normalised float input ``(B, 3, S, S)`` to ``(B, dim)`` or a feature map (average-pooled).
    dim
        Feature width.
    mean, std
        Input normalisation (RGB, 0-1 scale).
    name
        Registry name (``""`` and ``user_module=True`` for a user module).
    input_size
        Patch side the encoder reads.
    user_module
        The architecture was given by the user (loading a saved model then needs the same module class).
    """

    def __init__(
        self,
        net: nn.Module,
        *,
        dim: int,
        mean: Sequence[float],
        std: Sequence[float],
        name: str = "",
        input_size: int = 224,
        user_module: bool = False,
    ) -> None:
        super().__init__()
        self.net = net
        self.dim = int(dim)
        self.name = str(name)
        self.input_size = int(input_size)
        self.user_module = bool(user_module)
        self.register_buffer("mean", torch.as_tensor(mean, dtype=torch.float32).view(1, 3, 1, 1) * 255.0)
        self.register_buffer("std", torch.as_tensor(std, dtype=torch.float32).view(1, 3, 1, 1) * 255.0)

    def spec(self) -> dict[str, Any]:
        """Plain description of the architecture (stored next to the weights)."""
        return {
            "name": self.name,
            "dim": self.dim,
            "input_size": self.input_size,
            "user_module": self.user_module,
            "mean": [float(v) / 255.0 for v in self.mean.flatten().tolist()],
            "std": [float(v) / 255.0 for v in self.std.flatten().tolist()],
        }

    def train(self, mode: bool = True) -> SpotEncoder:  # noqa: FBT001, FBT002 - nn.Module's signature
        """Training mode everywhere except batch-norm layers, which keep their running statistics."""
        super().train(mode)
        for m in self.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                m.eval()
        return self

    def forward(self, x: Tensor) -> Tensor:
        from asign._encoders import _pool_output

        x = (x.float() - self.mean) / self.std
        if x.device.type == "cuda":
            x = x.contiguous(memory_format=torch.channels_last)
        return _pool_output(self.net(x), self.name or type(self.net).__name__).float()


def build_spot_encoder(
    encoder: str | nn.Module,
    *,
    weights: str | None = None,
    input_size: int = 224,
    dim: int | None = None,
) -> SpotEncoder:
    """A trainable :class:`SpotEncoder` from the registry (or a user module), with every parameter unfrozen."""
    from asign._encoders import get_encoder

    user = isinstance(encoder, nn.Module)
    enc = get_encoder(encoder, weights=weights, input_size=int(input_size), dim=dim)
    if not enc.is_torch:
        msg = (
            f"Encoder {enc.name!r} is not a torch module and cannot be fine-tuned; pass a torch encoder "
            "(e.g. encoder='efficientnet_lite0' or a torch.nn.Module) or finetune_encoder=False."
        )
        raise ValueError(msg)
    net = enc.module
    for p in net.parameters():
        p.requires_grad_(requires_grad=True)
    return SpotEncoder(
        net,
        dim=enc.dim,
        mean=enc.mean,
        std=enc.std,
        name="" if user else enc.name,
        input_size=int(input_size),
        user_module=user,
    )


def spot_encoder_from_spec(spec: dict[str, Any], module: nn.Module | None = None) -> SpotEncoder:
    """Rebuild the architecture described by :meth:`SpotEncoder.spec` (weights are loaded afterwards)."""
    if spec.get("user_module"):
        if module is None:
            msg = (
                "This model's spot encoder was fine-tuned from a user torch.nn.Module; load it with "
                "`ASIGNFit.load(path, encoder=<a module of the same architecture>)`."
            )
            raise ValueError(msg)
        net = module
    else:
        from asign._encoders import get_encoder

        net = get_encoder(spec["name"], weights="random", input_size=int(spec["input_size"])).module
    return SpotEncoder(
        net,
        dim=int(spec["dim"]),
        mean=spec["mean"],
        std=spec["std"],
        name=str(spec["name"]),
        input_size=int(spec["input_size"]),
        user_module=bool(spec.get("user_module", False)),
    )


def freeze_early(encoder: SpotEncoder, fraction: float) -> int:
    """Freeze the leading ``fraction`` of the encoder's parameter tensors (input side); returns how many."""
    params = list(encoder.net.parameters())
    k = int(round(float(fraction) * len(params)))
    for i, p in enumerate(params):
        p.requires_grad_(requires_grad=i >= k)
    return k


def attach_encoder(model: ASIGNModel, encoder: SpotEncoder) -> None:
    """Register ``encoder`` as ``model.spot_encoder`` (its weights join the model's ``state_dict``)."""
    if int(model.feature_dims.get("spot", -1)) != encoder.dim:
        msg = f"The encoder gives {encoder.dim}-d features but the model's spot level expects {model.feature_dims['spot']}."
        raise ValueError(msg)
    model.spot_encoder = encoder


def spot_encoder(model: nn.Module) -> SpotEncoder | None:
    """The model's fine-tuned spot encoder, or `None`."""
    enc = getattr(model, "spot_encoder", None)
    return enc if isinstance(enc, SpotEncoder) else None


def augment(x: Tensor, generator: torch.Generator) -> Tensor:
    """A random element of the dihedral group (flips and 90-degree rotations) per patch."""
    t = torch.randint(8, (x.shape[0],), generator=generator).to(x.device)
    out = x.clone()
    for k in range(8):
        sel = torch.nonzero(t == k, as_tuple=False).squeeze(1)
        if sel.numel() == 0 or k == 0:
            continue
        p = x[sel]
        if k >= 4:
            p = torch.flip(p, dims=(3,))
        out[sel] = torch.rot90(p, k % 4, dims=(2, 3))
    return out


def _encode(
    encoder: SpotEncoder,
    patches: Tensor,
    rows: Tensor,
    *,
    device: torch.device,
    chunk: int,
    generator: torch.Generator | None,
    checkpoint: bool = False,
) -> Tensor:
    from torch.utils.checkpoint import checkpoint as _checkpoint

    outs = []
    for part in rows.split(int(chunk)):
        x = patches[part.cpu()].to(device, non_blocking=True)
        if generator is not None:
            x = augment(x, generator)
        if checkpoint and torch.is_grad_enabled():
            outs.append(_checkpoint(encoder, x, use_reentrant=False))
        else:
            outs.append(encoder(x))
    if not outs:
        return torch.zeros((0, encoder.dim), device=device)
    return torch.cat(outs)


@torch.no_grad()
def embed_all(encoder: SpotEncoder, patches: Tensor, *, device: torch.device | str = "cpu", chunk: int = 256) -> Tensor:
    """Features of every patch with the encoder in eval mode (no augmentation), float32 ``(N, dim)`` on ``device``.

    The encoder is moved to ``device`` (and stays there).
    """
    device = torch.device(device)
    encoder.to(device)
    was = encoder.training
    encoder.eval()
    try:
        return _encode(encoder, patches, torch.arange(patches.shape[0]), device=device, chunk=chunk, generator=None)
    finally:
        encoder.train(was)


def encode_step(
    model: ASIGNModel,
    sample: SampleTensors,
    grad_rows: Tensor,
    *,
    generator: torch.Generator | None = None,
) -> SampleTensors:
    """``sample`` with its spot features computed by ``model.spot_encoder`` from ``sample.patches``.

    Rows in ``grad_rows`` (bool) carry gradients into the encoder; the others are embedded without gradient.
    ``generator`` (training) draws the augmentations.
    """
    enc = spot_encoder(model)
    if enc is None or sample.patches is None:
        msg = "encode_step needs a model with a spot encoder and a sample with patches."
        raise ValueError(msg)
    device = sample.x_spot.device
    chunk = int(model.config.encoder_chunk)
    n = sample.n_spots
    g_idx = torch.nonzero(grad_rows, as_tuple=False).squeeze(1)
    o_idx = torch.nonzero(~grad_rows, as_tuple=False).squeeze(1)
    with torch.no_grad():
        x_other = _encode(enc, sample.patches, o_idx, device=device, chunk=chunk, generator=generator)
    x_grad = _encode(
        enc,
        sample.patches,
        g_idx,
        device=device,
        chunk=chunk,
        generator=generator,
        checkpoint=bool(model.config.encoder_checkpoint),
    )
    x = torch.zeros((n, enc.dim), dtype=x_grad.dtype, device=device)
    x = x.index_copy(0, o_idx.to(device), x_other.to(x.dtype)).index_copy(0, g_idx.to(device), x_grad)
    return sample.replace(x_spot=x)


def with_encoded_features(model: ASIGNModel, sample: SampleTensors) -> SampleTensors:
    """``sample`` with every spot feature computed by the (eval-mode) encoder; unchanged without encoder/patches."""
    enc = spot_encoder(model)
    if enc is None or sample.patches is None:
        return sample
    x = embed_all(enc, sample.patches, device=sample.x_spot.device, chunk=int(model.config.encoder_chunk))
    return sample.replace(x_spot=x, patches=None)  # the features are computed; the forward never reads patches


def encoder_bytes_per_patch(encoder: SpotEncoder, *, device: torch.device | str = "cpu", n: int = 2) -> float:
    """Autograd-saved bytes per patch of one training forward pass (measured on ``n`` blank patches)."""
    device = torch.device(device)
    size = [0]

    def pack(t: Tensor) -> Tensor:
        size[0] += t.numel() * t.element_size()
        return t

    x = torch.full((n, 3, encoder.input_size, encoder.input_size), 255, dtype=torch.uint8, device=device)
    was = encoder.training
    encoder.train()
    try:
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            encoder(x).sum()
    finally:
        encoder.train(was)
    return size[0] / n


def warn_if_cpu(device: torch.device | str) -> None:
    """Fine-tuning a CNN on the CPU works (tests) but is slow; say so."""
    if torch.device(device).type != "cuda":
        logger.warning(
            "finetune_encoder=True on the CPU: every training step runs the image encoder on the spot patches, "
            "which is slow on a CPU (minutes per epoch for a few thousand 224 px patches). Use a GPU (device='cuda')."
        )


# --------------------------------------------------------------------------------------------------- patch reading
def read_spot_patches(
    images: Sequence[Any],
    section: np.ndarray,
    xy: np.ndarray,
    sides: Sequence[int],
    *,
    input_size: int,
    batch_size: int = 64,
) -> Tensor:
    """The spot patches of one stack as a uint8 tensor ``(N, 3, input_size, input_size)``.

    Parameters
    ----------
    images
        Level-0 ``(3, H, W)`` image (numpy or dask) of each section, in cutting order.
    section
        Section index of every spot.
    xy
        ``(N, 2)`` spot centres (x, y) in the native pixels of their section.
    sides
        Spot patch side in native pixels, per section (``extract_features``' ``scales_px['spot']``).
    input_size
        Side the patches are resized to (antialiased bilinear, as :func:`asign.pp.extract_features`).
    batch_size
        Patches read per batch.

    Patches are centred on the spot centre rounded to the nearest pixel and padded with white outside the image,
    exactly like the frozen features.
    """
    from asign._patches import ImageSource, PatchDataset, PatchJob

    section = np.asarray(section, dtype=np.int64)
    xy = np.asarray(xy, dtype=np.float64)
    n = section.size
    out = torch.empty((n, 3, int(input_size), int(input_size)), dtype=torch.uint8)
    sources, jobs = [], []
    for i, img in enumerate(images):
        rows = np.flatnonzero(section == i)
        if rows.size == 0:
            continue
        if img is None:
            msg = f"Section {i} has spots but no image; its spot patches cannot be read for encoder fine-tuning."
            raise ValueError(msg)
        side = int(sides[i])
        cx = np.floor(xy[rows, 0] + 0.5).astype(np.int64)
        cy = np.floor(xy[rows, 1] + 0.5).astype(np.int64)
        sources.append(ImageSource(img))
        jobs.append(PatchJob(len(sources) - 1, cx - side // 2, cy - side // 2, side, rows, f"section {i} spot"))
    ds = PatchDataset(sources, jobs, batch_size=int(batch_size), input_size=int(input_size))
    for b in range(len(ds)):
        _, patches = ds[b]
        out[torch.as_tensor(ds.rows(b))] = patches
    return out
