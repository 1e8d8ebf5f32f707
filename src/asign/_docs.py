"""Shared docstring snippets."""

from __future__ import annotations

_sdata = """sdata
    A :class:`spatialdata.SpatialData` section stack (see the data contract page)."""
_table_key = """table_key
    Key of the table in :attr:`spatialdata.SpatialData.tables` that annotates the spots of all sections."""
_inplace = """inplace
    If `True`, modify ``sdata`` in memory and return `None`; otherwise leave it untouched and return the result."""
_seed = """seed
    Random seed, a non-negative integer; it feeds a :class:`numpy.random.SeedSequence`."""
_device = """device
    Torch device; `None` picks CUDA when available, otherwise the CPU."""
_progress = """show_progress_bar
    Whether to show a progress bar."""

doc_params = {
    "sdata": _sdata,
    "table_key": _table_key,
    "inplace": _inplace,
    "seed": _seed,
    "device": _device,
    "show_progress_bar": _progress,
}


def inject_docs(**kwargs: str):
    """Format the decorated function's docstring with the shared snippets and ``kwargs``."""

    def decorator(obj):
        if obj.__doc__:
            # snippets are written flush left; module-level functions indent their docstrings by 4 spaces
            snippets = {k: v.replace("\n", "\n    ") for k, v in {**doc_params, **kwargs}.items()}
            obj.__doc__ = obj.__doc__.format(**snippets)
        return obj

    return decorator
