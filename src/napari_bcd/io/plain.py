"""Plain images (PNG, JPEG, BMP, a one-page TIFF read whole): decoded once, held in memory."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from ..errors import SlideError
from .memory import ArraySegments
from .segments import MAX_PLAIN_PIXELS, MPP_RANGE, LevelInfo, check_pixels
from .slide import Slide

__all__ = ["open_plain"]


def open_plain(p: Path) -> Slide:
    from PIL import Image

    limit = Image.MAX_IMAGE_PIXELS
    Image.MAX_IMAGE_PIXELS = None  # our own limit, with a message that says what to do, replaces PIL's here
    try:
        with Image.open(p) as im:
            Image.MAX_IMAGE_PIXELS = limit
            if im.size[0] * im.size[1] > MAX_PLAIN_PIXELS:
                w, h = im.size
                raise SlideError(
                    f"{p.name} is a plain image of {w:,} x {h:,} px ({w * h * 3 / 2**30:.1f} GiB decoded). napari-bcd "
                    f"decodes plain images whole, up to {MAX_PLAIN_PIXELS // 10**6} megapixels; save it as a tiled "
                    "pyramid TIFF (e.g. vips tiffsave --tile --pyramid, or QuPath's OME-TIFF export)."
                )
            dpi = im.info.get("dpi")
            mode = im.mode
            if mode in ("I;16", "I;16B", "I", "F"):
                check_pixels(p, np.uint16 if mode.startswith("I;16") else np.float32, 1)
            if mode in ("L", "1", "P") and mode != "P":
                raise SlideError(f"{p.name} is grayscale; napari-bcd needs RGB H&E images.")
            arr = np.asarray(im.convert("RGB"))
    except SlideError:
        raise
    except Image.DecompressionBombError as err:  # pragma: no cover - our limit comes first
        raise SlideError(f"{p.name} is too large for a plain image ({err}); save it as a tiled pyramid TIFF.") from err
    except (OSError, SyntaxError, ValueError) as err:
        raise SlideError(f"{p.name} cannot be read as an image ({err}). It may be truncated or corrupt.") from err
    finally:
        Image.MAX_IMAGE_PIXELS = limit
    mpp = None
    if dpi and dpi[0] and dpi[1]:
        cand = (25_400 / float(dpi[1]), 25_400 / float(dpi[0]))
        mpp = cand if MPP_RANGE[0] <= cand[1] <= MPP_RANGE[1] else None
    h, w = arr.shape[:2]
    return Slide(p, [LevelInfo((h, w), (1.0, 1.0))], mpp, [ArraySegments(arr)], vendor="plain")
