"""End-to-end fine-tuning of the spot encoder on patches (asign._model._finetune; issue 6)."""

from __future__ import annotations

import copy

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("torch_geometric")
from torch import nn  # noqa: E402

import asign  # noqa: E402
from asign._model import ASIGNConfig, make_model, predict_sample, train_model  # noqa: E402
from asign._model._finetune import (  # noqa: E402
    attach_encoder,
    augment,
    build_spot_encoder,
    encoder_bytes_per_patch,
    freeze_early,
    read_spot_patches,
    spot_encoder,
)
from asign._model._synthetic import random_sample  # noqa: E402

TINY = {"hidden_dim": 16, "attn_heads": 4, "gat_heads": 4, "max_epochs": 3, "steps_per_epoch": 2}


class TinyCNN(nn.Module):
    """A small random-init CNN with a batch-norm layer (32 px patches -> 16-d feature map)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, stride=2)
        self.bn = nn.BatchNorm2d(8)
        self.conv2 = nn.Conv2d(8, 16, 3, stride=2)

    def forward(self, x):
        return self.conv2(torch.relu(self.bn(self.conv1(x))))


def _tiny() -> TinyCNN:
    with torch.random.fork_rng():
        torch.manual_seed(0)
        return TinyCNN()


@pytest.fixture(scope="module")
def _prepared(_small_stack, prepare_for_asign):
    return prepare_for_asign(copy.deepcopy(_small_stack))


@pytest.fixture
def stack(_prepared):
    return copy.deepcopy(_prepared)


def test_spot_encoder_unit():
    enc = build_spot_encoder(_tiny(), input_size=32)
    assert enc.dim == 16 and enc.user_module and all(p.requires_grad for p in enc.parameters())
    x = torch.randint(0, 256, (5, 3, 32, 32), dtype=torch.uint8)
    out = enc(x)
    assert out.shape == (5, 16) and out.dtype == torch.float32
    enc.train()
    assert enc.training and not enc.net.bn.training  # batch-norm keeps its running statistics
    assert freeze_early(enc, 0.5) == 3
    assert [p.requires_grad for p in enc.net.parameters()] == [False, False, False, True, True, True]
    with pytest.raises(ValueError, match="cannot be fine-tuned"):
        build_spot_encoder("handcrafted", input_size=32)
    # augmentation: each patch is one of the 8 flips / 90-degree rotations of itself
    g = torch.Generator().manual_seed(0)
    a = augment(x, g)
    for i in range(5):
        variants = [torch.rot90(v, k, dims=(1, 2)) for v in (x[i], torch.flip(x[i], dims=(2,))) for k in range(4)]
        assert any(torch.equal(a[i], v) for v in variants)
    assert encoder_bytes_per_patch(enc) > 0


def test_encode_step_checkpointing_same_gradients_less_memory():
    from asign._model._finetune import encode_step

    s, _ = random_sample(n_sections=2, spots_per_section=20, n_genes=4, feature_dim=16, seed=0)
    g = torch.Generator().manual_seed(0)
    s = s.replace(patches=torch.randint(0, 256, (s.n_spots, 3, 32, 32), dtype=torch.uint8, generator=g))
    rows = s.section == 0
    grads, saved = [], []
    for ckpt in (False, True):
        model = make_model(4, {"spot": 16, "region": 16, "global": 16}, ASIGNConfig(**TINY, encoder_chunk=8))
        model.config.encoder_checkpoint = ckpt
        attach_encoder(model, build_spot_encoder(_tiny(), input_size=32))
        size = [0]

        def pack(t, size=size):
            size[0] += t.numel() * t.element_size()
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            x = encode_step(model, s, rows).x_spot
        assert x.requires_grad and x.shape == (s.n_spots, 16)
        (x[rows] ** 2).sum().backward()
        grads.append(model.spot_encoder.net.conv1.weight.grad.clone())
        saved.append(size[0])
        # rows outside the loss set carry no gradient into the encoder
        model.zero_grad()
        encode_step(model, s, rows).x_spot[~rows].sum().backward()
        gw = model.spot_encoder.net.conv1.weight.grad
        assert gw is None or float(gw.abs().max()) == 0.0
    torch.testing.assert_close(grads[0], grads[1])
    assert saved[1] < 0.5 * saved[0]


def test_read_spot_patches_pads_white():
    rng = np.random.default_rng(0)
    img = rng.integers(0, 255, (3, 40, 50), dtype=np.uint8)
    xy = np.array([[10.2, 12.7], [1.0, 1.0], [48.6, 39.4]])
    p = read_spot_patches([img], np.zeros(3, int), xy, [8], input_size=8)
    assert p.shape == (3, 3, 8, 8) and p.dtype == torch.uint8
    np.testing.assert_array_equal(p[0].numpy(), img[:, 13 - 4 : 13 + 4, 10 - 4 : 10 + 4])
    assert (p[1, :, :3, :].numpy() == 255).all() and (p[1, :, 3:, 3:].numpy() == img[:, :5, :5]).all()
    assert (p[2, :, 5:, :].numpy() == 255).all()
    with pytest.raises(ValueError, match="no image"):
        read_spot_patches([None], np.zeros(3, int), xy, [8], input_size=8)


def test_train_model_with_encoder_and_subgraphs():
    s, _ = random_sample(n_sections=2, spots_per_section=40, n_genes=6, feature_dim=16, seed=3)
    g = torch.Generator().manual_seed(1)
    s = s.replace(patches=torch.randint(0, 256, (s.n_spots, 3, 32, 32), dtype=torch.uint8, generator=g))
    cfg = ASIGNConfig(
        **TINY, lr=3e-3, patience=0, finetune_encoder=True, encoder_lr=1e-2, subgraph="always", batch_size=16
    )
    preds, weights = [], []
    for _ in range(2):
        model = make_model(s.n_genes, {"spot": 16, "region": 16, "global": 16}, cfg)
        enc = build_spot_encoder(_tiny(), input_size=32)
        attach_encoder(model, enc)
        w0 = enc.net.conv1.weight.detach().clone()
        res = train_model(model, [s], show_progress_bar=False)
        assert res.subgraph == [True]
        assert not torch.equal(w0, enc.net.conv1.weight)  # the encoder was trained
        preds.append(predict_sample(model, s)["pred"])
        weights.append(enc.net.conv1.weight.detach().clone())
    np.testing.assert_array_equal(preds[0], preds[1])  # seeded: augmentation, seeds and dropout
    assert torch.equal(weights[0], weights[1])
    assert np.isfinite(preds[0]).all()
    # the encoder's features, not the cached ones, are used at inference
    p_cached = predict_sample(model, s.replace(patches=None))["pred"]
    assert not np.allclose(p_cached, preds[0])
    with pytest.raises(ValueError, match="no patches"):
        train_model(model, [s.replace(patches=None)], show_progress_bar=False)


def test_finetune_fit_save_load(stack, tmp_path):
    tiny = _tiny()
    w0 = copy.deepcopy(tiny.state_dict())
    config = {**TINY, "finetune_encoder": True, "encoder": tiny, "encoder_lr": 1e-2, "encoder_freeze": 0.0}
    fitted = asign.tl.fit(stack, known="S1", n_genes=10, config=config, seed=2, n_models=1, show_progress_bar=False)
    enc = spot_encoder(fitted.model)
    assert enc is not None and enc.input_size == 32
    assert fitted.options["encoder"] == "TinyCNN" and fitted.model.feature_dims["spot"] == 16
    changed = [
        not torch.equal(v, w0[k]) for k, v in enc.net.state_dict().items() if "running" not in k and "num_b" not in k
    ]
    assert all(changed)  # every trainable tensor moved
    assert all(torch.equal(v, w0[k]) for k, v in tiny.state_dict().items())  # the user's module is untouched
    out = asign.tl.predict(stack, fitted, known="S1", inplace=False, show_progress_bar=False)
    assert np.isfinite(out.layers["imputed"]).all()
    path = tmp_path / "ft.pt"
    fitted.save(path)
    payload = torch.load(path, weights_only=True)
    assert payload["format_version"] == 2 and payload["spot_encoder"]["user_module"] is True
    assert any(k.startswith("spot_encoder.net.") for k in payload["state_dicts"][0])
    with pytest.raises(ValueError, match="encoder=<a module"):
        asign.tl._fit.ASIGNFit.load(path)
    loaded = asign.tl._fit.ASIGNFit.load(path, encoder=TinyCNN())
    assert loaded.config == fitted.config and loaded.config.finetune_encoder
    out2 = asign.tl.predict(stack, loaded, known="S1", inplace=False, show_progress_bar=False)
    np.testing.assert_array_equal(out.layers["imputed"], out2.layers["imputed"])
    # the default (no fine-tuning) still writes format 1 without an encoder
    plain = asign.tl.fit(stack, known="S1", n_genes=10, config=TINY, seed=2, n_models=1, show_progress_bar=False)
    plain.save(tmp_path / "plain.pt")
    p = torch.load(tmp_path / "plain.pt", weights_only=True)
    assert p["format_version"] == 1 and "spot_encoder" not in p
    assert spot_encoder(plain.model) is None


def test_finetune_needs_a_torch_encoder(stack):
    # the features were extracted with the handcrafted (non-torch) encoder: fine-tuning needs a torch one
    with pytest.raises(ValueError, match="cannot be fine-tuned"):
        asign.tl.fit(
            stack,
            known="S1",
            n_genes=10,
            config={**TINY, "finetune_encoder": True},
            n_models=1,
            show_progress_bar=False,
        )


def test_encoder_options_need_finetune_encoder(stack):
    """`encoder` / `encoder_weights` / `encoder_input_size` without finetune_encoder=True used to be ignored while
    uns recorded the encoder as used; an unknown encoder name was blamed on feature extraction; feature_key=None gave
    a KeyError on `uns['None_features']`. All are refused before any work."""
    kw = {"known": "S1", "method": "asign", "n_genes": 10, "inplace": False, "show_progress_bar": False}
    for opts, shown in (
        ({"encoder": _tiny()}, "encoder=<TinyCNN>"),
        ({"encoder": "resnet50"}, "encoder='resnet50'"),
        ({"encoder_weights": "random"}, "encoder_weights='random'"),
        ({"encoder_input_size": 32}, "encoder_input_size=32"),
    ):
        with pytest.raises(ValueError, match=rf"method 'asign': {shown} applies to encoder fine-tuning only"):
            asign.tl.impute(stack, method_kwargs={**TINY, **opts}, **kw)
    with pytest.raises(ValueError, match="encoder fine-tuning only"):
        asign.tl.fit(stack, known="S1", n_genes=10, config={**TINY, "encoder": _tiny()}, show_progress_bar=False)
    with pytest.raises(ValueError) as e:
        asign.tl.impute(stack, method_kwargs={**TINY, "finetune_encoder": True, "encoder": "resnet18"}, **kw)
    msg = str(e.value)
    assert "encoder='resnet18', which is not in the encoder registry; available: [" in msg
    assert "'resnet50'" in msg and "extracted with" not in msg
    with pytest.raises(ValueError, match=r"finetune_encoder=True needs image features .*feature_key=None"):
        asign.tl.impute(
            stack, method_kwargs={**TINY, "finetune_encoder": True, "encoder": _tiny(), "feature_key": None}, **kw
        )
    # the defaults (and None for the weights) are no request: training runs without an encoder
    out = asign.tl.impute(
        stack,
        method_kwargs={**TINY, "max_epochs": 1, "n_models": 1, "encoder": "", "encoder_weights": None},
        **kw,
    )
    assert out.uns["asign"]["result"]["options"]["encoder"] == ""
