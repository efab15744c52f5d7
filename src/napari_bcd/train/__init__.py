"""Datasets (ICIAR folders), fine-tuning and evaluation."""

from .evaluate import Report, evaluate
from .finetune import EpochStats, iter_finetune
from .iciar import Dataset, ExportResult, iter_export_patches, read_iciar

__all__ = [
    "Dataset",
    "EpochStats",
    "ExportResult",
    "Report",
    "evaluate",
    "iter_export_patches",
    "iter_finetune",
    "read_iciar",
]
