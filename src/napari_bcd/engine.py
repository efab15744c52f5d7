"""The sliding-window engine: slide -> tissue windows -> model -> ClassMap.

:func:`iter_classify` is a generator: it yields :class:`Progress` once per
batch and returns a :class:`ClassMap`.  Reading is overlapped with compute:
a thread pool reads and resizes the next windows (tifffile decoding releases
the GIL) while the model runs on the current batch; at most ``prefetch``
batches are in flight, so memory does not grow with the slide.  Closing the
generator (``gen.close()``, or a napari worker's quit) cancels at the next
batch and releases the threads.
"""

from __future__ import annotations

import contextlib
import logging
import os
import queue
import threading
import time
from collections.abc import Generator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np

from .classes import CLASS_NAMES
from .errors import BcdError
from .geometry import as_pair
from .io.slide import Slide
from .tiling import Grid, make_grid
from .tissue import TissueParams
from .windows import tissue_fractions, window_batches

if TYPE_CHECKING:
    from .decision import DecisionRule
    from .model.card import ModelCard
    from .model.classifier import Classifier
    from .model.inference import Predictor

__all__ = ["ClassMap", "Progress", "WindowPlan", "classify", "iter_classify", "plan_windows"]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Progress:
    """One progress report.  ``stage`` is ``"tissue"`` or ``"classify"``."""

    stage: str
    done: int
    total: int
    windows_per_s: float = 0.0
    eta_s: float | None = None

    @property
    def fraction(self) -> float:
        return self.done / self.total if self.total else 1.0

    def __str__(self) -> str:
        eta = f", ETA {self.eta_s:.0f} s" if self.eta_s is not None else ""
        return f"{self.stage}: {self.done}/{self.total} windows, {self.windows_per_s:.1f}/s{eta}"


@dataclass
class ClassMap:
    """The result of classifying one slide.

    Attributes
    ----------
    probs
        ``(rows, cols, C)`` float32 class probabilities per cell (NaN where no
        window was classified).
    labels
        ``(rows, cols)`` uint8: 0 background / not classified, 1-4 the classes.
    tissue
        ``(rows, cols)`` fraction of each cell that is tissue (0-1).
    window_done
        ``(window rows, window cols)`` bool: windows sent to the model.
    quality
        ``(rows, cols)`` image-quality score of each cell (mean over its
        windows: :mod:`napari_bcd.quality`; NaN on glass), or None.
    grid
        Geometry: cells and windows in level-0 pixels and µm.
    classes
        Class names in probability order.
    """

    probs: np.ndarray
    labels: np.ndarray
    tissue: np.ndarray
    window_done: np.ndarray
    grid: Grid
    classes: tuple[str, ...] = CLASS_NAMES
    slide_name: str = ""
    slide_shape: tuple[int, int] = (0, 0)
    model_name: str = ""
    info: dict = field(default_factory=dict)
    quality: np.ndarray | None = None

    @property
    def uncertain_label(self) -> int:
        """The label of cells the decision rule left uncertain (one past the classes)."""
        return len(self.classes) + 1

    @property
    def n_windows(self) -> int:
        return int(self.window_done.sum())

    def layer_transform(self) -> tuple[tuple[float, float], tuple[float, float]]:
        """napari ``(scale, translate)`` in µm that lay the cells over an image of ``scale = mpp``.

        napari puts pixel *centres* at ``index * scale + translate``; an image
        pixel ``i`` of level 0 is centred at ``i * mpp``, so a cell that covers
        level-0 pixels ``[y0, y0 + s)`` is centred at ``(y0 + s / 2 - 0.5) * mpp``.
        """
        g = self.grid
        scale = g.cell_um
        translate = (
            (g.origin_px[0] + g.stride_px[0] / 2 - 0.5) * g.mpp[0],
            (g.origin_px[1] + g.stride_px[1] / 2 - 0.5) * g.mpp[1],
        )
        return scale, translate

    def at_level0(self, y: float, x: float) -> tuple[int, np.ndarray | None]:
        """Label and probabilities of the cell under level-0 pixel ``(y, x)``."""
        cell = self.grid.cell_of_point(y + 0.5, x + 0.5)
        if cell is None:
            return 0, None
        p = self.probs[cell]
        return int(self.labels[cell]), (None if np.isnan(p).any() else p)


def iter_classify(
    slide: Slide,
    model: Classifier | Predictor,
    *,
    stride: float | tuple[float, float] = 1.0,
    stride_um: float | tuple[float, float] | None = None,
    batch_size: int | None = None,
    device: str | None = None,
    precision: str = "auto",
    tissue: TissueParams | None = None,
    min_tissue: float = 0.25,
    mpp: float | tuple[float, float] | None = None,
    workers: int | None = None,
    prefetch: int = 2,
    compile: bool = False,
    decision: DecisionRule | dict | None = None,
    quality: bool | None = None,
    stain_normalize: str = "none",
    decode: str = "auto",
) -> Generator[Progress, None, ClassMap]:
    """Classify a slide window by window, yielding progress, returning a :class:`ClassMap`.

    Parameters
    ----------
    slide
        From :func:`~napari_bcd.open_slide`.
    model
        A :class:`~napari_bcd.model.Classifier` (wrapped in a
        :class:`~napari_bcd.model.Predictor` on ``device``) or a Predictor.
    stride, stride_um
        Window step as a fraction of the field, or in µm.
    batch_size
        Windows per model call (default: 128 on CUDA, 4 elsewhere).
    device, precision
        See :class:`~napari_bcd.model.Predictor`.
    tissue
        Tissue detection settings (``TissueParams(threshold=...)``).
    min_tissue
        A window is classified when at least this fraction of it is tissue.
    mpp
        Level-0 µm/px, for images whose file does not say (or says wrong).
    workers, prefetch
        Decoding threads (default: one per core, up to 8), and batches read
        ahead of the model.  Each tile is decoded once per pass
        (:func:`~napari_bcd.windows.window_batches`); windows are resized on
        the model's device.
    decode
        Where JPEG tiles are decoded: ``"auto"`` (on a CUDA model's GPU by
        nvJPEG when the slide's tiles allow it and a sample decodes as the CPU
        does, else on the CPU), ``"cpu"``, or ``"device"`` (TorchCodec or
        torchvision on the model's device, whatever it is; checked the same way).  What was used
        and why is ``info["decode"]``.
    compile
        ``torch.compile`` the model (a GPU's long runs): compiled once, before
        the timed work, for one padded batch shape.
    decision
        A :class:`~napari_bcd.review.DecisionRule` (or its dict): per-class
        thresholds and uncertainty cut-offs.  None: the model card's rule
        (the arg-max when the card has none).
    quality
        Score each window's image quality (pen, blur, folds; computed in the
        reading threads, about 0.1-0.15 ms of CPU per window): cells below the
        rule's ``min_quality`` become uncertain.  None (default): only when
        the rule uses it; the Classify dock asks for it, so it can be applied later.
    stain_normalize
        ``"none"`` or ``"macenko"``: windows are normalised on the device to
        the stain of the model's training images (its card's ``stain``).  In
        either case the slide's stain is measured on a sample of its tissue
        windows and compared with the card's (``info["stain"]``).

    Returns
    -------
    Generator[Progress, None, ClassMap]
        Yields :class:`Progress`, returns the :class:`ClassMap`.  Bad
        arguments (no mpp, an image smaller than one window...) raise here,
        before the generator is handed to a worker.
    """
    from .model.inference import Predictor

    predictor = (model if isinstance(model, Predictor)
                 else Predictor(model, device=device, precision=precision, compile=compile))
    card = predictor.model.card
    if mpp is not None:
        slide_mpp = as_pair(mpp)
    elif slide.mpp is not None:
        slide_mpp = slide.mpp
    else:
        raise BcdError(
            f"{slide.name} does not say its pixel size (µm per pixel). State it (mpp=..., --mpp, or the "
            "widget's mpp box); 0.25 is typical for 40x scans, 0.5 for 20x."
        )
    if batch_size is None:
        batch_size = predictor.default_batch_size
    if batch_size < 1:
        raise BcdError(f"batch_size must be at least 1, got {batch_size}.")
    if not 0 <= min_tissue <= 1:
        raise BcdError(f"min_tissue is a fraction between 0 and 1, got {min_tissue}.")
    from .decision import DecisionRule

    rule = (decision if isinstance(decision, DecisionRule)
            else DecisionRule.from_dict(card.decision if decision is None else decision))
    rule.check_classes(card.classes)
    from .io.device_decode import DECODE_MODES

    if decode not in DECODE_MODES:
        raise BcdError(f"Unknown decode mode {decode!r}; use one of {', '.join(DECODE_MODES)}.")
    if stain_normalize not in ("none", "macenko", "vahadane"):
        raise BcdError(f"Unknown stain normalisation {stain_normalize!r}; use none, macenko or vahadane.")
    if stain_normalize != "none":
        from .stain import reference_stats

        if reference_stats(card.stain, stain_normalize) is None:
            raise BcdError(f"This model's card has no {stain_normalize} stain statistics of its training images to "
                           "normalise to; train it again with this version, or classify without --stain-normalize.")
    grid = make_grid(
        slide.dimensions,
        slide_mpp,
        card.field_um,
        card.input_px,
        [info.downsample for info in slide.level_info],
        stride=stride,
        stride_um=stride_um,
    )
    score_quality = bool(rule.min_quality > 0) if quality is None else bool(quality)
    return _classify(slide, predictor, grid, tissue, min_tissue, batch_size, workers, prefetch, slide_mpp, rule,
                     score_quality, stain_normalize, decode)


@dataclass(frozen=True)
class WindowPlan:
    """What a run would do, before it runs: windows in the grid and on tissue, and the cell size.

    Attributes
    ----------
    total
        Windows in the grid over the whole image.
    on_tissue
        Windows the run would send to the model (the same selection as :func:`iter_classify`).
    cell_um
        One cell of the class map, ``(h, w)`` µm (the stride).
    cells_on_tissue
        Cells the map would hold on tissue (a coarse map has few).
    """

    total: int
    on_tissue: int
    cell_um: tuple[float, float]
    cells_on_tissue: int
    grid: Grid

    def seconds(self, windows_per_s: float) -> float:
        return self.on_tissue / max(windows_per_s, 1e-9)


def plan_windows(
    slide: Slide,
    card: ModelCard,
    *,
    stride: float | tuple[float, float] = 1.0,
    stride_um: float | tuple[float, float] | None = None,
    tissue: TissueParams | None = None,
    min_tissue: float = 0.25,
    mpp: tuple[float, float] | None = None,
) -> WindowPlan:
    """Count the windows a run with these settings would classify (reads only the thumbnail).

    ``card`` is the model's :class:`~napari_bcd.model.ModelCard` (no weights needed).
    """
    slide_mpp = mpp or slide.mpp
    if slide_mpp is None:
        raise BcdError(f"{slide.name} does not say its pixel size; state it to count windows.")
    grid = make_grid(slide.dimensions, slide_mpp, card.field_um, card.input_px,
                     [info.downsample for info in slide.level_info], stride=stride, stride_um=stride_um)
    win_frac, _, _ = tissue_fractions(slide, grid, tissue, slide_mpp)
    selected = win_frac >= max(min_tissue, 1e-6)
    kh, kw = grid.cells_per_window
    covered = np.zeros(grid.n_cells, bool)
    for r, c in np.argwhere(selected):
        covered[r : r + kh, c : c + kw] = True
    return WindowPlan(int(win_frac.size), int(selected.sum()), grid.cell_um, int(covered.sum()), grid)


def _classify(
    slide: Slide,
    predictor,
    grid: Grid,
    tissue: TissueParams | None,
    min_tissue: float,
    batch_size: int,
    workers: int | None,
    prefetch: int,
    slide_mpp: tuple[float, float],
    rule,
    score_quality: bool = True,
    stain_normalize: str = "none",
    decode: str = "auto",
) -> Generator[Progress, None, ClassMap]:
    from .decision import decide
    from .io.device_decode import device_rows
    from .quality import window_quality

    card = predictor.model.card
    yield Progress("tissue", 0, 0)
    win_frac, cell_frac, tissue_share = tissue_fractions(slide, grid, tissue, slide_mpp)
    todo = np.argwhere(win_frac >= max(min_tissue, 1e-6))
    total = len(todo)
    stain_info = _stain_check(slide, grid, todo, card, predictor, stain_normalize)
    n_cls = len(card.classes)
    sums = np.zeros((*grid.n_cells, n_cls), np.float64)
    counts = np.zeros(grid.n_cells, np.int32)
    done_mask = np.zeros(grid.n_windows, bool)
    q_sums = np.zeros(grid.n_cells, np.float64)
    q_counts = np.zeros(grid.n_cells, np.int32)
    level_mpp = float(grid.mpp[1] * grid.level_downsample[1])
    kh, kw = grid.cells_per_window

    _, _, win_h, win_w = grid.read_box(0, 0)
    compile_s = 0.0
    if total and (predictor.compiled or predictor.device.type == "cuda"):
        compile_s = predictor.warm_up((win_h, win_w), batch_size)  # outside the timed work
    rows, decode_note = (None, "cpu")
    if total and decode != "cpu":
        rows, decode_note = device_rows(slide, grid.level, predictor.device, decode,
                                        _sample_tiles(slide, grid, todo))
    decoded_before = slide.decoded_tiles
    t0 = time.perf_counter()
    yield Progress("classify", 0, total)
    if total:
        # Decoding threads only decode (imagecodecs releases the GIL; windows are cut in one producer thread),
        # so more of them help up to the measured knee: 4 threads 7,500 tiles/s, 8 threads 11,000.
        n_workers = workers or min(8, os.cpu_count() or 2)
        pool = ThreadPoolExecutor(max_workers=n_workers, thread_name_prefix="bcd-read")
        stop = threading.Event()
        ready: queue.Queue = queue.Queue(maxsize=max(1, prefetch))

        def produce() -> None:
            # Decode tile rows and cut batches ahead of the model, at most `prefetch` batches ahead.
            try:
                for item in window_batches(slide, grid, todo, batch_size, pool, stop, read_row=rows,
                                           alloc=predictor.host_batch if predictor.device.type == "cuda" else None):
                    while not stop.is_set():
                        try:
                            ready.put(item, timeout=0.1)
                            break
                        except queue.Full:
                            continue
                    if stop.is_set():
                        return
                ready.put(_END)
            except BaseException as err:  # noqa: BLE001 - handed to the consumer, raised there
                ready.put(err)

        producer = threading.Thread(target=produce, name="bcd-read-bands", daemon=True)
        producer.start()
        try:
            done = 0
            rate = 0.0

            def take(batch_rc: np.ndarray, pending, q_futures: list) -> None:
                probs = pending.result()
                for (r, c), p in zip(batch_rc, probs, strict=True):
                    sums[r : r + kh, c : c + kw] += p
                    counts[r : r + kh, c : c + kw] += 1
                    done_mask[r, c] = True
                if q_futures:
                    scores = np.concatenate([f.result() for f in q_futures])
                    for (r, c), q in zip(batch_rc, scores, strict=True):
                        if np.isfinite(q):
                            q_sums[r : r + kh, c : c + kw] += q
                            q_counts[r : r + kh, c : c + kw] += 1

            # On a GPU one batch is in flight: batch i+1 is queued on the device before batch i's probabilities
            # are read, so the GPU never waits for this loop (a cancel then drops that one batch unread).  On the
            # CPU submit() computes the batch, so it is taken at once and a cancel stops within one batch.
            pipelined = predictor.asynchronous
            in_flight = None
            while True:
                item = ready.get()
                if isinstance(item, BaseException):
                    raise item
                submitted = None
                if item is not _END:
                    batch_rc, pixels = item
                    # The quality score runs in the reading threads (in chunks, so a big GPU batch spreads
                    # over them) while the model works on the batch; of a batch on the GPU only its strided
                    # samples come to the host.
                    q_futures = [pool.submit(window_quality, pixels[i : i + 64], level_mpp)
                                 for i in range(0, len(pixels), 64)] if score_quality else []
                    submitted = (batch_rc, predictor.submit(pixels), q_futures)
                finished = [in_flight] if in_flight is not None else []
                in_flight = submitted
                if not pipelined and in_flight is not None:  # computed already: no reason to hold it back
                    finished.append(in_flight)
                    in_flight = None
                for batch in finished:
                    take(*batch)
                    done += len(batch[0])
                    elapsed = time.perf_counter() - t0
                    rate = done / elapsed if elapsed > 0 else 0.0
                    yield Progress("classify", done, total, rate, (total - done) / rate if rate else None)
                if item is _END:
                    break
        finally:
            stop.set()
            while producer.is_alive():  # unblock a producer waiting on a full queue
                with contextlib.suppress(queue.Empty):
                    ready.get(timeout=0.05)
            producer.join()
            pool.shutdown(wait=True, cancel_futures=True)
    with np.errstate(invalid="ignore", divide="ignore"):
        probs = (sums / counts[..., None]).astype(np.float32)
    probs[counts == 0] = np.nan
    covered = (counts > 0) & (cell_frac >= min_tissue * 0.5)
    cell_quality = None
    if score_quality:
        with np.errstate(invalid="ignore", divide="ignore"):
            cell_quality = (q_sums / q_counts).astype(np.float32)
        cell_quality[q_counts == 0] = np.nan
    labels, reasons = decide(probs, covered, tuple(card.classes), rule, cell_quality)
    elapsed = time.perf_counter() - t0
    return ClassMap(
        probs=probs,
        labels=labels,
        tissue=cell_frac,
        window_done=done_mask,
        grid=grid,
        classes=tuple(card.classes),
        slide_name=slide.name,
        slide_shape=slide.dimensions,
        model_name=card.name,
        quality=cell_quality,
        info={
            "decision": {**rule.to_dict(), "uncertain_cells": reasons},
            "stain": stain_info,
            "windows": int(total),
            "seconds": round(elapsed, 3),
            "windows_per_s": round(total / elapsed, 3) if elapsed > 0 and total else 0.0,
            "device": str(predictor.device),
            "precision": predictor.precision,
            "tissue_fraction": tissue_share,
            "min_tissue": min_tissue,
            "compiled": bool(predictor.compiled),
            "warmup_seconds": round(compile_s, 3),
            "decoded_tiles": slide.decoded_tiles - decoded_before + (rows.decoded if rows is not None else 0),
            "decode": decode_note,
            "tiles_touched": _tiles_touched(slide, grid, todo),
        },
    )


_END = object()


def _stain_check(slide: Slide, grid: Grid, todo: np.ndarray, card, predictor, normalize: str) -> dict:
    """Measure the slide's stain on up to 16 tissue windows (as the model sees them), compare with the card's.

    With ``normalize == "macenko"`` the predictor gets the OD map to the card's stain.
    """
    from .stain import macenko_transform, reference_stats, stain_distance, stain_stats
    from .windows import read_window

    predictor.set_stain_map(None)
    if len(todo) == 0:
        return {"normalized": "none", "note": "no tissue window"}
    pick = todo[np.linspace(0, len(todo) - 1, min(16, len(todo))).round().astype(int)]
    try:
        # not through the tile cache: the pass that follows still decodes each tile once
        images = [read_window(slide, grid, int(r), int(c), tuple(card.input_px), cache=False) for r, c in pick]
        stats = stain_stats(images)
    except BcdError as err:
        return {"normalized": "none", "note": str(err)}
    info: dict = {"slide": stats.to_dict(), "normalized": "none"}
    reference = reference_stats(card.stain)
    if reference is None:
        info["note"] = "the model card has no stain statistics of its training images"
        return info
    info["distance"] = stain_distance(stats, reference)
    if normalize != "none":
        source = stats if normalize == "macenko" else stain_stats(images, method=normalize)
        predictor.set_stain_map(macenko_transform(source, reference_stats(card.stain, normalize)))
        info["normalized"] = normalize
    return info


def _sample_tiles(slide: Slide, grid: Grid, windows: np.ndarray, n: int = 8) -> list[tuple[int, int]]:
    """Up to ``n`` tiles of the grid's level under windows spread over the pass (to check a decoder on)."""
    th, tw = slide.tile_shape(grid.level)
    H, W = slide.level_info[grid.level].shape
    picks = windows[np.linspace(0, len(windows) - 1, min(n, len(windows))).round().astype(int)]
    tiles = []
    for r, c in picks:
        y, x, h, w = grid.read_box(int(r), int(c))
        cy, cx = min(max(y + h // 2, 0), H - 1), min(max(x + w // 2, 0), W - 1)
        tiles.append((cy // th, cx // tw))
    return list(dict.fromkeys(tiles))


def _tiles_touched(slide: Slide, grid: Grid, windows: np.ndarray) -> int:
    """Distinct tiles of the grid's level that the windows cover (the floor for decodes per pass)."""
    if len(windows) == 0:
        return 0
    th, tw = slide.tile_shape(grid.level)
    H, W = slide.level_info[grid.level].shape
    _, _, h, w = grid.read_box(0, 0)
    tiles = set()
    for r, c in windows:
        y, x, _, _ = grid.read_box(int(r), int(c))
        for ty in range(max(y, 0) // th, (min(y + h, H) - 1) // th + 1):
            for tx in range(max(x, 0) // tw, (min(x + w, W) - 1) // tw + 1):
                tiles.add((ty, tx))
    return len(tiles)


def classify(slide: Slide, model: Classifier | Predictor, **kwargs: Any) -> ClassMap:
    """Run :func:`iter_classify` to the end and return its ClassMap."""
    gen = iter_classify(slide, model, **kwargs)
    while True:
        try:
            next(gen)
        except StopIteration as stop:
            return stop.value
