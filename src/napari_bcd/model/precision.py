"""Which number formats a device runs fast: bf16 where the hardware has bf16 matrix units.

On a CPU, bf16 pays only with AVX-512 BF16 or AMX (measured here: ResNet152V2
5.4 windows/s in fp32, 13 in bf16 autocast, 26-28 with channels_last too);
without them PyTorch emulates bf16 and it is slower than fp32.  On CUDA GPUs
bf16 runs on the tensor cores from Ampere on.
"""

from __future__ import annotations

import functools
from typing import Any

__all__ = ["bf16_is_fast", "cpu_features"]


@functools.cache
def cpu_features() -> dict[str, bool]:
    """The CPU's bf16-related instruction sets, as PyTorch detects them."""
    import torch

    def probe(name: str) -> bool:
        fn = getattr(torch.cpu, name, None)
        try:
            return bool(fn()) if fn is not None else False
        except (RuntimeError, AttributeError):  # pragma: no cover - very old builds
            return False

    return {"avx512_bf16": probe("_is_avx512_bf16_supported"), "amx": probe("_is_amx_tile_supported"),
            "avx512": probe("_is_avx512_supported")}


def bf16_is_fast(device: Any) -> bool:
    """Whether bf16 matrix products run faster than fp32 on ``device`` (a torch.device or its name)."""
    import torch

    dev = torch.device(device)
    if dev.type == "cuda":
        return bool(torch.cuda.is_available() and torch.cuda.is_bf16_supported())
    if dev.type == "cpu":
        f = cpu_features()
        return f["avx512_bf16"] or f["amx"]
    return False
