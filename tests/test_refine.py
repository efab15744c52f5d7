"""Adaptive overlap: windows one field apart, then full overlap only over the cells in doubt."""

from __future__ import annotations

import numpy as np
import pytest

from conftest import SAMPLE_SLIDE, drain
from napari_bcd.engine import refine
from napari_bcd.engine.refine import cells_reached, coarse_lattice, in_doubt, windows_over


def test_doubt_is_low_margin_boundaries_and_unreached_tissue() -> None:
    probs = np.zeros((3, 4, 2), np.float32)
    probs[..., 0] = 0.9
    probs[..., 1] = 0.1
    probs[:, 3] = (0.1, 0.9)  # another class in the last column: a boundary between columns 2 and 3
    probs[0, 0] = (0.55, 0.45)  # a near tie
    counts = np.ones((3, 4), np.int32)
    counts[2, 0] = 0
    probs[2, 0] = np.nan
    reachable = np.ones((3, 4), bool)
    doubt = in_doubt(probs, counts, reachable, margin=0.2)
    expected = np.zeros((3, 4), bool)
    expected[:, 2:] = True  # both sides of the boundary
    expected[0, 0] = True  # the near tie
    np.testing.assert_array_equal(doubt, expected)  # (tissue no window reached needs a first look: below)
    no_boundaries = in_doubt(probs, counts, reachable, margin=0.2, boundaries=False)
    assert no_boundaries.sum() == 1 and no_boundaries[0, 0]
    reachable[0, 0] = False  # glass: never in doubt
    assert not in_doubt(probs, counts, reachable, margin=0.2)[0, 0]


def test_doubt_follows_the_decision_rule_thresholds_and_its_labels() -> None:
    from napari_bcd.decision import DecisionRule

    classes = ("Normal", "Benign", "In situ carcinoma", "Invasive carcinoma")
    probs = np.zeros((2, 3, 4), np.float32)
    probs[...] = (0.62, 0.1, 0.05, 0.23)  # Normal by a wide margin: settled under the most probable class
    probs[0, 1] = (0.6, 0.06, 0.02, 0.32)  # just past the Invasive threshold below
    counts, reachable = np.ones((2, 3), np.int32), np.ones((2, 3), bool)
    assert not in_doubt(probs, counts, reachable, margin=0.05).any()
    rule = DecisionRule(thresholds={"Invasive carcinoma": 0.3})  # "call Invasive at 0.3"
    margin, labels = refine.decision_margin(probs, counts > 0, rule, classes)
    assert labels[0, 1] == 4 and (np.delete(labels.ravel(), 1) == 1).all()  # the labels the rule gives
    assert margin[0, 1] == pytest.approx(0.02) and margin[1, 0] == pytest.approx(0.07)
    near = in_doubt(probs, counts, reachable, margin=0.05, boundaries=False, rule=rule, classes=classes)
    assert near.sum() == 1 and near[0, 1]  # 0.32 is 0.02 from its threshold
    edges = in_doubt(probs, counts, reachable, margin=0.05, rule=rule, classes=classes)
    np.testing.assert_array_equal(edges, [[True, True, True], [False, True, False]])  # and its label's boundary
    confident = DecisionRule(min_confidence=0.5, measure="max_probability")
    assert refine.decision_margin(probs, counts > 0, confident, classes)[0][1, 1] < 0.05  # 1 - (1-0.62)/0.75 ~ 0.49


def test_an_unreached_cell_gets_one_window_centred_on_it() -> None:
    from napari_bcd.engine.refine import windows_reaching

    cells = np.zeros((7, 7), bool)
    cells[3, 3] = cells[3, 4] = True  # two neighbours: one window reaches both
    candidates = np.ones((4, 4), bool)  # 4 x 4 windows of 4 x 4 cells over 7 x 7 cells
    chosen = windows_reaching(cells, candidates, (4, 4))
    assert (chosen.sum() == 1 and chosen[1, 1]) or chosen[1, 2]
    candidates[:] = False
    assert not windows_reaching(cells, candidates, (4, 4)).any()  # no candidate: glass, nothing to add


def test_windows_over_cells_and_cells_reached_are_each_others_cover() -> None:
    kh = kw = 2
    n_windows = (4, 5)
    n_cells = (n_windows[0] - 1 + kh, n_windows[1] - 1 + kw)
    cells = np.zeros(n_cells, bool)
    cells[2, 3] = True
    wins = windows_over(cells, (kh, kw), n_windows)
    assert sorted(map(tuple, np.argwhere(wins))) == [(1, 2), (1, 3), (2, 2), (2, 3)]
    np.testing.assert_array_equal(cells_reached(wins, (kh, kw), n_cells)[2, 3], True)
    todo = np.argwhere(np.ones(n_windows, bool))
    lattice = todo[coarse_lattice(todo, (kh, kw))]
    assert all(r % 2 == 0 and c % 2 == 0 for r, c in lattice) and len(lattice) == 2 * 3


def test_windows_left_out_are_interpolated_from_the_lattice_around_them() -> None:
    from napari_bcd.engine.classmap import CellAccumulator
    from napari_bcd.engine.refine import cell_probabilities, estimate_windows
    from napari_bcd.tiling import Grid

    n_windows, k = (13, 17), (4, 4)
    rows, cols = np.mgrid[: n_windows[0], : n_windows[1]].astype(np.float64)
    field = np.stack([0.1 + 0.02 * rows + 0.01 * cols, 0.9 - 0.02 * rows - 0.01 * cols], -1)  # linear: exact
    done = np.zeros(n_windows, bool)
    done[::4, ::4] = True  # the coarse lattice, one field apart
    candidates = np.ones(n_windows, bool)
    candidates[:, 13:] = False  # glass on the right: never estimated
    done &= candidates
    measured = np.where(done[..., None], field, np.nan)
    estimated, known = estimate_windows(measured, done, candidates, k)
    np.testing.assert_array_equal(known, candidates)  # every candidate has a classified window within a field
    np.testing.assert_allclose(estimated[:, :13], field[:, :13], atol=1e-6)  # between lattice windows: exact
    assert np.isnan(estimated[:, 13:]).all()
    off = estimate_windows(measured, done & (rows < 4), candidates, k)[1]
    assert off[:4, :13].all() and not off[4:].any()  # nothing classified within a field: unknown, not guessed
    grid = Grid(window_px=(256.0, 256.0), stride_px=(64.0, 64.0), origin_px=(0.0, 0.0), n_windows=n_windows,
                cells_per_window=k, level=0, level_downsample=(1.0, 1.0), mpp=(0.5, 0.5), input_px=(256, 256))
    acc = CellAccumulator(grid, 2)  # full overlap's cells: the mean of every candidate window covering them
    acc.add(np.argwhere(candidates), field[candidates])
    cells = cell_probabilities(estimated, known, k, grid.n_cells)
    np.testing.assert_allclose(cells, acc.probabilities(), atol=1e-6)
    lattice_only = cell_probabilities(measured, done, k, grid.n_cells)  # without the estimates: off the field
    assert np.nanmax(np.abs(lattice_only - acc.probabilities())) > 0.02


@pytest.fixture(scope="module")
def runs(tiny_model):
    from napari_bcd import open_slide
    from napari_bcd.engine import iter_classify

    with open_slide(SAMPLE_SLIDE) as slide:
        _, full = drain(iter_classify(slide, tiny_model, stride=0.25, precision="fp32"))
        _, adaptive = drain(iter_classify(slide, tiny_model, stride=0.25, precision="fp32", refine=True))
    return full, adaptive


def test_refine_uses_fewer_windows_and_reports_them(runs) -> None:
    full, adaptive = runs
    info = adaptive.info["refine"]
    assert info["full_overlap_windows"] == full.info["windows"] == full.window_done.sum()
    assert adaptive.info["windows"] == adaptive.window_done.sum() < full.info["windows"]
    assert info["share_used"] == pytest.approx(adaptive.info["windows"] / full.info["windows"], abs=1e-4)
    assert full.info["refine"] is None
    assert 0 < info["estimated_windows"] <= info["full_overlap_windows"] - adaptive.info["windows"]
    np.testing.assert_array_equal(adaptive.labels > 0, full.labels > 0)  # every cell full overlap maps is mapped
    equal = (adaptive.labels == full.labels)[full.labels > 0].mean()
    assert equal > 0.8, equal  # a random network: the bound the benchmark measures on real features is tighter


def test_refine_equals_full_overlap_where_it_refines_everywhere(tiny_model, monkeypatch: pytest.MonkeyPatch,
                                                               runs) -> None:
    from napari_bcd import open_slide
    from napari_bcd.engine import iter_classify

    full, _ = runs
    monkeypatch.setattr(refine, "REFINE_MARGIN", 1.01)  # every cell is a near tie: everything is refined
    monkeypatch.setattr(refine, "FINAL_MARGIN", 1.01)
    with open_slide(SAMPLE_SLIDE) as slide:
        _, everywhere = drain(iter_classify(slide, tiny_model, stride=0.25, precision="fp32", refine=True))
    assert everywhere.info["windows"] == full.info["windows"]
    assert everywhere.info["refine"]["estimated_windows"] == 0
    np.testing.assert_allclose(everywhere.probs, full.probs, atol=1e-6)
    np.testing.assert_array_equal(everywhere.labels, full.labels)


def test_refine_under_thresholds_refines_where_the_rules_labels_are_in_doubt(tiny_model, runs) -> None:
    from napari_bcd import open_slide
    from napari_bcd.decision import DecisionRule, apply_decision
    from napari_bcd.engine import iter_classify

    full, blind = runs  # blind: refined on the most probable class, then labelled by the rule afterwards
    mapped = full.labels > 0
    k = int(np.argsort(np.nanmean(full.probs[mapped], axis=0))[-2])  # the second most probable class, called at a
    t = float(np.nanpercentile(full.probs[..., k][mapped], 70))  # threshold that about 30 % of the cells reach
    rule = DecisionRule(thresholds={full.classes[k]: t})
    want = apply_decision(full, rule).labels
    assert 0.1 < (want[mapped] == k + 1).mean() < 0.5
    with open_slide(SAMPLE_SLIDE) as slide:
        _, aware = drain(iter_classify(slide, tiny_model, stride=0.25, precision="fp32", refine=True, decision=rule))
    equal_aware = (aware.labels == want)[mapped].mean()
    equal_blind = (apply_decision(blind, rule).labels == want)[mapped].mean()
    assert equal_aware > equal_blind, (equal_aware, equal_blind)
    assert aware.info["windows"] < full.info["windows"]


def test_the_cli_offers_refine(tiny_checkpoint, tmp_path) -> None:
    import json

    from napari_bcd.cli import main

    assert main(["classify", str(SAMPLE_SLIDE), "--model", str(tiny_checkpoint), "--stride", "0.5", "--refine",
                 "--precision", "fp32", "--out", str(tmp_path)]) == 0
    info = json.loads((tmp_path / f"{SAMPLE_SLIDE.stem}.summary.json").read_text())["info"]
    assert 0 < info["refine"]["share_used"] <= 1
    done = json.loads((tmp_path / f"{SAMPLE_SLIDE.stem}.done.json").read_text())
    assert done["run"]["settings"]["refine"] is True
