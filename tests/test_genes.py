from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp

import asign
from asign.pp._genes import (
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
