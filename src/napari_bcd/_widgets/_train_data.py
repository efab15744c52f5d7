"""The Train dock's "Data" section: regions drawn on an image, or an ICIAR folder, and what one window shows."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from magicgui.widgets import ComboBox, FileEdit, FloatSpinBox, Label, PushButton
from napari.layers import Image, Shapes

from ..errors import BcdError
from ._layers import refresh_combo, slide_for_layer
from ._layout import Section, buttons, compact_file_edit, wrapped

REGIONS, FOLDER = "regions on an image", "ICIAR folder"
AUTO_FIELD, PAPER_FIELD = "chosen from the regions", "ICIAR photo, 645 × 860 µm (the paper's)"
FIELDS = {AUTO_FIELD: None, PAPER_FIELD: "iciar", "256 µm": 256.0, "128 µm": 128.0, "custom": -1.0}
OVERLAP = {"none": 1.0, "50 %": 0.5, "75 %": 0.25}
#: Where a folder's groups (patients, slides) come from: what the folder carries, a file, or none.
FOUND_GROUPS, FILE_GROUPS, NO_GROUPS = "found in the folder", "from a file", "none (validate by image)"


class DataSettings:
    """The widgets that say what to train from, and the generators that count or train from it."""

    def __init__(self, viewer: Any) -> None:
        self._viewer = viewer
        self.source = ComboBox(label="data", choices=[REGIONS, FOLDER])
        self.image = ComboBox(label="image", choices=lambda w: self._layers(Image), nullable=True)
        self.shapes = ComboBox(label="regions", choices=lambda w: self._layers(Shapes), nullable=True)
        self.folder = compact_file_edit(FileEdit(label="ICIAR folder", mode="d", value=""))
        self.groups = ComboBox(label="groups", choices=[FOUND_GROUPS, FILE_GROUPS, NO_GROUPS], value=FOUND_GROUPS,
                               tooltip="The patients (or slides) a validation never splits: those the folder carries "
                                       "(provenance.csv, a folder per patient, the ground truth's third column, a "
                                       "manifest beside the images, TCGA-style file names), a file,group CSV or "
                                       "manifest of yours, or none")
        self.groups_file = compact_file_edit(FileEdit(label="groups file", mode="r", filter="*.csv *.tsv *.txt",
                                                      value="", visible=False))
        self.groups_info = wrapped(Label(label="", value=""))
        self.field = ComboBox(label="field", choices=list(FIELDS), value=AUTO_FIELD,
                              tooltip="What one training window shows; by default the largest field at which every "
                                      "class's regions give windows")
        self.field_spin = FloatSpinBox(label="field µm", value=200.0, min=10.0, max=5000.0, step=10.0, visible=False)
        self.overlap = ComboBox(label="overlap", choices=list(OVERLAP), value="none",
                                tooltip="overlapping windows: more of them from small regions")
        self.coverage = FloatSpinBox(label="coverage", value=0.5, min=0.05, max=1.0, step=0.05,
                                     tooltip="Share of a window that must lie inside regions of one class")
        self.check_button = PushButton(text="Count windows per class")
        self.section = Section("Data", [self.source, self.image, self.shapes, self.folder, self.groups,
                                        self.groups_file, self.groups_info, self.field, self.field_spin, self.overlap,
                                        self.coverage, buttons(self.check_button)])
        for w in (self.source, self.field):
            w.changed.connect(self.on_source_changed)
        for w in (self.folder, self.groups, self.groups_file):
            w.changed.connect(self.on_groups_changed)
        viewer.layers.events.inserted.connect(self.on_layers_changed)
        viewer.layers.events.removed.connect(self.on_layers_changed)
        self.on_layers_changed()
        self.on_source_changed()

    def _layers(self, kind: type) -> list:
        return [(layer.name, layer) for layer in self._viewer.layers if isinstance(layer, kind)]

    def on_layers_changed(self, event: Any = None) -> None:
        for combo in (self.image, self.shapes):
            refresh_combo(combo)

    def on_source_changed(self, *_args) -> None:
        regions = self.source.value == REGIONS
        for w in (self.image, self.shapes, self.field, self.overlap, self.coverage, self.check_button):
            w.visible = regions
        self.field_spin.visible = regions and FIELDS[self.field.value] == -1.0
        for w in (self.folder, self.groups, self.groups_info):
            w.visible = not regions
        self.groups_file.visible = not regions and self.groups.value == FILE_GROUPS
        if not regions:
            self.on_groups_changed()

    def folder_dataset(self):
        """The chosen folder's images, with the groups the user asked for (:func:`~napari_bcd.train.groups.
        group_dataset`): raises a :class:`~napari_bcd.errors.BcdError` that says what to do."""
        from ..train.groups import group_dataset, without_groups
        from ..train.iciar import read_iciar

        folder = str(self.folder.value)
        if not folder or folder == ".":
            raise BcdError("Choose the folder of training images (a folder per class).")
        ds = read_iciar(Path(folder))
        if self.groups.value == NO_GROUPS:
            return without_groups(ds)
        if self.groups.value == FILE_GROUPS:
            file = str(self.groups_file.value)
            if not file or file == "." or not Path(file).is_file():
                raise BcdError("Choose the groups file: a CSV of file,group rows, or a manifest whose header names a "
                               "file column and a patient, case or slide column.")
            return group_dataset(ds, groups_csv=file)
        return ds

    def on_groups_changed(self, *_args) -> None:
        """Say what the folder's groups are before any training: how many, of what, from where."""
        self.groups_file.visible = self.source.value == FOLDER and self.groups.value == FILE_GROUPS
        folder = str(self.folder.value)
        if self.source.value != FOLDER or not folder or folder == "." or not Path(folder).is_dir():
            self.groups_info.value = ""
            return
        try:
            ds = self.folder_dataset()
        except BcdError as err:
            self.groups_info.value = str(err)
            return
        if ds.groups is None:
            self.groups_info.value = (f"{len(ds)} images; no patient, slide or region known: validation by image, "
                                      "optimistic, and the simple classifier ships.")
        else:
            kind = ds.group_kind or "group"
            self.groups_info.value = (f"{len(ds)} images from {ds.n_groups} {kind}s (from {ds.group_source}): a "
                                      f"{kind} is never split between training and validation.")
        if ds.problems:
            self.groups_info.value += f" {len(ds.problems)} problem(s), e.g.: {ds.problems[0]}"

    def follow_protocol(self, paper: bool) -> None:
        """The paper's protocol goes with the paper's field; auto with a field the regions can hold."""
        if FIELDS[self.field.value] != -1.0:
            self.field.value = PAPER_FIELD if paper else AUTO_FIELD

    def field_um(self) -> tuple[float, float] | None:
        from ..model.card import ICIAR_FIELD_UM

        value = FIELDS[self.field.value]
        if value is None or value == "iciar":
            return None if value is None else ICIAR_FIELD_UM
        side = self.field_spin.value if value == -1.0 else value
        return (side, side)

    def regions(self) -> tuple[Any, Any, Any]:
        """The chosen image, its Shapes layer and its classified regions, checked before any work."""
        from ..annotations.napari import shapes_to_annotations

        image, shapes = self.image.value, self.shapes.value
        if image is None or shapes is None:
            raise BcdError("Choose the image and the Shapes layer holding its classified regions.")
        anns = shapes_to_annotations(shapes, image)
        if len({a.class_name for a in anns if a.class_name is not None}) < 2:
            raise BcdError("The regions cover fewer than two classes: draw regions of at least two classes and set "
                           "their class in the Annotations dock.")
        return image, shapes, anns

    def train_job(self, options: dict, image: Any = None, anns: Any = None):
        """The training as one generator (:data:`~napari_bcd.train.STOP` sent in ends it at the next step)."""
        from ..train.finetune import iter_finetune
        from ..train.regions import iter_train_from_regions

        if self.source.value == FOLDER:
            from ..model.backbones import check_backbone_weights

            check_backbone_weights(options["backbone"], options["backbone_weights"])  # before reading any image
            return (yield from iter_finetune(self.folder_dataset(), **options))
        return (yield from iter_train_from_regions(
            slide_for_layer(image), anns, field_um=self.field_um(), coverage=self.coverage.value,
            stride=OVERLAP[self.overlap.value], **options))

    def check_job(self, image: Any, anns: Any):
        """Windows per class with the field in use (chosen from the regions when the user has not)."""
        from ..train.patches import plan_patches
        from ..train.regions import RegionCheck, suggest_field

        slide, field, stride = slide_for_layer(image), self.field_um(), OVERLAP[self.overlap.value]
        yield None
        plan = (suggest_field(slide, anns, coverage=self.coverage.value, stride=stride) if field is None else
                plan_patches(slide, anns, field_um=field, coverage=self.coverage.value, stride=stride))
        return RegionCheck(plan, field is None)
