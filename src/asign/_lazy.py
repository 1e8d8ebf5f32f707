"""Lazy loading: public namespaces' attributes (keeps ``import asign`` fast) and downsampled image levels."""

from __future__ import annotations

import importlib
from collections.abc import Callable
from typing import Any


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


def block_mean(
    level: Any,
    *,
    factor: int | None = None,
    max_size: int | None = None,
    channels: int | None = None,
    dtype: Any = "float32",
) -> tuple[Any, tuple[int, int]]:
    """Downsample an image level lazily by block means, never holding the full level in memory.

    Each output pixel is the mean of an ``f_y x f_x`` block of input pixels: pixel ``i`` covers input pixels
    ``[i f, (i + 1) f)``, so its centre lies at input pixel index ``(i + 1/2) f - 1/2``. Pixels past the last whole
    block are dropped (``trim_excess``): fewer than ``f`` input pixels at the bottom and right edges. The mean is
    taken chunk by chunk (:func:`dask.array.coarsen`), so computing the result needs memory of about a chunk per
    worker plus the output.

    Parameters
    ----------
    level
        A ``(c, y, x)`` image level: an :class:`xarray.DataArray` (any dimension order; dims ``c``, ``y``, ``x``), a
        dask array or a numpy array.
    factor
        Integer block size along ``y`` and ``x``.
    max_size
        Alternatively, the largest longer side of the result: the smallest integer factor that reaches it.
    channels
        Keep only the first ``channels`` channels (all by default).
    dtype
        The result's dtype (the block means are computed in it).

    Returns
    -------
    ``(small, (f_y, f_x))``: the lazy ``(c, y, x)`` dask array of block means and the effective block size per axis
    (the factor, capped at the axis length so that the result keeps at least one pixel).
    """
    import dask.array as da
    import numpy as np

    if (factor is None) == (max_size is None):
        msg = f"block_mean needs exactly one of `factor` and `max_size`, got factor={factor!r}, max_size={max_size!r}."
        raise ValueError(msg)
    if hasattr(level, "dims") and hasattr(level, "transpose"):  # xarray.DataArray
        level = level.transpose("c", "y", "x").data
    if level.ndim != 3:
        msg = f"block_mean needs a (c, y, x) image level, got an array with shape {tuple(level.shape)}."
        raise ValueError(msg)
    h, w = int(level.shape[1]), int(level.shape[2])
    if factor is None:
        if int(max_size) < 1:
            msg = f"block_mean needs max_size >= 1, got {max_size!r}."
            raise ValueError(msg)
        factor = max(1, -(-max(h, w) // int(max_size)))
    if int(factor) < 1:
        msg = f"block_mean needs an integer factor >= 1, got {factor!r}."
        raise ValueError(msg)
    fy, fx = max(1, min(int(factor), h)), max(1, min(int(factor), w))
    arr = level if isinstance(level, da.Array) else da.from_array(level, chunks=(-1, 1024, 1024))
    if channels is not None:
        arr = arr[: int(channels)]
    arr = arr.astype(dtype)
    if fy == 1 and fx == 1:
        return arr, (1, 1)
    small = da.coarsen(np.mean, arr, {1: fy, 2: fx}, trim_excess=True, dtype=np.dtype(dtype))
    return small, (fy, fx)
