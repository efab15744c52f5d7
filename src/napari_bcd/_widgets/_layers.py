"""napari layer -> core objects, shared by the dock widgets."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..errors import BcdError

if TYPE_CHECKING:
    from magicgui.widgets import ComboBox, Container, TextEdit
    from napari.layers import Layer
    from qtpy.QtWidgets import QScrollArea, QWidget

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


def refresh_combo(combo: ComboBox, prefer: Any = None, pick: int = -1) -> None:
    """Re-read a layer combo's choices; when it has no value, choose ``prefer`` if offered, else ``choices[pick]``."""
    combo.reset_choices()
    choices = [c for c in combo.choices if c is not None]
    if combo.value is None and choices:
        combo.value = prefer if prefer in choices else choices[pick]


def readonly_text() -> TextEdit:
    """A read-only, monospaced text box (for tables and reports); lines scroll instead of wrapping."""
    from magicgui.widgets import TextEdit
    from qtpy.QtWidgets import QTextEdit

    box = TextEdit(label="", value="")
    box.native.setReadOnly(True)
    box.native.setLineWrapMode(QTextEdit.LineWrapMode.NoWrap)
    box.native.setStyleSheet("font-family: monospace; font-size: 9pt;")
    return box


def scroll_to(area: QScrollArea, widget: Any) -> None:
    """Scroll ``area`` vertically so ``widget`` is in view (never sideways: ensureWidgetVisible would)."""
    from qtpy.QtCore import QPoint

    inner = area.widget()
    if inner is None:
        return
    y = widget.mapTo(inner, QPoint(0, 0)).y()
    area.horizontalScrollBar().setValue(0)
    area.ensureVisible(0, y + widget.height() // 2, 0, widget.height() // 2 + 12)


def compact_combos(container: Container) -> None:
    """Combo boxes as wide as the dock, not as their longest item (long items widened docks past the screen)."""
    from qtpy.QtWidgets import QComboBox

    for combo in container.findChildren(QComboBox):
        combo.setSizeAdjustPolicy(QComboBox.SizeAdjustPolicy.AdjustToMinimumContentsLengthWithIcon)
        combo.setMinimumContentsLength(10)


def scrolling(inner: QWidget) -> QScrollArea:
    """``inner`` (a QWidget) in a vertical scroll area, so a tall dock never makes the window taller than the screen.

    (magicgui's ``Container(scrollable=True)`` loses its scroll area when napari
    docks ``widget.native``, hence a plain Qt one here.)
    """
    from qtpy.QtCore import Qt
    from qtpy.QtWidgets import QFrame, QScrollArea

    compact_combos(inner)
    area = QScrollArea()
    area.setWidgetResizable(True)
    area.setFrameShape(QFrame.Shape.NoFrame)
    area.setHorizontalScrollBarPolicy(Qt.ScrollBarPolicy.ScrollBarAlwaysOff)
    area.setWidget(inner)
    # Tall enough to work in when three docks share the side, never taller than the content; as wide as the
    # content needs (a scroll area does not pass its content's minimum width on by itself).
    area.setMinimumHeight(min(inner.sizeHint().height(), 300))
    area.setMinimumWidth(inner.minimumSizeHint().width() + area.verticalScrollBar().sizeHint().width())
    return area
