"""asign: 3D spatial transcriptomics imputation across serial tissue sections (ASIGN) for scverse."""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

try:
    from ._version import __version__
except ImportError:  # pragma: no cover - only without a build
    __version__ = "0.0.0"

__all__ = ["__version__", "datasets", "io", "pl", "pp", "tl"]

_SUBMODULES = {"datasets", "io", "pl", "pp", "tl"}

if TYPE_CHECKING:
    from . import datasets, io, pl, pp, tl


def __getattr__(name: str):
    # Subpackages are imported on first access so that ``import asign`` stays fast.
    if name in _SUBMODULES:
        module = importlib.import_module(f".{name}", __name__)
        globals()[name] = module
        return module
    msg = f"module 'asign' has no attribute {name!r}"
    raise AttributeError(msg)


def __dir__() -> list[str]:
    return sorted(__all__)
