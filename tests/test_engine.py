"""The sliding-window engine on the real CMU slide and test-written pyramids."""

from __future__ import annotations

import threading
import warnings
from pathlib import Path

import numpy as np
import pytest

from conftest import SAMPLE_SLIDE, write_pyramid
from conftest import drain as run
from napari_bcd.classes import BACH_CLASSES
from napari_bcd.engine import ClassMap, Progress, classify, iter_classify
from napari_bcd.errors import BcdError
from napari_bcd.io import open_slide
from napari_bcd.model import Predictor
from napari_bcd.tiling import make_grid


class SpyPredictor(Predictor):
    """The real predictor, recording what the model was asked."""

    def __init__(self, *a, **k) -> None:
        super().__init__(*a, **k)
        self.calls: list[np.ndarray] = []

    def submit(self, batch):  # what the engine calls (__call__ = submit + result)
        pending = super().submit(batch)
        self.calls.append(pending.result())
        return pending


def test_classifies_only_tissue_windows_and_reports_progress(tiny_model) -> None:
    spy = SpyPredictor(tiny_model, device="cpu")
    with open_slide(SAMPLE_SLIDE) as slide:
        progress, cmap = run(iter_classify(slide, spy, batch_size=8))
    assert isinstance(cmap, ClassMap)
    steps = [p for p in progress if p.stage == "classify"]
    total = steps[0].total
    assert steps[-1].done == total == cmap.n_windows
    assert [p.done for p in steps] == sorted(p.done for p in steps)
    assert all(isinstance(p, Progress) for p in progress) and steps[-1].windows_per_s > 0
    # The model saw exactly the tissue windows, in batches of at most 8.
    assert sum(len(c) for c in spy.calls) == total and max(len(c) for c in spy.calls) <= 8
    g = cmap.grid
    # 200 µm windows covering 1480 x 1108 µm: 8 x 6, the last ones running past the edge.
    assert g.n_windows == (8, 6)
    assert 0 < total < g.n_windows[0] * g.n_windows[1]  # background windows were skipped
    assert (cmap.labels[~cmap.window_done] == 0).all()
    assert set(np.unique(cmap.labels[cmap.window_done])) <= {1, 2, 3, 4}
    # Probabilities: a distribution where classified, NaN elsewhere.
    done = cmap.probs[cmap.window_done]
    np.testing.assert_allclose(done.sum(-1), 1, atol=1e-5)
    assert np.isnan(cmap.probs[~cmap.window_done]).all()
    # Labels are the argmax of the probabilities.
    assert (cmap.labels[cmap.window_done] == done.argmax(-1) + 1).all()


def test_overlapping_windows_are_averaged_per_cell(tiny_model) -> None:
    spy = SpyPredictor(tiny_model, device="cpu")
    with open_slide(SAMPLE_SLIDE) as slide:
        _, cmap = run(iter_classify(slide, spy, stride=0.5, batch_size=4))
    g = cmap.grid
    assert g.cells_per_window == (2, 2)
    assert g.n_cells == (g.n_windows[0] + 1, g.n_windows[1] + 1)
    probs = np.concatenate(spy.calls)
    windows = np.argwhere(cmap.window_done)
    assert len(windows) == len(probs)
    expected_sum = np.zeros((*g.n_cells, 4))
    count = np.zeros(g.n_cells)
    for (r, c), p in zip(windows, probs, strict=True):
        expected_sum[r : r + 2, c : c + 2] += p
        count[r : r + 2, c : c + 2] += 1
    covered = count > 0
    np.testing.assert_allclose(cmap.probs[covered], (expected_sum[covered] / count[covered][:, None]), atol=1e-5)
    # Some cell really averages several windows.
    assert count.max() == 4


def test_geometry_places_cells_on_their_windows(tiny_model) -> None:
    with open_slide(SAMPLE_SLIDE) as slide:
        cmap = classify(slide, tiny_model, batch_size=16)
    (sy, sx), (ty, tx) = cmap.layer_transform()
    g = cmap.grid
    assert (sy, sx) == pytest.approx((200.0, 200.0))  # cell = window = 200 µm
    for r, c in np.argwhere(cmap.window_done)[:5]:
        # napari's world coordinate of cell (r, c)'s centre, back to level-0 px...
        wy, wx = r * sy + ty, c * sx + tx
        py, px = wy / g.mpp[0], wx / g.mpp[1]
        y, x, h, w = g.window_box(r, c)
        assert y <= py < y + h and x <= px < x + w  # ...lies in the window classified
        label, p = cmap.at_level0(py, px)
        assert label == cmap.labels[r, c] and p is not None


def test_reads_the_coarsest_level_that_is_fine_enough(tmp_path: Path, cmu_rgb: np.ndarray, tiny_model) -> None:
    path = write_pyramid(tmp_path / "p.tif", cmu_rgb[:2048, :2048], levels=4, mpp=0.25)
    with open_slide(path) as slide:
        # 200 µm at 64 px needs 3.125 µm/px: level 3 (2 µm/px) is the coarsest finer than that.
        cmap = classify(slide, tiny_model)
    assert cmap.grid.level == 3


def test_cancel_stops_within_a_batch_and_frees_threads(tiny_model) -> None:
    spy = SpyPredictor(tiny_model, device="cpu")
    before = {t.name for t in threading.enumerate()}
    with open_slide(SAMPLE_SLIDE) as slide:
        gen = iter_classify(slide, spy, batch_size=2, stride=0.5)
        for p in gen:
            if p.stage == "classify" and p.done >= 2:
                break
        gen.close()
    assert len(spy.calls) == 1
    leftover = {t.name for t in threading.enumerate() if t.name.startswith("bcd-read")} - before
    assert not leftover


def test_reading_ahead_is_bounded(tiny_model, monkeypatch: pytest.MonkeyPatch) -> None:
    import napari_bcd.engine.producer as engine

    produced: list[int] = []
    at_call: list[int] = []
    original = engine.window_batches

    def counting(*a, **kw):
        for item in original(*a, **kw):
            produced.append(1)
            yield item

    monkeypatch.setattr(engine, "window_batches", counting)

    class CountingSpy(SpyPredictor):
        def submit(self, batch):
            at_call.append(len(produced))
            return super().submit(batch)

    with open_slide(SAMPLE_SLIDE) as slide:
        run(iter_classify(slide, CountingSpy(tiny_model, device="cpu"), batch_size=2, stride=0.5, prefetch=2))
    assert len(at_call) > 5
    # Before the k-th model call, at most k + 1 batches + the 2 queued + the one being cut were produced.
    for k, n in enumerate(at_call):
        assert n <= (k + 1) + 2 + 1


def test_one_batch_in_flight_gives_the_same_map(tiny_model) -> None:
    """With an asynchronous Predictor (a GPU's) the engine reads batch i after submitting batch i+1."""
    order: list[str] = []

    class Recording(Predictor):
        def submit(self, batch):
            order.append("submit")
            pending = super().submit(batch)
            real = pending.result

            def result():
                order.append("result")
                return real()

            pending.result = result
            return pending

    sync = Predictor(tiny_model, device="cpu")
    lagged = Recording(tiny_model, device="cpu")
    lagged.asynchronous = True
    with open_slide(SAMPLE_SLIDE) as slide:
        a = classify(slide, sync, batch_size=4, stride=0.5)
        b = classify(slide, lagged, batch_size=4, stride=0.5)
        np.testing.assert_array_equal(a.probs, b.probs)
        np.testing.assert_array_equal(a.labels, b.labels)
        assert order[:3] == ["submit", "submit", "result"] and order.count("submit") == order.count("result")
        gen = iter_classify(slide, lagged, batch_size=2, stride=0.5)
        order.clear()
        for p in gen:
            if p.stage == "classify" and p.done >= 2:
                break
        gen.close()  # the batch in flight is dropped unread
    assert order == ["submit", "submit", "result"]


def test_batches_hold_the_pixels_read_region_gives(tmp_path: Path, cmu_rgb: np.ndarray) -> None:
    """Windows cut from bands of tile rows: the same pixels as read_region, at any level, aligned or not."""
    from napari_bcd.windows import window_batches

    path = write_pyramid(tmp_path / "p.tif", cmu_rgb[:1500, :1300], levels=3, mpp=0.5, tile=128)
    with open_slide(path) as slide:
        for field, stride, level_want in (((64.0, 64.0), 1.0, 0), ((100.0, 90.0), 0.37, 0), ((100.0, 100.0), 0.5, 1),
                                          ((200.0, 200.0), 0.3, 2)):
            ds = [i.downsample for i in slide.level_info]
            input_px = (128, 128) if level_want == 0 else (100, 100)
            grid = make_grid(slide.dimensions, slide.mpp, field, input_px, ds, stride=stride)
            assert grid.level == level_want
            rc = np.array([(r, c) for r in range(grid.n_windows[0]) for c in range(grid.n_windows[1])])
            seen = 0
            for batch_rc, pixels in window_batches(slide, grid, rc, 7):
                for (r, c), px in zip(batch_rc, pixels, strict=True):
                    y, x, h, w = grid.read_box(int(r), int(c))
                    np.testing.assert_array_equal(px, slide.read_region(grid.level, y, x, h, w))
                    seen += 1
            assert seen == len(rc)  # including the windows that run past the right and bottom edges
            # Stacked into given host memory (a GPU run's pinned batches): the same pixels, in that memory.
            import torch

            given = []

            def alloc(shape, given=given):
                given.append(torch.empty(shape, dtype=torch.uint8))
                return given[-1]

            for (_, plain), (_, into) in zip(window_batches(slide, grid, rc, 7),
                                             window_batches(slide, grid, rc, 7, alloc=alloc), strict=True):
                assert into is given[-1] and into.dtype == torch.uint8
                np.testing.assert_array_equal(into.numpy(), plain)


def test_each_tile_is_decoded_once_per_pass(tmp_path: Path, cmu_rgb: np.ndarray, tiny_model) -> None:
    path = write_pyramid(tmp_path / "p.tif", np.concatenate([cmu_rgb[:, 800:2200]] * 2, 0), levels=1, mpp=1.0,
                         tile=128)
    with open_slide(path) as slide:
        cmap = classify(slide, tiny_model, stride=0.25, batch_size=16)  # 75 % overlap: each tile in ~16 windows
    info = cmap.info
    assert info["tiles_touched"] > 50
    assert info["decoded_tiles"] == info["tiles_touched"]


def test_the_class_map_matches_the_per_window_path(tiny_model) -> None:
    """Resizing on the device (PIL's BOX weights) gives the class map PIL resizing per window gave."""
    from napari_bcd.windows import read_window

    pred = Predictor(tiny_model, device="cpu")
    with open_slide(SAMPLE_SLIDE) as slide:
        cmap = classify(slide, pred, stride=0.5, batch_size=8)
        g = cmap.grid
        windows = np.argwhere(cmap.window_done)
        ref = pred(np.stack([read_window(slide, g, int(r), int(c), tiny_model.card.input_px) for r, c in windows]))
    kh, kw = g.cells_per_window
    sums = np.zeros((*g.n_cells, 4))
    counts = np.zeros(g.n_cells)
    for (r, c), p in zip(windows, ref, strict=True):
        sums[r : r + kh, c : c + kw] += p
        counts[r : r + kh, c : c + kw] += 1
    covered = counts > 0
    np.testing.assert_allclose(cmap.probs[covered], sums[covered] / counts[covered][:, None], atol=2e-3)


def test_no_tissue_means_no_model_calls(tiny_model) -> None:
    from conftest import DATA

    spy = SpyPredictor(tiny_model, device="cpu")
    with open_slide(DATA / "histolab-no-tissue.png", mpp=1.0) as slide:
        _, cmap = run(iter_classify(slide, spy))
    assert cmap.n_windows == 0 and not spy.calls and (cmap.labels == 0).all()


def test_errors_before_any_work(tiny_model) -> None:
    from conftest import DATA

    with open_slide(DATA / "stardist-histo-500x300.jpg") as slide:
        with pytest.raises(BcdError, match="pixel size"):
            classify(slide, tiny_model)
        with pytest.raises(BcdError, match="smaller than one model window"):
            classify(slide, tiny_model, mpp=0.1)  # 30 x 50 µm < 200 µm
        with pytest.raises(BcdError, match="batch_size"):
            classify(slide, tiny_model, mpp=1.0, batch_size=0)
        with pytest.raises(BcdError, match="stride"):
            classify(slide, tiny_model, mpp=1.0, stride=2.0)


def test_grid_for_an_iciar_photo_is_one_window() -> None:
    g = make_grid((1536, 2048), (0.42, 0.42), (645.12, 860.16), (256, 256), [(1.0, 1.0)])
    assert g.n_windows == (1, 1) and g.origin_px == pytest.approx((0.0, 0.0))
    assert g.read_box(0, 0) == (0, 0, 1536, 2048)


@pytest.mark.slow
def test_the_paper_model_classifies_an_iciar_sized_photo(cmu_rgb: np.ndarray, tmp_path: Path) -> None:
    import tifffile

    from napari_bcd.errors import BackboneWeightsWarning
    from napari_bcd.model import build_classifier

    # The CMU slide at 0.499 µm/px, cropped to one ICIAR field (645 x 860 µm).
    tifffile.imwrite(tmp_path / "photo.tif", cmu_rgb[200:1493, 200:1924])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", BackboneWeightsWarning)
        model = build_classifier("resnet152v2", classes=BACH_CLASSES)
    spy = SpyPredictor(model, device="cpu")
    with open_slide(tmp_path / "photo.tif", mpp=0.499) as slide:
        _, cmap = run(iter_classify(slide, spy))
    assert cmap.grid.n_windows == (1, 1) and cmap.n_windows == 1
    assert spy.calls[0].shape == (1, 4)
    assert cmap.labels[0, 0] == spy.calls[0][0].argmax() + 1


@pytest.mark.parametrize("stride", [1.0, 0.5, 0.25])
def test_the_estimate_counts_the_cells_the_map_holds(tiny_model, stride: float) -> None:
    """One cell rule (issue 36): the cells announced before a run are the cells the map then holds, at every overlap
    (at 50 % the estimate said 97 cells on the bundled slide and the map held 77)."""
    from napari_bcd.engine import plan_windows

    with open_slide(SAMPLE_SLIDE) as slide:
        plan = plan_windows(slide, tiny_model.card, stride=stride)
        cm = classify(slide, tiny_model, stride=stride, precision="fp32")
        off = classify(slide, tiny_model, stride=stride, precision="fp32", qc={"enabled": False})
    # the windows and cells announced are those the map holds, or those quality control then left out
    assert plan.on_tissue == cm.n_windows + int((cm.qc.window_reason > 0).sum())
    assert plan.cells_on_tissue == int((cm.labels > 0).sum()) + int((cm.qc_cells > 0).sum()) > 0
    assert plan.on_tissue == off.n_windows and plan.cells_on_tissue == int((off.labels > 0).sum())
