"""Quality control before the classifier: pen ink, folds, bubble edges and debris, and blur, found per window
with a reason, and left out of the map.

The tissue detector sees only "not glass"; a marker stroke, an out-of-focus band or a fold passes it and would
be classified like tissue.  This pass reads the slide once at about :data:`QC_MPP` µm/px (the coarsest pyramid
level at or finer than that, averaged down by an integer factor), measures every 16 µm block, and judges each
window (and each cell) from the blocks under it:

``pen``
    Share of the non-glass pixels that are marker ink: hues H&E never has (60-245°: green, cyan, blue) with
    saturation >= 0.3, the deep saturated red of red markers (saturation >= 0.75 within 15° of red: eosin stays
    below), or near-black (value <= 0.15).  Tissue-marking dye at the margins is ink too.
``fold``
    Share of the tissue that is dark and saturated as two layers of tissue are (a double layer squares the
    transmitted light: saturation >= 0.7, value <= 0.5, H&E hue).
``debris``
    Share of the non-glass pixels that are dark and colourless (saturation < 0.15, value 0.15-0.6): the edges of
    air bubbles, dirt, dust.  H&E has colour everywhere.
``blur``
    Sharpness (mean |Laplacian| over the grey level's standard deviation, per 16 µm block, so contrast does not
    count) of the window's tissue, relative to the slide's own median: a scan line out of focus is soft beside
    the rest of the same slide, whatever the tissue or stain.  A slide whose median itself is soft is said so.

A window fails on the first reason in :data:`REASONS` order whose measure crosses its threshold
(:class:`QCSettings`, all tunable).  Calibrated on the bundled CMU slide with drawn artefacts and on the real H&E
tiles of ``tests/data`` (64 µm windows: the drawn artefacts failed with their reason in 77 of 78 windows; the
unaltered slide fails 6 of its 172 tissue windows, on its real teal margin dye and dense crushed tissue; the real
tiles of other labs 0 of 103).  Made with numpy on the pixels (no model): scikit-image's ``rgb2hsv`` alone took 6x
our whole HSV (519 against 83 ms on 1.6 Mpx), and no permissively licensed QC network runs offline at the slide's
low level.
"""

from __future__ import annotations

import math
import os
import time
from collections.abc import Generator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from .quality import _hsv, _planes
from .settings import QC_ACTIONS, QC_REASONS, QCSettings

if TYPE_CHECKING:
    from .io.slide import Slide
    from .tiling import Grid

__all__ = ["QC_ACTIONS", "QC_MPP", "REASONS", "REASON_COLOURS", "REASON_WORDS", "QCResult", "QCSettings",
           "block_measures", "iter_quality_control", "left_out_cells", "quality_control"]

#: µm/px the pass reads at.
QC_MPP = 2.0
#: Side of a measured block, in QC pixels (16 µm).
BLOCK = 8
#: Why a window fails, in the order they are tried; a reason's code is its index + 1 (0: passes).
REASONS = QC_REASONS
#: The reasons in a pathologist's words.
REASON_WORDS = {"pen": "pen ink", "fold": "fold / thick tissue", "debris": "bubble edge / debris",
                "blur": "out of focus"}
#: Colours of the QC layer (RGB 0-255).
REASON_COLOURS = {"pen": (40, 90, 230), "fold": (120, 40, 20), "debris": (90, 90, 90), "blur": (230, 200, 40)}
#: Below this median block sharpness the whole slide looks soft (in-focus H&E measures 1.5-3 at 2 µm/px).
SOFT_SLIDE = 0.9
#: Optical density (summed over R, G, B) from which a pixel is as dark as a fold: in-focus H&E of one layer
#: reaches it in about 7 % of its pixels (the densest nuclei), a fold in most.
FOLD_OD = 2.0
#: The same test as a product of planes, no logarithm: OD_R + OD_G + OD_B >= FOLD_OD  <=>  R * G * B <= this.
FOLD_PRODUCT = 255.0**3 * 10.0 ** (-FOLD_OD)
#: A window is out of focus when at least this share of its tissue is in soft blocks.
SOFT_SHARE = 0.5
#: A slide whose tissue fails QC beyond this share gets a warning, not a silent map.
MOSTLY_FAILED = 0.5


def pixel_classes(rgb: np.ndarray) -> dict[str, np.ndarray]:
    """Boolean masks ``glass``, ``ink``, ``fold``, ``debris``, ``tissue`` of RGB pixels (uint8, or float 0-255)."""
    h, s, v = _hsv(rgb)
    glass = (s <= 0.1) & (v >= 0.85)
    ink = (((s >= 0.3) & (h >= 60) & (h <= 245)) | ((s >= 0.6) & ((h >= 345) | (h <= 15)))
           | ((v <= 0.15) & (s < 0.4)))
    debris = (s < 0.15) & (v < 0.6) & ~ink
    # optical density summed over R, G, B (a double layer of tissue has twice its layer's), as a product of planes
    r, g, b = (np.maximum(x, 1).astype(np.float32) for x in _planes(rgb))
    fold = (r * g * b <= FOLD_PRODUCT) & (s >= 0.4) & ~ink
    tissue = ~glass & ~ink & ~debris
    return {"glass": glass, "ink": ink, "fold": fold, "debris": debris, "tissue": tissue}


def _block_sums(x: np.ndarray, b: int) -> np.ndarray:
    """Sums over ``b x b`` blocks (of an array whose sides are multiples of ``b``), as float64."""
    H, W = x.shape[:2]
    rows = np.add.reduceat(x, np.arange(0, H, b), axis=0, dtype=np.float32)
    return np.add.reduceat(rows, np.arange(0, W, b), axis=1, dtype=np.float32).astype(np.float64)


#: What each block keeps (sums over its pixels): the shares and sharpness of any box are ratios of these.
MEASURES = ("nonglass", "tissue", "ink", "fold", "debris", "sharp", "sharp_weight")


def block_measures(rgb: np.ndarray) -> dict[str, np.ndarray]:
    """Per :data:`BLOCK` x :data:`BLOCK` block of an ``H x W x 3`` image at :data:`QC_MPP`: the pixel counts of
    :data:`MEASURES` and the block's sharpness (weighted by its tissue pixels, where at least half is tissue)."""
    H, W = (rgb.shape[0] // BLOCK) * BLOCK, (rgb.shape[1] // BLOCK) * BLOCK
    a = rgb[:H, :W]
    m = pixel_classes(a)
    out = {k: _block_sums(m[k], BLOCK) for k in ("ink", "fold", "debris", "tissue")}
    out["nonglass"] = _block_sums(~m["glass"], BLOCK)
    r, g, b = _planes(a)
    grey = (r * np.float32(0.299 / 255) + g * np.float32(0.587 / 255)) + b * np.float32(0.114 / 255)
    lap = np.zeros_like(grey)
    lap[1:-1, 1:-1] = np.abs(grey[:-2, 1:-1] + grey[2:, 1:-1] + grey[1:-1, :-2] + grey[1:-1, 2:] - 4 * grey[1:-1, 1:-1])
    t = m["tissue"]
    n = out["tissue"]
    safe = np.maximum(n, 1)
    mean = _block_sums(grey * t, BLOCK) / safe
    std = np.sqrt(np.maximum(_block_sums(grey * grey * t, BLOCK) / safe - mean**2, 0.0))
    sharp = _block_sums(lap * t, BLOCK) / safe / np.maximum(std, 1e-3)
    valid = n >= BLOCK * BLOCK / 2
    out["sharp_weight"] = np.where(valid, n, 0.0)
    out["sharp"] = np.where(valid, sharp * n, 0.0)
    return out


def _qc_level(slide: Slide, slide_mpp: float) -> tuple[int, int]:
    """The level read (the coarsest at or finer than :data:`QC_MPP`) and the integer factor averaged over."""
    level = 0
    for i, info in enumerate(slide.level_info):
        if slide_mpp * info.downsample[0] <= QC_MPP * 1.05:
            level = i
    level_mpp = slide_mpp * slide.level_info[level].downsample[0]
    return level, max(1, int(round(QC_MPP / level_mpp)))


def _reduce(rgb: np.ndarray, f: int) -> np.ndarray:
    """The mean of every ``f x f`` box (PIL's reduce: 5x faster than numpy's mean over a reshape)."""
    if f <= 1:
        return rgb
    from PIL import Image

    return np.asarray(Image.fromarray(np.ascontiguousarray(rgb[..., :3])).reduce(f))


def _thumbnail_blocks(slide: Slide, slide_mpp: float) -> tuple[dict[str, np.ndarray], float] | None:
    """Block measures from the slide's cached thumbnail (the tissue detector's), when it is fine enough: a small
    slide or photo is then not read again."""
    thumb, tds = slide.thumbnail(2000)
    thumb_mpp = slide_mpp * tds[0]
    if thumb_mpp > QC_MPP * 1.05:
        return None
    f = max(1, int(round(QC_MPP / thumb_mpp)))
    return block_measures(_reduce(thumb, f)), float(f * BLOCK * tds[0])


def _read_blocks(slide: Slide, level: int, f: int, need: np.ndarray | None, need_ds: tuple[float, float],
                 chunk: int = 2048) -> Generator[tuple[int, int], None, tuple[dict[str, np.ndarray], float]]:
    """Block measures of the whole level, read in chunks; chunks without needed tissue are skipped (glass).
    Yields ``(chunks done, chunks)``; closing it cancels the chunks not started."""
    H, W = slide.level_info[level].shape
    side = f * BLOCK  # level pixels per block
    rows, cols = -(-H // side), -(-W // side)
    out = {k: np.zeros((rows, cols), np.float64) for k in MEASURES}
    step = max(side, chunk // side * side)
    ds = slide.level_info[level].downsample
    boxes = []
    for y in range(0, rows * side, step):
        for x in range(0, cols * side, step):
            h, w = min(step, rows * side - y), min(step, cols * side - x)
            if need is not None:
                ya, yb = int(y * ds[0] / need_ds[0]), int(math.ceil((y + h) * ds[0] / need_ds[0]))
                xa, xb = int(x * ds[1] / need_ds[1]), int(math.ceil((x + w) * ds[1] / need_ds[1]))
                if not need[ya:yb + 1, xa:xb + 1].any():
                    continue  # no tissue: glass, not read
            boxes.append((y, x, h, w))

    def measure(box: tuple[int, int, int, int]) -> tuple[tuple[int, int, int, int], dict[str, np.ndarray]]:
        return box, block_measures(_reduce(slide.read_region(level, *box, cache=False), f))

    # chunks in threads (decoding and numpy release the GIL): the pass runs before the model, on idle cores
    pool = ThreadPoolExecutor(max_workers=min(4, os.cpu_count() or 1))
    try:
        yield 0, len(boxes)
        for n, ((y, x, _, _), part) in enumerate(pool.map(measure, boxes), start=1):
            by, bx = y // side, x // side
            for k, v in part.items():
                out[k][by : by + v.shape[0], bx : bx + v.shape[1]] = v
            yield n, len(boxes)
    finally:
        pool.shutdown(wait=True, cancel_futures=True)  # a cancel waits only for the chunks being read
    return out, float(side * ds[0])


@dataclass
class QCResult:
    """What the quality control found on one slide.

    ``window_reason`` (window grid) and ``cell_reason`` (cell grid) are uint8 codes: 0 passes, ``i + 1`` the
    ``i``-th of :data:`REASONS`.  ``reference_sharpness`` is the slide's median block sharpness the blur test is
    relative to; ``settings`` the thresholds used; ``seconds`` the pass's time; ``level`` the pyramid level read
    (-1: the slide's thumbnail, fine enough for a small slide).
    """

    window_reason: np.ndarray
    cell_reason: np.ndarray
    settings: QCSettings
    reference_sharpness: float = float("nan")
    seconds: float = 0.0
    level: int = 0

    @property
    def soft_slide(self) -> bool:
        """Whether the slide as a whole measures soft (the relative blur test cannot see a slide all out of focus)."""
        return math.isfinite(self.reference_sharpness) and self.reference_sharpness < SOFT_SLIDE

    def to_dict(self) -> dict[str, Any]:
        return {"settings": self.settings.to_dict(), "reference_sharpness": round(self.reference_sharpness, 4)
                if math.isfinite(self.reference_sharpness) else None, "seconds": round(self.seconds, 3),
                "level": self.level,
                "windows_failed": {r: int((self.window_reason == i + 1).sum()) for i, r in enumerate(REASONS)}}


def _shares(means: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    with np.errstate(invalid="ignore", divide="ignore"):
        ng, t = np.maximum(means["nonglass"], 1e-9), np.maximum(means["tissue"], 1e-9)
        return {"pen": means["ink"] / ng, "fold": means["fold"] / t, "debris": means["debris"] / ng,
                "blur": np.where(means["measured"] > 0, means["soft"] / np.maximum(means["measured"], 1e-9), 0.0)}


def reasons_of(shares: dict[str, np.ndarray], settings: QCSettings) -> np.ndarray:
    """uint8 reason codes of boxes from their shares (the first failing reason in :data:`REASONS`)."""
    fails = {"pen": shares["pen"] >= settings.pen, "fold": shares["fold"] >= settings.fold,
             "debris": shares["debris"] >= settings.debris, "blur": shares["blur"] >= SOFT_SHARE}
    out = np.zeros(shares["pen"].shape, np.uint8)
    for i, r in reversed(list(enumerate(REASONS))):  # the first reason wins: written last
        out[fails[r]] = i + 1
    return out


def quality_control(slide: Slide, grid: Grid, slide_mpp: float, settings: QCSettings | None = None,
                    need: np.ndarray | None = None, need_ds: tuple[float, float] = (1.0, 1.0)) -> QCResult:
    """Judge every window and cell of ``grid`` on ``slide`` (level-0 µm/px ``slide_mpp``); :func:`iter_quality_control`
    run to the end."""
    gen = iter_quality_control(slide, grid, slide_mpp, settings, need, need_ds)
    while True:
        try:
            next(gen)
        except StopIteration as stop:
            return stop.value


def iter_quality_control(slide: Slide, grid: Grid, slide_mpp: float, settings: QCSettings | None = None,
                         need: np.ndarray | None = None, need_ds: tuple[float, float] = (1.0, 1.0),
                         ) -> Generator[tuple[int, int], None, QCResult]:
    """Judge every window and cell of ``grid`` on ``slide`` (level-0 µm/px ``slide_mpp``), yielding ``(chunks done,
    chunks)`` while a big slide is read (closing it cancels); returns the :class:`QCResult`.

    ``need`` (a boolean mask of level-0 pixels downsampled by ``need_ds``, e.g. the tissue detector's) limits the
    reading to where it is true: glass is not read.
    """
    from .windows import window_tissue_fraction

    s = settings or QCSettings()
    t0 = time.perf_counter()
    level, f = _qc_level(slide, slide_mpp)
    small = _thumbnail_blocks(slide, slide_mpp)
    if small is not None:
        blocks, block_px = small
    else:
        blocks, block_px = yield from _read_blocks(slide, level, f, need, need_ds)
    weights = blocks.pop("sharp_weight")
    with np.errstate(invalid="ignore", divide="ignore"):
        sharp = blocks.pop("sharp") / weights
    reference = float(np.median(sharp[weights > 0])) if (weights > 0).sum() >= 8 else float("nan")
    # a block is soft below the fraction of the slide's median; a box's blur is the share of its measured tissue
    # in soft blocks (a window half out of focus is half soft, whatever the sharpness of the other half)
    blocks["measured"] = weights
    blocks["soft"] = np.where((weights > 0) & (sharp < s.blur * reference), weights, 0.0) if math.isfinite(
        reference) else np.zeros_like(weights)
    reasons = []
    for which in (0, 1):  # windows, cells: the mean of each measure over the box, as the tissue fraction is made
        means = {k: window_tissue_fraction(v, (block_px, block_px), grid)[which] for k, v in blocks.items()}
        reasons.append(reasons_of(_shares(means), s))
    return QCResult(reasons[0], reasons[1], s, reference, time.perf_counter() - t0, -1 if small else level)


def left_out_cells(qc: QCResult, window_done: np.ndarray, candidates: np.ndarray,
                   cells_per_window: tuple[int, int]) -> np.ndarray:
    """The reason code of every cell kept out of the map: its own failing reason, or, for a cell only failing
    windows reach (skipped, so never classified), theirs."""
    out = qc.cell_reason.copy()
    kh, kw = cells_per_window
    rows, cols = out.shape
    reached = np.zeros_like(out, bool)
    for r, c in np.argwhere(window_done):
        reached[r : r + kh, c : c + kw] = True
    for r, c in np.argwhere(candidates & (qc.window_reason > 0)):
        box = (slice(r, min(r + kh, rows)), slice(c, min(c + kw, cols)))
        sub, hit = out[box], reached[box]
        sub[(sub == 0) & ~hit] = qc.window_reason[r, c]
    return out
