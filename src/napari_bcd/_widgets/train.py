"""The "Train" dock widget: regions or an ICIAR folder -> a trained checkpoint, with the probe beside it.

A thin shell over :func:`~napari_bcd.train.plan_patches`,
:func:`~napari_bcd.train.iter_export_patches` and
:func:`~napari_bcd.train.iter_finetune`: it reads the fields, runs one
generator in a thread worker, and shows what it yields.
"""

from __future__ import annotations

import math
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
    LineEdit,
    ProgressBar,
    PushButton,
    SpinBox,
)
from napari.layers import Image, Shapes
from napari.utils.notifications import show_info, show_warning

from ..errors import BcdError
from ._layers import readonly_text, refresh_combo, scroll_to, scrolling, slide_for_layer
from ._worker import notify_error, start_job

if TYPE_CHECKING:
    import napari

    from ..train.headfit import FitProgress

REGIONS, FOLDER = "regions on an image", "ICIAR folder"
PROTOCOLS = {
    "auto: learns from a few regions": "auto",
    "paper: its hyper-parameters exactly": "paper",
}
PAPER_FIELD = "ICIAR photo, 645 × 860 µm (the paper's)"
FIELDS = {PAPER_FIELD: None, "256 µm (1 µm/px at 256 px)": 256.0, "128 µm (0.5 µm/px)": 128.0, "custom": -1.0}
WEIGHTS = {"ImageNet / pretrained": "imagenet", "a file": "file", "random (experiments only)": None}
#: Fewer regions than this for a class draws a warning before training.
MIN_REGIONS = 3
#: The curves are redrawn at most this often (ms): drawing on the Qt thread at every epoch froze the viewer.
REDRAW_MS = 500


@dataclass(frozen=True)
class RegionCheck:
    """Windows per class with the current field and coverage (the first thing a run yields)."""

    plan: object

    @property
    def message(self) -> str:
        return "windows per class: " + self.plan.table()  # type: ignore[attr-defined]


class TrainWidget(Container):
    """Train the Table II head from annotated regions or an ICIAR folder, with the linear probe beside it."""

    def __init__(self, viewer: napari.viewer.Viewer) -> None:
        super().__init__(labels=False)
        self._viewer = viewer
        self._source_combo = ComboBox(label="data", choices=[REGIONS, FOLDER])
        self._image_combo = ComboBox(label="image", choices=lambda w: self._layers(Image), nullable=True)
        self._shapes_combo = ComboBox(label="regions", choices=lambda w: self._layers(Shapes), nullable=True)
        self._folder_edit = FileEdit(label="ICIAR folder", mode="d", value="")
        self._field_combo = ComboBox(label="field", choices=list(FIELDS), value="256 µm (1 µm/px at 256 px)",
                                     tooltip="What one training window shows. A window must lie at least 'coverage' "
                                             "inside regions of one class.")
        self._field_spin = FloatSpinBox(label="field µm", value=200.0, min=10.0, max=5000.0, step=10.0, visible=False)
        self._coverage_spin = FloatSpinBox(label="coverage", value=0.5, min=0.05, max=1.0, step=0.05,
                                           tooltip="Share of a window that must lie inside regions of one class")
        self._check_button = PushButton(text="Count windows per class")
        self._out_edit = FileEdit(label="save model as", mode="w", filter="*.safetensors",
                                  value="bcd-model.safetensors")
        self._protocol_combo = ComboBox(label="protocol", choices=list(PROTOCOLS), value=next(iter(PROTOCOLS)),
                                        tooltip="auto: at least 600 optimiser steps, class-balanced, early stopping, "
                                                "head started from the linear probe. paper: Adam 1e-4, batch 128, "
                                                "25 epochs, no augmentation.")
        self._backbone_edit = LineEdit(label="backbone", value="resnet152v2", tooltip="resnet152v2 or timm:<name>")
        self._weights_combo = ComboBox(label="backbone weights", choices=list(WEIGHTS), value="ImageNet / pretrained")
        self._weights_edit = FileEdit(label="weights file", mode="r", value="", visible=False,
                                      tooltip="a local safetensors / state dict (offline, foundation models); it may "
                                              "state its preprocessing in its metadata")
        self._pixels_label = Label(label="pixels", value="the backbone's default")
        self._epochs_spin = SpinBox(label="epochs", value=0, min=0, max=5000,
                                    tooltip="auto = the protocol's choice (auto: from the dataset size; paper: 25)")
        self._epochs_spin.native.setSpecialValueText("auto")  # 0 reads "auto"
        self._lr_spin = FloatSpinBox(label="learning rate", value=1e-4, min=1e-6, max=1.0, step=1e-5)
        self._batch_spin = SpinBox(label="batch size", value=128, min=1, max=4096)
        self._stain_check = CheckBox(text="stain augmentation (slides stained unlike these)", value=False,
                                     tooltip="also train on stain-jittered copies of every region (HED x0.8-1.2)")
        self._run_button = PushButton(text="Train")
        self._cancel_button = PushButton(text="Cancel", enabled=False)
        self._progress = ProgressBar(label="", value=0, min=0, max=1, visible=False)
        self._status = Label(label="", value="")
        self._status.native.setWordWrap(True)
        self._verdict = Label(value="")  # head, probe and chance in words, wrapped
        self._verdict.native.setWordWrap(True)
        self._report = readonly_text()
        self._use_button = PushButton(text="Use this model", enabled=False)
        self._plot = _CurvePlot()
        form = Container(labels=True, widgets=[
            self._source_combo, self._image_combo, self._shapes_combo, self._folder_edit, self._field_combo,
            self._field_spin, self._coverage_spin, self._check_button, self._out_edit, self._protocol_combo,
            self._backbone_edit, self._weights_combo, self._weights_edit, self._pixels_label, self._epochs_spin,
            self._lr_spin, self._batch_spin, self._stain_check,
            Container(widgets=[self._run_button, self._cancel_button], layout="horizontal", labels=False),
            self._progress, self._status,
        ])
        body = Container(labels=False, widgets=[form, self._verdict, self._report, self._use_button])
        body.native.layout().insertWidget(1, self._plot.canvas)  # the curves above the verdict, report and button
        self._scroll = scrolling(body.native)
        self.native.layout().addWidget(self._scroll)
        self._worker = None
        self._result = None
        self._cancelled = False
        self._run_button.changed.connect(self._on_run_clicked)
        self._check_button.changed.connect(self._on_check_clicked)
        self._cancel_button.changed.connect(self._on_cancel_clicked)
        self._use_button.changed.connect(self._on_use_clicked)
        self._weights_combo.changed.connect(self._on_weights_changed)
        self._weights_edit.changed.connect(self._on_weights_changed)
        self._source_combo.changed.connect(self._on_source_changed)
        self._field_combo.changed.connect(self._on_field_changed)
        self._protocol_combo.changed.connect(self._on_protocol_changed)
        viewer.layers.events.inserted.connect(self._on_layers_changed)
        viewer.layers.events.removed.connect(self._on_layers_changed)
        self._on_layers_changed()
        self._on_source_changed()

    # ------------------------------------------------------------------ inputs
    def _layers(self, kind: type) -> list:
        return [(layer.name, layer) for layer in self._viewer.layers if isinstance(layer, kind)]

    def _on_layers_changed(self, event=None) -> None:
        for combo in (self._image_combo, self._shapes_combo):
            refresh_combo(combo)

    def _on_source_changed(self) -> None:
        regions = self._source_combo.value == REGIONS
        for w in (self._image_combo, self._shapes_combo, self._field_combo, self._coverage_spin, self._check_button):
            w.visible = regions
        self._field_spin.visible = regions and FIELDS[self._field_combo.value] == -1.0
        self._folder_edit.visible = not regions

    def _on_field_changed(self) -> None:
        self._field_spin.visible = self._source_combo.value == REGIONS and FIELDS[self._field_combo.value] == -1.0

    def _on_protocol_changed(self) -> None:
        # The paper's protocol goes with the paper's field; auto with a field small regions can hold.
        if FIELDS[self._field_combo.value] != -1.0:
            paper = PROTOCOLS[self._protocol_combo.value] == "paper"
            self._field_combo.value = PAPER_FIELD if paper else "256 µm (1 µm/px at 256 px)"

    def _field_um(self) -> tuple[float, float]:
        from ..model.card import ICIAR_FIELD_UM

        value = FIELDS[self._field_combo.value]
        if value is None:
            return ICIAR_FIELD_UM
        side = self._field_spin.value if value == -1.0 else value
        return (side, side)

    def _weights(self):
        choice = WEIGHTS[self._weights_combo.value]
        if choice != "file":
            return choice
        value = str(self._weights_edit.value or "").strip()
        if value in ("", "."):
            raise BcdError("Choose the backbone weights file, or another choice under 'backbone weights'.")
        return value

    def _on_weights_changed(self) -> None:
        from ..model.preprocessing import weights_preprocessing

        from_file = WEIGHTS[self._weights_combo.value] == "file"
        self._weights_edit.visible = from_file
        if from_file and str(self._weights_edit.value or "").strip() in ("", "."):
            self._pixels_label.value = "choose the weights file"
            return
        try:
            stated = weights_preprocessing(self._weights()) if from_file else None
        except BcdError as err:
            self._pixels_label.value = str(err)
            return
        self._pixels_label.value = (f"{stated.describe()}, stated by the weights file" if stated is not None
                                    else "the backbone's default")

    def _regions(self):
        """The chosen image and its classified regions, checked before any work."""
        from ..annotations.napari import shapes_to_annotations

        image, shapes = self._image_combo.value, self._shapes_combo.value
        if image is None or shapes is None:
            raise BcdError("Choose the image and the Shapes layer holding its classified regions.")
        anns = shapes_to_annotations(shapes, image)
        classes = {a.cls for a in anns if a.cls is not None}
        if len(classes) < 2:
            raise BcdError("The regions cover fewer than two classes: draw regions of at least two classes and set "
                           "their class in the Annotations dock.")
        return image, anns

    def _region_warning(self, anns) -> str:
        from ..classes import CLASS_NAMES

        per = {name: sum(1 for a in anns if a.cls == i + 1) for i, name in enumerate(CLASS_NAMES)}
        few = [f"{k} ({v})" for k, v in per.items() if 0 < v < MIN_REGIONS]
        if few:
            return (f"Few regions for {', '.join(few)}: with fewer than {MIN_REGIONS} regions a class has little to "
                    "validate on. Draw more regions of it for a model you can trust.")
        return ""

    # ------------------------------------------------------------------ the job
    def _plan(self, image, anns):
        from ..train.patches import plan_patches

        return plan_patches(slide_for_layer(image), anns, field_um=self._field_um(),
                            coverage=self._coverage_spin.value)

    def _check_job(self, image, anns):
        plan = self._plan(image, anns)
        yield RegionCheck(plan)
        return plan

    def _job(self, out: Path, image=None, anns=None):
        """The whole job as one generator: weights check, windows per class, patches, then training.

        :data:`~napari_bcd.train.STOP` sent in ends it at the next step.
        """
        from ..model.classifier import check_backbone_weights
        from ..train.finetune import STOP, iter_finetune
        from ..train.iciar import read_iciar
        from ..train.patches import iter_export_patches

        backbone = self._backbone_edit.value.strip() or "resnet152v2"
        weights = self._weights()
        check_backbone_weights(backbone, weights)  # at once, not after the patches were cut
        if self._source_combo.value == FOLDER:
            folder = Path(str(self._folder_edit.value))
        else:
            plan = self._plan(image, anns)
            if (yield RegionCheck(plan)) == STOP:
                return None
            if plan.empty_classes:
                raise BcdError(plan.advice())
            folder = out.with_name(f"{out.stem}-patches")
            export = iter_export_patches(slide_for_layer(image), anns, folder, field_um=plan.field_um, plan=plan)
            try:
                item = next(export)
                while True:
                    if (yield item) == STOP:
                        export.close()
                        return None
                    item = next(export)
            except StopIteration:
                pass
        ds = read_iciar(folder)
        return (yield from iter_finetune(
            ds, out=out, protocol=PROTOCOLS[self._protocol_combo.value], backbone=backbone,
            backbone_weights=weights, epochs=self._epochs_spin.value or None,
            lr=self._lr_spin.value, batch_size=self._batch_spin.value,
            overwrite=True,  # the save dialog already asked before replacing a file
            stain_augment=self._stain_check.value,
        ))

    def _start(self, gen, on_result) -> None:
        self._set_running(True)
        self._worker = start_job(gen, self._on_progress, on_result, self._on_finished)
        self._worker.errored.connect(self._on_error)

    def _on_check_clicked(self) -> None:
        try:
            image, anns = self._regions()
        except BcdError as err:
            self._status.value = str(err)
            notify_error(err)
            return
        self._status.value = "Counting windows…"
        self._start(self._check_job(image, anns), self._on_checked)

    def _on_checked(self, plan) -> None:
        advice = plan.advice(min_per_class=MIN_REGIONS)
        self._status.value = "windows per class: " + plan.table() + (f". {advice}" if advice else "")

    def _on_run_clicked(self) -> None:
        out = Path(str(self._out_edit.value or "bcd-model.safetensors"))
        if out.suffix != ".safetensors":
            out = out.with_suffix(".safetensors")
        image = anns = None
        warning = ""
        try:
            self._weights()
            if self._source_combo.value == REGIONS:
                image, anns = self._regions()
                warning = self._region_warning(anns)
        except BcdError as err:
            self._status.value = str(err)
            notify_error(err)
            return
        self._plot.clear()
        self._result = None
        self._report.value = self._verdict.value = ""
        self._status.value = warning or "Preparing…"
        if warning:
            show_warning(warning)
        self._start(self._job(out, image, anns), self._on_result)

    def _on_cancel_clicked(self) -> None:
        from ..train.finetune import STOP

        if self._worker is not None:
            self._cancelled = True
            self._worker.send(STOP)  # ends after the current epoch; the best model so far is saved
            self._status.value = "Cancelling after this epoch…"

    def _set_running(self, running: bool) -> None:
        self._run_button.enabled = self._check_button.enabled = not running
        self._cancel_button.enabled = running
        self._progress.visible = running
        if running:
            self._cancelled = False
            self._use_button.enabled = False  # acts only on the run that has just finished
            scroll_to(self._scroll, self._status.native)  # progress in view while it runs

    def _on_progress(self, item) -> None:
        from ..train.finetune import FeatureProgress, Stage, TrainPlan
        from ..train.headfit import FitProgress

        if isinstance(item, FitProgress):
            self._progress.max, self._progress.value = item.steps, item.step
            val = ("" if math.isnan(item.val_acc) else
                   f": held-out accuracy {item.val_acc:.3f}")
            where = f"fold {item.fold}/{item.folds}, " if item.folds else ""
            if not self._cancelled:
                self._status.value = f"{where}step {item.step}/{item.steps}{val}"
            self._plot.add(item)
        elif isinstance(item, TrainPlan | RegionCheck | Stage):
            self._status.value = item.message
        else:
            self._progress.max, self._progress.value = max(item.total, 1), item.done
            what = "backbone features" if isinstance(item, FeatureProgress) else "patches"
            if not self._cancelled:
                self._status.value = f"{what}: {item.done} / {item.total}"

    def _on_error(self, err: BaseException) -> None:
        self._status.value = f"Stopped: {err}" if isinstance(err, BcdError) else f"Failed: {type(err).__name__}: {err}"

    def _on_result(self, result) -> None:
        self._result = result
        self._plot.flush()
        if result is None or result.checkpoint is None:
            self._status.value = ("Cancelled before anything could be saved." if self._cancelled
                                  else "Stopped before anything could be saved.")
            return
        from ..train.report import report_lines

        # The verdict in words above; the figures in the report box.
        self._verdict.value = result.verdict()
        self._report.value = "\n".join(report_lines(result))
        scroll_to(self._scroll, self._use_button.native)  # the verdict and the button in view
        kept = ("the simple classifier" if result.shipped == "probe"
                else f"the head after {result.steps} steps")
        if result.stopped == "stopped by the user":
            self._status.value = f"Cancelled: kept the {kept} in {result.checkpoint.name}."
        else:
            self._status.value = f"Saved {result.checkpoint.name} ({kept}, {result.stopped})."
        self._use_button.enabled = True

    def _on_finished(self) -> None:
        self._worker = None
        self._plot.flush()
        self._set_running(False)
        if self._result is not None and self._result.checkpoint is not None:
            self._use_button.enabled = True

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


class _CurvePlot:
    """Live loss and accuracy curves (matplotlib in a Qt canvas), redrawn at most every REDRAW_MS."""

    def __init__(self) -> None:
        from matplotlib.backends.backend_qtagg import FigureCanvasQTAgg
        from matplotlib.figure import Figure
        from qtpy.QtCore import QTimer

        self.figure = Figure(figsize=(4, 2.0), dpi=90, tight_layout=True)
        from qtpy.QtWidgets import QSizePolicy

        self.canvas = FigureCanvasQTAgg(self.figure)
        self.canvas.setMinimumHeight(150)
        # Take the dock's width, never widen it (a figure asks for its figsize, which clipped the dock).
        self.canvas.setMinimumWidth(120)
        self.canvas.setSizePolicy(QSizePolicy.Policy.Ignored, QSizePolicy.Policy.Fixed)
        self.canvas.setFixedHeight(170)
        self.canvas.setVisible(False)  # no empty axes before the first epoch
        self.ax_loss = self.figure.add_subplot(121)
        self.ax_acc = self.figure.add_subplot(122)
        self.epochs: list = []
        self._timer = QTimer()
        self._timer.setSingleShot(True)
        self._timer.setInterval(REDRAW_MS)
        self._timer.timeout.connect(self._draw)

    def clear(self) -> None:
        self.epochs = []
        self._timer.stop()
        self.canvas.setVisible(False)

    def add(self, stats: FitProgress) -> None:
        self.epochs.append(stats)
        if not self._timer.isActive():
            self._timer.start()

    def flush(self) -> None:
        """Draw what has arrived now (the run ended)."""
        self._timer.stop()
        if self.epochs:
            self._draw()

    def _draw(self) -> None:
        self.canvas.setVisible(True)
        # One line per run (a fold and recipe, or the final fit); NaN points (no held-out images) are not drawn.
        runs: dict[tuple, list] = {}
        for s in self.epochs:
            runs.setdefault((s.fold, s.recipe), []).append(s)
        for ax, key, title in ((self.ax_loss, "val_loss", "held-out loss"), (self.ax_acc, "val_acc",
                                                                            "held-out accuracy")):
            ax.clear()
            for (fold, _recipe), items in runs.items():
                ax.plot([s.step for s in items], [getattr(s, key) for s in items], lw=1,
                        label=f"fold {fold}" if fold else "held out")
            ax.set_title(title, fontsize=9)
            ax.set_xlabel("steps", fontsize=7)
            ax.tick_params(labelsize=7)
        self.canvas.draw_idle()
