"""The ASIGN torch core: modules, propagation, losses, data helpers (method.md §5, §8)."""

from __future__ import annotations

import numpy as np
import pytest
import scipy.sparse as sp

torch = pytest.importorskip("torch")
pytest.importorskip("torch_geometric")

from asign._model import (  # noqa: E402
    GNNT,
    ASIGNConfig,
    ASIGNModel,
    CrossAttention,
    IdentityLinear,
    SampleTensors,
    asign_loss,
    edges_from_sparse,
    label_propagation,
    make_model,
    mean_pcc,
    normalise_sums,
    tile_graph,
    tile_targets,
)
from asign._model._synthetic import random_sample  # noqa: E402

D = 16
CFG = {"hidden_dim": D, "attn_heads": 4, "gat_heads": 4, "dropout": 0.0, "input_dropout": 0.0}


@pytest.fixture(scope="module")
def sample():
    s, y = random_sample(n_sections=3, spots_per_section=25, n_genes=6, feature_dim=8, known_sections=[0], seed=1)
    return s, y


def _dims(s):
    return {"spot": s.x_spot.shape[1], "region": s.x_region.shape[1], "global": s.x_global.shape[1]}


# ------------------------------------------------------------------------------------------------ propagation
def _random_graph(n=30, p=0.15, seed=0):
    rng = np.random.default_rng(seed)
    a = sp.random(n, n, density=p, random_state=seed, data_rvs=lambda k: rng.uniform(0.1, 2.0, k))
    a = a.maximum(a.T).tocsr()
    a.setdiag(0)
    a.eliminate_zeros()
    return a


def test_propagation_matches_reference():
    from asign._propagation import propagate

    w = _random_graph()
    n = w.shape[0]
    rng = np.random.default_rng(0)
    y = rng.normal(-5, 1, (n, 4))
    vis = rng.random(n) < 0.3
    y0 = np.where(vis[:, None], y, y[vis].mean(0))
    ref = propagate(w, y0, vis, n_iter=10)
    ei, ew, _ = edges_from_sparse(w, np.zeros(n, int))
    yv = torch.as_tensor(np.where(vis[:, None], y, np.nan), dtype=torch.float32)
    out = label_propagation(yv, ei, ew, n_iter=10, leave_one_out=False).numpy()
    np.testing.assert_allclose(out, ref, rtol=1e-5, atol=1e-5)
    # visible rows are clamped; hidden rows are never read (poison them: same output)
    np.testing.assert_allclose(out[vis], y[vis], rtol=1e-6)


def test_propagation_isolated_and_never_zero_init():
    # node 3 has no edges; node 2 is unlabelled and reached by nobody visible within T=0 iterations
    w = sp.csr_matrix(np.array([[0, 1, 0, 0], [1, 0, 1, 0], [0, 1, 0, 0], [0, 0, 0, 0]], float))
    ei, ew, _ = edges_from_sparse(w, np.zeros(4, int))
    yv = torch.tensor([[-3.0, -5.0], [float("nan")] * 2, [float("nan")] * 2, [float("nan")] * 2])
    out0 = label_propagation(yv, ei, ew, n_iter=0, leave_one_out=False)
    # unknown nodes start at the visible mean, never at 0 (defect 12)
    np.testing.assert_allclose(out0[1:].numpy(), [[-3.0, -5.0]] * 3)
    out = label_propagation(yv, ei, ew, n_iter=10)
    assert torch.isfinite(out).all()
    np.testing.assert_allclose(out[3].numpy(), [-3.0, -5.0])  # isolated: keeps its initial value
    init = torch.full((4, 2), -7.0)
    out_net = label_propagation(yv, ei, ew, n_iter=10, init=init, leave_one_out=False)
    np.testing.assert_allclose(out_net[3].numpy(), [-7.0, -7.0])  # isolated: keeps the network's value


def test_propagation_leave_one_out_does_not_copy_labels():
    w = _random_graph(seed=3)
    n = w.shape[0]
    ei, ew, _ = edges_from_sparse(w, np.zeros(n, int))
    rng = np.random.default_rng(1)
    y = rng.normal(size=(n, 3)).astype(np.float32)
    yv = torch.as_tensor(y)
    loo = label_propagation(yv, ei, ew, n_iter=10, leave_one_out=True).numpy()
    assert not np.allclose(loo, y)
    # visible row value is a weighted mean of its neighbours' labels
    i = int(np.flatnonzero(np.asarray(w.sum(1)).ravel() > 0)[0])
    row = w[i].toarray().ravel()
    np.testing.assert_allclose(loo[i], row @ y / row.sum(), rtol=1e-5)


def test_identity_linear():
    lin = IdentityLinear(5)
    x = torch.randn(3, 5)
    torch.testing.assert_close(lin(x), x)


# ------------------------------------------------------------------------------------------------- modules
def test_cross_attention_needs_two_tokens_and_depends_on_query():
    with pytest.raises(ValueError, match="at least two"):
        CrossAttention(D, 1, heads=4)
    torch.manual_seed(0)
    ca = CrossAttention(D, 3, heads=4, dropout=0.0).eval()
    q = torch.randn(5, D)
    toks = [q, torch.randn(5, D), torch.randn(5, D)]
    out = ca(q, toks, keep_weights=True)
    w = ca.last_weights
    assert w.shape == (5, 1, 3)
    # the weights are not uniform and change with the query (a single token would give weight 1 always)
    assert not torch.allclose(w, torch.full_like(w, 1 / 3))
    q2 = q.clone()
    q2[0] += 1.0
    ca(q2, [q2, toks[1], toks[2]], keep_weights=True)
    assert not torch.allclose(ca.last_weights[0], w[0])
    # the other nodes are unaffected (per-node attention)
    out2 = ca(q2, [q2, toks[1], toks[2]])
    torch.testing.assert_close(out2[1:], out[1:])
    with pytest.raises(ValueError, match="expects 3 tokens"):
        ca(q, toks[:2])


def test_gnnt_equivariant_and_stacked():
    torch.manual_seed(0)
    n = 12
    w = _random_graph(n=n, p=0.3, seed=2)
    ei, ew, ec = edges_from_sparse(w, np.arange(n) % 2)
    blk = GNNT(D, n_layers=3, gat_heads=4, attn_heads=4, dropout=0.0).eval()
    x = torch.randn(n, D)
    e = torch.stack([ew, ec], 1)
    out = blk(x, ei, e)
    perm = torch.randperm(n)
    inv = torch.empty_like(perm)
    inv[perm] = torch.arange(n)
    out_p = blk(x[perm], inv[ei], e)
    torch.testing.assert_close(out_p, out[perm], rtol=1e-4, atol=1e-5)
    # three stacked layers: a node 3 hops away influences the output, 4 hops away does not
    chain = sp.diags([np.ones(7), np.ones(7)], [1, -1], shape=(8, 8)).tocsr()
    ci, cw, cc = edges_from_sparse(chain, np.zeros(8, int))
    ce = torch.stack([cw, cc], 1)
    xc = torch.randn(8, D)
    base = blk(xc, ci, ce)
    for hop, changes in ((3, True), (4, False)):
        x2 = xc.clone()
        x2[hop] += 3.0 * torch.randn(D)
        diff = (blk(x2, ci, ce)[0] - base[0]).abs().max().item()
        assert (diff > 1e-6) == changes, (hop, diff)
    assert torch.allclose(torch.softmax(blk.layer_logits, 0), torch.full((3,), 1 / 3))


# --------------------------------------------------------------------------------------------------- model
@pytest.mark.parametrize("levels", ["spot_region_global", "spot"])
def test_model_permutation_equivariant(sample, levels):
    s, _ = sample
    model = make_model(s.n_genes, _dims(s), ASIGNConfig(**CFG, levels=levels)).eval()
    with torch.no_grad():
        out = model(s, s.y)
    perm = np.random.default_rng(0).permutation(s.n_spots)
    sp_ = s.permute(perm)
    with torch.no_grad():
        out_p = model(sp_, sp_.y)
    for k in ("pred", "net", "lp"):
        torch.testing.assert_close(out_p[k], out[k][perm], rtol=1e-4, atol=1e-4)
    assert out["pred"].shape == (s.n_spots, s.n_genes)


def test_model_spot_features_matter_and_get_gradient(sample):
    s, _ = sample
    model = make_model(s.n_genes, _dims(s), ASIGNConfig(**CFG)).eval()
    x = s.x_spot.clone().requires_grad_(requires_grad=True)
    s2 = SampleTensors(**{**s.__dict__, "x_spot": x})
    out = model(s2, s.y)
    i = 40  # an unknown-section spot
    out["net"][i].sum().backward()
    assert x.grad[i].abs().sum() > 0  # the spot's own features reach its prediction (defect 3)
    x3 = s.x_spot.clone()
    x3[i] += 3.0
    with torch.no_grad():
        a = model(s, s.y)["pred"]
        b = model(SampleTensors(**{**s.__dict__, "x_spot": x3}), s.y)["pred"]
    assert (a[i] - b[i]).abs().max() > 1e-5


def test_model_isolated_node_finite(sample):
    s, _ = sample
    keep = (s.edge_index != 0).all(0)  # isolate spot 0
    s2 = SampleTensors(
        **{
            **s.__dict__,
            "edge_index": s.edge_index[:, keep],
            "edge_weight": s.edge_weight[keep],
            "edge_cross": s.edge_cross[keep],
        }
    )
    for cfg in (
        ASIGNConfig(**CFG),
        ASIGNConfig(**CFG, lp_init="network", lp_linear=True),
        ASIGNConfig(**CFG, levels="spot"),
    ):
        model = make_model(s.n_genes, _dims(s), cfg).eval()
        with torch.no_grad():
            out = model(s2, s2.y)
        for v in out.values():
            assert torch.isfinite(v).all()


def test_model_variants(sample):
    s, _ = sample
    m = make_model(s.n_genes, _dims(s), ASIGNConfig(**CFG, use_propagation=False, net_baseline="none")).eval()
    m.init_head_bias(torch.full((s.n_genes,), -4.0))
    with torch.no_grad():
        out = m(s, None)
    assert "lp" not in out
    torch.testing.assert_close(out["pred"], out["net"])
    assert abs(float(out["net"].mean()) + 4.0) < 2.0
    m2 = make_model(s.n_genes, _dims(s), ASIGNConfig(**CFG, lp_linear=True, lp_init="network"))
    assert isinstance(m2.lp_linear, IdentityLinear)
    d = m2.describe()
    assert d["n_parameters"] == m2.n_parameters() > 0
    assert d["sigmoid_alpha_mean"] == pytest.approx(1 / (1 + np.exp(-0.5)), rel=1e-5)
    with pytest.raises(ValueError, match="feature_dims"):
        ASIGNModel(3, {"spot": 4}, ASIGNConfig(**CFG))
    s_notiles = SampleTensors(
        x_spot=s.x_spot,
        edge_index=s.edge_index,
        edge_weight=s.edge_weight,
        edge_cross=s.edge_cross,
        section=s.section,
        y=s.y,
    )
    with pytest.raises(ValueError, match="no region/global tiles"):
        m2(s_notiles, s.y)


def test_feature_standardisation_buffers_saved(sample):
    s, _ = sample
    m = make_model(s.n_genes, _dims(s), ASIGNConfig(**CFG))
    m.set_feature_stats("spot", torch.ones(8), torch.full((8,), 2.0))
    sd = m.state_dict()
    assert torch.equal(sd["feat_mean_spot"], torch.ones(8))
    assert torch.equal(sd["feat_std_spot"], torch.full((8,), 2.0))


def test_feature_scaling_dimension_and_global(sample):
    from asign._model._member import feature_stats

    s, _ = sample
    scaled = s.replace(x_spot=s.x_spot * torch.linspace(0.1, 10.0, s.x_spot.shape[1]))
    mu, sd = feature_stats([scaled], "spot")
    assert torch.allclose(sd, scaled.x_spot.std(dim=0, unbiased=False))
    mu_g, sd_g = feature_stats([scaled], "spot", "global")
    assert torch.equal(mu_g, mu)
    # one scale for every dimension: the root mean variance, so the dimensions keep their relative sizes
    assert torch.allclose(sd_g, torch.full_like(sd_g, float(sd.square().mean().sqrt())))
    with pytest.raises(ValueError, match="feature_scaling"):
        ASIGNConfig(**CFG, feature_scaling="pca")


# -------------------------------------------------------------------------------------------------- losses
def test_pcc_axes():
    rng = np.random.default_rng(0)
    p, t = rng.normal(size=(10, 4)), rng.normal(size=(10, 4))
    pt, tt = torch.as_tensor(p), torch.as_tensor(t)
    spot = np.mean([np.corrcoef(p[i], t[i])[0, 1] for i in range(10)])
    assert float(mean_pcc(pt, tt, axis="spot")) == pytest.approx(spot, abs=1e-6)
    groups = torch.as_tensor([0] * 5 + [1] * 5)
    gene = np.mean(
        [np.corrcoef(p[g * 5 : g * 5 + 5, j], t[g * 5 : g * 5 + 5, j])[0, 1] for g in (0, 1) for j in range(4)]
    )
    assert float(mean_pcc(pt, tt, axis="gene", groups=groups)) == pytest.approx(gene, abs=1e-6)
    with pytest.raises(ValueError, match="pcc axis"):
        mean_pcc(pt, tt, axis="bad")


def test_loss_uses_only_loss_rows_and_finite_tiles(sample):
    s, yfull = sample
    model = make_model(s.n_genes, _dims(s), ASIGNConfig(**CFG)).eval()
    with torch.no_grad():
        out = model(s, s.y)
    rows = torch.zeros(s.n_spots, dtype=torch.bool)
    rows[:10] = True
    kw = {
        "weights": [1.0, 1.0, 0.25, 0.25],
        "section": s.section,
        "y_region": s.y_region,
        "y_global": s.y_global,
        "spot_region": s.spot_region,
        "spot_global": s.spot_global,
    }
    tgt = s.y.clone()
    loss, parts = asign_loss(out, tgt, rows, pcc_axis="gene", **kw)
    assert torch.isfinite(loss) and set(parts) == {"spot", "res", "cons", "total"}
    poisoned = tgt.clone()
    poisoned[10:] = 1e6  # rows outside the loss set never enter
    loss2, _ = asign_loss(out, poisoned, rows, pcc_axis="gene", **kw)
    assert float(loss2) == pytest.approx(float(loss), rel=1e-6)
    assert torch.isnan(s.y_region).any()  # unknown-section tiles have no target and are skipped
    loss3, _ = asign_loss(out, tgt, rows, pcc_axis="spot", **kw)
    assert torch.isfinite(loss3)


# ----------------------------------------------------------------------------------------------- data helpers
def test_tile_targets_sum_then_normalise():
    counts = np.array([[1.0, 3.0], [2.0, 0.0], [5.0, 5.0]])  # rows of the labelled spots only
    labelled = np.array([True, True, False, True])
    spot_tile = np.array([0, 0, 1, 2])
    out = tile_targets(counts, labelled, spot_tile, 3)
    np.testing.assert_allclose(out[0], normalise_sums(np.array([[3.0, 3.0]]))[0])
    assert np.isnan(out[1]).all()  # its only spot is unlabelled
    np.testing.assert_allclose(out[2], np.log(np.array([6.0, 6.0]) / 12.0))
    lib = np.array([10.0, 20.0, 30.0])
    out_l = tile_targets(counts, labelled, spot_tile, 3, scale="log1p", library=lib)
    np.testing.assert_allclose(out_l[0], np.log1p(1e4 * np.array([3.0, 3.0]) / 30.0))
    with pytest.raises(ValueError, match="labelled spots"):
        tile_targets(counts[:2], labelled, spot_tile, 3)
    with pytest.raises(ValueError, match="library"):
        normalise_sums(counts, scale="log1p")
    with pytest.raises(ValueError, match="Unknown normalisation"):
        normalise_sums(counts, scale="x")


def test_tile_graph_within_section():
    col = np.array([0, 1, 2, 5, 0, 1])
    row = np.array([0, 0, 0, 0, 0, 0])
    sec = np.array([0, 0, 0, 0, 1, 1])
    ei, ew = tile_graph(col, row, sec)
    pairs = {(int(a), int(b)) for a, b in ei.T}
    assert (0, 1) in pairs and (1, 0) in pairs and (0, 2) in pairs
    assert all(sec[a] == sec[b] for a, b in pairs)  # no cross-section tile edges
    assert not any(a == b for a, b in pairs)
    assert not any(3 in p for p in pairs)  # 3 grid units away: isolated
    w = dict(zip(map(tuple, ei.T.tolist()), ew.tolist(), strict=True))
    assert w[(0, 2)] == pytest.approx(0.5)


def test_edges_from_sparse_and_sample_checks(sample):
    w = sp.csr_matrix(np.array([[1.0, 2.0, 0.0], [2.0, 0.0, 3.0], [0.0, 3.0, 0.0]]))
    ei, ew, ec = edges_from_sparse(w, np.array([0, 0, 1]))
    assert ei.shape[1] == 4  # diagonal dropped
    assert dict(zip(map(tuple, ei.T.tolist()), ec.tolist(), strict=True))[(2, 1)] == 1.0
    s, _ = sample
    with pytest.raises(ValueError, match="self-edges"):
        SampleTensors(
            **{
                **s.__dict__,
                "edge_index": torch.tensor([[0], [0]]),
                "edge_weight": torch.ones(1),
                "edge_cross": torch.zeros(1),
            }
        )
    bad = s.region_global.clone()
    bad[s.region_global == 0] = 1
    assert int(s.region_global.max()) > 0 and not torch.equal(bad, s.region_global)  # the check below is reached
    with pytest.raises(ValueError, match="inconsistent"):
        SampleTensors(**{**s.__dict__, "region_global": bad})
    with pytest.raises(ValueError, match="all of x_region"):
        SampleTensors(**{**s.__dict__, "x_region": None})


# -------------------------------------------------------------------------------------------------- config
def test_config_presets_and_roundtrip():
    c = ASIGNConfig.from_preset("paper_code", hidden_dim=32)
    assert c.optimizer == "sgd" and c.lp_iterations == 20 and c.loss_weights == [0.75, 0.25, 0.125, 0.125]
    assert c.hidden_dim == 32 and c.mask == "spot" and c.visible_fraction == 0.25
    d = ASIGNConfig.from_preset("default").to_dict()
    assert ASIGNConfig.from_dict(d) == ASIGNConfig()
    assert d["loss_weights"] == [1.0, 1.0, 0.25, 0.25] and d["lp_iterations"] == 10
    with pytest.raises(ValueError, match="Unknown preset"):
        ASIGNConfig.from_preset("nope")
    with pytest.raises(ValueError, match="Unknown ASIGN option"):
        ASIGNConfig.from_preset("default", foo=1)
    with pytest.raises(ValueError, match="must divide"):
        ASIGNConfig(hidden_dim=30, attn_heads=8)
    with pytest.raises(ValueError, match="pcc_axis"):
        ASIGNConfig(pcc_axis="cells")
    with pytest.raises(ValueError, match="loss_weights"):
        ASIGNConfig(loss_weights=[1.0])
