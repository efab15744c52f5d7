"""The "Annotations" dock widget: open QuPath/ImageScope/ASAP regions, set classes, save GeoJSON."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
from magicgui.widgets import ComboBox, Container, FileEdit, Label, LineEdit, PushButton
from napari.layers import Image, Shapes
from napari.utils.notifications import show_info

from ..annotations.read import FILE_PATTERNS, FORMAT_NAMES
from ..classes import VOCABULARY, canonical_class, class_styles, order_classes
from ..errors import BcdError
from ._layers import refresh_combo
from ._layout import buttons, compact_file_edit, scrolling, wrapped
from ._worker import notify_error

if TYPE_CHECKING:
    import napari

_CLASS_CHOICES = [c.display for c in VOCABULARY]


class AnnotateWidget(Container):
    """Bring annotation files onto an image as Shapes, classify shapes, and save them for QuPath."""

    def __init__(self, viewer: napari.viewer.Viewer) -> None:
        super().__init__(labels=False)
        self._viewer = viewer
        self._image_combo = ComboBox(label="image", choices=self._image_choices, nullable=True)
        self._file_edit = compact_file_edit(FileEdit(label="annotations", mode="r", filter=FILE_PATTERNS, value=""))
        self._open_button = PushButton(text="Open onto image")
        self._class_combo = ComboBox(label="class", choices=_CLASS_CHOICES, value=_CLASS_CHOICES[-1])
        # any class of the user's own (the model trained on these regions has the classes they name)
        self._new_class_edit = LineEdit(label="or a class of your own", value="")
        self._set_button = PushButton(text="Set class of selected shapes")
        self._save_button = PushButton(text="Save shapes as GeoJSON…")
        self._report = wrapped(Label(label="", value=""))
        form = Container(labels=True, widgets=[self._image_combo, self._file_edit, self._class_combo,
                                               self._new_class_edit])
        self.native.layout().addWidget(scrolling(form, buttons(self._open_button, self._set_button, per_row=1),
                                                 buttons(self._save_button), self._report))
        self._open_button.changed.connect(self._on_open_clicked)
        self._set_button.changed.connect(self._on_set_class_clicked)
        self._save_button.changed.connect(lambda: self._on_save_clicked())
        viewer.layers.events.inserted.connect(self._on_layers_changed)
        viewer.layers.events.removed.connect(self._on_layers_changed)
        self._on_layers_changed()

    def _image_choices(self, _widget=None) -> list:
        return [(layer.name, layer) for layer in self._viewer.layers if isinstance(layer, Image)]

    def _on_layers_changed(self, event=None) -> None:
        refresh_combo(self._image_combo, pick=0)

    def _shapes_layer(self) -> Shapes:
        active = self._viewer.layers.selection.active
        if isinstance(active, Shapes):
            return active
        shapes = [layer for layer in self._viewer.layers if isinstance(layer, Shapes)]
        if not shapes:
            raise BcdError("There is no Shapes layer: open an annotation file or draw polygons first.")
        return shapes[-1]

    def _on_open_clicked(self) -> Shapes | None:
        from ..annotations import read_annotations
        from ..annotations.napari import annotations_to_shapes

        image = self._image_combo.value
        path = str(self._file_edit.value or "")
        try:
            if image is None:
                raise BcdError("Open the slide first: annotations are placed on an image layer.")
            if not path or path == ".":
                raise BcdError(f"Choose an annotation file ({FORMAT_NAMES}).")
            anns = read_annotations(path)
        except BcdError as err:
            notify_error(err)
            return None
        data, kwargs, _ = annotations_to_shapes(
            anns, scale=tuple(image.scale[-2:]), translate=tuple(image.translate[-2:]),
            name=f"{Path(path).stem} annotations", units=tuple(str(u) for u in image.units[-2:]),
        )
        layer = self._viewer.add_shapes(data, **kwargs)
        self._report.value = str(anns.report)
        show_info(f"Opened {len(anns)} region(s) from {Path(path).name}: details in the Annotations dock.")
        return layer

    def _on_set_class_clicked(self) -> None:
        try:
            layer = self._shapes_layer()
            selected = sorted(layer.selected_data)
            if not selected:
                raise BcdError(f"Select shapes in {layer.name!r} first (the selection tool, or click a shape).")
        except BcdError as err:
            notify_error(err)
            return
        own = " ".join(str(self._new_class_edit.value or "").split())
        if own and canonical_class(own) is None:
            notify_error(BcdError(f"{own!r} names no class (QuPath keeps it for unclassified regions); choose "
                                  "another name."))
            return
        name = own or self._class_combo.value
        features = layer.features.copy()
        if "class" not in features:
            features["class"] = ["unclassified"] * len(layer.data)
        features["class"] = features["class"].astype(object)
        edge = np.asarray(layer.edge_color, dtype=float).copy()
        face = np.asarray(layer.face_color, dtype=float).copy()
        present = {canonical_class(str(c)) for c in features["class"]} | {canonical_class(name)}
        styles = {st.name: st for st in class_styles(order_classes(c for c in present if c))}
        rgb = np.asarray(styles[canonical_class(name)].color) / 255
        for i in selected:
            features.loc[i, "class"] = name
            edge[i, :3] = rgb
            face[i, :3], face[i, 3] = rgb, 0.25
        layer.features = features
        layer.edge_color = edge
        layer.face_color = face
        if getattr(layer.text.string, "constant", None) == "":  # a drawn layer shows no text yet: show the class
            layer.text = {"string": "{class}", "color": "white", "size": 10, "anchor": "upper_left"}
        self._report.value = f"{len(selected)} shape(s) set to {name}"

    def _on_save_clicked(self, path: str | None = None) -> str | None:
        from ..annotations import write_geojson
        from ..annotations.napari import shapes_to_annotations

        try:
            layer = self._shapes_layer()
            anns = shapes_to_annotations(layer, self._image_combo.value)
            if not anns:
                raise BcdError(f"{layer.name!r} has no polygons to save.")
            if path is None:
                from qtpy.QtWidgets import QFileDialog

                path, _ = QFileDialog.getSaveFileName(self.native, "Save as GeoJSON", f"{layer.name}.geojson")
                if not path:
                    return None
            write_geojson(anns, path, overwrite=True)
        except (BcdError, OSError) as err:
            notify_error(err if isinstance(err, BcdError) else BcdError(f"Could not write {path}: {err}"))
            return None
        show_info(f"Saved {len(anns)} region(s) to {path}")
        return path
