"""Datasets (ICIAR folders, BACH), splits, protocols, fine-tuning, probes and evaluation."""

from .evaluate import Report, evaluate
from .finetune import STOP, EpochStats, FeatureProgress, TrainPlan, TrainResult, iter_finetune
from .iciar import Dataset, ExportResult, iter_export_patches, read_iciar
from .protocol import AUTO, PAPER, Protocol
from .split import Split, split_dataset

__all__ = [
    "AUTO",
    "PAPER",
    "STOP",
    "Dataset",
    "EpochStats",
    "ExportResult",
    "FeatureProgress",
    "Protocol",
    "Report",
    "Split",
    "TrainPlan",
    "TrainResult",
    "evaluate",
    "iter_export_patches",
    "iter_finetune",
    "read_iciar",
    "split_dataset",
]
