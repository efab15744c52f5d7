"""The "Breast Cancer Classifier" dock widget: a thin shell over the engine."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import TYPE_CHECKING

from magicgui.widgets import (
    CheckBox,
    ComboBox,
    Container,
    FileEdit,
    FloatSpinBox,
    Label,
    ProgressBar,
    PushButton,
    SpinBox,
)
from napari.layers import Image
from napari.utils.notifications import show_info

from ..errors import BcdError
from ._layers import readonly_text, refresh_combo, scrolling, slide_for_layer
from ._worker import notify_error, start_job

if TYPE_CHECKING:
    import napari

log = logging.getLogger(__name__)


class ClassifyWidget(Container):
    """Classify the chosen image layer into Normal / Benign / In situ / Invasive."""

    def __init__(self, viewer: napari.viewer.Viewer) -> None:
        super().__init__(labels=False)
        self._viewer = viewer
        self._image_combo = ComboBox(label="image", choices=self._image_choices, nullable=True)
        self._mpp_edit = FloatSpinBox(label="µm / pixel", value=0.0, min=0.0, max=100.0, step=0.0001,
                                      tooltip="0 = from the layer's scale; set it for images without one")
        self._model_edit = FileEdit(label="model", mode="r", filter="*.safetensors *.json", value="",
                                    tooltip="empty = the default model (last trained or chosen)")
        self._card_label = Label(label="", value="")
        self._card_label.native.setWordWrap(True)
        self._device_combo = ComboBox(label="device", choices=["auto", "cpu", "cuda", "mps"], value="auto")
        self._batch_spin = SpinBox(label="batch size", value=0, min=0, max=1024, tooltip="0 = automatic")
        self._overlap_combo = ComboBox(label="overlap", choices=["none", "50 %", "75 %"], value="none")
        self._tissue_spin = FloatSpinBox(label="tissue threshold", value=0.1, min=0.0, max=1.0, step=0.01)
        self._probs_check = CheckBox(text="probability layers", value=False)
        self._run_button = PushButton(text="Run")
        self._cancel_button = PushButton(text="Cancel", enabled=False)
        self._progress = ProgressBar(label="", value=0, min=0, max=1, visible=False)
        self._status = Label(label="", value="")
        self._summary = readonly_text()
        self._hover = Label(label="", value="")
        self._export_geojson = PushButton(text="GeoJSON for QuPath", enabled=False)
        self._export_csv = PushButton(text="CSV summary", enabled=False)
        self._export_tiff = PushButton(text="Label TIFF", enabled=False)
        form = Container(labels=True, widgets=[
            self._image_combo, self._mpp_edit, self._model_edit, self._card_label, self._device_combo,
            self._batch_spin, self._overlap_combo, self._tissue_spin, self._probs_check,
            Container(widgets=[self._run_button, self._cancel_button], layout="horizontal", labels=False),
            self._progress, self._status, self._summary, self._hover,
            Container(widgets=[self._export_geojson, self._export_csv, self._export_tiff], layout="horizontal", labels=False),
        ])
        self._scroll = scrolling(form.native)  # a tall dock scrolls; the window stays on screen
        self.native.layout().addWidget(self._scroll)
        self._worker = None
        self._result = None  # (ClassMap, image layer name, image translate)
        self._model = None
        self._model_key: tuple | None = None
        self._run_button.changed.connect(self._on_run_clicked)
        self._cancel_button.changed.connect(self._on_cancel_clicked)
        self._model_edit.changed.connect(self._on_model_changed)
        self._export_geojson.changed.connect(lambda: self._on_export_clicked("geojson"))
        self._export_csv.changed.connect(lambda: self._on_export_clicked("csv"))
        self._export_tiff.changed.connect(lambda: self._on_export_clicked("tiff"))
        viewer.layers.events.inserted.connect(self._on_layers_changed)
        viewer.layers.events.removed.connect(self._on_layers_changed)
        viewer.mouse_move_callbacks.append(self._on_mouse_move)
        self._on_layers_changed()
        self._on_model_changed()

    # ------------------------------------------------------------------ inputs
    def _image_choices(self, _widget=None) -> list:
        return [(layer.name, layer) for layer in self._viewer.layers if isinstance(layer, Image) and layer.rgb]

    def _on_layers_changed(self, event=None) -> None:
        refresh_combo(self._image_combo, prefer=self._viewer.layers.selection.active)

    def _model_path(self) -> str | None:
        value = str(self._model_edit.value or "").strip()
        return value if value not in ("", ".") else None

    def use_model(self, path: str | Path) -> None:
        """Classify with this checkpoint from now on (reloaded even when the path is the one shown)."""
        self._model_key = None
        if str(self._model_edit.value) != str(path):
            self._model_edit.value = str(path)  # fires _on_model_changed
        else:
            self._on_model_changed()

    def _current_key(self) -> tuple | None:
        """What identifies the model on disk: the checkpoint's path, size and modification time.

        A retrained checkpoint written to the same path gets a new key, so it is
        reloaded instead of classifying with the weights loaded before.
        """
        from ..config import default_model_path
        from ..model.checkpoint import checkpoint_paths

        path = self._model_path() or default_model_path()
        if path is None:
            return None
        weights = checkpoint_paths(path)[0]
        try:
            st = weights.stat()
        except OSError:
            return (str(weights),)
        return (str(weights.resolve()), st.st_size, st.st_mtime_ns)

    def _on_model_changed(self) -> None:
        from ..model.checkpoint import load_model

        key = self._current_key()
        try:
            model = load_model(self._model_path())
        except BcdError as err:
            self._model, self._model_key = None, None
            self._card_label.value = str(err) if self._model_path() else "No model yet: train one or choose a checkpoint."
            return
        self._model, self._model_key = model, key
        self._card_label.value = model.card.describe()

    # ------------------------------------------------------------------ run / cancel
    def _on_run_clicked(self) -> None:
        from ..engine import iter_classify
        from ..tissue import TissueParams

        layer = self._image_combo.value
        try:
            if layer is None:
                raise BcdError("Open an H&E image first (File > Open, or File > Open Sample > Breast Cancer Classifier).")
            if self._model is None or self._model_key != self._current_key():
                self._on_model_changed()  # first use, or the checkpoint on disk changed
            if self._model is None:
                raise BcdError(self._card_label.value)
            slide = slide_for_layer(layer, self._mpp_edit.value or None)
            stride = {"none": 1.0, "50 %": 0.5, "75 %": 0.25}[self._overlap_combo.value]
            gen = iter_classify(
                slide, self._model, stride=stride, batch_size=self._batch_spin.value or None,
                device=self._device_combo.value, tissue=TissueParams(threshold=self._tissue_spin.value),
            )
        except BcdError as err:
            notify_error(err)
            return
        self._set_running(True)
        translate = tuple(float(t) for t in layer.translate[-2:])
        self._worker = start_job(
            gen, self._on_progress, lambda cmap: self._on_result(cmap, layer.name, translate), self._on_finished
        )

    def _on_cancel_clicked(self) -> None:
        if self._worker is not None:
            self._worker.quit()
            self._status.value = "Cancelling…"

    def _set_running(self, running: bool) -> None:
        self._run_button.enabled = not running
        self._cancel_button.enabled = running
        self._progress.visible = running
        if running:
            self._progress.value, self._progress.max = 0, 1
            self._status.value = "Finding tissue…"

    def _on_progress(self, p) -> None:
        if p.stage != "classify":
            return
        self._progress.max = max(p.total, 1)
        self._progress.value = p.done
        eta = f", about {p.eta_s:.0f} s left" if p.eta_s is not None else ""
        self._status.value = f"{p.done} / {p.total} windows, {p.windows_per_s:.1f}/s{eta}"

    def _on_finished(self) -> None:
        aborted = self._worker is not None and self._worker.abort_requested
        self._worker = None
        self._set_running(False)
        if aborted:
            self._status.value = "Cancelled; nothing was changed."

    # ------------------------------------------------------------------ results
    def _on_result(self, class_map, image_name: str, translate: tuple[float, float]) -> None:
        from ..layers import classmap_layers, label_colors
        from ..summary import summarize

        layers = classmap_layers(class_map, image_name, translate, probabilities=self._probs_check.value)
        for data, kwargs, kind in layers:
            name = kwargs["name"]
            if name in self._viewer.layers:  # a re-run replaces the old result in place
                old = self._viewer.layers[name]
                old.data = data
                old.scale, old.translate = kwargs["scale"], kwargs["translate"]
                old.metadata = kwargs["metadata"]
                continue
            if kind == "labels":
                from napari.utils.colormaps import DirectLabelColormap

                self._viewer.add_labels(data, colormap=DirectLabelColormap(color_dict=label_colors(class_map.classes)), **kwargs)
            else:
                self._viewer.add_image(data, **kwargs)
        self._result = (class_map, image_name, translate)
        summary = summarize(class_map)
        self._summary.value = summary.table(compact=True)
        self._scroll.ensureWidgetVisible(self._summary.native)  # the result in view
        self._status.value = f"Done: {class_map.n_windows} windows in {class_map.info.get('seconds', 0):.1f} s"
        for b in (self._export_geojson, self._export_csv, self._export_tiff):
            b.enabled = True

    def _on_mouse_move(self, viewer, event) -> None:
        if self._result is None:
            return
        from ..layers import describe_hover

        class_map, _, translate = self._result
        pos = viewer.cursor.position[-2:]
        self._hover.value = describe_hover(class_map, (float(pos[0]), float(pos[1])), translate)

    def _on_export_clicked(self, kind: str, path: str | None = None) -> str | None:
        if self._result is None:
            return None
        from ..annotations import write_geojson
        from ..export import class_regions, write_label_tiff
        from ..summary import summarize

        class_map, image_name, _ = self._result
        if path is None:
            from qtpy.QtWidgets import QFileDialog

            suffix = {"geojson": ".geojson", "csv": ".csv", "tiff": ".labels.tif"}[kind]
            path, _ = QFileDialog.getSaveFileName(self.native, "Export", f"{image_name}{suffix}")
            if not path:
                return None
        try:
            if kind == "geojson":
                write_geojson(class_regions(class_map), path, overwrite=True)
            elif kind == "csv":
                from .._fileio import atomic_write

                with atomic_write(path, "w") as fh:
                    fh.write(summarize(class_map).to_csv())
            else:
                write_label_tiff(class_map, path, overwrite=True)
        except (BcdError, OSError) as err:
            notify_error(BcdError(f"Could not write {path}: {err}"))
            return None
        show_info(f"Saved {path}")
        return path
