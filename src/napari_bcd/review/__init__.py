"""The review loop: decisions and uncertainty, corrections and retraining, region tables, saliency, quality.

Qt-free; the "Review and retrain" dock is a thin shell over these.  Names are
imported lazily (torch only when a function needs it).
"""

from __future__ import annotations

from .._lazy import lazy_names

# Decision rules and the quality score live below the engine (napari_bcd.decision, napari_bcd.quality);
# they are named here too, beside the review loop that sets them.
_LAZY: dict[str, str] = {
    "DecisionRule": "..decision",
    "MEASURES": "..decision",
    "apply_decision": "..decision",
    "uncertainty": "..decision",
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
    "RetrainSettings": "retrain",
    "iter_retrain": "retrain",
    "next_model_path": "retrain",
    "SaliencyMap": "saliency",
    "gradcam": "saliency",
    "iter_saliency": "saliency",
    "quality_scores": "..quality",
    "window_quality": "..quality",
}

__all__ = sorted(_LAZY)


__getattr__, __dir__ = lazy_names(__name__, _LAZY, globals())
