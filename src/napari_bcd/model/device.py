"""Where a model runs: the device a preference names, checked to exist."""

from __future__ import annotations

import torch

from ..errors import BcdError

__all__ = ["choose_device"]


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


def _same_device(a: torch.device, b: torch.device) -> bool:
    """``cuda`` and ``cuda:0`` are the same device when the current device is 0."""
    if a.type != b.type:
        return False
    if a.type != "cuda" or a.index == b.index:
        return True
    current = torch.cuda.current_device()
    return (a.index if a.index is not None else current) == (b.index if b.index is not None else current)
