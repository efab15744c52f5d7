"""napari layer -> core objects, shared by the dock widgets."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..errors import BcdError

if TYPE_CHECKING:
    from magicgui.widgets import ComboBox
    from napari.layers import Layer

    from ..io.slide import Slide

log = logging.getLogger(__name__)


def slide_for_layer(layer: Layer, mpp: float | None = None) -> Slide:
    """A :class:`~napari_bcd.io.Slide` for an image layer: its file when it has one, else its data.

    ``mpp`` (µm/px) wins; otherwise the layer's ``scale`` is taken as µm/px
    unless it is the default 1 (no pixel size known).
    """
    from ..io import Slide, open_slide

    if not mpp:
        scale = tuple(float(s) for s in layer.scale[-2:])
        mpp = scale if scale != (1.0, 1.0) else None  # type: ignore[assignment]
    if mpp is None:
        raise BcdError(
            f"{layer.name!r} has no pixel size. Set µm / pixel (e.g. 0.25 at 40x, 0.5 at 20x, 0.42 for ICIAR photos)."
        )
    path = (layer.metadata.get("napari_bcd") or {}).get("path") or getattr(layer.source, "path", None)
    if path and Path(path).is_file():
        try:
            return open_slide(path, mpp=mpp)
        except BcdError:
            log.info("reading %s through the layer's data instead", path)
    data = layer.data[0] if layer.multiscale else layer.data
    return Slide.from_array(data, mpp=mpp, name=layer.name)


def refresh_combo(combo: ComboBox, prefer: Any = None, pick: int | None = -1) -> None:
    """Re-read a layer combo's choices; when it has no value, choose ``prefer`` if offered, else ``choices[pick]``
    (``pick=None``: leave it empty, for what only the user may choose)."""
    combo.reset_choices()
    choices = [c for c in combo.choices if c is not None]
    if combo.value is None and choices and (pick is not None or prefer in choices):
        combo.value = prefer if prefer in choices else choices[pick]  # type: ignore[index]
