"""Models that travel: a napari-bcd model exported as a WSInfer model folder runs in the real ``wsinfer`` package
(what QuPath's WSInfer extension loads) and gives our probabilities on the same patches."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import SAMPLE_SLIDE
from napari_bcd.classes import BACH_CLASSES
from napari_bcd.cli import main
from napari_bcd.model.wsinfer_config import (
    WSINFER_CARD,
    WSINFER_CONFIG,
    WSINFER_MODEL,
    normalize_arguments,
    wsinfer_config,
)
from napari_bcd.model.wsinfer_export import export_wsinfer


def _import_wsinfer():
    """wsinfer 0.6.1 patches zarr 2's KVStore at import; zarr 3 has none (and tiffslide 3 needs no patch)."""
    zarr_storage = pytest.importorskip("zarr.storage")
    if not hasattr(zarr_storage, "KVStore"):
        zarr_storage.KVStore = type("KVStore", (), {})
    return pytest.importorskip("wsinfer")


@pytest.fixture(scope="module")
def soft_checkpoint(tmp_path_factory) -> Path:
    """A small real network whose probabilities are spread (not one-hot), so a 1e-4 agreement means something."""
    from napari_bcd.model import build_classifier, save_checkpoint

    torch.manual_seed(1)
    model = build_classifier("timm:resnet18", classes=BACH_CLASSES, backbone_weights=None, input_px=(64, 64),
                             field_um=(200.0, 200.0), name="soft")
    for p in model.head.parameters():
        torch.nn.init.normal_(p, std=0.25)
    return save_checkpoint(model, path=tmp_path_factory.mktemp("soft") / "soft.safetensors")


def test_the_export_runs_in_wsinfer_on_the_bundled_slide_with_our_probabilities(tmp_path: Path, soft_checkpoint,
                                                                                   capsys) -> None:
    _import_wsinfer()
    from PIL import Image
    from torchvision import transforms
    from wsinfer.modellib.models import LocalModelTorchScript
    from wsinfer.modellib.run_inference import run_inference
    from wsinfer.patchlib import segment_and_patch_directory_of_slides
    from wsinfer_zoo.client import ModelConfiguration, validate_config_json

    from napari_bcd.io import open_slide
    from napari_bcd.model import load_checkpoint

    folder = tmp_path / "soft-wsinfer"
    assert main(["model", "export", str(soft_checkpoint), "--format", "wsinfer", "--out", str(folder)]) == 0
    out = capsys.readouterr()
    assert "4 classes (Normal, Benign, InSitu, Invasive)" in out.out and "3.125 µm/px" in out.out
    assert "will not apply napari-bcd's tissue detection" in out.err
    config = json.loads((folder / WSINFER_CONFIG).read_text())
    validate_config_json(config)  # the spec's own JSON schema (wsinfer-zoo)
    assert config["spec_version"] == "1.0" and config["class_names"] == list(BACH_CLASSES)
    card = json.loads((folder / WSINFER_CARD).read_text())
    assert card["wsinfer_export"]["max_probability_difference"] <= 1e-4 and card["classes"] == list(BACH_CLASSES)

    slides, results = tmp_path / "slides", tmp_path / "results"
    slides.mkdir()
    shutil.copy(SAMPLE_SLIDE, slides / SAMPLE_SLIDE.name)
    info = ModelConfiguration.from_dict(config)
    segment_and_patch_directory_of_slides(slides, results, patch_size_px=info.patch_size_pixels,
                                          patch_spacing_um_px=info.spacing_um_px)
    run_inference(slides, results, LocalModelTorchScript(config=info, model_path=str(folder / WSINFER_MODEL)),
                  batch_size=8)
    import pandas as pd

    table = pd.read_csv(results / "model-outputs-csv" / f"{SAMPLE_SLIDE.stem}.csv")
    assert len(table) >= 10
    model = load_checkpoint(soft_checkpoint).eval()
    resize = transforms.Resize(64)  # WSInfer's own Resize from its config, on the same level-0 pixels
    with open_slide(SAMPLE_SLIDE) as slide, torch.inference_mode():
        rows = []
        for r in table.itertuples():
            region = np.asarray(slide.read_region(0, int(r.miny), int(r.minx), int(r.height), int(r.width)))
            rows.append(np.asarray(resize(Image.fromarray(np.ascontiguousarray(region[..., :3])))))
        ours = model.predict_proba(model.normalise(torch.from_numpy(np.stack(rows)))).numpy()
    theirs = table[[f"prob_{c}" for c in BACH_CLASSES]].to_numpy()
    assert ours.std(axis=0).max() > 0.01 and theirs.max() < 0.999  # spread, not one-hot: a real comparison
    assert np.abs(theirs - ours).max() <= 1e-4


def test_every_preprocessing_becomes_the_equivalent_normalize() -> None:
    from napari_bcd.model.preprocessing import Preprocessing

    pixels = torch.arange(0, 256, dtype=torch.float32)
    for pre in (Preprocessing("tf"), Preprocessing("unit"), Preprocessing.imagenet(),
                Preprocessing("meanstd", (0.7, 0.5, 0.6), (0.1, 0.2, 0.15))):
        norm = normalize_arguments(pre)
        (a, *_), (b, *_) = pre.scale_shift()
        theirs = (pixels / 255 - norm["mean"][0]) / norm["std"][0]
        torch.testing.assert_close(theirs, pixels * a + b, atol=1e-5, rtol=1e-5)


def test_what_wsinfer_cannot_express_is_refused_or_said(tmp_path: Path, tiny_model) -> None:
    from napari_bcd.decision import DecisionRule
    from napari_bcd.errors import BcdError
    from napari_bcd.model import save_checkpoint

    with pytest.raises(BcdError, match="square patches"):
        wsinfer_config(tiny_model.card.replace(input_px=(64, 96), field_um=(200.0, 300.0)))
    rule = DecisionRule.from_dict({"thresholds": {"Invasive": 0.3}})
    ckpt = save_checkpoint(tiny_model, tiny_model.card.replace(decision=rule.to_dict()), tmp_path / "r.safetensors")
    res = export_wsinfer(ckpt, tmp_path / "r")
    assert any("decision rule" in c and "most probable class" in c for c in res.not_applied)
    assert "decision rule" in (tmp_path / "r" / "README.md").read_text()
    user = tmp_path / "mine"
    user.mkdir()
    (user / "config.json").write_text('{"a": "config of the user\'s"}')
    with pytest.raises(BcdError, match="napari-bcd did not write it"):
        export_wsinfer(ckpt, user)
    assert (user / "config.json").read_text() == '{"a": "config of the user\'s"}'
    assert not (user / WSINFER_MODEL).exists()
    export_wsinfer(ckpt, tmp_path / "r")  # its own folder: replaced on a rerun


def test_the_real_resnet152v2_exports_with_the_papers_normalisation(tmp_path: Path) -> None:
    from napari_bcd.errors import BcdError
    from napari_bcd.model import build_classifier, save_checkpoint

    torch.manual_seed(0)
    model = build_classifier("resnet152v2", classes=("Benign", "Invasive"), backbone_weights=None, name="paper")
    with pytest.raises(BcdError, match="square patches.*645 x 860 µm"):  # the paper's 4:3 photo in 256 x 256
        wsinfer_config(model.card)
    model.card = model.card.replace(field_um=(645.0, 645.0))  # trained on a square field: exportable
    for p in model.head.parameters():
        torch.nn.init.normal_(p, std=0.01)
    res = export_wsinfer(save_checkpoint(model, path=tmp_path / "p.safetensors"), tmp_path / "p")
    norm = res.config["transform"][2]["arguments"]
    np.testing.assert_allclose(norm["mean"], [0.5] * 3) and np.testing.assert_allclose(norm["std"], [0.5] * 3)
    assert res.config["patch_size_pixels"] == 256 and res.config["num_classes"] == 2
    assert res.max_difference <= 1e-4


# --- WSInfer models opened here ------------------------------------------------------------------------------------


@pytest.mark.parametrize("classes", [["notumor", "tumor"], ["grade3", "grade4+5", "benign"]])
def test_a_wsinfer_model_folder_classifies_the_bundled_slide_end_to_end(tmp_path: Path, classes, capsys) -> None:
    from conftest import wsinfer_zoo_folder
    from napari_bcd.classes import display_name
    from napari_bcd.model import load_checkpoint
    from napari_bcd.model.card import read_card

    folder = wsinfer_zoo_folder(tmp_path / "zoo-model", classes)
    card = read_card(folder)
    assert card.classes == tuple(classes) and card.input_px == (32, 32) and card.field_um == (200.0, 200.0)
    assert card.preprocessing.mode == "meanstd" and card.preprocessing.mean == (0.72, 0.57, 0.68)
    model = load_checkpoint(folder)
    assert model.weights_sha256 and model.classes == tuple(classes)
    out = tmp_path / "out"
    assert main(["classify", str(SAMPLE_SLIDE), "--model", str(folder), "--out", str(out)]) == 0
    text = capsys.readouterr()
    assert "fp32 on cpu" in text.out + text.err and "wsinfer:tinycnn" in text.out + text.err
    geo = json.loads((out / f"{SAMPLE_SLIDE.stem}.geojson").read_text())
    named = {f["properties"]["classification"]["name"] for f in geo["features"]}
    shown = {display_name(c) for c in classes}  # its own names; a vocabulary class's display name ("Benign")
    assert named <= shown and len(named) >= 2 and shown - {"Benign"} <= set(classes)
    summary = json.loads((out / f"{SAMPLE_SLIDE.stem}.summary.json").read_text())
    assert [row["name"] for row in summary["classes"]] == classes
    assert main(["classify", str(SAMPLE_SLIDE), "--model", str(folder), "--out", str(out)]) == 0  # done: skipped
    assert "skipped" in capsys.readouterr().out.lower()


def test_a_wsinfer_model_cannot_be_fine_tuned_and_runs_in_fp32_only(tmp_path: Path) -> None:
    from conftest import wsinfer_zoo_folder
    from napari_bcd.errors import BcdError
    from napari_bcd.model import load_checkpoint
    from napari_bcd.model.inference import Predictor
    from napari_bcd.model.wsinfer import refuse_fine_tuning

    folder = wsinfer_zoo_folder(tmp_path / "m", ["a", "b"])
    model = load_checkpoint(folder)
    with pytest.raises(BcdError, match="WSInfer model .*cannot fine-tune it.*napari-bcd train"):
        refuse_fine_tuning(model.card)
    with pytest.raises(BcdError, match="fp32 only"):
        Predictor(model, device="cpu", precision="bf16")
    assert Predictor(model, device="cpu").precision == "fp32"


def test_broken_wsinfer_folders_are_named(tmp_path: Path) -> None:
    from conftest import wsinfer_zoo_folder
    from napari_bcd.errors import CheckpointError
    from napari_bcd.model import load_checkpoint

    folder = wsinfer_zoo_folder(tmp_path / "m", ["a", "b", "c"])
    config = json.loads((folder / WSINFER_CONFIG).read_text())
    (folder / WSINFER_CONFIG).write_text(json.dumps({**config, "num_classes": 2, "class_names": ["a", "b"]}))
    with pytest.raises(CheckpointError, match=r"gives \(1, 3\) outputs .* names 2 classes"):
        load_checkpoint(folder)
    (folder / WSINFER_CONFIG).write_text(json.dumps({**config, "transform": [{"name": "CenterCrop"}]}))
    with pytest.raises(CheckpointError, match="not in the spec"):
        load_checkpoint(folder)
    (folder / WSINFER_CONFIG).write_text("{not json")
    with pytest.raises(CheckpointError, match="not a readable JSON"):
        load_checkpoint(folder)
    (folder / WSINFER_CONFIG).write_text(json.dumps(config))
    (folder / WSINFER_MODEL).write_bytes(b"not a model")
    with pytest.raises(CheckpointError, match="not a TorchScript model"):
        load_checkpoint(folder)


def test_retraining_a_wsinfer_model_is_refused_with_what_to_do(tmp_path: Path) -> None:
    from conftest import wsinfer_zoo_folder
    from napari_bcd import classify, open_slide
    from napari_bcd.errors import BcdError
    from napari_bcd.model import load_checkpoint
    from napari_bcd.review import corrections_from_labels, iter_retrain

    folder = wsinfer_zoo_folder(tmp_path / "m", ["notumor", "tumor"])
    with open_slide(SAMPLE_SLIDE) as slide:
        cm = classify(slide, load_checkpoint(folder))
        edited = cm.labels.copy()
        edited[edited > 0] = 3 - edited[edited > 0]  # every classified cell called the other class
        corr = corrections_from_labels(cm, edited)
        with pytest.raises(BcdError, match="WSInfer model .*cannot retrain it"):
            next(iter_retrain(folder, corr, slide, class_map=cm))
    assert sorted(p.name for p in folder.iterdir()) == ["config.json", "torchscript_model.pt"]
