"""The method registry behind :func:`asign.tl.impute`: every method (baselines, image baselines, ASIGN) plugs in here."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    from anndata import AnnData
    from spatialdata import SpatialData

    from .._stack import StackInfo


@dataclass
class ImputeContext:
    """Everything a method may read. Labels of spots outside ``known`` are never loaded: ``Y`` is NaN there.

    Attributes
    ----------
    sdata
        The stack (images, shapes, tables).
    table
        The stack's spot table (``sdata.tables[table_key]``); methods read coordinates, graphs and features from it,
        never its counts (use ``Y``).
    stack
        The section manifest.
    genes
        Modelled genes (columns of ``Y``).
    Y
        ``(n_obs, n_genes)`` float64 normalised targets, NaN for every spot outside ``known``.
    known
        Boolean ``(n_obs,)``: spots whose labels the method may use.
    section_codes
        Integer cutting-order position of each spot's section.
    normalization
        ``"st-net"`` or ``"log1p"``.
    params
        Method-specific keyword arguments passed through :func:`asign.tl.impute`.
    seed
        Random seed.
    device
        Requested torch device (or `None`).
    show_progress_bar
        Whether a method may show a progress bar.
    """

    sdata: SpatialData
    table: AnnData
    stack: StackInfo
    genes: list[str]
    Y: np.ndarray
    known: np.ndarray
    section_codes: np.ndarray
    normalization: str
    params: dict[str, Any] = field(default_factory=dict)
    seed: int = 0
    device: Any = None
    show_progress_bar: bool = True


@dataclass
class ImputeResult:
    """A method's output: the prediction for every spot and what to record."""

    imputed: np.ndarray
    extra_layers: dict[str, np.ndarray] = field(default_factory=dict)
    uns: dict[str, Any] = field(default_factory=dict)


MethodFn = Callable[[ImputeContext], ImputeResult]
METHODS: dict[str, MethodFn] = {}
# modules that register methods when imported (import happens on first use of `impute`)
_PROVIDERS = ("asign.tl._baselines", "asign.tl._image_baselines", "asign.tl._asign")


def register_method(name: str) -> Callable[[MethodFn], MethodFn]:
    """Register ``fn(ctx: ImputeContext) -> ImputeResult`` under ``name``."""

    def decorator(fn: MethodFn) -> MethodFn:
        METHODS[name] = fn
        return fn

    return decorator


def get_method(name: str) -> MethodFn:
    """The registered method ``name`` (providers are imported on first use)."""
    import importlib

    for mod in _PROVIDERS:
        try:
            importlib.import_module(mod)
        except ModuleNotFoundError as e:
            if e.name != mod:
                raise
    if name not in METHODS:
        msg = f"Unknown method {name!r}; available: {sorted(METHODS)}."
        raise ValueError(msg)
    return METHODS[name]
