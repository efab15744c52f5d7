"""OME-Zarr (OME-NGFF 0.4 on Zarr v2, 0.5 on Zarr v3) multiscale images behind the :class:`Slide` API.

A folder whose ``multiscales`` metadata lists the pyramid's datasets, level 0
first.  Axes are read by name: ``y`` and ``x`` (space), ``c`` (channel, 3 or 4
of them: RGB, RGBA loses its alpha); other axes (``t``, ``z``) must have
length 1.  The pixel size is the ``scale`` of level 0 (its own
transformation times the multiscale's), in µm (``micrometer``; nanometer and
millimeter are converted); a scale of 1 with no unit means "unknown".
Chunks play the role of tiles: the engine reads whole chunk rows, each once.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterable
from concurrent.futures import Executor
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import SlideError
from .segments import FILL, LevelInfo, padded_read
from .slide import Slide

log = logging.getLogger(__name__)

__all__ = ["is_ngff", "open_ngff"]

_UNITS = {"micrometer": 1.0, "micron": 1.0, "µm": 1.0, "um": 1.0, "nanometer": 1e-3, "nm": 1e-3,
          "millimeter": 1e3, "mm": 1e3, "centimeter": 1e4, "meter": 1e6}


def _multiscales(attrs: dict):
    ms = attrs.get("multiscales")
    if ms is None and isinstance(attrs.get("ome"), dict):
        ms = attrs["ome"].get("multiscales")
    return ms


def is_ngff(path: Path) -> bool:
    """Whether a folder is an OME-Zarr image (its group metadata has ``multiscales``)."""
    import json

    for name in (".zattrs", "zarr.json"):
        f = path / name
        if f.is_file():
            try:
                doc = json.loads(f.read_text(encoding="utf-8"))
            except (OSError, ValueError):  # a Zarr group with broken metadata: opening it says so
                return name == "zarr.json" or (path / ".zgroup").is_file()
            attrs = doc.get("attributes", doc) if name == "zarr.json" else doc
            return isinstance(attrs, dict) and bool(_multiscales(attrs))
    return False


class _ZarrSegments:
    """One pyramid level of an OME-Zarr image, with the reading API of the TIFF segments (chunks as tiles)."""

    def __init__(self, arr: Any, axes: list[str], name: str = "This OME-Zarr image") -> None:
        self.arr = arr
        self.name = name
        self.axes = axes
        self.iy, self.ix = axes.index("y"), axes.index("x")
        self.ic = axes.index("c") if "c" in axes else None
        shape = arr.shape
        for i, a in enumerate(axes):
            if a not in ("y", "x", "c") and shape[i] != 1:
                raise SlideError(f"This OME-Zarr image has {shape[i]} planes along {a!r}; napari-bcd reads 2-D RGB "
                                 "slides. Export one plane.")
        if self.ic is None or shape[self.ic] not in (3, 4):
            n = 1 if self.ic is None else shape[self.ic]
            raise SlideError(f"This OME-Zarr image has {n} channel(s); napari-bcd needs RGB (3 channels, uint8).")
        if arr.dtype != np.uint8:
            raise SlideError(f"This OME-Zarr image has {arr.dtype} pixels; napari-bcd needs 8-bit RGB.")
        self.shape = (int(shape[self.iy]), int(shape[self.ix]))
        chunks = arr.chunks
        self.seg = (int(chunks[self.iy]), int(chunks[self.ix]))
        self.grid = (math.ceil(self.shape[0] / self.seg[0]), math.ceil(self.shape[1] / self.seg[1]))
        self.decoded = 0

    def check_complete(self, size: int) -> None:
        pass

    def _read(self, y0: int, x0: int, y1: int, x1: int) -> np.ndarray:
        index = []
        for i in range(len(self.axes)):
            if i == self.iy:
                index.append(slice(y0, y1))
            elif i == self.ix:
                index.append(slice(x0, x1))
            elif i == self.ic:
                index.append(slice(0, 3))
            else:
                index.append(0)
        try:
            block = np.asarray(self.arr[tuple(index)])
        except Exception as err:  # a chunk the codec cannot decode: zarr and numcodecs raise anything
            raise SlideError(
                f"{self.name}: the chunk(s) at y {y0}-{y1}, x {x0}-{x1} of level {self.arr.path or '0'} cannot be "
                f"decoded ({type(err).__name__}: {err}); the OME-Zarr is damaged there. Copy or export it again."
            ) from err
        kept = [a for i, a in enumerate(self.axes) if not isinstance(index[i], int)]
        return np.ascontiguousarray(np.transpose(block, [kept.index("y"), kept.index("x"), kept.index("c")]))

    def read(self, y: int, x: int, h: int, w: int, cache: bool = True) -> np.ndarray:
        return padded_read(self.shape, y, x, h, w, self._read)

    def tile(self, ty: int, tx: int, cache: bool = True) -> np.ndarray:
        self.decoded += 1
        return self.read(ty * self.seg[0], tx * self.seg[1], self.seg[0], self.seg[1])

    def read_row(self, ty: int, txs: Iterable[int] | None, pool: Executor | None = None) -> np.ndarray:
        th, tw = self.seg
        out = np.full((th, self.shape[1], 3), FILL, np.uint8)
        cols = sorted(txs) if txs is not None else list(range(self.grid[1]))
        if 0 <= ty < self.grid[0] and cols:
            # one read per run of neighbouring columns: each needed chunk decoded once, the others not at all
            y1 = min((ty + 1) * th, self.shape[0])
            runs: list[list[int]] = []
            for c in cols:
                if runs and c == runs[-1][-1] + 1:
                    runs[-1].append(c)
                else:
                    runs.append([c])
            for run in runs:
                x0, x1 = run[0] * tw, min((run[-1] + 1) * tw, self.shape[1])
                out[: y1 - ty * th, x0:x1] = self._read(ty * th, x0, y1, x1)
            self.decoded += len(cols)
        return out

    def close(self) -> None:
        pass


def open_ngff(p: Path) -> Slide:
    """A :class:`~napari_bcd.io.Slide` over an OME-Zarr folder."""

    try:
        import zarr
    except ImportError as err:  # pragma: no cover - zarr is a dependency
        raise SlideError(f"{p.name} is an OME-Zarr image, which needs zarr: pip install zarr") from err
    try:
        group = zarr.open_group(str(p), mode="r")
        attrs = dict(group.attrs)
    except Exception as err:
        raise SlideError(f"{p.name} cannot be read as OME-Zarr ({type(err).__name__}: {err}).") from err
    ms = _multiscales(attrs)
    if not ms:
        raise SlideError(f"{p.name} is a Zarr folder without OME-NGFF 'multiscales' metadata.")
    m = ms[0]
    raw_axes = m.get("axes", ["c", "y", "x"])
    if not isinstance(raw_axes, list) or any(isinstance(a, dict) and not isinstance(a.get("name"), str)
                                             for a in raw_axes):
        raise SlideError(f"{p.name}: the OME-Zarr axes {raw_axes!r} are not a list of named axes; the metadata is "
                         "damaged.")
    # NGFF names axes in lower case; some writers (iohub) use upper case, which readers accept
    axes = [(a["name"] if isinstance(a, dict) else str(a)).lower() for a in raw_axes]
    units = {a["name"].lower(): a.get("unit") for a in raw_axes if isinstance(a, dict)}
    if "y" not in axes or "x" not in axes:
        raise SlideError(f"{p.name}: the OME-Zarr axes {axes} have no y and x.")
    datasets = m.get("datasets") or []
    if not datasets or not all(isinstance(d, dict) and "path" in d for d in datasets):
        raise SlideError(f"{p.name}: the OME-Zarr multiscales list no datasets (or datasets without a path).")
    try:
        segments = [_ZarrSegments(group[d["path"]], axes, p.name) for d in datasets]
    except KeyError as err:
        raise SlideError(f"{p.name}: the dataset {err} named in its metadata is missing.") from err
    except SlideError:
        raise
    except Exception as err:  # a damaged .zarray / zarr.json
        raise SlideError(f"{p.name}: a level's array metadata cannot be read ({type(err).__name__}: {err}); the "
                         "OME-Zarr is damaged.") from err
    # levels largest first, whatever order the metadata lists them in
    order = sorted(range(len(segments)), key=lambda i: -segments[i].shape[0] * segments[i].shape[1])
    segments, datasets = [segments[i] for i in order], [datasets[i] for i in order]
    _warn_missing_chunks(p, segments)
    H, W = segments[0].shape
    infos = [LevelInfo(s.shape, (H / s.shape[0], W / s.shape[1])) for s in segments]

    def scale_of(transforms: list[dict] | None) -> list[float] | None:
        for t in transforms or []:
            if t.get("type") == "scale":
                return [float(v) for v in t["scale"]]
        return None

    scale = scale_of(datasets[0].get("coordinateTransformations"))
    outer = scale_of(m.get("coordinateTransformations"))
    mpp = None
    if scale is not None:
        if outer is not None:
            scale = [a * b for a, b in zip(scale, outer, strict=False)]
        if len(scale) != len(axes):
            raise SlideError(f"{p.name}: the OME-Zarr scale {scale} has {len(scale)} values for {len(axes)} axes "
                             f"{axes}; the metadata is damaged (pass --mpp to give the pixel size).")
        sy, sx = scale[axes.index("y")], scale[axes.index("x")]
        unit_y, unit_x = units.get("y"), units.get("x")
        if unit_y or unit_x:
            fy, fx = _UNITS.get(str(unit_y).lower()), _UNITS.get(str(unit_x).lower())
            if fy is None or fx is None:
                raise SlideError(f"{p.name}: unknown OME-Zarr unit {unit_y or unit_x!r}; pass --mpp.")
            mpp = (sy * fy, sx * fx)
        elif (sy, sx) != (1.0, 1.0):
            mpp = (sy, sx)  # no unit: NGFF images of slides are in micrometres
    return Slide(p, infos, mpp, segments=segments, vendor="ome-zarr")  # type: ignore[arg-type]


def _warn_missing_chunks(p: Path, levels: list[_ZarrSegments]) -> None:
    """Say, level by level, where chunks are missing: they read as the fill value (zarr also skips chunks that equal
    it), and the engine may read any level (a map made from level 1 is as wrong as one from level 0)."""
    holes = []
    for k, level in enumerate(levels):
        try:
            have, total = int(level.arr.nchunks_initialized), int(level.arr.nchunks)
        except Exception:  # noqa: BLE001 - a store that cannot count: nothing to say
            continue
        if have < total:
            holes.append(f"{total - have} of {total} chunks of level {k}")
    if holes:
        fill = getattr(levels[0].arr, "fill_value", None)
        log.warning("%s: %s are missing and read as the fill value (%r): if the writer did not skip them on purpose, "
                    "that part of the slide is lost and reads as background.", p.name, "; ".join(holes), fill)
