"""The model: the Keras-layout ResNet152V2, the Table II head, weights and checkpoints.

Importing this package imports torch.
"""

from __future__ import annotations

from .card import ICIAR_FIELD_UM, ModelCard
from .checkpoint import load_checkpoint, load_model, save_checkpoint, weights_sha256
from .classifier import Classifier, TimmBackbone, build_backbone, build_classifier
from .head import TABLE2_TRAINABLE, Table2Head
from .imagenet import cached_imagenet_weights, fetch_imagenet_weights, import_keras_weights
from .inference import Predictor, choose_device
from .keras_weights import load_keras_weights, read_keras_h5
from .preprocessing import Preprocessing
from .resnet152v2 import KERAS_PARAM_COUNT, ResNet152V2, keras_param_count

__all__ = [
    "ICIAR_FIELD_UM",
    "KERAS_PARAM_COUNT",
    "TABLE2_TRAINABLE",
    "Classifier",
    "ModelCard",
    "Predictor",
    "Preprocessing",
    "ResNet152V2",
    "Table2Head",
    "TimmBackbone",
    "build_backbone",
    "build_classifier",
    "cached_imagenet_weights",
    "choose_device",
    "fetch_imagenet_weights",
    "import_keras_weights",
    "keras_param_count",
    "load_checkpoint",
    "load_keras_weights",
    "load_model",
    "read_keras_h5",
    "save_checkpoint",
    "weights_sha256",
]
