"""What every slide backend shares: level sizes, the reading protocol, glass-padded reads, limits, a tile cache."""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Callable, Iterable
from concurrent.futures import Executor
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import numpy as np

from ..errors import SlideError

__all__ = ["FILL", "MPP_RANGE", "LevelInfo", "Segments", "TileCache", "check_pixels", "padded_read",
           "read_row_by_tiles"]

#: Limits that keep a damaged or hostile file from allocating more than a machine has.
MAX_PIXELS = 10**12  # a terapixel: far above any real slide (200k x 200k = 4e10)
MAX_SEGMENT_BYTES = 1 << 30  # one decoded tile or strip
MAX_REGION_BYTES = 4 << 30  # one region read
MAX_PLAIN_PIXELS = 250_000_000  # plain PNG/JPEG are decoded whole
MPP_RANGE = (0.02, 200.0)  # µm/px; outside it a resolution tag is a placeholder (72 dpi...)
FILL = 255  # missing tiles are glass, not black tissue


@dataclass(frozen=True)
class LevelInfo:
    """Size and scale of one pyramid level."""

    shape: tuple[int, int]  # (h, w) px
    downsample: tuple[float, float]  # (y, x) relative to level 0


class Segments(Protocol):
    """One pyramid level of a backend (TIFF tiles, OpenSlide, OME-Zarr chunks, an array), as the engine reads it.

    ``seg`` is the block size the level is stored in (tiles; strips as wide as
    the level), ``grid`` the blocks per axis, ``decoded`` a count of blocks
    decoded (benchmarks: decodes per pass).
    """

    shape: tuple[int, int]
    seg: tuple[int, int]
    grid: tuple[int, int]
    decoded: int

    def tile(self, ty: int, tx: int, cache: bool = True) -> np.ndarray: ...

    def read_row(self, ty: int, txs: Iterable[int] | None, pool: Executor | None = None) -> np.ndarray: ...

    def read(self, y: int, x: int, h: int, w: int, cache: bool = True) -> np.ndarray: ...

    def check_complete(self, size: int) -> None: ...

    def close(self) -> None: ...


def padded_read(shape: tuple[int, int], y: int, x: int, h: int, w: int,
                read: Callable[[int, int, int, int], np.ndarray]) -> np.ndarray:
    """``[y:y+h, x:x+w]`` of a level of ``shape``, glass where it runs past the level; ``read(y0, x0, y1, x1)``
    gives the part inside."""
    out = np.full((h, w, 3), FILL, np.uint8)
    H, W = shape
    y0, x0, y1, x1 = max(y, 0), max(x, 0), min(y + h, H), min(x + w, W)
    if y0 < y1 and x0 < x1:
        out[y0 - y : y1 - y, x0 - x : x1 - x] = read(y0, x0, y1, x1)
    return out


def read_row_by_tiles(seg: Segments, ty: int, txs: Iterable[int] | None, pool: Executor | None = None) -> np.ndarray:
    """Tile row ``ty`` over the level's full width from ``seg.tile``; only the columns ``txs`` are decoded."""
    sh, sw = seg.seg
    H, W = seg.shape
    out = np.full((sh, W, 3), FILL, np.uint8)
    if not 0 <= ty < seg.grid[0]:
        return out
    cols = [tx for tx in (range(seg.grid[1]) if txs is None else txs) if 0 <= tx < seg.grid[1]]

    def decode(tx: int) -> tuple[int, np.ndarray]:
        return tx, seg.tile(ty, tx, cache=False)

    for tx, tile in (pool.map(decode, cols) if pool is not None else map(decode, cols)):
        x0 = tx * sw
        out[:, x0 : min(x0 + sw, W)] = tile[:, : min(sw, W - x0)]
    if (ty + 1) * sh > H:  # the last row's tiles run past the image: glass, not the encoder's padding
        out[H - ty * sh :] = FILL
    return out


class TileCache:
    """A thread-safe LRU of decoded tiles, bounded in bytes."""

    def __init__(self, max_bytes: int) -> None:
        self.max_bytes = max_bytes
        self._items: OrderedDict[tuple[int, int], np.ndarray] = OrderedDict()
        self._bytes = 0
        self._lock = threading.Lock()

    def get(self, key: tuple[int, int]) -> np.ndarray | None:
        with self._lock:
            arr = self._items.get(key)
            if arr is not None:
                self._items.move_to_end(key)
            return arr

    def put(self, key: tuple[int, int], arr: np.ndarray) -> None:
        with self._lock:
            if key in self._items:
                return
            self._items[key] = arr
            self._bytes += arr.nbytes
            while self._bytes > self.max_bytes and len(self._items) > 1:
                _, old = self._items.popitem(last=False)
                self._bytes -= old.nbytes



def check_pixels(p: Path, dtype: np.dtype, samples: int, extra: str = "") -> None:
    if np.dtype(dtype) != np.uint8:
        raise SlideError(
            f"{p.name} has {np.dtype(dtype).itemsize * 8}-bit {np.dtype(dtype).kind!r} pixels; napari-bcd classifies "
            "8-bit RGB brightfield (H&E) images. Convert it to 8-bit RGB."
        )
    if samples < 3:
        raise SlideError(f"{p.name} is grayscale{extra}; napari-bcd needs RGB H&E images.")
    if samples > 4:
        raise SlideError(
            f"{p.name} has {samples} channels (fluorescence or multiplex?); napari-bcd needs RGB H&E images."
        )


