"""One window of a slide: its tissue share, its pixels, resized for the model.

The steps every path through a slide shares — classification, patch export,
training and evaluation — so none of them reaches into another module's
private names: tissue fractions of windows and cells from the thumbnail's
mask, the pixels of a window read from the right level, and the area-averaged
resize to the network's input.
"""

from __future__ import annotations

import numpy as np

from .io.slide import Slide
from .tiling import Grid
from .tissue import TissueParams, detect_tissue

__all__ = ["read_window", "resize_area", "tissue_fractions", "window_tissue_fraction"]


def resize_area(region: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """``region`` (uint8 RGB) resized to ``size`` ``(h, w)`` by area averaging (PIL's BOX: no aliasing)."""
    if region.shape[:2] == tuple(size):
        return region
    from PIL import Image

    return np.asarray(Image.fromarray(region).resize((size[1], size[0]), Image.Resampling.BOX))


def read_window(slide: Slide, grid: Grid, row: int, col: int, size: tuple[int, int]) -> np.ndarray:
    """Window ``(row, col)`` of ``grid``, read from the grid's level and resized to ``size``."""
    y, x, h, w = grid.read_box(row, col)
    return resize_area(slide.read_region(grid.level, y, x, h, w), size)


def tissue_fractions(slide: Slide, grid: Grid, tissue: TissueParams | None, slide_mpp: tuple[float, float]):
    """Tissue fraction of every window and cell, and of the whole image, from the slide's (cached) thumbnail.

    Returns ``(window fractions, cell fractions, image fraction)``.
    """
    thumb, tds = slide.thumbnail(2000)
    mask = detect_tissue(thumb, mpp=slide_mpp[1] * tds[1], params=tissue)
    win_frac, cell_frac = window_tissue_fraction(mask, tds, grid)
    return win_frac, cell_frac, float(mask.mean())


def window_tissue_fraction(mask: np.ndarray, mask_downsample: tuple[float, float], grid: Grid) -> np.ndarray:
    """Fraction of tissue in each window and each cell, from a low-resolution mask.

    Returns ``(window fractions (rows, cols), cell fractions (cell rows, cell cols))``.
    """
    integral = np.zeros((mask.shape[0] + 1, mask.shape[1] + 1), np.float64)
    integral[1:, 1:] = np.cumsum(np.cumsum(mask, 0, dtype=np.float64), 1)

    def boxes(origin: float, step: float, size: float, n: int, ds: float, limit: int) -> tuple[np.ndarray, np.ndarray]:
        start = origin + step * np.arange(n)
        a = np.clip(np.round(start / ds).astype(int), 0, limit)
        b = np.clip(np.round((start + size) / ds).astype(int), 0, limit)
        return a, np.maximum(b, np.minimum(a + 1, limit))

    def fractions(n: tuple[int, int], size: tuple[float, float]) -> np.ndarray:
        ya, yb = boxes(grid.origin_px[0], grid.stride_px[0], size[0], n[0], mask_downsample[0], mask.shape[0])
        xa, xb = boxes(grid.origin_px[1], grid.stride_px[1], size[1], n[1], mask_downsample[1], mask.shape[1])
        s = (
            integral[yb][:, xb] - integral[ya][:, xb] - integral[yb][:, xa] + integral[ya][:, xa]
        )
        area = np.maximum((yb - ya)[:, None] * (xb - xa)[None, :], 1)
        return (s / area).astype(np.float32)

    return fractions(grid.n_windows, grid.window_px), fractions(grid.n_cells, grid.stride_px)
