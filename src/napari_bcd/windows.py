"""One window of a slide: its tissue share, its pixels, resized for the model.

The steps every path through a slide shares — classification, patch export,
training and evaluation — so none of them reaches into another module's
private names: tissue fractions of windows and cells from the thumbnail's
mask, the pixels of a window read from the right level, and the area-averaged
resize to the network's input.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from concurrent.futures import Executor
from typing import Any

import numpy as np

from .io.slide import Slide
from .settings import MIN_TISSUE
from .tiling import Grid
from .tissue import TissueParams, detect_tissue

__all__ = ["box_weights", "read_window", "resize_area", "sample_tiles", "select_windows", "tile_ranges",
           "tiles_touched", "tissue_fractions", "tissue_mask", "window_batches", "window_tissue_fraction"]


def resize_area(region: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """``region`` (uint8 RGB) resized to ``size`` ``(h, w)`` by area averaging (PIL's BOX: no aliasing)."""
    if region.shape[:2] == tuple(size):
        return region
    from PIL import Image

    return np.asarray(Image.fromarray(region).resize((size[1], size[0]), Image.Resampling.BOX))


def read_window(slide: Slide, grid: Grid, row: int, col: int, size: tuple[int, int], *,
                cache: bool = True) -> np.ndarray:
    """Window ``(row, col)`` of ``grid``, read from the grid's level and resized to ``size``.

    ``cache=False`` reads around the tile cache (a sample that must not spare the engine's pass its decodes).
    """
    y, x, h, w = grid.read_box(row, col)
    return resize_area(slide.read_region(grid.level, y, x, h, w, cache=cache), size)


def select_windows(window_fraction: np.ndarray, min_tissue: float = MIN_TISSUE) -> np.ndarray:
    """Which windows are classified: at least ``min_tissue`` of them tissue, and never none (the one rule).

    Returns the ``(rows, cols)`` bool mask; ``np.argwhere`` of it lists them in row-major order.
    """
    return window_fraction >= max(min_tissue, 1e-6)


def mapped_cells(windows: np.ndarray, cell_fraction: np.ndarray, cells_per_window: tuple[int, int],
                 min_tissue: float = MIN_TISSUE) -> np.ndarray:
    """Which cells a map holds (the one cell rule): covered by one of ``windows`` (a ``(rows, cols)`` bool mask of
    the windows classified) and at least half ``min_tissue`` tissue themselves, so a window on the tissue's edge
    does not paint the glass beside it.  The engine maps these cells and the estimate before a run counts them.
    """
    kh, kw = cells_per_window
    rows, cols = cell_fraction.shape
    covered = np.zeros((rows + kh, cols + kw), np.int32)  # a 2-D prefix sum over the windows: no loop per window
    w = np.asarray(windows, bool)
    covered[kh : kh + w.shape[0], kw : kw + w.shape[1]] = w
    c = covered.cumsum(0).cumsum(1)
    counts = c[kh:, kw:] - c[:-kh, kw:] - c[kh:, :-kw] + c[:-kh, :-kw]
    return (counts[:rows, :cols] > 0) & (cell_fraction >= min_tissue * 0.5)


def tissue_fractions(slide: Slide, grid: Grid, tissue: TissueParams | None,
                     slide_mpp: tuple[float, float]) -> tuple[np.ndarray, np.ndarray, float]:
    """Tissue fraction of every window and cell, and of the whole image, from the slide's (cached) thumbnail.

    Returns ``(window fractions, cell fractions, image fraction)``.
    """
    mask, tds = tissue_mask(slide, tissue, slide_mpp)
    win_frac, cell_frac = window_tissue_fraction(mask, tds, grid)
    return win_frac, cell_frac, float(mask.mean())


def tissue_mask(slide: Slide, tissue: TissueParams | None,
                slide_mpp: tuple[float, float]) -> tuple[np.ndarray, tuple[float, float]]:
    """The tissue detector's mask of the slide's (cached) thumbnail, and the thumbnail's downsample of level 0."""
    thumb, tds = slide.thumbnail(2000)
    return detect_tissue(thumb, mpp=slide_mpp[1] * tds[1], params=tissue), tds


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


def window_batches(slide: Slide, grid: Grid, windows: np.ndarray, batch_size: int, pool: Executor | None = None,
                   stop: threading.Event | None = None,
                   read_row: Callable[..., Any] | None = None,
                   alloc: Callable[[tuple[int, ...]], Any] | None = None) -> Iterator[tuple[np.ndarray, Any]]:
    """The pixels of ``windows`` (``(row, col)`` pairs in row-major order), in batches, each tile decoded once.

    Windows are cut from bands of decoded tile rows as array views: a tile row
    is decoded when the first window needing it comes up (only the tile
    columns some window needs, in ``pool``'s threads), kept while later window
    rows overlap it, and dropped after.  No per-window decode, lookup or
    resize happens here: batches are ``N x h x w x 3`` uint8 at the grid
    level's resolution, and the model's side resizes them (on its device).

    ``read_row`` replaces :meth:`Slide.read_tile_row` (same arguments): a
    :class:`napari_bcd.io.device_decode.DeviceRows` decodes the rows on the
    model's device, and the batches are then uint8 tensors there.  ``alloc``
    gives the array (or CPU tensor) each host batch is stacked into, e.g. a
    pinned tensor (:meth:`napari_bcd.model.Predictor.host_batch`), so the
    copy to a GPU starts from it without another copy.

    Yields
    ------
    (np.ndarray, np.ndarray or torch.Tensor)
        The batch's ``(row, col)`` pairs and its pixels.  ``stop`` (a
        ``threading.Event``) ends the iteration between tile rows and batches.
    """
    read_row = read_row or slide.read_tile_row
    if len(windows) == 0:
        return
    level = grid.level
    th = slide.tile_shape(level)[0]
    _, _, h, w = grid.read_box(int(windows[0][0]), int(windows[0][1]))
    # Which tile columns of each tile row the windows need: only those are decoded.
    needed: dict[int, set[int]] = {}
    boxes = {}
    for r, c in windows:
        y, x, _, _ = grid.read_box(int(r), int(c))
        boxes[(int(r), int(c))] = (y, x)
        rows, cols = tile_ranges(slide, grid, int(r), int(c), clip_rows=False)
        for ty in rows:
            needed.setdefault(ty, set()).update(cols)
    rows: dict[int, np.ndarray] = {}
    batch_rc: list[tuple[int, int]] = []
    batch_px: list[np.ndarray] = []
    current_row = None
    band = None
    band_y0 = 0
    for r, c in windows:
        r, c = int(r), int(c)
        y, x = boxes[(r, c)]
        if r != current_row:
            if stop is not None and stop.is_set():
                return
            current_row = r
            ty0, ty1 = max(y, 0) // th, (y + h - 1) // th
            for ty in [t for t in rows if t < ty0]:
                del rows[ty]  # no later window row reaches back above this one
            for ty in range(ty0, ty1 + 1):
                if ty not in rows:
                    rows[ty] = read_row(level, ty, sorted(needed.get(ty, ())), pool)
            band = _concat([rows[ty] for ty in range(ty0, ty1 + 1)]) if ty1 > ty0 else rows[ty0]
            band_y0 = ty0 * th
        batch_rc.append((r, c))
        batch_px.append(_cut(band, y - band_y0, x, h, w))
        if len(batch_rc) == batch_size:
            yield np.asarray(batch_rc), _stack(batch_px, alloc)
            batch_rc, batch_px = [], []
            if stop is not None and stop.is_set():
                return
    if batch_rc:
        yield np.asarray(batch_rc), _stack(batch_px, alloc)


def tile_ranges(slide: Slide, grid: Grid, row: int, col: int, *, clip_rows: bool = True) -> tuple[range, range]:
    """The tile rows and columns of the grid's level that window ``(row, col)`` covers, within the level.

    ``clip_rows=False`` keeps tile rows past the level's bottom (a band of
    windows running past the image is cut from them, as glass).
    """
    th, tw = slide.tile_shape(grid.level)
    H, W = slide.level_info[grid.level].shape
    y, x, h, w = grid.read_box(row, col)
    last_row = (min(y + h, H) if clip_rows else y + h) - 1
    return range(max(y, 0) // th, last_row // th + 1), range(max(x, 0) // tw, (min(x + w, W) - 1) // tw + 1)


def tiles_touched(slide: Slide, grid: Grid, windows: np.ndarray) -> int:
    """Distinct tiles of the grid's level that the windows cover (the floor for decodes per pass)."""
    tiles = set()
    for r, c in windows:
        rows, cols = tile_ranges(slide, grid, int(r), int(c))
        tiles.update((ty, tx) for ty in rows for tx in cols)
    return len(tiles)


def sample_tiles(slide: Slide, grid: Grid, windows: np.ndarray, n: int = 8) -> list[tuple[int, int]]:
    """Up to ``n`` tiles of the grid's level under windows spread over a pass (to check a decoder on)."""
    if not len(windows):
        return []
    th, tw = slide.tile_shape(grid.level)
    H, W = slide.level_info[grid.level].shape
    picks = windows[np.linspace(0, len(windows) - 1, min(n, len(windows))).round().astype(int)]
    tiles = []
    for r, c in picks:
        y, x, h, w = grid.read_box(int(r), int(c))
        cy, cx = min(max(y + h // 2, 0), H - 1), min(max(x + w // 2, 0), W - 1)
        tiles.append((cy // th, cx // tw))
    return list(dict.fromkeys(tiles))


def _is_tensor(a: Any) -> bool:
    return not isinstance(a, np.ndarray)  # a torch tensor (rows from DeviceRows, batches from an alloc)


def _concat(parts: list) -> Any:
    if _is_tensor(parts[0]):
        import torch

        return torch.cat(parts)
    return np.concatenate(parts)


def _stack(parts: list, alloc: Callable[[tuple[int, ...]], Any] | None = None) -> Any:
    if _is_tensor(parts[0]):
        import torch

        return torch.stack(parts)
    if alloc is None:
        return np.stack(parts)
    out = alloc((len(parts), *parts[0].shape))
    np.stack(parts, out=out.numpy() if _is_tensor(out) else out)
    return out


def _cut(band: Any, y: int, x: int, h: int, w: int) -> Any:
    """``band[y:y+h, x:x+w]``, glass where it runs past the band (a view when it does not); numpy or torch."""
    H, W = band.shape[:2]
    if y >= 0 and y + h <= H and x >= 0 and x + w <= W:
        return band[y : y + h, x : x + w]
    out = band.new_full((h, w, 3), 255) if _is_tensor(band) else np.full((h, w, 3), 255, np.uint8)
    y0, x0, y1, x1 = max(y, 0), max(x, 0), min(y + h, H), min(x + w, W)
    if y0 < y1 and x0 < x1:
        out[y0 - y : y1 - y, x0 - x : x1 - x] = band[y0:y1, x0:x1]
    return out


def box_weights(n_in: int, n_out: int) -> np.ndarray:
    """``n_out x n_in`` weights of PIL's BOX resampling along one axis, so a resize is two matrix products.

    The same coefficients PIL computes (a box of the output pixel's width,
    input pixels counted by their centres, rows normalised): a model that
    resizes its batches on its device sees what :func:`resize_area` gives on
    the CPU, up to PIL's rounding to uint8.
    """
    scale = n_in / n_out
    filterscale = max(scale, 1.0)
    support = 0.5 * filterscale
    out = np.zeros((n_out, n_in), np.float64)
    for i in range(n_out):
        center = (i + 0.5) * scale
        lo = max(int(center - support + 0.5), 0)
        hi = min(int(center + support + 0.5), n_in)
        t = (np.arange(lo, hi) - center + 0.5) / filterscale
        out[i, lo:hi] = (t > -0.5) & (t <= 0.5)
        out[i] /= max(out[i].sum(), 1e-12)
    return out
