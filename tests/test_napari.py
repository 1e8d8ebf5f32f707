"""napari-spatialdata entry point.

The viewer test is opt-in (``ASIGN_TEST_NAPARI=1``) and needs the ``napari`` extra and a display: run it as
``ASIGN_TEST_NAPARI=1 xvfb-run -a -s "-screen 0 1600x1000x24" python -m pytest -m napari tests/test_napari.py``.
"""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from asign._constants import Key

HAS_NAPARI = importlib.util.find_spec("napari_spatialdata") is not None
RUN_NAPARI = os.environ.get("ASIGN_TEST_NAPARI", "") == "1"


def _qt_start_error() -> str | None:
    """Start a Qt application in a child process; Qt aborts the whole process when its platform plugin can't load."""
    code = "from qtpy.QtWidgets import QApplication; app = QApplication([]); print('ok')"
    try:
        res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    except subprocess.TimeoutExpired:
        return "starting a Qt application timed out"
    if res.returncode != 0 or "ok" not in res.stdout:
        return f"Qt cannot start here (exit {res.returncode}): {res.stderr.strip()[-300:]}"
    return None


def _helpers():
    spec = importlib.util.spec_from_file_location("_asign_test_pl", Path(__file__).with_name("test_pl.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.skipif(HAS_NAPARI, reason="napari-spatialdata is installed")
def test_interactive_without_napari_explains_install(small_stack):
    import asign

    h = _helpers()
    h.align_truth(small_stack)
    h.add_output_table(small_stack)
    with pytest.raises(ImportError, match=r"asign\[napari\]"):
        asign.pl.interactive(small_stack, headless=True)


def test_interactive_checks_inputs_before_napari(small_stack):
    import asign

    h = _helpers()
    h.add_output_table(small_stack)
    with pytest.raises(ValueError, match="align_layers"):
        asign.pl.interactive(small_stack, headless=True)
    with pytest.raises(KeyError, match=r"Table 'nope' not found.*table_key='asign'"):
        asign.pl.interactive(small_stack, table_key="nope", coordinate_system="S1", sections=["S1"], headless=True)
    with pytest.raises(ValueError, match=r"sections=\[<section>\]"):
        asign.pl.interactive(small_stack, coordinate_system="S1", headless=True)
    with pytest.raises(ValueError, match="Unknown colour map `cmap='notacmap'`"):
        asign.pl.interactive(small_stack, coordinate_system="S1", sections=["S1"], cmap="notacmap", headless=True)


def test_interactive_checks_alignment_before_table(small_stack):
    import asign

    # unaligned and not imputed: the first thing to do is aligning
    with pytest.raises(ValueError, match="align_layers"):
        asign.pl.interactive(small_stack, headless=True)


def test_interactive_rejects_bad_gene_and_window_size(small_stack):
    import asign

    h = _helpers()
    h.align_truth(small_stack)
    h.add_output_table(small_stack)
    with pytest.raises(TypeError, match=r"one gene name \(a string\)"):
        asign.pl.interactive(small_stack, gene=["gene_001", "gene_002"], headless=True)
    for bad in [(10,), (0, 10), "800x600", (1.5, 2)]:
        with pytest.raises(ValueError, match=r"`window_size` takes a `\(width, height\)` pair"):
            asign.pl.interactive(small_stack, window_size=bad, headless=True)


def test_interactive_names_output_tables_of_another_key(small_stack):
    import asign

    h = _helpers()
    h.align_truth(small_stack)
    h.add_output_table(small_stack)
    small_stack.tables["mykey"] = small_stack.tables.pop(Key.OUTPUT_TABLE)
    small_stack.tables["mykey"].uns[Key.UNS] = {**small_stack.tables["mykey"].uns.get(Key.UNS, {}), "method": "mean"}
    # a table carrying only the manifest (like the tile tables) is not an output of impute
    tiles = small_stack.tables["mykey"].copy()
    tiles.uns[Key.UNS] = {"stack": {}}
    small_stack.tables["tiles_like"] = tiles
    with pytest.raises(KeyError, match=r"output tables of `asign.tl.impute` here: \['mykey'\].*table_key='mykey'"):
        asign.pl.interactive(small_stack, headless=True)


def test_interactive_rejects_table_not_annotating_spots(small_stack):
    import anndata as ad

    import asign

    h = _helpers()
    h.align_truth(small_stack)
    out = h.add_output_table(small_stack)
    plain = ad.AnnData(X=np.asarray(out.layers["imputed"]), var=out.var.copy())
    plain.layers["imputed"] = plain.X.copy()
    small_stack.tables["plain"] = plain
    with pytest.raises(ValueError, match=r"Table 'plain' does not annotate the spots"):
        asign.pl.interactive(small_stack, table_key="plain", gene="gene_003", headless=True)


@pytest.mark.napari
@pytest.mark.skipif(not RUN_NAPARI, reason="set ASIGN_TEST_NAPARI=1 (needs napari[pyqt6], napari-spatialdata, Xvfb)")
@pytest.mark.skipif(not HAS_NAPARI, reason="napari-spatialdata is not installed (pip install 'asign[napari]')")
@pytest.mark.filterwarnings("ignore::UserWarning", "ignore::RuntimeWarning")
def test_interactive_headless_screenshot(small_stack, tmp_path):
    os.environ.setdefault("QT_QPA_PLATFORM", "xcb")
    os.environ.setdefault("QT_API", "pyqt6")
    if not os.environ.get("DISPLAY"):
        pytest.skip("no display; run under xvfb-run")
    error = _qt_start_error()
    if error is not None:
        pytest.skip(f"{error} (see docs/installation.md for the X libraries Qt needs)")
    from matplotlib import colormaps
    from matplotlib.colors import Normalize

    import asign

    h = _helpers()
    h.align_truth(small_stack)
    out = h.add_output_table(small_stack)
    app = asign.pl.interactive(small_stack, gene="gene_003", headless=True, grid=True, window_size=(1400, 900))
    viewer = app._viewer
    try:
        names = [layer.name for layer in viewer.layers]
        assert names == ["he_S1", "spots_S1", "he_S2", "spots_S2", "he_S3", "spots_S3"]
        for s in ("S1", "S2", "S3"):
            assert viewer.layers[f"he_{s}"].rgb  # H&E shown in colour
        # spots coloured on one shared scale, in the order of the layer's shapes index
        vals = out[:, "gene_003"].layers["imputed"].ravel()
        norm = Normalize(float(vals.min()), float(vals.max()))
        sec = out.obs[Key.SECTION].astype(str).to_numpy()
        for s in ("S1", "S2", "S3"):
            layer = viewer.layers[f"spots_{s}"]
            ids = out.obs.loc[sec == s, Key.INSTANCE].to_numpy()
            order = np.asarray(layer.metadata["indices"])
            expected = colormaps["viridis"](norm(vals[sec == s][np.argsort(ids)][order]))
            np.testing.assert_allclose(np.asarray(layer.face_color), expected, atol=1e-6)
            np.testing.assert_allclose(layer.features["gene_003"].to_numpy(), vals[sec == s][order], rtol=1e-6)
            # spots sit at the aligned positions (napari: (y, x) data mapped by the layer's affine)
            world = np.asarray([layer.data_to_world(p) for p in layer.data])[:, ::-1]
            aligned_px = small_stack.tables[Key.TABLE].obsm[Key.SPATIAL_ALIGNED][sec == s] / 8.0
            np.testing.assert_allclose(world, aligned_px[order], atol=1e-3)
        # the colour bar dock shows the limits used for the spots
        colorbar = viewer.window.dock_widgets["colorbar"]
        np.testing.assert_allclose(colorbar.getClim(), (norm.vmin, norm.vmax), rtol=1e-6)
        assert colorbar.getColorBar().clim == (f"{norm.vmin:.2f}", f"{norm.vmax:.2f}")
        # the View widget keeps the output table and its layer whichever spots layer is selected
        view = next(w for w in viewer.window.dock_widgets.values() if hasattr(w, "adata_layer_widget"))
        for s in ("S1", "S2", "S3", "S1"):
            viewer.layers.selection.active = viewer.layers[f"spots_{s}"]
            assert view.table_name_widget.currentText() == Key.OUTPUT_TABLE, s
            assert view.adata_layer_widget.currentText() == "imputed", s
        shot = app.screenshot()
        assert shot.ndim == 3 and shot.shape[2] == 4
        rgb = shot[..., :3].astype(float)
        assert rgb.std() > 20
        assert len(np.unique(shot[..., :3].reshape(-1, 3), axis=0)) > 200
        from matplotlib.image import imsave

        imsave(tmp_path / "napari.png", shot)
        target = os.environ.get("ASIGN_NAPARI_SCREENSHOT")
        if target:
            imsave(target, shot)
    finally:
        viewer.close()
