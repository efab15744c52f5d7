"""The napari-bcd command line: weights, model info, selfcheck; errors are messages, not tracebacks."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch

from conftest import KerasReference
from napari_bcd.classes import BACH_CLASSES
from napari_bcd.cli import main
from napari_bcd.model import build_classifier, save_checkpoint


def test_help_lists_the_commands(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as info:
        main(["--help"])
    assert info.value.code == 0
    out = capsys.readouterr().out
    for cmd in ("weights", "model", "selfcheck"):
        assert cmd in out


def test_console_script_is_installed() -> None:
    exe = Path(sys.executable).with_name("napari-bcd")
    res = subprocess.run([str(exe), "--version"], capture_output=True, text=True, timeout=60)
    assert res.returncode == 0 and res.stdout.startswith("napari-bcd ")


def test_the_console_script_returns_mains_code_and_freezes_what_is_left_for_a_quick_exit(
        monkeypatch: pytest.MonkeyPatch) -> None:
    import gc

    import napari_bcd.cli as cli

    monkeypatch.setattr(cli, "main", lambda: 3)
    try:
        assert cli.console() == 3 and gc.get_freeze_count() > 0
    finally:
        gc.unfreeze()  # this test process goes on: give its objects back to the collector
    script = Path(sys.executable).with_name("napari-bcd").read_text()
    assert "from napari_bcd.cli import console" in script  # the installed script goes through it



def test_train_says_each_problem_with_its_data_once_then_how_many_more(tmp_path: Path) -> None:
    """The console script as a user runs it (its own logging set up): a problem printed by the command is not
    logged again beside it, and beyond ten the rest are counted, with how to list them."""
    import numpy as np
    from PIL import Image

    ds = tmp_path / "ds"
    ds.mkdir()
    for name in ("a1.png", "a2.png"):
        Image.fromarray(np.full((32, 32, 3), 180, np.uint8)).save(ds / name)
    rows = ["a1.png,Tumour", "a2.png,Tumour", *(f"gone{i:02d}.png,Stroma" for i in range(12))]
    (ds / "microscopy_ground_truth.csv").write_text("\n".join(rows) + "\n")
    exe = Path(sys.executable).with_name("napari-bcd")
    res = subprocess.run([str(exe), "train", str(ds), "--out", str(tmp_path / "m.safetensors")],
                         capture_output=True, text=True, timeout=120)
    assert res.returncode == 2 and "at least two classes" in res.stderr  # refused before any feature
    for i in range(10):
        assert res.stderr.count(f"gone{i:02d}.png") == 1, res.stderr
    assert "gone10.png" not in res.stderr and "gone11.png" not in res.stderr
    assert "... and 2 more problems" in res.stderr and "--verbose" in res.stderr
    loud = subprocess.run([str(exe), "--verbose", "train", str(ds), "--out", str(tmp_path / "m.safetensors")],
                          capture_output=True, text=True, timeout=120)
    assert "gone11.png" in loud.stderr

@pytest.mark.slow
def test_weights_import_then_info(keras_reference: KerasReference, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["weights", "info"]) == 1
    assert "not cached" in capsys.readouterr().out
    # The official md5 is checked by default...
    assert main(["weights", "import", str(keras_reference.keras3_h5)]) == 2
    err = capsys.readouterr().err
    assert "md5" in err and "Traceback" not in err
    # ...and can be skipped for a Keras file of one's own.
    assert main(["weights", "import", "--skip-md5", str(keras_reference.keras3_h5)]) == 0
    assert "ImageNet weights ready" in capsys.readouterr().out
    assert main(["weights", "info"]) == 0


def test_weights_fetch_offline_is_a_plain_message(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["weights", "fetch", "--url", "http://127.0.0.1:9/w.h5"]) == 2
    err = capsys.readouterr().err
    assert "napari-bcd weights fetch" in err and "napari-bcd weights import" in err and "Traceback" not in err


def test_model_info_and_selfcheck_on_a_checkpoint(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    torch.manual_seed(0)
    model = build_classifier("timm:resnet18", classes=BACH_CLASSES, backbone_weights=None, input_px=(96, 96),
                             name="tiny")
    path = save_checkpoint(model, path=tmp_path / "tiny.safetensors")
    assert main(["model", "info", str(path)]) == 0
    out = capsys.readouterr().out
    assert "tiny" in out and "Normal, Benign, InSitu, Invasive" in out and "timm:resnet18" in out
    assert main(["selfcheck", "--model", str(path), "--device", "cpu"]) == 0
    out = capsys.readouterr().out
    assert "selfcheck passed" in out and "96x96 px" in out
    assert main(["model", "info", str(tmp_path / "missing.safetensors")]) == 2
    assert "No checkpoint weights" in capsys.readouterr().err


@pytest.mark.slow
def test_selfcheck_builds_the_paper_model(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["selfcheck", "--device", "cpu"]) == 0
    captured = capsys.readouterr()
    assert "58,331,648" in captured.out and "match" in captured.out
    assert "143,620 trainable" in captured.out and "58,475,268" in captured.out
    assert "head is untrained" in captured.out
    assert "WITHOUT its ImageNet weights" in captured.err


def test_classify_writes_outputs_and_goes_on_after_a_bad_slide(
    tmp_path: Path, tiny_checkpoint: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from conftest import SAMPLE_SLIDE

    bad = tmp_path / "notes.svs"
    bad.write_text("not a slide")
    out = tmp_path / "out"
    rc = main(["classify", str(bad), str(SAMPLE_SLIDE), "--model", str(tiny_checkpoint), "--out", str(out), "--device",
               "cpu"])
    assert rc == 1  # one slide failed...
    cap = capsys.readouterr()
    assert "notes.svs" in cap.err and "not a slide" in cap.err and "Traceback" not in cap.err
    stem = "CMU-1-Small-Region"
    for suffix in (".labels.tif", ".probabilities.tif", ".summary.json", ".summary.csv", ".geojson"):
        assert (out / f"{stem}{suffix}").is_file()  # ...and the good one was still done
    assert "slide call:" in cap.out
    before = (out / f"{stem}.summary.json").read_bytes()
    table = (out / "cohort.csv").read_text().splitlines()
    assert table[0].startswith("id,slide,status,error") and len(table) == 3
    assert table[1].startswith("notes,") and ",failed," in table[1] and ",done," in table[2]
    # Complete outputs of the same model and settings are skipped: a rerun finishes only what is missing.
    assert main(["classify", str(SAMPLE_SLIDE), "--model", str(tiny_checkpoint), "--out", str(out)]) == 0
    assert "skipped" in capsys.readouterr().out
    assert (out / f"{stem}.summary.json").read_bytes() == before
    # Outputs of other settings are kept unless --overwrite.
    assert main(["classify", str(SAMPLE_SLIDE), "--model", str(tiny_checkpoint), "--out", str(out), "--stride",
                 "0.5"]) == 1
    assert "--overwrite" in capsys.readouterr().err
    assert (out / f"{stem}.summary.json").read_bytes() == before
    assert main(["classify", str(SAMPLE_SLIDE), "--model", str(tiny_checkpoint), "--out", str(out), "--overwrite",
                 "--stride", "0.5"]) == 0


def test_classify_without_a_model_says_how_to_get_one(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from conftest import SAMPLE_SLIDE

    assert main(["classify", str(SAMPLE_SLIDE), "--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "No trained model" in err and "napari-bcd train" in err and "--model" in err


def test_classify_uses_the_default_model(tmp_path: Path, tiny_checkpoint: Path,
                                         monkeypatch: pytest.MonkeyPatch) -> None:
    from conftest import DATA

    monkeypatch.setenv("NAPARI_BCD_MODEL", str(tiny_checkpoint))
    assert main(["classify", str(DATA / "stardist-histo-500x300.jpg"), "--mpp", "1.0", "--out", str(tmp_path)]) == 0
    assert (tmp_path / "stardist-histo-500x300.summary.json").is_file()


def test_export_train_evaluate_commands(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    import json

    from conftest import SAMPLE_SLIDE
    from napari_bcd.config import default_model_path

    def region(x0: int, y0: int, x1: int, y1: int, name: str, fid: str) -> dict:
        ring = [[x0, y0], [x1, y0], [x1, y1], [x0, y1], [x0, y0]]
        return {"type": "Feature", "id": fid, "geometry": {"type": "Polygon", "coordinates": [ring]},
                "properties": {"objectType": "annotation", "classification": {"name": name}}}

    regions = {  # two regions of each class, apart: a region is what validation must never split
        "type": "FeatureCollection",
        "features": [region(900, 0, 1500, 650, "Tumor", "t1"), region(900, 850, 1500, 1500, "Tumor", "t2"),
                     region(800, 1500, 1600, 2150, "Benign", "b1"), region(800, 2350, 1600, 2967, "Benign", "b2")],
    }
    (tmp_path / "regions.geojson").write_text(json.dumps(regions))
    ds = tmp_path / "iciar"
    assert main(["export-patches", str(SAMPLE_SLIDE), str(tmp_path / "regions.geojson"), "--out", str(ds),
                 "--field-um", "100", "--label", "Tumor=Invasive", "--min-per-class", "5"]) == 0
    out = capsys.readouterr()
    assert "patches to" in out.out and "too few patches for" not in out.err
    ckpt = tmp_path / "model.safetensors"
    assert main(["train", str(ds), "--out", str(ckpt), "--backbone", "timm:resnet18", "--backbone-weights", "none",
                 "--preprocess", "imagenet", "--input-px", "64", "--epochs", "3", "--batch-size", "16"]) == 0
    out = capsys.readouterr()
    assert "4 regions (from iciar/provenance.csv)" in out.err and "cross-validation over 4 regions" in out.err
    assert "fold 4/4" in out.err and "macro avg" in out.out and ckpt.is_file()
    # four regions are too few to promise anything about new patients: said, with the spread across the folds
    assert "simple classifier" in out.out and "Accuracy on held-out regions" in out.out
    assert "Only 4 regions: TOO FEW TO PROMISE ANYTHING" in out.out and "Across the 4 folds" in out.out
    assert json.loads(ckpt.with_suffix(".json").read_text())["field_um"] == [100.0, 100.0]  # from the patches
    if "it is now the default model" in out.out:  # it beat chance on its validation patches
        assert default_model_path() == ckpt.resolve()  # the widget and classify now use it
    else:
        assert "NOT made the default" in out.out and default_model_path() is None
    assert main(["evaluate", str(ckpt), str(ds), "--out", str(tmp_path / "eval")]) == 0
    assert (tmp_path / "eval" / "confusion_matrix.png").is_file()
    report = json.loads((tmp_path / "eval" / "report.json").read_text())
    assert report["classes"] == ["Benign", "Invasive"] and report["support"][1] > 0  # the regions' two classes
    # the figure first, with its 95 % interval drawn over the regions (the patches of one stand or fall together),
    # beside what training reported and how; the calibration error of the probabilities in the table
    out = capsys.readouterr().out
    headline = out.splitlines()[0]
    assert headline.startswith(f"model.safetensors on {sum(report['support'])} images of ")
    assert f"accuracy {report['accuracy']:.1%}, 95% interval " in headline and "(4 regions resampled" in headline
    assert "Its training reported" in headline and "cross-validation over 4 regions" in headline
    lo, hi = report["interval"]
    assert 0 <= lo <= report["accuracy"] <= hi <= 1 and report["interval_method"].startswith("4 regions resampled")
    assert 0 <= report["ece"] <= 1 and "calibration error (ECE) of the probabilities" in out


def test_a_command_leaves_the_signal_handlers_as_it_found_them(tmp_path: Path) -> None:
    """Issue 36: main() installs its SIGTERM/SIGINT handlers for the command only; a program that calls it keeps its
    own afterwards, whether the command succeeds or fails."""
    import signal

    from napari_bcd.cli import main

    def mine(signum, frame):  # a host program's own handler
        pass

    before = signal.signal(signal.SIGTERM, mine)
    interrupt = signal.getsignal(signal.SIGINT)  # Python's default, or SIG_IGN when started in the background
    try:
        assert main(["model", "info", str(tmp_path / "missing.safetensors")]) == 2
        assert signal.getsignal(signal.SIGTERM) is mine
        assert signal.getsignal(signal.SIGINT) is interrupt
        assert main(["weights", "info"]) in (0, 1)  # 1: no ImageNet weights cached here
        assert signal.getsignal(signal.SIGTERM) is mine
    finally:
        signal.signal(signal.SIGTERM, before)


def test_evaluate_says_why_it_gives_no_interval(tmp_path: Path) -> None:
    """Images of one patient only: no interval is drawn, and the headline says why instead of leaving it out."""
    from types import SimpleNamespace

    from napari_bcd.cli.train import _evaluation_headline
    from napari_bcd.train.evaluate import accuracy_interval, report_from_predictions

    report = report_from_predictions([0, 1, 1], [0, 1, 0], ["Benign", "Invasive"])
    report.interval, report.interval_method = accuracy_interval([True, True, False], ["P1"] * 3, kind="patient")
    ds = SimpleNamespace(root=tmp_path, counts=lambda: {"Benign": 1, "Invasive": 2})
    text = _evaluation_headline(str(tmp_path / "gone.safetensors"), ds, report)  # no card to read: figure alone
    assert text == (f"gone.safetensors on 3 images of {tmp_path} (Benign 1, Invasive 2): accuracy 66.7% (no interval: "
                    "one patient only: no interval says anything about others).")
