"""npe2 reader: slides as lazy multiscale RGB image layers, scaled in µm."""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .errors import BcdError

if TYPE_CHECKING:
    from .io.slide import Slide

__all__ = ["napari_get_reader", "read_slide", "slide_layer_data"]

log = logging.getLogger(__name__)
LayerData = tuple[Any, dict, str]


def slide_layer_data(slide: Slide) -> LayerData:
    """``(data, kwargs, "image")`` for a :class:`~napari_bcd.io.Slide`.

    ``scale`` is µm per pixel so napari's scale bar reads µm; without mpp the
    scale stays 1 (pixels) and the metadata says so.
    """
    levels = slide.levels
    kwargs: dict[str, Any] = {
        "name": slide.path.stem,
        "rgb": True,
        "multiscale": len(levels) > 1,
        "metadata": {"napari_bcd": {"path": str(slide.path), "mpp": slide.mpp, "vendor": slide.vendor}},
    }
    if slide.mpp is not None:
        kwargs["scale"] = tuple(slide.mpp)
        kwargs["units"] = ("µm", "µm")
    return (levels if len(levels) > 1 else levels[0], kwargs, "image")


def read_slide(path: str | list[str]) -> list[LayerData]:
    """Read one slide (or several) into layer data."""
    from .io import open_slide

    paths = [path] if isinstance(path, str) else list(path)
    return [slide_layer_data(open_slide(p)) for p in paths]


def napari_get_reader(path: str | list[str]) -> Callable[[str | list[str]], list[LayerData]] | None:
    """Return :func:`read_slide` when every path is a slide we can open, else None.

    Declining lets napari's other readers try (a TIFF of another kind, say).
    """
    from .io import open_slide

    paths = [path] if isinstance(path, str) else list(path)
    for p in paths:
        q = Path(p)
        # A folder is ours when it holds DICOM WSI instances (OpenSlide reads them) or is an OME-Zarr RGB
        # image (other OME-Zarr images, e.g. fluorescence, are declined below when they fail to open as RGB).
        if q.is_dir():
            from .io.ngff import is_ngff

            if not is_ngff(q) and not any(f.suffix.lower() == ".dcm" for f in q.iterdir()):
                return None
        if not q.exists():
            return None
        try:
            open_slide(p).close()
        except BcdError as err:
            log.info("napari-bcd declines %s: %s", p, err)
            return None
    return read_slide
