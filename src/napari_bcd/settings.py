"""What a run does, as one frozen object: the engine, cohorts, the CLI, the Classify dock and the demo all build a
:class:`ClassifySettings` and hand it on; training takes one :class:`TrainSettings`.  A setting, its default, its
choices and its check live here once.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from .errors import BcdError
from .geometry import as_pair, pixel_size

if TYPE_CHECKING:
    from .decision import DecisionRule
    from .tissue import TissueParams

__all__ = ["DECODE_MODES", "DEVICES", "FEATURE_PRECISIONS", "GROUP_KINDS", "MIN_TISSUE", "PRECISIONS",
           "QC_ACTIONS", "QC_REASONS", "STAIN_NORMALIZATIONS", "TISSUE_THRESHOLD", "TRAIN_PROTOCOLS", "VALIDATIONS",
           "ClassifySettings", "QCSettings", "TrainSettings"]

#: A window is classified when at least this share of it is tissue.
MIN_TISSUE = 0.25
#: Minimum saturation of a tissue pixel (:class:`~napari_bcd.tissue.TissueParams`).
TISSUE_THRESHOLD = 0.1
#: Number formats a model runs in (:class:`~napari_bcd.model.Predictor`).
PRECISIONS = ("auto", "fp32", "bf16", "fp16", "int8")
#: Stain normalisations (:mod:`napari_bcd.stain`).
STAIN_NORMALIZATIONS = ("none", "macenko", "vahadane")
#: Where JPEG tiles are decoded (:mod:`napari_bcd.io.device_decode`).
DECODE_MODES = ("auto", "cpu", "device")
#: Where a model runs (*auto*: a CUDA GPU, else Apple's MPS, else the CPU; ``"cuda:1"`` names a GPU).
DEVICES = ("auto", "cpu", "cuda", "mps")


#: Field metadata of a setting that changes only how fast a run is, never its outputs.
_SPEED = {"speed_only": True}


def _is_speed(name: str) -> bool:
    return bool(ClassifySettings.__dataclass_fields__[name].metadata.get("speed_only"))


def _jsonable(v: Any) -> Any:
    if hasattr(v, "to_dict"):
        return v.to_dict()
    if isinstance(v, tuple):
        return [_jsonable(x) for x in v]
    return v


#: Why quality control fails a window (:mod:`napari_bcd.qc`), in the order they are tried.
QC_REASONS = ("pen", "fold", "debris", "blur")
#: What becomes of a failing window: not sent to the model, or classified and set aside (its probabilities kept
#: for a look, never in a label, an area or the call).
QC_ACTIONS = ("skip", "set_aside")

@dataclass(frozen=True)
class QCSettings:
    """What the quality control looks for and what it does (checked when made).

    Attributes
    ----------
    enabled
        Run the pass (False: every tissue window is classified, as before).
    action
        ``"skip"``: failing windows are not classified; ``"set_aside"``: classified, kept out of labels, areas
        and the call.
    pen, fold, debris
        A window fails when at least this share of it is ink / fold / bubble-edge-or-debris.
    blur
        A window fails when its sharpness is below this fraction of the slide's median.
    """

    enabled: bool = True
    action: str = "skip"
    pen: float = 0.2
    fold: float = 0.35
    debris: float = 0.02
    blur: float = 0.6

    def __post_init__(self) -> None:
        problems = []
        if self.action not in QC_ACTIONS:
            problems.append(f"Unknown QC action {self.action!r}; use one of {', '.join(QC_ACTIONS)}")
        for name in QC_REASONS:
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int | float) or not math.isfinite(v) or not 0 <= v <= 1:
                problems.append(f"The QC {name} threshold is a fraction between 0 and 1, got {v!r}")
        if problems:
            raise BcdError("; ".join(problems) + ".")

    def replace(self, **changes: Any) -> QCSettings:
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict | QCSettings | None) -> QCSettings:
        if isinstance(d, QCSettings):
            return d
        if d is None:
            return cls()
        if not isinstance(d, dict):
            raise BcdError(f"QC settings must be an object, got {type(d).__name__}.")
        known = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in known})

    def describe(self) -> str:
        if not self.enabled:
            return "quality control off"
        what = "skipped" if self.action == "skip" else "classified and set aside"
        return (f"windows with pen >= {self.pen:.0%}, fold >= {self.fold:.0%}, debris >= {self.debris:.0%} or "
                f"sharpness < {self.blur:.0%} of the slide's are {what}")


@dataclass(frozen=True)
class ClassifySettings:
    """Settings of a classification run (checked when made: a bad value is a :class:`BcdError`).

    Attributes
    ----------
    stride, stride_um
        Window step as a fraction of the field (1 = no overlap, 0.5 = half), or in µm (wins).
    tissue_threshold
        Minimum saturation of a tissue pixel (0-1).
    min_tissue
        A window is classified when at least this share of it is tissue.
    min_area
        mm² a class must exceed to make the slide-level call.
    decision
        Per-class thresholds and uncertainty cut-offs; None: the model card's rule.
    mpp
        Level-0 µm/px for images whose file does not say (or says wrong).
    batch_size
        Windows per model call (None: 128 on CUDA, 4 on the CPU).
    device, precision, compile
        Where and how the model runs (:class:`~napari_bcd.model.Predictor`).
    workers, prefetch
        Decoding threads (None: one per core, up to 8) and batches read ahead of the model.
    quality
        Score each window's image quality (pen, blur, folds); None: only when the rule uses it.
    stain_normalize
        ``"none"``, ``"macenko"`` or ``"vahadane"``.
    decode
        Where JPEG tiles are decoded: ``"auto"``, ``"cpu"`` or ``"device"``.
    refine
        Adaptive overlap (:mod:`napari_bcd.engine.refine`): windows one field apart first, then the
        overlapping windows of ``stride`` only where neighbouring cells disagree or the margin is low.
    tta
        Test-time augmentation: every window's probabilities averaged over its 8 flips and rotations (8x the
        model's work), and how far they disagree kept per cell for the review queue.
    qc
        Quality control before the classifier (:class:`~napari_bcd.qc.QCSettings`): pen, folds, debris and
        blur found and left out of the map.
    """

    stride: float | tuple[float, float] = 1.0
    stride_um: float | tuple[float, float] | None = None
    tissue_threshold: float = TISSUE_THRESHOLD
    min_tissue: float = MIN_TISSUE
    min_area: float = 0.0
    decision: DecisionRule | None = None
    mpp: float | tuple[float, float] | None = None
    batch_size: int | None = field(default=None, metadata=_SPEED)
    device: str = field(default="auto", metadata=_SPEED)
    precision: str = "auto"
    compile: bool = field(default=False, metadata=_SPEED)
    workers: int | None = field(default=None, metadata=_SPEED)
    prefetch: int = field(default=2, metadata=_SPEED)
    quality: bool | None = None
    stain_normalize: str = "none"
    decode: str = field(default="auto", metadata=_SPEED)
    refine: bool = False
    qc: QCSettings = field(default_factory=QCSettings)
    tta: bool = False

    def __post_init__(self) -> None:
        from .decision import DecisionRule

        if isinstance(self.decision, dict):
            object.__setattr__(self, "decision", DecisionRule.from_dict(self.decision))
        if not isinstance(self.qc, QCSettings):
            object.__setattr__(self, "qc", QCSettings.from_dict(self.qc))
        problems = []

        def share(name: str, v: float) -> None:
            if not (isinstance(v, int | float) and math.isfinite(v) and 0 <= v <= 1):
                problems.append(f"{name} is a fraction between 0 and 1, got {v}")

        share("min_tissue", self.min_tissue)
        share("The tissue threshold", self.tissue_threshold)
        if not (isinstance(self.min_area, int | float) and math.isfinite(self.min_area) and self.min_area >= 0):
            problems.append(f"min_area is mm², 0 or more, got {self.min_area}")
        if self.batch_size is not None and (not isinstance(self.batch_size, int) or self.batch_size < 1):
            problems.append(f"batch_size must be at least 1, got {self.batch_size}")
        if self.workers is not None and (not isinstance(self.workers, int) or self.workers < 1):
            problems.append(f"workers must be at least 1, got {self.workers}")
        if not isinstance(self.prefetch, int) or self.prefetch < 1:
            problems.append(f"prefetch must be at least 1, got {self.prefetch}")
        for name, value, allowed in (("precision", self.precision, PRECISIONS),
                                     ("stain normalisation", self.stain_normalize, STAIN_NORMALIZATIONS),
                                     ("decode mode", self.decode, DECODE_MODES)):
            if value not in allowed:
                problems.append(f"Unknown {name} {value!r}; use one of {', '.join(allowed)}")
        if problems:
            raise BcdError("; ".join(problems) + ".")
        if self.mpp is not None:
            pixel_size(self.mpp)

    @property
    def tissue(self) -> TissueParams:
        from .tissue import TissueParams

        return TissueParams(threshold=self.tissue_threshold)

    def replace(self, **changes: Any) -> ClassifySettings:
        """A copy with some settings changed (checked again)."""
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        """Every setting as JSON data (the decision rule as its dict, pairs as lists)."""
        return {f.name: _jsonable(getattr(self, f.name)) for f in dataclasses.fields(self)}

    @classmethod
    def from_dict(cls, d: dict[str, Any] | None) -> ClassifySettings:
        """Settings from :meth:`to_dict`'s data (unknown keys, from a newer version, are ignored)."""
        if not d:
            return cls()
        if not isinstance(d, dict):
            raise BcdError(f"Run settings must be an object, got {type(d).__name__}.")
        known = {f.name: f for f in dataclasses.fields(cls)}
        values = {k: tuple(v) if isinstance(v, list) else v for k, v in d.items() if k in known}
        return cls(**values)

    def output_settings(self) -> dict[str, Any]:
        """The settings that can change a run's outputs: all of them but those that only change its speed
        (device, batch, threads, decoding, compiling).  A done-record keeps them, so a rerun with the same ones may
        skip the slide, and a setting added here is covered without a list to remember."""
        return {k: v for k, v in self.to_dict().items() if not _is_speed(k)}

    def differences(self, other: ClassifySettings) -> list[str]:
        """The output settings where ``other`` differs from these, each as ``name: ours -> theirs``."""
        mine, theirs = self.output_settings(), other.output_settings()
        return [f"{k}: {mine[k]!r} -> {theirs[k]!r}" for k in mine if mine[k] != theirs.get(k)]


#: Training protocols (:mod:`napari_bcd.train.protocol`): ``auto`` (the default) and the paper's exactly.
TRAIN_PROTOCOLS = ("auto", "paper")
#: How a training run is validated (:func:`~napari_bcd.train.select.plan_validation`).
VALIDATIONS = ("auto", "cv", "holdout")
#: The number format backbone features are computed in for training (*auto*: bf16 where it runs fast).
FEATURE_PRECISIONS = ("auto", "fp32", "bf16")
#: What training groups can be, for the reports.
GROUP_KINDS = ("patient", "slide", "region")


@dataclass(frozen=True)
class TrainSettings:
    """Settings of a training run (checked when made: a bad value is a :class:`BcdError`): the one place of their
    defaults and choices; the CLI and the Train dock build one and hand it to
    :func:`~napari_bcd.train.iter_finetune`.

    Attributes
    ----------
    protocol
        ``"auto"`` (the default) or ``"paper"`` (:data:`TRAIN_PROTOCOLS`).
    backbone, backbone_weights
        The network (``"resnet152v2"`` or ``"timm:<name>"``) and its starting weights (``"imagenet"``, a file, or
        None for random).
    input_px, field_um, preprocessing
        What one input is: pixels, µm (None: the patches' recorded field, else the ICIAR photo's) and the pixel
        normalisation (None: what the weights state, else the backbone's own).
    epochs, lr, batch_size, val_fraction, augment
        Overrides of the protocol's values (None: the protocol's).
    seed
        The random seed of splits, folds and training.
    split
        None, ``"bach-patient"``, or a file of validation names (a hold-out).
    validation, folds
        ``"auto"``, ``"cv"`` or ``"holdout"`` (None: the protocol's); cross-validation folds, at most (None: 10 over
        groups, 5 over images: :data:`~napari_bcd.train.select.GROUP_FOLDS`).
    stain_augment
        Also train on stain-jittered copies of every view.
    device, feature_batch, feature_precision, cache
        Where the backbone runs, images per backbone call, the features' number format (:data:`FEATURE_PRECISIONS`),
        and whether features are cached between runs.
    name, overwrite
        The model's name (default: the file's stem); replace an existing checkpoint (True), only one napari-bcd
        wrote and nobody changed since (``"ours"``), or none (False).
    """

    protocol: str = "auto"
    backbone: str = "resnet152v2"
    backbone_weights: Any = "imagenet"
    input_px: tuple[int, int] = (256, 256)
    field_um: tuple[float, float] | None = None
    preprocessing: Any = None
    epochs: int | None = None
    lr: float | None = None
    batch_size: int | None = None
    val_fraction: float | None = None
    augment: bool | None = None
    seed: int = 0
    split: Any = None
    validation: str | None = None
    folds: int | None = None
    stain_augment: bool = False
    device: str | None = None
    feature_batch: int = 8
    feature_precision: str = "auto"
    cache: bool = True
    name: str | None = None
    overwrite: bool | str = False

    def __post_init__(self) -> None:
        if isinstance(self.input_px, int):
            object.__setattr__(self, "input_px", (self.input_px, self.input_px))
        if self.field_um is not None and not isinstance(self.field_um, tuple):
            object.__setattr__(self, "field_um", as_pair(self.field_um))
        problems = []
        for name, value, allowed in (("protocol", self.protocol, TRAIN_PROTOCOLS),
                                     ("validation", self.validation, (None, *VALIDATIONS)),
                                     ("feature precision", self.feature_precision, FEATURE_PRECISIONS)):
            if value not in allowed:
                problems.append(f"Unknown {name} {value!r}; use one of {', '.join(a for a in allowed if a)}")

        def whole(name: str, v: Any, low: int) -> None:
            if v is not None and not (isinstance(v, int) and not isinstance(v, bool) and v >= low):
                problems.append(f"{name} must be a whole number of at least {low}, got {v}")

        if self.overwrite not in (True, False, "ours"):
            problems.append(f"overwrite must be True, False or 'ours', got {self.overwrite!r}")
        whole("epochs", self.epochs, 1)
        whole("batch_size", self.batch_size, 1)
        whole("feature_batch", self.feature_batch, 1)
        whole("folds", self.folds, 2)
        if self.lr is not None and not (isinstance(self.lr, int | float) and math.isfinite(self.lr) and self.lr > 0):
            problems.append(f"The learning rate must be a positive number, got {self.lr}")
        if self.val_fraction is not None and not (isinstance(self.val_fraction, int | float)
                                                  and 0 <= self.val_fraction < 1):
            problems.append(f"The validation fraction must be in [0, 1), got {self.val_fraction}")
        if len(self.input_px) != 2 or not all(isinstance(v, int) and 32 <= v <= 4096 for v in self.input_px):
            problems.append(f"input_px must be two sizes of 32-4096 px, got {self.input_px}")
        if self.field_um is not None and not all(math.isfinite(v) and v > 0 for v in self.field_um):
            problems.append(f"The field must be positive µm, got {self.field_um}")
        if problems:
            raise BcdError("; ".join(problems) + ".")

    def replace(self, **changes: Any) -> TrainSettings:
        """A copy with some settings changed (checked again)."""
        return dataclasses.replace(self, **changes)
