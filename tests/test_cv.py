from __future__ import annotations

import numpy as np
import pytest
import scipy.sparse as sp

import asign
from asign.pp._genes import section_gene_means, top_genes
from asign.tl import _registry
from asign.tl._cv import default_folds
from asign.tl._registry import ImputeResult, register_method


def _sample(seed, n_sections=3):
    s = asign.datasets.synthetic_stack(n_sections=n_sections, n_spots=40, n_genes=15, images=False, seed=seed)
    t = s.tables["table"]
    t.obsm["spatial_aligned"] = np.asarray(t.obsm["spatial_world"], dtype=float)
    return s


@pytest.fixture
def samples():
    return {"P": _sample(1), "Q": _sample(2, 2), "R": _sample(3), "S": _sample(4)}


def test_cross_validate_structure_and_aggregation(samples):
    folds = [["P", "Q"], ["R", "S"]]
    df = asign.tl.cross_validate(samples, folds=folds, method="nearest", n_genes=6, show_progress_bar=False)
    assert set(df.level) == {"gene", "section", "sample", "fold", "summary", "pooled"}
    samp = df[df.level == "sample"].set_index("sample")
    assert list(samp.index) == ["P", "Q", "R", "S"] and list(samp.fold) == [0, 0, 1, 1]
    # each sample's rows equal tl.evaluate on the same imputation
    # R's fold ranks genes on every section of P and Q and the known sections of R and S
    frames = [
        section_gene_means(
            samples["R"].tables["table"], (samples["R"].tables["table"].obs["section"] == "S1").to_numpy()
        ),
        section_gene_means(
            samples["S"].tables["table"], (samples["S"].tables["table"].obs["section"] == "S1").to_numpy()
        ),
    ] + [section_gene_means(samples[n].tables["table"], np.ones(samples[n].tables["table"].n_obs, bool)) for n in "PQ"]
    genes = top_genes(frames, 6)[0]
    out = asign.tl.impute(samples["R"], known="S1", method="nearest", genes=genes, inplace=False)
    ev = asign.tl.evaluate(out, per="overall").iloc[0]
    for m in ("pcc_gene", "mse", "mae", "pcc_spot_legacy"):
        assert samp.loc["R", m] == pytest.approx(ev[m], abs=1e-9)
    # fold = mean over its samples (legacy figures weighted by spots); summary = mean and sd over folds
    fold = df[df.level == "fold"].set_index("fold")
    for i, (a, b) in enumerate(folds):
        assert fold.loc[i, "pcc_gene"] == pytest.approx((samp.loc[a, "pcc_gene"] + samp.loc[b, "pcc_gene"]) / 2)
        w = samp.loc[[a, b], "n_spots"].to_numpy(float)
        assert fold.loc[i, "pcc_spot_legacy"] == pytest.approx(
            np.average(samp.loc[[a, b], "pcc_spot_legacy"], weights=w)
        )
    summ = df[df.level == "summary"].set_index("statistic")
    assert summ.loc["mean", "pcc_gene"] == pytest.approx(fold["pcc_gene"].mean())
    assert summ.loc["sd", "pcc_gene"] == pytest.approx(fold["pcc_gene"].std(ddof=1))
    pooled = df[df.level == "pooled"].iloc[0]
    secs = df[df.level == "section"]
    assert pooled["pcc_gene"] == pytest.approx(secs["pcc_gene"].mean())
    assert pooled["n_spots"] == secs["n_spots"].sum()
    assert (df.method == "nearest").all() and (df.gene_sections == "labelled").all()


def test_fold_genes_use_no_test_labels(samples):
    # poisoning the unknown sections of the test samples changes neither the genes nor the predictions
    kw = {"folds": [["P", "R"]], "method": "mean", "n_genes": 5, "key_added": "cv", "show_progress_bar": False}
    asign.tl.cross_validate(samples, **kw)
    before = {n: samples[n].tables["cv"].copy() for n in ("P", "R")}
    for n in ("P", "R"):
        t = samples[n].tables["table"]
        X = t.X.toarray()
        X[(t.obs["section"] != "S1").to_numpy(), :3] = 1e6
        t.X = sp.csr_matrix(X)
    asign.tl.cross_validate(samples, **kw, overwrite=True)
    for n in ("P", "R"):
        after = samples[n].tables["cv"]
        assert list(after.var_names) == list(before[n].var_names)
        np.testing.assert_array_equal(after.layers["imputed"], before[n].layers["imputed"])
        assert after.uns["asign"]["fold"] == 0 and list(after.uns["asign"]["train_samples"]) == ["Q", "S"]
    assert "cv" not in samples["Q"].tables  # training samples are never written to


@pytest.fixture
def trainable():
    calls = []

    def _fit(fctx):
        calls.append({"train": [c.sample for c in fctx.train], "seed": fctx.seed, "genes": fctx.genes})
        return np.mean([c.Y[c.known].mean(axis=0) for c in fctx.train], axis=0)

    @register_method("_cv_train_mean", fit=_fit)
    def _predict(ctx):
        return ImputeResult(imputed=np.tile(ctx.fitted, (ctx.n_obs, 1)))

    yield calls
    _registry.METHODS.pop("_cv_train_mean", None)
    _registry.FITTERS.pop("_cv_train_mean", None)


def test_trainable_method_fit_once_per_fold(samples, trainable):
    df = asign.tl.cross_validate(
        samples, folds=[["P", "Q"], ["R", "S"]], method="_cv_train_mean", n_genes=4, seed=3, show_progress_bar=False
    )
    assert [c["train"] for c in trainable] == [["R", "S"], ["P", "Q"]]
    assert trainable[0]["seed"] != trainable[1]["seed"]
    assert (df[df.level == "sample"]["pcc_gene"] == 0).all()


def test_bad_known_and_per_fail_before_any_fit(samples, trainable):
    """A test sample's known mask that leaves nothing to score is rejected before the first fold trains."""
    t = samples["R"].tables["table"]
    all_known = np.ones(t.n_obs, dtype=bool)
    with pytest.raises(ValueError, match="nothing to impute"):
        asign.tl.cross_validate(
            samples,
            folds=[["P", "Q"], ["R", "S"]],
            known={"P": "S1", "Q": "S1", "R": all_known, "S": "S1"},
            method="_cv_train_mean",
            n_genes=4,
            show_progress_bar=False,
        )
    assert trainable == []
    with pytest.raises(ValueError, match="per"):
        asign.tl.cross_validate(samples, folds=[["P"]], method="mean", per="genes", show_progress_bar=False)
    df = asign.tl.cross_validate(samples, folds=[["P"]], method="mean", per="section", show_progress_bar=False)
    assert set(df.level) == {"section", "fold", "summary", "pooled"}


def test_default_folds_and_errors(samples):
    assert default_folds(list("ABCDEFGH")) == [["A", "E"], ["B", "F"], ["C", "G"], ["D", "H"]]
    assert default_folds(["x", "y"]) == [["x"], ["y"]]
    with pytest.raises(ValueError, match="not among the samples"):
        asign.tl.cross_validate(samples, folds=[["P", "Z"]], method="mean")
    with pytest.raises(ValueError, match="must not overlap"):
        asign.tl.cross_validate(samples, folds=[["P"], ["P", "Q"]], method="mean")
    with pytest.raises(ValueError, match="no entry"):
        asign.tl.cross_validate(samples, folds=[["P"]], known={"Q": "S1"}, method="mean")
    with pytest.raises(ValueError, match="Unknown method"):
        asign.tl.cross_validate(samples, method="nope")
    # known="middle" and a sequence of samples (leave one out)
    df = asign.tl.cross_validate(
        [samples["P"], samples["R"]], known="middle", method="mean", n_genes=3, show_progress_bar=False
    )
    assert list(df[df.level == "sample"]["sample"]) == ["sample_0", "sample_1"]
    assert set(df[df.level == "section"]["section"]) == {"S1", "S3"}


def test_genes_checked_before_any_fold_trains(samples, trainable):
    """A fixed gene list with a duplicate, or a gene one sample lacks, fails before the first fold trains, naming the
    sample."""
    kw = {"folds": [["P"], ["R"]], "method": "_cv_train_mean", "show_progress_bar": False}
    g = list(samples["P"].tables["table"].var_names[:3])
    with pytest.raises(ValueError, match="more than once"):
        asign.tl.cross_validate(samples, genes=[*g, g[0]], **kw)
    t = samples["R"].tables["table"]
    del samples["R"].tables["table"]
    samples["R"].tables["table"] = t[:, [x for x in t.var_names if x != g[1]]].copy()
    with pytest.raises(KeyError, match=rf"Sample 'R': 1 gene\(s\) not in the table's var_names: \['{g[1]}'\]"):
        asign.tl.cross_validate(samples, genes=g, **kw)
    assert trainable == []


def test_a_sample_passed_twice_is_refused(samples, trainable):
    """The same stack under two names would train a fold on its own test sample's unknown labels."""
    with pytest.raises(ValueError, match="Samples 'P' and 'P2' are the same object"):
        asign.tl.cross_validate({**samples, "P2": samples["P"]}, method="_cv_train_mean", show_progress_bar=False)
    assert trainable == []


def test_known_and_key_added_errors_name_the_sample(samples, trainable):
    kw = {"method": "_cv_train_mean", "show_progress_bar": False}
    with pytest.raises(ValueError, match=r"Sample 'P': `known` names unknown section\(s\) \['S9'\]"):
        asign.tl.cross_validate(samples, known={"P": "S9", "Q": "S1", "R": "S1", "S": "S1"}, **kw)
    import anndata as ad

    samples["Q"].tables["mine"] = ad.AnnData(np.ones((2, 2)))  # the user's table
    with pytest.raises(ValueError, match=r"Sample 'Q': sdata.tables\['mine'\] exists and was not written by asign"):
        asign.tl.cross_validate(samples, key_added="mine", **kw)
    assert trainable == []


def _set_unmeasured(sdata, section, gene):
    """Record ``gene`` as never measured in ``section`` (as io.stack_sections does for a partial panel)."""
    t = sdata.tables["table"]
    t.uns["asign"]["unmeasured_genes"] = {section: [gene]}
    X = t.X.toarray()
    X[(t.obs["section"] == section).to_numpy(), list(t.var_names).index(gene)] = 0
    t.X = sp.csr_matrix(X)


def test_fixed_gene_a_section_never_measured_fails_before_any_fold(samples, trainable):
    """A gene of `genes` that a training sample's section never measured used to fail only when that sample first
    trained (after earlier folds had trained and written their tables), calling the section 'known'."""
    g = list(samples["P"].tables["table"].var_names[:4])
    _set_unmeasured(samples["R"], "S2", g[2])
    kw = {"method": "_cv_train_mean", "genes": g, "key_added": "cv", "show_progress_bar": False}
    with pytest.raises(
        ValueError,
        match=r"Sample 'R': `genes` includes .* \(section 'S2': \['" + g[2] + r"'\].*training labels in fold",
    ):
        asign.tl.cross_validate(samples, folds=[["P"], ["R"]], **kw)
    assert trainable == [] and not any("cv" in s.tables for s in samples.values())
    # R tested in the only fold: only its known section's labels are read, S2 is scored (with a warning)
    df = asign.tl.cross_validate(samples, folds=[["R"]], **kw)
    assert set(df[df.level == "section"]["section"]) == {"S2", "S3"}
    # ... but a known section lacking the gene is refused
    with pytest.raises(ValueError, match=r"Sample 'R'.*section 'S2'.*known section\(s\) are the labels of fold 0"):
        asign.tl.cross_validate(samples, folds=[["R"]], known={"R": "S2"}, **{**kw, "overwrite": True})


def test_output_tables_are_written_only_after_every_fold(samples):
    """A fold failing after an earlier fold ran leaves no output table behind."""
    calls = []

    def _fit(fctx):
        calls.append(1)
        if len(calls) == 2:
            msg = "fold 1 fails"
            raise RuntimeError(msg)
        return np.zeros(len(fctx.genes))

    @register_method("_cv_fail_second", fit=_fit)
    def _predict(ctx):
        return ImputeResult(imputed=np.tile(ctx.fitted, (ctx.n_obs, 1)))

    try:
        with pytest.raises(RuntimeError, match="fold 1 fails"):
            asign.tl.cross_validate(
                samples, folds=[["P"], ["R"]], method="_cv_fail_second", n_genes=4, key_added="cv",
                show_progress_bar=False,
            )  # fmt: skip
        assert calls == [1, 1] and not any("cv" in s.tables for s in samples.values())
    finally:
        _registry.METHODS.pop("_cv_fail_second", None)
        _registry.FITTERS.pop("_cv_fail_second", None)


def _patient(sdata, patient):
    sdata.tables["table"].uns["asign"]["dataset"] = {"patient": patient}
    return sdata


def test_default_folds_keep_a_patients_samples_together(samples, asign_log):
    """Two stacks of one patient used to be renamed and tested in different folds, each training on the other."""
    assert default_folds(["a", "b", "c"], {"a": "P1", "b": "P1", "c": "P2"}) == [["a", "b"], ["c"]]
    assert default_folds(["x", "y"], {"x": "x", "y": "y"}) == [["x"], ["y"]]  # unique patients: leave one out
    her2st = {f"{p}{i}": p for p in "ABCDEFGH" for i in (1, 2)}  # two stacks per HER2ST patient
    assert default_folds(list(her2st), her2st)[0] == ["A1", "A2", "E1", "E2"]
    a, b, c = (_patient(samples[n], p) for n, p in (("P", "P1"), ("Q", "P1"), ("R", "P2")))
    df = asign.tl.cross_validate([a, b, c], method="mean", n_genes=4, show_progress_bar=False)
    rows = df[df.level == "sample"]
    assert list(rows["sample"]) == ["P1", "sample_1", "P2"] and list(rows["fold"]) == [0, 0, 1]
    # a mapping: grouped by the recorded patient too
    df = asign.tl.cross_validate({"x": a, "y": b, "z": c}, method="mean", n_genes=4, show_progress_bar=False)
    assert list(df[df.level == "sample"]["fold"]) == [0, 0, 1]
    assert "share patient" not in asign_log.warnings
    # given folds that split a patient: allowed, with a warning
    asign.tl.cross_validate({"x": a, "y": b, "z": c}, folds=[["x"]], method="mean", n_genes=4, show_progress_bar=False)
    assert "Samples ['x', 'y'] share patient 'P1'" in asign_log.warnings


def test_mode_column_and_warning_for_a_fold_without_training_samples(samples, asign_log):
    """A fold holding every sample used to train a trainable method transductively without saying so."""

    def _fit(fctx):
        return np.mean([c.Y[c.known].mean(axis=0) for c in fctx.train], axis=0)

    @register_method("_cv_either", fit=_fit)
    def _predict(ctx):
        level = ctx.fitted if ctx.fitted is not None else ctx.Y[ctx.known].mean(axis=0)  # transductive: own known
        return ImputeResult(imputed=np.tile(level, (ctx.n_obs, 1)))

    kw = {"method": "_cv_either", "n_genes": 4, "show_progress_bar": False}
    try:
        df = asign.tl.cross_validate(samples, folds=[["P"], ["R"]], **kw)
        assert (df["mode"] == "inductive").all() and "no training sample" not in asign_log.warnings
        df = asign.tl.cross_validate({"P": samples["P"], "R": samples["R"]}, folds=[["P", "R"]], **kw)
        assert (df["mode"] == "transductive").all()
        assert "Fold 0 (test samples ['P', 'R']) has no training sample" in asign_log.warnings
        df = asign.tl.cross_validate({"P": samples["P"]}, **kw)  # one sample, leave one out
        assert (df["mode"] == "transductive").all()
    finally:
        _registry.METHODS.pop("_cv_either", None)
        _registry.FITTERS.pop("_cv_either", None)
    df = asign.tl.cross_validate(samples, folds=[["P"]], method="mean", n_genes=4, show_progress_bar=False)
    assert (df["mode"] == "untrained").all() and list(df.columns[-2:]) == ["gene_sections", "mode"]


@pytest.mark.parametrize(("seed", "err"), [(None, TypeError), (-1, ValueError), (1.5, TypeError), ("3", TypeError)])
def test_a_bad_seed_fails_before_any_fold(samples, trainable, seed, err):
    with pytest.raises(err, match="`seed` must be"):
        asign.tl.cross_validate(samples, method="_cv_train_mean", seed=seed, show_progress_bar=False)
    assert trainable == []
