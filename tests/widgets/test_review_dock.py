"""The Review dock (issue 13): paint corrections, retrain, Undo; thresholds; uncertain regions; region table;
Grad-CAM."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest

from conftest import SAMPLE_SLIDE


@pytest.fixture
def viewer(make_napari_viewer):
    return make_napari_viewer()


@pytest.fixture
def reviewed(viewer, qtbot, tiny_checkpoint: Path, tmp_path: Path):
    """The sample slide classified by a copy of the tiny model, shown by the Classify dock, and the Review dock."""
    from napari_bcd import classify, open_slide
    from napari_bcd._widgets.classify import ClassifyWidget
    from napari_bcd._widgets.review import ReviewWidget  # before timm: the LLVM guard
    from napari_bcd.model import load_checkpoint

    parent = Path(shutil.copy(tiny_checkpoint, tmp_path / "tiny.safetensors"))
    shutil.copy(tiny_checkpoint.with_suffix(".json"), tmp_path / "tiny.json")
    image = viewer.open(str(SAMPLE_SLIDE), plugin="napari-bcd")[0]
    dock = ClassifyWidget(viewer)
    qtbot.addWidget(dock.native)
    dock.use_model(parent)
    with open_slide(SAMPLE_SLIDE) as slide:
        cm = classify(slide, load_checkpoint(parent))
    cm.model_path = str(parent)
    dock.show_result(cm, image.name, tuple(image.translate[-2:]))
    review = ReviewWidget(viewer)
    qtbot.addWidget(review.native)
    return viewer, dock, review, cm, parent


def _paint_block(layer, cm, r: int, c: int, label: int) -> None:
    """napari's polygon-fill tool over a 2 x 2 block of cells (in the layer's data coordinates)."""
    k = layer.metadata["napari_bcd"]["downsample"]
    sy, sx = cm.grid.stride_px
    y0, x0 = r * sy / k + 1, c * sx / k + 1
    y1, x1 = (r + 2) * sy / k - 2, (c + 2) * sx / k - 2
    layer.paint_polygon(np.array([[y0, x0], [y0, x1], [y1, x1], [y1, x0]]), label)


def test_paint_retrain_and_undo(reviewed, qtbot) -> None:
    viewer, dock, review, cm, parent = reviewed
    layer = review._map_combo.value
    assert layer is viewer.layers[f"{viewer.layers[0].name} classes"]
    assert "1 Normal" in review._paint_help.value and "5 uncertain" in review._paint_help.value
    original = np.array(layer.data, copy=True)
    cov = cm.labels > 0
    r, c = next((r, c) for r, c in np.argwhere(cov) if cov[r : r + 2, c : c + 2].all()
                and len(set(cm.labels[r : r + 2, c : c + 2].ravel())) == 1)
    target = 1 + int(cm.labels[r, c]) % 4
    _paint_block(layer, cm, r, c, target)
    assert review._corr_label.value.startswith("4 corrected cell(s)")
    painted = np.array(layer.data, copy=True)
    assert not np.array_equal(painted, original)
    review.retrain()
    qtbot.waitUntil(lambda: review._worker is None, timeout=120_000)
    new_map = layer.metadata["napari_bcd"]["class_map"]
    assert (new_map.labels[r : r + 2, c : c + 2] == target).all(), review._status.value
    assert "tiny-r1.safetensors" in review._status.value and (parent.parent / "tiny-r1.safetensors").is_file()
    assert Path(dock._model_path()).name == "tiny-r1.safetensors"  # the Classify dock uses the new model
    assert review._undo_button.enabled
    review.undo()  # the parent model, and the layer as it was when Retrain was pressed (the painting kept)
    assert np.array_equal(layer.data, painted) and layer.metadata["napari_bcd"]["class_map"] is cm
    assert Path(dock._model_path()) == parent
    assert not review._undo_button.enabled


def test_thresholds_uncertain_regions_and_grad_cam(reviewed, qtbot) -> None:
    viewer, _dock, review, cm, _parent = reviewed
    layer = review._map_combo.value
    from napari_bcd.review import uncertainty

    conf = 1 - uncertainty(cm.probs, "margin")
    cut = float(np.ceil(np.nanmedian(conf[cm.labels > 0]) * 100) / 100)  # about half the cells below it
    review._measure_combo.value = "margin (top two)"
    review._conf_spin.value = cut
    review.apply_rule()
    shown = layer.metadata["napari_bcd"]["class_map"]
    assert (shown.labels == cm.uncertain_label).sum() > 0
    assert (np.asarray(layer.data) == cm.uncertain_label).any()
    assert f"uncertain below confidence {cut:.2f} (margin)" in review._status.value
    assert review._regions and "uncertainty" in review._regions_text.value
    review.go_to(0)
    region = review._regions[0]
    my, mx = shown.grid.mpp
    assert viewer.camera.center[-2:] == pytest.approx((region.centre_px[0] * my, region.centre_px[1] * mx))
    review.explain()
    qtbot.waitUntil(lambda: review._worker is None, timeout=120_000)
    cam = viewer.layers[f"{viewer.layers[0].name} Grad-CAM"]
    assert cam.data.ndim == 2 and np.isfinite(cam.data).all() and "Grad-CAM" in review._status.value


def test_region_table_follows_the_shapes(reviewed, tmp_path) -> None:
    import json

    viewer, _dock, review, _cm, _parent = reviewed
    image = viewer.layers[0]
    my, mx = image.scale[-2:]
    shapes = viewer.add_shapes([np.array([[100, 100], [100, 600], [700, 600], [700, 100]]) * (my, mx)],
                               shape_type="polygon", name="regions", units=("µm", "µm"))
    review._shapes_combo.value = shapes
    rows = review.update_table()
    assert len(rows) == 1 and review._table.rowCount() == 1
    assert rows[0].area_mm2 == pytest.approx(600 * 500 * my * mx / 1e6, rel=1e-3)
    shapes.add_rectangles(np.array([[1000, 1000], [1500, 1800]]) * (my, mx))
    assert review._table.rowCount() == 2  # updated as the shapes changed
    csv_path = review.export_table("csv", str(tmp_path / "r.csv"))
    assert Path(csv_path).read_text().count("\n") == 3
    geo = review.export_table("geojson", str(tmp_path / "r.geojson"))
    doc = json.loads(Path(geo).read_text())
    assert "Area mm^2" in doc["features"][0]["properties"]["measurements"]


def test_classified_shapes_are_corrections_too(reviewed) -> None:
    from napari_bcd.annotations import Annotation
    from napari_bcd.annotations.napari import annotations_to_shapes

    viewer, _dock, review, cm, _parent = reviewed
    image = viewer.layers[0]
    r, c = np.argwhere(cm.labels > 0)[0]
    new = 1 + int(cm.labels[r, c]) % 4
    y0, x0, h, w = cm.grid.window_box(int(r), int(c))
    ann = Annotation(cm.classes[new - 1], new, np.array([[y0 + 5, x0 + 5], [y0 + 5, x0 + w - 5],
                                                          [y0 + h - 5, x0 + w - 5], [y0 + h - 5, x0 + 5]]))
    data, kw, _ = annotations_to_shapes([ann], scale=tuple(image.scale[-2:]), name="fixes",
                                        units=tuple(str(u) for u in image.units[-2:]))
    shapes = viewer.add_shapes(data, **{k: v for k, v in kw.items() if k != "metadata"})
    review._shapes_combo.value = shapes
    corr = review.corrections()
    assert [(x.row, x.col, x.new) for x in corr.cells] == [(int(r), int(c), cm.classes[new - 1])]
    assert review._corr_label.value.startswith("1 corrected cell(s)")
