"""What a sample needs for ``method="asign"``: one check, one message, the same through every entry point.

Every error here is raised before any training, so the tests train nothing.
"""

from __future__ import annotations

import copy
import logging

import pytest

pytest.importorskip("torch_geometric")

import asign

TINY = {"hidden_dim": 16, "attn_heads": 4, "gat_heads": 4, "max_epochs": 3, "steps_per_epoch": 2, "n_models": 1}


@pytest.fixture(scope="module")
def _prepared(named_asign_stacks):
    return named_asign_stacks(("P", "Q"))


@pytest.fixture
def stacks(_prepared, no_training):
    """Two prepared stacks (named 'P' and 'Q'); training is disabled, so a missing check would fail loudly."""
    return copy.deepcopy(_prepared)


def _impute(sd, **kw):
    args = {"known": "S1", "method": "asign", "n_genes": 8, "method_kwargs": TINY, "inplace": False}
    return asign.tl.impute(sd, **{**args, "show_progress_bar": False, **kw})


def _fit(samples, **kw):
    return asign.tl.fit(samples, n_genes=8, config=TINY, show_progress_bar=False, **kw)


def _error(fn, *args, **kw) -> str:
    with pytest.raises(KeyError) as e:
        fn(*args, **kw)
    return str(e.value.args[0])


@pytest.mark.parametrize(
    ("drop", "element", "fix"),
    [
        ("graph", "`.obsp['asign_connectivities']`", "`asign.pp.neighbors_3d(sdata, key_added='asign')`"),
        ("features", "`.obsm['asign_features_spot']`", "`asign.pp.extract_features(sdata, key_added='asign')`"),
        (
            "regions",
            "tile table `sdata.tables['asign_regions']`",
            "`asign.pp.extract_features(sdata, key_added='asign')`",
        ),
    ],
)
def test_one_message_through_impute_and_fit(stacks, caplog, drop, element, fix):
    """A missing graph, spot features or region tile table: one KeyError naming the element, the sample and its table
    and what to run, the same from a transductive or inductive impute and from tl.fit, before impute logs anything."""
    p, q = stacks
    if drop == "graph":
        del p.tables["table"].obsp["asign_connectivities"]
    elif drop == "features":
        del p.tables["table"].obsm["asign_features_spot"]
    else:
        del p.tables["asign_regions"]
    with caplog.at_level(logging.INFO, logger="asign"):
        transductive = _error(_impute, p)
    assert "Imputing" not in caplog.text  # raised before impute's first log line
    assert transductive.startswith(f"method 'asign': sample 'P' (table 'table') has no {element}")
    assert f"run {fix} on it first" in transductive
    assert _error(_impute, p, train={"Q": q}) == transductive  # the sample to impute, inductive
    assert _error(_fit, p, known="S1") == transductive  # tl.fit, transductive
    assert _error(_fit, {"Q": q, "P": p}) == transductive  # tl.fit, a training sample
    assert _error(_impute, q, train={"P": p}) == transductive  # impute, a training sample
    assert "Training ASIGN" not in caplog.text


def test_tile_index_columns_and_tile_features_are_checked_before_logging(stacks, caplog):
    """The tile rows of the spot table and of the region table and the tile tables' features are part of the check:
    a transductive impute names every missing one (and the spot-only way out) before it logs anything."""
    p, _ = stacks
    del p.tables["table"].obs["asign_global"]
    del p.tables["asign_regions"].obs["asign_global"]
    del p.tables["asign_globals"].obsm["features"]
    with caplog.at_level(logging.INFO, logger="asign"):
        msg = _error(_impute, p)
    assert "Imputing" not in caplog.text
    for element in (
        "`.obs['asign_global']`",
        "`sdata.tables['asign_regions'].obs['asign_global']`",
        "`sdata.tables['asign_globals'].obsm['features']`",
    ):
        assert element in msg
    assert "Tile tables" in msg and "levels='spot'" in msg
    assert _error(_fit, p, known="S1") == msg


def test_spot_model_needs_no_tile_tables(stacks):
    """At levels='spot' the tile tables are not needed: the check lets the sample through (to training)."""
    p, _ = stacks
    for name in ("asign_regions", "asign_globals"):
        del p.tables[name]
    with pytest.raises(AssertionError, match="training started"):
        _impute(p, method_kwargs={**TINY, "levels": "spot"})


def test_cross_validate_checks_a_test_sample_before_its_fold_trains(stacks):
    """cross_validate: a test sample that lacks a tile table fails before its fold trains on the other samples."""
    p, q = stacks
    del q.tables["asign_regions"]
    msg = _error(
        asign.tl.cross_validate,
        {"P": p, "Q": q},
        folds=[["Q"], ["P"]],
        n_genes=8,
        method_kwargs=TINY,
        show_progress_bar=False,
    )
    assert msg.startswith(
        "method 'asign': sample 'Q' (table 'table') has no tile table `sdata.tables['asign_regions']`"
    )


def test_non_finite_features_are_named_before_training(stacks):
    """One NaN feature row used to train a NaN model silently (fit) and fail only at prediction (impute)."""
    import numpy as np

    p, q = stacks
    f = p.tables["table"].obsm["asign_features_spot"]
    row = f[3].copy()
    f[3] = np.nan
    for call in (lambda: _impute(p), lambda: _fit({"P": p, "Q": q})):
        with pytest.raises(ValueError) as e:
            call()
        msg = str(e.value)
        assert (
            "sample 'P' has non-finite image features: table 'table' `.obsm['asign_features_spot']` in 1 spots" in msg
        )
        assert "(per section: {'S1': 1})" in msg and "asign.pp.extract_features" in msg
    f[3] = row  # the features the graph's similarity scores read (any other values make the graph stale)
    p.tables["asign_globals"].obsm["features"][0, 1] = np.inf
    with pytest.raises(ValueError, match=r"table 'asign_globals' `.obsm\['features'\]` in 1 tiles"):
        _impute(p)


def test_a_sample_given_twice_for_training_is_refused(stacks):
    """Early stopping would validate on labels the model trains on (cross_validate refused this already)."""
    p, q = stacks
    with pytest.raises(ValueError, match="Samples 'P' and 'P2' are the same object; its labels would count twice"):
        _fit({"P": p, "P2": p})
    with pytest.raises(ValueError, match="Samples 'A' and 'B' are the same object"):
        _impute(p, train={"A": q, "B": q})


@pytest.mark.parametrize(
    ("option", "value", "error", "match"),
    [
        ("n_models", 1.5, TypeError, r"method 'asign': `n_models` must be an integer, got 1.5"),
        ("n_models", True, TypeError, r"method 'asign': `n_models` must be an integer, got True"),
        ("n_models", "2", TypeError, r"method 'asign': `n_models` must be an integer, got '2'"),
        ("n_models", 0, ValueError, r"method 'asign': `n_models` must be >= 1, got 0"),
        ("tile_radius", -1.0, ValueError, r"method 'asign': `tile_radius` must be > 0, got -1.0"),
        ("tile_radius", float("nan"), ValueError, r"method 'asign': `tile_radius` must be a finite number"),
        ("tile_radius", "a", TypeError, r"method 'asign': `tile_radius` must be a number, got 'a'"),
        ("tile_max_neighbors", 0, ValueError, r"method 'asign': `tile_max_neighbors` must be >= 1, got 0"),
        ("tile_max_neighbors", 2.5, TypeError, r"method 'asign': `tile_max_neighbors` must be an integer"),
    ],
)
def test_data_options_are_checked_before_training(stacks, option, value, error, match):
    """n_models, tile_radius and tile_max_neighbors: 1.5 / True used to train one model silently, a negative radius to
    build no tile edges, 0 neighbours to fail with an IndexError deep in the tile graph."""
    p, q = stacks
    with pytest.raises(error, match=match):
        _impute(p, method_kwargs={**TINY, option: value})
    with pytest.raises(error, match=match):
        _impute(p, train={"Q": q}, method_kwargs={**TINY, option: value})
    if option != "n_models":  # tl.fit takes n_models as a keyword of its own
        with pytest.raises(error, match=match):
            asign.tl.fit({"P": p, "Q": q}, n_genes=8, config={**TINY, option: value}, show_progress_bar=False)


def test_fewer_than_two_known_spots_are_refused_before_training(stacks, caplog):
    """One known spot cannot give a visible set and a loss set: refused up front, naming the sample, its known
    sections and the count (it used to fail in the training loop naming a placeholder sample 'sample')."""
    import numpy as np

    p, q = stacks
    t = p.tables["table"]
    one = np.zeros(t.n_obs, dtype=bool)
    one[np.flatnonzero(t.obs["section"].astype(str) == "S2")[0]] = True
    with caplog.at_level(logging.INFO, logger="asign"), pytest.raises(ValueError) as e:
        _impute(p, known=one)
    assert str(e.value).startswith(
        "method 'asign': the sample to impute 'P' has 1 known spot(s) (section(s) ['S2']); training needs at least 2"
    )
    assert "Training ASIGN" not in caplog.text and "hold out" not in caplog.text
    with pytest.raises(ValueError, match=r"training sample 'P' has 1 known spot\(s\) \(section\(s\) \['S2'\]\)"):
        _fit({"Q": q, "P": p}, known={"Q": None, "P": one}, validation="holdout")
