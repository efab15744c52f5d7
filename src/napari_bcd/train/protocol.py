"""Training protocols: the paper's, exactly, and one that learns from a few regions.

The paper trains the Table II head with Adam at lr 1e-4, batch 128, for 25
epochs on a random stratified 80/20 split of the 400 BACH photos.  On a few
annotated regions the same recipe makes a handful of optimiser steps (8
images x 8 views is one batch: 25 epochs = 25 steps) and learns nothing.
``AUTO`` keeps the head, the optimiser and the learning rate, and changes what
a small dataset needs: enough steps (epochs chosen from the dataset size),
class-balanced sampling, and early stopping on validation loss.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, replace
from typing import Any

from ..errors import DatasetError

__all__ = ["AUTO", "PAPER", "PROTOCOLS", "Protocol", "get_protocol"]


@dataclass(frozen=True)
class Protocol:
    """How the head is trained.

    Attributes
    ----------
    name
        ``"paper"`` or ``"auto"``.
    lr, batch_size
        Adam's learning rate; samples per optimiser step.
    epochs
        A fixed number of epochs, or None to choose them from the dataset size
        so that at least ``min_steps`` optimiser steps run (at most
        ``max_epochs``).
    min_steps, max_epochs
        See ``epochs``.
    patience
        Early stopping: stop when the validation loss has not improved for
        this many epochs (None: run every epoch).  The best epoch's weights
        are kept either way.
    min_patience_steps
        Patience is at least this many optimiser steps, so small datasets
        (one step per epoch) are not stopped by noise.
    balanced
        Draw each epoch's samples with equal weight per class (with
        replacement) instead of shuffling the dataset.
    augment
        Train on the eight flips/rotations of each image (features cached).
    standardise
        Train the head on features standardised per channel (mean/std of the
        training features), then fold that into the head's first 1x1 conv:
        the saved head is the same Table II network, but its optimisation no
        longer depends on the backbone's feature scale (tiny for some
        backbones, large for others).
    val_fraction
        Share of each class held out for validation.
    """

    name: str
    lr: float = 1e-4
    batch_size: int = 128
    epochs: int | None = 25
    min_steps: int = 0
    max_epochs: int = 25
    patience: int | None = None
    min_patience_steps: int = 0
    balanced: bool = False
    augment: bool = False
    standardise: bool = False
    probe_init: bool = False
    val_fraction: float = 0.2

    def with_overrides(self, **changes: Any) -> Protocol:
        """A copy with the user's explicit choices (None values are ignored)."""
        given = {k: v for k, v in changes.items() if v is not None}
        if "epochs" in given:
            given["max_epochs"] = max(given["epochs"], 1)
        return replace(self, **given)

    def plan_epochs(self, n_samples: int) -> tuple[int, int]:
        """``(epochs, steps per epoch)`` for ``n_samples`` training samples per epoch."""
        if n_samples < 1:
            raise DatasetError("There is nothing to train on.")
        steps = math.ceil(n_samples / self.batch_size)
        if self.epochs is not None:
            return self.epochs, steps
        return max(1, min(self.max_epochs, math.ceil(self.min_steps / steps))), steps

    def patience_epochs(self, steps_per_epoch: int) -> int | None:
        if self.patience is None:
            return None
        return max(self.patience, math.ceil(self.min_patience_steps / steps_per_epoch))

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def describe(self) -> str:
        if self.name == "paper":
            return (f"the paper's: Adam lr {self.lr:g}, batch {self.batch_size}, {self.epochs} epochs, "
                    "random stratified split, no augmentation")
        return (f"auto: the paper's head, Adam lr {self.lr:g}, batch {self.batch_size}; at least {self.min_steps} "
                "steps "
                f"(≤ {self.max_epochs} epochs), class-balanced sampling, early stopping on validation loss, "
                "8 flips/rotations, standardised features, head started from the linear probe")


#: The paper's hyper-parameters exactly (the paper states no augmentation).
PAPER = Protocol("paper", lr=1e-4, batch_size=128, epochs=25, max_epochs=25, balanced=False, augment=False,
                 val_fraction=0.2)
#: For a user's own regions: enough steps, balanced classes, early stopping.
AUTO = Protocol("auto", lr=1e-4, batch_size=128, epochs=None, min_steps=600, max_epochs=800, patience=30,
                min_patience_steps=150, balanced=True, augment=True, standardise=True, probe_init=True,
    val_fraction=0.2)
PROTOCOLS = {"paper": PAPER, "auto": AUTO}


def get_protocol(name: str | Protocol) -> Protocol:
    if isinstance(name, Protocol):
        return name
    try:
        return PROTOCOLS[name]
    except KeyError:
        raise DatasetError(f"Unknown training protocol {name!r}; use one of {', '.join(PROTOCOLS)}.") from None
