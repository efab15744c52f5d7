"""The napari plugin: manifest, reader, sample, writers, and the Classify dock widget end to end."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from conftest import DATA, SAMPLE_SLIDE
from napari_bcd._reader import napari_get_reader

WIDGET = "Classify slide"


def test_manifest_validates() -> None:
    exe = Path(sys.executable).with_name("npe2")
    res = subprocess.run([str(exe), "validate", "napari-bcd"], capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stdout + res.stderr
    from npe2 import PluginManager

    pm = PluginManager.instance()
    pm.discover()
    mf = pm.get_manifest("napari-bcd")
    assert [w.display_name for w in mf.contributions.widgets] == [
        WIDGET, "Train from annotations", "Review and retrain", "Annotations: open and save"
    ]
    assert mf.contributions.sample_data[0].display_name == (
        "H&E slide, CMU-1 small region (Aperio, 20x; not breast: for trying the tools)")
    assert {tuple(w.layer_types) for w in mf.contributions.writers} == {("labels",), ("shapes",)}


def test_reader_gives_a_lazy_rgb_layer_in_microns() -> None:
    reader = napari_get_reader(str(SAMPLE_SLIDE))
    assert callable(reader)
    (data, kwargs, kind), = reader(str(SAMPLE_SLIDE))
    assert kind == "image" and kwargs["rgb"] is True
    assert kwargs["scale"] == pytest.approx((0.499, 0.499))
    assert kwargs["name"] == "CMU-1-Small-Region"
    assert data.shape == (2967, 2220, 3)  # a dask array: nothing read yet
    assert type(data).__name__ == "Array"


def test_reader_declines_what_it_cannot_read(tmp_path: Path) -> None:
    (tmp_path / "notes.svs").write_text("not a slide")
    assert napari_get_reader(str(tmp_path / "notes.svs")) is None
    import tifffile

    tifffile.imwrite(tmp_path / "mask.tif", np.zeros((32, 32), np.uint8))  # grayscale: someone else's
    assert napari_get_reader(str(tmp_path / "mask.tif")) is None


@pytest.fixture
def viewer(make_napari_viewer):
    return make_napari_viewer()


def test_open_and_sample_in_a_viewer(viewer) -> None:
    layers = viewer.open(str(SAMPLE_SLIDE), plugin="napari-bcd")
    assert layers[0].rgb and tuple(layers[0].scale) == pytest.approx((0.499, 0.499))
    sample = viewer.open_sample("napari-bcd", "cmu_small_region")
    assert sample[0].data.shape == (2967, 2220, 3)


def test_dock_widget_is_wired(viewer) -> None:
    from napari_bcd._widgets.classify import ClassifyWidget

    _, widget = viewer.window.add_plugin_dock_widget("napari-bcd", WIDGET)
    assert isinstance(widget, ClassifyWidget)


def _widget(viewer, qtbot, checkpoint: Path | None):
    from napari_bcd._widgets.classify import ClassifyWidget

    widget = ClassifyWidget(viewer)
    qtbot.addWidget(widget.native)
    if checkpoint is not None:
        widget._model_edit.value = str(checkpoint)
    return widget


def _run(widget, qtbot, timeout: int = 120_000) -> None:
    widget._on_run_clicked()
    qtbot.waitUntil(lambda: widget._worker is None, timeout=timeout)


def test_classify_end_to_end_aligned(viewer, qtbot, tiny_checkpoint: Path, tmp_path: Path) -> None:
    image = viewer.open(str(SAMPLE_SLIDE), plugin="napari-bcd")[0]
    _, widget = viewer.window.add_plugin_dock_widget("napari-bcd", WIDGET)
    widget._model_edit.value = str(tiny_checkpoint)
    viewer.window.resize(1400, 900)
    assert widget._image_combo.value is image  # the current layer by default
    assert "tiny" in widget._card_label.value and "Normal, Benign, InSitu, Invasive" in widget._card_label.value
    widget._probs_check.value = True
    _run(widget, qtbot)
    labels = viewer.layers["CMU-1-Small-Region classes"]
    assert labels.data.max() > 0
    assert labels.colormap.map(0)[-1] == 0  # background transparent
    assert [layer.name for layer in viewer.layers if "p(" in layer.name] == [
        f"CMU-1-Small-Region p({c})" for c in ("Normal", "Benign", "InSitu", "Invasive")
    ]
    class_map = widget.shown
    g = class_map.grid
    # Alignment: at the centre of each classified cell (on the image), the layer shows that cell's class.
    H, W = class_map.slide_shape
    for r, c in np.argwhere(class_map.labels > 0)[:12]:
        cy, cx = g.origin_px[0] + (r + 0.5) * g.stride_px[0], g.origin_px[1] + (c + 0.5) * g.stride_px[1]
        if cy >= H or cx >= W:
            continue
        world = image.data_to_world((cy - 0.5, cx - 0.5))  # level-0 continuous -> image pixel-centre coordinates
        iy, ix = (int(round(v)) for v in labels.world_to_data(world))
        assert labels.data[iy, ix] == class_map.labels[r, c]
    # Clipped to the image: the class map ends where the slide ends (it used to overhang by a third of a window).
    (iy0, ix0), (iy1, ix1) = image.extent.world[0][-2:], image.extent.world[1][-2:]
    (ly0, lx0), (ly1, lx1) = labels.extent.world[0][-2:], labels.extent.world[1][-2:]
    assert iy0 - 1e-6 <= ly0 and ix0 - 1e-6 <= lx0 and ly1 <= iy1 + 1e-6 and lx1 <= ix1 + 1e-6
    assert labels.data.shape == (int(H), int(W))  # pixel-exact on the sample
    assert widget._call.value.startswith("<b>Slide call:")
    run = class_map.run
    assert f"Done: {class_map.n_windows} windows" in widget._status.value
    assert f"{run.precision} on {run.device}" in widget._status.value  # how it ran (auto: bf16 checked, or fp32)
    # Hover: the class and probabilities of the window under the mouse.
    r, c = np.argwhere(class_map.window_done)[0]
    cy, cx = g.origin_px[0] + (r + 0.5) * g.stride_px[0], g.origin_px[1] + (c + 0.5) * g.stride_px[1]
    viewer.cursor.position = tuple(image.data_to_world((cy - 0.5, cx - 0.5)))
    widget._map.on_mouse_move(viewer, None)
    assert "(Nor " in widget._hover.value
    # Exports.
    for kind, suffix in (("geojson", ".geojson"), ("summary_csv", ".csv"), ("labels", ".tif")):
        out = widget.export(kind, str(tmp_path / f"export{suffix}"))
        assert out and Path(out).stat().st_size > 0
    assert json.loads((tmp_path / "export.geojson").read_text())["type"] == "FeatureCollection"
    # A screenshot of what the user sees (look at it: NAPARI_BCD_SCREENSHOTS=dir keeps a copy).
    from imageio.v3 import imwrite

    for layer in viewer.layers:
        layer.visible = "p(" not in layer.name  # the class map over the slide
    viewer.reset_view()

    shot = viewer.screenshot(canvas_only=False, flash=False)
    assert shot.shape[-1] in (3, 4) and shot[..., :3].std() > 10
    imwrite(tmp_path / "classified.png", shot)
    if os.environ.get("NAPARI_BCD_SCREENSHOTS"):
        shutil.copy(tmp_path / "classified.png", Path(os.environ["NAPARI_BCD_SCREENSHOTS"]) / "classified.png")


def test_rerun_replaces_the_result(viewer, qtbot, tiny_checkpoint: Path) -> None:
    viewer.open(str(SAMPLE_SLIDE), plugin="napari-bcd")
    widget = _widget(viewer, qtbot, tiny_checkpoint)
    _run(widget, qtbot)
    first = viewer.layers["CMU-1-Small-Region classes"].data.copy()
    first_cells = widget.shown.grid.n_cells
    cache = widget._controller.cache
    predictor = cache._loaded.predictor
    widget._overlap_combo.value = "50 %"
    _run(widget, qtbot)
    # the same model on the same device: the Predictor is kept (a compiled model compiles once, not per run)
    assert cache._loaded.predictor is predictor and widget.shown.info["decode"] == "cpu"
    assert [layer.name for layer in viewer.layers].count("CMU-1-Small-Region classes") == 1
    # the slide, its classes and what quality control left out (the bundled slide's teal margin dye), each once
    assert [layer.name for layer in viewer.layers] == ["CMU-1-Small-Region", "CMU-1-Small-Region classes",
                                                       "CMU-1-Small-Region quality control"]
    assert widget.shown.grid.n_cells != first_cells  # finer cells
    assert not np.array_equal(viewer.layers["CMU-1-Small-Region classes"].data, first)  # the layer took them
    widget._device_combo.value = "cpu"  # another device setting: a new Predictor
    _run(widget, qtbot)
    assert cache._loaded.predictor is not predictor and cache._loaded.predictor.model is predictor.model


def test_cancel_mid_run_leaves_the_viewer_clean(viewer, qtbot, tiny_checkpoint: Path) -> None:
    viewer.open(str(SAMPLE_SLIDE), plugin="napari-bcd")
    widget = _widget(viewer, qtbot, tiny_checkpoint)
    widget._overlap_combo.value = "75 %"
    widget._batch_spin.value = 1
    seen = []

    def on_progress(p):
        if getattr(p, "stage", None) is None:
            return  # "Loading the model…" and other steps
        seen.append(p)
        if p.stage == "classify" and p.done >= 1 and widget._worker is not None:
            widget.cancel()

    widget._on_progress = on_progress  # type: ignore[method-assign]
    _run(widget, qtbot)
    done = [p.done for p in seen if p.stage == "classify"]
    total = next(p.total for p in seen if p.stage == "classify")
    assert done and max(done) < total  # stopped early
    assert len(viewer.layers) == 1  # no half-made result
    assert "cancelled" in widget._status.value
    assert widget._run_button.enabled and not widget._cancel_button.enabled


def test_errors_become_notifications(viewer, qtbot, tiny_checkpoint: Path, monkeypatch: pytest.MonkeyPatch,
                                     tmp_path: Path) -> None:
    messages: list[str] = []
    monkeypatch.setattr("napari_bcd._widgets._worker.show_error", messages.append)
    widget = _widget(viewer, qtbot, tiny_checkpoint)
    widget._on_run_clicked()  # no image at all
    assert "Open an H&E image" in messages[-1]
    from PIL import Image

    rgb = np.asarray(Image.open(DATA / "stardist-histo-500x300.jpg"))
    viewer.add_image(rgb, name="dragged png", rgb=True)  # no scale: the widget must ask for mpp
    widget._on_run_clicked()
    assert "no pixel size" in messages[-1] and "µm / pixel" in messages[-1]
    widget._mpp.edit.value = 0.05  # 15 x 25 µm: smaller than one window
    _run(widget, qtbot)  # the model loads in the worker, and the engine refuses there
    assert "smaller than one model window" in messages[-1]
    assert "smaller than one model window" in widget._status.value
    bad = tmp_path / "bad.safetensors"
    bad.write_text("junk")
    widget._model_edit.value = str(bad)
    widget._on_run_clicked()
    assert "safetensors" in messages[-1] or "card" in messages[-1]
    assert len(viewer.layers) == 1 and widget._worker is None
    # A PNG with its mpp set runs fine.
    widget._model_edit.value = str(tiny_checkpoint)
    widget._mpp.edit.value = 1.0
    _run(widget, qtbot)
    assert "dragged png classes" in viewer.layers


def test_writers_round_trip(viewer, tmp_path: Path) -> None:
    import tifffile

    from napari_bcd._writer import write_geojson_labels, write_geojson_shapes
    from napari_bcd.annotations import Annotation
    from napari_bcd.annotations.napari import annotations_to_shapes

    labels = np.zeros((4, 5), np.uint8)
    labels[1:3, 1:4] = 4
    labels[0, 0] = 1
    layer = viewer.add_labels(labels, scale=(100.0, 100.0), translate=(50.0, 50.0),
                              metadata={"napari_bcd": {"image_mpp": [0.5, 0.5],
                                                       "classes": ["Normal", "Benign", "InSitu", "Invasive"]}})
    paths = layer.save(str(tmp_path / "labels.tif"), plugin="napari-bcd")
    back = tifffile.TiffFile(paths[0])
    assert np.array_equal(back.asarray(), labels)
    x = back.pages[0].tags["XResolution"].value
    assert x[0] / x[1] == pytest.approx(1e4 / 100.0)  # px per cm at 100 µm/px
    back.close()
    write_geojson_labels(str(tmp_path / "labels.geojson"), labels, layer._get_state())
    doc = json.loads((tmp_path / "labels.geojson").read_text())
    names = sorted(f["properties"]["classification"]["name"] for f in doc["features"])
    assert names == ["Invasive carcinoma", "Normal"]  # one name per class, as "Set class" writes it
    from shapely.geometry import shape

    inv = next(f for f in doc["features"] if f["properties"]["classification"]["name"] == "Invasive carcinoma")
    # Cells (1..2, 1..3) of 100 µm centred at 50 + 100 i µm span 100..300 x 100..400 µm of world. Image pixel
    # i is centred at 0.5 i µm, and pixel i spans [i, i + 1) in QuPath's coordinates: world w -> w / 0.5 + 0.5.
    assert shape(inv["geometry"]).bounds == pytest.approx((200.5, 200.5, 800.5, 600.5))
    ann = [Annotation("Benign", "Benign", np.array([[10, 10], [10, 50], [60, 50]]))]
    data, kwargs, _ = annotations_to_shapes(ann, scale=(0.5, 0.5))
    shapes = viewer.add_shapes(data, **{k: v for k, v in kwargs.items() if k != "metadata"})
    write_geojson_shapes(str(tmp_path / "shapes.geojson"), shapes.data, shapes._get_state())
    doc = json.loads((tmp_path / "shapes.geojson").read_text())
    assert doc["features"][0]["properties"]["classification"]["name"] == "Benign"
    assert doc["features"][0]["geometry"]["coordinates"][0][:3] == [[10, 10], [50, 10], [50, 60]]


def test_train_widget_trains_and_hands_the_model_over(viewer, qtbot, tmp_path: Path) -> None:
    from napari_bcd._widgets.train import TrainWidget  # first: its guard keeps Triton's LLVM away from Mesa's

    import timm  # isort: skip
    from safetensors.torch import save_file

    from conftest import two_kinds_dataset
    from napari_bcd.config import default_model_path

    folder = two_kinds_dataset(tmp_path / "ds", n=10)
    save_file(timm.create_model("resnet18", pretrained=False).state_dict(), tmp_path / "r18.safetensors")
    _, classify = viewer.window.add_plugin_dock_widget("napari-bcd", WIDGET)
    widget = TrainWidget(viewer)
    qtbot.addWidget(widget.native)
    widget._source_combo.value = "ICIAR folder"
    widget._folder_edit.value = str(folder)
    widget._out_edit.value = str(tmp_path / "trained.safetensors")
    widget._backbone_edit.value = "timm:resnet18"
    widget._weights_combo.value = "a file"
    widget._weights_edit.value = str(tmp_path / "r18.safetensors")
    assert widget._pixels_label.value == "the backbone's default"
    widget._epochs_spin.value = 3
    widget._batch_spin.value = 16
    widget._on_run_clicked()
    qtbot.waitUntil(lambda: widget._worker is None, timeout=180_000)
    # no patient is known for these images: cross-validation over images tunes the simple classifier, which is
    # what ships (said, with why), and the figure is said plainly to be optimistic
    assert widget._plot.epochs and all(e.step == 0 for e in widget._plot.epochs)
    # no head steps to draw: the plot shows what decided the model, the simple classifier's curve over C, the chosen
    # one marked (it drew empty step axes before)
    t = widget._result.tuning
    assert widget._plot.tuning is t and widget._plot.ax_loss.get_xscale() == "log"
    assert f"chosen: {t.chosen:g})" in widget._plot.ax_loss.get_xlabel()
    assert list(widget._plot.ax_loss.lines[0].get_xdata()) == list(t.grid)
    assert "macro avg" in widget._report.value and "confusion matrix" in widget._report.value
    assert "simple classifier" in widget._report.value and "chance" in widget._verdict.value
    assert "optimistic" in widget._verdict.value and "cannot be trusted to choose" in widget._verdict.value
    assert widget._use_button.enabled
    widget._on_use_clicked()
    assert default_model_path() == (tmp_path / "trained.safetensors").resolve()
    assert classify._model_edit.value == tmp_path / "trained.safetensors"
    assert "trained" in classify._card_label.value


def test_headless_demo_writes_outputs_and_a_screenshot(tmp_path: Path, tiny_checkpoint: Path, capsys,
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    from napari_bcd._widgets.classify import ClassifyWidget
    from napari_bcd.demo import run_demo

    shown = []
    show = ClassifyWidget.show_result

    def seen(self, class_map, *args, **kwargs):  # what the dock says about the model when the map appears
        shown.append((self._model_path(), self._card.name if self._card else None, class_map.model_name))
        return show(self, class_map, *args, **kwargs)

    monkeypatch.setattr(ClassifyWidget, "show_result", seen)
    assert run_demo(model=str(tiny_checkpoint), headless=True, out=str(tmp_path / "demo")) == 0
    names = {p.name for p in (tmp_path / "demo").iterdir()}
    assert {"CMU-1-Small-Region.overview.png", "CMU-1-Small-Region.screenshot.png",
            "CMU-1-Small-Region.geojson", "CMU-1-Small-Region.summary.json"} <= names
    assert "slide call:" in capsys.readouterr().out
    # the screenshot's dock names the model that made the map, not "no model yet"
    assert len(shown) == 1 and str(shown[0][0]) == str(tiny_checkpoint) and shown[0][1] == shown[0][2]


def test_demo_without_a_model_says_how_and_still_shows_the_slide(tmp_path: Path, capsys) -> None:
    from napari_bcd.demo import run_demo

    assert run_demo(headless=True, out=str(tmp_path / "demo")) == 0
    err = capsys.readouterr().err
    assert "No trained model" in err and "napari-bcd train" in err and "--model" in err
    assert (tmp_path / "demo" / "CMU-1-Small-Region.overview.png").is_file()
    assert (tmp_path / "demo" / "CMU-1-Small-Region.screenshot.png").is_file()


def _trainable_widget(viewer, qtbot, tmp_path: Path):
    from napari_bcd._widgets.train import TrainWidget  # first: its guard keeps Triton's LLVM away from Mesa's

    import timm  # isort: skip
    from safetensors.torch import save_file

    state = {k: v.contiguous() for k, v in timm.create_model("resnet18", pretrained=False).state_dict().items()}
    save_file(state, tmp_path / "r18.safetensors", metadata={"preprocess": "imagenet"})
    widget = TrainWidget(viewer)
    qtbot.addWidget(widget.native)
    widget._out_edit.value = str(tmp_path / "trained.safetensors")
    widget._backbone_edit.value = "timm:resnet18"
    widget._weights_combo.value = "a file"
    widget._weights_edit.value = str(tmp_path / "r18.safetensors")
    return widget


def test_train_widget_from_regions_warns_and_reports_without_validation(viewer, qtbot, tmp_path: Path) -> None:
    from napari_bcd.annotations import Annotation
    from napari_bcd.annotations.napari import annotations_to_shapes

    image = viewer.open(str(SAMPLE_SLIDE), plugin="napari-bcd")[0]
    box = lambda y0, x0, y1, x1: np.array([[y0, x0], [y0, x1], [y1, x1], [y1, x0]], float)  # noqa: E731
    widget = _trainable_widget(viewer, qtbot, tmp_path)
    assert widget._pixels_label.value == "imagenet mean/std, stated by the weights file"
    # One class only: refused before any work.
    one = [Annotation("Invasive carcinoma", "Invasive", box(0, 0, 1483, 2220))]
    data, kwargs, _ = annotations_to_shapes(one, scale=tuple(image.scale[-2:]), name="one class")
    viewer.add_shapes(data, **{k: v for k, v in kwargs.items() if k != "metadata"})
    widget._image_combo.value = image
    widget._shapes_combo.value = viewer.layers["one class"]
    widget._on_run_clicked()
    assert widget._worker is None and widget._run_button.enabled
    # Two classes, one region each: trains, after saying the regions are few.
    two = [Annotation("Invasive carcinoma", "Invasive", box(0, 0, 1483, 2220)),
           Annotation("Benign", "Benign", box(1483, 0, 2967, 2220))]
    data, kwargs, _ = annotations_to_shapes(two, scale=tuple(image.scale[-2:]), name="two classes")
    viewer.add_shapes(data, **{k: v for k, v in kwargs.items() if k != "metadata"})
    widget._shapes_combo.value = viewer.layers["two classes"]
    widget._field_combo.value = "ICIAR photo, 645 × 860 µm (the paper's)"
    widget._epochs_spin.value = 2
    widget._on_run_clicked()
    assert "Few regions for Benign (1), Invasive (1)" in widget._status.value
    qtbot.waitUntil(lambda: widget._worker is None, timeout=180_000)
    result = widget._result
    assert result is not None and result.checkpoint == tmp_path / "trained.safetensors"
    assert result.card.preprocessing.describe() == "imagenet mean/std"
    assert "stated by the backbone weights file" in widget._report.value
    assert (tmp_path / "trained-patches" / "provenance.csv").is_file()
    # The paper's field makes one patch per region here, and a region is never split: nothing to validate on,
    # and the dock says so.
    assert result.report is None and "No validation" in widget._verdict.value


def test_train_widget_cancel_keeps_what_was_validated(viewer, qtbot, tmp_path: Path) -> None:
    from conftest import four_kinds_dataset
    from napari_bcd.train import FitProgress

    widget = _trainable_widget(viewer, qtbot, tmp_path)
    widget._source_combo.value = "ICIAR folder"
    widget._folder_edit.value = str(four_kinds_dataset(tmp_path / "ds", n=4, patients=4))  # grouped: heads train
    widget._epochs_spin.value = 2000
    seen: list = []

    def cancel_after_two(item) -> None:
        if isinstance(item, FitProgress) and item.step >= 50 and not seen:
            seen.append(item)
            widget._on_cancel_clicked()

    widget._on_run_clicked()
    widget._worker.yielded.connect(cancel_after_two)
    qtbot.waitUntil(lambda: widget._worker is None, timeout=180_000)
    result = widget._result
    assert result.stopped == "stopped by the user" and result.steps < 2000
    assert widget._status.value.startswith("Stopped: kept") and widget._use_button.enabled
    assert widget._run_button.enabled and not widget._cancel_button.enabled
