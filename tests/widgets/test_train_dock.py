"""The Train dock tried as a pathologist would (issue 17): the right model used, regions that can train,
no silent random weights, a prompt Cancel, a viewer that never freezes."""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import pytest

from conftest import SAMPLE_SLIDE, add_regions, four_kinds_dataset

WIDGET = "Classify slide"


@pytest.fixture
def viewer(make_napari_viewer):
    return make_napari_viewer()


def _dock(viewer, qtbot, tmp_path: Path, weights_file: bool = True):
    from napari_bcd._widgets.train import TrainWidget  # first: its guard keeps Triton's LLVM away from Mesa's

    import timm  # isort: skip
    from safetensors.torch import save_file

    widget = TrainWidget(viewer)
    qtbot.addWidget(widget.native)
    widget._out_edit.value = str(tmp_path / "model.safetensors")
    widget._backbone_edit.value = "timm:resnet18"
    if weights_file:
        state = {k: v.contiguous() for k, v in timm.create_model("resnet18", pretrained=False).state_dict().items()}
        save_file(state, tmp_path / "r18.safetensors")
        widget._weights_combo.value = "a file"
        widget._weights_edit.value = str(tmp_path / "r18.safetensors")
    return widget


def _wait(qtbot, widget, timeout: int = 180_000) -> None:
    qtbot.waitUntil(lambda: widget._worker is None, timeout=timeout)


_regions = add_regions


def test_retrained_checkpoint_at_the_same_path_is_the_one_classify_uses(viewer, qtbot, tmp_path: Path) -> None:
    _, classify = viewer.window.add_plugin_dock_widget("napari-bcd", WIDGET)
    widget = _dock(viewer, qtbot, tmp_path)
    widget._source_combo.value = "ICIAR folder"
    widget._folder_edit.value = str(four_kinds_dataset(tmp_path / "ds", n=3))
    widget._epochs_spin.value = 3
    widget._on_run_clicked()
    _wait(qtbot, widget)
    first = widget._result.card.weights_sha256
    widget._on_use_clicked()
    assert classify._card.weights_sha256 == first  # the dock shows the card; the model loads when it runs
    from napari_bcd.model.loaded import checkpoint_key

    loaded_key = checkpoint_key(tmp_path / "model.safetensors")
    # Retrain into the same file on other images: other weights on disk.
    widget._folder_edit.value = str(four_kinds_dataset(tmp_path / "ds2", n=4, seed=1))
    widget._on_run_clicked()
    assert not widget._use_button.enabled and widget._report.value == widget._verdict.value == ""  # nothing old on show
    _wait(qtbot, widget)
    second = widget._result.card.weights_sha256
    assert second != first
    # Even before "Use this model", Run in the Classify dock sees that the file changed and reloads it.
    assert loaded_key != checkpoint_key(tmp_path / "model.safetensors")
    widget._on_use_clicked()
    assert classify._card.weights_sha256 == second


def test_small_regions_get_counts_and_advice_before_any_feature(viewer, qtbot, tmp_path: Path) -> None:
    image = viewer.open(str(SAMPLE_SLIDE), plugin="napari-bcd")[0]
    # Nine regions of 100-150 µm on tissue (0.499 µm/px: 200-300 px), as a pathologist draws them.
    boxes = []
    for k in range(9):
        y0, x0 = 300 + 280 * k, 1000 + 60 * (k % 3)
        side = 200 + 12 * k
        cls = (4, "Invasive carcinoma") if k % 3 else (2, "Benign")
        boxes.append((cls[1], cls[0], (y0, x0, y0 + side, x0 + side)))
    _regions(viewer, image, boxes, "small regions")
    widget = _dock(viewer, qtbot, tmp_path)
    widget._image_combo.value = image
    widget._shapes_combo.value = viewer.layers["small regions"]
    widget._field_combo.value = "ICIAR photo, 645 × 860 µm (the paper's)"
    widget._on_check_clicked()
    _wait(qtbot, widget)
    assert "Benign 0 window(s) from 3 region(s)" in widget._status.value
    assert "Draw larger regions" in widget._status.value and "645 x 860 µm" in widget._status.value
    widget._on_run_clicked()
    _wait(qtbot, widget)
    assert widget._status.value.startswith("Stopped:") and "smaller field" in widget._status.value
    assert not (tmp_path / "model.safetensors").exists() and not (tmp_path / "model-patches").exists()
    assert widget._plot.epochs == [] and not widget._use_button.enabled
    # A field the regions can hold trains.
    widget._field_combo.value = "custom"
    widget._field_spin.value = 60.0
    widget._on_check_clicked()
    _wait(qtbot, widget)
    assert "Benign 0 " not in widget._status.value and "Invasive" in widget._status.value


def test_missing_imagenet_weights_stop_the_run_and_say_how(viewer, qtbot, tmp_path: Path) -> None:
    widget = _dock(viewer, qtbot, tmp_path, weights_file=False)
    widget._backbone_edit.value = "resnet152v2"
    widget._source_combo.value = "ICIAR folder"
    widget._folder_edit.value = str(four_kinds_dataset(tmp_path / "ds", n=2))
    widget._on_run_clicked()
    _wait(qtbot, widget)
    status = widget._status.value
    assert status.startswith("Stopped:") and "napari-bcd weights fetch" in status and "weights import" in status
    assert not (tmp_path / "model.safetensors").exists()
    # Random weights only when chosen explicitly.
    widget._weights_combo.value = "random (experiments only)"
    widget._backbone_edit.value = "timm:resnet18"
    widget._epochs_spin.value = 1
    widget._on_run_clicked()
    _wait(qtbot, widget)
    assert widget._result.card.backbone_weights == "random"


def test_offline_timm_without_weights_is_refused_at_once(viewer, qtbot, tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))  # an empty hub cache
    widget = _dock(viewer, qtbot, tmp_path, weights_file=False)
    widget._source_combo.value = "ICIAR folder"
    widget._folder_edit.value = str(four_kinds_dataset(tmp_path / "ds", n=2))
    t0 = time.perf_counter()
    widget._on_run_clicked()
    _wait(qtbot, widget, timeout=30_000)
    assert time.perf_counter() - t0 < 10
    assert "Hugging Face hub" in widget._status.value and "random weights" in widget._status.value


def test_cancel_before_any_epoch_saves_nothing_and_says_so(viewer, qtbot, tmp_path: Path) -> None:
    from napari_bcd.train import FeatureProgress

    widget = _dock(viewer, qtbot, tmp_path)
    widget._source_combo.value = "ICIAR folder"
    widget._folder_edit.value = str(four_kinds_dataset(tmp_path / "ds", n=3))
    widget._on_run_clicked()

    def cancel(item) -> None:
        if isinstance(item, FeatureProgress):
            widget._on_cancel_clicked()

    widget._worker.yielded.connect(cancel)
    _wait(qtbot, widget)
    assert widget._status.value == "Cancelled before anything could be saved."
    assert not widget._use_button.enabled and not (tmp_path / "model.safetensors").exists()


def test_the_viewer_never_freezes_during_training(viewer, qtbot, tmp_path: Path) -> None:
    from qtpy.QtCore import QTimer

    widget = _dock(viewer, qtbot, tmp_path)
    widget._source_combo.value = "ICIAR folder"
    widget._folder_edit.value = str(four_kinds_dataset(tmp_path / "ds", n=4))
    widget._protocol_combo.value = "paper: its hyper-parameters exactly"
    widget._epochs_spin.value = 50
    ticks: list[float] = []
    timer = QTimer()
    timer.setInterval(20)
    timer.timeout.connect(lambda: ticks.append(time.perf_counter()))
    widget._on_run_clicked()
    timer.start()
    t0 = time.perf_counter()
    _wait(qtbot, widget)
    run = time.perf_counter() - t0
    timer.stop()
    assert len([e for e in widget._plot.epochs if e.step]) == 50  # one measurement per epoch
    gaps = np.diff(ticks)
    # Relative, not a time limit: a Qt thread blocked by the training would show one gap as long as the run;
    # a responsive one keeps ticking all along (a loaded machine may delay a tick, never by half the run).
    assert len(ticks) > 10 and gaps.max() < 0.5 * run, f"the Qt thread stalled {gaps.max():.2f} s of {run:.2f} s"


def test_a_folders_groups_are_said_before_training_and_can_be_overridden(viewer, qtbot, tmp_path: Path) -> None:
    """Issue 37: the dock says which patients it found in the folder (a manifest here) before any work, and the
    pathologist can give a file instead or train without groups; the run uses what the dock said."""
    from napari_bcd._widgets._train_data import FILE_GROUPS, FOUND_GROUPS, NO_GROUPS

    widget = _dock(viewer, qtbot, tmp_path)
    data = widget._data

    def shown(w) -> bool:  # shown when the dock is (the hidden test dock makes .visible False for all)
        return not w.native.isHidden()

    root = four_kinds_dataset(tmp_path / "ds", n=4)
    names = sorted(p.name for p in root.glob("*/*.png"))
    (root / "metadata.csv").write_text("image_id,case_id\n" + "\n".join(f"{n[:-4]},C{i % 4}" for i, n in
                                                                          enumerate(names)) + "\n")
    widget._source_combo.value = "ICIAR folder"
    assert shown(data.groups) and not shown(data.groups_file)
    widget._folder_edit.value = str(root)
    assert data.groups.value == FOUND_GROUPS
    assert "16 images from 4 patients (from metadata.csv (column 'case_id'))" in data.groups_info.value
    data.groups.value = FILE_GROUPS
    assert shown(data.groups_file) and "Choose the groups file" in data.groups_info.value
    (tmp_path / "mine.csv").write_text("file,slide\n" + "\n".join(f"{n},S{i % 2}" for i, n in enumerate(names)))
    data.groups_file.value = str(tmp_path / "mine.csv")
    assert "from 2 slides (from --groups mine.csv)" in data.groups_info.value
    data.groups.value = NO_GROUPS
    assert "no patient, slide or region known" in data.groups_info.value and not shown(data.groups_file)
    widget._epochs_spin.value = 1
    widget._on_run_clicked()
    _wait(qtbot, widget)
    assert not widget._result.validation.grouped and widget._result.shipped == "probe"  # by image: the probe ships
    data.groups.value = FOUND_GROUPS
    widget._on_run_clicked()
    _wait(qtbot, widget)
    v = widget._result.validation
    assert v.grouped and v.n_groups == 4 and "over 4 patients" in v.kind
    widget._source_combo.value = "regions on an image"
    assert not shown(data.groups) and not shown(data.groups_info) and not shown(data.groups_file)
