"""The ASIGN training loop (method.md §6): masking, label hygiene, determinism, fresh init, early stopping."""

from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("torch_geometric")

from asign._model import (  # noqa: E402
    ASIGNConfig,
    ValidationSet,
    make_model,
    per_gene_pcc,
    predict_sample,
    train_model,
)
from asign._model._synthetic import random_sample  # noqa: E402
from asign._model._train import _draw_mask  # noqa: E402

CFG = {"hidden_dim": 16, "attn_heads": 4, "gat_heads": 4, "lr": 3e-3, "patience": 0}


@pytest.fixture(scope="module")
def data():
    s, y = random_sample(n_sections=3, spots_per_section=30, n_genes=8, feature_dim=8, known_sections=[0], seed=2)
    full, _ = random_sample(n_sections=3, spots_per_section=30, n_genes=8, feature_dim=8, seed=3)
    return s, y, full


def _dims(s):
    return {"spot": s.x_spot.shape[1], "region": s.x_region.shape[1], "global": s.x_global.shape[1]}


def test_per_gene_pcc():
    rng = np.random.default_rng(0)
    t = rng.normal(size=(20, 3))
    g = np.repeat([0, 1], 10)
    assert per_gene_pcc(t, t, g) == pytest.approx(1.0)
    assert per_gene_pcc(-t, t, g) == pytest.approx(-1.0)
    assert per_gene_pcc(np.zeros_like(t), t, g) == 0.0  # constant prediction counts as 0
    # mean over the groups of the mean over the genes that vary in the group; a per-group offset does not matter
    p = t + rng.normal(0, 0.7, t.shape) + 5.0 * g[:, None]
    t[g == 1, 2] = 1.0  # gene 2 is constant in group 1: left out there
    manual = np.mean(
        [
            np.mean([np.corrcoef(p[g == 0, j], t[g == 0, j])[0, 1] for j in range(3)]),
            np.mean([np.corrcoef(p[g == 1, j], t[g == 1, j])[0, 1] for j in range(2)]),
        ]
    )
    assert per_gene_pcc(p, t, g) == pytest.approx(manual, abs=1e-12)  # pooled groups: 0.57; gene 2 as 0: 0.65


def test_masks(data):
    s, _, full = data
    gen = torch.Generator().manual_seed(0)
    cfg = ASIGNConfig(**CFG)  # mask="section"
    seen = set()
    for _ in range(20):
        vis, loss = _draw_mask(full, cfg, gen)
        secs = torch.unique(full.section[vis]).tolist()
        assert len(secs) == 1  # one visible section, all others hidden
        seen.add(secs[0])
        assert not bool((vis & loss).any()) and bool((vis | loss).all())
    assert seen == {0, 1, 2}  # known_policy="random"
    vis, _ = _draw_mask(full, ASIGNConfig(**CFG, known_policy="first"), gen)
    assert torch.unique(full.section[vis]).tolist() == [0]
    # a single labelled section falls back to spot masking with probability p
    cfg = ASIGNConfig(**CFG, visible_fraction=0.3)
    fr = []
    for _ in range(30):
        vis, loss = _draw_mask(s, cfg, gen)
        assert not bool((vis & ~s.labelled).any()) and not bool((loss & ~s.labelled).any())
        assert bool(vis.any()) and bool(loss.any())
        fr.append(float(vis.sum()) / float(s.labelled.sum()))
    assert 0.2 < np.mean(fr) < 0.4


def test_block_mask_hides_contiguous_regions():
    """``mask="block"``: contiguous visible patches of labelled spots (within-section edges only); the hidden spots
    lie farther from the visible labels than under ``mask="spot"`` with the same fraction."""
    from asign._model import SampleTensors

    n = 20
    edges = [
        (i * n + j, (i + di) * n + j + dj)
        for i in range(n)
        for j in range(n)
        for di, dj in ((0, 1), (1, 0), (0, -1), (-1, 0))
        if 0 <= i + di < n and 0 <= j + dj < n
    ]
    ei = torch.tensor(edges).T
    y = torch.zeros(n * n, 3)
    y[:40] = float("nan")  # two unlabelled rows
    # the same grid as a second section joined by cross-section edges, which a patch must not follow
    s = SampleTensors(
        x_spot=torch.zeros(2 * n * n, 4),
        edge_index=torch.cat([ei, ei + n * n, torch.stack([torch.arange(n * n), torch.arange(n * n) + n * n])], 1),
        edge_weight=torch.ones(2 * ei.shape[1] + n * n),
        edge_cross=torch.cat([torch.zeros(2 * ei.shape[1]), torch.ones(n * n)]),
        section=torch.repeat_interleave(torch.tensor([0, 1]), n * n),
        y=torch.cat([y, torch.full((n * n, 3), float("nan"))]),
    )
    gen = torch.Generator().manual_seed(0)

    def near_fraction(vis):
        """Fraction of hidden labelled spots with a visible within-section neighbour."""
        hidden = s.labelled & ~vis
        has = torch.zeros_like(vis)
        has[ei[0][vis[ei[1]]]] = True
        return float((has & hidden).sum()) / float(hidden.sum())

    block, spot = [], []
    for _ in range(10):
        vis, loss = _draw_mask(s, ASIGNConfig(**CFG, mask="block", visible_fraction=0.2), gen)
        assert not bool((vis & ~s.labelled).any()) and bool((vis | loss)[s.labelled].all())
        assert 0.2 <= float(vis.sum()) / float(s.labelled.sum()) < 0.25
        block.append(near_fraction(vis))
        vis, _ = _draw_mask(s, ASIGNConfig(**CFG, mask="spot", visible_fraction=0.2), gen)
        spot.append(near_fraction(vis))
    assert np.mean(block) < 0.6 * np.mean(spot)


def test_hidden_labels_never_reach_the_model(data, monkeypatch):
    s, _, full = data
    model = make_model(full.n_genes, _dims(full), ASIGNConfig(**CFG, max_epochs=2))
    seen = []
    orig = model.forward

    def spy(sample, y_visible=None, **kw):
        seen.append(y_visible.detach().clone())
        return orig(sample, y_visible, **kw)

    monkeypatch.setattr(model, "forward", spy)
    train_model(model, [full], show_progress_bar=False)
    assert len(seen) == 2
    for y_in in seen:
        vis = torch.isfinite(y_in).all(1)
        # exactly one section visible; every other row is NaN in the only label tensor the model gets
        assert len(torch.unique(full.section[vis])) == 1
        assert torch.isnan(y_in[~vis]).all()


def test_training_learns(data):
    s, y, _ = data
    cfg = ASIGNConfig(**CFG, mask="spot", visible_fraction=0.3, max_epochs=15, steps_per_epoch=4, dropout=0.0)
    model = make_model(s.n_genes, _dims(s), cfg)
    res = train_model(model, [s], show_progress_bar=False)
    assert res.epochs_run == 15 and res.n_steps == 60
    assert res.curve[-1]["loss_total"] < res.curve[0]["loss_total"]
    out = predict_sample(model, s)
    sec = s.section.numpy()
    unk = sec > 0
    assert all(np.isfinite(v).all() for v in out.values())
    pcc = per_gene_pcc(out["pred"][unk], y[unk], sec[unk])
    assert pcc > 0.3
    uns = res.to_uns()
    assert set(uns["curve"]) >= {"epoch", "loss_total", "loss_spot", "lr"}
    assert uns["curve"]["loss_total"].shape == (15,)


def test_same_seed_same_prediction_on_cpu(data):
    s, _, full = data
    preds = []
    for _ in range(2):
        cfg = ASIGNConfig(**CFG, max_epochs=3, steps_per_epoch=2, seed=7)
        model = make_model(s.n_genes, _dims(s), cfg)
        train_model(model, [full, s], show_progress_bar=False)
        preds.append(predict_sample(model, s)["pred"])
    np.testing.assert_array_equal(preds[0], preds[1])
    cfg = ASIGNConfig(**CFG, max_epochs=3, steps_per_epoch=2, seed=8)
    model = make_model(s.n_genes, _dims(s), cfg)
    train_model(model, [full, s], show_progress_bar=False)
    assert not np.array_equal(predict_sample(model, s)["pred"], preds[0])


def test_fresh_initialisation_per_fold(data):
    s, _, full = data
    from asign._device import spawn_seeds

    seeds = spawn_seeds(0, 2)
    dims = _dims(s)
    first = make_model(s.n_genes, dims, ASIGNConfig(**CFG, max_epochs=2, seed=seeds[0]))
    init0 = {k: v.clone() for k, v in first.state_dict().items()}
    train_model(first, [full], show_progress_bar=False)  # fold 0 trains
    # fold 1 starts from a fresh init with its own seed, identical to an independent fresh model with that seed
    fold1 = make_model(s.n_genes, dims, ASIGNConfig(**CFG, seed=seeds[1]))
    ref1 = make_model(s.n_genes, dims, ASIGNConfig(**CFG, seed=seeds[1]))
    for k, v in fold1.state_dict().items():
        torch.testing.assert_close(v, ref1.state_dict()[k], rtol=0, atol=0)
    # ... and shares nothing with the trained fold-0 weights, nor with fold 0's init
    trained = first.state_dict()
    assert any(not torch.equal(trained[k], init0[k]) for k in init0)
    w = "head.spot.linear.weight"
    assert not torch.equal(fold1.state_dict()[w], trained[w])
    assert not torch.equal(fold1.state_dict()[w], init0[w])
    # make_model leaves the global RNG untouched
    torch.manual_seed(5)
    a = torch.rand(1)
    torch.manual_seed(5)
    make_model(s.n_genes, dims, ASIGNConfig(**CFG))
    assert torch.equal(torch.rand(1), a)


def test_early_stopping_restores_best(data):
    s, y, full = data
    val = ValidationSet(sample=s, y_eval=torch.as_tensor(y), eval_rows=(s.section > 0))
    cfg = ASIGNConfig(**{**CFG, "patience": 2, "lr": 0.05}, max_epochs=30, min_epochs=1)
    model = make_model(s.n_genes, _dims(s), cfg)
    res = train_model(model, [full], validation=[val], show_progress_bar=False)
    assert res.epochs_run < 30  # stopped early
    assert res.best_epoch == int(np.argmax([r["val_pcc"] for r in res.curve]))
    out = predict_sample(model, s)["pred"]
    sec = s.section.numpy()
    score = per_gene_pcc(out[sec > 0], y[sec > 0], sec[sec > 0])
    assert score == pytest.approx(res.best_score, abs=1e-6)  # the best epoch's weights were restored


def test_sgd_poly_and_errors(data):
    s, _, full = data
    cfg = ASIGNConfig.from_preset("paper_code", hidden_dim=16, attn_heads=4, gat_heads=4, max_epochs=2, lp_iterations=3)
    model = make_model(s.n_genes, _dims(s), cfg)
    res = train_model(model, [full], show_progress_bar=False)
    assert res.curve[-1]["lr"] < 1e-3 and res.n_steps == 2
    empty = full.with_labels(torch.full_like(full.y, float("nan")))
    with pytest.raises(ValueError, match="fewer than 2 labelled"):
        train_model(model, [empty], show_progress_bar=False)
    with pytest.raises(ValueError, match="at least one training sample"):
        train_model(model, [], show_progress_bar=False)


def test_a_validation_set_that_scores_nothing_does_not_stop_training(data, caplog):
    """A validation score that is NaN by construction (one scored spot) never counts towards ``patience``: training
    runs ``max_epochs``, keeps the last weights and says so."""
    import logging

    s, y, full = data
    rows = torch.zeros(s.n_spots, dtype=torch.bool)
    rows[int(torch.nonzero(s.section == 1)[0])] = True
    val = ValidationSet(sample=s, y_eval=torch.as_tensor(y), eval_rows=rows)
    cfg = ASIGNConfig(**{**CFG, "patience": 1}, max_epochs=3, min_epochs=1)
    with caplog.at_level(logging.WARNING, logger="asign"):
        res = train_model(make_model(s.n_genes, _dims(s), cfg), [full], validation=[val], show_progress_bar=False)
    assert res.epochs_run == 3 and res.best_epoch == 2
    assert np.isnan([r["val_pcc"] for r in res.curve]).all()
    assert "scored nothing" in caplog.text


def test_predict_sample_returns_the_model_to_its_device():
    """`predict_sample` moves the model to the requested device for the call and back afterwards (a fitted model is
    kept on the CPU; on a GPU machine prediction runs on CUDA)."""
    from asign._model import ASIGNConfig, make_model, predict_sample
    from asign._model._synthetic import random_sample

    s, _ = random_sample(n_sections=2, spots_per_section=20, n_genes=5, feature_dim=8, seed=0)
    model = make_model(5, {"spot": 8, "region": 8, "global": 8}, ASIGNConfig(hidden_dim=8, seed=0))
    calls = []
    real_to = model.to

    def to(*args, **kwargs):
        calls.append(str(args[0]) if args else str(kwargs.get("device")))
        return real_to(*args, **kwargs)

    model.to = to
    out = predict_sample(model, s, device=torch.device("cpu"), amp=False)["pred"]
    assert out.shape == (s.n_spots, 5)
    assert calls == ["cpu", "cpu"]  # to the device, then home


def test_a_non_finite_loss_stops_training(data):
    """NaN inputs that slip past the checks must not train (and return) a model of NaN weights."""
    s, _, _ = data
    x = s.x_spot.clone()
    x[5] = float("nan")
    bad = s.replace(x_spot=x)
    cfg = ASIGNConfig(**CFG, mask="spot", visible_fraction=0.3, max_epochs=2, steps_per_epoch=2)
    model = make_model(s.n_genes, _dims(s), cfg)
    with pytest.raises(FloatingPointError, match=r"the loss on sample .* became non-finite at epoch 0 \(step 0\)"):
        train_model(model, [bad], show_progress_bar=False)


@pytest.mark.parametrize(
    ("name", "value"),
    [
        ("poly_iters", 0),
        ("poly_iters", -5),
        ("hidden_dim", 0),
        ("hidden_dim", -4),
        ("dropout", 1.5),
        ("dropout", float("nan")),
        ("input_dropout", 1.0),
        ("lr", 0.0),
        ("lr", float("inf")),
        ("weight_decay", -1.0),
        ("momentum", 2.0),
        ("loss_weights", [0, 0, 0, 0]),
        ("loss_weights", [-1, 1, 1, 1]),
        ("loss_weights", [1, float("nan"), 1, 1]),
        ("net_loss_weight", -1.0),
        ("net_loss_weight", float("nan")),
        ("alpha_init", float("nan")),
        ("grad_clip", float("nan")),
        ("grad_clip", -1.0),
        ("memory_limit_gb", float("nan")),
        ("encoder_lr", 0.0),
        ("encoder_lr", float("inf")),
        ("patience", -1),
        ("min_epochs", -3),
        ("seed", -1),
    ],
)
def test_config_refuses_out_of_range_values(name, value):
    """Out-of-range options used to be accepted and then train nothing (lr=0, all-zero loss weights), make the
    learning rate grow (poly_iters < 0) or fail deep in torch / numpy (hidden_dim=0, dropout=nan, seed=-1)."""
    with pytest.raises(ValueError, match=rf"^ASIGNConfig\.{name}="):
        ASIGNConfig(**{name: value})
    with pytest.raises(ValueError, match=rf"^ASIGNConfig\.{name}="):
        ASIGNConfig().replace(**{name: value})


def test_config_range_edges_and_presets_validate():
    """The ends of the ranges that mean something (0: no clipping / automatic budget / no early stopping) and every
    preset stay valid; hidden_dim is checked before the heads divide it."""
    edges = {"dropout": 0.0, "input_dropout": 0.0, "momentum": 0.0, "weight_decay": 0.0, "grad_clip": 0.0}
    edges |= {"memory_limit_gb": 0.0, "patience": 0, "min_epochs": 0, "seed": 0, "poly_iters": 1}
    edges |= {"net_loss_weight": 0.0, "loss_weights": [0, 0, 0, 1], "alpha_init": -3.0}
    ASIGNConfig(**edges)
    for preset in ("default", "paper_code"):
        ASIGNConfig.from_preset(preset)
    with pytest.raises(ValueError, match=r"^ASIGNConfig\.hidden_dim=-4 must be at least 1"):
        ASIGNConfig(hidden_dim=-4)


def test_block_mask_always_leaves_a_spot_hidden(data):
    """mask="block" with a large visible_fraction: a patch used to cover every labelled spot, so the step had no loss
    set and was skipped (0.99: no step at all, an untrained model returned silently)."""
    s, _, _ = data
    gen = torch.Generator().manual_seed(0)
    cfg = ASIGNConfig(**CFG, mask="block", visible_fraction=0.99)
    for _ in range(20):
        vis, loss = _draw_mask(s, cfg, gen)
        assert bool(loss.any()) and not bool((vis & ~s.labelled).any())
        assert bool(((vis | loss) == s.labelled).all())
    cfg = cfg.replace(max_epochs=2, steps_per_epoch=3)
    res = train_model(make_model(s.n_genes, _dims(s), cfg), [s], show_progress_bar=False)
    assert res.n_steps == 6


def test_an_epoch_without_steps_is_an_error(data, monkeypatch):
    """If no step of an epoch has a loss set, training says so, naming the mask options, instead of returning an
    untrained model."""
    from asign._model import _train

    s, _, _ = data

    def nothing_hidden(sample, cfg, gen):
        return sample.labelled.clone(), torch.zeros_like(sample.labelled)

    monkeypatch.setattr(_train, "_draw_mask", nothing_hidden)
    cfg = ASIGNConfig(**CFG, mask="block", visible_fraction=0.9, max_epochs=2)
    with pytest.raises(ValueError, match=r"made no step in epoch 0.*mask='block', visible_fraction=0\.9"):
        train_model(make_model(s.n_genes, _dims(s), cfg), [s], show_progress_bar=False)


def test_patience_zero_runs_every_epoch_and_keeps_the_best(data):
    """As ASIGNConfig documents it: patience=0 turns off the stopping only; with validation all epochs run and the
    best-scoring epoch's weights are restored, without validation the last epoch's are kept."""
    s, y, full = data
    val = ValidationSet(sample=s, y_eval=torch.as_tensor(y), eval_rows=(s.section > 0))
    cfg = ASIGNConfig(**{**CFG, "patience": 0, "lr": 0.05}, max_epochs=8)
    model = make_model(s.n_genes, _dims(s), cfg)
    res = train_model(model, [full], validation=[val], show_progress_bar=False)
    scores = [r["val_pcc"] for r in res.curve]
    assert res.epochs_run == 8 and res.best_epoch == int(np.argmax(scores))
    sec = s.section.numpy()
    score = per_gene_pcc(predict_sample(model, s)["pred"][sec > 0], y[sec > 0], sec[sec > 0])
    assert score == pytest.approx(res.best_score, abs=1e-6)
    res = train_model(make_model(s.n_genes, _dims(s), cfg), [full], show_progress_bar=False)
    assert res.epochs_run == 8 and res.best_epoch == 7
