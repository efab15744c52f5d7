"""Datasets (ICIAR folders, BACH), groups, validation, protocols, fine-tuning, probes and evaluation."""

from .._progress import STOP
from .evaluate import Report, evaluate
from .features import FeatureProgress
from .finetune import Stage, TrainPlan, TrainResult, iter_finetune
from .headfit import FitProgress, Recipe
from .iciar import Dataset, read_iciar
from .patches import ExportResult, iter_export_patches, plan_patches
from .protocol import AUTO, PAPER, Protocol
from .select import Validation, plan_validation
from .split import Split, split_dataset

__all__ = [
    "AUTO",
    "PAPER",
    "STOP",
    "Dataset",
    "ExportResult",
    "FeatureProgress",
    "FitProgress",
    "Protocol",
    "Recipe",
    "Report",
    "Split",
    "Stage",
    "TrainPlan",
    "TrainResult",
    "Validation",
    "evaluate",
    "iter_export_patches",
    "iter_finetune",
    "plan_patches",
    "plan_validation",
    "read_iciar",
    "split_dataset",
]
