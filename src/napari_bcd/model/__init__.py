"""The model: the Keras-layout ResNet152V2, the Table II head, weights and checkpoints.

Names are imported lazily: ``from napari_bcd.model.card import read_card``
(the card of a checkpoint, for a dock or ``model info``) costs no torch import;
anything that builds or runs a network imports torch when first used.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from .._lazy import lazy_names

# public name -> submodule that defines it
_LAZY: dict[str, str] = {
    "ICIAR_FIELD_UM": "card",
    "ModelCard": "card",
    "TrainingRecord": "record",
    "read_card": "card",
    "checkpoint_paths": "card",
    "load_checkpoint": "checkpoint",
    "load_model": "checkpoint",
    "save_checkpoint": "checkpoint",
    "weights_sha256": "checkpoint",
    "BACKBONES": "backbones",
    "BackboneSpec": "backbones",
    "TimmBackbone": "timm_backbone",
    "backbone_spec": "backbones",
    "build_backbone": "backbones",
    "Classifier": "classifier",
    "build_classifier": "classifier",
    "ModelCache": "loaded",
    "shared_cache": "loaded",
    "TABLE2_TRAINABLE": "head",
    "Table2Head": "head",
    "LinearHead": "head",
    "cached_imagenet_weights": "imagenet",
    "fetch_imagenet_weights": "imagenet",
    "import_keras_weights": "imagenet",
    "Predictor": "inference",
    "choose_device": "inference",
    "load_keras_weights": "keras_weights",
    "read_keras_h5": "keras_weights",
    "Preprocessing": "preprocessing",
    "KERAS_PARAM_COUNT": "resnet152v2",
    "ResNet152V2": "resnet152v2",
    "keras_param_count": "resnet152v2",
}

__all__ = sorted(_LAZY)

if TYPE_CHECKING:  # pragma: no cover
    from .backbones import BACKBONES, BackboneSpec, backbone_spec, build_backbone
    from .card import ICIAR_FIELD_UM, ModelCard, checkpoint_paths, read_card
    from .checkpoint import load_checkpoint, load_model, save_checkpoint, weights_sha256
    from .classifier import Classifier, build_classifier
    from .head import TABLE2_TRAINABLE, LinearHead, Table2Head
    from .imagenet import cached_imagenet_weights, fetch_imagenet_weights, import_keras_weights
    from .inference import Predictor, choose_device
    from .keras_weights import load_keras_weights, read_keras_h5
    from .loaded import ModelCache, shared_cache
    from .preprocessing import Preprocessing
    from .record import TrainingRecord
    from .resnet152v2 import KERAS_PARAM_COUNT, ResNet152V2, keras_param_count
    from .timm_backbone import TimmBackbone


__getattr__, __dir__ = lazy_names(__name__, _LAZY, globals())
