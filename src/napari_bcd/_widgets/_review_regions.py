"""The Review dock's "Regions" section (figures of the shapes of a layer you choose) and "Why the model said
so" (Grad-CAM)."""

from __future__ import annotations

from typing import TYPE_CHECKING

from magicgui.widgets import ComboBox, PushButton
from napari.utils.notifications import show_info

from ..app.review import saliency_job
from ..errors import BcdError
from ._layers import refresh_combo, slide_for_layer
from ._layout import Section, buttons
from ._worker import notify_error

if TYPE_CHECKING:
    from ..app.mapstate import MapState
    from .review import ReviewWidget


class RegionsSection:
    """A live table of what each shape holds (area, tissue, each class's share, mean probabilities, uncertain
    share), exported as CSV or as QuPath GeoJSON with measurements."""

    def __init__(self, dock: ReviewWidget) -> None:
        from qtpy.QtWidgets import QSizePolicy, QTableWidget

        self.dock = dock
        self._shapes_combo = ComboBox(label="regions (shapes)", choices=dock.shapes_choices, nullable=True,
                                      tooltip="the Shapes layer whose shapes are measured")
        self._table = QTableWidget(0, 0)
        self._table.setMinimumHeight(120)
        self._table.setSizePolicy(QSizePolicy.Policy.Ignored, QSizePolicy.Policy.Preferred)
        self._export_csv = PushButton(text="Table as CSV")
        self._export_geojson = PushButton(text="Regions as GeoJSON")
        self.section = Section("Regions", [self._shapes_combo, self._table,
                                           buttons(self._export_csv, self._export_geojson)], open=False)
        self.rows: list = []
        self._shapes = None
        self._shapes_combo.changed.connect(self._on_shapes_changed)
        self._export_csv.changed.connect(lambda: self.export("csv"))
        self._export_geojson.changed.connect(lambda: self.export("geojson"))

    def refresh_layers(self) -> None:
        refresh_combo(self._shapes_combo, pick=None)

    def show_state(self, state: MapState | None, reason: str) -> None:
        self.update_table()

    def _on_shapes_changed(self) -> None:
        if self._shapes is not None:
            self._shapes.events.data.disconnect(self.update_table)
        self._shapes = self._shapes_combo.value
        if self._shapes is not None:
            self._shapes.events.data.connect(self.update_table)
        self.update_table()

    def _annotations(self):
        from ..annotations.napari import shapes_to_annotations

        return shapes_to_annotations(self._shapes, self.dock.image_layer())

    def update_table(self, event=None) -> list:
        """Recompute the table from the map as shown (called as the shapes or the map change)."""
        from qtpy.QtWidgets import QTableWidgetItem

        from ..review import region_table

        state = self.dock.state
        if state is None or self._shapes is None or not len(self._shapes.data):
            self.rows = []
            self._table.setRowCount(0)
            return self.rows
        try:
            anns = self._annotations()
        except BcdError as err:
            self.dock.say(str(err))
            return []
        cm = state.shown
        self.rows = region_table(cm, anns, names=[f"{i + 1}: {a.label or 'region'}" for i, a in enumerate(anns)])
        cols = ["region", "mm²", "tissue mm²", *[f"{c} %" for c in cm.classes], "uncertain %", "mean p (majority)"]
        self._table.setColumnCount(len(cols))
        self._table.setHorizontalHeaderLabels(cols)
        self._table.setRowCount(len(self.rows))
        for i, r in enumerate(self.rows):
            major = r.majority
            vals = [r.name, f"{r.area_mm2:.4f}", f"{r.tissue_mm2:.4f}",
                    *[f"{r.class_share[c]:.1f}" for c in cm.classes],
                    f"{r.uncertain_share:.1f}", f"{r.mean_probability[major]:.2f} ({major})" if major else ""]
            for j, v in enumerate(vals):
                self._table.setItem(i, j, QTableWidgetItem(v))
        self._table.resizeColumnsToContents()
        return self.rows

    def export(self, kind: str, path: str | None = None) -> str | None:
        """Write the table as CSV, or the regions with their figures as QuPath GeoJSON."""
        if not self.rows:
            notify_error(BcdError("Draw shapes on a Shapes layer over the slide and choose it under 'regions'."))
            return None
        from .._fileio import atomic_write
        from ..annotations import write_geojson
        from ..review import region_annotations, region_table_csv

        state = self.dock.state
        if path is None:
            from qtpy.QtWidgets import QFileDialog

            suffix = ".regions.csv" if kind == "csv" else ".regions.geojson"
            path, _ = QFileDialog.getSaveFileName(self.dock.native, "Export", f"{state.image}{suffix}")
            if not path:
                return None
        try:
            if kind == "csv":
                with atomic_write(path, "w") as fh:
                    fh.write(region_table_csv(self.rows, state.class_map.slide_name))
            else:
                write_geojson(region_annotations(self._annotations(), self.rows, state.class_map.classes), path,
                              overwrite=True)
        except (BcdError, OSError) as err:
            notify_error(BcdError(f"Could not write {path}: {err}"))
            return None
        show_info(f"Saved {path}")
        return path


class ExplainSection:
    """Grad-CAM of the uncertain region gone to last, else of the part of the slide in view."""

    def __init__(self, dock: ReviewWidget) -> None:
        self.dock = dock
        self._cam_class = ComboBox(label="explain", choices=["predicted class"])
        self._cam_button = PushButton(text="Grad-CAM of the region / view")
        self.section = Section("Why the model said so", [self._cam_class, buttons(self._cam_button)], open=False)
        self._cam_button.changed.connect(lambda: self.explain())

    def set_running(self, running: bool) -> None:
        self._cam_button.enabled = not running

    def show_state(self, state: MapState | None, reason: str) -> None:
        if state is not None and reason in ("chosen", "new"):
            self._cam_class.choices = ["predicted class", *state.class_map.classes]

    def _view_box(self) -> tuple[float, float, float, float]:
        """The selected uncertain region, else the part of the image in view, in level-0 pixels."""
        dock, state = self.dock, self.dock.state
        box = dock.rule.selected_box()
        if box is not None:
            return box
        my, mx = state.class_map.grid.mpp
        ty, tx = state.translate
        cy, cx = dock.viewer.camera.center[-2:]
        size = getattr(dock.viewer, "_canvas_size", None) or (600, 800)
        hy, hx = size[0] / dock.viewer.camera.zoom / 2, size[1] / dock.viewer.camera.zoom / 2
        return ((cy - hy - ty) / my, (cx - hx - tx) / mx, (cy + hy - ty) / my, (cx + hx - tx) / mx)

    def explain(self, box: tuple[float, float, float, float] | None = None) -> None:
        """Grad-CAM of the windows under ``box`` (default: the selected region or the view), as an image layer."""
        dock = self.dock
        cls = None if self._cam_class.value == "predicted class" else self._cam_class.value
        try:
            state = dock.state
            if state is None:
                raise BcdError("Choose a class map (classify a slide first).")
            image = dock.image_layer()
            slide = slide_for_layer(image, state.class_map.grid.mpp[1])
            gen = saliency_job(state, slide, box or self._view_box(), cls)
        except BcdError as err:
            notify_error(err)
            return
        translate = tuple(float(t) for t in image.translate[-2:])
        dock.say("Grad-CAM…")
        dock.start("Grad-CAM", gen, lambda p: dock.progress(*p),
                   lambda sal: self._show(sal, image.name, translate), layers=(image,))

    def _show(self, sal, image_name: str, translate) -> None:
        viewer = self.dock.viewer
        name = f"{image_name} Grad-CAM"
        kwargs = sal.layer_kwargs(translate)
        if name in viewer.layers:
            layer = viewer.layers[name]
            layer.data = sal.image
            layer.scale, layer.translate = kwargs["scale"], kwargs["translate"]
        else:
            viewer.add_image(sal.image, name=name, **kwargs)
        what = sal.class_name or "each window's predicted class"
        self.dock.say(f"Grad-CAM of {what} over {sal.windows} window(s): bright = evidence for it.")
