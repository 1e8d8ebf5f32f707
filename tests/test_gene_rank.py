"""Low-rank gene projection of the ASIGN prediction (``method_kwargs={"gene_rank": k}``)."""

from __future__ import annotations

import copy
import logging

import numpy as np
import pytest

import asign
from asign.tl._gene_rank import check_gene_rank, gene_basis

TINY = {"hidden_dim": 16, "attn_heads": 4, "gat_heads": 4, "max_epochs": 3, "steps_per_epoch": 2, "n_models": 1}


def _low_rank(n=200, g=30, rank=3, noise=0.1, seed=0):
    rng = np.random.default_rng(seed)
    signal = rng.normal(size=(n, rank)) @ rng.normal(size=(rank, g)) + rng.normal(size=g)
    return signal, signal + noise * rng.normal(size=(n, g))


def test_basis_recovers_the_span_and_denoises():
    signal, noisy = _low_rank()
    b = gene_basis(noisy, 3)
    assert b.rank == 3 and b.n_labelled == 200
    np.testing.assert_allclose(b.axes @ b.axes.T, np.eye(3), atol=1e-10)
    assert 0.97 < b.explained_variance_ratio <= 1.0
    # the projection of noisy rows is closer to the signal than the rows themselves
    assert np.abs(b.project(noisy) - signal).mean() < 0.7 * np.abs(noisy - signal).mean()
    # rows already in the span (around the mean) stay as they are; float32 stays float32
    np.testing.assert_allclose(b.project(b.project(noisy)), b.project(noisy), atol=1e-10)
    assert b.project(noisy.astype(np.float32)).dtype == np.float32
    # deterministic signs: the largest loading of every axis is positive
    assert (b.axes[np.arange(3), np.abs(b.axes).argmax(axis=1)] > 0).all()


def test_basis_limits_and_option_check(caplog):
    _, noisy = _low_rank(n=5, g=30)
    with caplog.at_level(logging.WARNING, logger="asign"):
        assert gene_basis(noisy, 5) is None
    assert "needs more than 5 labelled spots; there are 5" in caplog.text
    assert gene_basis(noisy, 30) is None  # rank >= genes: the identity
    assert gene_basis(noisy, 4).rank == 4
    with pytest.raises(ValueError, match="finite"):
        gene_basis(np.full((10, 3), np.nan), 1)
    assert check_gene_rank(None) is None and check_gene_rank(np.int64(4)) == 4
    for bad in (0, -2, 2.5, True, "10"):
        with pytest.raises(ValueError, match="gene_rank"):
            check_gene_rank(bad)


@pytest.fixture(scope="module")
def _prepared(prepare_for_asign):
    sd = asign.datasets.synthetic_stack(n_sections=3, n_spots=60, n_genes=20, image_size=512, um_per_px=8.0, seed=0)
    return prepare_for_asign(sd)


def test_impute_projects_on_the_known_spots_axes(_prepared):
    sd = copy.deepcopy(_prepared)
    kw = {"known": "S1", "method": "asign", "n_genes": 12, "inplace": False, "show_progress_bar": False, "seed": 2}
    low = asign.tl.impute(sd, method_kwargs={**TINY, "gene_rank": 3}, **kw)
    full = asign.tl.impute(sd, method_kwargs={**TINY, "gene_rank": None}, **kw)
    # the same training; the projection acts on the final prediction only
    np.testing.assert_array_equal(low.layers["full_rank"], full.layers["imputed"])
    np.testing.assert_array_equal(low.layers["network"], full.layers["network"])
    assert "full_rank" not in full.layers
    # the axes are those of the known spots' normalised expression (the labels the method had)
    known = low.obs["known"].to_numpy()
    b = gene_basis(low.layers["target"][known], 3)
    np.testing.assert_allclose(low.layers["imputed"], b.project(full.layers["imputed"]), rtol=1e-5, atol=1e-6)
    sv = np.linalg.svd(low.layers["imputed"].astype(np.float64) - b.mean, compute_uv=False)
    assert sv[3] < 1e-5 * sv[0] < sv[2]  # three axes (float32 rounding aside)
    res = low.uns["asign"]["result"]
    assert res["gene_rank"]["rank"] == 3 and res["options"]["gene_rank"] == 3
    assert res["gene_rank"]["explained_variance_ratio"] == pytest.approx(b.explained_variance_ratio)
    assert full.uns["asign"]["result"]["gene_rank"]["rank"] == 0
    with pytest.raises(ValueError, match="gene_rank"):
        asign.tl.impute(sd, method_kwargs={**TINY, "gene_rank": 0}, **kw)


@pytest.mark.parametrize("method", ["mean", "nearest", "propagation", "ridge", "similarity"])
def test_every_baseline_takes_gene_rank(_prepared, method):
    sd = copy.deepcopy(_prepared)
    kw = {"known": "S1", "method": method, "n_genes": 12, "inplace": False, "show_progress_bar": False}
    plain = asign.tl.impute(sd, **kw)
    low = asign.tl.impute(sd, method_kwargs={"gene_rank": 3}, **kw)
    known = low.obs["known"].to_numpy()
    b = gene_basis(low.layers["target"][known], 3)
    np.testing.assert_array_equal(low.layers["full_rank"], plain.layers["imputed"])
    np.testing.assert_allclose(low.layers["imputed"], b.project(plain.layers["imputed"]), rtol=1e-6, atol=1e-8)
    assert low.uns["asign"]["result"]["gene_rank"]["rank"] == 3
    assert low.uns["asign"]["params"] == {"gene_rank": 3}
    assert "gene_rank" not in plain.uns["asign"]["result"] and "full_rank" not in plain.layers
    if method == "mean":  # the known mean lies at the centre of the axes: unchanged
        np.testing.assert_allclose(low.layers["imputed"], plain.layers["imputed"], atol=1e-10)
    with pytest.raises(ValueError, match="gene_rank"):
        asign.tl.impute(sd, method_kwargs={"gene_rank": -1}, **kw)


def test_ridge_trained_on_other_samples_takes_gene_rank(_prepared, prepare_for_asign):
    other = prepare_for_asign(
        asign.datasets.synthetic_stack(n_sections=3, n_spots=60, n_genes=20, image_size=512, um_per_px=8.0, seed=5)
    )
    kw = {"known": "S1", "method": "ridge", "n_genes": 12, "inplace": False, "show_progress_bar": False}
    out = asign.tl.impute(_prepared, train=[other], method_kwargs={"gene_rank": 2}, **kw)
    res = out.uns["asign"]["result"]
    assert res["trained_on"] == "train_samples" and res["gene_rank"]["rank"] == 2
    # the axes come from the known spots of the imputed sample only, not from the training sample's spots
    sv = np.linalg.svd(out.layers["imputed"].astype(np.float64) - out.layers["imputed"].mean(axis=0), compute_uv=False)
    assert sv[2] < 1e-5 * sv[0]  # two axes (float32 rounding aside)
    known = out.obs["known"].to_numpy(dtype=bool)
    basis = gene_basis(np.asarray(out.layers["target"][known], dtype=np.float64), 2)
    np.testing.assert_allclose(basis.project(out.layers["full_rank"]), out.layers["imputed"], atol=1e-5)
    assert np.isfinite(res["gene_rank"]["explained_variance_ratio"])


@pytest.mark.slow
@pytest.mark.real_data
def test_her2st_c_projection_lifts_the_baselines(her2st_path):
    """HER2ST C, known C2 -> C3-C6 (counts only, published registration, graph without image similarity).

    10 gene axes of C2 raise the per-gene PCC of nearest 8-IDW (measured 0.255 -> 0.290) and propagation
    (0.239 -> 0.254); with asign's own alignment and graph: +0.036 and +0.038 (docs/benchmarks/asign.md).
    """
    sd = asign.io.read_her2st(her2st_path, patient="C", sections=["C2", "C3", "C4", "C5", "C6"], images=False)
    transforms = sd.tables["table"].uns["asign"]["her2st_transforms"]
    asign.pp.align_layers(sd, method="transforms", transforms=transforms, show_progress_bar=False)
    asign.pp.neighbors_3d(sd)
    kw = {"known": "C2", "n_genes": 250, "inplace": False, "show_progress_bar": False}
    for method, extra in (("nearest", {"k": 8}), ("propagation", {})):
        pcc = {
            rank: asign.tl.evaluate(
                asign.tl.impute(sd, method=method, method_kwargs={**extra, "gene_rank": rank}, **kw), per="overall"
            ).iloc[0]["pcc_gene"]
            for rank in (None, 10)
        }
        assert 0.15 < pcc[None] < 0.35, (method, pcc)
        assert pcc[10] > pcc[None] + 0.01, (method, pcc)
