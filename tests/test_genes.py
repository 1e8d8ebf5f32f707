from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp

import asign
from asign.pp._genes import (
    choose_genes,
    known_mask,
    log1p_cp10k,
    normalize_counts,
    section_gene_means,
    st_net,
    top_genes,
)


@pytest.fixture
def stack():
    return asign.datasets.synthetic_stack(n_sections=3, n_spots=40, n_genes=15, images=False, seed=3)


def _dense(table):
    return np.asarray(table.X.toarray(), dtype=np.float64)


def test_st_net_formula():
    rng = np.random.default_rng(0)
    C = rng.poisson(3.0, (7, 5)).astype(float)
    Y = st_net(C)
    expected = np.log((C + 1) / (C + 1).sum(axis=1, keepdims=True))
    np.testing.assert_allclose(Y, expected, rtol=0, atol=1e-12)
    # proportions over the selected genes sum to 1 per spot
    np.testing.assert_allclose(np.exp(Y).sum(axis=1), 1.0, atol=1e-12)


def test_log1p_formula_and_zero_library():
    C = np.array([[0.0, 2.0, 5.0], [0.0, 0.0, 0.0], [1.0, 1.0, 1.0]])
    L = np.array([20.0, 0.0, 3.0])
    Y = log1p_cp10k(C, L)
    np.testing.assert_allclose(Y[0], np.log1p(1e4 * C[0] / 20.0))
    np.testing.assert_array_equal(Y[1], 0.0)
    np.testing.assert_allclose(Y[2], np.log1p(1e4 / 3.0))
    with pytest.raises(ValueError, match="total counts"):
        normalize_counts(C, "log1p")
    with pytest.raises(ValueError, match="Unknown normalization"):
        normalize_counts(C, "cpm")


def test_section_gene_means_matches_pandas(stack):
    t = stack.tables["table"]
    rows = np.ones(t.n_obs, dtype=bool)
    rows[::3] = False
    got = section_gene_means(t, rows)
    df = pd.DataFrame(_dense(t)[rows], columns=t.var_names)
    df["section"] = t.obs["section"].astype(str).to_numpy()[rows]
    exp = df.groupby("section").mean()
    np.testing.assert_allclose(got.to_numpy(), exp.loc[got.index].to_numpy(), atol=1e-10)


def test_top_genes_equal_section_weights_and_name_ties():
    # section a (many spots) favours g1, section b (few spots) favours g2 strongly
    a = pd.DataFrame([[10.0, 1.0, 3.0, 3.0]], index=["a"], columns=["g1", "g2", "g4", "g3"])
    b = pd.DataFrame([[0.0, 12.0, 3.0, 3.0]], index=["b"], columns=["g1", "g2", "g4", "g3"])
    genes, score = top_genes([a, b], 3)
    # averages: g1 5, g2 6.5, g3 3, g4 3 -> g2, g1, then the tie g3/g4 goes by name
    assert genes == ["g2", "g1", "g3"]
    assert score["g2"] == pytest.approx(6.5)
    # genes missing from one frame are not ranked
    c = pd.DataFrame([[1.0, 1.0]], index=["c"], columns=["g1", "g3"])
    genes, _ = top_genes([a, c], 4)
    assert genes == ["g1", "g3"]


def test_more_genes_requested_than_available_is_information_not_a_warning(asign_log):
    """The default n_genes=250 on a small panel models every gene: an info line, not a warning on every run."""
    import logging

    genes, _ = top_genes(pd.DataFrame([[2.0, 1.0]], index=["a"], columns=["g1", "g2"]), 250)
    assert genes == ["g1", "g2"]
    [rec] = [r for r in asign_log.records if "can be ranked" in r.getMessage()]
    assert rec.levelno == logging.INFO
    assert "n_genes=250 but only 2 genes" in rec.getMessage()


def test_select_genes_labelled_reads_only_known_spots(stack):
    t = stack.tables["table"]
    ref = asign.pp.select_genes(stack, known="S1", n_genes=5, inplace=False)
    # direct: mean over S1's spots, top 5, ties by name
    m = (t.obs["section"] == "S1").to_numpy()
    means = _dense(t)[m].mean(axis=0)
    order = np.lexsort((np.asarray(t.var_names), -means))
    assert ref == list(np.asarray(t.var_names)[order[:5]])
    # poisoning the other sections' counts changes nothing under "labelled", but changes "all"
    X = t.X.tolil()
    last = int(np.argmin(means))
    for i in np.flatnonzero(~m):
        X[i, last] = 1e6
    t.X = sp.csr_matrix(X)
    assert asign.pp.select_genes(stack, known="S1", n_genes=5, inplace=False) == ref
    allg = asign.pp.select_genes(stack, n_genes=5, sections="all", inplace=False)
    assert allg[0] == t.var_names[last]


def test_select_genes_inplace_and_train(stack):
    other = asign.datasets.synthetic_stack(n_sections=2, n_spots=40, n_genes=15, images=False, seed=9)
    asign.pp.select_genes(stack, known=["S1"], n_genes=4, train=[other])
    t = stack.tables["table"]
    sel = t.uns["asign_selected"]
    assert t.var["asign_selected"].sum() == 4
    assert set(sel["genes"]) == set(t.var_names[t.var["asign_selected"]])
    assert len(sel["sections"]) == 1 + 2
    # direct: S1 of this stack and both sections of the training stack weigh equally
    frames = [
        section_gene_means(t, (t.obs["section"] == "S1").to_numpy()),
        section_gene_means(other.tables["table"], np.ones(other.tables["table"].n_obs, dtype=bool)),
    ]
    avg = pd.concat(frames).mean(axis=0)
    np.testing.assert_allclose(t.var["asign_selected_score"].to_numpy(), avg[t.var_names].to_numpy())


def test_normalize_public(stack):
    asign.pp.select_genes(stack, n_genes=6)
    asign.pp.normalize(stack, normalization="log1p")
    t = stack.tables["table"]
    df = t.obsm["asign_normalized"]
    genes = t.uns["asign_selected"]["genes"]
    C = _dense(t)
    L = C.sum(axis=1)
    exp = np.log1p(1e4 * C[:, t.var_names.get_indexer(genes)] / L[:, None])
    np.testing.assert_allclose(df.to_numpy(), exp, atol=1e-10)
    np.testing.assert_allclose(t.obs["total_counts"].to_numpy(), L)
    out = asign.pp.normalize(stack, genes=genes[:2], inplace=False)
    assert list(out.columns) == genes[:2]
    with pytest.raises(KeyError, match="not in the table"):
        asign.pp.normalize(stack, genes=["nope"], inplace=False)
    with pytest.raises(ValueError, match=rf"`genes` lists \['{genes[0]}'\] more than once"):
        asign.pp.normalize(stack, genes=[genes[0], genes[0], genes[1]], inplace=False)
    with pytest.raises(ValueError, match="`genes` is empty"):
        asign.pp.normalize(stack, genes=[], inplace=False)
    with pytest.raises(TypeError, match="`n_genes` must be an integer"):
        asign.pp.select_genes(stack, n_genes=2.5, inplace=False)


def test_known_mask_parsing(stack):
    t = stack.tables["table"]
    st = asign.io.validate_stack(stack)
    m = known_mask(t, st, "S2")
    assert m.sum() == (t.obs["section"] == "S2").sum()
    np.testing.assert_array_equal(known_mask(t, st, ["S1", "S2"]), (t.obs["section"] != "S3").to_numpy())
    np.testing.assert_array_equal(known_mask(t, st, m), m)
    np.testing.assert_array_equal(known_mask(t, st, pd.Series(m, index=t.obs_names)), m)
    with pytest.raises(ValueError, match="unknown section"):
        known_mask(t, st, ["S9"])
    with pytest.raises(ValueError, match="one entry per spot"):
        known_mask(t, st, m[:-1])
    # a 0/1 integer mask used to be read as section names '0' and '1'; None as the section 'None'
    with pytest.raises(ValueError, match=r"`known` is a numeric array with one entry per spot .*known\.astype\(bool\)"):
        known_mask(t, st, m.astype(int))
    with pytest.raises(ValueError, match=r"`known` is None; pass the labelled section name\(s\) from \['S1'"):
        known_mask(t, st, None)


# --------------------------------------------------------------------------------------------------------------------
# key_added clashes, exact ties, duplicate genes, gene strings, empty selection sections
# --------------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("fn", "kwargs", "key", "slot"),
    [
        ("select_genes", {"n_genes": 3}, "asign", "uns"),
        ("select_genes", {"n_genes": 3}, "n_sections_measured", "var"),
        ("normalize", {"genes": ["gene_000", "gene_001"]}, "asign", "uns"),
        ("normalize", {"genes": ["gene_000", "gene_001"]}, "spatial", "obsm"),
        ("normalize", {"genes": ["gene_000", "gene_001"]}, "spatialdata_attrs", "uns"),
        ("normalize", {"genes": ["gene_000", "gene_001"]}, "spatial_aligned", "obsm"),
    ],
)
def test_key_added_naming_a_reserved_key_is_refused(stack, fn, kwargs, key, slot):
    """key_added='asign' used to replace uns['asign'] (manifest, unmeasured-gene record); 'spatial' the spot centres."""
    t = stack.tables["table"]
    before = {"uns": dict(t.uns), "obsm": dict(t.obsm), "var": t.var.copy()}
    with pytest.raises(ValueError, match=rf"key_added='{key}' would overwrite `\.{slot}\['{key}'\]` of table 'table'"):
        getattr(asign.pp, fn)(stack, key_added=key, **kwargs)
    assert t.uns.keys() == before["uns"].keys()
    assert t.obsm.keys() == before["obsm"].keys()
    pd.testing.assert_frame_equal(t.var, before["var"])
    np.testing.assert_array_equal(np.asarray(t.obsm["spatial"]), np.asarray(before["obsm"]["spatial"]))
    asign.io.validate_stack(stack)
    # nothing is written with inplace=False, so any key is fine there
    assert getattr(asign.pp, fn)(stack, key_added=key, inplace=False, **kwargs) is not None


def test_repeat_calls_under_the_same_key_added_still_overwrite(stack):
    asign.pp.select_genes(stack, n_genes=3, key_added="mine")
    asign.pp.select_genes(stack, n_genes=4, key_added="mine")
    t = stack.tables["table"]
    assert t.uns["mine"]["n_genes"] == 4 and t.var["mine"].sum() == 4
    asign.pp.normalize(stack, genes=t.uns["mine"]["genes"][:2], key_added="mine_norm")
    asign.pp.normalize(stack, genes=t.uns["mine"]["genes"][:3], key_added="mine_norm")
    assert t.obsm["mine_norm"].shape[1] == 3
    with pytest.raises(TypeError, match="`key_added` must be a string"):
        asign.pp.normalize(stack, genes=["gene_000"], key_added=None)


def test_exact_ties_go_by_name_whatever_the_spot_order(stack):
    """gene_000 holds gene_001's counts shuffled within each section: equal per-section totals, so an exact tie that
    the name breaks. Means used to be sums of count / n in spot order, whose rounding decided the tie."""
    t = stack.tables["table"]
    X = _dense(t)
    sec = t.obs["section"].astype(str).to_numpy()
    for seed in range(20):
        rng = np.random.default_rng(seed)
        X[:, 1] = rng.poisson(500, t.n_obs)  # the largest mean of all genes
        for s in np.unique(sec):
            m = np.flatnonzero(sec == s)
            X[m, 0] = X[rng.permutation(m), 1]
        t.X = sp.csr_matrix(X.astype(np.float32))
        assert asign.pp.select_genes(stack, n_genes=1, inplace=False) == ["gene_000"]
        means = section_gene_means(t, np.ones(t.n_obs, dtype=bool))
        np.testing.assert_array_equal(means["gene_000"].to_numpy(), means["gene_001"].to_numpy())
    asign.pp.select_genes(stack, n_genes=2)
    score = t.var["asign_selected_score"]
    assert score["gene_000"] == score["gene_001"]
    assert t.uns["asign_selected"]["genes"] == ["gene_000", "gene_001"]


def test_section_gene_means_independent_of_spot_order(stack):
    """Non-integer values too: the per-section sums are taken in obs_names order, not row order."""
    t = stack.tables["table"]
    rng = np.random.default_rng(0)
    t.X = sp.csr_matrix(rng.gamma(0.7, 3.1, (t.n_obs, t.n_vars)) * (rng.random((t.n_obs, t.n_vars)) < 0.6))
    rows = np.ones(t.n_obs, dtype=bool)
    rows[::4] = False
    ref = section_gene_means(t, rows)
    for seed in range(5):
        perm = np.random.default_rng(seed).permutation(t.n_obs)
        got = section_gene_means(t[perm].copy(), rows[perm])
        np.testing.assert_array_equal(got.to_numpy(), ref.loc[got.index].to_numpy())
    genes, _ = top_genes(ref, 5)
    for seed in range(5):
        perm = np.random.default_rng(seed).permutation(t.n_obs)
        assert top_genes(section_gene_means(t[perm].copy(), rows[perm]), 5)[0] == genes


def test_duplicate_var_names_are_refused_clearly(stack):
    """Duplicate gene names used to crash select_genes with an IndexError deep in the ranking."""
    t = stack.tables["table"]
    st = asign.io.validate_stack(stack)
    names = t.var_names.tolist()
    names[3] = names[7]
    t.var_names = names
    # validate_stack, which both run first, names the table and the repeated gene
    want = (
        rf"table 'table': var_names are not unique \(e\.g\. \['{names[7]}'\]\); call `table\.var_names_make_unique\(\)`"
    )
    with pytest.raises(ValueError, match=want):
        asign.pp.select_genes(stack, known="S1", n_genes=5)
    with pytest.raises(ValueError, match=want):
        asign.pp.normalize(stack, genes=["gene_000"])
    # the gene choice of tl.impute
    with pytest.raises(ValueError, match=r"The table: var_names are not unique"):
        choose_genes(t, st, known=known_mask(t, st, "S1"), n_genes=5)
    other = asign.datasets.synthetic_stack(n_sections=2, n_spots=40, n_genes=15, images=False, seed=9)
    t.var_names_make_unique()
    other.tables["table"].var_names = names
    with pytest.raises(ValueError, match=r"Table 'table' of training stack 0: var_names are not unique"):
        choose_genes(t, st, known=None, n_genes=5, train_tables=[(other.tables["table"], None)], table_key="table")


def test_normalize_takes_a_single_gene_name(stack):
    """A str used to be split into its characters."""
    one = asign.pp.normalize(stack, genes="gene_000", normalization="log1p", inplace=False)
    both = asign.pp.normalize(stack, genes=["gene_000", "gene_001"], normalization="log1p", inplace=False)
    assert list(one.columns) == ["gene_000"]
    pd.testing.assert_series_equal(one["gene_000"], both["gene_000"])
    with pytest.raises(KeyError, match=r"\['nope'\]"):
        asign.pp.normalize(stack, genes="nope", inplace=False)


def test_all_zero_selection_section_warns(stack, asign_log):
    import logging

    t = stack.tables["table"]
    X = _dense(t)
    s1 = (t.obs["section"] == "S1").to_numpy()
    X[s1] = 0
    t.X = sp.csr_matrix(X)
    asign.pp.select_genes(stack, known="S1", n_genes=3, inplace=False)
    [rec] = [r for r in asign_log.records if "total count of 0" in r.getMessage()]
    assert rec.levelno == logging.WARNING
    assert "['S1'] of table 'table'" in rec.getMessage()
    asign_log.records.clear()
    asign.pp.select_genes(stack, known="S2", n_genes=3, inplace=False)  # S1 is not read
    assert not [r for r in asign_log.records if "total count of 0" in r.getMessage()]
    st = asign.io.validate_stack(stack)
    choose_genes(t, st, known=known_mask(t, st, ["S1", "S2"]), n_genes=3)  # the gene choice of tl.impute
    assert [r for r in asign_log.records if "Section(s) ['S1'] of the table" in r.getMessage()]
