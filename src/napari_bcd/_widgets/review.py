"""The "Review and retrain" dock: correct the class map, retrain, look at the uncertain places, explain.

A thin shell over :mod:`napari_bcd.review`.  It works on a ``<image> classes``
layer the Classify dock made (the class map travels in the layer's metadata):

* paint cells with napari's own brush, fill and eraser (the label numbers
  and colours are shown here), then **Retrain from corrections**: a new
  checkpoint beside the old one, the region re-predicted in place; **Undo**
  returns to the parent model and the layer exactly as it was;
* per-class thresholds and an "uncertain below" cut-off, applied to the map
  at once and saved into the model's card on request; the most uncertain
  regions listed, Next / Previous centring the view on each;
* a live table of what each shape of a Shapes layer holds (area, tissue,
  each class's mm² and share, mean probabilities, uncertain share), exported
  as CSV or QuPath GeoJSON with measurements;
* Grad-CAM of the selected region (or the current view) as an image layer.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
from magicgui.widgets import (
    CheckBox,
    ComboBox,
    Container,
    FloatSpinBox,
    Label,
    ProgressBar,
    PushButton,
)
from napari.layers import Labels, Shapes
from napari.utils.notifications import show_info

from ..decision import DEFAULT_MEASURE, MEASURES
from ..errors import BcdError
from ._layers import readonly_text, refresh_combo, scrolling, slide_for_layer
from ._worker import notify_error, start_job

if TYPE_CHECKING:
    from collections.abc import Generator

    import napari

    from ..engine import ClassMap
    from ..review import Corrections, DecisionRule, SaliencyMap

log = logging.getLogger(__name__)

MEASURE_NAMES = {m.label: name for name, m in MEASURES.items()}


def _meta(layer) -> dict:
    return (getattr(layer, "metadata", None) or {}).get("napari_bcd") or {}


class ReviewWidget(Container):
    """Correct a class map and retrain; the uncertain places first; region figures; why the model said so."""

    def __init__(self, viewer: napari.viewer.Viewer) -> None:
        super().__init__(labels=False)
        self._viewer = viewer
        self._map_combo = ComboBox(label="class map", choices=self._map_choices, nullable=True)
        self._paint_help = Label(label="", value="")
        self._paint_help.native.setWordWrap(True)
        from qtpy.QtCore import Qt

        self._paint_help.native.setTextFormat(Qt.TextFormat.RichText)  # the colour swatches
        self._paint_combo = ComboBox(label="paint class", choices=[])
        self._corr_label = Label(label="", value="")
        self._weight_spin = FloatSpinBox(label="weight", value=4.0, min=0.5, max=100.0, step=0.5,
                                         tooltip="how many training images each corrected cell counts as")
        self._whole_check = CheckBox(text="re-predict the whole slide (slower)", value=False)
        self._retrain_button = PushButton(text="Retrain from corrections")
        self._cancel_button = PushButton(text="Cancel", enabled=False)
        self._undo_button = PushButton(text="Undo", enabled=False)
        self._progress = ProgressBar(label="", value=0, min=0, max=1, visible=False)
        self._status = Label(label="", value="")
        self._status.native.setWordWrap(True)
        # uncertainty and thresholds
        self._measure_combo = ComboBox(label="uncertainty", choices=list(MEASURE_NAMES),
                                       value=MEASURES[DEFAULT_MEASURE].label)
        self._conf_spin = FloatSpinBox(label="uncertain below", value=0.0, min=0.0, max=1.0, step=0.05,
                                       tooltip="cells less confident than this are grey and out of the slide call")
        self._quality_spin = FloatSpinBox(label="min image quality", value=0.0, min=0.0, max=1.0, step=0.1,
                                          tooltip="cells with pen, blur or folds below this score are uncertain")
        self._thr_box = Container(layout="horizontal", labels=True, widgets=[])
        self._thr_spins: dict[str, FloatSpinBox] = {}
        self._apply_button = PushButton(text="Apply to the map")
        self._save_rule_button = PushButton(text="Save in the model")
        self._regions_text = readonly_text()
        self._prev_button = PushButton(text="◀ Previous")
        self._next_button = PushButton(text="Next ▶")
        # region table
        self._shapes_combo = ComboBox(label="regions (shapes)", choices=self._shapes_choices, nullable=True)
        self._export_csv = PushButton(text="Table as CSV")
        self._export_geojson = PushButton(text="Regions as GeoJSON")
        # saliency
        self._cam_class = ComboBox(label="explain", choices=["predicted class"])
        self._cam_button = PushButton(text="Grad-CAM of the region / view")

        from qtpy.QtWidgets import QTableWidget

        self._table = QTableWidget(0, 0)
        self._table.setMinimumHeight(120)
        form = Container(labels=True, widgets=[
            self._map_combo, self._paint_help, self._paint_combo, self._corr_label, self._weight_spin,
            self._whole_check,
            Container(widgets=[self._retrain_button, self._cancel_button, self._undo_button], layout="horizontal",
                      labels=False),
            self._progress, self._status,
            Label(value="<b>Uncertainty and thresholds</b>"),
            self._measure_combo, self._conf_spin, self._quality_spin, self._thr_box,
            Container(widgets=[self._apply_button, self._save_rule_button], layout="horizontal", labels=False),
            self._regions_text,
            Container(widgets=[self._prev_button, self._next_button], layout="horizontal", labels=False),
            Label(value="<b>Regions</b>"),
            self._shapes_combo,
            Container(widgets=[self._export_csv, self._export_geojson], layout="horizontal", labels=False),
            Label(value="<b>Why the model said so</b>"),
            self._cam_class, self._cam_button,
        ])
        form.native.layout().insertWidget(form.index(self._shapes_combo) + 1, self._table)
        self._regions_text.native.setMaximumHeight(120)
        self.native.layout().addWidget(scrolling(form.native))
        self._history: list[tuple] = []  # (layer data, metadata) before each retrain, for Undo
        self._regions = []
        self._region_index = -1
        self._rows = []
        self._worker = None
        self._layer = None
        self._shapes = None
        self._map_combo.changed.connect(self._on_map_changed)
        self._paint_combo.changed.connect(self._on_paint_class)
        self._retrain_button.changed.connect(self.retrain)
        self._cancel_button.changed.connect(self._on_cancel)
        self._undo_button.changed.connect(self.undo)
        self._apply_button.changed.connect(self.apply_rule)
        self._save_rule_button.changed.connect(self.save_rule)
        self._measure_combo.changed.connect(self._update_regions)
        self._next_button.changed.connect(lambda: self.go_to(self._region_index + 1))
        self._prev_button.changed.connect(lambda: self.go_to(self._region_index - 1))
        self._shapes_combo.changed.connect(self._on_shapes_changed)
        self._export_csv.changed.connect(lambda: self.export_table("csv"))
        self._export_geojson.changed.connect(lambda: self.export_table("geojson"))
        self._cam_button.changed.connect(self.explain)
        viewer.layers.events.inserted.connect(self._on_layers_changed)
        viewer.layers.events.removed.connect(self._on_layers_changed)
        self._on_layers_changed()

    # ------------------------------------------------------------------ layers
    def _map_choices(self, _widget=None) -> list:
        return [(layer.name, layer) for layer in self._viewer.layers
                if isinstance(layer, Labels) and _meta(layer).get("class_map") is not None]

    def _shapes_choices(self, _widget=None) -> list:
        return [(layer.name, layer) for layer in self._viewer.layers if isinstance(layer, Shapes)]

    def _on_layers_changed(self, event=None) -> None:
        refresh_combo(self._map_combo)
        refresh_combo(self._shapes_combo)

    @property
    def class_map(self) -> ClassMap | None:
        return _meta(self._map_combo.value).get("class_map") if self._map_combo.value is not None else None

    def _on_map_changed(self) -> None:
        if self._layer is not None:
            self._layer.events.paint.disconnect(self._on_painted)
            self._layer.events.set_data.disconnect(self._on_painted)
        self._layer = self._map_combo.value
        cm = self.class_map
        if self._layer is None or cm is None:
            self._paint_help.value = "Classify a slide first (Classify slide dock): its map appears here."
            return
        self._layer.events.paint.connect(self._on_painted)
        self._layer.events.set_data.connect(self._on_painted)
        from ..classes import class_styles
        from ..layers import UNCERTAIN_RGBA

        swatch = '<span style="background-color: rgb{}; color: rgb{}">&nbsp;&nbsp;</span>'
        parts = [f"{swatch.format(st.color, st.color)} {st.label} {st.display_name}" for st in class_styles(cm.classes)]
        grey = tuple(int(v * 255) for v in UNCERTAIN_RGBA[:3])
        parts.append(f"{swatch.format(grey, grey)} {cm.uncertain_label} uncertain (not a class)")
        self._paint_help.value = ("Paint cells with napari's brush or fill (label numbers):<br>" + "<br>".join(parts))
        self._paint_combo.choices = [st.display_name for st in class_styles(cm.classes)]
        for name in list(self._thr_spins):
            self._thr_box.remove(self._thr_spins.pop(name))
        rule = (cm.info or {}).get("decision") or {}
        for st in class_styles(cm.classes):
            spin = FloatSpinBox(label=st.display_name.replace(" carcinoma", ""), min=0.0, max=1.0, step=0.05,
                                value=float((rule.get("thresholds") or {}).get(st.name, 0.0)),
                                tooltip=f"call {st.display_name} from this probability (0 = no threshold)")
            self._thr_spins[st.name] = spin
            self._thr_box.append(spin)
        self._conf_spin.value = float(rule.get("min_confidence", 0.0))
        self._quality_spin.value = float(rule.get("min_quality", 0.0))
        self._cam_class.choices = ["predicted class", *cm.classes]
        self._update_corrections()
        self._update_regions()
        self.update_table()

    def _on_paint_class(self) -> None:
        from ..classes import class_styles

        cm = self.class_map
        if cm is None or self._layer is None or not self._paint_combo.value:
            return
        for st in class_styles(cm.classes):
            if st.display_name == self._paint_combo.value:
                self._layer.selected_label = st.label
                self._layer.mode = "paint"
                self._viewer.layers.selection.active = self._layer

    def _on_painted(self, event=None) -> None:
        self._update_corrections()

    # ------------------------------------------------------------------ corrections
    def corrections(self) -> Corrections:
        """The cells repainted on the layer, and those under classified shapes of the chosen Shapes layer.

        A shape whose class is one of the model's corrects the cells whose
        centre it covers (as ``napari-bcd retrain --corrections`` does);
        unclassified shapes only feed the region table.
        """
        from ..review import corrections_from_annotations, corrections_from_labels

        cm = self.class_map
        painted = corrections_from_labels(cm, np.asarray(self._layer.data))
        if self._shapes is None or not len(self._shapes.data):
            return painted
        anns = [a for a in self._region_annotations() if a.cls is not None]
        if not anns:
            return painted
        drawn = corrections_from_annotations(cm.grid, anns, cm.classes, labels=cm.labels, slide=cm.slide_name,
                                             uncertain_label=cm.uncertain_label)
        cells = {(c.row, c.col): c for c in drawn.cells}
        cells.update({(c.row, c.col): c for c in painted.cells})  # paint wins where both say something
        painted.cells = [cells[k] for k in sorted(cells)]
        return painted

    def _update_corrections(self) -> None:
        if self.class_map is None:
            return
        try:
            c = self.corrections()
        except BcdError as err:
            self._corr_label.value = str(err)
            return
        self._corr_label.value = c.describe() + (f" ({'; '.join(c.notes)})" if c.notes else "")

    def _image_layer(self):
        name = _meta(self._layer).get("image")
        if name in self._viewer.layers:
            return self._viewer.layers[name]
        raise BcdError(f"The image {name!r} this map was made on is no longer open; open it again.")

    def _map_and_model(self) -> tuple[ClassMap, str]:
        """The chosen class map and the checkpoint that made it, or a BcdError saying what is missing."""
        cm = self.class_map
        if cm is None:
            raise BcdError("Choose a class map (classify a slide first).")
        model_path = _meta(self._layer).get("model_path")
        if not model_path:
            raise BcdError("This map does not say which model made it; classify the slide again in this session.")
        return cm, model_path

    def retrain(self) -> None:
        """Retrain from the repainted cells (a new checkpoint) and re-predict, in a worker."""
        from ..review import iter_retrain

        try:
            cm, model_path = self._map_and_model()
            corr = self.corrections()
            slide = slide_for_layer(self._image_layer(), cm.grid.mpp[1])
            gen = iter_retrain(model_path, corr, slide, class_map=cm, weight=self._weight_spin.value,
                               whole_slide=self._whole_check.value)
        except BcdError as err:
            self._status.value = str(err)
            notify_error(err)
            return
        layer = self._layer
        before = (np.array(layer.data, copy=True), dict(layer.metadata))
        self._set_running(True)
        self._status.value = corr.describe() + ": retraining…"
        self._worker = start_job(gen, self._on_progress, lambda res: self._on_retrained(res, layer, before),
                                 self._on_finished)

    def _on_progress(self, item) -> None:
        if hasattr(item, "message"):
            self._status.value = item.message
            return
        self._progress.max = max(int(item.total), 1)
        self._progress.value = min(int(item.done), self._progress.max)
        self._status.value = str(item)

    def _on_retrained(self, result, layer, before) -> None:
        if result is None:
            self._status.value = "Stopped before training: nothing was saved."
            return
        self._history.append((before[0], before[1]))
        self._undo_button.enabled = True
        if result.class_map is not None:
            self._show_map(layer, result.class_map, model_path=str(result.checkpoint))
        self._hand_model(result.checkpoint)
        self._status.value = result.describe()
        show_info(result.describe())

    def _show_map(self, layer, class_map, model_path: str | None = None) -> None:
        """Replace the layer's data and metadata in place with a class map."""
        from ..layers import classmap_layers

        meta = _meta(layer)
        translate = tuple(meta.get("image_translate") or (0.0, 0.0))
        if model_path is not None:
            class_map.model_path = model_path
        data, kwargs, _ = classmap_layers(class_map, meta.get("image", ""), translate)[0]
        layer.metadata = kwargs["metadata"]
        layer.data = data
        self._update_corrections()
        self._update_regions()
        self.update_table()

    def _hand_model(self, path) -> None:
        """The Classify docks classify with this model from now on."""
        from .classify import INSTANCES

        for dock in list(INSTANCES):
            try:
                dock.use_model(path)
            except RuntimeError:  # a closed dock
                continue

    def undo(self) -> None:
        """Back to the parent model and the layer exactly as it was before the last retrain."""
        if not self._history or self._layer is None:
            return
        data, metadata = self._history.pop()
        self._layer.metadata = metadata
        self._layer.data = data
        parent = _meta(self._layer).get("model_path")
        if parent:
            self._hand_model(parent)
        self._undo_button.enabled = bool(self._history)
        self._status.value = f"Undone: back to {Path(parent).name if parent else 'the previous map'}."
        self._update_corrections()
        self._update_regions()
        self.update_table()

    def _on_cancel(self) -> None:
        if self._worker is not None:
            self._worker.quit()
            self._status.value = "Cancelling…"

    def _on_finished(self) -> None:
        self._worker = None
        self._set_running(False)

    def _set_running(self, running: bool) -> None:
        self._retrain_button.enabled = not running
        self._cancel_button.enabled = running
        self._undo_button.enabled = not running and bool(self._history)
        self._progress.visible = running
        self._cam_button.enabled = not running

    # ------------------------------------------------------------------ uncertainty and thresholds
    def rule(self) -> DecisionRule:
        from ..review import DecisionRule

        return DecisionRule(thresholds={k: s.value for k, s in self._thr_spins.items() if s.value > 0},
                            min_confidence=self._conf_spin.value, measure=MEASURE_NAMES[self._measure_combo.value],
                            min_quality=self._quality_spin.value)

    def apply_rule(self) -> None:
        """Relabel the map with the thresholds and cut-offs shown (probabilities unchanged)."""
        from ..review import apply_decision

        cm = self.class_map
        if cm is None:
            return
        try:
            rule = self.rule()
            if rule.min_quality > 0 and cm.quality is None:
                raise BcdError("This map has no image-quality scores; classify the slide again in the Classify dock "
                               "to use 'min image quality'.")
            new = apply_decision(cm, rule)
        except BcdError as err:
            notify_error(err)
            return
        self._show_map(self._layer, new, model_path=_meta(self._layer).get("model_path"))
        from ..summary import summarize

        s = summarize(new)
        self._status.value = f"Rule: {s.decision}. Uncertain: {s.uncertain_area_mm2:.3f} mm²."

    def save_rule(self) -> None:
        """Store the thresholds in the model's card (the weights are unchanged), in a worker."""
        path = _meta(self._layer).get("model_path") if self._layer is not None else None
        if not path:
            notify_error(BcdError("This map does not say which model made it."))
            return
        rule = self.rule()

        def job() -> Generator[None, None, str]:
            from ..model.checkpoint import load_checkpoint, save_checkpoint

            yield None
            model = load_checkpoint(path)
            save_checkpoint(model, model.card.replace(decision=rule.to_dict()), path, overwrite=True)
            return path

        self._worker = start_job(job(), lambda _: None,
                                 lambda p: setattr(self._status, "value",
                                                   f"Saved in {Path(p).name}: {rule.describe()}"),
                                 self._on_finished)

    def _update_regions(self) -> None:
        from ..review import uncertain_regions

        cm = self.class_map
        if cm is None:
            return
        threshold = 1.0 - self._conf_spin.value if self._conf_spin.value > 0 else 0.5
        self._regions = uncertain_regions(cm, MEASURE_NAMES[self._measure_combo.value], n=20, threshold=threshold)
        self._region_index = -1
        self._regions_text.value = ("\n".join(r.describe() for r in self._regions) if self._regions
                                    else "No region is that uncertain.")

    def go_to(self, index: int) -> None:
        """Centre and zoom the view on uncertain region ``index`` (wrapping around)."""
        if not self._regions or self._layer is None:
            return
        self._region_index = index % len(self._regions)
        region = self._regions[self._region_index]
        meta = _meta(self._layer)
        my, mx = meta.get("image_mpp") or self.class_map.grid.mpp
        ty, tx = meta.get("image_translate") or (0.0, 0.0)
        cy, cx = region.centre_px
        self._viewer.camera.center = (ty + cy * my, tx + cx * mx)
        y0, x0, y1, x1 = region.box_px
        span = max((y1 - y0) * my, (x1 - x0) * mx, 1e-6) * 3
        size = getattr(self._viewer, "_canvas_size", None) or (600, 800)
        self._viewer.camera.zoom = min(size) / span
        self._status.value = region.describe()

    # ------------------------------------------------------------------ region table
    def _on_shapes_changed(self) -> None:
        if self._shapes is not None:
            self._shapes.events.data.disconnect(self._on_shapes_data)
        self._shapes = self._shapes_combo.value
        if self._shapes is not None:
            self._shapes.events.data.connect(self._on_shapes_data)
        self.update_table()
        self._update_corrections()

    def _on_shapes_data(self, event=None) -> None:
        self.update_table()
        self._update_corrections()

    def _region_annotations(self):
        from ..annotations.napari import shapes_to_annotations

        return shapes_to_annotations(self._shapes, self._image_layer())

    def update_table(self) -> list:
        """Recompute the region table (called as the shapes change)."""
        from qtpy.QtWidgets import QTableWidgetItem

        from ..review import region_table

        cm = self.class_map
        if cm is None or self._shapes is None or not len(self._shapes.data):
            self._rows = []
            self._table.setRowCount(0)
            return self._rows
        try:
            anns = self._region_annotations()
        except BcdError as err:
            self._status.value = str(err)
            return []
        self._rows = region_table(cm, anns, names=[f"{i + 1}: {a.label or 'region'}" for i, a in enumerate(anns)])
        cols = ["region", "mm²", "tissue mm²", *[f"{c} %" for c in cm.classes], "uncertain %", "mean p (majority)"]
        self._table.setColumnCount(len(cols))
        self._table.setHorizontalHeaderLabels(cols)
        self._table.setRowCount(len(self._rows))
        for i, r in enumerate(self._rows):
            major = r.majority
            vals = [r.name, f"{r.area_mm2:.4f}", f"{r.tissue_mm2:.4f}",
                    *[f"{r.class_share[c]:.1f}" for c in cm.classes],
                    f"{r.uncertain_share:.1f}", f"{r.mean_probability[major]:.2f} ({major})" if major else ""]
            for j, v in enumerate(vals):
                self._table.setItem(i, j, QTableWidgetItem(v))
        self._table.resizeColumnsToContents()
        return self._rows

    def export_table(self, kind: str, path: str | None = None) -> str | None:
        """Write the region table as CSV, or the regions with their figures as QuPath GeoJSON."""
        if not self._rows:
            notify_error(BcdError("Draw shapes on a Shapes layer over the slide and choose it under 'regions'."))
            return None
        from .._fileio import atomic_write
        from ..annotations import write_geojson
        from ..review import region_annotations, region_table_csv

        if path is None:
            from qtpy.QtWidgets import QFileDialog

            suffix = ".regions.csv" if kind == "csv" else ".regions.geojson"
            path, _ = QFileDialog.getSaveFileName(self.native, "Export", f"{_meta(self._layer).get('image')}{suffix}")
            if not path:
                return None
        try:
            if kind == "csv":
                with atomic_write(path, "w") as fh:
                    fh.write(region_table_csv(self._rows, self.class_map.slide_name))
            else:
                write_geojson(region_annotations(self._region_annotations(), self._rows, self.class_map.classes), path,
                              overwrite=True)
        except (BcdError, OSError) as err:
            notify_error(BcdError(f"Could not write {path}: {err}"))
            return None
        show_info(f"Saved {path}")
        return path

    # ------------------------------------------------------------------ saliency
    def _view_box(self) -> tuple[float, float, float, float]:
        """The selected uncertain region, else the part of the image in view, in level-0 pixels."""
        if 0 <= self._region_index < len(self._regions):
            return self._regions[self._region_index].box_px
        meta = _meta(self._layer)
        my, mx = meta.get("image_mpp") or self.class_map.grid.mpp
        ty, tx = meta.get("image_translate") or (0.0, 0.0)
        cy, cx = self._viewer.camera.center[-2:]
        size = getattr(self._viewer, "_canvas_size", None) or (600, 800)
        hy, hx = size[0] / self._viewer.camera.zoom / 2, size[1] / self._viewer.camera.zoom / 2
        return ((cy - hy - ty) / my, (cx - hx - tx) / mx, (cy + hy - ty) / my, (cx + hx - tx) / mx)

    def explain(self, box: tuple[float, float, float, float] | None = None) -> None:
        """Grad-CAM of the windows under ``box`` (default: the selected region or the view), as an image layer."""
        from ..review import iter_saliency

        try:
            cm, model_path = self._map_and_model()
            image = self._image_layer()
            slide = slide_for_layer(image, cm.grid.mpp[1])
            box = box or self._view_box()
        except BcdError as err:
            notify_error(err)
            return
        cls = None if self._cam_class.value == "predicted class" else self._cam_class.value

        def job() -> Generator[tuple[int, int], None, SaliencyMap]:
            from ..model.checkpoint import load_checkpoint

            yield (0, 1)
            model = load_checkpoint(model_path)
            return (yield from iter_saliency(slide, model, cm.grid, box, class_name=cls))

        translate = tuple(float(t) for t in image.translate[-2:])
        self._set_running(True)
        self._status.value = "Grad-CAM…"
        self._worker = start_job(job(), lambda p: None, lambda sal: self._show_saliency(sal, image.name, translate),
                                 self._on_finished)

    def _show_saliency(self, sal, image_name: str, translate) -> None:
        name = f"{image_name} Grad-CAM"
        kwargs = sal.layer_kwargs(translate)
        if name in self._viewer.layers:
            layer = self._viewer.layers[name]
            layer.data = sal.image
            layer.scale, layer.translate = kwargs["scale"], kwargs["translate"]
        else:
            self._viewer.add_image(sal.image, name=name, **kwargs)
        what = sal.class_name or "each window's predicted class"
        self._status.value = f"Grad-CAM of {what} over {sal.windows} window(s): bright = evidence for it."
