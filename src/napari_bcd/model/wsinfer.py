"""WSInfer model folders: a napari-bcd model exported as one runs in QuPath's WSInfer extension and the ``wsinfer``
command; one from the WSInfer zoo (or a QuPath user's) opens here.

A WSInfer model folder holds ``config.json`` (the WSInfer model-config spec 1.0: classes, the patch's pixels and
µm per pixel, and a torchvision transform of Resize / ToTensor / Normalize) and ``torchscript_model.pt`` (logits for
the transformed patch; WSInfer applies the softmax).  Our preprocessing is ``a * uint8 + b`` per channel
(:meth:`~.preprocessing.Preprocessing.scale_shift`); ToTensor is ``uint8 / 255`` and Normalize ``(t - mean) / std``,
so ``std = 1 / (255 a)`` and ``mean = -b / (255 a)`` say exactly the same for every mode (the paper's ``tf``,
``unit``, ImageNet, any mean/std).
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import warnings
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from ..errors import BcdError, CheckpointError
from .card import is_wsinfer_folder

if TYPE_CHECKING:
    import torch

    from .card import ModelCard
    from .classifier import Classifier
    from .preprocessing import Preprocessing

__all__ = ["WSINFER_CARD", "WSINFER_CONFIG", "WSINFER_MODEL", "WsinferExport", "export_wsinfer", "is_torchscript",
           "is_wsinfer_folder", "load_wsinfer", "normalize_arguments", "preprocessing_from_transform",
           "read_wsinfer_config", "refuse_fine_tuning", "wsinfer_card", "wsinfer_config"]

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


@dataclasses.dataclass(frozen=True)
class WsinferExport:
    """What :func:`export_wsinfer` wrote and checked."""

    folder: Path
    config: dict
    not_applied: tuple[str, ...]
    max_difference: float
    files: tuple[Path, ...]


def export_wsinfer(checkpoint: str | os.PathLike[str], out_dir: str | os.PathLike[str], *, overwrite: bool = False,
                   patch: np.ndarray | None = None) -> WsinferExport:
    """Write ``checkpoint`` as a WSInfer model folder and prove it gives our probabilities.

    The network is traced to TorchScript in fp32 on the CPU (temperature and head folded in, as saved); the saved
    file is loaded back and run on a real H&E patch (``patch``, uint8 RGB; default: a field of the bundled slide)
    through WSInfer's ToTensor and Normalize, against our model on the same pixels: more than
    :data:`EXPORT_TOLERANCE` apart and nothing is written.

    Raises
    ------
    BcdError
        For a model the spec cannot express, a folder holding files napari-bcd did not write (without
        ``overwrite``), or an export that does not reproduce the model.
    """
    import torch

    from .._fileio import check_output, output_file, output_path
    from .checkpoint import load_checkpoint

    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise BcdError(f"{out} is a file; give a folder for the WSInfer model.")
    replace = "any" if overwrite else "ours"
    names = (WSINFER_CONFIG, WSINFER_MODEL, WSINFER_CARD, "README.md")
    for name in names:  # before any work
        check_output(out / name, replace)
    model = load_checkpoint(checkpoint).float().eval().cpu()
    card = model.card
    config = wsinfer_config(card)
    h = card.input_px[0]
    pixels = _check_patch(patch if patch is not None else _sample_patch(), h)
    example = torch.from_numpy(pixels.copy()).permute(2, 0, 1)[None].float() / 255.0
    norm = normalize_arguments(card.preprocessing)
    mean = torch.tensor(norm["mean"]).view(1, 3, 1, 1)
    std = torch.tensor(norm["std"]).view(1, 3, 1, 1)
    with torch.inference_mode():
        ours = model.predict_proba(model.normalise(torch.from_numpy(pixels.copy())[None])).numpy()
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # TorchScript's deprecation notices: QuPath and wsinfer load only it
        traced = torch.jit.trace(_logits_module(model), ((example - mean) / std,), check_trace=False)
    out.mkdir(parents=True, exist_ok=True)
    with output_path(out / WSINFER_MODEL, replace) as tmp:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            torch.jit.save(traced, str(tmp))
            loaded = torch.jit.load(str(tmp), map_location="cpu").eval()
        with torch.no_grad():
            theirs = torch.softmax(loaded((example - mean) / std).float(), dim=1).numpy()
        diff = float(np.abs(theirs - ours).max())
        if not diff <= EXPORT_TOLERANCE:
            raise BcdError(f"The exported model's probabilities differ from napari-bcd's by {diff:.2g} on the same "
                           f"patch (allowed {EXPORT_TOLERANCE:g}); nothing was written. Please report this model.")
    caveats = tuple(not_applied(card))
    doc = {**json.loads(card.to_json()), "wsinfer_export": {
        "from": str(checkpoint), "weights_sha256": card.weights_sha256, "config": config,
        "max_probability_difference": diff, "not_applied_by_wsinfer": list(caveats)}}
    with output_file(out / WSINFER_CONFIG, "w", replace) as fh:
        json.dump(config, fh, indent=2)
    with output_file(out / WSINFER_CARD, "w", replace) as fh:
        json.dump(doc, fh, indent=2)
    with output_file(out / "README.md", "w", replace) as fh:
        fh.write(_readme(card, config, caveats, diff))
    return WsinferExport(out, config, caveats, diff, tuple(out / n for n in names))


def _logits_module(model: Classifier) -> torch.nn.Module:
    """The network alone: normalised NCHW in, logits out (what WSInfer's runners call)."""
    import torch

    class Logits(torch.nn.Module):
        def __init__(self, net: Classifier) -> None:
            super().__init__()
            self.backbone, self.head = net.backbone, net.head

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.head(self.backbone(x))

    return Logits(model).eval()


def _sample_patch() -> np.ndarray:
    """A tissue field of the bundled real Aperio slide (a 512 px square at level 0, 83 % tissue)."""
    from .._sample_data import SAMPLE_SLIDE
    from ..io import open_slide

    with open_slide(SAMPLE_SLIDE) as slide:
        return np.asarray(slide.read_region(0, 1000, 900, 512, 512))[..., :3]


def _check_patch(patch: np.ndarray, px: int) -> np.ndarray:
    """``patch`` resized to the model's ``px`` (PIL bilinear, as WSInfer's Resize), uint8 RGB."""
    from PIL import Image

    a = np.asarray(patch)
    if a.ndim != 3 or a.shape[2] < 3:
        raise BcdError(f"The check patch must be an RGB image, got shape {a.shape}.")
    img = Image.fromarray(np.ascontiguousarray(a[..., :3]).astype(np.uint8))
    return np.asarray(img.resize((px, px), Image.BILINEAR))


def _readme(card: ModelCard, config: dict, caveats: tuple[str, ...], diff: float) -> str:
    lines = [
        f"# {card.name or 'napari-bcd model'} (WSInfer model folder)",
        "",
        f"Classes: {', '.join(card.classes)}. Patch: {config['patch_size_pixels']} px at "
        f"{config['spacing_um_px']:.4g} µm/px. Exported by napari-bcd; the TorchScript gave napari-bcd's "
        f"probabilities within {diff:.1g} on a real H&E patch.",
        "",
        "QuPath (WSInfer extension): copy this folder into the `local` folder of the extension's model directory "
        "(Extensions > WSInfer, the model directory under Advanced), restart the dialog, choose it in the model list, "
        "select the annotations, Run.",
        "wsinfer: `wsinfer run --wsi-dir SLIDES --results-dir OUT --config config.json --model-path "
        "torchscript_model.pt`.",
        "",
        "Not applied outside napari-bcd:",
        *(f"- {c}" for c in caveats),
        "",
        f"The full model card is in {WSINFER_CARD}.",
        "",
    ]
    return "\n".join(lines)


# --- opening one here ----------------------------------------------------------------------------------------------


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


def wsinfer_card(folder: str | os.PathLike[str], weights_sha256: str = "") -> ModelCard:
    """The model card of a WSInfer model folder: classes, patch and preprocessing from its ``config.json``; the
    name, decision rule and provenance from our own card beside it when napari-bcd exported it."""
    from .card import ModelCard

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
    return ModelCard(
        classes=tuple(config["class_names"]), backbone=f"wsinfer:{config.get('architecture') or 'torchscript'}",
        backbone_weights=str(p / WSINFER_MODEL), head={"type": "torchscript", "format": "wsinfer"},
        input_px=size, field_um=(field, field), preprocessing=preprocessing_from_transform(config["transform"]),
        weights_sha256=weights_sha256, **{"name": p.name, **extra})


def load_wsinfer(folder: str | os.PathLike[str], *, device: str | torch.device = "cpu") -> Classifier:
    """A WSInfer model folder as a :class:`~.classifier.Classifier` the engine runs (its TorchScript is the
    network; no head of ours).  It cannot be fine-tuned: :func:`is_torchscript` says so to those who would."""
    import torch

    from .._fileio import file_digest
    from .classifier import Classifier

    p = Path(folder)
    sha = file_digest(p / WSINFER_MODEL)
    card = wsinfer_card(p, sha)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            net = torch.jit.load(str(p / WSINFER_MODEL), map_location="cpu")
    except (RuntimeError, OSError, ValueError) as err:
        raise CheckpointError(f"{p / WSINFER_MODEL} is not a TorchScript model PyTorch can load "
                              f"({str(err).splitlines()[0] if str(err) else err}).") from None
    model = Classifier(net, torch.nn.Identity(), card)
    model.preprocessing_source = f"{WSINFER_CONFIG} (its Normalize)"
    try:  # one real-size input: the classes the config names must be what the network gives
        with torch.no_grad():
            out = model(torch.zeros(1, 3, *card.input_px))
    except RuntimeError as err:
        raise CheckpointError(f"{p / WSINFER_MODEL} does not run on a {card.input_px[0]} x {card.input_px[1]} "
                              f"patch ({str(err).splitlines()[0]}).") from None
    if out.ndim != 2 or out.shape[1] != len(card.classes):
        raise CheckpointError(f"{p / WSINFER_MODEL} gives {tuple(out.shape)} outputs for one patch but its "
                              f"config names {len(card.classes)} classes. Use the config written with this model.")
    model.source_path, model.weights_sha256 = str(p), sha
    return model.to(device).eval()


def is_torchscript(card: ModelCard) -> bool:
    """Whether a card is a WSInfer/TorchScript model's: run here, never fine-tuned."""
    return (card.head or {}).get("type") == "torchscript"


def refuse_fine_tuning(card: ModelCard, what: str = "fine-tune") -> None:
    """Say at once why a TorchScript (WSInfer) model cannot be trained further."""
    if is_torchscript(card):
        raise CheckpointError(
            f"{card.name} is a WSInfer model (TorchScript): napari-bcd runs it but cannot {what} it, as its layers "
            "are compiled. Train a model of your own on the same regions (napari-bcd train, or the Train dock), "
            "then export it back with napari-bcd model export --format wsinfer.")
