"""A linear probe beside every trained head: the honest baseline.

Logistic regression (scikit-learn) on the frozen backbone's features,
average-pooled over space, standardised, on the same split as the head.  The
features are the ones already cached for the head, so it costs seconds.  When
the Table II head does worse than this, the head has not learned what the
features already hold, and the report says so.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from .evaluate import Report, report_from_predictions

__all__ = ["ProbeResult", "linear_probe"]


@dataclass
class ProbeResult:
    """The probe's validation report (None without validation data) and its cost."""

    report: Report | None
    train_accuracy: float
    seconds: float
    description: str = "logistic regression on average-pooled frozen features (scikit-learn, standardised)"
    #: The fitted scikit-learn pipeline (StandardScaler, LogisticRegression); not saved.
    pipeline: Any = field(default=None, repr=False)

    def to_dict(self) -> dict:
        return {
            "kind": self.description,
            "validation_report": self.report.to_dict() if self.report is not None else None,
            "accuracy": self.report.accuracy if self.report is not None else None,
            "macro_f1": self.report.macro["f1"] if self.report is not None else None,
            "train_accuracy": self.train_accuracy,
            "seconds": self.seconds,
        }


def linear_probe(
    train_x: np.ndarray,
    train_y: np.ndarray,
    val_x: np.ndarray | None,
    val_y: np.ndarray | None,
    classes: Sequence[str],
    *,
    seed: int = 0,
) -> ProbeResult:
    """Fit a logistic regression on pooled features and report it on validation.

    Parameters
    ----------
    train_x, val_x
        ``N x C`` pooled features (several views of an image may be several rows).
    train_y, val_y
        0-based class indices.
    classes
        Class names in index order.
    """
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    t0 = time.perf_counter()
    clf = make_pipeline(StandardScaler(), LogisticRegression(max_iter=2000, class_weight="balanced", random_state=seed))
    clf.fit(np.asarray(train_x, np.float32), np.asarray(train_y))
    train_acc = float((clf.predict(train_x) == train_y).mean())
    report = None
    if val_x is not None and val_y is not None and len(val_y):
        report = report_from_predictions(np.asarray(val_y).tolist(), clf.predict(np.asarray(val_x,
                                                                                            np.float32)).tolist(),
                                         classes)
    return ProbeResult(report, train_acc, time.perf_counter() - t0, pipeline=clf)
