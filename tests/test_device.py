"""Device resolution (``asign._device.resolve_device``): every unusable device is refused before any work."""

from __future__ import annotations

import pytest
import torch

from asign._device import resolve_device


def test_cpu_and_none():
    assert resolve_device("cpu") == torch.device("cpu")
    assert resolve_device(torch.device("cpu")) == torch.device("cpu")
    assert resolve_device(None).type == ("cuda" if torch.cuda.is_available() else "cpu")


def test_cuda_messages(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(ValueError, match=r"device='cuda' was requested but CUDA is not available; pass device='cpu'"):
        resolve_device("cuda")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    assert resolve_device("cuda:0") == torch.device("cuda:0")
    with pytest.raises(ValueError, match=r"device='cuda:3' was requested but this machine has 1 CUDA device\(s\)"):
        resolve_device("cuda:3")


def test_mps_unknown_and_unsupported_devices(monkeypatch):
    """device='mps' without MPS gave torch's raw RuntimeError at the first tensor."""
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: False)
    with pytest.raises(ValueError, match=r"device='mps' was requested but MPS .* is not available"):
        resolve_device("mps")
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: True)
    assert resolve_device("mps") == torch.device("mps")
    with pytest.raises(ValueError, match=r"device='foo' is not a torch device"):
        resolve_device("foo")
    with pytest.raises(ValueError, match=r"device='meta' \(type 'meta'\) is not supported"):
        resolve_device("meta")


def test_extract_features_checks_the_device_before_building_the_encoder(small_stack, monkeypatch):
    """encoder='uni', device='cuda' on a CPU machine spent a minute on the hub before the device error."""
    import asign._encoders

    built = []
    monkeypatch.setattr(asign._encoders, "get_encoder", lambda *a, **k: built.append(a) or None)
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: False)
    with pytest.raises(ValueError, match="MPS"):
        asign.pp.extract_features(small_stack, encoder="uni", device="mps", show_progress_bar=False)
    assert built == []
