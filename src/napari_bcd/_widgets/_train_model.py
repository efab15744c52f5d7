"""The Train dock's "Model" and "Training settings" sections: where the model goes and how it is trained."""

from __future__ import annotations

from pathlib import Path

from magicgui.widgets import CheckBox, ComboBox, FileEdit, FloatSpinBox, Label, LineEdit, SpinBox

from ..errors import BcdError
from ..model.backbones import BACKBONES, PAPER_BACKBONE
from ._layout import Section, compact_file_edit, wrapped

PROTOCOLS = {"auto: learns from a few regions": "auto", "paper: its hyper-parameters exactly": "paper"}
WEIGHTS = {"ImageNet / pretrained": "imagenet", "a file": "file", "random (experiments only)": None}
#: The backbone list: the table's (:data:`~napari_bcd.model.backbones.BACKBONES`), then any other timm model.
OTHER = "another timm model…"


class ModelSettings:
    """The widgets that say which model is trained and how, and the options they give the training job."""

    def __init__(self) -> None:
        self.out = compact_file_edit(FileEdit(label="save model as", mode="w", filter="*.safetensors",
                                              value="bcd-model.safetensors"))
        self.protocol = ComboBox(label="protocol", choices=list(PROTOCOLS), value=next(iter(PROTOCOLS)),
                                 tooltip="auto: validated on regions it did not train on, never worse than a simple "
                                         "classifier. paper: Adam 1e-4, batch 128, 25 epochs.")
        self.backbone = ComboBox(label="backbone", choices=[*BACKBONES, OTHER], value=PAPER_BACKBONE,
                                 tooltip="\n".join(f"{k}: {s.label}" + (f" — {s.licence}"
                                                    f"{', gated' if s.gated else ''}"
                                                    f"{', non-commercial' if s.commercial is False else ''}"
                                                    if s.licence else "") for k, s in BACKBONES.items()))
        #: The chosen backbone's licence and access, shown before training (pathology foundation models).
        self.licence = wrapped(Label(label="licence", value="", visible=False))
        self.other = LineEdit(label="timm model", value="timm:", visible=False,
                              tooltip="timm:<name>, any model timm.list_models() knows")
        self.weights = ComboBox(label="backbone weights", choices=list(WEIGHTS), value="ImageNet / pretrained")
        self.weights_file = compact_file_edit(FileEdit(label="weights file", mode="r", value="", visible=False))
        self.pixels = wrapped(Label(label="pixels", value="the backbone's default"))
        self.epochs = SpinBox(label="epochs", value=0, min=0, max=5000,
                              tooltip="auto = the protocol's choice (auto: from the dataset size; paper: 25)")
        self.epochs.native.setSpecialValueText("auto")  # 0 reads "auto"
        self.lr = FloatSpinBox(label="learning rate", value=1e-4, min=1e-6, max=1.0, step=1e-5)
        self.batch = SpinBox(label="batch size", value=0, min=0, max=4096, tooltip="auto = the protocol's")
        self.batch.native.setSpecialValueText("auto")
        self.stain = CheckBox(text="stain augmentation", value=False,
                              tooltip="also train on stain-jittered copies of every region (HED x0.8-1.2), for "
                                      "slides stained unlike these")
        self.sections = (
            Section("Model", [self.out, self.protocol, self.backbone, self.licence, self.other, self.weights,
                              self.weights_file, self.pixels]),
            Section("Training settings", [self.epochs, self.lr, self.batch, self.stain], open=False))
        self.weights.changed.connect(self.on_weights_changed)
        self.weights_file.changed.connect(self.on_weights_changed)
        self.backbone.changed.connect(self.on_backbone_changed)

    def on_backbone_changed(self, *_: object) -> None:
        self.other.visible = self.backbone.value == OTHER
        spec = BACKBONES.get(self.backbone.value)
        notice = spec.notice() if spec is not None else ""
        self.licence.value, self.licence.visible = notice.partition(": ")[2], bool(notice)

    def backbone_name(self) -> str:
        if self.backbone.value != OTHER:
            return self.backbone.value
        name = self.other.value.strip()
        if not name.startswith("timm:") or name == "timm:":
            raise BcdError("Name the timm model as timm:<name> (e.g. timm:efficientnet_b0), or choose one from the "
                           "list.")
        return name

    def backbone_weights(self):
        choice = WEIGHTS[self.weights.value]
        if choice != "file":
            return choice
        value = str(self.weights_file.value or "").strip()
        if value in ("", "."):
            raise BcdError("Choose the backbone weights file, or another choice under 'backbone weights'.")
        return value

    def on_weights_changed(self, *_args) -> None:
        from ..model.preprocessing import weights_preprocessing

        from_file = WEIGHTS[self.weights.value] == "file"
        self.weights_file.visible = from_file
        if from_file and str(self.weights_file.value or "").strip() in ("", "."):
            self.pixels.value = "choose the weights file"
            return
        try:
            stated = weights_preprocessing(self.backbone_weights()) if from_file else None
        except BcdError as err:
            self.pixels.value = str(err)
            return
        self.pixels.value = (f"{stated.describe()}, stated by the weights file" if stated is not None
                             else "the backbone's default")

    def options(self, out: Path) -> dict:
        """The training job's keyword arguments (raises :class:`BcdError` for what the user must fix)."""
        return {"out": out, "protocol": PROTOCOLS[self.protocol.value], "backbone": self.backbone_name(),
                "backbone_weights": self.backbone_weights(), "epochs": self.epochs.value or None,
                "lr": self.lr.value, "batch_size": self.batch.value or None,
                "overwrite": True,  # the save dialog already asked before replacing a file
                "stain_augment": self.stain.value}
