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
from .calibration import Calibration, calibration, temperature_for
from .evaluate import report_from_predictions
from .features import fold_standardisation
from .groups import image_ids
from .headfit import Recipe, fit_head
from .probe import PROBE_WORDS, ProbeResult, fit_probe_head
from .regularise import LogisticProbe, Tuning, fit_logistic, pooled_features, training_rows

if TYPE_CHECKING:
    from .iciar import Dataset
    from .protocol import Protocol
    from .result import TrainResult
    from .select import Selection, Validation

__all__ = ["Shipped", "final_model", "save_result"]

log = logging.getLogger(__name__)


@dataclass
class Shipped:
    """The head to save and how it came to be: the tuned probe (``logistic``, a linear head on raw features) or
    the Table II head (``head``, on standardised features when ``norm`` is set)."""

    head: Any
    norm: tuple[Any, Any] | None
    kind: str  # "probe" or "head"
    steps: int = 0
    recipe: Recipe | None = None
    temperature: float = 1.0
    stopped: str = "completed"
    notes: list[str] = field(default_factory=list)
    #: The probe the head started from, on standardised features (:class:`~.probe.ProbeHead`).
    probe_head: Any = None
    #: The tuned probe fitted on the shipped model's training images: what the model IS when ``kind == "probe"``.
    logistic: LogisticProbe | None = None
    #: How its regularisation was chosen.
    tuning: Tuning | None = None
    #: Calibration error before and after the temperature, and the abstain cut-off (:mod:`.calibration`).
    calibration: Calibration | None = None


def final_model(model, bank, dataset: Dataset, validation: Validation, sel: Selection | None, proto: Protocol,
                recipes: list[Recipe], make_head, *, seed: int, every: int, dtype: Any,
                grid: Any = None, stain_view: int | None = None) -> Generator[Any, Any, Shipped]:
    """The head to ship (see the module's text); yields :class:`~.headfit.FitProgress` of a final fit."""
    from .select import _fold_bank

    labels = np.asarray(dataset.labels, np.int64)
    n_cls = len(dataset.classes)
    notes: list[str] = []
    stopped = "stopped by the user" if sel is not None and sel.stopped else "completed"
    if validation.mode == "holdout" and sel is not None:
        if sel.chosen.is_probe:
            shipped = Shipped(None, None, "probe", stopped=stopped, notes=notes, logistic=sel.logistic,
                              tuning=sel.tuning)
        else:
            head = make_head()
            head.load_state_dict(sel.states[sel.key])
            shipped = Shipped(head, (sel.bank.mean, sel.bank.std) if proto.standardise else None, "head",
                              sel.chosen.step, sel.chosen.recipe, stopped=stopped, notes=notes,
                              probe_head=sel.probe_head, logistic=sel.logistic, tuning=sel.tuning)
    else:
        everything = np.arange(len(dataset))
        extra = pooled_features(bank, first=stain_view) if stain_view else None
        tuning = _tune_on_all(bank, dataset, validation, seed, grid, extra)
        logistic = fit_logistic(*training_rows(pooled_features(bank), labels, everything, extra), tuning.chosen,
                                n_cls, seed=seed)
        recipe = None
        if sel is not None and not sel.chosen.is_probe:
            recipe = dataclasses.replace(sel.chosen.recipe, steps=sel.chosen.step)
        elif not proto.probe_init and sel is None:
            recipe = recipes[0]  # the paper's: no probe to fall back to
        # nothing held out (sel is None): the verdict says the simple classifier ships, and why
        shipped = Shipped(None, None, "probe", stopped=stopped, notes=notes, logistic=logistic, tuning=tuning)
        if recipe is not None and not (sel is not None and sel.stopped):
            fb = _fold_bank(bank, labels, everything, dtype, proto.standardise)
            head = make_head()
            probe = None
            if proto.probe_init:
                probe, _ = fit_probe_head(fb.z, everything, labels, n_cls, seed=seed, c=tuning.chosen)
                probe.fold_into(head)
            fit = yield from _relay(fit_head(head, fb, everything, recipe, seed=seed, eval_every=every))
            if fit.stopped and proto.probe_init:  # a head trained part of the way was never validated: the probe
                shipped.stopped = "stopped by the user"
                notes.append(f"Stopped while training on all images: the model is {PROBE_WORDS}, as validated.")
            else:
                steps = max((c.step for c in fit.curve), default=0) if fit.stopped else recipe.steps
                shipped = Shipped(head, (fb.mean, fb.std) if proto.standardise else None, "head", steps, recipe,
                                  stopped="stopped by the user" if fit.stopped else stopped, notes=notes,
                                  probe_head=probe, logistic=logistic, tuning=tuning)
        elif recipe is not None and proto.probe_init:
            notes.append(f"Stopped while choosing: the model is {PROBE_WORDS}, measured as far as it got.")
    if sel is not None and sel.held_out is not None and sel.held_out.any() and (
            proto.probe_init or shipped.kind == "probe"):
        # the held-out logits of what ships: the probe's (each from a probe tuned without them) or the head's
        grouped = bool(validation.grouped)
        shipped.temperature, kept = temperature_for(sel.logits[sel.held_out], labels[sel.held_out], grouped=grouped)
        if shipped.kind == "probe":
            shipped.logistic.temperature = shipped.temperature
        else:
            _temper(shipped.head, shipped.temperature)
        shipped.calibration = calibration(sel.logits[sel.held_out], labels[sel.held_out], shipped.temperature,
                                          grouped=grouped, kept=kept)
        shipped.notes.append(shipped.calibration.describe())
    return shipped


def _tune_on_all(bank, dataset: Dataset, validation: Validation, seed: int, grid, extra=None) -> Tuning:
    """The probe's regularisation for the model trained on every image: chosen on 5 folds (over groups, or over
    images with the one-standard-error rule), whatever the folds of the reported figure.  Measured on simulated
    new patients (real H&E DenseNet121, groups known, 10 draws), choosing on 10 folds lost 0.042 against the best
    ``C`` at 5 images per class where 5 folds lost 0.022 (0.010 / 0.006 against 0.011 / 0.008 at 10 / 20)."""
    from .regularise import PROBE_CS, inner_folds, repeated_folds, tune_c

    labels = np.asarray(dataset.labels, np.int64)
    grouped = validation.grouped if validation.mode == "cv" else dataset.groups is not None
    groups = dataset.groups if grouped else None
    return tune_c(pooled_features(bank), labels, inner_folds(labels, groups, dataset.classes, k=5, seed=seed),
                  len(dataset.classes), grouped=grouped, grid=grid or PROBE_CS, seed=seed, extra=extra,
                  repeats=repeated_folds(labels, groups, dataset.classes, k=5, seed=seed))


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
                feature_precision: str = "fp32", overwrite: bool | str = False) -> TrainResult:
    """Write the shipped model with a card that says how it was made and validated."""
    from ..model.checkpoint import checkpoint_paths
    from ..model.classifier import set_head
    from ..model.record import TrainingRecord
    from .result import TrainResult

    model.cpu()
    if shipped.kind == "probe":
        set_head(model, "linear")  # the logistic regression itself, exactly
        state = shipped.logistic.linear_state()
    else:
        state = {f"head.{k}": v.detach().cpu().float() for k, v in shipped.head.state_dict().items()}
        if shipped.norm is not None:
            state = fold_standardisation(state, shipped.norm)
    model.load_state_dict({**model.state_dict(), **state})
    report, probe, chance = _reports(dataset, sel)
    _check_finite(model)
    ids = image_ids(dataset)  # paths in the folder: class folders may hold images of the same name
    val_files = ([ids[i] for i in validation.split.val]
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
        "head": "linear (the tuned probe)" if shipped.kind == "probe" else "table2",
        "probe_c": shipped.tuning.chosen if shipped.tuning is not None else None,
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
    decision = dict(model.card.decision or {})
    if shipped.calibration is not None:
        metrics["calibration"] = shipped.calibration.to_dict()
        if shipped.calibration.min_confidence > 0:  # the held-out images' cut-off, unless the card had its own
            decision.setdefault("min_confidence", round(shipped.calibration.min_confidence, 4))
            decision.setdefault("measure", "max_probability")
    card = model.card.replace(name=name or out.stem, training=training, metrics=metrics, decision=decision,
                              stain=_training_stain(dataset, _train_rows(validation, len(dataset)),
                                                    model.card.input_px))
    out, saved_note = _save_keeping(model, card, out, overwrite)
    return TrainResult(checkpoint_paths(out)[0], model.card, report, probe, chance, validation, shipped.kind,
                       shipped.steps, list(selection.get("fold_accuracy") or []),
                       len(sel.candidates) if sel is not None else 0, shipped.stopped,
                       [*_unsaid(validation), *shipped.notes, *saved_note], shipped.probe_head, shipped.norm,
                       logistic=shipped.logistic, tuning=shipped.tuning, why=selection["why"])


def _unsaid(validation: Validation) -> list[str]:
    """The validation's notes the verdict does not already say (it says when the groups are too few)."""
    return [n for n in validation.notes if n != validation.too_few_text()]


def _train_rows(validation: Validation, n: int) -> list[int]:
    if validation.mode == "holdout" and validation.split is not None:
        return list(validation.split.train)
    return list(range(n))


def _selection_record(sel: Selection | None, shipped: Shipped, proto: Protocol) -> dict:
    """The candidates as measured (for the card and the Train dock's curves), and the choice."""
    tuning = shipped.tuning.to_dict() if shipped.tuning is not None else None
    if sel is None:
        return {"shipped": shipped.kind, "candidates": [], "fold_accuracy": [], "curve": [], "probe_tuning": tuning,
                "why": why_shipped(sel, shipped)}
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
            "heads_measured": sel.heads_measured, "probe_tuning": tuning, "fold_c": list(sel.fold_c),
            "temperature": shipped.temperature, "curve": curve, "why": why_shipped(sel, shipped)}


def why_shipped(sel: Selection | None, shipped: Shipped) -> str:
    """Which model was saved and why, in a pathologist's words: two short sentences, the rule for ``C`` in a few words
    (in full in the report and the card)."""
    reg = f" ({shipped.tuning.short()})" if shipped.tuning is not None else ""
    if shipped.kind == "probe":
        saved = f"Saved: the simple classifier{reg}."
        if sel is None:
            return f"{saved} Why: with nothing held out, no measurement can show a trained head would do better."
        if not sel.heads_measured:
            return (f"{saved} Why: with no patient known, validation holds out images of the patients it trained on, "
                    "where a more complex model looks better by remembering them; it cannot be trusted to choose "
                    "one, so the simpler model ships.")
        return (f"{saved} Why: on patients it had not seen it did as well as the trained head ({sel.probe.accuracy:.1%}"
                " against the head's best, within the noise of the validation), and the simpler model is the safer "
                "one.")
    reg = f"; {shipped.tuning.short()}" if shipped.tuning is not None else ""
    return (f"Saved: the trained head ({shipped.steps} steps from the simple classifier{reg}). Why: on "
            f"patients it had not seen it beat the simple classifier by more than the noise of the validation "
            f"({sel.chosen.accuracy:.1%} against {sel.probe.accuracy:.1%}).")


def _save_keeping(model, card, out: Path, overwrite: bool | str) -> tuple[Path, list[str]]:
    """Save the trained model at ``out``; when another run wrote that name while this one trained, under the next
    free name instead (the work is never lost, and two runs never report one file)."""
    from ..errors import CheckpointError
    from ..model.checkpoint import checkpoint_paths, save_checkpoint

    try:
        save_checkpoint(model, card, out, overwrite=overwrite)
        return out, []
    except CheckpointError as err:
        if overwrite is True:
            raise
        first = err
    for k in range(2, 1000):
        alt = out.with_name(f"{out.stem}-{k}{out.suffix or '.safetensors'}")
        if not any(p.exists() for p in checkpoint_paths(alt)):
            save_checkpoint(model, card, alt, overwrite=False)
            note = (f"{checkpoint_paths(out)[0]} was written by another run while this model trained; this model "
                    f"was saved as {checkpoint_paths(alt)[0]} instead (nothing replaced).")
            log.warning(note)
            return alt, [note]
    raise first


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
