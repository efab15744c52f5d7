"""Training that learns from a few annotated images: any dataset size, the probe as the floor, honest figures."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import numpy as np
import pytest

from conftest import drain, four_kinds_dataset
from napari_bcd.cli import main
from napari_bcd.config import default_model_path
from napari_bcd.errors import DatasetError
from napari_bcd.model import load_checkpoint
from napari_bcd.train import FeatureProgress, FitProgress, TrainPlan, evaluate, iter_finetune, read_iciar
from napari_bcd.train.protocol import PAPER

SMALL = {"backbone": "timm:resnet18", "backbone_weights": None, "input_px": (64, 64), "field_um": (100.0, 100.0)}
SMALL_CLI = ["--backbone", "timm:resnet18", "--backbone-weights", "none", "--input-px", "64", "--field-um", "100"]


def test_twelve_images_train_without_a_traceback(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    ds = four_kinds_dataset(tmp_path / "ds", n=3)
    assert main(["train", str(ds), "--out", str(tmp_path / "m"), *SMALL_CLI]) == 0
    out = capsys.readouterr()
    # no patient is known: cross-validation over images chooses the probe's regularisation (one standard error
    # towards the stronger) and nothing else; the flips that only a head learns from are not computed
    assert "12 images x 1 view(s)" in out.err and "cross-validation over images" in out.err
    assert "simple classifier" in out.out and "the model saved, on the held-out images" in out.out
    assert "cannot be trusted to choose" in out.out
    card = load_checkpoint(tmp_path / "m.safetensors").card
    assert card.training["protocol"]["name"] == "auto" and card.head["type"] == "linear"
    assert card.training["probe"]["accuracy"] is not None
    sel = card.training["selection"]
    assert sel["candidates"] == 1 and sel["shipped"] == "probe" and not sel["heads_measured"]
    assert sel["probe_tuning"]["chosen_c"] in sel["probe_tuning"]["grid"] and "one standard error" in \
        sel["probe_tuning"]["rule"]


def test_datasets_too_small_to_validate_or_to_learn(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    # One image per class: nothing to validate on; the probe is what it trains, it says so, and is not the default.
    ds = four_kinds_dataset(tmp_path / "one", n=1)
    assert main(["train", str(ds), "--out", str(tmp_path / "one.safetensors"), *SMALL_CLI]) == 0
    out = capsys.readouterr()
    assert "nothing is left to validate on" in out.err and "No validation" in out.out
    assert "NOT made the default" in out.out and default_model_path() is None
    card = load_checkpoint(tmp_path / "one.safetensors").card
    assert card.metrics == {} and card.training["validation"] is False and card.training["split"]["train"] == 4
    assert card.training["selection"]["shipped"] == "probe"
    # A class with one image trains only; the others still validate.
    mixed = four_kinds_dataset(tmp_path / "mixed", n=3)
    for p in sorted((mixed / "Normal").iterdir())[1:]:
        p.unlink()
    items, result = drain(iter_finetune(read_iciar(mixed), out=tmp_path / "mixed.safetensors", **SMALL))
    plan = items[0]
    assert isinstance(plan, TrainPlan) and "Normal has one image" in plan.message
    assert result.report is not None and result.report.support[0] == 0
    # One class only: a clear error before any feature is computed.
    only = tmp_path / "only"
    shutil.copytree(ds / "Benign", only / "Benign")
    with pytest.raises(DatasetError, match="at least two classes"):
        iter_finetune(read_iciar(only), out=tmp_path / "x.safetensors", **SMALL)  # checked when called
    assert main(["train", str(only), "--out", str(tmp_path / "x"), *SMALL_CLI]) == 2
    assert "Traceback" not in capsys.readouterr().err


def test_default_protocol_is_never_below_the_probe_and_its_figure_is_the_checkpoints(tmp_path: Path) -> None:
    from napari_bcd.train.groups import group_dataset

    # six "patients", each with one image of every class (normal003, benign003... are patient 3), held out whole
    ds = group_dataset(read_iciar(four_kinds_dataset(tmp_path / "ds", n=6)), pattern=r"^[a-z]+00(\d)",
                       kind="patient")
    items, auto = drain(iter_finetune(ds, out=tmp_path / "auto.safetensors", validation="holdout", **SMALL))
    assert auto.probe.report is not None and auto.validation.mode == "holdout" and auto.validation.grouped
    assert auto.report.accuracy >= auto.probe.report.accuracy - 1e-9
    assert auto.beats_chance and not auto.head_below_probe
    # The first measurement is the probe-started head; the saved model gives the report's predictions on the
    # held-out images from raw features (standardisation folded into its first conv, temperature into its last).
    fits = [i for i in items if isinstance(i, FitProgress)]
    assert fits[0].step == 0 and math.isnan(fits[0].train_loss)
    val_files = auto.card.training["split"]["val_files"]  # paths in the folder: Benign/benign000.png
    val = [i for i, p in enumerate(ds.paths) if p.relative_to(ds.root).as_posix() in val_files]
    assert len(val) == len(val_files) > 0
    assert evaluate(auto.checkpoint, ds, indices=val).accuracy == pytest.approx(auto.report.accuracy)
    hyper = auto.card.training["hyperparameters"]
    assert hyper["head_start"].startswith("the linear probe") and hyper["feature_standardisation"].startswith("per")
    assert auto.card.metrics["probe_accuracy"] == pytest.approx(auto.probe.report.accuracy)
    assert auto.card.training["selection"]["heads_measured"] and len(auto.card.training["curves"]) > 1


def test_paper_protocol_is_the_papers_exactly(tmp_path: Path) -> None:
    ds = read_iciar(four_kinds_dataset(tmp_path / "ds", n=5))
    items, result = drain(iter_finetune(ds, out=tmp_path / "p.safetensors", protocol="paper", **SMALL))
    card = load_checkpoint(result.checkpoint).card
    hyper = card.training["hyperparameters"]
    assert (hyper["optimizer"], hyper["lr"], hyper["batch_size"], hyper["epochs"]) == ("Adam", 1e-4, 128, 25)
    assert hyper["augment"] == "none" and hyper["sampling"] == "shuffled" and hyper["temperature"] == 1.0
    assert hyper["head_start"].startswith("random") and hyper["feature_standardisation"] == "none"
    assert card.training["split"]["kind"] == "stratified 80%/20%, seed 0"
    # 16 training images, one step per epoch: a measurement after each of the 25 epochs
    assert [i.step for i in items if isinstance(i, FitProgress)][1:] == list(range(1, 26))
    assert json.loads(json.dumps(PAPER.to_dict())) == card.training["protocol"]["settings"]


def test_backbone_weights_state_their_preprocessing(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    import timm
    from safetensors.torch import save_file

    state = {k: v.contiguous() for k, v in timm.create_model("resnet18", pretrained=False).state_dict().items()}
    save_file(state, tmp_path / "unit.safetensors", metadata={"preprocess": "unit"})
    save_file(state, tmp_path / "ms.safetensors", metadata={"mean": "[123.675, 116.28, 103.53]",
                                                            "std": "58.395,57.12,57.375"})
    ds = four_kinds_dataset(tmp_path / "ds", n=2)
    args = ["--backbone", "timm:resnet18", "--input-px", "64", "--field-um", "100", "--epochs", "1"]
    assert main(["train", str(ds), "--out", str(tmp_path / "a"), "--backbone-weights",
                 str(tmp_path / "unit.safetensors"), *args]) == 0
    assert "unit (x / 255) (stated by the backbone weights file)" in capsys.readouterr().out
    card = json.loads((tmp_path / "a.json").read_text())
    assert card["preprocessing"]["mode"] == "unit"
    assert main(["train", str(ds), "--out", str(tmp_path / "b"), "--backbone-weights",
                 str(tmp_path / "ms.safetensors"), *args]) == 0
    pre = json.loads((tmp_path / "b.json").read_text())["preprocessing"]
    assert pre["mode"] == "meanstd" and np.allclose(pre["mean"], (0.485, 0.456, 0.406), atol=1e-3)
    # What the user says wins.
    assert main(["train", str(ds), "--out", str(tmp_path / "c"), "--backbone-weights",
                 str(tmp_path / "unit.safetensors"),
                 "--preprocess", "tf", *args]) == 0
    assert json.loads((tmp_path / "c.json").read_text())["preprocessing"]["mode"] == "tf"
    assert "pixels    tf" in load_checkpoint(tmp_path / "c.safetensors").card.describe()


def test_a_model_that_does_not_beat_chance_is_not_made_the_default(tmp_path: Path, capsys) -> None:
    # Two classes holding the very same pixels: no model can tell them apart on validation.
    ds = four_kinds_dataset(tmp_path / "ds", n=4)
    for cls in ("InSitu", "Invasive", "Normal"):
        shutil.rmtree(ds / cls)
    (ds / "Normal").mkdir()
    for p in (ds / "Benign").iterdir():
        shutil.copy(p, ds / "Normal" / ("n-" + p.name))
    (ds / "microscopy_ground_truth.csv").unlink()
    (tmp_path / "val.txt").write_text("benign000.png\nn-benign000.png\n")
    args = ["train", str(ds), "--out", str(tmp_path / "m"), "--split", str(tmp_path / "val.txt"), *SMALL_CLI]
    assert main(args) == 0
    out = capsys.readouterr().out
    assert "does not beat chance" in out and "NOT made the default" in out and default_model_path() is None
    assert main([*args, "--make-default", "--overwrite"]) == 0
    assert default_model_path() == (tmp_path / "m.safetensors").resolve()
    assert "because --make-default asked for it" in capsys.readouterr().out


def test_features_are_not_recomputed_for_the_probe(tmp_path: Path) -> None:
    ds = read_iciar(four_kinds_dataset(tmp_path / "ds", n=3))
    items, result = drain(iter_finetune(ds, out=tmp_path / "m.safetensors", **SMALL))
    feats = [i for i in items if isinstance(i, FeatureProgress)]
    assert feats[-1].done == len(ds) and result.probe.seconds < 30
