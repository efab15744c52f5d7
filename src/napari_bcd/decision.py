"""How probabilities become labels: per-class thresholds, and "uncertain" cells.

The engine averages the class probabilities of every window over each cell;
a :class:`DecisionRule` then turns them into labels:

1. A cell whose *confidence* is below ``min_confidence`` is **uncertain**.
   Confidence is one minus an :func:`uncertainty` measure: the top
   probability (``max_probability``), the gap between the two most likely
   classes (``margin``), or one minus the normalised entropy (``entropy``).
2. A cell whose windows' image quality (:mod:`.quality`) is below
   ``min_quality`` is uncertain too (pen, blur, folds: the model was not
   trained on them).
3. Otherwise the classes that have a threshold are tried from the most severe
   (Invasive, In situ, Benign, Normal; other classes in model order): the
   first whose probability reaches its threshold is the label ("call Invasive
   at 0.3").  When none does, the most probable class *without* a threshold
   is the label; when every class has one and none is reached, the cell is
   uncertain.

Uncertain cells carry the label ``len(classes) + 1``, are shown grey, count
in the summary, and never make the slide-level call.  With no thresholds,
``min_confidence = 0`` and ``min_quality = 0`` (the default) the labels are
the arg-max, as before.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np

from .classes import class_styles
from .errors import BcdError

if TYPE_CHECKING:
    from .engine import ClassMap

__all__ = ["DEFAULT_MEASURE", "MEASURES", "DecisionRule", "Measure", "apply_decision", "decide", "uncertain_label",
           "uncertainty"]

def uncertain_label(classes: Sequence[str]) -> int:
    """The label value of uncertain cells: one past the model's classes."""
    return len(classes) + 1


def _max_probability(p: np.ndarray) -> np.ndarray:
    return (1.0 - p.max(-1)) / (1.0 - 1.0 / p.shape[-1])


def _margin(p: np.ndarray) -> np.ndarray:
    top2 = np.sort(p, axis=-1)[..., -2:]
    return 1.0 - (top2[..., 1] - top2[..., 0])


def _entropy(p: np.ndarray) -> np.ndarray:
    h = -np.where(p > 0, p * np.log(np.where(p > 0, p, 1)), 0).sum(-1)
    return h / math.log(p.shape[-1])


@dataclass(frozen=True)
class Measure:
    """An uncertainty measure: 0 for a one-hot cell, 1 for a uniform one."""

    name: str
    label: str
    fn: Callable[[np.ndarray], np.ndarray]


#: Uncertainty measures by name, in the order a user is offered them (the one table a new measure joins).
MEASURES: dict[str, Measure] = {m.name: m for m in (
    Measure("max_probability", "max probability", _max_probability),
    Measure("margin", "margin (top two)", _margin),
    Measure("entropy", "entropy", _entropy),
)}
DEFAULT_MEASURE = "max_probability"


def uncertainty(probs: np.ndarray, measure: str = DEFAULT_MEASURE) -> np.ndarray:
    """Per cell (or window) uncertainty in [0, 1] from ``(..., C)`` probabilities; NaN where there are none.

    ``max_probability``: ``(1 - p1) / (1 - 1/C)``; ``margin``: ``1 - (p1 - p2)``;
    ``entropy``: ``H(p) / log C``.  All three are 0 for a one-hot cell and 1
    for a uniform one.
    """
    if measure not in MEASURES:
        raise BcdError(f"Unknown uncertainty measure {measure!r}; use one of {', '.join(MEASURES)}.")
    p = np.asarray(probs, np.float64)
    with np.errstate(invalid="ignore", divide="ignore"):
        u = MEASURES[measure].fn(p)
    u = np.clip(u, 0.0, 1.0)
    u[~np.isfinite(p).all(-1)] = np.nan
    return u.astype(np.float32)


@dataclass(frozen=True)
class DecisionRule:
    """Per-class thresholds and the uncertainty cut-offs (see the module's text).

    Attributes
    ----------
    thresholds
        Class name -> the probability at which that class is called.
    min_confidence
        Cells with ``1 - uncertainty(measure)`` below this are uncertain (0 = never).
    measure
        One of :data:`MEASURES`.
    min_quality
        Cells whose windows' quality score is below this are uncertain (0 = never).
    """

    thresholds: dict[str, float] = field(default_factory=dict)
    min_confidence: float = 0.0
    measure: str = DEFAULT_MEASURE
    min_quality: float = 0.0

    def __post_init__(self) -> None:
        try:
            object.__setattr__(self, "thresholds", {str(k): float(v) for k, v in dict(self.thresholds or {}).items()})
            object.__setattr__(self, "min_confidence", float(self.min_confidence))
            object.__setattr__(self, "min_quality", float(self.min_quality))
        except (TypeError, ValueError) as err:
            raise BcdError(f"A decision rule has a value that is not a number ({err}).") from err
        for name, t in self.thresholds.items():
            if not 0.0 < t <= 1.0:
                raise BcdError(f"The threshold of {name} must be a probability in (0, 1], got {t}.")
        for what, v in (("min_confidence", self.min_confidence), ("min_quality", self.min_quality)):
            if not 0.0 <= v <= 1.0:
                raise BcdError(f"{what} must be between 0 and 1, got {v}.")
        if self.measure not in MEASURES:
            raise BcdError(f"Unknown uncertainty measure {self.measure!r}; use one of {', '.join(MEASURES)}.")

    @property
    def is_default(self) -> bool:
        return not self.thresholds and self.min_confidence == 0 and self.min_quality == 0

    def check_classes(self, classes: Sequence[str]) -> None:
        unknown = [k for k in self.thresholds if k not in tuple(classes)]
        if unknown:
            raise BcdError(f"Thresholds name classes this model does not have: {', '.join(unknown)} "
                           f"(its classes: {', '.join(classes)}).")

    def replace(self, **changes: Any) -> DecisionRule:
        return dataclasses.replace(self, **changes)

    def margins(self, probs: np.ndarray, covered: np.ndarray, classes: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
        """How far each covered cell's probabilities are from a change of its label under this rule, and the labels
        (what adaptive overlap refines: :mod:`napari_bcd.engine.refine`).

        The default rule (the most probable class) changes where the two most probable classes swap: the margin is
        their gap.  With per-class thresholds the label also changes where a thresholded class crosses its
        threshold, and among the classes without one where the two most probable swap; with ``min_confidence``
        where the confidence crosses it.  The margin is the smallest of those distances.  ``probs`` is
        ``rows x cols x classes`` (NaN where not covered).
        """
        p = np.where(covered[..., None], np.nan_to_num(probs, nan=0.0), 0.0)
        names = tuple(classes)
        free = [i for i, name in enumerate(names) if name not in self.thresholds]
        margin = np.full(covered.shape, np.inf)
        if len(free) >= 2 or not self.thresholds:
            q = p[..., free] if len(free) >= 2 else p
            top2 = np.sort(q, axis=-1)[..., -2:] if q.shape[-1] > 1 else np.concatenate([np.zeros_like(q), q], -1)
            margin = top2[..., 1] - top2[..., 0]
        for i, name in enumerate(names):
            if name in self.thresholds:
                margin = np.minimum(margin, np.abs(p[..., i] - self.thresholds[name]))
        if self.min_confidence > 0:
            confidence = 1.0 - uncertainty(p, self.measure)
            margin = np.minimum(margin, np.abs(np.nan_to_num(confidence, nan=0.0) - self.min_confidence))
        if not self.thresholds:
            labels = np.where(covered, p.argmax(-1) + 1, 0)
        else:
            labels = decide(probs, covered, names, self.replace(min_confidence=0.0, min_quality=0.0))[0]
        return margin, labels

    def to_dict(self) -> dict:
        return {"thresholds": dict(self.thresholds), "min_confidence": self.min_confidence,
                "measure": self.measure, "min_quality": self.min_quality}

    @classmethod
    def from_dict(cls, d: dict | None) -> DecisionRule:
        if not d:
            return cls()
        if not isinstance(d, dict):
            raise BcdError(f"A decision rule must be an object, got {type(d).__name__}.")
        known = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in known})

    def describe(self) -> str:
        """One line for people: what the labels mean."""
        parts = []
        if self.thresholds:
            parts.append("thresholds " + ", ".join(f"{k} >= {v:.2f}" for k, v in self.thresholds.items()))
        else:
            parts.append("most probable class")
        if self.min_confidence:
            parts.append(f"uncertain below confidence {self.min_confidence:.2f} ({self.measure.replace('_', ' ')})")
        if self.min_quality:
            parts.append(f"uncertain below image quality {self.min_quality:.2f}")
        return "; ".join(parts)


def decide(probs: np.ndarray, covered: np.ndarray, classes: Sequence[str], rule: DecisionRule,
           quality: np.ndarray | None = None) -> tuple[np.ndarray, dict]:
    """Labels (uint8; 0 = not classified, 1..C classes, C+1 uncertain) and counts of why cells were uncertain."""
    rule.check_classes(classes)
    c = len(classes)
    p = np.where(covered[..., None], np.nan_to_num(probs, nan=0.0), 0.0)
    labels = np.zeros(covered.shape, np.uint8)
    free = [i for i, name in enumerate(classes) if name not in rule.thresholds]
    if free:
        masked = np.full_like(p, -1.0)
        masked[..., free] = p[..., free]
        labels[covered] = (masked.argmax(-1) + 1)[covered]
    else:
        labels[covered] = c + 1
    # Thresholded classes, least severe first, so the most severe one reached is written last.
    styles = class_styles(classes)
    ranked = sorted((st for st in styles if st.name in rule.thresholds),
                    key=lambda st: (st.severity is None, st.severity if st.severity is not None else st.label))
    for st in reversed(ranked):
        hit = covered & (p[..., st.label - 1] >= rule.thresholds[st.name])
        labels[hit] = st.label
    reasons = {"low_confidence": 0, "low_quality": 0, "no_threshold_reached": int((labels == c + 1).sum())}
    if rule.min_confidence > 0:
        conf = 1.0 - uncertainty(probs, rule.measure)
        low = covered & (np.nan_to_num(conf, nan=0.0) < rule.min_confidence)
        reasons["low_confidence"] = int(low.sum())
        labels[low] = c + 1
    if rule.min_quality > 0 and quality is not None:
        bad = covered & np.isfinite(quality) & (quality < rule.min_quality)
        reasons["low_quality"] = int(bad.sum())
        labels[bad] = c + 1
    return labels, reasons


def apply_decision(class_map: ClassMap, rule: DecisionRule | dict | None) -> ClassMap:
    """A copy of a :class:`~napari_bcd.ClassMap` labelled by ``rule`` (probabilities unchanged).

    Cells keep being "classified" exactly where the engine classified them;
    only which label they carry changes, so applying another rule later (or
    the default, to undo) is exact.
    """
    rule = rule if isinstance(rule, DecisionRule) else DecisionRule.from_dict(rule)
    covered = (class_map.labels > 0) & np.isfinite(class_map.probs).all(-1)
    labels, reasons = decide(class_map.probs, covered, class_map.classes, rule, class_map.quality)
    return dataclasses.replace(class_map, labels=labels, decision=rule, uncertain_cells=reasons)
