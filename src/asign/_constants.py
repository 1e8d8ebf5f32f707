"""Every key name asign reads or writes, in one place."""

from __future__ import annotations


class Key:
    """Default keys of the section-stack contract and of asign's outputs."""

    # inputs (the stack)
    TABLE = "table"
    REGION = "region"
    INSTANCE = "spot_id"
    SECTION = "section"
    MEASURED = "measured"
    BARCODE = "barcode"
    SPATIAL = "spatial"
    COUNTS = "counts"
    TOTAL_COUNTS = "total_counts"
    IMAGE_PREFIX = "he_"
    SHAPES_PREFIX = "spots_"
    UNS = "asign"
    STACK = "stack"
    UNMEASURED_GENES = "unmeasured_genes"
    HER2ST_REFERENCE = "spatial_her2st_reference"

    # alignment
    ALIGNED = "aligned"
    ALIGNMENT = "alignment"
    SPATIAL_ALIGNED = "spatial_aligned"
    SPATIAL_3D = "spatial_3d"
    Z = "z"

    # graphs, features, outputs
    ADDED = "asign"
    OVERLAP = "asign_overlap"
    OUTPUT_TABLE = "asign"
    TARGET = "target"
    IMPUTED = "imputed"
    NETWORK = "network"
    KNOWN = "known"

    @staticmethod
    def connectivities(key: str) -> str:
        return f"{key}_connectivities"

    @staticmethod
    def distances(key: str) -> str:
        return f"{key}_distances"

    @staticmethod
    def neighbors(key: str) -> str:
        return f"{key}_neighbors"

    @staticmethod
    def image(section: str) -> str:
        return f"{Key.IMAGE_PREFIX}{section}"

    @staticmethod
    def shapes(section: str) -> str:
        return f"{Key.SHAPES_PREFIX}{section}"

    @staticmethod
    def features(key: str, level: str) -> str:
        return f"{key}_features_{level}"

    TILE_FEATURES = "features"
    """``obsm`` key of the features in the tile tables of ``extract_features``."""

    @staticmethod
    def views(key: str) -> str:
        """``obsm`` key of the per-view features stored beside ``key`` (``extract_features(keep_views=True)``)."""
        return f"{key}_views"
