"""GPU checks (``pytest -m gpu`` on a CUDA machine; skipped elsewhere).

They run the ASIGN core (torch + torch-geometric only) on CUDA with mixed precision and compare with the CPU, train
with per-view feature augmentation, and fine-tune a spot encoder on neighbour-sampled subgraphs under bf16 autocast. ``benchmarks/gpu_session.sh`` runs them.
"""

from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA"),
]


def _fold(fdim: int = 32):
    from asign._model import ValidationSet
    from asign._model._synthetic import random_sample

    samples, truths = [], []
    for i in range(3):
        s, y = random_sample(n_sections=3, spots_per_section=40, n_genes=20, feature_dim=fdim, seed=i, name=f"P{i}")
        samples.append(s)
        truths.append(y)
    val_sample, val_truth = samples[-1], truths[-1]
    known = (val_sample.section == 0).unsqueeze(1)
    y_vis = torch.where(known, torch.as_tensor(val_truth), torch.full_like(val_sample.y, float("nan")))
    val = ValidationSet(
        sample=val_sample.with_labels(y_vis), y_eval=torch.as_tensor(val_truth), eval_rows=(val_sample.section > 0)
    )
    return samples[:-1], val


@pytest.mark.parametrize("amp", [False, True])
def test_train_on_cuda_and_predict_like_cpu(amp):
    import copy

    from asign._model import ASIGNConfig, make_model, predict_sample, train_model

    train, val = _fold()
    cfg = ASIGNConfig(hidden_dim=32, max_epochs=3, patience=0, amp=amp, seed=0)
    model = make_model(20, {"spot": 32, "region": 32, "global": 32}, cfg)
    res = train_model(model, train, device=torch.device("cuda"), show_progress_bar=False)
    assert res.epochs_run == 3
    losses = [c["loss_total"] for c in res.curve]
    assert all(np.isfinite(losses))
    on_gpu = predict_sample(model, val.sample, device=torch.device("cuda"), amp=amp)["pred"]
    on_cpu = predict_sample(copy.deepcopy(model).cpu(), val.sample, device=torch.device("cpu"), amp=False)["pred"]
    assert np.isfinite(on_gpu).all()
    # the same weights give the same prediction on both devices (bf16 autocast loosens the tolerance)
    rel = np.linalg.norm(on_gpu - on_cpu) / np.linalg.norm(on_cpu)
    assert rel < (3e-2 if amp else 1e-3), rel


class _TinyCNN(torch.nn.Module):
    """A small random-init CNN with a batch-norm layer (32 px patches -> 16-d feature map)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = torch.nn.Conv2d(3, 8, 3, stride=2)
        self.bn = torch.nn.BatchNorm2d(8)
        self.conv2 = torch.nn.Conv2d(8, 16, 3, stride=2)

    def forward(self, x):
        return self.conv2(torch.relu(self.bn(self.conv1(x))))


def _finetune_on_subgraphs(device: str, *, amp: bool):
    """Train with a fine-tuned spot encoder on neighbour-sampled subgraphs; returns what the checks need."""
    from asign._model import ASIGNConfig, make_model, predict_sample, train_model
    from asign._model._finetune import attach_encoder, build_spot_encoder
    from asign._model._synthetic import random_sample

    s, _ = random_sample(n_sections=3, spots_per_section=80, n_genes=12, feature_dim=16, seed=5)
    g = torch.Generator().manual_seed(2)
    s = s.replace(patches=torch.randint(0, 256, (s.n_spots, 3, 32, 32), dtype=torch.uint8, generator=g))
    cfg = ASIGNConfig(
        hidden_dim=16,
        attn_heads=4,
        gat_heads=4,
        max_epochs=2,
        patience=0,
        lr=3e-3,
        amp=amp,
        finetune_encoder=True,
        encoder_lr=1e-2,
        encoder_freeze=0.0,
        subgraph="always",
        batch_size=48,
        seed=0,
    )
    model = make_model(s.n_genes, {"spot": 16, "region": 16, "global": 16}, cfg)
    with torch.random.fork_rng():
        torch.manual_seed(0)
        net = _TinyCNN()
    enc = build_spot_encoder(net, input_size=32)
    attach_encoder(model, enc)
    w0 = {k: v.detach().clone() for k, v in enc.net.state_dict().items() if "running" not in k and "num_b" not in k}
    res = train_model(model, [s], device=torch.device(device), show_progress_bar=False)
    moved = {k: not torch.equal(w0[k], v.detach().cpu()) for k, v in enc.net.state_dict().items() if k in w0}
    whole = predict_sample(model, s, device=torch.device(device), amp=amp, batch_size=0)
    batched = predict_sample(model, s, device=torch.device(device), amp=amp, batch_size=64)
    return res, moved, whole, batched, s.n_spots


def test_finetune_encoder_on_subgraphs_cuda_bf16():
    res, moved, whole, batched, n = _finetune_on_subgraphs("cuda", amp=True)
    assert res.subgraph == [True]
    assert res.n_steps > res.epochs_run  # several subgraph steps per epoch
    assert all(np.isfinite(c["loss_total"]) for c in res.curve)
    assert all(moved.values()), moved  # every encoder tensor was trained
    assert res.peak_memory_bytes > 0
    for out in (whole, batched):
        assert out["pred"].shape == (n, 12)
        assert np.isfinite(out["pred"]).all()
    # exact batched inference (full 3-hop neighbourhoods) matches the whole graph up to bf16 / atomics rounding
    rel = np.linalg.norm(batched["pred"] - whole["pred"]) / np.linalg.norm(whole["pred"])
    assert rel < 3e-2, rel


def test_device_none_picks_cuda():
    from asign._device import resolve_device

    assert resolve_device(None).type == "cuda"


def test_view_augmentation_and_consistency_on_cuda_bf16():
    """Per-view features stay on the CPU; drawn rows move to the GPU each step, also on subgraphs; view-averaged
    prediction."""
    from asign._model import ASIGNConfig, make_model, train_model
    from asign._model._synthetic import with_random_views

    train, _ = _fold()
    viewed = [with_random_views(s, seed=i) for i, s in enumerate(train)]
    for extra in ({}, {"view_consistency": 1.0, "subgraph": "always", "batch_size": 32}):
        cfg = ASIGNConfig(hidden_dim=32, max_epochs=2, patience=0, amp=True, seed=0, **extra)
        model = make_model(20, {"spot": 32, "region": 32, "global": 32}, cfg)
        res = train_model(model, viewed, device=torch.device("cuda"), show_progress_bar=False)
        assert res.view_augmented and all(np.isfinite(c["loss_total"]) for c in res.curve)
        assert viewed[0].x_spot_views.device.type == "cpu"
    # prediction averaged over the views (each view moved to the GPU in turn)
    from asign._model import predict_sample

    pred = predict_sample(model, viewed[0], device="cuda", amp=True, views=True)["pred"]
    assert pred.shape == (viewed[0].n_spots, 20) and np.isfinite(pred).all()


@pytest.mark.parametrize("finetune", [False, True])
def test_member_path_of_tl_on_cuda(finetune):
    """The path of `tl.impute(method="asign")` on a GPU: `train_member` (weights returned on the CPU), then
    `rebuild_member` (a CPU model) and `predict_sample(device="cuda")`. Both steps once left a module on the CPU."""
    from asign._model import ASIGNConfig
    from asign._model._member import rebuild_member, train_member
    from asign._model._synthetic import random_sample

    s, _ = random_sample(n_sections=3, spots_per_section=40, n_genes=10, feature_dim=16, seed=3)
    finetune_spec = None
    if finetune:
        g = torch.Generator().manual_seed(1)
        s = s.replace(patches=torch.randint(0, 256, (s.n_spots, 3, 32, 32), dtype=torch.uint8, generator=g))
        with torch.random.fork_rng():
            torch.manual_seed(0)
            finetune_spec = {"encoder": _TinyCNN(), "weights": None, "input_size": 32}
    cfg = ASIGNConfig(
        hidden_dim=16, max_epochs=2, patience=0, amp=True, finetune_encoder=finetune, encoder_freeze=0.0, seed=0
    )
    dims, state, rec = train_member([s], [], cfg, s.n_genes, "cuda", finetune=finetune_spec)
    assert all(v.device.type == "cpu" for v in state.values())
    model = rebuild_member(s.n_genes, dims, cfg, state, rec, module=finetune_spec["encoder"] if finetune else None)
    from asign._model import predict_sample

    out = predict_sample(model, s, device=torch.device("cuda"), amp=True)["pred"]
    assert out.shape == (s.n_spots, 10) and np.isfinite(out).all()
    assert next(model.parameters()).device.type == "cpu"  # moved back after the call
