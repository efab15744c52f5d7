"""The Classify dock's run settings: overlap, tissue threshold, stain, and the rarer ones folded away."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from magicgui.widgets import CheckBox, ComboBox, FloatSpinBox

from ..qc import QC_ACTIONS, QCSettings
from ..settings import DEVICES, STAIN_NORMALIZATIONS, ClassifySettings
from ._layout import Section

#: Overlap choices: (stride as a fraction of the field, adaptive refinement).
OVERLAP = {"none": (1.0, False), "50 %": (0.5, False), "75 %": (0.25, False), "75 % where in doubt": (0.25, True)}
STAIN = {"as scanned": "none", "normalise (Macenko)": "macenko", "normalise (Vahadane)": "vahadane"}
assert set(STAIN.values()) == set(STAIN_NORMALIZATIONS), "a stain normalisation without words in the dock"
QC_ACTION = {"not classified": "skip", "set aside": "set_aside"}
assert set(QC_ACTION.values()) == set(QC_ACTIONS), "a QC action without words in the dock"
#: The QC thresholds the dock shows: setting, label, tooltip.
QC_SPINS = (("pen", "pen share", "a window fails when at least this share of it is pen ink"),
            ("fold", "fold share", "a window fails when at least this share of its tissue is as dark as a fold"),
            ("debris", "debris share", "a window fails when at least this share of it is bubble edge or debris"),
            ("blur", "blur", "a 16 µm block is out of focus below this fraction of the slide's median "
                                         "sharpness; a window fails when half its tissue is"))


class RunSettings:
    """The widgets of "What a run does" and "More settings", and the :class:`ClassifySettings` they say."""

    def __init__(self, on_change: Callable[..., None]) -> None:
        self.overlap = ComboBox(label="overlap", choices=list(OVERLAP), value="none",
                                tooltip="more overlap: finer cells, longer runs; 'where in doubt' overlaps only where "
                                        "neighbouring cells disagree or the top two classes are close (a fraction of "
                                        "the windows)")
        self.tissue = FloatSpinBox(label="tissue threshold", value=ClassifySettings.tissue_threshold, min=0.0,
                                   max=1.0, step=0.01)
        self.stain = ComboBox(label="stain", choices=list(STAIN), value="as scanned",
                              tooltip="normalise every window to the stain of the model's training images")
        self.device = ComboBox(label="device", choices=list(DEVICES), value=ClassifySettings.device)
        self.batch = FloatSpinBox(label="batch size", value=0, min=0, max=1024, step=1)
        self.batch.native.setDecimals(0)
        self.batch.native.setSpecialValueText("auto")  # 0 reads "auto"
        self.probabilities = CheckBox(text="probability layers", value=False)
        self.compile = CheckBox(text="compile (GPU, long runs)", value=False,
                                tooltip="torch.compile: tens of seconds once, then faster on a GPU")
        qc = QCSettings()
        self.qc = CheckBox(text="quality control", value=qc.enabled,
                           tooltip="find pen ink, folds, bubble edges/debris and out-of-focus areas before the "
                                   "classifier and leave them out of the map, the areas and the call (a layer shows "
                                   "them by reason)")
        self.qc_action = ComboBox(label="failing windows", choices=list(QC_ACTION), value="not classified",
                                  tooltip="'set aside': classified, the model's answer kept for a look on hover, "
                                          "never in a label, an area or the call")
        self.qc_spins = {name: FloatSpinBox(label=label, value=getattr(qc, name), min=0.0, max=1.0, step=0.05,
                                            tooltip=tip) for name, label, tip in QC_SPINS}
        self.tta = CheckBox(text="8-view TTA (8x time)", value=False,
                            tooltip="test-time augmentation: average every window over its 8 flips and rotations; the "
                                    "estimate above counts the cost, and the Review dock's queue asks first where the "
                                    "views disagree")
        self.qc.changed.connect(self._qc_enabled)
        self.sections = (Section("What a run does", [self.overlap, self.tissue, self.stain, self.qc]),
                         Section("Quality control thresholds", [self.qc_action, *self.qc_spins.values()], open=False),
                         Section("More settings", [self.device, self.batch, self.tta, self.probabilities,
                                                   self.compile], open=False))
        for w in (self.overlap, self.tissue, self.device, self.tta):
            w.changed.connect(on_change)

    def settings(self, mpp: Any) -> ClassifySettings:
        stride, refine = OVERLAP[self.overlap.value]
        return ClassifySettings(stride=stride, refine=refine, tissue_threshold=self.tissue.value, mpp=mpp,
                                batch_size=int(self.batch.value) or None, device=self.device.value,
                                compile=self.compile.value, stain_normalize=STAIN[self.stain.value],
                                quality=True,  # the Review dock can then grey out pen, blur and folds
                                qc=self.qc_settings(), tta=self.tta.value)

    def qc_settings(self) -> QCSettings:
        return QCSettings(enabled=self.qc.value, action=QC_ACTION[self.qc_action.value],
                          **{name: float(w.value) for name, w in self.qc_spins.items()})

    def _qc_enabled(self, on: bool) -> None:
        for w in (self.qc_action, *self.qc_spins.values()):
            w.enabled = bool(on)
