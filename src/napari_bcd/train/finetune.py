"""Fine-tuning the Table II head on cached backbone features.

With the backbone frozen, the backbone's output for an image never changes,
so it is computed once per image and per view (the eight flips and
rotations) and cached on disk, keyed by the backbone's weights hash and the
image's content hash.  Every epoch then trains the 143,620-parameter head on
cached features, and a linear probe on the same features is fitted beside it.

Two protocols (see :mod:`.protocol`): ``"paper"`` (the paper's
hyper-parameters exactly) and ``"auto"`` (the default for a user's own
regions: enough optimiser steps, class-balanced sampling, early stopping).

The generator accepts :data:`STOP` through ``send()``: training then ends
after the current epoch and the best weights so far are saved, in the
generator's own thread.  Closing it (or Ctrl-C) saves them too.
"""

from __future__ import annotations

import copy
import hashlib
import logging
import math
import os
import time
from collections.abc import Callable, Generator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from .._fileio import file_digest
from ..errors import BcdError, DatasetError
from .evaluate import Report, report_from_predictions
from .iciar import Dataset
from .probe import ProbeResult, linear_probe
from .protocol import Protocol, get_protocol
from .split import Split, check_trainable, split_dataset

if TYPE_CHECKING:
    import torch

    from ..model.classifier import Classifier
    from ..model.preprocessing import Preprocessing

__all__ = ["STOP", "EpochStats", "FeatureProgress", "TrainPlan", "TrainResult", "backbone_features", "dihedral",
           "fold_standardisation", "hed_jitter", "iter_finetune"]

log = logging.getLogger(__name__)

#: Send this into the running generator to stop after the current epoch (the best weights are saved).
STOP = "stop"


@dataclass(frozen=True)
class TrainPlan:
    """What is about to happen, before any feature is computed."""

    n_train: int
    n_val: int
    samples_per_epoch: int
    epochs: int
    steps_per_epoch: int
    protocol: str
    split: str
    notes: tuple[str, ...] = ()

    @property
    def message(self) -> str:
        val = f"{self.n_val} to validate" if self.n_val else "none to validate"
        lines = [f"{self.n_train} images to train, {val} ({self.split}); protocol {self.protocol}: up to "
                 f"{self.epochs} epochs x {self.steps_per_epoch} step(s) = {self.epochs * self.steps_per_epoch} "
                 f"optimiser steps on {self.samples_per_epoch} samples per epoch"]
        return "\n".join(lines + [f"note: {n}" for n in self.notes])


@dataclass(frozen=True)
class FeatureProgress:
    """Backbone features computed (or found in the cache) so far."""

    done: int
    total: int
    cached: int


@dataclass(frozen=True)
class EpochStats:
    """One epoch of head training.  ``val_*`` are NaN when there is no validation data."""

    epoch: int
    epochs: int
    train_loss: float
    train_acc: float
    val_loss: float
    val_acc: float
    seconds: float
    best: bool
    steps: int = 0


@dataclass
class TrainResult:
    """What a training run produced.

    Attributes
    ----------
    checkpoint
        The saved ``.safetensors`` file, or None when nothing was trained
        (stopped before the first epoch).
    card
        The saved model card (None with no checkpoint).
    report
        The head's validation report (None without validation data).
    probe
        The linear probe on the same features and split.
    chance
        Accuracy of always answering the most common validation class.
    stopped
        ``"completed"``, ``"early stopping"`` or ``"stopped by the user"``.
    """

    checkpoint: Path | None
    card: Any = None
    report: Report | None = None
    probe: ProbeResult | None = None
    chance: float | None = None
    epochs_run: int = 0
    steps_run: int = 0
    best_epoch: int = 0
    stopped: str = "completed"
    notes: list[str] = field(default_factory=list)

    @property
    def has_validation(self) -> bool:
        return self.report is not None

    @property
    def beats_chance(self) -> bool:
        """True when the head's validation accuracy is above chance (False without validation)."""
        return self.report is not None and self.chance is not None and self.report.accuracy > self.chance + 1e-9

    @property
    def head_below_probe(self) -> bool:
        return (self.report is not None and self.probe is not None and self.probe.report is not None
                and self.report.accuracy < self.probe.report.accuracy - 1e-9)

    def verdict(self) -> str:
        """Head against probe and chance, in words."""
        if self.report is None:
            return ("No validation data: nothing shows what this model learned (train accuracy "
                    f"{self.card.record.last_train_accuracy:.3f})." if self.card else "Nothing was trained.")
        p = self.probe.report.accuracy if self.probe is not None and self.probe.report is not None else None
        text = f"Table II head: validation accuracy {self.report.accuracy:.4f}"
        if p is not None:
            text += f"; linear probe on the same frozen features: {p:.4f}"
        text += f"; chance: {self.chance:.4f}."
        if self.head_below_probe:
            paper = bool(self.card) and self.card.record.protocol_name == "paper"
            hint = "the auto protocol (--protocol auto) or more images usually help" if paper else \
                "more or larger annotated regions usually help"
            text += f" The head does WORSE than the linear probe: it has not learned what the features hold ({hint})."
        if not self.beats_chance:
            text += " The head does not beat chance."
        return text


def dihedral(img: np.ndarray, t: int) -> np.ndarray:
    """The ``t``-th of the eight flips/rotations (0 = identity)."""
    out = np.rot90(img, t % 4)
    return np.ascontiguousarray(out[:, ::-1] if t >= 4 else out)


def _image_key(dataset: Dataset, i: int) -> str:
    return file_digest(dataset.paths[i])


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
) -> Generator[TrainPlan | FeatureProgress | EpochStats, Any, TrainResult]:
    """Train the Table II head on an ICIAR dataset; yields progress, returns a :class:`TrainResult`.

    Parameters
    ----------
    dataset
        Images and labels (:func:`~napari_bcd.train.read_iciar`).
    out
        Checkpoint to write (``NAME.safetensors`` + ``NAME.json``), once, at
        the end, with the best epoch's weights (by validation loss; the last
        epoch without validation data).
    protocol
        ``"auto"`` (default) or ``"paper"``; ``epochs``, ``lr``,
        ``batch_size``, ``val_fraction`` and ``augment`` override its values.
    split
        None (stratified), ``"bach-patient"``, or a file of validation names.
    finetune_last_stage
        Also train the backbone's last stage (no feature cache then).
    overwrite
        Replace an existing checkpoint at ``out`` (refused otherwise, before any work).
    stain_augment
        Also train on stain-jittered copies of every view (:func:`hed_jitter`:
        each stain's amount scaled and shifted at random, fixed per image and
        view so the feature cache serves them), doubling the features computed.

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
    check_trainable(dataset)
    from ..model.checkpoint import check_checkpoint_target
    from ..model.classifier import check_backbone_weights

    check_checkpoint_target(out, overwrite)
    check_backbone_weights(backbone, backbone_weights)  # missing pretrained weights stop the run here
    the_split = split_dataset(dataset, proto.val_fraction, seed, split)
    if not the_split.train:
        raise DatasetError("The split left no training images; use more images or another split.")
    if len({int(dataset.labels[i]) for i in the_split.train}) < 2:
        raise DatasetError("The training images are all of one class after the split; add images of another class.")
    return _finetune(dataset, out=Path(out), proto=proto, the_split=the_split, backbone=backbone,
                     backbone_weights=backbone_weights, input_px=input_px, field_um=field_um,
                     preprocessing=preprocessing, seed=seed, finetune_last_stage=finetune_last_stage, device=device,
                     feature_batch=feature_batch, name=name, cache=cache, stain_augment=stain_augment)


def _finetune(dataset: Dataset, *, out: Path, proto: Protocol, the_split: Split, backbone, backbone_weights,
              input_px, field_um, preprocessing, seed: int, finetune_last_stage: bool, device, feature_batch: int,
              name, cache: bool, stain_augment: bool = False):
    import torch

    from ..model.classifier import build_classifier
    from ..model.inference import choose_device
    from ..windows import resize_area

    train_idx, val_idx = the_split.train, the_split.val
    T = 8 if proto.augment else 1
    if stain_augment and finetune_last_stage:
        raise DatasetError("--stain-augment works on cached features; it cannot be combined with fine-tuning the "
                           "last stage.")
    base_views = T
    if stain_augment:
        T = 2 * T  # every view again, stain-jittered
    epochs, steps_per_epoch = proto.plan_epochs(len(train_idx) * T)
    yield TrainPlan(len(train_idx), len(val_idx), len(train_idx) * T, epochs, steps_per_epoch, proto.name,
                    the_split.kind, tuple(the_split.notes))

    dev = choose_device(device)
    torch.manual_seed(seed)
    if field_um is None and dataset.field_um is not None:
        field_um = dataset.field_um  # patches napari-bcd cut record the field they show
    model = build_classifier(backbone, backbone_weights=backbone_weights, input_px=input_px, field_um=field_um,
                             preprocessing=preprocessing, classes=tuple(dataset.classes))
    model.to(dev)
    needed = sorted(set(train_idx) | set(val_idx))

    def images_of(i: int) -> np.ndarray:
        return resize_area(dataset.load(i), model.card.input_px)

    bank = row_of = images = None
    if not finetune_last_stage:
        bank_or_none = yield from backbone_features(model, dataset, needed, base_views, images_of, dev,
                                                    feature_batch, cache, stain_augment)
        if bank_or_none is None:
            return TrainResult(None, stopped="stopped by the user", notes=["Stopped while computing features."])
        bank = bank_or_none
        row_of = np.zeros(len(dataset), np.int64)
        row_of[needed] = np.arange(len(needed))
    else:
        for p in model.backbone.parameters():
            p.requires_grad_(False)
        for p in _last_stage(model).parameters():
            p.requires_grad_(True)
        images = {i: images_of(i) for i in needed}

    # ---- the linear probe, on the same features and split
    probe = None
    if bank is not None:
        pooled = bank.float().mean(dim=(-2, -1)).numpy()  # images x views x channels
        tr = row_of[train_idx]
        va = row_of[val_idx]
        probe = linear_probe(pooled[tr].reshape(-1, pooled.shape[-1]), np.repeat(dataset.labels[train_idx], T),
                             pooled[va, 0] if len(va) else None, dataset.labels[val_idx] if len(va) else None,
                             dataset.classes, seed=seed)

    # ---- feature standardisation (folded into the head's first conv when saved)
    norm = _channel_stats(bank, row_of[train_idx]) if bank is not None and proto.standardise else None

    # ---- the head, started from the probe when the protocol says so
    if probe is not None and proto.probe_init and probe.pipeline is not None:
        _probe_init(model.head, probe.pipeline, norm, len(dataset.classes), bank, row_of[train_idx])
    if bank is not None and dev.type != "cpu":
        # On a GPU the whole bank usually fits (BACH, ResNet152V2, 8 views: 0.84 GB in fp16): gather there.
        try:
            bank = bank.to(dev)
        except RuntimeError as err:  # out of memory: batches are gathered on the CPU and copied
            log.info("Feature bank stays on the CPU (%s)", err)
    head = _HeadTraining(model, dataset, train_idx, val_idx, T, proto, dev, seed, bank, row_of, images, norm,
                         finetune_last_stage)
    va_arr = head.va
    patience = proto.patience_epochs(steps_per_epoch) if len(va_arr) else None
    snapshot, validate = head.snapshot, head.validate

    history: list[dict] = []
    best: dict[str, Any] = {"loss": math.inf, "epoch": 0, "state": None, "pred": None}
    steps = 0
    stopped = "completed"
    result: TrainResult | None = None
    saving = False
    if proto.probe_init and probe is not None and len(va_arr):
        # Epoch 0 is the probe-initialised head: a candidate like any epoch.
        v_loss, v_acc, v_pred = validate()
        best.update(loss=v_loss, epoch=0, state=snapshot(), pred=v_pred)
        history.append({"epoch": 0, "train_loss": math.nan, "train_acc": math.nan, "val_loss": v_loss,
                        "val_acc": v_acc, "seconds": 0.0, "steps": 0})
        if (yield EpochStats(0, epochs, math.nan, math.nan, v_loss, v_acc, 0.0, True, 0)) == STOP:
            epochs = 0
            stopped = "stopped by the user"
    try:
        for epoch in range(1, epochs + 1):
            t0 = time.perf_counter()
            train_loss, train_acc, n_steps = head.epoch()
            steps += n_steps
            v_loss = v_acc = math.nan
            v_pred = None
            if len(va_arr):
                v_loss, v_acc, v_pred = validate()
                improved = v_loss < best["loss"]
            else:
                improved = True  # without validation the last epoch is the one kept
            stats = EpochStats(epoch, epochs, train_loss, train_acc, v_loss, v_acc, time.perf_counter() - t0,
                               improved, steps)
            history.append({k: getattr(stats, k) for k in
                            ("epoch", "train_loss", "train_acc", "val_loss", "val_acc", "seconds", "steps")})
            if improved:
                best.update(loss=v_loss if len(va_arr) else math.inf, epoch=epoch, state=snapshot(), pred=v_pred)
            request = yield stats
            if request == STOP:
                stopped = "stopped by the user"
                break
            if patience is not None and epoch - best["epoch"] >= patience:
                stopped = "early stopping"
                break
        saving = True
        result = _save(model, dataset, out, proto, the_split, best, history, probe, steps, stopped,
                       backbone_weights, name, epochs, seed, stain_augment)
        return result
    except (GeneratorExit, KeyboardInterrupt):
        # Cancelled from outside: keep the best weights so far, then let the cancel go on (not when the
        # cancel came during that very save: the checkpoint is consistent either way, see save_checkpoint).
        if best["state"] is not None and result is None and not saving:
            _save(model, dataset, out, proto, the_split, best, history, probe, steps, "stopped by the user",
                  backbone_weights, name, epochs, seed, stain_augment)
        raise


class _HeadTraining:
    """The head's optimisation, one epoch at a time, on cached features (or images, fine-tuning the last stage).

    Holds the optimiser, the sampling (shuffled or class-balanced), the
    forward pass (standardised features when the protocol says so) and the
    validation, so the generator above only decides when to stop and what to keep.
    """

    def __init__(self, model: Classifier, dataset: Dataset, train_idx: list[int], val_idx: list[int], views: int,
                 proto: Protocol, dev: torch.device, seed: int, bank: torch.Tensor | None, row_of: np.ndarray | None,
                 images: dict[int, np.ndarray] | None, norm: tuple[torch.Tensor, torch.Tensor] | None,
                 finetune_last_stage: bool) -> None:
        import torch
        from torch import nn

        self.model, self.proto, self.dev, self.bank, self.row_of, self.images = model, proto, dev, bank, row_of, images
        self.norm = norm
        self.norm_dev = (norm[0].to(dev).view(1, -1, 1, 1), norm[1].to(dev).view(1, -1, 1, 1)) if norm else None
        self.finetune_last_stage = finetune_last_stage
        self.labels = torch.as_tensor(dataset.labels)
        self.trainable_names = {n for n, p in model.named_parameters() if p.requires_grad}
        self.opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=proto.lr)
        self.loss_fn = nn.CrossEntropyLoss()
        self.pairs = np.array([(i, t) for i in train_idx for t in range(views)], dtype=np.int64)
        self.weights = None
        if proto.balanced:
            y = dataset.labels[self.pairs[:, 0]]
            counts = np.bincount(y, minlength=len(dataset.classes)).astype(float)
            self.weights = 1.0 / counts[y]
            self.weights /= self.weights.sum()
        self.rng = np.random.default_rng(seed)
        self.va = np.asarray(val_idx, np.int64)

    def forward(self, idx: np.ndarray, ts: np.ndarray) -> torch.Tensor:
        import torch

        if self.bank is not None:
            rows = torch.from_numpy(self.row_of[idx])
            f = self.bank[rows, torch.from_numpy(np.asarray(ts, np.int64))].to(self.dev, torch.float32)
            if self.norm_dev is not None:
                f = (f - self.norm_dev[0]) / self.norm_dev[1]
            return self.model.head(f)
        batch = np.stack([dihedral(self.images[int(i)], int(t)) for i, t in zip(idx, ts, strict=True)])
        return self.model(self.model.normalise(torch.from_numpy(batch).to(self.dev)))

    def epoch(self) -> tuple[float, float, int]:
        """One pass over the training samples: ``(mean loss, accuracy, optimiser steps)``."""
        model, proto = self.model, self.proto
        model.train()
        model.backbone.eval()  # BN statistics stay ImageNet's (as Keras' frozen layers)
        if self.finetune_last_stage:
            _last_stage(model).train()
        n = len(self.pairs)
        pick = (self.rng.choice(n, size=n, replace=True, p=self.weights) if self.weights is not None
                else self.rng.permutation(n))
        order = self.pairs[pick]
        tot_loss, tot_ok, steps = 0.0, 0, 0
        for k in range(0, n, proto.batch_size):
            b = order[k : k + proto.batch_size]
            logits = self.forward(b[:, 0], b[:, 1])
            y = self.labels[b[:, 0]].to(self.dev)
            loss = self.loss_fn(logits, y)
            self.opt.zero_grad(set_to_none=True)
            loss.backward()
            self.opt.step()
            steps += 1
            tot_loss += float(loss.detach()) * len(b)
            tot_ok += int((logits.argmax(1) == y).sum())
        return tot_loss / n, tot_ok / n, steps

    def validate(self) -> tuple[float, float, Any]:
        """``(loss, accuracy, predictions)`` on the identity view of the validation images."""
        import torch

        self.model.eval()
        va, bs = self.va, self.proto.batch_size
        with torch.inference_mode():
            logits = torch.cat([self.forward(va[k : k + bs], np.zeros(len(va[k : k + bs]), np.int64))
                                for k in range(0, len(va), bs)])
        y = self.labels[va].to(self.dev)
        pred = logits.argmax(1).cpu()
        return float(self.loss_fn(logits, y)), float((pred == y.cpu()).float().mean()), pred

    def snapshot(self) -> dict:
        """The trainable weights now (head, and last stage when fine-tuned), standardisation folded in."""
        state = self.model.state_dict()
        kept = {k: v.detach().clone() for k, v in state.items() if k.startswith("head.") or k in self.trainable_names}
        return fold_standardisation(kept, self.norm) if self.norm is not None else kept


def hed_jitter(rgb: np.ndarray, seed: int, amount: float = 0.2, shift: float = 0.01) -> np.ndarray:
    """The image with its stains varied (Tellez et al. 2018): in skimage's HED space each stain's amount is
    scaled by U(1 - amount, 1 + amount) and shifted by U(-shift, shift); the same ``seed`` gives the same result."""
    from skimage.color import hed2rgb, rgb2hed

    rng = np.random.default_rng(seed)
    hed = rgb2hed(rgb)
    alpha = rng.uniform(1 - amount, 1 + amount, 3)
    beta = rng.uniform(-shift, shift, 3)
    out = hed2rgb(hed * alpha + beta)
    return np.clip(np.round(out * 255), 0, 255).astype(np.uint8)


def backbone_features(model: Classifier, dataset: Dataset, needed: list[int], T: int,
                      images_of: Callable[[int], np.ndarray], dev: torch.device, feature_batch: int, cache: bool,
                      stain_augment: bool = False) -> Generator[FeatureProgress, Any, torch.Tensor | None]:
    """Backbone features of every needed image and view, from the cache or computed once.

    Yields :class:`FeatureProgress`; returns an ``images x views x C x H x W``
    float16 tensor (rows in ``needed`` order), or None when stopped.  With
    ``stain_augment`` the views are followed by the same views of a
    stain-jittered copy (``2 T`` views), cached apart.
    """
    bank = yield from _feature_bank(model, dataset, needed, T, images_of, dev, feature_batch, cache, "")
    if bank is None or not stain_augment:
        return bank

    def jittered(i: int) -> np.ndarray:
        seed = int(_image_key(dataset, i)[:8], 16)  # from the image's content: the cache stays consistent
        return hed_jitter(images_of(i), seed)

    aug = yield from _feature_bank(model, dataset, needed, T, jittered, dev, feature_batch, cache, "hed0.2")
    if aug is None:
        return None
    import torch

    return torch.cat([bank, aug], dim=1)


def _feature_bank(model, dataset: Dataset, needed: list[int], T: int, images_of, dev, feature_batch: int,
                  cache: bool, variant: str):
    import torch
    from safetensors.torch import load_file, save_file

    from ..config import cache_dir
    from ..model.checkpoint import weights_sha256

    model.backbone.eval()
    bkey = weights_sha256(model.backbone.state_dict())[:16]
    pkey = hashlib.sha256(repr((model.card.input_px, model.card.preprocessing)).encode()).hexdigest()[:8]
    if variant:
        pkey = f"{pkey}-{variant}"
    cdir = cache_dir() / "features" / f"{bkey}-{pkey}"
    if cache:
        cdir.mkdir(parents=True, exist_ok=True)
    feats: dict[int, torch.Tensor] = {}
    keys: dict[int, str] = {}
    cached_n = 0
    if (yield FeatureProgress(0, len(needed), 0)) == STOP:
        return None
    todo: list[int] = []
    for i in needed:
        keys[i] = _image_key(dataset, i)
        f = cdir / f"{keys[i]}.safetensors"
        if cache and f.is_file():
            try:
                views = load_file(str(f))["features"]
            except Exception:  # noqa: BLE001 - a damaged cache entry is recomputed
                f.unlink(missing_ok=True)
                views = None
            # An entry holds the first k views; the identity view alone serves a run without flips.
            if views is not None and views.shape[0] >= T:
                feats[i] = views[:T].clone()
                cached_n += 1
                continue
        todo.append(i)
    done = cached_n
    if (yield FeatureProgress(done, len(needed), cached_n)) == STOP:
        return None
    per = max(1, feature_batch // T) if T > 1 else feature_batch
    for k in range(0, len(todo), per):
        chunk = todo[k : k + per]
        batch = np.stack([dihedral(images_of(i), t) for i in chunk for t in range(T)])
        with torch.inference_mode():
            x = model.normalise(torch.from_numpy(batch).to(dev))
            out_f = model.backbone(x).to("cpu", torch.float16)
        for j, i in enumerate(chunk):
            feats[i] = out_f[j * T : (j + 1) * T].clone(memory_format=torch.contiguous_format)
            if cache:
                tmp = cdir / f".{keys[i]}.{os.getpid()}.tmp"
                save_file({"features": feats[i]}, str(tmp))
                os.replace(tmp, cdir / f"{keys[i]}.safetensors")
        done += len(chunk)
        if (yield FeatureProgress(done, len(needed), cached_n)) == STOP:
            return None
    # One contiguous bank: a batch is then one gather, not 128 small copies.
    bank = torch.stack([feats.pop(i) for i in needed])
    return bank


def _channel_stats(bank, rows: np.ndarray):
    """Per-channel mean and (floored) std of the training features, over images, views and positions."""
    import torch

    c = bank.shape[2]
    s1 = torch.zeros(c, dtype=torch.float64)
    s2 = torch.zeros(c, dtype=torch.float64)
    n = 0
    for k in range(0, len(rows), 16):  # in chunks: no float32 copy of the whole bank
        f = bank[torch.from_numpy(rows[k : k + 16])].to(torch.float64)
        f = f.transpose(0, 2).reshape(c, -1)
        s1 += f.sum(1)
        s2 += (f * f).sum(1)
        n += f.shape[1]
    mean = s1 / n
    var = (s2 / n - mean * mean).clamp_min(0)
    # A dead (constant) channel must not be blown up on new images: floor at 1 % of the typical std.
    floor = 1e-2 * float(var.mean().sqrt()) + 1e-12
    std = (var + floor * floor).sqrt()
    return mean.float(), std.float()


def _probe_init(head, pipeline, norm, n_classes: int, bank, rows: np.ndarray) -> None:
    """Start the Table II head from the linear probe (LP-FT).

    Two channels per class carry the probe's score ``z = w . x(p) + b`` at
    every position, as ``z + c`` and ``-z + c`` (``c`` keeps both positive, so
    the ReLUs pass them), through identity weights in the layers after the
    first conv; max-pooling turns them into the block's max and -min, and the
    last Dense averages ``(max + min) / 2`` over the blocks, i.e. the probe's
    score pooled by block midranges instead of a global mean.  The other
    channels keep their random start, and nothing flows from them into the
    reserved ones, so the head's first output is the probe's (up to that
    pooling) and training refines it.
    """
    import torch

    scaler, lr = pipeline[0], pipeline[-1]
    coef = np.asarray(lr.coef_, np.float64)
    intercept = np.asarray(lr.intercept_, np.float64)
    present = [int(c) for c in lr.classes_]
    if coef.shape[0] == 1 and len(present) == 2:  # scikit-learn's binary form: one row for the second class
        coef = np.stack([-coef[0] / 2, coef[0] / 2])
        intercept = np.array([-intercept[0] / 2, intercept[0] / 2])
    k_all = n_classes
    n = 2 * k_all
    if n > min(head.conv2.out_channels, head.dense2.out_features):
        log.info("Too many classes (%d) to start the head from the probe; starting from random weights.", k_all)
        return
    w = np.zeros((k_all, coef.shape[1]))
    b = np.full(k_all, intercept.min() - 5.0)  # classes with no training image start unlikely
    for r, c in enumerate(present):
        w[c], b[c] = coef[r], intercept[r]
    mu_s, sd_s = np.asarray(scaler.mean_, np.float64), np.asarray(scaler.scale_, np.float64)
    if norm is not None:
        mu_h, sd_h = norm[0].double().numpy(), norm[1].double().numpy()
    else:
        mu_h, sd_h = np.zeros_like(mu_s), np.ones_like(sd_s)
    w1 = w * (sd_h / sd_s)[None]  # the probe's weights on the head's (standardised) input
    b1 = (w * ((mu_h - mu_s) / sd_s)[None]).sum(1)
    with torch.no_grad():
        conv1 = head.conv1
        wt = torch.as_tensor(w1, dtype=conv1.weight.dtype)
        bt = torch.as_tensor(b1, dtype=conv1.weight.dtype).view(1, -1, 1, 1)
        # The probe's scores at every position of the training features: their spread sets the scale.
        zmax = torch.zeros(k_all, dtype=torch.float64)
        s1 = s2 = 0.0
        count = 0
        mean_t = (norm[0] if norm is not None else torch.zeros(len(mu_s))).view(1, -1, 1, 1)
        std_t = (norm[1] if norm is not None else torch.ones(len(mu_s))).view(1, -1, 1, 1)
        for k in range(0, len(rows), 16):
            f = (bank[torch.from_numpy(rows[k : k + 16])].flatten(0, 1).float() - mean_t) / std_t
            z = (torch.einsum("nchw,kc->nkhw", f, wt) + bt).double()
            zmax = torch.maximum(zmax, z.abs().amax(dim=(0, 2, 3)))
            s1, s2, count = s1 + float(z.sum()), s2 + float((z * z).sum()), count + z.numel()
        # A probe fitted on a few separable images is very confident; started at that scale the head's
        # training loss is already ~0 and nothing is left to learn.  Scale the scores to unit spread:
        # the same ranking of classes, a head that can still move.
        spread = max(np.sqrt(max(s2 / count - (s1 / count) ** 2, 0.0)), 1e-6)
        scale = 1.0 / spread
        wt, b1, b, zmax = wt * scale, b1 * scale, b * scale, zmax * scale
        c = (1.5 * zmax + 1.0).numpy()
        conv1.weight[:n] = 0
        for k in range(k_all):
            conv1.weight[2 * k, :, 0, 0] = wt[k]
            conv1.weight[2 * k + 1, :, 0, 0] = -wt[k]
            conv1.bias[2 * k] = float(b1[k] + c[k])
            conv1.bias[2 * k + 1] = float(-b1[k] + c[k])
        eye = torch.arange(n)
        for layer in (head.conv2, head.conv3, head.dense1, head.dense2):
            wl = layer.weight.view(layer.weight.shape[0], layer.weight.shape[1])
            wl[:n] = 0
            wl[:, :n] = 0
            wl[eye, eye] = 1.0
            layer.bias[:n] = 0
        out = head.out
        width = head.dense2.out_features
        positions = out.in_features // width
        wo = out.weight.view(out.out_features, positions, width)
        wo.zero_()
        for k in range(k_all):
            wo[k, :, 2 * k] = 0.5 / positions
            wo[k, :, 2 * k + 1] = -0.5 / positions
        out.bias.copy_(torch.as_tensor(b, dtype=out.bias.dtype))


def fold_standardisation(state: dict, norm: tuple[torch.Tensor, torch.Tensor]) -> dict:
    """Fold ``(x - mean) / std`` into ``head.conv1``: the same outputs from raw features."""
    mean, std = norm
    w = state["head.conv1.weight"]  # out x in x 1 x 1
    b = state["head.conv1.bias"]
    scale = (1.0 / std).to(w)
    w2 = w * scale.view(1, -1, 1, 1)
    b2 = b - (w2[:, :, 0, 0] * mean.to(w)).sum(1)
    return {**state, "head.conv1.weight": w2, "head.conv1.bias": b2}


def _save(model, dataset: Dataset, out: Path, proto: Protocol, the_split: Split, best: dict, history: list[dict],
          probe: ProbeResult | None, steps: int, stopped: str, backbone_weights, name, planned_epochs: int,
          seed: int, stain_augment: bool = False) -> TrainResult:
    """Write the best epoch's checkpoint with a card that says how it was made."""
    from ..model.checkpoint import checkpoint_paths, save_checkpoint
    from ..model.record import TrainingRecord

    if best["state"] is None:
        return TrainResult(None, stopped=stopped, probe=probe)
    final_state = copy.copy(model.state_dict())
    model.load_state_dict({**final_state, **best["state"]})
    val_idx = the_split.val
    finetune = any(k.startswith("backbone.") for k in best["state"])
    report = chance = None
    if val_idx and best["pred"] is not None:
        y_true = dataset.labels[val_idx].tolist()
        report = report_from_predictions(y_true, best["pred"].tolist(), dataset.classes)
        chance = float(np.bincount(y_true).max() / len(y_true))
    hyper = {
        "optimizer": "Adam",
        "lr": proto.lr,
        "batch_size": proto.batch_size,
        "epochs": planned_epochs,
        "epochs_chosen": "fixed" if proto.epochs is not None else f"from the dataset size (>= {proto.min_steps} steps)",
        "epochs_run": history[-1]["epoch"] if history else 0,
        "steps_run": steps,
        "min_steps": proto.min_steps or None,
        "early_stopping": ({"monitor": "val_loss", "patience_epochs": proto.patience,
                            "patience_min_steps": proto.min_patience_steps} if proto.patience else None),
        "sampling": "class-balanced (with replacement)" if proto.balanced else "shuffled",
        "augment": "8 dihedral (flips/rotations)" if proto.augment else "none",
        "stain_augment": ("HED jitter: each stain x U(0.8, 1.2) + U(-0.01, 0.01), one copy of every view"
                          if stain_augment else "none"),
        "head_start": "the linear probe (LP-FT)" if proto.probe_init and not finetune else "random (PyTorch default)",
        "feature_standardisation": ("per-channel mean/std of the training features, folded into the head's first "
                                    "1x1 conv" if proto.standardise and not finetune else "none"),
        "val_fraction": proto.val_fraction,
        "seed": seed,
        "finetune_last_stage": finetune,
        "loss": "cross-entropy",
    }
    training = TrainingRecord(
        protocol={"name": proto.name, "description": proto.describe(), "settings": proto.to_dict()},
        data={"root": str(dataset.root), "counts": dataset.counts(), "images": len(dataset)},
        split={"kind": the_split.kind, "train": len(the_split.train), "val": len(val_idx),
               "val_files": [dataset.paths[i].name for i in val_idx], "notes": list(the_split.notes)},
        hyperparameters=hyper,
        best_epoch=best["epoch"],
        stopped=stopped,
        curves=[h for h in history if h["epoch"] <= best["epoch"]],
        validation=bool(val_idx),
        validation_report=report.to_dict() if report is not None else None,
        probe=probe.to_dict() if probe is not None else None,
        chance_accuracy=chance,
        beats_chance=bool(report is not None and chance is not None and report.accuracy > chance + 1e-9),
        backbone_weights_source=str(backbone_weights),
        preprocessing_source=getattr(model, "preprocessing_source", ""),
    ).to_dict()
    metrics: dict[str, Any] = {}
    if report is not None:
        metrics = {"accuracy": report.accuracy, "macro_f1": report.macro["f1"], "weighted_f1": report.weighted["f1"],
                   "val_loss": best["loss"]}
        if probe is not None and probe.report is not None:
            metrics["probe_accuracy"] = probe.report.accuracy
            metrics["probe_macro_f1"] = probe.report.macro["f1"]
    card = model.card.replace(name=name or out.stem, training=training, metrics=metrics,
                              stain=_training_stain(dataset, the_split.train, model.card.input_px))
    dev = next(model.parameters()).device
    model.cpu()
    save_checkpoint(model, card, out)
    model.to(dev)
    model.load_state_dict(final_state)
    notes = list(the_split.notes)
    result = TrainResult(checkpoint_paths(out)[0], model.card, report, probe, chance,
                         history[-1]["epoch"] if history else 0, steps, best["epoch"], stopped, notes)
    return result


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


def _last_stage(model):
    """The backbone's last stage (+ its final norm), trainable with ``finetune_last_stage``."""
    from torch import nn

    bb = model.backbone
    if hasattr(bb, "stages"):
        return nn.ModuleList([bb.stages[-1], bb.post_bn])
    inner = getattr(bb, "model", bb)
    for name in ("layer4", "stages", "blocks"):
        part = getattr(inner, name, None)
        if part is not None:
            return part[-1] if hasattr(part, "__getitem__") else part
    raise DatasetError("This backbone has no recognisable last stage to fine-tune.")
