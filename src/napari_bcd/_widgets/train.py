"""The "Train" dock widget: regions or an ICIAR folder -> fine-tuned checkpoint, with live curves."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from magicgui.widgets import (
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
from ._layers import readonly_text, refresh_combo, slide_for_layer
from ._worker import notify_error, start_job

if TYPE_CHECKING:
    import napari


PROTOCOLS = {
    "auto: learns from a few regions": "auto",
    "paper: its hyper-parameters exactly": "paper",
}
#: Fewer regions than this for a class draws a warning before training.
MIN_REGIONS = 3


class TrainWidget(Container):
    """Train the Table II head from annotated regions or an ICIAR folder, with the probe beside it."""

    def __init__(self, viewer: napari.viewer.Viewer) -> None:
        super().__init__(labels=True)
        self._viewer = viewer
        self._source_combo = ComboBox(label="data", choices=["regions on an image", "ICIAR folder"])
        self._image_combo = ComboBox(label="image", choices=lambda w: self._layers(Image), nullable=True)
        self._shapes_combo = ComboBox(label="regions", choices=lambda w: self._layers(Shapes), nullable=True)
        self._folder_edit = FileEdit(label="ICIAR folder", mode="d", value="")
        self._out_edit = FileEdit(label="save model as", mode="w", filter="*.safetensors", value="bcd-model.safetensors")
        self._protocol_combo = ComboBox(label="protocol", choices=list(PROTOCOLS), value=next(iter(PROTOCOLS)),
                                        tooltip="auto: at least 600 optimiser steps, class-balanced, early stopping, "
                                                "head started from the linear probe. paper: Adam 1e-4, batch 128, "
                                                "25 epochs, no augmentation.")
        self._backbone_edit = LineEdit(label="backbone", value="resnet152v2", tooltip="resnet152v2 or timm:<name>")
        self._weights_edit = FileEdit(label="backbone weights", mode="r", value="",
                                      tooltip="empty = ImageNet; or a local safetensors / state dict (offline, foundation "
                                              "models). A safetensors file may state its preprocessing in its metadata.")
        self._pixels_label = Label(label="pixels", value="the backbone's default")
        self._epochs_spin = SpinBox(label="epochs", value=0, min=0, max=5000,
                                    tooltip="auto = the protocol's choice (auto: from the dataset size; paper: 25)")
        self._epochs_spin.native.setSpecialValueText("auto")  # 0 reads "auto"
        self._lr_spin = FloatSpinBox(label="learning rate", value=1e-4, min=1e-6, max=1.0, step=1e-5)
        self._batch_spin = SpinBox(label="batch size", value=128, min=1, max=4096)
        self._run_button = PushButton(text="Train")
        self._cancel_button = PushButton(text="Cancel", enabled=False)
        self._progress = ProgressBar(label="", value=0, min=0, max=1, visible=False)
        self._status = Label(label="", value="")
        self._report = readonly_text()
        self._use_button = PushButton(text="Use this model", enabled=False)
        self._plot = _CurvePlot()
        self.extend([
            self._source_combo, self._image_combo, self._shapes_combo, self._folder_edit, self._out_edit,
            self._protocol_combo, self._backbone_edit, self._weights_edit, self._pixels_label, self._epochs_spin,
            self._lr_spin, self._batch_spin,
            Container(widgets=[self._run_button, self._cancel_button], layout="horizontal", labels=False),
            self._progress, self._status,
        ])
        self.native.layout().addWidget(self._plot.canvas)
        self.extend([self._report, self._use_button])
        self._worker = None
        self._result = None
        self._run_button.changed.connect(self._on_run_clicked)
        self._cancel_button.changed.connect(self._on_cancel_clicked)
        self._use_button.changed.connect(self._on_use_clicked)
        self._weights_edit.changed.connect(self._on_weights_changed)
        viewer.layers.events.inserted.connect(self._on_layers_changed)
        viewer.layers.events.removed.connect(self._on_layers_changed)
        self._on_layers_changed()

    def _layers(self, kind: type) -> list:
        return [(layer.name, layer) for layer in self._viewer.layers if isinstance(layer, kind)]

    def _on_layers_changed(self, event=None) -> None:
        for combo in (self._image_combo, self._shapes_combo):
            refresh_combo(combo)

    def _weights_path(self) -> str | None:
        value = str(self._weights_edit.value or "").strip()
        return value if value not in ("", ".") else None

    def _on_weights_changed(self) -> None:
        from ..model.preprocessing import weights_preprocessing

        try:
            stated = weights_preprocessing(self._weights_path())
        except BcdError as err:
            self._pixels_label.value = str(err)
            return
        self._pixels_label.value = (f"{stated.describe()}, stated by the weights file" if stated is not None
                                    else "the backbone's default")

    def _region_warning(self) -> str:
        """Before training: classes with too few regions on the chosen Shapes layer."""
        from ..annotations.napari import shapes_to_annotations
        from ..classes import CLASS_NAMES

        image, shapes = self._image_combo.value, self._shapes_combo.value
        if image is None or shapes is None:
            raise BcdError("Choose the image and the Shapes layer holding its classified regions.")
        anns = shapes_to_annotations(shapes, image)
        per = {name: sum(1 for a in anns if a.cls == i + 1) for i, name in enumerate(CLASS_NAMES)}
        used = {k: v for k, v in per.items() if v}
        if len(used) < 2:
            raise BcdError("The regions cover fewer than two classes: draw regions of at least two classes and set "
                           "their class in the Annotations dock.")
        few = [f"{k} ({v})" for k, v in used.items() if v < MIN_REGIONS]
        if few:
            return (f"Few regions for {', '.join(few)}: with fewer than {MIN_REGIONS} regions a class has little to "
                    "validate on. Draw more regions of it for a model you can trust.")
        return ""

    def _job(self, out: Path):
        """The whole job as one generator: (export patches,) then train; STOP ends it at the next step."""
        from ..annotations.napari import shapes_to_annotations
        from ..model.card import ICIAR_FIELD_UM
        from ..train.finetune import STOP, iter_finetune
        from ..train.iciar import iter_export_patches, read_iciar

        if self._source_combo.value == "ICIAR folder":
            folder = Path(str(self._folder_edit.value))
        else:
            image, shapes = self._image_combo.value, self._shapes_combo.value
            anns = shapes_to_annotations(shapes, image)
            folder = out.with_name(f"{out.stem}-patches")
            export = iter_export_patches(slide_for_layer(image), anns, folder, field_um=ICIAR_FIELD_UM)
            try:
                item = next(export)
                while True:
                    if (yield item) == STOP:
                        export.close()
                        return None
                    item = next(export)
            except StopIteration as done:
                exported = done.value
            if exported is not None and exported.too_few:
                yield _Note(f"Few patches for {', '.join(exported.too_few)} ({exported}).")
        ds = read_iciar(folder)
        epochs = self._epochs_spin.value or None
        return (yield from iter_finetune(
            ds, out=out, protocol=PROTOCOLS[self._protocol_combo.value],
            backbone=self._backbone_edit.value.strip() or "resnet152v2",
            backbone_weights=self._weights_path() or "imagenet", epochs=epochs,
            lr=self._lr_spin.value, batch_size=self._batch_spin.value,
        ))

    def _on_run_clicked(self) -> None:
        out = Path(str(self._out_edit.value or "bcd-model.safetensors"))
        if out.suffix != ".safetensors":
            out = out.with_suffix(".safetensors")
        warning = ""
        if self._source_combo.value != "ICIAR folder":
            try:
                warning = self._region_warning()
            except BcdError as err:
                notify_error(err)
                return
        self._plot.clear()
        self._result = None
        self._report.value = ""
        self._use_button.enabled = False
        self._run_button.enabled, self._cancel_button.enabled, self._progress.visible = False, True, True
        self._status.value = warning or "Preparing…"
        if warning:
            show_warning(warning)
        self._worker = start_job(self._job(out), self._on_progress, self._on_result, self._on_finished)

    def _on_cancel_clicked(self) -> None:
        from ..train.finetune import STOP

        if self._worker is not None:
            self._worker.send(STOP)  # ends after the current step; the best model so far is saved
            self._status.value = "Stopping… (the best model so far is kept)"

    def _on_progress(self, item) -> None:
        from ..train.finetune import EpochStats, FeatureProgress, TrainPlan

        if isinstance(item, EpochStats):
            self._progress.max, self._progress.value = item.epochs, item.epoch
            val = "" if item.val_loss != item.val_loss else f": val loss {item.val_loss:.3f}, val acc {item.val_acc:.3f}"
            self._status.value = f"epoch {item.epoch}/{item.epochs}{val}"
            self._plot.add(item)
        elif isinstance(item, TrainPlan | _Note):
            self._status.value = item.message
        else:
            self._progress.max, self._progress.value = max(item.total, 1), item.done
            what = "backbone features" if isinstance(item, FeatureProgress) else "patches"
            self._status.value = f"{what}: {item.done} / {item.total}"

    def _on_result(self, result) -> None:
        self._result = result
        if result is None or result.checkpoint is None:
            self._status.value = "Stopped before any epoch: no model was saved."
            return
        # The verdict first: head, probe and chance in one line, then the details.
        lines = [result.verdict()]
        if result.probe is not None and result.probe.report is not None:
            lines.append(f"linear probe (pooled frozen features): accuracy {result.probe.report.accuracy:.4f}, "
                         f"macro F1 {result.probe.report.macro['f1']:.4f}")
        lines.append(f"pixels: {result.card.preprocessing.describe()} ({result.card.training.get('preprocessing_source')})")
        if result.report is not None:
            lines += ["", "Table II head on the validation images:", result.report.to_text()]
        self._report.value = "\n".join(lines)
        self._status.value = (f"Saved {result.checkpoint.name} (best epoch {result.best_epoch} of {result.epochs_run}, "
                              f"{result.stopped})")
        self._use_button.enabled = True

    def _on_finished(self) -> None:
        self._worker = None
        self._run_button.enabled, self._cancel_button.enabled, self._progress.visible = True, False, False

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
                widget._model_edit.value = str(result.checkpoint)
        show_info(f"{result.checkpoint.name} is now the model for classification.")


@dataclass(frozen=True)
class _Note:
    message: str


class _CurvePlot:
    """Live loss and accuracy curves (matplotlib in a Qt canvas)."""

    def __init__(self) -> None:
        from matplotlib.backends.backend_qtagg import FigureCanvasQTAgg
        from matplotlib.figure import Figure

        self.figure = Figure(figsize=(4, 2.2), dpi=90, tight_layout=True)
        self.canvas = FigureCanvasQTAgg(self.figure)
        self.canvas.setMinimumHeight(180)
        self.ax_loss = self.figure.add_subplot(121)
        self.ax_acc = self.figure.add_subplot(122)
        self.epochs: list = []

    def clear(self) -> None:
        self.epochs = []
        self._draw()

    def add(self, stats) -> None:
        self.epochs.append(stats)
        self._draw()

    def _draw(self) -> None:
        e = [s.epoch for s in self.epochs]  # NaN points (no validation, epoch 0's training) are not drawn
        for ax, keys, title in ((self.ax_loss, ("train_loss", "val_loss"), "loss"), (self.ax_acc, ("train_acc", "val_acc"), "accuracy")):
            ax.clear()
            for key in keys:
                ax.plot(e, [getattr(s, key) for s in self.epochs], label=key.split("_")[0])
            ax.set_title(title, fontsize=9)
            ax.tick_params(labelsize=7)
            if self.epochs:
                ax.legend(fontsize=7)
        self.canvas.draw_idle()
