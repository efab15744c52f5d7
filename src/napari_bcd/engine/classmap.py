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
    from ..qc import QCResult
    from ..settings import ClassifySettings
    from .record import RunRecord

__all__ = ["CellAccumulator", "ClassMap", "ModelRef"]


@dataclass(frozen=True)
class ModelRef:
    """The model that made a map: its name, its checkpoint (when it was loaded from one) and its weights' hash.

    Enough to name it to a pathologist, to retrain it, and to know a later run used the same model.
    """

    name: str = ""
    path: str = ""
    weights_sha256: str = ""
    backbone: str = ""

    @classmethod
    def of(cls, model) -> ModelRef:
        """Of a :class:`~napari_bcd.model.Classifier` (its checkpoint and hash when it was loaded from one)."""
        card = model.card
        return cls(card.name, str(getattr(model, "source_path", "") or ""),
                   str(getattr(model, "weights_sha256", "") or card.weights_sha256 or ""), card.backbone)

    def to_dict(self) -> dict[str, str]:
        return {"name": self.name, "path": self.path, "weights_sha256": self.weights_sha256,
                "backbone": self.backbone}

    @classmethod
    def from_dict(cls, d: dict | None) -> ModelRef:
        d = d if isinstance(d, dict) else {}
        return cls(*(str(d.get(k) or "") for k in ("name", "path", "weights_sha256", "backbone")))


@dataclass
class ClassMap:
    """The result of classifying one slide, with the run that made it.

    A map carries what it needs to be made again: the model (:class:`ModelRef`),
    every setting of the run (:class:`~napari_bcd.settings.ClassifySettings`), the
    decision rule its labels follow and the run's record.  Retraining, re-predicting,
    exports, done-records and cohorts read them from here; ``info``, the JSON the
    summary carries, is derived from them, never kept beside them.

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
    grid
        Geometry: cells and windows in level-0 pixels and µm.
    classes
        Class names in probability order: the model's.
    model
        The model that made it.
    settings
        The run's settings (None for a map made otherwise).
    decision
        The rule the labels follow (None: the most probable class), and ``uncertain_cells`` the cells it left
        uncertain, by reason.
    quality
        ``(rows, cols)`` image-quality score of each cell (mean over its
        windows: :mod:`napari_bcd.quality`; NaN on glass), or None.
    run
        The typed record of the run that made the map (None for a map made otherwise).
    qc, qc_cells
        What quality control found (:class:`~napari_bcd.qc.QCResult`) and the reason code of every cell it kept
        out of the map (``(rows, cols)`` uint8, 0 where none; those cells are labelled 0), or None without QC.
    view_spread
        With test-time augmentation, how far each cell's windows' flipped and rotated views disagree (mean total
        variation distance, 0-1; :func:`~napari_bcd.model.inference.view_spread`), else None.
    repredicted
        The box of cells ``(r0, r1, c0, c1)`` a retrain re-predicted in place, if one did.
    retrained_from
        The checkpoint a retrain made the model from, if one did.
    """

    probs: np.ndarray
    labels: np.ndarray
    tissue: np.ndarray
    window_done: np.ndarray
    grid: Grid
    classes: tuple[str, ...]
    slide_name: str = ""
    slide_shape: tuple[int, int] = (0, 0)
    model: ModelRef = field(default_factory=ModelRef)
    settings: ClassifySettings | None = None
    decision: DecisionRule | None = None
    uncertain_cells: dict = field(default_factory=dict)
    quality: np.ndarray | None = None
    run: RunRecord | None = None
    qc: QCResult | None = None
    qc_cells: np.ndarray | None = None
    view_spread: np.ndarray | None = None
    repredicted: tuple[int, int, int, int] | None = None
    retrained_from: str = ""

    @property
    def model_name(self) -> str:
        return self.model.name

    @property
    def model_path(self) -> str:
        """The checkpoint that made it (the Review dock retrains it), when known."""
        return self.model.path

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

        return self.decision if self.decision is not None else DecisionRule()

    @property
    def info(self) -> dict:
        """The run as JSON data, for the summary and exports: what ran and how fast, the decision rule applied
        (with the cells it left uncertain), the stain check, the settings and the model.  Derived: code reads the
        typed fields."""
        decision = {**self.rule.to_dict(), "uncertain_cells": dict(self.uncertain_cells)}
        out: dict = self.run.info(decision) if self.run is not None else {"decision": decision}
        if self.settings is not None:
            out["settings"] = self.settings.to_dict()
        out["model"] = self.model.to_dict()
        if self.repredicted is not None:
            out["repredicted_cells"] = [int(v) for v in self.repredicted]
        if self.retrained_from:
            out["retrained_from"] = self.retrained_from
        if self.qc is not None:
            out["qc"] = self.qc.to_dict()
        return out

    @property
    def qc_windows(self) -> np.ndarray:
        """``(window rows, window cols)`` bool: windows quality control failed (skipped or set aside)."""
        if self.qc is None:
            return np.zeros(self.window_done.shape, bool)
        return self.qc.window_reason > 0

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
        self.s_sums = np.zeros(shape, np.float64)

    def _cells(self, r: int, c: int) -> tuple[slice, slice] | None:
        ya, yb = max(r, self.r0), min(r + self.kh, self.r1)
        xa, xb = max(c, self.c0), min(c + self.kw, self.c1)
        if ya >= yb or xa >= xb:
            return None
        return slice(ya - self.r0, yb - self.r0), slice(xa - self.c0, xb - self.c0)

    def add(self, windows: np.ndarray, probs: np.ndarray, quality: np.ndarray | None = None,
            spread: np.ndarray | None = None) -> None:
        for i, (r, c) in enumerate(windows):
            cells = self._cells(int(r), int(c))
            if cells is None:
                continue
            self.sums[cells] += probs[i]
            self.counts[cells] += 1
            if spread is not None:
                self.s_sums[cells] += spread[i]
            if quality is not None and np.isfinite(quality[i]):
                self.q_sums[cells] += quality[i]
                self.q_counts[cells] += 1

    def probabilities(self) -> np.ndarray:
        with np.errstate(invalid="ignore", divide="ignore"):
            probs = (self.sums / self.counts[..., None]).astype(np.float32)
        probs[self.counts == 0] = np.nan
        return probs

    def spread(self) -> np.ndarray:
        """Each cell's mean view disagreement (test-time augmentation), NaN where no window reached it."""
        with np.errstate(invalid="ignore", divide="ignore"):
            out = (self.s_sums / self.counts).astype(np.float32)
        out[self.counts == 0] = np.nan
        return out

    def quality(self) -> np.ndarray:
        with np.errstate(invalid="ignore", divide="ignore"):
            q = (self.q_sums / self.q_counts).astype(np.float32)
        q[self.q_counts == 0] = np.nan
        return q
