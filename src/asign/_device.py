"""Device resolution and seeding."""

from __future__ import annotations

import random
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    import torch


def resolve_device(device: str | torch.device | None = None) -> torch.device:
    """Return ``device`` as a :class:`torch.device`; ``None`` picks CUDA when available, otherwise the CPU."""
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
    return dev


def seed_everything(seed: int) -> None:
    """Seed python, numpy and torch (CPU and CUDA)."""
    import torch

    random.seed(seed)
    np.random.seed(seed % (2**32))
    torch.manual_seed(seed)


def spawn_seeds(seed: int, n: int) -> list[int]:
    """Spawn ``n`` independent integer seeds from ``seed`` with :class:`numpy.random.SeedSequence`."""
    return [int(s.generate_state(1)[0]) for s in np.random.SeedSequence(seed).spawn(n)]
