"""The exception hierarchy.  Every message says what is wrong and what to do."""

from __future__ import annotations

__all__ = [
    "AnnotationError",
    "BackboneWeightsWarning",
    "BcdError",
    "CheckpointError",
    "DatasetError",
    "DownloadError",
    "KerasWeightsError",
    "LicenceNotAcceptedError",
    "ModelNotAvailableError",
    "SlideError",
    "WeightsDownloadError",
]


class BcdError(Exception):
    """Base class of every error napari-bcd raises on purpose.

    Catch this in user interfaces: its message is written for the user.
    """


class KerasWeightsError(BcdError):
    """A Keras HDF5 weights file does not fit the network it is loaded into."""


class WeightsDownloadError(BcdError):
    """ImageNet weights could not be fetched or verified."""


class CheckpointError(BcdError):
    """A checkpoint is missing, corrupt, or its card does not match its weights."""


class ModelNotAvailableError(BcdError):
    """No trained model was given and no default model is configured."""


class SlideError(BcdError):
    """A slide or image cannot be opened or read."""


class AnnotationError(BcdError):
    """An annotation file cannot be read or written."""


class DatasetError(BcdError):
    """A training or evaluation dataset is malformed."""


class DownloadError(BcdError):
    """A download failed, was cut short, or does not match its published checksum."""


class LicenceNotAcceptedError(BcdError):
    """A dataset's licence must be accepted before it is downloaded."""


class BackboneWeightsWarning(UserWarning):
    """A backbone was built without its pretrained weights (not the paper's model)."""
