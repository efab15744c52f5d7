"""Quality control before the classifier (issue 39): pen ink, folds, bubble edges and blur are found per window with
their reason, left out of the map, and said in the summary, the CSV, the GeoJSON and the cohort table.

The artefacts are drawn by the tests on the real CMU slide as they come about: marker ink multiplies the light
through the tissue by the ink's transmittance, a fold is a second layer of tissue (the transmittance squared), a
band out of focus is a Gaussian blur (σ = 2 µm), an air bubble's edge a dark colourless ring.
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import numpy as np
import pytest
from scipy import ndimage as ndi

from conftest import BACH_CLASSES, DATA, load_rgb
from napari_bcd.engine import iter_classify
from napari_bcd.errors import BcdError
from napari_bcd.io.slide import Slide
from napari_bcd.model.card import ModelCard
from napari_bcd.qc import REASONS, QCSettings, quality_control
from napari_bcd.settings import ClassifySettings
from napari_bcd.summary import summarize
from napari_bcd.tiling import grid_for
from napari_bcd.windows import select_windows, tissue_fractions

MPP = 0.499
#: ink transmittance (R, G, B) of marker pens
BLUE_INK, GREEN_INK = (0.30, 0.45, 0.90), (0.35, 0.80, 0.45)


def _ink(img: np.ndarray, mask: np.ndarray, transmittance) -> None:
    img[mask] = (img[mask] * np.asarray(transmittance, np.float32)).round().astype(np.uint8)


def draw_artefacts(rgb: np.ndarray) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """The slide with a blue pen stroke, a band out of focus, a fold and a bubble's edge; and where each is."""
    img = rgb.copy()
    H, W = img.shape[:2]
    yy, xx = np.mgrid[:H, :W]
    band = (yy >= int(H * 0.55)) & (yy < int(H * 0.75))  # a fifth of the slide, as a scan line out of focus
    soft = np.stack([ndi.gaussian_filter(img[..., c].astype(np.float32), 4) for c in range(3)], -1)
    img[band] = soft[band].round().astype(np.uint8)
    pen = (np.abs(xx - (W * 0.3 + W * 0.1 * np.sin(yy / H * 6))) < 150) & (yy < H * 0.5)  # a 150 µm stroke
    _ink(img, pen, BLUE_INK)
    fold = (((yy - H * 0.3) / 300) ** 2 + ((xx - W * 0.72) / 120) ** 2) < 1
    img[fold] = (img[fold].astype(np.float32) ** 2 / 255).round().astype(np.uint8)  # two layers: light squared
    ring = np.abs(np.hypot(yy - H * 0.88, xx - W * 0.65) - 220) < 7
    img[ring] = (85, 85, 88)
    return img, {"pen": pen, "blur": band, "fold": fold, "debris": ring}


@pytest.fixture(scope="module")
def drawn(cmu_rgb: np.ndarray):
    img, masks = draw_artefacts(cmu_rgb)
    return img, masks


def _card(field_um: float = 64.0) -> ModelCard:
    return ModelCard(classes=BACH_CLASSES, field_um=(field_um, field_um), input_px=(64, 64))


def _coverage(grid, mask: np.ndarray) -> np.ndarray:
    out = np.zeros(grid.n_windows)
    for r in range(grid.n_windows[0]):
        for c in range(grid.n_windows[1]):
            y, x, h, w = grid.read_box(r, c)
            out[r, c] = mask[max(y, 0) : y + h, max(x, 0) : x + w].sum() / (h * w)
    return out


def test_each_artefact_is_found_with_its_reason_and_clean_tissue_passes(cmu_rgb, drawn) -> None:
    """≥ 90 % of the windows an artefact covers (half the window; a bubble's edge: 2 % of it) fail with the right
    reason; ≤ 3 % of the untouched tissue windows fail, beyond what the unaltered slide fails on its own."""
    img, masks = drawn
    slide, clean = Slide.from_array(img, mpp=MPP, name="drawn"), Slide.from_array(cmu_rgb, mpp=MPP, name="cmu")
    grid = grid_for(slide, _card(), ClassifySettings())
    frac, _, _ = tissue_fractions(clean, grid, None, (MPP, MPP))
    tissue = select_windows(frac, ClassifySettings().min_tissue)
    qc, qc_clean = quality_control(slide, grid, MPP), quality_control(clean, grid, MPP)
    cover = {k: _coverage(grid, m) for k, m in masks.items()}
    for reason, need in (("pen", 0.5), ("fold", 0.5), ("debris", 0.02), ("blur", 0.5)):
        hit = (cover[reason] >= need) & tissue if reason != "pen" else cover[reason] >= need
        code = REASONS.index(reason) + 1
        right = (qc.window_reason[hit] == code).mean()
        assert hit.sum() >= 4 and right >= 0.9, (reason, int(hit.sum()), right)
    untouched = tissue & (sum(cover.values()) == 0)
    own = qc_clean.window_reason > 0  # the slide's own teal margin dye and crushed dark tissue
    assert own[tissue].mean() <= 0.04, own[tissue].mean()
    assert (qc.window_reason[untouched & ~own] > 0).mean() <= 0.03
    assert qc.window_reason[untouched & own].all() or not own[untouched].any()  # still failed beside the drawn ones
    assert untouched.sum() >= 60


@pytest.mark.parametrize("ink", [BLUE_INK, GREEN_INK, (0.15, 0.15, 0.15)], ids=["blue", "green", "black"])
def test_marker_ink_of_any_colour_fails(cmu_rgb, ink) -> None:
    img = cmu_rgb[:1024, 512:1536].copy()
    _ink(img, np.ones(img.shape[:2], bool), ink)
    slide = Slide.from_array(img, mpp=MPP)
    qc = quality_control(slide, grid_for(slide, _card(128.0), ClassifySettings()), MPP)
    assert (qc.window_reason > 0).all()
    if ink != (0.15, 0.15, 0.15):  # black ink over stained tissue keeps its hue: said as pen or as a fold
        assert (qc.window_reason == 1).all()


@pytest.mark.parametrize("name", ["tiatoolbox-target-1000.png", "stardist-histo-500x300.jpg",
                                  "histolab-tissue-level0-4302-10273-4814-10785.png"])
def test_real_he_tiles_pass(name: str) -> None:
    """Real H&E of other labs and scanners, clean: no window fails, and the tile does not measure soft."""
    slide = Slide.from_array(load_rgb(DATA / name), mpp=0.5)
    card = ModelCard(classes=BACH_CLASSES, field_um=(64.0, 64.0), input_px=(64, 64))
    grid = grid_for(slide, card, ClassifySettings())
    frac, _, _ = tissue_fractions(slide, grid, None, (0.5, 0.5))
    qc = quality_control(slide, grid, 0.5)
    tissue = select_windows(frac, 0.25)
    assert (qc.window_reason[tissue] > 0).mean() <= 0.05
    assert not qc.soft_slide, qc.reference_sharpness


def test_the_red_pen_negative_fails_as_pen_and_measures_soft() -> None:
    """histolab's red-marker thumbnail: every window where red ink covers a third fails as pen; the thumbnail, blurred
    throughout, measures soft (a relative blur test alone would pass it)."""
    from napari_bcd.qc import _hsv

    rgb = load_rgb(DATA / "histolab-no-tissue-red-pen.png")
    slide = Slide.from_array(rgb, mpp=1.0)
    grid = grid_for(slide, _card(), ClassifySettings())
    h, s, _ = _hsv(rgb.astype(np.float32))
    red = ((s >= 0.6) & ((h >= 345) | (h <= 15))).reshape(8, 64, 8, 64).mean((1, 3)) >= 1 / 3
    qc = quality_control(slide, grid, 1.0)
    assert red.sum() >= 10 and (qc.window_reason[red] == 1).all()
    assert qc.soft_slide


def test_a_slide_out_of_focus_throughout_is_said_soft(cmu_rgb) -> None:
    """The blur test is relative to the slide; a slide soft everywhere is caught by its own median."""
    soft = np.stack([ndi.gaussian_filter(cmu_rgb[..., c].astype(np.float32), 4) for c in range(3)], -1)
    slide = Slide.from_array(soft.round().astype(np.uint8), mpp=MPP)
    qc = quality_control(slide, grid_for(slide, _card(), ClassifySettings()), MPP)
    sharp = quality_control(Slide.from_array(cmu_rgb, mpp=MPP), grid_for(slide, _card(), ClassifySettings()), MPP)
    assert qc.soft_slide and not sharp.soft_slide, (qc.reference_sharpness, sharp.reference_sharpness)


@pytest.mark.parametrize("bad, says", [
    ("x", "QC settings must be an object"), ({"pen": "a"}, "QC pen threshold is a fraction"),
    ({"pen": True}, "QC pen threshold is a fraction"), ({"blur": float("nan")}, "QC blur threshold is a fraction"),
    ({"debris": -0.1}, "QC debris threshold is a fraction"), ({"action": None}, "Unknown QC action")])
def test_malformed_qc_settings_are_refused_in_a_sentence(bad, says: str) -> None:
    """As a done-record or a cohort task would carry them: a clear BcdError, never a traceback."""
    with pytest.raises(BcdError, match=says):
        ClassifySettings(qc=bad)


@pytest.mark.parametrize("value", ["nan", "-0.1", "2", "abc"])
def test_bad_qc_thresholds_on_the_command_line(value: str, capsys) -> None:
    from napari_bcd.cli import main

    with pytest.raises(SystemExit) as stop:
        main(["classify", "x.svs", "--out", "out", "--qc-blur", value])
    assert stop.value.code == 2 and "argument --qc-blur" in capsys.readouterr().err


def test_settings_are_checked() -> None:
    with pytest.raises(BcdError, match="QC pen threshold is a fraction"):
        QCSettings(pen=1.5)
    with pytest.raises(BcdError, match="Unknown QC action"):
        QCSettings(action="drop")
    s = ClassifySettings(qc={"pen": 0.3})
    assert s.qc == QCSettings(pen=0.3) and ClassifySettings.from_dict(s.to_dict()) == s
    assert "qc" in s.output_settings()  # a done-record covers it: a change of threshold recomputes


def _tiny(field_um: float = 64.0):
    import torch

    from napari_bcd.model import build_classifier

    torch.manual_seed(0)
    return build_classifier("timm:resnet18", classes=BACH_CLASSES, backbone_weights=None, input_px=(64, 64),
                            field_um=(field_um, field_um), name="tiny").eval()


def _run(slide, model, **settings):
    from test_engine import SpyPredictor

    spy = SpyPredictor(model, device="cpu")
    gen = iter_classify(slide, spy, **settings)
    stages = []
    while True:
        try:
            stages.append(next(gen).stage)
        except StopIteration as stop:
            return stop.value, spy, stages


def test_failing_windows_are_skipped_or_set_aside_and_left_out_everywhere(drawn, tmp_path: Path) -> None:
    from napari_bcd.cohort import _summary_row
    from napari_bcd.export import write_outputs

    img, _ = drawn
    slide = Slide.from_array(img, mpp=MPP, name="drawn")
    model = _tiny()
    skip, spy_skip, stages = _run(slide, model)
    aside, spy_aside, _ = _run(slide, model, qc=QCSettings(action="set_aside"))
    off, spy_off, _ = _run(slide, model, qc=QCSettings(enabled=False))
    assert "quality control" in stages
    sent = lambda spy: sum(len(c) for c in spy.calls)  # noqa: E731
    failed = int((skip.qc.window_reason[off.window_done]).astype(bool).sum())
    assert failed >= 50 and sent(spy_skip) == sent(spy_off) - failed and sent(spy_aside) == sent(spy_off)
    # the same labels either way: set-aside windows never reach a label; their answer is kept for a look
    np.testing.assert_array_equal(skip.labels, aside.labels)
    left = skip.qc_cells > 0
    assert (skip.labels[left] == 0).all() and not skip.window_done[skip.qc.window_reason > 0].any()
    assert np.isnan(skip.probs[left]).all(axis=-1).mean() > 0.9
    assert np.isfinite(aside.probs[left]).all(axis=-1).mean() > 0.9
    # the summary: areas without them, left out by reason, in the table and the CSV
    s, s_off = summarize(skip), summarize(off)
    assert set(s.left_out) == set(REASONS) and s.left_out_mm2 == pytest.approx(sum(s.left_out.values()), abs=1e-5)
    assert s.tissue_area_mm2 == pytest.approx(s_off.tissue_area_mm2)
    assert s.classified_area_mm2 < s_off.classified_area_mm2 - 0.2
    assert "left out by quality control" in s.table() and "pen ink" in s.table()
    assert "(left out: pen)" in s.to_csv() and "(left out: blur)" in s.to_csv()
    # the GeoJSON: one QuPath "Ignore*" object per reason, named, with its area
    paths = write_outputs(skip, tmp_path, stem="drawn")
    features = json.loads(paths["geojson"].read_text())["features"]
    ignored = [f["properties"] for f in features if f["properties"]["classification"]["name"] == "Ignore*"]
    assert sorted(p["name"] for p in ignored) == sorted(f"QC: {w}" for w in
                                                       ("pen ink", "fold / thick tissue", "bubble edge / debris",
                                                        "out of focus"))
    assert all(p["measurements"]["Tissue left out mm^2"] > 0 for p in ignored)
    summary = json.loads(paths["summary_json"].read_text())
    assert summary["info"]["qc"]["windows_failed"]["pen"] > 0
    # the cohort table's row
    row = _summary_row(summary)
    assert row["qc_left_out_mm2"] == pytest.approx(s.left_out_mm2) and row["qc_pen_mm2"] > 0


def test_a_slide_mostly_failing_gets_a_warning(cmu_rgb) -> None:
    img = cmu_rgb.copy()
    img[:, : int(img.shape[1] * 0.6)] = (img[:, : int(img.shape[1] * 0.6)] * np.float32(BLUE_INK)).astype(np.uint8)
    slide = Slide.from_array(img, mpp=MPP, name="inked")
    cmap, _, _ = _run(slide, _tiny(128.0))
    s = summarize(cmap)
    assert "quality control left out" in s.qc_warning and "pen ink" in s.qc_warning
    assert "WARNING: quality control left out" in s.table()


def test_hover_says_why_a_cell_was_left_out(drawn) -> None:
    from napari_bcd.layers import describe_hover, qc_layer

    img, _ = drawn
    slide = Slide.from_array(img, mpp=MPP, name="drawn")
    cmap, _, _ = _run(slide, _tiny())
    r, c = np.argwhere(cmap.qc_cells == 1)[0]
    g = cmap.grid
    y, x = g.origin_px[0] + (r + 0.5) * g.stride_px[0], g.origin_px[1] + (c + 0.5) * g.stride_px[1]
    text = describe_hover(cmap, (y * MPP, x * MPP))
    assert text.startswith("left out by quality control: pen ink"), text
    data, kwargs, kind = qc_layer(cmap, "drawn")
    assert kind == "labels" and set(np.unique(data)) <= {0, 1, 2, 3, 4} and (data == 1).any()
    assert kwargs["name"] == "drawn quality control"


def test_cli_thresholds_and_off(tmp_path: Path) -> None:
    import argparse

    from napari_bcd.cli.options import add_classify_options, qc_from

    p = argparse.ArgumentParser()
    add_classify_options(p)
    assert qc_from(p.parse_args([])) == QCSettings()
    assert qc_from(p.parse_args(["--no-qc"])).enabled is False
    got = qc_from(p.parse_args(["--qc-action", "set-aside", "--qc-pen", "0.4", "--qc-blur", "0.5"]))
    assert got == QCSettings(action="set_aside", pen=0.4, blur=0.5)
    with pytest.raises(SystemExit):
        p.parse_args(["--qc-pen", "2"])


@pytest.mark.slow
def test_the_paper_model_does_not_see_a_pen_stroke(cmu_rgb) -> None:
    """The real ResNet152V2 (random head): a window under marker ink is never sent to it."""
    from napari_bcd.errors import BackboneWeightsWarning
    from napari_bcd.model import build_classifier
    from test_engine import SpyPredictor

    img = cmu_rgb[1200:2224, 600:1624].copy()  # 511 µm of tissue, four windows of 256 µm
    left = np.zeros(img.shape[:2], bool)
    left[:, :512] = True
    _ink(img, left, BLUE_INK)  # the left two windows under ink
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", BackboneWeightsWarning)
        model = build_classifier("resnet152v2", classes=BACH_CLASSES, input_px=(224, 224), field_um=(255.5, 255.5))
    spy = SpyPredictor(model, device="cpu")
    gen = iter_classify(Slide.from_array(img, mpp=MPP, name="inked"), spy)
    while True:
        try:
            next(gen)
        except StopIteration as stop:
            cmap = stop.value
            break
    assert cmap.grid.n_windows == (2, 2)
    assert (cmap.qc.window_reason[:, 0] == 1).all() and (cmap.qc.window_reason[:, 1] == 0).all()
    assert sum(len(c) for c in spy.calls) == 2 and (cmap.labels[:, 0] == 0).all() and (cmap.labels[:, 1] > 0).all()


def test_a_big_slide_read_by_level_is_judged_as_its_thumbnail(drawn, monkeypatch: pytest.MonkeyPatch) -> None:
    """A slide too big for its thumbnail is read from a level in chunks (in threads, glass skipped); the drawn slide
    judged that way fails the same windows as from its thumbnail."""
    import napari_bcd.qc as qc_module

    img, _ = drawn
    slide = Slide.from_array(img, mpp=MPP, name="drawn")
    grid = grid_for(slide, _card(), ClassifySettings())
    small = quality_control(slide, grid, MPP)
    monkeypatch.setattr(qc_module, "_thumbnail_blocks", lambda *a: None)
    reads = []
    real = slide.read_region
    monkeypatch.setattr(slide, "read_region", lambda *a, **k: reads.append(a) or real(*a, **k))
    big = qc_module.quality_control(slide, grid, MPP)
    assert big.level == 0 and small.level == -1 and reads
    frac, _, _ = tissue_fractions(slide, grid, None, (MPP, MPP))
    tissue = select_windows(frac, 0.25)
    assert (big.window_reason[tissue] == small.window_reason[tissue]).mean() >= 0.95
    reads.clear()
    nothing = qc_module.quality_control(slide, grid, MPP, need=np.zeros((10, 10), bool), need_ds=(300.0, 300.0))
    assert not reads and not nothing.window_reason.any()  # no tissue anywhere: nothing read, nothing failed


def test_a_big_slide_s_pass_reports_its_chunks_and_stops_when_closed(drawn, monkeypatch: pytest.MonkeyPatch) -> None:
    import napari_bcd.qc as qc_module

    img, _ = drawn
    slide = Slide.from_array(img, mpp=MPP, name="drawn")
    grid = grid_for(slide, _card(), ClassifySettings())
    monkeypatch.setattr(qc_module, "_thumbnail_blocks", lambda *a: None)
    steps = []
    gen = qc_module.iter_quality_control(slide, grid, MPP)
    while True:
        try:
            steps.append(next(gen))
        except StopIteration as stop:
            result = stop.value
            break
    assert steps[0] == (0, 4) and steps[-1] == (4, 4) and result.level == 0  # 2 x 2 chunks of 2048 px
    reads = []
    real = slide.read_region
    monkeypatch.setattr(slide, "read_region", lambda *a, **k: reads.append(a) or real(*a, **k))
    monkeypatch.setattr(qc_module.os, "cpu_count", lambda: 1)  # one reading thread: chunks wait their turn
    gen = qc_module.iter_quality_control(slide, grid, MPP)
    assert next(gen) == (0, 4)
    gen.close()  # a cancel: the chunks not started are never read
    assert len(reads) <= 1
