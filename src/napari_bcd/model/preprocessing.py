"""How uint8 RGB pixels become network input.  Recorded in every model card."""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from ..errors import BcdError

__all__ = ["IMAGENET_MEAN", "IMAGENET_STD", "Preprocessing", "weights_preprocessing"]

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
_MODES = ("tf", "unit", "meanstd")


@dataclass(frozen=True)
class Preprocessing:
    """Pixel normalisation, applied on the device to uint8 RGB.

    Attributes
    ----------
    mode
        ``"tf"``: Keras "tf" mode, ``x / 127.5 - 1`` (the paper's ResNet152V2);
        ``"unit"``: ``x / 255``; ``"meanstd"``: ``(x / 255 - mean) / std``
        (timm and most PyTorch models).
    mean, std
        Per RGB channel, on the 0-1 scale; used by ``"meanstd"`` only.
    """

    mode: str = "tf"
    mean: tuple[float, float, float] = (0.0, 0.0, 0.0)
    std: tuple[float, float, float] = (1.0, 1.0, 1.0)

    def __post_init__(self) -> None:
        if self.mode not in _MODES:
            raise BcdError(f"Unknown preprocessing {self.mode!r}; use one of {', '.join(_MODES)}.")
        object.__setattr__(self, "mean", tuple(float(v) for v in self.mean))
        object.__setattr__(self, "std", tuple(float(v) for v in self.std))
        if len(self.mean) != 3 or len(self.std) != 3:
            raise BcdError("Give three values (R, G, B) for mean and std.")
        if any(s <= 0 for s in self.std):
            raise BcdError(f"std must be positive, got {self.std}.")

    @classmethod
    def imagenet(cls) -> Preprocessing:
        """The torchvision/timm ImageNet normalisation."""
        return cls("meanstd", IMAGENET_MEAN, IMAGENET_STD)

    @classmethod
    def parse(cls, text: str, mean: str | None = None, std: str | None = None) -> Preprocessing:
        """Build from command-line text: ``tf``, ``unit``, ``imagenet`` or ``meanstd`` + mean/std."""
        if text == "imagenet":
            return cls.imagenet()
        if text == "meanstd":
            if not mean or not std:
                raise BcdError("--preprocess meanstd needs --mean R,G,B and --std R,G,B (0-1 scale).")
            try:
                m = tuple(float(v) for v in mean.split(","))
                s = tuple(float(v) for v in std.split(","))
            except ValueError as err:
                raise BcdError(f"--mean/--std take three comma-separated numbers: {err}") from err
            return cls("meanstd", m, s)  # type: ignore[arg-type]
        return cls(text)

    def scale_shift(self) -> tuple[list[float], list[float]]:
        """Per channel ``a, b`` with ``normalised = a * uint8 + b``."""
        if self.mode == "tf":
            return [1 / 127.5] * 3, [-1.0] * 3
        if self.mode == "unit":
            return [1 / 255] * 3, [0.0] * 3
        return [1 / (255 * s) for s in self.std], [-m / s for m, s in zip(self.mean, self.std, strict=True)]

    def describe(self) -> str:
        """Short words for people, e.g. ``tf (x / 127.5 - 1)``."""
        if self.mode == "tf":
            return "tf (x / 127.5 - 1, Keras)"
        if self.mode == "unit":
            return "unit (x / 255)"
        if (self.mean, self.std) == (IMAGENET_MEAN, IMAGENET_STD):
            return "imagenet mean/std"
        fmt = ", ".join
        return f"mean/std ({fmt(f'{v:.3f}' for v in self.mean)} / {fmt(f'{v:.3f}' for v in self.std)})"

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Preprocessing:
        return cls(d.get("mode", "tf"), tuple(d.get("mean", (0, 0, 0))), tuple(d.get("std", (1, 1, 1))))


def weights_preprocessing(path: str | os.PathLike[str] | None) -> Preprocessing | None:
    """The preprocessing a safetensors weights file states in its metadata, or None.

    Understood metadata (string values, as safetensors stores them):
    ``preprocess`` (or ``preprocessing``): ``tf``, ``unit``, ``imagenet`` or
    ``meanstd``, or a JSON object ``{"mode": ..., "mean": [...], "std": [...]}``;
    ``mean`` and ``std``: three numbers as JSON or comma-separated, on the 0-1
    scale (values above 1 are taken as 0-255 and divided by 255).  ``mean``
    and ``std`` alone mean ``meanstd``.

    Raises
    ------
    BcdError
        When the metadata names a preprocessing that cannot be used.
    """
    if path is None or str(path) == "imagenet":
        return None
    p = Path(path)
    if p.suffix != ".safetensors" or not p.is_file():
        return None
    from safetensors import safe_open

    try:
        with safe_open(str(p), framework="pt") as f:
            meta = dict(f.metadata() or {})
    except Exception:  # noqa: BLE001 - an unreadable file is reported when its weights load
        return None
    text = meta.get("preprocess") or meta.get("preprocessing")
    mean, std = _triple(meta.get("mean")), _triple(meta.get("std"))
    if text and text.strip().startswith("{"):
        try:
            d = json.loads(text)
        except ValueError as err:
            raise BcdError(f"{p.name} states its preprocessing as invalid JSON ({err}); fix it or pass "
                           "--preprocess.") from err
        text, mean, std = d.get("mode"), _triple(d.get("mean")) or mean, _triple(d.get("std")) or std
    if not text and mean and std:
        text = "meanstd"
    if not text:
        return None
    text = str(text).strip().lower()
    if text == "imagenet":
        return Preprocessing.imagenet()
    if text == "meanstd":
        if not (mean and std):
            raise BcdError(f"{p.name} says preprocess=meanstd but gives no mean/std; pass --preprocess.")
        return Preprocessing("meanstd", mean, std)
    return Preprocessing(text)


def _triple(value: Any) -> tuple[float, float, float] | None:
    if value is None:
        return None
    if isinstance(value, str):
        value = value.strip()
        try:
            value = json.loads(value) if value.startswith("[") else [float(v) for v in value.split(",")]
        except ValueError as err:
            raise BcdError(f"Cannot read {value!r} as three numbers (R, G, B).") from err
    vals = tuple(float(v) for v in value)
    if len(vals) != 3:
        raise BcdError(f"Expected three numbers (R, G, B), got {len(vals)}.")
    if max(vals) > 1.0:
        vals = tuple(v / 255.0 for v in vals)
    return vals  # type: ignore[return-value]
