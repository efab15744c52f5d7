"""The Review dock (issues 13 and 26): paint corrections, retrain, Undo; thresholds; uncertain regions; region table;
Grad-CAM; and every view of the map following each change (one class map, one truth)."""

from __future__ import annotations

import json
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
    assert cm.model_path == str(parent)  # a loaded model names its checkpoint on the map
    dock.show_result(cm, image.name, tuple(image.translate[-2:]))
    review = ReviewWidget(viewer)
    qtbot.addWidget(review.native)
    return viewer, dock, review, cm, parent


def _block(cm) -> tuple[int, int, int]:
    """A 2 x 2 block of classified cells of one class, and another class to paint it."""
    cov = cm.labels > 0
    r, c = next((r, c) for r, c in np.argwhere(cov) if cov[r : r + 2, c : c + 2].all()
                and len(set(cm.labels[r : r + 2, c : c + 2].ravel())) == 1)
    return int(r), int(c), 1 + int(cm.labels[r, c]) % 4


def _paint_block(layer, cm, r: int, c: int, label: int) -> None:
    """napari's polygon-fill tool over a 2 x 2 block of cells (in the layer's data coordinates)."""
    k = layer.metadata["napari_bcd"]["downsample"]
    sy, sx = cm.grid.stride_px
    y0, x0 = r * sy / k + 1, c * sx / k + 1
    y1, x1 = (r + 2) * sy / k - 2, (c + 2) * sx / k - 2
    layer.paint_polygon(np.array([[y0, x0], [y0, x1], [y1, x1], [y1, x0]]), label)


def _wait(qtbot, review, timeout: int = 120_000) -> None:
    qtbot.waitUntil(lambda: review.jobs.worker is None, timeout=timeout)


def _views_agree_with_the_layer(viewer, dock, tmp_path: Path, tag: str) -> None:
    """Summary, legend, hover and the three exports describe exactly what the layer shows."""
    import tifffile
    from shapely.geometry import shape

    from napari_bcd.summary import summarize

    layer = dock._layer
    raster = np.asarray(layer.data)
    shown = dock.shown
    mpp = shown.grid.mpp[0]
    assert layer.metadata["napari_bcd"]["downsample"] == 1  # the sample is pixel-exact: areas compare exactly
    px_mm2 = mpp * mpp / 1e6
    counts = np.bincount(raster.ravel(), minlength=6)
    summary = summarize(shown)
    for c in summary.classes:
        k = shown.classes.index(c.name) + 1
        # the summary's area is the cells' area; the layer's is the same cells cut at the slide's edge
        assert c.area_mm2 == pytest.approx(counts[k] * px_mm2, rel=0.02, abs=1e-3)
    assert dock._summary.value == summary.table(compact=True)
    legend = {box.text(): box for box in dock._legend._boxes.values()}
    assert set(legend) == {c.display_name for c in summary.classes}
    # the label TIFF is the layer, pixel for pixel
    tif = dock.export("labels", str(tmp_path / f"{tag}.labels.tif"))
    assert np.array_equal(tifffile.imread(tif), raster)
    # the GeoJSON's classes and areas are the layer's
    from napari_bcd.classes import class_id

    doc = json.loads(Path(dock.export("geojson", str(tmp_path / f"{tag}.geojson"))).read_text())
    assert {class_id(f["properties"]["classification"]["name"]) for f in doc["features"]} == {
        class_id(shown.classes[k - 1]) for k in range(1, len(shown.classes) + 1) if counts[k]}

    for f in doc["features"]:
        k = shown.classes.index(next(n for n in shown.classes
                                     if class_id(n) == class_id(f["properties"]["classification"]["name"]))) + 1
        # cell edges fall between pixels (a stride of 200.4 px): polygon and raster differ by under a pixel per
        # pixel of edge, and by nothing else
        geom = shape(f["geometry"])
        assert abs(geom.area - counts[k]) <= 0.5 * geom.length
    # the CSV names the rule in force and the layer's areas
    csv = Path(dock.export("summary_csv", str(tmp_path / f"{tag}.csv"))).read_text().splitlines()
    assert all(line.endswith(summary.decision) for line in csv[1:])
    # hover over every repainted cell names the class the layer shows there
    from napari_bcd.classes import class_styles

    names = {st.label: st.display_name for st in class_styles(shown.classes)}
    state = dock._store.state
    g = shown.grid
    for r, c in list(state.corrected)[:4]:
        cy, cx = g.origin_px[0] + (r + 0.5) * g.stride_px[0], g.origin_px[1] + (c + 0.5) * g.stride_px[1]
        viewer.cursor.position = (cy * mpp, cx * mpp)
        dock._map.on_mouse_move(viewer, None)
        assert dock._hover.value.startswith(names[int(raster[int(cy), int(cx)])])


def test_paint_retrain_undo_and_every_view_follows(reviewed, qtbot, tmp_path: Path) -> None:
    from napari_bcd._widgets._maplayer import flush_paint, store_of

    viewer, dock, review, cm, parent = reviewed
    layer = review._map_combo.value
    store = store_of(layer)
    assert layer is viewer.layers[f"{viewer.layers[0].name} classes"] and layer is dock._layer
    assert "1 Normal" in review.correct._paint_help.value and "5 uncertain" in review.correct._paint_help.value
    r, c, target = _block(cm)
    _paint_block(layer, cm, r, c, target)
    flush_paint(layer)  # what the brush resting does
    assert review.correct._corr_label.value.startswith("Retrain learns from 4 repainted cell(s)")
    assert len(store.state.corrected) == 4
    _views_agree_with_the_layer(viewer, dock, tmp_path, "painted")  # the Classify dock sees the paint too
    review.correct.retrain()
    _wait(qtbot, review)
    if review.correct._pending:  # a random tiny model may change much of the slide: the user says yes here
        review.correct.decide(True)
    new_map = store.state.class_map
    assert new_map.model_path.endswith("tiny-r1.safetensors") and (parent.parent / "tiny-r1.safetensors").is_file()
    assert (store.state.shown.labels[r : r + 2, c : c + 2] == target).all(), review._status.value
    assert "tiny-r1.safetensors" in review._status.value
    assert Path(dock._model_path()).name == "tiny-r1.safetensors"  # the Classify dock uses the new model
    _views_agree_with_the_layer(viewer, dock, tmp_path, "retrained")
    assert review.correct._undo_button.enabled
    review.correct.undo()  # the parent model and its map, the painting kept
    assert store.state.class_map is cm and len(store.state.corrected) == 4
    assert np.array_equal(layer.data, _render(store.state)) and Path(dock._model_path()) == parent
    assert not review.correct._undo_button.enabled


def _render(state) -> np.ndarray:
    from napari_bcd.layers import classmap_layers

    return classmap_layers(state.shown, state.image, state.translate)[0][0]


def test_apply_keeps_the_corrections_and_the_exports_follow(reviewed, tmp_path: Path) -> None:
    from napari_bcd._widgets._maplayer import flush_paint
    from napari_bcd.review import uncertainty

    viewer, dock, review, cm, _parent = reviewed
    layer = review._map_combo.value
    r, c, target = _block(cm)
    _paint_block(layer, cm, r, c, target)
    flush_paint(layer)
    conf = 1 - uncertainty(cm.probs, "margin")
    cut = float(np.ceil(np.nanmedian(conf[cm.labels > 0]) * 100) / 100)  # about half the cells below it
    review.rule._measure_combo.value = "margin (top two)"
    review.rule._conf_spin.value = cut
    review.rule.apply()
    state = dock._store.state
    assert len(state.corrected) == 4 and (state.shown.labels[r : r + 2, c : c + 2] == target).all()
    assert (state.class_map.labels == cm.uncertain_label).sum() > 0
    assert review.correct._corr_label.value.startswith("Retrain learns from 4 repainted cell(s)")
    assert "4 repainted cell(s) kept as painted" in review._status.value
    assert np.array_equal(layer.data, _render(state))
    _views_agree_with_the_layer(viewer, dock, tmp_path, "applied")
    assert f"uncertain below confidence {cut:.2f} (margin)" in dock._summary.value
    review.correct.undo()  # Apply is undone like a retrain
    assert dock._store.state.class_map is cm and len(dock._store.state.corrected) == 4


def test_thresholds_uncertain_regions_and_grad_cam_on_the_slide(reviewed, qtbot) -> None:
    from napari_bcd.review import uncertainty

    viewer, _dock, review, cm, _parent = reviewed
    conf = 1 - uncertainty(cm.probs, "margin")
    review.rule._conf_spin.value = float(np.ceil(np.nanmedian(conf[cm.labels > 0]) * 100) / 100)
    review.rule.apply()
    assert review.rule.regions and "uncertainty" in review.rule._regions_text.value
    review.rule.go_to(0)
    region = review.rule.regions[0]
    my, mx = cm.grid.mpp
    assert viewer.camera.center[-2:] == pytest.approx((region.centre_px[0] * my, region.centre_px[1] * mx))
    viewer.reset_view()  # the whole slide and glass around it in view
    review.rule.index = -1
    review.explain.explain(box=(-500.0, -500.0, 900.0, 900.0))  # a box off the slide's corner
    _wait(qtbot, review)
    cam = viewer.layers[f"{viewer.layers[0].name} Grad-CAM"]
    assert cam.data.ndim == 2 and np.isfinite(cam.data).all() and "Grad-CAM" in review._status.value
    (y0, x0), (y1, x1) = cam.extent.world[0][-2:], cam.extent.world[1][-2:]
    image = viewer.layers[0]
    (iy0, ix0), (iy1, ix1) = image.extent.world[0][-2:], image.extent.world[1][-2:]
    assert y0 >= iy0 - my and x0 >= ix0 - mx and y1 <= iy1 + my and x1 <= ix1 + mx  # never past the slide


def test_region_table_follows_the_shapes_and_unclassified_has_no_class(reviewed, tmp_path) -> None:
    viewer, _dock, review, _cm, _parent = reviewed
    image = viewer.layers[0]
    my, mx = image.scale[-2:]
    shapes = viewer.add_shapes([np.array([[100, 100], [100, 600], [700, 600], [700, 100]]) * (my, mx)],
                               shape_type="polygon", name="regions", units=("µm", "µm"))
    assert review.regions._shapes_combo.value is None  # never chosen for the user
    review.regions._shapes_combo.value = shapes
    rows = review.regions.update_table()
    assert len(rows) == 1 and review.regions._table.rowCount() == 1
    assert rows[0].area_mm2 == pytest.approx(600 * 500 * my * mx / 1e6, rel=1e-3)
    shapes.add_rectangles(np.array([[1000, 1000], [1500, 1800]]) * (my, mx))
    assert review.regions._table.rowCount() == 2  # updated as the shapes changed
    csv_path = review.regions.export("csv", str(tmp_path / "r.csv"))
    assert Path(csv_path).read_text().count("\n") == 3
    doc = json.loads(Path(review.regions.export("geojson", str(tmp_path / "r.geojson"))).read_text())
    assert "Area mm^2" in doc["features"][0]["properties"]["measurements"]
    assert all("classification" not in f["properties"] for f in doc["features"])  # unclassified: no class


def test_only_the_shapes_layer_you_choose_becomes_corrections(reviewed) -> None:
    from napari_bcd.annotations import Annotation
    from napari_bcd.annotations.napari import annotations_to_shapes

    viewer, _dock, review, cm, _parent = reviewed
    image = viewer.layers[0]
    r, c = np.argwhere(cm.labels > 0)[0]
    new = 1 + int(cm.labels[r, c]) % 4
    y0, x0, h, w = cm.grid.window_box(int(r), int(c))
    ann = Annotation(cm.classes[new - 1], new, np.array([[y0 + 5, x0 + 5], [y0 + 5, x0 + w - 5],
                                                          [y0 + h - 5, x0 + w - 5], [y0 + h - 5, x0 + 5]]))
    data, kw, _ = annotations_to_shapes([ann], scale=tuple(image.scale[-2:]), name="training regions",
                                        units=tuple(str(u) for u in image.units[-2:]))
    shapes = viewer.add_shapes(data, **{k: v for k, v in kw.items() if k != "metadata"})
    # a classified Shapes layer appeared (the Train dock's regions): nothing is learnt from it unasked
    assert review.correct._shapes_combo.value is None
    assert len(review.correct.learning().corrections) == 0
    assert review.correct._corr_label.value.startswith("Retrain learns from nothing yet")
    review.correct._shapes_combo.value = shapes
    learnt = review.correct.learning()
    assert [(x.row, x.col, x.new) for x in learnt.corrections.cells] == [(int(r), int(c), cm.classes[new - 1])]
    assert review.correct._corr_label.value.startswith(
        "Retrain learns from 1 cell(s) under the classified shapes of 'training regions'")


def test_a_new_model_that_changes_much_of_the_slide_waits_for_the_user(reviewed, qtbot, monkeypatch) -> None:
    import napari_bcd.review.retrain as retrain
    from napari_bcd._widgets._maplayer import flush_paint

    # as when the held-out windows outside the corrections change much (the sample is too small to hold many out)
    monkeypatch.setattr(retrain.RetrainResult, "warning", property(
        lambda self: "The new model changes the class of about 40% of the slide outside your corrections."))
    _viewer, dock, review, cm, parent = reviewed
    layer = review._map_combo.value
    r, c, target = _block(cm)
    _paint_block(layer, cm, r, c, target)
    flush_paint(layer)
    review.correct.retrain()
    _wait(qtbot, review)
    assert review.correct._pending is not None
    assert review.correct._use_button.native.isVisibleTo(review.native)
    assert "outside your corrections" in review._status.value
    assert dock._store.state.class_map is cm and Path(dock._model_path()) == parent  # not used yet
    review.correct.decide(False)
    assert dock._store.state.class_map is cm and Path(dock._model_path()) == parent
    assert "saved but not used" in review._status.value
    assert not review.correct._use_button.native.isVisibleTo(review.native)


def test_painting_is_counted_once_the_brush_rests(reviewed, qtbot) -> None:
    from napari_bcd._widgets._maplayer import PAINT_DELAY_MS, store_of

    _viewer, _dock, review, cm, _parent = reviewed
    layer = review._map_combo.value
    store = store_of(layer)
    r, c, target = _block(cm)
    counted = []
    store.listen(lambda state, reason: counted.append(len(state.corrected)) if reason == "paint" else None)
    for _ in range(5):  # five strokes in a row: no count between them
        _paint_block(layer, cm, r, c, target)
    assert counted == [] and store.state.corrected == {}
    qtbot.wait(PAINT_DELAY_MS * 3)
    assert counted == [4]  # one count, of the cells under the strokes
