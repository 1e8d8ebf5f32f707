"""Plotting: alignment overlays, measured vs imputed sections, 3D scatter, metrics, training curves, napari."""

from __future__ import annotations

from asign._lazy import lazy_namespace

_MAPPING = {
    "alignment": "_alignment",
    "sections": "_plots",
    "scatter_3d": "_plots",
    "metrics": "_plots",
    "training_curve": "_plots",
    "interactive": "_napari",
}
__all__ = sorted(_MAPPING)
__getattr__, __dir__ = lazy_namespace(__name__, _MAPPING)
