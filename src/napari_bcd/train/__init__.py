"""Datasets (ICIAR folders, BACH), groups, validation, protocols, fine-tuning, probes and evaluation."""

from .._progress import STOP
from .evaluate import Report, evaluate
from .features import FeatureProgress
from .finetune import Stage, TrainPlan, TrainResult, iter_finetune
from .headfit import FitProgress, Recipe
from .iciar import Dataset, ExportResult, iter_export_patches, read_iciar
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
    "plan_validation",
    "read_iciar",
    "split_dataset",
]
