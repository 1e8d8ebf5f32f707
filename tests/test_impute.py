from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp

import asign
from asign.tl import _registry
from asign.tl._registry import ImputeResult, register_method


def _add_aligned(sdata):
    """obsm['spatial_aligned'] from the synthetic ground truth (block µm)."""
    # the synthetic ground truth already holds every spot in block µm (native_to_world applied to obsm['spatial'])
    t = sdata.tables["table"]
    t.obsm["spatial_aligned"] = np.asarray(t.obsm["spatial_world"], dtype=float).copy()
    return sdata


@pytest.fixture
def stack():
    return _add_aligned(asign.datasets.synthetic_stack(n_sections=3, n_spots=50, n_genes=20, images=False, seed=5))


@pytest.fixture
def unmeasured_stack():
    rng = np.random.default_rng(0)
    genes = [f"g{i}" for i in range(8)]
    secs = []
    for name, measured in (("A", True), ("B", True), ("C", False)):
        xy = rng.uniform(10, 90, (12, 2))
        counts = rng.poisson(rng.uniform(0.5, 20, 8), (12, 8)).astype(np.float32) if measured else None
        secs.append(
            asign.io.Section(name=name, spots=xy, counts=counts, genes=genes if measured else None, um_per_px=1.0)
        )
    sdata = asign.io.stack_sections(secs, spot_diameter_um=10.0)
    t = sdata.tables["table"]
    t.obsm["spatial_aligned"] = np.asarray(t.obsm["spatial"], dtype=float)
    return sdata


def _dense(t):
    return np.asarray(t.X.toarray(), dtype=np.float64)


def test_output_table_contract(stack, tmp_path):
    t = stack.tables["table"]
    before = t.X.copy()
    asign.tl.impute(stack, known="S1", method="nearest", n_genes=7, show_progress_bar=False)
    out = stack.tables["asign"]
    assert list(out.obs_names) == list(t.obs_names)
    from spatialdata.models import get_table_keys

    assert get_table_keys(out) == get_table_keys(t)
    np.testing.assert_array_equal(out.obs["spot_id"].to_numpy(), t.obs["spot_id"].to_numpy())
    np.testing.assert_array_equal(out.obs["region"].astype(str), t.obs["region"].astype(str))
    assert out.obs["section"].cat.ordered and list(out.obs["section"].cat.categories) == ["S1", "S2", "S3"]
    assert out.X is None and out.n_vars == 7
    np.testing.assert_array_equal(out.obs["known"], (t.obs["section"] == "S1").to_numpy())
    # default genes: top 7 by mean raw count over the known section, ties by name
    m = (t.obs["section"] == "S1").to_numpy()
    means = _dense(t)[m].mean(axis=0)
    order = np.lexsort((np.asarray(t.var_names), -means))
    assert list(out.var_names) == list(np.asarray(t.var_names)[order[:7]])
    # target = ST-Net values of every measured spot
    C = _dense(t)[:, t.var_names.get_indexer(out.var_names)]
    exp = np.log((C + 1) / (C + 1).sum(axis=1, keepdims=True))
    np.testing.assert_allclose(out.layers["target"], exp, atol=1e-5)
    assert np.isfinite(out.layers["imputed"]).all()
    np.testing.assert_allclose(out.obs["total_counts"], _dense(t).sum(axis=1), rtol=1e-6)
    u = out.uns["asign"]
    assert u["method"] == "nearest" and u["known_sections"] == ["S1"] and u["normalization"] == "st-net"
    assert u["genes"] == list(out.var_names) and u["stack"]["section"] == ["S1", "S2", "S3"]
    assert u["written_by"] == "asign.tl.impute" and "numpy" in u["versions"]
    # raw counts untouched
    assert (t.X != before).nnz == 0
    # zarr round trip of the output table
    import spatialdata as sd

    small = sd.SpatialData(shapes=dict(stack.shapes), tables={"asign": out})
    small.write(tmp_path / "o.zarr")
    back = sd.read_zarr(tmp_path / "o.zarr").tables["asign"]
    np.testing.assert_array_equal(back.layers["imputed"], out.layers["imputed"])
    assert list(back.uns["asign"]["genes"]) == u["genes"]


def test_unmeasured_section_target_nan_and_imputed(unmeasured_stack):
    out = asign.tl.impute(unmeasured_stack, known="A", method="mean", n_genes=5, normalization="log1p", inplace=False)
    t = unmeasured_stack.tables["table"]
    c = (t.obs["section"] == "C").to_numpy()
    assert np.isnan(out.layers["target"][c]).all() and np.isfinite(out.layers["target"][~c]).all()
    assert np.isfinite(out.layers["imputed"]).all()
    assert not out.obs["measured"][c].any() and np.isnan(out.obs["total_counts"][c]).all()
    # log1p-CP10k of the known spots; the mean baseline predicts their mean everywhere
    a = (t.obs["section"] == "A").to_numpy()
    C = _dense(t)[a]
    Y = np.log1p(1e4 * C[:, t.var_names.get_indexer(out.var_names)] / C.sum(axis=1, keepdims=True))
    np.testing.assert_allclose(out.layers["imputed"][c][0], Y.mean(axis=0), atol=1e-5)
    assert "asign" not in unmeasured_stack.tables  # inplace=False writes nothing
    # every measured spot known, the unmeasured section imputed: valid
    asign.tl.impute(unmeasured_stack, known=["A", "B"], method="nearest", n_genes=5)
    assert unmeasured_stack.tables["asign"].obs["known"].sum() == 24
    with pytest.raises(ValueError, match="no spot to score"):
        asign.tl.evaluate(unmeasured_stack)


@pytest.fixture
def spy():
    seen = {}

    @register_method("_spy")
    def _spy(ctx):
        seen["ctx"] = ctx
        seen["Y"] = ctx.Y.copy()
        return ImputeResult(
            imputed=np.zeros((ctx.n_obs, ctx.n_genes)), extra_layers={"network": np.ones((ctx.n_obs, ctx.n_genes))}
        )

    yield seen
    _registry.METHODS.pop("_spy", None)


def test_labels_of_unknown_spots_never_reach_the_method(stack, spy):
    asign.tl.impute(stack, known="S2", method="_spy", n_genes=6, method_kwargs={"alpha": (1, 2), "x": None})
    ctx = spy["ctx"]
    t = stack.tables["table"]
    known = (t.obs["section"] == "S2").to_numpy()
    np.testing.assert_array_equal(ctx.known, known)
    assert np.isnan(spy["Y"][~known]).all() and np.isfinite(spy["Y"][known]).all()
    assert ctx.table.X is None and len(ctx.table.layers) == 0
    assert "spatial_aligned" in ctx.table.obsm and ctx.known_sections() == ["S2"]
    out = stack.tables["asign"]
    assert "network" in out.layers
    assert out.uns["asign"]["params"] == {"alpha": [1, 2], "x": "None"}
    # poisoning every unknown spot's counts leaves what the method sees unchanged
    y_before = spy["Y"]
    X = t.X.toarray()
    X[~known] = 1e7
    t.X = sp.csr_matrix(X)
    asign.tl.impute(stack, known="S2", method="_spy", genes=list(out.var_names), overwrite=True)
    np.testing.assert_array_equal(spy["Y"], y_before)


@pytest.mark.parametrize("method", ["mean", "nearest"])
def test_poisoned_unknown_counts_do_not_change_predictions(stack, method):
    a = asign.tl.impute(stack, known="S1", method=method, n_genes=6, inplace=False)
    t = stack.tables["table"]
    X = t.X.toarray()
    X[(t.obs["section"] != "S1").to_numpy()] *= 1000
    t.X = sp.csr_matrix(X)
    b = asign.tl.impute(stack, known="S1", method=method, n_genes=6, inplace=False)
    assert list(a.var_names) == list(b.var_names)
    np.testing.assert_array_equal(a.layers["imputed"], b.layers["imputed"])
    assert not np.allclose(a.layers["target"], b.layers["target"])


def test_given_genes_and_missing_genes(stack):
    t = stack.tables["table"]
    genes = [t.var_names[5], t.var_names[2]]
    out = asign.tl.impute(stack, known="S1", method="mean", genes=genes, inplace=False)
    assert list(out.var_names) == genes and out.uns["asign"]["gene_sections"] == "given"
    with pytest.raises(KeyError, match=r"not in the table.*nope"):
        asign.tl.impute(stack, known="S1", method="mean", genes=[genes[0], "nope"])
    with pytest.raises(ValueError, match="more than once"):
        asign.tl.impute(stack, known="S1", method="mean", genes=[genes[0], genes[0]])
    assert "asign" not in stack.tables


def test_bad_input_raises_and_writes_nothing(stack, unmeasured_stack):
    t = stack.tables["table"]
    n = t.n_obs
    cases = [
        ({"known": np.zeros(n, dtype=bool)}, ValueError, "selects no spot"),
        ({"known": np.ones(n, dtype=bool)}, ValueError, "every spot"),
        ({"known": ["S1", "S2", "S3"]}, ValueError, "every spot"),
        ({"known": []}, ValueError, "names no section"),
        ({"known": "S7"}, ValueError, "unknown section"),
        ({"known": "S1", "method": "nope"}, ValueError, "Unknown method"),
        ({"known": "S1", "normalization": "cpm"}, ValueError, "Unknown normalization"),
        ({"known": "S1", "key_added": "table"}, ValueError, "input table"),
        ({"known": "S1", "method": "mean", "method_kwargs": {"k": 3}}, ValueError, "unknown parameter"),
        ({"known": "S1", "method": "nearest", "method_kwargs": {"coordinates": "nope"}}, KeyError, "nope"),
        ({"known": "S1", "method": "propagation"}, KeyError, "neighbors_3d"),
    ]
    for kw, err, match in cases:
        with pytest.raises(err, match=match):
            asign.tl.impute(stack, **{"method": "mean", **kw})
    assert set(stack.tables) == {"table"}
    # known spots must be measured
    with pytest.raises(ValueError, match="without measured counts"):
        asign.tl.impute(unmeasured_stack, known=["A", "C"], method="mean")
    # NaN in counts: validate_stack catches it
    X = t.X.toarray()
    X[3, 2] = np.nan
    t.X = sp.csr_matrix(X)
    with pytest.raises(ValueError, match="NaN"):
        asign.tl.impute(stack, known="S1", method="mean")
    assert set(stack.tables) == {"table"}


def test_overwrite_rules(stack):
    asign.tl.impute(stack, known="S1", method="mean", n_genes=4)
    with pytest.raises(ValueError, match="overwrite=True"):
        asign.tl.impute(stack, known="S1", method="nearest", n_genes=4)
    assert stack.tables["asign"].uns["asign"]["method"] == "mean"
    asign.tl.impute(stack, known="S1", method="nearest", n_genes=4, overwrite=True)
    assert stack.tables["asign"].uns["asign"]["method"] == "nearest"
    # a table the user made is never replaced
    from anndata import AnnData
    from spatialdata.models import TableModel

    user = AnnData(obs=pd.DataFrame({"region": pd.Categorical(["spots_S1"]), "spot_id": [0]}, index=["u0"]))
    stack.tables["mine"] = TableModel.parse(user, region="spots_S1", region_key="region", instance_key="spot_id")
    for ow in (False, True):
        with pytest.raises(ValueError, match="not written by asign"):
            asign.tl.impute(stack, known="S1", method="mean", key_added="mine", overwrite=ow)
    assert stack.tables["mine"].n_obs == 1


@pytest.fixture
def trainable():
    calls = []

    def _fit(fctx):
        calls.append(fctx)
        return {"mean": np.mean([c.Y[c.known].mean(axis=0) for c in fctx.train], axis=0)}

    @register_method("_train_mean", fit=_fit)
    def _predict(ctx):
        assert ctx.fitted is not None
        return ImputeResult(imputed=np.tile(ctx.fitted["mean"], (ctx.n_obs, 1)), uns={"n_train": len(ctx.train)})

    yield calls
    _registry.METHODS.pop("_train_mean", None)
    _registry.FITTERS.pop("_train_mean", None)


def test_trainable_method_gets_training_contexts(stack, trainable):
    other = _add_aligned(asign.datasets.synthetic_stack(n_sections=2, n_spots=50, n_genes=20, images=False, seed=8))
    out = asign.tl.impute(stack, known="S1", method="_train_mean", n_genes=5, train={"P2": other}, inplace=False)
    assert len(trainable) == 1
    fctx = trainable[0]
    tc = fctx.train[0]
    assert tc.sample == "P2" and tc.known.all() and np.isfinite(tc.Y).all()
    assert tc.genes == list(out.var_names) == fctx.genes
    assert out.uns["asign"]["train_samples"] == ["P2"] and out.uns["asign"]["result"]["n_train"] == 1
    # the training sample also ranks the genes: equal section weights over S1 and the two training sections
    from asign.pp._genes import section_gene_means, top_genes

    t = stack.tables["table"]
    frames = [
        section_gene_means(t, (t.obs["section"] == "S1").to_numpy()),
        section_gene_means(other.tables["table"], np.ones(other.tables["table"].n_obs, dtype=bool)),
    ]
    assert list(out.var_names) == top_genes(frames, 5)[0]
    assert _registry.get_fit("_train_mean") is not None and _registry.get_fit("mean") is None
    assert {"mean", "nearest", "propagation"} <= set(_registry.available_methods())


@pytest.mark.parametrize(
    ("bad", "err", "match"),
    [
        (lambda ctx: np.zeros((ctx.n_obs, 3)), TypeError, "returned ndarray; it must return an ImputeResult"),
        (
            lambda ctx: ImputeResult(imputed=np.zeros((ctx.n_obs - 1, len(ctx.genes)))),
            ValueError,
            r"returned a prediction of shape \(\d+, 5\)",
        ),
        (
            lambda ctx: ImputeResult(imputed=np.full((ctx.n_obs, len(ctx.genes)), np.nan)),
            ValueError,
            "non-finite predictions",
        ),
        (
            lambda ctx: ImputeResult(
                imputed=np.zeros((ctx.n_obs, len(ctx.genes))), extra_layers={"extra": np.zeros((2, 2))}
            ),
            ValueError,
            "extra layer 'extra' has shape",
        ),
        (
            lambda ctx: ImputeResult(
                imputed=np.zeros((ctx.n_obs, len(ctx.genes))),
                extra_layers={"imputed": np.zeros((ctx.n_obs, len(ctx.genes)))},
            ),
            ValueError,
            "extra layer name 'imputed' is reserved",
        ),
    ],
)
def test_a_bad_method_result_is_refused_and_nothing_is_written(stack, bad, err, match):
    """The result guard of `impute`: a method's malformed output never reaches the user's SpatialData."""
    register_method("_bad_result")(bad)
    try:
        with pytest.raises(err, match=match):
            asign.tl.impute(stack, known="S1", method="_bad_result", n_genes=5)
    finally:
        _registry.METHODS.pop("_bad_result", None)
    assert set(stack.tables) == {"table"}


def test_the_sample_to_impute_is_refused_as_its_own_training_sample(stack, tmp_path):
    """Its unknown sections' labels would rank genes and train the model: refused before anything runs."""
    for train in ([stack], {"me": stack}):
        with pytest.raises(ValueError, match="is the sample to impute itself \\(the same object\\)"):
            asign.tl.impute(stack, known="S1", method="mean", train=train)
    # two objects read from one zarr store are the same sample too
    import spatialdata as sd

    stack.write(tmp_path / "s.zarr")
    a, b = sd.read_zarr(tmp_path / "s.zarr"), sd.read_zarr(tmp_path / "s.zarr")
    with pytest.raises(ValueError, match="'P' is the sample to impute itself \\(the same zarr store"):
        asign.tl.impute(a, known="S1", method="mean", train={"P": b}, inplace=False)
    assert set(stack.tables) == {"table"} and set(a.tables) == {"table"}


def test_gene_sections_outside_known_warn(stack, caplog):
    """Ranking genes on named sections outside ``known`` reads test labels: warned, like gene_sections='all'."""
    import logging

    kw = {"known": "S1", "method": "mean", "n_genes": 5, "inplace": False}
    with caplog.at_level(logging.WARNING, logger="asign"):
        out = asign.tl.impute(stack, gene_sections=["S1", "S2"], **kw)
    assert "outside `known` (section(s) ['S2'])" in caplog.text and "test labels" in caplog.text
    assert list(out.uns["asign"]["gene_sections"]) == ["S1", "S2"]
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="asign"):
        asign.tl.impute(stack, gene_sections="S1", **kw)
        asign.tl.impute(stack, gene_sections="labelled", **kw)
    assert "test labels" not in caplog.text


def test_invalid_key_added_is_refused_before_the_method_runs(stack, spy):
    """A name SpatialData would refuse only when the table is written fails before any work, naming `key_added`."""
    t = stack.tables["table"]
    cases = [
        ("my result", ValueError, "alphanumeric"),
        ("", ValueError, "empty"),
        ("__x", ValueError, "__"),
        (None, TypeError, "must be a string"),
        (5, TypeError, "must be a string"),
        ("SPOTS_S1", ValueError, "clashes with the element 'spots_S1'"),
    ]
    for key, err, match in cases:
        with pytest.raises(err, match=rf"key_added={key!r}.*{match}"):
            asign.tl.impute(stack, known="S1", method="_spy", n_genes=5, key_added=key)
        if key is not None:  # cross_validate writes nothing with key_added=None
            with pytest.raises(err, match=rf"key_added={key!r}"):
                asign.tl.cross_validate({"P": stack}, method="_spy", key_added=key, show_progress_bar=False)
    assert spy == {} and set(stack.tables) == {"table"} and t is stack.tables["table"]


def test_an_impossible_device_is_refused_for_every_method(stack, spy):
    """device='cuda' without CUDA used to run the baselines and record 'cuda'; a non-device a raw torch error."""
    import torch

    with pytest.raises(ValueError, match=r"device='tpu' is not a torch device"):
        asign.tl.impute(stack, known="S1", method="_spy", n_genes=5, device="tpu")
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="CUDA is not available"):
            asign.tl.impute(stack, known="S1", method="mean", n_genes=5, device="cuda")
    assert "asign" not in stack.tables  # nothing written


@pytest.mark.parametrize(
    ("seed", "err", "match"),
    [
        (None, TypeError, r"`seed` must be an integer, got None"),
        (1.5, TypeError, r"`seed` must be an integer, got 1.5"),
        ("3", TypeError, r"`seed` must be an integer, got '3'"),
        (True, TypeError, r"`seed` must be an integer, got True"),
        (-1, ValueError, r"`seed` must be >= 0, got -1"),
    ],
)
def test_a_bad_seed_is_refused_before_the_method_runs(stack, spy, seed, err, match):
    """seed=None used to fail deep in build_context, -1 in numpy, and 1.5 / '3' were silently truncated / parsed."""
    with pytest.raises(err, match=match):
        asign.tl.impute(stack, known="S1", method="_spy", n_genes=5, seed=seed)
    assert spy == {} and set(stack.tables) == {"table"}
    out = asign.tl.impute(stack, known="S1", method="_spy", n_genes=5, seed=np.int64(3), inplace=False)
    assert out.uns["asign"]["seed"] == 3
