"""What a classification run does, as one frozen object: the engine, cohorts, the CLI, the Classify dock and the
demo all build a :class:`ClassifySettings` and hand it on, so a setting, its default and its check live here once.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from .errors import BcdError
from .geometry import as_pair

if TYPE_CHECKING:
    from .decision import DecisionRule
    from .tissue import TissueParams

__all__ = ["MIN_TISSUE", "PRECISIONS", "STAIN_NORMALIZATIONS", "TISSUE_THRESHOLD", "ClassifySettings"]

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

    def __post_init__(self) -> None:
        from .decision import DecisionRule

        if isinstance(self.decision, dict):
            object.__setattr__(self, "decision", DecisionRule.from_dict(self.decision))
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
            given = as_pair(self.mpp)
            if not all(math.isfinite(v) and v > 0 for v in given):
                raise BcdError(f"The pixel size must be a positive number of µm, got {self.mpp}.")

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
