"""Shared helpers of the plotting functions: saving, showing, colour scales and image levels."""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd

from asign._constants import Key
from asign._logging import logger

if TYPE_CHECKING:
    from anndata import AnnData
    from matplotlib.figure import Figure
    from spatialdata import SpatialData

# backends that cannot show a window; `show=None` never calls `plt.show()` on them
_NON_INTERACTIVE = {"agg", "cairo", "pdf", "pgf", "ps", "svg", "template"}


def is_interactive_backend() -> bool:
    """Whether the current matplotlib backend opens windows (GUI backends; not Agg, PDF, ... nor Jupyter inline)."""
    import matplotlib as mpl

    backend = str(mpl.get_backend()).lower()
    if backend in _NON_INTERACTIVE:
        return False
    # Jupyter's inline backend displays every open figure at the end of the cell by itself
    return "inline" not in backend


def finish(
    fig: Figure,
    *,
    save: str | os.PathLike[str] | None,
    show: bool | None,
    dpi: int = 150,
    owned: bool = True,
) -> Figure:
    """Save ``fig`` to ``save`` (format from the suffix), show it if asked, and return it.

    ``show=None`` shows the figure only on an interactive (GUI) backend; ``show=True`` always calls
    :func:`matplotlib.pyplot.show`. A saved figure that is not shown on a backend that cannot show figures (Agg,
    PDF, ...; not Jupyter's inline backend) is released from :mod:`matplotlib.pyplot` after saving, like scanpy does,
    so that saving in a loop does not pile up open figures; the returned figure stays usable (its axes, ``savefig``).
    ``owned=False`` (a figure the caller made, e.g. through ``ax=``) is never closed.
    """
    import matplotlib.pyplot as plt

    if save is not None:
        path = Path(save)
        if path.parent and not path.parent.exists():
            path.parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(path, dpi=dpi, bbox_inches="tight")
        logger.info(f"Saved figure to {str(path)!r}.")
    if show is None:
        show = is_interactive_backend()
    if show:
        plt.show()
    elif save is not None and owned and _cannot_show():
        plt.close(fig)
    return fig


def _cannot_show() -> bool:
    """Whether the backend can neither open windows nor display inline (Agg, PDF, SVG, ...)."""
    import matplotlib as mpl

    return str(mpl.get_backend()).lower() in _NON_INTERACTIVE


def shared_norm(
    values: list[np.ndarray], *, vmin: float | None = None, vmax: float | None = None, robust: bool = False
) -> tuple[float, float]:
    """One colour range for several arrays (NaN ignored): ``[min, max]`` or the 1st-99th percentiles if ``robust``.

    Limits given as ``vmin``/``vmax`` are kept as they are (values outside clip; ``vmin >= vmax`` is refused); only
    the limits chosen here are moved when the range would be empty (constant values, or a given limit beyond every
    value).
    """
    if vmin is not None and vmax is not None and not float(vmax) > float(vmin):
        msg = f"`vmin` ({vmin}) must be below `vmax` ({vmax})."
        raise ValueError(msg)
    finite = [np.asarray(v, dtype=float)[np.isfinite(v)] for v in values]
    finite = [v for v in finite if v.size]
    if finite:
        allv = np.concatenate(finite)
        lo, hi = np.percentile(allv, [1.0, 99.0]) if robust else (allv.min(), allv.max())
    else:
        lo, hi = 0.0, 1.0
    lo, hi = float(lo), float(hi)
    span = hi - lo if hi > lo else 1.0
    if vmin is not None and vmax is not None:
        return float(vmin), float(vmax)
    if vmin is not None:
        lo = float(vmin)
        if not hi > lo:  # every value at or below the given vmin: an automatic upper limit above it
            hi = lo + span
    elif vmax is not None:
        hi = float(vmax)
        if not hi > lo:
            lo = hi - span
    elif not hi > lo:
        hi = lo + 1.0
    return lo, hi


def image_level(image: Any, *, max_px: int | None) -> tuple[np.ndarray, float, float]:
    """A small RGB copy of an image element and its pixel size relative to the full-resolution level.

    Parameters
    ----------
    image
        An image element: a :class:`xarray.DataTree` pyramid (``scale0``, ``scale1``, ...) or a
        :class:`xarray.DataArray` with dims ``(c, y, x)``.
    max_px
        Pick the coarsest pyramid level whose longer side still has at least ``max_px`` pixels (the finest level if
        none does); `None` uses the full resolution. A single-scale image is downsampled by striding.

    Returns
    -------
    ``(rgb, sx, sy)``: ``rgb`` is a ``(y, x, 3)`` uint8 array (or float in [0, 1]); ``sx``, ``sy`` are the sizes of
    one of its pixels in full-resolution pixels.
    """
    from asign._registration import image_levels

    levels = image_levels(image)
    full = levels[0]
    h0, w0 = int(full.sizes["y"]), int(full.sizes["x"])
    chosen = levels[0]
    if max_px is not None:
        for lev in levels:
            if max(int(lev.sizes["y"]), int(lev.sizes["x"])) >= max_px:
                chosen = lev
    arr = chosen.transpose("y", "x", "c").data
    step = 1
    if max_px is not None and len(levels) == 1:
        step = max(1, int(max(h0, w0) // max_px))
        arr = arr[::step, ::step]
    arr = np.asarray(arr.compute() if hasattr(arr, "compute") else arr)
    h, w = arr.shape[:2]
    if arr.shape[2] == 1:
        arr = np.repeat(arr, 3, axis=2)
    arr = arr[..., :3]
    if arr.dtype != np.uint8:
        arr = arr.astype(float)
        hi = float(np.nanmax(arr)) if arr.size else 1.0
        arr = np.clip(arr / (hi if hi > 1.0 else 1.0), 0.0, 1.0)
    return arr, w0 / w, h0 / h


def output_table(sdata: SpatialData, key: str) -> AnnData:
    if key not in sdata.tables:
        msg = (
            f"Table {key!r} not found in sdata.tables (present: {list(sdata.tables)}); run `asign.tl.impute` first "
            "or pass `key=` (the spot table works too, e.g. `key='table', layers=['X']`)."
        )
        raise KeyError(msg)
    return sdata.tables[key]


def spot_ids(table: AnnData, mask: np.ndarray) -> np.ndarray:
    """Instance ids of the rows ``mask`` of a SpatialData table: its own ``instance_key`` column.

    The key comes from the table's ``spatialdata_attrs`` (:func:`spatialdata.models.get_table_keys`), as
    :func:`asign.io.validate_stack` reads it, so a table parsed with e.g. ``instance_key='spot'`` works too.
    """
    from spatialdata.models import get_table_keys

    _, _, instance_key = get_table_keys(table)
    return table.obs.loc[mask, instance_key].to_numpy()


# evaluation tables
METRIC_CANDIDATES = (
    "pcc_gene",
    "pcc",
    "pcc_gene_varying",
    "pearson",
    "pearson_r",
    "r",
    "spearman",
    "ssim",
    "pcc_spot_legacy",
    "rmse",
    "mse",
    "mae",
)
GROUP_CANDIDATES = ("method", "model", "label")
LOWER_IS_BETTER = ("rmse", "mse", "mae", "mse_pooled", "mae_pooled")


def pick_metric(df: pd.DataFrame, metric: str | None) -> tuple[pd.DataFrame, str]:
    """Long (``metric``/``value`` columns) or wide (one column per metric) frame -> frame with a ``metric`` column."""
    if {"metric", "value"} <= set(df.columns):
        names = list(pd.unique(df["metric"].astype(str)))
        if metric is None:
            metric = next((m for m in METRIC_CANDIDATES if m in names), names[0] if names else None)
        if metric not in names:
            msg = f"Metric {metric!r} not found in df['metric'] (values: {names})."
            raise KeyError(msg)
        sub = df[df["metric"].astype(str) == metric].rename(columns={"value": metric})
        return sub, metric
    if metric is None:
        metric = next((m for m in METRIC_CANDIDATES if m in df.columns and df[m].notna().any()), None)
        if metric is None:
            msg = f"No metric column found in the data frame (columns: {list(df.columns)}); pass `metric=`."
            raise KeyError(msg)
    if metric not in df.columns:
        msg = f"Metric column {metric!r} not found (columns: {list(df.columns)})."
        raise KeyError(msg)
    return df, metric


def group_column(df: pd.DataFrame, group: str | None) -> str | None:
    if group is not None:
        if group not in df.columns:
            msg = f"Grouping column {group!r} not found (columns: {list(df.columns)})."
            raise KeyError(msg)
        return group
    for c in GROUP_CANDIDATES:
        if c in df.columns:
            names = df[c].dropna().astype(str)
            if (names != "").any():
                return c
    return None


def group_labels(data: pd.DataFrame, gcol: str, *, explicit: bool) -> pd.Series:
    """Labels of the groups to draw, one per row; distinct runs are never pooled silently.

    :func:`asign.tl.evaluate` writes the output table's ``key`` next to ``method``: when ``method`` is the grouping
    chosen by default and one method appears under several keys (e.g. two propagation runs with other options), its
    rows are labelled ``"method (key)"``. Rows that still share a label, a section and a gene (several runs pooled
    into one box) are reported.
    """
    labels = data[gcol].fillna("").astype(str).replace("", "(unnamed)")
    if not explicit and gcol == "method" and "key" in data.columns:
        keys = data["key"].fillna("").astype(str).replace("", "no key")
        n_keys = keys.groupby(labels.to_numpy()).nunique()
        ambiguous = labels.isin(n_keys.index[n_keys > 1])
        if ambiguous.any():
            labels = labels.where(~ambiguous, labels + " (" + keys + ")")
            logger.info(
                f"Methods {sorted(n_keys.index[n_keys > 1])} appear under several output tables (`key`); labelled "
                "by 'method (key)'."
            )
    ids = [c for c in ("section", "gene") if c in data.columns]
    if ids:
        dup = pd.DataFrame({"_label": labels.to_numpy(), **{c: data[c].to_numpy() for c in ids}}).duplicated()
        if dup.any():
            pooled = sorted(set(labels.to_numpy()[dup.to_numpy()]))
            logger.warning(
                f"{int(dup.sum())} rows repeat a {gcol!r} value with the same {' and '.join(ids)}: several runs are "
                f"pooled under {pooled}. Pass `group=` a column that tells them apart (e.g. 'key') or give the runs "
                "distinct names."
            )
    return labels


def rows_for(data: pd.DataFrame, metric: str, kind: str) -> pd.DataFrame:
    """Rows of :func:`asign.tl.evaluate`'s ``level`` column to use: per-gene rows, else per-section rows."""
    if "level" not in data.columns:
        return data
    level = data["level"].astype(str)
    gene_rows = data[(level == "gene") & data[metric].notna()]
    if kind == "gene" or len(gene_rows):
        return gene_rows
    return data[(level == "section") & data[metric].notna()]


# training histories
X_CANDIDATES = ("epoch", "step", "iteration", "iter")
HISTORY_KEYS = ("training", "history", "train_history", "curve")
HIDDEN_SERIES = ("lr", "learning_rate")


def search_history(block: Any, depth: int = 0) -> Any:
    """The first value under one of ``HISTORY_KEYS`` in nested dicts (breadth first, at most 3 levels)."""
    if not isinstance(block, Mapping) or depth > 3:
        return None
    for k in HISTORY_KEYS:
        if k in block:
            return block[k]
    for v in block.values():
        found = search_history(v, depth + 1)
        if found is not None:
            return found
    return None


def find_history(data: Any, key: str) -> Any:
    from anndata import AnnData

    if isinstance(data, AnnData):
        uns = data.uns
    elif isinstance(data, Mapping | pd.DataFrame | list):
        return data
    elif isinstance(getattr(data, "training", None), Mapping):  # a fitted model (asign.tl.fit)
        return data.training
    else:  # SpatialData
        uns = output_table(data, key).uns
    found = search_history(uns.get(Key.UNS, {}))
    if found is None:
        found = search_history(uns)
    if found is None:
        msg = (
            f"No training history found in `uns['{Key.UNS}']` of table {key!r} (looked for {list(HISTORY_KEYS)}); "
            "train with `asign.tl.impute(..., method='asign')` or pass the history dict directly."
        )
        raise KeyError(msg)
    return found


def unwrap(history: Any) -> tuple[Any, float | None]:
    """``{'curve': {...}, 'best_epoch': 3, ...}`` (a training summary) -> the curve and the best epoch."""
    if isinstance(history, Mapping) and "curve" in history:
        best = history.get("best_epoch")
        try:
            best = float(np.asarray(best).item()) if best is not None else None
        except (TypeError, ValueError):
            best = None
        return history["curve"], best if best is not None and best >= 0 else None
    return history, None


def member_runs(history: Any) -> dict[str, dict[str, Any]] | None:
    """An ensemble's training record as one run per member (``{'member_1': {'curve': ..., 'best_epoch': ...}}``).

    `None` unless ``history`` records the curves of several members (``member_curves``, written by
    :func:`asign.tl.fit` since session 15; older records hold member 1's curve only).
    """
    if not isinstance(history, Mapping):
        return None
    curves = history.get("member_curves")
    if not isinstance(curves, Mapping) or len(curves) < 2:
        return None
    members = history.get("members")
    bests = members.get("best_epoch") if isinstance(members, Mapping) else None
    bests = np.atleast_1d(np.asarray(bests)) if bests is not None else None
    out = {}
    for i, (name, curve) in enumerate(curves.items()):
        rec: dict[str, Any] = {"curve": curve}
        if bests is not None and i < bests.size:
            rec["best_epoch"] = bests[i]
        out[str(name)] = rec
    return out


def as_runs(history: Any) -> tuple[dict[str, pd.DataFrame], dict[str, float]]:
    """Normalise a training history to one frame per run, plus the best epoch of each run that records it.

    A history is a dict of lists, a list of per-epoch records, a DataFrame, a training summary with a ``curve``, or
    one of those per fold.
    """
    history, best = unwrap(history)
    bests = {"": best} if best is not None else {}
    if isinstance(history, pd.DataFrame):
        return {"": history}, bests
    if isinstance(history, list | tuple):
        if history and all(isinstance(r, Mapping) for r in history):
            return {"": pd.DataFrame(list(history))}, bests
        msg = "A training history list must hold one dict per epoch."
        raise ValueError(msg)
    if not isinstance(history, Mapping):
        msg = f"Cannot read a training history of type {type(history).__name__}."
        raise TypeError(msg)
    if history and all(isinstance(v, Mapping | pd.DataFrame) or is_records(v) for v in history.values()):
        runs: dict[str, pd.DataFrame] = {}
        for name, sub in history.items():
            sub_runs, sub_best = as_runs(sub)
            for k, v in sub_runs.items():
                label = f"{name}{'/' + k if k else ''}"
                runs[label] = v
                if k in sub_best:
                    bests[label] = sub_best[k]
        return runs, bests
    cols = {}
    for k, v in history.items():
        arr = np.asarray(v)
        if arr.ndim == 1 and arr.size > 0 and np.issubdtype(arr.dtype, np.number):
            cols[str(k)] = arr.astype(float)
    if not cols:
        msg = "The training history holds no numeric series (expected e.g. {'epoch': [...], 'train_loss': [...]})."
        raise ValueError(msg)
    n = _series_length(cols)
    dropped = {k: len(v) for k, v in cols.items() if len(v) != n}
    if dropped:
        xcol = next((c for c in X_CANDIDATES if c in cols), None)
        ref = f"the x axis {xcol!r}" if xcol is not None else "most series"
        logger.warning(
            f"Training history series of another length than {ref} ({n} values) are not drawn: "
            + ", ".join(f"{k!r} ({m})" for k, m in dropped.items())
            + "."
        )
    return {"": pd.DataFrame({k: v for k, v in cols.items() if len(v) == n})}, bests


def _series_length(cols: Mapping[str, np.ndarray]) -> int:
    """The length the series of one run share: the x axis' (``epoch``, ...) when present, else the most common one."""
    xcol = next((c for c in X_CANDIDATES if c in cols), None)
    if xcol is not None:
        return len(cols[xcol])
    counts = pd.Series([len(v) for v in cols.values()]).value_counts()
    return int(max(counts.index[counts == counts.max()]))


def ensemble_size(history: Any) -> int | None:
    """Number of ensemble members of the run whose record (member 0's curve) ``history`` is, if it records it."""
    if not isinstance(history, Mapping):
        return None
    n = history.get("n_models")
    members = history.get("members")
    if n is None and isinstance(members, Mapping) and members:
        n = len(np.atleast_1d(next(iter(members.values()))))
    try:
        return int(np.asarray(n).item()) if n is not None else None
    except (TypeError, ValueError):
        return None


def is_records(v: Any) -> bool:
    return isinstance(v, list | tuple) and len(v) > 0 and all(isinstance(r, Mapping) for r in v)
