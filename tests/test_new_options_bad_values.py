"""Bad values of the options this version added end in a message, never a traceback."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from conftest import SAMPLE_SLIDE
from napari_bcd.cli import main


def _fails(args: list[str], capsys, *, code: int = 2) -> str:
    """Run the CLI; it must exit with ``code`` and say why (argparse usage errors exit 2 too)."""
    try:
        rc = main(args)
    except SystemExit as stop:
        rc = stop.code
    err = capsys.readouterr().err
    assert rc == code, err
    assert "Traceback" not in err and err.strip()
    return err


@pytest.mark.parametrize("value", ["Invasive", "Invasive=0", "Invasive=nan", "Invasive=1.5", "=0.3", "Invasive=-1"])
def test_bad_thresholds(value: str, tiny_checkpoint: Path, tmp_path: Path, capsys) -> None:
    err = _fails(["classify", str(SAMPLE_SLIDE), "--model", str(tiny_checkpoint), "--out", str(tmp_path),
                  "--threshold", value], capsys)
    assert "CLASS=P" in err


@pytest.mark.parametrize("option,value", [("--min-confidence", "-0.1"), ("--min-confidence", "nan"),
                                          ("--min-quality", "2"), ("--stain-normalize", "reinhard"),
                                          ("--uncertainty", "variance")])
def test_bad_cut_offs_and_choices(option: str, value: str, tiny_checkpoint: Path, tmp_path: Path, capsys) -> None:
    _fails(["classify", str(SAMPLE_SLIDE), "--model", str(tiny_checkpoint), "--out", str(tmp_path), option, value],
           capsys)


def test_bad_cohort_inputs(tiny_checkpoint: Path, tmp_path: Path, capsys) -> None:
    base = ["classify", "--model", str(tiny_checkpoint), "--out", str(tmp_path / "out")]
    assert "local:N" in _fails([*base, str(SAMPLE_SLIDE), "--cluster", "local:0"], capsys)
    assert "cannot be read" in _fails([*base, "--manifest", str(tmp_path / "missing.csv")], capsys)
    (tmp_path / "empty.csv").write_text("")
    assert "'path' column" in _fails([*base, "--manifest", str(tmp_path / "empty.csv")], capsys)
    assert "No slides given" in _fails(base, capsys)
    # a model without stain statistics cannot normalise: that slide fails with the reason, the run says so
    err = _fails([*base, str(SAMPLE_SLIDE), "--stain-normalize", "macenko"], capsys, code=1)
    assert "no macenko stain statistics" in err


def test_bad_retrain_inputs(tiny_checkpoint: Path, tmp_path: Path, capsys) -> None:
    base = ["retrain", str(tiny_checkpoint), "--slide", str(SAMPLE_SLIDE)]
    assert "does not exist" in _fails([*base, "--corrections", str(tmp_path / "none.geojson")], capsys)
    for option, value in (("--weight", "0"), ("--weight", "nan"), ("--steps", "-1"), ("--steps", "0")):
        _fails([*base, "--corrections", "x.geojson", option, value], capsys)
    far = tmp_path / "far.geojson"  # a classified polygon nowhere near the slide
    far.write_text(json.dumps({"type": "FeatureCollection", "features": [{
        "type": "Feature", "geometry": {"type": "Polygon", "coordinates": [[[9e5, 9e5], [9e5 + 10, 9e5],
                                                                             [9e5 + 10, 9e5 + 10], [9e5, 9e5]]]},
        "properties": {"objectType": "annotation", "classification": {"name": "Invasive"}}}]}))
    assert "No cell centre" in _fails([*base, "--corrections", str(far)], capsys)
    broken = tmp_path / "broken.geojson"
    broken.write_text("{not json")
    assert "not valid JSON" in _fails([*base, "--corrections", str(broken)], capsys)


def test_retrain_with_a_card_and_weights_of_different_class_counts(tiny_checkpoint: Path, tmp_path: Path,
                                                                   capsys) -> None:
    from safetensors.torch import load_file, save_file

    card = json.loads(tiny_checkpoint.with_suffix(".json").read_text())
    card["classes"] = card["classes"][:2]  # a card edited to two classes, its hash removed so it is not caught there
    card.pop("weights_sha256", None)
    for embedded in (True, False):  # the four-class card inside the weights, or weights without one
        stem = tmp_path / f"two-{embedded}"
        if embedded:
            stem.with_suffix(".safetensors").write_bytes(tiny_checkpoint.read_bytes())
        else:
            save_file(load_file(str(tiny_checkpoint)), str(stem.with_suffix(".safetensors")))
        stem.with_suffix(".json").write_text(json.dumps(card))
        before = stem.with_suffix(".safetensors").read_bytes()
        corrections = tmp_path / "c.geojson"
        corrections.write_text(json.dumps({"type": "FeatureCollection", "features": [{
            "type": "Feature", "properties": {"objectType": "annotation", "classification": {"name": "Benign"}},
            "geometry": {"type": "Polygon", "coordinates": [[[500, 500], [1500, 500], [1500, 1500], [500, 1500],
                                                             [500, 500]]]}}]}))
        err = _fails(["retrain", str(stem.with_suffix(".safetensors")), "--slide", str(SAMPLE_SLIDE),
                      "--corrections", str(corrections), "--out", str(tmp_path / f"out-{embedded}.safetensors")],
                     capsys)
        assert ("the weights were saved with" if embedded else "do not fit the card's network") in err
        assert stem.with_suffix(".safetensors").read_bytes() == before
        assert not (tmp_path / f"out-{embedded}.safetensors").exists()


def test_bad_decisions_and_training_options(tiny_checkpoint: Path, tmp_path: Path, capsys) -> None:
    assert "Tumour" in _fails(["model", "decision", str(tiny_checkpoint), "--threshold", "Tumour=0.5"], capsys)
    from conftest import four_kinds_dataset

    root = four_kinds_dataset(tmp_path / "d", n=2, px=64)
    # the option that always refused is gone (issue 36); --no-groups with groups given is refused
    err = _fails(["train", str(root), "--out", str(tmp_path / "m"), "--backbone", "timm:resnet18",
                  "--backbone-weights", "none", "--finetune-last-stage"], capsys)
    assert "unrecognized arguments: --finetune-last-stage" in err
    err = _fails(["train", str(root), "--out", str(tmp_path / "m"), "--no-groups", "--group-pattern", "(x)"], capsys)
    assert "--no-groups" in err and not (tmp_path / "m.safetensors").exists()


@pytest.mark.parametrize("value", ["0", "1", "-3", "2.5", "nan", "ten", "51"])
def test_bad_fold_counts(value: str, tmp_path: Path, capsys) -> None:
    """--folds (default: 10 over groups, 5 over images) refuses what is not a whole number from 2 to 50."""
    from conftest import four_kinds_dataset

    root = four_kinds_dataset(tmp_path / "d", n=2, px=64)
    err = _fails(["train", str(root), "--out", str(tmp_path / "m"), "--folds", value], capsys)
    assert "--folds" in err and not (tmp_path / "m.safetensors").exists()


@pytest.mark.parametrize("value", [0, 1, -2, 2.5, True, "5"])
def test_bad_fold_counts_in_the_settings(value) -> None:
    from napari_bcd.errors import BcdError
    from napari_bcd.settings import TrainSettings

    assert TrainSettings().folds is None and TrainSettings(folds=2).folds == 2
    with pytest.raises(BcdError, match="folds must be a whole number of at least 2"):
        TrainSettings(folds=value)


def test_a_retrain_without_bound_is_refused_at_once(tiny_checkpoint: Path, tmp_path: Path, capsys) -> None:
    """Issue 40: ``retrain --steps 1e20`` (or its whole-number spelling) is refused before any work, naming the
    bound; the settings object refuses it too."""
    from napari_bcd.errors import BcdError
    from napari_bcd.review import RetrainSettings

    base = ["retrain", str(tiny_checkpoint), "--corrections", str(tmp_path / "c.geojson"), "--slide",
            str(tmp_path / "s.svs")]
    for steps in ("1e20", str(10**20), "0", "-3"):
        err = _fails([*base, "--steps", steps], capsys)
        assert "--steps" in err and ("whole number" in err or "at most 100000" in err or "at least 1" in err), err
    with pytest.raises(BcdError, match="steps is at most 100,000"):
        RetrainSettings(steps=10**20)
    with pytest.raises(BcdError, match="views must be 1, 2, 4 or 8"):
        RetrainSettings(views=3)
