"""Annotations <-> napari Shapes, and the Annotations dock widget."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from conftest import DATA, SAMPLE_SLIDE
from napari_bcd.annotations import read_annotations
from napari_bcd.annotations.napari import annotations_to_shapes, shapes_to_annotations

ANN = DATA / "annotations"


@pytest.fixture
def viewer(make_napari_viewer):
    return make_napari_viewer()


def test_shapes_round_trip_keeps_polygons_holes_and_classes(viewer) -> None:
    image = viewer.add_image(np.zeros((64, 64, 3), np.uint8), rgb=True, scale=(0.5, 0.5), translate=(10.0, 20.0))
    anns = read_annotations(ANN / "bach-imagescope.xml")
    data, kwargs, kind = annotations_to_shapes(anns, scale=tuple(image.scale), translate=tuple(image.translate))
    layer = viewer.add_shapes(data, **kwargs)
    assert kind == "shapes" and len(layer.data) == len(anns) + 1  # one extra shape: the hole
    # World positions: level-0 pixel (y, x) of ImageScope -> the same place on the image.
    inv = next(i for i, a in enumerate(anns) if a.label == "Invasive carcinoma")
    world = layer.data_to_world(layer.data[inv][0])
    assert np.allclose(image.world_to_data(world), anns[inv].polygon[0] - 0.5)
    back = shapes_to_annotations(layer, image)
    assert len(back) == len(anns)
    for a, b in zip(anns, back, strict=True):
        assert b.class_name == a.class_name and b.label == a.label
        np.testing.assert_allclose(b.polygon, a.polygon, atol=1e-6)
        assert len(b.holes) == len(a.holes)
    assert list(layer.features["class"])[inv] == "Invasive carcinoma"


def test_annotate_widget_open_classify_save(viewer, qtbot, tmp_path: Path) -> None:
    from napari_bcd._widgets.annotate import AnnotateWidget

    image = viewer.open(str(SAMPLE_SLIDE), plugin="napari-bcd")[0]
    widget = AnnotateWidget(viewer)
    qtbot.addWidget(widget.native)
    widget._file_edit.value = str(ANN / "asap.xml")
    layer = widget._on_open_clicked()
    assert layer is not None and len(layer.data) == 4
    assert "unknown" not in widget._report.value and "Tumor" in widget._report.value
    assert tuple(layer.scale) == tuple(image.scale)
    # "Tumor" is a class of the file's own: the pathologist says it is invasive carcinoma.
    tumor = list(layer.features["label"]).index("Tumor")
    layer.selected_data = {tumor}
    widget._class_combo.value = "Invasive carcinoma"
    widget._on_set_class_clicked()
    assert layer.features["class"][tumor] == "Invasive carcinoma"
    assert np.allclose(layer.edge_color[tumor][:3], np.array([214, 39, 40]) / 255)
    out = widget._on_save_clicked(str(tmp_path / "out.geojson"))
    doc = json.loads(Path(out).read_text())
    feature = next(f for f in doc["features"] if f["properties"].get("name") == "Tumor")
    assert feature["properties"]["classification"] == {"name": "Invasive carcinoma", "color": [214, 39, 40]}
    back = read_annotations(out)
    # "_2" is a class of the file's own; "Tumor" is now Invasive
    assert sorted(a.class_name for a in back) == ["Benign", "Invasive", "Normal", "_2"]


def test_annotate_widget_errors_are_notifications(viewer, qtbot, monkeypatch: pytest.MonkeyPatch) -> None:
    from napari_bcd._widgets.annotate import AnnotateWidget

    messages: list[str] = []
    monkeypatch.setattr("napari_bcd._widgets._worker.show_error", messages.append)
    widget = AnnotateWidget(viewer)
    qtbot.addWidget(widget.native)
    widget._on_open_clicked()
    assert "Open the slide first" in messages[-1]
    viewer.add_image(np.zeros((8, 8, 3), np.uint8), rgb=True)
    widget._file_edit.value = str(DATA / "histolab-no-tissue.png")
    widget._on_open_clicked()
    assert "not an annotation file" in messages[-1]
    widget._on_set_class_clicked()
    assert "no Shapes layer" in messages[-1]
    assert len(viewer.layers) == 1


def test_set_class_shows_the_class_on_a_drawn_layer(viewer, qtbot) -> None:
    from napari_bcd._widgets.annotate import AnnotateWidget

    viewer.add_image(np.zeros((64, 64, 3), np.uint8), rgb=True)
    drawn = viewer.add_shapes([np.array([[2, 2], [2, 30], [30, 30], [30, 2]])], shape_type="polygon", name="drawn")
    widget = AnnotateWidget(viewer)
    qtbot.addWidget(widget.native)
    drawn.selected_data = {0}
    widget._class_combo.value = "Benign"
    widget._on_set_class_clicked()
    assert list(drawn.features["class"]) == ["Benign"]
    assert drawn.text.string.format == "{class}"  # the drawn polygon now says what it is
    assert "1 shape(s) set to Benign" in widget._report.value
