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
* a manifest beside the images (:func:`manifest_groups`): any CSV or TSV in
  the folder whose header names a file column and a patient, case, slide or
  region column (``file,patient``; a GDC sample sheet's ``File Name`` and
  ``Case ID``; ``image_id,slide_id``), when it names every image;
* the file-name conventions of public datasets and of napari-bcd's own
  patches (:data:`NAME_CONVENTIONS`: TCGA, CPTAC and GTEx barcodes, BreakHis,
  BRACS, CAMELYON), when one of them names every image and gives at least
  two groups (:func:`find_groups`): never a group where none can be seen;
* a CSV given by the user (``--groups FILE.csv``: ``file,group``);
* a regular expression on the file name (``--group-pattern REGEX``: the
  first capture group, e.g. ``^(P\\d+)_`` for ``P12_003.png``).

A table (a manifest, ``--groups``) names an image by its path inside the dataset folder, or by its file name or
stem where no other image shares them (:func:`match_groups`): class folders numbered from 001 each are common,
and a bare ``001.png`` is never given to both.

The user's own groups win over those found; ``--no-groups`` drops them all.

What the groups are is said in words (``kind``): "patient", "slide",
"region" or "group" when unknown, so every report can say how its validation
was drawn.
"""

from __future__ import annotations

import csv
import os
import re
from collections import Counter
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
    "image_ids",
    "listed_images",
    "manifest_groups",
    "match_groups",
    "provenance_groups",
    "with_groups",
    "without_groups",
]

#: What a group can be, most general last.
GROUP_KINDS = ("patient", "slide", "region", "group")
PROVENANCE = "provenance.csv"


#: Header words of a file column (a manifest's, a groups file's), compared lower-case with spaces and hyphens as
#: underscores.
FILE_COLUMNS = ("file", "filename", "file_name", "image", "image_id", "image_name", "name", "path", "patch",
                "tile")
#: Header words of a group column, and the kind of group each names.
GROUP_COLUMNS = {"patient": "patient", "patient_id": "patient", "case": "patient", "case_id": "patient",
                 "subject": "patient", "subject_id": "patient", "submitter_id": "patient", "donor": "patient",
                 "slide": "slide", "slide_id": "slide", "slide_name": "slide", "wsi": "slide", "region": "region",
                 "group": "group"}
#: A CSV bigger than this is not read as a manifest (a table of measurements, not of images).
MANIFEST_MAX_BYTES = 50_000_000


def header_word(text: str) -> str:
    """A header cell as :data:`FILE_COLUMNS` and :data:`GROUP_COLUMNS` spell it."""
    return "_".join(str(text).strip().lower().replace("-", " ").split())


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


def image_ids(dataset: Dataset) -> list[str]:
    """Each image's path inside the dataset folder (``Tumour/001.png``; its name in a flat folder)."""
    out = []
    for p in dataset.paths:
        try:
            out.append(p.relative_to(dataset.root).as_posix())
        except ValueError:
            out.append(p.name)
    return out


def _key(text: str) -> str:
    """A file as a table names it, compared as a relative path: ``.\\Tumour\\001.png`` is ``Tumour/001.png``."""
    parts = [t for t in text.strip().replace("\\", "/").split("/") if t not in ("", ".")]
    return "/".join(parts)


def _fits(key: str, image: str) -> bool:
    """Whether a table's file names an image: one path ends the other (``data/Tumour/001.png`` and
    ``Tumour/001.png``; ``001.png``), the name also without its extension (``image_id`` columns often drop it)."""
    k, i = key.split("/"), image.split("/")
    n = min(len(k), len(i))
    k, i = k[-n:], i[-n:]
    return k[:-1] == i[:-1] and k[-1] in (i[-1], Path(i[-1]).stem)


def _matches(keys: Iterable[str], ids: Sequence[str]) -> tuple[list[list[str]], Counter]:
    """Per image, the keys that name it; and how many images each key names.  A key names the images its path
    fits (:func:`_fits`), else those of its name (or stem): a table written on another machine, whose folders
    differ from the dataset's, still names ``Benign/b001.tif`` by ``/scans/photos/b001.tif``."""
    by_last: dict[str, list[int]] = {}
    for i, image in enumerate(ids):
        name = image.rsplit("/", 1)[-1]
        for k in dict.fromkeys((name, Path(name).stem)):
            by_last.setdefault(k, []).append(i)
    per_image: list[list[str]] = [[] for _ in ids]
    hits: Counter = Counter()
    for key in keys:
        cands = by_last.get(key.rsplit("/", 1)[-1], [])
        named = [i for i in cands if _fits(key, ids[i])] or cands
        for i in named:
            per_image[i].append(key)
        hits[key] = len(named)
    return per_image, hits


def match_groups(rows: Iterable[tuple[str, str]], ids: Sequence[str], *, by_name: bool = False
                 ) -> tuple[list[str | None], list[str], list[str]]:
    """``(group of each image or None, images given two groups, images a bare name cannot tell apart)``.

    ``rows`` are ``(file, group)`` as a table gives them; ``ids`` the images' paths inside the dataset
    (:func:`image_ids`).  A row names an image by its path (``Tumour/001.png``, also under a further folder:
    ``D:\\scans\\Tumour\\001.png``), or by its file name or its stem (``image_id`` columns often drop the
    extension) where no other image of the dataset shares them: in class folders ``Tumour/001.png`` and
    ``Stroma/001.png`` are often two patients, and ``001.png`` alone cannot say which.  ``by_name``: the groups come
    from the names themselves (a pattern, a naming convention), so one name has one group wherever it is.
    """
    return _match(rows, ids, by_name)[:3]


def _match(rows: Iterable[tuple[str, str]], ids: Sequence[str], by_name: bool
           ) -> tuple[list[str | None], list[str], list[str], Counter]:
    """:func:`match_groups`, and how many images each of the table's files names."""
    table: dict[str, set[str]] = {}
    for file, group in rows:
        if k := _key(file):
            table.setdefault(k, set()).add(group)
    per_image, hits = _matches(table, ids)
    found: list[str | None] = []
    conflicts, ambiguous = [], []
    for image, keys in zip(ids, per_image, strict=True):
        own = [k for k in keys if hits[k] == 1] or (keys if by_name else [])
        if keys and not own:
            ambiguous.append(image)
        groups = {g for k in own for g in table[k]}
        if len(groups) > 1:
            conflicts.append(image)
        found.append(next(iter(groups)) if len(groups) == 1 else None)
    return found, conflicts, ambiguous, hits


def listed_images(listed: Iterable[str], ids: Sequence[str], *, by_name: bool = False
                  ) -> tuple[list[int], list[str], list[str]]:
    """``(the images a list of files names, the entries that name none, images a bare name cannot tell apart)``,
    matched as :func:`match_groups` matches a table's files (a split file, a card's validation images)."""
    keys = list(dict.fromkeys(t for t in (_key(x) for x in listed) if t))
    found, _, ambiguous, hits = _match(((k, "listed") for k in keys), ids, by_name)
    return [i for i, f in enumerate(found) if f], [k for k in keys if not hits[k]], ambiguous


def with_groups(dataset: Dataset, groups: dict[str, str], *, kind: str, source: str, by_name: bool = False
                ) -> Dataset:
    """``dataset`` with a group for every image, from ``groups`` (file -> group, matched as :func:`match_groups`
    says; ``by_name`` when the groups come from the names themselves).

    Raises
    ------
    DatasetError
        When some images have no group (naming the first), or a bare file name
        names two images, so a split is never half grouped nor guessed.
    """
    if kind not in GROUP_KINDS:
        raise DatasetError(f"Unknown group kind {kind!r}; use one of {', '.join(GROUP_KINDS)}.")
    ids = image_ids(dataset)
    found, conflicts, ambiguous = match_groups(groups.items(), ids, by_name=by_name)
    if ambiguous:
        name = ambiguous[0].rsplit("/", 1)[-1]
        both = [i for i in ids if i.rsplit("/", 1)[-1] == name]
        raise DatasetError(f"{source} names {name}, which is the name of {len(both)} images ({', '.join(both[:3])}): "
                           f"name each with its folder ({both[0]}) so its group is not a guess.")
    if conflicts:
        raise DatasetError(f"{source} gives {conflicts[0]} two groups (named two ways: with and without its folder, "
                           "or its extension). Give each image one group.")
    missing = [i for i, g in zip(ids, found, strict=True) if not g]
    if missing:
        raise DatasetError(f"{source} gives no group for {len(missing)} of {len(dataset)} image(s), e.g. "
                           f"{missing[0]}. Give every image a group (a patient, slide or region), or none.")
    return replace(dataset, groups=tuple(str(g) for g in found), group_kind=kind, group_source=source)


def groups_from_csv(path: str | os.PathLike[str]) -> dict[str, str]:
    """``file name -> group`` from a CSV (or TSV) of ``file,group`` rows, or any manifest whose header names a file
    column and a group column (:func:`manifest_groups`' columns: ``image_id,patient_id``, a GDC sample sheet)."""
    return _groups_file(path)[0]


def _groups_file(path: str | os.PathLike[str]) -> tuple[dict[str, str], str | None]:
    """:func:`groups_from_csv`, and the kind of group its header's column names (None: not said).

    Raises
    ------
    DatasetError
        For a file that cannot be read, rows without a group, or a file
        named twice with different groups.
    """
    p = Path(path)
    try:
        rows = _table(p)
    except (UnicodeDecodeError, ValueError, csv.Error) as err:
        raise DatasetError(f"The groups file {p} is not a text CSV ({err}). Give a CSV of file,group rows.") from err
    except OSError as err:
        raise DatasetError(f"Cannot read the groups file {p} ({err.strerror or err}).") from err
    fc, gc, first, kind = 0, 1, 0, None
    if rows and rows[0] and (cols := _manifest_columns(rows[0])) is not None:
        fc, gc, kind = cols
        first = 1
    elif rows and rows[0] and header_word(rows[0][0]) in FILE_COLUMNS:
        first = 1  # a file,group header with another name for the group
    out: dict[str, str] = {}
    for n, row in enumerate(rows[first:], start=first + 1):
        if len(row) <= fc or not row[fc].strip():
            continue
        if len(row) <= gc or not row[gc].strip():
            raise DatasetError(f"{p}, line {n}: expected a file and its group, got {','.join(row)!r}.")
        name, group = _key(row[fc]), _clean(row[gc])
        if out.get(name, group) != group:
            raise DatasetError(f"{p}, line {n}: {name} is given two groups ({out[name]!r} and {group!r}). Give each "
                               "image one group; two images of this name in different folders: name each with its "
                               "folder (Tumour/001.png).")
        out[name] = group
    if not out:
        raise DatasetError(f"The groups file {p} lists no image.")
    return out, kind


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


def _table(path: Path) -> list[list[str]]:
    """The rows of a CSV or TSV (tab-separated when its name says so or its first line has tabs)."""
    text = path.read_text(encoding="utf-8-sig")
    if "\0" in text:
        raise ValueError("it holds NUL bytes")
    first = text.split("\n", 1)[0]
    tab = path.suffix.lower() == ".tsv" or ("\t" in first and "," not in first)
    return list(csv.reader(text.splitlines(), delimiter="\t" if tab else ","))


def _manifest_columns(header: Sequence[str]) -> tuple[int, int, str] | None:
    """``(file column, group column, kind)`` named by a header, the most patient-like group column first."""
    words = [header_word(h) for h in header]
    files = [i for i, w in enumerate(words) if w in FILE_COLUMNS]
    groups = [i for i, w in enumerate(words) if w in GROUP_COLUMNS]
    if not files or not groups:
        return None
    g = min(groups, key=lambda i: (GROUP_KINDS.index(GROUP_COLUMNS[words[i]]), i))
    return files[0], g, GROUP_COLUMNS[words[g]]


def _by_image(rows: Sequence[Sequence[str]], fc: int, gc: int, ids: Sequence[str]
              ) -> tuple[dict[str, str], list[str], list[str]]:
    """``(image -> group, images given two groups, images a bare name cannot tell apart)`` of a manifest's rows
    (:func:`match_groups`)."""
    pairs = [(row[fc], _clean(row[gc])) for row in rows
             if len(row) > max(fc, gc) and row[fc].strip() and row[gc].strip()]
    found, conflicts, ambiguous = match_groups(pairs, ids)
    return {i: g for i, g in zip(ids, found, strict=True) if g}, conflicts, ambiguous


def manifest_groups(root: Path, names: Sequence[str], skip: Sequence[str] = ()
                    ) -> tuple[dict[str, str], str, str, list[str]]:
    """Groups from a manifest beside the images: ``(image -> group, kind, source, notes)``; ``({}, "", "", notes)``
    when none names every image.  ``names``: the images' paths inside ``root`` (:func:`image_ids`), matched as
    :func:`match_groups` says.

    Every CSV/TSV in ``root`` (but ``skip``: the ground truth, the provenance) whose header names a file column
    (:data:`FILE_COLUMNS`) and a group column (:data:`GROUP_COLUMNS`; a patient before a slide before a region)
    is read.  One that names every image with at least two groups is used (the first by name); one that names
    some images only, one image twice with two groups, or a bare name two images share, is not, and ``notes``
    say so: never half a grouping.
    """
    notes: list[str] = []
    try:
        files = sorted(p for p in root.iterdir() if p.suffix.lower() in (".csv", ".tsv") and p.is_file()
                       and p.name not in skip and not p.name.startswith("."))
    except OSError:
        return {}, "", "", notes
    for path in files:
        try:
            if path.stat().st_size > MANIFEST_MAX_BYTES:
                continue
            rows = _table(path)
        except (OSError, ValueError, csv.Error):
            continue
        cols = _manifest_columns(rows[0]) if rows else None
        if cols is None:
            continue
        fc, gc, kind = cols
        found, conflicts, ambiguous = _by_image(rows[1:], fc, gc, names)
        column = rows[0][gc].strip()
        if conflicts:
            notes.append(f"{path.name} gives {conflicts[0]} two {column} values: its groups are not used.")
        elif ambiguous:
            name = ambiguous[0].rsplit("/", 1)[-1]
            notes.append(f"{path.name} names {name}, the name of {len(ambiguous)} images in different folders: its "
                         f"groups are not used. Name each with its folder ({ambiguous[0]}).")
        elif len(found) == len(names) and len(set(found.values())) >= 2:
            return found, kind, f"{path.name} (column {column!r})", notes
        elif found and len(found) < len(names):
            notes.append(f"{path.name} gives a {column} for only {len(found)} of {len(names)} images: its groups "
                         "are not used. Give every image its group there, or none.")
    return {}, "", "", notes


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
        groups, said = _groups_file(groups_csv)
        return with_groups(dataset, groups, kind=kind or said or "group",
                           source=f"--groups {Path(groups_csv).name}")
    if pattern:
        return with_groups(dataset, groups_from_pattern([p.name for p in dataset.paths], pattern),
                           kind=kind or "group", source=f"--group-pattern {pattern}", by_name=True)
    if kind and dataset.groups is not None:
        return replace(dataset, group_kind=kind)
    return dataset
