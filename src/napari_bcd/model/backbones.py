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

__all__ = ["BACKBONES", "FOUNDATION", "PAPER_BACKBONE", "BackboneSpec", "backbone_spec", "backbones_text",
           "build_backbone", "check_backbone_weights", "load_state_file"]

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
    hub
        The Hugging Face repository timm loads the pretrained weights from (``hf-hub:<hub>``), or "".
    licence, gated, commercial
        The weights' licence, whether the repository asks for an access request (a token then), and whether
        commercial use is allowed (None: the licence says neither; read it).
    mpp, input_px, fixed_input
        The µm per pixel and input size it was pretrained at; whether the input size is fixed (the position
        embedding is not interpolated) or any multiple of the patch (timm's ``dynamic_img_size``).
    mean_std
        Its pixel normalisation (0-1 scale) where it is not ImageNet's, else None.
    """

    name: str
    label: str
    timm_name: str | None = None
    timm_args: dict[str, Any] = field(default_factory=dict)
    pretrained: str = "timm"
    last_stage: str = ""
    cpu_windows_per_s: float = 30.0
    hub: str = ""
    licence: str = ""
    gated: bool = False
    commercial: bool | None = True
    mpp: float | None = None
    input_px: int | None = None
    fixed_input: bool = False
    mean_std: tuple[tuple[float, float, float], tuple[float, float, float]] | None = None

    @property
    def patch(self) -> int | None:
        """A ViT's patch size in pixels (inputs are multiples of it), or None."""
        import re

        if "patch_size" in self.timm_args:
            return int(self.timm_args["patch_size"])
        m = re.search(r"patch(\d+)", self.timm_name or "")
        return int(m.group(1)) if m else None

    def notice(self) -> str:
        """The licence and access words a user must see before training on it ("" for the plain rows)."""
        if not self.licence:
            return ""
        use = ("commercial use allowed" if self.commercial else "NON-COMMERCIAL use only" if self.commercial is False
               else "commercial use: read the licence")
        access = (f"gated: request access at https://huggingface.co/{self.hub}, then set HF_TOKEN" if self.gated
                  else "not gated")
        return f"{self.name}: licence {self.licence} ({use}); {access}"

    @property
    def is_paper(self) -> bool:
        return self.timm_name is None

    def build(self, pretrained: bool) -> Any:
        """The network (its starting weights are loaded by :func:`build_backbone`)."""
        if self.is_paper:
            from .resnet152v2 import ResNet152V2

            return ResNet152V2()
        from .timm_backbone import TimmBackbone

        args = {k: v for k, v in self.timm_args.items() if k not in ("num_classes", "global_pool")}
        hub = self.hub if pretrained and self.pretrained == "timm" and self.hub else ""
        return TimmBackbone(self.timm_name, pretrained=pretrained, hub=hub, **args)

    def default_preprocessing(self, net: Any) -> Preprocessing:
        """What the network's pixels should look like when neither the card nor the weights file say."""
        if self.is_paper:
            return Preprocessing("tf")
        if self.mean_std is not None:
            return Preprocessing("meanstd", *self.mean_std)
        if self.licence:  # a pathology model without its own: ImageNet's, as its card says
            return Preprocessing.imagenet()
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


def _pathology(name: str, label: str, arch: str, args: dict[str, Any], *, hub: str, licence: str, gated: bool,
               commercial: bool | None, cpu_rate: float, weights: str = "timm", fixed: bool = False,
               mean_std: tuple | None = None) -> BackboneSpec:
    """A pathology foundation model: its exact timm architecture and arguments (JSON-able: layer names are
    resolved by :class:`~.timm_backbone.TimmBackbone`), pretrained at 0.5 µm/px (20x) on 224-px tiles."""
    return BackboneSpec(name, label, arch, {"num_classes": 0, "global_pool": "", **args}, weights, "blocks",
                        cpu_rate, hub, licence, gated, commercial, 0.5, 224, fixed, mean_std)


_NC = "CC-BY-NC-ND-4.0"
#: The pathology foundation models offered by name: the architecture timm builds for each, with the arguments their
#: model cards give.  ``pretrained="timm"``: timm loads the weights from the hub (``hf-hub:<hub>``);
#: ``"file"``: the weights are published in another layout (transformers), so a converted local file is needed.
#: CONCH's vision tower is not here: timm cannot build it (an open_clip CoCa model).
FOUNDATION: tuple[BackboneSpec, ...] = (
    _pathology("h-optimus-0", "H-optimus-0 (Bioptimus; ViT-g/14, 1.1 B; input fixed at 224 px)",
               "vit_giant_patch14_reg4_dinov2", {"img_size": 224, "init_values": 1e-5, "dynamic_img_size": False},
               hub="bioptimus/H-optimus-0", licence="Apache-2.0", gated=True, commercial=True, cpu_rate=0.4,
               fixed=True, mean_std=((0.707223, 0.578729, 0.703617), (0.211883, 0.230117, 0.177517))),
    _pathology("uni", "UNI (Mahmood Lab; ViT-L/16, 0.3 B)", "vit_large_patch16_224",
               {"img_size": 224, "patch_size": 16, "init_values": 1e-5, "dynamic_img_size": True},
               hub="MahmoodLab/UNI", licence=_NC, gated=True, commercial=False, cpu_rate=1.5),
    _pathology("uni2-h", "UNI2-h (Mahmood Lab; ViT-H/14, 0.7 B)", "vit_giant_patch14_224",
               {"img_size": 224, "patch_size": 14, "depth": 24, "num_heads": 24, "init_values": 1e-5,
                "embed_dim": 1536, "mlp_ratio": 2.66667 * 2, "no_embed_class": True, "mlp_layer": "SwiGLUPacked",
                "act_layer": "silu", "reg_tokens": 8, "dynamic_img_size": True},
               hub="MahmoodLab/UNI2-h", licence=_NC, gated=True, commercial=False, cpu_rate=0.7),
    _pathology("virchow2", "Virchow2 (Paige; ViT-H/14, 0.6 B)", "vit_huge_patch14_224",
               {"img_size": 224, "init_values": 1e-5, "mlp_ratio": 5.3375, "reg_tokens": 4,
                "mlp_layer": "SwiGLUPacked", "act_layer": "silu", "dynamic_img_size": True},
               hub="paige-ai/Virchow2", licence=_NC, gated=True, commercial=False, cpu_rate=0.8),
    _pathology("phikon-v2", "Phikon-v2 (Owkin; ViT-L/16 DINOv2, 0.3 B; weights: a converted file)",
               "vit_large_patch16_224", {"img_size": 224, "init_values": 1e-5, "dynamic_img_size": True},
               hub="owkin/phikon-v2", licence="Owkin non-commercial", gated=False, commercial=False, cpu_rate=1.5,
               weights="file"),
    _pathology("hibou-b", "Hibou-B (HistAI; ViT-B/14 with registers, 86 M; weights: a converted file)",
               "vit_base_patch14_reg4_dinov2", {"img_size": 224, "dynamic_img_size": True},
               hub="histai/hibou-b", licence="Apache-2.0", gated=False, commercial=True, cpu_rate=5.0,
               weights="file", mean_std=((0.7068, 0.5755, 0.722), (0.195, 0.2316, 0.1816))),
    _pathology("kaiko-vitb16", "Kaiko ViT-B/16 (kaiko.ai, timm port; 86 M)", "vit_base_patch16_224",
               {"dynamic_img_size": True},
               hub="1aurent/vit_base_patch16_224.kaiko_ai_towards_large_pathology_fms", licence="other (kaiko.ai)",
               gated=False, commercial=None, cpu_rate=5.0, mean_std=((0.5, 0.5, 0.5), (0.5, 0.5, 0.5))),
)

#: The backbones offered by name (any other timm model works as ``timm:<name>``).
BACKBONES: dict[str, BackboneSpec] = {s.name: s for s in (
    BackboneSpec(PAPER_BACKBONE, "ResNet152V2, Keras layout (the paper's)", None, {}, "keras", "stages.3", 3.0),
    _timm("resnet50", "ResNet-50 (timm)", "layer4", 12.0),
    _timm("resnet18", "ResNet-18 (timm; small and quick)", "layer4", 60.0),
    _timm("densenet121", "DenseNet-121 (timm; e.g. H&E-trained weights from a file)", "features.denseblock4", 15.0),
    _timm("convnext_tiny", "ConvNeXt-Tiny (timm)", "stages.3", 10.0),
    _timm("vit_small_patch16_224", "ViT-S/16 (timm; input 224 px)", "blocks", 12.0),
    *FOUNDATION,
)}


def backbones_text() -> str:
    """The backbone table in a sentence for ``--backbone``'s help: the names, and the pathology models' licence and
    access."""
    plain = ", ".join(k for k, v in BACKBONES.items() if not v.licence)
    fms = "; ".join(f"{k} ({v.licence}{', gated' if v.gated else ''}"
                    f"{', non-commercial' if v.commercial is False else ''})" for k, v in BACKBONES.items()
                    if v.licence)
    return f"{plain}; pathology foundation models: {fms}; or timm:<any timm model>"


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
    if spec.pretrained == "file":
        raise BcdError(
            f"{spec.label}: its weights are published in the transformers layout (https://huggingface.co/{spec.hub}), "
            "which timm cannot load. Convert them to a timm state dict of the same architecture "
            f"({spec.timm_name}) and give the file: --backbone-weights FILE.safetensors.")
    if spec.hub:
        _check_hub_access(spec, timeout)
        return
    if spec.pretrained == "timm" and not _timm_weights_reachable(spec.timm_name, timeout):
        raise BcdError(
            f"{backbone} needs its pretrained weights from the Hugging Face hub, which cannot be reached from here, "
            "and they are not in the local cache. Give a local weights file (--backbone-weights FILE.safetensors), "
            "or choose random weights (--backbone-weights none; experiments only)."
        )


def _hf_cached(repo: str) -> bool:
    """Whether a hub repository's weights are in the local Hugging Face cache."""
    try:
        from huggingface_hub import try_to_load_from_cache
    except ImportError:  # pragma: no cover - timm depends on huggingface_hub
        return False
    return any(isinstance(try_to_load_from_cache(repo, f), str)
               for f in ("model.safetensors", "pytorch_model.bin", "open_clip_pytorch_model.bin"))


def _check_hub_access(spec: BackboneSpec, timeout: float) -> None:
    """A hub-hosted foundation model: in the cache, or reachable, and for a gated one a token, said at once."""
    if _hf_cached(spec.hub):
        return
    if spec.gated:
        try:
            from huggingface_hub import get_token

            token = get_token()
        except ImportError:  # pragma: no cover
            token = os.environ.get("HF_TOKEN")
        if not token:
            raise BcdError(
                f"{spec.label} is gated on Hugging Face: request access at https://huggingface.co/{spec.hub} (its "
                f"licence: {spec.licence}), then make a read token at https://huggingface.co/settings/tokens and set "
                "it in HF_TOKEN (or run `hf auth login`). Or give the weights as a file: --backbone-weights FILE.")
    offline = os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes")
    if offline or not _reachable("huggingface.co", timeout):
        raise BcdError(f"{spec.label} needs its weights from https://huggingface.co/{spec.hub}, which cannot be "
                       "reached from here, and they are not in the local cache. Give a local weights file "
                       "(--backbone-weights FILE.safetensors).")


def _reachable(host: str, timeout: float) -> bool:
    import socket

    try:
        with socket.create_connection((host, 443), timeout=timeout):
            return True
    except OSError:
        return False


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


