"""How the docks are laid out: to fit a 380 px side dock on a 1366 x 768 screen, four of them at once.

Every dock is a vertical form in a scroll area that never scrolls sideways
(:func:`scrolling`); labels wrap (:func:`wrapped`), buttons share a row only
two at a time and may shrink (:func:`buttons`), combo boxes are as wide as
the dock rather than their longest item, and long docks fold into
:class:`Section` s.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from magicgui.widgets import Container, FileEdit, Label, PushButton, TextEdit
    from qtpy.QtWidgets import QScrollArea, QWidget

__all__ = ["Section", "buttons", "compact_file_edit", "readonly_text", "scroll_to", "scrolling", "wrapped"]


def wrapped(label: Label, rich: bool = False) -> Label:
    """A label that wraps to the dock's width (an unwrapped sentence widens the dock past the screen)."""
    from qtpy.QtCore import Qt
    from qtpy.QtWidgets import QSizePolicy

    label.native.setWordWrap(True)
    label.native.setSizePolicy(QSizePolicy.Policy.Ignored, QSizePolicy.Policy.Preferred)
    label.native.setMinimumWidth(40)
    if rich:
        label.native.setTextFormat(Qt.TextFormat.RichText)
    return label


def buttons(*row: PushButton, per_row: int = 2) -> Container:
    """Buttons in rows of ``per_row``, each free to shrink to its share of the dock's width."""
    from magicgui.widgets import Container
    from qtpy.QtWidgets import QSizePolicy

    for b in row:
        b.native.setSizePolicy(QSizePolicy.Policy.Ignored, QSizePolicy.Policy.Fixed)
        b.native.setMinimumWidth(40)
        b.native.setToolTip(b.native.toolTip() or b.text)  # the whole text when the button is narrow
    rows = [Container(widgets=list(row[i : i + per_row]), layout="horizontal", labels=False)
            for i in range(0, len(row), per_row)]
    for r in rows:
        r.margins = (0, 0, 0, 0)
    return rows[0] if len(rows) == 1 else Container(widgets=rows, labels=False)


def compact_file_edit(edit: FileEdit) -> FileEdit:
    """A file field whose button says "…" (its "Select file" text alone took a fifth of the dock)."""
    edit.choose_btn.text = "…"
    edit.choose_btn.native.setMaximumWidth(32)
    edit.choose_btn.native.setToolTip("Choose a file")
    return edit


def readonly_text(max_height: int | None = None) -> TextEdit:
    """A read-only, monospaced text box (tables and reports): long lines scroll inside it, not the dock."""
    from magicgui.widgets import TextEdit
    from qtpy.QtWidgets import QSizePolicy, QTextEdit

    box = TextEdit(label="", value="")
    box.native.setReadOnly(True)
    box.native.setLineWrapMode(QTextEdit.LineWrapMode.NoWrap)
    box.native.setStyleSheet("font-family: monospace; font-size: 9pt;")
    box.native.setSizePolicy(QSizePolicy.Policy.Ignored, QSizePolicy.Policy.Preferred)
    if max_height:
        box.native.setMaximumHeight(max_height)
    return box


class Section:
    """A titled part of a dock that folds: a check-able header button and the part's widgets under it."""

    def __init__(self, title: str, widgets: Sequence[Any], *, open: bool = True, labels: bool = True) -> None:
        from magicgui.widgets import Container
        from qtpy.QtCore import Qt
        from qtpy.QtWidgets import QSizePolicy, QToolButton

        self.title = title
        self.header = QToolButton()
        self.header.setText(title)
        self.header.setCheckable(True)
        self.header.setChecked(open)
        self.header.setToolButtonStyle(Qt.ToolButtonStyle.ToolButtonTextBesideIcon)
        self.header.setStyleSheet("QToolButton { border: none; font-weight: bold; }")
        self.header.setSizePolicy(QSizePolicy.Policy.Expanding, QSizePolicy.Policy.Fixed)
        from magicgui.widgets.bases import Widget

        self.body = Container(widgets=[w for w in widgets if isinstance(w, Widget)], labels=labels)
        self.body.margins = (12, 0, 0, 6)
        for i, w in enumerate(widgets):  # Qt widgets (a legend, a table, a plot) in their place among the others
            if not isinstance(w, Widget):
                self.body.native.layout().insertWidget(i, w)
        self.header.toggled.connect(self.set_open)
        self.set_open(open)

    @property
    def is_open(self) -> bool:
        return self.header.isChecked()

    def set_open(self, open: bool) -> None:
        from qtpy.QtCore import Qt

        if self.header.isChecked() != open:
            self.header.setChecked(open)  # comes back here through toggled
            return
        self.header.setArrowType(Qt.ArrowType.DownArrow if open else Qt.ArrowType.RightArrow)
        self.body.native.setVisible(open)

    def widgets(self) -> list[QWidget]:
        return [self.header, self.body.native]


def scroll_to(area: QScrollArea, widget: Any) -> None:
    """Scroll ``area`` vertically so ``widget`` is in view (never sideways: ensureWidgetVisible would)."""
    from qtpy.QtCore import QPoint

    inner = area.widget()
    if inner is None:
        return
    y = widget.mapTo(inner, QPoint(0, 0)).y()
    area.horizontalScrollBar().setValue(0)
    area.ensureVisible(0, y + widget.height() // 2, 0, widget.height() // 2 + 12)


def _compact_combos(inner: QWidget) -> None:
    from qtpy.QtWidgets import QComboBox, QSizePolicy

    for combo in inner.findChildren(QComboBox):
        combo.setSizeAdjustPolicy(QComboBox.SizeAdjustPolicy.AdjustToMinimumContentsLengthWithIcon)
        combo.setMinimumContentsLength(8)
        combo.setSizePolicy(QSizePolicy.Policy.Ignored, QSizePolicy.Policy.Fixed)


def scrolling(*parts: Any) -> QScrollArea:
    """The dock's parts (QWidgets, magicgui widgets or :class:`Section` s) stacked in a vertical scroll area.

    The area never scrolls sideways and never asks for more width than its
    narrowest sensible layout, so a tall dock scrolls and the window stays on
    the screen.  (magicgui's ``Container(scrollable=True)`` loses its scroll
    area when napari docks ``widget.native``, hence a plain Qt one here.)
    """
    from qtpy.QtCore import Qt
    from qtpy.QtWidgets import QFrame, QScrollArea, QVBoxLayout, QWidget

    inner = QWidget()
    layout = QVBoxLayout(inner)
    layout.setContentsMargins(4, 4, 4, 4)
    for part in parts:
        for w in (part.widgets() if isinstance(part, Section) else [getattr(part, "native", part)]):
            layout.addWidget(w)
    layout.addStretch(1)
    _compact_combos(inner)
    area = QScrollArea()
    area.setWidgetResizable(True)
    area.setFrameShape(QFrame.Shape.NoFrame)
    area.setHorizontalScrollBarPolicy(Qt.ScrollBarPolicy.ScrollBarAlwaysOff)
    area.setWidget(inner)
    area.setMinimumHeight(min(inner.sizeHint().height(), 120))  # four docks share a 768 px screen
    area.setMinimumWidth(min(inner.minimumSizeHint().width(), 300) + area.verticalScrollBar().sizeHint().width())
    return area
