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
from ._curves import CurvePlot
from ._layers import refresh_combo, slide_for_layer
from ._layout import Section, buttons, compact_file_edit, readonly_text, scroll_to, scrolling, wrapped
from ._worker import DockJobs, notify_error

if TYPE_CHECKING:
    import napari

REGIONS, FOLDER = "regions on an image", "ICIAR folder"
PROTOCOLS = {"auto: learns from a few regions": "auto", "paper: its hyper-parameters exactly": "paper"}
AUTO_FIELD, PAPER_FIELD = "chosen from the regions", "ICIAR photo, 645 × 860 µm (the paper's)"
FIELDS = {AUTO_FIELD: None, PAPER_FIELD: "iciar", "256 µm": 256.0, "128 µm": 128.0, "custom": -1.0}
OVERLAP = {"none": 1.0, "50 %": 0.5, "75 %": 0.25}
WEIGHTS = {"ImageNet / pretrained": "imagenet", "a file": "file", "random (experiments only)": None}
#: Fewer regions than this for a class draws a warning before training.
MIN_REGIONS = 3


class TrainWidget(Container):
    """Train the model's head from annotated regions or an ICIAR folder, with a simple classifier beside it."""

    def __init__(self, viewer: napari.viewer.Viewer) -> None:
        super().__init__(labels=False)
        self._viewer = viewer
        self._source_combo = ComboBox(label="data", choices=[REGIONS, FOLDER])
        self._image_combo = ComboBox(label="image", choices=lambda w: self._layers(Image), nullable=True)
        self._shapes_combo = ComboBox(label="regions", choices=lambda w: self._layers(Shapes), nullable=True)
        self._folder_edit = compact_file_edit(FileEdit(label="ICIAR folder", mode="d", value=""))
        self._field_combo = ComboBox(label="field", choices=list(FIELDS), value=AUTO_FIELD,
                                     tooltip="What one training window shows; by default the largest field at "
                                             "which every class's regions give windows")
        self._field_spin = FloatSpinBox(label="field µm", value=200.0, min=10.0, max=5000.0, step=10.0, visible=False)
        self._overlap_combo = ComboBox(label="overlap", choices=list(OVERLAP), value="none",
                                       tooltip="overlapping windows: more of them from small regions")
        self._coverage_spin = FloatSpinBox(label="coverage", value=0.5, min=0.05, max=1.0, step=0.05,
                                           tooltip="Share of a window that must lie inside regions of one class")
        self._check_button = PushButton(text="Count windows per class")
        self._out_edit = compact_file_edit(FileEdit(label="save model as", mode="w", filter="*.safetensors",
                                                    value="bcd-model.safetensors"))
        self._protocol_combo = ComboBox(label="protocol", choices=list(PROTOCOLS), value=next(iter(PROTOCOLS)),
                                        tooltip="auto: validated on regions it did not train on, never worse than a "
                                                "simple classifier. paper: Adam 1e-4, batch 128, 25 epochs.")
        self._backbone_edit = LineEdit(label="backbone", value="resnet152v2", tooltip="resnet152v2 or timm:<name>")
        self._weights_combo = ComboBox(label="backbone weights", choices=list(WEIGHTS), value="ImageNet / pretrained")
        self._weights_edit = compact_file_edit(FileEdit(label="weights file", mode="r", value="", visible=False))
        self._pixels_label = wrapped(Label(label="pixels", value="the backbone's default"))
        self._epochs_spin = SpinBox(label="epochs", value=0, min=0, max=5000,
                                    tooltip="auto = the protocol's choice (auto: from the dataset size; paper: 25)")
        self._epochs_spin.native.setSpecialValueText("auto")  # 0 reads "auto"
        self._lr_spin = FloatSpinBox(label="learning rate", value=1e-4, min=1e-6, max=1.0, step=1e-5)
        self._batch_spin = SpinBox(label="batch size", value=0, min=0, max=4096, tooltip="auto = the protocol's")
        self._batch_spin.native.setSpecialValueText("auto")
        self._stain_check = CheckBox(text="stain augmentation", value=False,
                                     tooltip="also train on stain-jittered copies of every region (HED x0.8-1.2), "
                                             "for slides stained unlike these")
        self._run_button = PushButton(text="Train")
        self._cancel_button = PushButton(text="Stop", enabled=False,
                                         tooltip="stop after this step; the best validated model so far is kept")
        self._progress = ProgressBar(label="", value=0, min=0, max=1, visible=False)
        self._status = wrapped(Label(label="", value=""))
        self._verdict = wrapped(Label(value=""))
        self._report = readonly_text(max_height=160)
        self._use_button = PushButton(text="Use this model", enabled=False)
        self._plot = CurvePlot()
        self._sections = (
            Section("Data", [self._source_combo, self._image_combo, self._shapes_combo, self._folder_edit,
                             self._field_combo, self._field_spin, self._overlap_combo, self._coverage_spin,
                             buttons(self._check_button)]),
            Section("Model", [self._out_edit, self._protocol_combo, self._backbone_edit, self._weights_combo,
                              self._weights_edit, self._pixels_label]),
            Section("Training settings", [self._epochs_spin, self._lr_spin, self._batch_spin, self._stain_check],
                    open=False))
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
        self._weights_combo.changed.connect(self._on_weights_changed)
        self._weights_edit.changed.connect(self._on_weights_changed)
        for w in (self._source_combo, self._field_combo):
            w.changed.connect(self._on_source_changed)
        self._protocol_combo.changed.connect(self._on_protocol_changed)
        viewer.layers.events.inserted.connect(self._on_layers_changed)
        viewer.layers.events.removed.connect(self._on_layers_changed)
        self._on_layers_changed()
        self._on_source_changed()

    @property
    def _worker(self):
        return self._jobs.worker

    # ------------------------------------------------------------------ inputs
    def _layers(self, kind: type) -> list:
        return [(layer.name, layer) for layer in self._viewer.layers if isinstance(layer, kind)]

    def _on_layers_changed(self, event=None) -> None:
        for combo in (self._image_combo, self._shapes_combo):
            refresh_combo(combo)

    def _on_source_changed(self) -> None:
        regions = self._source_combo.value == REGIONS
        for w in (self._image_combo, self._shapes_combo, self._field_combo, self._overlap_combo,
                  self._coverage_spin, self._check_button):
            w.visible = regions
        self._field_spin.visible = regions and FIELDS[self._field_combo.value] == -1.0
        self._folder_edit.visible = not regions

    def _on_protocol_changed(self) -> None:
        # The paper's protocol goes with the paper's field; auto with a field the regions can hold.
        if FIELDS[self._field_combo.value] != -1.0:
            paper = PROTOCOLS[self._protocol_combo.value] == "paper"
            self._field_combo.value = PAPER_FIELD if paper else AUTO_FIELD

    def _field_um(self) -> tuple[float, float] | None:
        from ..model.card import ICIAR_FIELD_UM

        value = FIELDS[self._field_combo.value]
        if value is None or value == "iciar":
            return None if value is None else ICIAR_FIELD_UM
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
        if len({a.cls for a in anns if a.cls is not None}) < 2:
            raise BcdError("The regions cover fewer than two classes: draw regions of at least two classes and set "
                           "their class in the Annotations dock.")
        return image, shapes, anns

    def _region_warning(self, anns) -> str:
        from ..classes import CLASS_NAMES

        per = {name: sum(1 for a in anns if a.cls == i + 1) for i, name in enumerate(CLASS_NAMES)}
        few = [f"{k} ({v})" for k, v in per.items() if 0 < v < MIN_REGIONS]
        if few:
            return (f"Few regions for {', '.join(few)}: with fewer than {MIN_REGIONS} regions a class has little to "
                    "validate on. Draw more regions of it for a model you can trust.")
        return ""

    # ------------------------------------------------------------------ the job
    def _train_options(self, out: Path) -> dict:
        return {"out": out, "protocol": PROTOCOLS[self._protocol_combo.value],
                    "backbone": self._backbone_edit.value.strip() or "resnet152v2", "backbone_weights": self._weights(),
                    "epochs": self._epochs_spin.value or None, "lr": self._lr_spin.value,
                    "batch_size": self._batch_spin.value or None,
                    "overwrite": True,  # the save dialog already asked before replacing a file
                    "stain_augment": self._stain_check.value}

    def _job(self, out: Path, image=None, anns=None):
        """The whole job as one generator (:data:`~napari_bcd.train.STOP` sent in ends it at the next step)."""
        from ..train.finetune import iter_finetune
        from ..train.iciar import read_iciar
        from ..train.regions import iter_train_from_regions

        options = self._train_options(out)
        if self._source_combo.value == FOLDER:
            from ..model.backbones import check_backbone_weights

            check_backbone_weights(options["backbone"], options["backbone_weights"])  # before reading any image
            return (yield from iter_finetune(read_iciar(Path(str(self._folder_edit.value))), **options))
        return (yield from iter_train_from_regions(
            slide_for_layer(image), anns, field_um=self._field_um(), coverage=self._coverage_spin.value,
            stride=OVERLAP[self._overlap_combo.value], **options))

    def _check_job(self, image, anns):
        from ..train.patches import plan_patches
        from ..train.regions import RegionCheck, suggest_field

        slide, field, stride = slide_for_layer(image), self._field_um(), OVERLAP[self._overlap_combo.value]
        yield None
        plan = (suggest_field(slide, anns, coverage=self._coverage_spin.value, stride=stride) if field is None else
                plan_patches(slide, anns, field_um=field, coverage=self._coverage_spin.value, stride=stride))
        return RegionCheck(plan, field is None)

    def _on_check_clicked(self) -> None:
        try:
            image, shapes, anns = self._regions()
        except BcdError as err:
            self._say(str(err))
            notify_error(err)
            return
        self._say("Counting windows…")
        self._jobs.start(self._check_job(image, anns), lambda _: None, self._show_check, layers=[image, shapes])

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
            self._weights()
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
        self._jobs.start(self._job(out, image, anns), self._on_progress, self._on_result,
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
            if not self._stopping:
                self._say(f"{where}step {item.step}/{item.steps}{val}")
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
