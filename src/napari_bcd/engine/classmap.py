"""The result of classifying a slide (:class:`ClassMap`), and the sums it is built from (:class:`CellAccumulator`).

A cell's probabilities are the mean of every window covering it; the engine
and the retrain's re-prediction both add window probabilities with one
:class:`CellAccumulator`, so the averaging is written once.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np

from ..tiling import Grid

if TYPE_CHECKING:
    from ..decision import DecisionRule
    from .record import RunRecord

__all__ = ["CellAccumulator", "ClassMap"]


@dataclass
class ClassMap:
    """The result of classifying one slide.

    Attributes
    ----------
    probs
        ``(rows, cols, C)`` float32 class probabilities per cell (NaN where no
        window was classified).
    labels
        ``(rows, cols)`` uint8: 0 background / not classified, ``i + 1`` the ``i``-th class, one past the classes
        uncertain.
    tissue
        ``(rows, cols)`` fraction of each cell that is tissue (0-1).
    window_done
        ``(window rows, window cols)`` bool: windows sent to the model.
    quality
        ``(rows, cols)`` image-quality score of each cell (mean over its
        windows: :mod:`napari_bcd.quality`; NaN on glass), or None.
    grid
        Geometry: cells and windows in level-0 pixels and µm.
    classes
        Class names in probability order: the model's.
    info
        The run as JSON data (written into the summary): what ran, how fast,
        the decision rule, the stain check.  Code reads the typed ``run``.
    run
        The typed record of the run that made the map (None for a map made otherwise).
    model_path
        The checkpoint that made it (the Review dock retrains it), when known.
    """

    probs: np.ndarray
    labels: np.ndarray
    tissue: np.ndarray
    window_done: np.ndarray
    grid: Grid
    classes: tuple[str, ...]
    slide_name: str = ""
    slide_shape: tuple[int, int] = (0, 0)
    model_name: str = ""
    info: dict = field(default_factory=dict)
    quality: np.ndarray | None = None
    run: RunRecord | None = None
    model_path: str = ""

    @property
    def uncertain_label(self) -> int:
        """The label of cells the decision rule left uncertain (one past the classes)."""
        return len(self.classes) + 1

    @property
    def n_windows(self) -> int:
        return int(self.window_done.sum())

    @property
    def rule(self) -> DecisionRule:
        """The decision rule the labels follow."""
        from ..decision import DecisionRule

        d = (self.info or {}).get("decision") or {}
        return DecisionRule.from_dict({k: v for k, v in d.items() if k != "uncertain_cells"})

    def layer_transform(self) -> tuple[tuple[float, float], tuple[float, float]]:
        """napari ``(scale, translate)`` in µm that lay the cells over an image of ``scale = mpp``.

        napari puts pixel *centres* at ``index * scale + translate``; an image
        pixel ``i`` of level 0 is centred at ``i * mpp``, so a cell that covers
        level-0 pixels ``[y0, y0 + s)`` is centred at ``(y0 + s / 2 - 0.5) * mpp``.
        """
        g = self.grid
        scale = g.cell_um
        translate = (
            (g.origin_px[0] + g.stride_px[0] / 2 - 0.5) * g.mpp[0],
            (g.origin_px[1] + g.stride_px[1] / 2 - 0.5) * g.mpp[1],
        )
        return scale, translate

    def at_level0(self, y: float, x: float) -> tuple[int, np.ndarray | None]:
        """Label and probabilities of the cell under level-0 pixel ``(y, x)``."""
        cell = self.grid.cell_of_point(y + 0.5, x + 0.5)
        if cell is None:
            return 0, None
        p = self.probs[cell]
        return int(self.labels[cell]), (None if np.isnan(p).any() else p)


class CellAccumulator:
    """Window results summed onto the cells each window covers (``k x k`` cells per window).

    ``add`` takes a batch of windows ``(row, col)`` with their probabilities
    (and optionally quality scores); ``probabilities`` and ``quality`` give
    each cell's mean, NaN where no window reached it.  ``box`` restricts the
    accumulator to the cells ``[r0, r1) x [c0, c1)`` (a re-predicted region).
    """

    def __init__(self, grid: Grid, n_classes: int, box: tuple[int, int, int, int] | None = None) -> None:
        self.kh, self.kw = grid.cells_per_window
        self.r0, self.r1, self.c0, self.c1 = box or (0, grid.n_cells[0], 0, grid.n_cells[1])
        shape = (self.r1 - self.r0, self.c1 - self.c0)
        self.sums = np.zeros((*shape, n_classes), np.float64)
        self.counts = np.zeros(shape, np.int32)
        self.q_sums = np.zeros(shape, np.float64)
        self.q_counts = np.zeros(shape, np.int32)

    def _cells(self, r: int, c: int) -> tuple[slice, slice] | None:
        ya, yb = max(r, self.r0), min(r + self.kh, self.r1)
        xa, xb = max(c, self.c0), min(c + self.kw, self.c1)
        if ya >= yb or xa >= xb:
            return None
        return slice(ya - self.r0, yb - self.r0), slice(xa - self.c0, xb - self.c0)

    def add(self, windows: np.ndarray, probs: np.ndarray, quality: np.ndarray | None = None) -> None:
        for i, (r, c) in enumerate(windows):
            cells = self._cells(int(r), int(c))
            if cells is None:
                continue
            self.sums[cells] += probs[i]
            self.counts[cells] += 1
            if quality is not None and np.isfinite(quality[i]):
                self.q_sums[cells] += quality[i]
                self.q_counts[cells] += 1

    def probabilities(self) -> np.ndarray:
        with np.errstate(invalid="ignore", divide="ignore"):
            probs = (self.sums / self.counts[..., None]).astype(np.float32)
        probs[self.counts == 0] = np.nan
        return probs

    def quality(self) -> np.ndarray:
        with np.errstate(invalid="ignore", divide="ignore"):
            q = (self.q_sums / self.q_counts).astype(np.float32)
        q[self.q_counts == 0] = np.nan
        return q
