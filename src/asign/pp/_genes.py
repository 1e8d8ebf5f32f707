"""Gene selection (top genes by mean) and normalisation (ST-Net ln-proportion, log1p-CP10k); method.md §2.1-2.2.

The public functions work on a stack; the array-level helpers (:func:`section_gene_means`, :func:`top_genes`,
:func:`st_net`, :func:`log1p_cp10k`, :func:`normalize_counts`, :func:`counts_block`) are shared with
:func:`asign.tl.impute` and :func:`asign.tl.cross_validate`.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd
import scipy.sparse as sp

from asign._checks import check_number, check_reserved_keys
from asign._constants import Key
from asign._logging import logger
from asign._stack import counts_matrix, section_codes, unmeasured_genes, unmeasured_mask

if TYPE_CHECKING:
    from anndata import AnnData
    from spatialdata import SpatialData

    from asign._stack import StackInfo

NORMALIZATIONS = ("st-net", "log1p")
GENE_SECTIONS = ("labelled", "all")
CP10K = 1e4


# --------------------------------------------------------------------------------------------- array-level helpers
def st_net(counts: np.ndarray) -> np.ndarray:
    """ST-Net ln-proportion ``ln((c + 1) / sum_selected(c + 1))`` per row (spot), over the given columns only.

    NaN counts (a gene the spot's section never measured) stay NaN and are left out of the sum; a row with no
    measured gene stays NaN throughout.
    """
    c = np.asarray(counts, dtype=np.float64) + 1.0
    total = np.nansum(c, axis=1, keepdims=True)
    log_total = np.log(total, out=np.full_like(total, np.nan), where=total > 0)
    return np.log(c) - log_total


def log1p_cp10k(counts: np.ndarray, total_counts: np.ndarray) -> np.ndarray:
    """``ln(1 + 1e4 c / L)`` with ``L`` the spot's total count over all genes; spots with ``L = 0`` give 0."""
    c = np.asarray(counts, dtype=np.float64)
    L = np.asarray(total_counts, dtype=np.float64).reshape(-1, 1)
    scale = np.divide(CP10K, L, out=np.zeros_like(L), where=L > 0)
    return np.log1p(c * scale)


def normalize_counts(counts: np.ndarray, normalization: str, total_counts: np.ndarray | None = None) -> np.ndarray:
    """Normalise a ``(spots, selected genes)`` raw count block with ``"st-net"`` or ``"log1p"``."""
    check_normalization(normalization)
    if normalization == "st-net":
        return st_net(counts)
    if total_counts is None:
        msg = "normalization='log1p' needs the spots' total counts over all genes (`total_counts`)."
        raise ValueError(msg)
    return log1p_cp10k(counts, total_counts)


def check_normalization(normalization: str) -> None:
    if normalization not in NORMALIZATIONS:
        msg = f"Unknown normalization {normalization!r}; use one of {list(NORMALIZATIONS)}."
        raise ValueError(msg)


def counts_block(table: AnnData, rows: np.ndarray, genes: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
    """Raw counts of ``rows`` (integer indices) for ``genes`` as dense float64, and those rows' total counts.

    Only the requested rows of the count matrix are read.
    """
    X = counts_matrix(table)
    idx = gene_indices(table, genes)
    rows = np.asarray(rows, dtype=np.int64)
    sub = X[rows]
    if sp.issparse(sub):
        sub = sp.csr_matrix(sub)
        total = np.asarray(sub.sum(axis=1), dtype=np.float64).ravel()
        block = sub[:, idx].toarray().astype(np.float64)
    else:
        sub = np.asarray(sub, dtype=np.float64)
        total = sub.sum(axis=1)
        block = sub[:, idx]
    return block, total


def normalized_rows(
    table: AnnData, genes: Sequence[str], rows: np.ndarray, normalization: str
) -> tuple[np.ndarray, np.ndarray]:
    """Normalised counts of the ``rows`` (boolean mask) for ``genes``, NaN elsewhere, and those rows' total counts.

    Only the raw counts of ``rows`` are read. A gene that a spot's section never measured
    (:func:`asign._stack.unmeasured_genes`) is NaN there and left out of the ST-Net denominator.

    Returns
    -------
    ``(n_obs, n_genes)`` float64 values and the ``(n_obs,)`` total counts over all genes, both NaN outside ``rows``.
    """
    rows = np.asarray(rows, dtype=bool)
    idx = np.flatnonzero(rows)
    values = np.full((table.n_obs, len(genes)), np.nan)
    total = np.full(table.n_obs, np.nan)
    if idx.size:
        block, tot = counts_block(table, idx, genes)
        absent = unmeasured_mask(table, genes)
        if absent is not None:
            block[absent[idx]] = np.nan
        values[idx] = normalize_counts(block, normalization, tot)
        total[idx] = tot
    return values, total


def check_gene_list(genes: str | Sequence[str]) -> list[str]:
    """``genes`` as a list of str; a ValueError if it is empty or names a gene twice."""
    genes = [str(g) for g in ([genes] if isinstance(genes, str) else genes)]
    if not genes:
        msg = "`genes` is empty; pass at least one gene or leave it as None to select the top genes."
        raise ValueError(msg)
    dup = sorted(g for g, c in Counter(genes).items() if c > 1)
    if dup:
        msg = f"`genes` lists {dup[:20]}{' ...' if len(dup) > 20 else ''} more than once; give each gene once."
        raise ValueError(msg)
    return genes


def table_label(table_key: str | None = None, train: int | None = None) -> str:
    """The table for messages: ``"table 'table'"`` (``"the table"`` without a key), ``"... of training stack 1"``."""
    label = f"table {table_key!r}" if table_key is not None else "the table"
    return label if train is None else f"{label} of training stack {train}"


def check_unique_var_names(table: AnnData, where: str = "the table") -> None:
    """A :class:`ValueError` naming the table (``where``, see :func:`table_label`) if its var_names repeat a gene."""
    if table.var_names.is_unique:
        return
    dup = sorted({str(g) for g in table.var_names[table.var_names.duplicated()]})
    msg = (
        f"{where[:1].upper()}{where[1:]}: var_names are not unique; call `table.var_names_make_unique()` first "
        f"(repeated: {dup[:20]}{' ...' if len(dup) > 20 else ''})."
    )
    raise ValueError(msg)


def gene_indices(table: AnnData, genes: Sequence[str], table_key: str | None = None) -> np.ndarray:
    """Column indices of ``genes`` in ``table``; a :class:`KeyError` lists the missing ones.

    An empty list or a gene named twice is a :class:`ValueError` (:func:`check_gene_list`), and so are repeated
    var_names (:func:`check_unique_var_names`; ``table_key`` names the table in the message).
    """
    genes = check_gene_list(genes)
    check_unique_var_names(table, table_label(table_key))
    idx = table.var_names.get_indexer(genes)
    if (idx < 0).any():
        missing = [g for g, i in zip(genes, idx, strict=True) if i < 0]
        msg = (
            f"{len(missing)} gene(s) not in the table's var_names: {missing[:20]}{' ...' if len(missing) > 20 else ''}."
        )
        raise KeyError(msg)
    return idx


def section_gene_means(
    table: AnnData, rows: np.ndarray, stack: StackInfo | None = None, *, where: str = "the table"
) -> pd.DataFrame:
    """Mean raw count of every gene in every section, over the given spots only.

    Each mean is the section's float64 sum divided by its number of spots, the sum taken in a fixed spot order
    (by ``obs_names``): exact for integer counts, and independent of the row order of the table in any case, so
    genes with equal per-section totals get equal means and tie exactly (:func:`top_genes` breaks ties by name).
    A section whose selected spots have a total count of 0 over all genes is logged as a warning: every gene ties
    at 0 there.

    Parameters
    ----------
    table
        The spot table.
    rows
        Boolean ``(n_obs,)`` mask of the spots to use (e.g. the known spots); other spots are not read.
    stack
        The section manifest (read from ``table`` when `None`).
    where
        The table, for messages (:func:`table_label`).

    Returns
    -------
    A DataFrame ``(sections with at least one selected spot) x genes``; NaN where the section never measured the
    gene (:func:`asign._stack.unmeasured_genes`).
    """
    check_unique_var_names(table, where)
    codes = section_codes(table, stack)
    rows = np.asarray(rows, dtype=bool)
    sel = np.flatnonzero(rows)
    # a fixed summation order (section, then obs_names) so that the sums do not depend on the row order
    sel = sel[np.lexsort((np.asarray(table.obs_names[sel], dtype=str), codes[sel]))]
    X = counts_matrix(table)[sel]
    codes_sel = codes[sel]
    present = np.unique(codes_sel)
    secs = stack.sections if stack is not None else list(table.obs[Key.SECTION].cat.categories)
    # indicator (sections x selected spots) -> per-section float64 sums in one product, then divide by the size
    pos = np.searchsorted(present, codes_sel)
    n = np.bincount(pos, minlength=len(present)).astype(np.float64)
    ind = sp.csr_matrix((np.ones(len(sel)), (pos, np.arange(len(sel)))), shape=(len(present), len(sel)))
    sums = ind @ (X if sp.issparse(X) else np.asarray(X, dtype=np.float64))
    sums = sums.toarray() if sp.issparse(sums) else np.asarray(sums)
    sums = np.asarray(sums, dtype=np.float64)
    empty = [secs[i] for i, tot in zip(present, sums.sum(axis=1), strict=True) if tot == 0]
    if empty:
        logger.warning(
            f"Section(s) {empty} of {where} have a total count of 0 over all genes in the spots used for gene selection: "
            "every gene's mean is 0 there, so they only dilute the ranking (alone, they rank the genes by name). "
            "Check their counts, or leave them out of the selection sections."
        )
    df = pd.DataFrame(sums / n[:, None], index=[secs[i] for i in present], columns=table.var_names.astype(str))
    for sec, genes in unmeasured_genes(table).items():  # never measured there: no mean
        if sec in df.index:
            df.loc[sec, df.columns.intersection(list(genes))] = np.nan
    return df


def top_genes(section_means: Sequence[pd.DataFrame] | pd.DataFrame, n_genes: int) -> tuple[list[str], pd.Series]:
    """The ``n_genes`` genes with the largest mean of per-section means (each section weighs equally).

    Only genes present in every frame and measured in every selection section (no NaN mean) are ranked (samples and
    sections may measure different genes). Ties are broken by gene name.

    Returns
    -------
    The selected genes (largest first) and the score (average of per-section means) of every ranked gene.
    """
    frames = [section_means] if isinstance(section_means, pd.DataFrame) else list(section_means)
    frames = [f for f in frames if len(f)]
    if not frames:
        msg = "No labelled section to select genes from."
        raise ValueError(msg)
    common = frames[0].columns
    for f in frames[1:]:
        common = common.intersection(f.columns, sort=False)
    if len(common) == 0:
        msg = "The samples share no gene; gene selection needs common genes."
        raise ValueError(msg)
    stacked = np.vstack([f[common].to_numpy(dtype=np.float64) for f in frames])
    # a gene that one of the selection sections never measured has no labels there: not ranked
    measured_everywhere = ~np.isnan(stacked).any(axis=0)
    if not measured_everywhere.any():
        msg = "No gene is measured in every selection section; gene selection needs genes they all measured."
        raise ValueError(msg)
    common, stacked = common[measured_everywhere], stacked[:, measured_everywhere]
    score = stacked.mean(axis=0)
    names = np.asarray(common.astype(str))
    order = np.lexsort((names, -score))
    n_genes = check_number("n_genes", n_genes, integer=True, minimum=1)
    if n_genes > len(names):  # not a problem (e.g. the default 250 on a 50-gene panel): every gene is modelled
        logger.info(
            f"n_genes={n_genes} but only {len(names)} genes can be ranked (present in every sample and measured in "
            "every selection section); using all of them."
        )
    chosen = [str(g) for g in names[order[:n_genes]]]
    return chosen, pd.Series(score, index=names, name="mean_counts")


# ---------------------------------------------------------------------------------------------- spot selections
def known_mask(table: AnnData, stack: StackInfo, known: Any) -> np.ndarray:
    """Resolve ``known`` (a section name, section names, or a boolean mask over the table rows) to a row mask."""
    n = table.n_obs
    if isinstance(known, pd.Series) and known.dtype == bool:
        if not known.index.equals(table.obs_names):
            if not known.index.isin(table.obs_names).all() or len(known) != n:
                msg = "`known` is a boolean Series whose index is not the table's obs_names."
                raise ValueError(msg)
            known = known.reindex(table.obs_names)
        return known.to_numpy(dtype=bool)
    if known is None:
        msg = f"`known` is None; pass the labelled section name(s) from {stack.sections} or a boolean mask."
        raise ValueError(msg)
    if isinstance(known, str):
        known = [known]
    arr = np.asarray(known)
    if arr.dtype.kind in "iuf" and arr.shape == (n,) and n > len(stack.sections):
        msg = (
            f"`known` is a numeric array with one entry per spot ({n}); pass a boolean mask (e.g. "
            "`known.astype(bool)`) or section names."
        )
        raise ValueError(msg)
    if arr.dtype == bool:
        if arr.shape != (n,):
            msg = f"A boolean `known` mask must have one entry per spot ({n}), got shape {arr.shape}."
            raise ValueError(msg)
        return arr.copy()
    names = [str(k) for k in np.atleast_1d(arr)]
    if not names:
        msg = f"`known` names no section; pass section names from {stack.sections} or a boolean mask."
        raise ValueError(msg)
    bad = [s for s in names if s not in stack.sections]
    if bad:
        msg = f"`known` names unknown section(s) {bad}; the stack has sections {stack.sections}."
        raise ValueError(msg)
    codes = section_codes(table, stack)
    return np.isin(codes, [stack.sections.index(s) for s in names])


def check_known(table: AnnData, stack: StackInfo, mask: np.ndarray) -> None:
    """Errors for a ``known`` mask that selects no spot, every spot, or unmeasured spots."""
    if not mask.any():
        msg = "`known` selects no spot; name at least one measured section (or pass a mask with True entries)."
        raise ValueError(msg)
    if mask.all():
        msg = "`known` selects every spot, so there is nothing to impute; leave at least one section unknown."
        raise ValueError(msg)
    measured = table.obs[Key.MEASURED].to_numpy(dtype=bool)
    bad = mask & ~measured
    if bad.any():
        secs = sorted(set(table.obs[Key.SECTION].astype(str).to_numpy()[bad]))
        msg = f"`known` includes {int(bad.sum())} spot(s) without measured counts (sections {secs}); known spots must be measured."
        raise ValueError(msg)
    _ = stack


def _as_sample_list(train: Mapping[str, SpatialData] | Sequence[SpatialData] | None) -> list[tuple[str, SpatialData]]:
    if train is None:
        return []
    if isinstance(train, Mapping):
        return [(str(k), v) for k, v in train.items()]
    from spatialdata import SpatialData

    if isinstance(train, SpatialData):
        return [("train_0", train)]
    return [(_sample_name(s, f"train_{i}"), s) for i, s in enumerate(train)]


def _sample_name(sdata: SpatialData, default: str, table_key: str = Key.TABLE) -> str:
    try:
        ds = sdata.tables[table_key].uns[Key.UNS].get("dataset", {})
        return str(ds.get("patient", default)) if isinstance(ds, Mapping) else default
    except (KeyError, AttributeError):
        return default


def selection_rows(table: AnnData, stack: StackInfo, known: np.ndarray | None, gene_sections: Any) -> np.ndarray:
    """Rows whose raw counts rank the genes.

    ``"labelled"`` = the known spots (all measured spots when ``known`` is `None`), ``"all"`` = every measured
    spot (the paper's dataset-wide list), or a list of section names (their measured spots).
    """
    measured = table.obs[Key.MEASURED].to_numpy(dtype=bool)
    if isinstance(gene_sections, str):
        if gene_sections == "labelled":
            return measured.copy() if known is None else (np.asarray(known, dtype=bool) & measured)
        if gene_sections == "all":
            return measured.copy()
        gene_sections = [gene_sections]
        if gene_sections[0] not in stack.sections:
            msg = f"Unknown gene_sections {gene_sections[0]!r}; use 'labelled', 'all' or section names from {stack.sections}."
            raise ValueError(msg)
    names = [str(s) for s in gene_sections]
    bad = [s for s in names if s not in stack.sections]
    if bad:
        msg = f"gene_sections names unknown section(s) {bad}; the stack has sections {stack.sections}."
        raise ValueError(msg)
    codes = section_codes(table, stack)
    return np.isin(codes, [stack.sections.index(s) for s in names]) & measured


def choose_genes(
    table: AnnData,
    stack: StackInfo,
    *,
    known: np.ndarray | None,
    n_genes: int,
    gene_sections: Any = "labelled",
    train_tables: Sequence[tuple[AnnData, StackInfo]] = (),
    table_key: str | None = None,
) -> tuple[list[str], pd.Series, list[str]]:
    """Top ``n_genes`` by mean over this stack's selection sections and every measured training section.

    Repeated var_names (in ``table`` or a training table) are a :class:`ValueError`, before any work; a selection
    section whose total count is 0 is logged as a warning (:func:`section_gene_means`). ``table_key`` names the
    table in messages.

    Returns the genes, their scores and the names of the sections used (``"train<i>:<section>"`` for training
    sections).
    """
    check_unique_var_names(table, table_label(table_key))
    for i, (t, _) in enumerate(train_tables):
        check_unique_var_names(t, table_label(table_key, i))
    rows = selection_rows(table, stack, known, gene_sections)
    if not rows.any():
        msg = f"gene_sections={gene_sections!r} selects no measured spot to rank genes on."
        raise ValueError(msg)
    frames = [section_gene_means(table, rows, stack, where=table_label(table_key))]
    used = list(frames[0].index)
    for i, (t, s) in enumerate(train_tables):
        f = section_gene_means(t, t.obs[Key.MEASURED].to_numpy(dtype=bool), s, where=table_label(table_key, i))
        frames.append(f)
        used += [f"train{i}:{sec}" for sec in f.index]
    genes, score = top_genes(frames, n_genes)
    return genes, score, used


# ------------------------------------------------------------------------------------------------ public functions
def select_genes(
    sdata: SpatialData,
    *,
    known: Any = None,
    n_genes: int = 250,
    sections: str | Sequence[str] = "labelled",
    train: Mapping[str, SpatialData] | Sequence[SpatialData] | None = None,
    table_key: str = Key.TABLE,
    key_added: str = "asign_selected",
    inplace: bool = True,
) -> list[str] | None:
    """Select the modelled genes: the ``n_genes`` with the largest mean raw count (method.md §2.1).

    In each selection section, every gene's mean raw count is taken over the section's selected spots (its sum
    divided by the number of spots, independent of the spot order); these per-section means are averaged with equal
    section weights; the largest averages win and ties go by gene name. Only genes present in every stack (this one
    and ``train``) are ranked. A selection section with a total count of 0 is logged as a warning.

    Parameters
    ----------
    sdata
        A :class:`spatialdata.SpatialData` section stack.
    known
        The labelled spots: section name(s) or a boolean mask over the table rows. With
        ``sections="labelled"`` only these spots are read. `None` means every measured spot.
    n_genes
        Number of genes to keep.
    sections
        ``"labelled"`` (default; the known spots of this stack plus every measured spot of ``train``: no test
        labels are used), ``"all"`` (every measured spot, the paper's dataset-wide list, which reads unknown
        sections) or a list of section names.
    train
        Labelled training stacks (other samples) whose measured sections also rank the genes.
    table_key
        Key of the table in :attr:`spatialdata.SpatialData.tables` that annotates the spots of all sections.
    key_added
        Prefix of the keys written. A ``key_added`` whose keys are reserved by the stack contract (e.g.
        ``"n_sections_measured"`` in ``.var``, ``"asign"`` in ``.uns``) is refused before any work.
    inplace
        If `True`, write into the table and return `None`; otherwise return the gene list.

    Returns
    -------
    If ``inplace = False``, the selected genes, largest mean first. Otherwise modifies ``sdata.tables[table_key]``
    with ``.var['{key_added}']`` (bool), ``.var['{key_added}_score']`` (average per-section mean count; NaN for
    genes absent from a training stack) and ``.uns['{key_added}']`` (``genes`` in rank order, ``n_genes``,
    ``gene_sections``, ``sections`` used).

    Raises
    ------
    ValueError
        If the table's var_names are not unique, or ``key_added`` names a reserved key.
    """
    from asign.io._validate import validate_stack

    n_genes = check_number("n_genes", n_genes, integer=True, minimum=1)
    if inplace:
        check_reserved_keys(key_added, table_key, var=(key_added, f"{key_added}_score"), uns=(key_added,))
    stack = validate_stack(sdata, table_key=table_key)  # refuses repeated var_names too
    table = sdata.tables[table_key]
    mask = None
    if known is not None:
        mask = known_mask(table, stack, known)
        if not mask.any():
            msg = "`known` selects no spot."
            raise ValueError(msg)
    train_tables = []
    for name, s in _as_sample_list(train):
        train_tables.append((s.tables[table_key], validate_stack(s, table_key=table_key)))
        _ = name
    genes, score, used = choose_genes(
        table,
        stack,
        known=mask,
        n_genes=n_genes,
        gene_sections=sections,
        train_tables=train_tables,
        table_key=table_key,
    )
    if not inplace:
        return genes
    table.var[key_added] = table.var_names.isin(genes)
    table.var[f"{key_added}_score"] = score.reindex(table.var_names.astype(str)).to_numpy()
    table.uns[key_added] = {
        "genes": list(genes),
        "n_genes": int(len(genes)),
        "gene_sections": sections if isinstance(sections, str) else [str(s) for s in sections],
        "sections": used,
    }
    logger.info(
        f"Adding `.var['{key_added}']`, `.var['{key_added}_score']` and `.uns['{key_added}']` ({len(genes)} genes)."
    )
    return None


def normalize(
    sdata: SpatialData,
    *,
    genes: str | Sequence[str] | None = None,
    normalization: str = "st-net",
    table_key: str = Key.TABLE,
    key_added: str = "asign_normalized",
    inplace: bool = True,
) -> pd.DataFrame | None:
    """Normalise the measured spots' raw counts of the modelled genes (method.md §2.2); raw counts are not altered.

    Parameters
    ----------
    sdata
        A :class:`spatialdata.SpatialData` section stack.
    genes
        Modelled genes (a gene name or a list); `None` takes ``uns['asign_selected']['genes']`` written by
        :func:`asign.pp.select_genes`.
    normalization
        ``"st-net"``: ``ln((c + 1) / sum_selected(c + 1))`` per spot, the sum over the modelled genes only (the
        paper's scale); ``"log1p"``: ``ln(1 + 1e4 c / L)`` with ``L`` the spot's total count over all genes.
    table_key
        Key of the table in :attr:`spatialdata.SpatialData.tables` that annotates the spots of all sections.
    key_added
        Key of the ``obsm`` and ``uns`` entries written. A key reserved by the stack contract (e.g. ``"spatial"``
        in ``.obsm``, ``"asign"`` in ``.uns``) is refused before any work.
    inplace
        If `True`, write into the table and return `None`; otherwise return the values.

    Returns
    -------
    If ``inplace = False``, a DataFrame ``(spots, genes)`` of normalised values, NaN for unmeasured spots.
    Otherwise modifies ``sdata.tables[table_key]`` with ``.obsm['{key_added}']`` (that DataFrame),
    ``.obs['total_counts']`` (total raw count over all genes; NaN for unmeasured spots) and
    ``.uns['{key_added}']`` (``normalization``, ``genes``).
    """
    from asign.io._validate import validate_stack

    check_normalization(normalization)
    if inplace:
        check_reserved_keys(key_added, table_key, obsm=(key_added,), uns=(key_added,))
    validate_stack(sdata, table_key=table_key)
    table = sdata.tables[table_key]
    if genes is None:
        sel = table.uns.get("asign_selected")
        if not isinstance(sel, Mapping) or "genes" not in sel:
            msg = "Pass `genes=` or run `asign.pp.select_genes` first (uns['asign_selected'] not found)."
            raise ValueError(msg)
        genes = [str(g) for g in sel["genes"]]
    genes = check_gene_list(genes)
    gene_indices(table, genes, table_key)
    measured = table.obs[Key.MEASURED].to_numpy(dtype=bool)
    values, total = normalized_rows(table, genes, measured, normalization)
    df = pd.DataFrame(values, index=table.obs_names, columns=genes)
    if not inplace:
        return df
    table.obs[Key.TOTAL_COUNTS] = total
    table.obsm[key_added] = df
    table.uns[key_added] = {"normalization": normalization, "genes": genes}
    logger.info(f"Adding `.obsm['{key_added}']`, `.obs['{Key.TOTAL_COUNTS}']` and `.uns['{key_added}']`.")
    return None
