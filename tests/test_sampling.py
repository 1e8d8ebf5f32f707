"""Neighbour-sampled subgraph training and exact batched inference (asign._model._sampling; issue 6)."""

from __future__ import annotations

import numpy as np
import pytest
import scipy.sparse as sp

torch = pytest.importorskip("torch")
pytest.importorskip("torch_geometric")

from asign._model import ASIGNConfig, make_model, predict_sample, train_model  # noqa: E402
from asign._model._sampling import (  # noqa: E402
    SAFETY,
    NeighbourSampler,
    estimate_training_bytes,
    fanout_mask,
    plan_training,
    predict_batched,
    receptive_hops,
    sample_size,
)
from asign._model._synthetic import random_sample  # noqa: E402

CFG = {"hidden_dim": 16, "attn_heads": 4, "gat_heads": 4, "lr": 3e-3, "patience": 0}


@pytest.fixture(scope="module")
def sample():
    s, _ = random_sample(n_sections=3, spots_per_section=120, n_genes=8, feature_dim=8, seed=4)
    return s


def _dims(s):
    return {"spot": s.x_spot.shape[1], "region": s.x_region.shape[1], "global": s.x_global.shape[1]}


def _adj(edge_index, n):
    src, dst = edge_index.numpy()
    return sp.csr_matrix((np.ones(src.size), (dst, src)), shape=(n, n))


def _khop_reference(edge_index, n, seeds, hops):
    a = _adj(edge_index, n)
    reach = np.zeros(n, bool)
    reach[seeds] = True
    for _ in range(hops):
        reach = reach | (a @ reach.astype(float) > 0)
    return np.flatnonzero(reach)


def test_fanout_mask_keeps_heaviest_in_edges():
    # target 0 has in-edges from 1 (w 0.5), 2 (w 2.0), 3 (w 1.0), 4 (w 2.0); target 1 from 0 (w 1.0)
    ei = torch.tensor([[1, 2, 3, 4, 0], [0, 0, 0, 0, 1]])
    w = torch.tensor([0.5, 2.0, 1.0, 2.0, 1.0])
    keep = fanout_mask(ei, w, 5, 2)
    assert keep.tolist() == [False, True, False, True, True]  # the two weight-2 edges; ties by source
    keep = fanout_mask(ei, w, 5, 3)
    assert keep.tolist() == [False, True, True, True, True]
    assert bool(fanout_mask(ei, w, 5, 0).all())


def test_receptive_hops():
    assert receptive_hops(ASIGNConfig(**CFG)) == 3
    assert receptive_hops(ASIGNConfig(**CFG, gnn_layers=2, levels="spot")) == 3


def test_subgraph_reindexing(sample):
    s = sample
    n = s.n_spots
    seeds = torch.tensor([5, 77, 200, 301])
    sm = NeighbourSampler(s, hops=2, tile_hops=1)
    sub = sm.subgraph(seeds)
    nodes = sub.nodes.numpy()
    np.testing.assert_array_equal(nodes, _khop_reference(s.edge_index, n, seeds.numpy(), 2))
    assert sub.nodes[sub.seeds].tolist() == sorted(seeds.tolist())
    assert sub.seed_mask.sum() == 4
    t = sub.sample
    # spot rows
    for name in ("x_spot", "section", "y"):
        np.testing.assert_array_equal(getattr(t, name).numpy(), getattr(s, name)[sub.nodes].numpy())
    # edges: exactly the original edges among the nodes, with their weights and cross flags
    orig = {
        (int(a), int(b)): (float(w), float(c))
        for (a, b), w, c in zip(s.edge_index.T.numpy(), s.edge_weight.numpy(), s.edge_cross.numpy(), strict=True)
    }
    inside = {k for k in orig if k[0] in set(nodes) and k[1] in set(nodes)}
    got = {}
    for (a, b), w, c in zip(t.edge_index.T.numpy(), t.edge_weight.numpy(), t.edge_cross.numpy(), strict=True):
        got[(int(nodes[a]), int(nodes[b]))] = (float(w), float(c))
    assert set(got) == inside and len(got) == t.edge_index.shape[1]
    assert all(got[k] == orig[k] for k in got)
    # tile maps point to the same tiles as before
    np.testing.assert_array_equal(sub.regions[t.spot_region].numpy(), s.spot_region[sub.nodes].numpy())
    np.testing.assert_array_equal(sub.globals_[t.spot_global].numpy(), s.spot_global[sub.nodes].numpy())
    np.testing.assert_array_equal(sub.globals_[t.region_global].numpy(), s.region_global[sub.regions].numpy())
    np.testing.assert_array_equal(t.x_region.numpy(), s.x_region[sub.regions].numpy())
    # the regions: the spots' regions plus one hop of the region graph
    r0 = np.unique(s.spot_region[sub.nodes].numpy())
    np.testing.assert_array_equal(sub.regions.numpy(), _khop_reference(s.region_edge_index, s.x_region.shape[0], r0, 1))
    r_edges = {tuple(e) for e in s.region_edge_index.T.numpy()}
    assert all((int(sub.regions[a]), int(sub.regions[b])) in r_edges for a, b in t.region_edge_index.T.numpy())
    # tile targets: the seeds' own tiles only (the others are NaN, so they never enter the loss)
    seed_r = np.unique(s.spot_region[seeds].numpy())
    finite = np.isfinite(t.y_region.numpy()).all(1)
    np.testing.assert_array_equal(np.sort(sub.regions.numpy()[finite]), seed_r)
    np.testing.assert_array_equal(t.y_region.numpy()[finite], s.y_region[sub.regions[finite]].numpy())
    seed_g = np.unique(s.spot_global[seeds].numpy())
    np.testing.assert_array_equal(np.sort(sub.globals_.numpy()[np.isfinite(t.y_global.numpy()).all(1)]), seed_g)


def test_local_batches_cover_rows_once_and_stay_compact(sample):
    s = sample
    rows = s.section != 1
    sm = NeighbourSampler(s, hops=1)
    sizes = {}
    for local in (True, False):
        g = torch.Generator().manual_seed(0)
        batches = sm.batches(rows, 12, generator=g, local=local)
        allidx = torch.cat(batches)
        assert sorted(allidx.tolist()) == torch.nonzero(rows).squeeze(1).tolist()  # every seed exactly once
        assert max(b.numel() for b in batches) == 12
        sizes[local] = np.mean([sm.nodes(b).numel() for b in batches])
    assert sizes[True] < 0.8 * sizes[False]  # graph-local seeds share their neighbourhoods
    # the offset and the batch order change with the generator, the cover does not
    b1 = sm.batches(rows, 40, generator=torch.Generator().manual_seed(1))
    b2 = sm.batches(rows, 40, generator=torch.Generator().manual_seed(2))
    assert [b.tolist() for b in b1] != [b.tolist() for b in b2]
    with pytest.raises(ValueError, match="seed_order"):
        ASIGNConfig(seed_order="bfs")
    with pytest.raises(ValueError, match="subgraph"):
        ASIGNConfig(subgraph="sometimes")
    with pytest.raises(ValueError, match="batch_size"):
        ASIGNConfig(batch_size=0)
    with pytest.raises(ValueError, match="encoder_freeze"):
        ASIGNConfig(encoder_freeze=1.5)
    d = ASIGNConfig(subgraph="always", batch_size=128, fanout=8).to_dict()
    assert ASIGNConfig.from_dict(d).fanout == 8  # plain round trip (saved with the model)


def test_fanout_bounds_the_neighbourhood(sample):
    s = sample
    seeds = torch.tensor([10, 150])
    full = NeighbourSampler(s, hops=3).nodes(seeds)
    capped = NeighbourSampler(s, hops=3, fanout=2).nodes(seeds)
    assert set(capped.tolist()) <= set(full.tolist())
    assert capped.numel() <= 2 * (1 + 2 + 4 + 8) < full.numel()


@pytest.mark.parametrize(
    "extra",
    [
        {},
        {"levels": "spot"},
        {"net_baseline": "none", "lp_init": "network", "lp_linear": True},
        {"levels": "spot", "label_input": True},
    ],
)
def test_batched_inference_equals_whole_graph(sample, extra):
    s, _ = random_sample(n_sections=3, spots_per_section=120, n_genes=8, feature_dim=8, known_sections=[1], seed=5)
    cfg = ASIGNConfig(**CFG, **extra)
    model = make_model(s.n_genes, _dims(s), cfg).eval()
    with torch.no_grad():
        whole = model(s, s.y)
        batched = predict_batched(model, s, s.y, batch_size=40)
    assert set(whole) == set(batched)
    for k in whole:
        np.testing.assert_allclose(batched[k].numpy(), whole[k].numpy(), atol=1e-5, rtol=0, err_msg=k)
    # the same through predict_sample
    a = predict_sample(model, s, batch_size=0)
    b = predict_sample(model, s, batch_size=64)
    np.testing.assert_allclose(a["pred"], b["pred"], atol=1e-5, rtol=0)


def test_subgraph_steps_see_only_visible_labels_and_score_seeds(sample, monkeypatch):
    s = sample.with_labels(torch.where((sample.section == 2).unsqueeze(1), float("nan"), sample.y))
    cfg = ASIGNConfig(**CFG, subgraph="always", batch_size=50, max_epochs=1, fanout=3)
    model = make_model(s.n_genes, _dims(s), cfg)
    seen = []
    forward = type(model).forward

    def spy(self, sub, y_visible=None, **kw):
        seen.append((sub, y_visible.clone()))
        return forward(self, sub, y_visible, **kw)

    monkeypatch.setattr(type(model), "forward", spy)
    import asign._model._train as tr

    losses = []
    real_loss = tr.asign_loss

    def loss_spy(out, y, rows, **kw):
        losses.append((y, rows.clone()))
        return real_loss(out, y, rows, **kw)

    monkeypatch.setattr(tr, "asign_loss", loss_spy)
    res = train_model(model, [s], show_progress_bar=False)
    assert res.subgraph == [True]
    assert len(seen) == len(losses) == res.n_steps > 1
    n_seeds = 0
    for (sub, y_vis), (_, rows) in zip(seen, losses, strict=True):
        assert sub.n_spots < s.n_spots
        vis = torch.isfinite(y_vis).all(1)
        lab = sub.labelled
        assert vis.any() and not bool((vis & rows).any())  # seeds are hidden
        assert not bool((vis & ~lab).any())  # nothing unlabelled (section 2) is ever visible
        assert bool(lab[rows].all())  # the loss reads labelled seed rows only
        sec_vis = torch.unique(sub.section[vis]).tolist()
        assert len(sec_vis) == 1  # mask="section": one visible section, the same one throughout the mask
        assert sub.visible_mean is not None
        n_seeds += int(rows.sum())
    # one mask per epoch: every hidden labelled spot is a seed exactly once
    assert n_seeds == int(s.labelled.sum()) - int((s.labelled & (s.section == sec_vis[0])).sum())


def test_subgraph_training_learns_and_is_deterministic(sample):
    s, y = random_sample(n_sections=3, spots_per_section=80, n_genes=8, feature_dim=8, seed=6)
    cfg = ASIGNConfig(**CFG, subgraph="always", batch_size=48, max_epochs=8, fanout=6)
    preds, curves = [], []
    for _ in range(2):
        model = make_model(s.n_genes, _dims(s), cfg)
        res = train_model(model, [s], show_progress_bar=False)
        preds.append(predict_sample(model, s)["pred"])
        curves.append([r["loss_total"] for r in res.curve])
    assert res.subgraph == [True] and res.n_steps >= 8 * 3
    np.testing.assert_array_equal(preds[0], preds[1])
    assert curves[0] == curves[1]
    assert np.mean(curves[0][-2:]) < curves[0][0] - 0.05


def test_auto_picks_whole_graph_for_small_samples(sample):
    model = make_model(sample.n_genes, _dims(sample), ASIGNConfig(**CFG))
    plan = plan_training(model, sample, device="cpu")
    assert plan["subgraph"] is False and 0 < plan["estimate_bytes"] < plan["limit_bytes"]
    model = make_model(sample.n_genes, _dims(sample), ASIGNConfig(**CFG, memory_limit_gb=1e-4))
    plan = plan_training(model, sample, device="cpu")
    assert plan["subgraph"] is True and plan["limit_bytes"] == int(1e-4 * 2**30)
    never = make_model(sample.n_genes, _dims(sample), ASIGNConfig(**CFG, subgraph="never", memory_limit_gb=1e-4))
    assert plan_training(never, sample, device="cpu")["subgraph"] is False
    res = train_model(
        make_model(sample.n_genes, _dims(sample), ASIGNConfig(**CFG, max_epochs=1)), [sample], show_progress_bar=False
    )
    assert res.subgraph == [False] and res.n_steps == 1
    assert res.to_uns()["subgraph"] == [False]


def test_memory_estimate_tracks_saved_activations():
    s, _ = random_sample(n_sections=3, spots_per_section=300, n_genes=40, feature_dim=32, seed=1)
    from asign._model._losses import asign_loss

    for levels in ("spot_region_global", "spot"):
        cfg = ASIGNConfig(hidden_dim=32, attn_heads=4, gat_heads=4, levels=levels)
        model = make_model(s.n_genes, _dims(s), cfg).train()
        size = [0]

        def pack(t, size=size):
            size[0] += t.numel() * t.element_size()
            return t

        y_in = torch.where((s.section == 0).unsqueeze(1), s.y, float("nan"))
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            out = model(s, y_in)
            asign_loss(out, s.y, s.section != 0, weights=cfg.loss_weights, pcc_axis="gene", section=s.section)
        est = estimate_training_bytes(cfg, **sample_size(s)) / SAFETY
        assert 0.7 < est / size[0] < 1.4, (levels, est, size[0])
