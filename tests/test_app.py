"""The Qt-free controllers under the docks (app/), driven as the docks drive them, without Qt or napari."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest

from conftest import SAMPLE_SLIDE, drain


def test_the_controllers_import_no_qt() -> None:
    import subprocess

    code = ("import sys, napari_bcd.app.classify, napari_bcd.app.review, napari_bcd.app.mapstate; "
            "bad = [m for m in sys.modules if m.split('.')[0] in ('napari', 'qtpy', 'PyQt6', 'magicgui')]; "
            "print(bad); sys.exit(1 if bad else 0)")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert done.returncode == 0, done.stdout + done.stderr


def test_classify_controller_estimates_then_runs_what_it_announced(tiny_checkpoint: Path) -> None:
    from napari_bcd.app.classify import ClassifyController, Stage
    from napari_bcd.engine import Progress
    from napari_bcd.io import open_slide
    from napari_bcd.settings import ClassifySettings

    controller = ClassifyController()
    card = controller.card(tiny_checkpoint)  # read without loading the network
    settings = ClassifySettings(stride=0.5, precision="fp32")
    with open_slide(SAMPLE_SLIDE) as slide:
        estimate = controller.estimate(slide, card, settings)
        items, cm = drain(controller.job(slide, tiny_checkpoint, settings))
    assert [type(i) for i in items[:2]] == [Stage, Stage] and any(isinstance(i, Progress) for i in items)
    assert f"{estimate.plan.on_tissue:,} windows on tissue" in estimate.text
    # the cells announced are the cells the map holds, or quality control left out (said in the estimate)
    left_out = int((cm.qc_cells > 0).sum())
    assert estimate.plan.on_tissue == cm.n_windows + int((cm.qc.window_reason > 0).sum())
    assert estimate.plan.cells_on_tissue == int((cm.labels > 0).sum()) + left_out
    assert "Quality control may then leave out" in estimate.text
    assert cm.model_path == str(tiny_checkpoint) and cm.settings == settings
    controller.remember(cm, card, settings.device)  # the next estimate is this machine's own
    with open_slide(SAMPLE_SLIDE) as slide:
        assert controller.estimate(slide, card, settings).measured


def test_classify_controller_says_when_there_is_no_model(monkeypatch: pytest.MonkeyPatch) -> None:
    from napari_bcd.app.classify import ClassifyController
    from napari_bcd.errors import BcdError

    monkeypatch.setattr("napari_bcd.config.default_model_path", lambda: None)
    with pytest.raises(BcdError, match="No model yet: train one"):
        ClassifyController().card(None)


def test_the_map_store_paints_applies_a_rule_retrains_and_undoes(tiny_checkpoint: Path, tmp_path: Path) -> None:
    import shutil

    from napari_bcd import classify, open_slide
    from napari_bcd.app.mapstate import MapState, MapStore
    from napari_bcd.app.review import after_retrain, check_rule, learning, retrain_job
    from napari_bcd.decision import DecisionRule
    from napari_bcd.export import cells_to_image
    from napari_bcd.model import load_checkpoint

    parent = Path(shutil.copy(tiny_checkpoint, tmp_path / "tiny.safetensors"))
    shutil.copy(tiny_checkpoint.with_suffix(".json"), tmp_path / "tiny.json")
    with open_slide(SAMPLE_SLIDE) as slide:
        cm = classify(slide, load_checkpoint(parent), precision="fp32")
    store = MapStore(MapState(cm, "slide"))
    heard: list[str] = []
    store.listen(lambda state, reason: heard.append(reason))
    # paint one classified cell with another class, on the layer's raster, as the brush does
    raster, k = cells_to_image(cm, cm.labels)
    r, c = (int(v) for v in np.argwhere(cm.labels > 0)[0])
    new = 1 if cm.labels[r, c] != 1 else 2
    g = cm.grid
    raster[int(np.ceil(r * g.stride_px[0] / k)) : int((r + 1) * g.stride_px[0] / k),
           int(np.ceil(c * g.stride_px[1] / k)) : int((c + 1) * g.stride_px[1] / k)] = new
    assert store.paint(raster) == 1 and heard == ["paint"] and store.state.shown.labels[r, c] == new
    learnt = learning(store.state)
    assert learnt.painted == 1 and len(learnt.corrections) == 1
    # a rule: applied, checked, undone
    rule = DecisionRule(min_confidence=0.99)
    check_rule(store.state, rule)
    store.apply_rule(rule)
    assert heard[-1] == "rule" and store.state.class_map.rule == rule
    assert store.state.shown.labels[r, c] == new  # the painted cell stays painted
    store.undo()
    assert heard[-1] == "undo" and store.state.class_map.rule == DecisionRule()
    # the retrain, as the Review dock runs it: the map's model is the new checkpoint afterwards
    with open_slide(SAMPLE_SLIDE) as slide:
        _, result = drain(retrain_job(store.state, learnt, slide))
    state, kept = after_retrain(store.state, result)
    store.replace(state, "retrain")
    assert store.state.model_path == str(result.checkpoint) and store.state.class_map.retrained_from == str(parent)
    assert kept in (0, 1)
    store.undo()
    assert store.state.model_path == str(parent)
