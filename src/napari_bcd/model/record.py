"""The training record a model card carries: how the model was made, as typed fields.

Stored in the card's JSON as the ``training`` object (so older cards and other
tools read it as before); :attr:`ModelCard.record <napari_bcd.model.ModelCard.record>`
gives it back typed.  Keys this version does not know are kept in ``extra``
and written back unchanged.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

__all__ = ["TrainingRecord"]


@dataclass(frozen=True)
class TrainingRecord:
    """Provenance of a trained checkpoint.

    Attributes
    ----------
    protocol
        ``{"name", "description", "settings"}`` of the training protocol.
    data
        ``{"root", "counts", "images"}``: where the training images were.
    split
        ``{"kind", "train", "val", "val_files", "notes"}``.
    hyperparameters
        Optimiser, learning rate, batch, epochs planned and run, sampling, augmentation...
    curves
        One ``{"epoch", "train_loss", "train_acc", "val_loss", "val_acc", ...}`` per epoch up to the best.
    validation_report, probe
        Table III of the head and of the linear probe (dicts), or None.
    retrain
        For a model retrained from corrections: parent, corrections, metrics before/after.
    """

    protocol: dict[str, Any] = field(default_factory=dict)
    data: dict[str, Any] = field(default_factory=dict)
    split: dict[str, Any] = field(default_factory=dict)
    hyperparameters: dict[str, Any] = field(default_factory=dict)
    best_epoch: int = 0
    stopped: str = ""
    curves: list[dict[str, Any]] = field(default_factory=list)
    validation: bool | None = None
    validation_report: dict[str, Any] | None = None
    probe: dict[str, Any] | None = None
    chance_accuracy: float | None = None
    beats_chance: bool = False
    backbone_weights_source: str = ""
    preprocessing_source: str = ""
    retrain: dict[str, Any] | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    # ---------------------------------------------------------------- typed answers
    @property
    def protocol_name(self) -> str | None:
        return self.protocol.get("name") if self.protocol else None

    @property
    def split_kind(self) -> str:
        return str(self.split.get("kind", "")) if self.split else ""

    @property
    def data_root(self) -> str | None:
        return self.data.get("root") if self.data else None

    @property
    def val_files(self) -> list[str]:
        return list(self.split.get("val_files") or []) if self.split else []

    @property
    def augmented(self) -> bool:
        """Trained on the eight flips/rotations of every image."""
        return str(self.hyperparameters.get("augment", "none")) != "none"

    @property
    def last_train_accuracy(self) -> float | None:
        last = self.curves[-1] if self.curves else {}
        value = last.get("train_acc") if isinstance(last, dict) else None
        return float(value) if isinstance(value, int | float) else None

    @property
    def parent(self) -> dict[str, Any] | None:
        """The model this one was retrained from (``path``, ``name``, ``weights_sha256``), or None."""
        return (self.retrain or {}).get("parent")

    # ---------------------------------------------------------------- JSON
    def to_dict(self) -> dict[str, Any]:
        d = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name != "extra"}
        d = {k: v for k, v in d.items() if not (k == "retrain" and v is None) and not (k == "validation" and v is None)}
        return {**self.extra, **d}

    @classmethod
    def from_dict(cls, d: dict[str, Any] | None) -> TrainingRecord:
        if not isinstance(d, dict) or not d:
            return cls()
        names = {f.name for f in dataclasses.fields(cls)} - {"extra"}
        known = {k: v for k, v in d.items() if k in names}
        return cls(**known, extra={k: v for k, v in d.items() if k not in names})

    def with_retrain(self, retrain: dict[str, Any]) -> TrainingRecord:
        return dataclasses.replace(self, retrain=retrain)
