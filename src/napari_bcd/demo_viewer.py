"""The napari half of ``napari-bcd demo``: a viewer with the slide and the Classify dock.

A front end beside the docks, not above them: the dock comes from napari's plugin API
(``add_plugin_dock_widget``, as a user opens it from the Plugins menu) and is driven through its
public methods, so the command line never imports a widget class.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import napari  # here, so a core-only install finds out when this module is imported

if TYPE_CHECKING:
    from .engine import ClassMap

__all__ = ["show_in_napari", "viewer_screenshot"]


def viewer_screenshot(slide_path: Path, class_map: ClassMap, path: Path, model_path: str | Path | None = None,
                      *, replace: str = "ours") -> Path:
    """A screenshot of a (hidden) napari viewer with the label layer over the slide, the dock showing the model
    (``model_path``) that made the map; written under the output guard (``replace``)."""
    from ._fileio import output_path
    from ._reader import read_slide

    viewer = napari.Viewer(show=False)
    try:
        data, kwargs, _ = read_slide(str(slide_path))[0]
        image = viewer.add_image(data, **kwargs)
        _, widget = viewer.window.add_plugin_dock_widget("napari-bcd", "Classify slide")
        if model_path is not None:
            widget.use_model(model_path)  # the dock describes the model whose map it shows
        if class_map is not None:
            widget.show_result(class_map, image.name, (0.0, 0.0))  # the layer, the summary and the legend
        viewer.scale_bar.visible = True
        viewer.window.resize(1400, 900)
        viewer.reset_view()
        from imageio.v3 import imwrite

        with output_path(path, replace) as tmp:
            imwrite(tmp, viewer.screenshot(canvas_only=False, flash=False), extension=".png")
    finally:
        viewer.close()
    return path


def show_in_napari(path: Path, have_model: bool, model: str | None, mpp: float | None = None) -> int:
    """napari with the slide and the Classify dock; classifies at once when there is a model."""
    from napari.utils.notifications import show_warning

    viewer = napari.Viewer(title="napari-bcd demo")
    viewer.open(str(path), plugin="napari-bcd")
    _, widget = viewer.window.add_plugin_dock_widget("napari-bcd", "Classify slide")
    viewer.scale_bar.visible = True
    if mpp:
        widget.set_mpp(mpp)
    if not have_model:
        show_warning(
            "No trained model yet. Train one (Train from annotations, or `napari-bcd reproduce`), "
            "or choose a checkpoint file in the dock's 'model' box."
        )
    else:
        if model:
            widget.use_model(model)
        widget.run()
    napari.run()
    return 0
