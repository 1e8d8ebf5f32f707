"""Per-view features (``extract_features(tta=..., keep_views=True)``) and train-time view augmentation."""

from __future__ import annotations

import copy

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("torch_geometric")

import asign  # noqa: E402
from asign._encoders import get_encoder  # noqa: E402
from asign._model import ASIGNConfig, make_model, predict_sample, train_model  # noqa: E402
from asign._model._data import draw_views, has_views, n_views, select_view  # noqa: E402
from asign._model._sampling import NeighbourSampler  # noqa: E402
from asign._model._synthetic import random_sample, with_random_views  # noqa: E402

SCALES = {"spot": 32, "region": 128, "global": 256}
TINY = {"hidden_dim": 16, "attn_heads": 4, "gat_heads": 4, "max_epochs": 3, "steps_per_epoch": 2, "n_models": 1}
VIEWS_KEY = "asign_features_spot_views"


def _net():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Conv2d(3, 6, 3, stride=2), torch.nn.ReLU())


def test_encoder_keeps_views_in_tta_order():
    from asign.pp._stain import tta_views_torch

    enc = get_encoder(_net(), input_size=None, dim=6).to("cpu", channels_last=False)
    x = torch.randint(0, 256, (3, 3, 16, 16), dtype=torch.uint8)
    with torch.inference_mode():
        v = enc(x, tta="dihedral", keep_views=True, channels_last=False)
        assert v.shape == (3, 8, 6)
        torch.testing.assert_close(v.mean(dim=1), enc(x, tta="dihedral", channels_last=False), atol=1e-5, rtol=0)
        torch.testing.assert_close(v[:, 0], enc(x, channels_last=False))  # view 0 is the patch itself
        # view k is the encoder's output on the k-th transform of tta_views_torch
        rot = tta_views_torch(x.float(), "dihedral")[3].round().to(torch.uint8)
        torch.testing.assert_close(v[:, 3], enc(rot, channels_last=False), atol=1e-5, rtol=0)


def _quadrant_encoder():
    """A numpy encoder that is not flip invariant: mean colour of the patch's top-left quadrant."""
    from asign._encoders import Encoder

    def fn(batch):
        h = batch.shape[1] // 2
        return batch[:, :h, :h].reshape(len(batch), -1, 3).mean(axis=1)

    return Encoder(name="quadrant", dim=3, weights="none", fn=fn, input_size=None)


def test_extract_features_keep_views(small_stack):
    kw = {"encoder": _quadrant_encoder(), "scales": SCALES, "input_size": None, "show_progress_bar": False}
    with pytest.raises(ValueError, match="keep_views=True.*tta='flips' or 'dihedral'"):
        asign.pp.extract_features(small_stack, keep_views=True, **kw)
    asign.pp.extract_features(small_stack, tta="flips", keep_views=True, **kw)
    t = small_stack.tables["table"]
    v, f = np.asarray(t.obsm[VIEWS_KEY]), np.asarray(t.obsm["asign_features_spot"])
    assert v.shape == (t.n_obs, 4, f.shape[1]) and v.dtype == np.float32
    np.testing.assert_allclose(v.mean(axis=1), f, rtol=1e-5, atol=1e-5)
    assert not np.allclose(v[:, 0], v[:, 1])  # the views differ (the encoder is not flip invariant)
    for name in ("asign_regions", "asign_globals"):
        tiles = small_stack.tables[name]
        tv = np.asarray(tiles.obsm["features_views"])
        assert tv.shape == (tiles.n_obs, 4, f.shape[1])
        np.testing.assert_allclose(tv.mean(axis=1), tiles.obsm["features"], rtol=1e-5, atol=1e-5)
    assert t.uns["asign_features"]["keep_views"] is True
    # the mean features equal those of a run without keep_views
    plain = asign.pp.extract_features(small_stack, tta="flips", inplace=False, **kw)
    np.testing.assert_allclose(plain.features_spot, f, rtol=1e-5, atol=1e-5)
    # a later run without views removes the stale spot views (the tile tables are rewritten)
    asign.pp.extract_features(small_stack, **kw)
    assert VIEWS_KEY not in t.obsm and "features_views" not in small_stack.tables["asign_regions"].obsm


def _viewed_sample(n_views=4, seed=0):
    s, _ = random_sample(n_sections=2, spots_per_section=30, n_genes=5, feature_dim=8, seed=seed)
    return with_random_views(s, n_views=n_views, seed=seed)


def test_sample_views_checked_drawn_and_sliced():
    s = _viewed_sample()
    assert has_views(s)
    with pytest.raises(ValueError, match=r"x_region_views must have shape \(\d+, n_views, 8\)"):
        s.replace(x_region_views=s.x_region_views[:, :, :3])
    plain = s.replace(x_spot_views=None, x_region_views=None, x_global_views=None)
    with pytest.raises(ValueError, match="x_spot_views must have shape"):
        plain.replace(x_spot_views=torch.zeros(3, 2, 8))
    # the views stay on the CPU and a draw picks one view per row, reproducibly
    assert s.to("cpu", torch.float64).x_spot_views.dtype == torch.float32
    a = draw_views(s, torch.Generator().manual_seed(5))
    b = draw_views(s, torch.Generator().manual_seed(5))
    assert not has_views(a) and torch.equal(a.x_spot, b.x_spot) and torch.equal(a.x_global, b.x_global)
    for name, base in (("x_spot_views", "x_spot"), ("x_region_views", "x_region"), ("x_global_views", "x_global")):
        views, got = getattr(s, name), getattr(a, base)
        hit = (views == got.unsqueeze(1)).all(dim=2)
        assert bool((hit.sum(dim=1) == 1).all())  # every row is exactly one of its views
        assert hit.float().argmax(dim=1).unique().numel() > 1  # and the drawn view varies between rows
    # subgraphs carry the views of their own nodes and tiles
    sampler = NeighbourSampler(s, hops=1, tile_hops=1)
    sub = sampler.subgraph(torch.tensor([0, 5, 40]))
    assert torch.equal(sub.sample.x_spot_views, s.x_spot_views[sub.nodes])
    assert torch.equal(sub.sample.x_region_views, s.x_region_views[sub.regions])
    assert torch.equal(sub.sample.x_global_views, s.x_global_views[sub.globals_])


def test_train_model_view_augmentation_seeded():
    s = _viewed_sample()
    dims = {"spot": 8, "region": 8, "global": 8}

    def run(sample, **kw):
        cfg = ASIGNConfig(**{k: v for k, v in TINY.items() if k != "n_models"}, patience=0, **kw)
        model = make_model(sample.n_genes, dims, cfg)
        train_model(model, [sample], show_progress_bar=False)
        return torch.cat([p.detach().flatten() for p in model.parameters()])

    a, b = run(s), run(s)
    assert torch.equal(a, b)  # the draws are seeded
    plain = s.replace(x_spot_views=None, x_region_views=None, x_global_views=None)
    assert torch.equal(run(s, view_augment=False), run(plain))  # off: the views are not read
    assert not torch.equal(a, run(plain))
    # subgraph training draws views on every subgraph
    sub = run(s, subgraph="always", batch_size=16)
    assert torch.isfinite(sub).all()
    # the view-consistency term: seeded, recorded, and it changes the training
    c1, c2 = run(s, view_consistency=1.0), run(s, view_consistency=1.0)
    assert torch.equal(c1, c2) and not torch.equal(c1, a)
    with pytest.raises(ValueError, match="view_consistency"):
        ASIGNConfig(view_consistency=-1.0)


def test_predict_sample_averages_outputs_over_views():
    s = _viewed_sample()
    s = s.replace(x_global_views=s.x_global_views[:, :2])  # a level with fewer views wraps around
    v = n_views(s)
    assert v == s.x_spot_views.shape[1] > 2
    one = select_view(s, 3)
    assert not has_views(one)
    assert torch.equal(one.x_spot, s.x_spot_views[:, 3]) and torch.equal(one.x_region, s.x_region_views[:, 3])
    assert torch.equal(one.x_global, s.x_global_views[:, 1])
    cfg = ASIGNConfig(**{k: v for k, v in TINY.items() if k != "n_models"}, patience=0)
    model = make_model(s.n_genes, {"spot": 8, "region": 8, "global": 8}, cfg)
    train_model(model, [s], show_progress_bar=False)
    mean = predict_sample(model, s, amp=False)
    avg = predict_sample(model, s, amp=False, views=True)
    model.eval()
    with torch.no_grad():
        ref = torch.stack([model(select_view(s, k), s.y)["pred"] for k in range(v)]).mean(dim=0)
        plain = model(s, s.y)["pred"]
    np.testing.assert_allclose(avg["pred"], ref.numpy(), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(mean["pred"], plain.numpy(), rtol=1e-6, atol=1e-6)
    assert not np.allclose(avg["pred"], mean["pred"])
    assert set(avg) == set(mean)
    # without views the option is the plain prediction
    bare = s.replace(x_spot_views=None, x_region_views=None, x_global_views=None)
    np.testing.assert_array_equal(predict_sample(model, bare, amp=False, views=True)["pred"], mean["pred"])


def test_view_consistency_reads_no_label():
    """The consistency term is computed on rows whose labels the step hides; changing those labels changes nothing."""
    from asign._model._train import _add_view_consistency

    s = _viewed_sample()
    cfg = ASIGNConfig(**{k: v for k, v in TINY.items() if k != "n_models"}, view_consistency=1.0)
    model = make_model(s.n_genes, {"spot": 8, "region": 8, "global": 8}, cfg)
    model.eval()  # no dropout: the two draws alone differ
    visible = torch.zeros(s.n_spots, dtype=torch.bool)
    visible[:10] = True
    y_step = torch.where(visible.unsqueeze(1), s.y, torch.full_like(s.y, float("nan")))
    terms = []
    for poison in (False, True):
        sample = s.replace(y=torch.where(visible.unsqueeze(1), s.y, torch.full_like(s.y, 99.0))) if poison else s
        g = torch.Generator().manual_seed(0)
        step = draw_views(sample, g)
        out = model(step, y_step)
        loss, parts = _add_view_consistency(model, sample, step, y_step, out, torch.zeros(()), {"total": 0.0}, g)
        terms.append(parts["view_consistency"])
    assert terms[0] == terms[1] and terms[0] > 0


def test_impute_with_views(small_stack, prepare_for_asign):
    sd = prepare_for_asign(small_stack)
    asign.pp.extract_features(
        sd, encoder=_quadrant_encoder(), scales=SCALES, tta="flips", keep_views=True, show_progress_bar=False
    )
    asign.pp.neighbors_3d(sd, similarity_key="asign_features_spot")  # the graph's similarity read other features
    kw = {"known": "S1", "method": "asign", "n_genes": 10, "inplace": False, "show_progress_bar": False, "seed": 1}
    aug = asign.tl.impute(sd, method_kwargs={**TINY, "predict_views": False}, **kw)
    again = asign.tl.impute(sd, method_kwargs={**TINY, "predict_views": False}, **kw)
    off = asign.tl.impute(sd, method_kwargs={**TINY, "view_augment": False, "predict_views": False}, **kw)
    np.testing.assert_array_equal(aug.layers["imputed"], again.layers["imputed"])
    assert np.isfinite(aug.layers["imputed"]).all()
    assert not np.allclose(aug.layers["imputed"], off.layers["imputed"])
    assert aug.uns["asign"]["result"]["config"]["view_augment"] is True
    assert aug.uns["asign"]["result"]["training"]["view_augmented"] is True
    assert off.uns["asign"]["result"]["training"]["view_augmented"] is False
    # prediction averaged over the views: the same training, another prediction
    pv = asign.tl.impute(sd, method_kwargs=TINY, **kw)  # predict_views is on by default
    assert pv.uns["asign"]["result"]["config"]["predict_views"] is True
    assert pv.uns["asign"]["result"]["predicted_over_views"] == 4  # flips: 4 views
    assert aug.uns["asign"]["result"]["predicted_over_views"] == 0
    curve_pv, curve_aug = (o.uns["asign"]["result"]["training"]["curve"] for o in (pv, aug))
    assert set(curve_pv) == set(curve_aug) and "loss_total" in curve_pv
    for name in curve_aug:  # the training curve is unchanged
        np.testing.assert_array_equal(curve_pv[name], curve_aug[name])
    assert np.isfinite(pv.layers["imputed"]).all()
    assert not np.allclose(pv.layers["imputed"], aug.layers["imputed"])
    # without stored views the option changes nothing
    stripped = copy.deepcopy(sd)
    del stripped.tables["table"].obsm[VIEWS_KEY]
    for name in ("asign_regions", "asign_globals"):
        del stripped.tables[name].obsm["features_views"]
    plain = asign.tl.impute(stripped, method_kwargs=TINY, **kw)
    np.testing.assert_array_equal(plain.layers["imputed"], off.layers["imputed"])
    assert plain.uns["asign"]["result"]["predicted_over_views"] == 0
    np.testing.assert_array_equal(
        asign.tl.impute(stripped, method_kwargs={**TINY, "predict_views": False}, **kw).layers["imputed"],
        off.layers["imputed"],
    )


def test_mixed_samples_train_on_means_with_a_warning(caplog):
    import logging

    s = _viewed_sample()
    plain, _ = random_sample(n_sections=2, spots_per_section=30, n_genes=5, feature_dim=8, seed=1)
    cfg = ASIGNConfig(**{k: v for k, v in TINY.items() if k != "n_models"}, patience=0)
    model = make_model(s.n_genes, {"spot": 8, "region": 8, "global": 8}, cfg)
    with caplog.at_level(logging.WARNING, logger="asign"):
        res = train_model(model, [s, plain], show_progress_bar=False)
    assert not res.view_augmented
    assert "carry per-view features and some do not" in caplog.text
