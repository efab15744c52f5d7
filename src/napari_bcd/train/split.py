"""Training/validation splits that work for any dataset size.

A pathologist's dataset may be a dozen regions; the BACH photos are 400.
:func:`split_dataset` gives every class with two or more images at least one
validation image, keeps single-image classes in training, and says plainly
when there is nothing left to validate on.  ``"bach-patient"`` is the
patient-aware split of the 400 BACH photos used by the eva benchmark, so that
one patient's photos never sit on both sides.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ..errors import DatasetError
from .iciar import Dataset

__all__ = ["BACH_PATIENT_VAL_RANGES", "Split", "bach_patient_split", "check_trainable", "split_dataset"]

log = logging.getLogger(__name__)

#: Validation indices of the patient-aware BACH split (eva's ``BACH`` dataset),
#: over the 400 photos sorted by class folder (Benign, InSitu, Invasive, Normal)
#: and then file name: 132 validation, 268 training photos.
BACH_PATIENT_VAL_RANGES: tuple[tuple[int, int], ...] = (
    (41, 59), (60, 90), (139, 169), (240, 258), (260, 273), (345, 368),
)
BACH_FOLDER_ORDER = ("Benign", "InSitu", "Invasive", "Normal")


@dataclass(frozen=True)
class Split:
    """Indices into a :class:`Dataset`, and how they were chosen.

    Attributes
    ----------
    train, val
        Sorted dataset indices.  ``val`` is empty when there is nothing to
        validate on (then no validation metrics exist).
    kind
        Words for the model card, e.g. ``"stratified 80/20, seed 0"``.
    notes
        What a user should know about it (classes kept out of validation...).
    """

    train: list[int]
    val: list[int]
    kind: str
    notes: list[str] = field(default_factory=list)

    @property
    def has_validation(self) -> bool:
        return bool(self.val)


def check_trainable(dataset: Dataset) -> None:
    """Refuse, before any feature is computed, a dataset no classifier can learn from."""
    if len(dataset) == 0:
        raise DatasetError(f"{dataset.root} has no images. Add images (or annotated regions) of at least two classes.")
    counts = {k: v for k, v in dataset.counts().items() if v}
    if len(counts) < 2:
        (only, n), = counts.items()
        raise DatasetError(
            f"All {n} image(s) are {only}: a classifier needs images of at least two classes. "
            "Add images or regions of another class."
        )


def split_dataset(
    dataset: Dataset,
    val_fraction: float = 0.2,
    seed: int = 0,
    split: str | os.PathLike[str] | None = None,
) -> Split:
    """Choose training and validation images.

    Parameters
    ----------
    dataset
        The images and labels.
    val_fraction
        Share of each class kept for validation (stratified).  Every class
        with at least two images gives at least one and keeps at least one
        for training; a class with one image trains only.  0 validates on
        nothing.
    seed
        Random seed of the stratified split.
    split
        None (stratified random), ``"bach-patient"`` (the patient-aware split
        of the 400 BACH photos), or a file listing validation image names, one
        per line.

    Returns
    -------
    Split
    """
    if split is not None and str(split) == "bach-patient":
        return bach_patient_split(dataset)
    if split is not None:
        return _split_from_file(dataset, Path(split))
    if not 0 <= val_fraction < 1:
        raise DatasetError(f"The validation fraction must be in [0, 1), got {val_fraction}.")
    rng = np.random.default_rng(seed)
    train: list[int] = []
    val: list[int] = []
    notes: list[str] = []
    for c, name in enumerate(dataset.classes):
        idx = np.flatnonzero(dataset.labels == c)
        if len(idx) == 0:
            continue
        if len(idx) == 1 or val_fraction == 0:
            train += idx.tolist()
            if len(idx) == 1 and val_fraction > 0:
                notes.append(f"{name} has one image: it is used for training only, so {name} is not validated.")
            continue
        n_val = min(len(idx) - 1, max(1, round(val_fraction * len(idx))))
        chosen = rng.permutation(idx)
        val += chosen[:n_val].tolist()
        train += chosen[n_val:].tolist()
    kind = f"stratified {1 - val_fraction:.0%}/{val_fraction:.0%}, seed {seed}"
    if not val:
        notes.append("No class has two images, so nothing is left to validate on: the model trains on every image "
                     "and has no validation metrics. Add images to check what it learned.")
        kind = "none (all images train)"
    return Split(sorted(train), sorted(val), kind, notes)


def _split_from_file(dataset: Dataset, path: Path) -> Split:
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as err:
        raise DatasetError(f"The split file {path} is not text ({err.reason}). Give a text file listing the "
                           "validation images, one name per line, or --split bach-patient.") from err
    except OSError as err:
        raise DatasetError(f"Cannot read the split file {path} ({err}). Give a file listing the validation images, "
                           "one name per line, or --split bach-patient.") from err
    names = {Path(s.strip()).name for s in text.splitlines() if s.strip()}
    val = [i for i, p in enumerate(dataset.paths) if p.name in names]
    missing = names - {dataset.paths[i].name for i in val}
    if missing:
        raise DatasetError(f"The split file lists {len(missing)} file(s) not in the dataset, e.g. "
                           f"{sorted(missing)[0]}.")
    chosen = set(val)
    train = [i for i in range(len(dataset)) if i not in chosen]
    if not train:
        raise DatasetError(f"The split file {path.name} puts every image in validation; leave some for training.")
    return Split(train, sorted(val), f"file:{path.name}")


def bach_patient_split(dataset: Dataset) -> Split:
    """The patient-aware split of the 400 BACH photos (eva's): 268 training, 132 validation.

    Raises
    ------
    DatasetError
        When the dataset is not the 400 BACH photos (100 per class).
    """
    counts = dataset.counts()
    if len(dataset) != 400 or any(counts.get(c, 0) != 100 for c in BACH_FOLDER_ORDER):
        raise DatasetError(
            "--split bach-patient needs the 400 BACH photos (100 per class), found "
            + ", ".join(f"{k} {v}" for k, v in counts.items())
            + ". Get them with `napari-bcd data fetch bach`, or use another split."
        )
    order = sorted(range(len(dataset)),
                   key=lambda i: (BACH_FOLDER_ORDER.index(dataset.classes[dataset.labels[i]]), dataset.paths[i].name))
    val_pos = {k for a, b in BACH_PATIENT_VAL_RANGES for k in range(a, b)}
    val = sorted(order[k] for k in val_pos)
    train = sorted(order[k] for k in range(len(order)) if k not in val_pos)
    return Split(train, val, "bach-patient (eva's patient-aware split, 268/132)")
