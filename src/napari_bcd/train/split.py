"""Training/validation splits that never cut a group, for any dataset size.

A pathologist's dataset may be a dozen regions; the BACH photos are 400.
When the images carry groups (a patient, slide or region: :mod:`.groups`),
:func:`split_dataset` keeps every group on one side, stratified by class as
far as the groups allow, and :func:`group_folds` gives grouped folds for
cross-validation.  Without groups the split is by image, and the
:class:`Split` says plainly that its figures are optimistic: photos of one
patient on both sides measure memory, not what a new patient gets.
``"bach-patient"`` is the patient-aware split of the 400 BACH photos used by
the eva benchmark.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ..errors import DatasetError
from .iciar import Dataset

__all__ = ["BACH_PATIENT_VAL_RANGES", "Split", "bach_patient_split", "check_trainable", "group_folds",
           "grouped_holdout", "split_dataset"]

log = logging.getLogger(__name__)

#: Validation indices of the patient-aware BACH split (eva's ``BACH`` dataset),
#: over the 400 photos sorted by class folder (Benign, InSitu, Invasive, Normal)
#: and then file name: 132 validation, 268 training photos.
BACH_PATIENT_VAL_RANGES: tuple[tuple[int, int], ...] = (
    (41, 59), (60, 90), (139, 169), (240, 258), (260, 273), (345, 368),
)
BACH_FOLDER_ORDER = ("Benign", "InSitu", "Invasive", "Normal")
#: What a report says when validation images share patients with training (a split by image).
OPTIMISTIC = ("validation images share patients (or slides, or regions) with the training images, so this figure "
              "is optimistic: expect less on new patients")


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
    grouped
        No group (patient, slide, region) has images on both sides.
    group_kind
        What the groups are ("patient", "slide", "region", "group"), "" when none.
    train_groups, val_groups
        Groups on each side.
    """

    train: list[int]
    val: list[int]
    kind: str
    notes: list[str] = field(default_factory=list)
    grouped: bool = False
    group_kind: str = ""
    train_groups: int = 0
    val_groups: int = 0

    @property
    def has_validation(self) -> bool:
        return bool(self.val)

    @property
    def optimistic(self) -> bool:
        """Validation shares patients with training: its figures overstate what new patients get."""
        return self.has_validation and not self.grouped

    def describe(self) -> str:
        """How validation was drawn, in words a pathologist reads."""
        if not self.val:
            return "no validation images"
        if self.grouped:
            what = f"{self.group_kind}s" if self.group_kind and self.group_kind != "group" else "groups"
            return (f"validated on {self.val_groups} {what} never seen in training ({len(self.val)} images; "
                    f"{self.train_groups} {what} train)")
        if self.kind.startswith("file:"):
            return f"validated on the {len(self.val)} images {self.kind[5:]} lists (may share patients: optimistic)"
        return f"validated on {len(self.val)} images drawn at random (no patient known, so optimistic)"

    def to_dict(self) -> dict:
        return {"kind": self.kind, "train": len(self.train), "val": len(self.val), "grouped": self.grouped,
                "group_kind": self.group_kind, "train_groups": self.train_groups, "val_groups": self.val_groups,
                "description": self.describe(), "notes": list(self.notes)}


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
    if dataset.groups is not None:
        return _grouped(dataset, val_fraction, seed)
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
    # drawn at random: the description says optimistic, the verdict why and what to do
    return Split(sorted(train), sorted(val), kind, notes)


def _grouped(dataset: Dataset, val_fraction: float, seed: int) -> Split:
    assert dataset.groups is not None
    kind_word = dataset.group_kind or "group"
    if val_fraction == 0:
        return Split(list(range(len(dataset))), [], "none (all images train)", [], True, kind_word,
                     dataset.n_groups, 0)
    train, val, notes = grouped_holdout(dataset.labels, dataset.groups, dataset.classes, val_fraction, seed)
    groups = np.asarray(dataset.groups, dtype=object)
    n_train, n_val = len(set(groups[train])), len(set(groups[val]))
    kind = f"grouped by {kind_word} ({n_train} train / {n_val} validate), {val_fraction:.0%} aimed, seed {seed}"
    if not val:
        kind = "none (too few groups to hold any out)"
    return Split(train, val, kind, notes, True, kind_word, n_train, n_val)


def _group_table(labels: np.ndarray, groups, n_classes: int) -> tuple[list[str], np.ndarray, np.ndarray]:
    """``(group names, group index of each image, groups x classes image counts)``."""
    names, inverse = np.unique(np.asarray([str(g) for g in groups], dtype=object), return_inverse=True)
    table = np.zeros((len(names), n_classes), np.int64)
    np.add.at(table, (inverse, np.asarray(labels, np.int64)), 1)
    return list(names), inverse, table


def grouped_holdout(labels: np.ndarray, groups, classes, val_fraction: float = 0.2,
                    seed: int = 0) -> tuple[list[int], list[int], list[str]]:
    """Hold out whole groups, about ``val_fraction`` of each class: ``(train, val, notes)``.

    Greedy over many random orders of the groups (seeded): a group goes to
    validation when it brings every class's validation share closer to
    ``val_fraction`` and no class loses its last training image; the order
    that ends closest wins.  A class whose images all lie in one group is
    not validated (said in the notes).  No group is ever on both sides.
    """
    names, inverse, table = _group_table(labels, groups, len(classes))
    totals = table.sum(0)
    target = val_fraction * totals
    scale = np.maximum(totals, 1).astype(float)
    multi = (table > 0).sum(0) >= 2  # classes that can be validated at all

    def error(vc: np.ndarray) -> float:
        missing = multi & (vc == 0)  # a class that could be validated but is not
        return float(np.abs(vc - target).__truediv__(scale).sum() + missing.sum())

    rng = np.random.default_rng(seed)
    best: tuple[float, list[int]] = (np.inf, [])
    for _ in range(64):
        chosen: list[int] = []
        vc = np.zeros(len(classes), np.int64)
        for g in rng.permutation(len(names)):
            row = table[g]
            if ((totals - vc - row) <= 0)[row > 0].any():
                continue  # would take a class's last training images
            if error(vc + row) < error(vc):
                chosen.append(int(g))
                vc = vc + row
        e = error(vc)
        if e < best[0] - 1e-12:
            best = (e, chosen)
    val_groups = set(best[1])
    val = sorted(int(i) for i in np.flatnonzero(np.isin(inverse, list(val_groups))))
    train = sorted(int(i) for i in np.flatnonzero(~np.isin(inverse, list(val_groups))))
    notes = []
    for c, name in enumerate(classes):
        if totals[c] and not multi[c]:
            notes.append(f"All {name} images come from one group, which training needs: {name} is not validated. "
                         f"Add {name} images from another patient, slide or region.")
    if not val:
        notes.append("There are too few groups to hold any out (each class needs images from at least two), so "
                     "nothing is left to validate on.")
    return train, val, notes


def group_folds(labels: np.ndarray, groups, classes, k: int = 5, seed: int = 0) -> list[tuple[np.ndarray, np.ndarray]]:
    """Up to ``k`` grouped, class-stratified cross-validation folds ``(train, val)`` (scikit-learn's
    ``StratifiedGroupKFold``); folds whose training side lacks a class that has images elsewhere are kept
    (the class is then missing from that fold's model, as it would be for a new patient set)."""
    from sklearn.model_selection import GroupKFold, StratifiedGroupKFold

    names, inverse, table = _group_table(labels, groups, len(classes))
    k = min(k, len(names))
    if k < 2:
        return []
    y = np.asarray(labels)
    if k <= table.sum(0).max():
        splits = StratifiedGroupKFold(n_splits=k, shuffle=True, random_state=seed).split(np.zeros(len(y)), y, inverse)
    else:  # too few images of every class to stratify: groups alone
        splits = GroupKFold(n_splits=k).split(np.zeros(len(y)), y, inverse)
    folds = []
    for tr, va in splits:
        if len(va) and len(np.unique(np.asarray(labels)[tr])) >= 2:
            folds.append((np.sort(tr), np.sort(va)))
    return folds


def _split_from_file(dataset: Dataset, path: Path) -> Split:
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as err:
        raise DatasetError(f"The split file {path} is not text ({err.reason}). Give a text file listing the "
                           "validation images, one name per line, or --split bach-patient.") from err
    except OSError as err:
        raise DatasetError(f"Cannot read the split file {path} ({err}). Give a file listing the validation images, "
                           "one name per line, or --split bach-patient.") from err
    from .groups import image_ids, listed_images

    ids = image_ids(dataset)
    val, missing, ambiguous = listed_images([s for s in text.splitlines() if s.strip()], ids)
    if ambiguous:
        raise DatasetError(f"The split file names {ambiguous[0].rsplit('/', 1)[-1]}, which several images are called "
                           f"(e.g. {ambiguous[0]}): name each with its folder.")
    if missing:
        raise DatasetError(f"The split file lists {len(missing)} file(s) not in the dataset, e.g. "
                           f"{sorted(missing)[0]}.")
    chosen = set(val)
    train = [i for i in range(len(dataset)) if i not in chosen]
    if not train:
        raise DatasetError(f"The split file {path.name} puts every image in validation; leave some for training.")
    if dataset.groups is None:
        return Split(train, sorted(val), f"file:{path.name}")  # may share patients: said by the verdict
    g = np.asarray(dataset.groups, dtype=object)
    both = sorted(set(g[train]) & set(g[sorted(val)]))
    notes = [f"The split file puts {len(both)} {dataset.group_kind or 'group'}(s) on both sides, e.g. {both[0]}: "
             f"{OPTIMISTIC}."] if both else []
    return Split(train, sorted(val), f"file:{path.name}", notes, not both, dataset.group_kind or "group",
                 len(set(g[train])), len(set(g[sorted(val)])))


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
    return Split(train, val, "bach-patient (eva's patient-aware split, 268/132)", [], True, "patient")
