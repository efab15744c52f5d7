"""Summary figures, the slide-level call, and the written outputs (TIFF, GeoJSON, JSON, CSV)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from napari_bcd.engine import ClassMap, ModelRef
from napari_bcd.export import class_regions, label_image, write_label_tiff, write_outputs, write_probabilities
from napari_bcd.summary import summarize
from napari_bcd.tiling import make_grid


def _cmap(labels: np.ndarray, mpp: float = 0.5, field: float = 100.0,
          classes: tuple[str, ...] = ("Normal", "Benign", "InSitu", "Invasive")) -> ClassMap:
    """A ClassMap laid by hand: cells of 100 µm (200 px at 0.5 µm/px), of a model with ``classes``."""
    rows, cols = labels.shape
    shape = (int(rows * field / mpp), int(cols * field / mpp))
    g = make_grid(shape, (mpp, mpp), (field, field), (64, 64), [(1.0, 1.0)])
    k = len(classes)
    probs = np.full((*labels.shape, k), np.nan, np.float32)
    for cid in range(1, k + 1):
        p = np.full(k, 0.3 / (k - 1), np.float32)
        p[cid - 1] = 0.7
        probs[labels == cid] = p
    return ClassMap(
        probs=probs, labels=labels.astype(np.uint8), tissue=(labels > 0).astype(np.float32),
        window_done=labels > 0, grid=g, classes=classes, slide_name="hand.svs", slide_shape=shape, model=ModelRef("m"),
    )


LABELS = np.array(
    [
        [0, 1, 1, 1],
        [0, 1, 2, 2],
        [0, 3, 0, 2],
        [4, 0, 0, 0],
    ]
)


def test_summary_areas_shares_and_call() -> None:
    s = summarize(_cmap(LABELS))
    by = {c.name: c for c in s.classes}
    cell = 0.1 * 0.1  # mm²
    assert by["Normal"].area_mm2 == pytest.approx(4 * cell)
    assert by["Benign"].area_mm2 == pytest.approx(3 * cell)
    assert by["Normal"].percent_of_tissue == pytest.approx(100 * 4 / 9, abs=1e-3)
    assert by["Invasive"].windows == 1 and by["InSitu"].cells == 1
    assert by["Benign"].mean_probability == pytest.approx(0.7)
    assert s.tissue_area_mm2 == pytest.approx(9 * cell)
    # Most severe class present wins, whatever its area...
    assert s.call == "Invasive" and s.call_display == "Invasive carcinoma" and s.call_probability == pytest.approx(0.7)
    # ...unless it covers no more than the minimum area.
    s2 = summarize(_cmap(LABELS), min_area_mm2=1.5 * cell)
    assert s2.call == "Benign"
    assert "slide call: Benign" in s2.table()
    doc = json.loads(s.to_json())
    assert doc["call"] == "Invasive" and len(doc["classes"]) == 4
    csv_lines = s.to_csv().splitlines()
    assert csv_lines[0].startswith("slide,class,windows,area_mm2") and len(csv_lines) == 5


def test_no_tissue_summary() -> None:
    s = summarize(_cmap(np.zeros((2, 2), int)))
    assert s.call is None and s.windows == 0 and "no tissue classified" in s.table()


def test_class_regions_are_the_union_of_cells() -> None:
    cm = _cmap(LABELS)
    regions = class_regions(cm)
    cell_px2 = 200.0 * 200.0
    areas: dict[str, float] = {}
    for a in regions:
        areas[a.label] = areas.get(a.label, 0) + a.area_px
    assert areas == {"Normal": 4 * cell_px2, "Benign": 3 * cell_px2, "InSitu": cell_px2, "Invasive": cell_px2}
    normal = [a for a in regions if a.label == "Normal"]
    assert len(normal) == 1 and len(normal[0].polygon) == 6  # an L-shape: six corners, no staircase vertices
    assert normal[0].class_name == "Normal" and normal[0].color == (46, 160, 67)


def test_label_tiff_overlays_the_slide(tmp_path: Path) -> None:
    import tifffile

    cm = _cmap(LABELS)
    path = write_label_tiff(cm, tmp_path / "labels.tif")
    with tifffile.TiffFile(path) as tf:
        page = tf.pages[0]
        img = page.asarray()
        desc = json.loads(page.description)
        k = desc["downsample"]
        assert page.photometric == 3 and page.colormap is not None  # palette with the class colours
        assert tuple(page.colormap[:, 4] // 257) == (214, 39, 40)
        # Resolution: pixels of k level-0 px at 0.5 µm/px.
        xres = page.tags["XResolution"].value
        assert xres[0] / xres[1] == pytest.approx(1e4 / (0.5 * k))
    assert img.shape == (int(np.ceil(800 / k)), int(np.ceil(800 / k)))
    # Pixel under the centre of cell (1, 2) (level-0 (300, 500)) is Benign.
    assert img[int(300 // k), int(500 // k)] == 2
    same, k2 = label_image(cm)
    assert np.array_equal(same, img) and k2 == k


def test_probabilities_tiff_and_no_overwrite(tmp_path: Path) -> None:
    import tifffile

    from napari_bcd.errors import BcdError

    cm = _cmap(LABELS)
    path = write_probabilities(cm, tmp_path / "p.tif")
    data = tifffile.imread(path)
    assert data.shape == (4, 4, 4) and data.dtype == np.float32
    assert data[1, 1, 2] == pytest.approx(0.7) and np.isnan(data[0, 0, 0])
    with pytest.raises(BcdError, match="already exists"):
        write_probabilities(cm, path)


def test_write_outputs_writes_everything_atomically(tmp_path: Path) -> None:
    from napari_bcd.export import outputs_complete

    paths = write_outputs(_cmap(LABELS), tmp_path, stem="hand", record={"settings": {"stride": 1.0}})
    # The five outputs and the done-record written last; no temporary file or folder left.
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([*(p.name for p in paths.values()), "hand.done.json"])
    done = outputs_complete(tmp_path, "hand")
    assert done is not None and set(done["files"]) == set(paths) and done["settings"] == {"stride": 1.0}
    gj = json.loads(paths["geojson"].read_text())
    assert gj["type"] == "FeatureCollection"
    names = {f["properties"]["classification"]["name"] for f in gj["features"]}
    assert names == {"Normal", "Benign", "In situ carcinoma", "Invasive carcinoma"}  # as "Set class" names them
    for f in gj["features"]:
        assert f["properties"]["objectType"] == "annotation"
        assert len(f["properties"]["classification"]["color"]) == 3
        coords = f["geometry"]["coordinates"]
        ring = coords[0] if f["geometry"]["type"] == "Polygon" else coords[0][0]
        assert ring[0] == ring[-1]  # closed rings, [x, y] level-0 pixels
    assert json.loads(paths["summary_json"].read_text())["call"] == "Invasive"
    paths["geojson"].write_text("{}")  # a file changed after the record: the set no longer counts as complete
    assert outputs_complete(tmp_path, "hand") is None


def test_areas_and_hover_stop_at_the_image_edge(tiny_model) -> None:
    """Cells of a large field run past the image: only their part on the image counts, and hover is silent there."""
    from conftest import SAMPLE_SLIDE, drain
    from napari_bcd.engine import iter_classify
    from napari_bcd.io import open_slide
    from napari_bcd.layers import describe_hover
    from napari_bcd.summary import summarize

    big = tiny_model.__class__(tiny_model.backbone, tiny_model.head, tiny_model.card.replace(field_um=(645.0, 860.0)))
    with open_slide(SAMPLE_SLIDE) as slide:
        _, cmap = drain(iter_classify(slide, big, min_tissue=0.0))
        h, w = slide.dimensions
        image_mm2 = h * w * slide.mpp[0] * slide.mpp[1] / 1e6
    g = cmap.grid
    assert g.n_cells[0] * g.stride_px[0] > h  # the last row of cells runs past the bottom edge
    s = summarize(cmap)
    assert sum(c.area_mm2 for c in s.classes) <= image_mm2 + 1e-5  # areas are rounded to 1e-6 mm²
    assert s.classified_area_mm2 <= image_mm2 + 1e-5
    assert abs(sum(c.percent_of_tissue for c in s.classes) - 100) < 1e-6
    mpp = slide.mpp
    inside = describe_hover(cmap, ((h - 10) * mpp[0], 10 * mpp[1]))
    below = describe_hover(cmap, ((h + 200) * mpp[0], 10 * mpp[1]))  # 100 µm below the image, still on a cell
    assert g.cell_of_point(h + 200, 10) is not None
    assert inside != "" and below == ""


def test_a_hand_drawn_labels_layer_lands_on_its_image_pixels(tmp_path: Path) -> None:
    """napari's new Labels layer takes the image's scale (0.5 µm/px): its pixels are the image's pixels."""
    from napari_bcd._writer import labels_to_annotations, write_geojson_labels

    data = np.zeros((100, 120), np.uint8)
    data[10:20, 30:50] = 2
    meta = {"scale": (0.5, 0.5), "translate": (0.0, 0.0), "metadata": {}}
    (a,) = labels_to_annotations(data, meta)
    ys, xs = a.polygon[:, 0], a.polygon[:, 1]
    # a layer napari-bcd did not make names no classes: its regions are named by their label values, never by
    # another model's class list
    assert (ys.min(), ys.max(), xs.min(), xs.max()) == (10, 20, 30, 50) and a.label == "2"
    named = {"scale": (0.5, 0.5), "translate": (0.0, 0.0),
             "metadata": {"napari_bcd": {"classes": ["Stroma", "Tumour"]}}}
    (b,) = labels_to_annotations(data, named)
    assert b.label == "Tumour" and b.class_name == "Tumour"
    write_geojson_labels(str(tmp_path / "l.geojson"), data, meta)
    coords = json.loads((tmp_path / "l.geojson").read_text())["features"][0]["geometry"]["coordinates"][0]
    assert {tuple(p) for p in coords} == {(30, 10), (50, 10), (50, 20), (30, 20)}  # QuPath: [x, y] level-0 px
    # A 512² map painted in 16-px blocks: merged runs, one region per connected patch, area preserved.
    rng = np.random.default_rng(0)
    big = np.kron(rng.integers(0, 5, (32, 32)), np.ones((16, 16), int)).astype(np.uint8)
    regions = labels_to_annotations(big, meta)
    by_class = {}
    for r in regions:
        by_class[r.label] = by_class.get(r.label, 0) + r.to_shapely().area
    for st_label, name in enumerate(("1", "2", "3", "4"), start=1):
        assert by_class.get(name, 0) == pytest.approx(float((big == st_label).sum()))


def test_classes_without_a_severity_order_are_called_by_the_tissue_they_cover() -> None:
    """A model of classes of its own (a WSInfer model's, another lab's) has no severity to rank by: the call is the
    class covering most tissue, and says so (not the first class in model order with any area)."""
    labels = np.array([[1, 2, 2, 2], [2, 2, 3, 3], [2, 2, 0, 0]])  # one cell of stroma, 7 of tumour, 2 of necrosis
    s = summarize(_cmap(labels, classes=("stroma", "tumour", "necrosis")))
    assert s.call == "tumour" and s.call_by == "area"
    assert "slide call: tumour (p = 0.700; the class covering most tissue" in s.table()
    iciar = summarize(_cmap(labels))  # the ICIAR classes: the most severe present, whatever its area
    assert iciar.call == "InSitu" and iciar.call_by == "severity"
