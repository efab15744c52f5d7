"""ICIAR 2018 (BACH) folders: reading datasets (patches are cut from annotated regions by :mod:`.patches`).

Layout (the challenge's, and what :func:`iter_export_patches` writes)::

    Normal/ Benign/ InSitu/ Invasive/      images
    microscopy_ground_truth.csv            no header: filename,label
    provenance.csv                         (ours) slide, level-0 box, annotation, coverage
    napari-bcd-dataset.json                (ours) the field in µm every patch shows

The official download nests it as ``ICIAR2018_BACH_Challenge/Photos/``.
"""

from __future__ import annotations

import csv
import io
import json
import logging
import os
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from ..classes import CLASS_NAMES, class_id
from ..errors import DatasetError

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
    """Images and their class indices (0-based, in ``classes`` order)."""

    root: Path
    paths: list[Path]
    labels: np.ndarray
    classes: tuple[str, ...] = CLASS_NAMES
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
    """Read an ICIAR/BACH folder (the official download or one napari-bcd wrote).

    File names and labels are cross-checked with ``microscopy_ground_truth.csv``
    when it exists; disagreements and unreadable images are reported by path.

    Raises
    ------
    DatasetError
        When the folder has no class folders or no images.
    """
    r = Path(root)
    if not r.is_dir():
        raise DatasetError(f"{r} is not a folder. Give the ICIAR folder (with Normal/ Benign/ InSitu/ Invasive/).")
    for candidate in (r, r / "Photos", r / "ICIAR2018_BACH_Challenge" / "Photos"):
        if any((candidate / c).is_dir() for c in CLASS_NAMES):
            r = candidate
            break
    else:
        raise DatasetError(f"{r} has no Normal/ Benign/ InSitu/ Invasive/ folders (nor Photos/ holding them).")
    paths: list[Path] = []
    labels: list[int] = []
    problems: list[str] = []
    for i, cname in enumerate(CLASS_NAMES):
        d = r / cname
        if not d.is_dir():
            continue
        for p in sorted(d.iterdir()):
            if p.suffix.lower() in _IMAGE_SUFFIXES and not p.name.startswith("."):
                paths.append(p)
                labels.append(i)
    if not paths:
        raise DatasetError(f"{r} has class folders but no images (.tif, .png, .jpg).")
    gt = r / GROUND_TRUTH
    csv_groups: dict[str, str] = {}
    if gt.is_file():
        by_name = {p.name: (p, lab) for p, lab in zip(paths, labels, strict=True)}
        listed = set()
        try:
            text = gt.read_text(encoding="utf-8-sig")
            if "\0" in text:
                raise ValueError("it holds NUL bytes")
        except (OSError, ValueError) as err:  # UnicodeDecodeError is a ValueError
            raise DatasetError(f"{gt} is not a text CSV ({err}); write it as CSV text (file name, class[, group]) "
                               "or remove it to take the classes from the folders.") from err
        for row in csv.reader(io.StringIO(text, newline="")):
            if len(row) < 2 or not row[0].strip():
                continue
            name, label = row[0].strip(), row[1].strip()
            listed.add(name)
            if len(row) > 2 and row[2].strip():
                csv_groups[name] = " ".join(row[2].split())
            cid = class_id(label)
            if cid is None and label.isdigit():
                cid = int(label) + 1  # some copies use 0-3
            if name not in by_name:
                problems.append(f"{gt.name} lists {name}, which is not in any class folder")
            elif cid is None or CLASS_NAMES[by_name[name][1]] != CLASS_NAMES[cid - 1]:
                problems.append(f"{by_name[name][0]}: {gt.name} says {label!r}, its folder says "
                                f"{CLASS_NAMES[by_name[name][1]]}")
        for name, (p, _) in by_name.items():
            if name not in listed:
                problems.append(f"{p} is not listed in {gt.name}")
    field_um = None
    info = r / DATASET_INFO
    if info.is_file():
        try:
            fu = json.loads(info.read_text(encoding="utf-8")).get("field_um")
            field_um = (float(fu[0]), float(fu[-1])) if fu else None
        except (ValueError, TypeError, IndexError):
            problems.append(f"{info} is not valid; the field it records is ignored")
    ds = Dataset(r, paths, np.asarray(labels, np.int64), CLASS_NAMES, problems, field_um)
    ds = _known_groups(ds, csv_groups)
    for msg in ds.problems:
        log.warning("%s", msg)
    return ds


def _known_groups(ds: Dataset, csv_groups: dict[str, str]) -> Dataset:
    """The folder's own groups: the patches' provenance (slide, region), else the CSV's third column."""
    from .groups import provenance_groups, with_groups

    prov = provenance_groups(ds.root, [p.name for p in ds.paths])
    if prov is not None:
        return with_groups(ds, prov[0], kind=prov[1], source=f"{ds.root.name}/provenance.csv")
    if csv_groups:
        if all(p.name in csv_groups for p in ds.paths):
            return with_groups(ds, csv_groups, kind="group", source=f"{GROUND_TRUTH} (third column)")
        ds.problems.append(f"{GROUND_TRUTH} gives a group (third column) for only {len(csv_groups)} of {len(ds)} "
                           "images: the groups are ignored. Give every image its patient, or none.")
    return ds
