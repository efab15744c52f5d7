"""Jobs never outlive their dock or their image (issue 26, point 7), and the Train dock chooses a field that
small regions can hold (point 6)."""

from __future__ import annotations

from pathlib import Path

import pytest

from conftest import SAMPLE_SLIDE, add_regions, four_kinds_dataset


@pytest.fixture
def viewer(make_napari_viewer):
    return make_napari_viewer()


def _slow_classify(viewer, qtbot, checkpoint: Path):
    """The Classify dock, docked, mid-run (one window per batch, 75 % overlap: hundreds of batches)."""
    from napari_bcd.model.loaded import ModelCache

    viewer.open(str(SAMPLE_SLIDE), plugin="napari-bcd")
    dock_widget, widget = viewer.window.add_plugin_dock_widget("napari-bcd", "Classify slide")
    widget._controller.cache = ModelCache()
    widget.use_model(checkpoint)
    widget._overlap_combo.value = "75 %"
    widget._batch_spin.value = 1
    started = []
    widget._on_run_clicked()
    widget._worker.yielded.connect(lambda p: started.append(p) if getattr(p, "stage", None) == "classify" else None)
    qtbot.waitUntil(lambda: len(started) >= 2, timeout=120_000)
    return dock_widget, widget


def test_removing_the_image_mid_run_cancels_it(viewer, qtbot, tiny_checkpoint: Path) -> None:
    _dock, widget = _slow_classify(viewer, qtbot, tiny_checkpoint)
    viewer.layers.remove(viewer.layers[0])
    qtbot.waitUntil(lambda: widget._worker is None, timeout=60_000)
    assert len(viewer.layers) == 0  # no map on an empty canvas
    assert "cancelled" in widget._status.value and "was removed" in widget._status.value
    assert widget._store is None


def test_closing_the_classify_dock_mid_run_cancels_it(viewer, qtbot, tiny_checkpoint: Path) -> None:
    dock_widget, widget = _slow_classify(viewer, qtbot, tiny_checkpoint)
    viewer.window.remove_dock_widget(dock_widget)  # what the dock's close button does
    qtbot.waitUntil(lambda: widget._worker is None, timeout=60_000)
    assert [layer.name for layer in viewer.layers] == ["CMU-1-Small-Region"]  # no layer added after closing
    assert "the dock was closed" in widget._status.value


def test_closing_the_train_dock_mid_training_saves_nothing(viewer, qtbot, tmp_path: Path) -> None:
    from napari_bcd._widgets.train import TrainWidget  # first: its guard keeps Triton's LLVM away from Mesa's

    import timm  # isort: skip
    from safetensors.torch import save_file

    from napari_bcd.train import FitProgress

    widget = TrainWidget(viewer)
    dock_widget = viewer.window.add_dock_widget(widget, name="Train")
    state = {k: v.contiguous() for k, v in timm.create_model("resnet18", pretrained=False).state_dict().items()}
    save_file(state, tmp_path / "r18.safetensors")
    widget._out_edit.value = str(tmp_path / "model.safetensors")
    widget._backbone_edit.value = "timm:resnet18"
    widget._weights_combo.value = "a file"
    widget._weights_edit.value = str(tmp_path / "r18.safetensors")
    widget._source_combo.value = "ICIAR folder"
    widget._folder_edit.value = str(four_kinds_dataset(tmp_path / "ds", n=4, patients=4))  # grouped: heads train
    widget._epochs_spin.value = 5000
    steps = []
    widget._on_run_clicked()
    widget._worker.yielded.connect(lambda p: steps.append(p) if isinstance(p, FitProgress) and p.step else None)
    qtbot.waitUntil(lambda: len(steps) >= 2, timeout=180_000)
    viewer.window.remove_dock_widget(dock_widget)
    qtbot.waitUntil(lambda: widget._worker is None, timeout=60_000)
    assert not (tmp_path / "model.safetensors").exists() and not (tmp_path / "model.json").exists()
    assert "the dock was closed" in widget._status.value and widget._result is None


def test_the_field_is_chosen_from_small_regions_and_shown(viewer, qtbot, tmp_path: Path) -> None:
    from napari_bcd._widgets.train import TrainWidget

    image = viewer.open(str(SAMPLE_SLIDE), plugin="napari-bcd")[0]
    # Eight regions of 90-250 µm on tissue (0.499 µm/px), as a pathologist draws them: nothing at 256 µm.
    boxes = []
    for k in range(8):
        y0, x0 = 300 + 300 * k, 1000 + 60 * (k % 3)
        side = 180 + 40 * k
        cls, label = (4, "Invasive carcinoma") if k % 2 else (2, "Benign")
        boxes.append((label, cls, (y0, x0, y0 + side, x0 + side)))
    shapes = add_regions(viewer, image, boxes, "small regions")
    widget = TrainWidget(viewer)
    qtbot.addWidget(widget.native)
    widget._image_combo.value, widget._shapes_combo.value = image, shapes
    assert widget._field_combo.value == "chosen from the regions"  # the default
    widget._on_check_clicked()
    qtbot.waitUntil(lambda: widget._worker is None, timeout=60_000)
    status = widget._status.value
    assert "(chosen from the regions)" in status and " 0 window(s)" not in status, status
    assert "Draw larger regions" not in status  # advice only when a class has too few windows
    field = float(status.split("field ")[1].split(" x ")[0])
    assert field < 256
    # the same regions at the old default field give almost nothing, and the advice names what the dock offers
    widget._field_combo.value = "256 µm"
    widget._on_check_clicked()
    qtbot.waitUntil(lambda: widget._worker is None, timeout=60_000)
    assert "Benign 1 window(s)" in widget._status.value and "overlap the windows" in widget._status.value


def test_a_job_keeps_triton_out_when_the_viewer_loaded_mesa_after_the_docks(viewer, qtbot, monkeypatch) -> None:
    """A script that imports the docks before it opens its viewer loads Mesa's LLVM after the import-time guard ran;
    the first job then pulled Triton's LLVM in through timm and the process died in LLVM's initialisers
    (a segmentation fault, seen driving the Train dock from a script).  Each job checks again."""
    import sys

    from napari_bcd._widgets._worker import start_job

    with open("/proc/self/maps", encoding="utf-8", errors="ignore") as fh:
        if not any("libLLVM" in line for line in fh):
            pytest.skip("this display's OpenGL is not Mesa's software one: nothing to guard against")
    # as before any job: not loaded, not yet guarded (set back afterwards whatever it was, absent included)
    monkeypatch.setitem(sys.modules, "triton", None)
    del sys.modules["triton"]

    def job():
        yield 1
        return 2

    got = []
    start_job(job(), lambda _: None, got.append, lambda: None)
    qtbot.waitUntil(lambda: got == [2], timeout=10_000)
    assert sys.modules["triton"] is None  # unimportable for this session: torch treats Triton as absent
