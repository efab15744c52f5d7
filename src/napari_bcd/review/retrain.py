"""Retrain from corrections: learn the pathologist's fixes, re-predict where they matter.

The backbone stays frozen, so every window's backbone features are computed
once: the corrected cells' windows (in their eight flips and rotations), the
windows of the affected region (which serve twice: as "keep what you did not
correct" anchors and to re-predict the region without a second pass), and
the model's own training images (from the feature cache when it was trained
here and the images are still where its card says).

The head starts from the parent model's head and is trained on three pools,
sampled in proportion to their weights:

* the corrected windows, one-hot on their new class, each cell counting as
  ``weight`` training images;
* anchors: the region's other windows and up to ``anchors`` classified
  windows spread over the slide, each pulled towards
  the parent's own probabilities (soft targets), so cells nobody corrected
  keep their class (on a slide with more windows, up to a quarter as many
  others are never trained on: they measure how much of the slide outside
  the corrections the new model changes, and a large change is said before
  the new model is used);
* the original training images, one-hot on their labels (when available).

Features are standardised per channel during training and folded back into
the head's first 1x1 convolution when saved, so the new checkpoint is a plain
Table II model.  It records its parent, the corrections and the metrics
before and after; nothing is overwritten (``<parent>-r1``, ``-r2``...).
"""

from __future__ import annotations

import copy
import logging
import math
import os
import time
from collections.abc import Generator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from ..errors import BcdError
from .corrections import Corrections
from .retrain_settings import (
    DRIFT_WARNING,
    RetrainJob,
    RetrainPlan,
    RetrainProgress,
    RetrainResult,
    RetrainSettings,
)

if TYPE_CHECKING:
    from ..engine import ClassMap
    from ..io.slide import Slide
    from ..settings import ClassifySettings

__all__ = ["DRIFT_WARNING", "RetrainJob", "RetrainPlan", "RetrainProgress", "RetrainResult", "RetrainSettings",
           "iter_retrain", "map_settings", "next_model_path"]

log = logging.getLogger(__name__)

def next_model_path(parent: str | os.PathLike[str]) -> Path:
    """``<parent>-r1.safetensors`` beside the parent, or the first ``-rN`` that does not exist."""
    from ..model.card import checkpoint_paths

    weights, _ = checkpoint_paths(parent)
    stem = weights.name[: -len(".safetensors")]
    base = stem.rsplit("-r", 1)[0] if "-r" in stem and stem.rsplit("-r", 1)[1].isdigit() else stem
    k = 1
    while True:
        cand = weights.with_name(f"{base}-r{k}.safetensors")
        if not cand.exists() and not cand.with_suffix(".json").exists():
            return cand
        k += 1


def iter_retrain(
    checkpoint: str | os.PathLike[str],
    corrections: Corrections,
    slide: Slide,
    *,
    class_map: ClassMap | None = None,
    classify: ClassifySettings | None = None,
    out: str | os.PathLike[str] | None = None,
    settings: RetrainSettings | None = None,
    **changes: Any,
) -> Generator[RetrainPlan | RetrainProgress, Any, RetrainResult]:
    """Retrain a model's head from corrected cells; yields progress, returns a :class:`RetrainResult`.

    Parameters
    ----------
    checkpoint
        The model that made the class map (the parent).
    corrections
        From :func:`~.corrections.corrections_from_labels` or
        :func:`~.corrections.read_corrections`, on the same grid.
    slide
        The slide the corrections are on (:func:`~napari_bcd.open_slide`).
    class_map
        The map the corrections were made on: its grid and run settings are the retrain's, and its affected
        region is re-predicted in place.
    classify
        The run settings of the map, where the map itself is not at hand (the CLI reads them from the map's
        summary); one that contradicts ``class_map``'s is refused, naming the map's value.
    out
        The new checkpoint (default ``<parent>-rN.safetensors``); never replaces a file.
    settings, changes
        How to learn (:class:`~.retrain_settings.RetrainSettings`), with single changes (``steps=150``).

    Raises
    ------
    BcdError
        Before any work: no corrections, bad settings, an existing ``out``, settings that contradict the map, a
        grid that does not match.
    """
    from ..model.card import checkpoint_paths, is_wsinfer_folder, read_card
    from ..model.checkpoint import check_checkpoint_target
    from ..settings import ClassifySettings
    from ..tiling import grid_for

    learn = (settings or RetrainSettings()).replace(**changes) if changes else (settings or RetrainSettings())
    if not len(corrections):
        raise BcdError("There are no corrected cells: repaint cells of the classes layer with another class "
                       "(or draw classified shapes) first.")
    if is_wsinfer_folder(checkpoint):  # TorchScript: run here, never retrained
        from ..model.wsinfer import refuse_fine_tuning

        refuse_fine_tuning(read_card(checkpoint), "retrain")
    parent = checkpoint_paths(checkpoint)[0]
    card = read_card(parent)
    unknown = sorted({c.new for c in corrections.cells} - set(card.classes))
    if unknown:
        raise BcdError(f"Corrections name classes the model does not have: {', '.join(unknown)}.")
    out_path = Path(out) if out is not None else next_model_path(parent)
    out_path = check_checkpoint_target(out_path, overwrite=None)  # a retrain never replaces a checkpoint
    run = map_settings(class_map, classify) or ClassifySettings()
    grid = class_map.grid if class_map is not None else grid_for(slide, card, run)
    if corrections.grid:
        want = [round(v, 3) for v in corrections.grid.get("stride_px", grid.stride_px)]
        if want != [round(v, 3) for v in grid.stride_px]:
            raise BcdError("The corrections were made on a class map with another cell size; correct the map "
                           "this run made, or classify again with the same overlap.")
    bad = [c for c in corrections.cells if not (0 <= c.row < grid.n_cells[0] and 0 <= c.col < grid.n_cells[1])]
    if bad:
        raise BcdError(f"{len(bad)} corrected cell(s) lie outside this slide's grid: are they from another slide?")
    return _retrain(RetrainJob(parent, card, corrections, slide, class_map, grid, out_path, learn, run))


def map_settings(class_map: ClassMap | None, given: ClassifySettings | None) -> ClassifySettings | None:
    """The run settings of the map being corrected: the map's own, else those given; a given setting that
    contradicts the map's is refused with the map's value named."""
    own = class_map.settings if class_map is not None else None
    if own is None or given is None:
        return own or given
    diff = given.differences(own)
    if diff:
        raise BcdError("The settings given contradict the map's run (" + "; ".join(diff) + "): retrain uses the "
                       "map's own settings; leave those options out.")
    return own


def _retrain(job: RetrainJob) -> Generator[RetrainPlan | RetrainProgress, Any, RetrainResult | None]:
    import torch

    from ..model.checkpoint import load_checkpoint
    from ..model.inference import choose_device
    from ..train.features import fold_standardisation
    from . import retrain_data as data
    from . import retrain_fit as fit

    t_start = time.perf_counter()
    learn = job.learn
    rng = np.random.default_rng(learn.seed)
    notes = list(job.corrections.notes)
    kh, kw = job.grid.cells_per_window
    chosen = data.choose_windows(job.grid, job.corrections, job.slide, job.class_map, learn.margin, learn.anchors,
                                 job.run.min_tissue, rng)
    dataset, train_idx, val_idx = data.original_images(job.card, learn.data, notes)
    yield RetrainPlan(len(job.corrections), job.corrections.counts(), int(chosen.region.sum()), len(chosen.wins),
                      len(train_idx) + len(val_idx), learn.steps, job.out, tuple(notes))
    dev = choose_device(learn.device)
    model = load_checkpoint(job.parent)
    model.to(dev).eval()
    feats = yield from data.compute_features(model, dev, job.slide, job.grid, job.corrections, chosen.wins, learn.views,
                                             dataset, train_idx, val_idx, learn.feature_batch,
                                             lambda d, t: RetrainProgress("features", d, t))
    if feats is None:
        return None  # stopped before training: nothing is saved
    head = model.head
    parent_head = copy.deepcopy(head).eval()
    with torch.inference_mode():
        parent_p = torch.softmax(fit.head_batches(parent_head, feats.windows, dev), 1).cpu()
    pools = data.pools(parent_p, feats, job.corrections, chosen, job.grid, job.card.classes, learn.weight, learn.views,
                       train_idx)
    cells = [(c.row, c.col) for c in job.corrections.cells]
    corrected_before = fit.cells_agree(chosen.wins, parent_p.numpy(), cells, pools.new_idx.numpy(), kh, kw)
    for p in model.backbone.parameters():
        p.requires_grad_(False)
    stopped, step, norm = yield from fit.train_head(
        head, pools, feats, chosen, job.corrections, job.grid, learn.steps, learn.lr, learn.batch_size, dev, rng,
        lambda s, n, loss, agree: RetrainProgress("training", s, n, loss, agree))
    # fold the standardisation back: a plain Table II head on raw features
    state = {k: v.detach().clone() for k, v in model.state_dict().items() if k.startswith("head.")}
    model.load_state_dict({**model.state_dict(), **fold_standardisation(state, norm)})
    with torch.inference_mode():
        new_p = torch.softmax(fit.head_batches(head, feats.windows, dev), 1).cpu()
    measured = _measure(job, chosen, feats, pools, parent_head, head, parent_p, new_p, train_idx, val_idx, dev,
                        corrected_before, cells)
    new_map = yield from _repredict(job, chosen, model, dev, new_p)
    changed = 0
    if new_map is not None and job.class_map is not None and new_map.labels.shape == job.class_map.labels.shape:
        changed = int((new_map.labels != job.class_map.labels).sum())
        if job.learn.whole_slide:  # the change outside the corrections, exactly: every cell was classified again
            measured["outside_changed"], measured["outside_checked"] = _outside_change(job, chosen, new_map)
    saved = _save(job, model, dev, measured, stopped, step, notes, len(train_idx) + len(val_idx))
    if new_map is not None:
        from ..engine import ModelRef

        new_map.model = ModelRef.of(model)
        new_map.retrained_from = str(job.parent)
    yield RetrainProgress("predicting", 1, 1)
    return RetrainResult(saved, job.parent, model.card, new_map, changed, measured["corrected_before"],
                         measured["corrected_after"], measured["anchors_kept"], measured["validation_before"],
                         measured["validation_after"], time.perf_counter() - t_start, stopped, notes,
                         measured["outside_changed"], measured["outside_checked"])


def _measure(job: RetrainJob, chosen, feats, pools, parent_head, head, parent_p, new_p, train_idx, val_idx, dev,
             corrected_before: float, cells) -> dict:
    """The figures of a retrain: corrections learnt, anchors kept, the change outside, validation before/after."""
    from . import retrain_fit as fit

    kh, kw = job.grid.cells_per_window
    anchor_mask = (pools.share == 0) & ~chosen.held
    kept = (new_p.argmax(1) == parent_p.argmax(1)).numpy()
    val_before, val_after = fit.validation(parent_head, head, feats, val_idx, job.card.classes, dev)
    outside, checked = fit.drift(parent_p.numpy(), new_p.numpy(), chosen)
    return {"corrected_before": corrected_before,
            "corrected_after": fit.cells_agree(chosen.wins, new_p.numpy(), cells, pools.new_idx.numpy(), kh, kw),
            "anchors_kept": float(kept[anchor_mask].mean()) if anchor_mask.any() else math.nan,
            "anchors": int(anchor_mask.sum()), "validation_before": val_before, "validation_after": val_after,
            "outside_changed": outside, "outside_checked": checked}


def _outside_change(job: RetrainJob, chosen, new_map) -> tuple[float, int]:
    """Share of the classified cells outside the corrected region whose label the new model changes."""
    from .retrain_fit import decided

    r0, r1, c0, c1 = chosen.box
    outside = (job.class_map.labels > 0) & decided(job.class_map.probs)  # a tie has no class to keep
    outside[r0:r1, c0:c1] = False
    n = int(outside.sum())
    return (float((new_map.labels[outside] != job.class_map.labels[outside]).mean()) if n else math.nan), n


def _save(job: RetrainJob, model, dev, measured: dict, stopped: str, step: int, notes: list[str],
          original_images: int) -> Path:
    """The new checkpoint, never over an existing file; its card records the parent, corrections and figures."""
    from ..model.checkpoint import save_checkpoint

    c = job.corrections
    record = {
        "parent": {"path": str(job.parent), "name": job.card.name, "weights_sha256": job.card.weights_sha256},
        "slide": c.slide or job.slide.name, "created": c.created, "corrections": [x.to_dict() for x in c.cells],
        "erased_cells": c.erased, **{k: v for k, v in job.learn.to_dict().items()
                                     if k in ("weight", "steps", "lr", "views", "batch_size")},
        "steps_run": step, "original_images": original_images,
        "stopped": stopped, "notes": notes,
        **{k: measured[k] for k in ("anchors", "corrected_before", "corrected_after", "anchors_kept",
                                    "validation_before", "validation_after", "outside_changed", "outside_checked")},
    }
    metrics = dict(job.card.metrics)
    if isinstance(metrics.get("calibration"), dict):  # the parent's figures, not measured again: said so
        metrics["calibration"] = {**metrics["calibration"], "measured_on": "the parent model, before this retrain"}
    if measured["validation_after"]:
        metrics.update(accuracy=measured["validation_after"]["accuracy"],
                       macro_f1=measured["validation_after"]["macro_f1"])
    new_card = job.card.replace(name=job.out.name[: -len(".safetensors")],
                                training=job.card.record.with_retrain(record).to_dict(), metrics=metrics)
    model.cpu()
    saved = save_checkpoint(model, new_card, job.out, overwrite=False)
    model.to(dev)
    return saved


def _repredict(job: RetrainJob, chosen, model, dev, new_p):
    """Re-predict: the region from the features already computed, or the whole slide."""
    from ..decision import DecisionRule
    from . import retrain_fit as fit

    cm = job.class_map
    rule = cm.rule if cm is not None else DecisionRule.from_dict(job.card.decision)
    new_map = None
    if job.learn.whole_slide:
        from ..engine import iter_classify

        # exactly the run that made the map (tissue, overlap, refine, stain, precision...), with the new model; the
        # map's rule where one was applied to it since
        effective = job.run.decision if job.run.decision is not None else DecisionRule.from_dict(job.card.decision)
        changes = {} if rule == effective else {"decision": rule}
        gen = iter_classify(job.slide, model, job.run.replace(device=str(dev), **changes))
        try:
            while True:
                p = next(gen)
                if p.stage == "classify":
                    yield RetrainProgress("predicting", p.done, p.total)
        except StopIteration as stop:
            new_map = stop.value
    elif cm is not None:
        new_map = fit.repredict_region(cm, job.grid, chosen, new_p.numpy(), rule)
    return new_map
