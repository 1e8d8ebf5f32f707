from __future__ import annotations

import numpy as np
import pytest

import asign


@pytest.fixture(scope="module")
def _aligned():
    from asign.datasets import synthetic_stack

    sdata = synthetic_stack(
        n_sections=3, n_spots=60, n_genes=5, image_size=384, um_per_px=10.0, thickness_um=1.0, seed=5
    )
    table = sdata.tables["table"]
    secs = list(table.uns["asign"]["stack"]["section"])
    n2w = dict(zip(secs, table.uns["asign"]["synthetic"]["native_to_world"], strict=True))
    asign.pp.align_layers(sdata, method="transforms", transforms=n2w)
    return sdata


@pytest.fixture
def aligned(_aligned):
    import copy

    return copy.deepcopy(_aligned)


def _png_stats(path):
    import matplotlib.image as mpimg

    img = mpimg.imread(path)[..., :3]
    return img, float(img.std())


@pytest.mark.parametrize("mode", ["composite", "checkerboard"])
def test_alignment_plot_renders(aligned, tmp_path, mode):
    import matplotlib.pyplot as plt

    out = tmp_path / f"align_{mode}.png"
    fig = asign.pl.alignment(aligned, mode=mode, save=out, show=False)
    assert out.exists() and out.stat().st_size > 5000
    img, sd = _png_stats(out)
    assert sd > 0.1  # not blank
    # both colours of the overlay are present (magenta: R and B high, G low; green: G high, R and B low)
    magenta = (img[..., 0] > 0.5) & (img[..., 2] > 0.5) & (img[..., 1] < 0.4)
    green = (img[..., 1] > 0.5) & (img[..., 0] < 0.4)
    assert magenta.mean() > 0.002 and green.mean() > 0.002
    axes = fig.axes
    assert len(axes) == 4  # 2 pairs x (before, after)
    titles = [a.get_title() for a in axes]
    assert "S1 / S2 before" in titles[0] and "S1 / S2 after" in titles[2] and "Dice" in titles[2]
    plt.close(fig)


def test_after_overlay_is_better_than_before(aligned):
    """After alignment the two sections' images agree: the channels of the 'after' composite correlate."""
    import matplotlib.pyplot as plt

    fig = asign.pl.alignment(aligned, sections=["S2", "S3"], show_spots=False, show=False)
    ax_before, ax_after = fig.axes

    def corr(ax):
        im = np.asarray(ax.get_images()[0].get_array(), dtype=float)
        a, b = im[..., 0].ravel(), im[..., 1].ravel()  # magenta (S2) and green (S3) grey images
        keep = (a > 0.05) | (b > 0.05)
        return float(np.corrcoef(a[keep], b[keep])[0, 1])

    assert corr(ax_after) > 0.6 and corr(ax_after) > corr(ax_before) + 0.3
    plt.close(fig)


def test_alignment_plot_options_and_errors(aligned, small_stack):
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots()
    got = asign.pl.alignment(aligned, sections=["S2", "S3"], before=False, ax=ax, show=False)
    assert got is fig and len(ax.get_images()) == 1 and len(ax.collections) == 2
    with pytest.raises(ValueError, match="panels"):
        asign.pl.alignment(aligned, ax=ax, show=False)
    plt.close(fig)
    with pytest.raises(ValueError, match="mode"):
        asign.pl.alignment(aligned, mode="flicker", show=False)
    with pytest.raises(ValueError, match="at least two"):
        asign.pl.alignment(aligned, sections=["S1"], show=False)
    with pytest.raises(KeyError, match="align_layers"):
        asign.pl.alignment(small_stack, show=False)
    plt.close("all")


def test_quality_only_of_the_alignment_drawn(aligned):
    """A later alignment under another name must not lend its Dice to the panels of an earlier one."""
    import matplotlib.pyplot as plt

    al = aligned.tables["table"].uns["asign"]["alignment"]
    shifted = {
        s: np.array([[1.0, 0.0, 40.0], [0.0, 1.0, 0.0], [0.0, 0.0, 1.0]]) @ T for s, T in al["transforms"].items()
    }
    shifted[al["reference"]] = np.eye(3)
    asign.pp.align_layers(aligned, method="transforms", transforms=shifted, reference=al["reference"], key_added="a2")
    fig = asign.pl.alignment(aligned, key_added="aligned", before=False, show=False)
    assert not any("Dice" in a.get_title() for a in fig.axes)
    plt.close(fig)
    fig = asign.pl.alignment(aligned, key_added="a2", before=False, show=False)
    assert all("Dice" in a.get_title() for a in fig.axes)
    plt.close(fig)


def test_alignment_into_given_axes_keeps_the_figure_title(aligned):
    """With `ax`, the caller's suptitle stays; the colour key is written inside the first panel."""
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots()
    fig.suptitle("MY TITLE")
    asign.pl.alignment(aligned, sections=["S2", "S3"], before=False, show_spots=False, ax=ax, show=False)
    assert fig.get_suptitle() == "MY TITLE"
    assert any("magenta: earlier section" in t.get_text() for t in ax.texts)
    own = asign.pl.alignment(aligned, sections=["S2", "S3"], before=False, show_spots=False, show=False)
    assert own.get_suptitle() == "magenta: earlier section, green: later section"
    plt.close("all")
