"""Before / after overlays of consecutive sections, to judge an alignment at a glance."""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any, Literal

import numpy as np

from asign._constants import Key
from asign._docs import inject_docs
from asign._stack import StackInfo, get_table

from ._utils import finish, image_level

if TYPE_CHECKING:
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure
    from spatialdata import SpatialData

# moving section in magenta, fixed in green: overlapping tissue is white
_COLOURS = (np.array([1.0, 0.0, 1.0]), np.array([0.0, 1.0, 0.0]))
_SPOT_COLOURS = ("#ff4dff", "#4dff4d")


def _affine(element: Any, coordinate_system: str) -> np.ndarray:
    from spatialdata.transformations import get_transformation

    t = get_transformation(element, to_coordinate_system=coordinate_system)
    return np.asarray(t.to_affine_matrix(input_axes=("x", "y"), output_axes=("x", "y")), dtype=float)


def _has_cs(element: Any, coordinate_system: str) -> bool:
    from spatialdata.transformations import get_transformation

    return coordinate_system in get_transformation(element, get_all=True)


class _Layer:
    """One section ready to draw: a small grey image, maps into the panel frame, spot centres and radii."""

    def __init__(self, sdata: SpatialData, stack: StackInfo, section: str, *, max_px: int):
        from asign._registration import tissue_grey

        self.section = section
        self.cs = stack.coordinate_system(section)
        skey = stack.shapes_key(section)
        self.shapes = sdata.shapes[skey]
        self.xy = np.column_stack([self.shapes.geometry.x.to_numpy(), self.shapes.geometry.y.to_numpy()])
        self.radius = self.shapes["radius"].to_numpy(dtype=float)
        ikey = stack.image_key(section)
        self.image = sdata.images[ikey] if ikey is not None and ikey in sdata.images else None
        self.grey = None
        self.level_to_el = np.eye(3)
        if self.image is not None:
            rgb, sx, sy = image_level(self.image, max_px=max_px)
            rgb = np.asarray(rgb, dtype=np.float32)
            if rgb.max() > 1.0:
                rgb = rgb / 255.0
            self.grey = tissue_grey(rgb)
            # level px centre u -> element px x = s (u + 1/2) - 1/2
            self.level_to_el = np.array([[sx, 0.0, (sx - 1) / 2], [0.0, sy, (sy - 1) / 2], [0.0, 0.0, 1.0]])

    def to_frame(self, frame: str | None) -> tuple[np.ndarray, np.ndarray]:
        """Maps of the image's and the spots' element pixels into the panel frame (`None`: the native frame)."""
        cs = self.cs if frame is None else frame
        img = _affine(self.image, cs) if self.image is not None else np.eye(3)
        return img, _affine(self.shapes, cs)

    def extent(self, frame: str | None) -> np.ndarray:
        """Corners of the image (or the spots' bounding box) in the panel frame."""
        img_m, spot_m = self.to_frame(frame)
        if self.image is not None:
            lev = next(iter(self.image["scale0"].values())) if hasattr(self.image, "children") else self.image
            h, w = int(lev.sizes["y"]), int(lev.sizes["x"])
            c = np.array([[-0.5, -0.5], [w - 0.5, -0.5], [-0.5, h - 0.5], [w - 0.5, h - 0.5]])
            return c @ img_m[:2, :2].T + img_m[:2, 2]
        return self.xy @ spot_m[:2, :2].T + spot_m[:2, 2]


def _window(la: _Layer, lb: _Layer, frame: str | None) -> tuple[np.ndarray, np.ndarray]:
    """The panel's window in frame units: both sections' spots with a margin, inside both images' extent."""
    ext = np.vstack([la.extent(frame), lb.extent(frame)])
    elo, ehi = ext.min(0), ext.max(0)
    spots = []
    for layer in (la, lb):
        _, sm = layer.to_frame(frame)
        spots.append(layer.xy @ sm[:2, :2].T + sm[:2, 2])
    pts = np.vstack(spots)
    if len(pts) == 0:
        return elo, ehi
    lo, hi = pts.min(0), pts.max(0)
    margin = 0.15 * float(max(hi - lo)) + 2.0 * float(max(la.radius.max(initial=0), lb.radius.max(initial=0)))
    lo, hi = np.maximum(lo - margin, elo), np.minimum(hi + margin, ehi)
    if np.any(hi <= lo):
        return elo, ehi
    return lo, hi


def _render(layer: _Layer, frame: str | None, D: np.ndarray, shape: tuple[int, int]) -> np.ndarray | None:
    """The grey image of ``layer`` resampled onto the display grid (display px -> frame units is ``D``)."""
    from asign._registration import warp

    if layer.grey is None:
        return None
    img_m, _ = layer.to_frame(frame)
    # level px -> display px
    A = np.linalg.inv(D) @ img_m @ layer.level_to_el
    return warp(layer.grey, A, shape, order=1)


def _composite(a: np.ndarray | None, b: np.ndarray | None, mode: str, shape: tuple[int, int]) -> np.ndarray:
    h, w = shape
    a = np.zeros(shape, np.float32) if a is None else a
    b = np.zeros(shape, np.float32) if b is None else b
    if mode == "composite":
        rgb = a[..., None] * _COLOURS[0] + b[..., None] * _COLOURS[1]
        return np.clip(rgb, 0.0, 1.0)
    tile = max(8, int(max(h, w) / 12))
    yy, xx = np.mgrid[0:h, 0:w]
    first = ((yy // tile + xx // tile) % 2) == 0
    # tiles of the moving image tinted magenta, of the fixed image green (light background)
    ta = 1.0 - a[..., None] * (1.0 - _COLOURS[0] * 0.7)
    tb = 1.0 - b[..., None] * (1.0 - _COLOURS[1] * 0.7)
    return np.clip(np.where(first[..., None], ta, tb), 0.0, 1.0)


def _alignment_record(table, key_added: str) -> dict:
    """``uns['asign']['alignment']`` if it describes the coordinate system ``key_added``, else ``{}``."""
    al = table.uns.get(Key.UNS, {}).get(Key.ALIGNMENT, {})
    if not isinstance(al, Mapping) or al.get("key_added", Key.ALIGNED) != key_added:
        return {}
    return dict(al)


def _pair_quality(al: Mapping, a: str, b: str) -> dict[str, float]:
    q = al.get("quality", {})
    pairs = [str(p) for p in q.get("pair", [])]
    for name in (f"{a}->{b}", f"{b}->{a}"):
        if name in pairs:
            i = pairs.index(name)
            return {k: float(np.asarray(q[k])[i]) for k in ("dice_before", "dice_after") if k in q}
    return {}


@inject_docs(
    save="""save
    Path to save the figure to; the format follows the suffix. On a backend that cannot show figures (Agg, ...), a
    saved figure that is not shown is closed afterwards (the returned figure stays usable); a figure of axes passed
    as ``ax`` never is.""",
    show="""show
    Whether to call :func:`matplotlib.pyplot.show`; `None` shows the figure only on an interactive backend.""",
)
def alignment(
    sdata: SpatialData,
    *,
    sections: Sequence[str] | None = None,
    key_added: str = Key.ALIGNED,
    mode: Literal["composite", "checkerboard"] = "composite",
    show_spots: bool = True,
    before: bool = True,
    max_px: int = 600,
    table_key: str = Key.TABLE,
    figsize: tuple[float, float] | None = None,
    save: str | os.PathLike[str] | None = None,
    show: bool | None = None,
    ax: Axes | Sequence[Axes] | None = None,
) -> Figure:
    """Overlay consecutive sections before and after alignment.

    One column per pair of consecutive sections. The earlier section of each pair is drawn in magenta and the later
    one in green (grey scale, tissue bright), so tissue that overlaps turns white; spots are drawn as circles in
    the same colours. The top row shows the sections in their own pixel frames as they were placed on the slides
    (before), the bottom row in the coordinate system ``key_added`` written by :func:`asign.pp.align_layers`
    (after). Titles give the tissue-mask Dice recorded by the alignment.

    Parameters
    ----------
    {sdata}
    sections
        Sections to show, in cutting order (default: the aligned sections).
    key_added
        The coordinate system written by :func:`asign.pp.align_layers`.
    mode
        ``"composite"`` (colour composite) or ``"checkerboard"`` (alternating tiles of the two sections).
    show_spots
        Draw the spots.
    before
        Add the row of unaligned overlays.
    max_px
        Longer side of the image pyramid level read for each section.
    {table_key}
    figsize
        Figure size in inches; `None` sizes it from the number of panels.
    {save}
    {show}
    ax
        Axes to draw into: one per panel (pairs x rows, row-major); a single Axes when there is one panel. The
        figure's title is then left alone; the colour key is written inside the first panel.

    Returns
    -------
    The :class:`matplotlib.figure.Figure`.
    """
    import matplotlib.pyplot as plt
    from matplotlib.collections import EllipseCollection

    from asign.io._validate import validate_stack

    stack = validate_stack(sdata, table_key=table_key, check_counts=False)
    table = get_table(sdata, table_key)
    if mode not in ("composite", "checkerboard"):
        msg = f"Unknown mode {mode!r}; choose 'composite' or 'checkerboard'."
        raise ValueError(msg)
    aligned = [s for s in stack.sections if _has_cs(sdata.shapes[stack.shapes_key(s)], key_added)]
    if not aligned:
        msg = (
            f"No section has a transformation to {key_added!r}; run `asign.pp.align_layers(sdata, "
            f"key_added={key_added!r})` first."
        )
        raise KeyError(msg)
    if sections is None:
        secs = aligned
    else:
        secs = [sections] if isinstance(sections, str) else list(sections)
        unknown = [s for s in secs if s not in stack.sections]
        if unknown:
            msg = f"Unknown sections {unknown}; the stack has sections {stack.sections}."
            raise KeyError(msg)
        missing = [s for s in secs if s not in aligned]
        if missing:
            msg = f"Sections {missing} have no transformation to {key_added!r}; align them first or leave them out."
            raise ValueError(msg)
        secs = [s for s in stack.sections if s in set(secs)]
    if len(secs) < 2:
        msg = f"An overlay needs at least two sections, got {secs}."
        raise ValueError(msg)
    pairs = list(zip(secs[:-1], secs[1:], strict=True))
    rows = ["before", "after"] if before else ["after"]
    n_panels = len(rows) * len(pairs)
    if ax is None:
        if figsize is None:
            figsize = (3.6 * len(pairs), 3.6 * len(rows) + 0.3)
        fig, axes = plt.subplots(len(rows), len(pairs), figsize=figsize, squeeze=False)
        axes = list(axes.ravel())
    else:
        axes = [ax] if not isinstance(ax, Sequence | np.ndarray) else list(np.ravel(ax))
        if len(axes) != n_panels:
            msg = f"`ax` has {len(axes)} Axes for {n_panels} panels ({len(rows)} row(s) x {len(pairs)} pair(s))."
            raise ValueError(msg)
        fig = axes[0].figure
    layers = {s: _Layer(sdata, stack, s, max_px=max_px) for s in secs}
    record = _alignment_record(table, key_added)
    um = float(record.get("um_per_px", np.nan))

    for r, row in enumerate(rows):
        frame = None if row == "before" else key_added
        for c, (a, b) in enumerate(pairs):
            axis = axes[r * len(pairs) + c]
            la, lb = layers[a], layers[b]
            lo, hi = _window(la, lb, frame)
            span = float(max(hi - lo))
            step = span / max_px
            w = max(1, int(np.ceil((hi[0] - lo[0]) / step)))
            h = max(1, int(np.ceil((hi[1] - lo[1]) / step)))
            # display px centre u -> frame x = lo + step (u + 1/2)
            D = np.array([[step, 0.0, lo[0] + step / 2], [0.0, step, lo[1] + step / 2], [0.0, 0.0, 1.0]])
            img = _composite(_render(la, frame, D, (h, w)), _render(lb, frame, D, (h, w)), mode, (h, w))
            axis.imshow(img, interpolation="nearest")
            if show_spots:
                Dinv = np.linalg.inv(D)
                for layer, colour in zip((la, lb), _SPOT_COLOURS, strict=True):
                    _, sm = layer.to_frame(frame)
                    M = Dinv @ sm
                    xy = layer.xy @ M[:2, :2].T + M[:2, 2]
                    d = 2.0 * layer.radius * float(np.sqrt(abs(np.linalg.det(M[:2, :2]))))
                    axis.add_collection(
                        EllipseCollection(
                            d,
                            d,
                            np.zeros_like(d),
                            units="xy",
                            offsets=xy,
                            offset_transform=axis.transData,
                            facecolors="none",
                            edgecolors=colour,
                            linewidths=0.6,
                        )
                    )
            q = _pair_quality(record, a, b)
            dice = q.get("dice_before" if row == "before" else "dice_after")
            title = f"{a} / {b} {row}"
            if dice is not None and np.isfinite(dice):
                title += f"\nmask Dice {dice:.3f}"
            axis.set_title(title, fontsize=9)
            axis.set_xlim(-0.5, w - 0.5)
            axis.set_ylim(h - 0.5, -0.5)
            axis.set_xticks([])
            axis.set_yticks([])
            if row == "after" and c == 0 and np.isfinite(um):
                axis.set_ylabel(f"{key_added} ({step * um:.1f} µm/px shown)", fontsize=8)
            elif row == "before" and c == 0:
                axis.set_ylabel("native frames", fontsize=8)
    legend = "magenta: earlier section, green: later section"
    if ax is None:
        fig.suptitle(legend, fontsize=9)
        return finish(fig, save=save, show=show)
    # the caller's figure: its suptitle is theirs; the colour key goes inside the first panel
    axes[0].text(
        0.5,
        0.01,
        legend,
        transform=axes[0].transAxes,
        ha="center",
        va="bottom",
        fontsize=7,
        color="white",
        bbox={"facecolor": "0.15", "alpha": 0.6, "edgecolor": "none", "pad": 1.5},
    )
    return finish(fig, save=save, show=show, owned=False)
