"""The Classify dock as a pathologist sees it (issue 15): the pixel size in use, what a run will do, a legend
that toggles classes, progress in napari's activity dock, and a dock that opens without loading the model."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from conftest import SAMPLE_SLIDE
from napari_bcd.classes import BACH_CLASSES

WIDGET = "Classify slide"


@pytest.fixture
def viewer(make_napari_viewer):
    return make_napari_viewer()


def _dock(viewer, qtbot, checkpoint: Path):
    from napari_bcd._widgets.classify import ClassifyWidget
    from napari_bcd.model.loaded import ModelCache

    widget = ClassifyWidget(viewer)
    qtbot.addWidget(widget.native)
    widget._controller.cache = ModelCache()  # this test's own: nothing loaded before
    widget.use_model(checkpoint)
    return widget


def _plan_done(widget) -> bool:
    return widget._plan_jobs is None or not widget._plan_jobs.is_running


def test_the_pixel_size_in_use_and_where_it_comes_from(viewer, qtbot, tiny_checkpoint: Path) -> None:
    image = viewer.open(str(SAMPLE_SLIDE), plugin="napari-bcd")[0]
    widget = _dock(viewer, qtbot, tiny_checkpoint)
    assert widget._image_combo.value is image
    assert widget._mpp.edit.value == pytest.approx(0.499) and widget._mpp.source.value == "from the file"
    widget._mpp.edit.value = 0.5
    assert widget._mpp.value == 0.5 and widget._mpp.source.value.startswith("set by you (the file says 0.499")
    widget._mpp.edit.value = 2.0  # 4x the file's: said plainly
    assert "4.0x the file's" in widget._mpp.source.value
    widget._mpp.edit.value = 0.0  # back to the file's
    assert widget._mpp.edit.value == pytest.approx(0.499) and widget._mpp.source.value == "from the file"
    from PIL import Image

    from conftest import DATA

    rgb = np.asarray(Image.open(DATA / "stardist-histo-500x300.jpg"))
    viewer.add_image(rgb, name="dragged", rgb=True)
    widget._image_combo.value = viewer.layers["dragged"]
    assert widget._mpp.edit.value == 0 and widget._mpp.source.value.startswith("unknown")


def test_the_window_count_shown_before_run_is_the_engines(viewer, qtbot, tiny_checkpoint: Path) -> None:
    viewer.open(str(SAMPLE_SLIDE), plugin="napari-bcd")
    widget = _dock(viewer, qtbot, tiny_checkpoint)
    widget._overlap_combo.value = "50 %"
    qtbot.waitUntil(lambda: "windows on tissue" in widget._plan_label.value and _plan_done(widget), timeout=60_000)
    text = widget._plan_label.value
    assert "one cell = 100 x 100 µm" in text and "about" in text
    planned = int(text.split(" windows on tissue")[0].replace(",", ""))
    assert widget._controller.cache._loaded is None  # counting needed the card, not the model
    widget._on_run_clicked()
    seen_progress = []
    widget._worker.yielded.connect(lambda _item: seen_progress.append(widget._pbar is not None))
    qtbot.waitUntil(lambda: widget._worker is None, timeout=120_000)
    assert widget.shown.n_windows == planned
    assert seen_progress and all(seen_progress) and widget._pbar is None  # the activity dock had a bar; closed now
    # The next estimate uses the speed just measured here.
    from napari_bcd.config import measured_rate

    assert measured_rate("timm:resnet18@auto") is not None
    # adaptive overlap: promised as a ceiling, run as one
    widget._overlap_combo.value = "75 % where in doubt"
    assert widget._settings().refine and widget._settings().stride == 0.25
    qtbot.waitUntil(lambda: widget._plan_label.value.startswith("at most") and _plan_done(widget), timeout=60_000)
    ceiling = int(widget._plan_label.value.split("at most ")[1].split(" windows")[0].replace(",", ""))
    widget._on_run_clicked()
    qtbot.waitUntil(lambda: widget._worker is None, timeout=120_000)
    assert 0 < widget.shown.run.windows < ceiling


def test_a_coarse_map_gets_advice(viewer, qtbot, tmp_path: Path) -> None:
    from napari_bcd.model import build_classifier, save_checkpoint

    model = build_classifier("timm:resnet18", classes=BACH_CLASSES, backbone_weights=None,
                             input_px=(64, 64))  # the ICIAR field
    ckpt = save_checkpoint(model, path=tmp_path / "iciar-field.safetensors")
    viewer.open(str(SAMPLE_SLIDE), plugin="napari-bcd")
    widget = _dock(viewer, qtbot, ckpt)
    qtbot.waitUntil(lambda: "windows on tissue" in widget._plan_label.value and _plan_done(widget), timeout=60_000)
    assert "coarse map" in widget._plan_label.value and "overlap 50 %" in widget._plan_label.value
    assert "one cell = 645 x 860 µm" in widget._plan_label.value


def test_the_legend_explains_and_toggles_classes(viewer, qtbot, tiny_checkpoint: Path) -> None:
    image = viewer.open(str(SAMPLE_SLIDE), plugin="napari-bcd")[0]
    widget = _dock(viewer, qtbot, tiny_checkpoint)
    assert not widget._legend.isVisibleTo(widget.native)  # nothing to explain yet
    widget._on_run_clicked()
    qtbot.waitUntil(lambda: widget._worker is None, timeout=120_000)
    legend = widget._legend
    assert sorted(legend._boxes) == [1, 2, 3, 4]
    assert [legend._boxes[k].text() for k in (1, 2, 3, 4)] == ["Normal", "Benign", "In situ carcinoma",
                                                                "Invasive carcinoma"]
    layer = viewer.layers[f"{image.name} classes"]
    present = int(np.bincount(layer.data.ravel(), minlength=5)[1:].argmax()) + 1
    assert layer.colormap.map(present)[-1] > 0
    legend.set_shown(present, False)  # what a click on the class does
    assert layer.colormap.map(present)[-1] == 0 and legend.hidden() == {present}
    legend.set_shown(present, True)
    assert layer.colormap.map(present)[-1] > 0


def test_the_dock_opens_without_loading_the_model(viewer, qtbot, tmp_path: Path, monkeypatch) -> None:
    import warnings

    from napari_bcd.errors import BackboneWeightsWarning
    from napari_bcd.model import build_classifier, save_checkpoint

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", BackboneWeightsWarning)
        ckpt = save_checkpoint(build_classifier("resnet152v2", classes=BACH_CLASSES, backbone_weights=None),
                               path=tmp_path / "p.safetensors")
    monkeypatch.setenv("NAPARI_BCD_MODEL", str(ckpt))
    import napari_bcd.model.checkpoint as checkpoint

    loads = []
    monkeypatch.setattr(checkpoint, "load_checkpoint", lambda *a, **k: loads.append(a))
    from napari_bcd._widgets.classify import ClassifyWidget

    widget = ClassifyWidget(viewer)
    qtbot.addWidget(widget.native)
    assert loads == [] and not widget._controller.cache.is_current(ckpt)
    assert "resnet152v2" in widget._card_label.value and "p" in widget._card_label.value


def test_a_wsinfer_model_folder_in_the_dock(viewer, qtbot, tmp_path: Path) -> None:
    """A QuPath user's WSInfer model (three classes of its own) classifies the slide in the dock: its label layer,
    its classes in the legend and the summary."""
    from conftest import wsinfer_zoo_folder

    folder = wsinfer_zoo_folder(tmp_path / "zoo", ["stroma", "tumour", "necrosis"])
    image = viewer.open(str(SAMPLE_SLIDE), plugin="napari-bcd")[0]
    widget = _dock(viewer, qtbot, folder)
    widget._on_run_clicked()
    qtbot.waitUntil(lambda: widget._worker is None, timeout=120_000)
    assert [widget._legend._boxes[k].text() for k in sorted(widget._legend._boxes)] == ["stroma", "tumour",
                                                                                         "necrosis"]
    layer = viewer.layers[f"{image.name} classes"]
    assert set(np.unique(layer.data)) - {0} <= {1, 2, 3} and (layer.data > 0).any()
    assert "necrosis" in widget._summary.value and "tumour" in widget._summary.value
