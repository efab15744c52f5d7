"""The "Train" dock: regions drawn on an image, or an ICIAR folder -> a trained checkpoint.

A thin shell over :func:`~napari_bcd.train.regions.iter_train_from_regions`
and :func:`~napari_bcd.train.iter_finetune`: it reads the fields, runs one
generator in a thread worker, and shows what it yields.  The field (what one
window shows) is chosen from the regions unless the user chooses one.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import TYPE_CHECKING

from magicgui.widgets import (
    Container,
    Label,
    ProgressBar,
    PushButton,
)
from napari.utils.notifications import show_info, show_warning

from ..errors import BcdError
from ._curves import CurvePlot
from ._layout import buttons, readonly_text, scroll_to, scrolling, wrapped
from ._train_data import REGIONS, DataSettings
from ._train_model import PROTOCOLS, ModelSettings
from ._worker import DockJobs, notify_error

if TYPE_CHECKING:
    import napari

#: Fewer regions than this for a class draws a warning before training.
MIN_REGIONS = 3


class TrainWidget(Container):
    """Train the model's head from annotated regions or an ICIAR folder, with a simple classifier beside it."""

    def __init__(self, viewer: napari.viewer.Viewer) -> None:
        super().__init__(labels=False)
        self._viewer = viewer
        self._data = DataSettings(viewer)
        d = self._data
        self._source_combo, self._image_combo, self._shapes_combo, self._folder_edit = (d.source, d.image, d.shapes,
                                                                                        d.folder)
        self._field_combo, self._field_spin, self._overlap_combo, self._coverage_spin = (d.field, d.field_spin,
                                                                                         d.overlap, d.coverage)
        self._check_button = d.check_button
        self._model = ModelSettings()
        m = self._model
        self._out_edit, self._protocol_combo, self._backbone_edit, self._weights_combo = (m.out, m.protocol,
                                                                                          m.backbone, m.weights)
        self._weights_edit, self._pixels_label, self._epochs_spin, self._batch_spin = (m.weights_file, m.pixels,
                                                                                       m.epochs, m.batch)
        self._run_button = PushButton(text="Train")
        self._cancel_button = PushButton(text="Stop", enabled=False,
                                         tooltip="stop after this step; the best validated model so far is kept")
        self._progress = ProgressBar(label="", value=0, min=0, max=1, visible=False)
        self._status = wrapped(Label(label="", value=""))
        self._verdict = wrapped(Label(value=""))
        self._report = readonly_text(max_height=160)
        self._use_button = PushButton(text="Use this model", enabled=False)
        self._plot = CurvePlot()
        self._sections = (d.section, *m.sections)
        self._scroll = scrolling(*self._sections, buttons(self._run_button, self._cancel_button), self._progress,
                                 self._status, self._plot.canvas, self._verdict, self._report,
                                 buttons(self._use_button))
        self.native.layout().addWidget(self._scroll)
        self._jobs = DockJobs(self.native, viewer, "Training", self._set_running, self._say)
        self._result = None
        self._stopping = False
        self._run_button.changed.connect(self._on_run_clicked)
        self._check_button.changed.connect(self._on_check_clicked)
        self._cancel_button.changed.connect(self._on_cancel_clicked)
        self._use_button.changed.connect(self._on_use_clicked)
        self._protocol_combo.changed.connect(
            lambda *_: d.follow_protocol(PROTOCOLS[self._protocol_combo.value] == "paper"))

    @property
    def _worker(self):
        return self._jobs.worker

    # ------------------------------------------------------------------ inputs
    def _regions(self):
        return self._data.regions()

    def _region_warning(self, anns) -> str:
        from collections import Counter

        from ..classes import order_classes

        counted = Counter(a.class_name for a in anns if a.class_name is not None)
        per = {name: counted[name] for name in order_classes(counted)}
        few = [f"{k} ({v})" for k, v in per.items() if 0 < v < MIN_REGIONS]
        if few:
            return (f"Few regions for {', '.join(few)}: with fewer than {MIN_REGIONS} regions a class has little to "
                    "validate on. Draw more regions of it for a model you can trust.")
        return ""

    # ------------------------------------------------------------------ the job
    def _on_check_clicked(self) -> None:
        try:
            image, shapes, anns = self._regions()
        except BcdError as err:
            self._say(str(err))
            notify_error(err)
            return
        self._say("Counting windows…")
        self._jobs.start(self._data.check_job(image, anns), lambda _: None, self._show_check, layers=[image, shapes])

    def _show_check(self, check) -> None:
        """Windows per class with the field in use; advice only when a class has too few."""
        from ..train.regions import MIN_WINDOWS

        advice = check.plan.advice(min_per_class=MIN_WINDOWS)
        self._say(check.message + (f". {advice}" if advice else ""))

    def _on_run_clicked(self) -> None:
        out = Path(str(self._out_edit.value or "bcd-model.safetensors"))
        if out.suffix != ".safetensors":
            out = out.with_suffix(".safetensors")
        image = shapes = anns = None
        warning = ""
        try:
            options = self._model.options(out)
            if self._source_combo.value == REGIONS:
                image, shapes, anns = self._regions()
                warning = self._region_warning(anns)
        except BcdError as err:
            self._say(str(err))
            notify_error(err)
            return
        self._plot.clear()
        self._result = None
        self._report.value = self._verdict.value = ""
        self._say(warning or "Preparing…")
        if warning:
            show_warning(warning)
        self._jobs.start(self._data.train_job(options, image, anns), self._on_progress, self._on_result,
                         layers=[x for x in (image, shapes) if x is not None])

    def _on_cancel_clicked(self) -> None:
        from ..train.finetune import STOP

        if self._jobs.running:
            self._stopping = True
            self._jobs.send(STOP)  # ends after the current step; the best validated model so far is saved
            self._say("Stopping after this step…")

    def _set_running(self, running: bool) -> None:
        self._run_button.enabled = self._check_button.enabled = not running
        self._cancel_button.enabled = running
        self._progress.visible = running
        if running:
            self._stopping = False
            self._progress.value, self._progress.max = 0, 0
            self._use_button.enabled = False  # acts only on the run that has just finished
            scroll_to(self._scroll, self._status.native)  # progress in view while it runs
        else:
            self._plot.flush()
            self._use_button.enabled = self._result is not None and self._result.checkpoint is not None

    def _say(self, text: str) -> None:
        self._status.value = text

    def _on_progress(self, item) -> None:
        from ..train.finetune import FeatureProgress, Stage, TrainPlan
        from ..train.headfit import FitProgress
        from ..train.regions import RegionCheck

        if isinstance(item, RegionCheck):
            self._show_check(item)
        elif isinstance(item, FitProgress):
            self._progress.max, self._progress.value = item.steps, item.step
            val = "" if math.isnan(item.val_acc) else f": held-out accuracy {item.val_acc:.3f}"
            where = f"fold {item.fold}/{item.folds}, " if item.folds else ""
            what = f"step {item.step}/{item.steps}" if item.steps else "the simple classifier"
            if not self._stopping:
                self._say(f"{where}{what}{val}")
            self._plot.add(item)
        elif isinstance(item, TrainPlan | Stage):
            self._say(item.message)
        elif item is not None:
            self._progress.max, self._progress.value = max(item.total, 1), item.done
            what = "backbone features" if isinstance(item, FeatureProgress) else "patches"
            if not self._stopping:
                self._say(f"{what}: {item.done} / {item.total}")

    def _on_result(self, result) -> None:
        from ..train.report import report_lines

        self._result = result
        if result is None or result.checkpoint is None:
            self._say("Cancelled before anything could be saved." if self._stopping
                      else "Stopped before anything could be saved.")
            return
        self._verdict.value = result.verdict()  # the verdict in words; the figures in the report box
        self._report.value = "\n".join(report_lines(result))
        if result.tuning is not None and not self._plot.heads_trained:
            self._plot.show_tuning(result.tuning)  # what decided the model: its C, not steps never taken
        kept = "the simple classifier" if result.shipped == "probe" else f"the head after {result.steps} steps"
        if result.stopped == "stopped by the user":
            self._say(f"Stopped: kept {kept} in {result.checkpoint.name}.")
        else:
            self._say(f"Saved {result.checkpoint.name} ({kept}, {result.stopped}).")
        scroll_to(self._scroll, self._use_button.native)  # the verdict and the button in view

    def _on_use_clicked(self) -> None:
        from ..config import set_default_model
        from .classify import ClassifyWidget

        result = self._result
        if result is None or result.checkpoint is None:
            return
        if not result.beats_chance:
            show_warning("This model does not beat chance on its validation images (or has none); it is used "
                         "because you asked.")
        try:
            set_default_model(result.checkpoint)
        except OSError as err:
            notify_error(BcdError(f"Could not remember the model: {err}"))
        for widget in self._viewer.window.dock_widgets.values():
            if isinstance(widget, ClassifyWidget):
                widget.use_model(result.checkpoint)
        show_info(f"{result.checkpoint.name} is now the model for classification.")
