"""The pixel size in use: the file's, or one the user states, and where it comes from."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from magicgui.widgets import FloatSpinBox, Label
from napari.utils.notifications import show_warning

from ._layout import wrapped

__all__ = ["MppField"]


class MppField:
    """A µm / pixel box (0 = the file's) and a line saying where the value comes from."""

    def __init__(self, on_change: Callable[[], None]) -> None:
        self.edit = FloatSpinBox(label="µm / pixel", value=0.0, min=0.0, max=100.0, step=0.0001,
                                 tooltip="The pixel size in use: the file's, or one you set")
        self.source = wrapped(Label(label="", value=""))
        self.widgets = (self.edit, self.source)
        self._on_change = on_change
        self._file: float | None = None
        self._setting = False
        self.edit.changed.connect(self._on_edit)

    @property
    def value(self) -> float | None:
        return self.edit.value or None

    def show_layer(self, layer: Any) -> None:
        """Show the image layer's pixel size (its scale, unless the default 1) and where it comes from."""
        scale = tuple(float(s) for s in layer.scale[-2:]) if layer is not None else (1.0, 1.0)
        self._file = scale[-1] if scale != (1.0, 1.0) else None
        self._setting = True
        try:
            self.edit.value = self._file or 0.0
        finally:
            self._setting = False
        if layer is None:
            self.source.value = ""
        elif self._file:
            self.source.value = "from the file"
        else:
            self.source.value = "unknown: set µm / pixel (0.25 at 40x, 0.5 at 20x, 0.42 for ICIAR photos)"
        self._on_change()

    def _on_edit(self) -> None:
        if self._setting:
            return
        value = self.edit.value
        if not value:  # 0 goes back to the file's value
            self._setting = True
            try:
                self.edit.value = self._file or 0.0
            finally:
                self._setting = False
            self.source.value = "from the file" if self._file else self.source.value
            self._on_change()
            return
        if self._file and abs(value - self._file) > 1e-9:
            ratio = value / self._file
            if not 0.5 <= ratio <= 2:
                self.source.value = (f"set by you: {ratio:.1f}x the file's {self._file:.4g} µm/px; windows would "
                                     f"show {max(ratio, 1 / ratio):.1f}x {'less' if ratio > 1 else 'more'} tissue "
                                     "than the model expects")
                show_warning(f"µm / pixel {value:g} contradicts the file's {self._file:g} by more than 2x.")
            else:
                self.source.value = f"set by you (the file says {self._file:.4g})"
        else:
            self.source.value = "from the file" if self._file else "set by you"
        self._on_change()
