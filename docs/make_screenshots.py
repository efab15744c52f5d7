"""Regenerate the README's pictures from the real sample slide, so they never go stale.

    xvfb-run -a -s "-screen 0 1920x1080x24" python docs/make_screenshots.py [--out docs/images]

What it does, in a real napari window on a virtual display: opens the bundled
Aperio sample, draws six regions (Invasive carcinoma on the upper strip,
Benign below, as a user would), trains a model from them in the Train dock
(a small timm backbone with random weights, so it needs no download and takes
seconds: it shows the interface, it is not a diagnostic model), classifies the
slide with it at 75 % overlap, and saves three PNGs: the classified slide with
the Classify dock and its legend, the Train dock after training, and the
Annotations dock with the regions opened from a QuPath GeoJSON file.  Each
PNG is reduced to a palette so it stays well under 1 MB.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
SLIDE = ROOT / "src" / "napari_bcd" / "data" / "CMU-1-Small-Region.svs"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=str(ROOT / "docs" / "images"))
    args = ap.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="bcd-shots-"))
    # A private cache and config: the user's default model and feature cache stay untouched.
    os.environ["NAPARI_BCD_CACHE_DIR"] = str(work / "cache")
    os.environ["NAPARI_BCD_CONFIG_DIR"] = str(work / "config")

    import napari
    from qtpy.QtWidgets import QApplication

    from napari_bcd.annotations import Annotation, write_geojson
    from napari_bcd.annotations.napari import annotations_to_shapes

    app = QApplication.instance() or QApplication([])

    def pump(seconds: float = 0.3) -> None:
        t0 = time.time()
        while time.time() - t0 < seconds:
            app.processEvents()
            time.sleep(0.02)

    def wait(widget) -> None:
        while widget._worker is not None:
            pump(0.1)
        pump(0.5)

    def box(y0: float, x0: float, y1: float, x1: float) -> np.ndarray:
        return np.array([[y0, x0], [y0, x1], [y1, x1], [y1, x0]], float)

    regions = [
        Annotation("Invasive carcinoma", 4, box(100, 950, 700, 1500)),
        Annotation("Invasive carcinoma", 4, box(800, 950, 1400, 1500)),
        Annotation("Invasive carcinoma", 4, box(100, 1550, 900, 2100)),
        Annotation("Benign", 2, box(1600, 900, 2200, 1500)),
        Annotation("Benign", 2, box(2300, 900, 2900, 1500)),
        Annotation("Benign", 2, box(1700, 1550, 2800, 2100)),
    ]
    write_geojson(regions, work / "regions.geojson")

    viewer = napari.Viewer(title="napari-bcd")
    viewer.window._qt_window.resize(1600, 1000)
    image = viewer.open(str(SLIDE), plugin="napari-bcd")[0]
    units = tuple(str(u) for u in image.units[-2:])
    data, kw, _ = annotations_to_shapes(regions, scale=tuple(image.scale[-2:]), name="regions", units=units)
    shapes = viewer.add_shapes(data, **{k: v for k, v in kw.items() if k != "metadata"})

    # 1. Train from the regions.
    _, train = viewer.window.add_plugin_dock_widget("napari-bcd", "Train from annotations")
    train._image_combo.value = image
    train._shapes_combo.value = shapes
    train._backbone_edit.value = "timm:resnet18"
    train._weights_combo.value = "random (experiments only)"
    train._out_edit.value = str(work / "regions-model.safetensors")
    pump(1)
    train._on_run_clicked()
    wait(train)
    _save(viewer, out / "train.png")
    model_path = train._result.checkpoint

    # 2. Classify the slide with it; only the Classify dock open, the legend in view.
    viewer.window.remove_dock_widget(train.native.parent() if hasattr(train.native, "parent") else train)
    _, classify = viewer.window.add_plugin_dock_widget("napari-bcd", "Classify slide")
    classify.use_model(model_path)  # what "Use this model" does, without its notification over the picture
    classify._image_combo.value = image
    classify._overlap_combo.value = "75 %"
    shapes.visible = False
    pump(3)
    classify._on_run_clicked()
    wait(classify)
    viewer.layers.selection.active = image
    viewer.reset_view()
    pump(1)
    _save(viewer, out / "classify.png")

    # 4. Review: repaint a block of the map, retrain, then the uncertain places and a region's figures.
    classify.native.parent().setVisible(False)  # room for the Review dock (the Classify dock stays open)
    _, review = viewer.window.add_plugin_dock_widget("napari-bcd", "Review and retrain")
    labels = review._map_combo.value
    cm = review.state.class_map
    k = labels.metadata["napari_bcd"]["downsample"]
    cov = cm.labels > 0
    r, c = next((r, c) for r, c in np.argwhere(cov)[len(np.argwhere(cov)) // 3:] if cov[r : r + 4, c : c + 4].all())
    sy, sx = cm.grid.stride_px
    review.correct._paint_combo.value = review.correct._paint_combo.choices[0]
    labels.paint_polygon(box(r * sy / k + 1, c * sx / k + 1, (r + 4) * sy / k - 2, (c + 4) * sx / k - 2),
                         labels.selected_label)
    pump(1)
    review.correct.retrain()
    wait(review)
    review.correct.decide(True)  # a model with random backbone weights may change much: the user looked
    region = viewer.add_shapes([box(700, 800, 1500, 1700) * tuple(image.scale[-2:])], shape_type="rectangle",
                               name="region", units=units, edge_color="yellow", face_color="transparent",
                               edge_width=8)
    review.regions.section.set_open(True)
    review.regions._shapes_combo.value = region
    viewer.layers.selection.active = labels
    pump(1)
    _save(viewer, out / "review.png")
    from napari_bcd.review import uncertainty

    shown = review.state.shown
    conf = 1 - uncertainty(shown.probs, "margin")
    review.correct.section.set_open(False)
    review.regions.section.set_open(False)
    review.rule.section.set_open(True)
    review.explain.section.set_open(True)
    review.rule._conf_spin.value = float(np.ceil(np.nanpercentile(conf[shown.labels > 0], 25) * 100) / 100)
    review.rule.apply()
    review.rule.go_to(0)
    review.explain.explain()
    wait(review)
    pump(1)
    _save(viewer, out / "review-uncertain.png")
    viewer.window.remove_dock_widget(review.native.parent() if hasattr(review.native, "parent") else review)
    viewer.layers.remove(region)

    # 3. The Annotations dock with the regions opened from the GeoJSON file.
    viewer.window.remove_dock_widget("all")
    for layer in list(viewer.layers):
        if layer is not image:
            viewer.layers.remove(layer)
    _, annotate = viewer.window.add_plugin_dock_widget("napari-bcd", "Annotations: open and save")
    annotate._image_combo.value = image
    annotate._file_edit.value = str(work / "regions.geojson")
    annotate._on_open_clicked()
    pump(1)
    _save(viewer, out / "annotations.png")
    viewer.close()
    print(f"wrote {out / 'classify.png'}, train.png, review.png, review-uncertain.png, annotations.png")


def _save(viewer, path: Path) -> None:
    from PIL import Image

    shot = Image.fromarray(viewer.screenshot(canvas_only=False, flash=False)).convert("RGB")
    if shot.width > 1400:
        shot = shot.resize((1400, round(shot.height * 1400 / shot.width)), Image.LANCZOS)
    # A 256-colour palette (no dithering) keeps text crisp and small class swatches true.
    shot.quantize(colors=256, method=Image.Quantize.FASTOCTREE, dither=Image.Dither.NONE).save(path, optimize=True)
    print(f"{path.name}: {shot.width} x {shot.height}, {path.stat().st_size / 1024:.0f} KiB")


if __name__ == "__main__":
    main()
