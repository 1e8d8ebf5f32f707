"""Preprocessing: virtual spots, alignment, spot overlaps, 3D graphs, genes and normalisation, image features."""

from __future__ import annotations

from asign._lazy import lazy_namespace

_MAPPING = {
    "make_spots": "_make_spots",
    "align_layers": "_align",
    "spot_overlaps": "_graph",
    "neighbors_3d": "_graph",
    "select_genes": "_genes",
    "normalize": "_genes",
    "make_tiles": "_tiles",
    "extract_features": "_features",
}
__all__ = sorted(_MAPPING)
__getattr__, __dir__ = lazy_namespace(__name__, _MAPPING)
