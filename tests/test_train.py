"""ICIAR datasets from annotated regions, the official BACH layout, fine-tuning and evaluation."""

from __future__ import annotations

import csv
import os
from pathlib import Path

import numpy as np
import pytest

from conftest import DATA, SAMPLE_SLIDE, load_rgb
from conftest import drain as run
from conftest import two_kinds_dataset as _two_kinds
from napari_bcd.annotations import Annotation
from napari_bcd.classes import canonical_class
from napari_bcd.errors import DatasetError
from napari_bcd.io import open_slide
from napari_bcd.model import load_checkpoint
from napari_bcd.train import (
    STOP,
    FeatureProgress,
    FitProgress,
    evaluate,
    iter_export_patches,
    iter_finetune,
    read_iciar,
)
from napari_bcd.train.features import dihedral


def _box(y0: float, x0: float, y1: float, x1: float, label: str, cls: int) -> Annotation:
    return Annotation(label, canonical_class(cls), np.array([[y0, x0], [y0, x1], [y1, x1], [y1, x0]]))


def test_export_patches_from_regions_on_the_cmu_slide(tmp_path: Path) -> None:
    regions = [
        _box(0, 900, 1500, 1500, "Invasive carcinoma", 4),  # the tissue strip
        _box(1500, 800, 2967, 1600, "Benign", 2),
        _box(0, 0, 600, 600, "Normal", 1),  # glass: no tissue, no patches
    ]
    with open_slide(SAMPLE_SLIDE) as slide:
        progress, result = run(iter_export_patches(slide, regions, tmp_path / "iciar", field_um=(100.0, 100.0),
                                                   coverage=0.5, min_per_class=5))
    assert progress[-1].done == progress[-1].total == sum(result.counts.values())
    assert result.counts["Invasive"] >= 5 and result.counts["Benign"] >= 5 and result.counts["Normal"] == 0
    assert result.too_few == ["Normal"]  # annotated, but no tissue patch came out of it
    ds = read_iciar(tmp_path / "iciar")
    # the dataset's classes are the classes it holds images of: Normal yielded none, so it is not one
    assert ds.counts() == {k: v for k, v in result.counts.items() if v} and not ds.problems
    assert ds.classes == ("Benign", "Invasive") and not (tmp_path / "iciar" / "Normal").exists()
    assert ds.field_um == (100.0, 100.0)  # recorded, so training takes the field the patches show
    with open_slide(SAMPLE_SLIDE) as slide, pytest.raises(DatasetError, match="100 x 100 µm field"):
        run(iter_export_patches(slide, regions, tmp_path / "iciar", field_um=(200.0, 200.0)))
    img = ds.load(0)
    assert img.shape == (512, 512, 3) and img.dtype == np.uint8
    with open(tmp_path / "iciar" / "provenance.csv") as fh:
        rows = list(csv.DictReader(fh))
    assert len(rows) == len(ds) and rows[0]["slide"] == "CMU-1-Small-Region.svs"
    assert float(rows[0]["h"]) == pytest.approx(100 / 0.499, rel=1e-3)
    with open(tmp_path / "iciar" / "microscopy_ground_truth.csv") as fh:
        first = next(csv.reader(fh))
    assert first[1] in ("Invasive", "Benign") and (tmp_path / "iciar" / first[1] / first[0]).is_file()


def test_official_bach_layout_with_problems_reported(tmp_path: Path) -> None:
    import tifffile

    photos = tmp_path / "ICIAR2018_BACH_Challenge" / "Photos"
    tile = load_rgb(DATA / "stardist-histo-500x300.jpg")
    rows = []
    for cls, prefix in (("Normal", "n"), ("Benign", "b"), ("InSitu", "is"), ("Invasive", "iv")):
        (photos / cls).mkdir(parents=True)
        for k in range(1, 3):
            name = f"{prefix}{k:03d}.tif"
            tifffile.imwrite(photos / cls / name, tile)
            rows.append(f"{name},{cls}")
    rows[0] = "n001.tif,Benign"  # disagrees with its folder
    rows.append("ghost.tif,Normal")
    (photos / "microscopy_ground_truth.csv").write_text("\n".join(rows) + "\n")
    (photos / "Invasive" / "iv003.tif").write_bytes(b"not a tiff")
    ds = read_iciar(tmp_path)  # finds Photos/ by itself
    assert ds.root == photos and len(ds) == 9
    assert ds.counts() == {"Normal": 2, "Benign": 2, "InSitu": 2, "Invasive": 3}
    text = "\n".join(ds.problems)
    assert "n001.tif" in text and "says 'Benign'" in text
    assert "ghost.tif" in text and "iv003.tif is not listed" in text
    bad = next(i for i, p in enumerate(ds.paths) if p.name == "iv003.tif")
    with pytest.raises(DatasetError, match="iv003.tif cannot be read"):
        ds.load(bad)
    with pytest.raises(DatasetError, match="no class folders with images"):
        read_iciar(tmp_path / "ICIAR2018_BACH_Challenge" / "Photos" / "Normal")


def test_learnable_on_real_pixels_and_cached_features(tmp_path: Path) -> None:
    ds = read_iciar(_two_kinds(tmp_path / "ds"))
    kw = {"protocol": "paper", "backbone": "timm:resnet18", "backbone_weights": None, "input_px": (64, 64),
          "field_um": (50.0, 50.0), "epochs": 30, "lr": 3e-3, "batch_size": 32, "seed": 0}
    items, result = run(iter_finetune(ds, out=tmp_path / "m.safetensors", **kw))
    ckpt = result.checkpoint
    feats = [i for i in items if isinstance(i, FeatureProgress)]
    fits = [i for i in items if isinstance(i, FitProgress) and i.step > 0]
    assert feats[-1].done == feats[-1].total == len(ds) and feats[-1].cached == 0
    assert len(fits) == 30  # one measurement per epoch, the paper's way
    best = min(fits, key=lambda e: e.val_loss)
    assert best.val_acc >= 0.85 and result.steps == best.step  # two kinds of tissue: chance is 0.5
    model = load_checkpoint(ckpt)
    card = model.card
    assert card.metrics["accuracy"] == pytest.approx(best.val_acc)
    tr = card.training
    assert tr["data"]["counts"]["Invasive"] == 24 and tr["split"]["val"] == 10 and tr["split"]["train"] == 38
    assert tr["hyperparameters"]["lr"] == 3e-3 and tr["best_epoch"] == best.step
    report = evaluate(ckpt, ds)
    # a two-class folder gives a two-class model: its classes are the data's, not the BACH four
    assert card.classes == ("Normal", "Invasive") and model.head.out.out_features == 2
    assert report.accuracy >= 0.85 and report.support == [24, 24]
    text = report.to_text()
    assert "precision" in text and "macro avg" in text and "weighted avg" in text
    png = report.save_confusion_png(tmp_path / "cm.png")
    assert png.stat().st_size > 1000
    # Second run: every feature comes from the cache.
    items2, _ = run(iter_finetune(ds, out=tmp_path / "m2.safetensors", **{**kw, "epochs": 1}))
    f2 = [i for i in items2 if isinstance(i, FeatureProgress)][-1]
    assert f2.cached == len(ds)
    # Eight views are computed once; a run without flips then takes the identity view from that cache.
    items3, _ = run(iter_finetune(ds, out=tmp_path / "m3.safetensors", **{**kw, "epochs": 1, "augment": True}))
    assert [i for i in items3 if isinstance(i, FeatureProgress)][-1].cached == 0
    os.environ["NAPARI_BCD_CACHE_DIR"] += "-fresh"
    run(iter_finetune(ds, out=tmp_path / "m4.safetensors", **{**kw, "epochs": 1, "augment": True}))
    items5, _ = run(iter_finetune(ds, out=tmp_path / "m5.safetensors", **{**kw, "epochs": 1}))
    assert [i for i in items5 if isinstance(i, FeatureProgress)][-1].cached == len(ds)


def test_closing_the_run_saves_nothing_and_stop_saves_what_is_validated(tmp_path: Path) -> None:
    ds = read_iciar(_two_kinds(tmp_path / "ds", n=8))
    kw = {"backbone": "timm:resnet18", "backbone_weights": None, "input_px": (64, 64), "field_um": (50.0, 50.0),
          "cache": False}
    gen = iter_finetune(ds, out=tmp_path / "c.safetensors", protocol="paper", epochs=50, batch_size=16, **kw)
    for item in gen:
        if isinstance(item, FitProgress) and item.step >= 2:
            break
    gen.close()  # a closed dock or a Ctrl-C: the run is abandoned, nothing half-validated is saved
    assert not (tmp_path / "c.safetensors").exists()
    # STOP (the dock's Cancel) ends at the next measurement and saves the best validated so far
    gen = iter_finetune(ds, out=tmp_path / "s.safetensors", protocol="paper", epochs=50, **kw)
    item = next(gen)
    try:
        while True:
            item = gen.send(STOP if isinstance(item, FitProgress) and item.step == 3 else None)
    except StopIteration as stop:
        result = stop.value
    assert result.stopped == "stopped by the user" and result.steps <= 3
    card = load_checkpoint(result.checkpoint).card
    assert card.training["stopped"] == "stopped by the user" and card.training["hyperparameters"]["epochs"] == 50
    # Stopped while computing features: nothing to save, and it says so.
    gen = iter_finetune(ds, out=tmp_path / "f.safetensors", **kw)
    item = next(gen)
    try:
        while True:
            item = gen.send(STOP if isinstance(item, FeatureProgress) else None)
    except StopIteration as stop:
        assert stop.value.checkpoint is None and not (tmp_path / "f.safetensors").exists()


@pytest.mark.slow
def test_the_paper_model_trains_its_head(tmp_path: Path) -> None:
    import warnings

    from napari_bcd.errors import BackboneWeightsWarning

    ds = read_iciar(_two_kinds(tmp_path / "ds", n=3, px=128))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", BackboneWeightsWarning)
        items, result = run(iter_finetune(ds, out=tmp_path / "p.safetensors", protocol="paper", epochs=2,
                                          batch_size=4, backbone_weights=None))
    model = load_checkpoint(result.checkpoint)
    assert model.card.backbone == "resnet152v2" and len([i for i in items if isinstance(i, FitProgress)]) == 3
    trainable = sum(p.numel() for p in model.head.parameters())
    # Table II's 143,620 are for the paper's four classes; this dataset has two: two outputs of 512 + 1 fewer
    assert model.card.classes == ("Normal", "Invasive") and trainable == 143_620 - 2 * (512 + 1)


def test_dihedral_gives_eight_distinct_views() -> None:
    img = np.arange(2 * 3 * 3).reshape(2, 3, 3).astype(np.uint8)
    views = {dihedral(img, t).tobytes() + bytes(dihedral(img, t).shape) for t in range(8)}
    assert len(views) == 8


def test_bad_training_input(tmp_path: Path) -> None:
    ds = read_iciar(_two_kinds(tmp_path / "ds", n=3))
    with pytest.raises(DatasetError, match="split file lists"):
        (tmp_path / "split.txt").write_text("nothere.png\n")
        run(iter_finetune(ds, out=tmp_path / "x", backbone="timm:resnet18", backbone_weights=None,
                          input_px=(64, 64), split=tmp_path / "split.txt"))
    with pytest.raises(DatasetError, match="epochs"):
        run(iter_finetune(ds, out=tmp_path / "x", epochs=0))


def test_the_feature_cache_is_trusted_only_for_what_it_says(tmp_path: Path) -> None:
    """Issue 40: cached features carry the key they were made for and a checksum; an entry swapped with another
    image's, bit-flipped, or holding NaN is computed again, never trained on: the model is the same as from a
    clean cache."""
    import shutil

    import torch
    from safetensors.torch import load_file, save_file

    from napari_bcd.config import cache_dir

    ds = read_iciar(_two_kinds(tmp_path / "ds", n=4))
    kw = {"backbone": "timm:resnet18", "backbone_weights": None, "input_px": (64, 64), "field_um": (50.0, 50.0),
          "feature_precision": "fp32"}
    _, clean = run(iter_finetune(ds, out=tmp_path / "clean.safetensors", **kw))
    entries = sorted((cache_dir() / "features").glob("*/*.safetensors"))
    assert len(entries) == len(ds)
    a, b, c = entries[0], entries[1], entries[2]
    shutil.copy(a, tmp_path / "a")
    shutil.copy(b, a)  # swapped: b's features under a's key
    shutil.copy(tmp_path / "a", b)
    raw = bytearray(c.read_bytes())
    raw[-7] ^= 0x10  # a flipped bit in the features
    c.write_bytes(bytes(raw))
    d = entries[3]
    state = load_file(d)
    save_file({"features": state["features"] * float("nan")}, d)  # NaN, and no key or checksum
    items, again = run(iter_finetune(ds, out=tmp_path / "again.safetensors", **kw))
    feats = [i for i in items if isinstance(i, FeatureProgress)][-1]
    assert feats.cached == len(ds) - 4  # the four entries that did not check out were computed again
    w1, w2 = load_file(clean.checkpoint), load_file(again.checkpoint)
    assert all(torch.equal(w1[k], w2[k]) for k in w1)  # the same model as from a clean cache


def test_cache_info_says_what_is_cached_and_how_often_training_found_it(tmp_path: Path, capsys) -> None:
    """Issue 38: embeddings once, many heads: the second run takes every feature from the cache, and
    ``napari-bcd cache info`` says so (by backbone, with sizes and hit rates); ``cache clear`` empties it."""
    from napari_bcd.cli import main
    from napari_bcd.train.cache import cache_info

    ds = read_iciar(_two_kinds(tmp_path / "ds", n=4))
    kw = {"backbone": "timm:resnet18", "backbone_weights": None, "input_px": (64, 64), "field_um": (50.0, 50.0),
          "feature_precision": "fp32", "validation": "cv"}
    run(iter_finetune(ds, out=tmp_path / "a.safetensors", **kw))
    run(iter_finetune(ds, out=tmp_path / "b.safetensors", **kw))
    folders, runs = cache_info()
    assert len(folders) == 1 and folders[0].entries == len(ds) and folders[0].bytes > 0
    assert folders[0].about["backbone"] == "timm:resnet18" and folders[0].about["precision"] == "fp32"
    assert [(r.found, r.computed) for r in runs] == [(0, len(ds)), (len(ds), 0)]
    assert main(["cache", "info"]) == 0
    out = capsys.readouterr().out
    assert "1 folder(s), 8 image(s)" in out and "timm:resnet18 (random), [64, 64] px, fp32" in out
    assert f"{len(ds)} of {2 * len(ds)} images' features found in the cache (50%)" in out
    assert main(["cache", "clear"]) == 0 and cache_info() == ([], [])


def test_the_accuracy_interval_is_drawn_over_patients_when_they_are_known() -> None:
    """Wilson's interval over images where nothing else is known (checked against its closed form at 50 of 100);
    over patients, resampling whole patients: four patients each all right or all wrong give a far wider interval
    than the same 40 images taken as independent; one patient gives none."""
    from napari_bcd.train.evaluate import accuracy_interval

    (lo, hi), how = accuracy_interval(np.arange(100) < 50)
    assert (lo, hi) == pytest.approx((0.4038, 0.5962), abs=1e-4) and how.startswith("Wilson, 100 images")
    (lo, hi), _ = accuracy_interval(np.ones(18, bool))
    assert hi == 1.0 and lo == pytest.approx(0.8241, abs=1e-4)  # 18 of 18 right still leaves room below
    right = np.repeat([True, True, True, False], 10)
    groups = np.repeat(["P1", "P2", "P3", "P4"], 10)
    (glo, ghi), how = accuracy_interval(right, groups, kind="patient")
    (ilo, ihi), _ = accuracy_interval(right)
    assert how == "4 patients resampled, 40 images" and ghi - glo > 2 * (ihi - ilo)
    assert 0 <= glo <= 0.75 <= ghi <= 1
    assert accuracy_interval(right, ["P1"] * 40, kind="patient") == (
        None, "one patient only: no interval says anything about others")
    assert accuracy_interval(np.zeros(0, bool)) == (None, "no images")
