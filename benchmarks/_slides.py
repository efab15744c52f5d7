"""Benchmark slides built from real H&E pixels (the CMU Aperio slide), written tile by tile."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import tifffile

SAMPLE = Path(__file__).parents[1] / "src" / "napari_bcd" / "data" / "CMU-1-Small-Region.svs"


def cmu_pixels() -> np.ndarray:
    """Level 0 of the CMU slide cropped to multiples of 64 px (so halving stays exact)."""
    a = tifffile.imread(SAMPLE)
    return a[: a.shape[0] // 64 * 64, : a.shape[1] // 64 * 64]


def _halve(a: np.ndarray) -> np.ndarray:
    h, w = a.shape[:2]
    return a.reshape(h // 2, 2, w // 2, 2, 3).mean((1, 3)).round().astype(np.uint8)


def tiled_slide(path: Path, reps: tuple[int, int], levels: int = 3, mpp: float = 0.499, tile: int = 256) -> Path:
    """A pyramid TIFF that repeats the CMU pixels ``reps`` times (mirrored, so no seams), JPEG tiles.

    Memory stays at one CMU image per level whatever ``reps`` is.
    """
    base = cmu_pixels()
    with tifffile.TiffWriter(path, bigtiff=True) as tw:
        src = base
        for lv in range(levels):
            h, w = src.shape[:2]
            H, W = h * reps[0], w * reps[1]
            tiles_y, tiles_x = -(-H // tile), -(-W // tile)

            def pixel(y0: int, x0: int, src: np.ndarray = src, h: int = h, w: int = w, H: int = H,
                      W: int = W) -> np.ndarray:
                out = np.full((tile, tile, 3), 255, np.uint8)
                ys = np.arange(y0, min(y0 + tile, H))
                xs = np.arange(x0, min(x0 + tile, W))
                ry, ly = np.divmod(ys, h)
                rx, lx = np.divmod(xs, w)
                ly = np.where(ry % 2, h - 1 - ly, ly)
                lx = np.where(rx % 2, w - 1 - lx, lx)
                out[: len(ys), : len(xs)] = src[np.ix_(ly, lx)]
                return out

            def tiles(tiles_y: int = tiles_y, tiles_x: int = tiles_x):
                for ty in range(tiles_y):
                    for tx in range(tiles_x):
                        yield pixel(ty * tile, tx * tile)

            res = 1e4 / (mpp * 2**lv)
            tw.write(
                tiles(), shape=(H, W, 3), dtype=np.uint8, tile=(tile, tile), compression="jpeg",
                photometric="rgb", subfiletype=1 if lv else 0, resolution=(res, res), resolutionunit="CENTIMETER",
            )
            src = _halve(src)
    return path
