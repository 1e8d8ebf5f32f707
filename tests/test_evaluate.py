from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

import asign
from asign.tl._evaluate import pearson, score


def _corr(a, b):
    a = np.asarray(a, float)
    b = np.asarray(b, float)
    if np.ptp(a) == 0 or np.ptp(b) == 0:
        return 0.0
    return float(np.corrcoef(a, b)[0, 1])


def _direct(T, P, sec, genes):
    """Every figure by plain loops and np.corrcoef."""
    out = {}
    secs = list(dict.fromkeys(sec))
    spot_r = []
    for s in secs:
        m = sec == s
        t, p = T[m], P[m]
        r = np.array([_corr(t[:, g], p[:, g]) for g in range(len(genes))])
        const = np.array([np.ptp(t[:, g]) == 0 for g in range(len(genes))])
        # legacy per-spot PCC: a spot with a constant truth or prediction across genes has none (left out, counted)
        ok = np.array([np.ptp(t[i]) > 0 and np.ptp(p[i]) > 0 for i in range(m.sum())])
        rs = np.array([_corr(t[i], p[i]) for i in np.flatnonzero(ok)])
        spot_r.append(rs)
        out[s] = {
            "genes": r,
            "mse_g": ((p - t) ** 2).mean(axis=0),
            "mae_g": np.abs(p - t).mean(axis=0),
            "pcc_gene": r.mean(),
            "pcc_gene_varying": r[~const].mean(),
            "mse": ((p - t) ** 2).mean(),
            "mae": np.abs(p - t).mean(),
            "pcc_spot_legacy": rs.mean(),
            "n_const_truth": int(const.sum()),
            "n_const_spots": int((~ok).sum()),
        }
    out["overall"] = {
        "pcc_gene": np.mean([out[s]["pcc_gene"] for s in secs]),
        "mse": np.mean([out[s]["mse"] for s in secs]),
        "mae": np.mean([out[s]["mae"] for s in secs]),
        "pcc_spot_legacy": np.concatenate(spot_r).mean(),
        "mse_pooled": ((P - T) ** 2).mean(),
        "mae_pooled": np.abs(P - T).mean(),
    }
    return out


def _random_case(seed=0):
    rng = np.random.default_rng(seed)
    n_a, n_b, g = 23, 31, 9
    sec = np.array(["a"] * n_a + ["b"] * n_b)
    T = rng.normal(-5, 1, (n_a + n_b, g))
    P = T + rng.normal(0, 0.8, T.shape)
    T[:n_a, 2] = -4.0  # constant truth in section a
    P[n_a:, 3] = -6.5  # constant prediction in section b
    P[5] = -3.0  # one spot with a constant prediction across genes
    return T, P, sec, [f"g{i}" for i in range(g)]


def test_score_matches_direct_computation():
    T, P, sec, genes = _random_case()
    df = score(T, P, sec, genes=genes)
    d = _direct(T, P, sec, genes)
    for s in ("a", "b"):
        gr = df[(df.level == "gene") & (df.section == s)]
        np.testing.assert_allclose(gr["pcc_gene"], d[s]["genes"], atol=1e-6)
        np.testing.assert_allclose(gr["mse"], d[s]["mse_g"], atol=1e-6)
        np.testing.assert_allclose(gr["mae"], d[s]["mae_g"], atol=1e-6)
        row = df[(df.level == "section") & (df.section == s)].iloc[0]
        for k in ("pcc_gene", "pcc_gene_varying", "mse", "mae", "pcc_spot_legacy"):
            assert row[k] == pytest.approx(d[s][k], abs=1e-6), (s, k)
        assert row["n_constant_truth"] == d[s]["n_const_truth"]
        assert row["n_constant_spots"] == d[s]["n_const_spots"]
        assert row["n_spots"] == (sec == s).sum() and row["n_genes"] == len(genes)
    ov = df[df.level == "overall"].iloc[0]
    for k, v in d["overall"].items():
        assert ov[k] == pytest.approx(v, abs=1e-6), k
    # constants counted as 0
    a = df[(df.level == "gene") & (df.section == "a")]
    assert (
        a["pcc_gene"].iloc[2] == 0.0 and a["n_constant_truth"].iloc[2] == 1 and np.isnan(a["pcc_gene_varying"].iloc[2])
    )
    b = df[(df.level == "gene") & (df.section == "b")]
    assert b["pcc_gene"].iloc[3] == 0.0 and b["n_constant_pred"].iloc[3] == 1
    assert ov["n_constant_truth"] == 1 and ov["n_constant_pred"] == 1
    assert ov["n_constant_spots"] == 1 and df.loc[df.level == "gene", "n_constant_spots"].isna().all()
    # one scored gene: no spot has a per-spot PCC (NaN and every spot counted, not 0)
    one = score(T[:, :1], P[:, :1], sec, genes=genes[:1])
    assert one.loc[one.level != "gene", "pcc_spot_legacy"].isna().all()
    assert one.loc[one.level == "overall", "n_constant_spots"].item() == len(sec)


def test_pearson_constant_and_float_noise():
    a = np.full((5, 1), 0.1)  # mean of 0.1s is not exactly 0.1 in floating point
    b = np.arange(5.0)[:, None]
    r, ca, cb = pearson(a, b)
    assert r[0] == 0.0 and ca[0] and not cb[0]
    r, _, _ = pearson(b, 2 * b + 1)
    assert r[0] == pytest.approx(1.0)


@pytest.fixture
def result():
    s = asign.datasets.synthetic_stack(n_sections=3, n_spots=50, n_genes=15, images=False, seed=7)
    t = s.tables["table"]
    t.obsm["spatial_aligned"] = np.asarray(t.obsm["spatial_world"], dtype=float)
    asign.tl.impute(s, known="S2", method="nearest", n_genes=6, method_kwargs={"k": 3})
    return s


def test_evaluate_scores_only_measured_unknown_spots(result):
    out = result.tables["asign"]
    df = asign.tl.evaluate(result)
    assert set(df.section.dropna()) == {"S1", "S3"}
    assert list(df.columns[-3:]) == ["method", "normalization", "key"]
    assert (df.method == "nearest").all() and (df.normalization == "st-net").all()
    scored = out.obs["measured"].to_numpy() & ~out.obs["known"].to_numpy()
    T = np.asarray(out.layers["target"], float)[scored]
    P = np.asarray(out.layers["imputed"], float)[scored]
    sec = out.obs["section"].astype(str).to_numpy()[scored]
    d = _direct(T, P, sec, list(out.var_names))
    ov = df[df.level == "overall"].iloc[0]
    for k, v in d["overall"].items():
        assert ov[k] == pytest.approx(v, abs=1e-6), k
    assert ov["n_spots"] == scored.sum()
    # predictions of known spots never matter
    out.layers["imputed"][out.obs["known"].to_numpy()] = 1e3
    pd.testing.assert_frame_equal(asign.tl.evaluate(result), df)


def test_evaluate_filters_and_errors(result):
    out = result.tables["asign"]
    g = list(out.var_names[:2])
    df = asign.tl.evaluate(result, sections=["S3"], genes=g, per="gene")
    assert set(df.level) == {"gene"} and set(df.section) == {"S3"} and list(df.gene) == g
    sec = asign.tl.evaluate(result, sections="S3", per=["section"])
    assert len(sec) == 1 and sec.n_genes.iloc[0] == 6
    with pytest.raises(ValueError, match="Unknown section"):
        asign.tl.evaluate(result, sections=["S9"])
    with pytest.raises(ValueError, match="no scored spot"):
        asign.tl.evaluate(result, sections=["S2"])
    with pytest.raises(KeyError, match="not modelled"):
        asign.tl.evaluate(result, genes=["nope"])
    with pytest.raises(ValueError, match="`genes` is empty"):
        asign.tl.evaluate(result, genes=[])
    with pytest.raises(ValueError, match="more than once"):  # a gene scored twice would weigh double
        asign.tl.evaluate(result, genes=[g[0], g[0]])
    with pytest.raises(KeyError, match="not modelled in the AnnData passed"):
        asign.tl.evaluate(out, genes=["nope"])
    with pytest.raises(ValueError, match="per"):
        asign.tl.evaluate(result, per="spot")
    with pytest.raises(KeyError, match="run `asign.tl.impute` first"):
        asign.tl.evaluate(result, key="other")
    with pytest.raises(KeyError, match="layers"):
        asign.tl.evaluate(result, key="table")
    # the AnnData itself can be evaluated
    pd.testing.assert_frame_equal(
        asign.tl.evaluate(out).drop(columns="key"), asign.tl.evaluate(result).drop(columns="key")
    )
