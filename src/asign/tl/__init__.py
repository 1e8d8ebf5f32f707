"""Tools: imputation (ASIGN and baselines), model fitting, evaluation and cross-validation."""

from __future__ import annotations

from asign._lazy import lazy_namespace

_MAPPING = {
    "impute": "_impute",
    "evaluate": "_evaluate",
    "cross_validate": "_cv",
    "fit": "_fit",
    "predict": "_fit",
    "ASIGNFit": "_fit",
}
__all__ = sorted(_MAPPING)
__getattr__, __dir__ = lazy_namespace(__name__, _MAPPING)
