"""The official Keras ImageNet weights of ResNet152V2: fetch, verify, convert once, cache.

The converted file is a safetensors state dict of :class:`ResNet152V2` in the
per-user cache directory (see :mod:`napari_bcd.config`), so models built later
load it without h5py or Keras.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from pathlib import Path

from .._fileio import atomic_path, file_digest
from ..config import cache_dir
from ..errors import KerasWeightsError, WeightsDownloadError

__all__ = [
    "IMAGENET_FILENAME",
    "IMAGENET_MD5",
    "IMAGENET_URL",
    "cached_imagenet_weights",
    "fetch_imagenet_weights",
    "import_keras_weights",
]

log = logging.getLogger(__name__)

IMAGENET_FILENAME = "resnet152v2_weights_tf_dim_ordering_tf_kernels_notop.h5"
IMAGENET_URL = "https://storage.googleapis.com/tensorflow/keras-applications/resnet/" + IMAGENET_FILENAME
IMAGENET_MD5 = "ed17cf2e0169df9d443503ef94b23b33"
CACHE_NAME = "resnet152v2_imagenet_keras.safetensors"
_HOW = (
    "Get them either way: `napari-bcd weights fetch` (needs internet), or download "
    f"{IMAGENET_URL} elsewhere and run `napari-bcd weights import {IMAGENET_FILENAME}`."
)


def cached_imagenet_weights() -> Path | None:
    """Path of the converted ImageNet weights, or None when not cached yet."""
    p = cache_dir() / CACHE_NAME
    return p if p.is_file() else None


def _md5(path: Path) -> str:
    return file_digest(path, "md5")


def import_keras_weights(path: str | os.PathLike[str], *, expected_md5: str | None = IMAGENET_MD5) -> Path:
    """Verify a Keras ResNet152V2 weights file and convert it into the cache.

    Parameters
    ----------
    path
        A Keras HDF5 weights file (``kernel:0`` or ``kernel`` names).
    expected_md5
        The official file's md5; None accepts any file that fits the network
        (e.g. weights you trained in Keras yourself).

    Returns
    -------
    Path of the cached safetensors file.
    """
    from safetensors.torch import save_file

    from .keras_weights import load_keras_weights
    from .resnet152v2 import ResNet152V2

    src = Path(path)
    if not src.is_file():
        raise KerasWeightsError(f"{src} does not exist. {_HOW}")
    if expected_md5 is not None:
        got = _md5(src)
        if got != expected_md5:
            raise WeightsDownloadError(
                f"{src} has md5 {got}, not the official {expected_md5}: the file is incomplete, corrupt, or "
                "another file. Download it again, or pass --skip-md5 if it is a Keras ResNet152V2 file you made."
            )
    net = ResNet152V2()
    load_keras_weights(net, src)
    dest = cache_dir() / CACHE_NAME
    state = {k: v.contiguous() for k, v in net.state_dict().items()}
    with atomic_path(dest) as tmp:
        save_file(state, str(tmp), metadata={"source": src.name, "source_md5": _md5(src)})
    log.info("Converted %s to %s", src, dest)
    return dest


def fetch_imagenet_weights(
    url: str = IMAGENET_URL,
    *,
    expected_md5: str | None = IMAGENET_MD5,
    progress: Callable[[int, int | None], None] | None = None,
    timeout: float = 30.0,
) -> Path:
    """Download the official Keras weights, check the md5 and convert them into the cache.

    An interrupted download resumes where it stopped the next time (HTTP
    range request on a ``.part`` file in the cache directory).

    Parameters
    ----------
    url
        Where to download from (the official address by default; a mirror or
        a ``file://`` address works too).
    expected_md5
        md5 the download must have; None skips the check.
    progress
        Called with ``(bytes done, total bytes or None)`` while downloading.

    Returns
    -------
    Path of the cached safetensors file.
    """
    from .._download import iter_download
    from ..errors import DownloadError

    target = cache_dir() / "downloads" / IMAGENET_FILENAME
    try:
        gen = iter_download(url, target, md5=expected_md5, timeout=timeout)
        while True:
            try:
                item = next(gen)
            except StopIteration:
                break
            if progress is not None:
                progress(item.done, item.total or None)
    except DownloadError as err:
        raise WeightsDownloadError(f"Could not download the ImageNet weights from {url}: {err} {_HOW}") from err
    try:
        return import_keras_weights(target, expected_md5=None)
    finally:
        target.unlink(missing_ok=True)
