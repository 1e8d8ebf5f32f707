"""The method registry behind :func:`asign.tl.impute`: every method (baselines, image baselines, ASIGN) plugs in here.

A method is a function ``predict(ctx: ImputeContext) -> ImputeResult`` registered with :func:`register_method`.
A *trainable* method also registers ``fit(fctx: FitContext) -> Any``: :func:`asign.tl.impute` (when given
``train=`` samples) and :func:`asign.tl.cross_validate` (once per fold) call it on the labelled training samples and
hand its return value to ``predict`` as ``ctx.fitted``.

Label hygiene: ``ctx.Y`` is the only place where a method finds expression values. It is built from the raw counts
of the ``known`` rows only (the single label accessor, :func:`asign.tl._impute.labelled_targets`); every other row
is NaN. ``ctx.table`` is a counts-free view of the spot table (obs, obsm, obsp, uns; no ``.X``, no layers).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    from anndata import AnnData
    from spatialdata import SpatialData

    from asign._stack import StackInfo


@dataclass
class ImputeContext:
    """Everything a method may read. Labels of spots outside ``known`` are never loaded: ``Y`` is NaN there.

    Attributes
    ----------
    sdata
        The stack (images, shapes, tables). Methods read images and shapes from it, never a table's counts.
    table
        A counts-free view of the stack's spot table: the same ``obs``, ``obsm``, ``obsp`` and ``uns`` (shared, not
        copied), no ``.X`` and no layers. Methods read coordinates, graphs and features from it.
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
        Method-specific keyword arguments passed through :func:`asign.tl.impute` (``method_kwargs``).
    seed
        Random seed.
    device
        Requested torch device (or `None`: the method resolves it with :func:`asign._device.resolve_device`).
    show_progress_bar
        Whether a method may show a progress bar.
    train
        Labelled training samples (other patients), one context each, with ``known`` = every measured spot and the
        same ``genes`` and ``normalization``. Empty unless the caller passed training samples.
    fitted
        What the method's registered ``fit`` returned for these training samples (`None` for untrained methods,
        or when no training samples were given).
    sample
        Name of the sample (``""`` if unnamed).
    table_key
        Key of the spot table in ``sdata.tables``.
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
    train: list[ImputeContext] = field(default_factory=list)
    fitted: Any = None
    sample: str = ""
    table_key: str = "table"

    @property
    def n_obs(self) -> int:
        return int(self.Y.shape[0])

    @property
    def n_genes(self) -> int:
        return int(self.Y.shape[1])

    def known_mean(self) -> np.ndarray:
        """Mean normalised target over the known spots, ``(n_genes,)``."""
        return self.Y[self.known].mean(axis=0)

    def known_sections(self) -> list[str]:
        """Sections that contain at least one known spot, in cutting order."""
        return self.sections_of(self.known)

    def sections_of(self, spots: np.ndarray) -> list[str]:
        """Sections that contain at least one of the spots of the boolean mask ``spots``, in cutting order."""
        present = np.unique(np.asarray(self.section_codes)[np.asarray(spots, dtype=bool)])
        return [self.stack.sections[i] for i in present]


@dataclass
class FitContext:
    """What a trainable method's ``fit`` receives.

    Attributes
    ----------
    train
        One :class:`ImputeContext` per labelled training sample (``known`` = every measured spot).
    genes
        Modelled genes.
    normalization
        ``"st-net"`` or ``"log1p"``.
    params
        The method's keyword arguments (``method_kwargs``).
    seed
        Random seed of this fit (per fold in :func:`asign.tl.cross_validate`).
    device
        Requested torch device (or `None`).
    show_progress_bar
        Whether a progress bar may be shown.
    """

    train: list[ImputeContext]
    genes: list[str]
    normalization: str
    params: dict[str, Any] = field(default_factory=dict)
    seed: int = 0
    device: Any = None
    show_progress_bar: bool = True


@dataclass
class ImputeResult:
    """A method's output: the prediction for every spot and what to record.

    Attributes
    ----------
    imputed
        ``(n_obs, n_genes)`` finite prediction for every spot (known spots included).
    extra_layers
        Further ``(n_obs, n_genes)`` layers for the output table (e.g. ``"network"``).
    uns
        Zarr-writable details to record in ``uns['asign']['result']`` (resolved defaults, device, timings).
    """

    imputed: np.ndarray
    extra_layers: dict[str, np.ndarray] = field(default_factory=dict)
    uns: dict[str, Any] = field(default_factory=dict)


MethodFn = Callable[[ImputeContext], ImputeResult]
FitFn = Callable[[FitContext], Any]
# check(table, method_kwargs, table_key[, train=..., sample=..., sdata=...]): input of a sample to impute that a
# trainable method reads only at prediction
CheckFn = Callable[..., None]
METHODS: dict[str, MethodFn] = {}
FITTERS: dict[str, FitFn] = {}
CHECKS: dict[str, CheckFn] = {}
# modules that register methods when imported (import happens on first use of `impute`)
_PROVIDERS = ("asign.tl._baselines", "asign.tl._image_baselines", "asign.tl._asign")


def register_method(
    name: str, *, fit: FitFn | None = None, check: CheckFn | None = None
) -> Callable[[MethodFn], MethodFn]:
    """Register ``predict(ctx: ImputeContext) -> ImputeResult`` under ``name``.

    Parameters
    ----------
    name
        The name users pass as ``method=``.
    fit
        For trainable methods: ``fit(fctx: FitContext) -> fitted``, called on the training samples; ``predict``
        then finds its return value in ``ctx.fitted``.
    check
        For trainable methods: ``check(table, method_kwargs, table_key)`` raises on input of a sample to impute that
        only the prediction reads; called on every sample to impute before ``fit`` runs, so that bad input fails
        before any training (and, in :func:`asign.tl.impute`, before its first log line). A check with keyword
        parameters ``train``, ``sample`` and / or ``sdata`` also receives the training samples' ``(name, spot
        table)`` pairs, the name of the sample to impute (to compare them) and its stack (to check its other tables;
        `None` where the caller passes none).
    """

    def decorator(fn: MethodFn) -> MethodFn:
        METHODS[name] = fn
        for registry, value in ((FITTERS, fit), (CHECKS, check)):
            if value is not None:
                registry[name] = value
            else:
                registry.pop(name, None)
        return fn

    return decorator


def _load_providers() -> None:
    import importlib

    for mod in _PROVIDERS:
        try:
            importlib.import_module(mod)
        except ModuleNotFoundError as e:
            if e.name != mod:
                raise


def available_methods() -> list[str]:
    """Names of every registered method."""
    _load_providers()
    return sorted(METHODS)


def get_method(name: str) -> MethodFn:
    """The registered method ``name`` (providers are imported on first use)."""
    _load_providers()
    if name not in METHODS:
        msg = f"Unknown method {name!r}; available: {sorted(METHODS)}."
        raise ValueError(msg)
    return METHODS[name]


def get_fit(name: str) -> FitFn | None:
    """The ``fit`` function of method ``name``, or `None` when the method needs no training."""
    get_method(name)
    return FITTERS.get(name)


def check_before_fit(
    name: str,
    table: AnnData,
    method_kwargs: dict,
    table_key: str,
    *,
    train: Sequence[tuple[str, AnnData]] = (),
    sample: str = "",
    sdata: SpatialData | None = None,
) -> None:
    """Run method ``name``'s ``check`` (if it has one) on the table of a sample to impute.

    ``train`` (``(name, spot table)`` of each training sample), ``sample`` (the name of the sample to impute) and
    ``sdata`` (its stack) are passed on to a check that takes them as keyword arguments.
    """
    import inspect

    get_method(name)
    if name in CHECKS:
        fn = CHECKS[name]
        params = inspect.signature(fn).parameters
        kw = {k: v for k, v in (("train", list(train)), ("sample", sample), ("sdata", sdata)) if k in params}
        fn(table, method_kwargs, table_key, **kw)


def to_uns(value: Any) -> Any:
    """Turn ``value`` into something zarr can store in ``uns``.

    Dicts (str keys) and lists recurse; tuples and sets become lists; numpy scalars become Python scalars; `None`
    becomes ``"None"``; arrays stay arrays (object arrays become lists); anything else becomes its ``str``.
    """
    if value is None:
        return "None"
    if isinstance(value, bool | str | int | float):
        return value
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray):
        return [to_uns(v) for v in value.tolist()] if value.dtype == object else value
    if isinstance(value, Mapping):
        return {str(k): to_uns(v) for k, v in value.items()}
    if isinstance(value, list | tuple | set | frozenset):
        items = sorted(value, key=str) if isinstance(value, set | frozenset) else value
        return [to_uns(v) for v in items]
    return str(value)
