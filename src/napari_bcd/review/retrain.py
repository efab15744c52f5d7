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
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from ..errors import BcdError
from ..settings import MIN_TISSUE
from .corrections import Corrections

if TYPE_CHECKING:
    from ..engine import ClassMap
    from ..io.slide import Slide

__all__ = ["DRIFT_WARNING", "RetrainJob", "RetrainPlan", "RetrainProgress", "RetrainResult", "iter_retrain",
           "next_model_path"]

log = logging.getLogger(__name__)

#: A new model that changes more than this share of the slide outside the corrections is flagged.
DRIFT_WARNING = 0.05


@dataclass(frozen=True)
class RetrainPlan:
    corrections: int
    by_class: dict[str, int]
    region_windows: int
    anchor_windows: int
    original_images: int
    steps: int
    out: Path
    notes: tuple[str, ...] = ()

    @property
    def message(self) -> str:
        by = ", ".join(f"{n} to {k}" for k, n in sorted(self.by_class.items()))
        orig = (f"{self.original_images} original training images" if self.original_images
                else "no original training images")
        lines = [f"{self.corrections} corrected cell(s) ({by}); {self.region_windows} windows to re-predict, "
                 f"{self.anchor_windows} anchor windows, {orig}; {self.steps} steps -> {self.out.name}"]
        return "\n".join(lines + [f"note: {n}" for n in self.notes])


@dataclass(frozen=True)
class RetrainProgress:
    """``stage``: ``"features"``, ``"training"`` or ``"predicting"``."""

    stage: str
    done: int
    total: int
    loss: float = math.nan
    corrected_agree: float = math.nan

    @property
    def fraction(self) -> float:
        return self.done / self.total if self.total else 1.0

    @property
    def desc(self) -> str:
        return self.stage

    def __str__(self) -> str:
        extra = (f", loss {self.loss:.3f}, corrections learnt {self.corrected_agree:.0%}"
                 if self.stage == "training" and not math.isnan(self.loss) else "")
        return f"{self.stage}: {self.done}/{self.total}{extra}"


@dataclass
class RetrainResult:
    """What a retrain produced.

    Attributes
    ----------
    checkpoint, parent
        The new model and the one it was retrained from.
    class_map
        The re-predicted class map (the affected region replaced, or the whole
        slide), or None when no class map was given and no whole-slide
        prediction was asked for.
    changed_cells
        Cells whose label differs from the class map given.
    corrected_before, corrected_after
        Share of the corrected windows the model puts in their new class.
    anchors_kept
        Share of the anchor windows trained on that keep the parent's class.
    outside_changed, outside_checked
        Share of the held-out anchor windows (spread over the slide outside the
        corrections, never trained on) whose class changes, and how many.
    validation_before, validation_after
        Accuracy / macro F1 on the parent's validation images (None without them).
    """

    checkpoint: Path
    parent: Path
    card: Any
    class_map: Any = None
    changed_cells: int = 0
    corrected_before: float = math.nan
    corrected_after: float = math.nan
    anchors_kept: float = math.nan
    validation_before: dict | None = None
    validation_after: dict | None = None
    seconds: float = 0.0
    stopped: str = "completed"
    notes: list[str] = field(default_factory=list)
    outside_changed: float = math.nan
    outside_checked: int = 0

    @property
    def warning(self) -> str:
        """Said before the new model is used when it changes much of the slide outside the corrections."""
        if not math.isfinite(self.outside_changed) or self.outside_changed <= DRIFT_WARNING:
            return ""
        return (f"The new model changes the class of about {self.outside_changed:.0%} of the slide outside your "
                f"corrections (measured on {self.outside_checked} windows it was not trained on): look at the whole "
                "map before you use it, or Undo.")

    def describe(self) -> str:
        text = (f"Saved {self.checkpoint.name} (from {self.parent.name}): corrections learnt "
                f"{self.corrected_before:.0%} -> {self.corrected_after:.0%}, anchors kept {self.anchors_kept:.0%}")
        if math.isfinite(self.outside_changed):
            text += (f"; {self.outside_changed:.1%} of the slide outside the corrections changes class (on "
                     f"{self.outside_checked} windows not trained on)")
        if self.validation_before and self.validation_after:
            text += (f"; validation accuracy {self.validation_before['accuracy']:.3f} -> "
                     f"{self.validation_after['accuracy']:.3f}")
        if self.class_map is not None:
            text += f"; {self.changed_cells} cell(s) changed on the map"
        return text + f" ({self.seconds:.1f} s)."


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


@dataclass(frozen=True)
class RetrainJob:
    """Everything one retrain needs, checked (:func:`iter_retrain`)."""

    parent: Path
    card: Any
    corrections: Corrections
    slide: Any
    class_map: Any
    grid: Any
    out: Path
    weight: float = 4.0
    whole_slide: bool = False
    margin: int = 1
    anchors: int = 256
    steps: int = 300
    lr: float = 3e-4
    batch_size: int = 64
    views: int = 8
    data: Any = "card"
    device: str | None = None
    min_tissue: float = MIN_TISSUE
    seed: int = 0
    feature_batch: int = 8


def iter_retrain(
    checkpoint: str | os.PathLike[str],
    corrections: Corrections,
    slide: Slide,
    *,
    class_map: ClassMap | None = None,
    out: str | os.PathLike[str] | None = None,
    weight: float = 4.0,
    whole_slide: bool = False,
    margin: int = 1,
    anchors: int = 256,
    steps: int = 300,
    lr: float = 3e-4,
    batch_size: int = 64,
    views: int = 8,
    data: str | os.PathLike[str] | None = "card",
    device: str | None = None,
    mpp: float | tuple[float, float] | None = None,
    stride: float = 1.0,
    min_tissue: float = MIN_TISSUE,
    seed: int = 0,
    feature_batch: int = 8,
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
        The map the corrections were made on; its affected region is
        re-predicted in place.  Without it (the CLI), the grid comes from the
        slide, the card and ``stride``.
    out
        The new checkpoint (default ``<parent>-rN.safetensors``); never replaces a file.
    weight
        How many training images each corrected cell counts as.
    whole_slide
        Re-predict the whole slide with the new model instead of the region.
    margin
        The region re-predicted (and anchored): the corrections' bounding box
        grown by this many windows.
    anchors
        Classified windows spread over the rest of the slide kept to the parent's probabilities (up to a
        quarter as many others, where the slide has them, measure the change).
    data
        The original training images: ``"card"`` (where the card says),
        a folder, or None.

    Raises
    ------
    BcdError
        Before any work: no corrections, an existing ``out``, a grid that does not match.
    """
    from ..model.card import checkpoint_paths, read_card
    from ..model.checkpoint import check_checkpoint_target

    if not len(corrections):
        raise BcdError("There are no corrected cells: repaint cells of the classes layer with another class "
                       "(or draw classified shapes) first.")
    if weight <= 0 or steps < 1 or lr <= 0 or batch_size < 1 or views not in (1, 2, 4, 8):
        raise BcdError("weight and lr must be positive, steps and batch size at least 1, views 1, 2, 4 or 8.")
    parent = checkpoint_paths(checkpoint)[0]
    card = read_card(parent)
    unknown = sorted({c.new for c in corrections.cells} - set(card.classes))
    if unknown:
        raise BcdError(f"Corrections name classes the model does not have: {', '.join(unknown)}.")
    out_path = Path(out) if out is not None else next_model_path(parent)
    out_path = check_checkpoint_target(out_path, overwrite=None)  # a retrain never replaces a checkpoint
    if class_map is not None:
        grid = class_map.grid
    else:
        from ..settings import ClassifySettings
        from ..tiling import grid_for

        grid = grid_for(slide, card, ClassifySettings(stride=stride, mpp=mpp))
    if corrections.grid:
        want = [round(v, 3) for v in corrections.grid.get("stride_px", grid.stride_px)]
        if want != [round(v, 3) for v in grid.stride_px]:
            raise BcdError("The corrections were made on a class map with another cell size; correct the map "
                           "this run made, or classify again with the same overlap.")
    bad = [c for c in corrections.cells if not (0 <= c.row < grid.n_cells[0] and 0 <= c.col < grid.n_cells[1])]
    if bad:
        raise BcdError(f"{len(bad)} corrected cell(s) lie outside this slide's grid: are they from another slide?")
    job = RetrainJob(parent, card, corrections, slide, class_map, grid, out_path, float(weight), whole_slide,
                     int(margin), int(anchors), int(steps), float(lr), int(batch_size), int(views), data, device,
                     float(min_tissue), int(seed), int(feature_batch))
    return _retrain(job)


def _retrain(job: RetrainJob) -> Generator[RetrainPlan | RetrainProgress, Any, RetrainResult | None]:
    import torch

    from ..model.checkpoint import load_checkpoint
    from ..model.inference import choose_device
    from ..train.features import fold_standardisation
    from . import retrain_data as data
    from . import retrain_fit as fit

    t_start = time.perf_counter()
    rng = np.random.default_rng(job.seed)
    notes = list(job.corrections.notes)
    kh, kw = job.grid.cells_per_window
    chosen = data.choose_windows(job.grid, job.corrections, job.slide, job.class_map, job.margin, job.anchors,
                                 job.min_tissue, rng)
    dataset, train_idx, val_idx = data.original_images(job.card, job.data, notes)
    yield RetrainPlan(len(job.corrections), job.corrections.counts(), int(chosen.region.sum()), len(chosen.wins),
                      len(train_idx) + len(val_idx), job.steps, job.out, tuple(notes))
    dev = choose_device(job.device)
    model = load_checkpoint(job.parent)
    model.to(dev).eval()
    feats = yield from data.compute_features(model, dev, job.slide, job.grid, job.corrections, chosen.wins, job.views,
                                             dataset, train_idx, val_idx, job.feature_batch,
                                             lambda d, t: RetrainProgress("features", d, t))
    if feats is None:
        return None  # stopped before training: nothing is saved
    head = model.head
    parent_head = copy.deepcopy(head).eval()
    with torch.inference_mode():
        parent_p = torch.softmax(fit.head_batches(parent_head, feats.windows, dev), 1).cpu()
    pools = data.pools(parent_p, feats, job.corrections, chosen, job.grid, job.card.classes, job.weight, job.views,
                       train_idx)
    cells = [(c.row, c.col) for c in job.corrections.cells]
    corrected_before = fit.cells_agree(chosen.wins, parent_p.numpy(), cells, pools.new_idx.numpy(), kh, kw)
    for p in model.backbone.parameters():
        p.requires_grad_(False)
    stopped, step, norm = yield from fit.train_head(
        head, pools, feats, chosen, job.corrections, job.grid, job.steps, job.lr, job.batch_size, dev, rng,
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
        if job.whole_slide:  # the change outside the corrections, exactly: every cell was classified again
            measured["outside_changed"], measured["outside_checked"] = _outside_change(job, chosen, new_map)
    saved = _save(job, model, dev, measured, stopped, step, notes, len(train_idx) + len(val_idx))
    if new_map is not None:
        new_map.model_name = saved.name[: -len(".safetensors")]
        new_map.info = {**new_map.info, "model_path": str(saved), "retrained_from": str(job.parent)}
        new_map.model_path = str(saved)
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
        "erased_cells": c.erased, "weight": job.weight, "steps": job.steps, "steps_run": step, "lr": job.lr,
        "views": job.views, "batch_size": job.batch_size, "original_images": original_images,
        "stopped": stopped, "notes": notes,
        **{k: measured[k] for k in ("anchors", "corrected_before", "corrected_after", "anchors_kept",
                                    "validation_before", "validation_after", "outside_changed", "outside_checked")},
    }
    metrics = dict(job.card.metrics)
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
    if job.whole_slide:
        from ..engine import iter_classify
        from ..settings import ClassifySettings

        settings = ClassifySettings(stride_um=job.grid.cell_um, device=str(dev), mpp=job.grid.mpp, decision=rule,
                                    min_tissue=cm.run.min_tissue if cm is not None and cm.run else job.min_tissue)
        gen = iter_classify(job.slide, model, settings)
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
