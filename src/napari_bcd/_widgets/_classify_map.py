"""The Classify dock's "The map" section: everything it shows of a map, derived from the map's store.

Slide call, stain note, summary table, legend (a click hides a class), hover
and exports all read the :class:`~napari_bcd.app.MapStore` of the layer
shown, so a retrain, an *Apply*, an *Undo* or a repainted cell shows at once.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from magicgui.widgets import Label, PushButton
from napari.utils.notifications import show_info

from ..errors import BcdError
from ..export import OUTPUT_KINDS
from ._layout import Section, buttons, readonly_text, wrapped
from ._legend import Legend
from ._worker import notify_error

if TYPE_CHECKING:
    from ..app.mapstate import MapState, MapStore
    from ..engine import ClassMap

#: The exports offered under the map (rows of :data:`~napari_bcd.export.OUTPUTS`).
EXPORTS = ("geojson", "summary_csv", "labels", "probabilities")


class MapView:
    """The widgets of one map's views, bound to its store; ``on_change(state, reason, summary)`` tells the dock."""

    def __init__(self, viewer: Any, parent: Any, on_change: Callable[[MapState, str, Any], None]) -> None:
        self._viewer, self._parent, self._on_change = viewer, parent, on_change
        self.call = wrapped(Label(label="", value=""), rich=True)
        self.stain_note = wrapped(Label(label="", value=""))
        self.summary = readonly_text(max_height=130)
        self.legend = Legend(self.on_legend_toggled)
        self.hover = wrapped(Label(label="", value=""))
        self.export_buttons = {k: PushButton(text=OUTPUT_KINDS[k].label, enabled=False) for k in EXPORTS}
        self.section = Section("The map", [self.call, self.stain_note, self.summary, self.legend, self.hover,
                                           buttons(*self.export_buttons.values())], labels=False)
        self.store: MapStore | None = None
        self.layer = None
        self._unlisten = None
        for kind, button in self.export_buttons.items():
            button.changed.connect(lambda *_, k=kind: self.export(k))
        viewer.mouse_move_callbacks.append(self.on_mouse_move)

    def bind(self, layer: Any, store: MapStore) -> None:
        """Show ``layer``'s map from now on (and follow its store)."""
        self.layer = layer
        if store is not self.store:
            if self._unlisten is not None:
                self._unlisten()
            self.store, self._unlisten = store, store.listen(self.on_map_changed)
        self.on_map_changed(store.state, "new")

    @property
    def shown(self) -> ClassMap | None:
        """The map as the layer shows it (the model's, with the cells repainted by hand)."""
        return self.store.state.shown if self.store is not None else None

    def on_map_changed(self, state: MapState, reason: str) -> None:
        """Every view follows the store: a retrain, an Apply, an Undo, a repainted cell."""
        from ..summary import summarize

        shown = state.shown
        summary = summarize(shown)
        self.summary.value = summary.table(compact=True)
        self.call.value = f"<b>{summary.call_text[:1].upper()}{summary.call_text[1:]}</b>"
        self.legend.show_summary(summary, shown.classes)
        self.on_legend_toggled(self.legend.hidden())
        warnings = [shown.run.stain.warning(advice="choose stain: normalise (Macenko) and Run again")
                    if shown.run is not None else "", summary.qc_warning]
        self.stain_note.value = " ".join(w[:1].upper() + w[1:] + "." for w in warnings if w)
        for b in self.export_buttons.values():
            b.enabled = True
        self._on_change(state, reason, summary)

    def on_legend_toggled(self, hidden: set[int]) -> None:
        """A click on a class in the legend hides or shows it on the map."""
        from napari.utils.colormaps import DirectLabelColormap

        from ..layers import label_colors

        if self.store is None or self.layer is None or self.layer not in self._viewer.layers:
            return
        colors = label_colors(self.store.state.class_map.classes)
        for label in hidden:
            colors[label] = (0.0, 0.0, 0.0, 0.0)
        self.layer.colormap = DirectLabelColormap(color_dict=colors)

    def on_mouse_move(self, viewer: Any, event: Any) -> None:
        if self.store is None:
            return
        from ..layers import describe_hover

        state = self.store.state
        pos = viewer.cursor.position[-2:]
        self.hover.value = describe_hover(state.shown, (float(pos[0]), float(pos[1])), state.translate)

    def export(self, kind: str, path: str | None = None) -> str | None:
        """Write the map as shown (one of :data:`EXPORTS`) to ``path`` (asked for when None)."""
        from ..export import write_output

        shown = self.shown
        if shown is None:
            return None
        output = OUTPUT_KINDS[kind]
        if path is None:
            from qtpy.QtWidgets import QFileDialog

            path, _ = QFileDialog.getSaveFileName(self._parent, f"Save the {output.label}",
                                                  f"{self.store.state.image}{output.suffix}")
            if not path:
                return None
        try:
            write_output(kind, shown, path)
        except (BcdError, OSError) as err:
            notify_error(BcdError(f"Could not write {path}: {err}"))
            return None
        show_info(f"Saved {Path(path).name}")
        return path
