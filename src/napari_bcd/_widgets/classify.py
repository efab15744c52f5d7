"""The "Classify slide" dock: a thin shell over :class:`~napari_bcd.app.ClassifyController`.

Before Run it says what a run would do (windows, cell size, about how long);
after, everything it shows of the map (slide call, summary, legend, hover,
exports) is derived from the map's :class:`~napari_bcd.app.MapStore`, so a
retrain, an *Apply* of a decision rule, an *Undo* or a repainted cell shows
here at once.  The model loads in the worker; the dock never waits on it.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from magicgui.widgets import CheckBox, ComboBox, Container, FileEdit, FloatSpinBox, Label, ProgressBar, PushButton
from napari.layers import Image
from napari.utils.notifications import show_info

from ..app.classify import ClassifyController, Estimate, Stage, duration
from ..errors import BcdError
from ..export import OUTPUT_KINDS
from ._layers import refresh_combo, slide_for_layer
from ._layout import Section, buttons, compact_file_edit, readonly_text, scroll_to, scrolling, wrapped
from ._legend import Legend
from ._maplayer import show_map
from ._mpp import MppField
from ._worker import DockJobs, notify_error

if TYPE_CHECKING:
    import napari

    from ..app.mapstate import MapState, MapStore
    from ..engine import ClassMap

#: Overlap choices: (stride as a fraction of the field, adaptive refinement).
OVERLAP = {"none": (1.0, False), "50 %": (0.5, False), "75 %": (0.25, False), "75 % where in doubt": (0.25, True)}
STAIN = {"as scanned": "none", "normalise (Macenko)": "macenko", "normalise (Vahadane)": "vahadane"}
#: The exports offered under the map (rows of :data:`~napari_bcd.export.OUTPUTS`).
EXPORTS = ("geojson", "summary_csv", "labels", "probabilities")


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
        self._overlap_combo = ComboBox(label="overlap", choices=list(OVERLAP), value="none",
                                       tooltip="more overlap: finer cells, longer runs; 'where in doubt' "
                                               "overlaps only where neighbouring cells disagree or the top two "
                                               "classes are close (a fraction of the windows)")
        self._tissue_spin = FloatSpinBox(label="tissue threshold", value=0.1, min=0.0, max=1.0, step=0.01)
        self._stain_combo = ComboBox(label="stain", choices=list(STAIN), value="as scanned",
                                     tooltip="normalise every window to the stain of the model's training images")
        self._device_combo = ComboBox(label="device", choices=["auto", "cpu", "cuda", "mps"], value="auto")
        self._batch_spin = FloatSpinBox(label="batch size", value=0, min=0, max=1024, step=1)
        self._batch_spin.native.setDecimals(0)
        self._batch_spin.native.setSpecialValueText("auto")  # 0 reads "auto"
        self._probs_check = CheckBox(text="probability layers", value=False)
        self._compile_check = CheckBox(text="compile (GPU, long runs)", value=False,
                                       tooltip="torch.compile: tens of seconds once, then faster on a GPU")
        self._plan_label = wrapped(Label(label="", value=""))
        self._run_button = PushButton(text="Run")
        self._cancel_button = PushButton(text="Cancel", enabled=False)
        self._progress = ProgressBar(label="", value=0, min=0, max=1, visible=False)
        self._status = wrapped(Label(label="", value=""))
        self._call = wrapped(Label(label="", value=""), rich=True)
        self._stain_note = wrapped(Label(label="", value=""))
        self._summary = readonly_text(max_height=130)
        self._legend = Legend(self._on_legend_toggled)
        self._hover = wrapped(Label(label="", value=""))
        self._export_buttons = {k: PushButton(text=OUTPUT_KINDS[k].label, enabled=False) for k in EXPORTS}
        self._more = Section("More settings", [self._device_combo, self._batch_spin, self._probs_check,
                                               self._compile_check], open=False)
        self._sections = (
            Section("Slide and model", [self._image_combo, *self._mpp.widgets, self._model_edit, self._card_label]),
            Section("What a run does", [self._overlap_combo, self._tissue_spin, self._stain_combo]), self._more,
            Section("The map", [self._call, self._stain_note, self._summary, self._legend, self._hover,
                                buttons(*self._export_buttons.values())], labels=False))
        self._scroll = scrolling(*self._sections[:3], self._plan_label, buttons(self._run_button, self._cancel_button),
                                 self._progress, self._status, self._sections[3])
        self.native.layout().addWidget(self._scroll)
        self._jobs = DockJobs(self.native, viewer, "Classification", self._set_running, self._say)
        self._card = None
        self._estimate: Estimate | None = None
        self._plan_jobs = None
        self._plan_token = 0
        self._pbar = None
        self._progress_name = ""
        self._store: MapStore | None = None
        self._layer = None
        self._unlisten = None
        self._run_button.changed.connect(self._on_run_clicked)
        self._cancel_button.changed.connect(self.cancel)
        self._model_edit.changed.connect(self._on_model_changed)
        self._image_combo.changed.connect(lambda: self._mpp.show_layer(self._image_combo.value))
        for w in (self._overlap_combo, self._tissue_spin, self._device_combo):
            w.changed.connect(self._on_settings_changed)
        for kind, button in self._export_buttons.items():
            button.changed.connect(lambda *_, k=kind: self.export(k))
        viewer.layers.events.inserted.connect(self._on_layers_changed)
        viewer.layers.events.removed.connect(self._on_layers_changed)
        viewer.mouse_move_callbacks.append(self._on_mouse_move)
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
        from ..settings import ClassifySettings

        stride, refine = OVERLAP[self._overlap_combo.value]
        return ClassifySettings(stride=stride, refine=refine, tissue_threshold=self._tissue_spin.value,
                                mpp=self._mpp.value, batch_size=int(self._batch_spin.value) or None,
                                device=self._device_combo.value, compile=self._compile_check.value,
                                stain_normalize=STAIN[self._stain_combo.value],
                                quality=True)  # the Review dock can then grey out pen, blur and folds

    # ------------------------------------------------------------------ what a run would do
    def _on_settings_changed(self, *_args) -> None:
        """Count the windows of a run with these settings, in a thread (the thumbnail may take a moment)."""
        from napari.qt.threading import create_worker

        layer, card = self._image_combo.value, self._card
        self._estimate = None
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
        self._plan_token += 1
        token = self._plan_token

        def count() -> Estimate:
            try:
                return self._controller.estimate(slide, card, settings)
            finally:
                slide.close()

        self._plan_jobs = create_worker(count, _start_thread=False, _connect={
            "returned": lambda est: self._show_estimate(est, token),
            "errored": lambda err: self._show_estimate(err, token)})
        self._plan_jobs.start()

    def _show_estimate(self, est, token: int) -> None:
        if token != self._plan_token:
            return  # settings changed since: a newer count is on its way
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
        from napari.utils import progress

        self._run_button.enabled = not running and (self._estimate is None or self._estimate.plan.on_tissue > 0)
        self._cancel_button.enabled = running
        self._progress.visible = running
        if running:
            self._progress.value, self._progress.max = 0, 0  # busy until the windows are counted
            self._say("Starting…")
            self._pbar = progress(total=0, desc=f"Classifying {self._progress_name}")  # napari's activity dock
        elif self._pbar is not None:
            self._pbar.close()
            self._pbar = None

    def _say(self, text: str) -> None:
        self._status.value = text

    def _on_progress(self, p) -> None:
        if isinstance(p, Stage):
            self._progress.max = 0  # a phase without a count: the bar shows it is busy
            self._say(p.message)
            return
        if p.stage != "classify":
            return
        self._progress.max, self._progress.value = max(p.total, 1), p.done
        eta = f", about {duration(p.eta_s)} left" if p.eta_s is not None else ""
        self._say(f"{p.done} / {p.total} windows, {p.windows_per_s:.1f}/s{eta}")
        if self._pbar is not None:
            if self._pbar.total != p.total:
                self._pbar.total = p.total
            self._pbar.update(p.done - self._pbar.n)

    # ------------------------------------------------------------------ the map
    def show_result(self, class_map: ClassMap, image_name: str, translate: tuple[float, float] = (0.0, 0.0)) -> None:
        """Show a classification: the layers, the summary and legend, the exports (the demo calls this)."""
        self._on_result(class_map, image_name, translate, self._card, self._device_combo.value)

    def _on_result(self, class_map: ClassMap, image_name: str, translate, card, device: str) -> None:
        if image_name not in self._viewer.layers:
            return  # the image went while the run ended: no map on an empty canvas
        self._layer, store = show_map(self._viewer, class_map, image_name, translate,
                                      probabilities=self._probs_check.value)
        if store is not self._store:
            if self._unlisten is not None:
                self._unlisten()
            self._store, self._unlisten = store, store.listen(self._on_map_changed)
        self._on_map_changed(store.state, "new")
        if card is not None:
            self._controller.remember(class_map, card, device)
        run = class_map.run
        self._say(f"Done: {class_map.n_windows} windows in {run.seconds if run else 0:.1f} s.")
        scroll_to(self._scroll, self._legend)  # the result in view

    @property
    def shown(self) -> ClassMap | None:
        """The map as the layer shows it (the model's, with the cells repainted by hand)."""
        return self._store.state.shown if self._store is not None else None

    def _on_map_changed(self, state: MapState, reason: str) -> None:
        """Every view of the map follows the store: a retrain, an Apply, an Undo, a repainted cell."""
        from ..summary import stain_warning, summarize

        shown = state.shown
        summary = summarize(shown)
        self._summary.value = summary.table(compact=True)
        self._call.value = f"<b>{summary.call_text[:1].upper()}{summary.call_text[1:]}</b>"
        self._legend.show_summary(summary, shown.classes)
        self._on_legend_toggled(self._legend.hidden())
        warning = stain_warning((shown.info or {}).get("stain"), advice="choose stain: normalise (Macenko) and Run "
                                                                        "again")
        self._stain_note.value = warning[:1].upper() + warning[1:] + "." if warning else ""
        for b in self._export_buttons.values():
            b.enabled = True
        if reason in ("retrain", "undo") and state.model_path and state.model_path != self._model_path():
            self.use_model(state.model_path)
            self._say(f"The map changed ({reason}); runs now use {Path(state.model_path).name}.")
        elif reason == "rule":
            self._say(f"The map was relabelled: {summary.decision}.")

    def _on_legend_toggled(self, hidden: set[int]) -> None:
        """A click on a class in the legend hides or shows it on the map."""
        from napari.utils.colormaps import DirectLabelColormap

        from ..layers import label_colors

        if self._store is None or self._layer is None or self._layer not in self._viewer.layers:
            return
        colors = label_colors(self._store.state.class_map.classes)
        for label in hidden:
            colors[label] = (0.0, 0.0, 0.0, 0.0)
        self._layer.colormap = DirectLabelColormap(color_dict=colors)

    def _on_mouse_move(self, viewer, event) -> None:
        if self._store is None:
            return
        from ..layers import describe_hover

        state = self._store.state
        pos = viewer.cursor.position[-2:]
        self._hover.value = describe_hover(state.shown, (float(pos[0]), float(pos[1])), state.translate)

    def export(self, kind: str, path: str | None = None) -> str | None:
        """Write the map as shown (one of :data:`EXPORTS`) to ``path`` (asked for when None)."""
        from ..export import write_output

        shown = self.shown
        if shown is None:
            return None
        output = OUTPUT_KINDS[kind]
        if path is None:
            from qtpy.QtWidgets import QFileDialog

            path, _ = QFileDialog.getSaveFileName(self.native, f"Save the {output.label}",
                                                  f"{self._store.state.image}{output.suffix}")
            if not path:
                return None
        try:
            write_output(kind, shown, path)
        except (BcdError, OSError) as err:
            notify_error(BcdError(f"Could not write {path}: {err}"))
            return None
        show_info(f"Saved {Path(path).name}")
        return path
