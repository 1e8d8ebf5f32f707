"""Metrics of an imputation (method.md §7.2): per-gene PCC within section, MSE, MAE and the legacy per-spot PCC."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd

from asign._constants import Key
from asign._logging import logger
from asign.pp._genes import check_gene_list

if TYPE_CHECKING:
    from anndata import AnnData
    from spatialdata import SpatialData

LEVELS = ("gene", "section", "overall")
COLUMNS = [
    "level",
    "section",
    "gene",
    "n_spots",
    "n_genes",
    "pcc_gene",
    "pcc_gene_varying",
    "mse",
    "mae",
    "pcc_spot_legacy",
    "mse_pooled",
    "mae_pooled",
    "n_constant_truth",
    "n_constant_pred",
    "n_constant_spots",
]


def is_constant(x: np.ndarray, axis: int) -> np.ndarray:
    """Whether ``x`` is constant along ``axis`` (range at most ``1e-12`` relative to its magnitude)."""
    x = np.asarray(x, dtype=np.float64)
    if x.shape[axis] == 0:
        return np.ones(np.delete(x.shape, axis), dtype=bool)
    rng = np.ptp(x, axis=axis)
    scale = np.maximum(1.0, np.abs(x).max(axis=axis))
    return rng <= 1e-12 * scale


def pearson(a: np.ndarray, b: np.ndarray, axis: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Pearson correlation of ``a`` and ``b`` along ``axis``; 0 where either is constant.

    Returns
    -------
    The correlations, and the masks of constant ``a`` and constant ``b``.
    """
    a = np.asarray(a, dtype=np.float64)
    b = np.asarray(b, dtype=np.float64)
    ca = is_constant(a, axis)
    cb = is_constant(b, axis)
    if a.shape[axis] == 0:
        return np.zeros(ca.shape), ca, cb
    ac = a - a.mean(axis=axis, keepdims=True)
    bc = b - b.mean(axis=axis, keepdims=True)
    num = (ac * bc).sum(axis=axis)
    den = np.sqrt((ac * ac).sum(axis=axis) * (bc * bc).sum(axis=axis))
    bad = ca | cb | ~(den > 0)
    r = np.divide(num, den, out=np.zeros_like(num), where=~bad)
    return np.clip(r, -1.0, 1.0), ca, cb


def score(
    y_true: np.ndarray,
    y_pred: np.ndarray,
    sections: np.ndarray,
    *,
    genes: Sequence[str],
    section_order: Sequence[str] | None = None,
    per: Sequence[str] = LEVELS,
) -> pd.DataFrame:
    """Score predictions of the spots to evaluate (rows) against the truth.

    Parameters
    ----------
    y_true, y_pred
        ``(n_spots, n_genes)`` truth and prediction of the scored spots only.
    sections
        Section of every row.
    genes
        Gene names (columns).
    section_order
        Order of the sections in the output (default: order of first appearance).
    per
        Levels to return: ``"gene"``, ``"section"``, ``"overall"``.

    Returns
    -------
    A DataFrame with the columns of :func:`asign.tl.evaluate`.
    """
    y_true = np.asarray(y_true, dtype=np.float64)
    y_pred = np.asarray(y_pred, dtype=np.float64)
    sections = np.asarray(sections).astype(str)
    if y_true.shape != y_pred.shape or y_true.ndim != 2 or y_true.shape[0] != sections.shape[0]:
        msg = f"Shapes disagree: truth {y_true.shape}, prediction {y_pred.shape}, sections {sections.shape}."
        raise ValueError(msg)
    if not np.all(np.isfinite(y_pred)):
        msg = "The prediction of the scored spots must be finite."
        raise ValueError(msg)
    genes = [str(g) for g in genes]
    order = list(dict.fromkeys(sections.tolist())) if section_order is None else [str(s) for s in section_order]
    order = [s for s in order if (sections == s).any()]
    rows: list[dict[str, Any]] = []
    sec_rows: list[dict[str, Any]] = []
    spot_r_all = []
    pooled_err: list[np.ndarray] = []
    for s in order:
        m = sections == s
        # a gene not measured in a section has no truth there (NaN in every spot): it is not scored in that section
        cols = np.isfinite(y_true[m]).all(axis=0)
        if not np.array_equal(cols, np.isfinite(y_true[m]).any(axis=0)):
            msg = f"Section {s!r}: the truth has non-finite values for some spots of a gene; it must be finite."
            raise ValueError(msg)
        if not cols.any():
            continue
        T, P = y_true[m][:, cols], y_pred[m][:, cols]
        sec_genes = [g for g, c in zip(genes, cols, strict=True) if c]
        n = int(m.sum())
        r, ct, cp = pearson(T, P, axis=0)
        err = P - T
        pooled_err.append(err.ravel())
        mse_g = (err**2).mean(axis=0)
        mae_g = np.abs(err).mean(axis=0)
        # legacy per-spot PCC across genes: undefined for a spot whose truth or prediction is the same for every gene
        # (or with one gene); such spots are left out of the mean and counted
        if len(sec_genes) > 1:
            rs, cts, cps = pearson(T, P, axis=1)
            spot_ok = ~(cts | cps)
        else:
            rs, spot_ok = np.zeros(n), np.zeros(n, dtype=bool)
        spot_r_all.append(rs[spot_ok])
        if "gene" in per:
            for j, g in enumerate(sec_genes):
                rows.append(
                    {
                        "level": "gene",
                        "section": s,
                        "gene": g,
                        "n_spots": n,
                        "n_genes": 1,
                        "pcc_gene": r[j],
                        "pcc_gene_varying": np.nan if ct[j] else r[j],
                        "mse": mse_g[j],
                        "mae": mae_g[j],
                        "n_constant_truth": int(ct[j]),
                        "n_constant_pred": int(cp[j]),
                    }
                )
        sec_rows.append(
            {
                "level": "section",
                "section": s,
                "gene": None,
                "n_spots": n,
                "n_genes": len(sec_genes),
                "pcc_gene": float(r.mean()),
                "pcc_gene_varying": float(r[~ct].mean()) if (~ct).any() else np.nan,
                "mse": float((err**2).mean()),
                "mae": float(np.abs(err).mean()),
                "pcc_spot_legacy": float(rs[spot_ok].mean()) if spot_ok.any() else np.nan,
                "mse_pooled": float((err**2).mean()),
                "mae_pooled": float(np.abs(err).mean()),
                "n_constant_truth": int(ct.sum()),
                "n_constant_pred": int(cp.sum()),
                "n_constant_spots": int((~spot_ok).sum()),
            }
        )
    if "section" in per:
        rows.extend(sec_rows)
    if "overall" in per and sec_rows:
        sdf = pd.DataFrame(sec_rows)
        err = np.concatenate(pooled_err)
        spot_r = np.concatenate(spot_r_all)
        keep = np.isin(sections, sdf["section"].to_numpy())
        rows.append(
            {
                "level": "overall",
                "section": None,
                "gene": None,
                "n_spots": int(keep.sum()),
                "n_genes": len(genes),
                "pcc_gene": float(sdf["pcc_gene"].mean()),
                "pcc_gene_varying": float(sdf["pcc_gene_varying"].mean()),  # over the sections where defined
                "mse": float(sdf["mse"].mean()),
                "mae": float(sdf["mae"].mean()),
                "pcc_spot_legacy": float(spot_r.mean()) if spot_r.size else np.nan,
                "mse_pooled": float((err**2).mean()),
                "mae_pooled": float(np.abs(err).mean()),
                "n_constant_truth": int(sdf["n_constant_truth"].sum()),
                "n_constant_pred": int(sdf["n_constant_pred"].sum()),
                "n_constant_spots": int(sdf["n_constant_spots"].sum()),
            }
        )
    out = pd.DataFrame(rows, columns=COLUMNS)
    for c in ("n_spots", "n_genes", "n_constant_truth", "n_constant_pred"):
        out[c] = out[c].astype("int64")
    out["n_constant_spots"] = out["n_constant_spots"].astype("Int64")  # <NA> on gene rows (no per-spot PCC there)
    return out


def _output_table(sdata: SpatialData | AnnData, key: str) -> AnnData:
    from anndata import AnnData

    if isinstance(sdata, AnnData):
        return sdata
    if key not in sdata.tables:
        msg = f"Table {key!r} not found in sdata.tables (present: {list(sdata.tables)}); run `asign.tl.impute` first."
        raise KeyError(msg)
    return sdata.tables[key]


def evaluate(
    sdata: SpatialData | AnnData,
    *,
    key: str = Key.OUTPUT_TABLE,
    sections: Sequence[str] | None = None,
    genes: Sequence[str] | None = None,
    per: str | Sequence[str] = LEVELS,
) -> pd.DataFrame:
    """Score an imputation against the measured values of the unknown spots (method.md §7.2).

    Only spots that are measured and not known are scored; known spots never are. A gene that a section never
    measured (NaN truth in all its spots) is left out of that section's scores (its ``n_genes`` is smaller); a
    section that measured none of the scored genes is left out with a warning, and a ValueError says so when no
    scored section is left. The scale is the one the output table was normalised with
    (``uns['asign']['normalization']``), recorded in every row. Under ``"st-net"`` a section that measured only part
    of the modelled genes has its truth on another scale (proportions over fewer genes): its MSE and MAE are
    inflated, its per-gene PCC hardly (:func:`asign.tl.impute` warns of it). Under ``"st-net"`` a gene with no count
    in a section is not constant there: its truth, ``log(1 / sum(counts + 1))``, follows each spot's library size,
    so it is scored as a varying gene (under ``"log1p"`` it is constant and counted in ``n_constant_truth``).

    Parameters
    ----------
    sdata
        A :class:`spatialdata.SpatialData` holding the output table of :func:`asign.tl.impute` (or that table).
    key
        Key of the output table.
    sections
        Sections to score (default: every section with a scored spot).
    genes
        Genes to score (default: every modelled gene); each once.
    per
        Levels of rows to return, any of ``"gene"``, ``"section"``, ``"overall"`` (default: all).

    Returns
    -------
    A tidy :class:`pandas.DataFrame`, one row per (level, section, gene):

    - ``level="gene"``: one row per scored section and gene. ``pcc_gene`` is the Pearson correlation across the
      section's scored spots (0 when the truth or the prediction is constant in the section),
      ``pcc_gene_varying`` the same but NaN for constant truth, ``mse`` / ``mae`` over the section's spots,
      ``n_constant_truth`` / ``n_constant_pred`` flag constant columns.
    - ``level="section"``: ``pcc_gene`` = mean per-gene PCC over all genes (constant genes count as 0 and are
      counted), ``pcc_gene_varying`` = the mean over genes whose truth varies (reported beside it; method.md §7.2), ``mse``,
      ``mae`` over the section's (spot, gene) entries, ``pcc_spot_legacy`` = mean over the section's spots of the
      per-spot Pearson correlation across genes (*legacy, per-spot across genes, as in ASIGN Table 1*), counts of
      constant genes. A spot whose truth or prediction is the same for every scored gene has no per-spot PCC
      (nor has any spot when one gene is scored): it is left out of ``pcc_spot_legacy`` and counted in
      ``n_constant_spots`` (NaN when no spot is left).
    - ``level="overall"``: ``pcc_gene``, ``mse``, ``mae`` averaged over sections (each section weighs equally),
      ``pcc_gene_varying`` averaged over the sections where it is defined (a section without a varying gene has
      none); ``pcc_spot_legacy``, ``mse_pooled``, ``mae_pooled`` pooled over all scored spots (and entries).

    Further columns: ``n_spots``, ``n_genes``, ``n_constant_spots`` (``<NA>`` on gene rows), ``method``,
    ``normalization``, ``key``.
    """
    table = _output_table(sdata, key)
    what = "The AnnData passed" if _is_anndata(sdata) else f"Table {key!r}"
    for layer in (Key.TARGET, Key.IMPUTED):
        if layer not in table.layers:
            msg = f"{what} has no `layers['{layer}']`; evaluate the output table of `asign.tl.impute`."
            raise KeyError(msg)
    for col in (Key.KNOWN, Key.MEASURED, Key.SECTION):
        if col not in table.obs:
            msg = f"{what} has no `obs['{col}']`; evaluate the output table of `asign.tl.impute`."
            raise KeyError(msg)
    levels = [per] if isinstance(per, str) else list(per)
    bad = [p for p in levels if p not in LEVELS]
    if bad or not levels:
        msg = f"`per` must name levels from {list(LEVELS)}, got {per!r}."
        raise ValueError(msg)
    sec = table.obs[Key.SECTION]
    order = [str(s) for s in sec.cat.categories] if isinstance(sec.dtype, pd.CategoricalDtype) else None
    sec = sec.astype(str).to_numpy()
    if order is None:
        order = list(dict.fromkeys(sec.tolist()))
    scored = table.obs[Key.MEASURED].to_numpy(dtype=bool) & ~table.obs[Key.KNOWN].to_numpy(dtype=bool)
    if sections is not None:
        sections = [sections] if isinstance(sections, str) else [str(s) for s in sections]
        unknown = [s for s in sections if s not in order]
        if unknown:
            msg = f"Unknown section(s) {unknown}; the table has sections {order}."
            raise ValueError(msg)
        empty = [s for s in sections if not (scored & (sec == s)).any()]
        if empty:
            msg = f"Section(s) {empty} have no scored spot (they are known or not measured)."
            raise ValueError(msg)
        scored &= np.isin(sec, sections)
        order = [s for s in order if s in sections]
    if not scored.any():
        n_virtual = int((~table.obs[Key.MEASURED].to_numpy(dtype=bool)).sum())
        msg = (
            f"{what} has no spot to score: every measured spot is known"
            + (
                f", and its {n_virtual} unmeasured (e.g. virtual) spots have no truth to score against"
                if n_virtual
                else ""
            )
            + ". Hold out a measured section (leave it out of `known`) to evaluate."
        )
        raise ValueError(msg)
    known_rows = table.obs[Key.KNOWN].to_numpy(dtype=bool)
    unscored = [s for s in order if (~known_rows & (sec == s)).any() and not (scored & (sec == s)).any()]
    if unscored:
        logger.info(
            f"Sections {unscored} have no measured spot (their spots are unmeasured, e.g. virtual): predicted but not "
            "scored; the overall row covers the scored sections only."
        )
    gnames = table.var_names.astype(str)
    if genes is not None:
        genes = check_gene_list(genes)
        idx = gnames.get_indexer(genes)
        if (idx < 0).any():
            missing = [g for g, i in zip(genes, idx, strict=True) if i < 0]
            msg = f"Gene(s) {missing} are not modelled in {what[0].lower()}{what[1:]}."
            raise KeyError(msg)
    else:
        idx = np.arange(table.n_vars)
        genes = list(gnames)
    rows = np.flatnonzero(scored)
    y_true = np.asarray(table.layers[Key.TARGET][rows][:, idx], dtype=np.float64)
    y_pred = np.asarray(table.layers[Key.IMPUTED][rows][:, idx], dtype=np.float64)
    # a section that measured none of the scored genes has no truth (NaN everywhere): say so, never return nothing
    with_truth = {s: bool(np.isfinite(y_true[sec[rows] == s]).any()) for s in dict.fromkeys(sec[rows].tolist())}
    no_truth = [s for s, ok in with_truth.items() if not ok]
    if no_truth:
        msg = (
            f"Section(s) {no_truth} measured none of the {len(genes)} scored genes of {what[0].lower()}{what[1:]} (their truth is "
            "NaN for every gene; the stack table's uns['asign']['unmeasured_genes'] lists what each section lacks). "
            "Gene names must match exactly across sections, case included."
        )
        if len(no_truth) == len(with_truth):
            raise ValueError(msg + " Nothing is left to score.")
        logger.warning(msg + " They are left out of the scores.")
    df = score(y_true, y_pred, sec[rows], genes=genes, section_order=order, per=levels)
    info = table.uns.get(Key.UNS, {})
    df["method"] = str(info.get("method", "")) if isinstance(info, dict) else ""
    df["normalization"] = str(info.get("normalization", "")) if isinstance(info, dict) else ""
    df["key"] = key if not _is_anndata(sdata) else ""
    return df


def _is_anndata(x: Any) -> bool:
    from anndata import AnnData

    return isinstance(x, AnnData)
