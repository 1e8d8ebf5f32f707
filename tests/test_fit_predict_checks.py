"""Input checks of :func:`asign.tl.fit` and :func:`asign.tl.predict` that fail before any work."""

from __future__ import annotations

import pytest

import asign
from asign.tl._fit import ASIGNFit


def _stack(seed, patient=None):
    s = asign.datasets.synthetic_stack(n_sections=2, n_spots=30, n_genes=12, images=False, seed=seed)
    if patient is not None:
        s.tables["table"].uns["asign"]["dataset"] = {"patient": patient}
    return s


@pytest.mark.parametrize(
    ("kw", "err", "match"),
    [
        ({"seed": None}, TypeError, r"`seed` must be an integer, got None"),
        ({"seed": -1}, ValueError, r"`seed` must be >= 0, got -1"),
        ({"seed": 1.5}, TypeError, r"`seed` must be an integer, got 1.5"),
        ({"seed": "3"}, TypeError, r"`seed` must be an integer, got '3'"),
        ({"seed": False}, TypeError, r"`seed` must be an integer, got False"),
        ({"config": {"seed": -2}}, ValueError, r"`config\['seed'\]` must be >= 0, got -2"),
    ],
)
def test_fit_refuses_a_bad_seed_up_front(kw, err, match):
    """seed=None used to fail in build_context, -1 in numpy, and 1.5 / '3' were truncated / parsed silently."""
    with pytest.raises(err, match=match):
        asign.tl.fit({"A": _stack(0), "B": _stack(1)}, n_genes=4, show_progress_bar=False, **kw)


@pytest.mark.parametrize(("n_models", "err"), [(1.5, TypeError), ("2", TypeError), (True, TypeError), (0, ValueError)])
def test_fit_refuses_a_bad_n_models_up_front(n_models, err):
    """tl.fit converted n_models with int(): 1.5 and True trained one member and "2" two, silently."""
    with pytest.raises(err, match="n_models"):
        asign.tl.fit({"A": _stack(0), "B": _stack(1)}, n_genes=4, n_models=n_models, show_progress_bar=False)


def test_fit_refuses_duplicate_sample_names():
    """Two stacks of one patient in a sequence got the same name: `known=` could not tell them apart."""
    a, b, c = _stack(0, "P1"), _stack(1, "P1"), _stack(2, "P2")
    with pytest.raises(ValueError, match=r"share the name\(s\) \['P1'\].*Pass a mapping \{name: sdata\} with unique"):
        asign.tl.fit([a, b, c], n_genes=4, show_progress_bar=False)
    with pytest.raises(ValueError, match=r"share the name\(s\) \['P1'\]"):
        asign.tl.fit([a, b], known={"P1": "S1"}, n_genes=4, show_progress_bar=False)
    with pytest.raises(ValueError, match="collide as strings"):
        asign.tl.fit({1: a, "1": b}, n_genes=4, show_progress_bar=False)


def test_predict_names_the_model_genes_the_stack_lacks():
    """A stack lacking model genes used to give a bare KeyError from deep inside."""
    sd = _stack(3, "P9")
    t = sd.tables["table"]
    genes = [*map(str, t.var_names[:3]), *(f"absent_{i}" for i in range(12))]
    model = ASIGNFit(models=[], config=None, genes=genes, normalization="st-net", train_samples=["A", "B"])
    with pytest.raises(
        KeyError,
        match=r"sdata.tables\['table'\] \(sample 'P9'\) lacks 12 of the model's 15 genes: \['absent_0', .*'absent_9'\] "
        r"\(\+2 more\)\. tl.predict needs every gene the model \(trained on \['A', 'B'\]\) was trained on",
    ):
        asign.tl.predict(sd, model, known="S1", show_progress_bar=False)
    assert set(sd.tables) == {"table"}


def test_docstrings_say_when_the_propagation_layer_is_written():
    """A model with use_propagation=False writes no layers['propagation']: the docstrings used to promise it."""
    import re

    for f in (asign.tl.predict, asign.tl.impute):
        doc = " ".join(f.__doc__.split())
        assert re.search(r"'propagation'\]?`` \(?where (the model was fitted with )?``use_propagation=True``", doc)


# ---------------------------------------------------------------------------------------- model files (ASIGNFit.load)
def _model(genes=("g0", "g1", "g2", "g3"), **kw):
    """An untrained one-member model (no data needed): what ASIGNFit.save writes, without training."""
    from asign._model import ASIGNConfig, ASIGNModel
    from asign.tl._asign import OPTIONS

    cfg = ASIGNConfig(hidden_dim=8, attn_heads=2, gat_heads=2)
    net = ASIGNModel(len(genes), {"spot": 3, "region": 3, "global": 3}, cfg)
    args = {"models": [net], "config": cfg, "genes": list(genes), "normalization": "st-net"}
    args |= {"options": dict(OPTIONS), "train_samples": ["A", "B"]}
    return ASIGNFit(**{**args, **kw})


def _write_files_that_are_not_models(d):
    import pickle

    import anndata
    import numpy as np

    (d / "notes.txt").write_text("hello, not a model")
    (d / "empty.pt").write_bytes(b"")
    anndata.AnnData(np.zeros((3, 3))).write_h5ad(d / "x.h5ad")
    (d / "x.pkl").write_bytes(pickle.dumps({"a": 1}))
    return ["notes.txt", "empty.pt", "x.h5ad", "x.pkl"]


def test_load_refuses_a_file_that_is_not_an_asign_model(tmp_path):
    """torch.load's own errors (KeyError '101', EOFError, an UnpicklingError advising weights_only=False) used to
    reach the user, from ASIGNFit.load and from tl.predict(sdata, path)."""
    for name in _write_files_that_are_not_models(tmp_path):
        path = str(tmp_path / name)
        for load in (ASIGNFit.load, lambda p: asign.tl.predict(_stack(0), p, known="S1", show_progress_bar=False)):
            with pytest.raises(ValueError, match="is not an asign model file \\(written by ASIGNFit.save\\)") as e:
                load(path)
            assert repr(path) in str(e.value) and "weights_only" not in str(e.value)
            assert e.value.__cause__ is not None  # chained to torch's error
    with pytest.raises(FileNotFoundError):
        ASIGNFit.load(tmp_path / "absent.pt")


def _edit(payload, key, value):
    if value is KeyError:
        del payload[key]
    else:
        payload[key] = value(payload[key]) if callable(value) else value


@pytest.mark.parametrize(
    ("key", "value", "match"),
    [
        ("genes", lambda g: g[:3], r"broken `genes`: 3 names for n_genes=4"),
        ("genes", lambda g: [g[0], *g[:3]], r"broken `genes`: 1 name\(s\) repeated, e.g. \['g0'\]"),
        ("genes", lambda g: [1, 2, 3, 4], r"broken `genes`: it must be a list of gene names"),
        ("state_dicts", [], r"broken `state_dicts`: it must be a non-empty list"),
        ("options", {}, r"broken `options`: no \['feature_key', 'graph_key', 'tile_radius', 'tile_max_neighbors'\]"),
        (
            "options",
            lambda o: {k: v for k, v in o.items() if k != "graph_key"},
            r"broken `options`: no \['graph_key'\]",
        ),
        ("genes", KeyError, r"without the field\(s\) \['genes'\]"),
        ("format_version", "x", r"broken `format_version`: 'x' is not a format number"),
        ("format_version", 99, r"written by a newer asign \(format 99"),
        ("normalization", "zscore", r"broken `normalization`: 'zscore' is not one of \['st-net', 'log1p'\]"),
        ("n_genes", 4.0, r"broken `n_genes`: 4.0 is not an int >= 1"),
        ("config", {"no_such_option": 1}, r"the model's `config` is broken"),
        ("feature_dims", {"spot": 5, "region": 3, "global": 3}, r"`state_dicts\[0\]` does not fit the model"),
    ],
)
def test_load_refuses_a_broken_model_file_naming_the_field(tmp_path, key, value, match):
    """A tampered or incomplete file used to load and then fail deep inside predict (shape mismatch, IndexError,
    KeyError 'feature_key', ...)."""
    import torch

    path = tmp_path / "model.pt"
    _model().save(path)
    payload = torch.load(path, weights_only=True)
    _edit(payload, key, value)
    torch.save(payload, path)
    with pytest.raises(ValueError, match=match) as e:
        ASIGNFit.load(path)
    assert repr(str(path)) in str(e.value)


def test_load_checks_the_encoder_argument(tmp_path):
    """encoder='efficientnet_lite0' (a registry name) used to be accepted and ignored, or fail inside torch."""
    path = tmp_path / "model.pt"
    _model().save(path)
    with pytest.raises(TypeError, match=r"encoder='efficientnet_lite0' must be a torch.nn.Module .* or None"):
        ASIGNFit.load(path, encoder="efficientnet_lite0")
    loaded = ASIGNFit.load(path)  # the intact file loads as before
    assert loaded.genes == ["g0", "g1", "g2", "g3"] and len(loaded.models) == 1


# ----------------------------------------------------------------------------------- predict on a training sample
@pytest.mark.parametrize(
    ("mode", "advice"),
    [
        ("inductive", r"Predict on a sample the model was not trained on"),
        ("transductive", r"The model was trained transductively .* its file does not record which \(older asign\)"),
    ],
)
def test_predict_refuses_one_of_the_models_training_samples(mode, advice):
    """predict on a training sample (by name) ran silently: its training labels were scored as predictions. The
    name is refused by an inductive model and by a transductive one without a record of its known spots (older
    files), with a way out for another sample of the same name."""
    sd = _stack(3, "A")
    model = ASIGNFit(models=[], config=None, genes=["x"], normalization="st-net", mode=mode, train_samples=["A", "B"])
    rename = r"If it is another sample, give it its own name in `uns\['asign'\]\['dataset'\]\['patient'\]`"
    with pytest.raises(
        ValueError, match=rf"has the same name as training sample 'A' \(.*{rename} \(e.g. 'A_new'\). {advice}"
    ):
        asign.tl.predict(sd, model, known="S1", show_progress_bar=False)
    assert set(sd.tables) == {"table"}
    # another name passes this check (and fails on the next one, the genes)
    with pytest.raises(KeyError, match="lacks 1 of the model's 1 genes"):
        asign.tl.predict(_stack(3, "C"), model, known="S1", show_progress_bar=False)
    sd.tables["table"].uns["asign"]["dataset"]["patient"] = "A_new"  # the way out the message gives
    with pytest.raises(KeyError, match="lacks 1 of the model's 1 genes"):
        asign.tl.predict(sd, model, known="S1", show_progress_bar=False)
    assert "The check is by sample name: the stack's ``uns['asign']['dataset']['patient']``" in " ".join(
        asign.tl.predict.__doc__.split()
    )


# ------------------------------------------------------------------------------ stacks with features and a 3D graph
@pytest.fixture(scope="module")
def _prepared(named_asign_stacks):
    return named_asign_stacks(("A", "B", "C"))


@pytest.fixture
def prepared(_prepared, no_training):
    """Three prepared stacks ('A', 'B', 'C'); training is disabled, so a missing check fails loudly."""
    import copy

    return copy.deepcopy(_prepared)


def test_fit_refuses_training_samples_whose_feature_widths_differ(prepared):
    """Feature arrays of different widths (e.g. reduced in place, graph rebuilt) used to fail in torch.cat."""
    a, b, _ = prepared
    t = b.tables["table"]
    width = t.obsm["asign_features_spot"].shape[1]
    t.obsm["asign_features_spot"] = t.obsm["asign_features_spot"][:, :5]
    asign.pp.neighbors_3d(b, similarity_key="asign_features_spot")  # a graph that matches the reduced features
    match = (
        rf"training samples 'A' and 'B' have features of different widths in `.obsm\['asign_features_spot'\]` "
        rf"\({width} and 5 columns\)"
    )
    with pytest.raises(ValueError, match=match):
        asign.tl.fit({"A": a, "B": b}, n_genes=6, config={"max_epochs": 1}, show_progress_bar=False)


def _untrained_for(sd, **kw):
    from asign._model import ASIGNConfig
    from asign.tl._asign import OPTIONS

    genes = [str(g) for g in sd.tables["table"].var_names[:4]]
    return ASIGNFit(models=[], config=ASIGNConfig(), genes=genes, normalization="st-net", options=dict(OPTIONS), **kw)


def test_predict_errors_advise_what_predict_can_change(prepared):
    """predict's errors advised `genes` and `levels='spot'`, options that predict does not have."""
    _, _, c = prepared
    model = _untrained_for(c, train_samples=["A", "B"])
    c.tables["table"].uns["asign"]["unmeasured_genes"] = {"S1": [model.genes[0]]}
    with pytest.raises(ValueError, match="never measured in known section") as e:
        asign.tl.predict(c, model, known="S1", inplace=False, show_progress_bar=False)
    msg = str(e.value)
    assert "`genes`" not in msg and "choose `known` sections that measured them, or fit a model without them" in msg
    del c.tables["table"].uns["asign"]["unmeasured_genes"]
    del c.tables["asign_regions"]
    with pytest.raises(KeyError, match=r"has no tile table `sdata.tables\['asign_regions'\]`") as e:
        asign.tl.predict(c, model, known="S1", inplace=False, show_progress_bar=False)
    msg = str(e.value)
    assert "levels='spot' runs" not in msg
    assert "tl.predict applies the model as it was trained (levels='spot_region_global')" in msg


# ------------------------------------------------------------------------- a transductive model on its own sample
TINY = {"hidden_dim": 16, "attn_heads": 4, "gat_heads": 4, "max_epochs": 3, "steps_per_epoch": 2}


@pytest.fixture
def trainable(_prepared):
    """The three prepared stacks ('A', 'B', 'C'), training enabled."""
    import copy

    return copy.deepcopy(_prepared)


def test_predict_applies_a_transductive_model_to_its_sample_with_the_known_it_was_fitted_with(trainable, tmp_path):
    """predict refused the sample of a transductive model by name even with the `known` it was fitted with, where no
    label is scored (re-applying a saved transductive model is a supported workflow); only a `known` that leaves
    training spots out is refused."""
    import copy

    import numpy as np

    _, _, c = trainable
    model = asign.tl.fit(copy.deepcopy(c), known="S1", n_genes=6, config=TINY, n_models=1, show_progress_bar=False)
    assert model.mode == "transductive" and model.train_samples == ["C"]
    assert model.training["known_sections"] == ["S1"] and "known_spots" not in model.training
    kw = {"inplace": False, "show_progress_bar": False}
    out = asign.tl.predict(c, model, known="S1", **kw)
    imp = asign.tl.impute(c, known="S1", method="asign", genes=model.genes, method_kwargs={**TINY, "n_models": 1}, **kw)
    np.testing.assert_array_equal(out.layers["imputed"], imp.layers["imputed"])  # what impute trains and gives
    asign.tl.predict(c, model, known=["S1", "S2"], **kw)  # more known spots: the training labels stay inputs
    model.save(tmp_path / "c.pt")
    loaded = ASIGNFit.load(tmp_path / "c.pt")
    assert loaded.training["known_sections"] == ["S1"]
    out2 = asign.tl.predict(c, tmp_path / "c.pt", known="S1", nearest_blend=0, **kw)  # e.g. another blend
    assert out2.uns["asign"]["result"]["nearest_blend"] == 0
    t = c.tables["table"]
    n = int(((t.obs["section"].astype(str) == "S1") & t.obs["measured"]).sum())
    match = (
        r"has the same name as training sample 'C' .* trained transductively on its known spots, in section\(s\) "
        rf"\['S1'\]: this `known` leaves {n} of them out, so their training labels would be scored"
    )
    with pytest.raises(ValueError, match=match):
        asign.tl.predict(c, loaded, known="S2", **kw)
    with pytest.raises(ValueError, match=r"this `known` leaves \d+ of them out"):
        asign.tl.predict(
            c, loaded, known=(t.obs["section"].astype(str) == "S1").to_numpy() & (np.arange(t.n_obs) % 2 == 0), **kw
        )
    # a file without the record (older asign): the name is refused, with the way out for another sample
    del loaded.training["known_sections"]
    with pytest.raises(ValueError, match="If it is another sample, give it its own name"):
        asign.tl.predict(c, loaded, known="S1", **kw)


def test_predict_reads_a_transductive_models_known_mask(trainable):
    """A transductive model fitted on a mask of some spots records them (obs names): the same mask, or the whole
    section, may be predicted with; a mask without them may not."""
    import copy

    import numpy as np

    _, _, c = trainable
    t = c.tables["table"]
    s1 = (t.obs["section"].astype(str) == "S1").to_numpy()
    half = s1 & (np.cumsum(s1) % 2 == 0)
    model = asign.tl.fit(copy.deepcopy(c), known=half, n_genes=6, config=TINY, n_models=1, show_progress_bar=False)
    assert model.training["known_sections"] == ["S1"]
    assert model.training["known_spots"] == list(t.obs_names[half])
    kw = {"inplace": False, "show_progress_bar": False}
    asign.tl.predict(c, model, known=half, **kw)
    asign.tl.predict(c, model, known="S1", **kw)
    with pytest.raises(
        ValueError, match=rf"in section\(s\) \['S1'\] \(some of their spots\): this `known` leaves {int(half.sum())} "
    ):
        asign.tl.predict(c, model, known=s1 & ~half, **kw)
