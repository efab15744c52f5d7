"""The review loop: decisions and uncertainty, corrections and retraining, region tables, saliency, quality.

Qt-free; the "Review and retrain" dock is a thin shell over these.  Names are
imported lazily (torch only when a function needs it).
"""

from __future__ import annotations

import importlib
from typing import Any

_LAZY: dict[str, str] = {
    "DecisionRule": "decision",
    "MEASURES": "decision",
    "apply_decision": "decision",
    "uncertainty": "decision",
    "UncertainRegion": "uncertain",
    "uncertain_regions": "uncertain",
    "RegionRow": "regions",
    "region_table": "regions",
    "region_table_csv": "regions",
    "region_annotations": "regions",
    "Correction": "corrections",
    "Corrections": "corrections",
    "corrections_from_labels": "corrections",
    "corrections_from_annotations": "corrections",
    "read_corrections": "corrections",
    "RetrainPlan": "retrain",
    "RetrainResult": "retrain",
    "iter_retrain": "retrain",
    "next_model_path": "retrain",
    "SaliencyMap": "saliency",
    "gradcam": "saliency",
    "iter_saliency": "saliency",
    "quality_scores": "quality",
    "window_quality": "quality",
}

__all__ = sorted(_LAZY)


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        value = getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return __all__
