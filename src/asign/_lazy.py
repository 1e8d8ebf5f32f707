"""Lazy attribute loading for the public namespaces (keeps ``import asign`` fast)."""

from __future__ import annotations

import importlib
from collections.abc import Callable


def lazy_namespace(package: str, mapping: dict[str, str]) -> tuple[Callable[[str], object], Callable[[], list[str]]]:
    """Return ``__getattr__`` and ``__dir__`` for a package whose public names live in private modules."""

    def __getattr__(name: str):
        if name not in mapping:
            msg = f"module {package!r} has no attribute {name!r}"
            raise AttributeError(msg)
        module = importlib.import_module(f"{package}.{mapping[name]}")
        return getattr(module, name)

    def __dir__() -> list[str]:
        return sorted(mapping)

    return __getattr__, __dir__
