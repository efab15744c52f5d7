"""Patches from annotated regions of a slide, in an ICIAR folder a training run reads (:mod:`.iciar`).

:func:`plan_patches` chooses the windows (before any pixel of level 0 is read)
and counts them per class; :func:`iter_export_patches` cuts them, and records
each patch's slide, level-0 box, coverage and region in ``provenance.csv`` so a
training run never splits a region (:mod:`.groups`).
"""

from __future__ import annotations

import csv
import io
import json
import os
from collections import Counter
from collections.abc import Generator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from .._fileio import atomic_write, is_ours, remember_written
from ..classes import order_classes
from ..errors import DatasetError
from ..io.slide import Slide
from ..settings import MIN_TISSUE
from .iciar import DATASET_INFO, GROUND_TRUTH, PROVENANCE_HEADER

if TYPE_CHECKING:
    from ..tissue import TissueParams

__all__ = ["ExportProgress", "ExportResult", "PatchPlan", "iter_export_patches", "plan_patches"]


@dataclass(frozen=True)
class ExportProgress:
    done: int
    total: int


@dataclass
class ExportResult:
    """What :func:`iter_export_patches` wrote."""

    root: Path
    counts: dict[str, int]
    too_few: list[str]
    skipped_unknown: int = 0

    def __str__(self) -> str:
        counts = ", ".join(f"{k} {v}" for k, v in self.counts.items())
        few = f"; too few patches for {', '.join(self.too_few)}" if self.too_few else ""
        return f"wrote {sum(self.counts.values())} patches to {self.root} ({counts}){few}"


@dataclass
class PatchPlan:
    """Which windows of a slide become training patches, per class, before any pixel is read.

    Attributes
    ----------
    jobs
        ``(window row, window col, class name, coverage)`` of every window kept.
    regions_of
        The region (annotation) each job's window lies in most: its id in the
        annotation file, else its position ("#3"); recorded in ``provenance.csv``
        so training never splits a region between training and validation.
    counts
        Windows per class the regions name (0 included), in :func:`~napari_bcd.classes.order_classes` order.
    regions
        Annotated regions per class name (classes with at least one region).
    field_um, coverage, min_tissue, stride
        The settings that gave these counts.
    """

    jobs: list[tuple[int, int, str, float]]
    counts: dict[str, int]
    regions: dict[str, int]
    field_um: tuple[float, float]
    coverage: float
    min_tissue: float
    stride: float
    grid: Any = None
    unknown: int = 0
    off_slide: dict[str, int] = field(default_factory=dict)
    regions_of: list[str] = field(default_factory=list)

    @property
    def empty_classes(self) -> list[str]:
        """Classes with regions but no window."""
        return [k for k in self.regions if self.counts.get(k, 0) == 0]

    def table(self) -> str:
        return ", ".join(f"{k} {self.counts.get(k, 0)} window(s) from {v} region(s)" for k, v in self.regions.items())

    def advice(self, min_per_class: int = 1) -> str:
        """What to do when a class yields fewer than ``min_per_class`` windows ("" when none does)."""
        few = [k for k in self.regions if self.counts.get(k, 0) < min_per_class]
        if not few:
            return ""
        fh, fw = self.field_um
        parts = [f"{', '.join(few)}: {', '.join(str(self.counts.get(k, 0)) for k in few)} window(s). A training window "
                 f"is {fh:.0f} x {fw:.0f} µm and must lie at least {self.coverage:.0%} inside regions of one class, "
                 f"on at least {self.min_tissue:.0%} tissue."]
        off = [k for k in few if self.off_slide.get(k)]
        if off:
            parts.append(f"Regions of {', '.join(off)} lie outside the slide: draw them on the image.")
        smaller = [f for f in (200.0, 128.0, 64.0) if f < min(fh, fw)]
        field = f"choose a smaller field (e.g. {smaller[0]:.0f} µm)" if smaller else "choose a smaller field"
        parts.append(f"Draw larger regions, lower the coverage, {field}, or overlap the windows (50 %: stride 0.5).")
        return " ".join(parts)


def plan_patches(
    slide: Slide,
    annotations: Sequence,
    *,
    field_um: tuple[float, float],
    patch_px: tuple[int, int] | None = None,
    stride: float = 1.0,
    coverage: float = 0.5,
    min_tissue: float = MIN_TISSUE,
    tissue: TissueParams | None = None,
    mpp: float | None = None,
) -> PatchPlan:
    """Choose the windows :func:`iter_export_patches` would cut, and count them per class.

    A window of ``field_um`` on a grid of ``stride`` (fraction of the field)
    is kept when at least ``coverage`` of it lies inside one class's regions
    and at least ``min_tissue`` of it is tissue.  Fast: polygons and a tissue
    mask from the thumbnail, no pixel of level 0 read.

    Raises
    ------
    DatasetError
        For settings that cannot work (a non-positive field, coverage outside
        (0, 1], no pixel size), annotations that name no class, or a class name that cannot be a folder name.
    """
    from shapely import STRtree, union_all
    from shapely.geometry import box

    from ..settings import ClassifySettings
    from ..tiling import grid_for
    from ..windows import select_windows, tissue_fractions

    if mpp is not None:
        slide.mpp = (float(mpp), float(mpp))
    if not all(np.isfinite(v) and v > 0 for v in field_um):
        raise DatasetError(f"The field must be positive µm, got {field_um}.")
    if not (0 < coverage <= 1) or not (0 <= min_tissue <= 1):
        raise DatasetError(f"coverage must be in (0, 1] and min_tissue in [0, 1], got {coverage} and {min_tissue}.")
    if patch_px is None:
        patch_px = _patch_px(field_um)
    grid = grid_for(slide, None, ClassifySettings(stride=stride), input_px=patch_px, field_um=field_um)
    per_class: dict[str, list] = {}
    region_ids: dict[str, list[str]] = {}
    unknown = 0
    for i, a in enumerate(annotations):
        if a.class_name is None:
            unknown += 1
            continue
        per_class.setdefault(a.class_name, []).append(a.to_shapely().buffer(0))
        region_ids.setdefault(a.class_name, []).append(str(a.group) if a.group else f"#{i + 1}")
    if not per_class:
        raise DatasetError("None of the annotations names a class (all are unclassified, Region* or Ignore*): "
                           "classify the regions first.")
    for name in per_class:
        check_folder_name(name)
    names = order_classes(per_class)
    unions = {name: union_all(per_class[name]) for name in names}
    slide_box = box(0, 0, slide.dimensions[1], slide.dimensions[0])
    off_slide = {name: sum(1 for p in polys if not p.intersects(slide_box)) for name, polys in per_class.items()}
    win_tissue, _, _ = tissue_fractions(slide, grid, tissue, slide.mpp)
    tree = STRtree(list(unions.values()))
    cids = list(unions)
    jobs: list[tuple[int, int, str, float]] = []
    regions_of: list[str] = []
    area = grid.window_px[0] * grid.window_px[1]
    for r, c in np.argwhere(select_windows(win_tissue, min_tissue)):
        r, c = int(r), int(c)
        y, x, h, w = grid.window_box(r, c)
        wbox = box(x, y, x + w, y + h)
        best, best_cov = None, 0.0
        for idx in tree.query(wbox):
            cov = unions[cids[int(idx)]].intersection(wbox).area / area
            if cov > best_cov:
                best, best_cov = cids[int(idx)], cov
        if best is not None and best_cov >= coverage:
            jobs.append((r, c, best, best_cov))
            areas = [p.intersection(wbox).area for p in per_class[best]]
            regions_of.append(region_ids[best][int(np.argmax(areas))])
    counts = Counter(name for _, _, name, _ in jobs)
    return PatchPlan(
        jobs=jobs,
        counts={n: counts.get(n, 0) for n in names},
        regions={n: len(per_class[n]) for n in names},
        field_um=(float(field_um[0]), float(field_um[1])),
        coverage=coverage, min_tissue=min_tissue, stride=stride, grid=grid, unknown=unknown,
        off_slide={k: v for k, v in off_slide.items() if v}, regions_of=regions_of,
    )


def check_folder_name(name: str) -> None:
    """A class name becomes a folder of the dataset: refuse one no file system can hold as one folder."""
    if name in (".", "..") or any(ch in name for ch in '/\\:*?"<>|\0') or name != name.strip():
        raise DatasetError(f"The class {name!r} cannot be a folder name (it holds / \\ : * ? \" < > | or blanks at "
                           f"its ends). Give it another name, e.g. with --label '{name}=NewName'.")


def _patch_px(field_um: tuple[float, float]) -> tuple[int, int]:
    """The field's aspect, 512 px on its long side."""
    long = 512
    ratio = field_um[0] / field_um[1]
    return (round(long * ratio), long) if ratio <= 1 else (long, round(long / ratio))


def iter_export_patches(
    slide: Slide,
    annotations: Sequence,
    out_dir: str | os.PathLike[str],
    *,
    field_um: tuple[float, float],
    patch_px: tuple[int, int] | None = None,
    stride: float = 1.0,
    coverage: float = 0.5,
    min_tissue: float = MIN_TISSUE,
    tissue: TissueParams | None = None,
    min_per_class: int = 20,
    mpp: float | None = None,
    plan: PatchPlan | None = None,
    overwrite: bool = False,
) -> Generator[ExportProgress, None, ExportResult]:
    """Cut ICIAR-style patches from annotated regions of a slide.

    The windows are those of :func:`plan_patches` (pass ``plan`` to reuse
    one).  Each patch is read from the nearest finer level and saved as PNG
    at ``patch_px`` (default: the field's aspect, 512 px on its long side).
    A patch replaces a file of its name only where an earlier export wrote it (and nobody changed it since), or
    with ``overwrite``; any other is refused before the first patch.
    """
    from ..windows import read_window

    if patch_px is None:
        patch_px = _patch_px(field_um)
    if plan is None:
        plan = plan_patches(slide, annotations, field_um=field_um, patch_px=patch_px, stride=stride,
                            coverage=coverage, min_tissue=min_tissue, tissue=tissue, mpp=mpp)
    grid, jobs, unknown = plan.grid, plan.jobs, plan.unknown
    out = Path(out_dir)
    for table in (out / GROUND_TRUTH, out / "provenance.csv"):  # before any patch: the tables this run adds to
        _readable_csv(table)
    stem = Path(slide.name).stem
    names = [_patch_name(stem, grid, r, c) for r, c, _, _ in jobs]
    folders = ([d.name for d in out.iterdir() if d.is_dir() and not d.name.startswith(".")] if out.is_dir() else [])
    if not overwrite:
        _refuse_foreign(out, names, {cname for *_, cname, _ in jobs} | set(folders))
    out.mkdir(parents=True, exist_ok=True)
    info = out / DATASET_INFO
    if info.is_file():
        try:
            old = json.loads(info.read_text(encoding="utf-8")).get("field_um")
        except ValueError:
            old = None
        if old and not np.allclose(old, field_um, rtol=1e-3):
            raise DatasetError(f"{out} holds patches of a {old[0]:.0f} x {old[1]:.0f} µm field; these would be "
                               f"{field_um[0]:.0f} x {field_um[1]:.0f} µm. Use another folder or the same field.")
    with atomic_write(info, "w") as fh:
        json.dump({"field_um": list(field_um), "patch_px": list(patch_px)}, fh)
    gt_rows, prov_rows, written = [], [], []
    counts = Counter()
    from PIL import Image

    try:
        yield ExportProgress(0, len(jobs))
        for k, (r, c, cname, cov) in enumerate(jobs):
            patch = read_window(slide, grid, r, c, patch_px)
            by, bx, bh, bw = grid.window_box(r, c)
            fname = names[k]
            for other in folders:  # one class wins: the same window labelled otherwise by an earlier export goes
                if other != cname:
                    (out / other / fname).unlink(missing_ok=True)
            buf = io.BytesIO()
            Image.fromarray(patch).save(buf, format="PNG")
            (out / cname).mkdir(exist_ok=True)  # a class folder only for a class with a patch
            with atomic_write(out / cname / fname, "wb") as fh:
                fh.write(buf.getvalue())
            written.append(out / cname / fname)
            gt_rows.append((fname, cname))
            region = plan.regions_of[k] if k < len(plan.regions_of) else ""
            prov_rows.append((fname, cname, slide.name, round(by, 2), round(bx, 2), round(bh, 2), round(bw, 2),
                              round(cov, 4), region))
            counts[cname] += 1
            yield ExportProgress(k + 1, len(jobs))
    finally:
        # Also when stopped half-way: the CSVs list exactly the patches written, the ledger each of them.
        _append_csv(out / GROUND_TRUTH, gt_rows, None)
        _append_csv(out / "provenance.csv", prov_rows, PROVENANCE_HEADER)
        remember_written(*written)
    all_counts = {n: counts.get(n, 0) for n in plan.counts}
    too_few = [n for n, v in all_counts.items() if 0 < v < min_per_class or (v == 0 and n in plan.regions)]
    return ExportResult(out, all_counts, too_few, unknown)


def _patch_name(stem: str, grid, r: int, c: int) -> str:
    """A patch's file name: the window's level-0 box, unique per slide and geometry, whatever the grid's stride."""
    by, bx, bh, bw = grid.window_box(r, c)
    return f"{stem}_y{round(by)}_x{round(bx)}_{round(bh)}x{round(bw)}.png"


def _refuse_foreign(out: Path, names: list[str], folders: set[str]) -> None:
    """Refuse, before any patch, when a file (or link) these patches would replace or remove was not written by an
    earlier export (or changed since): a user's own image of the same name is never lost."""
    foreign = [out / folder / name for folder in sorted(folders) for name in dict.fromkeys(names)
               if os.path.lexists(out / folder / name) and not is_ours(out / folder / name)]
    if foreign:
        more = f" and {len(foreign) - 1} more" if len(foreign) > 1 else ""
        raise DatasetError(f"{foreign[0]}{more} already exist(s) with the names of these patches, and napari-bcd did "
                           "not write them (or they changed since). Choose another --out, move them, or pass "
                           "--overwrite to replace them.")


def _readable_csv(path: Path) -> None:
    """Refuse a table this export would add its rows to but cannot read (binary, not UTF-8): never replaced."""
    if not path.exists():
        return
    try:
        with open(path, newline="", encoding="utf-8") as fh:
            for _row in csv.reader(fh):
                pass
    except (UnicodeDecodeError, csv.Error, OSError) as err:
        raise DatasetError(f"{path} is not a UTF-8 CSV this export can add its patches to ({type(err).__name__}); "
                           "it is left as it is. Move it away or choose another --out folder.") from None


def _append_csv(path: Path, rows: list[tuple], header: tuple | None) -> None:
    """Add rows to a CSV (other slides may have written it), replacing rows of the same file names."""
    existing: list[list[str]] = []
    if path.is_file():
        with open(path, newline="", encoding="utf-8") as fh:
            existing = [row for row in csv.reader(fh) if row]
        if header and existing and existing[0][0] == header[0]:
            existing = existing[1:]  # this version's header, or an older one with fewer columns
    names = {str(r[0]) for r in rows}
    kept = [row for row in existing if row[0] not in names]
    with atomic_write(path, "w") as fh:
        w = csv.writer(fh, lineterminator="\n")
        if header:
            w.writerow(header)
        w.writerows(kept)
        w.writerows(rows)
