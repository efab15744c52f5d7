"""Adaptive overlap: full overlap only where the map is in doubt.

A map at 75 % overlap costs 16 times the windows of one at stride 1, yet on
most of a slide every overlapping window agrees.  ``refine`` classifies the
windows one field apart first (the cells of the overlapping grid, each window
covering ``k x k`` of them), then adds, over the cells that are in doubt, the
windows half a field apart, and where doubt remains the finer lattices down to
full overlap (at 75 %: 4 x 4 cells apart, 2 x 2, then 2 x 1, 1 x 2 and 1 x 1), repeating
each level until no cell covered by a window of it is in doubt:

- a cell whose label is within :data:`REFINE_MARGIN` of changing: its two most probable classes that close, or,
  under a decision rule with per-class thresholds, a thresholded class that close to its threshold
  (:func:`decision_margin`);
- a cell whose label differs from a 4-neighbour's (a boundary between classes, as the rule labels them);
and a tissue cell that no window has reached yet (the coarse lattice missed it) gets one window centred
on it, then is judged like the others.  Below half a field (the lattices with a step of one cell) only
cells whose margin is still below :data:`FINAL_MARGIN` are refined: a clear class boundary is settled at
half a field, and the half-steps (2 x 1, then 1 x 2) sharpen the margin before the last windows are spent.

Cells still in doubt at the last level end with every window that covers them, as at full overlap.  A cell
away from doubt is, at full overlap, the mean of ``k x k`` windows of which only some were classified: the
others are estimated from the classified windows around them (:func:`estimate_windows`: normalised convolution
with a tent one field wide, which on the coarse lattice is bilinear interpolation between its windows), and
the cell is the mean of its windows, classified or estimated (:func:`cell_probabilities`), both to judge doubt
between passes and in the final map.  A cell no classified window covers stays unmapped.  How close that comes
to the full-overlap map is measured by ``benchmarks/bench_cpu.py`` (cells equal, windows used), not assumed.
"""

from __future__ import annotations

from typing import Any

import numpy as np

__all__ = ["FINAL_MARGIN", "REFINE_MARGIN", "cell_probabilities", "cells_reached", "coarse_lattice", "decision_margin",
           "estimate_windows", "in_doubt", "lattice", "next_windows", "spacings", "windows_over", "windows_reaching"]

#: Cells whose top-two probability margin is below this are refined to the next lattice.
REFINE_MARGIN = 0.2
#: Below half a field, only cells whose margin is still below this are refined (class boundaries alone stop
#: at the lattice half a field apart).  Chosen on the bundled slide and a 2 x 2 pyramid of it with real
#: features (``benchmarks/bench_cpu.py``: the trained DenseNet121, windows against full overlap at 75 %,
#: cells equal): with the windows left out estimated (:func:`estimate_windows`), 0.05 uses 32 % / 31 % of the
#: windows for 99.0 % / 98.5 % of cells equal; 0.03, replayed on the same windows, 29 % / 28 % for 98.8 % /
#: 97.8 %.  Without the estimates (each cell the mean of its classified windows only) 0.05 took 36 % / 38 % for
#: 98.2 % / 98.1 %, 0.1 41 % / 47 % for 99.6 % / 99.9 %; stopping at half a field, 20 % for 95 %.
FINAL_MARGIN = 0.05


def coarse_lattice(todo: np.ndarray, cells_per_window: tuple[int, int]) -> np.ndarray:
    """The rows of ``todo`` (window ``(row, col)`` pairs) on the lattice one field apart."""
    kh, kw = cells_per_window
    return (todo[:, 0] % kh == 0) & (todo[:, 1] % kw == 0)


def spacings(cells_per_window: tuple[int, int]) -> list[tuple[int, int]]:
    """The lattices refinement walks through, coarse to fine: one field apart, then half as far, ... then every
    window, with the half-steps before it (4 cells a window: 4 x 4, 2 x 2, 2 x 1, 1 x 2, 1 x 1)."""
    out = [tuple(cells_per_window)]
    while out[-1] != (1, 1):
        out.append((max(1, out[-1][0] // 2), max(1, out[-1][1] // 2)))
    if len(out) >= 2 and min(out[-2]) > 1:  # rows of the finest lattice first, then its columns
        a, b = out[-2]
        out[-1:] = [(a, 1), (1, b), (1, 1)]
    return out


def lattice(n_windows: tuple[int, int], spacing: tuple[int, int]) -> np.ndarray:
    """``n_windows`` mask of the windows on a lattice ``spacing`` apart."""
    out = np.zeros(n_windows, bool)
    out[:: spacing[0], :: spacing[1]] = True
    return out


def decision_margin(probs: np.ndarray, seen: np.ndarray, rule: Any = None,
                    classes: tuple[str, ...] | None = None) -> tuple[np.ndarray, np.ndarray]:
    """How far each seen cell's probabilities are from a change of its label under ``rule`` (None: the most
    probable class), and the labels: the rule's own :meth:`~napari_bcd.decision.DecisionRule.margins`."""
    from ..decision import DecisionRule

    names = tuple(classes) if classes is not None else tuple(str(i) for i in range(probs.shape[-1]))
    return (rule if rule is not None else DecisionRule()).margins(probs, seen, names)


def in_doubt(probs: np.ndarray, counts: np.ndarray, reachable: np.ndarray, margin: float = REFINE_MARGIN,
             boundaries: bool = True, rule: Any = None, classes: tuple[str, ...] | None = None) -> np.ndarray:
    """Cells to refine: a label within ``margin`` of changing (:func:`decision_margin`, under the run's ``rule``
    and its model's ``classes``) or a boundary between labels (see the module text); unreached cells are not
    in doubt until a window has reached them (:func:`windows_reaching`).

    ``probs`` is ``rows x cols x classes`` (NaN where unreached), ``counts`` the windows per cell,
    ``reachable`` the tissue cells some candidate window covers (only those can be in doubt).
    """
    seen = counts > 0
    doubt = np.zeros(seen.shape, bool)
    if not seen.any():
        return doubt
    gap, label = decision_margin(probs, seen, rule, classes)
    doubt |= seen & (gap < margin)
    if not boundaries:
        return doubt & reachable
    label = np.where(seen, label, -1)
    for axis in (0, 1):
        a = np.moveaxis(label, axis, 0)
        differ = (a[1:] != a[:-1]) & (a[1:] >= 0) & (a[:-1] >= 0)
        d = np.moveaxis(doubt, axis, 0)  # a view: flags both sides of each boundary
        d[1:] |= differ
        d[:-1] |= differ
    return doubt & reachable


def windows_reaching(cells: np.ndarray, candidates: np.ndarray, cells_per_window: tuple[int, int]) -> np.ndarray:
    """A few ``candidates`` windows that together reach every one of ``cells`` some candidate can reach: one
    window per cell not reached yet, centred on it where that window is a candidate (a cell no window has
    seen needs a first look, not full overlap)."""
    kh, kw = cells_per_window
    nwr, nwc = candidates.shape
    chosen = np.zeros_like(candidates)
    reached = np.zeros_like(cells)
    for i, j in np.argwhere(cells):
        if reached[i, j]:
            continue
        options = [(r, c) for r in range(max(0, i - kh + 1), min(i, nwr - 1) + 1)
                   for c in range(max(0, j - kw + 1), min(j, nwc - 1) + 1) if candidates[r, c]]
        if not options:
            continue
        r, c = min(options, key=lambda rc: abs(rc[0] + (kh - 1) / 2 - i) + abs(rc[1] + (kw - 1) / 2 - j))
        chosen[r, c] = True
        reached[r : r + kh, c : c + kw] = True
    return chosen


def windows_over(cells: np.ndarray, cells_per_window: tuple[int, int], n_windows: tuple[int, int]) -> np.ndarray:
    """``n_windows`` mask of the windows covering at least one of ``cells`` (window ``(r, c)`` covers cells
    ``[r, r + kh) x [c, c + kw)``)."""
    from numpy.lib.stride_tricks import sliding_window_view

    kh, kw = cells_per_window
    covered = sliding_window_view(cells, (kh, kw)).any(axis=(2, 3))
    out = np.zeros(n_windows, bool)
    h, w = min(n_windows[0], covered.shape[0]), min(n_windows[1], covered.shape[1])
    out[:h, :w] = covered[:h, :w]
    return out


def cells_reached(windows: np.ndarray, cells_per_window: tuple[int, int], n_cells: tuple[int, int]) -> np.ndarray:
    """``n_cells`` mask of the cells that at least one window of the ``windows`` mask covers."""
    kh, kw = cells_per_window
    h, w = windows.shape
    out = np.zeros(n_cells, bool)
    for dr in range(kh):
        for dc in range(kw):
            out[dr : dr + h, dc : dc + w] |= windows
    return out


def estimate_windows(window_probs: np.ndarray, done: np.ndarray, candidates: np.ndarray,
                     radius: tuple[int, int]) -> tuple[np.ndarray, np.ndarray]:
    """Every candidate window's probabilities: the classified ones as they are, the others estimated from the
    classified windows around them, and where it is known.

    Normalised convolution: the classified windows' probabilities and a mask of them are each convolved with a
    separable tent ``radius`` windows wide on each side (weight 1 at the window, 0 at ``radius`` away), and the
    estimate is their ratio.  With ``radius`` the spacing of a lattice of classified windows this interpolates
    bilinearly between them, so a field that varies linearly is estimated exactly between its windows; a
    candidate with no classified window within ``radius`` stays unknown.  ``window_probs`` is
    ``n_windows x classes`` (read only where ``done``); returns it with the estimates filled in (NaN where
    unknown) and the known mask (``done``, or a candidate with a classified neighbour).
    """
    from scipy.ndimage import convolve1d

    p = np.where(done[..., None], np.nan_to_num(window_probs, nan=0.0), 0.0)
    weight = done.astype(np.float64)
    for axis, r in enumerate(radius):
        tent = 1.0 - np.abs(np.arange(-r + 1, r)) / r
        p = convolve1d(p, tent, axis=axis, mode="constant")
        weight = convolve1d(weight, tent, axis=axis, mode="constant")
    known = done | (candidates & (weight > 1e-9))
    with np.errstate(invalid="ignore", divide="ignore"):
        estimate = p / weight[..., None]
    out = np.where(done[..., None], window_probs, estimate).astype(np.float32)
    out[~known] = np.nan
    return out, known


def cell_probabilities(window_probs: np.ndarray, known: np.ndarray, cells_per_window: tuple[int, int],
                       n_cells: tuple[int, int]) -> np.ndarray:
    """Each cell's mean over the ``known`` windows covering it (as :class:`~.classmap.CellAccumulator` averages
    the classified ones), ``n_cells x classes``; NaN where no known window covers a cell."""
    kh, kw = cells_per_window
    h, w = known.shape
    sums = np.zeros((*n_cells, window_probs.shape[-1]))
    counts = np.zeros(n_cells)
    values = np.where(known[..., None], np.nan_to_num(window_probs, nan=0.0), 0.0)
    for dr in range(kh):
        for dc in range(kw):
            rows, cols = min(h, n_cells[0] - dr), min(w, n_cells[1] - dc)
            if rows > 0 and cols > 0:
                sums[dr : dr + rows, dc : dc + cols] += values[:rows, :cols]
                counts[dr : dr + rows, dc : dc + cols] += known[:rows, :cols]
    with np.errstate(invalid="ignore", divide="ignore"):
        probs = (sums / counts[..., None]).astype(np.float32)
    probs[counts == 0] = np.nan
    return probs


def next_windows(probs: np.ndarray, counts: np.ndarray, reachable: np.ndarray, open_: np.ndarray, grid: Any,
                 level: int, rule: Any = None, classes: tuple[str, ...] | None = None) -> tuple[np.ndarray, int]:
    """The next pass's windows (an ``n_windows`` mask among ``open_``) and the lattice level it is on.

    ``probs`` are the cells' probabilities so far (:func:`cell_probabilities`), ``counts`` the classified
    windows covering each cell; ``reachable`` the tissue cells some candidate window covers; ``rule`` and
    ``classes`` the run's decision rule and its model's classes (doubt is judged on the labels the rule gives).
    A level is left for the next, finer one when no window of it covers a cell in doubt.
    """
    levels = spacings(grid.cells_per_window)

    def over(spacing: tuple[int, int]) -> np.ndarray:
        doubt = (in_doubt(probs, counts, reachable, FINAL_MARGIN, False, rule, classes) if min(spacing) == 1
                 else in_doubt(probs, counts, reachable, REFINE_MARGIN, True, rule, classes))
        return windows_over(doubt, grid.cells_per_window, grid.n_windows) & open_ & lattice(grid.n_windows, spacing)

    new = over(levels[level])
    while not new.any() and level + 1 < len(levels):  # this lattice is settled: the next, finer one
        level += 1
        new = over(levels[level])
    new |= windows_reaching(reachable & (counts == 0), open_, grid.cells_per_window)
    return new, level
