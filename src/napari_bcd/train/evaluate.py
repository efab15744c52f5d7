"""Evaluation in the layout of the paper's Table III, computed with scikit-learn."""

from __future__ import annotations

import json
import math
import os
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    from ..model.classifier import Classifier
    from .iciar import Dataset

__all__ = ["Report", "evaluate", "report_from_predictions"]


@dataclass
class Report:
    """Per-class precision, recall, F1 and support; accuracy; averages; confusion matrix."""

    classes: list[str]
    precision: list[float]
    recall: list[float]
    f1: list[float]
    support: list[int]
    accuracy: float
    macro: dict[str, float]
    weighted: dict[str, float]
    confusion: list[list[int]]  # rows: true class, columns: predicted
    #: The accuracy's 95 % interval and how it was drawn (:func:`accuracy_interval`; set by :func:`evaluate`).
    interval: tuple[float, float] | None = None
    interval_method: str = ""
    #: Top-label calibration error of the probabilities on these images (set by :func:`evaluate`).
    ece: float | None = None

    def to_dict(self) -> dict:
        return asdict(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2)

    def to_text(self) -> str:
        """Table III: one row per class, then accuracy, macro and weighted averages."""
        w = max(12, *(len(c) for c in self.classes))
        col = max(8, *(len(c) for c in self.classes))  # whole names: "Carcinom" would head two columns
        lines = [f"{'':<{w}} {'precision':>9} {'recall':>9} {'f1-score':>9} {'support':>9}", ""]
        for i, c in enumerate(self.classes):
            lines.append(f"{c:<{w}} {self.precision[i]:>9.4f} {self.recall[i]:>9.4f} {self.f1[i]:>9.4f} "
                         f"{self.support[i]:>9d}")
        n = sum(self.support)
        lines += [
            "",
            f"{'accuracy':<{w}} {'':>9} {'':>9} {self.accuracy:>9.4f} {n:>9d}",
            f"{'macro avg':<{w}} {self.macro['precision']:>9.4f} {self.macro['recall']:>9.4f} "
            f"{self.macro['f1']:>9.4f} {n:>9d}",
            f"{'weighted avg':<{w}} {self.weighted['precision']:>9.4f} {self.weighted['recall']:>9.4f} "
            f"{self.weighted['f1']:>9.4f} {n:>9d}",
            *([f"accuracy 95% interval: {self.interval[0]:.4f}-{self.interval[1]:.4f} ({self.interval_method})"]
              if self.interval is not None else []),
            *([f"calibration error (ECE) of the probabilities: {self.ece:.4f}"] if self.ece is not None else []),
            "",
            "confusion matrix (rows: true, columns: predicted)",
            " " * w + " " + " ".join(f"{c:>{col}}" for c in self.classes),
        ]
        for c, row in zip(self.classes, self.confusion, strict=True):
            lines.append(f"{c:<{w}} " + " ".join(f"{v:>{col}d}" for v in row))
        return "\n".join(lines)

    def save_confusion_png(self, path: str | os.PathLike[str], replace: str = "ours") -> Path:
        """The confusion matrix as a PNG (matplotlib's Agg canvas: no display, no global backend switch), written
        under the output guard (``replace``: see :func:`napari_bcd._fileio.check_output`)."""
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure

        from .._fileio import output_path

        cm = np.asarray(self.confusion)
        fig = Figure(figsize=(5, 4.5), dpi=120)
        FigureCanvasAgg(fig)
        ax = fig.add_subplot()
        ax.imshow(cm, cmap="Blues")
        for (i, j), v in np.ndenumerate(cm):
            ax.text(j, i, str(v), ha="center", va="center", color="white" if v > cm.max() / 2 else "black")
        ax.set_xticks(range(len(self.classes)), self.classes, rotation=30)
        ax.set_yticks(range(len(self.classes)), self.classes)
        ax.set_xlabel("predicted")
        ax.set_ylabel("true")
        ax.set_title(f"accuracy {self.accuracy:.3f}")
        fig.tight_layout()
        with output_path(path, replace) as tmp:
            fig.savefig(tmp, format="png")
        return Path(path)


def report_from_predictions(y_true: Sequence[int], y_pred: Sequence[int], classes: Sequence[str]) -> Report:
    """A :class:`Report` from integer labels (0-based) with scikit-learn."""
    from sklearn.metrics import accuracy_score, confusion_matrix, precision_recall_fscore_support

    labels = list(range(len(classes)))
    p, r, f, s = precision_recall_fscore_support(y_true, y_pred, labels=labels, zero_division=0)
    # Averages over the classes that have images: a class the data lacks must not pull macro F1 down
    # (two present classes at 0.816 read as 0.408 when two absent ones were averaged in).
    present = sorted({int(v) for v in y_true}) or labels
    avg = {}
    for kind in ("macro", "weighted"):
        ap, ar, af, _ = precision_recall_fscore_support(y_true, y_pred, labels=present, average=kind, zero_division=0)
        avg[kind] = {"precision": float(ap), "recall": float(ar), "f1": float(af)}
    return Report(
        classes=list(classes),
        precision=[float(v) for v in p],
        recall=[float(v) for v in r],
        f1=[float(v) for v in f],
        support=[int(v) for v in s],
        accuracy=float(accuracy_score(y_true, y_pred)),
        macro=avg["macro"],
        weighted=avg["weighted"],
        confusion=confusion_matrix(y_true, y_pred, labels=labels).tolist(),
    )


def evaluate(checkpoint: str | os.PathLike[str] | Classifier, dataset: Dataset, *, indices: Sequence[int] | None = None,
             device: str | None = None,
             batch_size: int = 8) -> Report:
    """Classify a dataset's images with a checkpoint (or model) and report Table III figures.

    Each image is resized to the model's input (area averaging), as in training.
    """
    from ..model.checkpoint import load_checkpoint
    from ..model.classifier import Classifier
    from ..model.inference import Predictor
    from ..windows import resize_area

    model = checkpoint if isinstance(checkpoint, Classifier) else load_checkpoint(checkpoint)
    idx = list(range(len(dataset))) if indices is None else list(indices)
    to_model = _class_mapping(dataset, model.classes, idx)
    from .calibration import expected_calibration_error

    pred = Predictor(model, device=device)
    probs = []
    for k in range(0, len(idx), batch_size):
        batch = np.stack([resize_area(dataset.load(i), model.card.input_px) for i in idx[k : k + batch_size]])
        probs.append(np.asarray(pred(batch), np.float64))
    p = np.concatenate(probs) if probs else np.zeros((0, len(model.classes)))
    y_true = [to_model[int(dataset.labels[i])] for i in idx]
    report = report_from_predictions(y_true, p.argmax(1).tolist(), model.classes)
    right = p.argmax(1) == np.asarray(y_true, np.int64)
    groups = [dataset.groups[i] for i in idx] if dataset.groups is not None else None
    report.interval, report.interval_method = accuracy_interval(right, groups, kind=dataset.group_kind or "group")
    report.ece = expected_calibration_error(p, np.asarray(y_true, np.int64)) if len(p) else None
    return report


#: Resamples of the groups for a grouped interval (:func:`accuracy_interval`).
BOOTSTRAP = 2000


def accuracy_interval(right: np.ndarray, groups: Sequence[str] | None = None, *, kind: str = "group",
                      seed: int = 0) -> tuple[tuple[float, float] | None, str]:
    """The accuracy's 95 % interval, in words how it was drawn: over groups (patients, slides) when they are known,
    resampling whole groups (images of one patient stand or fall together: an interval over images would be too
    narrow), else Wilson's score interval over images.  ``(None, reason)`` for no images, or a single group."""
    right = np.asarray(right, bool)
    n = len(right)
    if n == 0:
        return None, "no images"
    if groups is not None:
        names, inverse = np.unique(np.asarray([str(g) for g in groups], dtype=object), return_inverse=True)
        words = f"{kind}s" if kind and kind != "group" else "groups"
        if len(names) < 2:
            return None, f"one {kind or 'group'} only: no interval says anything about others"
        hits = np.bincount(inverse, weights=right.astype(np.float64), minlength=len(names))
        sizes = np.bincount(inverse, minlength=len(names)).astype(np.float64)
        draw = np.random.default_rng(seed).integers(0, len(names), (BOOTSTRAP, len(names)))
        acc = hits[draw].sum(1) / sizes[draw].sum(1)
        lo, hi = np.percentile(acc, [2.5, 97.5])
        return (float(lo), float(hi)), f"{len(names)} {words} resampled, {n} images"
    z = 1.959963984540054
    phat = right.mean()
    centre = (phat + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(phat * (1 - phat) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return (max(0.0, centre - half), min(1.0, centre + half)), (
        f"Wilson, {n} images taken as independent: too narrow if several come from one patient")


def _class_mapping(dataset, model_classes, idx) -> dict[int, int]:
    """Dataset class index -> model output index, by class name (aliases included).

    Raises
    ------
    DatasetError
        When the images include a class the model does not have.
    """
    from ..classes import class_key as key
    from ..errors import DatasetError

    model_keys = {key(n): j for j, n in enumerate(model_classes)}
    present = sorted({int(dataset.labels[i]) for i in idx})
    mapping, missing = {}, []
    for c in present:
        j = model_keys.get(key(dataset.classes[c]))
        if j is None:
            missing.append(dataset.classes[c])
        else:
            mapping[c] = j
    if missing:
        raise DatasetError(
            f"The images include {', '.join(missing)}, which the model does not know (its classes: "
            f"{', '.join(model_classes)}). Evaluate on a folder with the model's classes only."
        )
    return mapping
