"""Whole-slide images read lazily through tifffile.

:func:`open_slide` opens Aperio SVS, generic tiled (Big)TIFF pyramids,
OME-TIFF (SubIFD pyramids too), Hamamatsu NDPI, and plain TIFF/PNG/JPEG
images.  A :class:`Slide` offers

* ``levels``: one lazy dask array ``(y, x, 3)`` uint8 per pyramid level, for
  napari (never materialised);
* ``read_region(level, y, x, h, w)``: the fast path for the engine.  It reads
  the compressed tiles (or strips) it needs with ``os.pread`` (thread-safe, no
  shared file position), decodes them with tifffile's own ``TiffPage.decode``
  (imagecodecs, which releases the GIL, so several threads decode at once) and
  keeps recently decoded tiles in a small LRU cache, since neighbouring and
  overlapping windows share tiles.  Building a dask graph per window would
  cost more than decoding the window.

Label, macro and thumbnail images of SVS files are not levels.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import math
import os
import re
import threading
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from ..errors import SlideError
from ..geometry import as_pair

if TYPE_CHECKING:
    from collections.abc import Iterable, Iterator
    from concurrent.futures import Executor

    from tifffile import TiffFile, TiffPage

__all__ = ["Slide", "complete_jpeg", "open_slide"]

log = logging.getLogger(__name__)

_PLAIN_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp"}
#: Limits that keep a damaged or hostile file from allocating more than a machine has.
_MAX_PIXELS = 10**12  # a terapixel: far above any real slide (200k x 200k = 4e10)
_MAX_SEGMENT_BYTES = 1 << 30  # one decoded tile or strip
_MAX_REGION_BYTES = 4 << 30  # one region read
_MAX_PLAIN_PIXELS = 250_000_000  # plain PNG/JPEG are decoded whole
_NOT_LEVELS = {"thumbnail", "label", "macro"}
_MPP_RANGE = (0.02, 200.0)  # µm/px; outside it a resolution tag is a placeholder (72 dpi...)
_FILL = 255  # missing tiles are glass, not black tissue


@dataclass(frozen=True)
class LevelInfo:
    """Size and scale of one pyramid level."""

    shape: tuple[int, int]  # (h, w) px
    downsample: tuple[float, float]  # (y, x) relative to level 0


class _Segments:
    """Random access to the tiles or strips of one TIFF page."""

    def __init__(self, page: TiffPage, path: Path, cache: _TileCache, key: int) -> None:
        self.page = page
        self.path = path
        self.cache = cache
        self.key = key
        h, w = int(page.shape[0]), int(page.shape[1])
        self.shape = (h, w)
        if page.is_tiled:
            self.seg = (int(page.tilelength), int(page.tilewidth))
        else:
            rows = int(page.rowsperstrip or h)
            self.seg = (min(rows, h), w)
        self.grid = (math.ceil(h / self.seg[0]), math.ceil(w / self.seg[1]))
        self.offsets = page.dataoffsets
        self.counts = page.databytecounts
        self.decode = page.decode
        self.jpegtables = getattr(page, "jpegtables", None)
        # NDPI tiles are restart-marker segments of one JPEG stream: each needs the stream's header.
        self.jpegheader = getattr(page, "jpegheader", None) if getattr(page.parent, "is_ndpi", False) else None
        self.samples = int(page.samplesperpixel)
        self._fd: int | None = None
        self._fd_lock = threading.Lock()
        self._local = threading.local()  # per-thread file handles where os.pread does not exist (Windows)
        self.decoded = 0  # tiles or strips decoded so far (a counter for benchmarks: tiles per pass)

    def _read_bytes(self, index: int) -> bytes | None:
        count = int(self.counts[index])
        if count == 0:
            return None
        offset = int(self.offsets[index])
        if hasattr(os, "pread"):
            if self._fd is None:
                with self._fd_lock:
                    if self._fd is None:
                        self._fd = os.open(self.path, os.O_RDONLY)
            data = os.pread(self._fd, count, offset)
        else:  # pragma: no cover - Windows: one handle per thread, so seek + read never interleave
            fh = getattr(self._local, "fh", None)
            if fh is None:
                fh = self._local.fh = open(self.path, "rb")  # noqa: SIM115 - closed with the slide
                with self._fd_lock:
                    self._handles = [*getattr(self, "_handles", []), fh]
            fh.seek(offset)
            data = fh.read(count)
        if len(data) != count:
            raise SlideError(f"{self.path.name}: the file ends inside a tile; it is truncated. Copy it again.")
        return data

    def tile(self, ty: int, tx: int, cache: bool = True) -> np.ndarray:
        """Decoded segment ``(seg_h, seg_w, 3)`` uint8 (edge segments are full size)."""
        index = ty * self.grid[1] + tx
        key = (self.key, index)
        hit = self.cache.get(key)
        if hit is not None:
            return hit
        data = self._read_bytes(index)
        if data is None:
            arr = np.full((*self.seg, 3), _FILL, np.uint8)
        else:
            self.decoded += 1  # (not atomic across threads; a benchmark figure, not an invariant)
            try:
                extra = {"jpegheader": self.jpegheader} if self.jpegheader is not None else {}
                decoded, _, _ = self.decode(data, index, jpegtables=self.jpegtables, **extra)
            except Exception as err:
                raise SlideError(
                    f"{self.path.name}: tile {index} cannot be decoded ({type(err).__name__}: {err}). "
                    "The file is corrupt; re-export or copy it again."
                ) from err
            if decoded is None:
                arr = np.full((*self.seg, 3), _FILL, np.uint8)
            else:
                arr = np.asarray(decoded).reshape(decoded.shape[-3], decoded.shape[-2], -1)[..., :3]
                if arr.shape[:2] != self.seg:  # strips/tiles at the edge may come back short
                    full = np.full((*self.seg, 3), _FILL, np.uint8)
                    full[: arr.shape[0], : arr.shape[1]] = arr
                    arr = full
        if cache:
            self.cache.put(key, arr)
        return arr

    @functools.cached_property
    def jpeg_kind(self) -> str | None:
        """``"ycbcr"`` or ``"rgb"`` when the tiles are baseline JPEG a generic decoder can read, else None.

        "rgb" is the TIFF's RGB photometric (Aperio stores RGB-JPEG: no colour
        transform); a tile that carries a JFIF marker is YCbCr all the same,
        as tifffile reads it.  A property of the page, worked out once.
        """
        page = self.page
        simple = (int(page.compression) == 7 and page.is_tiled and self.samples == 3 and self.jpegheader is None
                  and int(page.planarconfig) == 1 and not tuple(getattr(page, "extrasamples", ()) or ()))
        if not simple:
            return None
        return {6: "ycbcr", 2: "rgb"}.get(int(page.photometric))

    def jpeg_stream(self, ty: int, tx: int) -> bytes | None:
        """Tile ``(ty, tx)`` as a complete JPEG stream any decoder reads as this reader does; None when empty."""
        if not (0 <= ty < self.grid[0] and 0 <= tx < self.grid[1]):
            raise SlideError(f"{self.path.name}: there is no tile ({ty}, {tx}); the level has {self.grid[0]} x "
                             f"{self.grid[1]} tiles.")
        data = self._read_bytes(ty * self.grid[1] + tx)
        if data is None:
            return None
        return complete_jpeg(data, self.jpegtables, rgb=self.jpeg_kind == "rgb")

    def read_row(self, ty: int, txs: Iterable[int] | None, pool: Executor | None = None) -> np.ndarray:
        """Tile row (or strip) ``ty`` over the page's full width; only the columns ``txs`` are decoded."""
        sh, sw = self.seg
        H, W = self.shape
        out = np.full((sh, W, 3), _FILL, np.uint8)
        if not 0 <= ty < self.grid[0]:
            return out
        cols = [tx for tx in (range(self.grid[1]) if txs is None else txs) if 0 <= tx < self.grid[1]]

        def decode(tx: int) -> tuple[int, np.ndarray]:
            return tx, self.tile(ty, tx, cache=False)

        for tx, tile in (pool.map(decode, cols) if pool is not None else map(decode, cols)):
            x0 = tx * sw
            out[:, x0 : min(x0 + sw, W)] = tile[:, : min(sw, W - x0)]
        if (ty + 1) * sh > H:  # the last row's tiles run past the image: glass, not the encoder's padding
            out[H - ty * sh :] = _FILL
        return out

    def read(self, y: int, x: int, h: int, w: int, cache: bool = True) -> np.ndarray:
        out = np.full((h, w, 3), _FILL, np.uint8)
        H, W = self.shape
        y0, x0, y1, x1 = max(y, 0), max(x, 0), min(y + h, H), min(x + w, W)
        if y0 >= y1 or x0 >= x1:
            return out
        sh, sw = self.seg
        for ty in range(y0 // sh, (y1 - 1) // sh + 1):
            for tx in range(x0 // sw, (x1 - 1) // sw + 1):
                tile = self.tile(ty, tx, cache)
                ty0, tx0 = ty * sh, tx * sw
                a0, a1 = max(y0, ty0), min(y1, ty0 + sh)
                b0, b1 = max(x0, tx0), min(x1, tx0 + sw)
                out[a0 - y : a1 - y, b0 - x : b1 - x] = tile[a0 - ty0 : a1 - ty0, b0 - tx0 : b1 - tx0]
        return out

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None
        for fh in getattr(self, "_handles", []):
            fh.close()
        self._handles = []

    def check_complete(self, size: int) -> None:
        """Refuse a truncated file, then sizes no machine can decode (before any pixel is allocated)."""
        ends = np.asarray(self.offsets, dtype=np.int64) + np.asarray(self.counts, dtype=np.int64)
        if len(ends) and int(ends.max()) > size:
            raise SlideError(
                f"{self.path.name} is truncated: its image data runs to byte {int(ends.max()):,} but the file has "
                f"{size:,} bytes. Copy or export the slide again."
            )
        h, w = self.shape
        if h * w > _MAX_PIXELS:
            raise SlideError(f"{self.path.name} declares {w:,} x {h:,} px, larger than any slide; the file is damaged "
                             "or not a slide.")
        if self.seg[0] * self.seg[1] * 3 > _MAX_SEGMENT_BYTES:
            raise SlideError(
                f"{self.path.name} stores its {w:,} x {h:,} px image in blocks of {self.seg[1]:,} x {self.seg[0]:,} "
                "px, "
                "too large to decode one at a time. Save it as a tiled pyramid TIFF (vips tiffsave --tile --pyramid)."
            )


def _jpeg_segments(data: bytes) -> Iterator[tuple[int, int, int]]:
    """``(marker, start, length)`` of each marker segment of a JPEG stream up to its first SOS."""
    j = 2 if data[:2] == b"\xff\xd8" else 0
    while j + 4 <= len(data) and data[j] == 0xFF:
        marker = data[j + 1]
        if marker in (0xD8, 0xD9) or 0xD0 <= marker <= 0xD7:  # no length
            j += 2
            continue
        length = int.from_bytes(data[j + 2 : j + 4], "big")
        yield marker, j, length
        if marker == 0xDA:
            return
        j += 2 + length


def complete_jpeg(data: bytes, tables: bytes | None = None, *, rgb: bool = False) -> bytes:
    """A TIFF JPEG tile as a standalone JPEG stream: the JPEGTables spliced in, RGB-JPEG made explicit.

    A TIFF tile is often an abbreviated stream whose Huffman and quantisation
    tables sit in the page's JPEGTables tag; they go in after the tile's SOI.
    With ``rgb`` (TIFF photometric RGB) and no JFIF marker, the samples are
    RGB, not YCbCr (Aperio), which only the TIFF tag says: the three
    components are renamed ``R``, ``G``, ``B`` (82, 71, 66), the way JPEG
    decoders (libjpeg-turbo, and so torchvision's) recognise RGB.
    """
    out = bytearray(data)
    if tables and len(tables) > 4 and tables[:2] == b"\xff\xd8" and tables[-2:] == b"\xff\xd9":
        out = bytearray(tables[:-2]) + out[2:]
    if rgb:
        segments = list(_jpeg_segments(bytes(out)))
        jfif = any(m == 0xE0 and out[st + 4 : st + 9] == b"JFIF\x00" for m, st, _ in segments)
        if not jfif:
            for marker, start, _ in segments:
                if marker in (0xC0, 0xC1, 0xC2):  # SOF: precision, h, w, n, then (id, sampling, table) each
                    n = out[start + 9]
                    if n == 3:
                        for k in range(3):
                            out[start + 10 + 3 * k] = (82, 71, 66)[k]
                elif marker == 0xDA:  # SOS: n, then (id, tables) each
                    n = out[start + 4]
                    if n == 3:
                        for k in range(3):
                            out[start + 5 + 2 * k] = (82, 71, 66)[k]
    return bytes(out)


class _TileCache:
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


class _OpenSlideSegments:
    """One level of a slide read through OpenSlide, with the reading API of :class:`_Segments`.

    OpenSlide reads formats tifffile does not (MRXS, SCN, BIF, VMS, DICOM...).
    It has no tiles to expose, so this backend cuts its level into virtual
    512-px tiles; each read converts OpenSlide's premultiplied RGBA to RGB on
    white (transparent = glass).
    """

    def __init__(self, osr: Any, level: int, lock: threading.Lock) -> None:
        self.osr, self.level, self._lock = osr, level, lock
        w, h = osr.level_dimensions[level]
        self.shape = (int(h), int(w))
        self.seg = (512, 512)
        self.grid = (math.ceil(h / 512), math.ceil(w / 512))
        self.downsample = float(osr.level_downsamples[level])
        self.decoded = 0

    def check_complete(self, size: int) -> None:  # OpenSlide checks its own files
        pass

    def _read(self, y: int, x: int, h: int, w: int) -> np.ndarray:
        # OpenSlide takes level-0 coordinates; level coordinates times the downsample land on the
        # level's pixels when the downsample is an integer (else OpenSlide resamples, as it always does).
        x0, y0 = int(round(x * self.downsample)), int(round(y * self.downsample))
        im = self.osr.read_region((x0, y0), self.level, (w, h))
        rgba = np.asarray(im)
        alpha = rgba[..., 3:4].astype(np.float32) / 255
        rgb = rgba[..., :3].astype(np.float32) + (1 - alpha) * 255  # premultiplied: add white where transparent
        return np.clip(rgb, 0, 255).round().astype(np.uint8)

    def tile(self, ty: int, tx: int, cache: bool = True) -> np.ndarray:
        self.decoded += 1
        return self._read(ty * 512, tx * 512, 512, 512)

    def read_row(self, ty: int, txs: Iterable[int] | None, pool: Executor | None = None) -> np.ndarray:
        out = np.full((512, self.shape[1], 3), _FILL, np.uint8)
        if 0 <= ty < self.grid[0]:
            row = self._read(ty * 512, 0, 512, self.shape[1])
            h = min(512, self.shape[0] - ty * 512)
            out[:h] = row[:h]
            self.decoded += self.grid[1]
        return out

    def read(self, y: int, x: int, h: int, w: int, cache: bool = True) -> np.ndarray:
        out = np.full((h, w, 3), _FILL, np.uint8)
        H, W = self.shape
        y0, x0, y1, x1 = max(y, 0), max(x, 0), min(y + h, H), min(x + w, W)
        if y0 < y1 and x0 < x1:
            out[y0 - y : y1 - y, x0 - x : x1 - x] = self._read(y0, x0, y1 - y0, x1 - x0)
        return out

    def close(self) -> None:
        # Every level shares one OpenSlide handle: the first close closes it; the others find it closed.
        with self._lock, contextlib.suppress(Exception):
            self.osr.close()


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
        segments: list[_Segments] | None = None,
        arrays: list[np.ndarray] | None = None,
        tiff: TiffFile | None = None,
        vendor: str = "",
    ) -> None:
        self.path = path
        self.level_info = level_info
        self.mpp = mpp
        self.vendor = vendor
        self._segments = segments
        self._arrays = arrays
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
        return cls(Path(name), [LevelInfo((h, w), (1.0, 1.0))], pair, arrays=[arr], vendor="array")

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
                if self._arrays is not None:
                    levels.append(da.from_array(self._arrays[i], chunks=(1024, 1024, 3)))
                    continue
                seg = self._segments[i].seg  # type: ignore[index]
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
        if self._arrays is not None:
            return (512, int(self._arrays[level].shape[1]))
        return self._segments[level].seg  # type: ignore[index]

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
        if self._arrays is not None:
            arr = self._arrays[level]
            th = 512
            out = np.full((th, arr.shape[1], 3), _FILL, np.uint8)
            part = arr[ty * th : (ty + 1) * th]
            out[: part.shape[0]] = part
            return out
        return self._segments[level].read_row(ty, columns, pool)  # type: ignore[index]

    def jpeg_tiles(self, level: int) -> str | None:
        """``"ycbcr"`` / ``"rgb"`` when ``level``'s tiles are baseline JPEG streams (see :meth:`jpeg_tile`), else None.

        None for strips, other codecs, NDPI's restart-marker tiles, OpenSlide,
        OME-Zarr and in-memory images.
        """
        seg = self._segments[level] if self._segments is not None else None
        return getattr(seg, "jpeg_kind", None)  # only tifffile's segments have JPEG tiles to hand over

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
        return self._segments[level].jpeg_stream(ty, tx)  # type: ignore[index]

    @property
    def decoded_tiles(self) -> int:
        """Tiles (or strips) decoded so far, all levels (for benchmarks: decodes per pass)."""
        return sum(seg.decoded for seg in self._segments or [])

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
        if h * w * 3 > _MAX_REGION_BYTES:
            raise SlideError(f"A {w:,} x {h:,} px region of {self.name} would need {h * w * 3 / 2**30:.0f} GiB; "
                             "the slide needs a pyramid (a smaller level) for that.")
        if self._arrays is not None:
            arr = self._arrays[level]
            out = np.full((h, w, 3), _FILL, np.uint8)
            H, W = arr.shape[:2]
            y0, x0, y1, x1 = max(y, 0), max(x, 0), min(y + h, H), min(x + w, W)
            if y0 < y1 and x0 < x1:
                out[y0 - y : y1 - y, x0 - x : x1 - x] = arr[y0:y1, x0:x1]
            return out
        return self._segments[level].read(y, x, h, w, cache)  # type: ignore[index]

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
        if W * 3 * 16 > _MAX_REGION_BYTES:  # not even a band of 16 rows fits
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
        for seg in self._segments or []:
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


# --------------------------------------------------------------------------- opening
def open_slide(
    path: str | os.PathLike[str],
    *,
    mpp: float | tuple[float, float] | None = None,
    cache_mb: int = 16,
    backend: str = "auto",
) -> Slide:
    """Open a slide or image for lazy reading.

    Parameters
    ----------
    path
        An Aperio SVS, NDPI, OME-TIFF, tiled or plain TIFF, PNG or JPEG file.
    mpp
        µm per pixel of level 0; overrides (or supplies) the file's own value.
    cache_mb
        Size of the decoded-tile cache.  Windows are read in raster order, so
        what they share is the tile column between neighbours: a few MB.
    backend
        ``"auto"``: tifffile's fast path for TIFF-based slides, OpenSlide for
        what only it reads (MRXS, SCN, BIF, VMS, DICOM; a folder of DICOM
        instances) and for a TIFF the fast path cannot read; ``"tifffile"`` or
        ``"openslide"`` to choose.

    Raises
    ------
    SlideError
        When the file is missing, not an image, truncated, or not 8-bit RGB.
    """
    p = Path(path)
    if not p.exists():
        if p.is_symlink():
            raise SlideError(f"{p} is a symbolic link that leads nowhere (or loops). Point it at the slide file.")
        raise SlideError(f"{p} does not exist. Check the path.")
    if backend not in ("auto", "tifffile", "openslide"):
        raise SlideError(f"Unknown slide backend {backend!r}; use auto, tifffile or openslide.")
    if p.is_dir():
        from .ngff import is_ngff, open_ngff

        dicoms = sorted(q for q in p.iterdir() if q.suffix.lower() == ".dcm")
        if is_ngff(p):
            slide = open_ngff(p)
        elif dicoms:  # OpenSlide finds a DICOM WSI's other instances from any one of them
            slide = _open_openslide(dicoms[0], "DICOM WSI")
            slide.path = p
        else:
            raise SlideError(f"{p} is a folder; give the slide file itself (e.g. .svs, .ndpi, .tif), a folder of "
                             "DICOM WSI instances, or an OME-Zarr image.")
    elif p.stat().st_size == 0:
        raise SlideError(f"{p.name} is empty (0 bytes). Copy the slide again.")
    elif backend == "openslide":
        slide = _open_openslide(p, OPENSLIDE_ONLY.get(p.suffix.lower(), p.suffix.lstrip(".").upper() or "slide"))
    elif p.suffix.lower() in OPENSLIDE_ONLY:
        slide = _open_openslide(p, OPENSLIDE_ONLY[p.suffix.lower()])
    else:
        with open(p, "rb") as fh:
            magic = fh.read(4)
        if magic[:2] in (b"II", b"MM"):
            try:
                slide = _open_tiff(p, cache_mb)
            except SlideError as err:
                # The fast path cannot read it (a compression or layout tifffile lacks): OpenSlide may.
                if backend == "tifffile":
                    raise
                slide = _try_openslide(p, err)
        elif p.suffix.lower() in _PLAIN_SUFFIXES or magic[:4] in (b"\x89PNG",) or magic[:2] == b"\xff\xd8":
            slide = _open_plain(p)
        else:
            raise SlideError(
                f"{p.name} is not a slide or image napari-bcd can read (SVS, NDPI, OME-TIFF, TIFF, MRXS, SCN, BIF, "
                "VMS, DICOM, PNG, JPEG). If it is another format (iSyntax, CZI), convert it to OME-TIFF first."
            )
    if mpp is not None:
        given = as_pair(mpp)
        if not all(math.isfinite(v) and v > 0 for v in given):
            raise SlideError(f"The pixel size must be a positive number of µm, got {mpp}.")
        if slide.mpp is not None:
            ratio = given[1] / slide.mpp[1]
            if not 0.5 <= ratio <= 2:
                log.warning("%s: the pixel size given (%.4g µm/px) is %.1fx the file's own (%.4g µm/px); windows will "
                            "be %.1fx too %s. Leave --mpp out unless the file is wrong.", p.name, given[1], ratio,
                            slide.mpp[1], max(ratio, 1 / ratio), "small" if ratio > 1 else "large")
        slide.mpp = given
    if slide.mpp is None:
        log.warning("%s has no pixel size (mpp) metadata; state it with mpp=... (--mpp).", p.name)
    return slide


#: Formats only OpenSlide reads here: suffix -> what it is.
OPENSLIDE_ONLY = {
    ".mrxs": "3DHISTECH MRXS", ".scn": "Leica SCN", ".bif": "Ventana BIF", ".vms": "Hamamatsu VMS",
    ".vmu": "Hamamatsu VMU", ".dcm": "DICOM WSI",
}


def openslide_available() -> bool:
    """Whether the OpenSlide backend can be used (``pip install "napari-bcd[openslide]"``)."""
    try:
        import openslide  # noqa: F401
    except (ImportError, OSError):
        return False
    return True


def _try_openslide(p: Path, err: SlideError) -> Slide:
    """OpenSlide as the fallback for a TIFF the fast path refused; the fast path's message if it cannot help."""
    if not openslide_available():
        raise err
    try:
        import openslide

        if openslide.OpenSlide.detect_format(str(p)) is None:
            raise err
    except openslide.OpenSlideError:
        raise err from None
    return _open_openslide(p, "TIFF (through OpenSlide)")


def _open_openslide(p: Path, what: str) -> Slide:
    """A slide read through OpenSlide behind the same :class:`Slide` API (levels, read_region, mpp)."""
    try:
        import openslide
    except (ImportError, OSError) as err:
        raise SlideError(
            f"{p.name} is a {what} slide, which napari-bcd reads through OpenSlide: pip install "
            '"napari-bcd[openslide]" (openslide-python and openslide-bin).'
        ) from err
    try:
        osr = openslide.OpenSlide(str(p))
    except (openslide.OpenSlideError, OSError) as err:
        raise SlideError(f"{p.name} cannot be read as a {what} slide ({err}). It may be incomplete (MRXS and VMS "
                         "need their companion folder or files beside them).") from err
    props = osr.properties
    try:
        mx, my = float(props.get("openslide.mpp-x", "nan")), float(props.get("openslide.mpp-y", "nan"))
        mpp = (my, mx) if math.isfinite(mx) and math.isfinite(my) and _MPP_RANGE[0] <= mx <= _MPP_RANGE[1] else None
    except ValueError:
        mpp = None
    lock = threading.Lock()
    segments = [_OpenSlideSegments(osr, i, lock) for i in range(osr.level_count)]
    H, W = segments[0].shape
    infos = [LevelInfo(seg.shape, (H / seg.shape[0], W / seg.shape[1])) for seg in segments]
    vendor = props.get("openslide.vendor", "openslide")
    return Slide(p, infos, mpp, segments=segments, vendor=f"openslide:{vendor}")  # type: ignore[arg-type]


def _check_pixels(p: Path, dtype: np.dtype, samples: int, extra: str = "") -> None:
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


def _open_plain(p: Path) -> Slide:
    from PIL import Image

    limit = Image.MAX_IMAGE_PIXELS
    Image.MAX_IMAGE_PIXELS = None  # our own limit, with a message that says what to do, replaces PIL's here
    try:
        with Image.open(p) as im:
            Image.MAX_IMAGE_PIXELS = limit
            if im.size[0] * im.size[1] > _MAX_PLAIN_PIXELS:
                w, h = im.size
                raise SlideError(
                    f"{p.name} is a plain image of {w:,} x {h:,} px ({w * h * 3 / 2**30:.1f} GiB decoded). napari-bcd "
                    f"decodes plain images whole, up to {_MAX_PLAIN_PIXELS // 10**6} megapixels; save it as a tiled "
                    "pyramid TIFF (e.g. vips tiffsave --tile --pyramid, or QuPath's OME-TIFF export)."
                )
            dpi = im.info.get("dpi")
            mode = im.mode
            if mode in ("I;16", "I;16B", "I", "F"):
                _check_pixels(p, np.uint16 if mode.startswith("I;16") else np.float32, 1)
            if mode in ("L", "1", "P") and mode != "P":
                raise SlideError(f"{p.name} is grayscale; napari-bcd needs RGB H&E images.")
            arr = np.asarray(im.convert("RGB"))
    except SlideError:
        raise
    except Image.DecompressionBombError as err:  # pragma: no cover - our limit comes first
        raise SlideError(f"{p.name} is too large for a plain image ({err}); save it as a tiled pyramid TIFF.") from err
    except (OSError, SyntaxError, ValueError) as err:
        raise SlideError(f"{p.name} cannot be read as an image ({err}). It may be truncated or corrupt.") from err
    finally:
        Image.MAX_IMAGE_PIXELS = limit
    mpp = None
    if dpi and dpi[0] and dpi[1]:
        cand = (25_400 / float(dpi[1]), 25_400 / float(dpi[0]))
        mpp = cand if _MPP_RANGE[0] <= cand[1] <= _MPP_RANGE[1] else None
    h, w = arr.shape[:2]
    return Slide(p, [LevelInfo((h, w), (1.0, 1.0))], mpp, arrays=[arr], vendor="plain")


def _open_tiff(p: Path, cache_mb: int) -> Slide:
    import tifffile

    with _TifffileComplaints() as complaints:
        try:
            tf = tifffile.TiffFile(p)
            _ = tf.series  # parses the page chain: where damage shows
        except Exception as err:
            raise SlideError(f"{p.name} is not a readable TIFF/SVS/NDPI file ({err}). It may be truncated or "
                             "corrupt.") from err
    if complaints:
        # tifffile's own log lines ("ERROR ... invalid page offset") mean little to a user: say it in words.
        log.warning("%s looks damaged (%s); the readable part is used, but copy or export the slide again.",
                    p.name, complaints[0])
    try:
        pages, vendor = _level_pages(tf, p)
        first = pages[0]
        extra = " (one channel per page: a fluorescence image?)" if len(tf.series[0].shape) > 3 else ""
        _check_pixels(p, first.dtype, int(first.samplesperpixel), extra)
        if int(first.planarconfig) == 2:
            raise SlideError(f"{p.name} stores colour planes separately; re-save it as interleaved RGB.")
        cache = _TileCache(cache_mb << 20)
        size = p.stat().st_size
        segments = [_Segments(pg, p, cache, i) for i, pg in enumerate(pages)]
        for seg in segments:
            seg.check_complete(size)
        H, W = segments[0].shape
        infos = [LevelInfo(s.shape, (H / s.shape[0], W / s.shape[1])) for s in segments]
        mpp = _mpp(tf, first)
    except SlideError:
        tf.close()
        raise
    except Exception as err:
        tf.close()
        raise SlideError(f"{p.name} cannot be read ({type(err).__name__}: {err}).") from err
    return Slide(p, infos, mpp, segments=segments, tiff=tf, vendor=vendor)


class _TifffileComplaints:
    """Collect (and keep out of the user's terminal) what tifffile logs while a file is parsed."""

    def __enter__(self) -> list[str]:
        self.messages: list[str] = []
        self.logger = logging.getLogger("tifffile")
        self.handler = _ListHandler(self.messages)
        self.propagate = self.logger.propagate
        self.logger.addHandler(self.handler)
        self.logger.propagate = False
        return self.messages

    def __exit__(self, *exc: object) -> None:
        self.logger.removeHandler(self.handler)
        self.logger.propagate = self.propagate


class _ListHandler(logging.Handler):
    def __init__(self, sink: list[str]) -> None:
        super().__init__(logging.WARNING)
        self.sink = sink

    def emit(self, record: logging.LogRecord) -> None:
        self.sink.append(record.getMessage().split("\n")[0][:200])


def _level_pages(tf, p: Path) -> tuple[list, str]:
    """The TIFF page of each pyramid level, level 0 first."""
    if not tf.series:
        raise SlideError(
            f"{p.name} holds no readable image: the file is truncated or corrupt (its image directory is missing "
            "or points past the end). Copy or export the slide again."
        )
    series = [s for s in tf.series if (s.name or "").lower() not in _NOT_LEVELS]
    base = series[0] if series else tf.series[0]
    planes = [(ax, n) for ax, n in zip(base.axes, base.shape, strict=False) if ax not in "YXS" and n > 1]
    if planes:
        what = ", ".join(f"{n} along {ax}" for ax, n in planes)
        raise SlideError(
            f"{p.name} holds several planes ({what}: a z-stack, time series or channels), not one 2-D RGB image. "
            "Export the plane you want as an RGB TIFF."
        )
    vendor = "svs" if tf.is_svs else "ndpi" if tf.is_ndpi else "ome" if tf.is_ome else "tiff"
    pages = [lvl.keyframe for lvl in base.levels]
    if len(pages) == 1 and len(series) > 1:
        # A generic pyramid written page by page: later series that are
        # reduced copies of the first (same aspect ratio, smaller) are levels.
        h0, w0 = pages[0].shape[:2]
        for s in series[1:]:
            pg = s.levels[0].keyframe
            if pg.ndim < 2:
                continue
            h, w = pg.shape[:2]
            if h < pages[-1].shape[0] and w < pages[-1].shape[1] and abs(h / w - h0 / w0) < 0.02 * (h0 / w0) + 2 / w:
                pages.append(pg)
    for pg in pages:
        if int(getattr(pg, "planarconfig", 1)) == 2:
            raise SlideError(f"{p.name} stores its colour planes separately (planar RGB); re-save it as interleaved "
                             "RGB (e.g. tifffile.imwrite(..., planarconfig='contig') or vips).")
        if pg.ndim not in (2, 3) or (pg.ndim == 3 and pg.shape[-1] not in (1, 3, 4)):
            raise SlideError(
                f"{p.name} has image shape {tuple(pg.shape)}: not a 2-D RGB image "
                "(a z-stack, time series or multi-channel fluorescence?). napari-bcd needs RGB H&E images."
            )
    return pages, vendor


def _mpp(tf, page) -> tuple[float, float] | None:
    """µm/px of level 0 from the SVS description, OME metadata or resolution tags."""
    desc = page.description or ""
    if tf.is_svs:
        m = re.search(r"MPP\s*=\s*([0-9.eE+-]+)", desc)
        if m:
            v = float(m.group(1))
            return (v, v) if _MPP_RANGE[0] <= v <= _MPP_RANGE[1] else None
    if tf.is_ome and tf.ome_metadata:
        got = _ome_mpp(tf.ome_metadata)
        if got:
            return got
    return _resolution_mpp(page)


_UNIT_UM = {"m": 1e6, "cm": 1e4, "mm": 1e3, "µm": 1.0, "um": 1.0, "nm": 1e-3, "in": 25_400.0, "inch": 25_400.0}


def _ome_mpp(xml: str) -> tuple[float, float] | None:
    import defusedxml.ElementTree as ET

    try:
        root = ET.fromstring(xml)
    except Exception:  # noqa: BLE001 - defusedxml raises on entities and syntax errors alike
        return None
    for el in root.iter():
        if el.tag.endswith("Pixels"):
            sx, sy = el.get("PhysicalSizeX"), el.get("PhysicalSizeY")
            if not sx or not sy:
                return None
            ux = _UNIT_UM.get(el.get("PhysicalSizeXUnit", "µm"), 1.0)
            uy = _UNIT_UM.get(el.get("PhysicalSizeYUnit", "µm"), 1.0)
            mpp = (float(sy) * uy, float(sx) * ux)
            return mpp if _MPP_RANGE[0] <= mpp[1] <= _MPP_RANGE[1] else None
    return None


def _resolution_mpp(page) -> tuple[float, float] | None:
    unit = int(page.resolutionunit)
    um = {2: 25_400.0, 3: 10_000.0, 4: 1_000.0, 5: 1.0}.get(unit)  # inch, cm, (tifffile) mm, µm
    if um is None:
        return None
    xres, yres = page.resolution
    if not xres or not yres:
        return None
    mpp = (um / float(yres), um / float(xres))
    if not (_MPP_RANGE[0] <= mpp[1] <= _MPP_RANGE[1]):
        return None
    return mpp
