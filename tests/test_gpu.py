"""GPU checks (``pytest -m gpu`` on a CUDA machine; skipped elsewhere).

They run the ASIGN core (torch + torch-geometric only) on CUDA with mixed precision and compare with the CPU.
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


def test_device_none_picks_cuda():
    from asign._device import resolve_device

    assert resolve_device(None).type == "cuda"
