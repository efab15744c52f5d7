"""Test-time augmentation (issue 39): every window averaged over its flips and rotations, its cost said before the
run, and where the views disagree the review queue asks first; the queue's regions ranked by what a correction
would change, and a retrain's effect on them counted."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from conftest import SAMPLE_SLIDE
from napari_bcd.engine import classify
from napari_bcd.io import open_slide
from napari_bcd.model.inference import Predictor, dihedral_views


def _windows(n: int = 6, px: int = 64) -> np.ndarray:
    with open_slide(SAMPLE_SLIDE) as slide:
        return np.stack([slide.read_region(0, 900 + 150 * k, 800 + 90 * k, px, px) for k in range(n)])


def test_tta_makes_a_model_with_an_orientation_bias_see_every_orientation_alike(tiny_model) -> None:
    """A random network is not rotation invariant: a window and its quarter turn get different probabilities.
    Averaged over the 8 views, every flip and rotation of a window gets the same answer, and that answer is the
    mean of the plain answers on the 8 views."""
    x = _windows()
    plain, tta = Predictor(tiny_model, device="cpu", precision="fp32"), Predictor(tiny_model, device="cpu",
                                                                                     precision="fp32")
    tta.set_tta(True)
    assert tta.views == 8
    turned = np.ascontiguousarray(np.rot90(x, 1, (1, 2)))
    flipped = np.ascontiguousarray(x[:, ::-1])
    assert np.abs(plain(x) - plain(turned)).max() > 1e-3  # the bias
    p, p_turned, p_flipped = tta(x), tta(turned), tta(flipped)
    np.testing.assert_allclose(p, p_turned, atol=1e-5)
    np.testing.assert_allclose(p, p_flipped, atol=1e-5)
    views = dihedral_views(torch.from_numpy(x), channels_last=True).numpy().reshape(8, *x.shape)
    np.testing.assert_allclose(p, np.mean([plain(np.ascontiguousarray(v)) for v in views], axis=0), atol=1e-5)
    spread = tta.submit(x).spread()
    assert spread.shape == (len(x),) and (spread > 0).all() and (spread <= 1).all()
    assert plain.submit(x).spread() is None


def test_flips_only_for_a_rectangular_input() -> None:
    x = torch.arange(2 * 4 * 6 * 3, dtype=torch.uint8).reshape(2, 4, 6, 3)
    out = dihedral_views(x, channels_last=True, square=False)
    assert out.shape == (8, 4, 6, 3)  # 4 views of 2 windows
    assert torch.equal(out[2:4], torch.flip(x, (2,))) and torch.equal(out[4:6], torch.rot90(x, 2, (1, 2)))


def test_a_tta_run_keeps_the_views_disagreement_and_its_cost_is_said_before(tiny_model, tiny_checkpoint) -> None:
    from napari_bcd.app.classify import ClassifyController
    from napari_bcd.settings import ClassifySettings

    with open_slide(SAMPLE_SLIDE) as slide:
        plain = classify(slide, tiny_model, precision="fp32")
        tta = classify(slide, tiny_model, precision="fp32", tta=True)
        controller = ClassifyController()
        card = controller.card(tiny_checkpoint)
        once = controller.estimate(slide, card, ClassifySettings())
        eight = controller.estimate(slide, card, ClassifySettings(tta=True))
    assert plain.view_spread is None and tta.view_spread is not None
    covered = tta.labels > 0
    assert np.isfinite(tta.view_spread[covered]).all() and tta.view_spread[covered].max() > 0
    assert tta.n_windows == plain.n_windows and not np.allclose(tta.probs[covered], plain.probs[covered])
    assert eight.seconds == pytest.approx(8 * once.seconds) and "8 views" in eight.text
    assert "views" not in once.text


def test_the_queue_ranks_regions_by_the_cells_a_correction_would_change(tiny_model) -> None:
    """A large region of doubtful cells comes before a single cell that is a little more uncertain; a retrain that
    makes a region sure counts as resolving it."""
    import dataclasses

    from napari_bcd.review.uncertain import resolved_regions, uncertain_regions

    with open_slide(SAMPLE_SLIDE) as slide:
        cm = classify(slide, tiny_model, precision="fp32", stride=0.5)
    probs = np.full_like(cm.probs, np.nan)
    covered = cm.labels > 0
    rows, cols = np.nonzero(covered)
    probs[covered] = [0.9, 0.04, 0.03, 0.03]  # sure everywhere
    big = (rows[:6], cols[:6])  # six neighbouring-ish cells at p = 0.5 / 0.4
    probs[big] = [0.5, 0.4, 0.05, 0.05]
    lone = (rows[-1:], cols[-1:])  # one cell even less sure
    probs[lone] = [0.36, 0.34, 0.2, 0.1]
    doubtful = dataclasses.replace(cm, probs=probs)
    regions = uncertain_regions(doubtful, "margin", threshold=0.5)
    assert len(regions) >= 2 and regions[0].cells >= 2 and regions[-1].cells == 1
    assert regions[0].value > regions[-1].value and regions[-1].score > regions[0].score
    assert "likely wrong" in regions[0].describe()
    sure = dataclasses.replace(cm, probs=np.where(covered[..., None], [0.9, 0.04, 0.03, 0.03], np.nan))
    assert resolved_regions(regions, sure, "margin", 0.5) == len(regions)
    assert resolved_regions(regions, doubtful, "margin", 0.5) == 0
    spread = np.zeros(cm.labels.shape, np.float32)
    spread[lone] = 0.95  # the views disagree there: the lone cell now matters more than its probabilities say
    with_views = dataclasses.replace(doubtful, view_spread=spread)
    lone_value = next(r.value for r in uncertain_regions(with_views, "margin", threshold=0.5) if r.cells == 1)
    assert lone_value == pytest.approx(0.95) and regions[-1].value == pytest.approx(0.64)


def test_cli_tta_option() -> None:
    import argparse

    from napari_bcd.cli.options import add_classify_options, settings_from

    p = argparse.ArgumentParser()
    add_classify_options(p)
    assert settings_from(p.parse_args(["--tta"])).tta is True
    assert settings_from(p.parse_args([])).tta is False


@pytest.mark.slow
def test_tta_on_the_paper_model() -> None:
    """The real ResNet152V2: a window and its quarter turn differ plainly, agree under TTA."""
    import warnings

    from napari_bcd.errors import BackboneWeightsWarning
    from napari_bcd.model import build_classifier

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", BackboneWeightsWarning)
        model = build_classifier("resnet152v2", classes=("Normal", "Benign", "InSitu", "Invasive"),
                                 input_px=(96, 96), field_um=(48.0, 48.0))
    x = _windows(1, 96)
    turned = np.ascontiguousarray(np.rot90(x, 1, (1, 2)))
    tta = Predictor(model, device="cpu", precision="fp32")
    tta.set_tta(True)
    np.testing.assert_allclose(tta(x), tta(turned), atol=1e-5)


def test_a_region_repredicted_after_a_retrain_forgets_its_views_disagreement(tiny_model) -> None:
    """A retrain re-predicts its region from one view: the views' disagreement there is no longer known (NaN), so the
    queue ranks those cells by their probabilities alone; elsewhere it stands."""
    from napari_bcd.decision import DecisionRule
    from napari_bcd.review.retrain_data import Windows
    from napari_bcd.review.retrain_fit import repredict_region

    with open_slide(SAMPLE_SLIDE) as slide:
        cm = classify(slide, tiny_model, precision="fp32", tta=True)
    wins = np.argwhere(cm.window_done)[:3]
    region = np.zeros(cm.window_done.shape, bool)
    region[wins[:, 0], wins[:, 1]] = True
    box = (int(wins[:, 0].min()), int(wins[:, 0].max()) + 1, int(wins[:, 1].min()), int(wins[:, 1].max()) + 1)
    chosen = Windows(wins, region, np.zeros(len(wins), bool), box)
    probs = np.tile([0.7, 0.1, 0.1, 0.1], (len(wins), 1))
    after = repredict_region(cm, cm.grid, chosen, probs, DecisionRule())
    hit = np.zeros(cm.labels.shape, bool)
    hit[wins[:, 0], wins[:, 1]] = True  # stride 1: a window is a cell
    assert np.isnan(after.view_spread[hit]).all() and np.isfinite(cm.view_spread[hit]).all()
    rest = (cm.labels > 0) & ~hit
    np.testing.assert_array_equal(after.view_spread[rest], cm.view_spread[rest])


def test_the_cli_says_a_run_averaged_its_views(tiny_checkpoint, tmp_path, capsys) -> None:
    import json

    from napari_bcd.cli import main

    assert main(["classify", str(SAMPLE_SLIDE), "--model", str(tiny_checkpoint), "--out", str(tmp_path), "--tta"]) == 0
    assert "each the mean of its 8 flips and rotations (--tta)" in capsys.readouterr().out
    summary = json.loads((tmp_path / "CMU-1-Small-Region.summary.json").read_text())
    assert summary["info"]["settings"]["tta"] is True
