"""``impute(method="asign")``, ``tl.fit`` / ``tl.predict``: the model on section stacks (method.md §5–8)."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import scipy.sparse as sp

pytest.importorskip("torch_geometric")

import asign

TINY = {"hidden_dim": 16, "attn_heads": 4, "gat_heads": 4, "max_epochs": 3, "steps_per_epoch": 2, "n_models": 1}


@pytest.fixture(scope="module")
def _prepared(prepare_for_asign):
    a = asign.datasets.synthetic_stack(n_sections=3, n_spots=60, n_genes=20, image_size=512, um_per_px=8.0, seed=0)
    b = asign.datasets.synthetic_stack(n_sections=3, n_spots=60, n_genes=20, image_size=512, um_per_px=8.0, seed=1)
    return prepare_for_asign(a), prepare_for_asign(b)


@pytest.fixture
def stacks(_prepared):
    return copy.deepcopy(_prepared)


def _impute(sd, **kw):
    args = {"known": "S1", "method": "asign", "n_genes": 12, "inplace": False, "show_progress_bar": False}
    args.update(kw)
    args["method_kwargs"] = {**TINY, **kw.get("method_kwargs", {})}
    return asign.tl.impute(sd, **args)


def test_transductive_impute_outputs(stacks):
    sd, _ = stacks
    out = _impute(sd)
    assert {"target", "imputed", "network", "propagation"} <= set(out.layers)
    assert np.isfinite(out.layers["imputed"]).all() and np.isfinite(out.layers["network"]).all()
    res = out.uns["asign"]["result"]
    assert res["mode"] == "transductive" and res["transductive"] is True
    assert res["training"]["validation"] == "holdout"
    assert len(res["training"]["curve"]["loss_total"]) == res["training"]["epochs_run"]
    assert res["config"]["hidden_dim"] == 16 and res["config"]["mask"] == "spot"  # transductive default
    assert res["model"]["n_parameters"] > 0
    # known spots get the model's own estimate, never a copy of their label
    known = out.obs["known"].to_numpy()
    assert not np.allclose(out.layers["imputed"][known], out.layers["target"][known])
    # in place
    asign.tl.impute(sd, known="S1", method="asign", n_genes=12, method_kwargs=TINY, show_progress_bar=False)
    assert "asign" in sd.tables


def test_same_seed_same_prediction_and_poisoned_unknown_counts(stacks):
    sd, _ = stacks
    a = _impute(sd, seed=3)
    t = sd.tables["table"]
    unknown = (t.obs["section"] != "S1").to_numpy()
    X = t.X.toarray()
    X[unknown] = 1e7  # poison every unknown spot's raw counts
    t.X = sp.csr_matrix(X)
    b = _impute(sd, seed=3, genes=list(a.var_names))
    np.testing.assert_array_equal(a.layers["imputed"], b.layers["imputed"])
    np.testing.assert_array_equal(a.layers["network"], b.layers["network"])
    assert not np.allclose(a.layers["target"][unknown], b.layers["target"][unknown])
    c = _impute(sd, seed=4, genes=list(a.var_names))
    assert not np.array_equal(a.layers["imputed"], c.layers["imputed"])


def test_nan_poisoned_counts_never_reach_the_tensors(stacks):
    """NaN counts in unknown rows (the validator rejects them, so the tensors are built directly)."""
    from asign.tl._asign import sample_tensors
    from asign.tl._impute import build_context

    sd, _ = stacks
    st = asign.io.validate_stack(sd)
    t = sd.tables["table"]
    known = (t.obs["section"] == "S1").to_numpy()
    genes = list(t.var_names[:8])
    ctx = build_context(sd, stack=st, known=known, genes=genes, normalization="st-net")
    a = sample_tensors(ctx, levels="spot_region_global")
    X = t.X.toarray()
    X[~known] = np.nan
    t.X = sp.csr_matrix(X)
    b = sample_tensors(ctx, levels="spot_region_global")
    for name in ("y", "y_region", "y_global", "x_spot", "x_region", "edge_weight"):
        va, vb = getattr(a, name), getattr(b, name)
        assert np.array_equal(va.numpy(), vb.numpy(), equal_nan=True), name
    assert np.isnan(a.y[~known].numpy()).all()
    # tiles of unknown sections have no target; tiles of the known section do
    codes = asign._stack.section_codes(t, st)
    r_known = np.unique(t.obs["asign_region"].to_numpy()[codes == 0])
    assert np.isfinite(a.y_region[r_known].numpy()).all()
    assert np.isnan(np.delete(a.y_region.numpy(), r_known, axis=0)).all()


def test_fit_predict_save_load(stacks, tmp_path):
    a, b = stacks
    fitted = asign.tl.fit({"A": a, "B": b}, n_genes=10, config=TINY, seed=1, show_progress_bar=False)
    assert fitted.mode == "inductive" and fitted.train_samples == ["A", "B"]
    assert fitted.training["validation"] == "sample"  # B validates (its first section visible)
    out = asign.tl.predict(a, fitted, known="S1", inplace=False, show_progress_bar=False)
    assert list(out.var_names) == fitted.genes
    assert out.uns["asign"]["result"]["mode"] == "inductive"
    assert list(out.uns["asign"]["train_samples"]) == ["A", "B"]  # as impute(train=...) records them
    path = tmp_path / "model.pt"
    fitted.save(path)
    loaded = asign.tl._fit.ASIGNFit.load(path)
    assert loaded.config == fitted.config and loaded.genes == fitted.genes
    out2 = asign.tl.predict(a, str(path), known="S1", inplace=False, show_progress_bar=False)
    np.testing.assert_array_equal(out.layers["imputed"], out2.layers["imputed"])
    # the file holds tensors and plain data only: weights_only loading works
    import torch

    payload = torch.load(path, weights_only=True)
    assert payload["format"] == "asign-model" and isinstance(payload["config"], dict)
    asign.tl.predict(a, loaded, known="S1", key_added="pred", show_progress_bar=False)
    assert "pred" in a.tables
    with pytest.raises(ValueError, match="already holds"):
        asign.tl.predict(a, loaded, known="S1", key_added="pred")
    with pytest.raises(ValueError, match="key_added='my result' is not a valid SpatialData element name"):
        asign.tl.predict(a, loaded, known="S1", key_added="my result")
    with pytest.raises(TypeError, match="`model` must be an ASIGNFit .* got NoneType"):
        asign.tl.predict(a, None, known="S1")
    bad = tmp_path / "bad.pt"
    torch.save({"x": torch.zeros(1)}, bad)
    with pytest.raises(ValueError, match="not an asign model"):
        asign.tl._fit.ASIGNFit.load(bad)
    # the feature space is recorded (and survives saving); features of another space are refused by name
    assert loaded.options["feature_space"] == fitted.options["feature_space"]
    assert fitted.options["feature_space"]["encoder"] == a.tables["table"].uns["asign_features"]["encoder"]
    a.tables["table"].uns["asign_features"]["tta"] = "dihedral"
    with pytest.raises(ValueError, match="tta: 'none' != 'dihedral'"):
        asign.tl.predict(a, loaded, known="S1", inplace=False, show_progress_bar=False)
    with pytest.raises(ValueError, match="Training sample 'A' has features from another space than 'B'"):
        asign.tl.fit({"B": b, "A": a}, n_genes=10, config=TINY, seed=1, show_progress_bar=False)


def test_predict_takes_or_overrides_the_models_post_processing(stacks):
    """``tl.predict`` blends and projects as the model was fitted (0.5, 10 axes) unless told otherwise; with
    ``nearest_blend=0`` a stack without ``obsm['spatial_aligned']`` can be predicted."""
    from asign.tl._gene_rank import gene_basis

    a, b = stacks
    fitted = asign.tl.fit({"A": a, "B": b}, n_genes=12, config=TINY, seed=1, show_progress_bar=False)
    assert fitted.options["nearest_blend"] == 0.5 and fitted.options["gene_rank"] == 10
    kw = {"known": "S1", "inplace": False, "show_progress_bar": False}
    default = asign.tl.predict(a, fitted, **kw)
    res = default.uns["asign"]["result"]
    assert res["nearest_blend"] == 0.5 and res["gene_rank"]["rank"] == 10
    plain = asign.tl.predict(a, fitted, nearest_blend=0, gene_rank=None, **kw)
    res = plain.uns["asign"]["result"]
    assert res["nearest_blend"] == 0 and res["gene_rank"]["rank"] == 0
    assert "nearest" not in plain.layers and "full_rank" not in plain.layers
    known = default.obs["known"].to_numpy(dtype=bool)
    basis = gene_basis(np.asarray(default.layers["target"][known], dtype=np.float64), 10)
    blended = 0.5 * plain.layers["imputed"] + 0.5 * default.layers["nearest"]
    np.testing.assert_allclose(basis.project(blended), default.layers["imputed"], atol=1e-5)
    assert asign.tl.predict(a, fitted, gene_rank=3, **kw).uns["asign"]["result"]["gene_rank"]["rank"] == 3
    with pytest.raises(ValueError, match="nearest_blend"):
        asign.tl.predict(a, fitted, nearest_blend=2.0, **kw)
    with pytest.raises(ValueError, match="gene_rank"):
        asign.tl.predict(a, fitted, gene_rank=0, **kw)
    del a.tables["table"].obsm["spatial_aligned"]
    with pytest.raises(KeyError, match="nearest_blend=0.5 needs"):
        asign.tl.predict(a, fitted, **kw)
    out = asign.tl.predict(a, fitted, nearest_blend=0, **kw)
    np.testing.assert_allclose(out.layers["imputed"], basis.project(plain.layers["imputed"]), atol=1e-5)


def test_fit_transductive_ensemble_and_impute_with_train(stacks, tmp_path):
    a, b = stacks
    f = asign.tl.fit(a, known="S1", n_genes=10, config={**TINY, "n_models": 2}, show_progress_bar=False)
    assert f.mode == "transductive" and f.training["validation"] == "holdout"
    assert len(f.models) == 2 and len(set(f.training["members"]["seed"])) == 2
    # every member's training curve is kept (member 1's is also the top-level curve), and survives save/load
    curves = f.training["member_curves"]
    assert list(curves) == ["member_1", "member_2"]
    assert {len(v) for v in curves["member_2"].values()} == {f.training["members"]["epochs_run"][1]}
    np.testing.assert_array_equal(curves["member_1"]["loss_total"], f.training["curve"]["loss_total"])
    p1 = asign.tl.predict(a, f, known="S1", inplace=False, show_progress_bar=False)
    single = asign.tl._fit.ASIGNFit(**{**f.__dict__, "models": f.models[:1]})
    p0 = asign.tl.predict(a, single, known="S1", inplace=False, show_progress_bar=False)
    assert not np.allclose(p0.layers["imputed"], p1.layers["imputed"])  # members averaged
    f.save(tmp_path / "ens.pt")
    loaded = asign.tl._fit.ASIGNFit.load(tmp_path / "ens.pt")
    np.testing.assert_array_equal(
        loaded.training["member_curves"]["member_2"]["loss_total"], curves["member_2"]["loss_total"]
    )
    p2 = asign.tl.predict(a, tmp_path / "ens.pt", known="S1", inplace=False, show_progress_bar=False)
    np.testing.assert_array_equal(p1.layers["imputed"], p2.layers["imputed"])
    out = _impute(a, train={"B": b}, method_kwargs={"validation": "none"})
    res = out.uns["asign"]["result"]
    assert res["mode"] == "inductive" and res["training"]["validation"] == "none"
    assert out.uns["asign"]["train_samples"] == ["B"]


def test_inductive_mode_blends_and_projects_and_checks_the_blend_before_training(stacks, monkeypatch):
    """With training samples ASIGN also blends in the aligned 8-IDW (0.5) and projects on 10 gene axes of the known
    spots of the sample it imputes (not of the training samples); a sample to impute without
    ``obsm['spatial_aligned']`` fails before any training, in ``impute`` and in ``cross_validate``."""
    from asign.tl import _asign
    from asign.tl._gene_rank import gene_basis

    a, b = stacks
    out = _impute(a, train={"B": b}, method_kwargs={"validation": "none"})
    res = out.uns["asign"]["result"]
    assert res["mode"] == "inductive" and res["nearest_blend"] == 0.5 and res["gene_rank"]["rank"] == 10
    assert {"nearest", "full_rank"} <= set(out.layers)
    known = out.obs["known"].to_numpy(dtype=bool)
    basis = gene_basis(np.asarray(out.layers["target"][known], dtype=np.float64), 10)
    np.testing.assert_allclose(basis.project(out.layers["full_rank"]), out.layers["imputed"], atol=1e-5)
    trained = []
    monkeypatch.setattr(_asign, "fit_contexts", lambda *args, **kw: trained.append(1))
    del a.tables["table"].obsm["spatial_aligned"]
    with pytest.raises(KeyError, match="nearest_blend=0.5 needs"):
        _impute(a, train={"B": b}, method_kwargs={"validation": "none"})
    with pytest.raises(KeyError, match="nearest_blend=0.5 needs"):
        asign.tl.cross_validate(
            {"A": a, "B": b}, folds=[["B"], ["A"]], method="asign", method_kwargs=TINY, show_progress_bar=False
        )
    assert not trained
    # a sample to impute without features or without the graph also fails before any training, saying what to run
    a.tables["table"].obsm["spatial_aligned"] = b.tables["table"].obsm["spatial_aligned"][: a.tables["table"].n_obs]
    feats = a.tables["table"].obsm.pop("asign_features_spot")
    with pytest.raises(KeyError, match=r"no `.obsm\['asign_features_spot'\]`; run `asign.pp.extract_features"):
        _impute(a, train={"B": b}, method_kwargs={"validation": "none"})
    a.tables["table"].obsm["asign_features_spot"] = feats
    graph = a.tables["table"].obsp.pop("asign_connectivities")
    with pytest.raises(KeyError, match=r"no `.obsp\['asign_connectivities'\]`; run `asign.pp.neighbors_3d"):
        _impute(a, train={"B": b}, method_kwargs={"validation": "none"})
    a.tables["table"].obsp["asign_connectivities"] = graph
    assert not trained


def test_blend_needs_finite_aligned_coordinates_before_training(stacks, monkeypatch):
    """A section that align_layers could not place (NaN in obsm['spatial_aligned']) fails before any training when
    the nearest-neighbour blend is on, naming the section; with nearest_blend=0 the blend does not need them."""
    from asign.tl import _asign

    a, _ = stacks
    t = a.tables["table"]
    xy = np.asarray(t.obsm["spatial_aligned"], dtype=np.float64).copy()
    xy[(t.obs["section"] == "S3").to_numpy()] = np.nan
    t.obsm["spatial_aligned"] = xy
    trained = []
    monkeypatch.setattr(_asign, "fit_contexts", lambda *args, **kw: trained.append(1))
    with pytest.raises(ValueError, match=r"section\(s\) \['S3'\].*leave them out of the stack"):
        _impute(a)
    assert not trained


def test_holdout_too_small_warns(stacks, caplog):
    import logging

    a, _ = stacks
    with caplog.at_level(logging.WARNING, logger="asign"):
        out = _impute(a, method_kwargs={"holdout_fraction": 0.01, "max_epochs": 2})
    assert "too few to hold out 0.01" in caplog.text and "without early stopping" in caplog.text
    assert np.isfinite(out.layers["imputed"]).all()


def test_spot_only_levels_and_presets(stacks):
    a, _ = stacks
    for name in ("asign_regions", "asign_globals"):
        del a.tables[name]
    with pytest.raises(KeyError, match="Tile tables"):
        _impute(a)
    out = _impute(a, method_kwargs={"levels": "spot", "net_baseline": "propagation", "net_loss_weight": 1.0})
    assert np.isfinite(out.layers["imputed"]).all()
    out = _impute(a, method_kwargs={"levels": "spot", "preset": "paper_code", "max_epochs": 2})
    cfg = out.uns["asign"]["result"]["config"]
    assert cfg["optimizer"] == "sgd" and cfg["lp_iterations"] == 20 and cfg["hidden_dim"] == 16


def test_errors(stacks):
    a, _ = stacks
    with pytest.raises(ValueError, match="Unknown option"):
        _impute(a, method_kwargs={"bogus": 1})
    with pytest.raises(ValueError, match="validation"):
        _impute(a, method_kwargs={"validation": "sometimes"})
    del a.tables["table"].obsp["asign_connectivities"]
    with pytest.raises(KeyError, match="neighbors_3d"):
        _impute(a)
    del a.tables["table"].obsm["asign_features_spot"]
    with pytest.raises(KeyError, match="extract_features"):
        _impute(a)


def test_missing_features_fail_before_training_is_logged(stacks, caplog):
    """Without extract_features, ASIGN raises before it logs (or starts) any training, transductive and inductive."""
    import logging

    a, b = stacks
    feats = b.tables["table"].obsm.pop("asign_features_spot")
    with caplog.at_level(logging.INFO, logger="asign"):
        with pytest.raises(KeyError, match="extract_features"):  # a training sample without features
            _impute(a, train={"B": b}, method_kwargs={"validation": "none"})
        b.tables["table"].obsm["asign_features_spot"] = feats
        del a.tables["table"].obsm["asign_features_spot"]
        for name in ("asign_regions", "asign_globals"):
            del a.tables[name]
        with pytest.raises(KeyError, match="extract_features"):  # transductive
            _impute(a)
        with pytest.raises(KeyError, match="extract_features"):
            _impute(a, method_kwargs={"levels": "spot"})
    assert "Training ASIGN" not in caplog.text
    assert "Imputing" not in caplog.text  # the input checks run before the first log line


def test_cross_validate_with_asign(stacks):
    a, b = stacks
    df = asign.tl.cross_validate(
        {"A": a, "B": b}, method="asign", method_kwargs=TINY, n_genes=8, per="overall", show_progress_bar=False
    )
    folds = df[df.level == "fold"]
    assert len(folds) == 2 and np.isfinite(folds["pcc_gene"]).all()


def test_ensemble_in_worker_processes_equals_sequential(stacks):
    """``n_jobs=2`` trains the members in two processes and gives the sequential prediction."""
    import torch

    a, _ = stacks
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the same thread count in the main process and the workers
    try:
        seq = _impute(a, method_kwargs={"n_models": 2, "n_jobs": 1})
        par = _impute(a, method_kwargs={"n_models": 2, "n_jobs": 2})
    finally:
        torch.set_num_threads(threads)
    np.testing.assert_allclose(par.layers["imputed"], seq.layers["imputed"], rtol=0, atol=1e-6)
    assert (
        par.uns["asign"]["result"]["training"]["members"]["seed"]
        == seq.uns["asign"]["result"]["training"]["members"]["seed"]
    )
    with pytest.raises(ValueError, match="n_jobs"):
        _impute(a, method_kwargs={"n_models": 2, "n_jobs": 0})


def test_nearest_blend(stacks):
    """``nearest_blend=w``: (1 - w) ASIGN + w aligned 8-IDW, before the gene projection; the training is unchanged."""
    a, _ = stacks
    base = _impute(a, seed=5, method_kwargs={"gene_rank": None, "nearest_blend": 0.0})
    blend = _impute(a, seed=5, method_kwargs={"gene_rank": None, "nearest_blend": 0.25})
    near = asign.tl.impute(a, known="S1", method="nearest", n_genes=12, inplace=False, show_progress_bar=False)
    np.testing.assert_allclose(blend.layers["nearest"], near.layers["imputed"], rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(
        blend.layers["imputed"], 0.75 * base.layers["imputed"] + 0.25 * near.layers["imputed"], rtol=1e-5, atol=1e-5
    )
    np.testing.assert_array_equal(blend.layers["network"], base.layers["network"])
    assert blend.uns["asign"]["result"]["nearest_blend"] == 0.25 and base.uns["asign"]["result"]["nearest_blend"] == 0
    assert "nearest" not in base.layers
    # with the projection, the blend is projected as a whole
    both = _impute(a, seed=5, method_kwargs={"gene_rank": 3, "nearest_blend": 0.25})
    np.testing.assert_allclose(both.layers["full_rank"], blend.layers["imputed"], rtol=1e-5, atol=1e-5)
    # the transductive default blends in a quarter of the nearest spots
    default = _impute(a, seed=5, method_kwargs={"gene_rank": None})
    assert default.uns["asign"]["result"]["nearest_blend"] == 0.25
    np.testing.assert_allclose(default.layers["imputed"], blend.layers["imputed"], rtol=1e-6, atol=1e-6)
    assert (
        asign.tl.fit(a, known="S1", n_genes=12, config=TINY, show_progress_bar=False).options["nearest_blend"] == 0.25
    )
    for bad in (-0.1, 1.5, "half", True):
        with pytest.raises(ValueError, match="nearest_blend"):
            _impute(a, method_kwargs={"nearest_blend": bad})
    del a.tables["table"].obsm["spatial_aligned"]
    for kw, w in (({"nearest_blend": 0.5}, 0.5), ({}, 0.25)):  # explicit, or the transductive default
        with pytest.raises(KeyError, match=f"nearest_blend={w} needs"):
            _impute(a, method_kwargs=kw)


def test_blend_default_by_mode_and_preset():
    """0.25 only for the transductive image model of the default preset (the network it was chosen with)."""
    from asign.tl._asign import _option_defaults

    assert _option_defaults({}, transductive=True)["nearest_blend"] == 0.25
    assert _option_defaults({"feature_key": None}, transductive=True)["nearest_blend"] == 0.5
    assert _option_defaults({"preset": "paper_code"}, transductive=True)["nearest_blend"] == 0.5
    assert _option_defaults({}, transductive=False)["nearest_blend"] == 0.5
    assert _option_defaults({"preset": "paper_code"}, transductive=True)["n_models"] == 3


def test_fit_validation_sample_needs_a_second_labelled_section(stacks, caplog):
    """``validation="auto"`` never early-stops on a score that is NaN by construction: with one labelled section per
    sample it falls back to a hold-out of labelled spots; otherwise a sample with two labelled sections validates."""
    import logging

    a, b = stacks
    cfg = {**TINY, "patience": 1, "min_epochs": 1}
    with caplog.at_level(logging.WARNING, logger="asign"):
        f = asign.tl.fit({"A": a, "B": b}, known="S1", n_genes=8, config=cfg, show_progress_bar=False)
    assert "validation='holdout'" in caplog.text
    tr = f.training
    assert tr["validation"] == "holdout" and tr["validation_sample"] == ""
    assert np.isfinite(tr["curve"]["val_pcc"]).all() and tr["best_epoch"] >= 0
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="asign"):
        f = asign.tl.fit(
            {"A": a, "B": b}, known={"A": ["S1", "S2"], "B": "S1"}, n_genes=8, config=cfg, show_progress_bar=False
        )
    assert "the last training sample 'B'" in caplog.text and "sample 'A' validates" in caplog.text
    tr = f.training
    assert tr["validation"] == "sample" and tr["validation_sample"] == "A" and f.train_samples == ["A", "B"]
    assert np.isfinite(tr["curve"]["val_pcc"]).all() and tr["best_epoch"] >= 0


def test_fit_known_mapping_allows_fully_labelled_samples_and_none(stacks, monkeypatch):
    """In ``fit`` a fully labelled training sample is normal: a mapping entry may select every spot or be `None`
    (every measured spot); only a selection of no spot, or of unmeasured spots, is refused."""
    from asign.tl import _asign

    a, b = stacks
    calls = []
    monkeypatch.setattr(_asign, "fit_contexts", lambda contexts, **kw: calls.append((contexts, kw)))
    n = a.tables["table"].n_obs
    asign.tl.fit({"A": a, "B": b}, known={"A": ["S1", "S2", "S3"], "B": None}, n_genes=8, show_progress_bar=False)
    asign.tl.fit({"A": a, "B": b}, known={"A": np.ones(n, dtype=bool), "B": "S2"}, n_genes=8, show_progress_bar=False)
    asign.tl.fit({"A": a}, known={"A": None}, n_genes=8, show_progress_bar=False)
    (c1, kw1), (c2, _), (c3, kw3) = calls
    assert c1[0].known.all() and c1[1].known.all() and not kw1["transductive"]
    assert c2[0].known.all() and c2[1].known.sum() == (b.tables["table"].obs["section"] == "S2").sum()
    assert c3[0].known.all() and not kw3["transductive"]  # None: as known=None
    with pytest.raises(ValueError, match="Training sample 'A': `known` selects no spot"):
        asign.tl.fit({"A": a, "B": b}, known={"A": np.zeros(n, dtype=bool), "B": None}, show_progress_bar=False)
    with pytest.raises(ValueError, match="no entry for training sample 'B'"):
        asign.tl.fit({"A": a, "B": b}, known={"A": "S1"}, show_progress_bar=False)
    assert len(calls) == 3


def test_fit_errors_name_the_sample(stacks, monkeypatch):
    """Errors of a multi-sample ``fit`` name the training sample, before any training."""
    from asign.tl import _asign

    a, b = stacks
    calls = []
    monkeypatch.setattr(_asign, "fit_contexts", lambda *args, **kw: calls.append(1))
    t = b.tables["table"]
    gene = str(t.var_names[1])
    del b.tables["table"]
    b.tables["table"] = t[:, [g for g in t.var_names if g != gene]].copy()
    with pytest.raises(KeyError, match=rf"Training sample 'B': 1 gene\(s\) not in the table's var_names: \['{gene}'\]"):
        asign.tl.fit({"A": a, "B": b}, genes=[str(t.var_names[0]), gene], show_progress_bar=False)
    with pytest.raises(ValueError, match=r"Training sample 'A': `known` names unknown section\(s\) \['S7'\]"):
        asign.tl.fit({"A": a, "B": b}, known="S7", show_progress_bar=False)
    with pytest.raises(ValueError, match="Training sample 'B': A boolean `known` mask must have one entry per spot"):
        asign.tl.fit({"A": a, "B": b}, known={"A": "S1", "B": np.ones(5, dtype=bool)}, show_progress_bar=False)
    with pytest.raises(ValueError, match="more than once"):
        asign.tl.fit({"A": a, "B": b}, genes=[gene, gene], show_progress_bar=False)
    assert not calls


def test_inductive_feature_widths_and_space_checked_before_training(stacks, monkeypatch):
    """Features of the sample to impute that the model trained on other samples could not read fail before any
    training, naming the samples, in ``impute`` and in ``cross_validate``."""
    from asign.pp._graph import similarity_fingerprint, similarity_signature
    from asign.tl import _asign

    a, b = stacks
    trained = []
    monkeypatch.setattr(_asign, "fit_contexts", lambda *args, **kw: trained.append(1))
    t = a.tables["table"]
    full = t.obsm["asign_features_spot"]
    t.obsm["asign_features_spot"] = full[:, :5]
    params = t.uns["asign_neighbors"]["params"]
    fingerprint, signature = params.get("similarity_fingerprint", ""), params.get("similarity_signature")
    if fingerprint:  # as if the graph had been built on the cut features (else it is refused as stale first)
        params["similarity_fingerprint"] = similarity_fingerprint(t, "asign_features_spot")
        params["similarity_signature"] = similarity_signature(t, "asign_features_spot")
    width = full.shape[1]
    match = rf"method 'asign': the sample to impute has 5 feature columns in `.obsm\['asign_features_spot'\]`, training sample 'B' has {width}"
    with pytest.raises(ValueError, match=match):
        _impute(a, train={"B": b})
    with pytest.raises(ValueError, match=r"sample to impute 'A' has 5 feature columns"):
        asign.tl.cross_validate({"A": a, "B": b}, folds=[["A"]], method="asign", show_progress_bar=False)
    t.obsm["asign_features_spot"] = full
    params["similarity_fingerprint"], params["similarity_signature"] = fingerprint, signature
    t.uns["asign_features"]["tta"] = "dihedral"
    with pytest.raises(ValueError, match="differ from those of training sample 'B' \\(tta: 'none' != 'dihedral'\\)"):
        _impute(a, train={"B": b})
    assert not trained


def test_fit_takes_data_options_from_config_or_refuses_a_conflict(stacks):
    """fit's keywords used to replace the same options given in config silently (config={'n_models': 2} gave 1)."""
    a, b = stacks
    f = asign.tl.fit({"A": a, "B": b}, n_genes=10, config={**TINY, "validation": "none"}, show_progress_bar=False)
    assert f.training["validation"] == "none"
    with pytest.raises(ValueError, match=r"config\['validation'\] = 'none' and validation='holdout' disagree"):
        asign.tl.fit({"A": a, "B": b}, config={**TINY, "validation": "none"}, validation="holdout")
    # a transductive fit trains impute's ensemble of 3 by default
    cfg = {k: v for k, v in TINY.items() if k != "n_models"}
    assert len(asign.tl.fit(a, known="S1", n_genes=10, config=cfg, show_progress_bar=False).models) == 3
