"""The "Classify slide" dock widget: a thin shell over the engine.

It shows, before Run, what a run would do (windows, cell size, about how long)
and, after, the map with a legend that toggles classes.  The model's card is
read without loading it; the model itself loads in the worker thread, so the
dock opens at once and stays responsive.
"""

from __future__ import annotations

import logging
import weakref
from dataclasses import dataclass
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
from napari.utils.notifications import show_info, show_warning

from ..errors import BcdError
from ._layers import readonly_text, refresh_combo, scroll_to, scrolling, slide_for_layer
from ._legend import Legend
from ._worker import notify_error, start_job

if TYPE_CHECKING:
    import napari

    from ..engine import ClassMap, WindowPlan

log = logging.getLogger(__name__)

OVERLAP = {"none": 1.0, "50 %": 0.5, "75 %": 0.25}
STAIN = {"as scanned": "none", "normalise (Macenko)": "macenko", "normalise (Vahadane)": "vahadane"}
#: Windows per second assumed before this machine has measured any (ResNet152V2, other backbones).
_GUESS = {"cpu": (3.0, 30.0), "gpu": (1000.0, 3000.0)}


#: Open Classify docks: the Review dock hands them a retrained model (and the parent again on Undo).
INSTANCES: weakref.WeakSet = weakref.WeakSet()


@dataclass(frozen=True)
class _Stage:
    message: str


class ClassifyWidget(Container):
    """Classify the chosen image layer into the model's classes (Normal / Benign / In situ / Invasive)."""

    def __init__(self, viewer: napari.viewer.Viewer) -> None:
        super().__init__(labels=False)
        self._viewer = viewer
        self._image_combo = ComboBox(label="image", choices=self._image_choices, nullable=True)
        self._mpp_edit = FloatSpinBox(label="µm / pixel", value=0.0, min=0.0, max=100.0, step=0.0001,
                                      tooltip="The pixel size in use: the file's, or one you set")
        self._mpp_source = Label(label="", value="")
        self._model_edit = FileEdit(label="model", mode="r", filter="*.safetensors *.json", value="",
                                    tooltip="empty = the default model (last trained or chosen)")
        self._card_label = Label(label="", value="")
        self._card_label.native.setWordWrap(True)
        self._device_combo = ComboBox(label="device", choices=["auto", "cpu", "cuda", "mps"], value="auto")
        self._batch_spin = SpinBox(label="batch size", value=0, min=0, max=1024, tooltip="0 = automatic")
        self._overlap_combo = ComboBox(label="overlap", choices=list(OVERLAP), value="none")
        self._tissue_spin = FloatSpinBox(label="tissue threshold", value=0.1, min=0.0, max=1.0, step=0.01)
        self._stain_combo = ComboBox(label="stain", choices=list(STAIN), value="as scanned",
                                     tooltip="normalise every window to the stain of the model's training images")
        self._probs_check = CheckBox(text="probability layers", value=False)
        self._compile_check = CheckBox(text="compile the model (GPU, long runs)", value=False,
                                       tooltip="torch.compile: tens of seconds once, then faster on a GPU")
        self._plan_label = Label(label="", value="")
        self._plan_label.native.setWordWrap(True)
        self._run_button = PushButton(text="Run")
        self._cancel_button = PushButton(text="Cancel", enabled=False)
        self._progress = ProgressBar(label="", value=0, min=0, max=1, visible=False)
        self._status = Label(label="", value="")
        self._status.native.setWordWrap(True)
        self._summary = readonly_text()
        self._legend = Legend(self._on_legend_toggled)
        self._hover = Label(label="", value="")
        self._export_geojson = PushButton(text="GeoJSON for QuPath", enabled=False)
        self._export_csv = PushButton(text="CSV summary", enabled=False)
        self._export_tiff = PushButton(text="Label TIFF", enabled=False)
        form = Container(labels=True, widgets=[
            self._image_combo, self._mpp_edit, self._mpp_source, self._model_edit, self._card_label,
            self._device_combo, self._batch_spin, self._overlap_combo, self._tissue_spin, self._stain_combo,
            self._probs_check,
            self._compile_check,
            self._plan_label,
            Container(widgets=[self._run_button, self._cancel_button], layout="horizontal", labels=False),
            self._progress, self._status, self._summary, self._hover,
            Container(widgets=[self._export_geojson, self._export_csv, self._export_tiff], layout="horizontal",
                      labels=False),
        ])
        form.native.layout().insertWidget(form.index(self._summary) + 1, self._legend)  # under the summary
        self._summary.native.setMaximumHeight(110)
        self._scroll = scrolling(form.native)  # a tall dock scrolls; the window stays on screen
        self.native.layout().addWidget(self._scroll)
        self._worker = None
        self._plan_worker = None
        self._plan_token = 0
        self._pbar = None
        self._result = None  # (ClassMap, image layer name, image translate)
        self._card = None
        self._model = None
        self._model_key: tuple | None = None
        # The Predictor is kept too: a compiled model compiles once, not on every run.
        self._predictor = None
        self._predictor_key: tuple | None = None
        self._file_mpp: float | None = None
        self._setting_mpp = False
        self._run_button.changed.connect(self._on_run_clicked)
        self._cancel_button.changed.connect(self._on_cancel_clicked)
        self._model_edit.changed.connect(self._on_model_changed)
        self._image_combo.changed.connect(self._on_image_changed)
        self._mpp_edit.changed.connect(self._on_mpp_changed)
        for w in (self._overlap_combo, self._tissue_spin, self._device_combo):
            w.changed.connect(self._update_plan)
        self._export_geojson.changed.connect(lambda: self._on_export_clicked("geojson"))
        self._export_csv.changed.connect(lambda: self._on_export_clicked("csv"))
        self._export_tiff.changed.connect(lambda: self._on_export_clicked("tiff"))
        viewer.layers.events.inserted.connect(self._on_layers_changed)
        viewer.layers.events.removed.connect(self._on_layers_changed)
        viewer.mouse_move_callbacks.append(self._on_mouse_move)
        self._on_layers_changed()
        self._on_model_changed()
        self._on_image_changed()
        INSTANCES.add(self)

    # ------------------------------------------------------------------ inputs
    def _image_choices(self, _widget=None) -> list:
        return [(layer.name, layer) for layer in self._viewer.layers if isinstance(layer, Image) and layer.rgb]

    def _on_layers_changed(self, event=None) -> None:
        refresh_combo(self._image_combo, prefer=self._viewer.layers.selection.active)

    def _on_image_changed(self) -> None:
        """Show the chosen image's pixel size and where it comes from."""
        layer = self._image_combo.value
        scale = tuple(float(s) for s in layer.scale[-2:]) if layer is not None else (1.0, 1.0)
        self._file_mpp = scale[-1] if scale != (1.0, 1.0) else None
        self._setting_mpp = True
        try:
            self._mpp_edit.value = self._file_mpp or 0.0
        finally:
            self._setting_mpp = False
        if layer is None:
            self._mpp_source.value = ""
        elif self._file_mpp:
            self._mpp_source.value = "from the file"
        else:
            self._mpp_source.value = "unknown: set µm / pixel (0.25 at 40x, 0.5 at 20x, 0.42 for ICIAR photos)"
        self._update_plan()

    def _on_mpp_changed(self) -> None:
        if self._setting_mpp:
            return
        value = self._mpp_edit.value
        if not value:
            self._on_image_changed()  # 0 goes back to the file's value
            return
        if self._file_mpp and abs(value - self._file_mpp) > 1e-9:
            ratio = value / self._file_mpp
            if not 0.5 <= ratio <= 2:
                text = (f"set by you: {ratio:.1f}x the file's {self._file_mpp:.4g} µm/px; windows would show "
                        f"{max(ratio, 1 / ratio):.1f}x {'less' if ratio > 1 else 'more'} tissue than the model expects")
                self._mpp_source.value = text
                show_warning(f"µm / pixel {value:g} contradicts the file's {self._file_mpp:g} by more than 2x.")
            else:
                self._mpp_source.value = f"set by you (the file says {self._file_mpp:.4g})"
        else:
            self._mpp_source.value = "from the file" if self._file_mpp else "set by you"
        self._update_plan()

    def set_mpp(self, value: float) -> None:
        """State the pixel size (µm/px) of the chosen image, as a user typing it would."""
        self._mpp_edit.value = value

    def run(self) -> None:
        """Classify the chosen image with the chosen model (what Run does)."""
        self._on_run_clicked()

    def _mpp(self) -> float | None:
        return self._mpp_edit.value or None

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

    def _checkpoint(self) -> Path | None:
        from ..config import default_model_path

        path = self._model_path() or default_model_path()
        return Path(path) if path else None

    def _current_key(self) -> tuple | None:
        """What identifies the model on disk: the checkpoint's path, size and modification time.

        A retrained checkpoint written to the same path gets a new key, so it is
        reloaded instead of classifying with the weights loaded before.
        """
        from ..model.card import checkpoint_paths

        path = self._checkpoint()
        if path is None:
            return None
        weights = checkpoint_paths(path)[0]
        try:
            st = weights.stat()
        except OSError:
            return (str(weights),)
        return (str(weights.resolve()), st.st_size, st.st_mtime_ns)

    def _on_model_changed(self) -> None:
        """Show the model's card: read from its JSON, no torch, no weights (the model loads when it runs)."""
        from ..model.card import read_card

        path = self._checkpoint()
        self._card = None
        if path is None:
            self._card_label.value = ("No model yet: train one (Train dock, or `napari-bcd reproduce`) or choose a "
                                      "checkpoint.")
        else:
            try:
                self._card = read_card(path)
                self._card_label.value = self._card.describe()
            except BcdError as err:
                self._card_label.value = str(err)
        if self._model_key != self._current_key():
            self._model, self._model_key = None, None  # loaded again on the next run
        self._update_plan()

    # ------------------------------------------------------------------ what a run would do
    def _rate(self) -> tuple[float, bool]:
        """Windows/s for the estimate: this machine's last measurement, else a guess; and whether measured."""
        from ..config import measured_rate

        card = self._card
        key = f"{card.backbone}@{self._device_combo.value}"
        rate = measured_rate(key)
        if rate:
            return rate, True
        paper = card.backbone == "resnet152v2"
        guess = _GUESS["gpu" if self._device_combo.value == "cuda" else "cpu"]
        return guess[0] if paper else guess[1], False

    def _update_plan(self, *_args) -> None:
        """Count the windows of a run with the current settings, in a thread (the thumbnail may take a moment)."""
        from napari.qt.threading import create_worker

        from ..engine import plan_windows

        layer, card, mpp = self._image_combo.value, self._card, self._mpp()
        if layer is None or card is None:
            self._plan_label.value = ""
            return
        if not mpp:
            self._plan_label.value = "Set µm / pixel to see how many windows a run classifies."
            return
        try:
            slide = slide_for_layer(layer, mpp)
        except BcdError as err:
            self._plan_label.value = str(err)
            return
        self._plan_token += 1
        token = self._plan_token
        stride = OVERLAP[self._overlap_combo.value]
        tissue = self._tissue_spin.value

        def count() -> WindowPlan:
            try:
                return plan_windows(slide, card, stride=stride, tissue_threshold=tissue, mpp=(mpp, mpp))
            finally:
                slide.close()

        worker = create_worker(count, _start_thread=False, _connect={
            "returned": lambda plan: self._show_plan(plan, token),
            "errored": lambda err: self._show_plan(err, token),
        })
        self._plan_worker = worker
        worker.start()

    def _show_plan(self, plan, token: int) -> None:
        if token != self._plan_token:
            return  # settings changed since: a newer count is on its way
        if isinstance(plan, BaseException):
            self._plan_label.value = str(plan) if isinstance(plan, BcdError) else ""
            return
        rate, measured = self._rate()
        secs = plan.seconds(rate)
        when = f"about {_duration(secs)}" + ("" if measured else " (a first guess; runs here will refine it)")
        ch, cw = plan.cell_um
        text = (f"{plan.on_tissue:,} windows on tissue (of {plan.total:,}); one cell = {ch:.0f} x {cw:.0f} µm; "
                f"{when}.")
        if plan.cells_on_tissue < 30 and self._overlap_combo.value == "none":
            text += (f" A coarse map ({plan.cells_on_tissue} cells on tissue): overlap 50 % gives about 4x the "
                     "cells, 75 % about 16x.")
        self._plan_label.value = text

    # ------------------------------------------------------------------ run / cancel
    def _job(self, slide, key, stride: float):
        """Load the model if needed (here, in the worker), then classify."""
        from ..engine import iter_classify
        from ..model.checkpoint import load_model
        from ..model.inference import Predictor

        model = self._model if self._model is not None and self._model_key == key else None
        checkpoint = self._checkpoint()
        if model is None:
            yield _Stage("Loading the model…")
            model = load_model(self._model_path())
            self._model, self._model_key = model, key  # kept for the next run
        pkey = (key, str(self._device_combo.value), bool(self._compile_check.value))
        if self._predictor is None or self._predictor_key != pkey or self._predictor.model is not model:
            self._predictor = Predictor(model, device=self._device_combo.value, compile=self._compile_check.value)
            self._predictor_key = pkey
        yield _Stage("Finding tissue…")
        class_map = yield from iter_classify(
            slide, self._predictor, stride=stride, batch_size=self._batch_spin.value or None,
            tissue_threshold=self._tissue_spin.value,
            stain_normalize=STAIN[self._stain_combo.value],
            quality=True,  # the Review dock can then grey out pen, blur and folds
        )
        class_map.model_path = str(checkpoint) if checkpoint else ""  # the Review dock retrains it
        return class_map

    def _on_run_clicked(self) -> None:
        layer = self._image_combo.value
        try:
            if layer is None:
                raise BcdError("Open an H&E image first (File > Open, or File > Open Sample > "
                               "Breast Cancer Classifier).")
            if self._card is None:
                raise BcdError(self._card_label.value)
            slide = slide_for_layer(layer, self._mpp())
        except BcdError as err:
            self._status.value = str(err)
            notify_error(err)
            return
        self._set_running(True, layer.name)
        translate = tuple(float(t) for t in layer.translate[-2:])
        self._worker = start_job(
            self._job(slide, self._current_key(), OVERLAP[self._overlap_combo.value]), self._on_progress,
            lambda cmap: self._on_result(cmap, layer.name, translate), self._on_finished,
        )
        self._worker.errored.connect(
            lambda err: setattr(self._status, "value", f"Stopped: {err}" if isinstance(err, BcdError) else
                                f"Failed: {type(err).__name__}: {err}"))

    def _on_cancel_clicked(self) -> None:
        if self._worker is not None:
            self._worker.quit()
            self._status.value = "Cancelling…"

    def _set_running(self, running: bool, name: str = "") -> None:
        from napari.utils import progress

        self._run_button.enabled = not running
        self._cancel_button.enabled = running
        self._progress.visible = running
        if running:
            self._progress.value, self._progress.max = 0, 1
            self._status.value = "Starting…"
            # napari users watch the activity dock too
            self._pbar = progress(total=0, desc=f"Classifying {name}")
        elif self._pbar is not None:
            self._pbar.close()
            self._pbar = None

    def _on_progress(self, p) -> None:
        if isinstance(p, _Stage):
            self._status.value = p.message
            return
        if p.stage != "classify":
            return
        self._progress.max = max(p.total, 1)
        self._progress.value = p.done
        eta = f", about {_duration(p.eta_s)} left" if p.eta_s is not None else ""
        self._status.value = f"{p.done} / {p.total} windows, {p.windows_per_s:.1f}/s{eta}"
        if self._pbar is not None:
            if self._pbar.total != p.total:
                self._pbar.total = p.total
            self._pbar.update(p.done - self._pbar.n)

    def _on_finished(self) -> None:
        aborted = self._worker is not None and self._worker.abort_requested
        self._worker = None
        self._set_running(False)
        if aborted:
            self._status.value = "Cancelled; nothing was changed."

    # ------------------------------------------------------------------ results
    def show_result(self, class_map: ClassMap, image_name: str, translate: tuple[float, float] = (0.0, 0.0)) -> None:
        """Show a classification: the layers, the summary and legend, the exports (the demo calls this)."""
        self._on_result(class_map, image_name, translate)

    def _on_result(self, class_map, image_name: str, translate: tuple[float, float]) -> None:
        from napari.utils.colormaps import DirectLabelColormap

        from ..config import remember_rate
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
                if kind == "labels":
                    old.colormap = DirectLabelColormap(color_dict=label_colors(class_map.classes))
                continue
            if kind == "labels":
                self._viewer.add_labels(data, colormap=DirectLabelColormap(color_dict=label_colors(class_map.classes)),
                                        **kwargs)
            else:
                self._viewer.add_image(data, **kwargs)
        self._result = (class_map, image_name, translate)
        summary = summarize(class_map)
        self._summary.value = summary.table(compact=True)
        self._legend.show_summary(summary, class_map.classes)
        self._status.value = f"Done: {class_map.n_windows} windows in {class_map.info.get('seconds', 0):.1f} s"
        if summary.stain_warning:
            self._status.value += f". {summary.stain_warning[0].upper()}{summary.stain_warning[1:]}."
            if "normalised" not in summary.stain_warning:
                show_warning(summary.stain_warning)
        rate = class_map.info.get("windows_per_s")
        if rate and self._card is not None and class_map.n_windows >= 4:
            remember_rate(f"{self._card.backbone}@{self._device_combo.value}", rate)
        for b in (self._export_geojson, self._export_csv, self._export_tiff):
            b.enabled = True
        scroll_to(self._scroll, self._legend)  # the result in view

    def _on_legend_toggled(self, hidden: set[int]) -> None:
        """A click on a class in the legend hides or shows it on the map."""
        from napari.utils.colormaps import DirectLabelColormap

        from ..layers import label_colors

        if self._result is None:
            return
        class_map, image_name, _ = self._result
        name = f"{image_name} classes"
        if name not in self._viewer.layers:
            return
        colors = label_colors(class_map.classes)
        for label in hidden:
            colors[label] = (0.0, 0.0, 0.0, 0.0)
        self._viewer.layers[name].colormap = DirectLabelColormap(color_dict=colors)

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


def _duration(seconds: float) -> str:
    if seconds < 90:
        return f"{max(1, round(seconds))} s"
    if seconds < 5400:
        return f"{round(seconds / 60)} min"
    return f"{seconds / 3600:.1f} h"
