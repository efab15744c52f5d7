"""Slides read through OpenSlide (the ``[openslide]`` extra): MRXS, SCN, BIF, VMS, DICOM WSI, and TIFFs the fast
path cannot read."""

from __future__ import annotations

import contextlib
import logging
import math
import threading
from collections.abc import Iterable
from concurrent.futures import Executor
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import SlideError
from .segments import FILL, MPP_RANGE, LevelInfo, padded_read
from .slide import Slide

__all__ = ["open_openslide", "openslide_available", "try_openslide"]

log = logging.getLogger(__name__)


class OpenSlideSegments:
    """One level of a slide read through OpenSlide, with the reading API of :class:`_Segments`.

    OpenSlide reads formats tifffile does not (MRXS, SCN, BIF, VMS, DICOM...).
    It has no tiles to expose, so this backend cuts its level into virtual
    512-px tiles; each read converts OpenSlide's premultiplied RGBA to RGB on
    white (transparent = glass).
    """

    def __init__(self, osr: Any, level: int, lock: threading.Lock, path: Path | None = None) -> None:
        self.osr, self.level, self._lock, self._path = osr, level, lock, path
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
        try:
            im = self.osr.read_region((x0, y0), self.level, (w, h))
        except Exception as err:  # openslide.OpenSlideError; after one, OpenSlide fails every later read
            self._reopen()
            name = self._path.name if self._path is not None else "the slide"
            raise SlideError(f"{name}: OpenSlide could not read level {self.level} at x={x0}, y={y0} ({err}). The "
                             "file is damaged there (e.g. edge tiles stored short); this slide stops, the others "
                             "go on. Re-export or re-convert the slide.") from err
        rgba = np.asarray(im)
        alpha = rgba[..., 3:4].astype(np.float32) / 255
        rgb = rgba[..., :3].astype(np.float32) + (1 - alpha) * 255  # premultiplied: add white where transparent
        return np.clip(rgb, 0, 255).round().astype(np.uint8)

    def _reopen(self) -> None:
        """A fresh handle, so that a later read (the next run in the dock) is not refused for this one's error."""
        if self._path is None:
            return
        import openslide

        with self._lock, contextlib.suppress(Exception):
            self.osr = openslide.OpenSlide(str(self._path))

    def tile(self, ty: int, tx: int, cache: bool = True) -> np.ndarray:
        self.decoded += 1
        return self._read(ty * 512, tx * 512, 512, 512)

    def read_row(self, ty: int, txs: Iterable[int] | None, pool: Executor | None = None) -> np.ndarray:
        out = np.full((512, self.shape[1], 3), FILL, np.uint8)
        if 0 <= ty < self.grid[0]:
            row = self._read(ty * 512, 0, 512, self.shape[1])
            h = min(512, self.shape[0] - ty * 512)
            out[:h] = row[:h]
            self.decoded += self.grid[1]
        return out

    def read(self, y: int, x: int, h: int, w: int, cache: bool = True) -> np.ndarray:
        return padded_read(self.shape, y, x, h, w, lambda y0, x0, y1, x1: self._read(y0, x0, y1 - y0, x1 - x0))

    def close(self) -> None:
        # Every level shares one OpenSlide handle: the first close closes it; the others find it closed.
        with self._lock, contextlib.suppress(Exception):
            self.osr.close()


def openslide_available() -> bool:
    """Whether the OpenSlide backend can be used (``pip install "napari-bcd[openslide]"``)."""
    try:
        import openslide  # noqa: F401
    except (ImportError, OSError):
        return False
    return True


def try_openslide(p: Path, err: SlideError) -> Slide:
    """OpenSlide as the fallback for a TIFF the fast path refused; the fast path's message if it cannot help."""
    if not openslide_available():
        raise err
    try:
        import openslide

        if openslide.OpenSlide.detect_format(str(p)) is None:
            raise err
    except openslide.OpenSlideError:
        raise err from None
    return open_openslide(p, "TIFF (through OpenSlide)")


def open_openslide(p: Path, what: str) -> Slide:
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
        companions = {".mrxs": "its companion folder (same name, no suffix) beside it",
                      ".vms": "its .jpg/.opt companion files beside it", ".vmu": "its companion files beside it"}
        hint = companions.get(p.suffix.lower())
        advice = (f" It may be incomplete: a {p.suffix.lower()} slide needs {hint}." if hint else
                  " It may be damaged or incomplete (copied only in part?).")
        raise SlideError(f"{p.name} cannot be read as a {what} slide ({err}).{advice}") from err
    props = osr.properties
    try:
        mx, my = float(props.get("openslide.mpp-x", "nan")), float(props.get("openslide.mpp-y", "nan"))
        mpp = (my, mx) if math.isfinite(mx) and math.isfinite(my) and MPP_RANGE[0] <= mx <= MPP_RANGE[1] else None
    except ValueError:
        mpp = None
    lock = threading.Lock()
    segments = [OpenSlideSegments(osr, i, lock, p) for i in range(osr.level_count)]
    H, W = segments[0].shape
    infos = [LevelInfo(seg.shape, (H / seg.shape[0], W / seg.shape[1])) for seg in segments]
    odd = [f"level {i} ({seg.downsample:g}x)" for i, seg in enumerate(segments)
           if abs(seg.downsample - round(seg.downsample)) > 1e-3]
    if odd:
        log.warning("%s: %s not a whole downsample of level 0: OpenSlide resamples what is read from it.",
                    p.name, ", ".join(odd))
    vendor = props.get("openslide.vendor", "openslide")
    return Slide(p, infos, mpp, segments=segments, vendor=f"openslide:{vendor}")  # type: ignore[arg-type]
