"""Slides in TIFF files read through tifffile's fast path: Aperio SVS, NDPI, OME-TIFF, generic tiled pyramids.

The compressed tiles (or strips) are read with ``os.pread`` (thread-safe, no
shared file position), decoded with tifffile's own ``TiffPage.decode``
(imagecodecs, which releases the GIL, so several threads decode at once) and
recently decoded tiles kept in a small LRU cache, since neighbouring windows
share tiles.  Label, macro and thumbnail images of SVS files are not levels.
"""

from __future__ import annotations

import functools
import logging
import math
import os
import re
import threading
from collections.abc import Iterable
from concurrent.futures import Executor
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from ..errors import SlideError
from .jpeg import complete_jpeg
from .segments import (
    FILL,
    MAX_PIXELS,
    MAX_SEGMENT_BYTES,
    MPP_RANGE,
    LevelInfo,
    TileCache,
    check_pixels,
    read_row_by_tiles,
)
from .slide import Slide

if TYPE_CHECKING:
    from tifffile import TiffPage

__all__ = ["TiffSegments", "open_tiff"]

log = logging.getLogger(__name__)
_NOT_LEVELS = {"thumbnail", "label", "macro"}


class TiffSegments:
    """Random access to the tiles or strips of one TIFF page."""

    def __init__(self, page: TiffPage, path: Path, cache: TileCache, key: int) -> None:
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
            arr = np.full((*self.seg, 3), FILL, np.uint8)
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
                arr = np.full((*self.seg, 3), FILL, np.uint8)
            else:
                arr = np.asarray(decoded).reshape(decoded.shape[-3], decoded.shape[-2], -1)[..., :3]
                if arr.shape[:2] != self.seg:  # strips/tiles at the edge may come back short
                    full = np.full((*self.seg, 3), FILL, np.uint8)
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
        return read_row_by_tiles(self, ty, txs, pool)

    def read(self, y: int, x: int, h: int, w: int, cache: bool = True) -> np.ndarray:
        out = np.full((h, w, 3), FILL, np.uint8)
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
        if h * w > MAX_PIXELS:
            raise SlideError(f"{self.path.name} declares {w:,} x {h:,} px, larger than any slide; the file is damaged "
                             "or not a slide.")
        if self.seg[0] * self.seg[1] * 3 > MAX_SEGMENT_BYTES:
            raise SlideError(
                f"{self.path.name} stores its {w:,} x {h:,} px image in blocks of {self.seg[1]:,} x {self.seg[0]:,} "
                "px, "
                "too large to decode one at a time. Save it as a tiled pyramid TIFF (vips tiffsave --tile --pyramid)."
            )


def open_tiff(p: Path, cache_mb: int) -> Slide:
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
        check_pixels(p, first.dtype, int(first.samplesperpixel), extra)
        if int(first.planarconfig) == 2:
            raise SlideError(f"{p.name} stores colour planes separately; re-save it as interleaved RGB.")
        cache = TileCache(cache_mb << 20)
        size = p.stat().st_size
        segments = [TiffSegments(pg, p, cache, i) for i, pg in enumerate(pages)]
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
            return (v, v) if MPP_RANGE[0] <= v <= MPP_RANGE[1] else None
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
            return mpp if MPP_RANGE[0] <= mpp[1] <= MPP_RANGE[1] else None
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
    if not (MPP_RANGE[0] <= mpp[1] <= MPP_RANGE[1]):
        return None
    return mpp
