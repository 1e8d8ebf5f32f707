"""The napari entry point: the stack's sections and an imputed table in napari-spatialdata's viewer."""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd

from asign._constants import Key
from asign._docs import inject_docs
from asign._logging import logger
from asign._stack import get_table

if TYPE_CHECKING:
    from spatialdata import SpatialData

_INSTALL_HINT = (
    "asign.pl.interactive needs napari and napari-spatialdata: install them with `pip install 'asign[napari]'` "
    '(or `pip install napari-spatialdata "napari[pyqt6]"`). On a machine without a display, run under '
    "`xvfb-run -a` with QT_QPA_PLATFORM=xcb."
)


def _import_interactive():
    try:
        from napari_spatialdata import Interactive
    except ImportError as e:
        raise ImportError(_INSTALL_HINT) from e
    return Interactive


def _process_events() -> None:
    from qtpy.QtWidgets import QApplication

    app = QApplication.instance()
    if app is not None:
        app.processEvents()


def _wait_for_layer(viewer: Any, name: str, n_before: int, timeout: float) -> Any:
    """Pump the Qt event loop until the layer ``name`` appears (napari-spatialdata loads elements in a thread)."""
    start = time.monotonic()
    while time.monotonic() - start < timeout:
        _process_events()
        if len(viewer.layers) > n_before and name in viewer.layers:
            return viewer.layers[name]
        time.sleep(0.02)
    msg = f"napari-spatialdata did not load element {name!r} within {timeout:.0f} s."
    raise TimeoutError(msg)


def _wait_idle(interactive: Any, timeout: float) -> None:
    """Wait for napari-spatialdata's loader thread to finish (it refuses new elements while busy)."""
    worker = getattr(getattr(interactive, "_sdata_widget", None), "worker_thread", None)
    start = time.monotonic()
    while worker is not None and worker.isRunning() and time.monotonic() - start < timeout:
        _process_events()
        time.sleep(0.02)
    _process_events()


def _view_widgets(viewer: Any) -> list[Any]:
    """napari-spatialdata's View widgets (those with a table and a layer combo box)."""
    return [
        w
        for w in viewer.window.dock_widgets.values()
        if getattr(w, "table_name_widget", None) is not None and getattr(w, "adata_layer_widget", None) is not None
    ]


def _select_in_view_widget(viewer: Any, table_key: str, layer: str) -> None:
    """Preselect the table and the layer in napari-spatialdata's View widget (best effort: private widgets)."""
    try:
        for widget in _view_widgets(viewer):
            i = widget.table_name_widget.findText(table_key)
            if i >= 0:
                widget.table_name_widget.setCurrentIndex(i)
            j = widget.adata_layer_widget.findText(layer)
            if j >= 0:
                widget.adata_layer_widget.setCurrentIndex(j)
    except (AttributeError, RuntimeError, TypeError) as e:  # pragma: no cover - depends on the plugin version
        logger.debug(f"Could not preselect table {table_key!r} / layer {layer!r} in the View widget: {e}")


def _preselect_for_all_layers(viewer: Any, spots_layers: list[Any], table_key: str, layer: str) -> None:
    """Preselect ``table_key`` / ``layer`` in the View widget whichever spots layer is selected.

    napari-spatialdata refills the View widget when the selected layer changes: it picks the first name of the
    layer's ``metadata['table_names']`` and resets the layer combo box to ``'X'``. ``table_key`` is therefore put
    first in every spots layer's table list, and the layer is selected again after each selection change.
    """
    for napari_layer in spots_layers:
        names = list(napari_layer.metadata.get("table_names") or [])
        if table_key in names:
            napari_layer.metadata["table_names"] = [table_key, *(n for n in names if n != table_key)]

    def _reselect(event: Any = None) -> None:
        if viewer.layers.selection.active in spots_layers:
            _select_in_view_widget(viewer, table_key, layer)

    viewer.layers.selection.events.changed.connect(_reselect, position="last")
    viewer.layers.selection.events.active.connect(_reselect, position="last")


def _set_colorbar(viewer: Any, cmap: str, lo: float, hi: float, label: str) -> None:
    """Show ``cmap`` on ``lo`` to ``hi`` in napari-spatialdata's colour bar dock (best effort: private widget)."""
    try:
        colorbar = viewer.window.dock_widgets["colorbar"]
        colorbar._model.cmap = cmap
        colorbar.setOclim((lo, hi))
        colorbar.setClim((lo, hi))
        colorbar.onClimChanged(lo, hi)
        colorbar.setToolTip(label)
        # the limits are printed beside the ends of the bar: leave room for them on the left and the right
        colorbar.getColorBar().padding = (0.2, 0.25)
        colorbar.update_color()
    except (AttributeError, KeyError, RuntimeError, TypeError) as e:  # pragma: no cover - plugin version
        logger.debug(f"Could not set napari-spatialdata's colour bar: {e}")


def _as_rgb(viewer: Any, napari_layer: Any) -> Any:
    """Show a 3-channel image as RGB.

    napari-spatialdata treats an image as RGB only when its channel coordinates are ``r``, ``g``, ``b``; other
    stacks show a greyscale channel slider. The layer is then replaced by an RGB layer with the same data
    (channel axis last), affine and metadata, so napari-spatialdata keeps managing it.
    """
    from napari.layers import Image

    if getattr(napari_layer, "rgb", True):
        return napari_layer
    levels = list(napari_layer.data) if napari_layer.multiscale else [napari_layer.data]
    if not all(getattr(lv, "dims", None) == ("c", "y", "x") and lv.sizes["c"] in (3, 4) for lv in levels):
        return napari_layer
    rgb = [lv.transpose("y", "x", "c").data for lv in levels]
    affine = np.asarray(napari_layer.affine.affine_matrix)[-3:, -3:]
    new = Image(
        rgb if len(rgb) > 1 else rgb[0],
        rgb=True,
        multiscale=len(rgb) > 1,
        name=napari_layer.name,
        affine=affine,
        metadata=napari_layer.metadata,
    )
    index = viewer.layers.index(napari_layer)
    viewer.layers.remove(napari_layer)
    viewer.layers.insert(index, new)
    return new


def _colour_layer(napari_layer: Any, values: np.ndarray, ids: np.ndarray, gene: str, *, cmap: Any, norm: Any) -> None:
    """Colour a spots layer by ``values`` (aligned with the shapes index ``ids``) on a given colour scale."""
    order = pd.Index(napari_layer.metadata.get("indices", ids))
    vec = pd.Series(values, index=pd.Index(ids)).reindex(order).to_numpy(dtype=float)
    colours = np.asarray(cmap(norm(np.nan_to_num(vec, nan=norm.vmin))), dtype=float)
    colours[~np.isfinite(vec)] = (0.5, 0.5, 0.5, 0.6)
    features = pd.DataFrame({gene: vec})
    features["index"] = order.to_numpy()
    napari_layer.features = features
    napari_layer.face_color = colours


def _zoom_to(viewer: Any, layers: list[Any], margin: float = 0.06) -> None:
    """After ``reset_view``, centre the camera on ``layers`` (the spots) and zoom so that they fill the view."""
    if not layers:
        return
    boxes = np.array([np.asarray(layer.extent.world, dtype=float)[:, -2:] for layer in layers])
    lo, hi = boxes[:, 0].min(axis=0), boxes[:, 1].max(axis=0)
    full = np.asarray(viewer.layers.extent.world, dtype=float)[:, -2:]
    size = np.maximum(hi - lo, 1e-9)
    ratio = float(np.min((full[1] - full[0]) / size))
    camera = viewer.scene.camera if hasattr(viewer, "scene") else viewer.camera
    if not np.isfinite(ratio) or ratio <= 1.0:
        return
    camera.center = tuple((lo + hi) / 2.0)
    camera.zoom = camera.zoom * ratio / (1.0 + 2.0 * margin)


def _grid_order(viewer: Any, grid_model: Any, names: list[str], secs: list[str]) -> str:
    """Sections by grid row (napari places layers by their position in the layer list)."""
    try:
        layers = list(viewer.layers)
        pos = {s: grid_model.position(layers.index(viewer.layers[n]), layers) for n, s in zip(names, secs, strict=True)}
    except (AttributeError, ValueError, KeyError):  # pragma: no cover - napari API differences
        return ", ".join(secs)
    rows: dict[int, list[tuple[int, str]]] = {}
    for s, (r, c) in pos.items():
        rows.setdefault(r, []).append((c, s))
    return " | ".join(" ".join(s for _, s in sorted(rows[r])) for r in sorted(rows))


def _set_text(viewer: Any, text: str) -> None:
    overlays = getattr(getattr(viewer, "canvas", None), "overlays", None)
    overlay = getattr(overlays, "text", None) if overlays is not None else None
    if overlay is None:  # napari < 0.9
        overlay = viewer.text_overlay
    overlay.visible = True
    overlay.text = text
    overlay.position = "top_left"
    overlay.font_size = 10


def _check_window_size(window_size: Any) -> None:
    """Raise unless ``window_size`` is `None` or a ``(width, height)`` pair of positive integers."""
    if window_size is None:
        return
    ok = isinstance(window_size, Sequence) and not isinstance(window_size, str) and len(window_size) == 2
    if ok:
        try:
            ok = all(int(v) == v and int(v) > 0 for v in window_size)
        except (TypeError, ValueError):
            ok = False
    if not ok:
        msg = f"`window_size` takes a `(width, height)` pair of positive pixel counts, got {window_size!r}."
        raise ValueError(msg)


def _check_annotates(table: Any, table_key: str, shapes_keys: list[str]) -> None:
    """Raise unless ``table`` is a SpatialData table annotating every spots element in ``shapes_keys``."""
    attrs = table.uns.get("spatialdata_attrs") or {}
    region = attrs.get("region")
    regions = [region] if isinstance(region, str) else list(region) if region is not None else []
    missing = [k for k in shapes_keys if k not in regions]
    if missing:
        msg = (
            f"Table {table_key!r} does not annotate the spots {missing} (its spatialdata_attrs region is "
            f"{region!r}); napari-spatialdata would show another table. Pass a table that annotates the spots, "
            "such as the output of `asign.tl.impute`."
        )
        raise ValueError(msg)


@inject_docs()
def interactive(
    sdata: SpatialData,
    *,
    table_key: str = Key.OUTPUT_TABLE,
    layer: str = Key.IMPUTED,
    gene: str | None = None,
    coordinate_system: str = Key.ALIGNED,
    sections: Sequence[str] | None = None,
    images: bool = True,
    cmap: str = "viridis",
    grid: bool = False,
    window_size: tuple[int, int] | None = None,
    zoom_to_spots: bool = True,
    stack_table_key: str = Key.TABLE,
    headless: bool = False,
    timeout: float = 120.0,
) -> Any:
    """Open the stack in napari with napari-spatialdata, spots coloured by imputed expression.

    Every section's image and spots are added in ``coordinate_system`` (by default the shared ``'aligned'`` frame,
    so the sections lie on top of each other; toggle layers to compare them), and napari-spatialdata's View widget
    is preselected on the table ``table_key`` and its layer ``layer``: double-click a gene to colour the selected
    spots layer by it. With ``gene``, every spots layer is coloured by that gene at once on one shared colour
    scale (hover shows the value). Needs the ``napari`` extra (``pip install 'asign[napari]'``).

    Parameters
    ----------
    {sdata}
    table_key
        Table whose values colour the spots (the output of :func:`asign.tl.impute` by default); it must annotate
        the spots shapes.
    layer
        Layer of ``table_key`` preselected in the View widget and used for ``gene`` (``'X'`` for ``.X``).
    gene
        Colour every section's spots by this gene on one shared colour scale; `None` leaves the colouring to the
        View widget.
    coordinate_system
        Coordinate system to show (``'aligned'`` after :func:`asign.pp.align_layers`, or a section's native one).
    sections
        Sections to add; `None` adds all.
    images
        Whether to add the H&E images.
    cmap
        Colormap for ``gene``.
    grid
        Show the sections side by side (napari's grid mode, one cell per section) instead of on top of each other.
    window_size
        Resize the napari window to ``(width, height)`` pixels (useful for screenshots).
    zoom_to_spots
        Centre and zoom the view on the spots instead of the whole images.
    stack_table_key
        Key of the stack's spot table (the section manifest).
    headless
        Build the viewer without starting napari's event loop (for scripts, tests and screenshots; run under
        ``xvfb-run`` without a display). With `False`, the call blocks until the window is closed.
    timeout
        Seconds to wait for each element to load.

    Returns
    -------
    The :class:`napari_spatialdata.Interactive` object; ``.screenshot()`` returns the window as an RGBA array
    and ``._viewer`` is the :class:`napari.Viewer`.
    """
    from matplotlib import colormaps
    from matplotlib.colors import Normalize
    from spatialdata.transformations import get_transformation

    from asign.io import validate_stack
    from asign.pl._plots import _gene_values, _select_sections
    from asign.pl._utils import shared_norm, spot_ids

    stack = validate_stack(sdata, table_key=stack_table_key, check_counts=False)
    spot_table = get_table(sdata, stack_table_key)
    if gene is not None and not isinstance(gene, str):
        msg = f"`gene` takes one gene name (a string), got {gene!r}; call `asign.pl.interactive` once per gene."
        raise TypeError(msg)
    _check_window_size(window_size)
    secs = _select_sections(stack, sections)
    missing = [s for s in secs if coordinate_system not in get_transformation(sdata[stack.shapes_key(s)], get_all=True)]
    if missing:
        msg = (
            f"Sections {missing} have no transformation to coordinate system {coordinate_system!r}; "
            "run `asign.pp.align_layers` first, or view one section in its native coordinate system "
            "(`coordinate_system=<section>, sections=[<section>]`)."
        )
        raise ValueError(msg)
    if table_key not in sdata.tables:
        # impute's output tables record their method (the stack and tile tables carry only the manifest)
        outputs = [
            k
            for k, t in sdata.tables.items()
            if isinstance(t.uns.get(Key.UNS), dict) and "method" in t.uns[Key.UNS] and k != stack_table_key
        ]
        if outputs:
            hint = f"output tables of `asign.tl.impute` here: {outputs}; pass `table_key={outputs[0]!r}`"
        else:
            hint = "run `asign.tl.impute` first"
        msg = (
            f"Table {table_key!r} not found (tables: {list(sdata.tables)}); {hint}, or pass "
            f"`table_key={stack_table_key!r}` (with `layer='X'`) to view the measured counts."
        )
        raise KeyError(msg)
    out = get_table(sdata, table_key)
    _check_annotates(out, table_key, [stack.shapes_key(s) for s in secs])
    if cmap not in colormaps:
        msg = f"Unknown colour map `cmap={cmap!r}`; use a matplotlib colour map name such as 'viridis'."
        raise ValueError(msg)
    if layer != "X" and layer not in out.layers:
        msg = f"Layer {layer!r} not found in table {table_key!r} (layers: {list(out.layers)})."
        raise KeyError(msg)
    values = None
    if gene is not None:
        values = _gene_values(out, gene, layer, spot_table, key=table_key, param="layer")
    Interactive = _import_interactive()

    viewer_app = Interactive(sdata, headless=True)
    viewer = viewer_app._viewer
    if window_size is not None:
        viewer.window.resize(int(window_size[0]), int(window_size[1]))
    masks = {s: (spot_table.obs[Key.SECTION].astype(str) == s).to_numpy() for s in secs}
    norm = None
    if values is not None:
        lo, hi = shared_norm([values[m] for m in masks.values()])
        norm = Normalize(vmin=lo, vmax=hi)
    elements = []
    for s in secs:
        ikey = stack.image_key(s)
        if images and ikey is not None and ikey in sdata.images:
            elements.append((s, ikey, False))
        elements.append((s, stack.shapes_key(s), True))
    if grid and images and any(stack.image_key(s) is None for s in secs):
        logger.warning(
            "Grid mode pairs each section's image with its spots; sections without an image "
            f"{[s for s in secs if stack.image_key(s) is None]} shift the pairing. Pass `sections=` to leave them out."
        )
    for s, name, is_spots in elements:
        _wait_idle(viewer_app, timeout)
        n_before = len(viewer.layers)
        viewer_app.add_element(element=name, element_coordinate_system=coordinate_system)
        napari_layer = _wait_for_layer(viewer, name, n_before, timeout)
        if not is_spots:
            _as_rgb(viewer, napari_layer)
        if is_spots and values is not None:
            ids = spot_ids(spot_table, masks[s])
            _colour_layer(napari_layer, values[masks[s]], ids, gene, cmap=colormaps[cmap], norm=norm)
    _wait_idle(viewer_app, timeout)
    try:
        viewer_app.switch_coordinate_system(coordinate_system)
    except ValueError:  # pragma: no cover - coordinate system listed by the widget under another name
        logger.debug(f"Could not switch napari-spatialdata to {coordinate_system!r}.")
    spots_layers = [viewer.layers[stack.shapes_key(s)] for s in secs]
    _preselect_for_all_layers(viewer, spots_layers, table_key, layer)
    _select_in_view_widget(viewer, table_key, layer)
    if norm is not None:
        _set_colorbar(viewer, cmap, float(norm.vmin), float(norm.vmax), f"{gene} ({layer})")
    if grid:
        canvas = getattr(viewer, "canvas", None)
        grid_model = canvas.grid if canvas is not None and hasattr(canvas, "grid") else viewer.grid
        grid_model.enabled = True
        grid_model.stride = 2 if images else 1
        grid_model.shape = (1, len(secs)) if len(secs) <= 4 else (-1, -1)
    viewer.reset_view()
    if zoom_to_spots:
        _zoom_to(viewer, [viewer.layers[stack.shapes_key(s)] for s in secs])
    lines = []
    if gene is not None:
        lines.append(f"{gene} ({table_key} {layer}): {norm.vmin:.2f} to {norm.vmax:.2f} ({cmap})")
    if grid:
        lines.append("sections: " + _grid_order(viewer, grid_model, [stack.shapes_key(s) for s in secs], secs))
    if lines:
        _set_text(viewer, "\n".join(lines))
    _process_events()
    logger.info(
        f"Added {len(elements)} elements of sections {secs} in coordinate system {coordinate_system!r} to napari."
    )
    if not headless:
        viewer_app.run()
    return viewer_app
