"""Evaluation in the layout of the paper's Table III, computed with scikit-learn."""

from __future__ import annotations

import json
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
    pred = Predictor(model, device=device)
    y_pred: list[int] = []
    for k in range(0, len(idx), batch_size):
        batch = np.stack([resize_area(dataset.load(i), model.card.input_px) for i in idx[k : k + batch_size]])
        y_pred += pred(batch).argmax(1).tolist()
    y_true = [to_model[int(dataset.labels[i])] for i in idx]
    return report_from_predictions(y_true, y_pred, model.classes)


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
