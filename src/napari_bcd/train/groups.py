"""Groups: what a training/validation split must never cut (a patient, a slide, a region).

Photos of one patient, or windows cut from one annotated region, are
near-copies of each other: validating on them measures memory, not what a
model does on a patient it has not seen.  Every image of a dataset can carry
a group, from (in this order):

* ``provenance.csv``, which :func:`~napari_bcd.train.iter_export_patches`
  (and the Train dock) write beside the patches: the slide and the region
  (annotation) each patch was cut from;
* a third column of ``microscopy_ground_truth.csv`` (``file,label,group``);
* a folder per patient (or slide) inside each class folder;
* the file-name conventions of public datasets and of napari-bcd's own
  patches (:data:`NAME_CONVENTIONS`: TCGA, CPTAC and GTEx barcodes, BreakHis,
  BRACS, CAMELYON), when one of them names every image and gives at least
  two groups (:func:`find_groups`): never a group where none can be seen;
* a CSV given by the user (``--groups FILE.csv``: ``file,group``);
* a regular expression on the file name (``--group-pattern REGEX``: the
  first capture group, e.g. ``^(P\\d+)_`` for ``P12_003.png``).

The user's own groups win over those found; ``--no-groups`` drops them all.

What the groups are is said in words (``kind``): "patient", "slide",
"region" or "group" when unknown, so every report can say how its validation
was drawn.
"""

from __future__ import annotations

import csv
import os
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING

from ..errors import DatasetError

if TYPE_CHECKING:
    from .iciar import Dataset

__all__ = [
    "GROUP_KINDS",
    "NAME_CONVENTIONS",
    "PROVENANCE",
    "find_groups",
    "group_dataset",
    "groups_from_csv",
    "groups_from_pattern",
    "provenance_groups",
    "with_groups",
    "without_groups",
]

#: What a group can be, most general last.
GROUP_KINDS = ("patient", "slide", "region", "group")
PROVENANCE = "provenance.csv"


@dataclass(frozen=True)
class NameConvention:
    """A file-name convention that names an image's patient or slide: the first capture group of ``pattern``."""

    name: str
    pattern: str
    kind: str


#: The conventions :func:`find_groups` recognises, in the order tried (the first that names every image wins).
NAME_CONVENTIONS: tuple[NameConvention, ...] = (
    NameConvention("TCGA barcodes", r"(?i)\b(TCGA-[A-Z0-9]{2}-[A-Z0-9]{4})", "patient"),
    NameConvention("CPTAC case ids", r"\b(C3[LN]-\d{5})", "patient"),
    NameConvention("GTEx donor ids", r"(?i)\b(GTEX-[A-Z0-9]{4,5})", "patient"),
    NameConvention("BreakHis names", r"SOB_[BM]_[A-Z]{1,3}-(\d+-[A-Z0-9]+)-\d+-\d+", "patient"),
    NameConvention("BRACS names", r"^(BRACS_\d+)_", "slide"),
    NameConvention("CAMELYON17 names", r"(?i)^(patient_\d+)_node_\d+", "patient"),
    NameConvention("CAMELYON16 names", r"(?i)^((?:tumor|normal|test)_\d{3})\b", "slide"),
    NameConvention("napari-bcd patch names (slide_yY_xX_HxW)", r"^(.+)_y-?\d+_x-?\d+_\d+x\d+\.\w+$", "slide"),
)


def find_groups(names: Sequence[str]) -> tuple[dict[str, str], NameConvention] | None:
    """The groups the file names themselves carry: ``(file -> group, the convention)``, or None.

    A convention is used only when it names every image and gives at least two groups; otherwise nothing is
    assumed (an image without a recognisable patient is never put in a group of its own).
    """
    for conv in NAME_CONVENTIONS:
        rx = re.compile(conv.pattern)
        found = {}
        for name in names:
            m = rx.search(name)
            if m is None:
                break
            found[name] = m.group(1).upper() if conv.kind == "patient" and "(?i)" in conv.pattern else m.group(1)
        else:
            if len(set(found.values())) >= 2:
                return found, conv
    return None


def without_groups(dataset: Dataset) -> Dataset:
    """``dataset`` with no groups (the user's ``--no-groups``)."""
    return replace(dataset, groups=None, group_kind="", group_source="")


def _clean(text: str) -> str:
    return " ".join(str(text).split())


def with_groups(dataset: Dataset, groups: dict[str, str], *, kind: str, source: str) -> Dataset:
    """``dataset`` with a group for every image, from ``groups`` (file name -> group).

    Raises
    ------
    DatasetError
        When some images have no group (naming the first), so a split is never
        half grouped.
    """
    if kind not in GROUP_KINDS:
        raise DatasetError(f"Unknown group kind {kind!r}; use one of {', '.join(GROUP_KINDS)}.")
    found = [groups.get(p.name) for p in dataset.paths]
    missing = [p.name for p, g in zip(dataset.paths, found, strict=True) if not g]
    if missing:
        raise DatasetError(f"{source} gives no group for {len(missing)} of {len(dataset)} image(s), e.g. "
                           f"{missing[0]}. Give every image a group (a patient, slide or region), or none.")
    return replace(dataset, groups=tuple(str(g) for g in found), group_kind=kind, group_source=source)


def groups_from_csv(path: str | os.PathLike[str]) -> dict[str, str]:
    """``file name -> group`` from a CSV of ``file,group`` rows (a header row is allowed).

    Raises
    ------
    DatasetError
        For a file that cannot be read, rows without a group, or a file
        named twice with different groups.
    """
    p = Path(path)
    try:
        text = p.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError as err:
        raise DatasetError(f"The groups file {p} is not text ({err.reason}). Give a CSV of file,group rows.") from err
    except OSError as err:
        raise DatasetError(f"Cannot read the groups file {p} ({err.strerror or err}).") from err
    out: dict[str, str] = {}
    for n, row in enumerate(csv.reader(text.splitlines()), start=1):
        if not row or not row[0].strip():
            continue
        if n == 1 and row[0].strip().lower() in ("file", "filename", "image", "name", "path"):
            continue  # a header
        if len(row) < 2 or not row[1].strip():
            raise DatasetError(f"{p}, line {n}: expected file,group, got {','.join(row)!r}.")
        name, group = Path(row[0].strip()).name, _clean(row[1])
        if out.get(name, group) != group:
            raise DatasetError(f"{p}, line {n}: {name} is given two groups ({out[name]!r} and {group!r}).")
        out[name] = group
    if not out:
        raise DatasetError(f"The groups file {p} lists no image.")
    return out


def groups_from_pattern(names: Iterable[str], pattern: str) -> dict[str, str]:
    """``file name -> group``: the first capture group of ``pattern`` (searched in each name).

    Raises
    ------
    DatasetError
        For an invalid expression, one without a capture group, or a name it
        does not match.
    """
    try:
        rx = re.compile(pattern)
    except re.error as err:
        raise DatasetError(f"--group-pattern {pattern!r} is not a regular expression ({err}).") from err
    if rx.groups < 1:
        raise DatasetError(f"--group-pattern {pattern!r} has no capture group: put the group's part of the name "
                           r"in parentheses, e.g. '^(P\d+)_'.")
    out = {}
    for name in names:
        m = rx.search(name)
        if m is None or not m.group(1):
            raise DatasetError(f"--group-pattern {pattern!r} does not match {name}; every image needs a group.")
        out[name] = m.group(1)
    return out


def provenance_groups(root: Path, names: Sequence[str]) -> tuple[dict[str, str], str] | None:
    """Groups of patches napari-bcd cut, from ``provenance.csv``: ``(file -> group, kind)``, or None.

    The region (annotation) a patch came from is its group; regions whose
    windows overlap on the slide share pixels, so they join one group.  When
    the patches come from several slides and every class has at least two
    slides, the slide is the group instead (slides are closer to patients).
    """
    path = root / PROVENANCE
    if not path.is_file():
        return None
    try:
        with open(path, newline="", encoding="utf-8") as fh:
            rows = [r for r in csv.DictReader(fh) if r.get("filename")]
    except (OSError, UnicodeDecodeError, csv.Error):
        return None
    wanted = set(names)
    rows = [r for r in rows if r["filename"] in wanted]
    if not rows or {r["filename"] for r in rows} != wanted:
        return None  # patches from elsewhere too: no partial grouping
    slides_per_class: dict[str, set[str]] = {}
    for r in rows:
        slides_per_class.setdefault(r.get("label", ""), set()).add(r.get("slide", ""))
    if len(slides_per_class) > 1 and all(len(s) >= 2 for s in slides_per_class.values()):
        return {r["filename"]: _clean(r.get("slide", "")) for r in rows}, "slide"
    return _merge_overlapping(rows), "region"


def _merge_overlapping(rows: list[dict]) -> dict[str, str]:
    """Group = slide + region; regions with overlapping windows merged (union-find over window boxes)."""
    parent: dict[str, str] = {}

    def find(a: str) -> str:
        while parent.setdefault(a, a) != a:
            parent[a] = parent[parent[a]]
            a = parent[a]
        return a

    boxes: dict[str, list[tuple[float, float, float, float, str]]] = {}
    for r in rows:
        slide = _clean(r.get("slide", ""))
        region = _clean(r.get("region", "")) or "?"
        key = f"{slide} / {region}"
        find(key)
        try:
            y, x, h, w = (float(r[k]) for k in ("y", "x", "h", "w"))
        except (KeyError, TypeError, ValueError):
            continue
        boxes.setdefault(slide, []).append((y, x, y + h, x + w, key))
    for items in boxes.values():
        items.sort()
        for i, (_y0, x0, y1, x1, key) in enumerate(items):
            for yy0, xx0, _yy1, xx1, other in items[i + 1 :]:
                if yy0 >= y1:
                    break  # sorted by top: nothing further down overlaps
                if xx0 < x1 and x0 < xx1 and find(key) != find(other):
                    parent[find(other)] = find(key)
    out = {}
    for r in rows:
        key = f"{_clean(r.get('slide', ''))} / {_clean(r.get('region', '')) or '?'}"
        out[r["filename"]] = find(key)
    return out


def group_dataset(dataset: Dataset, *, groups_csv: str | os.PathLike[str] | None = None,
                  pattern: str | None = None, kind: str | None = None) -> Dataset:
    """``dataset`` with the user's groups (``--groups FILE.csv`` or ``--group-pattern``), which win over the
    folder's own; ``kind`` says what they are ("patient", "slide", "region"; default "group").

    Raises
    ------
    DatasetError
        For both sources at once, or groups that do not cover every image.
    """
    if groups_csv and pattern:
        raise DatasetError("Give the groups one way: --groups FILE.csv or --group-pattern REGEX, not both.")
    if groups_csv:
        return with_groups(dataset, groups_from_csv(groups_csv), kind=kind or "group",
                           source=f"--groups {Path(groups_csv).name}")
    if pattern:
        return with_groups(dataset, groups_from_pattern([p.name for p in dataset.paths], pattern),
                           kind=kind or "group", source=f"--group-pattern {pattern}")
    if kind and dataset.groups is not None:
        return replace(dataset, group_kind=kind)
    return dataset
