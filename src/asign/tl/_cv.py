"""Patient-level cross-validation (method.md §6.1, §7.1): :func:`asign.tl.cross_validate`."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd

from asign._checks import check_number
from asign._constants import Key
from asign._device import spawn_seeds
from asign._docs import inject_docs
from asign._logging import logger
from asign._stack import genes_lacking, unmeasured_genes
from asign.pp._genes import (
    _sample_name,
    check_known,
    check_normalization,
    gene_indices,
    known_mask,
    section_gene_means,
    top_genes,
)

from ._evaluate import COLUMNS, evaluate
from ._impute import (
    _check_key_added,
    check_distinct_samples,
    check_gene_list,
    run_impute,
    train_contexts,
    write_output_table,
)
from ._registry import FitContext, check_before_fit, get_fit, get_method

if TYPE_CHECKING:
    from spatialdata import SpatialData

HER2ST_FOLDS = (("A", "E"), ("B", "F"), ("C", "G"), ("D", "H"))
_MEAN_METRICS = ("pcc_gene", "pcc_gene_varying", "mse", "mae")
_POOLED_METRICS = ("pcc_spot_legacy", "mse_pooled", "mae_pooled")
CV_COLUMNS = ["level", "fold", "sample", "statistic", *COLUMNS[1:], "method", "normalization"]


def _named_samples(
    samples: Mapping[str, SpatialData] | Sequence[SpatialData], table_key: str
) -> tuple[dict[str, SpatialData], dict[str, str]]:
    """The samples by name, and each one's patient (``uns['asign']['dataset']['patient']``, else its name).

    A sequence names each sample by its patient; a later sample of a patient already named is ``sample_<i>``.
    """
    if isinstance(samples, Mapping):
        out = {str(k): v for k, v in samples.items()}
        if len(out) != len(samples):
            msg = f"The names of `samples` {list(samples)} collide as strings; give every sample a distinct name."
            raise ValueError(msg)
    else:
        out = {}
        for i, s in enumerate(samples):
            name = _sample_name(s, f"sample_{i}", table_key)
            if name in out:
                name = f"sample_{i}"
            while name in out:  # a patient literally named 'sample_<i>'
                name = f"{name}_"
            out[name] = s
    if len(out) < 1:
        msg = "cross_validate needs at least one sample."
        raise ValueError(msg)
    return out, {n: _sample_name(s, n, table_key) for n, s in out.items()}


def default_folds(names: Sequence[str], patients: Mapping[str, str] | None = None) -> list[list[str]]:
    """Leave one patient out: the samples of a patient (``patients``: name -> patient; default: its name) form one fold.

    HER2ST's patient pairs {A,E}, {B,F}, {C,G}, {D,H} when the patients (or, with one sample per patient, the sample
    names) are A-H.
    """
    patients = dict(patients or {})
    groups: dict[str, list[str]] = {}
    for n in names:
        groups.setdefault(str(patients.get(n, n)), []).append(n)
    if sorted(groups) == sorted("ABCDEFGH"):
        return [[n for p in pair for n in groups[p]] for pair in HER2ST_FOLDS]
    if sorted(names) == sorted("ABCDEFGH") and len(groups) == len(names):
        return [list(f) for f in HER2ST_FOLDS]
    return list(groups.values())


def _warn_split_patients(folds: list[list[str]], names: Sequence[str], patients: Mapping[str, str]) -> None:
    """Warn about given folds that test a patient's sample while another sample of that patient trains."""
    fold_of = {n: i for i, f in enumerate(folds) for n in f}
    groups: dict[str, list[str]] = {}
    for n in names:
        groups.setdefault(patients.get(n, n), []).append(n)
    for p, members in groups.items():
        where = {fold_of.get(n) for n in members}
        if len(members) > 1 and len(where) > 1:
            logger.warning(
                f"Samples {members} share patient {p!r} but are not tested in one fold: a fold testing one of them "
                "trains on (or ranks genes on) another, i.e. the folds are not patient-level. Put them in one fold "
                "(the default folds do)."
            )


def _check_folds(folds: Sequence[Sequence[str]], names: Sequence[str]) -> list[list[str]]:
    folds = [[f] if isinstance(f, str) else [str(x) for x in f] for f in folds]
    seen: dict[str, int] = {}
    for i, f in enumerate(folds):
        if not f:
            msg = f"Fold {i} is empty; every fold needs at least one test sample."
            raise ValueError(msg)
        for n in f:
            if n not in names:
                msg = f"Fold {i} names sample {n!r}, which is not among the samples {list(names)}."
                raise ValueError(msg)
            if n in seen:
                msg = f"Sample {n!r} is a test sample of folds {seen[n]} and {i}; folds must not overlap."
                raise ValueError(msg)
            seen[n] = i
    return folds


def _known_spec(known: Any, name: str, sections: list[str]) -> Any:
    if isinstance(known, Mapping):
        if name not in known:
            msg = f"`known` has no entry for test sample {name!r}."
            raise ValueError(msg)
        return known[name]
    if known == "first":
        return [sections[0]]
    if known == "middle":
        return [sections[len(sections) // 2]]
    msg = f"`known` must be 'first', 'middle' or a mapping sample -> sections/mask, got {known!r}."
    raise ValueError(msg)


def _check_genes_measured(
    genes: list[str],
    named: Mapping[str, SpatialData],
    folds: list[list[str]],
    masks: Mapping[str, np.ndarray],
    table_key: str,
) -> None:
    """A ValueError, before any fold runs, for a fixed gene that a section whose labels are read never measured.

    A sample that trains in some fold has the labels of every measured section read; a sample tested in every fold
    it takes part in (the only fold) has those of its known sections read. The error names the sample, the
    section(s) and the genes (``uns['asign']['unmeasured_genes']``).
    """
    for n, s in named.items():
        t = s.tables[table_key]
        if not unmeasured_genes(t):
            continue
        trains_in = [i for i, f in enumerate(folds) if n not in f]
        if trains_in:
            rows = t.obs[Key.MEASURED].to_numpy(dtype=bool)
            role = f"its measured sections are training labels in fold(s) {trains_in}"
        else:
            rows = np.asarray(masks[n], dtype=bool)
            role = f"its known section(s) are the labels of fold {next(i for i, f in enumerate(folds) if n in f)}"
        lacking = genes_lacking(t, rows, genes)
        if lacking:
            detail = "; ".join(
                f"section {x!r}: {g[:5]}{f' (+{len(g) - 5} more)' if len(g) > 5 else ''}" for x, g in lacking.items()
            )
            msg = (
                f"Sample {n!r}: `genes` includes gene(s) never measured in a section whose labels cross_validate "
                f"reads ({detail}; uns['asign']['unmeasured_genes']): {role}. Every gene of a fixed list must be "
                "measured there; leave these genes out of `genes`, or pass genes=None (each fold then ranks only "
                "genes that every labelled section measured)."
            )
            raise ValueError(msg)


def _fold_genes(
    test: dict[str, tuple[SpatialData, np.ndarray]],
    train: dict[str, SpatialData],
    *,
    n_genes: int,
    gene_sections: str,
    table_key: str,
) -> list[str]:
    """Top genes of a fold.

    ``"labelled"``: the training samples' measured spots and the test samples' known spots; ``"all"``: every
    measured spot of every sample (the paper's list).
    """
    from asign.io._validate import validate_stack

    frames = []
    for s, mask in test.values():
        t = s.tables[table_key]
        rows = t.obs[Key.MEASURED].to_numpy(dtype=bool)
        if gene_sections == "labelled":
            rows = rows & mask
        frames.append(section_gene_means(t, rows, validate_stack(s, table_key=table_key)))
    for s in train.values():
        t = s.tables[table_key]
        frames.append(
            section_gene_means(t, t.obs[Key.MEASURED].to_numpy(dtype=bool), validate_stack(s, table_key=table_key))
        )
    genes, _ = top_genes(frames, n_genes)
    return genes


def _pooled_weights(rows: pd.DataFrame, sections: pd.DataFrame) -> pd.DataFrame:
    """``rows`` with what their pooled metrics are pooled over: scored entries and spots with a per-spot PCC.

    Section rows count their own; a sample row counts its sample's section rows (``sections``) of the same fold.
    """
    rows = rows.copy()
    defined = rows["n_spots"] - rows["n_constant_spots"].fillna(0).astype(int)
    rows["_spots_def"] = defined.to_numpy(dtype=float)
    if (rows["level"] == "section").all():
        rows["_entries"] = (rows["n_spots"] * rows["n_genes"]).to_numpy(dtype=float)
    else:
        per = (sections["n_spots"] * sections["n_genes"]).groupby([sections["fold"], sections["sample"]]).sum()
        rows["_entries"] = per.reindex(pd.MultiIndex.from_frame(rows[["fold", "sample"]])).to_numpy(dtype=float)
    return rows


def _weighted_mean(v: pd.Series, w: np.ndarray) -> float:
    v = v.to_numpy(dtype=float)
    ok = np.isfinite(v) & (w > 0)
    return float(np.sum(v[ok] * w[ok]) / w[ok].sum()) if ok.any() else np.nan


def _aggregate(rows: pd.DataFrame, level: str, by: list[str]) -> pd.DataFrame:
    """Aggregate rows: plain means of the per-section metrics; the pooled ones weighted by what they pool.

    ``rows`` carry ``_entries`` and ``_spots_def`` (:func:`_pooled_weights`): ``mse_pooled`` / ``mae_pooled`` are
    weighted by scored (spot, gene) entries, ``pcc_spot_legacy`` by the spots that have a per-spot PCC, so the
    result equals pooling the underlying errors and correlations directly.
    """
    out = []
    for keys, g in rows.groupby(by, sort=False) if by else [((), rows)]:
        keys = keys if isinstance(keys, tuple) else (keys,)
        rec: dict[str, Any] = dict(zip(by, keys, strict=True))
        rec.update({"level": level, "n_spots": int(g["n_spots"].sum()), "n_genes": int(g["n_genes"].max())})
        for m in _MEAN_METRICS:
            rec[m] = float(g[m].mean())
        rec["pcc_spot_legacy"] = _weighted_mean(g["pcc_spot_legacy"], g["_spots_def"].to_numpy())
        for m in ("mse_pooled", "mae_pooled"):
            rec[m] = _weighted_mean(g[m], g["_entries"].to_numpy())
        for c in ("n_constant_truth", "n_constant_pred", "n_constant_spots"):
            rec[c] = int(g[c].sum())
        out.append(rec)
    return pd.DataFrame(out)


@inject_docs()
def cross_validate(
    samples: Mapping[str, SpatialData] | Sequence[SpatialData],
    *,
    folds: Sequence[Sequence[str]] | None = None,
    known: str | Mapping[str, Any] = "first",
    method: str = "asign",
    method_kwargs: dict[str, Any] | None = None,
    genes: Sequence[str] | None = None,
    n_genes: int = 250,
    normalization: str = "st-net",
    gene_sections: str = "labelled",
    per: str | Sequence[str] = ("gene", "section", "overall"),
    table_key: str = Key.TABLE,
    key_added: str | None = None,
    overwrite: bool = False,
    seed: int = 0,
    device: Any = None,
    show_progress_bar: bool = True,
) -> pd.DataFrame:
    """Cross-validate a method over samples (patients) with patient-level folds.

    For every fold, the test samples are removed before anything is fitted: the gene list is ranked on the training
    samples' measured spots and the test samples' known spots only (``gene_sections="labelled"``); a trainable
    method's ``fit`` runs once on the training samples (fully labelled) with a fold seed spawned from ``seed``; then
    every test sample is imputed from its known section and scored on its other measured sections. For methods
    without training, the training samples only rank the genes.

    Parameters
    ----------
    samples
        The samples: a mapping ``name -> SpatialData`` or a sequence (names from ``uns['asign']['dataset']['patient']``
        when present, else ``sample_<i>``; a later sample of a patient already named is ``sample_<i>``). Each sample
        once: the same object (or zarr store) under two names is refused. A sample's patient is its
        ``uns['asign']['dataset']['patient']``, else its name.
    folds
        Test samples of each fold, e.g. HER2ST's ``[["A", "E"], ["B", "F"], ["C", "G"], ["D", "H"]]``. Default: leave
        one patient out, i.e. samples that share a patient form one fold (HER2ST's pairs of patients when the
        patients are A-H). Samples in no fold only ever train. Given folds that test a patient's sample while
        another of its samples trains are allowed, with a warning. A fold with no training sample (one sample, or a
        fold holding every sample) trains a trainable method transductively on each test sample's known spots,
        with a warning (column ``mode``).
    known
        The known spots of each test sample: ``"first"`` (section 1, the paper's protocol), ``"middle"``, or a
        mapping ``sample -> section name(s) or boolean mask``.
    method
        A registered method (see :func:`asign.tl.impute`).
    method_kwargs
        Keyword arguments of the method.
    genes
        A fixed gene list for every fold (default: selected per fold); each gene once, present in every sample, and
        measured (not in ``uns['asign']['unmeasured_genes']``) in every section whose labels are read: every
        measured section of a sample that trains in some fold, the known sections of a test sample. Checked before
        any fold runs; errors name the sample, the section and the genes.
    n_genes
        Number of genes selected per fold.
    normalization
        ``"st-net"`` or ``"log1p"``.
    gene_sections
        ``"labelled"`` (default; no test labels) or ``"all"`` (every measured section of every sample: the
        paper's dataset-wide list, which reads test labels; reported as such).
    per
        Levels of per-test-sample rows to keep: any of ``"gene"``, ``"section"`` and ``"overall"`` (the
        ``"sample"`` rows) as in :func:`asign.tl.evaluate`; the fold, summary and pooled rows are always there.
    {table_key}
    key_added
        If given, write each test sample's output table into ``samples[name].tables[key_added]`` (the table of
        :func:`asign.tl.impute`, whose ``.uns['asign']`` also holds ``fold`` (the fold index), ``fold_test_samples``
        (the fold's test samples) and ``gene_sections`` (this function's)); `None` writes nothing. Checked (a valid
        SpatialData element name, no table asign did not write) before any fold runs; the tables are written once
        every fold has run, so nothing is written when a fold raises an error.
    overwrite
        Replace earlier asign output tables under ``key_added``.
    {seed}
    {device}
    {show_progress_bar}

    Returns
    -------
    A tidy :class:`pandas.DataFrame` with the metric columns of :func:`asign.tl.evaluate` plus ``fold`` (int),
    ``sample``, ``statistic``, ``method``, ``normalization``, ``gene_sections`` (``"given"`` for a fixed gene list)
    and ``mode``: ``"inductive"`` (the method was fitted on each fold's training samples), ``"transductive"`` (a
    trainable method in a fold without training samples, trained on each test sample's known spots; as folds never
    overlap, such a fold is the only one) or ``"untrained"`` (a method without a training step). The rows:

    - ``level`` ``"gene"`` / ``"section"``: per test sample, as :func:`asign.tl.evaluate`;
    - ``"sample"``: a test sample's overall scores (means over its unknown sections; legacy metrics pooled over its
      spots);
    - ``"fold"``: the mean over the fold's test samples (legacy metrics pooled over the fold's spots);
    - ``"summary"``: two rows, ``statistic="mean"`` and ``statistic="sd"`` (sample sd, ``ddof=1``) of the fold
      scores over folds;
    - ``"pooled"``: every scored section of every fold weighs equally; legacy per-spot PCC, ``mse_pooled``,
      ``mae_pooled`` pooled over all scored spots (the paper's way of reporting Table 1). Pooled means equal pooling
      the underlying values: ``mse_pooled`` / ``mae_pooled`` weigh each scored (spot, gene) entry equally (sections
      of a partial gene panel count their entries), the legacy per-spot PCC each spot that has one.
    """
    seed = check_number("seed", seed, integer=True, minimum=0)
    check_normalization(normalization)
    levels = [per] if isinstance(per, str) else list(per)
    if not levels or not set(levels) <= {"gene", "section", "overall"}:
        msg = f"`per` must name levels from ['gene', 'section', 'overall'], got {per!r}."
        raise ValueError(msg)
    if gene_sections not in ("labelled", "all"):
        msg = f"gene_sections must be 'labelled' or 'all', got {gene_sections!r}."
        raise ValueError(msg)
    from asign.io._validate import validate_stack

    get_method(method)
    fit = get_fit(method)
    named, patients = _named_samples(samples, table_key)
    names = list(named)
    check_distinct_samples(  # a sample passed twice would train on its own test labels
        list(named.items()),
        "a fold testing one would train on the other, i.e. on its own unknown sections' labels.",
    )
    if folds is None:
        folds = default_folds(names, patients)
    else:
        folds = _check_folds(folds, names)
        _warn_split_patients(folds, names, patients)
    stacks = {n: validate_stack(s, table_key=table_key) for n, s in named.items()}
    if genes is not None:  # before any fold trains
        genes = check_gene_list(genes)
        for n, s in named.items():
            try:
                gene_indices(s.tables[table_key], genes)
            except (KeyError, ValueError) as e:
                msg = f"Sample {n!r}: {e.args[0]} `genes` must be present in every sample."
                raise (KeyError if isinstance(e, KeyError) else ValueError)(msg) from None
    if gene_sections == "all":
        logger.warning(
            "gene_sections='all' ranks each fold's genes on every measured section of every sample, the test "
            "samples' unknown sections included (the paper's dataset-wide list); results are labelled as such."
        )
    masks: dict[str, np.ndarray] = {}
    for f in folds:
        for n in f:
            t = named[n].tables[table_key]
            try:  # before any fold trains; the errors name the sample
                masks[n] = known_mask(t, stacks[n], _known_spec(known, n, stacks[n].sections))
                check_known(t, stacks[n], masks[n])
                if key_added is not None:
                    _check_key_added(named[n], key_added, table_key, overwrite=overwrite)
            except (KeyError, ValueError, TypeError) as e:
                msg = f"Sample {n!r}: {e.args[0]}"
                raise type(e)(msg) from None
    if genes is not None:  # else the first fold reading a section's labels would fail on a gene it never measured
        _check_genes_measured(genes, named, folds, masks, table_key)
    modes: list[str] = []
    for i, f in enumerate(folds):
        has_train = any(m not in f for m in names)
        modes.append("untrained" if fit is None else ("inductive" if has_train else "transductive"))
        if modes[-1] == "transductive":
            logger.warning(
                f"Fold {i} (test samples {f}) has no training sample: method {method!r} trains transductively on "
                "each test sample's known spots instead of inductively on other samples (column 'mode' of the "
                "result). Pass more samples, or folds that leave some samples to train on."
            )
        if fit is not None:
            train_tables = [(m, named[m].tables[table_key]) for m in names if m not in f]
            for n in f:
                check_before_fit(
                    method,
                    named[n].tables[table_key],
                    dict(method_kwargs or {}),
                    table_key,
                    train=train_tables,
                    sample=n,
                    sdata=named[n],
                )
    seeds = spawn_seeds(seed, len(folds))
    params = dict(method_kwargs or {})
    frames = []
    outputs: dict[str, Any] = {}  # written only once every fold has run
    from tqdm.auto import tqdm

    for i, test_names in enumerate(tqdm(folds, desc=f"cross_validate[{method}]", disable=not show_progress_bar)):
        train_names = [n for n in names if n not in test_names]
        train = {n: named[n] for n in train_names}
        fold_genes = (
            list(genes)
            if genes is not None
            else _fold_genes(
                {n: (named[n], masks[n]) for n in test_names},
                train,
                n_genes=n_genes,
                gene_sections=gene_sections,
                table_key=table_key,
            )
        )
        tctx = train_contexts(
            list(train.items()),
            genes=fold_genes,
            normalization=normalization,
            table_key=table_key,
            params=params,
            seed=seeds[i],
            device=device,
            show_progress_bar=show_progress_bar,
        )
        fitted = None
        if fit is not None and tctx:
            fitted = fit(
                FitContext(
                    train=tctx,
                    genes=fold_genes,
                    normalization=normalization,
                    params=params,
                    seed=seeds[i],
                    device=device,
                    show_progress_bar=show_progress_bar,
                )
            )
        logger.info(f"Fold {i} ({modes[i]}): test {test_names}, train {train_names}, {len(fold_genes)} genes.")
        for n in test_names:
            out = run_impute(
                named[n],
                known=masks[n],
                method=method,
                genes=fold_genes,
                n_genes=len(fold_genes),
                normalization=normalization,
                gene_sections="labelled",
                train_ctx=tctx,
                fitted=fitted,
                method_kwargs=params,
                table_key=table_key,
                seed=seeds[i],
                device=device,
                show_progress_bar=show_progress_bar,
                sample=n,
                extra_uns={"fold": i, "fold_test_samples": list(test_names), "gene_sections": gene_sections},
            )
            df = evaluate(out, per=("gene", "section", "overall"))
            df.loc[df["level"] == "overall", "level"] = "sample"
            df["fold"] = i
            df["sample"] = n
            frames.append(df)
            outputs[n] = out
    if key_added is not None:
        for n, out in outputs.items():
            write_output_table(named[n], key_added, out)
    per_sample = pd.concat(frames, ignore_index=True)
    keep = per_sample[
        per_sample["level"].isin(
            [lv for lv in levels if lv in ("gene", "section")] + ["sample"] * ("overall" in levels)
        )
    ]
    secs = per_sample[per_sample["level"] == "section"]
    samp = _pooled_weights(per_sample[per_sample["level"] == "sample"], secs)
    fold_rows = _aggregate(samp, "fold", ["fold"])
    summary = []
    for stat in ("mean", "sd"):
        rec: dict[str, Any] = {"level": "summary", "statistic": stat, "n_spots": int(fold_rows["n_spots"].sum())}
        for m in (*_MEAN_METRICS, *_POOLED_METRICS):
            v = fold_rows[m].to_numpy(dtype=float)
            rec[m] = float(v.mean()) if stat == "mean" else (float(v.std(ddof=1)) if v.size > 1 else np.nan)
        rec["n_genes"] = int(fold_rows["n_genes"].max())
        summary.append(rec)
    pooled = _aggregate(_pooled_weights(secs, secs), "pooled", [])
    result = pd.concat([keep, fold_rows, pd.DataFrame(summary), pooled], ignore_index=True)
    result["method"] = method
    result["normalization"] = normalization
    result["gene_sections"] = gene_sections if genes is None else "given"
    # folds never overlap, so a fold without training samples is the only fold: every fold has the same mode
    result["mode"] = modes[0]
    cols = [c for c in CV_COLUMNS if c in result.columns] + ["gene_sections", "mode"]
    result = result[cols]
    result["fold"] = result["fold"].astype("Int64")
    result["n_constant_spots"] = result["n_constant_spots"].astype("Int64")
    return result
