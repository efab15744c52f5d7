"""What the Review dock does, without Qt: what a retrain learns from, the retrain, the map after it, the
decision rule, Grad-CAM.

The dock reads the map from its :class:`~napari_bcd.app.MapStore`, names the
shapes (if any) whose classified polygons are corrections too, and calls
these.  Nothing here chooses a Shapes layer: only what the user chooses
becomes a correction.
"""

from __future__ import annotations

from collections.abc import Generator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from ..errors import BcdError

if TYPE_CHECKING:
    from ..annotations import Annotation
    from ..decision import DecisionRule
    from ..io.slide import Slide
    from ..review import Corrections, RetrainResult
    from .mapstate import MapState

__all__ = ["Learning", "after_retrain", "check_rule", "learning", "retrain_job", "saliency_job", "save_rule_job"]


@dataclass(frozen=True)
class Learning:
    """What a retrain would learn from: the repainted cells and the cells under the chosen classified shapes."""

    corrections: Corrections
    painted: int
    from_shapes: int
    shapes: str | None = None

    @property
    def text(self) -> str:
        if not len(self.corrections):
            where = f" or draw shapes with a class on '{self.shapes}'" if self.shapes else ""
            return f"Retrain learns from nothing yet: paint cells with another class{where}."
        parts = [f"{self.painted} repainted cell(s)"] if self.painted else []
        if self.shapes:
            parts.append(f"{self.from_shapes} cell(s) under the classified shapes of '{self.shapes}'")
        text = "Retrain learns from " + " and ".join(parts) + f": {self.corrections.describe()}"
        return text + (f" ({'; '.join(self.corrections.notes)})" if self.corrections.notes else "") + "."


def learning(state: MapState, shapes: Sequence[Annotation] = (), shapes_name: str | None = None) -> Learning:
    """The corrections of a map: its repainted cells, plus cells whose centre a classified shape covers.

    Where a repainted cell and a shape disagree, the paint wins (it is the
    later, finer act).  Unclassified shapes teach nothing.
    """
    from ..review import corrections_from_annotations

    painted = state.corrections()
    n_painted = len(painted.cells)
    classified = [a for a in shapes if a.class_name is not None]
    if not classified:
        return Learning(painted, n_painted, 0, shapes_name)
    cm = state.class_map
    drawn = corrections_from_annotations(cm.grid, classified, cm.classes, labels=cm.labels, slide=cm.slide_name,
                                         uncertain_label=cm.uncertain_label)
    cells = {(c.row, c.col): c for c in drawn.cells}
    cells.update({(c.row, c.col): c for c in painted.cells})
    painted.cells = [cells[k] for k in sorted(cells)]
    return Learning(painted, n_painted, len(painted.cells) - n_painted, shapes_name)


def retrain_job(state: MapState, learnt: Learning, slide: Slide, *, weight: float = 4.0,
                whole_slide: bool = False) -> Generator[Any, Any, RetrainResult]:
    """The retrain as a generator (checked now: a BcdError before any work)."""
    from ..review import iter_retrain

    if not state.model_path:
        raise BcdError("This map does not say which model made it; classify the slide again in this session.")
    return iter_retrain(state.model_path, learnt.corrections, slide, class_map=state.class_map, weight=weight,
                        whole_slide=whole_slide)


def after_retrain(state: MapState, result: RetrainResult) -> tuple[MapState, int]:
    """The map to show after a retrain, and how many repainted cells stay painted.

    The new model's map, with the repainted cells it still calls otherwise
    kept as painted (they are the pathologist's; the next retrain learns them
    again).  The new checkpoint is the map's model from now on.
    """
    import dataclasses

    new = result.class_map if result.class_map is not None else state.class_map
    if new.model_path != str(result.checkpoint):  # the region re-predicted in place: the new model's map now
        new = dataclasses.replace(new, model=dataclasses.replace(new.model, name=result.card.name,
                                                                 path=str(result.checkpoint),
                                                                 weights_sha256=result.card.weights_sha256),
                                  retrained_from=str(result.parent))
    kept = {k: v for k, v in state.corrected.items() if int(new.labels[k]) != v}
    return dataclasses.replace(state, class_map=new, corrected=kept), len(kept)


def check_rule(state: MapState, rule: DecisionRule) -> None:
    """Refuse a rule this map cannot apply (a BcdError saying what to do)."""
    if rule.min_quality > 0 and state.class_map.quality is None:
        raise BcdError("This map has no image-quality scores; classify the slide again in the Classify dock to use "
                       "'min image quality'.")


def save_rule_job(path: str | Path, rule: DecisionRule) -> Generator[None, None, Path]:
    """Store ``rule`` in the model's card (the weights unchanged), as a job."""
    from ..model.checkpoint import save_decision

    yield None
    return save_decision(path, rule)


def clip_box(box: tuple[float, float, float, float], slide_shape: tuple[int, int]) -> tuple[float, float, float, float]:
    """A level-0 box ``(y0, x0, y1, x1)`` cut at the slide's edges (a view wider than the slide explains the slide)."""
    h, w = slide_shape
    y0, x0, y1, x1 = box
    y0, y1 = float(np.clip(y0, 0, h)), float(np.clip(y1, 0, h))
    x0, x1 = float(np.clip(x0, 0, w)), float(np.clip(x1, 0, w))
    if y1 <= y0 or x1 <= x0:
        raise BcdError("The region to explain lies outside the slide: move the view over the tissue.")
    return (y0, x0, y1, x1)


def saliency_job(state: MapState, slide: Slide, box: tuple[float, float, float, float],
                 class_name: str | None = None) -> Generator[Any, Any, Any]:
    """Grad-CAM of the windows under ``box`` (level-0 ``y0, x0, y1, x1``, cut at the slide), as a job."""
    from ..review import iter_saliency

    if not state.model_path:
        raise BcdError("This map does not say which model made it; classify the slide again in this session.")
    cm = state.class_map
    box = clip_box(box, cm.slide_shape)
    path = state.model_path

    def job() -> Generator[Any, Any, Any]:
        from ..model.checkpoint import load_checkpoint

        yield (0, 1)
        model = load_checkpoint(path)
        return (yield from iter_saliency(slide, model, cm.grid, box, class_name=class_name))

    return job()
