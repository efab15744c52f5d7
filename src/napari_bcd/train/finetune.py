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
    from ..settings import TrainSettings

__all__ = ["STOP", "FeatureProgress", "FitProgress", "Stage", "TrainPlan", "TrainResult", "backbone_features",
           "dihedral", "fold_standardisation", "hed_jitter", "iter_finetune"]

log = logging.getLogger(__name__)


def iter_finetune(
    dataset: Dataset,
    settings: TrainSettings | None = None,
    *,
    out: str | os.PathLike[str],
    protocol: str | Protocol | None = None,
    **changes: Any,
) -> Generator[Any, Any, TrainResult]:
    """Train a model on a dataset's images; yields progress, returns a :class:`TrainResult`.

    Parameters
    ----------
    dataset
        Images, labels and classes (:func:`~napari_bcd.train.read_iciar`), with their
        groups when known (:mod:`.groups`).
    settings, changes
        How to train (:class:`~napari_bcd.settings.TrainSettings`), with single changes (``seed=1``).
    out
        Checkpoint to write (``NAME.safetensors`` + ``NAME.json``), once, at the end.
    protocol
        A :class:`~.protocol.Protocol` object (a protocol's name goes in ``settings``); the settings' epochs,
        lr, batch size, validation fraction and augmentation override its values.

    Raises
    ------
    DatasetError
        Before any feature is computed, for a dataset no classifier can learn
        from (no images, one class) or bad settings.
    """
    from ..errors import BcdError
    from ..settings import TrainSettings

    if isinstance(protocol, str):
        changes["protocol"] = protocol
    try:
        s = (settings or TrainSettings()).replace(**changes) if changes else (settings or TrainSettings())
    except BcdError as err:
        raise DatasetError(str(err)) from err
    proto = get_protocol(protocol if isinstance(protocol, Protocol) else s.protocol).with_overrides(
        epochs=s.epochs, lr=s.lr, batch_size=s.batch_size, val_fraction=s.val_fraction, augment=s.augment)
    if (proto.epochs is not None and proto.epochs < 1) or proto.batch_size < 1 or proto.lr <= 0:
        raise DatasetError("epochs and batch size must be at least 1 and the learning rate positive.")
    if not 0 <= proto.val_fraction < 1:
        raise DatasetError(f"The validation fraction must be in [0, 1), got {proto.val_fraction}.")
    check_trainable(dataset)
    from ..model.checkpoint import check_checkpoint_target
    from ..model.classifier import check_backbone_weights

    check_checkpoint_target(out, s.overwrite)
    check_backbone_weights(s.backbone, s.backbone_weights)  # missing pretrained weights stop the run here
    plan = plan_validation(dataset, val_fraction=proto.val_fraction, seed=s.seed, split=s.split,
                           mode=s.validation or proto.validation, folds=s.folds)
    if plan.mode == "holdout":
        train = plan.folds[0][0]
        if len({int(dataset.labels[i]) for i in train}) < 2:
            raise DatasetError("The training images are all of one class after the split; add images of another "
                               "class.")
    return _finetune(dataset, Path(out), proto, plan, s)


def _finetune(dataset: Dataset, out: Path, proto: Protocol, validation: Validation, s: TrainSettings):
    import torch

    from ..model.classifier import build_classifier
    from ..model.inference import choose_device
    from ..model.precision import bf16_is_fast
    from ..windows import resize_area

    # the flips and rotations train the head; with validation over images only no head is trained, and the probe
    # learns from the identity view alone (:func:`~.probe.fit_probe_head`): their features are not computed
    heads = validation.grouped or proto.criterion == "loss"
    base_views = 8 if proto.augment and heads else 1
    views = base_views * (2 if s.stain_augment else 1)
    yield TrainPlan(len(dataset), views, validation, proto.name, tuple(validation.notes))
    clock = _Clock()
    dev = choose_device(s.device)
    seed = s.seed
    torch.manual_seed(seed)
    build = {"backbone": s.backbone, "backbone_weights": s.backbone_weights, "input_px": s.input_px,
             "field_um": s.field_um if s.field_um is not None else dataset.field_um,  # patches record their field
             "preprocessing": s.preprocessing}
    model = build_classifier(classes=tuple(dataset.classes), **build)
    model.to(dev)
    everything = list(range(len(dataset)))
    fprec = feature_precision(dev, s.feature_precision)
    bank = yield from backbone_features(model, dataset, everything, base_views,
                                        lambda i: resize_area(dataset.load(i), model.card.input_px), dev,
                                        s.feature_batch, s.cache, s.stain_augment, precision=fprec)
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

    stain_view = base_views if s.stain_augment else None  # the jittered copy's identity view
    n_train = len(validation.folds[0][0]) if validation.folds else len(dataset)
    recipes = proto.recipes(n_train * views)
    every = proto.measure_every(n_train * views)
    sel: Selection | None = None
    if validation.mode != "none":
        what = ("the simple classifier and the head" if validation.grouped or proto.criterion == "loss"
                else "the simple classifier")
        yield Stage(f"Measuring {what} on {len(validation.folds)} held-out fold(s)…")  # how: said in the plan
        sel = yield from select_head(bank, dataset.labels, n_cls, validation, recipes, make_head, seed=seed,
                                     eval_every=every, dtype=dtype, probe_start=proto.probe_init,
                                     standardise_features=proto.standardise, criterion=proto.criterion,
                                     groups=dataset.groups if validation.grouped else None, classes=dataset.classes,
                                     stain_view=stain_view)
        clock.lap("choosing")
        if sel.heads_measured:
            clock.count("steps", sum(r.steps for r in recipes) * len(validation.folds))
    from .save import final_model, save_result

    shipped = yield from final_model(model, bank, dataset, validation, sel, proto, recipes, make_head, seed=seed,
                                     every=every, dtype=dtype, stain_view=stain_view)
    clock.lap("final")
    clock.count("steps", shipped.steps if validation.mode != "holdout" else 0)
    result = save_result(model, dataset, out, proto, validation, sel, shipped, build, name=s.name, seed=seed,
                         views=views, stain_augment=s.stain_augment, feature_precision=fprec,
                         overwrite=s.overwrite)
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
