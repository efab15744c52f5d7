"""`napari-bcd reproduce`: the paper's protocol on two splits, beside the paper's claims."""

from __future__ import annotations

import hashlib
import json
import warnings
from pathlib import Path

import pytest

from bach_archive import make_bach_zip
from conftest import KerasReference, drain, four_kinds_dataset
from napari_bcd.cli import main
from napari_bcd.config import default_model_path
from napari_bcd.model import import_keras_weights, load_checkpoint
from napari_bcd.train import FeatureProgress, read_iciar
from napari_bcd.train.bach import BACH_FILE, iter_fetch_bach
from napari_bcd.train.reproduce import Stage, iter_reproduce


@pytest.fixture(scope="module")
def bach_photos(tmp_path_factory: pytest.TempPathFactory) -> Path:
    d = tmp_path_factory.mktemp("bach")
    z = make_bach_zip(d / BACH_FILE)
    _, result = drain(iter_fetch_bach(d / "data", from_zip=z, md5=hashlib.md5(z.read_bytes()).hexdigest()))
    return result.photos


def test_reproduce_trains_both_splits_and_reports_beside_the_paper(tmp_path: Path, bach_photos: Path) -> None:
    ds = read_iciar(bach_photos)
    items, res = drain(iter_reproduce(ds, tmp_path / "out", backbone="timm:resnet18", backbone_weights=None,
                                      input_px=(64, 64)))
    stages = [i.message for i in items if isinstance(i, Stage)]
    assert any("random stratified" in m for m in stages) and any("patient-aware" in m for m in stages)
    # Features are computed once: the second run takes all 400 from the cache.
    feats = [i for i in items if isinstance(i, FeatureProgress)]
    assert feats[-1].cached == 400
    doc = json.loads(res.report_json.read_text())
    assert doc["paper_claims_percent"] == {"accuracy": 96.47, "precision": 96.24, "recall": 96.63, "f1": 97.18}
    assert (doc["runs"]["random"]["train_images"], doc["runs"]["random"]["val_images"]) == (320, 80)
    assert (doc["runs"]["patient"]["train_images"], doc["runs"]["patient"]["val_images"]) == (268, 132)
    for key in ("random", "patient"):
        hyper = doc["runs"][key]["hyperparameters"]
        assert (hyper["optimizer"], hyper["lr"], hyper["batch_size"], hyper["epochs"], hyper["augment"]) == \
            ("Adam", 1e-4, 128, 25, "none")
        assert doc["runs"][key]["figures_percent"]["probe_accuracy"] is not None
        assert (tmp_path / "out" / f"confusion-{key}.png").stat().st_size > 1000
    md = res.report_md.read_text()
    assert "| accuracy | 96.47 % |" in md and "Table III — patient-aware" in md and "one patient" in md
    assert "cannot all hold together" in md  # the paper's F1 above both precision and recall
    assert load_checkpoint(res.runs["patient"].checkpoint).card.training["split"]["kind"].startswith("bach-patient")
    assert res.best in (None, "random", "patient")


@pytest.mark.slow
def test_reproduce_command_with_the_real_resnet152v2(tmp_path: Path, keras_reference: KerasReference, capsys) -> None:
    import_keras_weights(keras_reference.keras2_h5, expected_md5=None)  # what `weights fetch` leaves in the cache
    data = four_kinds_dataset(tmp_path / "photos", n=3, px=128)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no "built without ImageNet weights" warning: the cache is used
        code = main(["reproduce", "--data", str(data), "--out", str(tmp_path / "out"), "--accept-licence"])
    assert code == 0
    captured = capsys.readouterr()
    assert "skipping the patient-aware" in captured.err
    assert "# The paper's model, reproduced" in captured.out and "resnet152v2 (imagenet-keras)" in captured.out
    card = load_checkpoint(tmp_path / "out" / "paper-random.safetensors").card
    assert card.backbone == "resnet152v2" and card.input_px == (256, 256) and card.head["in_channels"] == 2048
    doc = json.loads((tmp_path / "out" / "report.json").read_text())
    if doc["default_model"] == "random":
        assert default_model_path() == (tmp_path / "out" / "paper-random.safetensors").resolve()
    else:
        assert default_model_path() is None and "default model is unchanged" in captured.err
