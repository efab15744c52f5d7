"""Fine-tuning the Table II head: features once, validation on unseen groups, a checkpoint that says how.

:func:`iter_finetune` runs, as one generator (progress in, a
:class:`TrainResult` out):

1. the plan (:class:`TrainPlan`): images, how validation is drawn
   (:func:`~.select.plan_validation`);
2. backbone features of every image and view, computed once and cached
   (:mod:`.features`);
3. the choice (:mod:`.select`): the linear probe and the head after each
   measured number of steps of each recipe, measured on patients, slides or
   regions they were not trained on;
4. the model shipped: trained on every image with the chosen recipe (after
   cross-validation), or the one trained without the held-out images (after a
   hold-out), its probabilities tempered on the held-out images, saved with a
   card saying all of the above (:mod:`.save`).

Two protocols (:mod:`.protocol`): ``"auto"`` (the default) and ``"paper"``
(its hyper-parameters exactly).  :data:`~napari_bcd.train.STOP` sent in ends
the run at the next measurement; what is validated so far is saved.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Generator
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .._progress import STOP
from ..errors import DatasetError
from .features import FeatureProgress, backbone_features, dihedral, feature_precision, fold_standardisation, hed_jitter
from .headfit import FitProgress
from .iciar import Dataset
from .protocol import Protocol, get_protocol
from .result import Stage, TrainPlan, TrainResult
from .select import Selection, Validation, plan_validation, select_head
from .split import check_trainable

if TYPE_CHECKING:
    from ..model.preprocessing import Preprocessing

__all__ = ["STOP", "FeatureProgress", "FitProgress", "Stage", "TrainPlan", "TrainResult", "backbone_features",
           "dihedral", "fold_standardisation", "hed_jitter", "iter_finetune"]

log = logging.getLogger(__name__)


def iter_finetune(
    dataset: Dataset,
    *,
    out: str | os.PathLike[str],
    protocol: str | Protocol = "auto",
    backbone: str = "resnet152v2",
    backbone_weights: str | os.PathLike[str] | None = "imagenet",
    input_px: tuple[int, int] = (256, 256),
    field_um: tuple[float, float] | None = None,
    preprocessing: Preprocessing | str | None = None,
    epochs: int | None = None,
    lr: float | None = None,
    batch_size: int | None = None,
    val_fraction: float | None = None,
    seed: int = 0,
    split: str | os.PathLike[str] | None = None,
    augment: bool | None = None,
    finetune_last_stage: bool = False,
    device: str | None = None,
    feature_batch: int = 8,
    name: str | None = None,
    cache: bool = True,
    overwrite: bool = False,
    stain_augment: bool = False,
    validation: str | None = None,
    folds: int = 5,
) -> Generator[Any, Any, TrainResult]:
    """Train the Table II head on an ICIAR dataset; yields progress, returns a :class:`TrainResult`.

    Parameters
    ----------
    dataset
        Images and labels (:func:`~napari_bcd.train.read_iciar`), with their
        groups when known (:mod:`.groups`).
    out
        Checkpoint to write (``NAME.safetensors`` + ``NAME.json``), once, at the end.
    protocol
        ``"auto"`` (default) or ``"paper"``; ``epochs``, ``lr``,
        ``batch_size``, ``val_fraction`` and ``augment`` override its values.
    split
        None, ``"bach-patient"``, or a file of validation names (a hold-out).
    validation
        ``"auto"`` (the protocol's), ``"cv"`` or ``"holdout"``.
    folds
        Cross-validation folds (at most; fewer when there are fewer groups).
    finetune_last_stage
        Not offered by this version with cached features (refused with a message).
    overwrite
        Replace an existing checkpoint at ``out`` (refused otherwise, before any work).
    stain_augment
        Also train on stain-jittered copies of every view (:func:`hed_jitter`),
        cached apart.

    Raises
    ------
    DatasetError
        Before any feature is computed, for a dataset no classifier can learn
        from (no images, one class) or bad settings.
    """
    proto = get_protocol(protocol).with_overrides(epochs=epochs, lr=lr, batch_size=batch_size,
                                                  val_fraction=val_fraction, augment=augment)
    if (proto.epochs is not None and proto.epochs < 1) or proto.batch_size < 1 or proto.lr <= 0:
        raise DatasetError("epochs and batch size must be at least 1 and the learning rate positive.")
    if not 0 <= proto.val_fraction < 1:
        raise DatasetError(f"The validation fraction must be in [0, 1), got {proto.val_fraction}.")
    if folds < 2:
        raise DatasetError(f"Cross-validation needs at least 2 folds, got {folds}.")
    check_trainable(dataset)
    if stain_augment and finetune_last_stage:
        raise DatasetError("--stain-augment works on cached features; it cannot be combined with fine-tuning the "
                           "last stage.")
    if finetune_last_stage:
        raise DatasetError("Fine-tuning the backbone's last stage is not offered by this version: the head is "
                           "trained on cached features. Train without --finetune-last-stage.")
    from ..model.checkpoint import check_checkpoint_target
    from ..model.classifier import check_backbone_weights

    check_checkpoint_target(out, overwrite)
    check_backbone_weights(backbone, backbone_weights)  # missing pretrained weights stop the run here
    plan = plan_validation(dataset, val_fraction=proto.val_fraction, seed=seed, split=split,
                           mode=validation or proto.validation, folds=folds)
    if plan.mode == "holdout":
        train = plan.folds[0][0]
        if len({int(dataset.labels[i]) for i in train}) < 2:
            raise DatasetError("The training images are all of one class after the split; add images of another "
                               "class.")
    build = {"backbone": backbone, "backbone_weights": backbone_weights, "input_px": input_px, "field_um": field_um,
             "preprocessing": preprocessing}
    return _finetune(dataset, Path(out), proto, plan, build, seed=seed, device=device, feature_batch=feature_batch,
                     name=name, cache=cache, stain_augment=stain_augment)


def _finetune(dataset: Dataset, out: Path, proto: Protocol, validation: Validation, build: dict, *, seed: int,
              device, feature_batch: int, name, cache: bool, stain_augment: bool):
    import torch

    from ..model.classifier import build_classifier
    from ..model.inference import choose_device
    from ..model.precision import bf16_is_fast
    from ..windows import resize_area

    base_views = 8 if proto.augment else 1
    views = base_views * (2 if stain_augment else 1)
    yield TrainPlan(len(dataset), views, validation, proto.name, tuple(validation.notes))
    clock = _Clock()
    dev = choose_device(device)
    torch.manual_seed(seed)
    if build["field_um"] is None and dataset.field_um is not None:
        build["field_um"] = dataset.field_um  # patches napari-bcd cut record the field they show
    model = build_classifier(classes=tuple(dataset.classes), **build)
    model.to(dev)
    everything = list(range(len(dataset)))
    fprec = feature_precision(dev)
    bank = yield from backbone_features(model, dataset, everything, base_views,
                                        lambda i: resize_area(dataset.load(i), model.card.input_px), dev,
                                        feature_batch, cache, stain_augment, precision=fprec)
    if bank is None:
        return TrainResult(None, stopped="stopped by the user", notes=["Stopped while computing features."])
    bank = bank.cpu()
    clock.lap("features")
    dtype = torch.bfloat16 if bf16_is_fast("cpu") else torch.float32
    n_cls = len(dataset.classes)

    def make_head():
        from ..model.head import Table2Head

        torch.manual_seed(seed)
        h = model.head
        return Table2Head(h.in_channels, h.feature_hw, num_classes=n_cls)

    n_train = len(validation.folds[0][0]) if validation.folds else len(dataset)
    recipes = proto.recipes(n_train * views)
    every = proto.measure_every(n_train * views)
    sel: Selection | None = None
    if validation.mode != "none":
        yield Stage(f"Measuring the probe and the head on {validation.describe()}…")
        sel = yield from select_head(bank, dataset.labels, n_cls, validation, recipes, make_head, seed=seed,
                                     eval_every=every, dtype=dtype, probe_start=proto.probe_init,
                                     standardise_features=proto.standardise, criterion=proto.criterion)
        clock.lap("choosing")
        clock.count("steps", sum(r.steps for r in recipes) * len(validation.folds))
    from .save import final_model, save_result

    shipped = yield from final_model(model, bank, dataset, validation, sel, proto, recipes, make_head, seed=seed,
                                     every=every, dtype=dtype)
    clock.lap("final")
    clock.count("steps", shipped.steps if validation.mode != "holdout" else 0)
    result = save_result(model, dataset, out, proto, validation, sel, shipped, build, name=name, seed=seed,
                         views=views, stain_augment=stain_augment, feature_precision=fprec)
    clock.lap("saving")
    result.timings = clock.laps
    return result


class _Clock:
    """Seconds per stage of a run, for the report (a training run prints where its time went)."""

    def __init__(self) -> None:
        import time

        self._now = time.perf_counter
        self._t = self._now()
        self.laps: dict[str, float] = {}

    def lap(self, name: str) -> None:
        t = self._now()
        self.laps[name] = round(self.laps.get(name, 0.0) + t - self._t, 3)
        self._t = t

    def count(self, name: str, n: float) -> None:
        self.laps[name] = self.laps.get(name, 0) + n
