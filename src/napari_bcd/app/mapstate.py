"""One class map, one truth: the map on a layer, the cells a pathologist repainted, and everything derived from it.

A :class:`MapStore` holds the :class:`MapState` of one ``<image> classes``
layer and its history.  Every view and export of the map (the layer's
pixels, the Classify dock's summary, legend and hover, the GeoJSON, CSV and
label TIFF, the Review dock's counts) is derived from :attr:`MapState.shown`:
the model's map with the repainted cells in their new classes.  A retrain, an
*Apply* of a decision rule and an *Undo* replace the state and tell every
listener, so no view can describe a map that is no longer on screen.  Qt-free.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    from ..decision import DecisionRule
    from ..engine import ClassMap
    from ..review.corrections import Corrections

__all__ = ["MapState", "MapStore"]


@dataclass(frozen=True)
class MapState:
    """The map shown on one layer.

    Attributes
    ----------
    class_map
        The model's map (labels from its decision rule).
    image, translate
        The image layer it lies on, and that layer's translate (µm).
    corrected
        ``(row, col) -> label`` of the cells repainted by hand (0 = erased);
        they keep their label through an *Apply* and are learnt by a retrain.
    """

    class_map: ClassMap
    image: str
    translate: tuple[float, float] = (0.0, 0.0)
    corrected: dict[tuple[int, int], int] = field(default_factory=dict)

    @property
    def model_path(self) -> str:
        return self.class_map.model_path

    @property
    def shown(self) -> ClassMap:
        """The map as shown: the model's labels with the repainted cells' labels on top."""
        if not self.corrected:
            return self.class_map
        labels = self.class_map.labels.copy()
        for (r, c), v in self.corrected.items():
            labels[r, c] = v
        return dataclasses.replace(self.class_map, labels=labels)

    def corrections(self) -> Corrections:
        """The repainted cells as :class:`~napari_bcd.review.Corrections` (what a retrain learns)."""
        from ..review.corrections import corrections_from_labels

        return corrections_from_labels(self.class_map, self.shown.labels)

    def with_corrected(self, corrected: dict[tuple[int, int], int]) -> MapState:
        return dataclasses.replace(self, corrected=dict(corrected))

    def with_rule(self, rule: DecisionRule) -> MapState:
        """The model's map labelled by ``rule`` (probabilities unchanged); the repainted cells stay as painted."""
        from ..decision import apply_decision

        return dataclasses.replace(self, class_map=apply_decision(self.class_map, rule))


Listener = Callable[[MapState, str], None]


class MapStore:
    """The state of one map layer, its history for *Undo*, and who to tell when it changes.

    ``reason`` passed to listeners: ``"new"`` (a classification), ``"paint"``
    (cells repainted on the layer: its pixels are already right),
    ``"retrain"``, ``"rule"`` or ``"undo"``.
    """

    def __init__(self, state: MapState) -> None:
        self.state = state
        self.history: list[MapState] = []
        self._listeners: list[Listener] = []

    def listen(self, fn: Listener) -> Callable[[], None]:
        """Call ``fn(state, reason)`` on every change; returns a function that stops it."""
        self._listeners.append(fn)
        return lambda: self._listeners.remove(fn) if fn in self._listeners else None

    def replace(self, state: MapState, reason: str, *, undoable: bool = True) -> None:
        if undoable:
            self.history.append(self.state)
        self.state = state
        for fn in list(self._listeners):
            fn(state, reason)

    def undo(self) -> MapState | None:
        """Back to the state before the last undoable change (None when there is none)."""
        if not self.history:
            return None
        self.replace(self.history.pop(), "undo", undoable=False)
        return self.state

    def paint(self, raster: np.ndarray, box: tuple[int, int, int, int] | None = None) -> int:
        """Take the cells repainted on the layer's raster (a brush stroke, a fill); returns how many are corrected.

        ``box`` (raster ``y0, y1, x0, x1``): only the cells under it are looked
        at again (a stroke's extent), so painting stays quick on a large map.
        A cell counts as repainted when most of it carries another label than
        the model's; cells painted back to the model's label are no longer
        corrected.
        """
        from ..review.corrections import cell_majority

        cm = self.state.class_map
        major, share = cell_majority(cm, raster, box=box)
        looked = major >= 0 if box is not None else np.ones(major.shape, bool)
        differs = looked & (share >= 0.5) & (major != cm.labels.astype(np.int64))
        corrected = {k: v for k, v in self.state.corrected.items() if not looked[k]}
        corrected.update({(int(r), int(c)): int(major[r, c]) for r, c in np.argwhere(differs)})
        if corrected != self.state.corrected:
            self.replace(self.state.with_corrected(corrected), "paint", undoable=False)
        return len(corrected)

    def apply_rule(self, rule: DecisionRule) -> None:
        """Relabel by ``rule``, keeping the repainted cells (undoable)."""
        self.replace(self.state.with_rule(rule), "rule")
