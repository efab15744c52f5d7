"""The whole classifier: a backbone, the Table II head, and its pixel normalisation."""

from __future__ import annotations

import logging
import os
import warnings
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..classes import CLASS_NAMES
from ..errors import BackboneWeightsWarning, BcdError
from .card import ModelCard
from .head import Table2Head
from .preprocessing import Preprocessing, weights_preprocessing
from .resnet152v2 import ResNet152V2

__all__ = [
    "Classifier",
    "TimmBackbone",
    "build_backbone",
    "build_classifier",
    "check_backbone_weights",
    "weights_preprocessing",
]

log = logging.getLogger(__name__)
PAPER_BACKBONE = "resnet152v2"


class TimmBackbone(nn.Module):
    """Any timm model as a feature extractor giving an NCHW map.

    Transformers' token sequences (``N x tokens x C``) are turned into a map by
    dropping the prefix (class/register) tokens and folding the patch tokens
    back onto their grid, so the Table II head sees the same kind of input.
    """

    def __init__(self, name: str, pretrained: bool = False) -> None:
        super().__init__()
        try:
            import timm
        except ImportError as err:  # pragma: no cover - timm is a dependency
            raise ImportError("timm backbones need timm: pip install timm") from err
        try:
            self.model = timm.create_model(name, pretrained=pretrained, num_classes=0, global_pool="")
        except RuntimeError as err:
            raise BcdError(f"timm has no model {name!r}: {err}. See timm.list_models().") from err
        except OSError as err:
            raise BcdError(
                f"Could not get pretrained weights for timm model {name!r} ({err}). When offline, pass "
                "backbone_weights=PATH (--backbone-weights) with a local safetensors or state-dict file."
            ) from err
        self.name = name
        self.num_features = int(getattr(self.model, "num_features", 0))
        self.num_prefix_tokens = int(getattr(self.model, "num_prefix_tokens", 0))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.model.forward_features(x)
        if y.ndim == 3:
            tokens = y[:, self.num_prefix_tokens :]
            n = tokens.shape[1]
            gh, gw = self._grid(x.shape[-2:], n)
            y = tokens.transpose(1, 2).reshape(y.shape[0], y.shape[2], gh, gw)
        elif y.ndim == 4 and y.shape[1] != self.num_features and y.shape[-1] == self.num_features:
            y = y.permute(0, 3, 1, 2)  # NHWC models (some ConvNeXt/Swin variants)
        return y

    def _grid(self, hw: torch.Size, n: int) -> tuple[int, int]:
        patch = getattr(getattr(self.model, "patch_embed", None), "patch_size", None)
        if patch is not None:
            ph, pw = (patch, patch) if isinstance(patch, int) else patch
            gh, gw = int(hw[0]) // ph, int(hw[1]) // pw
            if gh * gw == n:
                return gh, gw
        side = int(round(n**0.5))
        if side * side != n:
            raise BcdError(f"Cannot fold {n} tokens into a feature map; use a square input_px.")
        return side, side


class Classifier(nn.Module):
    """Backbone + Table II head, taking preprocessed NCHW float or raw uint8 NHWC.

    Attributes
    ----------
    card
        The :class:`ModelCard` describing this model (classes, field, preprocessing...).
    """

    def __init__(self, backbone: nn.Module, head: Table2Head, card: ModelCard) -> None:
        super().__init__()
        self.backbone = backbone
        self.head = head
        self.card = card
        #: Where the preprocessing came from (given, the weights file, the backbone's default...).
        self.preprocessing_source = ""
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


def _is_paper_backbone(name: str) -> bool:
    return name.lower() in (PAPER_BACKBONE, "keras:resnet152v2")


def _load_state_file(path: Path) -> dict[str, torch.Tensor]:
    """Read a safetensors file or a plain tensor state dict, never unpickling code."""
    if not path.is_file():
        raise BcdError(f"Backbone weights file {path} does not exist.")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        try:
            return load_file(str(path))
        except Exception as err:
            raise BcdError(
                f"{path} is not a readable safetensors weights file ({err}). Delete it and write it again "
                "(for the ImageNet cache: `napari-bcd weights fetch` or `napari-bcd weights import FILE.h5`)."
            ) from err
    if path.suffix == ".h5":
        raise BcdError(f"{path} is a Keras file; import it with `napari-bcd weights import {path}`.")
    try:
        state = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as err:
        raise BcdError(
            f"{path} is not a safetensors file or a plain tensor state dict ({type(err).__name__}). "
            "Files with pickled code are refused on purpose; convert it to safetensors."
        ) from err
    for key in ("state_dict", "model", "teacher"):  # common wrappers
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise BcdError(f"{path} does not hold a dict of tensors.")
    return state


def check_backbone_weights(backbone: str, backbone_weights: str | os.PathLike[str] | None, *,
                           timeout: float = 3.0) -> None:
    """Refuse at once a backbone whose starting weights cannot be had, saying how to get them.

    ``"imagenet"`` for ResNet152V2 needs the converted Keras file in the
    cache; for a timm model it needs timm's pretrained weights in the Hugging
    Face cache or the hub within reach (checked with one connection, not
    timm's minute of retries).  A file must exist.  None (random weights) is
    always possible: the explicit choice for experiments.

    Raises
    ------
    BcdError
    """
    if backbone_weights is None:
        return
    if str(backbone_weights) != "imagenet":
        if not Path(backbone_weights).is_file():
            raise BcdError(f"Backbone weights file {backbone_weights} does not exist.")
        return
    if _is_paper_backbone(backbone):
        from .imagenet import IMAGENET_FILENAME, IMAGENET_URL, cached_imagenet_weights

        if cached_imagenet_weights() is None:
            raise BcdError(
                "ResNet152V2's ImageNet weights are not on this machine, and without them the backbone is random, "
                "not the paper's model. Get them either way: `napari-bcd weights fetch` (needs internet), or "
                f"download {IMAGENET_URL} elsewhere and run `napari-bcd weights import {IMAGENET_FILENAME}`. "
                "Random weights (experiments only): --backbone-weights none, or 'random' in the dock."
            )
        return
    if backbone.startswith("timm:") and not _timm_weights_reachable(backbone.removeprefix("timm:"), timeout):
        raise BcdError(
            f"{backbone} needs its pretrained weights from the Hugging Face hub, which cannot be reached from here, "
            "and they are not in the local cache. Give a local weights file (--backbone-weights FILE.safetensors), "
            "or choose random weights (--backbone-weights none; experiments only)."
        )


def _timm_weights_reachable(name: str, timeout: float) -> bool:
    """Whether timm can get ``name``'s pretrained weights: in the local HF cache, or the hub answers."""
    import socket

    try:
        import timm

        cfg = timm.models.get_pretrained_cfg(name)
    except Exception:  # noqa: BLE001 - an unknown name is reported when the model is built
        return True
    hub_id = getattr(cfg, "hf_hub_id", None) if cfg is not None else None
    if hub_id:
        try:
            from huggingface_hub import try_to_load_from_cache

            repo = hub_id.split("@")[0]
            for fname in ("model.safetensors", "pytorch_model.bin", "open_clip_pytorch_model.bin"):
                if isinstance(try_to_load_from_cache(repo, fname), str):
                    return True
        except ImportError:  # pragma: no cover - timm depends on huggingface_hub
            pass
    if os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes"):
        return False
    host = "huggingface.co" if hub_id else "github.com"
    try:
        with socket.create_connection((host, 443), timeout=timeout):
            return True
    except OSError:
        return False


def build_backbone(
    backbone: str = PAPER_BACKBONE,
    backbone_weights: str | os.PathLike[str] | None = "imagenet",
) -> tuple[nn.Module, str]:
    """Build a backbone and load its starting weights.

    Parameters
    ----------
    backbone
        ``"resnet152v2"`` or ``"timm:<name>"``.
    backbone_weights
        ``"imagenet"`` (the cached Keras weights, or timm's pretrained weights),
        a path to a safetensors/state-dict file, or None for random weights.

    Returns
    -------
    (module, description of the weights for the model card)
    """
    path = None if backbone_weights in (None, "imagenet") else Path(backbone_weights)  # type: ignore[arg-type]
    if _is_paper_backbone(backbone):
        net: nn.Module = ResNet152V2()
        if backbone_weights == "imagenet":
            from .imagenet import cached_imagenet_weights

            cached = cached_imagenet_weights()
            if cached is None:
                msg = (
                    "ResNet152V2 is being built WITHOUT its ImageNet weights, so this is not the paper's "
                    "model and its features are meaningless. Run `napari-bcd weights fetch`, or "
                    "`napari-bcd weights import resnet152v2_weights_tf_dim_ordering_tf_kernels_notop.h5` "
                    "behind a firewall."
                )
                warnings.warn(msg, BackboneWeightsWarning, stacklevel=3)
                return net, "random"
            path = cached
            desc = "imagenet-keras"
        else:
            desc = "random" if path is None else f"file:{path.name}"
    elif backbone.startswith("timm:"):
        name = backbone.removeprefix("timm:")
        net = TimmBackbone(name, pretrained=backbone_weights == "imagenet")
        desc = ("timm-pretrained" if backbone_weights == "imagenet"
                else "random" if path is None else f"file:{path.name}")
        if path is not None:
            state = _load_state_file(path)
            missing, unexpected = net.model.load_state_dict(state, strict=False)
            # Classifier weights in a full-model file are expected extras.
            if missing:
                raise BcdError(
                    f"{path} does not fit timm model {name!r}: {len(missing)} weights missing "
                    f"(first {missing[0]!r}). Is it for another architecture?"
                )
            if unexpected:
                log.info("Ignored %d weights of %s not in the backbone (e.g. %s)", len(unexpected), path, unexpected[0])
            return net, desc
        return net, desc
    else:
        raise BcdError(f"Unknown backbone {backbone!r}; use 'resnet152v2' or 'timm:<model name>'.")
    if path is not None:
        state = _load_state_file(path)
        try:
            net.load_state_dict(state, strict=True)
        except RuntimeError as err:
            raise BcdError(f"{path} does not fit the ResNet152V2 backbone: {str(err)[:300]}") from err
    return net, desc


def feature_shape(backbone: nn.Module, input_px: tuple[int, int]) -> tuple[int, int, int]:
    """``(channels, h, w)`` of the backbone's feature map for an input of ``input_px``."""
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
    backbone_weights: str | os.PathLike[str] | None = "imagenet",
    classes: tuple[str, ...] = CLASS_NAMES,
    input_px: tuple[int, int] = (256, 256),
    field_um: tuple[float, float] | None = None,
    preprocessing: Preprocessing | None = None,
    freeze_backbone: bool = True,
    card: ModelCard | None = None,
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
        Class names in output order.
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

    Returns
    -------
    Classifier
    """
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
        preprocessing, source = _default_preprocessing(net), "the backbone's default"
    if card is None:
        card = ModelCard(backbone=backbone, backbone_weights=desc)
    changes: dict[str, Any] = {"classes": tuple(classes), "input_px": tuple(input_px), "preprocessing": preprocessing}
    if field_um is not None:
        changes["field_um"] = tuple(field_um)
    card = card.replace(**changes, **card_fields)
    channels, fh, fw = feature_shape(net, card.input_px)
    head = Table2Head(channels, (fh, fw), num_classes=len(card.classes))
    card = card.replace(
        head={"type": "table2", "activation": "relu", "in_channels": channels, "feature_hw": [fh, fw]}
    )
    if freeze_backbone:
        for p in net.parameters():
            p.requires_grad_(False)
    model = Classifier(net, head, card)
    model.preprocessing_source = source
    return model


def _default_preprocessing(net: nn.Module) -> Preprocessing:
    if isinstance(net, TimmBackbone):
        cfg = getattr(net.model, "pretrained_cfg", None) or {}
        mean, std = cfg.get("mean"), cfg.get("std")
        if mean and std:
            return Preprocessing("meanstd", tuple(mean), tuple(std))
        return Preprocessing.imagenet()
    return Preprocessing("tf")
