from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from asign._constants import Key

matplotlib = pytest.importorskip("matplotlib")
matplotlib.use("agg")


# ---------------------------------------------------------------------------------------------------------------------
# helpers: a known alignment (ground truth of the synthetic stack) and an output table like `asign.tl.impute` writes
# ---------------------------------------------------------------------------------------------------------------------
def align_truth(sdata, *, reference: int = 1) -> dict[str, np.ndarray]:
    """Write the synthetic stack's true alignment following the alignment contract; return T_s per section."""
    from asign.pp._align import set_alignment

    table = sdata.tables[Key.TABLE]
    n2w = np.asarray(table.uns[Key.UNS]["synthetic"]["native_to_world"])
    secs = list(table.uns[Key.UNS][Key.STACK]["section"])
    transforms = {s: np.linalg.inv(n2w[reference]) @ n2w[i] for i, s in enumerate(secs)}
    set_alignment(sdata, transforms, reference=secs[reference])
    return transforms


def add_output_table(sdata, *, known=("S1",), noise: float = 0.3, seed: int = 0):
    """An output table with the layout of `asign.tl.impute`: target (NaN outside known), imputed, known, section."""
    import anndata as ad
    from spatialdata.models import TableModel

    table = sdata.tables[Key.TABLE]
    X = np.log1p(table.X.toarray()).astype(np.float32)
    known_mask = table.obs[Key.SECTION].astype(str).isin(known).to_numpy()
    target = X.copy()
    target[~known_mask] = np.nan
    rng = np.random.default_rng(seed)
    imputed = (X + rng.normal(0.0, noise, X.shape)).astype(np.float32)
    obs = table.obs[[Key.SECTION, Key.REGION, Key.INSTANCE]].copy()
    obs[Key.KNOWN] = known_mask
    out = ad.AnnData(X=imputed.copy(), obs=obs, var=pd.DataFrame(index=table.var_names))
    out.layers[Key.TARGET] = target
    out.layers[Key.IMPUTED] = imputed
    out.uns[Key.UNS] = {"stack": dict(table.uns[Key.UNS][Key.STACK]), "method": "synthetic-test"}
    region = list(table.uns[Key.UNS][Key.STACK]["shapes_key"])
    sdata.tables[Key.OUTPUT_TABLE] = TableModel.parse(
        out, region=region, region_key=Key.REGION, instance_key=Key.INSTANCE
    )
    return sdata.tables[Key.OUTPUT_TABLE]


def read_png(path):
    from matplotlib.image import imread

    img = imread(str(path))
    assert img.ndim == 3
    return img[..., :3]


def assert_not_blank(path, *, min_std: float = 0.05, min_colours: int = 20):
    img = read_png(path)
    assert img.std() > min_std, f"{path} looks blank (pixel std {img.std():.4f})"
    colours = np.unique((img.reshape(-1, 3) * 255).astype(np.uint8), axis=0)
    assert len(colours) >= min_colours, f"{path} has only {len(colours)} colours"
    return img


@pytest.fixture
def aligned_stack(small_stack):
    align_truth(small_stack)
    add_output_table(small_stack)
    return small_stack


@pytest.fixture(autouse=True)
def _close_figures():
    yield
    import matplotlib.pyplot as plt

    plt.close("all")


# ---------------------------------------------------------------------------------------------------------------------
# sections
# ---------------------------------------------------------------------------------------------------------------------
def test_sections_aligned_renders(aligned_stack, tmp_path):
    import asign

    path = tmp_path / "sections.png"
    fig = asign.pl.sections(aligned_stack, gene="gene_003", save=path, show=False)
    assert path.is_file()
    img = assert_not_blank(path)
    # 2 layers x 3 sections + colorbar
    assert len(fig.axes) == 7
    axes = fig.axes[:6]
    # every panel has an image and spot collections; one colour scale for all coloured collections
    norms = set()
    for ax in axes:
        assert len(ax.images) == 1
        coloured = [c for c in ax.collections if c.get_array() is not None]
        for c in coloured:
            norms.add((c.norm.vmin, c.norm.vmax))
    assert len(norms) == 1
    vmin, vmax = norms.pop()
    out = aligned_stack.tables["asign"]
    j = out.var_names.get_loc("gene_003")
    allv = np.concatenate([out.layers["imputed"][:, j], out.layers["target"][:, j]])
    assert vmin == pytest.approx(np.nanmin(allv))
    assert vmax == pytest.approx(np.nanmax(allv))
    # the target row shows NaN spots as hollow circles only for the unknown sections S2, S3
    top = axes[:3]
    assert sum(c.get_array() is not None for c in top[0].collections) == 1
    for ax in top[1:]:
        assert all(c.get_array() is None for c in ax.collections)
    assert img.shape[0] > 200 and img.shape[1] > 400


def test_sections_spots_land_on_aligned_positions(aligned_stack):
    """The spot circles of every panel sit at obsm['spatial_aligned'] (µm) and have the physical diameter."""
    import asign

    fig = asign.pl.sections(aligned_stack, gene="gene_001", layers="imputed", image=False, show=False)
    table = aligned_stack.tables[Key.TABLE]
    stack = table.uns[Key.UNS][Key.STACK]
    sec = table.obs[Key.SECTION].astype(str).to_numpy()
    vals = aligned_stack.tables["asign"][:, "gene_001"].layers["imputed"].ravel()
    for ax, s in zip(fig.axes[:3], stack["section"], strict=True):
        (coll,) = ax.collections
        offsets = np.asarray(coll.get_offsets())
        expected = table.obsm[Key.SPATIAL_ALIGNED][sec == s]
        order = np.argsort(vals[sec == s], kind="stable")
        np.testing.assert_allclose(offsets, expected[order], atol=1e-6)
        np.testing.assert_allclose(np.asarray(coll.get_array()), vals[sec == s][order], rtol=1e-6)
        np.testing.assert_allclose(coll._widths * 2, stack["spot_diameter_um"], rtol=1e-6)  # half-widths stored
    # the shared panels span the whole aligned tissue
    x0, x1 = fig.axes[0].get_xlim()
    allx = table.obsm[Key.SPATIAL_ALIGNED][:, 0]
    assert x0 < allx.min() and x1 > allx.max()


def test_sections_native_and_subset(small_stack, tmp_path):
    """Without an alignment the native frames are used; a subset of sections and vmin/vmax are respected."""
    import asign

    add_output_table(small_stack)
    path = tmp_path / "native.pdf"
    fig = asign.pl.sections(
        small_stack, gene="gene_000", sections=["S3", "S1"], vmin=0.0, vmax=2.0, save=path, show=False
    )
    assert path.is_file() and path.stat().st_size > 1000
    titles = [ax.get_title() for ax in fig.axes[:2]]
    assert titles == ["S3", "S1 (known)"]
    for ax in fig.axes[:4]:
        for c in ax.collections:
            if c.get_array() is not None:
                assert (c.norm.vmin, c.norm.vmax) == (0.0, 2.0)
    png = tmp_path / "native.png"
    fig.savefig(png)
    assert_not_blank(png)


def test_sections_errors(aligned_stack):
    import asign

    with pytest.raises(KeyError, match="not_a_gene"):
        asign.pl.sections(aligned_stack, gene="not_a_gene", show=False)
    with pytest.raises(KeyError, match="Unknown section"):
        asign.pl.sections(aligned_stack, gene="gene_000", sections=["S9"], show=False)
    with pytest.raises(KeyError, match="layers"):
        asign.pl.sections(aligned_stack, gene="gene_000", layers=["nope"], show=False)


def test_sections_empty_selection_refused(aligned_stack):
    import asign

    with pytest.raises(ValueError, match=r"`sections` is empty.*'S1', 'S2', 'S3'"):
        asign.pl.sections(aligned_stack, gene="gene_000", sections=[], show=False)


def test_layer_errors_name_the_table_and_parameter(aligned_stack):
    import asign

    with pytest.raises(KeyError, match=r"not found in table 'asign' .*pass `layers=`"):
        asign.pl.sections(aligned_stack, gene="gene_000", layers=["nope"], show=False)
    with pytest.raises(KeyError, match=r"not found in table 'asign' .*pass `layer=`"):
        asign.pl.scatter_3d(aligned_stack, gene="gene_000", layer="nope", show=False)


def test_unknown_gene_suggestions(aligned_stack):
    """A gene up to case, a near miss and an obs column give messages that say what to do."""
    import asign

    with pytest.raises(KeyError, match=r"did you mean 'gene_003' \(names are case-sensitive\)"):
        asign.pl.sections(aligned_stack, gene="GENE_003", show=False)
    with pytest.raises(KeyError, match=r"close matches: .*'gene_003'"):
        asign.pl.sections(aligned_stack, gene="gene_03", show=False)
    with pytest.raises(KeyError, match="'section' is an obs column; this function plots genes"):
        asign.pl.sections(aligned_stack, gene="section", key="table", layers="X", show=False)


def test_sections_subset_table_warning(aligned_stack, asign_log):
    """An output table subset to some sections: the warning names both causes, and only for the sections drawn."""
    import asign

    out = aligned_stack.tables[Key.OUTPUT_TABLE]
    sub = out[out.obs[Key.SECTION].astype(str) == "S1"].copy()
    sub.obs[Key.REGION] = sub.obs[Key.REGION].astype(str).astype("category")
    sub.uns["spatialdata_attrs"]["region"] = sorted(set(sub.obs[Key.REGION]))
    aligned_stack.tables["sub"] = sub
    asign.pl.sections(aligned_stack, gene="gene_000", key="sub", image=False, show=False)
    assert "missing from table 'sub' (it was subset, or the spots were added after" in asign_log.warnings
    assert "Sections ['S2', 'S3'] are absent altogether" in asign_log.warnings
    assert asign_log.warnings.count("missing from table") == 1  # once, not once per layer
    asign_log.records.clear()
    asign.pl.sections(aligned_stack, gene="gene_000", key="sub", sections="S1", image=False, show=False)
    assert "missing" not in asign_log.warnings


def test_user_colour_limits_are_kept():
    """A given vmin/vmax is never replaced; reversed limits are refused; only automatic limits get a fallback."""
    from asign.pl._utils import shared_norm

    neg = [np.array([-3.0, -1.0, np.nan])]
    assert shared_norm(neg, vmin=0.0) == (0.0, 2.0)  # no value above vmin: vmin kept, the upper limit moves
    assert shared_norm(neg, vmax=-5.0) == (-7.0, -5.0)
    assert shared_norm(neg, vmin=1.0, vmax=4.0) == (1.0, 4.0)  # values outside clip
    assert shared_norm([np.full(3, 2.0)]) == (2.0, 3.0)  # constant values: automatic fallback
    with pytest.raises(ValueError, match="must be below"):
        shared_norm(neg, vmin=5.0, vmax=1.0)
    with pytest.raises(ValueError, match="must be below"):
        shared_norm(neg, vmin=1.0, vmax=1.0)


def test_sections_reversed_limits_refused(aligned_stack):
    import asign

    with pytest.raises(ValueError, match=r"`vmin` \(2.0\) must be below `vmax` \(1.0\)"):
        asign.pl.sections(aligned_stack, gene="gene_000", vmin=2.0, vmax=1.0, image=False, show=False)
    fig = asign.pl.sections(aligned_stack, gene="gene_000", layers="imputed", vmin=100.0, image=False, show=False)
    norms = {(c.norm.vmin, c.norm.vmax) for ax in fig.axes[:3] for c in ax.collections if c.get_array() is not None}
    ((lo, hi),) = norms
    assert lo == 100.0 and hi > lo


def test_docstrings_match_behaviour():
    import asign

    assert "NaN\n    outside the known sections" not in asign.pl.sections.__doc__
    assert "not measured" in asign.pl.sections.__doc__
    assert "white diamond" in asign.pl.metrics.__doc__


def test_sections_errors_unprocessed(small_stack):
    import asign

    with pytest.raises(KeyError, match="tl.impute"):
        asign.pl.sections(small_stack, gene="gene_000", show=False)
    add_output_table(small_stack)
    with pytest.raises(ValueError, match="align_layers"):
        asign.pl.sections(small_stack, gene="gene_000", coordinate_system="aligned", show=False)


def test_sections_from_spot_table(aligned_stack, tmp_path):
    """Raw counts of the spot table can be shown with the same function."""
    import asign

    path = tmp_path / "counts.png"
    fig = asign.pl.sections(aligned_stack, gene="gene_002", key="table", layers="X", image=False, save=path, show=False)
    assert len(fig.axes) == 4
    assert_not_blank(path, min_colours=10)


# ---------------------------------------------------------------------------------------------------------------------
# scatter_3d
# ---------------------------------------------------------------------------------------------------------------------
def test_scatter_3d(aligned_stack, tmp_path):
    import asign

    path = tmp_path / "scatter3d.png"
    fig = asign.pl.scatter_3d(aligned_stack, gene="gene_004", save=path, show=False)
    assert_not_blank(path)
    ax = fig.axes[0]
    assert ax.name == "3d"
    (sc,) = ax.collections
    n = aligned_stack.tables[Key.TABLE].n_obs
    assert len(np.asarray(sc.get_array())) == n
    # default exaggeration: depth drawn at 40% of the lateral extent
    aspect = ax.get_box_aspect()
    xyz = aligned_stack.tables[Key.TABLE].obsm[Key.SPATIAL_3D]
    lateral = max(np.ptp(xyz[:, 0]), np.ptp(xyz[:, 1]))
    assert aspect[2] / max(aspect[0], aspect[1]) == pytest.approx(0.4 * lateral / lateral, rel=0.05)

    fig2 = asign.pl.scatter_3d(
        aligned_stack, gene="gene_004", layer="target", z_scale=1.0, sections=["S1", "S2"], show=False
    )
    ax2 = fig2.axes[0]
    # true proportions: z extent 16 µm vs thousands of µm laterally
    aspect2 = ax2.get_box_aspect()
    assert aspect2[2] / max(aspect2[0], aspect2[1]) < 0.05
    # NaN targets (S2) drawn in grey, S1 coloured
    assert len(ax2.collections) == 2
    coloured = [c for c in ax2.collections if c.get_array() is not None]
    assert len(coloured) == 1 and np.isfinite(np.asarray(coloured[0].get_array())).all()
    n_s1 = int((aligned_stack.tables[Key.TABLE].obs[Key.SECTION] == "S1").sum())
    assert len(np.asarray(coloured[0].get_array())) == n_s1


def test_scatter_3d_uses_current_alignment(aligned_stack, asign_log):
    """A stale copy of obsm['spatial_3d'] in the output table (the stack was aligned again): current positions."""
    import asign

    spots = aligned_stack.tables[Key.TABLE]
    out = aligned_stack.tables[Key.OUTPUT_TABLE]
    current = np.asarray(spots.obsm[Key.SPATIAL_3D], dtype=float)
    out.obsm[Key.SPATIAL_3D] = current + np.array([3000.0, 0.0, 0.0])
    fig = asign.pl.scatter_3d(aligned_stack, gene="gene_004", show=False)
    (sc,) = fig.axes[0].collections
    plotted = np.column_stack(sc._offsets3d)
    np.testing.assert_allclose(np.sort(plotted[:, 0]), np.sort(current[:, 0]))
    assert "aligned again" in asign_log.warnings and "3000.0 µm" in asign_log.warnings


def test_scatter_3d_needs_alignment(small_stack):
    import asign

    add_output_table(small_stack)
    with pytest.raises(KeyError, match="align_layers"):
        asign.pl.scatter_3d(small_stack, gene="gene_000", show=False)


# ---------------------------------------------------------------------------------------------------------------------
# metrics
# ---------------------------------------------------------------------------------------------------------------------
def _metrics_frame(seed: int = 0) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    rows = []
    for method, shift in (("asign", 0.35), ("knn", 0.2), ("mean", 0.0)):
        for s in ("S2", "S3"):
            for g in range(25):
                rows.append(
                    {
                        "method": method,
                        "section": s,
                        "gene": f"gene_{g:03d}",
                        "pcc": shift + rng.normal(0, 0.1),
                        "rmse": 1 - shift,
                    }
                )
    return pd.DataFrame(rows)


def test_metrics_section(tmp_path):
    import asign

    df = _metrics_frame()
    path = tmp_path / "metrics_section.png"
    fig = asign.pl.metrics(df, kind="section", save=path, show=False)
    assert_not_blank(path)
    ax = fig.axes[0]
    assert [t.get_text() for t in ax.get_xticklabels()] == ["S2", "S3"]
    legend = ax.get_legend()
    assert [t.get_text() for t in legend.get_texts()] == ["asign", "knn", "mean"]


def test_metrics_gene_and_long_format(tmp_path):
    import asign

    df = _metrics_frame()
    path = tmp_path / "metrics_gene.png"
    fig = asign.pl.metrics(df, kind="gene", n_top=10, save=path, show=False)
    assert_not_blank(path)
    left, right = fig.axes[:2]
    assert [t.get_text() for t in left.get_xticklabels()] == ["asign", "knn", "mean"]
    # the top genes are sorted by the first method's mean pcc
    per_gene = df[df.method == "asign"].groupby("gene")["pcc"].mean().sort_values(ascending=False)
    assert [t.get_text() for t in right.get_xticklabels()] == list(per_gene.index[:10])

    long = df.melt(id_vars=["method", "section", "gene"], var_name="metric", value_name="value")
    fig2 = asign.pl.metrics(long, kind="section", metric="rmse", show=False)
    assert fig2.axes[0].get_ylabel() == "rmse"
    # one value per section and method -> bars (single-method frame, no method column)
    summary = df[df.method == "asign"].groupby("section", as_index=False)["pcc"].mean()
    path3 = tmp_path / "metrics_bar.png"
    fig3 = asign.pl.metrics(summary, save=path3, show=False)
    assert len(fig3.axes[0].patches) == 2
    assert_not_blank(path3, min_colours=5)
    with pytest.raises(KeyError, match="gene"):
        asign.pl.metrics(summary, kind="gene", show=False)
    with pytest.raises(KeyError, match="metric"):
        asign.pl.metrics(df[["method", "section", "gene"]], show=False)


def test_metrics_sections_string_and_unknown():
    import asign

    df = _metrics_frame()
    fig = asign.pl.metrics(df, sections="S3", show=False)
    assert [t.get_text() for t in fig.axes[0].get_xticklabels()] == ["S3"]
    assert len(fig.axes[0].patches) == 3  # one box per method
    fig = asign.pl.metrics(df, kind="gene", sections="S3", n_top=5, show=False)
    per_gene = df[(df.method == "asign") & (df.section == "S3")].set_index("gene")["pcc"].sort_values(ascending=False)
    assert [t.get_text() for t in fig.axes[1].get_xticklabels()] == list(per_gene.index[:5])
    for kind in ("section", "gene"):
        with pytest.raises(
            ValueError, match=r"Sections \['S9'\] are not in the data frame; its sections are \['S2', 'S3'\]"
        ):
            asign.pl.metrics(df, kind=kind, sections=["S9"], show=False)
    with pytest.raises(ValueError, match="`sections` is empty"):
        asign.pl.metrics(df, sections=[], show=False)


def test_metrics_runs_of_one_method_are_told_apart(asign_log):
    """Two runs of one method (evaluate's `key` differs) are labelled by key, not pooled into one box."""
    import asign

    a = _metrics_frame(seed=0).query("method == 'knn'").assign(method="propagation", key="asign")
    b = _metrics_frame(seed=1).query("method == 'mean'").assign(method="propagation", key="prop_rank5")
    c = _metrics_frame(seed=2).query("method == 'asign'").assign(method="nearest", key="nn")
    df = pd.concat([a, b, c])
    fig = asign.pl.metrics(df, show=False)
    labels = [t.get_text() for t in fig.axes[0].get_legend().get_texts()]
    assert labels == ["propagation (asign)", "propagation (prop_rank5)", "nearest"]
    assert len(fig.axes[0].patches) == 6  # 3 runs x 2 sections
    fig = asign.pl.metrics(df, kind="gene", show=False)
    assert [t.get_text() for t in fig.axes[0].get_xticklabels()] == labels
    assert "pooled" not in asign_log.warnings
    asign.pl.metrics(df, group="method", show=False)  # pooling asked for: said out loud
    assert "pooled under ['propagation']" in asign_log.warnings


def test_metrics_into_given_axes():
    import matplotlib.pyplot as plt

    import asign

    df = _metrics_frame()
    fig, ax = plt.subplots()
    fig.suptitle("MINE")
    n_figs = len(plt.get_fignums())
    got = asign.pl.metrics(df, ax=ax, show=False)
    assert got is fig and len(plt.get_fignums()) == n_figs
    assert len(ax.patches) == 6 and ax.get_title() == "pcc per section"
    assert fig.get_suptitle() == "MINE"
    fig2, axs = plt.subplots(1, 2)
    assert asign.pl.metrics(df, kind="gene", n_top=5, ax=axs, show=False) is fig2
    assert len(axs[1].get_xticklabels()) == 5
    assert asign.pl.metrics(df, kind="gene", n_top=0, ax=axs[0], show=False) is fig2
    with pytest.raises(ValueError, match="a sequence of 2 Axes"):
        asign.pl.metrics(df, kind="gene", ax=ax, show=False)
    with pytest.raises(ValueError, match="one Axes"):
        asign.pl.metrics(df, ax=axs, show=False)


def test_saved_figures_are_released_on_agg(tmp_path):
    """Saving in a loop (non-interactive backend, not shown) does not pile up open figures; returned figures work."""
    import matplotlib.pyplot as plt

    import asign

    plt.close("all")
    for i in range(3):
        fig = asign.pl.metrics(_metrics_frame(seed=i), save=tmp_path / f"m{i}.png", show=None)
    assert plt.get_fignums() == []
    assert len(fig.axes) == 1
    fig.savefig(tmp_path / "again.png")  # the returned figure is still usable
    assert_not_blank(tmp_path / "again.png", min_colours=10)
    kept = asign.pl.metrics(_metrics_frame(), show=False)  # not saved: left open for the caller
    assert plt.get_fignums() == [kept.number]
    own, ax = plt.subplots()  # the caller's figure is never closed
    asign.pl.metrics(_metrics_frame(), ax=ax, save=tmp_path / "own.png", show=False)
    assert own.number in plt.get_fignums()


# ---------------------------------------------------------------------------------------------------------------------
# training curve
# ---------------------------------------------------------------------------------------------------------------------
def test_training_curve_unequal_lengths_and_string_series(asign_log):
    import asign

    fig = asign.pl.training_curve({"epoch": [1, 2], "loss": [1.0, 0.5, 0.3], "val_pcc": [0.1, 0.2]}, show=False)
    assert "'loss' (3)" in asign_log.warnings and "not drawn" in asign_log.warnings
    assert [line.get_label() for line in fig.axes[0].get_lines()] == ["val_pcc"]
    h = {"epoch": [1, 2, 3], "loss_total": [1.0, 0.5, 0.3], "val_pcc": [0.1, 0.2, 0.3]}
    fig = asign.pl.training_curve(h, series="loss_total", show=False)
    assert len(fig.axes) == 1
    assert [line.get_label() for line in fig.axes[0].get_lines()] == ["loss_total"]


def test_training_curve_ensemble_title_and_axes(aligned_stack):
    """An ensemble records member 0's curve: the title says which member; `ax` takes one Axes per panel."""
    import matplotlib.pyplot as plt

    import asign

    e = np.arange(1, 9, dtype=float)
    curve = {"epoch": e, "loss_total": 1.0 / e, "val_pcc": np.tanh(e / 4)}
    training = {"curve": curve, "best_epoch": 6, "n_models": 3, "members": {"seed": [1, 2, 3]}}
    aligned_stack.tables["asign"].uns[Key.UNS]["result"] = {"training": training, "n_models": 3}
    fig = asign.pl.training_curve(aligned_stack, show=False)
    assert fig.get_suptitle() == "training (member 1 of 3)"
    single = asign.pl.training_curve({"curve": curve, "best_epoch": 6, "n_models": 1}, show=False)
    assert single.get_suptitle() == "training"
    legacy = {"curve": curve, "members": {"seed": [1, 2]}}  # no n_models: counted from the members
    assert asign.pl.training_curve(legacy, show=False).get_suptitle() == "training (member 1 of 2)"

    user, axs = plt.subplots(1, 2)
    user.suptitle("MINE")
    assert asign.pl.training_curve(aligned_stack, ax=axs, show=False) is user
    assert user.get_suptitle() == "MINE"
    assert axs[0].get_title() == "training (member 1 of 3): loss" and axs[1].get_title() == "validation"
    assert [line.get_label() for line in axs[0].get_lines()] == ["loss_total"]
    with pytest.raises(ValueError, match="a sequence of 2 Axes"):
        asign.pl.training_curve(aligned_stack, ax=axs[0], show=False)
    asign.pl.training_curve(aligned_stack, series="val_pcc", ax=axs[1], show=False)


def test_training_curve_draws_every_ensemble_member():
    """Records with every member's curve draw one line per member and series, each member's best epoch marked."""
    import asign

    def curve(n, s):
        e = np.arange(1, n + 1, dtype=float)
        return {"epoch": e, "loss_total": s / e, "val_pcc": np.tanh(e / (4 * s))}

    training = {
        "curve": curve(8, 1.0),
        "best_epoch": 6,
        "n_models": 3,
        "members": {"seed": [1, 2, 3], "best_epoch": [6, 9, 4]},
        "member_curves": {"member_1": curve(8, 1.0), "member_2": curve(11, 1.5), "member_3": curve(6, 0.8)},
    }
    fig = asign.pl.training_curve(training, show=False)
    assert fig.get_suptitle() == "training (3 members)"
    loss_ax, val_ax = fig.axes[:2]
    lines = [ln for ln in loss_ax.get_lines() if len(ln.get_xdata()) > 2]
    assert sorted(len(ln.get_xdata()) for ln in lines) == [6, 8, 11]
    best = sorted(ln.get_xdata()[0] for ln in val_ax.get_lines() if ln.get_linestyle() == "--")
    assert best == [4, 6, 9]


def test_training_curve_from_table(aligned_stack, tmp_path):
    import asign

    epochs = np.arange(1, 41)
    history = {
        "epoch": epochs,
        "train_loss": 2.0 * np.exp(-epochs / 10) + 0.1,
        "val_loss": 2.2 * np.exp(-epochs / 12) + 0.15,
        "val_pcc": 0.4 * (1 - np.exp(-epochs / 8)),
    }
    aligned_stack.tables["asign"].uns[Key.UNS]["training"] = history
    path = tmp_path / "training.png"
    fig = asign.pl.training_curve(aligned_stack, save=path, show=False)
    assert_not_blank(path, min_colours=10)
    loss_ax, val_ax = fig.axes[:2]
    assert sorted(line.get_label() for line in loss_ax.get_lines()) == ["train_loss", "val_loss"]
    assert [line.get_label() for line in val_ax.get_lines()] == ["val_pcc"]
    np.testing.assert_allclose(val_ax.get_lines()[0].get_ydata(), history["val_pcc"])


def test_training_curve_folds_and_records(tmp_path):
    import asign

    records = [{"epoch": e, "loss": 1.0 / e, "pcc": 0.05 * e} for e in range(1, 11)]
    fig = asign.pl.training_curve({"fold0": records, "fold1": records[:6]}, show=False, save=tmp_path / "folds.png")
    loss_ax = fig.axes[0]
    assert len(loss_ax.get_lines()) == 2  # one line per fold
    assert_not_blank(tmp_path / "folds.png", min_colours=10)
    with pytest.raises(KeyError, match="training history"):
        import anndata as ad

        asign.pl.training_curve(ad.AnnData(np.zeros((2, 2))), show=False)


def test_finish_show_none_is_silent_on_agg(monkeypatch, aligned_stack):
    import matplotlib.pyplot as plt

    import asign
    from asign.pl._utils import is_interactive_backend

    assert not is_interactive_backend()
    called = []
    monkeypatch.setattr(plt, "show", lambda *a, **k: called.append(1))
    asign.pl.sections(aligned_stack, gene="gene_000", image=False, show=None)
    assert called == []
    asign.pl.sections(aligned_stack, gene="gene_000", image=False, show=True)
    assert called == [1]


def test_training_curve_summary_in_result(aligned_stack, tmp_path):
    """The model's training summary ({'curve': {...}, 'best_epoch': ...}) nested under uns['asign']['result']."""
    import asign

    e = np.arange(12, dtype=float)
    curve = {"epoch": e, "loss_total": 1.0 / (e + 1), "loss_mse": 0.8 / (e + 1), "lr": np.full(12, 1e-4)}
    curve["val_pcc"] = np.tanh(e / 5)
    aligned_stack.tables["asign"].uns[Key.UNS]["result"] = {"training": {"curve": curve, "best_epoch": 9}}
    fig = asign.pl.training_curve(aligned_stack, save=tmp_path / "summary.png", show=False)
    loss_ax, val_ax = fig.axes[:2]
    labels = [line.get_label() for line in loss_ax.get_lines()]
    assert labels == ["loss_total", "loss_mse"]  # lr hidden unless asked for
    assert any(np.allclose(line.get_xdata(), 9.0) for line in val_ax.get_lines() if line.get_label().startswith("_"))
    # a fitted model object carries the same record in `.training`
    from types import SimpleNamespace

    fig_fit = asign.pl.training_curve(SimpleNamespace(training={"curve": curve, "best_epoch": 9}), show=False)
    assert [line.get_label() for line in fig_fit.axes[0].get_lines()] == ["loss_total", "loss_mse"]
    fig2 = asign.pl.training_curve(aligned_stack, series=["lr"], show=False)
    assert [line.get_label() for line in fig2.axes[0].get_lines() if not line.get_label().startswith("_")] == ["lr"]


def test_pipeline_outputs(small_stack, tmp_path):
    """The real outputs of `asign.tl.impute` and `asign.tl.evaluate` plot without adaptation."""
    import asign
    from asign.tl._evaluate import evaluate
    from asign.tl._impute import impute

    align_truth(small_stack)
    for method in ("mean", "nearest"):
        impute(small_stack, known="S1", method=method, key_added=f"asign_{method}", n_genes=10, show_progress_bar=False)
    df = pd.concat([evaluate(small_stack, key=f"asign_{m}") for m in ("mean", "nearest")])
    gene = small_stack.tables["asign_nearest"].var_names[0]
    fig = asign.pl.sections(small_stack, gene=gene, key="asign_nearest", save=tmp_path / "s.png", show=False)
    assert_not_blank(tmp_path / "s.png")
    # measured layer: every measured spot has a value, so no hollow circles
    for ax in fig.axes[:6]:
        assert all(c.get_array() is not None for c in ax.collections)
    asign.pl.scatter_3d(small_stack, gene=gene, key="asign_nearest", save=tmp_path / "3d.png", show=False)
    assert_not_blank(tmp_path / "3d.png")
    fig = asign.pl.metrics(df, kind="section", save=tmp_path / "m.png", show=False)
    assert_not_blank(tmp_path / "m.png", min_colours=10)
    ax = fig.axes[0]
    assert ax.get_ylabel() == "pcc_gene"
    assert [t.get_text() for t in ax.get_legend().get_texts()] == ["mean", "nearest"]
    fig = asign.pl.metrics(df, kind="gene", save=tmp_path / "g.png", show=False)
    assert_not_blank(tmp_path / "g.png", min_colours=10)
    # only level == 'gene' rows: 10 genes
    assert len(fig.axes[1].get_xticklabels()) == 10


def test_a_table_computed_for_other_spots_is_refused(aligned_stack):
    """Spots re-laid under the same names (make_spots names virtual spots <section>_v<i> on every lattice): the old
    predictions would be drawn at the wrong places."""
    import asign

    out = aligned_stack.tables[Key.OUTPUT_TABLE]
    spots = aligned_stack.tables[Key.TABLE]
    out.obsm[Key.SPATIAL] = np.asarray(spots.obsm[Key.SPATIAL], dtype=float).copy()
    asign.pl.sections(aligned_stack, gene="gene_000", sections=["S2"], show=False)  # same positions: fine
    moved = out.obs[Key.SECTION].astype(str).to_numpy() == "S2"
    out.obsm[Key.SPATIAL][moved] += 50.0
    with pytest.raises(ValueError, match=r"computed for other spots: \d+ of its spots \(sections \['S2'\]\)"):
        asign.pl.sections(aligned_stack, gene="gene_000", sections=["S2"], show=False)
    with pytest.raises(ValueError, match="rerun `asign.tl.impute`"):
        asign.pl.scatter_3d(aligned_stack, gene="gene_000", show=False)


# ---------------------------------------------------------------------------------------------------------------------
# a table parsed with its own instance key
# ---------------------------------------------------------------------------------------------------------------------
def _reparse(table, *, instance_key: str):
    """``table`` parsed again with ``obs['spot_id']`` renamed to ``instance_key``."""
    from spatialdata.models import TableModel

    a = table.copy()
    region = a.uns["spatialdata_attrs"]["region"]
    del a.uns["spatialdata_attrs"]
    a.obs = a.obs.rename(columns={Key.INSTANCE: instance_key})
    return TableModel.parse(a, region=region, region_key=Key.REGION, instance_key=instance_key)


def test_sections_uses_the_tables_own_instance_key(aligned_stack):
    """A stack whose table was parsed with instance_key='spot' passes validate_stack, but pl.sections raised a bare
    KeyError 'spot_id'; the spots must land where they do with the default key."""
    import asign

    ref = asign.pl.sections(aligned_stack, gene="gene_001", layers="imputed", image=False, show=False)
    ref_offsets = [np.asarray(ax.collections[0].get_offsets()) for ax in ref.axes[:3]]
    for k in (Key.TABLE, Key.OUTPUT_TABLE):
        aligned_stack.tables[k] = _reparse(aligned_stack.tables[k], instance_key="spot")
    asign.io.validate_stack(aligned_stack)
    fig = asign.pl.sections(aligned_stack, gene="gene_001", layers="imputed", image=False, show=False)
    for ax, expected in zip(fig.axes[:3], ref_offsets, strict=True):
        np.testing.assert_allclose(np.asarray(ax.collections[0].get_offsets()), expected)
    asign.pl.sections(aligned_stack, gene="gene_001", coordinate_system="native", show=False)


def test_spot_ids_reads_the_tables_instance_key(small_stack):
    """The napari viewer colours spots by the ids of `spot_ids`, which read the table's own instance key."""
    from asign.pl._utils import spot_ids

    table = small_stack.tables[Key.TABLE]
    mask = (table.obs[Key.SECTION].astype(str) == "S2").to_numpy()
    want = table.obs.loc[mask, Key.INSTANCE].to_numpy()
    np.testing.assert_array_equal(spot_ids(table, mask), want)
    other = _reparse(table, instance_key="spot")
    other.obs[Key.INSTANCE] = -1  # a stray column of the default name is not read
    np.testing.assert_array_equal(spot_ids(other, mask), want)
