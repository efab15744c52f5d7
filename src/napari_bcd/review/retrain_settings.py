"""What a retrain takes and gives: how to learn (:class:`RetrainSettings`), the checked job, its plan, progress
and result.

The run that made the map (:class:`~napari_bcd.settings.ClassifySettings`) comes with the map: a retrain
cuts its corrections on the map's grid and re-predicts with exactly that run's settings.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..errors import BcdError
from .corrections import Corrections

__all__ = ["DRIFT_WARNING", "RetrainJob", "RetrainPlan", "RetrainProgress", "RetrainResult", "RetrainSettings"]


@dataclass(frozen=True)
class RetrainSettings:
    """How a retrain learns (checked when made: a bad value is a :class:`~napari_bcd.errors.BcdError`).

    Attributes
    ----------
    weight
        How many training images each corrected cell counts as.
    whole_slide
        Re-predict the whole slide with the new model (with the map's run settings) instead of the region.
    margin
        The region re-predicted (and anchored): the corrections' bounding box grown by this many windows.
    anchors
        Classified windows spread over the rest of the slide kept to the parent's probabilities (up to a
        quarter as many others, where the slide has them, measure the change).
    steps, lr, batch_size
        Adam's optimiser steps, learning rate and samples per step.
    views
        Flips/rotations of each corrected window: 1, 2, 4 or 8.
    data
        The original training images: ``"card"`` (where the card says), a folder, or None.
    device, seed, feature_batch
        Where it runs, the random seed, windows per backbone call.
    """

    weight: float = 4.0
    whole_slide: bool = False
    margin: int = 1
    anchors: int = 256
    steps: int = 300
    lr: float = 3e-4
    batch_size: int = 64
    views: int = 8
    data: Any = "card"
    device: str | None = None
    seed: int = 0
    feature_batch: int = 8

    #: The most optimiser steps a retrain takes (a head of 143,620 weights learns a correction in hundreds).
    MAX_STEPS = 100_000

    def __post_init__(self) -> None:
        def number(v: Any) -> bool:
            return isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v)

        problems = []
        if not (number(self.weight) and self.weight > 0) or not (number(self.lr) and self.lr > 0):
            problems.append(f"weight and lr must be positive numbers, got {self.weight} and {self.lr}")
        for name in ("steps", "batch_size", "feature_batch"):
            v = getattr(self, name)
            if not (isinstance(v, int) and not isinstance(v, bool) and v >= 1):
                problems.append(f"{name} must be a whole number of at least 1, got {v}")
        if isinstance(self.steps, int) and self.steps > self.MAX_STEPS:
            problems.append(f"steps is at most {self.MAX_STEPS:,} (a correction is learnt in hundreds), got "
                            f"{self.steps:,}")
        if not (isinstance(self.margin, int) and self.margin >= 0) or not (
                isinstance(self.anchors, int) and self.anchors >= 0):
            problems.append(f"margin and anchors must be whole numbers of 0 or more, got {self.margin} and "
                            f"{self.anchors}")
        if self.views not in (1, 2, 4, 8):
            problems.append(f"views must be 1, 2, 4 or 8, got {self.views}")
        if problems:
            raise BcdError("; ".join(problems) + ".")

    def replace(self, **changes: Any) -> RetrainSettings:
        """A copy with some settings changed (checked again)."""
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        return {f.name: (str(v) if isinstance(v, Path) else v)
                for f in dataclasses.fields(self) for v in [getattr(self, f.name)]}


@dataclass(frozen=True)
class RetrainJob:
    """Everything one retrain needs, checked (:func:`~.retrain.iter_retrain`): the parent and its card, the
    corrections, the slide, its map and grid, where the new model goes, how to learn and the map's run."""

    parent: Path
    card: Any
    corrections: Corrections
    slide: Any
    class_map: Any
    grid: Any
    out: Path
    learn: RetrainSettings
    run: Any  # ClassifySettings of the map


#: A new model that changes more than this share of the slide outside the corrections is flagged.
DRIFT_WARNING = 0.05


@dataclass(frozen=True)
class RetrainPlan:
    corrections: int
    by_class: dict[str, int]
    region_windows: int
    anchor_windows: int
    original_images: int
    steps: int
    out: Path
    notes: tuple[str, ...] = ()

    @property
    def message(self) -> str:
        by = ", ".join(f"{n} to {k}" for k, n in sorted(self.by_class.items()))
        orig = (f"{self.original_images} original training images" if self.original_images
                else "no original training images")
        lines = [f"{self.corrections} corrected cell(s) ({by}); {self.region_windows} windows to re-predict, "
                 f"{self.anchor_windows} anchor windows, {orig}; {self.steps} steps -> {self.out.name}"]
        return "\n".join(lines + [f"note: {n}" for n in self.notes])


@dataclass(frozen=True)
class RetrainProgress:
    """``stage``: ``"features"``, ``"training"`` or ``"predicting"``."""

    stage: str
    done: int
    total: int
    loss: float = math.nan
    corrected_agree: float = math.nan

    @property
    def fraction(self) -> float:
        return self.done / self.total if self.total else 1.0

    @property
    def desc(self) -> str:
        return self.stage

    def __str__(self) -> str:
        extra = (f", loss {self.loss:.3f}, corrections learnt {self.corrected_agree:.0%}"
                 if self.stage == "training" and not math.isnan(self.loss) else "")
        return f"{self.stage}: {self.done}/{self.total}{extra}"


@dataclass
class RetrainResult:
    """What a retrain produced.

    Attributes
    ----------
    checkpoint, parent
        The new model and the one it was retrained from.
    class_map
        The re-predicted class map (the affected region replaced, or the whole
        slide), or None when no class map was given and no whole-slide
        prediction was asked for.
    changed_cells
        Cells whose label differs from the class map given.
    corrected_before, corrected_after
        Share of the corrected windows the model puts in their new class.
    anchors_kept
        Share of the anchor windows trained on that keep the parent's class.
    outside_changed, outside_checked
        Share of the held-out anchor windows (spread over the slide outside the
        corrections, never trained on) whose class changes, and how many.
    validation_before, validation_after
        Accuracy / macro F1 on the parent's validation images (None without them).
    """

    checkpoint: Path
    parent: Path
    card: Any
    class_map: Any = None
    changed_cells: int = 0
    corrected_before: float = math.nan
    corrected_after: float = math.nan
    anchors_kept: float = math.nan
    validation_before: dict | None = None
    validation_after: dict | None = None
    seconds: float = 0.0
    stopped: str = "completed"
    notes: list[str] = field(default_factory=list)
    outside_changed: float = math.nan
    outside_checked: int = 0

    @property
    def warning(self) -> str:
        """Said before the new model is used when it changes much of the slide outside the corrections."""
        if not math.isfinite(self.outside_changed) or self.outside_changed <= DRIFT_WARNING:
            return ""
        return (f"The new model changes the class of about {self.outside_changed:.0%} of the slide outside your "
                f"corrections (measured on {self.outside_checked} windows it was not trained on): look at the whole "
                "map before you use it, or Undo.")

    def describe(self) -> str:
        text = (f"Saved {self.checkpoint.name} (from {self.parent.name}): corrections learnt "
                f"{self.corrected_before:.0%} -> {self.corrected_after:.0%}, anchors kept {self.anchors_kept:.0%}")
        if math.isfinite(self.outside_changed):
            text += (f"; {self.outside_changed:.1%} of the slide outside the corrections changes class (on "
                     f"{self.outside_checked} windows not trained on)")
        if self.validation_before and self.validation_after:
            text += (f"; validation accuracy {self.validation_before['accuracy']:.3f} -> "
                     f"{self.validation_after['accuracy']:.3f}")
        if self.class_map is not None:
            text += f"; {self.changed_cells} cell(s) changed on the map"
        return text + f" ({self.seconds:.1f} s)."
