"""A slide: lazy pyramid levels for napari, fast region and tile-row reads for the engine.

A :class:`Slide` reads its levels through one backend per format, each
behind the :class:`~.segments.Segments` protocol: TIFF tiles through
tifffile (:mod:`.tiff`), OpenSlide (:mod:`.openslide_slides`), OME-Zarr chunks
(:mod:`.ngff`), images in memory (:mod:`.memory`, :mod:`.plain`).
:func:`~.open.open_slide` chooses the backend.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from ..errors import SlideError
from ..geometry import as_pair
from .memory import ArraySegments
from .segments import MAX_REGION_BYTES, LevelInfo, Segments

if TYPE_CHECKING:
    from collections.abc import Iterable
    from concurrent.futures import Executor

    from tifffile import TiffFile

__all__ = ["LevelInfo", "Slide"]


class _LevelArray:
    """Array-like view of one level for :func:`dask.array.from_array`."""

    def __init__(self, slide: Slide, level: int) -> None:
        self.slide = slide
        self.level = level
        h, w = slide.level_info[level].shape
        self.shape = (h, w, 3)
        self.dtype = np.dtype(np.uint8)
        self.ndim = 3

    def __getitem__(self, key: tuple) -> np.ndarray:
        ys, xs = key[0], key[1]
        y0, y1, _ = ys.indices(self.shape[0])
        x0, x1, _ = xs.indices(self.shape[1])
        region = self.slide.read_region(self.level, y0, x0, max(0, y1 - y0), max(0, x1 - x0))
        return region[(slice(None), slice(None), *key[2:])] if len(key) > 2 else region


class Slide:
    """An opened slide or image.  Use :func:`open_slide`.

    Attributes
    ----------
    path
        The file.
    mpp
        µm per pixel of level 0 ``(y, x)``, or None when the file does not say.
    level_info
        Shape and downsample of each level, level 0 first.
    """

    def __init__(
        self,
        path: Path,
        level_info: list[LevelInfo],
        mpp: tuple[float, float] | None,
        segments: list[Segments],
        tiff: TiffFile | None = None,
        vendor: str = "",
    ) -> None:
        self.path = path
        self.level_info = level_info
        self.mpp = mpp
        self.vendor = vendor
        self._segments = segments
        self._tiff = tiff
        self._levels = None
        self._thumbs: dict[int, tuple[np.ndarray, tuple[float, float]]] = {}

    @classmethod
    def from_array(
        cls, data: np.ndarray, mpp: float | tuple[float, float] | None = None, name: str = "image"
    ) -> Slide:
        """A Slide over an in-memory RGB(A) array (e.g. a napari layer that is not a file).

        Raises
        ------
        SlideError
            When the array is not 8-bit RGB(A) ``(h, w, 3|4)``.
        """
        arr = np.asarray(data)
        if arr.ndim != 3 or arr.shape[-1] not in (3, 4):
            raise SlideError(f"{name} is not a 2-D RGB image (shape {arr.shape}); choose an RGB H&E layer.")
        if arr.dtype != np.uint8:
            if np.issubdtype(arr.dtype, np.floating) and arr.size and float(np.nanmax(arr)) <= 1.0:
                arr = (np.clip(arr, 0, 1) * 255).round().astype(np.uint8)
            else:
                raise SlideError(f"{name} has {arr.dtype} pixels; napari-bcd needs 8-bit RGB.")
        arr = np.ascontiguousarray(arr[..., :3])
        pair = None if mpp is None else as_pair(mpp)
        h, w = arr.shape[:2]
        return cls(Path(name), [LevelInfo((h, w), (1.0, 1.0))], pair, [ArraySegments(arr)], vendor="array")

    # ----------------------------------------------------------------- properties
    @property
    def name(self) -> str:
        return self.path.name

    @property
    def dimensions(self) -> tuple[int, int]:
        """Level-0 size ``(h, w)`` in pixels."""
        return self.level_info[0].shape

    @property
    def level_count(self) -> int:
        return len(self.level_info)

    @property
    def levels(self) -> list:
        """One lazy dask array ``(y, x, 3)`` uint8 per level (for napari's multiscale)."""
        if self._levels is None:
            import dask.array as da

            levels = []
            for i in range(self.level_count):
                array = getattr(self._segments[i], "array", None)
                if array is not None:  # in memory already
                    levels.append(da.from_array(array, chunks=(1024, 1024, 3)))
                    continue
                seg = self._segments[i].seg
                # whole tiles/strips, about 512 px a side
                chunk = (seg[0] * max(1, 512 // seg[0]), seg[1] * max(1, 512 // seg[1]), 3)
                levels.append(
                    da.from_array(
                        _LevelArray(self, i), chunks=chunk, asarray=False, lock=False, fancy=False,
                        meta=np.empty((0, 0, 0), np.uint8), name=f"bcd-{self.path.name}-{id(self)}-{i}",
                    )
                )
            self._levels = levels
        return self._levels

    # ----------------------------------------------------------------- reading by rows of tiles
    def tile_shape(self, level: int) -> tuple[int, int]:
        """``(h, w)`` of the blocks ``level`` is stored in (tiles, or strips as wide as the image)."""
        return self._segments[level].seg

    def read_tile_row(self, level: int, ty: int, columns: Iterable[int] | None = None,
                      pool: Executor | None = None) -> np.ndarray:
        """Row ``ty`` of ``level``'s tiles, ``tile_shape(level)[0]`` px high and as wide as the level.

        Only the tile columns in ``columns`` (all when None) are decoded, each
        once, in ``pool``'s threads when given (the decoders release the GIL),
        bypassing the tile cache; the rest, and anything past the image, is
        glass.  This is how the engine decodes each tile once per pass.
        """
        if not 0 <= level < self.level_count:
            raise SlideError(f"{self.name} has levels 0-{self.level_count - 1}, not {level}.")
        return self._segments[level].read_row(ty, columns, pool)

    def jpeg_tiles(self, level: int) -> str | None:
        """``"ycbcr"`` / ``"rgb"`` when ``level``'s tiles are baseline JPEG streams (see :meth:`jpeg_tile`), else None.

        None for strips, other codecs, NDPI's restart-marker tiles, OpenSlide,
        OME-Zarr and in-memory images.
        """
        return getattr(self._segments[level], "jpeg_kind", None)  # only tifffile's segments have JPEG tiles

    def jpeg_tile(self, level: int, ty: int, tx: int) -> bytes | None:
        """Tile ``(ty, tx)`` of ``level`` as a complete JPEG stream (tables spliced in, RGB-JPEG marked as such).

        For decoders other than this reader's (e.g. nvJPEG through torchvision).
        None for a tile the file leaves empty (glass).

        Raises
        ------
        SlideError
            When the level's tiles are not baseline JPEG (:meth:`jpeg_tiles` is None).
        """
        if self.jpeg_tiles(level) is None:
            raise SlideError(f"{self.name}: level {level} is not stored as JPEG tiles a generic decoder can read.")
        return self._segments[level].jpeg_stream(ty, tx)  # type: ignore[attr-defined]

    @property
    def decoded_tiles(self) -> int:
        """Tiles (or strips) decoded so far, all levels (for benchmarks: decodes per pass)."""
        return sum(seg.decoded for seg in self._segments)

    # ----------------------------------------------------------------- reading
    def read_region(self, level: int, y: int, x: int, h: int, w: int, *, cache: bool = True) -> np.ndarray:
        """Pixels ``[y:y+h, x:x+w]`` of ``level`` (level coordinates) as ``(h, w, 3)`` uint8.

        Parts outside the image are white (glass).  ``cache=False`` leaves the
        tile cache alone (one-off sweeps such as thumbnails).
        """
        if not 0 <= level < self.level_count:
            raise SlideError(f"{self.name} has levels 0-{self.level_count - 1}, not {level}.")
        if h < 0 or w < 0:
            raise SlideError(f"Region size must be positive, got {h}x{w}.")
        if h * w * 3 > MAX_REGION_BYTES:
            raise SlideError(f"A {w:,} x {h:,} px region of {self.name} would need {h * w * 3 / 2**30:.0f} GiB; "
                             "the slide needs a pyramid (a smaller level) for that.")
        return self._segments[level].read(y, x, h, w, cache)

    def thumbnail(self, max_size: int = 2000) -> tuple[np.ndarray, tuple[float, float]]:
        """An RGB image no larger than ``max_size`` px on its long side, and its downsample ``(y, x)``.

        Uses the largest level that fits; when none does, reads the smallest
        level band by band and averages blocks, so memory stays small.  The
        result is kept (it is small), so asking twice costs nothing.
        """
        if max_size not in self._thumbs:
            self._thumbs[max_size] = self._make_thumbnail(max_size)
        return self._thumbs[max_size]

    def _make_thumbnail(self, max_size: int) -> tuple[np.ndarray, tuple[float, float]]:
        from PIL import Image

        fits = [i for i, info in enumerate(self.level_info) if max(info.shape) <= max_size]
        if fits:
            i = fits[0]
            h, w = self.level_info[i].shape
            return self.read_region(i, 0, 0, h, w, cache=False), self.level_info[i].downsample
        i = self.level_count - 1
        H, W = self.level_info[i].shape
        if W * 3 * 16 > MAX_REGION_BYTES:  # not even a band of 16 rows fits
            raise SlideError(f"{self.name}'s smallest level is {W:,} px wide: too large to overview without a "
                             "pyramid. Save it as a pyramid TIFF (e.g. vips tiffsave --tile --pyramid).")
        f = math.ceil(max(H, W) / max_size)
        out_rows = []
        band = f * max(1, 256 // f)  # a few MB at a time
        for y in range(0, H, band):
            rows = min(band, H - y)
            region = self.read_region(i, y, 0, rows, W, cache=False)
            # PIL's reduce() is a box average on uint8: no float copy of the band.
            out_rows.append(np.asarray(Image.fromarray(region).reduce(f)))
        thumb = np.concatenate(out_rows, axis=0)
        dy, dx = self.level_info[i].downsample
        return thumb, (dy * H / thumb.shape[0], dx * W / thumb.shape[1])

    def close(self) -> None:
        for seg in self._segments:
            seg.close()
        if self._tiff is not None:
            self._tiff.close()
            self._tiff = None

    def __enter__(self) -> Slide:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        mpp = f"{self.mpp[1]:.3f} µm/px" if self.mpp else "mpp unknown"
        shapes = ", ".join(f"{i.shape[1]}x{i.shape[0]}" for i in self.level_info)
        return f"<Slide {self.name}: {self.level_count} levels ({shapes}), {mpp}>"
