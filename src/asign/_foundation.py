"""Histopathology foundation models as registry encoders of :func:`asign.pp.extract_features` (issue 5).

Each entry is a timm :class:`~timm.models.VisionTransformer` built with the architecture its model card gives, the
card's input normalisation and its recommended embedding (the class token, or the class token concatenated with the
mean of the patch tokens). Weights come from

- a **local checkpoint** (``weights="/path/pytorch_model.bin"`` or ``.safetensors`` / ``.pth``): the usual way on an
  offline machine; loaded strictly, so a file of another model fails with the keys and shapes that differ;
- the **Hugging Face hub** (``weights=None``): the checkpoint file is downloaded (and cached) with
  :func:`huggingface_hub.hf_hub_download` and loaded the same way. These models are gated: request access on the
  model's page and log in (``huggingface-cli login`` or ``HF_TOKEN``) first;
- ``weights="random"``: a seeded random initialisation of the same architecture (tests, throughput).

The models are large (0.3–1.1 billion parameters): use a GPU. Their licences restrict use (mostly research only);
read the model card before use. The architectures are checked in ``tests/test_foundation.py`` (parameter counts
against the published sizes, token layout and output width) without downloading anything; a checkpoint is always
loaded strictly (every key and shape must match).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal

if TYPE_CHECKING:
    import torch

    from ._encoders import Encoder

OPTIMUS_MEAN = (0.707223, 0.578729, 0.703617)
OPTIMUS_STD = (0.211883, 0.230117, 0.177517)
CHECKPOINT_FILES = ("model.safetensors", "pytorch_model.bin")


def _swiglu() -> dict[str, Any]:
    import torch
    from timm.layers import SwiGLUPacked

    return {"mlp_layer": SwiGLUPacked, "act_layer": torch.nn.SiLU}


@dataclass(frozen=True)
class FoundationModel:
    """A foundation-model entry: where its weights live, how to build it and how to read its embedding."""

    name: str
    hub_id: str
    dim: int
    n_parameters_published: tuple[float, float]
    """Published parameter count in millions (model card or paper) and the half-width of its rounding; the tests
    check the built architecture against it."""
    vit_args: dict[str, Any]
    extra_args: Callable[[], dict[str, Any]] | None = None
    """Arguments that need timm or torch objects (built when the model is)."""
    pool: Literal["cls", "cls+mean"] = "cls"
    mean: tuple[float, float, float] = (0.485, 0.456, 0.406)
    std: tuple[float, float, float] = (0.229, 0.224, 0.225)
    input_size: int = 224
    description: str = ""

    def arguments(self) -> dict[str, Any]:
        """Keyword arguments of :class:`timm.models.VisionTransformer`."""
        out = {"img_size": self.input_size, "num_classes": 0, "dynamic_img_size": True, **self.vit_args}
        if self.extra_args is not None:
            out.update(self.extra_args())
        return out


# Virchow's ViT-H/14 (Virchow2 adds 4 register tokens)
_VIRCHOW = {"patch_size": 14, "embed_dim": 1280, "depth": 32, "num_heads": 16, "mlp_ratio": 5.3375, "init_values": 1e-5}

FOUNDATION_MODELS: dict[str, FoundationModel] = {
    m.name: m
    for m in (
        FoundationModel(
            name="uni",
            hub_id="MahmoodLab/UNI",
            dim=1024,
            n_parameters_published=(303.0, 1.0),
            vit_args={"patch_size": 16, "embed_dim": 1024, "depth": 24, "num_heads": 16, "init_values": 1e-5},
            description="UNI (Chen et al., Nat. Med. 2024): ViT-L/16, class token",
        ),
        FoundationModel(
            name="uni2-h",
            hub_id="MahmoodLab/UNI2-h",
            dim=1536,
            n_parameters_published=(681.0, 1.0),
            vit_args={
                "patch_size": 14,
                "embed_dim": 1536,
                "depth": 24,
                "num_heads": 24,
                "mlp_ratio": 2.66667 * 2,
                "init_values": 1e-5,
                "no_embed_class": True,
                "reg_tokens": 8,
            },
            extra_args=_swiglu,
            description="UNI2-h (MahmoodLab): ViT-H/14 with 8 register tokens and SwiGLU, class token",
        ),
        FoundationModel(
            name="virchow",
            hub_id="paige-ai/Virchow",
            dim=2560,
            n_parameters_published=(632.0, 1.5),
            vit_args=_VIRCHOW,
            extra_args=_swiglu,
            pool="cls+mean",
            description="Virchow (Vorontsov et al., Nat. Med. 2024): ViT-H/14, class token + mean of the patch tokens",
        ),
        FoundationModel(
            name="virchow2",
            hub_id="paige-ai/Virchow2",
            dim=2560,
            n_parameters_published=(632.0, 1.5),
            vit_args={**_VIRCHOW, "reg_tokens": 4},
            extra_args=_swiglu,
            pool="cls+mean",
            description="Virchow2 (Zimmermann et al. 2024): ViT-H/14 with 4 register tokens, class token + mean of "
            "the patch tokens (register tokens left out)",
        ),
        FoundationModel(
            name="h-optimus-0",
            hub_id="bioptimus/H-optimus-0",
            dim=1536,
            n_parameters_published=(1100.0, 50.0),
            vit_args={
                "patch_size": 14,
                "embed_dim": 1536,
                "depth": 40,
                "num_heads": 24,
                "mlp_ratio": 5.33334,
                "init_values": 1e-5,
                "no_embed_class": True,
                "reg_tokens": 4,
            },
            extra_args=_swiglu,
            mean=OPTIMUS_MEAN,
            std=OPTIMUS_STD,
            description="H-optimus-0 (Bioptimus): ViT-g/14 with 4 register tokens, class token, its own normalisation",
        ),
    )
}


def foundation_vit(model: FoundationModel, *, device: torch.device | str | None = None) -> torch.nn.Module:
    """The model's :class:`timm.models.VisionTransformer` with a seeded random initialisation."""
    import torch
    from timm.models import VisionTransformer

    from ._encoders import _seeded

    with _seeded(0), torch.device(device or "cpu"):
        return VisionTransformer(**model.arguments())


def embed_tokens(net: torch.nn.Module, x: torch.Tensor, pool: str) -> torch.Tensor:
    """The model card's embedding from ``net.forward_features(x)`` (final-normed tokens ``(B, N, D)``)."""
    import torch

    tokens = net.forward_features(x)
    cls = tokens[:, 0]
    if pool == "cls":
        return cls
    return torch.cat([cls, tokens[:, int(net.num_prefix_tokens) :].mean(dim=1)], dim=-1)


def _hub_checkpoint(model: FoundationModel) -> str:
    try:
        from huggingface_hub import hf_hub_download
    except ImportError as e:  # pragma: no cover - huggingface_hub comes with timm
        msg = f"encoder {model.name!r} with weights=None needs huggingface_hub (pip install huggingface_hub)."
        raise ImportError(msg) from e
    errors = []
    for filename in CHECKPOINT_FILES:
        try:
            return hf_hub_download(model.hub_id, filename=filename)
        except Exception as e:  # noqa: BLE001 - try the next file name, report all at the end
            errors.append(f"{filename}: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}")
    msg = (
        f"Could not download the weights of encoder {model.name!r} from the Hugging Face hub "
        f"(https://huggingface.co/{model.hub_id}; tried {list(CHECKPOINT_FILES)}: {'; '.join(errors)}). The model is "
        "gated: request access on its page, then log in (huggingface-cli login, or set HF_TOKEN). Offline, download "
        "the checkpoint elsewhere and pass weights='<path to the file>'."
    )
    raise ValueError(msg)


def build_foundation(name: str, weights: str | None, input_size: int | None) -> Encoder:
    """Build the registry encoder ``name`` (a key of :data:`FOUNDATION_MODELS`)."""
    from ._encoders import Encoder, _feature_module, _torch_load, load_weights

    model = FOUNDATION_MODELS[name]
    try:
        import timm  # noqa: F401
    except ImportError as e:
        msg = f"encoder {name!r} needs timm, an optional extra: pip install 'asign[timm]' (or pip install timm)."
        raise ImportError(msg) from e
    net = foundation_vit(model)
    if weights == "random":
        desc = "random"
    else:
        if weights in (None, "pretrained"):
            source = _hub_checkpoint(model)
            desc = f"hf-hub:{model.hub_id} ({source})"
        else:
            source = desc = str(weights)
        load_weights(net, _torch_load(source), name=name, source=source)

    def forward(vit: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
        return embed_tokens(vit, x, model.pool)

    return Encoder(
        name=name,
        dim=model.dim,
        weights=desc,
        module=_feature_module(forward, net),
        mean=model.mean,
        std=model.std,
        input_size=input_size or model.input_size,
    )
