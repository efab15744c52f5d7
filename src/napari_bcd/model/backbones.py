"""The backbones a model can be built on: one table row per name, ``timm:<name>`` for any other timm model.

A :class:`BackboneSpec` says how to build the network (timm's arguments are
recorded in the card), what its pixels should look like, where its last stage
is, how its starting weights are had and checked, and about how fast it runs
on a 2-core CPU (the first estimate before this machine has measured it).  The
CLI's ``--backbone`` help and the Train dock's list read :data:`BACKBONES`; a
new backbone is a new row.
"""

from __future__ import annotations

import logging
import os
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..errors import BackboneWeightsWarning, BcdError
from .preprocessing import Preprocessing

__all__ = ["BACKBONES", "PAPER_BACKBONE", "BackboneSpec", "backbone_spec", "build_backbone", "check_backbone_weights",
           "load_state_file"]

log = logging.getLogger(__name__)
PAPER_BACKBONE = "resnet152v2"


@dataclass(frozen=True)
class BackboneSpec:
    """One backbone: how to build it and everything that depends on which it is.

    Attributes
    ----------
    name
        ``"resnet152v2"`` or ``"timm:<timm model name>"``.
    label
        For people (the Train dock's list).
    timm_name, timm_args
        The timm model and the arguments it is built with (recorded in the card); None for ours.
    pretrained
        Where ``"imagenet"`` weights come from: ``"keras"`` (the official Keras file, converted and
        cached), ``"timm"`` (timm's, from the Hugging Face hub or its cache) or ``""`` (none to be had).
    last_stage
        The attribute path of the backbone's last stage (trained with it when asked), or "".
    cpu_windows_per_s
        About how many 256-px windows a 2-core CPU classifies per second (fp32): the first estimate.
    """

    name: str
    label: str
    timm_name: str | None = None
    timm_args: dict[str, Any] = field(default_factory=dict)
    pretrained: str = "timm"
    last_stage: str = ""
    cpu_windows_per_s: float = 30.0

    @property
    def is_paper(self) -> bool:
        return self.timm_name is None

    def build(self, pretrained: bool) -> Any:
        """The network (its starting weights are loaded by :func:`build_backbone`)."""
        if self.is_paper:
            from .resnet152v2 import ResNet152V2

            return ResNet152V2()
        from .timm_backbone import TimmBackbone

        return TimmBackbone(self.timm_name, pretrained=pretrained)

    def default_preprocessing(self, net: Any) -> Preprocessing:
        """What the network's pixels should look like when neither the card nor the weights file say."""
        if self.is_paper:
            return Preprocessing("tf")
        cfg = getattr(getattr(net, "model", None), "pretrained_cfg", None) or {}  # timm's own normalisation
        mean, std = cfg.get("mean"), cfg.get("std")
        return Preprocessing("meanstd", tuple(mean), tuple(std)) if mean and std else Preprocessing.imagenet()

    def last_stage_of(self, net: Any) -> Any:
        """The last stage module (with the paper's final BN), for training it with the head."""
        from torch import nn

        if self.is_paper:
            return nn.ModuleList([net.stages[-1], net.post_bn])
        obj = getattr(net, "model", net)
        for part in (self.last_stage or "layer4").split("."):
            obj = obj[int(part)] if part.isdigit() else getattr(obj, part, None)
            if obj is None:
                raise BcdError(f"{self.name} has no recognisable last stage to fine-tune.")
        return obj


def _timm(name: str, label: str, last_stage: str, cpu_rate: float) -> BackboneSpec:
    return BackboneSpec(f"timm:{name}", label, name, {"num_classes": 0, "global_pool": ""}, "timm", last_stage,
                        cpu_rate)


#: The backbones offered by name (any other timm model works as ``timm:<name>``).
BACKBONES: dict[str, BackboneSpec] = {s.name: s for s in (
    BackboneSpec(PAPER_BACKBONE, "ResNet152V2, Keras layout (the paper's)", None, {}, "keras", "stages.3", 3.0),
    _timm("resnet50", "ResNet-50 (timm)", "layer4", 12.0),
    _timm("resnet18", "ResNet-18 (timm; small and quick)", "layer4", 60.0),
    _timm("densenet121", "DenseNet-121 (timm; e.g. H&E-trained weights from a file)", "features.denseblock4", 15.0),
    _timm("convnext_tiny", "ConvNeXt-Tiny (timm)", "stages.3", 10.0),
    _timm("vit_small_patch16_224", "ViT-S/16 (timm; input 224 px)", "blocks", 12.0),
)}


def backbone_spec(name: str) -> BackboneSpec:
    """The spec of a backbone name: a table row, or ``timm:<name>`` for any timm model.

    Raises
    ------
    BcdError
        For a name that is neither.
    """
    key = "resnet152v2" if name.lower() in ("resnet152v2", "keras:resnet152v2") else name
    if key in BACKBONES:
        return BACKBONES[key]
    if key.startswith("timm:") and len(key) > 5:
        return _timm(key[5:], f"{key[5:]} (timm)", "", 30.0)
    raise BcdError(f"Unknown backbone {name!r}; use one of {', '.join(BACKBONES)} or timm:<model name>.")


def load_state_file(path: Path) -> dict:
    """Read a safetensors file or a plain tensor state dict, never unpickling code."""
    import torch

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

    ``"imagenet"`` needs the converted Keras file in the cache (ResNet152V2),
    or timm's pretrained weights in the Hugging Face cache or the hub within
    reach (checked with one connection, not timm's minute of retries).  A
    file must exist.  None (random weights) is always possible: the explicit
    choice for experiments.

    Raises
    ------
    BcdError
    """
    spec = backbone_spec(backbone)
    if backbone_weights is None:
        return
    if str(backbone_weights) != "imagenet":
        if not Path(backbone_weights).is_file():
            raise BcdError(f"Backbone weights file {backbone_weights} does not exist.")
        return
    if spec.pretrained == "keras":
        from .imagenet import IMAGENET_FILENAME, IMAGENET_URL, cached_imagenet_weights

        if cached_imagenet_weights() is None:
            raise BcdError(
                "ResNet152V2's ImageNet weights are not on this machine, and without them the backbone is random, "
                "not the paper's model. Get them either way: `napari-bcd weights fetch` (needs internet), or "
                f"download {IMAGENET_URL} elsewhere and run `napari-bcd weights import {IMAGENET_FILENAME}`. "
                "Random weights (experiments only): --backbone-weights none, or 'random' in the dock."
            )
        return
    if spec.pretrained == "timm" and not _timm_weights_reachable(spec.timm_name, timeout):
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


def build_backbone(backbone: str = PAPER_BACKBONE,
                   backbone_weights: str | os.PathLike[str] | None = "imagenet") -> tuple[Any, str]:
    """Build a backbone and load its starting weights.

    Parameters
    ----------
    backbone
        A name of :data:`BACKBONES` or ``"timm:<name>"``.
    backbone_weights
        ``"imagenet"`` (the cached Keras weights, or timm's pretrained weights),
        a path to a safetensors/state-dict file, or None for random weights.

    Returns
    -------
    (module, description of the weights for the model card)
    """
    spec = backbone_spec(backbone)
    path = None if backbone_weights in (None, "imagenet") else Path(backbone_weights)  # type: ignore[arg-type]
    imagenet = backbone_weights == "imagenet"
    net = spec.build(pretrained=imagenet and spec.pretrained == "timm")
    if imagenet and spec.pretrained == "keras":
        from .imagenet import cached_imagenet_weights

        path = cached_imagenet_weights()
        if path is None:
            warnings.warn(
                "ResNet152V2 is being built WITHOUT its ImageNet weights, so this is not the paper's model and its "
                "features are meaningless. Run `napari-bcd weights fetch`, or `napari-bcd weights import "
                "resnet152v2_weights_tf_dim_ordering_tf_kernels_notop.h5` behind a firewall.",
                BackboneWeightsWarning, stacklevel=3)
            return net, "random"
        desc = "imagenet-keras"
    elif imagenet:
        desc = "timm-pretrained"
    else:
        desc = "random" if path is None else f"file:{path.name}"
    if path is not None:
        _load_weights(net, spec, load_state_file(path), path)
    return net, desc


def _load_weights(net: Any, spec: BackboneSpec, state: dict, path: Path) -> None:
    if spec.is_paper:
        try:
            net.load_state_dict(state, strict=True)
        except RuntimeError as err:
            raise BcdError(f"{path} does not fit the ResNet152V2 backbone: {str(err)[:300]}") from err
        return
    missing, unexpected = net.model.load_state_dict(state, strict=False)
    # Classifier weights in a full-model file are expected extras.
    if missing:
        raise BcdError(f"{path} does not fit timm model {spec.timm_name!r}: {len(missing)} weights missing (first "
                       f"{missing[0]!r}). Is it for another architecture?")
    if unexpected:
        log.info("Ignored %d weights of %s not in the backbone (e.g. %s)", len(unexpected), path, unexpected[0])


