"""Numbers that hold on new patients: groups never split, validation said in words, the probe as a floor."""

from __future__ import annotations

import csv
import math
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from conftest import SAMPLE_SLIDE, drain, four_kinds_dataset
from napari_bcd.annotations import Annotation
from napari_bcd.classes import canonical_class
from napari_bcd.cli import main
from napari_bcd.errors import DatasetError
from napari_bcd.io import open_slide
from napari_bcd.train import iter_export_patches, iter_finetune, plan_validation, read_iciar, split_dataset
from napari_bcd.train.groups import group_dataset, groups_from_csv, groups_from_pattern
from napari_bcd.train.split import group_folds, grouped_holdout

CLASSES = ("Normal", "Benign", "InSitu", "Invasive")
SMALL = {"backbone": "timm:resnet18", "backbone_weights": None, "input_px": (64, 64), "field_um": (100.0, 100.0)}
SMALL_CLI = ["--backbone", "timm:resnet18", "--backbone-weights", "none", "--input-px", "64", "--field-um", "100"]


@st.composite
def layouts(draw):
    """Random group layouts: a few groups or many, one class per group or mixed, lopsided sizes."""
    n_groups = draw(st.integers(1, 30))
    labels, groups = [], []
    for g in range(n_groups):
        size = draw(st.integers(1, 40))
        mixed = draw(st.booleans())
        first = draw(st.integers(0, 3))
        for _ in range(size):
            labels.append(draw(st.integers(0, 3)) if mixed else first)
            groups.append(f"g{g}")
    return np.asarray(labels), groups


@settings(max_examples=200, deadline=None)
@given(layouts(), st.floats(0.05, 0.6), st.integers(0, 1000))
def test_a_grouped_split_never_puts_a_group_on_both_sides(layout, fraction: float, seed: int) -> None:
    labels, groups = layout
    train, val, notes = grouped_holdout(labels, groups, CLASSES, fraction, seed)
    g = np.asarray(groups)
    assert sorted(train + val) == list(range(len(labels)))  # every image on exactly one side
    assert not set(g[train]) & set(g[val])
    # no class loses all of its training images to validation
    for c in set(labels.tolist()):
        assert (labels[train] == c).any()
    if not val:
        assert any("too few groups" in n for n in notes)
    for tr, va in group_folds(labels, groups, CLASSES, 5, seed):
        assert not set(g[tr]) & set(g[va]) and len(tr) + len(va) == len(labels)


def test_grouped_split_is_stratified_as_far_as_the_groups_allow() -> None:
    rng = np.random.default_rng(0)
    labels, groups = [], []
    for g in range(40):  # 40 patients, ten per class, 5-15 photos each
        n = int(rng.integers(5, 16))
        labels += [g % 4] * n
        groups += [f"p{g}"] * n
    labels = np.asarray(labels)
    _, val, _ = grouped_holdout(labels, groups, CLASSES, 0.2, 0)
    share = np.bincount(labels[val], minlength=4) / np.bincount(labels, minlength=4)
    assert np.all(np.abs(share - 0.2) < 0.1), share


def _ds_with_groups(tmp_path: Path, n: int = 6, patients: int = 3) -> Path:
    """Four kinds of real pixels; the ground truth's third column names one of ``patients`` per class."""
    root = four_kinds_dataset(tmp_path / "ds", n=n)
    rows = []
    for line in (root / "microscopy_ground_truth.csv").read_text().splitlines():
        name, label = line.split(",")
        k = int(name[-7:-4])
        rows.append(f"{name},{label},{label[:3]}-patient{k % patients}")
    (root / "microscopy_ground_truth.csv").write_text("\n".join(rows) + "\n")
    return root


def test_the_third_column_groups_files_and_patterns_are_read(tmp_path: Path) -> None:
    root = _ds_with_groups(tmp_path)
    ds = read_iciar(root)
    assert ds.n_groups == 12 and ds.group_kind == "group" and "third column" in ds.group_source
    # --groups FILE.csv wins over the folder's own, with a header row allowed
    gfile = tmp_path / "groups.csv"
    gfile.write_text("file,patient\n" + "\n".join(f"{p.name},P{i % 5}" for i, p in enumerate(ds.paths)) + "\n")
    mine = group_dataset(ds, groups_csv=gfile, kind="patient")
    assert mine.n_groups == 5 and mine.group_kind == "patient" and mine.group_source == "--groups groups.csv"
    assert groups_from_csv(gfile)[ds.paths[0].name] == "P0"
    # --group-pattern: the first capture group of the file name
    by_class = group_dataset(ds, pattern=r"^([a-z]+)\d+")
    assert by_class.n_groups == 4
    assert groups_from_pattern(["P12_003.png"], r"^(P\d+)_") == {"P12_003.png": "P12"}
    for bad, match in ((r"^P\d+_", "no capture group"), (r"([", "not a regular expression"), (r"^(zz)", "does not")):
        with pytest.raises(DatasetError, match=match):
            group_dataset(ds, pattern=bad)
    with pytest.raises(DatasetError, match="not both"):
        group_dataset(ds, groups_csv=gfile, pattern="(x)")
    partial = tmp_path / "partial.csv"
    partial.write_text(f"{ds.paths[0].name},P0\n")
    with pytest.raises(DatasetError, match="no group for"):
        group_dataset(ds, groups_csv=partial)
    twice = tmp_path / "twice.csv"
    twice.write_text(f"{ds.paths[0].name},A\n{ds.paths[0].name},B\n")
    with pytest.raises(DatasetError, match="two groups"):
        groups_from_csv(twice)
    # a third column that covers only some images is reported and ignored, never half-applied
    lines = (root / "microscopy_ground_truth.csv").read_text().splitlines()
    lines[0] = ",".join(lines[0].split(",")[:2])
    (root / "microscopy_ground_truth.csv").write_text("\n".join(lines) + "\n")
    half = read_iciar(root)
    assert half.groups is None and any("third column" in p for p in half.problems)


def _box(y0: float, x0: float, y1: float, x1: float, cls: int, group: str) -> Annotation:
    return Annotation("region", canonical_class(cls), np.array([[y0, x0], [y0, x1], [y1, x1], [y1, x0]]), group=group)


def test_exported_patches_record_their_region_and_train_grouped_by_it(tmp_path: Path) -> None:
    regions = [  # 300 px (150 µm) apart: no window of one region overlaps a window of another
        _box(100, 900, 600, 1500, 4, "tumour-a"),
        _box(900, 900, 1400, 1500, 4, "tumour-b"),
        _box(1700, 800, 2100, 1600, 2, "benign-a"),
        _box(2400, 800, 2900, 1600, 2, "benign-b"),
    ]
    with open_slide(SAMPLE_SLIDE) as slide:
        drain(iter_export_patches(slide, regions, tmp_path / "iciar", field_um=(100.0, 100.0), stride=0.5,
                                  min_per_class=1))
    with open(tmp_path / "iciar" / "provenance.csv") as fh:
        rows = list(csv.DictReader(fh))
    assert {r["region"] for r in rows} == {"tumour-a", "tumour-b", "benign-a", "benign-b"}
    ds = read_iciar(tmp_path / "iciar")
    assert ds.group_kind == "region" and ds.n_groups == 4
    # Overlapping windows (stride 0.5) of one region never straddle the split
    s = split_dataset(ds)
    g = np.asarray(ds.groups)
    assert s.grouped and not set(g[s.train]) & set(g[s.val]) and s.val_groups >= 1
    assert "never seen in training" in s.describe()


def test_regions_whose_windows_overlap_are_one_group(tmp_path: Path) -> None:
    from napari_bcd.train.groups import _merge_overlapping

    rows = [{"filename": "a.png", "slide": "s", "region": "1", "y": "0", "x": "0", "h": "100", "w": "100"},
            {"filename": "b.png", "slide": "s", "region": "2", "y": "50", "x": "50", "h": "100", "w": "100"},
            {"filename": "c.png", "slide": "s", "region": "3", "y": "500", "x": "500", "h": "100", "w": "100"},
            {"filename": "d.png", "slide": "t", "region": "1", "y": "0", "x": "0", "h": "100", "w": "100"}]
    groups = _merge_overlapping(rows)
    assert groups["a.png"] == groups["b.png"] != groups["c.png"] and groups["d.png"] != groups["a.png"]


def test_validation_by_image_is_called_optimistic_in_plain_words(tmp_path: Path,
                                                                 capsys: pytest.CaptureFixture[str]) -> None:
    root = four_kinds_dataset(tmp_path / "ds", n=4)
    ds = read_iciar(root)
    assert ds.groups is None
    plan = plan_validation(ds)
    # cross-validation over images: every image trains the model shipped, the figure said to be optimistic
    assert plan.mode == "cv" and not plan.grouped and plan.optimistic and "optimistic" in plan.describe()
    assert len(plan.folds) == 4  # at most 5 folds over images (4 images of each class here)
    assert main(["train", str(root), "--out", str(tmp_path / "m"), *SMALL_CLI]) == 0
    out = capsys.readouterr()
    assert "no patient, slide or region is known" in out.err
    assert "optimistic" in out.out and "expect less on new patients" in out.out and "simple classifier" in out.out
    # the verdict says each thing once (it said "optimistic" three times, and a note said it twice more), and what
    # to do about it; the simple classifier's folds are lines, not empty step bars ("fold 1/4: 0step")
    verdict = next(line for line in out.out.splitlines() if line.startswith("Accuracy "))
    assert verdict.count("optimistic") == 1 and verdict.count("remembering") == 1
    assert "Say which patient each image comes from" in verdict and "Saved: the simple classifier" in verdict
    assert "No group is known" not in out.out + out.err and "0step" not in out.err
    assert "fold 1/4: the simple classifier, held-out loss" in out.err
    assert "its regularisation C = " in out.out  # the rule in full, in the report under the verdict
    from napari_bcd.model import load_checkpoint

    card = load_checkpoint(tmp_path / "m.safetensors").card
    assert card.metrics["optimistic"] is True and card.training["split"]["optimistic"] is True
    assert "optimistic" in card.describe()


def test_grouped_cross_validation_ships_a_model_trained_on_everything(tmp_path: Path,
                                                                     capsys: pytest.CaptureFixture[str]) -> None:
    root = _ds_with_groups(tmp_path, n=6, patients=3)
    assert main(["train", str(root), "--out", str(tmp_path / "m"), "--group-kind", "patient", *SMALL_CLI]) == 0
    out = capsys.readouterr()
    assert "12 patients" in out.err and "never split" in out.err
    assert "Expected accuracy on new patients" in out.out and "cross-validation over 12 patients" in out.out
    assert "optimistic" not in out.out
    from napari_bcd.model import load_checkpoint

    card = load_checkpoint(tmp_path / "m.safetensors").card
    split = card.training["split"]
    assert split["mode"] == "cv" and split["grouped"] and split["groups"] == 12 and not split["optimistic"]
    assert card.training["data"]["groups"]["kind"] == "patient"
    sel = card.training["selection"]
    assert sel["candidates"] > 1 and sel["shipped"] in ("probe", "head") and len(sel["fold_accuracy"]) >= 2
    # over groups, 10 folds by default (each trains on nine tenths of the patients: a less pessimistic figure);
    # fewer when asked, never more than there are groups
    assert split["folds"] == 10 and "10 folds" in out.out
    ds = read_iciar(root)
    assert len(plan_validation(ds).folds) == 10 and len(plan_validation(ds, folds=5).folds) == 5
    assert len(plan_validation(ds, folds=40).folds) == 12
    assert card.metrics["accuracy"] == pytest.approx(card.training["validation_report"]["accuracy"])
    assert "new patients" in card.describe()


def test_the_shipped_probe_is_the_tuned_logistic_regression_exactly(tmp_path: Path) -> None:
    """When the probe ships, the model IS scikit-learn's logistic regression on the averaged features, with the
    regularisation the run chose (a linear head computes it: no approximation of it in the Table II head)."""
    import torch
    from sklearn.linear_model import LogisticRegression
    from sklearn.preprocessing import StandardScaler

    from napari_bcd.model import LinearHead, load_checkpoint
    from napari_bcd.windows import resize_area

    ds = read_iciar(_ds_with_groups(tmp_path, n=6, patients=3))
    # a recipe so short it cannot do better, so the probe is what ships
    from napari_bcd.train.protocol import AUTO

    proto = AUTO.with_overrides(max_steps=1, eval_every=1)
    _, result = drain(iter_finetune(ds, out=tmp_path / "p.safetensors", protocol=proto, feature_precision="fp32",
                                    **SMALL))  # the features the model computes at fp32, as below
    assert result.shipped == "probe" and result.logistic is not None and result.tuning.folds >= 2
    model = load_checkpoint(result.checkpoint)
    assert isinstance(model.head, LinearHead) and model.card.head["type"] == "linear"
    x = np.stack([resize_area(ds.load(i), (64, 64)) for i in range(len(ds))])
    with torch.no_grad():
        t = model.normalise(torch.from_numpy(x))
        pooled = model.backbone(t).mean(dim=(2, 3)).double().numpy()
        shipped = torch.softmax(model(t), 1).double().numpy()
    scaler = StandardScaler().fit(pooled)
    lr = LogisticRegression(C=result.tuning.chosen, max_iter=3000, class_weight="balanced", random_state=0)
    lr.fit(scaler.transform(pooled), ds.labels)
    logits = lr.decision_function(scaler.transform(pooled)) / result.logistic.temperature
    sk = np.exp(logits - logits.max(1, keepdims=True))
    sk /= sk.sum(1, keepdims=True)
    assert (shipped.argmax(1) == sk.argmax(1)).all()
    assert np.abs(shipped - sk).max() < 1e-4
    assert "Saved: the simple classifier" in result.verdict() and "regularisation C =" in result.why


def test_selection_takes_the_simplest_within_one_standard_error() -> None:
    from napari_bcd.train.headfit import Recipe
    from napari_bcd.train.select import Candidate, _one_standard_error

    probe = Candidate(None, 0, correct=80, seen=100, fold_acc=[0.7, 0.8, 0.9])
    slightly = Candidate(Recipe(), 100, correct=82, seen=100, fold_acc=[0.72, 0.82, 0.92])
    clearly = Candidate(Recipe(), 200, correct=97, seen=100, fold_acc=[0.96, 0.97, 0.98])
    assert _one_standard_error([probe, slightly]) is probe
    assert _one_standard_error([probe, slightly, clearly]) is clearly
    assert math.isnan(Candidate(None, 0).accuracy)


def test_a_head_that_wins_some_folds_of_three_recipes_is_not_shipped() -> None:
    """The fold differences a head showed on simulated patients before it lost on new ones (0.653 against the
    probe's 0.753): 2.1 standard errors, the best of three recipes; a head must win beyond what the best of three
    shows by chance (Student's t, family-wise 5 %: 3.19 standard errors with 5 folds)."""
    from napari_bcd.train.headfit import Recipe
    from napari_bcd.train.select import Candidate, _one_standard_error, head_evidence

    probe_folds = [0.667, 0.625, 0.75, 0.75, 0.875]
    probe = Candidate(None, 0, correct=73, seen=100, fold_acc=probe_folds)
    recipes = [Recipe(), Recipe(anchor=1.0), Recipe(dropout=0.5, weight_decay=1e-2)]
    lucky = Candidate(recipes[2], 300, correct=83, seen=100,
                      fold_acc=[p + d for p, d in zip(probe_folds, [0.111, 0.25, 0.0, 0.125, 0.0], strict=True)])
    others = [Candidate(r, 100, correct=74, seen=100, fold_acc=probe_folds) for r in recipes[:2]]
    assert head_evidence(5, 3) == pytest.approx(3.19, abs=0.01)
    assert _one_standard_error([probe, *others, lucky]) is probe
    steady = Candidate(recipes[2], 300, correct=85, seen=100, fold_acc=[p + 0.1 for p in probe_folds])
    assert _one_standard_error([probe, *others, steady]) is steady  # every fold, by a similar margin
