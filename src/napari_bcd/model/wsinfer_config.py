"""WSInfer model configs (``config.json``, spec 1.0): read and checked, our preprocessing said as its Normalize, and a
card's fields from one.  No torch: a card is read without loading a network.

Our preprocessing is ``a * uint8 + b`` per channel (:meth:`~.preprocessing.Preprocessing.scale_shift`); WSInfer's
ToTensor is ``uint8 / 255`` and Normalize ``(t - mean) / std``, so ``std = 1 / (255 a)`` and ``mean = -b / (255 a)``
say exactly the same for every mode (the paper's ``tf``, ``unit``, ImageNet, any mean/std).
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..errors import BcdError, CheckpointError

if TYPE_CHECKING:
    from .card import ModelCard
    from .preprocessing import Preprocessing

__all__ = ["SPEC_VERSION", "WSINFER_CARD", "WSINFER_CONFIG", "WSINFER_MODEL", "normalize_arguments", "not_applied",
           "preprocessing_from_transform", "read_wsinfer_config", "wsinfer_card_fields", "wsinfer_config"]

WSINFER_CONFIG = "config.json"
WSINFER_MODEL = "torchscript_model.pt"
#: Our full model card beside the WSInfer files (WSInfer and QuPath ignore it).
WSINFER_CARD = "napari-bcd-card.json"
SPEC_VERSION = "1.0"
#: How far the exported model's probabilities may be from ours on the same patch (fp32).
EXPORT_TOLERANCE = 1e-4
_TRANSFORMS = ("Resize", "ToTensor", "Normalize")


def normalize_arguments(pre: Preprocessing) -> dict[str, list[float]]:
    """torchvision ``Normalize`` arguments equal to ``pre`` after ``ToTensor``."""
    scale, shift = pre.scale_shift()
    std = [1.0 / (255.0 * a) for a in scale]
    mean = [-b / (255.0 * a) for a, b in zip(scale, shift, strict=True)]
    return {"mean": mean, "std": std}


def preprocessing_from_transform(transform: list[dict]) -> Preprocessing:
    """Our :class:`~.preprocessing.Preprocessing` for a WSInfer transform list (ToTensor, then Normalize or not)."""
    from .preprocessing import Preprocessing

    names = [t.get("name") for t in transform]
    if "ToTensor" not in names:
        raise BcdError("This WSInfer model's transform has no ToTensor: napari-bcd does not know the scale its "
                       "network expects.")
    norm = next((t for t in transform if t.get("name") == "Normalize"), None)
    if norm is None:
        return Preprocessing("unit")
    args = norm.get("arguments") or {}
    try:
        return Preprocessing("meanstd", tuple(args["mean"]), tuple(args["std"]))
    except (KeyError, TypeError) as err:
        raise BcdError(f"This WSInfer model's Normalize needs mean and std of three values each ({err}).") from None


def wsinfer_config(card: ModelCard) -> dict[str, Any]:
    """The WSInfer ``config.json`` for a model card (spec 1.0).

    Raises
    ------
    BcdError
        When the card's patch cannot be said in the spec: WSInfer patches are square, one size in pixels and one
        µm per pixel.
    """
    (h, w), (fh, fw) = card.input_px, card.field_um
    if h != w or not math.isclose(fh / h, fw / w, rel_tol=1e-6):
        raise BcdError(f"WSInfer models take square patches at one µm per pixel; this model's input is {h} x {w} px "
                       f"of {fh:.0f} x {fw:.0f} µm (the paper's model sees a 4:3 photo squeezed square), so QuPath "
                       "would show it another shape. Train or fine-tune it on a square field (--field-um 645) to "
                       "export it.")
    return {
        "spec_version": SPEC_VERSION,
        "architecture": card.backbone.removeprefix("timm:"),
        "num_classes": len(card.classes),
        "class_names": list(card.classes),
        "patch_size_pixels": int(h),
        "spacing_um_px": fh / h,
        "transform": [
            {"name": "Resize", "arguments": {"size": int(h)}},
            {"name": "ToTensor"},
            {"name": "Normalize", "arguments": normalize_arguments(card.preprocessing)},
        ],
    }


def not_applied(card: ModelCard) -> list[str]:
    """What this model does here that a WSInfer runner (QuPath included) will not, in words."""
    from ..decision import DecisionRule

    out = []
    rule = DecisionRule.from_dict(card.decision) if card.decision else None
    if rule is not None and not rule.is_default:
        out.append(f"its decision rule ({rule.describe()}): QuPath and wsinfer label each patch with the most "
                   "probable class and show no 'uncertain'")
    out.append("napari-bcd's tissue detection, overlap and stain normalisation: QuPath tiles the regions you select "
               "(wsinfer its own tissue mask), without overlap, on the slide's own stain")
    return out


def read_wsinfer_config(folder: str | os.PathLike[str]) -> dict:
    """A WSInfer ``config.json``, checked against the spec's required fields and types, with what is wrong said."""
    p = Path(folder) / WSINFER_CONFIG
    try:
        doc = json.loads(p.read_text(encoding="utf-8"))
    except (OSError, ValueError) as err:
        raise CheckpointError(f"{p} is not a readable JSON file ({err}).") from None
    problems = []
    if not isinstance(doc, dict):
        raise CheckpointError(f"{p} must hold a JSON object.")
    for key, kind in (("num_classes", int), ("patch_size_pixels", int), ("spacing_um_px", (int, float)),
                      ("class_names", list), ("transform", list)):
        if not isinstance(doc.get(key), kind) or isinstance(doc.get(key), bool):
            problems.append(f"{key} missing or not a {getattr(kind, '__name__', 'number')}")
    if not problems:
        names = doc["class_names"]
        if len(names) != doc["num_classes"] or len(set(names)) != len(names) or not all(
                isinstance(n, str) and n for n in names):
            problems.append("class_names must be num_classes distinct names")
        if doc["patch_size_pixels"] < 1 or not doc["spacing_um_px"] > 0:
            problems.append("patch_size_pixels and spacing_um_px must be positive")
        bad = [t.get("name") if isinstance(t, dict) else t for t in doc["transform"]
               if not isinstance(t, dict) or t.get("name") not in _TRANSFORMS]
        if bad:
            problems.append(f"transform steps {bad} are not in the spec (Resize, ToTensor, Normalize)")
    if problems:
        raise CheckpointError(f"{p} is not a valid WSInfer model config: " + "; ".join(problems) + ".")
    return doc


def wsinfer_card_fields(folder: str | os.PathLike[str], weights_sha256: str = "") -> dict[str, Any]:
    """The model card (as :class:`~.card.ModelCard`'s fields) of a WSInfer model folder: classes, patch and
    preprocessing from its ``config.json``; the name, decision rule and provenance from our own card beside it
    when napari-bcd exported it."""
    p = Path(folder)
    config = read_wsinfer_config(p)
    px = int(config["patch_size_pixels"])
    size = next((t.get("arguments", {}).get("size") for t in config["transform"] if t.get("name") == "Resize"), px)
    size = (size, size) if isinstance(size, int) else tuple(size)
    if len(size) != 2 or not all(isinstance(v, int) and v > 0 for v in size):
        raise CheckpointError(f"{p / WSINFER_CONFIG}: Resize size must be a positive number of pixels, got {size}.")
    field = px * float(config["spacing_um_px"])
    extra: dict[str, Any] = {}
    ours = p / WSINFER_CARD
    if ours.is_file():  # exported by napari-bcd: keep what the config cannot say
        try:
            doc = json.loads(ours.read_text(encoding="utf-8"))
            if list(doc.get("classes") or []) == list(config["class_names"]):
                extra = {k: doc[k] for k in ("name", "training", "metrics", "decision", "stain") if doc.get(k)}
        except (OSError, ValueError, AttributeError):
            extra = {}
    return {"classes": tuple(config["class_names"]),
            "backbone": f"wsinfer:{config.get('architecture') or 'torchscript'}",
            "backbone_weights": str(p / WSINFER_MODEL), "head": {"type": "torchscript", "format": "wsinfer"},
            "input_px": size, "field_um": (field, field),
            "preprocessing": preprocessing_from_transform(config["transform"]), "weights_sha256": weights_sha256,
            "name": p.name, **extra}


