"""Training folders: the ICIAR 2018 (BACH) layout and any other class names (patches are cut from annotated regions
by :mod:`.patches`).

Layout (the challenge's, and what :func:`iter_export_patches` writes)::

    Normal/ Benign/ InSitu/ Invasive/      images, a folder per class (any class names)
    microscopy_ground_truth.csv            filename,label[,group] (a header row allowed)
    provenance.csv                         (ours) slide, level-0 box, annotation, coverage
    napari-bcd-dataset.json                (ours) the field in µm every patch shows

The official download nests it as ``ICIAR2018_BACH_Challenge/Photos/``.  The classes are the data's own: a
two-class folder trains a two-class model (:func:`read_iciar`).
"""

from __future__ import annotations

import csv
import io
import json
import logging
import os
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from ..classes import canonical_class, order_classes
from ..errors import DatasetError
from .groups import FILE_COLUMNS, GROUP_COLUMNS, header_word

if TYPE_CHECKING:
    pass

__all__ = ["DATASET_INFO", "GROUND_TRUTH", "PROVENANCE_HEADER", "Dataset", "read_iciar"]

log = logging.getLogger(__name__)
_IMAGE_SUFFIXES = {".tif", ".tiff", ".png", ".jpg", ".jpeg"}
GROUND_TRUTH = "microscopy_ground_truth.csv"
DATASET_INFO = "napari-bcd-dataset.json"
#: provenance.csv: where each patch was cut (slide, level-0 box, coverage) and from which region (annotation).
PROVENANCE_HEADER = ("filename", "label", "slide", "y", "x", "h", "w", "coverage", "region")


@dataclass
class Dataset:
    """Images, their class indices (0-based, in ``classes`` order) and the classes themselves (from the data)."""

    root: Path
    paths: list[Path]
    labels: np.ndarray
    classes: tuple[str, ...]
    problems: list[str] = field(default_factory=list)
    #: The field (µm, h x w) every image shows, when the folder records it (patches napari-bcd cut).
    field_um: tuple[float, float] | None = None
    #: Per image, what a split must never cut (a patient, slide or region; :mod:`.groups`), or None.
    groups: tuple[str, ...] | None = None
    #: What the groups are, in words: "patient", "slide", "region" or "group".
    group_kind: str = ""
    #: Where the groups came from (a file, a column, a pattern), for reports.
    group_source: str = ""

    def __len__(self) -> int:
        return len(self.paths)

    @property
    def n_groups(self) -> int:
        return len(set(self.groups)) if self.groups else 0

    def counts(self) -> dict[str, int]:
        c = Counter(int(v) for v in self.labels)
        return {name: c.get(i, 0) for i, name in enumerate(self.classes)}

    def load(self, i: int) -> np.ndarray:
        """Image ``i`` as uint8 RGB.

        Held to what ``classify`` accepts of a slide: 8-bit RGB (RGBA loses its
        alpha), at least 32 px on each side, no more than 4:1 (it is resized to
        the model's square-ish input; a sliver would be stretched beyond use).

        Raises
        ------
        DatasetError
            Naming the file and what to do.
        """
        from PIL import Image

        p = self.paths[i]
        try:
            with Image.open(p) as im:
                mode, (w, h) = im.mode, im.size
                if mode in ("1", "L", "LA", "I", "I;16", "I;16B", "I;16L", "F"):
                    kind = "grayscale" if mode in ("1", "L", "LA") else f"{mode} (not 8-bit RGB)"
                    raise DatasetError(f"{p} is {kind}; training needs 8-bit RGB H&E images, as classify does. "
                                       "Remove it or convert it to RGB.")
                if min(w, h) < 32:
                    raise DatasetError(f"{p} is {w} x {h} px; training images need at least 32 px on each side.")
                if max(w, h) / min(w, h) > 4:
                    raise DatasetError(f"{p} is {w} x {h} px, a sliver: resized to the model's input it would be "
                                       "stretched beyond use. Crop it closer to square.")
                if mode == "P" and "transparency" in im.info:
                    im = im.convert("RGBA")
                return np.asarray(im.convert("RGB"))
        except DatasetError:
            raise
        except (OSError, SyntaxError, ValueError) as err:
            raise DatasetError(f"{p} cannot be read ({err}). Remove or replace it.") from err


def read_iciar(root: str | os.PathLike[str]) -> Dataset:
    """Read a folder of training images; its classes come from the folder itself.

    Layouts, tried in this order:

    * a folder per class holding the images (the BACH/ICIAR layout, or any
      other class names: ``Tumor/ Stroma/``), also nested as the official
      download nests it (``Photos/``, ``ICIAR2018_BACH_Challenge/Photos/``);
    * a folder per class holding a folder per patient (or slide) of images:
      the sub-folders become the groups a split never cuts;
    * one folder of images with ``microscopy_ground_truth.csv`` naming each
      image's class (``file,label[,group]``, a header row allowed).

    Class folders and labels are read through the vocabulary
    (:func:`~napari_bcd.classes.canonical_class`: "In situ carcinoma" is
    InSitu) and ordered by :func:`~napari_bcd.classes.order_classes` (the
    BACH folders in the BACH order).  File names and labels are cross-checked
    with ``microscopy_ground_truth.csv`` when it exists; disagreements and
    unreadable images are reported by path.

    Raises
    ------
    DatasetError
        When the folder holds no class folders and no labelled images.
    """
    r = Path(root)
    if not r.is_dir():
        raise DatasetError(f"{r} is not a folder. Give a folder with one folder of images per class "
                           "(e.g. Normal/ Benign/ InSitu/ Invasive/).")
    found = _find_layout(r)
    if found is None:
        raise DatasetError(f"{r} has no class folders with images (e.g. Normal/ Benign/ InSitu/ Invasive/, or your "
                           f"own class names), nor images listed with their class in {GROUND_TRUTH}.")
    r, entries, layout = found
    gt = r / GROUND_TRUTH
    listed = _read_ground_truth(gt) if gt.is_file() else None
    problems: list[str] = []
    if layout == "manifest":
        if listed is None:
            raise DatasetError(f"{r} has images but no class folders and no {GROUND_TRUTH}.")
        entries = _manifest_entries(r, listed, problems)
    classes = order_classes(name for _, name, _ in entries)
    if len(classes) < 1 or not entries:
        raise DatasetError(f"{r} has class folders but no images (.tif, .png, .jpg).")
    index = {name: i for i, name in enumerate(classes)}
    paths = [p for p, _, _ in entries]
    labels = [index[name] for _, name, _ in entries]
    folder_groups = [g for _, _, g in entries] if layout == "folders" and all(g for _, _, g in entries) else []
    csv_groups: dict[str, str] = {}
    group_kind = "group"
    if listed is not None and layout != "manifest":
        by_name = {p.name: (p, name) for p, name, _ in entries}
        for name, (label, group) in listed.rows.items():
            if group:
                csv_groups[name] = group
            said = _label_class(label, classes)
            if name not in by_name:
                problems.append(f"{gt.name} lists {name}, which is not in any class folder")
            elif said != by_name[name][1]:
                problems.append(f"{by_name[name][0]}: {gt.name} says {label!r}, its folder says {by_name[name][1]}")
        for name, (p, _) in by_name.items():
            if name not in listed.rows:
                problems.append(f"{p} is not listed in {gt.name}")
        problems.extend(listed.problems)
    elif listed is not None:
        csv_groups = {name: g for name, (_, g) in listed.rows.items() if g}
        problems.extend(listed.problems)
    if listed is not None:
        group_kind = listed.group_kind
    field_um = None
    info = r / DATASET_INFO
    if info.is_file():
        try:
            fu = json.loads(info.read_text(encoding="utf-8")).get("field_um")
            field_um = (float(fu[0]), float(fu[-1])) if fu else None
        except (ValueError, TypeError, IndexError):
            problems.append(f"{info} is not valid; the field it records is ignored")
    ds = Dataset(r, paths, np.asarray(labels, np.int64), classes, problems, field_um)
    ds = _known_groups(ds, csv_groups, folder_groups, group_kind)
    for msg in ds.problems:  # what reads the folder says them (the CLI, the Train dock): here only the detail
        log.info("%s", msg)
    return ds


def _images_in(d: Path) -> list[Path]:
    try:
        return sorted(p for p in d.iterdir()
                      if p.is_file() and p.suffix.lower() in _IMAGE_SUFFIXES and not p.name.startswith("."))
    except OSError:
        return []


def _subfolders(d: Path) -> list[Path]:
    try:
        return sorted(p for p in d.iterdir() if p.is_dir() and not p.name.startswith((".", "_")))
    except OSError:
        return []


def _find_layout(r: Path) -> tuple[Path, list[tuple[Path, str, str]], str] | None:
    """``(root, [(image, class, group)], layout)`` of the first layout that fits (see :func:`read_iciar`)."""
    for candidate in (r, r / "Photos", r / "ICIAR2018_BACH_Challenge" / "Photos"):
        entries = []
        for d in _subfolders(candidate):
            name = canonical_class(d.name)
            if name is not None:
                entries += [(p, name, "") for p in _images_in(d)]
        if entries:
            return candidate, entries, "folders"
    entries = []
    for d in _subfolders(r):  # a folder per class, holding a folder per patient / slide
        name = canonical_class(d.name)
        if name is None or _images_in(d):
            continue
        for g in _subfolders(d):
            entries += [(p, name, g.name) for p in _images_in(g)]
    if entries:
        return r, entries, "folders"
    if (r / GROUND_TRUTH).is_file() and _images_in(r):
        return r, [], "manifest"
    return None


@dataclass
class _Listed:
    """``microscopy_ground_truth.csv``: ``file -> (label, group)``, and what its group column is called."""

    rows: dict[str, tuple[str, str]]
    group_kind: str = "group"
    problems: list[str] = field(default_factory=list)


def _read_ground_truth(gt: Path) -> _Listed:
    try:
        text = gt.read_text(encoding="utf-8-sig")
        if "\0" in text:
            raise ValueError("it holds NUL bytes")
    except (OSError, ValueError) as err:  # UnicodeDecodeError is a ValueError
        raise DatasetError(f"{gt} is not a text CSV ({err}); write it as CSV text (file name, class[, group]) "
                           "or remove it to take the classes from the folders.") from err
    out = _Listed({})
    for n, row in enumerate(csv.reader(io.StringIO(text, newline=""))):
        if len(row) < 2 or not row[0].strip():
            continue
        if n == 0 and header_word(row[0]) in FILE_COLUMNS:
            if len(row) > 2:  # a header: its third column says what the groups are
                out.group_kind = GROUP_COLUMNS.get(header_word(row[2]), "group")
            continue
        name = Path(row[0].strip()).name
        group = " ".join(row[2].split()) if len(row) > 2 else ""
        out.rows[name] = (row[1].strip(), group)
    return out


def _label_class(label: str, classes: tuple[str, ...]) -> str | None:
    """The class a ground-truth label names; a number is an index into the classes (some BACH copies use 0-3)."""
    if label.isdigit() and int(label) < len(classes):
        return classes[int(label)]
    return canonical_class(label)


def _manifest_entries(r: Path, listed: _Listed, problems: list[str]) -> list[tuple[Path, str, str]]:
    """The images of a flat folder, each with the class its ground-truth row names."""
    images = {p.name: p for p in _images_in(r)}
    entries = []
    for name, (label, group) in listed.rows.items():
        cls = canonical_class(label) if not label.isdigit() else None
        if name not in images:
            problems.append(f"{GROUND_TRUTH} lists {name}, which is not in {r}")
        elif cls is None:
            problems.append(f"{images[name]}: {GROUND_TRUTH} gives it no class ({label!r}); it is left out")
        else:
            entries.append((images[name], cls, group))
    for name, p in images.items():
        if name not in listed.rows:
            problems.append(f"{p} is not listed in {GROUND_TRUTH}; it is left out")
    return entries


def _or_note(ds: Dataset, grouped: Callable[[], Dataset]) -> Dataset:
    """The dataset grouped, or as it is with the reason its groups cannot be used among its problems."""
    try:
        return grouped()
    except DatasetError as err:
        ds.problems.append(f"{err} Its groups are not used.")
        return ds


def _known_groups(ds: Dataset, csv_groups: dict[str, str], folder_groups: list[str],
                  kind: str = "group") -> Dataset:
    """The folder's own groups: the patches' provenance (slide, region), else a folder per group, else the CSV's
    third column, else a manifest beside the images, else the file names' conventions (:mod:`.groups`)."""
    from .groups import PROVENANCE, find_groups, image_ids, manifest_groups, provenance_groups, with_groups

    prov = provenance_groups(ds.root, [p.name for p in ds.paths])
    if prov is not None:
        return _or_note(ds, lambda: with_groups(ds, prov[0], kind=prov[1], source=f"{ds.root.name}/provenance.csv"))
    if len(folder_groups) == len(ds) and len(set(folder_groups)) >= 2:  # by position: names may repeat across folders
        from dataclasses import replace

        return replace(ds, groups=tuple(folder_groups), group_kind="group",
                       group_source="a folder per group inside each class folder")
    if csv_groups:
        if all(p.name in csv_groups for p in ds.paths):
            return _or_note(ds, lambda: with_groups(ds, csv_groups, kind=kind, source=f"{GROUND_TRUTH} (third column)"))
        ds.problems.append(f"{GROUND_TRUTH} gives a group (third column) for only {len(csv_groups)} of {len(ds)} "
                           "images: the groups are ignored. Give every image its patient, or none.")
    groups, kind, source, notes = manifest_groups(ds.root, image_ids(ds), (GROUND_TRUTH, PROVENANCE))
    ds.problems.extend(notes)
    if groups:
        return with_groups(ds, groups, kind=kind, source=source)
    named = find_groups([p.name for p in ds.paths])
    if named is not None:
        groups, conv = named
        return with_groups(ds, groups, kind=conv.kind, source=f"the file names ({conv.name})", by_name=True)
    return ds
