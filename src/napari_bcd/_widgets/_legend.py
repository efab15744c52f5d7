"""The class legend of the Classify dock: colour, class, area; a click hides or shows a class on the map."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING

from qtpy.QtWidgets import QCheckBox, QGridLayout, QLabel, QSizePolicy, QWidget

if TYPE_CHECKING:
    from ..summary import Summary

__all__ = ["Legend"]


class Legend(QWidget):
    """One row per model class: a colour swatch, a check box with the class name, its area and share."""

    def __init__(self, on_toggle: Callable[[set[int]], None]) -> None:
        super().__init__()
        self._on_toggle = on_toggle
        self._grid = QGridLayout(self)
        self._grid.setContentsMargins(0, 4, 0, 4)
        self._grid.setColumnStretch(1, 1)
        self._boxes: dict[int, QCheckBox] = {}
        self.setVisible(False)  # nothing to explain before a result

    def show_summary(self, summary: Summary, classes: Sequence[str]) -> None:
        """Rows for the classes of this result (the model's own, in its colours); hidden classes stay hidden."""
        from ..classes import class_styles

        hidden = self.hidden()
        while self._grid.count():
            item = self._grid.takeAt(0)
            if item.widget() is not None:
                item.widget().deleteLater()
        self._boxes = {}
        by_name = {c.name: c for c in summary.classes}
        for row, st in enumerate(class_styles(classes)):
            swatch = QLabel()
            swatch.setFixedSize(14, 14)
            swatch.setStyleSheet(f"background-color: rgb{st.color}; border: 1px solid #888;")
            box = QCheckBox(st.display_name)
            box.setChecked(st.label not in hidden)
            box.setToolTip(f"Show or hide {st.display_name} on the map")
            box.setSizePolicy(QSizePolicy.Policy.Ignored, QSizePolicy.Policy.Fixed)  # narrow docks cut the name,
            box.setMinimumWidth(70)  # not the dock
            box.toggled.connect(self._changed)
            c = by_name.get(st.name)
            area = QLabel(f"{c.area_mm2:.3f} mm² {c.percent_of_tissue:.0f}%" if c else "")
            self._grid.addWidget(swatch, row, 0)
            self._grid.addWidget(box, row, 1)
            self._grid.addWidget(area, row, 2)
            self._boxes[st.label] = box
        self._left_out_rows(summary, row + 1 if classes else 0)
        self.setVisible(True)

    def _left_out_rows(self, summary: Summary, first: int) -> None:
        """One row per quality-control reason that left tissue out: its colour on the QC layer and its area."""
        from ..qc import REASON_COLOURS, REASON_WORDS

        for i, (reason, mm2) in enumerate(summary.left_out.items()):
            swatch = QLabel()
            swatch.setFixedSize(14, 14)
            swatch.setStyleSheet(f"background-color: rgb{REASON_COLOURS[reason]}; border: 1px solid #888;")
            text = QLabel(f"left out: {REASON_WORDS[reason]}")
            text.setToolTip("Quality control kept this tissue out of the map, the areas and the call "
                            "(the '... quality control' layer shows where)")
            self._grid.addWidget(swatch, first + i, 0)
            self._grid.addWidget(text, first + i, 1)
            self._grid.addWidget(QLabel(f"{mm2:.3f} mm²"), first + i, 2)

    def hidden(self) -> set[int]:
        return {label for label, box in self._boxes.items() if not box.isChecked()}

    def set_shown(self, label: int, shown: bool) -> None:
        """Check or uncheck a class (what a click does)."""
        self._boxes[label].setChecked(shown)

    def _changed(self, _checked: bool) -> None:
        self._on_toggle(self.hidden())
