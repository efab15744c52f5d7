"""Every control visible (issue 26, point 3): the four docks open at once on a 1366 x 768 and a 1920 x 1080 screen,
every section unfolded; each button lies inside its dock's viewport and the window fits the screen."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

from conftest import SAMPLE_SLIDE

DOCKS = ("Classify slide", "Train from annotations", "Review and retrain", "Annotations: open and save")


@pytest.fixture
def viewer(make_napari_viewer):
    return make_napari_viewer(show=True)


def _outside(dock_native) -> list[str]:
    """Buttons (and combo boxes, fields) that stick out of the scroll area's viewport sideways."""
    from qtpy.QtCore import QPoint
    from qtpy.QtWidgets import QAbstractButton, QComboBox, QLineEdit, QScrollArea

    area = dock_native.findChild(QScrollArea)
    view = area.viewport() if area is not None else dock_native
    bad = []
    for kind in (QAbstractButton, QComboBox, QLineEdit):
        for w in dock_native.findChildren(kind):
            if not w.isVisibleTo(dock_native) or w.width() <= 0:
                continue
            x0 = w.mapTo(view, QPoint(0, 0)).x()
            if x0 < 0 or x0 + w.width() > view.width() + 1:
                text = w.text() if hasattr(w, "text") else type(w).__name__
                bad.append(f"{text!r} at {x0}..{x0 + w.width()} of {view.width()}")
    return bad


@pytest.mark.parametrize("screen", [(1366, 768), (1920, 1080)])
def test_four_docks_fit_the_screen_with_every_section_open(viewer, qtbot, tiny_checkpoint: Path, tmp_path: Path,
                                                          screen) -> None:
    from qtpy.QtWidgets import QApplication

    from napari_bcd import classify, open_slide
    from napari_bcd.model import load_checkpoint

    image = viewer.open(str(SAMPLE_SLIDE), plugin="napari-bcd")[0]
    docks = {name: viewer.window.add_plugin_dock_widget("napari-bcd", name) for name in DOCKS}
    classify_dock = docks["Classify slide"][1]
    classify_dock.use_model(tiny_checkpoint)
    with open_slide(SAMPLE_SLIDE) as slide:
        cm = classify(slide, load_checkpoint(tiny_checkpoint))
    assert cm.model_path == str(tiny_checkpoint)  # a loaded model names its checkpoint on the map
    classify_dock.show_result(cm, image.name)  # the map, legend and exports shown too
    window = viewer.window._qt_window
    window.resize(*screen)
    for _ in range(5):
        QApplication.processEvents()
    for name, (_, widget) in docks.items():
        for section in _sections(widget):
            section.set_open(True)
        QApplication.processEvents()
        bad = _outside(widget.native)
        assert not bad, f"{name}: {bad}"
    size = window.frameGeometry()
    assert size.width() <= screen[0] and size.height() <= screen[1], (size.width(), size.height())
    from imageio.v3 import imwrite

    shot = viewer.screenshot(canvas_only=False, flash=False)
    imwrite(tmp_path / "docks.png", shot)
    if os.environ.get("NAPARI_BCD_SCREENSHOTS"):
        shutil.copy(tmp_path / "docks.png", Path(os.environ["NAPARI_BCD_SCREENSHOTS"]) / f"docks-{screen[0]}.png")


def _sections(widget) -> list:
    return list(getattr(widget, "_sections", ()))
