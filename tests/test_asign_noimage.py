"""``impute(method="asign", method_kwargs={"feature_key": None})``: the model without image features (label input)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

pytest.importorskip("torch_geometric")

import asign
from asign._model import ASIGNConfig, make_model, train_model
from asign._model._synthetic import random_sample
from asign._model._train import _draw_mask

TINY = {"hidden_dim": 16, "attn_heads": 4, "gat_heads": 4, "max_epochs": 3, "steps_per_epoch": 2, "n_models": 1}


def _impute(sd, **kw):
    mk = {"feature_key": None, **TINY, **kw.pop("method_kwargs", {})}
    args = {"known": "S1", "method": "asign", "n_genes": 12, "show_progress_bar": False, "method_kwargs": mk}
    args.update(kw)
    return asign.tl.impute(sd, **args)


def test_noimage_runs_and_writes_layer(small_stack, prepare_for_asign):
    sd = prepare_for_asign(small_stack, features=False)
    assert not any(k.startswith("asign_features") for k in sd.tables["table"].obsm)  # no image features anywhere
    _impute(sd, seed=0)
    out = sd.tables["asign"]
    assert {"target", "imputed", "network", "propagation"} <= set(out.layers)
    imp, net = out.layers["imputed"], out.layers["network"]
    assert np.isfinite(imp).all() and np.isfinite(net).all()
    res = out.uns["asign"]["result"]
    assert res["config"]["label_input"] is True and res["config"]["levels"] == "spot"
    assert res["options"]["feature_key"] == "None"
    # the transductive blend weight of the non-image mode stays 0.5 (the image model's is 0.25)
    assert res["nearest_blend"] == 0.5 and res["options"]["nearest_blend"] == 0.5
    # the network is not a no-op: its prediction varies within every unknown section
    sec = out.obs["section"].astype(str).to_numpy()
    for s in ("S2", "S3"):
        assert net[sec == s].std(axis=0).max() > 1e-4
    ev = asign.tl.evaluate(out, per="overall").iloc[0]
    assert np.isfinite(ev["pcc_gene"]) and ev["n_spots"] == int((sec != "S1").sum())


def test_noimage_option_errors(small_stack, prepare_for_asign):
    sd = prepare_for_asign(small_stack, features=False)
    with pytest.raises(ValueError, match="levels"):
        _impute(sd, inplace=False, method_kwargs={"levels": "spot_region_global"})
    with pytest.raises(ValueError, match="label_input"):
        _impute(sd, inplace=False, method_kwargs={"label_input": False})


def test_noimage_same_seed_same_prediction(small_stack, prepare_for_asign):
    """Bit-identical with two CPU threads too (where scatter reductions would otherwise vary in the last bits)."""
    import torch

    sd = prepare_for_asign(small_stack, features=False)
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        a = _impute(sd, seed=5, inplace=False)
        b = _impute(sd, seed=5, inplace=False, genes=list(a.var_names))
        c = _impute(sd, seed=6, inplace=False, genes=list(a.var_names))
    finally:
        torch.set_num_threads(threads)
    assert not torch.are_deterministic_algorithms_enabled()  # the user's setting is restored
    np.testing.assert_array_equal(a.layers["imputed"], b.layers["imputed"])
    np.testing.assert_array_equal(a.layers["network"], b.layers["network"])
    assert not np.array_equal(a.layers["network"], c.layers["network"])


def test_noimage_poisoned_unknown_counts_change_nothing(small_stack, prepare_for_asign):
    import scipy.sparse as sp

    sd = prepare_for_asign(small_stack, features=False)
    a = _impute(sd, seed=1, inplace=False)
    t = sd.tables["table"]
    unknown = (t.obs["section"] != "S1").to_numpy()
    x = t.X.toarray()
    x[unknown] = 1e7
    t.X = sp.csr_matrix(x)
    b = _impute(sd, seed=1, inplace=False, genes=list(a.var_names))
    np.testing.assert_array_equal(a.layers["imputed"], b.layers["imputed"])


def _spot_sample(seed=0, known_sections=None):
    s, y_full = random_sample(
        n_sections=3, spots_per_section=50, n_genes=10, feature_dim=8, tiles=False, seed=seed,
        known_sections=known_sections,
    )  # fmt: skip
    return s.with_labels(s.y), y_full


def test_label_features_read_visible_rows_only():
    s, _ = _spot_sample()
    model = make_model(10, {"spot": 8}, ASIGNConfig(hidden_dim=16, attn_heads=4, levels="spot", label_input=True))
    sec = s.section
    y_in = torch.where((sec == 0).unsqueeze(1), s.y, torch.full_like(s.y, float("nan")))
    f = model.label_features(s, y_in)
    assert f.shape == (s.n_spots, model.n_label_inputs) and torch.isfinite(f).all()
    # changing the sample's own labels (hidden rows included) changes nothing: only y_visible is read
    poisoned = s.with_labels(torch.where((sec == 0).unsqueeze(1), s.y, torch.full_like(s.y, 1e6)))
    torch.testing.assert_close(model.label_features(poisoned, y_in), f, rtol=0, atol=0)
    # ... but the visible labels do reach the input of the other sections (cross-layer propagation)
    y_shift = y_in.clone()
    y_shift[sec == 0] = y_shift[sec == 0].flip(0)
    f2 = model.label_features(s, y_shift)
    assert (f2[sec == 1, :10] - f[sec == 1, :10]).abs().max() > 1e-3
    # reach is high next to visible spots and decays away from them
    reach = f[:, 10]
    assert 1.0 >= reach[sec == 0].mean() > reach[sec == 1].mean() > 0
    # no visible spot: all-zero label part, still finite
    g = model.label_features(s, None)
    assert torch.isfinite(g).all() and float(g.abs().max()) == 0.0


def test_hidden_labels_never_reach_the_training_input():
    """The input of a training step (captured at the spot MLP) is identical when the hidden rows' labels change."""
    s, _ = _spot_sample(seed=2)
    cfg = ASIGNConfig(
        hidden_dim=16, attn_heads=4, levels="spot", label_input=True, mask="section", max_epochs=1, patience=0, seed=3
    )
    visible, loss_rows = _draw_mask(s, cfg, torch.Generator().manual_seed(cfg.seed + 1))  # train_model's first draw
    assert bool(loss_rows.any()) and bool(visible.any())

    def first_input(sample):
        model = make_model(10, {"spot": 8}, cfg)
        seen = []
        hook = model.mlp["spot"].register_forward_pre_hook(lambda _m, args: seen.append(args[0].detach().clone()))
        train_model(model, [sample], show_progress_bar=False)
        hook.remove()
        return seen[0]

    a = first_input(s)
    y_poison = torch.where(loss_rows.unsqueeze(1), torch.full_like(s.y, -50.0), s.y)
    b = first_input(s.with_labels(y_poison))
    torch.testing.assert_close(a, b, rtol=0, atol=0)
    # the visible rows do matter
    y_vis = torch.where(visible.unsqueeze(1), s.y + 1.0, s.y)
    c = first_input(s.with_labels(y_vis))
    assert not torch.equal(a, c)


def test_label_input_on_the_image_model():
    """``label_input=True`` also works with image features and three levels (off by default)."""
    assert ASIGNConfig().label_input is False
    s, _ = _spot_sample()
    s3, _ = random_sample(n_sections=3, spots_per_section=50, n_genes=10, feature_dim=8, tiles=True, seed=0)
    dims = {"spot": 8, "region": 8, "global": 8}
    model = make_model(10, dims, ASIGNConfig(hidden_dim=16, attn_heads=4, label_input=True, seed=0))
    assert model.mlp["spot"].net[1].in_features == 8 + model.n_label_inputs
    y_in = torch.where((s3.section == 0).unsqueeze(1), s3.y, torch.full_like(s3.y, float("nan")))
    out = model.eval()(s3, y_in)
    assert torch.isfinite(out["pred"]).all() and out["region"].shape[1] == 10


def test_noimage_inductive_cross_validate(small_stack, prepare_for_asign):
    """Patient-level folds: train on another stack without images, predict the held-out one from its section 1."""
    other = prepare_for_asign(
        asign.datasets.synthetic_stack(n_sections=3, n_spots=60, n_genes=20, image_size=512, um_per_px=8.0, seed=1),
        features=False,
    )
    samples = {"P0": prepare_for_asign(small_stack, features=False), "P1": other}
    kw = {"feature_key": None, **TINY}
    df = asign.tl.cross_validate(
        samples, folds=[["P0"]], method="asign", method_kwargs=kw, n_genes=12, per="section", key_added="cv",
        show_progress_bar=False,
    )  # fmt: skip
    summ = df[df.level == "summary"].set_index("statistic")
    assert np.isfinite(summ.loc["mean", "pcc_gene"])
    res = samples["P0"].tables["cv"].uns["asign"]["result"]
    assert res["mode"] == "inductive" and res["train_samples"] == ["P1"]
    assert res["config"]["label_input"] is True and res["config"]["mask"] == "section"
