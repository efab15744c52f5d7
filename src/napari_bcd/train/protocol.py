"""Training protocols: the paper's, exactly, and one that holds on new patients.

The paper trains the Table II head with Adam at lr 1e-4, batch 128, for 25
epochs on a random stratified 80/20 split of the 400 BACH photos.  On a few
annotated regions that recipe makes a handful of optimiser steps and learns
little, and on any data its validation images share patients with the
training ones.

``AUTO`` (the default) starts the head from the linear probe (:mod:`.probe`)
on standardised features, trains it with class-balanced samples of the eight
flips and rotations, and lets validation on patients, slides or regions the
model has not seen decide how many steps, and how hard a pull towards the
probe, to keep, or whether to keep the probe itself (:mod:`.select`).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, replace
from typing import Any

from ..errors import DatasetError
from .headfit import Recipe

__all__ = ["AUTO", "PAPER", "PROTOCOLS", "Protocol", "get_protocol"]


@dataclass(frozen=True)
class Protocol:
    """How the head is trained and chosen.

    Attributes
    ----------
    name
        ``"paper"`` or ``"auto"``.
    lr, batch_size
        Adam's learning rate; samples per optimiser step.
    epochs
        The paper's fixed number of epochs (None: ``max_steps`` steps instead).
    max_steps
        Steps each candidate recipe runs; the best number up to it is chosen.
    anchors
        The candidate recipes' pulls towards the probe (:class:`~.headfit.Recipe`).
    regularised
        Further candidate recipes as ``(anchor, feature dropout, weight decay)``: validation on held-out groups
        chooses among them, their steps and the probe.
    eval_every
        Steps between measurements on the held-out images (the paper: one epoch).
    balanced
        Equal weight per class (else the paper's shuffled epochs).
    augment
        The eight flips/rotations of each image (features cached).
    standardise
        Train on per-channel standardised features (folded into the saved head).
    probe_init
        Start the head from the linear probe, and let the probe itself be chosen.
    val_fraction
        Share held out for a hold-out validation.
    validation
        ``"auto"`` (cross-validation over groups when they are known) or ``"holdout"``.
    criterion
        What chooses among candidates: ``"accuracy"`` (one standard error,
        simplest first) or the paper's ``"loss"`` (the epoch with the lowest
        validation loss).
    """

    name: str
    lr: float = 1e-4
    batch_size: int = 128
    epochs: int | None = 25
    max_steps: int = 300
    anchors: tuple[float, ...] = (0.0,)
    regularised: tuple[tuple[float, float, float], ...] = ()
    eval_every: int = 25
    balanced: bool = False
    augment: bool = False
    standardise: bool = False
    probe_init: bool = False
    val_fraction: float = 0.2
    validation: str = "holdout"
    criterion: str = "loss"

    def with_overrides(self, **changes: Any) -> Protocol:
        """A copy with the user's explicit choices (None values are ignored)."""
        return replace(self, **{k: v for k, v in changes.items() if v is not None})

    def steps_per_epoch(self, n_samples: int) -> int:
        if n_samples < 1:
            raise DatasetError("There is nothing to train on.")
        return math.ceil(n_samples / self.batch_size)

    def recipes(self, n_samples: int) -> list[Recipe]:
        """The candidate recipes for ``n_samples`` training samples (images x views)."""
        if self.epochs is not None:
            steps = self.epochs * self.steps_per_epoch(n_samples)
        else:
            steps = self.max_steps
        out = [Recipe(steps=steps, lr=self.lr, batch_size=self.batch_size, anchor=a, balanced=self.balanced)
               for a in self.anchors]
        out += [Recipe(steps=steps, lr=self.lr, batch_size=self.batch_size, anchor=a, balanced=self.balanced,
                       dropout=d, weight_decay=w) for a, d, w in self.regularised]
        return out

    def measure_every(self, n_samples: int) -> int:
        return self.steps_per_epoch(n_samples) if self.name == "paper" else self.eval_every

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def describe(self) -> str:
        if self.name == "paper":
            return (f"the paper's: Adam lr {self.lr:g}, batch {self.batch_size}, {self.epochs} epochs, "
                    "no augmentation, the epoch with the lowest validation loss")
        pulls = " and ".join(f"{a:g}" for a in self.anchors)
        if self.regularised:
            pulls += "; and with " + "; ".join(f"{d:.0%} feature dropout and weight decay {w:g}"
                                              for _, d, w in self.regularised)
        return ("auto: the linear probe (a logistic regression on the averaged features), its regularisation chosen "
                "by cross-validation over patients, slides or regions (over images, towards the stronger, when none "
                "is known); where they are known, also the paper's head started from the probe on standardised "
                f"features, Adam lr {self.lr:g}, batch {self.batch_size}, class-balanced, 8 flips/rotations, up to "
                f"{self.max_steps} steps with pulls towards the probe of {pulls}: the recipe, its steps or the probe "
                "itself chosen on the groups the model has not seen, the simplest within the noise")


#: The paper's hyper-parameters exactly (the paper states no augmentation).
PAPER = Protocol("paper", lr=1e-4, batch_size=128, epochs=25, balanced=False, augment=False, val_fraction=0.2,
                 validation="holdout", criterion="loss")
#: The default: chosen on held-out groups, never worse than the probe as far as the data can tell.
AUTO = Protocol("auto", lr=1e-3, batch_size=128, epochs=None, max_steps=300, anchors=(0.0, 1e-2),
                regularised=((0.0, 0.5, 1e-2),), eval_every=25,
                balanced=True, augment=True, standardise=True, probe_init=True, val_fraction=0.2, validation="auto",
                criterion="accuracy")
PROTOCOLS = {"paper": PAPER, "auto": AUTO}


def get_protocol(name: str | Protocol) -> Protocol:
    if isinstance(name, Protocol):
        return name
    try:
        return PROTOCOLS[name]
    except KeyError:
        raise DatasetError(f"Unknown training protocol {name!r}; use one of {', '.join(PROTOCOLS)}.") from None
