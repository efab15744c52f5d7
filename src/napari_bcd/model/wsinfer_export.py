"""Export a napari-bcd model as a WSInfer model folder: QuPath's WSInfer extension and the ``wsinfer`` command run it.

The folder holds ``config.json`` (spec 1.0, :mod:`.wsinfer_config`), ``torchscript_model.pt`` (logits for the
transformed patch; WSInfer applies the softmax), our full card and a README with QuPath's steps.
"""

from __future__ import annotations

import dataclasses
import json
import os
import warnings
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from ..errors import BcdError
from .wsinfer_config import (
    WSINFER_CARD,
    WSINFER_CONFIG,
    WSINFER_MODEL,
    normalize_arguments,
    not_applied,
    wsinfer_config,
)

if TYPE_CHECKING:
    import torch

    from .card import ModelCard
    from .classifier import Classifier

__all__ = ["EXPORT_TOLERANCE", "WsinferExport", "export_wsinfer"]

#: How far the exported model's probabilities may be from ours on the same patch (fp32).
EXPORT_TOLERANCE = 1e-4


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
    from importlib.resources import as_file, files

    from ..io import open_slide

    with as_file(files("napari_bcd").joinpath("data", "CMU-1-Small-Region.svs")) as path, open_slide(path) as slide:
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
