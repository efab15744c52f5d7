"""Dock widgets: the only package that imports Qt, magicgui or napari's Qt parts."""

from __future__ import annotations

import logging
import sys

log = logging.getLogger(__name__)


def _guard_against_two_llvms() -> None:
    """Keep Triton out when Mesa's software OpenGL (llvmpipe) is already loaded.

    CUDA builds of PyTorch ship Triton, whose libtriton.so carries its own
    LLVM; loading it into a process where Mesa's libLLVM is already mapped
    (napari's canvas on a virtual or remote display) crashes in LLVM's static
    initialisers.  torchvision (imported by timm) loads Triton through
    torch._dynamo.  Classification does not need Triton, so when Mesa's LLVM
    is present and Triton is not yet loaded, we make Triton unimportable for
    this napari session (torch then treats it as absent: no torch.compile).
    """
    if "triton" in sys.modules or not sys.platform.startswith("linux"):
        return
    try:
        with open("/proc/self/maps", encoding="utf-8", errors="ignore") as fh:
            mesa_llvm = any("libLLVM" in line for line in fh)
    except OSError:
        return
    if mesa_llvm:
        sys.modules["triton"] = None  # type: ignore[assignment]
        log.info("Software OpenGL (Mesa llvmpipe) detected: Triton disabled in this napari session.")


_guard_against_two_llvms()
