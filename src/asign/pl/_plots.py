"""Static plots: measured vs imputed sections, a 3D scatter of the stack, evaluation metrics and training curves."""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any, Literal

import numpy as np
import pandas as pd

from asign._constants import Key
from asign._docs import inject_docs
from asign._logging import logger
from asign._stack import StackInfo, get_table
from asign.pl._utils import (
    HIDDEN_SERIES,
    LOWER_IS_BETTER,
    X_CANDIDATES,
    as_runs,
    ensemble_size,
    find_history,
    finish,
    group_column,
    group_labels,
    image_level,
    member_runs,
    output_table,
    pick_metric,
    rows_for,
    shared_norm,
    spot_ids,
)

if TYPE_CHECKING:
    from anndata import AnnData
    from matplotlib.axes import Axes
    from matplotlib.colors import Colormap
    from matplotlib.figure import Figure
    from spatialdata import SpatialData

    from asign.tl._fit import ASIGNFit

_NATIVE = "native"
_LAYER_LABELS = {Key.TARGET: "measured", Key.IMPUTED: "imputed"}
_MISSING_EDGE = "0.55"

_plot_params = {
    "key": """key
    Key of the output table in :attr:`spatialdata.SpatialData.tables` written by :func:`asign.tl.impute`
    (same ``obs_names`` as the spot table, modelled genes as ``var``, ``layers['target']`` and
    ``layers['imputed']``).""",
    "save": """save
    Path to save the figure to; the format follows the suffix (``.png``, ``.pdf``, ``.svg``, ...). On a backend
    that cannot show figures (Agg, ...), a saved figure that is not shown is closed afterwards (the returned figure
    stays usable); a figure of axes passed as ``ax`` never is.""",
    "show": """show
    Whether to call :func:`matplotlib.pyplot.show`; `None` shows the figure only on an interactive (GUI) backend.""",
    "figsize": """figsize
    Figure size in inches; `None` sizes the figure from the number of panels.""",
}


# --------------------------------------------------------------------------------------------------------------------
# data access
# --------------------------------------------------------------------------------------------------------------------
def _check_same_spots(
    table: AnnData, spots: AnnData, *, key: str | None = None, shown: Sequence[str] | None = None
) -> None:
    """Refuse an output table whose spots moved since it was computed (e.g. a section re-laid with make_spots).

    Rows are matched by name; virtual spots are named ``<section>_v<i>`` on every lattice, so a name alone does not
    prove that a row describes the same spot: the positions (``obsm['spatial']``, copied by ``tl.impute``) must agree.
    Spots of the sections ``shown`` (`None`: all) that the table lacks are reported.
    """
    if table is spots:
        return
    common = table.obs_names.intersection(spots.obs_names, sort=False)
    moved = np.zeros(len(common), dtype=bool)
    if Key.SPATIAL in table.obsm and Key.SPATIAL in spots.obsm:
        a = np.asarray(table.obsm[Key.SPATIAL], dtype=float)[table.obs_names.get_indexer(common)]
        b = np.asarray(spots.obsm[Key.SPATIAL], dtype=float)[spots.obs_names.get_indexer(common)]
        moved = ~np.isclose(a, b, rtol=0.0, atol=1e-3).all(axis=1)
    if moved.any():
        secs = sorted(set(spots.obs.loc[common[moved], Key.SECTION].astype(str)))
        msg = (
            f"The table to plot was computed for other spots: {int(moved.sum())} of its spots (sections {secs}) "
            "now lie elsewhere under the same names (the section's spots were laid again, e.g. by "
            "`asign.pp.make_spots`); rerun `asign.tl.impute` for the current spots."
        )
        raise ValueError(msg)
    missing = spots.obs_names.difference(table.obs_names, sort=False)
    if shown is not None:
        missing = missing[spots.obs.loc[missing, Key.SECTION].astype(str).isin(list(shown)).to_numpy()]
    if len(missing):
        secs = sorted(set(spots.obs.loc[missing, Key.SECTION].astype(str)))
        name = "the table to plot" if key is None else f"table {key!r}"
        covered = set(spots.obs.loc[common, Key.SECTION].astype(str))
        absent = [s for s in secs if s not in covered]
        hint = f" Sections {absent} are absent altogether; pass `sections=` to leave them out." if absent else ""
        logger.warning(
            f"{len(missing)} spots of the stack (sections {secs}) are missing from {name} (it was subset, or the "
            f"spots were added after it was computed); they are drawn without values.{hint}"
        )


def _gene_values(
    table: AnnData,
    gene: str,
    layer: str,
    spots: AnnData,
    *,
    key: str | None = None,
    param: str = "layer",
    check: bool = True,
) -> np.ndarray:
    """Values of ``gene`` in ``layer`` (``'X'`` for ``.X``) of ``table``, in the spot table's row order.

    NaN for spots the table lacks; a table whose spots moved is refused (:func:`_check_same_spots`, skipped with
    ``check=False`` when the caller ran it). ``key`` (the table's key) and ``param`` (the caller's parameter that
    names the layer) make the error messages precise.
    """
    import scipy.sparse as sp

    if check:
        _check_same_spots(table, spots, key=key)
    obs_names = spots.obs_names
    name = "the table" if key is None else f"table {key!r}"

    if gene not in table.var_names:
        raise KeyError(_unknown_gene_message(gene, table, spots, name))
    j = int(table.var_names.get_loc(gene))
    if layer == "X":
        M = table.X
    elif layer in table.layers:
        M = table.layers[layer]
    else:
        msg = (
            f"Layer {layer!r} not found in {name} (layers: {list(table.layers)}); pass `{param}=` one of them or "
            "'X' for `.X`."
        )
        raise KeyError(msg)
    if M is None:
        what = "`.X`" if layer == "X" else f"Layer {layer!r}"
        msg = f"{what} of {name} is empty; pass `{param}=` another layer (layers: {list(table.layers)})."
        raise ValueError(msg)
    col = M[:, j]
    col = col.toarray() if sp.issparse(col) else np.asarray(col)
    values = pd.Series(np.asarray(col, dtype=float).ravel(), index=table.obs_names)
    if table.obs_names.equals(obs_names):
        return values.to_numpy()
    return values.reindex(obs_names).to_numpy()


def _unknown_gene_message(gene: Any, table: AnnData, spots: AnnData, name: str) -> str:
    """Why ``gene`` is not a var_name of ``table``: a match up to case, close names, or an obs column."""
    import difflib

    genes = [str(g) for g in table.var_names]
    msg = f"Gene {gene!r} is not in the var_names of {name} ({table.n_vars} genes"
    if not isinstance(gene, str):
        return msg + f", e.g. {', '.join(genes[:8])}); pass a gene name."
    folded = [g for g in genes if g.casefold() == gene.casefold()]
    close = [g for g in difflib.get_close_matches(gene, genes, n=5, cutoff=0.6) if g not in folded]
    if folded:
        msg += f"); did you mean {', '.join(map(repr, folded))} (names are case-sensitive)?"
    elif close:
        msg += f"); close matches: {', '.join(map(repr, close))}."
    else:
        msg += f", e.g. {', '.join(genes[:8])})."
    if any(gene in t.obs.columns for t in (table, spots)):
        msg += f" {gene!r} is an obs column; this function plots genes (var_names) only, not obs columns."
    return msg


def _select_sections(stack: StackInfo, sections: str | Sequence[str] | None) -> list[str]:
    if sections is None:
        return list(stack.sections)
    chosen = [sections] if isinstance(sections, str) else list(sections)
    if not chosen:
        msg = f"`sections` is empty; pass at least one of the stack's sections {list(stack.sections)} (or `None`)."
        raise ValueError(msg)
    for s in chosen:
        stack.index(s)  # raises a KeyError naming the stack's sections
    return chosen


def _affine_to(element: Any, coordinate_system: str, *, what: str) -> np.ndarray:
    """3 x 3 matrix mapping the element's (x, y) to ``coordinate_system``."""
    from spatialdata.transformations import get_transformation

    transforms = get_transformation(element, get_all=True)
    if coordinate_system not in transforms:
        hint = (
            "run `asign.pp.align_layers` first or use `coordinate_system='native'`"
            if coordinate_system == Key.ALIGNED
            else f"available: {sorted(transforms)}"
        )
        msg = f"{what} has no transformation to the coordinate system {coordinate_system!r}; {hint}."
        raise ValueError(msg)
    return np.asarray(transforms[coordinate_system].to_affine_matrix(input_axes=("x", "y"), output_axes=("x", "y")))


def _has_cs(sdata: SpatialData, stack: StackInfo, coordinate_system: str) -> bool:
    from spatialdata.transformations import get_transformation

    return all(
        coordinate_system in get_transformation(sdata.shapes[k], get_all=True)
        for k in stack.shapes_keys
        if k in sdata.shapes
    )


def _resolve_cs(sdata: SpatialData, stack: StackInfo, coordinate_system: str | None) -> str:
    if coordinate_system is not None:
        return coordinate_system
    if _has_cs(sdata, stack, Key.ALIGNED):
        return Key.ALIGNED
    logger.info("No `'aligned'` coordinate system found; plotting each section in its own pixel frame.")
    return _NATIVE


def _um_per_unit(table: AnnData, stack: StackInfo, section: str, coordinate_system: str) -> tuple[float, str]:
    """Microns per coordinate-system unit and the axis unit label."""
    if coordinate_system in (_NATIVE, stack.coordinate_system(section)):
        return float(stack.um_per_px[stack.index(section)]), "µm"
    alignment = table.uns.get(Key.UNS, {}).get(Key.ALIGNMENT, {})
    if isinstance(alignment, Mapping) and alignment.get("key_added", Key.ALIGNED) == coordinate_system:
        um = alignment.get("um_per_px")
        if um is not None and np.isfinite(float(um)) and float(um) > 0:
            return float(um), "µm"
    return 1.0, "px"


def _section_geometry(
    sdata: SpatialData,
    table: AnnData,
    stack: StackInfo,
    section: str,
    coordinate_system: str,
) -> dict[str, Any]:
    """Spot centres and radii of one section in ``coordinate_system`` (in µm when the pixel size is known)."""
    cs = stack.coordinate_system(section) if coordinate_system == _NATIVE else coordinate_system
    skey = stack.shapes_key(section)
    shapes = sdata.shapes[skey]
    M = _affine_to(shapes, cs, what=f"Shapes {skey!r} (section {section!r})")
    um, unit = _um_per_unit(table, stack, section, coordinate_system)
    U = np.diag([um, um, 1.0])
    M = U @ M
    mask = (table.obs[Key.SECTION].astype(str) == section).to_numpy()
    ids = spot_ids(table, mask)
    geo = shapes.loc[ids]
    xy = np.column_stack([geo.geometry.x.to_numpy(), geo.geometry.y.to_numpy()])
    xy = xy @ M[:2, :2].T + M[:2, 2]
    radius = geo["radius"].to_numpy(dtype=float) * float(np.sqrt(abs(np.linalg.det(M[:2, :2]))))
    return {"mask": mask, "xy": xy, "radius": radius, "cs": cs, "um": um, "unit": unit}


def _draw_image(
    ax: Axes, sdata: SpatialData, stack: StackInfo, section: str, cs: str, um: float, max_px: int | None, alpha: float
) -> None:
    from matplotlib.transforms import Affine2D

    ikey = stack.image_key(section)
    if ikey is None or ikey not in sdata.images:
        return
    element = sdata.images[ikey]
    M = _affine_to(element, cs, what=f"Image {ikey!r} (section {section!r})")
    rgb, sx, sy = image_level(element, max_px=max_px)
    h, w = rgb.shape[:2]
    full = np.diag([um, um, 1.0]) @ M @ np.diag([sx, sy, 1.0])
    ax.imshow(
        rgb,
        extent=(0, w, h, 0),
        transform=Affine2D(full) + ax.transData,
        interpolation="antialiased",
        alpha=alpha,
        zorder=0,
    )


def _draw_spots(
    ax: Axes, xy: np.ndarray, radius: np.ndarray, values: np.ndarray, *, cmap: Colormap, norm: Any, alpha: float
) -> None:
    from matplotlib.collections import EllipseCollection

    finite = np.isfinite(values)
    d = 2.0 * radius
    if (~finite).any():
        ax.add_collection(
            EllipseCollection(
                d[~finite],
                d[~finite],
                np.zeros((~finite).sum()),
                units="xy",
                offsets=xy[~finite],
                offset_transform=ax.transData,
                facecolors="none",
                edgecolors=_MISSING_EDGE,
                linewidths=0.5,
                zorder=2,
            )
        )
    if finite.any():
        order = np.argsort(values[finite], kind="stable")  # high values on top
        coll = EllipseCollection(
            d[finite][order],
            d[finite][order],
            np.zeros(finite.sum()),
            units="xy",
            offsets=xy[finite][order],
            offset_transform=ax.transData,
            cmap=cmap,
            norm=norm,
            edgecolors="none",
            alpha=alpha,
            zorder=3,
        )
        coll.set_array(values[finite][order])
        ax.add_collection(coll)


def _limits(xy: np.ndarray, radius: np.ndarray, margin: float = 0.04) -> tuple[float, float, float, float]:
    r = float(np.nanmax(radius)) if radius.size else 0.0
    x0, y0 = np.nanmin(xy, axis=0) - r
    x1, y1 = np.nanmax(xy, axis=0) + r
    pad = margin * max(x1 - x0, y1 - y0, 1.0)
    return x0 - pad, x1 + pad, y0 - pad, y1 + pad


# --------------------------------------------------------------------------------------------------------------------
# sections
# --------------------------------------------------------------------------------------------------------------------
@inject_docs(**_plot_params)
def sections(
    sdata: SpatialData,
    *,
    gene: str,
    key: str = Key.OUTPUT_TABLE,
    table_key: str = Key.TABLE,
    sections: str | Sequence[str] | None = None,
    layers: str | Sequence[str] = (Key.TARGET, Key.IMPUTED),
    coordinate_system: str | None = None,
    image: bool = True,
    image_max_px: int | None = 1000,
    image_alpha: float = 0.7,
    cmap: str | Colormap = "viridis",
    vmin: float | None = None,
    vmax: float | None = None,
    robust: bool = False,
    spot_alpha: float = 0.95,
    figsize: tuple[float, float] | None = None,
    title: str | None = None,
    save: str | os.PathLike[str] | None = None,
    show: bool | None = None,
) -> Figure:
    """Measured and imputed expression of one gene, section by section, on one colour scale.

    One column per section (cutting order), one row per layer. Spots are drawn as circles of their physical
    diameter, optionally over the section's H&E image (a low-resolution pyramid level), in the shared
    ``'aligned'`` frame or in each section's own pixel frame. Spots without a value are drawn as hollow grey
    circles: in ``layers['target']`` (the measured expression, held-out measured sections included) only spots
    that were not measured (e.g. virtual spots) have no value.

    Parameters
    ----------
    {sdata}
    gene
        Gene to show (a ``var_name`` of the table ``key``).
    {key}
    {table_key}
    sections
        Sections to show, in the given order; `None` shows every section of the stack.
    layers
        Layers of the table ``key`` to show, one row each (``'X'`` for ``.X``); by default the measured target
        and the imputation.
    coordinate_system
        ``'aligned'`` (the frame written by :func:`asign.pp.align_layers`), ``'native'`` (each section in its own
        pixel frame) or another coordinate system every section's elements map to; `None` picks ``'aligned'`` when
        present and ``'native'`` otherwise. Axes are in µm when the pixel size is known.
    image
        Whether to draw the H&E image under the spots.
    image_max_px
        Use the coarsest pyramid level whose longer side has at least this many pixels; `None` for full resolution.
    image_alpha
        Opacity of the image (below 1 so that the spots stand out).
    cmap
        Colormap.
    vmin, vmax
        Limits of the shared colour scale; by default the range of the shown values over all panels. Given limits
        are used as they are (values outside clip); ``vmin`` must be below ``vmax``.
    robust
        Use the 1st and 99th percentiles of the shown values as default limits.
    spot_alpha
        Opacity of the spots.
    {figsize}
    title
        Figure title; by default the gene and the coordinate system.
    {save}
    {show}

    Returns
    -------
    The :class:`matplotlib.figure.Figure`.
    """
    import matplotlib.pyplot as plt
    from matplotlib.cm import ScalarMappable
    from matplotlib.colors import Normalize

    from asign.io import validate_stack

    stack = validate_stack(sdata, table_key=table_key, check_counts=False)
    spot_table = get_table(sdata, table_key)
    out = output_table(sdata, key)
    layers = [layers] if isinstance(layers, str) else list(layers)
    if not layers:
        msg = "`layers` is empty; pass at least one layer, e.g. layers=['imputed']."
        raise ValueError(msg)
    secs = _select_sections(stack, sections)
    cs = _resolve_cs(sdata, stack, coordinate_system)
    _check_same_spots(out, spot_table, key=key, shown=secs)
    values = {
        layer: _gene_values(out, gene, layer, spot_table, key=key, param="layers", check=False) for layer in layers
    }
    geoms = {s: _section_geometry(sdata, spot_table, stack, s, cs) for s in secs}
    lo, hi = shared_norm(
        [values[layer][geoms[s]["mask"]] for layer in layers for s in secs], vmin=vmin, vmax=vmax, robust=robust
    )
    norm = Normalize(vmin=lo, vmax=hi)
    cmap_ = plt.get_cmap(cmap) if isinstance(cmap, str) else cmap
    known = _known_sections(out, spot_table, secs)

    nrow, ncol = len(layers), len(secs)
    shared = cs != _NATIVE
    if shared:
        allxy = np.vstack([geoms[s]["xy"] for s in secs])
        allr = np.concatenate([geoms[s]["radius"] for s in secs])
        limits = dict.fromkeys(secs, _limits(allxy, allr))
    else:
        limits = {s: _limits(geoms[s]["xy"], geoms[s]["radius"]) for s in secs}
    if figsize is None:
        # panels 2.6 in wide, as tall as the data's aspect ratio asks (within reason)
        aspect = float(np.median([(b[3] - b[2]) / max(b[1] - b[0], 1e-9) for b in limits.values()]))
        figsize = (2.6 * ncol + 1.2, 2.6 * float(np.clip(aspect, 0.4, 2.0)) * nrow + 0.7)
    fig, axes = plt.subplots(
        nrow, ncol, figsize=figsize, squeeze=False, sharex=shared, sharey=shared, layout="constrained"
    )
    for j, s in enumerate(secs):
        g = geoms[s]
        lims = limits[s]
        for i, layer in enumerate(layers):
            ax = axes[i, j]
            if image:
                _draw_image(ax, sdata, stack, s, g["cs"], g["um"], image_max_px, image_alpha)
            v = values[layer][g["mask"]]
            _draw_spots(ax, g["xy"], g["radius"], v, cmap=cmap_, norm=norm, alpha=spot_alpha)
            ax.set_xlim(lims[0], lims[1])
            ax.set_ylim(lims[3], lims[2])  # image convention: y grows downwards
            ax.set_aspect("equal")
            ax.tick_params(labelsize=7)
            if i == 0:
                ax.set_title(f"{s}" + (" (known)" if s in known else ""), fontsize=10)
            if j == 0:
                ax.set_ylabel(f"{_LAYER_LABELS.get(layer, layer)}\ny ({g['unit']})", fontsize=9)
            if i == nrow - 1:
                ax.set_xlabel(f"x ({g['unit']})", fontsize=8)
            if not np.isfinite(v).any():
                ax.text(
                    0.5,
                    0.04,
                    "no values",
                    transform=ax.transAxes,
                    ha="center",
                    va="bottom",
                    fontsize=8,
                    color="0.3",
                    bbox={"facecolor": "white", "alpha": 0.7, "edgecolor": "none"},
                )
    sm = ScalarMappable(norm=norm, cmap=cmap_)
    fig.colorbar(sm, ax=axes.ravel().tolist(), shrink=0.8, label=gene)
    fig.suptitle(title if title is not None else f"{gene} ({cs})", fontsize=11)
    return finish(fig, save=save, show=show)


def _known_sections(out: AnnData, spot_table: AnnData, secs: list[str]) -> set[str]:
    if Key.KNOWN not in out.obs.columns:
        return set()
    known = pd.Series(out.obs[Key.KNOWN].to_numpy(dtype=bool), index=out.obs_names)
    known = known.reindex(spot_table.obs_names, fill_value=False).to_numpy(dtype=bool)
    section = spot_table.obs[Key.SECTION].astype(str).to_numpy()
    return {s for s in secs if known[section == s].any()}


# --------------------------------------------------------------------------------------------------------------------
# 3D scatter
# --------------------------------------------------------------------------------------------------------------------
@inject_docs(**_plot_params)
def scatter_3d(
    sdata: SpatialData,
    *,
    gene: str,
    key: str = Key.OUTPUT_TABLE,
    layer: str = Key.IMPUTED,
    table_key: str = Key.TABLE,
    sections: str | Sequence[str] | None = None,
    z_scale: float | None = None,
    size: float | None = None,
    cmap: str | Colormap = "viridis",
    vmin: float | None = None,
    vmax: float | None = None,
    robust: bool = False,
    elev: float = 22.0,
    azim: float = -60.0,
    figsize: tuple[float, float] | None = None,
    title: str | None = None,
    save: str | os.PathLike[str] | None = None,
    show: bool | None = None,
) -> Figure:
    """A 3D scatter of the stack's spots at ``obsm['spatial_3d']``, coloured by one gene.

    The positions are the current ones of the spot table ``table_key`` (written by :func:`asign.pp.align_layers`),
    matched by spot name; the copy in the table ``key`` (made when it was computed) is used only when the spot table
    has none, and a copy that disagrees with the current alignment (the stack was aligned again) is reported.

    Parameters
    ----------
    {sdata}
    gene
        Gene to colour by (a ``var_name`` of the table ``key``).
    {key}
    layer
        Layer of the table ``key`` (``'X'`` for ``.X``).
    {table_key}
    sections
        Sections to show; `None` shows all.
    z_scale
        Exaggeration of the z axis: the displayed z extent is ``z_scale`` times the true one. `None` scales z so
        that the stack's depth is drawn at 40% of its largest lateral extent (sections are thin compared to the
        tissue). ``1.0`` draws true proportions.
    size
        Marker size in points²; `None` picks one from the number of spots.
    cmap
        Colormap.
    vmin, vmax
        Colour scale limits; by default the range of the shown values. Given limits are used as they are (values
        outside clip); ``vmin`` must be below ``vmax``.
    robust
        Use the 1st and 99th percentiles as default limits.
    elev, azim
        Camera elevation and azimuth in degrees.
    {figsize}
    title
        Figure title; by default the gene and layer.
    {save}
    {show}

    Returns
    -------
    The :class:`matplotlib.figure.Figure` (its axes is a 3D :class:`~mpl_toolkits.mplot3d.axes3d.Axes3D`).
    """
    import matplotlib.pyplot as plt
    from matplotlib.colors import Normalize

    from asign.io import validate_stack

    stack = validate_stack(sdata, table_key=table_key, check_counts=False)
    spot_table = get_table(sdata, table_key)
    out = output_table(sdata, key)
    secs = _select_sections(stack, sections)
    _check_same_spots(out, spot_table, key=key, shown=secs)
    xyz = _coords_3d(out, spot_table, key=key, table_key=table_key)
    values = _gene_values(out, gene, layer, spot_table, key=key, param="layer", check=False)
    mask = spot_table.obs[Key.SECTION].astype(str).isin(secs).to_numpy() & np.isfinite(xyz).all(axis=1)
    xyz, values = xyz[mask], values[mask]
    if xyz.shape[0] == 0:
        msg = f"No spot with 3D coordinates in sections {secs}."
        raise ValueError(msg)
    lo, hi = shared_norm([values], vmin=vmin, vmax=vmax, robust=robust)
    norm = Normalize(vmin=lo, vmax=hi)
    cmap_ = plt.get_cmap(cmap) if isinstance(cmap, str) else cmap
    if size is None:
        size = float(np.clip(800.0 / np.sqrt(xyz.shape[0]), 1.0, 40.0))

    fig = plt.figure(figsize=figsize or (7.0, 5.5))
    ax = fig.add_subplot(projection="3d")
    finite = np.isfinite(values)
    if (~finite).any():
        p = xyz[~finite]
        ax.scatter(p[:, 0], p[:, 1], p[:, 2], s=size * 0.4, c=_MISSING_EDGE, alpha=0.35, depthshade=False)
    order = np.argsort(values[finite], kind="stable")
    p, v = xyz[finite][order], values[finite][order]
    sc = ax.scatter(p[:, 0], p[:, 1], p[:, 2], s=size, c=v, cmap=cmap_, norm=norm, depthshade=False, linewidths=0)
    rng_ = np.ptp(xyz, axis=0)
    lateral = float(max(rng_[0], rng_[1], 1e-9))
    zr = float(rng_[2])
    if zr <= 0:
        z_disp = 0.05 * lateral
    elif z_scale is None:
        z_disp = 0.4 * lateral
    else:
        z_disp = zr * float(z_scale)
    ax.set_box_aspect((max(rng_[0], 1e-9), max(rng_[1], 1e-9), max(z_disp, 1e-9)))
    ymin, ymax = float(xyz[:, 1].min()), float(xyz[:, 1].max())
    ax.set_ylim(ymax, ymin)  # image convention
    ax.view_init(elev=elev, azim=azim)
    ax.set_xlabel("x (µm)", fontsize=8)
    ax.set_ylabel("y (µm)", fontsize=8)
    ax.set_zlabel("z (µm)", fontsize=8)
    ax.tick_params(labelsize=7)
    zs = stack.z_um[[stack.index(s) for s in secs]]
    if len(zs) <= 12:
        ax.set_zticks(zs)
    fig.colorbar(sc, ax=ax, shrink=0.6, pad=0.14, label=f"{gene} ({layer})")
    ax.set_title(title if title is not None else f"{gene} ({_LAYER_LABELS.get(layer, layer)})", fontsize=11)
    return finish(fig, save=save, show=show)


def _coords_3d(out: AnnData, spot_table: AnnData, *, key: str, table_key: str) -> np.ndarray:
    """``obsm['spatial_3d']`` in the spot table's row order.

    The spot table's (the current alignment), else the copy of the table ``key``; a copy that disagrees with the
    current positions is reported.
    """
    current = spot_table.obsm[Key.SPATIAL_3D] if Key.SPATIAL_3D in spot_table.obsm else None
    copy = out.obsm[Key.SPATIAL_3D] if out is not spot_table and Key.SPATIAL_3D in out.obsm else None
    if current is None and copy is None:
        msg = (
            f"`obsm['{Key.SPATIAL_3D}']` not found in table {table_key!r} nor {key!r}; run `asign.pp.align_layers` "
            "first."
        )
        raise KeyError(msg)
    if copy is not None:
        copied = pd.DataFrame(np.asarray(copy, dtype=float), index=out.obs_names).reindex(spot_table.obs_names)
        copied = copied.to_numpy()
    if current is None:
        logger.info(
            f"Table {table_key!r} has no `obsm['{Key.SPATIAL_3D}']`; plotting the copy in table {key!r} (made when it "
            "was computed)."
        )
        return copied
    xyz = np.asarray(current, dtype=float)
    if copy is not None:
        both = np.isfinite(xyz).all(axis=1) & np.isfinite(copied).all(axis=1)
        dist = np.linalg.norm(xyz[both] - copied[both], axis=1) if both.any() else np.zeros(0)
        if dist.size and float(dist.max()) > 1e-3:
            logger.warning(
                f"`obsm['{Key.SPATIAL_3D}']` of table {key!r} (copied when it was computed) differs from the current "
                f"alignment in table {table_key!r} for {int((dist > 1e-3).sum())} spots (up to {dist.max():.1f} µm): "
                "the stack was aligned again since. Plotting the current positions; rerun `asign.tl.impute` for "
                "predictions made with the current alignment."
            )
    return xyz


# --------------------------------------------------------------------------------------------------------------------
# metrics
# --------------------------------------------------------------------------------------------------------------------
@inject_docs(**_plot_params)
def metrics(
    df: pd.DataFrame,
    *,
    kind: Literal["section", "gene"] = "section",
    metric: str | None = None,
    group: str | None = None,
    sections: str | Sequence[str] | None = None,
    n_top: int = 20,
    palette: str = "tab10",
    figsize: tuple[float, float] | None = None,
    title: str | None = None,
    save: str | os.PathLike[str] | None = None,
    show: bool | None = None,
    ax: Axes | Sequence[Axes] | None = None,
) -> Figure:
    """Plots of the evaluation table returned by :func:`asign.tl.evaluate`.

    The data frame is tidy: one row per evaluated unit with a ``section`` and/or ``gene`` column, a metric column
    (``pcc_gene`` by default) and optionally a ``method`` column; concatenate the frames of several methods to
    compare them. With :func:`asign.tl.evaluate`'s ``level`` column, the per-gene rows are used (the per-section
    rows when no per-gene row is present; ``overall`` rows never). A long frame with ``metric`` and ``value``
    columns is accepted too. When one ``method`` appears under several output tables (:func:`asign.tl.evaluate`'s
    ``key`` column, e.g. two runs of a method with other options), its runs are labelled ``"method (key)"``
    instead of being pooled.

    - ``kind='section'``: one box per section and method showing the spread of the metric over genes (or a bar
      when a section has one value per method), the mean marked by a white diamond.
    - ``kind='gene'``: left, the distribution of the per-gene metric (averaged over sections) for each method,
      with the mean printed above; right, the ``n_top`` best genes of the first method with every method's value.

    Parameters
    ----------
    df
        Tidy evaluation table.
    kind
        ``'section'`` or ``'gene'``.
    metric
        Metric column to plot; `None` picks the first of ``pcc_gene``, ``pcc``, ``pcc_gene_varying``, ``pearson``,
        ``r``, ``spearman``, ``ssim``, ``pcc_spot_legacy``, ``rmse``, ``mse``, ``mae`` with a value.
    group
        Column that distinguishes methods; `None` uses ``method`` when present (``"method (key)"`` for a method
        evaluated on several output tables).
    sections
        Section or sections to include (and their order); `None` uses every section of ``df`` in order of
        appearance.
    n_top
        Number of genes in the right panel of ``kind='gene'`` (``0`` hides the panel).
    palette
        Matplotlib colormap name for the methods.
    {figsize}
    title
        Figure title (with ``ax``, the title of the first axes).
    {save}
    {show}
    ax
        Axes to draw into instead of a new figure: one Axes for ``kind='section'`` and for ``kind='gene'`` with
        ``n_top=0``, two (distribution, top genes) for ``kind='gene'`` with ``n_top > 0``.

    Returns
    -------
    The :class:`matplotlib.figure.Figure` (with ``ax``, the figure of the axes).
    """
    import matplotlib.pyplot as plt

    if not isinstance(df, pd.DataFrame):
        msg = f"`df` must be a pandas DataFrame as returned by `asign.tl.evaluate`, got {type(df).__name__}."
        raise TypeError(msg)
    if kind not in ("section", "gene"):
        msg = f"`kind` must be 'section' or 'gene', got {kind!r}."
        raise ValueError(msg)
    n_panels = 2 if kind == "gene" and n_top > 0 else 1
    axes = _user_axes(ax, n_panels, what=f"kind={kind!r}" + (f" with n_top={n_top}" if kind == "gene" else ""))
    data, metric = pick_metric(df, metric)
    data = data.copy()
    data[metric] = pd.to_numeric(data[metric], errors="coerce")
    data = rows_for(data, metric, kind)
    gcol = group_column(data, group)
    if gcol is None:
        gcol = "_group"
        data[gcol] = metric
    data[gcol] = group_labels(data, gcol, explicit=group is not None).to_numpy()
    methods = list(pd.unique(data[gcol]))
    cmap = plt.get_cmap(palette)
    colors = {m: cmap(i % cmap.N) for i, m in enumerate(methods)}
    if data[metric].notna().sum() == 0:
        msg = f"Column {metric!r} has no finite value."
        raise ValueError(msg)
    secs = None
    if sections is not None:
        if "section" not in data.columns:
            msg = "`sections=` needs a 'section' column in the data frame."
            raise KeyError(msg)
        data["section"] = data["section"].astype(str)
        secs = _metric_sections(data, sections)
        data = data[data["section"].isin(secs)]
        if data[metric].notna().sum() == 0:
            msg = f"Column {metric!r} has no finite value in sections {secs}."
            raise ValueError(msg)

    if kind == "section":
        if "section" not in data.columns:
            msg = f"kind='section' needs a 'section' column (columns: {list(df.columns)})."
            raise KeyError(msg)
        data["section"] = data["section"].astype(str)
        if secs is None:
            secs = list(pd.unique(data["section"]))
        if axes is None:
            size = figsize or (max(4.0, 1.1 * len(secs) * max(1, len(methods)) ** 0.5 + 2), 3.8)
            fig, axis = plt.subplots(figsize=size)
            axes = [axis]
        _section_panel(axes[0], data, metric, gcol, secs, methods, colors)
    else:
        if "gene" not in data.columns:
            msg = f"kind='gene' needs a 'gene' column (columns: {list(df.columns)})."
            raise KeyError(msg)
        per_gene = data.groupby([gcol, "gene"], observed=True, sort=False)[metric].mean().unstack(gcol)
        per_gene = per_gene[[m for m in methods if m in per_gene.columns]]
        if axes is None:
            fig, grid = plt.subplots(
                1,
                n_panels,
                figsize=figsize or (4.0 + (5.5 if n_panels == 2 else 0.0), 3.8),
                squeeze=False,
                layout="constrained",
                width_ratios=[1, 1.6] if n_panels == 2 else None,
            )
            axes = list(grid[0])
        _gene_distribution(axes[0], per_gene, metric, colors)
        if n_panels == 2:
            _top_genes(axes[1], per_gene, metric, colors, n_top)
    label = title if title is not None else f"{metric} per {kind}"
    if ax is None:
        fig.suptitle(label, fontsize=11)
        return finish(fig, save=save, show=show)
    if title is not None or not axes[0].get_title():
        axes[0].set_title(label, fontsize=10)
    return finish(axes[0].figure, save=save, show=show, owned=False)


def _user_axes(ax: Axes | Sequence[Axes] | None, n_panels: int, *, what: str) -> list[Axes] | None:
    """The axes passed as ``ax``, as a list of ``n_panels`` Axes (`None` when none were passed)."""
    if ax is None:
        return None
    axes = list(np.ravel(ax)) if isinstance(ax, Sequence | np.ndarray) else [ax]
    if len(axes) != n_panels or not all(hasattr(a, "plot") and hasattr(a, "figure") for a in axes):
        msg = (
            f"`ax` must be {'one Axes' if n_panels == 1 else f'a sequence of {n_panels} Axes'} for {what} "
            f"({n_panels} panel{'s' if n_panels > 1 else ''}), got {len(axes)} object(s) of types "
            f"{sorted({type(a).__name__ for a in axes})}."
        )
        raise ValueError(msg)
    return axes


def _metric_sections(data: pd.DataFrame, sections: str | Sequence[str]) -> list[str]:
    """``sections`` (one name or several) as a list; names absent from ``data['section']`` are refused."""
    secs = [sections] if isinstance(sections, str) else [str(s) for s in sections]
    present = list(pd.unique(data["section"].astype(str)))
    if not secs:
        msg = f"`sections` is empty; pass sections of the data frame {present} (or `None`)."
        raise ValueError(msg)
    unknown = [s for s in secs if s not in present]
    if unknown:
        msg = f"Sections {unknown} are not in the data frame; its sections are {present}."
        raise ValueError(msg)
    return secs


def _section_panel(
    ax: Axes,
    data: pd.DataFrame,
    metric: str,
    gcol: str,
    secs: list[str],
    methods: list[str],
    colors: dict[str, Any],
) -> None:
    n_m = len(methods)
    width = 0.8 / n_m
    handles = {}
    for i, s in enumerate(secs):
        for k, m in enumerate(methods):
            vals = data.loc[(data["section"] == s) & (data[gcol] == m), metric].dropna().to_numpy()
            if vals.size == 0:
                continue
            pos = i - 0.4 + width * (k + 0.5)
            if vals.size == 1:
                h = ax.bar(pos, vals[0], width=width * 0.9, color=colors[m], edgecolor="0.2", linewidth=0.5)
            else:
                bp = ax.boxplot(
                    vals,
                    positions=[pos],
                    widths=width * 0.8,
                    patch_artist=True,
                    showfliers=False,
                    medianprops={"color": "0.1", "linewidth": 1.0},
                )
                for patch in bp["boxes"]:
                    patch.set_facecolor(colors[m])
                    patch.set_alpha(0.85)
                h = bp["boxes"][0]
                ax.plot(pos, float(np.mean(vals)), marker="D", color="white", markeredgecolor="0.1", markersize=3.5)
            handles.setdefault(m, h)
    ax.set_xticks(np.arange(len(secs)))
    ax.set_xticklabels(secs)
    ax.set_xlim(-0.6, len(secs) - 0.4)
    ax.set_xlabel("section")
    ax.set_ylabel(metric)
    ax.axhline(0.0, color="0.6", linewidth=0.6, zorder=0)
    ax.grid(axis="y", alpha=0.3)
    if len(methods) > 1 or methods[0] != metric:
        ax.legend(handles.values(), handles.keys(), fontsize=8, frameon=False, loc="best")


def _gene_distribution(ax: Axes, per_gene: pd.DataFrame, metric: str, colors: dict[str, Any]) -> None:
    cols = list(per_gene.columns)
    vals = [per_gene[c].dropna().to_numpy() for c in cols]
    pos = np.arange(len(cols))
    keep = [i for i, v in enumerate(vals) if v.size > 1]
    if keep:
        parts = ax.violinplot([vals[i] for i in keep], positions=pos[keep], showmedians=True, showextrema=False)
        for body, i in zip(parts["bodies"], keep, strict=True):
            body.set_facecolor(colors[cols[i]])
            body.set_alpha(0.6)
        parts["cmedians"].set_color("0.1")
    rng = np.random.default_rng(0)
    for i, v in enumerate(vals):
        jitter = rng.uniform(-0.08, 0.08, v.size)
        ax.scatter(np.full(v.size, pos[i]) + jitter, v, s=6, color=colors[cols[i]], edgecolors="0.2", linewidths=0.2)
        if v.size:
            ax.text(
                pos[i],
                1.0,
                f"mean {np.mean(v):.3f}",
                transform=ax.get_xaxis_transform(),
                ha="center",
                va="bottom",
                fontsize=7,
            )
    ax.set_xticks(pos)
    ax.set_xticklabels(cols, rotation=30 if len(cols) > 3 else 0, ha="right" if len(cols) > 3 else "center")
    ax.set_ylabel(f"{metric} (per gene)")
    ax.axhline(0.0, color="0.6", linewidth=0.6, zorder=0)
    ax.grid(axis="y", alpha=0.3)


def _top_genes(ax: Axes, per_gene: pd.DataFrame, metric: str, colors: dict[str, Any], n_top: int) -> None:
    first = per_gene.columns[0]
    ascending = metric.lower() in LOWER_IS_BETTER
    top = per_gene.sort_values(first, ascending=ascending).head(n_top)
    cols = list(per_gene.columns)
    width = 0.8 / len(cols)
    x = np.arange(len(top))
    for k, m in enumerate(cols):
        ax.bar(x - 0.4 + width * (k + 0.5), top[m].to_numpy(), width=width, color=colors[m], label=m)
    ax.set_xticks(x)
    ax.set_xticklabels(top.index.astype(str), rotation=60, ha="right", fontsize=7)
    ax.set_ylabel(metric)
    ax.set_title(f"top {len(top)} genes ({first})", fontsize=9)
    ax.axhline(0.0, color="0.6", linewidth=0.6, zorder=0)
    ax.grid(axis="y", alpha=0.3)
    if len(cols) > 1:
        ax.legend(fontsize=7, frameon=False)


# --------------------------------------------------------------------------------------------------------------------
# training curve
# --------------------------------------------------------------------------------------------------------------------
@inject_docs(**_plot_params)
def training_curve(
    data: SpatialData | AnnData | ASIGNFit | Mapping[str, Any] | pd.DataFrame,
    *,
    key: str = Key.OUTPUT_TABLE,
    series: str | Sequence[str] | None = None,
    log_loss: bool | None = None,
    figsize: tuple[float, float] | None = None,
    title: str | None = None,
    save: str | os.PathLike[str] | None = None,
    show: bool | None = None,
    ax: Axes | Sequence[Axes] | None = None,
) -> Figure:
    """Loss and validation curves of an ASIGN training run.

    The history is looked up in ``sdata.tables[key].uns['asign']`` (written by :func:`asign.tl.impute` with
    ``method='asign'``) under the first key ``training``, ``history`` or ``curve`` found, searching nested dicts
    such as ``uns['asign']['result']``. It may be a dict of equal-length lists such as ``{{'epoch': [...],
    'loss_total': [...], 'val_pcc': [...]}}``, a training summary ``{{'curve': {{...}}, 'best_epoch': 12, ...}}``
    (the best epoch is marked), a list of per-epoch dicts, a :class:`pandas.DataFrame`, or one of these per fold
    (``{{'fold0': {{...}}, 'fold1': {{...}}}}``). Series of another length than the x axis (``epoch``, ...; else
    than most series) are left out with a warning. Series whose name contains ``loss`` go to the left panel, every
    other series (validation metrics) to the right panel; the learning rate (``lr``) is drawn only when named in
    ``series``. Folds, and the members of an ensemble (``n_models > 1``), are drawn as separate lines of the same
    colour, each with its best epoch; records written before session 15 hold the first member's curve only, and the
    title then says so (``training (member 1 of 3)``).

    Parameters
    ----------
    data
        A :class:`spatialdata.SpatialData` with the output table ``key``, that table itself, a model returned by
        :func:`asign.tl.fit` (its ``training`` record), or the history.
    {key}
    series
        Name or names of the series to draw; `None` draws all numeric series but the x axis (``epoch``, ``step``,
        ...).
    log_loss
        Log-scale the loss axis; `None` does so when every loss is positive and they span over a factor 20.
    {figsize}
    title
        Figure title (with ``ax``, added to the title of the first axes); by default ``training``, with the member
        shown for an ensemble.
    {save}
    {show}
    ax
        Axes to draw into instead of a new figure: one per panel (losses, validation metrics; panels without a
        series are left out), a single Axes when there is one panel.

    Returns
    -------
    The :class:`matplotlib.figure.Figure` (with ``ax``, the figure of the axes).
    """
    import matplotlib.pyplot as plt

    history = find_history(data, key)
    n_members = ensemble_size(history)
    if n_members is None and isinstance(getattr(data, "models", None), list | tuple):  # a fitted model
        n_members = len(data.models)
    per_member = member_runs(history)
    runs, bests = as_runs(per_member if per_member is not None else history)
    names: list[str] = []
    for frame in runs.values():
        for c in frame.columns:
            if c not in X_CANDIDATES and c not in names and pd.api.types.is_numeric_dtype(frame[c]):
                names.append(str(c))
    available = list(names)
    names = [n for n in names if n not in HIDDEN_SERIES]
    if series is not None:
        series = [series] if isinstance(series, str) else list(series)
        missing = [s for s in series if s not in available]
        if missing:
            msg = f"Series {missing} not found in the training history (series: {available})."
            raise KeyError(msg)
        names = list(series)
    if not names:
        msg = "The training history holds no series to plot."
        raise ValueError(msg)
    losses = [n for n in names if "loss" in n.lower()]
    others = [n for n in names if n not in losses]
    panels = [p for p in (losses, others) if p]
    drawn = [name for name, p in (("losses", losses), ("validation metrics", others)) if p]
    axs = _user_axes(ax, len(panels), what=f"the series drawn ({' and '.join(drawn)})")
    if axs is None:
        fig, grid = plt.subplots(
            1, len(panels), figsize=figsize or (4.2 * len(panels), 3.4), squeeze=False, layout="constrained"
        )
        axs = list(grid[0])
    else:
        fig = axs[0].figure
    cmap = plt.get_cmap("tab10")
    colors = {n: cmap(i % 10) for i, n in enumerate(names)}
    multi = len(runs) > 1
    for ax_, panel in zip(axs, panels, strict=True):
        for n in panel:
            labelled = False
            for frame in runs.values():
                if n not in frame.columns:
                    continue
                xcol = next((c for c in X_CANDIDATES if c in frame.columns), None)
                y = pd.to_numeric(frame[n], errors="coerce").to_numpy(dtype=float)
                x = frame[xcol].to_numpy(dtype=float) if xcol else np.arange(1, len(y) + 1)
                ok = np.isfinite(y)
                style = {"marker": "o", "markersize": 3} if ok.sum() < 30 else {}
                ax_.plot(
                    x[ok],
                    y[ok],
                    color=colors[n],
                    alpha=0.55 if multi else 1.0,
                    linewidth=1.2,
                    label=None if labelled else n,
                    **style,
                )
                labelled = True
        first = next(iter(runs.values()))
        ax_.set_xlabel(next((c for c in X_CANDIDATES if c in first.columns), "epoch"))
        ax_.grid(alpha=0.3)
        ax_.legend(fontsize=8, frameon=False)
        if panel is losses:
            ax_.set_ylabel("loss")
            vals = np.concatenate(
                [
                    pd.to_numeric(f[n], errors="coerce").to_numpy(float)
                    for f in runs.values()
                    for n in panel
                    if n in f.columns
                ]
            )
            vals = vals[np.isfinite(vals)]
            use_log = log_loss
            if use_log is None:
                use_log = bool(vals.size and vals.min() > 0 and vals.max() / vals.min() > 20)
            if use_log:
                ax_.set_yscale("log")
            ax_.set_title("loss", fontsize=10)
        else:
            ax_.set_ylabel("value")
            ax_.set_title("validation", fontsize=10)
            for best in bests.values():
                ax_.axvline(best, color="0.4", linestyle="--", linewidth=0.8, label=None)
            if bests:
                ax_.text(
                    0.99,
                    0.02,
                    "dashed: best epoch",
                    transform=ax_.transAxes,
                    ha="right",
                    va="bottom",
                    fontsize=7,
                    color="0.4",
                )
    label = title
    if label is None:
        if per_member is not None:
            label = f"training ({len(per_member)} members)"
        else:
            label = "training" + (f" (member 1 of {n_members})" if n_members is not None and n_members > 1 else "")
    runs_note = f"{len(runs)} runs: {', '.join(runs)}"
    if ax is None:
        if multi:
            fig.text(0.01, 0.01, runs_note, fontsize=7, color="0.4")
        fig.suptitle(label, fontsize=11)
        return finish(fig, save=save, show=show)
    if multi:
        axs[0].text(0.01, 0.98, runs_note, transform=axs[0].transAxes, ha="left", va="top", fontsize=7, color="0.4")
    axs[0].set_title(f"{label}: {axs[0].get_title()}", fontsize=10)
    return finish(fig, save=save, show=show, owned=False)
