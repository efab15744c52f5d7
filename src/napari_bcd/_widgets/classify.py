"""The "Classify slide" dock: a thin shell over :class:`~napari_bcd.app.ClassifyController`.

Before Run it says what a run would do (windows, cell size, about how long); after, all it shows of the map (call,
summary, legend, hover, exports) is derived from the map's :class:`~napari_bcd.app.MapStore`, so a retrain, an
*Apply*, an *Undo* or a repainted cell shows at once.  The model loads in the worker; the dock never waits on it."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from magicgui.widgets import ComboBox, Container, FileEdit, Label, PushButton
from napari.layers import Image

from ..app.classify import ClassifyController, Estimate, Stage
from ..errors import BcdError
from ._classify_map import MapView
from ._layers import refresh_combo, slide_for_layer
from ._layout import Section, buttons, compact_file_edit, scroll_to, scrolling, wrapped
from ._maplayer import show_map
from ._mpp import MppField
from ._run_settings import RunSettings
from ._runstatus import RunStatus
from ._worker import DockJobs, Latest, notify_error

if TYPE_CHECKING:
    import napari

    from ..app.mapstate import MapState, MapStore
    from ..engine import ClassMap

class ClassifyWidget(Container):
    """Classify the chosen image layer into the model's classes (Normal / Benign / In situ / Invasive)."""

    def __init__(self, viewer: napari.viewer.Viewer) -> None:
        super().__init__(labels=False)
        self._viewer = viewer
        self._controller = ClassifyController()
        self._image_combo = ComboBox(label="image", choices=self._image_choices, nullable=True)
        self._mpp = MppField(self._on_settings_changed)
        self._model_edit = compact_file_edit(FileEdit(label="model", mode="r", filter="*.safetensors *.json",
                                                      value="", tooltip="empty = the default model"))
        self._card_label = wrapped(Label(label="", value=""))
        self._run_settings = RunSettings(self._on_settings_changed)
        rs = self._run_settings
        self._overlap_combo, self._tissue_spin, self._stain_combo, self._device_combo = (rs.overlap, rs.tissue,
                                                                                         rs.stain, rs.device)
        self._batch_spin, self._probs_check, self._compile_check = rs.batch, rs.probabilities, rs.compile
        self._plan_label = wrapped(Label(label="", value=""))
        self._run_button = PushButton(text="Run")
        self._cancel_button = PushButton(text="Cancel", enabled=False)
        self._run_status = RunStatus()
        self._progress, self._status = self._run_status.progress, self._run_status.status
        self._map = MapView(viewer, self.native, self._on_map_changed)
        # the map's views, by the names the tests and the demo use
        self._call, self._summary, self._legend, self._hover = (self._map.call, self._map.summary, self._map.legend,
                                                                self._map.hover)
        self._more = rs.sections[1]
        self._sections = (
            Section("Slide and model", [self._image_combo, *self._mpp.widgets, self._model_edit, self._card_label]),
            *rs.sections, self._map.section)
        self._scroll = scrolling(*self._sections[:3], self._plan_label, buttons(self._run_button, self._cancel_button),
                                 self._progress, self._status, self._sections[3])
        self.native.layout().addWidget(self._scroll)
        self._jobs = DockJobs(self.native, viewer, "Classification", self._set_running, self._say)
        self._card = None
        self._estimate: Estimate | None = None
        self._plan = Latest(self._show_estimate)
        self._progress_name = ""
        self._run_button.changed.connect(self._on_run_clicked)
        self._cancel_button.changed.connect(self.cancel)
        self._model_edit.changed.connect(self._on_model_changed)
        self._image_combo.changed.connect(lambda: self._mpp.show_layer(self._image_combo.value))
        viewer.layers.events.inserted.connect(self._on_layers_changed)
        viewer.layers.events.removed.connect(self._on_layers_changed)
        self._on_layers_changed()
        self._on_model_changed()
        self._mpp.show_layer(self._image_combo.value)

    @property
    def _worker(self):
        return self._jobs.worker

    # ------------------------------------------------------------------ inputs
    def _image_choices(self, _widget=None) -> list:
        return [(layer.name, layer) for layer in self._viewer.layers if isinstance(layer, Image) and layer.rgb]

    def _on_layers_changed(self, event=None) -> None:
        refresh_combo(self._image_combo, prefer=self._viewer.layers.selection.active)

    def set_mpp(self, value: float) -> None:
        """State the pixel size (µm/px) of the chosen image, as a user typing it would."""
        self._mpp.edit.value = value

    def run(self) -> None:
        """Classify the chosen image with the chosen model (what Run does)."""
        self._on_run_clicked()

    def cancel(self) -> None:
        """Stop the run at its next batch (what Cancel does); nothing is shown."""
        self._jobs.cancel()

    def _model_path(self) -> str | None:
        value = str(self._model_edit.value or "").strip()
        return value if value not in ("", ".") else None

    def use_model(self, path: str | Path) -> None:
        """Classify with this checkpoint from now on (reloaded when its file changed)."""
        if str(self._model_edit.value) != str(path):
            self._model_edit.value = str(path)  # fires _on_model_changed
        else:
            self._on_model_changed()

    def _on_model_changed(self) -> None:
        """Show the model's card: read from its JSON, no torch, no weights (the model loads when it runs)."""
        try:
            self._card = self._controller.card(self._model_path())
            self._card_label.value = self._card.describe()
        except BcdError as err:
            self._card, self._card_label.value = None, str(err)
        self._on_settings_changed()

    def _settings(self):
        return self._run_settings.settings(self._mpp.value)

    # ------------------------------------------------------------------ what a run would do
    def _on_settings_changed(self, *_args) -> None:
        """Count the windows of a run with these settings, in a thread (the thumbnail may take a moment)."""
        layer, card = self._image_combo.value, self._card
        self._estimate = None
        self._plan.forget()
        if layer is None or card is None:
            self._plan_label.value = ""
            return
        if not self._mpp.value:
            self._plan_label.value = "Set µm / pixel to see how many windows a run classifies."
            return
        try:
            slide, settings = slide_for_layer(layer, self._mpp.value), self._settings()
        except BcdError as err:
            self._plan_label.value = str(err)
            return

        def count() -> Estimate:
            try:
                return self._controller.estimate(slide, card, settings)
            finally:
                slide.close()

        self._plan(count)

    @property
    def _plan_jobs(self):
        return self._plan.worker

    def _show_estimate(self, est) -> None:
        if isinstance(est, BaseException):
            self._plan_label.value = str(est) if isinstance(est, BcdError) else ""
            return
        self._estimate = est
        self._plan_label.value = est.text
        self._run_button.enabled = not self._jobs.running and est.plan.on_tissue > 0

    # ------------------------------------------------------------------ run / cancel
    def _on_run_clicked(self) -> None:
        layer = self._image_combo.value
        try:
            if layer is None:
                raise BcdError("Open an H&E image first (File > Open, or File > Open Sample > Breast Cancer "
                               "Classifier).")
            if self._card is None:
                raise BcdError(self._card_label.value)
            if self._estimate is not None and self._estimate.plan.on_tissue == 0:
                raise BcdError(self._estimate.text)
            slide = slide_for_layer(layer, self._mpp.value)
            settings = self._settings()
        except BcdError as err:
            self._say(str(err))
            notify_error(err)
            return
        translate = tuple(float(t) for t in layer.translate[-2:])
        card, device = self._card, settings.device
        self._progress_name = layer.name
        self._jobs.start(self._controller.job(slide, self._model_path(), settings), self._on_progress,
                         lambda cm: self._on_result(cm, layer.name, translate, card, device), layers=[layer])

    def _set_running(self, running: bool) -> None:
        self._run_button.enabled = not running and (self._estimate is None or self._estimate.plan.on_tissue > 0)
        self._cancel_button.enabled = running
        self._run_status.running(running, f"Classifying {self._progress_name}")

    @property
    def _pbar(self):
        return self._run_status.pbar

    def _say(self, text: str) -> None:
        self._run_status.say(text)

    def _on_progress(self, p) -> None:
        if isinstance(p, Stage):
            self._run_status.stage(p.message)
        elif p.stage == "classify":
            self._run_status.count(p.done, p.total, p.windows_per_s, p.eta_s)
        elif p.stage == "quality control" and p.done == 0:
            self._run_status.stage("Quality control: looking for pen, folds, debris and blur…")

    # ------------------------------------------------------------------ the map
    def show_result(self, class_map: ClassMap, image_name: str, translate: tuple[float, float] = (0.0, 0.0)) -> None:
        """Show a classification: the layers, the summary and legend, the exports (the demo calls this)."""
        self._on_result(class_map, image_name, translate, self._card, self._device_combo.value)

    def _on_result(self, class_map: ClassMap, image_name: str, translate, card, device: str) -> None:
        if image_name not in self._viewer.layers:
            return  # the image went while the run ended: no map on an empty canvas
        self._map.bind(*show_map(self._viewer, class_map, image_name, translate,
                                 probabilities=self._probs_check.value))
        if card is not None:
            self._controller.remember(class_map, card, device)
        run = class_map.run
        how = ""
        if run is not None:
            how = f", {run.precision} on {run.device}"
            check = run.precision_check
            if check is not None:
                how += f" ({check.describe()})" if not check.passed else ", checked against fp32"
        self._say(f"Done: {class_map.n_windows} windows in {run.seconds if run else 0:.1f} s{how}.")
        scroll_to(self._scroll, self._legend)  # the result in view

    @property
    def shown(self) -> ClassMap | None:
        """The map as the layer shows it (the model's, with the cells repainted by hand)."""
        return self._map.shown

    @property
    def _store(self) -> MapStore | None:
        return self._map.store

    @property
    def _layer(self):
        return self._map.layer

    def export(self, kind: str, path: str | None = None) -> str | None:
        """Write the map as shown (one of :data:`~._classify_map.EXPORTS`) to ``path`` (asked for when None)."""
        return self._map.export(kind, path)

    def _on_map_changed(self, state: MapState, reason: str, summary) -> None:
        """What the dock itself does when the map changes: follow a retrained model, say a relabelling."""
        if reason in ("retrain", "undo") and state.model_path and state.model_path != self._model_path():
            self.use_model(state.model_path)
            self._say(f"The map changed ({reason}); runs now use {Path(state.model_path).name}.")
        elif reason == "rule":
            self._say(f"The map was relabelled: {summary.decision}.")
