"""The questions that teach most first: neighbouring uncertain cells merged into regions worth one correction each,
ranked by how many cells a correction there would likely change.

A cell's label is wrong with about its calibrated probability ``1 - p_top`` (a trained model's probabilities are
calibrated by temperature); under test-time augmentation, views that disagree are a second sign, and a cell counts
the larger of the two.  A region's *value* is the sum over its cells: the cells a correction of it is expected to
fix.  After a retrain, :func:`resolved_regions` says how many queued regions are no longer uncertain.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from ..decision import uncertainty

if TYPE_CHECKING:
    from ..engine import ClassMap

__all__ = ["UncertainRegion", "resolved_regions", "uncertain_regions"]


@dataclass(frozen=True)
class UncertainRegion:
    """Neighbouring cells at or above the uncertainty threshold.

    Attributes
    ----------
    rank
        1 = the region whose correction would change most.
    score, max_score
        Mean and highest uncertainty of its cells (0 certain .. 1 uniform).
    value
        The cells a correction is expected to fix: the sum over its cells of ``1 - p_top`` (or, under test-time
        augmentation, the views' disagreement where larger).
    cells
        Cells in the region; ``cell_rows`` / ``cell_cols`` list them.
    box_px
        Level-0 ``(y0, x0, y1, x1)`` around it, cut at the image's edge.
    probabilities
        Mean class probabilities over its cells, by class name.
    """

    rank: int
    score: float
    max_score: float
    cells: int
    box_px: tuple[float, float, float, float]
    probabilities: dict[str, float]
    area_mm2: float
    cell_rows: tuple[int, ...]
    cell_cols: tuple[int, ...]
    value: float = 0.0

    @property
    def centre_px(self) -> tuple[float, float]:
        y0, x0, y1, x1 = self.box_px
        return ((y0 + y1) / 2, (x0 + x1) / 2)

    @property
    def likely(self) -> str:
        """The two most probable classes, e.g. ``"InSitu 0.46 / Invasive 0.41"``."""
        top = sorted(self.probabilities.items(), key=lambda kv: -kv[1])[:2]
        return " / ".join(f"{k} {v:.2f}" for k, v in top)

    def describe(self) -> str:
        return (f"#{self.rank}: about {self.value:.1f} of {self.cells} cell(s) likely wrong, uncertainty "
                f"{self.score:.2f} (max {self.max_score:.2f}), {self.area_mm2:.3f} mm²; {self.likely}")


def uncertain_regions(class_map: ClassMap, measure: str = "margin", n: int = 10,
                      threshold: float = 0.5) -> list[UncertainRegion]:
    """The ``n`` regions of a class map whose correction would teach most.

    Cells that were classified and whose :func:`~.decision.uncertainty` is at
    least ``threshold`` are joined with their 8 neighbours into regions;
    regions are ordered by their value (the cells a correction is expected to fix: see the module's text), then
    their mean uncertainty.  ``threshold`` 0 makes every classified cell a candidate.
    """
    from scipy import ndimage

    u = uncertainty(class_map.probs, measure)
    covered = (class_map.labels > 0) & np.isfinite(u)
    cand = covered & (u >= threshold)
    if not cand.any():
        return []
    lab, count = ndimage.label(cand, structure=np.ones((3, 3), int))
    idx = np.arange(1, count + 1)
    mean_u = np.asarray(ndimage.mean(u, lab, idx))
    wrong = cell_doubt(class_map)
    value = np.asarray(ndimage.sum(np.where(cand, wrong, 0.0), lab, idx))
    order = np.lexsort((-mean_u, -value))[: max(int(n), 0)]
    slices = ndimage.find_objects(lab)
    g = class_map.grid
    H, W = class_map.slide_shape if all(class_map.slide_shape) else (np.inf, np.inf)
    cell_mm2 = g.cell_um[0] * g.cell_um[1] / 1e6
    out = []
    for rank, k in enumerate(order, start=1):
        sl = slices[k]
        sel = lab[sl] == k + 1
        rows, cols = np.nonzero(sel)
        rows, cols = rows + sl[0].start, cols + sl[1].start
        y0 = g.origin_px[0] + sl[0].start * g.stride_px[0]
        x0 = g.origin_px[1] + sl[1].start * g.stride_px[1]
        y1 = min(g.origin_px[0] + sl[0].stop * g.stride_px[0], H)
        x1 = min(g.origin_px[1] + sl[1].stop * g.stride_px[1], W)
        probs = np.nanmean(class_map.probs[rows, cols], axis=0)
        out.append(UncertainRegion(
            rank=rank, score=float(mean_u[k]), max_score=float(u[rows, cols].max()), cells=int(len(rows)),
            box_px=(float(max(y0, 0)), float(max(x0, 0)), float(y1), float(x1)),
            probabilities={c: float(p) for c, p in zip(class_map.classes, probs, strict=True)},
            area_mm2=float(len(rows) * cell_mm2), cell_rows=tuple(int(r) for r in rows),
            cell_cols=tuple(int(c) for c in cols), value=float(value[k])))
    return out


def cell_doubt(class_map: ClassMap) -> np.ndarray:
    """Per cell, how likely its label is wrong: ``1 - p_top``, or the views' disagreement where larger (0 where
    nothing was classified)."""
    p = np.nan_to_num(class_map.probs, nan=1.0 / max(len(class_map.classes), 1))
    doubt = 1.0 - p.max(-1)
    if class_map.view_spread is not None:
        doubt = np.maximum(doubt, np.nan_to_num(class_map.view_spread, nan=0.0))
    return np.where(class_map.labels > 0, doubt, 0.0)


def resolved_regions(regions: list[UncertainRegion], after: ClassMap, measure: str = "margin",
                     threshold: float = 0.5) -> int:
    """How many of ``regions`` (queued on the map before a retrain) are no longer uncertain on ``after``: the mean
    uncertainty of their cells fell below ``threshold``."""
    if not regions:
        return 0
    u = uncertainty(after.probs, measure)
    done = 0
    for r in regions:
        cells = u[list(r.cell_rows), list(r.cell_cols)]
        if np.isfinite(cells).all() and float(cells.mean()) < threshold:
            done += 1
    return done
