"""Histopathology foundation-model encoders (``asign._foundation``): architectures, embeddings, weight loading."""

from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("timm")

from asign import _foundation  # noqa: E402
from asign._encoders import ENCODERS, available_encoders, get_encoder  # noqa: E402
from asign._foundation import FOUNDATION_MODELS, FoundationModel, build_foundation, embed_tokens, foundation_vit  # noqa: E402

TINY = FoundationModel(
    name="tiny-vit",
    hub_id="example/tiny-vit",
    dim=2 * 32,
    n_parameters_published=(0.0, 1.0),
    vit_args={"patch_size": 8, "embed_dim": 32, "depth": 2, "num_heads": 2, "init_values": 1e-5, "reg_tokens": 2},
    extra_args=_foundation._swiglu,
    pool="cls+mean",
    mean=(0.7, 0.6, 0.7),
    std=(0.2, 0.2, 0.2),
    input_size=32,
)


@pytest.fixture
def tiny(monkeypatch):
    monkeypatch.setitem(FOUNDATION_MODELS, TINY.name, TINY)
    return TINY.name


@pytest.mark.parametrize("name", sorted(FOUNDATION_MODELS))
def test_architectures_match_the_published_models(name):
    """Built on the meta device (no memory, no download): size, register tokens and embedding width."""
    model = FOUNDATION_MODELS[name]
    net = foundation_vit(model, device="meta")
    n = sum(p.numel() for p in net.parameters()) / 1e6
    value, half_width = model.n_parameters_published
    assert abs(n - value) <= half_width, f"{name}: {n:.2f} M parameters, published {value} ± {half_width}"
    assert net.num_prefix_tokens == 1 + int(model.vit_args.get("reg_tokens", 0))
    with torch.device("meta"):
        out = embed_tokens(net, torch.zeros(2, 3, model.input_size, model.input_size), model.pool)
    assert tuple(out.shape) == (2, model.dim)
    assert name in available_encoders() and ENCODERS[name].dim == model.dim


def test_embedding_is_class_token_plus_mean_of_patch_tokens(tiny):
    enc = build_foundation(tiny, "random", None).to("cpu")
    assert enc.dim == 64 and enc.input_size == 32 and enc.weights == "random"
    assert enc.mean == TINY.mean and enc.std == TINY.std
    g = torch.Generator().manual_seed(0)
    batch = torch.randint(0, 256, (3, 3, 32, 32), dtype=torch.uint8, generator=g)
    with torch.inference_mode():
        feats = enc(batch)
        vit = enc.module.net
        x = (batch.float() / 255 - torch.tensor(TINY.mean).view(1, 3, 1, 1)) / torch.tensor(TINY.std).view(1, 3, 1, 1)
        tokens = vit.forward_features(x)
    assert feats.shape == (3, 64)
    # the register tokens (1 and 2) are left out of the mean; the class token comes first
    np.testing.assert_allclose(feats[:, :32].numpy(), tokens[:, 0].numpy(), rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(feats[:, 32:].numpy(), tokens[:, 3:].mean(1).numpy(), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("suffix", [".pth", ".safetensors"])
def test_local_checkpoint_round_trip_and_wrong_file(tiny, tmp_path, suffix):
    ref = build_foundation(tiny, "random", None)
    sd = {k: v.clone() + 0.01 for k, v in ref.module.net.state_dict().items()}  # differs from the seeded init
    path = tmp_path / f"ckpt{suffix}"
    if suffix == ".safetensors":
        from safetensors.torch import save_file

        save_file(sd, str(path))
    else:
        torch.save({"model": sd}, path)
    enc = build_foundation(tiny, str(path), None)
    assert enc.weights == str(path)
    for k, v in enc.module.net.state_dict().items():
        assert torch.equal(v, sd[k])
    # a checkpoint of another architecture (one block fewer) is refused with the differing keys
    other = {k: v for k, v in sd.items() if not k.startswith("blocks.1.")}
    bad = tmp_path / "other.pth"
    torch.save(other, bad)
    with pytest.raises(ValueError, match=r"do not match encoder 'tiny-vit': \d+ missing key\(s\)"):
        build_foundation(tiny, str(bad), None)


def test_hub_download_and_its_error(tiny, tmp_path, monkeypatch):
    import huggingface_hub

    ref = build_foundation(tiny, "random", None)
    path = tmp_path / "pytorch_model.bin"
    torch.save(ref.module.net.state_dict(), path)
    asked = []

    def fake_download(repo_id, filename, **kwargs):
        asked.append((repo_id, filename))
        if filename != "pytorch_model.bin":
            msg = f"{filename} is not in {repo_id}"
            raise FileNotFoundError(msg)
        return str(path)

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", fake_download)
    enc = build_foundation(tiny, None, None)
    assert asked == [("example/tiny-vit", "model.safetensors"), ("example/tiny-vit", "pytorch_model.bin")]
    assert enc.weights.startswith("hf-hub:example/tiny-vit")

    def gated(repo_id, filename, **kwargs):
        msg = "401 Client Error: access to model example/tiny-vit is restricted"
        raise PermissionError(msg)

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", gated)
    with pytest.raises(ValueError, match=r"gated: request access.*HF_TOKEN.*weights='<path"):
        build_foundation(tiny, None, None)


def test_finetuning_wraps_a_foundation_encoder(tiny, monkeypatch):
    from asign._encoders import EncoderSpec
    from asign._model._finetune import build_spot_encoder, freeze_early

    monkeypatch.setitem(
        ENCODERS,
        tiny,
        EncoderSpec(name=tiny, dim=TINY.dim, description="", build=lambda w, s: build_foundation(tiny, w, s)),
    )
    spot = build_spot_encoder(tiny, weights="random", input_size=32)
    assert spot.dim == 64
    freeze_early(spot, 0.5)
    out = spot(torch.randint(0, 256, (2, 3, 32, 32), dtype=torch.uint8))
    assert out.shape == (2, 64)
    out.sum().backward()
    assert any(p.grad is not None for p in spot.net.parameters() if p.requires_grad)


def test_generic_timm_error_names_the_registry_models(monkeypatch):
    import builtins

    real_import = builtins.__import__

    def no_timm(name, *args, **kwargs):
        if name == "timm":
            msg = "no timm"
            raise ImportError(msg)
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_timm)
    with pytest.raises(ImportError, match=r"registry names of their own: \['h-optimus-0', 'uni'"):
        get_encoder("timm:vit_small_patch16_224")
    with pytest.raises(ImportError, match=r"encoder 'uni' needs timm"):
        get_encoder("uni", weights="random")


def test_extract_features_with_a_foundation_encoder(tiny, small_stack, tmp_path, monkeypatch):
    """Through the public API: a registered foundation encoder with a local checkpoint, recorded in uns."""
    import asign
    from asign._encoders import EncoderSpec

    monkeypatch.setitem(
        ENCODERS,
        tiny,
        EncoderSpec(name=tiny, dim=TINY.dim, description="", build=lambda w, s: build_foundation(tiny, w, s)),
    )
    path = tmp_path / "tiny.pth"
    torch.save(build_foundation(tiny, "random", None).module.net.state_dict(), path)
    res = asign.pp.extract_features(
        small_stack,
        encoder=tiny,
        weights=str(path),
        sections=["S1"],
        scales={"spot": 32, "region": 128, "global": 256},
        input_size=32,
        show_progress_bar=False,
        inplace=False,
    )
    assert res.params["dim"] == 64 and res.params["encoder"] == tiny and res.params["weights"] == str(path.resolve())
    from asign._encoders import file_sha256

    assert res.params["weights_sha256"] == file_sha256(path) and len(file_sha256(path)) == 16
    rows = small_stack.tables["table"].obs["section"].astype(str).to_numpy() == "S1"
    f = res.features_spot[rows]
    assert f.shape == (int(rows.sum()), 64) and np.isfinite(f).all() and f.std(axis=0).max() > 0
