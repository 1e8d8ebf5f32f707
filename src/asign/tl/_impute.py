"""The single entry point of every imputation method: :func:`asign.tl.impute`."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd

from asign._checks import check_number
from asign._constants import Key
from asign._docs import inject_docs
from asign._logging import logger
from asign._stack import genes_lacking, section_codes, unmeasured_genes
from asign.pp._genes import (
    GENE_SECTIONS,
    _as_sample_list,
    _sample_name,
    check_gene_list,
    check_known,
    check_normalization,
    choose_genes,
    gene_indices,
    known_mask,
    normalized_rows,
    selection_rows,
)

from ._registry import FitContext, ImputeContext, ImputeResult, check_before_fit, get_fit, get_method, to_uns

if TYPE_CHECKING:
    from anndata import AnnData
    from spatialdata import SpatialData

    from asign._stack import StackInfo

WRITTEN_BY = "asign.tl.impute"
_COPIED_OBSM = (Key.SPATIAL, Key.SPATIAL_ALIGNED, Key.SPATIAL_3D)


# ------------------------------------------------------------------------------------------- the label accessor
def labelled_targets(
    table: AnnData, genes: Sequence[str], rows: np.ndarray, normalization: str
) -> tuple[np.ndarray, np.ndarray]:
    """The single label accessor: normalised targets of ``rows`` only, NaN for every other spot.

    Only the raw counts of ``rows`` are read from the count matrix.

    Parameters
    ----------
    table
        The spot table (raw counts in ``layers['counts']`` or ``.X``).
    genes
        Modelled genes.
    rows
        Boolean ``(n_obs,)`` mask of the spots whose labels may be read.
    normalization
        ``"st-net"`` or ``"log1p"``.

    Returns
    -------
    ``Y`` ``(n_obs, n_genes)`` float64 (NaN outside ``rows``, and for a gene that a spot's section never measured,
    see :func:`asign._stack.unmeasured_genes`) and the total counts over all genes ``(n_obs,)`` (NaN outside
    ``rows``).
    """
    return normalized_rows(table, genes, rows, normalization)


def counts_free_view(table: AnnData) -> AnnData:
    """An AnnData that shares ``obs``, ``obsm``, ``obsp`` and ``uns`` with ``table`` but has no counts at all."""
    from anndata import AnnData

    return AnnData(obs=table.obs, obsm=table.obsm, obsp=table.obsp, uns=table.uns)


def build_context(
    sdata: SpatialData,
    *,
    stack: StackInfo,
    known: np.ndarray,
    genes: list[str],
    normalization: str,
    table_key: str = Key.TABLE,
    params: dict[str, Any] | None = None,
    seed: int = 0,
    device: Any = None,
    show_progress_bar: bool = True,
    sample: str = "",
    for_predict: bool = False,
) -> ImputeContext:
    """The :class:`~asign.tl._registry.ImputeContext` of one stack, with labels read for ``known`` rows only.

    A ValueError names the genes that a known section never measured (they have no labels there); its advice is
    for :func:`asign.tl.predict` (whose genes are the model's) when ``for_predict`` is set, else for the callers
    that choose the genes.
    """
    table = sdata.tables[table_key]
    Y, _ = labelled_targets(table, genes, known, normalization)
    lacking = np.isnan(Y[np.asarray(known, dtype=bool)]).any(axis=0)
    if lacking.any():  # only genes a known section never measured are NaN on known rows
        absent = unmeasured_genes(table)
        bad = [g for g, b in zip(genes, lacking, strict=True) if b]
        where = {s: sorted(set(bad) & gs) for s, gs in absent.items() if set(bad) & gs}
        if for_predict:  # the genes are the model's: tl.predict has no `genes`
            fix = (
                "tl.predict needs labels of every gene the model was trained on in the known spots: choose `known` "
                "sections that measured them, or fit a model without them (`asign.tl.fit(..., genes=[...])`)."
            )
        else:
            fix = (
                "leave them out of `genes` (the default gene selection ranks only genes every known section measured)."
            )
        msg = (
            f"{'Sample ' + repr(sample) + ': g' if sample else 'G'}enes {bad[:10]}{' ...' if len(bad) > 10 else ''} "
            f"were never measured in known section(s) {sorted(where)}, so they have no labels there; {fix}"
        )
        raise ValueError(msg)
    return ImputeContext(
        sdata=sdata,
        table=counts_free_view(table),
        stack=stack,
        genes=list(genes),
        Y=Y,
        known=np.asarray(known, dtype=bool).copy(),
        section_codes=section_codes(table, stack),
        normalization=normalization,
        params=dict(params or {}),
        seed=int(seed),
        device=device,
        show_progress_bar=show_progress_bar,
        sample=sample,
        table_key=table_key,
    )


def same_sample(a: SpatialData, b: SpatialData) -> str | None:
    """How ``a`` and ``b`` are one sample: ``"object"``, ``"zarr store '<path>'"`` (both backed by it) or `None`."""
    from pathlib import Path

    if a is b:
        return "object"
    pa, pb = getattr(a, "path", None), getattr(b, "path", None)
    if pa is not None and pb is not None and Path(pa).resolve() == Path(pb).resolve():
        return f"zarr store {str(Path(pa).resolve())!r}"
    return None


def check_distinct_samples(named: Sequence[tuple[str, SpatialData]], why: str) -> None:
    """A ValueError naming two entries of ``named`` that are one sample (:func:`same_sample`); ``why`` says the harm."""
    for i, (n, a) in enumerate(named):
        for m, b in named[i + 1 :]:
            if how := same_sample(a, b):
                msg = f"Samples {n!r} and {m!r} are the same {how}; {why} Pass each sample once."
                raise ValueError(msg)


TRAIN_TWICE = (
    "its labels would count twice in training, and early stopping could validate on labels the model trains on."
)


def check_not_test_sample(sdata: SpatialData, train: Sequence[tuple[str, SpatialData]]) -> None:
    """A ValueError if a training sample is ``sdata`` itself: its unknown sections' labels would reach training."""
    for name, s in train:
        if how := same_sample(s, sdata):
            msg = (
                f"Training sample {name!r} is the sample to impute itself (the same {how}); its unknown sections' "
                "labels would reach gene ranking and training. Train on other samples, or leave `train` out to train "
                "on the known spots only (transductive mode)."
            )
            raise ValueError(msg)


def train_contexts(
    train: Sequence[tuple[str, SpatialData]],
    *,
    genes: list[str],
    normalization: str,
    table_key: str = Key.TABLE,
    params: dict[str, Any] | None = None,
    seed: int = 0,
    device: Any = None,
    show_progress_bar: bool = True,
) -> list[ImputeContext]:
    """One fully labelled context (``known`` = every measured spot) per training stack."""
    from asign.io._validate import validate_stack

    out = []
    for name, s in train:
        st = validate_stack(s, table_key=table_key)
        t = s.tables[table_key]
        try:
            gene_indices(t, genes)
        except KeyError as e:
            msg = f"Training sample {name!r}: {e.args[0]} Choose genes present in every sample."
            raise KeyError(msg) from None
        except ValueError as e:
            msg = f"Training sample {name!r}: {e.args[0]}"
            raise ValueError(msg) from None
        measured = t.obs[Key.MEASURED].to_numpy(dtype=bool)
        out.append(
            build_context(
                s,
                stack=st,
                known=measured,
                genes=genes,
                normalization=normalization,
                table_key=table_key,
                params=params,
                seed=seed,
                device=device,
                show_progress_bar=show_progress_bar,
                sample=name,
            )
        )
    return out


# ------------------------------------------------------------------------------------------------ bookkeeping
def package_versions() -> dict[str, str]:
    """Versions of asign and the libraries its results depend on (read from package metadata; nothing imported)."""
    from importlib.metadata import PackageNotFoundError, version

    out = {}
    for pkg in (
        "asign",
        "numpy",
        "scipy",
        "pandas",
        "anndata",
        "spatialdata",
        "scikit-learn",
        "torch",
        "torch-geometric",
    ):
        try:
            out[pkg] = version(pkg)
        except PackageNotFoundError:
            out[pkg] = "not installed"
    try:
        from asign import __version__

        out["asign"] = str(__version__)
    except ImportError:  # pragma: no cover
        pass
    return out


def _check_key_added(sdata: SpatialData, key_added: str, table_key: str, *, overwrite: bool) -> None:
    """Errors for an output table key that SpatialData would refuse or that asign may not replace (before any work)."""
    from spatialdata._core.validation import check_valid_name

    try:
        check_valid_name(key_added)
    except (TypeError, ValueError) as e:
        msg = (
            f"key_added={key_added!r} is not a valid SpatialData element name ({e.args[0]}); pass a non-empty str of "
            "letters, digits, '_', '-' and '.', e.g. 'asign'."
        )
        raise type(e)(msg) from None
    clash = sorted(
        name
        for _, name, _ in sdata.gen_elements()
        if name.lower() == key_added.lower() and not (name == key_added and name in sdata.tables)
    )
    if clash:
        msg = (
            f"key_added={key_added!r} clashes with the element {clash[0]!r} of the SpatialData object (element names "
            "must differ, case-insensitively); choose another `key_added`."
        )
        raise ValueError(msg)
    if key_added == table_key:
        msg = f"key_added={key_added!r} is the input table; choose another key (default 'asign')."
        raise ValueError(msg)
    if key_added not in sdata.tables:
        return
    existing = sdata.tables[key_added]
    uns = existing.uns.get(Key.UNS, {})
    ours = isinstance(uns, Mapping) and uns.get("written_by") == WRITTEN_BY
    if not ours:
        msg = (
            f"sdata.tables[{key_added!r}] exists and was not written by asign.tl.impute; asign never overwrites a "
            f"table it did not write. Choose another `key_added` or remove it with `del sdata.tables[{key_added!r}]`."
        )
        raise ValueError(msg)
    if not overwrite:
        msg = f"sdata.tables[{key_added!r}] already holds an asign result; pass `overwrite=True` to replace it."
        raise ValueError(msg)


def write_output_table(sdata: SpatialData, key_added: str, out: AnnData) -> None:
    """Put the output table under ``key_added`` (the caller has checked that replacing it is allowed)."""
    if key_added in sdata.tables:
        del sdata.tables[key_added]
    sdata.tables[key_added] = out
    layers = ", ".join(f"'{k}'" for k in out.layers)
    logger.info(f"Adding `sdata.tables['{key_added}']` ({out.n_obs} spots x {out.n_vars} genes; layers {layers}).")


def _resolve_genes(
    table: AnnData,
    stack: StackInfo,
    *,
    genes: Sequence[str] | None,
    known: np.ndarray,
    n_genes: int,
    gene_sections: Any,
    train: Sequence[tuple[str, SpatialData]],
    table_key: str,
) -> tuple[list[str], str | list[str]]:
    if genes is not None:
        genes = check_gene_list(genes)
        gene_indices(table, genes)
        return genes, "given"
    if isinstance(gene_sections, str) and gene_sections not in GENE_SECTIONS and gene_sections not in stack.sections:
        msg = f"Unknown gene_sections {gene_sections!r}; use one of {list(GENE_SECTIONS)} or section names."
        raise ValueError(msg)
    from asign.io._validate import validate_stack

    train_tables = [(s.tables[table_key], validate_stack(s, table_key=table_key)) for _, s in train]
    chosen, _, _ = choose_genes(
        table, stack, known=known, n_genes=n_genes, gene_sections=gene_sections, train_tables=train_tables
    )
    if gene_sections == "all":
        logger.warning(
            "gene_sections='all' ranks genes on every measured section, unknown ones included (the paper's "
            "dataset-wide list); results are labelled as such."
        )
    elif gene_sections != "labelled":
        rows = selection_rows(table, stack, known, gene_sections)
        outside = sorted(set(table.obs[Key.SECTION].astype(str).to_numpy()[rows & ~known]))
        if outside:
            logger.warning(
                f"gene_sections={gene_sections!r} ranks genes on the labels of spots outside `known` (section(s) "
                f"{outside}), i.e. on test labels; results are labelled as such. Use gene_sections='labelled' for a "
                "list without test labels."
            )
    return chosen, gene_sections if isinstance(gene_sections, str) else [str(s) for s in gene_sections]


def _warn_partial_panels(table: AnnData, genes: Sequence[str], known: np.ndarray, normalization: str) -> None:
    """Warn when measured unknown sections lack modelled genes: their ST-Net truth sits on another scale.

    ST-Net divides by the sum over the modelled genes a spot's section measured. A section that measured fewer of
    them gets larger proportions than the known spots (whose sum runs over every modelled gene), so its truth in
    ``layers['target']`` is shifted against the labels the predictions learn from: MSE and MAE there are inflated,
    the per-gene PCC (within a section) hardly moves. Known sections lacking a gene are an error elsewhere.
    """
    if normalization != "st-net":
        return
    scored = table.obs[Key.MEASURED].to_numpy(dtype=bool) & ~np.asarray(known, dtype=bool)
    modelled = set(genes)
    lacking = {s: sorted(set(g)) for s, g in genes_lacking(table, scored, genes).items()}
    if lacking:
        detail = "; ".join(f"{s}: {len(g)} (e.g. {g[:3]})" for s, g in lacking.items())
        logger.warning(
            f"Section(s) {list(lacking)} did not measure some of the {len(modelled)} modelled genes ({detail}). With "
            "normalization='st-net' their spots' proportions are taken over the genes they measured, so their truth "
            "in layers['target'] sits on another scale than the known spots' labels: MSE and MAE there are inflated "
            "(the per-gene PCC hardly moves). Pass `genes=` measured in every section for comparable errors."
        )


def _check_result(res: ImputeResult, method: str, shape: tuple[int, int]) -> np.ndarray:
    if not isinstance(res, ImputeResult):
        msg = f"Method {method!r} returned {type(res).__name__}; it must return an ImputeResult."
        raise TypeError(msg)
    pred = np.asarray(res.imputed, dtype=np.float64)
    if pred.shape != shape:
        msg = f"Method {method!r} returned a prediction of shape {pred.shape}; expected {shape} (spots x genes)."
        raise ValueError(msg)
    if not np.all(np.isfinite(pred)):
        msg = f"Method {method!r} returned non-finite predictions for {int((~np.isfinite(pred)).any(axis=1).sum())} spots."
        raise ValueError(msg)
    for k, v in res.extra_layers.items():
        if np.shape(v) != shape:
            msg = f"Method {method!r}: extra layer {k!r} has shape {np.shape(v)}; expected {shape}."
            raise ValueError(msg)
        if k in (Key.TARGET, Key.IMPUTED):
            msg = f"Method {method!r}: extra layer name {k!r} is reserved."
            raise ValueError(msg)
    return pred


def _output_table(
    table: AnnData,
    *,
    genes: list[str],
    known: np.ndarray,
    target: np.ndarray,
    total_counts: np.ndarray,
    pred: np.ndarray,
    extra_layers: Mapping[str, np.ndarray],
    uns: dict[str, Any],
) -> AnnData:
    from anndata import AnnData
    from spatialdata.models import TableModel, get_table_keys

    region, region_key, instance_key = get_table_keys(table)
    obs = pd.DataFrame(index=table.obs_names.copy())
    obs[Key.SECTION] = pd.Categorical(
        table.obs[Key.SECTION].astype(str), categories=table.obs[Key.SECTION].cat.categories, ordered=True
    )
    reg = table.obs[region_key]
    cats = reg.cat.categories if isinstance(reg.dtype, pd.CategoricalDtype) else pd.unique(reg.astype(str))
    obs[region_key] = pd.Categorical(reg.astype(str).to_numpy(), categories=cats)
    obs[instance_key] = table.obs[instance_key].to_numpy()
    obs[Key.KNOWN] = np.asarray(known, dtype=bool)
    obs[Key.MEASURED] = table.obs[Key.MEASURED].to_numpy(dtype=bool)
    obs[Key.TOTAL_COUNTS] = total_counts
    if Key.Z in table.obs:
        obs[Key.Z] = table.obs[Key.Z].to_numpy()
    layers = {Key.TARGET: target.astype(np.float32), Key.IMPUTED: pred.astype(np.float32)}
    for k, v in extra_layers.items():
        layers[str(k)] = np.asarray(v, dtype=np.float32)
    obsm = {k: np.asarray(table.obsm[k]).copy() for k in _COPIED_OBSM if k in table.obsm}
    out = AnnData(X=None, obs=obs, var=pd.DataFrame(index=pd.Index(genes, dtype=str)), layers=layers, obsm=obsm)
    out.uns[Key.UNS] = uns
    region = [str(r) for r in np.atleast_1d(region)]
    return TableModel.parse(out, region=region, region_key=region_key, instance_key=instance_key)


# ----------------------------------------------------------------------------------------------------- impute
def run_impute(
    sdata: SpatialData,
    *,
    known: Any,
    method: str,
    genes: Sequence[str] | None,
    n_genes: int,
    normalization: str,
    gene_sections: Any,
    train: Sequence[tuple[str, SpatialData]] = (),
    train_ctx: list[ImputeContext] | None = None,
    fitted: Any = None,
    method_kwargs: dict[str, Any] | None,
    table_key: str,
    seed: int,
    device: Any,
    show_progress_bar: bool,
    sample: str = "",
    extra_uns: dict[str, Any] | None = None,
    for_predict: bool = False,
) -> AnnData:
    """Everything of :func:`impute` except writing: validate, select genes, build contexts, run, build the table.

    :func:`asign.tl.cross_validate` calls it with prebuilt training contexts and the fold's fitted state;
    :func:`asign.tl.predict` with ``for_predict=True`` (its error messages advise what predict can change).
    """
    from asign.io._validate import validate_stack

    stack = validate_stack(sdata, table_key=table_key)
    check_normalization(normalization)
    if device is not None:  # every method: a device that cannot exist is an error before any work
        from asign._device import resolve_device

        resolve_device(device)
    predict = get_method(method)
    fit = get_fit(method)
    table = sdata.tables[table_key]
    mask = known_mask(table, stack, known)
    check_known(table, stack, mask)
    n_genes = check_number("n_genes", n_genes, integer=True, minimum=1)
    gene_list, gene_source = _resolve_genes(
        table,
        stack,
        genes=genes,
        known=mask,
        n_genes=n_genes,
        gene_sections=gene_sections,
        train=train,
        table_key=table_key,
    )
    _warn_partial_panels(table, gene_list, mask, normalization)
    params = dict(method_kwargs or {})
    ctx = build_context(
        sdata,
        stack=stack,
        known=mask,
        genes=gene_list,
        normalization=normalization,
        table_key=table_key,
        params=params,
        seed=seed,
        device=device,
        show_progress_bar=show_progress_bar,
        sample=sample,
        for_predict=for_predict,
    )
    if train_ctx is None:
        train_ctx = train_contexts(
            train,
            genes=gene_list,
            normalization=normalization,
            table_key=table_key,
            params=params,
            seed=seed,
            device=device,
            show_progress_bar=show_progress_bar,
        )
    ctx.train = train_ctx
    if fitted is None and fit is not None and train_ctx:
        train_tables = [(c.sample, c.table) for c in train_ctx]
        check_before_fit(method, table, params, table_key, train=train_tables, sample=sample, sdata=sdata)
        fitted = fit(
            FitContext(
                train=train_ctx,
                genes=gene_list,
                normalization=normalization,
                params=params,
                seed=seed,
                device=device,
                show_progress_bar=show_progress_bar,
            )
        )
    elif fitted is None and fit is not None:  # transductive: the method trains inside; its input checks first
        check_before_fit(method, table, params, table_key, sample=sample, sdata=sdata)
    ctx.fitted = fitted
    logger.info(
        f"Imputing {len(gene_list)} genes with method {method!r}: {int(mask.sum())} known spots "
        f"(sections {ctx.known_sections()}), {int((~mask).sum())} to impute"
        + (f", {len(train_ctx)} training samples" if train_ctx else "")
        + "."
    )
    res = predict(ctx)
    pred = _check_result(res, method, (table.n_obs, len(gene_list)))
    # evaluation truth: every measured spot, read only after the method has returned
    measured = table.obs[Key.MEASURED].to_numpy(dtype=bool)
    target, total = labelled_targets(table, gene_list, measured, normalization)
    uns = {
        Key.STACK: dict(table.uns[Key.UNS][Key.STACK]),
        "written_by": WRITTEN_BY,
        "method": method,
        "params": to_uns(params),
        "result": to_uns(res.uns),
        "genes": list(gene_list),
        "n_genes": len(gene_list),
        "gene_sections": to_uns(gene_source),
        "known_sections": ctx.known_sections(),
        "n_known": int(mask.sum()),
        "normalization": normalization,
        "seed": int(seed),
        "device": "auto" if device is None else str(device),
        "source_table": table_key,
        "sample": sample,
        # the samples the model was trained on: these contexts, or those recorded in a fitted model (tl.predict)
        "train_samples": [c.sample for c in train_ctx]
        or [str(x) for x in getattr(fitted, "train_samples", None) or []],
        "versions": package_versions(),
    }
    if extra_uns:
        uns.update(to_uns(extra_uns))
    return _output_table(
        table,
        genes=gene_list,
        known=mask,
        target=target,
        total_counts=total,
        pred=pred,
        extra_layers=res.extra_layers,
        uns=uns,
    )


@inject_docs()
def impute(
    sdata: SpatialData,
    *,
    known: Any,
    method: str = "asign",
    genes: Sequence[str] | None = None,
    n_genes: int = 250,
    normalization: str = "st-net",
    gene_sections: str | Sequence[str] = "labelled",
    train: Mapping[str, SpatialData] | Sequence[SpatialData] | None = None,
    method_kwargs: dict[str, Any] | None = None,
    table_key: str = Key.TABLE,
    key_added: str = Key.OUTPUT_TABLE,
    overwrite: bool = False,
    inplace: bool = True,
    seed: int = 0,
    device: Any = None,
    show_progress_bar: bool = True,
) -> AnnData | None:
    """Impute the expression of the unknown spots with any registered method.

    The one entry point of the baselines (``"mean"``, ``"nearest"``, ``"propagation"``), the image baselines and
    ASIGN. It selects the modelled genes, normalises the known spots' raw counts, hides every other spot's labels
    (NaN) before the method sees them, runs the method, and writes one output table.

    Parameters
    ----------
    {sdata}
    known
        The spots whose measured expression the method may use: section name(s) (e.g. ``"C1"`` or ``["C1"]``)
        or a boolean mask over the rows of ``sdata.tables[table_key]``. It must select at least one spot, not
        every spot, and only measured spots.
    method
        A registered method: ``"mean"`` (known mean vector), ``"nearest"`` (distance-weighted mean of the nearest
        known spots in ``obsm['spatial_aligned']``), ``"propagation"`` (label propagation on the 3D graph of
        :func:`asign.pp.neighbors_3d`), ``"asign"``, and the image baselines when installed.
    genes
        Modelled genes. `None` selects the ``n_genes`` genes with the largest mean raw count (method.md §2.1).
    n_genes
        Number of genes to select when ``genes`` is `None`.
    normalization
        ``"st-net"`` (default, the paper's): ``ln((c + 1) / sum_selected(c + 1))`` per spot over the modelled
        genes; ``"log1p"``: ``ln(1 + 1e4 c / L)`` with ``L`` the spot's total count over all genes.
    gene_sections
        Which labelled spots rank the genes: ``"labelled"`` (default; the known spots plus every measured spot of
        ``train``; no test labels), ``"all"`` (every measured spot, unknown sections included: the paper's list,
        recorded as such) or section names. ``"all"``, and section names that include spots outside ``known``, rank
        genes on test labels: a warning is logged.
    train
        Labelled training stacks (other samples, every measured spot labelled) for trainable methods; a mapping
        ``name -> SpatialData`` or a sequence. They also rank the genes under ``gene_sections="labelled"``.
        ``sdata`` itself (the same object, or the same zarr store) is refused.
    method_kwargs
        Keyword arguments of the method (e.g. ``{{"k": 5}}`` for ``"nearest"``); recorded in ``uns``. Every method
        takes ``gene_rank``: project the prediction on that many principal axes of the known spots' normalised
        expression (method.md §6 item 8; `None` for the baselines, 10 for ``"asign"``).
    {table_key}
    key_added
        Key of the output table in :attr:`spatialdata.SpatialData.tables`: a valid SpatialData element name (a
        non-empty str of letters, digits, ``_``, ``-`` and ``.``), checked before the method runs.
    overwrite
        Replace an existing output table under ``key_added`` that an earlier :func:`asign.tl.impute` wrote. A
        table that asign did not write is never replaced.
    inplace
        If `True`, add the output table to ``sdata`` and return `None`; otherwise leave ``sdata`` untouched and
        return the output table.
    {seed}
    {device}
    {show_progress_bar}

    Returns
    -------
    If ``inplace = False``, the output :class:`~anndata.AnnData`. Otherwise adds ``sdata.tables['{{key_added}}']``:
    the same rows as the input table (same ``obs_names``, order and annotated shapes: region, region key and
    instance key as the input), ``var`` = modelled genes, ``.X`` = `None`, and

    - ``.layers['target']``: normalised measured values of every measured spot, NaN where not measured (also for a
      gene that the spot's section never measured: ``uns['asign']['unmeasured_genes']`` of the spot table). Written
      after the method has run, for :func:`asign.tl.evaluate` and plots; methods never see it (they get the
      known rows only).
    - ``.layers['imputed']``: the prediction for every spot (for known spots, the method's own estimate).
    - further layers a method adds (``"asign"``: ``'network'``, ``'propagation'`` where ``use_propagation=True``
      (the default), ``'nearest'`` where ``nearest_blend`` blended it in, and ``'full_rank'`` where the prediction
      was projected on ``gene_rank`` gene axes).
    - ``.obs['known']``, ``.obs['measured']``, ``.obs['section']``, ``.obs['total_counts']`` (total raw count over
      all genes; NaN where not measured), ``.obs['z']`` if present, and the annotation columns.
    - ``.obsm['spatial']`` (and ``'spatial_aligned'``, ``'spatial_3d'`` when present), copied.
    - ``.uns['asign']``: ``stack`` (the manifest), ``method``, ``params``, ``result`` (what the method recorded),
      ``genes``, ``n_genes``, ``gene_sections``, ``known_sections``, ``n_known``, ``normalization``, ``seed``,
      ``device``, ``source_table``, ``sample``, ``train_samples``, ``versions``, ``written_by``.

    Raw counts are never altered. Nothing is written when an error is raised.
    """
    seed = check_number("seed", seed, integer=True, minimum=0)
    train_list = _as_sample_list(train)
    check_distinct_samples(train_list, TRAIN_TWICE)
    check_not_test_sample(sdata, train_list)
    if inplace:
        _check_key_added(sdata, key_added, table_key, overwrite=overwrite)
    out = run_impute(
        sdata,
        known=known,
        method=method,
        genes=genes,
        n_genes=n_genes,
        normalization=normalization,
        gene_sections=gene_sections,
        train=train_list,
        method_kwargs=method_kwargs,
        table_key=table_key,
        seed=seed,
        device=device,
        show_progress_bar=show_progress_bar,
        sample=_sample_name(sdata, "", table_key),
    )
    if not inplace:
        return out
    write_output_table(sdata, key_added, out)
    return None
