"""An image already in memory (a napari layer that is not a file, a plain image decoded whole) as a slide level."""

from __future__ import annotations

import math
from collections.abc import Iterable
from concurrent.futures import Executor

import numpy as np

from .segments import padded_read, read_row_by_tiles

__all__ = ["ArraySegments"]


class ArraySegments:
    """One in-memory ``(h, w, 3)`` uint8 level, read in 512-row strips as wide as the image (nothing to decode)."""

    def __init__(self, array: np.ndarray) -> None:
        self.array = array
        h, w = int(array.shape[0]), int(array.shape[1])
        self.shape = (h, w)
        self.seg = (512, w)
        self.grid = (math.ceil(h / 512), 1)
        self.decoded = 0

    def tile(self, ty: int, tx: int, cache: bool = True) -> np.ndarray:
        return self.read(ty * 512, 0, 512, self.shape[1])

    def read_row(self, ty: int, txs: Iterable[int] | None, pool: Executor | None = None) -> np.ndarray:
        return read_row_by_tiles(self, ty, [0], None)

    def read(self, y: int, x: int, h: int, w: int, cache: bool = True) -> np.ndarray:
        return padded_read(self.shape, y, x, h, w, lambda y0, x0, y1, x1: self.array[y0:y1, x0:x1])

    def check_complete(self, size: int) -> None:
        pass

    def close(self) -> None:
        pass
