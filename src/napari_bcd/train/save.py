"""The model a training run ships, and the card that says how it was made and validated.

:func:`final_model` turns the choice of :mod:`.select` into the head that is
saved: after cross-validation, the probe (and the chosen head's steps) fitted
on every image; after a hold-out, the one trained without the held-out
images.  Its probabilities are tempered on the held-out images (one scalar,
:func:`~.probe.fit_temperature`), so "p = 0.9" means on new patients about
what it says.  :func:`save_result` writes the checkpoint with a card whose
training record states the validation in words a pathologist reads.
"""

from __future__ import annotations

import dataclasses
import logging
import math
from collections.abc import Generator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from .._progress import STOP
from ..errors import BcdError, DatasetError
from .evaluate import report_from_predictions
from .features import fold_standardisation
from .headfit import Recipe, fit_head
from .probe import PROBE_WORDS, ProbeResult, fit_probe_head, fit_temperature

if TYPE_CHECKING:
    from .iciar import Dataset
    from .protocol import Protocol
    from .result import TrainResult
    from .select import Selection, Validation

__all__ = ["Shipped", "final_model", "save_result"]

log = logging.getLogger(__name__)


@dataclass
class Shipped:
    """The head to save (on standardised features when ``norm`` is set) and how it came to be."""

    head: Any
    norm: tuple[Any, Any] | None
    kind: str  # "probe" or "head"
    steps: int = 0
    recipe: Recipe | None = None
    temperature: float = 1.0
    stopped: str = "completed"
    notes: list[str] = field(default_factory=list)
    #: The probe fitted on the shipped model's training images (what the model IS when ``kind == "probe"``).
    probe_head: Any = None


def final_model(model, bank, dataset: Dataset, validation: Validation, sel: Selection | None, proto: Protocol,
                recipes: list[Recipe], make_head, *, seed: int, every: int,
                dtype: Any) -> Generator[Any, Any, Shipped]:
    """The head to ship (see the module's text); yields :class:`~.headfit.FitProgress` of a final fit."""
    from .select import _fold_bank

    labels = np.asarray(dataset.labels, np.int64)
    n_cls = len(dataset.classes)
    notes: list[str] = []
    stopped = "stopped by the user" if sel is not None and sel.stopped else "completed"
    if validation.mode == "holdout" and sel is not None:
        head = make_head()
        if sel.chosen.is_probe:
            sel.probe_head.fold_into(head)
        else:
            head.load_state_dict(sel.states[sel.key])
        shipped = Shipped(head, (sel.bank.mean, sel.bank.std) if proto.standardise else None,
                          "probe" if sel.chosen.is_probe else "head", sel.chosen.step, sel.chosen.recipe,
                          stopped=stopped, notes=notes, probe_head=sel.probe_head)
    else:
        everything = np.arange(len(dataset))
        fb = _fold_bank(bank, labels, everything, dtype, proto.standardise)
        head = make_head()
        recipe = None
        probe = None
        if proto.probe_init:
            probe, _ = fit_probe_head(fb.z, everything, labels, n_cls, seed=seed)
            probe.fold_into(head)
            if sel is not None and not sel.chosen.is_probe:
                recipe = dataclasses.replace(sel.chosen.recipe, steps=sel.chosen.step)
            elif sel is None:
                notes.append(f"Nothing could be held out to validate on, so the model is {PROBE_WORDS}: no "
                             "measurement shows that training the head further would do better.")
        else:
            recipe = sel.chosen.recipe if sel is not None and not sel.chosen.is_probe else recipes[0]
            if sel is not None:
                recipe = dataclasses.replace(recipe, steps=sel.chosen.step)
        kind, steps = ("probe", 0) if recipe is None else ("head", recipe.steps)
        if recipe is not None and not (sel is not None and sel.stopped):
            start = {k: v.detach().clone() for k, v in head.state_dict().items()}
            gen = fit_head(head, fb, everything, recipe, seed=seed, eval_every=every)
            fit = yield from _relay(gen)
            if fit.stopped and proto.probe_init:
                head.load_state_dict(start)  # a head trained part of the way was never validated: the probe
                kind, steps, stopped = "probe", 0, "stopped by the user"
                notes.append(f"Stopped while training on all images: the model is {PROBE_WORDS}, as validated.")
            elif fit.stopped:
                stopped = "stopped by the user"
                steps = max((c.step for c in fit.curve), default=0)
        elif recipe is not None:
            kind, steps = "probe", 0
            if proto.probe_init:
                notes.append(f"Stopped while choosing: the model is {PROBE_WORDS}, measured as far as it got.")
        shipped = Shipped(head, (fb.mean, fb.std) if proto.standardise else None, kind, steps, recipe,
                          stopped=stopped, notes=notes, probe_head=probe)
    if proto.probe_init and sel is not None and sel.held_out is not None and sel.held_out.any():
        shipped.temperature = fit_temperature(sel.logits[sel.held_out], labels[sel.held_out])
        _temper(shipped.head, shipped.temperature)
        if shipped.probe_head is not None and shipped.kind == "probe":
            shipped.probe_head.temperature = shipped.temperature
    return shipped


def _relay(gen):
    """Run a sub-generator, passing a STOP request on to it; returns its result."""
    try:
        item = next(gen)
        while True:
            request = yield item
            item = gen.send(STOP if request == STOP else None)
    except StopIteration as stop:
        return stop.value


def _temper(head, temperature: float) -> None:
    """Divide the head's logits by ``temperature`` (exactly: its last layer's weights and bias)."""
    import torch

    if not math.isfinite(temperature) or temperature <= 0 or temperature == 1.0:
        return
    with torch.no_grad():
        head.out.weight /= temperature
        head.out.bias /= temperature


def _reports(dataset: Dataset, sel: Selection | None):
    """``(report, probe ProbeResult, chance)`` from the held-out predictions (None without validation)."""
    if sel is None or sel.held_out is None or not sel.held_out.any():
        return None, None, None
    held = np.flatnonzero(sel.held_out)
    y = dataset.labels[held].tolist()
    report = report_from_predictions(y, sel.predictions[held].tolist(), dataset.classes)
    probe_report = report_from_predictions(y, sel.probe_predictions[held].tolist(), dataset.classes)
    chance = float(np.bincount(y).max() / len(y))
    probe = ProbeResult(probe_report, math.nan, 0.0)
    return report, probe, chance


def save_result(model, dataset: Dataset, out: Path, proto: Protocol, validation: Validation, sel: Selection | None,
                shipped: Shipped, build: dict, *, name, seed: int, views: int, stain_augment: bool,
                feature_precision: str = "fp32") -> TrainResult:
    """Write the shipped model with a card that says how it was made and validated."""
    from ..model.checkpoint import checkpoint_paths, save_checkpoint
    from ..model.record import TrainingRecord
    from .result import TrainResult

    state = {f"head.{k}": v.detach().cpu().float() for k, v in shipped.head.state_dict().items()}
    if shipped.norm is not None:
        state = fold_standardisation(state, shipped.norm)
    model.cpu()
    model.load_state_dict({**model.state_dict(), **state})
    report, probe, chance = _reports(dataset, sel)
    _check_finite(model)
    val_files = ([dataset.paths[i].name for i in validation.split.val]
                 if validation.mode == "holdout" and validation.split is not None else [])
    selection = _selection_record(sel, shipped, proto)
    hyper = {
        "optimizer": "Adam",
        "lr": proto.lr,
        "batch_size": proto.batch_size,
        "epochs": proto.epochs,
        "steps_run": shipped.steps,
        "recipe": shipped.recipe.to_dict() if shipped.recipe is not None else None,
        "sampling": "class-balanced (with replacement)" if proto.balanced else "shuffled",
        "augment": "8 dihedral (flips/rotations)" if proto.augment else "none",
        "stain_augment": ("HED jitter: each stain x U(0.8, 1.2) + U(-0.01, 0.01), one copy of every view"
                          if stain_augment else "none"),
        "head_start": "the linear probe (LP-FT)" if proto.probe_init else "random (PyTorch default)",
        "feature_standardisation": ("per-channel mean/std of the training features, folded into the head's first "
                                    "1x1 conv" if proto.standardise else "none"),
        "temperature": shipped.temperature,
        "val_fraction": proto.val_fraction,
        "seed": seed,
        "loss": "cross-entropy",
        "feature_precision": feature_precision,
    }
    training = TrainingRecord(
        protocol={"name": proto.name, "description": proto.describe(), "settings": proto.to_dict()},
        data={"root": str(dataset.root), "counts": dataset.counts(), "images": len(dataset), "views": views,
              "groups": ({"kind": dataset.group_kind, "source": dataset.group_source, "count": dataset.n_groups}
                         if dataset.groups is not None else None)},
        split={**validation.to_dict(), "val_files": val_files,
               "train": len(validation.split.train) if validation.split is not None else len(dataset),
               "val": len(validation.split.val) if validation.split is not None else int(
                   sel.held_out.sum()) if sel is not None and sel.held_out is not None else 0},
        hyperparameters=hyper,
        best_epoch=shipped.steps,
        stopped=shipped.stopped,
        curves=selection.pop("curve"),
        validation=report is not None,
        validation_report=report.to_dict() if report is not None else None,
        probe=probe.to_dict() if probe is not None else None,
        chance_accuracy=chance,
        beats_chance=bool(report is not None and chance is not None and report.accuracy > chance + 1e-9),
        backbone_weights_source=str(build["backbone_weights"]),
        preprocessing_source=getattr(model, "preprocessing_source", ""),
        extra={"selection": selection},
    ).to_dict()
    metrics: dict[str, Any] = {}
    if report is not None:
        metrics = {"accuracy": report.accuracy, "macro_f1": report.macro["f1"], "weighted_f1": report.weighted["f1"],
                   "validation": validation.kind, "optimistic": validation.optimistic}
        if probe is not None and probe.report is not None:
            metrics["probe_accuracy"] = probe.report.accuracy
        if len(selection.get("fold_accuracy") or []) > 1:
            folds = selection["fold_accuracy"]
            metrics["fold_accuracy_mean"] = float(np.mean(folds))
            metrics["fold_accuracy_sd"] = float(np.std(folds, ddof=1))
    card = model.card.replace(name=name or out.stem, training=training, metrics=metrics,
                              stain=_training_stain(dataset, _train_rows(validation, len(dataset)),
                                                    model.card.input_px))
    save_checkpoint(model, card, out)
    return TrainResult(checkpoint_paths(out)[0], model.card, report, probe, chance, validation, shipped.kind,
                       shipped.steps, list(selection.get("fold_accuracy") or []),
                       len(sel.candidates) if sel is not None else 0, shipped.stopped,
                       [*validation.notes, *shipped.notes], shipped.probe_head, shipped.norm)


def _train_rows(validation: Validation, n: int) -> list[int]:
    if validation.mode == "holdout" and validation.split is not None:
        return list(validation.split.train)
    return list(range(n))


def _selection_record(sel: Selection | None, shipped: Shipped, proto: Protocol) -> dict:
    """The candidates as measured (for the card and the Train dock's curves), and the choice."""
    if sel is None:
        return {"shipped": shipped.kind, "candidates": [], "fold_accuracy": [], "curve": []}
    curve = []
    for c in sel.candidates:
        curve.append({"recipe": c.recipe.describe() if c.recipe else "probe",
                      "anchor": c.recipe.anchor if c.recipe else None, "steps": c.step,
                      "val_acc": c.accuracy, "val_loss": c.loss, "standard_error": c.standard_error})
    rule = ("the lowest held-out loss (the paper's best epoch)" if proto.criterion == "loss"
            else "the simplest within one standard error of the best held-out accuracy")
    return {"shipped": shipped.kind, "chosen": sel.chosen.describe(), "rule": rule,
            "probe_accuracy": sel.probe.accuracy, "chosen_accuracy": sel.chosen.accuracy,
            "fold_accuracy": list(sel.fold_accuracy), "candidates": len(sel.candidates),
            "temperature": shipped.temperature, "curve": curve}


def _check_finite(model) -> None:
    """A head that holds NaN or Inf is never saved as a model."""
    import torch

    for k, v in model.head.state_dict().items():
        if not torch.isfinite(v).all():
            raise DatasetError(f"Training produced non-finite weights ({k}); nothing was saved. Lower the learning "
                               "rate, or check the backbone's features for NaN.")


def _training_stain(dataset: Dataset, train_idx: list[int], input_px) -> dict:
    """Stain statistics of up to 32 training images as the model sees them (the reference slides meet)."""
    from ..stain import stain_stats
    from ..windows import resize_area

    if not train_idx:
        return {}
    pick = [train_idx[int(k)] for k in np.linspace(0, len(train_idx) - 1, min(32, len(train_idx))).round()]
    try:
        images = [resize_area(dataset.load(i), tuple(input_px)) for i in pick]
        return {**stain_stats(images).to_dict(), "vahadane": stain_stats(images, method="vahadane").to_dict("vahadane")}
    except (DatasetError, BcdError) as err:
        log.info("no stain statistics for the card: %s", err)
        return {}
