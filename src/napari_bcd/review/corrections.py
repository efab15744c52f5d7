"""Corrections: cells of a class map a pathologist gave another class.

From a repainted Labels layer (:func:`corrections_from_labels`), from
classified polygons (:func:`corrections_from_annotations`: QuPath GeoJSON,
napari Shapes), and to and from GeoJSON, where each corrected cell is a
rectangle classified with its new class and named with its old one.
"""

from __future__ import annotations

import datetime as _dt
import math
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from ..errors import BcdError

if TYPE_CHECKING:
    from ..annotations import Annotation
    from ..engine import ClassMap
    from ..tiling import Grid

__all__ = ["Correction", "Corrections", "corrections_from_annotations", "corrections_from_labels",
           "read_corrections"]


@dataclass(frozen=True)
class Correction:
    """One cell given another class.

    ``box_px`` is the cell's window in level-0 pixels ``(y, x, h, w)``: the
    model's field centred on the cell (with the default stride, exactly the
    window the engine classified for it).
    """

    row: int
    col: int
    old: str | None  # the class shown before (None: not classified; "uncertain")
    new: str
    box_px: tuple[float, float, float, float]

    def to_dict(self) -> dict:
        return {"cell": [self.row, self.col], "old": self.old, "new": self.new,
                "box_px": [round(v, 3) for v in self.box_px]}


@dataclass
class Corrections:
    """The corrected cells of one slide's class map, and when they were made."""

    slide: str
    cells: list[Correction]
    classes: tuple[str, ...]
    grid: dict = field(default_factory=dict)
    created: str = ""
    erased: int = 0  # classified cells painted as background: not used for training
    notes: list[str] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.cells)

    def counts(self) -> dict[str, int]:
        out: dict[str, int] = {}
        for c in self.cells:
            out[c.new] = out.get(c.new, 0) + 1
        return out

    def describe(self) -> str:
        if not self.cells:
            return "no corrected cells"
        by = ", ".join(f"{n} to {k}" for k, n in sorted(self.counts().items()))
        return f"{len(self.cells)} corrected cell(s): {by}"

    def to_dict(self) -> dict:
        return {"slide": self.slide, "created": self.created, "classes": list(self.classes),
                "cells": [c.to_dict() for c in self.cells], "erased": self.erased}

    def to_annotations(self, grid: Grid | None = None) -> list[Annotation]:
        """Each corrected cell as a rectangle classified with its new class (level-0 pixels)."""
        from ..annotations import Annotation
        from ..classes import canonical_class, class_styles

        styles = {st.name: st for st in class_styles(self.classes)}
        out = []
        for c in self.cells:
            if grid is not None:
                y = grid.origin_px[0] + c.row * grid.stride_px[0]
                x = grid.origin_px[1] + c.col * grid.stride_px[1]
                h, w = grid.stride_px
            else:
                y, x, h, w = c.box_px
            st = styles.get(c.new)
            out.append(Annotation(label=c.new, class_name=canonical_class(c.new),
                                  polygon=np.array([[y, x], [y, x + w], [y + h, x + w], [y + h, x]]),
                                  color=st.color if st else None,
                                  name=f"corrected from {c.old or 'not classified'} (cell {c.row},{c.col})"))
        return out

    def write_geojson(self, path: str | os.PathLike[str], grid: Grid | None = None, *,
                      overwrite: bool = False) -> Path:
        """QuPath GeoJSON of the corrected cells (classified rectangles), for ``napari-bcd retrain --corrections``."""
        from ..annotations import write_geojson

        return write_geojson(self.to_annotations(grid), path, overwrite=overwrite)


def _now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")


def cell_window(grid: Grid, row: int, col: int) -> tuple[float, float, float, float]:
    """The model's field centred on cell ``(row, col)``, level-0 ``(y, x, h, w)``."""
    cy = grid.origin_px[0] + (row + 0.5) * grid.stride_px[0]
    cx = grid.origin_px[1] + (col + 0.5) * grid.stride_px[1]
    h, w = grid.window_px
    return (cy - h / 2, cx - w / 2, h, w)


def _old_name(class_map, label: int) -> str | None:
    if 0 < label <= len(class_map.classes):
        return class_map.classes[label - 1]
    return "uncertain" if label == class_map.uncertain_label else None


def _raster_downsample(class_map, shape: tuple[int, int]) -> int:
    H, W = class_map.slide_shape
    k = max(1, math.ceil(H / shape[0]))
    for cand in (k - 1, k, k + 1):
        if cand >= 1 and (math.ceil(H / cand), math.ceil(W / cand)) == tuple(shape):
            return cand
    raise BcdError(f"The edited labels ({shape[0]} x {shape[1]}) match neither the class map's cells "
                   f"({class_map.grid.n_cells[0]} x {class_map.grid.n_cells[1]}) nor its raster over the image; "
                   "edit the '<image> classes' layer napari-bcd made.")


def cell_majority(class_map: ClassMap, edited: np.ndarray, min_share: float = 0.5, *,
                  box: tuple[int, int, int, int] | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Per cell: the label covering most of it in ``edited`` and that label's share of the cell.

    ``box`` (raster ``y0, y1, x0, x1``, e.g. a brush stroke's extent): only the
    cells it touches are counted, whole; the others get label -1 and share 0.
    Cells no raster pixel falls in get -1 too.
    """
    g = class_map.grid
    edited = np.asarray(edited)
    if edited.ndim != 2:
        raise BcdError(f"The edited labels must be 2-D, got {edited.ndim}-D.")
    if edited.shape == tuple(g.n_cells):
        major, share = edited.astype(np.int64), np.ones(edited.shape)
        if box is not None:
            keep = np.zeros(edited.shape, bool)
            keep[max(box[0], 0):box[1], max(box[2], 0):box[3]] = True
            major, share = np.where(keep, major, -1), np.where(keep, share, 0.0)
        return major, share
    k = _raster_downsample(class_map, edited.shape)
    h, w = edited.shape
    r = np.floor(((np.arange(h) + 0.5) * k - g.origin_px[0]) / g.stride_px[0]).astype(np.int64)
    c = np.floor(((np.arange(w) + 0.5) * k - g.origin_px[1]) / g.stride_px[1]).astype(np.int64)
    rv = (r >= 0) & (r < g.n_cells[0])
    cv = (c >= 0) & (c < g.n_cells[1])
    if box is not None:  # whole cells: every raster row / column of the cells the box touches
        rv &= _touched(r, box[0], box[1], g.n_cells[0])
        cv &= _touched(c, box[2], box[3], g.n_cells[1])
    sub = edited[np.ix_(rv, cv)].astype(np.int64)
    n_labels = int(max(sub.max(initial=0), class_map.uncertain_label)) + 1
    if sub.min(initial=0) < 0:
        raise BcdError("The edited labels hold negative values; use the class labels shown in the dock.")
    cell_id = (r[rv][:, None] * g.n_cells[1] + c[cv][None, :])
    counts = np.bincount((cell_id * n_labels + sub).ravel(), minlength=g.n_cells[0] * g.n_cells[1] * n_labels)
    counts = counts.reshape(*g.n_cells, n_labels)
    total = counts.sum(-1)
    major = counts.argmax(-1)
    share = np.where(total > 0, counts.max(-1) / np.maximum(total, 1), 0.0)
    major[total == 0] = -1
    return major, share


def _touched(cell_of: np.ndarray, lo: int, hi: int, n: int) -> np.ndarray:
    """Raster lines whose cell is one of the cells of raster lines ``lo:hi``."""
    seen = cell_of[max(lo, 0):max(min(hi, len(cell_of)), 0)]
    seen = seen[(seen >= 0) & (seen < n)]
    if not len(seen):
        return np.zeros(len(cell_of), bool)
    return (cell_of >= seen.min()) & (cell_of <= seen.max())


def corrections_from_labels(class_map: ClassMap, edited_labels: np.ndarray, *, min_share: float = 0.5) -> Corrections:
    """The cells whose label a user changed on the class-map layer.

    Parameters
    ----------
    class_map
        The :class:`~napari_bcd.ClassMap` the layer was made from.
    edited_labels
        The layer's data after editing: the raster napari-bcd made (any
        downsample it chose) or one value per cell.
    min_share
        A cell counts as repainted when at least this share of it carries a
        new class label (a brush stroke clipping a cell's corner does not).

    Painting a class (1..C) over a cell of another class, of no class or an
    uncertain one makes a correction; erasing a classified cell (label 0) is
    counted but not used for training.
    """
    major, share = cell_majority(class_map, edited_labels, min_share)
    old = class_map.labels.astype(np.int64)
    n_cls = len(class_map.classes)
    changed = (major != old) & (major >= 0) & (share >= min_share)
    cells = []
    for r, c in np.argwhere(changed & (major >= 1) & (major <= n_cls)):
        cells.append(Correction(int(r), int(c), _old_name(class_map, int(old[r, c])),
                                class_map.classes[int(major[r, c]) - 1], cell_window(class_map.grid, int(r), int(c))))
    erased = int((changed & (major == 0) & (old > 0)).sum())
    notes = [f"{erased} classified cell(s) erased: not used for training"] if erased else []
    return Corrections(class_map.slide_name, cells, tuple(class_map.classes), class_map.grid.to_dict(), _now(),
                       erased, notes)


def corrections_from_annotations(grid: Grid, annotations: Sequence[Annotation], classes: Sequence[str], *,
                                 labels: np.ndarray | None = None,
                                 slide: str = "", uncertain_label: int | None = None) -> Corrections:
    """Cells whose centre lies in a classified polygon take that polygon's class.

    ``labels`` (the class map's, when there is one) gives each cell's old
    class; a polygon whose class the model does not have is refused.
    """
    import shapely

    from ..classes import match_class

    classes = tuple(classes)

    cells: dict[tuple[int, int], Correction] = {}
    rows = np.arange(grid.n_cells[0])
    cols = np.arange(grid.n_cells[1])
    cy = grid.origin_px[0] + (rows + 0.5) * grid.stride_px[0]
    cx = grid.origin_px[1] + (cols + 0.5) * grid.stride_px[1]
    skipped: dict[str, int] = {}
    for a in annotations:
        name = match_class(a.label, classes)
        if name is None and a.class_name is not None:
            name = match_class(a.class_name, classes)
        if name is None:
            skipped[str(a.label)] = skipped.get(str(a.label), 0) + 1
            continue
        geom = a.to_shapely()
        minx, miny, maxx, maxy = geom.bounds
        rsel = rows[(cy >= miny) & (cy <= maxy)]
        csel = cols[(cx >= minx) & (cx <= maxx)]
        if not len(rsel) or not len(csel):
            continue
        rr, cc = np.meshgrid(rsel, csel, indexing="ij")
        inside = shapely.contains_xy(geom, cx[cc], cy[rr])
        for r, c in zip(rr[inside], cc[inside], strict=True):
            old = None
            if labels is not None:
                v = int(labels[r, c])
                old = classes[v - 1] if 0 < v <= len(classes) else ("uncertain" if v == uncertain_label else None)
            if old == name:
                continue
            cells[(int(r), int(c))] = Correction(int(r), int(c), old, name, cell_window(grid, int(r), int(c)))
    notes = []
    if skipped:
        notes.append("polygons whose label is not one of the model's classes were skipped: "
                     + ", ".join(f"{k!r} ({n})" for k, n in skipped.items()))
    return Corrections(slide, [cells[k] for k in sorted(cells)], classes, grid.to_dict(), _now(), 0, notes)


def read_corrections(path: str | os.PathLike[str], grid: Grid, classes: Sequence[str], *,
                     labels: np.ndarray | None = None, slide: str = "",
                     uncertain_label: int | None = None) -> Corrections:
    """Corrections from a GeoJSON / XML file of classified polygons (level-0 pixels)."""
    from ..annotations import read_annotations

    anns = read_annotations(path)
    if not len(anns):
        raise BcdError(f"{path} holds no polygons: draw the corrected regions and save them as GeoJSON.")
    out = corrections_from_annotations(grid, anns, classes, labels=labels, slide=slide,
                                       uncertain_label=uncertain_label)
    if not out.cells:
        raise BcdError(f"No cell centre of the slide lies inside the classified polygons of {path}"
                       + (f" ({'; '.join(out.notes)})" if out.notes else "") + ".")
    return out

