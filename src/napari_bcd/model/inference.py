"""Running a classifier fast: device choice, channels_last, autocast, uint8 transfers."""

from __future__ import annotations

import logging
from contextlib import nullcontext

import numpy as np
import torch

from ..errors import BcdError
from .classifier import Classifier

__all__ = ["Predictor", "choose_device"]

log = logging.getLogger(__name__)


def choose_device(preference: str | torch.device | None = None) -> torch.device:
    """Pick the device: cuda > mps > cpu, unless one is asked for.

    Parameters
    ----------
    preference
        None or ``"auto"`` to choose; otherwise ``"cpu"``, ``"cuda"``,
        ``"cuda:1"``, ``"mps"``...

    Raises
    ------
    BcdError
        When the requested device is not available here.
    """
    if preference is None or str(preference) == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    try:
        dev = torch.device(preference)
    except RuntimeError as err:
        raise BcdError(f"{preference!r} is not a device; use auto, cpu, cuda or mps.") from err
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise BcdError("CUDA was asked for but no CUDA GPU is available here; use --device cpu or auto.")
    if dev.type == "mps" and not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
        raise BcdError("MPS was asked for but is not available here; use --device cpu or auto.")
    return dev


class Predictor:
    """Class probabilities for uint8 RGB batches, as fast as the device allows.

    The model is put in eval mode (and channels_last on CUDA); batches travel to the
    device as uint8 (4x less than float32) and are normalised there; on CUDA
    the forward pass runs under bf16 autocast by default.

    Parameters
    ----------
    model
        The classifier.
    device
        Device or preference (see :func:`choose_device`).
    precision
        ``"auto"`` (bf16 on CUDA, fp32 elsewhere), ``"fp32"``, ``"bf16"`` or ``"fp16"``.
    compile
        Wrap the model in :func:`torch.compile` (worth it for long runs on a GPU).
    """

    def __init__(
        self,
        model: Classifier,
        device: str | torch.device | None = None,
        precision: str = "auto",
        compile: bool = False,
    ) -> None:
        self.device = choose_device(device)
        if precision == "auto":
            precision = "bf16" if self.device.type == "cuda" else "fp32"
        if precision not in ("fp32", "bf16", "fp16"):
            raise BcdError(f"Unknown precision {precision!r}; use auto, fp32, bf16 or fp16.")
        self.precision = precision
        # channels_last pays on GPUs (tensor cores); on the CPU it is no faster
        # for ResNet152V2 here and converting costs a second copy of the weights.
        fmt = torch.channels_last if self.device.type == "cuda" else torch.preserve_format
        self.model = model.eval().to(self.device, memory_format=fmt)
        self.classes = model.classes
        self._forward = torch.compile(self.model.forward_uint8) if compile else self.model.forward_uint8

    @property
    def default_batch_size(self) -> int:
        """A batch that keeps a GPU busy, or CPU memory small (no speed is lost on the CPU)."""
        return 128 if self.device.type == "cuda" else 4

    def _autocast(self):
        if self.precision == "fp32":
            return nullcontext()
        dtype = torch.bfloat16 if self.precision == "bf16" else torch.float16
        return torch.autocast(self.device.type, dtype=dtype)

    def __call__(self, batch: np.ndarray | torch.Tensor) -> np.ndarray:
        """Probabilities ``N x classes`` (float32) for a uint8 batch ``N x H x W x 3``."""
        x = torch.as_tensor(batch)
        if x.dtype != torch.uint8 or x.ndim != 4 or x.shape[-1] != 3:
            raise BcdError(f"Expected a uint8 batch N x H x W x 3, got {x.dtype} {tuple(x.shape)}.")
        if self.device.type == "cuda":
            x = x.pin_memory().to(self.device, non_blocking=True)
        else:
            x = x.to(self.device)
        with torch.inference_mode(), self._autocast():
            logits = self._forward(x)
        return torch.softmax(logits.float(), dim=1).cpu().numpy()
