"""Device resolution and seeding."""

from __future__ import annotations

import random
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    import torch

SUPPORTED_DEVICE_TYPES = ("cpu", "cuda", "mps", "xpu")
"""Torch device types that asign runs on (each checked for availability by :func:`resolve_device`)."""


def resolve_device(device: str | torch.device | None = None) -> torch.device:
    """Return ``device`` as a :class:`torch.device`; ``None`` picks CUDA when available, otherwise the CPU.

    A device that cannot be used here raises a :class:`ValueError` before any work: an unknown device string, CUDA
    (or a CUDA index) that this machine lacks, MPS without Apple-silicon support, an XPU without one, or a device
    type asign does not run on (e.g. ``"meta"``).
    """
    import torch

    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError) as e:
        msg = f"device={device!r} is not a torch device ({e}); pass 'cpu', 'cuda', 'cuda:<index>', 'mps' or None."
        raise ValueError(msg) from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        msg = f"device={device!r} was requested but CUDA is not available; pass device='cpu' or device=None."
        raise ValueError(msg)
    if dev.type == "cuda" and dev.index is not None and dev.index >= torch.cuda.device_count():
        msg = (
            f"device={device!r} was requested but this machine has {torch.cuda.device_count()} CUDA device(s) "
            f"(cuda:0 to cuda:{torch.cuda.device_count() - 1}); pass one of them, device='cuda' or device=None."
        )
        raise ValueError(msg)
    if dev.type == "mps" and not _mps_available():
        msg = (
            f"device={device!r} was requested but MPS (the Apple-silicon GPU backend) is not available on this "
            "machine or in this torch build; pass device='cpu' or device=None."
        )
        raise ValueError(msg)
    if dev.type == "xpu" and not (hasattr(torch, "xpu") and torch.xpu.is_available()):
        msg = f"device={device!r} was requested but no Intel XPU is available; pass device='cpu' or device=None."
        raise ValueError(msg)
    if dev.type not in SUPPORTED_DEVICE_TYPES:
        msg = (
            f"device={device!r} (type {dev.type!r}) is not supported; pass 'cpu', 'cuda', 'cuda:<index>', 'mps' "
            "or None."
        )
        raise ValueError(msg)
    return dev


def _mps_available() -> bool:
    import torch

    mps = getattr(torch.backends, "mps", None)
    return bool(mps is not None and mps.is_available())


def seed_everything(seed: int) -> None:
    """Seed python, numpy and torch (CPU and CUDA)."""
    import torch

    random.seed(seed)
    np.random.seed(seed % (2**32))
    torch.manual_seed(seed)


def spawn_seeds(seed: int, n: int) -> list[int]:
    """Spawn ``n`` independent integer seeds from ``seed`` with :class:`numpy.random.SeedSequence`."""
    return [int(s.generate_state(1)[0]) for s in np.random.SeedSequence(seed).spawn(n)]
