"""WSInfer model folders opened here: the zoo's, a QuPath user's, or one exported by napari-bcd
(:mod:`.wsinfer_export`).  Its TorchScript is the network the engine runs; it is never fine-tuned.

TorchScript is loaded with PyTorch's TorchScript loader (no Python pickle runs); run models from sources you trust.
"""

from __future__ import annotations

import os
import warnings
from pathlib import Path
from typing import TYPE_CHECKING

from ..errors import CheckpointError
from .card import ModelCard
from .wsinfer_config import WSINFER_CONFIG, WSINFER_MODEL, wsinfer_card_fields

if TYPE_CHECKING:
    import torch

    from .classifier import Classifier

__all__ = ["is_torchscript", "load_wsinfer", "refuse_fine_tuning", "wsinfer_card"]


def wsinfer_card(folder: str | os.PathLike[str], weights_sha256: str = "") -> ModelCard:
    """The :class:`~.card.ModelCard` of a WSInfer model folder (:func:`~.wsinfer_config.wsinfer_card_fields`)."""
    return ModelCard(**wsinfer_card_fields(folder, weights_sha256))


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
