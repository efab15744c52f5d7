"""What a training run announces and returns: its plan, its stages and its result (:mod:`.finetune` runs it,
:mod:`.save` fills the result in)."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .evaluate import Report
from .probe import ProbeResult
from .select import Validation

__all__ = ["Stage", "TrainPlan", "TrainResult"]


@dataclass(frozen=True)
class TrainPlan:
    """What is about to happen, before any feature is computed."""

    n_images: int
    views: int
    validation: Validation
    protocol: str
    notes: tuple[str, ...] = ()

    @property
    def message(self) -> str:
        lines = [f"{self.n_images} images x {self.views} view(s); protocol {self.protocol}; "
                 f"{self.validation.describe()}"]
        return "\n".join(lines + [f"note: {n}" for n in self.notes])


@dataclass(frozen=True)
class Stage:
    """A step of the run starts."""

    message: str


@dataclass
class TrainResult:
    """What a training run produced.

    Attributes
    ----------
    checkpoint
        The saved ``.safetensors`` file, or None when nothing was saved.
    card
        The saved model card.
    report
        Table III of the shipped model's choice, measured on held-out images
        (every image once, under cross-validation); None without validation.
    probe
        The linear probe measured the same way.
    chance
        Accuracy of always answering the most common held-out class.
    validation
        How validation was drawn.
    shipped
        ``"probe"`` or ``"head"``.
    steps
        Optimiser steps of the shipped head (0 for the probe).
    fold_accuracy
        Per fold (cross-validation), the shipped choice's accuracy.
    stopped
        ``"completed"`` or ``"stopped by the user"``.
    """

    checkpoint: Path | None
    card: Any = None
    report: Report | None = None
    probe: ProbeResult | None = None
    chance: float | None = None
    validation: Validation | None = None
    shipped: str = "head"
    steps: int = 0
    fold_accuracy: list[float] = field(default_factory=list)
    candidates: int = 0
    stopped: str = "completed"
    notes: list[str] = field(default_factory=list)
    #: The probe on the shipped model's training images (:class:`~.probe.ProbeHead`; not saved apart).
    probe_head: Any = None
    #: ``(mean, std)`` the probe's features were standardised with.
    norm: Any = None
    #: Seconds per stage ("features", "choosing", "final", "saving") and head steps run ("steps").
    timings: dict[str, float] = field(default_factory=dict)
    #: The tuned probe on the shipped model's training images (:class:`~.regularise.LogisticProbe`; what the model
    #: is when ``shipped == "probe"``), and how its regularisation was chosen (:class:`~.regularise.Tuning`).
    logistic: Any = None
    tuning: Any = None
    #: Which model was saved and why, in a pathologist's words.
    why: str = ""

    @property
    def has_validation(self) -> bool:
        return self.report is not None

    @property
    def beats_chance(self) -> bool:
        """True when the held-out accuracy is above chance (False without validation)."""
        return self.report is not None and self.chance is not None and self.report.accuracy > self.chance + 1e-9

    @property
    def head_below_probe(self) -> bool:
        return (self.report is not None and self.probe is not None and self.probe.report is not None
                and self.report.accuracy < self.probe.report.accuracy - 1e-9)

    def verdict(self) -> str:
        """What the figures mean, in words (:func:`~.report.verdict`)."""
        from .report import verdict

        return verdict(self)
