"""The whole classifier: a backbone (:mod:`.backbones`), the Table II head, and its pixel normalisation."""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from ..errors import BcdError
from .backbones import PAPER_BACKBONE, backbone_spec, build_backbone, check_backbone_weights
from .card import ModelCard
from .head import build_head
from .preprocessing import Preprocessing, weights_preprocessing
from .timm_backbone import TimmBackbone

__all__ = [
    "Classifier",
    "TimmBackbone",
    "build_backbone",
    "build_classifier",
    "check_backbone_weights",
    "set_head",
    "weights_preprocessing",
]

log = logging.getLogger(__name__)


class Classifier(nn.Module):
    """Backbone + Table II head, taking preprocessed NCHW float or raw uint8 NHWC.

    Attributes
    ----------
    card
        The :class:`ModelCard` describing this model (classes, field, preprocessing...).
    """

    def __init__(self, backbone: nn.Module, head: nn.Module, card: ModelCard) -> None:
        super().__init__()
        self.backbone = backbone
        self.head = head
        self.card = card
        #: Where the preprocessing came from (given, the weights file, the backbone's default...).
        self.preprocessing_source = ""
        #: The checkpoint it was loaded from and its weights' hash ("" for a model built here).
        self.source_path = ""
        self.weights_sha256 = ""
        # Not persistent: the card, not the weights file, records preprocessing.
        self.register_buffer("_scale", torch.zeros(1, 3, 1, 1), persistent=False)
        self.register_buffer("_shift", torch.zeros(1, 3, 1, 1), persistent=False)
        self.reset_preprocessing()

    def reset_preprocessing(self) -> None:
        """(Re)make the normalisation buffers from the card, on the module's device."""
        scale, shift = self.card.preprocessing.scale_shift()
        device = next((p.device for p in self.parameters() if not p.is_meta), torch.device("cpu"))
        self._scale = torch.tensor(scale, device=device).view(1, 3, 1, 1)
        self._shift = torch.tensor(shift, device=device).view(1, 3, 1, 1)

    @property
    def classes(self) -> tuple[str, ...]:
        return self.card.classes

    def normalise(self, x: torch.Tensor) -> torch.Tensor:
        """uint8 ``N x H x W x 3`` (on any device) -> normalised float NCHW.

        The permute keeps the NHWC memory order, i.e. channels_last.
        """
        x = x.permute(0, 3, 1, 2).to(self._scale.dtype)
        return x * self._scale + self._shift

    def normalise_float(self, x: torch.Tensor) -> torch.Tensor:
        """Float NCHW on the 0-255 scale (a resized uint8 batch) -> normalised input."""
        return x * self._scale + self._shift

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits for preprocessed NCHW input."""
        return self.head(self.backbone(x))

    def forward_uint8(self, x: torch.Tensor) -> torch.Tensor:
        """Logits for uint8 NHWC RGB input."""
        return self(self.normalise(x))

    def predict_proba(self, x: torch.Tensor) -> torch.Tensor:
        """Softmax probabilities (the paper's last layer) for preprocessed input."""
        return torch.softmax(self(x).float(), dim=1)


def set_head(model: Classifier, kind: str) -> Classifier:
    """Give ``model`` a fresh head of ``kind`` (:data:`~.head.HEADS`) on its feature map, and say so in its card."""
    fh, fw = (model.card.head or {}).get("feature_hw") or feature_shape(model.backbone, model.card.input_px)[1:]
    channels = int((model.card.head or {}).get("in_channels") or feature_shape(model.backbone, model.card.input_px)[0])
    device = next((p.device for p in model.head.parameters()), torch.device("cpu"))
    model.head = build_head(kind, channels, (int(fh), int(fw)), len(model.card.classes)).to(device)
    desc: dict[str, Any] = {"type": kind, "in_channels": channels, "feature_hw": [int(fh), int(fw)]}
    if kind == "table2":
        desc["activation"] = "relu"
    model.card = model.card.replace(head=desc)
    return model


def feature_shape(backbone: nn.Module, input_px: tuple[int, int]) -> tuple[int, int, int]:
    """``(channels, h, w)`` of the backbone's feature map for an input of ``input_px``."""
    from .resnet152v2 import ResNet152V2

    if isinstance(backbone, ResNet152V2):
        return backbone.num_features, -(-input_px[0] // 32), -(-input_px[1] // 32)
    # Any other network: one small dry run tells the map's shape exactly.
    was_training = backbone.training
    backbone.eval()
    with torch.no_grad():
        device = next((p.device for p in backbone.parameters()), torch.device("cpu"))
        y = backbone(torch.zeros(1, 3, *input_px, device=device))
    backbone.train(was_training)
    return int(y.shape[1]), int(y.shape[2]), int(y.shape[3])


def build_classifier(
    backbone: str = PAPER_BACKBONE,
    *,
    classes: Sequence[str] | None = None,
    backbone_weights: str | os.PathLike[str] | None = "imagenet",
    input_px: tuple[int, int] = (256, 256),
    field_um: tuple[float, float] | None = None,
    preprocessing: Preprocessing | None = None,
    freeze_backbone: bool = True,
    card: ModelCard | None = None,
    head: str | None = None,
    **card_fields: Any,
) -> Classifier:
    """Build the paper's classifier, or the same head on another backbone.

    Parameters
    ----------
    backbone
        ``"resnet152v2"`` (default: the Keras-layout network of the paper) or
        ``"timm:<name>"`` for any timm model.
    backbone_weights
        ``"imagenet"`` (default): the cached Keras ImageNet weights for
        ResNet152V2 (a loud warning when absent), timm's pretrained weights for
        timm models (downloaded by timm); a path to a safetensors file or a
        plain state dict; or None for random weights.
    classes
        Class names in output order: the training data's (:attr:`~napari_bcd.train.Dataset.classes`), or the
        card's when ``card`` is given; required otherwise (the BACH classes are
        :data:`~napari_bcd.classes.BACH_CLASSES`).
    input_px
        Network input size ``(h, w)``.
    field_um
        Physical size ``(h, w)`` of one input; defaults to the ICIAR photo.
    preprocessing
        Pixel normalisation; defaults to Keras "tf" for ResNet152V2 and to the
        timm model's pretrained config for timm models.
    freeze_backbone
        Freeze the backbone's parameters (the paper trains only the head).
    card
        Start from this card (used when loading checkpoints).
    head
        ``"table2"`` (the paper's head, the default) or ``"linear"`` (a logistic regression on the averaged
        features, what a training run ships when the tuned probe wins); default: the card's.

    Returns
    -------
    Classifier
    """
    if classes is None:
        if card is None:
            raise TypeError("build_classifier needs the classes, in output order (the data's own; the BACH classes "
                            "are napari_bcd.classes.BACH_CLASSES)")
        classes = card.classes
    spec = backbone_spec(backbone)
    if spec.fixed_input and tuple(input_px) != (spec.input_px, spec.input_px):
        raise BcdError(f"{spec.label} takes {spec.input_px} x {spec.input_px} px inputs only (its position embedding "
                       f"is fixed); use --input-px {spec.input_px} (a field of {spec.input_px * spec.mpp:g} µm at its "
                       f"{spec.mpp:g} µm/px).")
    if spec.licence and spec.patch and any(v % spec.patch for v in input_px):
        raise BcdError(f"{spec.label} takes inputs that are multiples of its {spec.patch}-px patch; use --input-px "
                       f"{spec.input_px} (its own) or another multiple of {spec.patch}, not {tuple(input_px)}.")
    net, desc = build_backbone(backbone, backbone_weights)
    stated = weights_preprocessing(backbone_weights) if card is None else None
    if preprocessing is not None:
        source = "given"
        if stated is not None and stated != preprocessing:
            log.warning("The backbone weights state preprocessing %s; using the one given, %s.", stated, preprocessing)
    elif card is not None:
        preprocessing, source = card.preprocessing, "model card"
    elif stated is not None:
        preprocessing, source = stated, "stated by the backbone weights file"
    else:
        preprocessing, source = spec.default_preprocessing(net), "the backbone's default"
    if card is None:
        card = ModelCard(classes=tuple(classes), backbone=spec.name, backbone_weights=desc,
                         backbone_args=dict(spec.timm_args))
    changes: dict[str, Any] = {"classes": tuple(classes), "input_px": tuple(input_px), "preprocessing": preprocessing}
    if field_um is not None:
        changes["field_um"] = tuple(field_um)
    card = card.replace(**changes, **card_fields)
    channels, fh, fw = feature_shape(net, card.input_px)
    kind = head or str((card.head or {}).get("type") or "table2")
    try:
        module = build_head(kind, channels, (fh, fw), len(card.classes))
    except ValueError as err:
        raise BcdError(f"The model card's head cannot be built: {err} Update napari-bcd.") from err
    desc: dict[str, Any] = {"type": kind, "in_channels": channels, "feature_hw": [fh, fw]}
    if kind == "table2":
        desc["activation"] = "relu"
    card = card.replace(head=desc)
    if freeze_backbone:
        for p in net.parameters():
            p.requires_grad_(False)
    model = Classifier(net, module, card)
    model.preprocessing_source = source
    return model
