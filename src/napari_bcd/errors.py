"""The exception hierarchy.  Every message says what is wrong and what to do."""

from __future__ import annotations

import errno

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
    "os_error_text",
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


def os_error_text(err: OSError) -> str:
    """An operating-system error as one sentence for a user: what failed, on which file, and what to do."""
    where = f" {err.filename}" if err.filename else ""
    advice = {
        errno.ENOSPC: f"the disk is full (writing{where}). Free some space or write elsewhere (--out); files "
                      "finished before are intact and unfinished ones were removed.",
        errno.EFBIG: f"the file grew past the size this system allows (writing{where}; ulimit -f, or the file "
                     "system's limit). Raise the limit or write elsewhere (--out).",
        errno.EDQUOT: f"the disk quota is used up (writing{where}). Free some space or write elsewhere (--out).",
        errno.ENAMETOOLONG: f"a file name is too long for this file system:{where}. Use a shorter output folder or "
                            "file name.",
        errno.EROFS: f"the file system is read-only:{where}. Write somewhere else (--out).",
        errno.EACCES: f"permission denied:{where}. Write somewhere you may write (--out), or fix the permissions.",
        errno.EPERM: f"operation not permitted:{where}. Write somewhere you may write (--out).",
        errno.ELOOP: f"too many symbolic links (a link loop?):{where}. Give the real path.",
        errno.EISDIR: f"a folder was found where a file is needed:{where}.",
        errno.ENOTDIR: f"a file was found where a folder is needed:{where}.",
    }
    return advice.get(err.errno, f"{err.strerror or err}{':' + where if where else ''}")
