"""The sliding-window engine: slide -> tissue windows -> model -> :class:`ClassMap`.

:func:`iter_classify` is a generator: it yields :class:`Progress` once per
batch and returns a :class:`ClassMap`.  Reading is overlapped with compute
(:class:`~.producer.BatchProducer`): threads decode the next batches while
the model runs on the current one; on a GPU one batch is also in flight on
the device while the next is prepared.  Closing the generator
(``gen.close()``, or a napari worker's quit) cancels at the next batch and
releases the threads.
"""

from __future__ import annotations

import itertools
import time
from collections.abc import Generator, Iterator
from typing import TYPE_CHECKING, Any

import numpy as np

from .._fileio import printable
from ..errors import BcdError
from ..io.slide import Slide
from ..settings import ClassifySettings
from ..tiling import Grid, grid_for, slide_mpp
from ..windows import mapped_cells, sample_tiles, select_windows, tiles_touched, tissue_mask, window_tissue_fraction
from .classmap import CellAccumulator, ClassMap, ModelRef
from .record import Progress, RunRecord, StainCheck

if TYPE_CHECKING:
    from ..model.classifier import Classifier
    from ..model.inference import Predictor

__all__ = ["classify", "iter_classify"]


def iter_classify(slide: Slide, model: Classifier | Predictor, settings: ClassifySettings | None = None,
                  **changes: Any) -> Generator[Progress, None, ClassMap]:
    """Classify a slide window by window, yielding progress, returning a :class:`ClassMap`.

    Parameters
    ----------
    slide
        From :func:`~napari_bcd.open_slide`.
    model
        A :class:`~napari_bcd.model.Classifier` (wrapped in a
        :class:`~napari_bcd.model.Predictor` on the settings' device) or a Predictor.
    settings
        What the run does (:class:`~napari_bcd.settings.ClassifySettings`);
        keyword arguments change single settings (``stride=0.5``).

    Returns
    -------
    Generator[Progress, None, ClassMap]
        Yields :class:`Progress`, returns the :class:`ClassMap`.  Bad settings
        (no mpp, an image smaller than one window...) raise here, before the
        generator is handed to a worker.
    """
    from ..decision import DecisionRule
    from ..model.inference import Predictor

    s = (settings or ClassifySettings()).replace(**changes) if changes else (settings or ClassifySettings())
    predictor = (model if isinstance(model, Predictor)
                 else Predictor(model, device=s.device, precision=s.precision, compile=s.compile))
    predictor.set_tta(s.tta)
    card = predictor.model.card
    rule = s.decision if s.decision is not None else DecisionRule.from_dict(card.decision)
    rule.check_classes(card.classes)
    if s.stain_normalize != "none":
        from ..stain import reference_stats

        if reference_stats(card.stain, s.stain_normalize) is None:
            raise BcdError(f"This model's card has no {s.stain_normalize} stain statistics of its training images to "
                           "normalise to; train it again with this version, or classify without --stain-normalize.")
    grid = grid_for(slide, card, s)
    quality = bool(rule.min_quality > 0) if s.quality is None else bool(s.quality)
    return _classify(slide, predictor, grid, s, rule, quality)


def _classify(slide: Slide, predictor, grid: Grid, s: ClassifySettings, rule,
              score_quality: bool) -> Generator[Progress, None, ClassMap]:
    from ..decision import decide
    from ..io.device_decode import DecodeChoice, device_rows
    from .producer import BatchProducer
    from .refine import cell_probabilities, cells_reached, coarse_lattice, estimate_windows, next_windows

    card = predictor.model.card
    yield Progress("tissue", 0, 0)
    mpp = slide_mpp(slide, s.mpp)
    mask, mask_ds = tissue_mask(slide, s.tissue, mpp)
    win_frac, cell_frac = window_tissue_fraction(mask, mask_ds, grid)
    tissue_share = float(mask.mean())
    selected = select_windows(win_frac, s.min_tissue)
    qc = None
    if s.qc.enabled:
        from ..qc import iter_quality_control

        yield Progress("quality control", 0, 0)
        gen = iter_quality_control(slide, grid, mpp[0], s.qc, need=mask, need_ds=mask_ds)
        while True:  # chunks of a big slide, each a chance to cancel
            try:
                done_chunks, chunks = next(gen)
            except StopIteration as stop:
                qc = stop.value
                break
            yield Progress("quality control", done_chunks, chunks)
        qc.window_reason[~selected] = 0  # only tissue windows are judged
    failed = selected & (qc.window_reason > 0) if qc is not None else np.zeros_like(selected)
    # failing windows are not classified ("skip"), or classified into a sum of their own ("set_aside"): what the
    # model said there can be looked at, but never reaches a label, an area or the call
    todo = np.argwhere(selected & ~failed if s.qc.action == "skip" else selected)
    aside = failed if s.qc.action == "set_aside" and failed.any() else None
    total = len(todo)
    batch_size = predictor.begin_run(windows=total, batch_size=s.batch_size)
    stain = stain_check(slide, grid, todo, card, predictor, s.stain_normalize)
    acc = CellAccumulator(grid, len(card.classes))
    acc_aside = CellAccumulator(grid, len(card.classes)) if aside is not None else None
    done_mask = np.zeros(grid.n_windows, bool)
    level_mpp = float(grid.mpp[1] * grid.level_downsample[1])
    _, _, win_h, win_w = grid.read_box(0, 0)
    compile_s = 0.0
    if total and (predictor.compiled or predictor.device.type == "cuda"):
        compile_s = predictor.warm_up((win_h, win_w), batch_size)  # outside the timed work
    rows, decode = (None, DecodeChoice())
    if total and s.decode != "cpu":
        rows, decode = device_rows(slide, grid.level, predictor.device, s.decode, sample_tiles(slide, grid, todo))
    decoded_before = slide.decoded_tiles
    t0 = time.perf_counter()
    part = todo[coarse_lattice(todo, grid.cells_per_window)] if s.refine else todo
    planned, done = len(part), 0
    yield Progress("classify", 0, planned)
    candidates = np.zeros(grid.n_windows, bool)
    candidates[todo[:, 0], todo[:, 1]] = True
    if aside is not None:
        candidates &= ~aside  # never among the overlapping windows adaptive overlap adds
    reachable, level = None, 0
    # with refine, each window's probabilities: the windows left out are estimated from them
    window_probs = np.full((*grid.n_windows, len(card.classes)), np.nan, np.float32) if s.refine else None
    known = done_mask
    while len(part):
        alloc = predictor.host_batch if predictor.device.type == "cuda" else None
        with BatchProducer(slide, grid, part, batch_size, workers=s.workers, prefetch=s.prefetch, read_row=rows,
                           alloc=alloc) as producer:
            for n in _pass_batches(producer, predictor, acc, done_mask, level_mpp, score_quality, window_probs,
                                   (aside, acc_aside)):
                done += n
                rate = done / max(time.perf_counter() - t0, 1e-9)
                yield Progress("classify", done, planned, rate, (planned - done) / rate if rate else None)
        part = todo[:0]
        if s.refine:  # the overlapping windows over the cells still in doubt, until none is
            if reachable is None:
                reachable = cells_reached(candidates, grid.cells_per_window, grid.n_cells) & (
                    cell_frac >= s.min_tissue * 0.5)
            estimated, known = estimate_windows(window_probs, done_mask, candidates, grid.cells_per_window)
            probs = cell_probabilities(estimated, known, grid.cells_per_window, grid.n_cells)
            new, level = next_windows(probs, acc.counts, reachable, candidates & ~done_mask, grid, level, rule,
                                      tuple(card.classes))
            part = np.argwhere(new)
            planned += len(part)
    if not s.refine or done == 0:
        probs = acc.probabilities()
    probs[acc.counts == 0] = np.nan  # a cell only estimated windows cover is not mapped
    covered = mapped_cells(done_mask, cell_frac, grid.cells_per_window, s.min_tissue)
    qc_cells = None
    if qc is not None:
        from ..qc import left_out_cells

        qc_cells = left_out_cells(qc, done_mask, selected, grid.cells_per_window)
        # only the cells the map would hold are "left out" (glass and the edges no window reaches are not)
        qc_cells[~mapped_cells(selected, cell_frac, grid.cells_per_window, s.min_tissue)] = 0
        covered &= qc_cells == 0
        if acc_aside is not None:  # set aside: what the model said where no passing window reached, for a look
            shown = (acc.counts == 0) & (acc_aside.counts > 0)
            probs[shown] = acc_aside.probabilities()[shown]
    cell_quality = acc.quality() if score_quality else None
    labels, reasons = decide(probs, covered, tuple(card.classes), rule, cell_quality)
    record = RunRecord(
        windows=int(done), seconds=time.perf_counter() - t0, device=str(predictor.device),
        precision=predictor.precision, precision_check=predictor.check,
        batching=predictor.tuning, int8_trial=predictor.int8_trial,
        tissue_fraction=tissue_share, min_tissue=s.min_tissue,
        compiled=bool(predictor.compiled), warmup_seconds=compile_s,
        decoded_tiles=slide.decoded_tiles - decoded_before + (rows.decoded if rows is not None else 0),
        tiles_touched=tiles_touched(slide, grid, np.argwhere(done_mask)), decode=decode, stain=stain,
        candidate_windows=int(total) if s.refine else None,
        estimated_windows=int((known & ~done_mask).sum()) if s.refine else None)
    return ClassMap(probs=probs, labels=labels, tissue=cell_frac, window_done=done_mask, grid=grid,
                    classes=tuple(card.classes), slide_name=printable(slide.name), slide_shape=slide.dimensions,
                    model=ModelRef.of(predictor.model), settings=s, decision=rule, uncertain_cells=reasons,
                    quality=cell_quality, run=record, qc=qc, qc_cells=qc_cells,
                    view_spread=acc.spread() if s.tta else None)


def _pass_batches(producer, predictor, acc: CellAccumulator, done_mask: np.ndarray, level_mpp: float,
                  score_quality: bool, window_probs: np.ndarray | None = None,
                  aside: tuple[np.ndarray | None, CellAccumulator | None] = (None, None)) -> Iterator[int]:
    """The producer's windows through the model into the accumulator; yields the size of each finished batch.

    On a GPU one batch is in flight: batch i+1 is queued on the device before batch i's probabilities are
    read, so the GPU never waits for this loop (a cancel then drops that one batch unread).  On the CPU
    submit() computes the batch, so it is taken at once and a cancel stops within one batch.  ``aside`` (a window
    mask and an accumulator) sends the windows quality control set aside to their own sum: they are not marked
    done, so nothing downstream (adaptive overlap, retraining) takes them for classified tissue.
    """
    from ..quality import window_quality

    aside_mask, aside_acc = aside

    def take(batch_rc: np.ndarray, pending, q_futures: list) -> None:
        scores = np.concatenate([f.result() for f in q_futures]) if q_futures else None
        probs, spread = pending.result(), pending.spread()
        if aside_mask is not None:
            out = aside_mask[batch_rc[:, 0], batch_rc[:, 1]]
            aside_acc.add(batch_rc[out], probs[out])
            keep = ~out
            batch_rc, probs = batch_rc[keep], probs[keep]
            scores = scores[keep] if scores is not None else None
            spread = spread[keep] if spread is not None else None
        acc.add(batch_rc, probs, scores, spread)
        done_mask[batch_rc[:, 0], batch_rc[:, 1]] = True
        if window_probs is not None:
            window_probs[batch_rc[:, 0], batch_rc[:, 1]] = probs

    in_flight = None
    for batch_rc, pixels in itertools.chain(producer, [(None, None)]):  # the last flushes the one in flight
        submitted = None
        if batch_rc is not None:
            # The quality score runs in the reading threads (in chunks, so a big GPU batch spreads over them)
            # while the model works on the batch; of a batch on the GPU only its strided samples come to the host.
            q_futures = [producer.pool.submit(window_quality, pixels[i : i + 64], level_mpp)
                         for i in range(0, len(pixels), 64)] if score_quality else []
            submitted = (batch_rc, predictor.submit(pixels), q_futures)
        finished = [in_flight] if in_flight is not None else []
        in_flight = submitted
        if not predictor.asynchronous and in_flight is not None:  # computed already: no reason to wait
            finished.append(in_flight)
            in_flight = None
        for batch in finished:
            take(*batch)
            yield len(batch[0])


def stain_check(slide: Slide, grid: Grid, todo: np.ndarray, card, predictor, normalize: str) -> StainCheck:
    """Measure the slide's stain on up to 16 tissue windows (as the model sees them), compare with the card's
    beyond the estimate's own noise (:func:`~napari_bcd.stain.stain_noise`).

    With ``normalize`` (``"macenko"``, ``"vahadane"``) the predictor gets the map to the card's stain.
    """
    from ..stain import macenko_transform, reference_stats, stain_distance, stain_noise, stain_stats
    from ..windows import read_window

    predictor.set_stain_map(None)
    if len(todo) == 0:
        return StainCheck(note="no tissue window")
    pick = todo[np.linspace(0, len(todo) - 1, min(16, len(todo))).round().astype(int)]
    try:
        # not through the tile cache: the pass that follows still decodes each tile once
        images = [read_window(slide, grid, int(r), int(c), tuple(card.input_px), cache=False) for r, c in pick]
        stats = stain_stats(images)
    except BcdError as err:
        return StainCheck(note=str(err))
    reference = reference_stats(card.stain)
    if reference is None:
        return StainCheck(stats.to_dict(), note="the model card has no stain statistics of its training images")
    distance = stain_distance(stats, reference, stain_noise(images, stats))
    if normalize != "none":
        source = stats if normalize == "macenko" else stain_stats(images, method=normalize)
        predictor.set_stain_map(macenko_transform(source, reference_stats(card.stain, normalize)))
    return StainCheck(stats.to_dict(), distance, normalize)


def classify(slide: Slide, model: Classifier | Predictor, settings: ClassifySettings | None = None,
             **changes: Any) -> ClassMap:
    """Run :func:`iter_classify` to the end and return its ClassMap."""
    gen = iter_classify(slide, model, settings, **changes)
    while True:
        try:
            next(gen)
        except StopIteration as stop:
            return stop.value
