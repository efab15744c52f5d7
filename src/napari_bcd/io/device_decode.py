"""JPEG tiles decoded on the model's device: nvJPEG through torchvision on a CUDA GPU.

On a GPU the CPU's JPEG decoders become the bottleneck long before the model
does.  :class:`DeviceRows` hands the engine tile rows decoded on the model's
device by TorchCodec's ``decode_jpeg`` when it is installed, else
torchvision's (deprecated since torchvision 0.29, same API), one batched call per
tile row, so the pixels never visit the host after the compressed bytes are
read.  It reads the tiles as complete JPEG streams from
:meth:`napari_bcd.io.Slide.jpeg_tile` (the TIFF's JPEGTables spliced in,
Aperio's RGB-JPEG marked as RGB).

A decoder that gets a slide's colours wrong must never be used silently:
:func:`device_rows` decodes a sample of the tiles the pass will touch both
ways and uses the device only when the mean absolute difference from the CPU
decode (tifffile/imagecodecs, the reference) is at most ``tolerance`` grey
levels; otherwise it says why and the engine decodes on the CPU.  (nvJPEG
differs from libjpeg-turbo by about 0.4 grey levels on average on ordinary
YCbCr tiles; a colour-space mistake costs about 50.)
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from ..errors import SlideError

# ``auto``: on the device when it is a CUDA GPU and the sample check passes; ``cpu``: always imagecodecs in
# threads; ``device``: TorchCodec/torchvision on the model's device whatever it is (still checked; falls back
# with a note).  Defined once, beside the other run settings.
from ..settings import DECODE_MODES

if TYPE_CHECKING:
    from collections.abc import Callable, Iterable, Sequence
    from concurrent.futures import Executor

    import torch

    from .slide import Slide

__all__ = ["DECODE_MODES", "DecodeChoice", "DeviceRows", "device_rows", "jpeg_decoder"]

log = logging.getLogger(__name__)

_FILL = 255


def jpeg_decoder(backend: str = "auto") -> tuple[str, Callable[..., Any]]:
    """``(name, decode_jpeg)``: TorchCodec's when installed (``auto``) or asked for, else torchvision's.

    Both take a list of 1-D uint8 CPU tensors, ``mode="RGB"`` and ``device``
    (nvJPEG on CUDA) and return a list of ``3 x h x w`` uint8 tensors there.
    """
    if backend not in ("auto", "torchcodec", "torchvision"):
        raise SlideError(f"Unknown JPEG decoder {backend!r}; use auto, torchcodec or torchvision.")
    if backend in ("auto", "torchcodec"):
        try:
            from torchcodec.decoders import decode_jpeg

            return "torchcodec", decode_jpeg
        except (ImportError, OSError, RuntimeError) as err:  # absent, or built for another torch
            if backend == "torchcodec":
                raise SlideError(f"TorchCodec cannot be used here ({err}): pip install torchcodec") from err
    import warnings

    # torchvision 0.29 warns at every call that TorchCodec supersedes it; we already prefer TorchCodec
    warnings.filterwarnings("ignore", message="The image decoding and encoding capabilities of TorchVision",
                            category=DeprecationWarning)
    from torchvision.io import decode_jpeg

    return "torchvision", decode_jpeg


class DeviceRows:
    """Tile rows of one level decoded on ``device`` (:func:`jpeg_decoder`): uint8 ``(tile_h, level_w, 3)`` there.

    Callable like :meth:`napari_bcd.io.Slide.read_tile_row`; only the tile
    columns asked for are decoded (one batched call per row), everything else
    and anything past the image is glass (255).
    """

    def __init__(self, slide: Slide, level: int, device: str | torch.device, backend: str = "auto") -> None:
        import torch

        if slide.jpeg_tiles(level) is None:
            raise SlideError(f"{slide.name}: level {level} is not stored as JPEG tiles; decode it on the CPU.")
        self.backend, self._decode_jpeg = jpeg_decoder(backend)
        self.slide, self.level = slide, level
        self.device = torch.device(device)
        self.tile_hw = slide.tile_shape(level)
        self.shape = slide.level_info[level].shape
        self.decoded = 0  # tiles decoded so far (a benchmark figure: decodes per pass)
        #: The decoder's output mode: "RGB" (converted as the stream's markers say), or "UNCHANGED"
        #: (the three components as stored; for RGB-JPEG that a decoder would otherwise take for YCbCr).
        self.mode = "RGB"

    def decode(self, tiles: Sequence[tuple[int, int]], pool: Executor | None = None) -> list[torch.Tensor | None]:
        """Tiles ``(ty, tx)`` as ``(3, tile_h, tile_w)`` uint8 tensors on the device (None: an empty tile)."""
        import torch

        def read(t: tuple[int, int]) -> bytes | None:
            return self.slide.jpeg_tile(self.level, t[0], t[1])

        streams = list(pool.map(read, tiles)) if pool is not None else [read(t) for t in tiles]
        present = [i for i, s in enumerate(streams) if s is not None]
        out: list[torch.Tensor | None] = [None] * len(tiles)
        if present:
            data = [torch.frombuffer(bytearray(streams[i]), dtype=torch.uint8) for i in present]
            images = self._decode_jpeg(data, mode=self.mode, device=self.device)
            for i, img in zip(present, images, strict=True):
                out[i] = img
            self.decoded += len(present)
        return out

    def __call__(self, level: int, ty: int, columns: Iterable[int] | None = None,
                 pool: Executor | None = None) -> torch.Tensor:
        import torch

        if level != self.level:
            raise SlideError(f"This reader decodes level {self.level}, not {level}.")
        th, tw = self.tile_hw
        H, W = self.shape
        out = torch.full((th, W, 3), _FILL, dtype=torch.uint8, device=self.device)
        n_rows, n_cols = math.ceil(H / th), math.ceil(W / tw)
        if not 0 <= ty < n_rows:
            return out
        cols = [tx for tx in (range(n_cols) if columns is None else columns) if 0 <= tx < n_cols]
        for tx, img in zip(cols, self.decode([(ty, tx) for tx in cols], pool), strict=True):
            if img is None:
                continue
            x0 = tx * tw
            w = min(tw, W - x0)
            out[:, x0 : x0 + w] = img.permute(1, 2, 0)[:th, :w]
        if (ty + 1) * th > H:  # the last row's tiles run past the image: glass, not the encoder's padding
            out[H - ty * th :] = _FILL
        return out


@dataclass(frozen=True)
class DecodeChoice:
    """Where a pass's JPEG tiles were decoded, and why (typed: nothing reads this from the text).

    Attributes
    ----------
    on_device
        Decoded on the model's device.
    asked
        The device decoder was asked for (``"device"``, or ``"auto"`` with a CUDA model).
    detail
        What was checked, or why the CPU decodes ("" when nothing was asked).
    """

    on_device: bool = False
    asked: bool = False
    detail: str = ""

    @property
    def fell_back(self) -> bool:
        """The device decoder was asked for and not used."""
        return self.asked and not self.on_device

    @property
    def text(self) -> str:
        """In words, for the summary and the cohort table (e.g. ``cpu: the tiles are not baseline JPEG``)."""
        if self.on_device:
            return self.detail
        return f"cpu: {self.detail}" if self.detail else "cpu"


def device_rows(slide: Slide, level: int, device: str | torch.device, mode: str = "auto",
                sample: Sequence[tuple[int, int]] = (), tolerance: float = 1.0,
                ) -> tuple[DeviceRows | None, DecodeChoice]:
    """The device's tile-row reader when ``mode`` asks for it and it decodes this slide right, and why.

    Parameters
    ----------
    mode
        One of :data:`DECODE_MODES`.
    sample
        Tiles ``(ty, tx)`` to compare with the CPU decode (up to 8 are used);
        the tiles the pass touches, spread out.
    tolerance
        Largest mean absolute difference (grey levels) from the CPU decode.

    Returns
    -------
    (DeviceRows or None, DecodeChoice)
        None means: decode on the CPU; the choice says why (or what was checked).
    """
    import torch

    if mode not in DECODE_MODES:
        raise SlideError(f"Unknown decode mode {mode!r}; use one of {', '.join(DECODE_MODES)}.")
    device = torch.device(device)
    if mode == "cpu" or (mode == "auto" and device.type != "cuda"):
        return None, DecodeChoice()

    def cpu(why: str) -> tuple[None, DecodeChoice]:
        return None, DecodeChoice(False, True, why)

    kind = slide.jpeg_tiles(level)
    if kind is None:
        return cpu("the tiles are not baseline JPEG")
    try:
        reader = DeviceRows(slide, level, device)
    except ImportError:
        return cpu("neither TorchCodec nor torchvision is installed")
    picks = list(sample)
    if len(picks) > 8:
        picks = [picks[i] for i in np.linspace(0, len(picks) - 1, 8).round().astype(int)]
    # RGB-JPEG: if the decoder ignores the RGB marking and converts as from YCbCr, its "UNCHANGED" output (the
    # components as stored, no colour conversion: nvJPEG's NVJPEG_OUTPUT_UNCHANGED) may still be right.
    tried = []
    for out_mode in ("RGB", "UNCHANGED") if kind == "rgb" else ("RGB",):
        reader.mode = out_mode
        try:
            diff = _mean_difference(slide, reader, picks)
        except Exception as err:  # noqa: BLE001 - any decoder failure means: not this way
            log.info("device decode (%s) refused for %s: %s", out_mode, slide.name, err)
            tried.append(f"{out_mode}: {type(err).__name__}: {err}")
            continue
        if diff <= tolerance:
            reader.decoded = 0
            how = "" if out_mode == "RGB" else ", components as stored"
            return reader, DecodeChoice(True, True, f"{reader.backend} on {device} ({kind.upper()}-JPEG{how}, mean "
                                                    f"difference {diff:.2f} on {len(picks)} tiles)")
        tried.append(f"{out_mode}: differs by {diff:.1f} grey levels on average" if np.isfinite(diff)
                     else f"{out_mode}: no sample tile to compare")
    return cpu(f"the device decoder does not give the CPU decode's pixels on this slide's {kind.upper()}-JPEG tiles "
               f"({'; '.join(tried)}); decoding on the CPU")


def _mean_difference(slide: Slide, reader: DeviceRows, tiles: Sequence[tuple[int, int]]) -> float:
    """Mean absolute difference between the device's and the CPU's decode of ``tiles`` (inside the image)."""
    th, tw = reader.tile_hw
    H, W = reader.shape
    total, count = 0.0, 0
    for (ty, tx), img in zip(tiles, reader.decode(tiles), strict=True):
        h, w = min(th, H - ty * th), min(tw, W - tx * tw)
        if img is None or h <= 0 or w <= 0:
            continue
        ref = slide.read_region(reader.level, ty * th, tx * tw, h, w, cache=False)
        got = img.permute(1, 2, 0)[:h, :w].cpu().numpy()
        total += float(np.abs(got.astype(np.int16) - ref.astype(np.int16)).sum())
        count += ref.size
    return total / count if count else float("inf")
