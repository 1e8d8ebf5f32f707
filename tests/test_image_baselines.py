from __future__ import annotations

import numpy as np
import pytest

import asign
from asign.tl._image_baselines import top_k_similar


def add_fake_features(sd, *, seed=0, dim=16, noise=0.3, encoder="fake"):
    """Image-like features that carry the expression signal (as a good frozen encoder would)."""
    t = sd.tables["table"]
    rng = np.random.default_rng(seed)
    X = np.log1p(np.asarray(t.X.todense()))
    proj = np.random.default_rng(123).normal(size=(X.shape[1], dim))
    f = X @ proj + noise * rng.normal(size=(X.shape[0], dim))
    for lev in ("spot", "region", "global"):
        t.obsm[f"asign_features_{lev}"] = (f + (0 if lev == "spot" else rng.normal(size=f.shape))).astype(np.float32)
    t.uns["asign_features"] = {
        "encoder": encoder,
        "weights": "none",
        "dim": dim,
        "input_size": 224,
        "scales_px": {"spot": [224] * 3},
    }


def impute(sd, method, known="S1", **kw):
    return asign.tl.impute(sd, known=known, method=method, inplace=False, show_progress_bar=False, **kw)


def score(out):
    df = asign.tl.evaluate(out, per="section")
    return df.set_index("section")["pcc_gene"]


def test_ridge_on_known_spots(small_stack):
    sd = small_stack
    add_fake_features(sd)
    out = impute(sd, "ridge")
    s = score(out)
    assert (s > 0.5).all(), s
    res = out.uns["asign"]["result"]
    assert res["trained_on"] == "known_spots" and res["cv_grouping"] == "spatial_blocks"
    assert res["alpha"] in res["alphas"].tolist()
    assert res["n_train"] == int((sd.tables["table"].obs["section"] == "S1").sum())
    assert 1 <= res["n_components"] <= 16
    # pure-noise features carry no signal: the scores collapse
    t = sd.tables["table"]
    t.obsm["asign_features_spot"] = np.random.default_rng(5).normal(size=t.obsm["asign_features_spot"].shape)
    assert score(impute(sd, "ridge")).mean() < 0.25
    # two known sections: CV across sections
    add_fake_features(sd)
    out = impute(sd, "ridge", known=["S1", "S2"])
    assert out.uns["asign"]["result"]["cv_grouping"] == "section"


def test_ridge_standardize_option(small_stack):
    """``standardize=False`` only centres the features: noise dimensions with a tiny scale stay tiny instead of being
    lifted to unit variance, so they cannot drown the signal; with the default they are z-scored like the rest."""
    sd = small_stack
    add_fake_features(sd)
    t = sd.tables["table"]
    f = np.asarray(t.obsm["asign_features_spot"], dtype=np.float64)
    noise = 1e-3 * np.random.default_rng(7).normal(size=(f.shape[0], 200))
    t.obsm["asign_features_spot"] = np.hstack([f, noise]).astype(np.float32)
    raw = impute(sd, "ridge", method_kwargs={"standardize": False})
    assert raw.uns["asign"]["result"]["standardize"] is False
    z = impute(sd, "ridge")
    assert z.uns["asign"]["result"]["standardize"] is True
    assert score(raw).mean() > score(z).mean() + 0.05
    assert score(raw).mean() > 0.5
    with pytest.raises(ValueError, match="standardize='false' must be True or False"):
        impute(sd, "ridge", method_kwargs={"standardize": "false"})


def test_similarity_matches_brute_force(small_stack):
    sd = small_stack
    add_fake_features(sd)
    out = impute(sd, "similarity", method_kwargs={"k": 5})
    t = sd.tables["table"]
    X = t.obsm["asign_features_spot"].astype(float)
    Xn = X / np.linalg.norm(X, axis=1, keepdims=True)
    known = (t.obs["section"] == "S1").to_numpy()
    kidx = np.flatnonzero(known)
    Y = out.layers["target"].astype(float)
    sim = Xn @ Xn[kidx].T
    sim[kidx, np.arange(kidx.size)] = -np.inf  # known spots: leave one out
    top = np.argsort(-sim, axis=1, kind="stable")[:, :5]
    expect = Y[kidx][top].mean(axis=1)
    np.testing.assert_allclose(out.layers["imputed"], expect, rtol=1e-5, atol=1e-5)
    assert (score(out) > 0.3).all()
    assert out.uns["asign"]["result"]["k"] == 5
    # k above the known spots: an unknown spot averages all of them (the known mean), a known spot all the others
    big = impute(sd, "similarity", method_kwargs={"k": 10_000}, key_added="asign_sim_all")
    np.testing.assert_allclose(
        big.layers["imputed"][~known],
        np.broadcast_to(Y[kidx].mean(axis=0), ((~known).sum(), Y.shape[1])),
        rtol=1e-5,
        atol=1e-5,
    )
    loo = (Y[kidx].sum(axis=0) - Y[kidx]) / (kidx.size - 1)
    np.testing.assert_allclose(big.layers["imputed"][kidx], loo, rtol=1e-5, atol=1e-5)
    assert big.uns["asign"]["result"]["k"] == kidx.size and big.uns["asign"]["result"]["k_known"] == kidx.size - 1


def test_top_k_ties_and_exclusion():
    K = np.array([[1.0, 0.0], [2.0, 0.0], [0.0, 1.0], [1.0, 1.0]])
    Q = np.array([[3.0, 0.0], [1.0, 0.0]])
    nn = top_k_similar(Q, K, 2, exclude=np.array([-1, 1]))
    assert nn[0].tolist() == [0, 1]  # equal cosine: lower index first
    assert nn[1].tolist() == [0, 3]  # row 1 excluded
    # many ties at the k-th place: the lowest indices win, whatever argpartition would pick
    rng = np.random.default_rng(0)
    K = np.tile([[1.0, 0.0]], (50, 1))
    K[rng.choice(50, 10, replace=False)] = [0.0, 1.0]
    nn = top_k_similar(np.array([[1.0, 0.0], [0.0, 1.0]]), K, 7, block=1)
    assert nn[0].tolist() == np.flatnonzero(K[:, 0] == 1)[:7].tolist()
    assert nn[1].tolist() == np.flatnonzero(K[:, 1] == 1)[:7].tolist()
    assert top_k_similar(np.array([[1.0, 0.0]]), K[:3], 3).shape == (1, 3)


@pytest.mark.parametrize("method", ["ridge", "similarity"])
def test_unknown_labels_are_never_read(small_stack, method):
    sd = small_stack
    add_fake_features(sd)
    a = impute(sd, method).layers["imputed"]
    t = sd.tables["table"]
    unknown = (t.obs["section"] != "S1").to_numpy()
    X = t.X.tolil()
    X[np.flatnonzero(unknown)] = 1e6
    t.X = X.tocsr()
    b = impute(sd, method).layers["imputed"]
    np.testing.assert_array_equal(a, b)


def test_ridge_fits_scaler_and_pca_on_known_spots_only(small_stack):
    sd = small_stack
    add_fake_features(sd)
    a = impute(sd, "ridge")
    t = sd.tables["table"]
    unknown = (t.obs["section"] != "S1").to_numpy()
    f = t.obsm["asign_features_spot"].copy()
    f[unknown] = f[unknown] * 50 + 1000
    t.obsm["asign_features_spot"] = f
    b = impute(sd, "ridge")
    known = ~unknown
    np.testing.assert_allclose(a.layers["imputed"][known], b.layers["imputed"][known], rtol=1e-6)
    assert a.uns["asign"]["result"]["alpha"] == b.uns["asign"]["result"]["alpha"]


def test_levels_missing_features_and_nan_sections(small_stack):
    sd = small_stack
    with pytest.raises(KeyError, match="extract_features"):
        impute(sd, "ridge")
    add_fake_features(sd)
    out = impute(sd, "ridge", method_kwargs={"levels": ["spot", "region", "global"]})
    assert out.uns["asign"]["result"]["levels"] == ["spot", "region", "global"]
    with pytest.raises(ValueError, match="unknown parameter"):
        impute(sd, "similarity", method_kwargs={"n_neighbors": 3})
    with pytest.raises(ValueError, match="Unknown feature level"):
        impute(sd, "similarity", method_kwargs={"levels": "tile"})
    # a section without features (no image) gets the known mean
    t = sd.tables["table"]
    s3 = (t.obs["section"] == "S3").to_numpy()
    f = t.obsm["asign_features_spot"].copy()
    f[s3] = np.nan
    t.obsm["asign_features_spot"] = f
    for method in ("ridge", "similarity"):
        out = impute(sd, method)
        pred = out.layers["imputed"]
        assert np.isfinite(pred).all()
        known_mean = out.layers["target"][(t.obs["section"] == "S1").to_numpy()].mean(axis=0)
        np.testing.assert_allclose(pred[s3], np.broadcast_to(known_mean, pred[s3].shape), rtol=1e-5)
        assert out.uns["asign"]["result"]["n_no_features"] == int(s3.sum())


def test_ridge_trained_on_other_samples(small_stack, monkeypatch):
    from asign.datasets import synthetic_stack

    sd = small_stack
    add_fake_features(sd)
    other = synthetic_stack(n_sections=3, n_spots=60, n_genes=20, image_size=512, um_per_px=8.0, seed=1, images=False)
    add_fake_features(other, seed=1)
    out = impute(sd, "ridge", train={"other": other})
    res = out.uns["asign"]["result"]
    assert res["trained_on"] == "train_samples"
    assert res["n_train"] == other.tables["table"].n_obs
    assert (score(out) > 0.3).all()
    add_fake_features(other, seed=1, encoder="another")
    with pytest.raises(ValueError, match="differ from those the model was trained on"):
        impute(sd, "ridge", train={"other": other})
    # the sample to impute without features fails before the ridge is fitted on the training samples
    fitted = []
    monkeypatch.setattr(asign.tl._image_baselines, "_fit_ridge", lambda *a, **k: fitted.append(1))
    del sd.tables["table"].obsm["asign_features_spot"]
    with pytest.raises(KeyError, match=r"`obsm\['asign_features_spot'\]` not found; run `asign.pp.extract_features"):
        impute(sd, "ridge", train={"other": other})
    assert not fitted


def test_image_baseline_method_kwargs_are_checked(small_stack, monkeypatch):
    """`k` of similarity and `n_components`, `cv`, `alphas` of ridge are checked before any work, naming the method
    and the parameter (k=2.5 ran as 2, n_components=0 as 1; bad cv / alphas failed late in numpy or sklearn)."""
    sd = small_stack
    add_fake_features(sd)
    for kw, err, what in (
        ({"k": 2.5}, TypeError, r"`k` must be an integer, got 2.5"),
        ({"k": 0}, ValueError, r"`k` must be >= 1, got 0"),
    ):
        with pytest.raises(err, match=rf"method 'similarity': {what}"):
            impute(sd, "similarity", method_kwargs=kw)
    fitted = []
    monkeypatch.setattr(asign.tl._image_baselines, "_fit_ridge", lambda *a, **k: fitted.append(1))
    for kw, err, what in (
        ({"n_components": 0}, ValueError, r"`n_components` must be >= 1, got 0"),
        ({"n_components": 2.0}, TypeError, r"`n_components` must be an integer, got 2.0"),
        ({"cv": 1}, ValueError, r"`cv` must be >= 2, got 1"),
        ({"cv": 0}, ValueError, r"`cv` must be >= 2, got 0"),
        ({"cv": 2.5}, TypeError, r"`cv` must be an integer"),
        ({"alphas": []}, ValueError, r"`alphas` must be a non-empty sequence.*got an empty one"),
        ({"alphas": np.array([])}, ValueError, r"`alphas` must be a non-empty sequence"),
        ({"alphas": [1.0, -0.5]}, ValueError, r"`alphas\[1\]` must be > 0, got -0.5"),
        ({"alphas": [0.0, 1.0]}, ValueError, r"`alphas\[0\]` must be > 0, got 0.0"),
        ({"alphas": [1.0, float("inf")]}, ValueError, r"`alphas\[1\]` must be a finite number"),
        ({"alphas": ["1"]}, TypeError, r"`alphas\[0\]` must be a number"),
        ({"alphas": 1.0}, TypeError, r"`alphas` must be a non-empty sequence"),
        ({"alphas": "1"}, TypeError, r"`alphas` must be a non-empty sequence"),
        ({"alphas": [[1.0, 2.0]]}, TypeError, r"`alphas` must be a non-empty sequence"),
    ):
        with pytest.raises(err, match=rf"method 'ridge': {what}"):
            impute(sd, "ridge", method_kwargs=kw)
    assert not fitted
    monkeypatch.undo()
    res = impute(sd, "ridge", method_kwargs={"alphas": (0.1, np.float32(10.0)), "cv": np.int64(3)}).uns["asign"]
    assert res["result"]["alphas"].tolist() == pytest.approx([0.1, 10.0])
    res = impute(sd, "similarity", method_kwargs={"k": np.int32(3)}).uns["asign"]["result"]
    assert res["k"] == 3
