"""The review loop's core: decisions, uncertainty, corrections, retraining, region tables, Grad-CAM, quality."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from conftest import DATA, SAMPLE_SLIDE, drain, load_rgb
from napari_bcd.classes import BACH_CLASSES
from napari_bcd.engine import ClassMap, ModelRef
from napari_bcd.errors import BcdError
from napari_bcd.review import (
    DecisionRule,
    apply_decision,
    corrections_from_labels,
    iter_retrain,
    region_table,
    uncertain_regions,
    uncertainty,
)
from napari_bcd.summary import summarize
from napari_bcd.tiling import make_grid

CLASSES = ("Normal", "Benign", "InSitu", "Invasive")


def synthetic_map(probs: np.ndarray, cell_px: float = 100.0) -> ClassMap:
    """A ClassMap of given cell probabilities on a 0.5 µm/px grid whose cells are windows."""
    rows, cols, _ = probs.shape
    grid = make_grid((int(rows * cell_px), int(cols * cell_px)), (0.5, 0.5), (cell_px * 0.5,) * 2, (32, 32),
                     [(1.0, 1.0)])
    covered = np.isfinite(probs).all(-1)
    labels = np.where(covered, np.nan_to_num(probs).argmax(-1) + 1, 0).astype(np.uint8)
    return ClassMap(probs=probs.astype(np.float32), labels=labels, tissue=covered.astype(np.float32),
                    window_done=covered.copy(), grid=grid, classes=CLASSES, slide_name="synthetic",
                    slide_shape=(int(rows * cell_px), int(cols * cell_px)), model=ModelRef("m"))


# ---------------------------------------------------------------- decisions


def test_thresholds_change_labels_and_summary_as_stated():
    p = np.array([[[0.10, 0.10, 0.35, 0.45], [0.70, 0.10, 0.10, 0.10]],
                  [[0.05, 0.05, 0.20, 0.70], [0.40, 0.30, 0.05, 0.25]]])
    cm = synthetic_map(p)
    assert cm.labels.tolist() == [[4, 1], [4, 1]]
    # Invasive only from 0.5, In situ from 0.3: the first cell (Invasive 0.45, In situ 0.35) becomes In situ.
    cut = apply_decision(cm, DecisionRule(thresholds={"Invasive": 0.5, "InSitu": 0.3}))
    assert cut.labels.tolist() == [[3, 1], [4, 1]]
    # Invasive called from 0.25: the fourth cell (Normal 0.40, Invasive 0.25) becomes Invasive.
    low = apply_decision(cm, DecisionRule(thresholds={"Invasive": 0.25}))
    assert low.labels.tolist() == [[4, 1], [4, 4]]
    s = summarize(low)
    assert "Invasive >= 0.25" in s.decision and "Invasive >= 0.25" in s.table()
    assert s.decision_rule["thresholds"] == {"Invasive": 0.25}
    assert {c.name: c.cells for c in s.classes}["Invasive"] == 3
    # Back to the default rule: exactly the arg-max again.
    assert apply_decision(low, DecisionRule()).labels.tolist() == cm.labels.tolist()


def test_uncertain_cells_are_grey_counted_and_out_of_the_call():
    p = np.array([[[0.1, 0.1, 0.1, 0.7], [0.9, 0.05, 0.03, 0.02]],
                  [[0.3, 0.2, 0.2, 0.3], [0.26, 0.25, 0.25, 0.24]]])
    cm = synthetic_map(p)
    assert summarize(cm).call == "Invasive"
    # Confidence (max probability) of the Invasive cell: 1 - (1 - 0.7) / 0.75 = 0.6
    unsure = apply_decision(cm, DecisionRule(min_confidence=0.65))
    u = cm.uncertain_label
    assert unsure.labels.tolist() == [[u, 1], [u, u]]
    s = summarize(unsure)
    assert s.call == "Normal"  # the uncertain Invasive cell no longer makes the call
    cell_mm2 = (100 * 0.5 / 1000) ** 2
    assert s.uncertain_area_mm2 == pytest.approx(3 * cell_mm2)
    assert s.uncertain_percent_of_tissue == pytest.approx(75.0)
    assert "uncertain" in s.table() and "(uncertain)" in s.to_csv()
    from napari_bcd.layers import UNCERTAIN_RGBA, label_colors

    assert label_colors(CLASSES)[u] == UNCERTAIN_RGBA


def test_uncertainty_measures_are_zero_for_one_hot_and_one_for_uniform():
    p = np.array([[1.0, 0, 0, 0], [0.25] * 4, [0.5, 0.5, 0, 0]])
    for m in ("max_probability", "margin", "entropy"):
        u = uncertainty(p, m)
        assert u[0] == pytest.approx(0.0, abs=1e-6) and u[1] == pytest.approx(1.0, abs=1e-6)
    assert uncertainty(p, "margin")[2] == pytest.approx(1.0)  # a tie is as uncertain as it gets for margin
    assert uncertainty(p, "entropy")[2] == pytest.approx(0.5)


def test_uncertain_regions_merge_neighbours_and_order_by_the_measure():
    p = np.tile(np.array([0.94, 0.02, 0.02, 0.02]), (6, 8, 1))
    p[0:2, 0:2] = [0.55, 0.40, 0.03, 0.02]  # four neighbouring cells, margin 0.15
    p[4, 6] = [0.34, 0.33, 0.17, 0.16]  # one cell, margin 0.01: the most uncertain
    p[5, 0] = [0.60, 0.30, 0.05, 0.05]  # margin 0.30
    cm = synthetic_map(p)
    regions = uncertain_regions(cm, measure="margin", n=10, threshold=0.5)
    # ranked by the cells a correction would likely change (the sum of 1 - p): the block of four (1.8) before the
    # single most uncertain cell (0.66), then the last (0.40)
    assert [r.cells for r in regions] == [4, 1, 1]
    assert [r.rank for r in regions] == [1, 2, 3]
    assert [r.value for r in regions] == pytest.approx([1.8, 0.66, 0.40])
    assert regions[1].cell_rows == (4,) and regions[1].cell_cols == (6,)
    assert regions[1].score == pytest.approx(0.99, abs=1e-5)
    assert regions[0].box_px == (0.0, 0.0, 200.0, 200.0)
    assert regions[0].probabilities["Benign"] == pytest.approx(0.40)
    # n limits the list
    assert [r.cells for r in uncertain_regions(cm, "max_probability", n=2, threshold=0.3)] == [4, 1]
    assert uncertain_regions(cm, "margin", threshold=0.995) == []


def test_the_card_stores_the_rule_and_the_engine_uses_it(tiny_model, tmp_path):
    from napari_bcd import classify, open_slide
    from napari_bcd.model import load_checkpoint, save_checkpoint

    with open_slide(SAMPLE_SLIDE) as slide:
        plain = classify(slide, tiny_model)
        rule = DecisionRule(thresholds={"Benign": 0.2}, min_confidence=0.1)
        card = tiny_model.card
        try:
            path = save_checkpoint(tiny_model, card.replace(decision=rule.to_dict()), tmp_path / "t.safetensors")
        finally:
            tiny_model.card = card  # save_checkpoint stamps the model it saves: leave the shared fixture as it was
        model = load_checkpoint(path)
        assert DecisionRule.from_dict(model.card.decision) == rule
        ruled = classify(slide, model)
    assert np.array_equal(ruled.probs, plain.probs, equal_nan=True)
    assert ruled.info["decision"]["thresholds"] == {"Benign": 0.2}
    assert np.array_equal(ruled.labels, apply_decision(plain, rule).labels)
    with pytest.raises(Exception, match="Tumour"):
        tiny_model.card.replace(decision={"thresholds": {"Tumour": 0.5}})


# ---------------------------------------------------------------- quality


def test_quality_flags_pen_and_blur_and_passes_real_tissue(cmu_rgb):
    from PIL import Image, ImageDraw, ImageFilter

    from napari_bcd.review import quality_scores

    tiles = [load_rgb(DATA / f)[:256, :256] for f in ("tiatoolbox-target-1000.png", "stardist-histo-500x300.jpg",
                                                    "histolab-tissue-level0-4302-10273-4814-10785.png",
                                                    "histolab-medium-nuclei-score-level1.png")]
    good = quality_scores(np.stack(tiles), level_mpp=0.5)["quality"]
    assert (good >= 0.9).all(), good
    red_pen = quality_scores(load_rgb(DATA / "histolab-no-tissue-red-pen.png")[:256, :256][None], 0.5)
    assert red_pen["pen"][0] == 0.0 and red_pen["quality"][0] < 0.5
    blurred = np.stack([np.asarray(Image.fromarray(t).filter(ImageFilter.GaussianBlur(3))) for t in tiles])
    assert (quality_scores(blurred, 0.5)["blur"] < 0.5).all()
    inked = Image.fromarray(tiles[0].copy())
    ImageDraw.Draw(inked).line([(0, 40), (255, 200)], fill=(20, 140, 60), width=60)  # a green marker stroke
    assert quality_scores(np.asarray(inked)[None], 0.5)["pen"][0] < 0.2
    assert np.isnan(quality_scores(load_rgb(DATA / "histolab-no-tissue.png")[:256, :256][None])["quality"][0])
    # The real slide's tissue windows (400 px at 0.499 µm/px) pass.
    wins = np.stack([cmu_rgb[y : y + 400, x : x + 400] for y in range(0, 2500, 400) for x in range(0, 1800, 400)])
    q = quality_scores(wins, 0.499)["quality"]
    assert np.nanmin(q) >= 0.7 and np.isfinite(q).sum() >= 15
    # A batch still on the model's device (a torch tensor) scores the same: only its samples are copied back.
    import torch

    on_device = quality_scores(torch.from_numpy(np.concatenate([wins[:, :256, :256], blurred])), 0.499)
    on_host = quality_scores(np.concatenate([wins[:, :256, :256], blurred]), 0.499)
    for key in on_host:
        np.testing.assert_array_equal(on_device[key], on_host[key])


def test_engine_scores_quality_and_min_quality_marks_bad_cells(tiny_model):
    from napari_bcd import classify, open_slide

    with open_slide(SAMPLE_SLIDE) as slide:
        cm = classify(slide, tiny_model, quality=True)
        assert classify(slide, tiny_model).quality is None  # only when asked, or when the rule uses it
        assert classify(slide, tiny_model, decision={"min_quality": 0.5}).quality is not None
    q = cm.quality
    assert q is not None and q.shape == cm.labels.shape
    assert np.isfinite(q[cm.labels > 0]).mean() > 0.9
    strict = apply_decision(cm, DecisionRule(min_quality=float(np.nanmax(q)) + 1e-3 if np.nanmax(q) < 1 else 1.0))
    flagged = strict.labels == cm.uncertain_label
    assert flagged.sum() == (np.isfinite(q) & (q < strict.info["decision"]["min_quality"]) & (cm.labels > 0)).sum()
    assert strict.info["decision"]["uncertain_cells"]["low_quality"] == int(flagged.sum())


# ---------------------------------------------------------------- region table


def test_region_table_matches_shapely_on_class_polygons(tiny_model):
    from shapely.geometry import Polygon, box

    from napari_bcd import classify, open_slide
    from napari_bcd.export import class_regions
    from napari_bcd.review import region_annotations, region_table_csv

    with open_slide(SAMPLE_SLIDE) as slide:
        cm = apply_decision(classify(slide, tiny_model, stride=0.5), DecisionRule(min_confidence=0.05))
    shapes = [Polygon([(300, 250), (1900, 700), (900, 2800)]),  # a triangle over cell edges
              box(500.5, 900.25, 1700.75, 2300.5),
              box(2000, 2800, 2600, 3300)]  # runs past the image's corner
    rows = region_table(cm, shapes, names=["tri", "box", "edge"])
    mm2 = cm.grid.mpp[0] * cm.grid.mpp[1] / 1e6
    frame = box(0, 0, cm.slide_shape[1], cm.slide_shape[0])
    by_class: dict[str, list] = {}
    for a in class_regions(cm):
        by_class.setdefault(a.label, []).append(a.to_shapely())
    for shape, row in zip(shapes, rows, strict=True):
        clipped = shape.intersection(frame)
        assert row.area_mm2 == pytest.approx(clipped.area * mm2, rel=1e-9)
        for name in cm.classes:
            expect = sum(poly.intersection(clipped).area for poly in by_class.get(name, [])) * mm2
            assert row.class_mm2[name] == pytest.approx(expect, rel=1e-6, abs=1e-12), name
        if row.classified_mm2:
            assert sum(row.class_share.values()) == pytest.approx(100.0)
    assert rows[0].classified_mm2 > 0 and rows[2].area_mm2 < box(2000, 2800, 2600, 3300).area * mm2
    csv_text = region_table_csv(rows, "CMU")
    assert csv_text.splitlines()[1].startswith("CMU,tri,")
    from napari_bcd.annotations.geojson import to_feature_collection

    doc = to_feature_collection(region_annotations(shapes, rows, cm.classes))
    props = doc["features"][1]["properties"]
    assert props["name"] == "box"
    assert props["measurements"]["Area mm^2"] == pytest.approx(rows[1].area_mm2)
    assert props["measurements"]["Invasive mm^2"] == pytest.approx(rows[1].class_mm2["Invasive"])


# ---------------------------------------------------------------- corrections and retraining


def _block_edit(cm, size: int = 2):
    """Repaint a block of classified cells (in the layer's raster) to the least common class."""
    from napari_bcd.export import cells_to_image

    raster, k = cells_to_image(cm, cm.labels)
    cov = cm.labels > 0
    blocks = [(r, c) for r, c in np.argwhere(cov) if cov[r : r + size, c : c + size].all()]
    r, c = blocks[len(blocks) // 2]
    counts = np.bincount(cm.labels[cov], minlength=5)[1:5]
    target = 1 + int(np.argmin(np.where(np.isin(np.arange(1, 5), cm.labels[r : r + size, c : c + size]), 10**9,
                                        counts)))
    g = cm.grid
    edited = raster.copy()
    edited[int(np.ceil(r * g.stride_px[0] / k)) : int((r + size) * g.stride_px[0] / k),
           int(np.ceil(c * g.stride_px[1] / k)) : int((c + size) * g.stride_px[1] / k)] = target
    return edited, (r, c), target


def test_corrections_from_labels_reads_the_painted_cells(tiny_model):
    from napari_bcd import classify, open_slide
    from napari_bcd.export import cells_to_image

    with open_slide(SAMPLE_SLIDE) as slide:
        cm = classify(slide, tiny_model)
    edited, (r, c), target = _block_edit(cm)
    corr = corrections_from_labels(cm, edited)
    assert sorted((x.row, x.col) for x in corr.cells) == [(r, c), (r, c + 1), (r + 1, c), (r + 1, c + 1)]
    assert {x.new for x in corr.cells} == {cm.classes[target - 1]}
    assert all(x.old == cm.classes[cm.labels[x.row, x.col] - 1] for x in corr.cells)
    # The cell's window is the engine's window with the default stride.
    assert corr.cells[0].box_px == pytest.approx(cm.grid.window_box(corr.cells[0].row, corr.cells[0].col))
    # One value per cell works too; a brush clipping a corner does not count; erasing is counted, not learnt.
    assert len(corrections_from_labels(cm, np.where(np.arange(cm.labels.size).reshape(cm.labels.shape) == 0,
                                                    cm.labels, cm.labels))) == 0
    raster, k = cells_to_image(cm, cm.labels)
    nick = raster.copy()
    cell = int(cm.grid.stride_px[0] // k)
    rr, cc = np.argwhere(cm.labels > 0)[0]
    other = 1 + (int(cm.labels[rr, cc]) % 4)
    y0, x0 = int(np.ceil(rr * cm.grid.stride_px[0] / k)), int(np.ceil(cc * cm.grid.stride_px[1] / k))
    nick[y0 : y0 + cell // 4, x0 : x0 + cell // 4] = other
    assert len(corrections_from_labels(cm, nick)) == 0
    erased = raster.copy()
    erased[y0 : y0 + cell - 1, x0 : x0 + cell - 1] = 0
    e = corrections_from_labels(cm, erased)
    assert len(e) == 0 and e.erased == 1 and "erased" in e.notes[0]
    with pytest.raises(BcdError, match="match neither"):
        corrections_from_labels(cm, np.zeros((7, 9), np.uint8))


def test_retrain_learns_the_block_and_keeps_the_rest(tiny_model, tiny_checkpoint, tmp_path):
    """On the real slide: the repainted cells take their new class, cells far away keep theirs (measured)."""
    import shutil

    from napari_bcd import classify, open_slide
    from napari_bcd._fileio import file_digest
    from napari_bcd.model import load_checkpoint
    from napari_bcd.model.card import read_card

    parent = Path(shutil.copy(tiny_checkpoint, tmp_path / "tiny.safetensors"))
    shutil.copy(tiny_checkpoint.with_suffix(".json"), tmp_path / "tiny.json")
    before = file_digest(parent)
    with open_slide(SAMPLE_SLIDE) as slide:
        cm = classify(slide, load_checkpoint(parent))
        edited, (r, c), target = _block_edit(cm)
        corr = corrections_from_labels(cm, edited)
        items, res = drain(iter_retrain(parent, corr, slide, class_map=cm))
        assert items[0].corrections == 4 and "4 corrected cell(s)" in items[0].message
        assert res.checkpoint.name == "tiny-r1.safetensors" and file_digest(parent) == before
        assert res.corrected_before == 0.0 and res.corrected_after == 1.0
        assert (res.class_map.labels[r : r + 2, c : c + 2] == target).all()
        # only the affected region was re-predicted; the rest of the map is the parent's, bit for bit
        r0, r1, c0, c1 = res.class_map.info["repredicted_cells"]
        outside = np.ones(cm.labels.shape, bool)
        outside[r0:r1, c0:c1] = False
        assert np.array_equal(res.class_map.probs[outside], cm.probs[outside], equal_nan=True)
        # the whole slide re-predicted with the new model: far cells keep their class and nearly their probabilities
        _, whole = drain(iter_retrain(parent, corr, slide, class_map=cm, whole_slide=True))
        assert whole.checkpoint.name == "tiny-r2.safetensors"
        far = np.ones(cm.labels.shape, bool)
        far[max(r - 1, 0) : r + 3, max(c - 1, 0) : c + 3] = False  # the block and the ring around it
        far &= cm.labels > 0
        assert far.sum() >= 8
        assert np.array_equal(whole.class_map.labels[far], cm.labels[far])
        assert np.nanmax(np.abs(whole.class_map.probs[far] - cm.probs[far])) < 0.05
        assert (whole.class_map.labels[r : r + 2, c : c + 2] == target).all()
    card = read_card(res.checkpoint)
    rec = card.training["retrain"]
    assert rec["parent"]["path"] == str(parent) and rec["parent"]["weights_sha256"] == read_card(parent).weights_sha256
    assert len(rec["corrections"]) == 4 and rec["corrections"][0]["new"] == cm.classes[target - 1]
    assert rec["corrected_after"] == 1.0 and rec["anchors"] > 0 and rec["created"]
    # nothing is overwritten
    with pytest.raises(BcdError, match="already exists"):
        iter_retrain(parent, corr, slide, class_map=cm, out=res.checkpoint)
    with pytest.raises(BcdError, match="no corrected cells"):
        iter_retrain(parent, corr.__class__("x", [], corr.classes), slide, class_map=cm)


def test_retrain_reports_validation_before_and_after_with_the_training_images(tmp_path):
    """A model trained here: its training images come back from the card (and the feature cache)."""
    from conftest import four_kinds_dataset
    from napari_bcd import classify, open_slide
    from napari_bcd.model import load_checkpoint
    from napari_bcd.train import iter_finetune, read_iciar

    root = four_kinds_dataset(tmp_path / "data", n=6, px=96)
    _, trained = drain(iter_finetune(read_iciar(root), out=tmp_path / "m.safetensors", backbone="timm:resnet18",
                                     backbone_weights=None, input_px=(64, 64), field_um=(200.0, 200.0), epochs=5,
                                     validation="holdout"))  # images held out: measured before and after
    with open_slide(SAMPLE_SLIDE) as slide:
        cm = classify(slide, load_checkpoint(trained.checkpoint))
        edited, _, _ = _block_edit(cm)
        items, res = drain(iter_retrain(trained.checkpoint, corrections_from_labels(cm, edited), slide,
                                        class_map=cm, steps=100))
    assert items[0].original_images == 24
    assert res.validation_before["images"] == len(trained.card.training["split"]["val_files"]) > 0
    assert 0 <= res.validation_after["accuracy"] <= 1
    assert res.card.training["retrain"]["validation_before"] == res.validation_before


def test_retrain_cli_from_a_qupath_geojson(tiny_checkpoint, tmp_path, capsys):
    import shutil

    from napari_bcd import classify, open_slide
    from napari_bcd.cli import main
    from napari_bcd.model import load_checkpoint
    from napari_bcd.model.card import read_card

    parent = Path(shutil.copy(tiny_checkpoint, tmp_path / "tiny.safetensors"))
    shutil.copy(tiny_checkpoint.with_suffix(".json"), tmp_path / "tiny.json")
    with open_slide(SAMPLE_SLIDE) as slide:
        cm = classify(slide, load_checkpoint(parent))
    edited, _, target = _block_edit(cm)
    geo = corrections_from_labels(cm, edited).write_geojson(tmp_path / "fix.geojson", cm.grid)
    doc = json.loads(geo.read_text())
    assert {f["properties"]["classification"]["name"] for f in doc["features"]} == {cm.classes[target - 1]}
    rc = main(["retrain", str(parent), "--corrections", str(geo), "--slide", str(SAMPLE_SLIDE),
               "--out", str(tmp_path / "fixed.safetensors"), "--steps", "150", "--classify-out", str(tmp_path / "out")])
    out = capsys.readouterr()
    assert rc == 0, out.err
    assert "corrections learnt 0% -> 100%" in out.out
    assert read_card(tmp_path / "fixed.safetensors").training["retrain"]["parent"]["path"] == str(parent)
    assert (tmp_path / "out" / "CMU-1-Small-Region.summary.json").is_file()
    # thresholds through the CLI: stored in the card, used by classify, stated in the summary
    assert main(["model", "decision", str(parent), "--threshold", "Invasive=0.3", "--min-confidence", "0.1"]) == 0
    assert read_card(parent).decision["thresholds"] == {"Invasive": 0.3}
    assert main(["classify", str(SAMPLE_SLIDE), "--model", str(parent), "--out", str(tmp_path / "c")]) == 0
    summary = json.loads((tmp_path / "c" / "CMU-1-Small-Region.summary.json").read_text())
    assert "Invasive >= 0.30" in summary["decision"]
    assert main(["classify", str(SAMPLE_SLIDE), "--model", str(parent), "--out", str(tmp_path / "d"),
                 "--threshold", "Tumour=0.5"]) == 2
    assert "Tumour" in capsys.readouterr().err


# ---------------------------------------------------------------- Grad-CAM


def _blob_image(rng, blob: bool, px: int = 128):
    img = np.clip(np.array([235, 160, 200]) + rng.normal(0, 12, (px, px, 3)), 0, 255).astype(np.uint8)  # stroma
    centre = None
    if blob:
        centre = rng.integers(24, px - 24, 2)
        yy, xx = np.mgrid[:px, :px]
        img[(yy - centre[0]) ** 2 + (xx - centre[1]) ** 2 < 18**2] = (90, 40, 140)  # a purple blob
    return img, centre


def test_gradcam_peaks_on_the_purple_blob():
    import torch

    from napari_bcd.model import build_classifier
    from napari_bcd.review import gradcam

    torch.manual_seed(0)
    rng = np.random.default_rng(0)
    model = build_classifier("timm:resnet18", backbone_weights=None, input_px=(128, 128), field_um=(100.0, 100.0),
                             classes=("Stroma", "Blob"))
    opt = torch.optim.Adam(model.parameters(), 1e-3)
    for _ in range(60):
        pairs = [_blob_image(rng, bool(i % 2)) for i in range(16)]
        x = model.normalise(torch.from_numpy(np.stack([p[0] for p in pairs])))
        loss = torch.nn.functional.cross_entropy(model.train()(x), torch.tensor([i % 2 for i in range(16)]))
        opt.zero_grad()
        loss.backward()
        opt.step()
    yy, xx = np.mgrid[:128, :128]
    for _ in range(6):
        img, (cy, cx) = _blob_image(rng, True)
        cam, probs = gradcam(model, img[None], class_index=1)
        assert probs[0, 1] > 0.9
        d2 = (yy - cy) ** 2 + (xx - cx) ** 2
        assert cam[0][d2 < 18**2].mean() > 3 * cam[0][d2 > 40**2].mean()
        py, px = np.unravel_index(cam[0].argmax(), cam[0].shape)
        assert np.hypot(py - cy, px - cx) < 18 + 32  # within one feature cell (32 px) of the blob


def test_saliency_layer_on_the_real_resnet152v2(he_256):
    """The paper's Keras-layout network: Grad-CAM over a region of the real slide, aligned with it."""
    from napari_bcd import open_slide
    from napari_bcd.model import build_classifier
    from napari_bcd.review import gradcam, iter_saliency

    model = build_classifier("resnet152v2", classes=BACH_CLASSES, backbone_weights=None, input_px=(128, 128),
                             field_um=(300.0, 300.0))
    cams = [gradcam(model, he_256[None, :128, :128], k)[0] for k in range(4)]
    assert all(c.shape == (1, 128, 128) and np.isfinite(c).all() and c.min() >= 0 and c.max() <= 1 for c in cams)
    # An untrained head has positive evidence for some classes only (Grad-CAM's ReLU zeroes the others).
    assert max(c.max() for c in cams) == pytest.approx(1.0)
    with open_slide(SAMPLE_SLIDE) as slide:
        grid = make_grid(slide.dimensions, slide.mpp, model.card.field_um, model.card.input_px,
                         [i.downsample for i in slide.level_info])
        _, sal = drain(iter_saliency(slide, model, grid, (500.0, 500.0, 1100.0, 1100.0), class_name="Invasive"))
        with pytest.raises(BcdError, match="Zoom in"):
            drain(iter_saliency(slide, model, grid, (0, 0, 2967, 2220), max_windows=2))
    assert sal.windows == 4 and sal.image.shape == (256, 256) and sal.class_name == "Invasive"
    kw = sal.layer_kwargs()
    assert kw["scale"][0] == pytest.approx(grid.window_px[0] / 128 * slide.mpp[0])
    assert sal.origin_px == (0.0, 0.0) and np.isfinite(sal.image).all()


def test_retrain_on_the_real_resnet152v2(tmp_path):
    """The paper's network (random weights here, 128 px inputs to keep it quick): a corrected cell is learnt."""
    import torch

    from napari_bcd import classify, open_slide
    from napari_bcd.model import build_classifier, save_checkpoint

    torch.manual_seed(0)
    model = build_classifier("resnet152v2", classes=BACH_CLASSES, backbone_weights=None, input_px=(128, 128),
                             field_um=(300.0, 300.0))
    for p in model.head.parameters():
        torch.nn.init.normal_(p, std=0.3)
    path = save_checkpoint(model.eval(), path=tmp_path / "r152.safetensors")
    with open_slide(SAMPLE_SLIDE) as slide:
        cm = classify(slide, model)
        edited, (r, c), target = _block_edit(cm, size=1)
        corr = corrections_from_labels(cm, edited)
        _, res = drain(iter_retrain(path, corr, slide, class_map=cm, steps=150, views=4))
    assert len(corr) == 1 and res.corrected_after == 1.0 and res.class_map.labels[r, c] == target
    assert res.card.backbone == "resnet152v2" and res.card.training["retrain"]["views"] == 4


def test_a_corrected_box_holds_the_rest_of_the_slide_and_the_report_says_how_much_changed(tiny_checkpoint,
                                                                                          tmp_path):
    """Issue 26 #9: one box repainted and retrained, the slide classified again with the new model: the cells
    outside the box keep their class (within a stated share), and the report states that share."""
    import math
    import shutil

    from napari_bcd import classify, open_slide
    from napari_bcd.model import load_checkpoint
    from napari_bcd.review.retrain import DRIFT_WARNING, RetrainResult

    parent = Path(shutil.copy(tiny_checkpoint, tmp_path / "tiny.safetensors"))
    shutil.copy(tiny_checkpoint.with_suffix(".json"), tmp_path / "tiny.json")
    with open_slide(SAMPLE_SLIDE) as slide:
        cm = classify(slide, load_checkpoint(parent), stride=0.5)
        edited, (r, c), target = _block_edit(cm)
        _, res = drain(iter_retrain(parent, corrections_from_labels(cm, edited), slide, class_map=cm,
                                    whole_slide=True))
    assert (res.class_map.labels[r : r + 2, c : c + 2] == target).all()
    from napari_bcd.review.retrain_fit import decided

    outside = (cm.labels > 0) & decided(cm.probs)  # cells the parent calls (its ties have no class to keep)
    outside[max(r - 3, 0) : r + 5, max(c - 3, 0) : c + 5] = False
    measured = float((res.class_map.labels[outside] != cm.labels[outside]).mean())
    assert measured <= 0.10, measured  # the rest of the slide is held
    assert math.isfinite(res.outside_changed) and res.outside_checked > 0 and res.outside_changed <= 0.10
    assert "of the slide outside the corrections changes class" in res.describe()
    card_record = load_checkpoint(res.checkpoint).card.training["retrain"]
    assert card_record["outside_changed"] == pytest.approx(res.outside_changed)
    # a model that changes much outside is flagged before it is used
    loud = RetrainResult(res.checkpoint, parent, None, outside_changed=DRIFT_WARNING + 0.1, outside_checked=40)
    assert ("look at the whole map before you use it" in loud.warning and not res.warning) or res.outside_changed > 0.05


def test_retrain_re_predicts_with_exactly_the_maps_run(tiny_model, tmp_path):
    """Issue 36: a map classified with Macenko normalisation, adaptive overlap, its own tissue threshold and 50 %
    overlap is re-predicted by a whole-slide retrain with exactly those settings: its label TIFF equals a fresh
    classify with the retrained model and the map's settings; the CLI reads them from the map's summary and refuses
    an option that contradicts them."""
    import json

    import tifffile

    from napari_bcd import classify, open_slide
    from napari_bcd.cli import main
    from napari_bcd.export import write_outputs
    from napari_bcd.model import load_checkpoint, save_checkpoint
    from napari_bcd.settings import ClassifySettings

    with open_slide(SAMPLE_SLIDE) as slide:  # the model "was trained on" a stain it will be normalised to
        plain = classify(slide, tiny_model, precision="fp32")
    parent = save_checkpoint(tiny_model, tiny_model.card.replace(stain=plain.run.stain.slide),
                             tmp_path / "tiny.safetensors")
    run = ClassifySettings(stride=0.5, refine=True, tissue_threshold=0.15, stain_normalize="macenko",
                           precision="fp32")
    with open_slide(SAMPLE_SLIDE) as slide:
        cm = classify(slide, load_checkpoint(parent), run)
        assert cm.settings == run and cm.model.path == str(parent) and cm.run.stain.normalized == "macenko"
        edited, _, _ = _block_edit(cm)
        corrections = corrections_from_labels(cm, edited)
        _, res = drain(iter_retrain(parent, corrections, slide, class_map=cm, whole_slide=True))
        fresh = classify(slide, load_checkpoint(res.checkpoint), run)
    new = res.class_map
    assert new.settings.output_settings() == run.output_settings()  # the map's run, not a few fields of it
    assert new.run.stain.normalized == "macenko" and new.run.candidate_windows is not None  # normalised, refined
    assert new.model.path == str(res.checkpoint) and new.retrained_from == str(parent)
    write_outputs(new, tmp_path / "retrained", stem="s")
    write_outputs(fresh, tmp_path / "fresh", stem="s")
    a = tifffile.imread(tmp_path / "retrained" / "s.labels.tif")
    b = tifffile.imread(tmp_path / "fresh" / "s.labels.tif")
    assert a.shape == b.shape and (a == b).all()
    summary = json.loads((tmp_path / "fresh" / "s.summary.json").read_text())
    assert ClassifySettings.from_dict(summary["info"]["settings"]) == run  # the summary carries the whole run
    # The CLI: the map's summary gives the run; --stride may only repeat it.
    write_outputs(cm, tmp_path / "map", stem="s")
    corrections.write_geojson(tmp_path / "fix.geojson", cm.grid)
    base = ["retrain", str(parent), "--corrections", str(tmp_path / "fix.geojson"), "--slide", str(SAMPLE_SLIDE),
            "--map", str(tmp_path / "map" / "s.summary.json"), "--steps", "20"]
    assert main([*base, "--stride", "1", "--out", str(tmp_path / "no.safetensors")]) == 2
    assert not (tmp_path / "no.safetensors").exists()
    assert main([*base, "--out", str(tmp_path / "cli.safetensors")]) == 0
    assert load_checkpoint(tmp_path / "cli.safetensors").card.training["retrain"]["corrections"]


def test_a_retrain_says_what_is_wrong_with_the_parents_training_images(tmp_path: Path) -> None:
    """Reading the folder no longer warns by itself: the retrain's notes (shown with its result) say it."""
    from types import SimpleNamespace

    from PIL import Image

    from napari_bcd.review.retrain_data import original_images

    for cls in ("Tumour", "Stroma"):
        (tmp_path / cls).mkdir()
        for k in range(2):
            Image.fromarray(np.full((16, 16, 3), 100 + k, np.uint8)).save(tmp_path / cls / f"{cls}{k}.png")
    (tmp_path / "microscopy_ground_truth.csv").write_text(
        "Tumour0.png,Tumour\nTumour1.png,Tumour\nStroma0.png,Stroma\nStroma1.png,Stroma\ngone.png,Stroma\n")  # one gone
    card = SimpleNamespace(classes=("Stroma", "Tumour"),
                           record=SimpleNamespace(data_root=str(tmp_path), val_files=["Stroma1.png"]))
    notes: list[str] = []
    dataset, train, val = original_images(card, "card", notes)
    assert dataset is not None and len(val) == 1 and len(train) == len(dataset) - 1
    assert len(notes) == 1 and "problem(s) with the training images" in notes[0] and "gone.png" in notes[0]
