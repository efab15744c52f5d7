"""Backbone features of training images, computed once and cached on disk.

With the backbone frozen, the backbone's output for an image never changes,
so it is computed once per image and per view (the eight flips and
rotations, and optionally stain-jittered copies) and cached in the user's
cache folder, keyed by the backbone's weights hash, the input size and
preprocessing, the number format they were computed in, and the image's content
hash.  A training run then holds them as one tensor (:class:`~.headfit.FeatureBank`).

They are computed in bf16 with channels_last where the device has bf16 matrix
units (as classification does: :mod:`napari_bcd.model.precision`), so training
sees the features the classifier will; fp32 and bf16 features are cached apart
and never mix.
"""

from __future__ import annotations

import hashlib
import logging
import os
from collections.abc import Callable, Generator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from .._fileio import file_digest
from .._progress import STOP
from .iciar import Dataset

if TYPE_CHECKING:
    import torch

    from ..model.classifier import Classifier

__all__ = ["FeatureProgress", "backbone_features", "dihedral", "feature_precision", "fold_standardisation",
           "hed_jitter"]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class FeatureProgress:
    """Backbone features computed (or found in the cache) so far."""

    done: int
    total: int
    cached: int


def dihedral(img: np.ndarray, t: int) -> np.ndarray:
    """The ``t``-th of the eight flips/rotations (0 = identity)."""
    out = np.rot90(img, t % 4)
    return np.ascontiguousarray(out[:, ::-1] if t >= 4 else out)


def _image_key(dataset: Dataset, i: int) -> str:
    return file_digest(dataset.paths[i])


def _entry_metadata(key: str, views: torch.Tensor) -> dict[str, str]:
    """What a cache entry says of itself: the key it was made for (backbone, input, format, image) and the SHA-256
    of its features' bytes."""
    return {"key": key, "sha256": hashlib.sha256(views.contiguous().numpy().tobytes()).hexdigest()}


def _read_entry(path: Path, key: str) -> torch.Tensor | None:
    """A cache entry's features when they are what they say (made for ``key``, unaltered, finite), else None."""
    import torch
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
            views = f.get_tensor("features")
    except Exception:  # noqa: BLE001 - a damaged entry is recomputed
        return None
    if meta.get("key") != key or meta.get("sha256") != _entry_metadata(key, views)["sha256"]:
        return None  # another image's entry, an older version's unchecked one, or altered bytes
    if not bool(torch.isfinite(views).all()):
        return None
    return views


def hed_jitter(rgb: np.ndarray, seed: int, amount: float = 0.2, shift: float = 0.01) -> np.ndarray:
    """The image with its stains varied (Tellez et al. 2018): in skimage's HED space each stain's amount is
    scaled by U(1 - amount, 1 + amount) and shifted by U(-shift, shift); the same ``seed`` gives the same result."""
    from skimage.color import hed2rgb, rgb2hed

    rng = np.random.default_rng(seed)
    hed = rgb2hed(rgb)
    alpha = rng.uniform(1 - amount, 1 + amount, 3)
    beta = rng.uniform(-shift, shift, 3)
    out = hed2rgb(hed * alpha + beta)
    return np.clip(np.round(out * 255), 0, 255).astype(np.uint8)


def feature_precision(dev: Any, precision: str = "auto") -> str:
    """The number format features are computed in: *auto* is bf16 where ``dev`` runs it fast, else fp32."""
    from ..model.precision import bf16_is_fast

    if precision == "auto":
        return "bf16" if bf16_is_fast(dev) else "fp32"
    if precision not in ("fp32", "bf16"):
        raise ValueError(f"features are computed in fp32 or bf16, not {precision!r}")
    return precision


def backbone_features(model: Classifier, dataset: Dataset, needed: list[int], T: int,
                      images_of: Callable[[int], np.ndarray], dev: torch.device, feature_batch: int, cache: bool,
                      stain_augment: bool = False,
                      precision: str = "auto") -> Generator[FeatureProgress, Any, torch.Tensor | None]:
    """Backbone features of every needed image and view, from the cache or computed once.

    Yields :class:`FeatureProgress`; returns an ``images x views x C x H x W``
    float16 tensor (rows in ``needed`` order), or None when stopped.  With
    ``stain_augment`` the views are followed by the same views of a
    stain-jittered copy (``2 T`` views), cached apart.  ``precision``: see :func:`feature_precision`.
    """
    precision = feature_precision(dev, precision)
    bank = yield from _feature_bank(model, dataset, needed, T, images_of, dev, feature_batch, cache, "", precision)
    if bank is None or not stain_augment:
        return bank

    def jittered(i: int) -> np.ndarray:
        seed = int(_image_key(dataset, i)[:8], 16)  # from the image's content: the cache stays consistent
        return hed_jitter(images_of(i), seed)

    aug = yield from _feature_bank(model, dataset, needed, T, jittered, dev, feature_batch, cache, "hed0.2",
                                   precision)
    if aug is None:
        return None
    import torch

    return torch.cat([bank, aug], dim=1)


def _feature_bank(model, dataset: Dataset, needed: list[int], T: int, images_of, dev, feature_batch: int,
                  cache: bool, variant: str, precision: str = "fp32"):
    import torch

    from ..model.checkpoint import weights_sha256

    model.backbone.eval()
    bkey = weights_sha256(model.backbone.state_dict())[:16]  # of the weights as saved (contiguous)
    fast = precision != "fp32"
    if fast:  # oneDNN's bf16 kernels want NHWC; the weights go back to contiguous (safetensors saves only those)
        model.backbone.to(memory_format=torch.channels_last)
    try:
        bank = yield from _feature_bank_in(model, dataset, needed, T, images_of, dev, feature_batch, cache,
                                           variant, precision, bkey)
    finally:
        if fast:
            model.backbone.to(memory_format=torch.contiguous_format)
    return bank


def _feature_bank_in(model, dataset: Dataset, needed: list[int], T: int, images_of, dev, feature_batch: int,
                     cache: bool, variant: str, precision: str, bkey: str):
    import contextlib

    import torch
    from safetensors.torch import save_file

    from ..config import cache_dir

    pkey = hashlib.sha256(repr((model.card.input_px, model.card.preprocessing)).encode()).hexdigest()[:8]
    if variant:
        pkey = f"{pkey}-{variant}"
    if precision != "fp32":  # fp32 entries keep the key they always had
        pkey = f"{pkey}-{precision}"
    def autocast():
        if precision == "bf16":
            return torch.autocast(torch.device(dev).type, dtype=torch.bfloat16)
        return contextlib.nullcontext()

    cdir = cache_dir() / "features" / f"{bkey}-{pkey}"
    if cache:
        from .cache import describe_folder

        cdir.mkdir(parents=True, exist_ok=True)
        describe_folder(cdir, {"backbone": model.card.backbone, "weights": model.card.backbone_weights,
                               "input_px": list(model.card.input_px),
                               "preprocessing": model.card.preprocessing.describe(), "precision": precision,
                               "variant": variant})
    feats: dict[int, torch.Tensor] = {}
    keys: dict[int, str] = {}
    cached_n = 0
    if (yield FeatureProgress(0, len(needed), 0)) == STOP:
        return None
    todo: list[int] = []
    bad = 0
    for i in needed:
        keys[i] = _image_key(dataset, i)
        f = cdir / f"{keys[i]}.safetensors"
        if cache and f.is_file():
            views = _read_entry(f, f"{cdir.name}/{keys[i]}")
            if views is None:  # damaged, swapped, altered or not finite: recomputed, never trained on
                bad += 1
                f.unlink(missing_ok=True)
            # An entry holds the first k views; the identity view alone serves a run without flips.
            elif views.shape[0] >= T:
                feats[i] = views[:T].clone()
                cached_n += 1
                continue
        todo.append(i)
    if bad:
        log.warning("%d cached feature entr%s did not check out (altered, swapped or not finite): computed again",
                    bad, "y" if bad == 1 else "ies")
    done = cached_n
    if (yield FeatureProgress(done, len(needed), cached_n)) == STOP:
        return None
    per = max(1, feature_batch // T) if T > 1 else feature_batch
    for k in range(0, len(todo), per):
        chunk = todo[k : k + per]
        batch = np.stack([dihedral(images_of(i), t) for i in chunk for t in range(T)])
        with torch.inference_mode():
            x = model.normalise(torch.from_numpy(batch).to(dev))
            with autocast():
                out_f = model.backbone(x)
            out_f = out_f.to("cpu", torch.float16)
        if not bool(torch.isfinite(out_f).all()):
            from ..errors import DatasetError

            raise DatasetError(f"The backbone gave NaN or infinite features for {dataset.paths[chunk[0]].name} (or "
                               "its batch): its weights are damaged or the format overflows. Train with "
                               "--feature-precision fp32, or check the backbone weights.")
        for j, i in enumerate(chunk):
            feats[i] = out_f[j * T : (j + 1) * T].clone(memory_format=torch.contiguous_format)
            if cache:
                tmp = cdir / f".{keys[i]}.{os.getpid()}.tmp"
                save_file({"features": feats[i]}, str(tmp), metadata=_entry_metadata(f"{cdir.name}/{keys[i]}",
                                                                                    feats[i]))
                os.replace(tmp, cdir / f"{keys[i]}.safetensors")
        done += len(chunk)
        if (yield FeatureProgress(done, len(needed), cached_n)) == STOP:
            return None
    if cache:
        from .cache import record_run

        record_run(cdir, model.card.backbone, cached_n, len(todo), bad)
    # One contiguous bank: a batch is then one gather, not 128 small copies.
    bank = torch.stack([feats.pop(i) for i in needed])
    return bank


def fold_standardisation(state: dict, norm: tuple[torch.Tensor, torch.Tensor]) -> dict:
    """Fold ``(x - mean) / std`` into the head's first layer (the Table II head's ``conv1``, the linear head's
    ``out``): the same outputs from raw features."""
    mean, std = norm
    key = "head.conv1" if "head.conv1.weight" in state else "head.out"
    w = state[f"{key}.weight"]  # out x in (x 1 x 1)
    b = state[f"{key}.bias"]
    scale = (1.0 / std).to(w)
    w2 = w * scale.view(1, -1, *([1] * (w.dim() - 2)))
    b2 = b - (w2.reshape(w2.shape[0], w2.shape[1]) * mean.to(w)).sum(1)
    return {**state, f"{key}.weight": w2, f"{key}.bias": b2}


