"""``napari-bcd demo``: the sample slide, classified, in napari or headless.

The headless half is here (files and a matplotlib overview); what needs napari
is :mod:`napari_bcd.demo_viewer`, which opens the Classify dock through napari's
plugin API and drives it through its public methods.
"""

from __future__ import annotations

import logging
import sys
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from .errors import BcdError, ModelNotAvailableError

if TYPE_CHECKING:
    from .engine import ClassMap
    from .io.slide import Slide
    from .summary import Summary

__all__ = ["overview_png", "run_demo"]

log = logging.getLogger(__name__)


def overview_png(slide: Slide, class_map: ClassMap, summary: Summary, path: Path, replace: str = "ours") -> Path:
    """A matplotlib overview: the slide, the class map over it, a legend and the summary.

    Needs no display or OpenGL, so it works on any server.  Written under the output guard (``replace``: see
    :func:`napari_bcd._fileio.check_output`).
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.patches import Patch

    from ._fileio import output_path
    from .classes import class_styles
    from .export import label_image

    thumb, _ds = slide.thumbnail(1200)
    H, W = slide.dimensions
    fig = Figure(figsize=(9, 9 * H / W * 0.9 + 1.5), dpi=110)  # no pyplot: napari's own backend stays untouched
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    ax.imshow(thumb, extent=(0, W, H, 0))
    if class_map is not None:
        img, k = label_image(class_map)
        rgba = np.zeros((*img.shape, 4))
        styles = class_styles(class_map.classes)  # the model's classes, not always the four ICIAR ones
        for st in styles:
            rgba[img == st.label] = (*(c / 255 for c in st.color), 0.45)
        ax.imshow(rgba, extent=(0, img.shape[1] * k, img.shape[0] * k, 0), interpolation="nearest")
        ax.legend(
            handles=[Patch(color=np.array(st.color) / 255, label=st.display_name) for st in styles],
            loc="upper right", fontsize=8, framealpha=0.8,
        )
    ax.set_xlim(0, W)
    ax.set_ylim(H, 0)
    ax.set_title(slide.name)
    ax.set_axis_off()
    if summary is not None:
        fig.text(0.02, 0.01, summary.table(), family="monospace", fontsize=8, va="bottom")
    fig.tight_layout(rect=(0, 0.12 if summary is not None else 0, 1, 1))
    with output_path(path, replace) as tmp:
        fig.savefig(tmp, format="png")
    return path


def run_demo(
    slide_path: str | None = None,
    model: str | None = None,
    headless: bool = False,
    out: str | None = None,
    device: str | None = None,
    stride: float | None = None,
    mpp: float | None = None,
    overwrite: bool = False,
) -> int:
    """Run the demo; returns a process exit status.  ``mpp`` states the pixel size of a slide that lacks it.

    With ``headless`` the files go to ``out``: a rerun replaces the demo's own files there (unchanged since), and
    any other file of those names only with ``overwrite``; that is checked before any work."""
    from ._sample_data import SAMPLE_SLIDE
    from .model.checkpoint import load_model

    path = Path(slide_path) if slide_path else SAMPLE_SLIDE
    if not headless:
        # The dock loads the model itself (in its worker); here only whether there is one.
        try:
            from .demo_viewer import show_in_napari
        except ImportError as err:
            print(f"napari-bcd: napari is not installed here ({err.name}): pip install \"napari-bcd[qt]\" "
                  "(or [napari] with your own Qt), or use --headless for the files.", file=sys.stderr)
            return 2
        from .config import default_model_path

        have = bool(model) or default_model_path() is not None
        if not have:
            print("napari-bcd: No trained model is available; showing the slide without a classification.",
                  file=sys.stderr)
        return show_in_napari(path, have, model, mpp)
    try:
        classifier = load_model(model)
    except ModelNotAvailableError as err:
        classifier = None
        print(f"napari-bcd: {err}\nShowing the slide without a classification.", file=sys.stderr)
    from .engine import iter_classify
    from .export import write_outputs
    from .io import open_slide
    from .summary import summarize

    out_dir = Path(out or "napari-bcd-demo")
    out_dir.mkdir(parents=True, exist_ok=True)
    from ._fileio import check_output
    from .done import DONE_SUFFIX, vouched_outputs
    from .export import output_paths

    stem, replace = path.stem, "any" if overwrite else "ours"
    outputs = [*output_paths(out_dir, stem).values(), out_dir / f"{stem}{DONE_SUFFIX}"]
    replace_set = overwrite or vouched_outputs(out_dir, stem, outputs[:-1])
    try:
        if not replace_set:
            for p in outputs:
                check_output(p, "never")
        for p in (out_dir / f"{stem}.overview.png", out_dir / f"{stem}.screenshot.png"):
            check_output(p, replace)
    except BcdError as err:
        print(f"napari-bcd: {err}", file=sys.stderr)
        return 2
    with open_slide(path, mpp=mpp) as slide:
        class_map = summary = None
        if classifier is not None:
            from ._progress import drive
            from .settings import ClassifySettings

            run = ClassifySettings(**{k: v for k, v in (("device", device), ("stride", stride)) if v is not None})
            class_map = drive(iter_classify(slide, classifier, run), slide.name, "win")
            summary = summarize(class_map)
            paths = write_outputs(class_map, out_dir, stem=stem, overwrite=replace_set, summary=summary)
            print(summary.table())
            print("wrote " + ", ".join(str(p) for p in paths.values()))
        print(f"wrote {overview_png(slide, class_map, summary, out_dir / f'{stem}.overview.png', replace)}")
    import os

    if sys.platform.startswith("linux") and not (os.environ.get("DISPLAY") or os.environ.get("WAYLAND_DISPLAY")):
        # Qt aborts the whole process without a display; say so instead.
        print("napari-bcd: no display, so no napari screenshot (run under xvfb-run for one); "
              "the overview PNG shows the same result.", file=sys.stderr)
        return 0
    try:
        from .config import default_model_path
        from .demo_viewer import viewer_screenshot

        used = (model or default_model_path()) if class_map is not None else None
        shot = viewer_screenshot(path, class_map, out_dir / f"{stem}.screenshot.png", used, replace=replace)
        print(f"wrote {shot}")
    except ImportError as err:
        print(f"napari-bcd: no napari screenshot: napari is not installed ({err.name}; pip install "
              "\"napari-bcd[qt]\"). The overview PNG shows the same result.", file=sys.stderr)
    except Exception as err:
        log.debug("screenshot failed", exc_info=True)
        print(f"napari-bcd: no napari screenshot ({type(err).__name__}: {err}); "
              "run under a display (or xvfb-run) for one. The overview PNG shows the same result.", file=sys.stderr)
    return 0
