"""Genes that a measured section never measured: 0 in its counts, but neither trained on nor scored there."""

from __future__ import annotations

import numpy as np
import pytest

import asign
from asign.io import Section, stack_sections
from asign.tl._evaluate import score

GENES = [f"G{i}" for i in range(12)]


def _stack(lacking: str = "S2", n_lacking: int = 4, seed: int = 0):
    rng = np.random.default_rng(seed)

    def sec(name, genes):
        xy = rng.uniform(20, 280, (50, 2))
        lam = 2 + 6 * (xy[:, :1] / 300) * np.linspace(0.2, 1.0, len(genes))[None]
        counts = rng.poisson(lam).astype(np.float32)
        return Section(name=name, spots=xy, counts=counts, genes=genes, image=None, um_per_px=1.0)

    secs = [sec(s, GENES[:-n_lacking] if s == lacking else GENES) for s in ("S1", "S2", "S3")]
    sdata = stack_sections(secs, spot_diameter_um=55.0)
    eye = {s: np.eye(3) for s in ("S1", "S2", "S3")}
    asign.pp.align_layers(sdata, method="transforms", transforms=eye, show_progress_bar=False)
    return sdata


def test_stack_records_them_and_keeps_them_through_zarr(tmp_path):
    from spatialdata import read_zarr

    from asign._stack import unmeasured_genes

    sdata = _stack()
    assert unmeasured_genes(sdata.tables["table"]) == {"S2": set(GENES[-4:])}
    assert sdata.tables["table"].var["n_sections_measured"].loc["G11"] == 2
    asign.io.persist(sdata, path=tmp_path / "s.zarr")
    assert unmeasured_genes(read_zarr(tmp_path / "s.zarr").tables["table"]) == {"S2": set(GENES[-4:])}


def test_no_truth_and_no_score_where_a_gene_was_never_measured():
    sdata = _stack()
    asign.tl.impute(sdata, known="S1", method="nearest", n_genes=12, show_progress_bar=False)
    out = sdata.tables["asign"]
    s2 = (out.obs["section"].astype(str) == "S2").to_numpy()
    lacking = out.var_names.isin(GENES[-4:])
    assert np.isnan(out.layers["target"][np.ix_(s2, lacking)]).all()
    assert np.isfinite(out.layers["target"][np.ix_(s2, ~lacking)]).all()
    assert np.isfinite(out.layers["imputed"]).all()  # predicted everywhere, scored only where measured
    ev = asign.tl.evaluate(sdata)
    sec = ev[ev.level == "section"].set_index("section")
    assert sec.loc["S2", "n_genes"] == 8 and sec.loc["S3", "n_genes"] == 12
    genes_s2 = set(ev[(ev.level == "gene") & (ev.section == "S2")].gene)
    assert genes_s2 == set(GENES[:-4])
    # ST-Net normalisation of S2 sums over the genes it measured only
    t = sdata.tables["table"]
    rows = np.flatnonzero((t.obs["section"].astype(str) == "S2").to_numpy())
    c = t[rows, list(out.var_names[~lacking])].X.toarray() + 1.0
    expect = np.log(c) - np.log(c.sum(axis=1, keepdims=True))
    np.testing.assert_allclose(out.layers["target"][np.ix_(s2, ~lacking)], expect, rtol=1e-5, atol=1e-5)


def test_a_known_section_lacking_a_gene():
    sdata = _stack()
    # the default selection ranks only genes every known section measured
    asign.tl.impute(sdata, known="S2", method="nearest", n_genes=12, show_progress_bar=False)
    assert set(sdata.tables["asign"].var_names) == set(GENES[:-4])
    # asking for such a gene explicitly is refused before the method runs
    with pytest.raises(ValueError, match=r"\['G11'\] were never measured in known section\(s\) \['S2'\]"):
        asign.tl.impute(sdata, known="S2", method="nearest", genes=["G0", "G11"], key_added="x")


def test_score_skips_whole_nan_columns_only():
    rng = np.random.default_rng(1)
    T, P = rng.normal(size=(20, 3)), rng.normal(size=(20, 3))
    secs = np.array(["a"] * 10 + ["b"] * 10)
    T[:10, 2] = np.nan  # gene 2 not measured in section a
    df = score(T, P, secs, genes=["x", "y", "z"])
    assert df[(df.level == "section") & (df.section == "a")].n_genes.item() == 2
    assert set(df[(df.level == "gene") & (df.section == "a")].gene) == {"x", "y"}
    full = score(T[10:], P[10:], secs[10:], genes=["x", "y", "z"])
    b = df[(df.level == "section") & (df.section == "b")].iloc[0]
    assert b.pcc_gene == pytest.approx(full[full.level == "section"].pcc_gene.item())
    T[0, 0] = np.nan  # one spot of a measured gene: not allowed
    with pytest.raises(ValueError, match="Section 'a': the truth has non-finite values for some spots"):
        score(T, P, secs, genes=["x", "y", "z"])


def test_impute_warns_that_a_partial_panel_shifts_the_st_net_scale(asign_log):
    sdata = _stack()
    asign.tl.impute(sdata, known="S1", method="nearest", n_genes=12, show_progress_bar=False)
    assert "Section(s) ['S2'] did not measure some of the 12 modelled genes (S2: 4" in asign_log.warnings
    assert "MSE and MAE there are inflated" in asign_log.warnings
    # the shift it warns of: S2's proportions sum over 8 genes, the known spots' over 12
    out = sdata.tables["asign"]
    s2 = (out.obs["section"].astype(str) == "S2").to_numpy()
    s3 = (out.obs["section"].astype(str) == "S3").to_numpy()
    measured = out.var_names.isin(GENES[:-4])

    def bias(m):
        return float(np.mean(out.layers["target"][np.ix_(m, measured)] - out.layers["imputed"][np.ix_(m, measured)]))

    assert bias(s2) > bias(s3) + 0.2
    asign_log.records.clear()
    # no warning with log1p (its denominator is the spot's total over all genes), nor with a common panel
    asign.tl.impute(sdata, known="S1", method="nearest", n_genes=12, normalization="log1p", key_added="l")
    asign.tl.impute(sdata, known="S1", method="nearest", genes=GENES[:-4], key_added="c")
    assert "did not measure" not in asign_log.warnings


def test_evaluate_names_sections_without_any_truth(asign_log):
    sdata = _stack(n_lacking=4)
    asign.tl.impute(sdata, known="S1", method="nearest", genes=GENES[-4:], show_progress_bar=False)
    # S2 measured none of the 4 modelled genes: left out with a warning, S3 scored
    ev = asign.tl.evaluate(sdata)
    assert "Section(s) ['S2'] measured none of the 4 scored genes of table 'asign'" in asign_log.warnings
    assert set(ev[ev.level == "section"].section) == {"S3"}
    # only S2 scored: nothing left, an error instead of an empty frame
    with pytest.raises(ValueError, match=r"Section\(s\) \['S2'\] measured none .* Nothing is left to score"):
        asign.tl.evaluate(sdata, sections=["S2"])


def test_st_net_of_a_spot_without_measured_genes_is_nan_without_a_warning():
    import warnings

    from asign.pp._genes import st_net

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        out = st_net(np.array([[1.0, 2.0, np.nan], [np.nan, np.nan, np.nan]]))
    assert np.isnan(out[1]).all() and np.isnan(out[0, 2])
    np.testing.assert_allclose(out[0, :2], np.log([2.0, 3.0]) - np.log(5.0))


def test_cross_validate_pools_errors_over_entries_with_partial_panels():
    """Pooled MSE / MAE weigh every scored (spot, gene) entry once, also when a section lacks genes."""
    samples = {"P": _stack(seed=1), "Q": _stack(lacking="S3", n_lacking=8, seed=2)}
    df = asign.tl.cross_validate(
        samples,
        folds=[["P", "Q"]],
        known={"P": "S1", "Q": "S1"},
        method="nearest",
        genes=GENES,
        show_progress_bar=False,
    )
    secs = df[df.level == "section"]
    entries = (secs["n_spots"] * secs["n_genes"]).to_numpy(float)
    assert sorted(secs["n_genes"]) == [4, 8, 12, 12]
    for row in (df[df.level == "pooled"].iloc[0], df[df.level == "fold"].iloc[0]):
        for m in ("mse_pooled", "mae_pooled"):
            assert row[m] == pytest.approx(np.average(secs[m], weights=entries), rel=1e-12), (row["level"], m)
        assert row["n_genes"] == 12
    # the sample rows (tl.evaluate's overall rows) pool their own entries the same way
    for name, g in secs.groupby("sample"):
        samp = df[(df.level == "sample") & (df["sample"] == name)].iloc[0]
        w = (g["n_spots"] * g["n_genes"]).to_numpy(float)
        assert samp["mse_pooled"] == pytest.approx(np.average(g["mse_pooled"], weights=w), rel=1e-12)
