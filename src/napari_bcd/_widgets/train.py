"""The "Train" dock widget: regions or an ICIAR folder -> fine-tuned checkpoint, with live curves."""

from __future__ import annotations

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
from napari.utils.notifications import show_info

from ..errors import BcdError
from ._layers import readonly_text, refresh_combo, slide_for_layer
from ._worker import notify_error, start_job

if TYPE_CHECKING:
    import napari


class TrainWidget(Container):
    """Fine-tune the Table II head (the paper's defaults) from annotated regions or an ICIAR folder."""

    def __init__(self, viewer: napari.viewer.Viewer) -> None:
        super().__init__(labels=True)
        self._viewer = viewer
        self._source_combo = ComboBox(label="data", choices=["regions on an image", "ICIAR folder"])
        self._image_combo = ComboBox(label="image", choices=lambda w: self._layers(Image), nullable=True)
        self._shapes_combo = ComboBox(label="regions", choices=lambda w: self._layers(Shapes), nullable=True)
        self._folder_edit = FileEdit(label="ICIAR folder", mode="d", value="")
        self._out_edit = FileEdit(label="save model as", mode="w", filter="*.safetensors", value="bcd-model.safetensors")
        self._backbone_edit = LineEdit(label="backbone", value="resnet152v2", tooltip="resnet152v2 or timm:<name>")
        self._weights_edit = FileEdit(label="backbone weights", mode="r", value="",
                                      tooltip="empty = ImageNet; or a local safetensors / state dict (offline, foundation models)")
        self._epochs_spin = SpinBox(label="epochs", value=25, min=1, max=1000)
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
            self._backbone_edit, self._weights_edit, self._epochs_spin, self._lr_spin, self._batch_spin,
            Container(widgets=[self._run_button, self._cancel_button], layout="horizontal", labels=False),
            self._progress, self._status,
        ])
        self.native.layout().addWidget(self._plot.canvas)
        self.extend([self._report, self._use_button])
        self._worker = None
        self._checkpoint: Path | None = None
        self._run_button.changed.connect(self._on_run_clicked)
        self._cancel_button.changed.connect(self._on_cancel_clicked)
        self._use_button.changed.connect(self._on_use_clicked)
        viewer.layers.events.inserted.connect(self._on_layers_changed)
        viewer.layers.events.removed.connect(self._on_layers_changed)
        self._on_layers_changed()

    def _layers(self, kind: type) -> list:
        return [(layer.name, layer) for layer in self._viewer.layers if isinstance(layer, kind)]

    def _on_layers_changed(self, event=None) -> None:
        for combo in (self._image_combo, self._shapes_combo):
            refresh_combo(combo)

    def _job(self, out: Path):
        """The whole job as one generator: (export patches,) then fine-tune."""
        from ..annotations.napari import shapes_to_annotations
        from ..model.card import ICIAR_FIELD_UM
        from ..train.finetune import iter_finetune
        from ..train.iciar import iter_export_patches, read_iciar

        if self._source_combo.value == "ICIAR folder":
            folder = Path(str(self._folder_edit.value))
        else:
            image, shapes = self._image_combo.value, self._shapes_combo.value
            if image is None or shapes is None:
                raise BcdError("Choose the image and the Shapes layer holding its classified regions.")
            anns = shapes_to_annotations(shapes, image)
            folder = out.with_name(f"{out.stem}-patches")
            slide = slide_for_layer(image)
            yield from iter_export_patches(slide, anns, folder, field_um=ICIAR_FIELD_UM)
        ds = read_iciar(folder)
        weights = str(self._weights_edit.value or "").strip()
        return (yield from iter_finetune(
            ds, out=out, backbone=self._backbone_edit.value.strip() or "resnet152v2",
            backbone_weights=weights if weights not in ("", ".") else "imagenet", epochs=self._epochs_spin.value,
            lr=self._lr_spin.value, batch_size=self._batch_spin.value,
        ))

    def _on_run_clicked(self) -> None:
        out = Path(str(self._out_edit.value or "bcd-model.safetensors"))
        if out.suffix != ".safetensors":
            out = out.with_suffix(".safetensors")
        self._plot.clear()
        self._run_button.enabled, self._cancel_button.enabled, self._progress.visible = False, True, True
        self._status.value = "Preparing…"
        self._worker = start_job(self._job(out), self._on_progress, self._on_result, self._on_finished)

    def _on_cancel_clicked(self) -> None:
        if self._worker is not None:
            self._worker.quit()
            self._status.value = "Cancelling… (the best model so far is kept)"

    def _on_progress(self, item) -> None:
        from ..train.finetune import EpochStats, FeatureProgress

        if isinstance(item, EpochStats):
            self._progress.max, self._progress.value = item.epochs, item.epoch
            self._status.value = f"epoch {item.epoch}/{item.epochs}: val loss {item.val_loss:.3f}, val acc {item.val_acc:.3f}"
            self._plot.add(item)
        else:
            self._progress.max, self._progress.value = max(item.total, 1), item.done
            what = "backbone features" if isinstance(item, FeatureProgress) else "patches"
            self._status.value = f"{what}: {item.done} / {item.total}"

    def _on_result(self, checkpoint: Path) -> None:
        from ..model.checkpoint import load_checkpoint
        from ..train.evaluate import Report

        self._checkpoint = Path(checkpoint)
        card = load_checkpoint(checkpoint).card
        self._report.value = Report(**card.training["validation_report"]).to_text()
        self._status.value = f"Saved {checkpoint} (best epoch {card.training['best_epoch']})"
        self._use_button.enabled = True

    def _on_finished(self) -> None:
        self._worker = None
        self._run_button.enabled, self._cancel_button.enabled, self._progress.visible = True, False, False

    def _on_use_clicked(self) -> None:
        from ..config import set_default_model
        from .classify import ClassifyWidget

        if self._checkpoint is None:
            return
        try:
            set_default_model(self._checkpoint)
        except OSError as err:
            notify_error(BcdError(f"Could not remember the model: {err}"))
        for widget in self._viewer.window.dock_widgets.values():
            if isinstance(widget, ClassifyWidget):
                widget._model_edit.value = str(self._checkpoint)
        show_info(f"{self._checkpoint.name} is now the model for classification.")


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
        e = [s.epoch for s in self.epochs]
        for ax, keys, title in ((self.ax_loss, ("train_loss", "val_loss"), "loss"), (self.ax_acc, ("train_acc", "val_acc"), "accuracy")):
            ax.clear()
            for key in keys:
                ax.plot(e, [getattr(s, key) for s in self.epochs], label=key.split("_")[0])
            ax.set_title(title, fontsize=9)
            ax.tick_params(labelsize=7)
            if self.epochs:
                ax.legend(fontsize=7)
        self.canvas.draw_idle()
