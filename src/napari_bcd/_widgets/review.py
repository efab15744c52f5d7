"""The "Review and retrain" dock: correct the class map and retrain, decide what is uncertain, measure regions,
explain.

A thin shell over :mod:`napari_bcd.app.review` and :mod:`napari_bcd.review`,
in four sections that fold (each in its own module):

* **Correct and retrain** (:mod:`._review_correct`): paint cells with napari's
  brush and fill; optionally a Shapes layer *you choose* whose classified
  shapes are corrections too; Retrain makes a new checkpoint beside the old
  one and re-predicts the region; Undo goes back;
* **Uncertainty and thresholds** (:mod:`._review_rule`): a decision rule
  applied to the map (the repainted cells kept) and saved in the model, the
  most uncertain places one after the other;
* **Regions** and **Why the model said so** (:mod:`._review_regions`): the
  figures of the shapes of a layer you choose, Grad-CAM of a region.

The map comes from its layer's :class:`~napari_bcd.app.MapStore`; every
change goes through it, so the Classify dock and the layer follow.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from magicgui.widgets import ComboBox, Container, Label, ProgressBar
from napari.layers import Shapes

from ..errors import BcdError
from ._layers import refresh_combo
from ._layout import scrolling, wrapped
from ._maplayer import map_layers, store_of
from ._review_correct import CorrectSection
from ._review_regions import ExplainSection, RegionsSection
from ._review_rule import RuleSection
from ._worker import DockJobs

if TYPE_CHECKING:
    import napari

    from ..app.mapstate import MapState, MapStore


class ReviewWidget(Container):
    """Correct a class map and retrain; the uncertain places first; region figures; why the model said so."""

    def __init__(self, viewer: napari.viewer.Viewer) -> None:
        super().__init__(labels=False)
        self.viewer = viewer
        self._map_combo = ComboBox(label="class map", choices=lambda w: [(x.name, x) for x in map_layers(viewer)],
                                   nullable=True)
        self._progress = ProgressBar(label="", value=0, min=0, max=1, visible=False)
        self._status = wrapped(Label(label="", value=""))
        self.correct = CorrectSection(self)
        self.rule = RuleSection(self)
        self.regions = RegionsSection(self)
        self.explain = ExplainSection(self)
        self._sections = (self.correct.section, self.rule.section, self.regions.section, self.explain.section)
        top = Container(widgets=[self._map_combo], labels=True)
        self.native.layout().addWidget(scrolling(top, self._progress, self._status, *self._sections))
        self.jobs = DockJobs(self.native, viewer, "The job", self._set_running, self.say)
        self.layer = None
        self._unlisten = None
        self._map_combo.changed.connect(self._on_map_changed)
        viewer.layers.events.inserted.connect(self._on_layers_changed)
        viewer.layers.events.removed.connect(self._on_layers_changed)
        self._on_layers_changed()
        self._on_map_changed()

    # ------------------------------------------------------------------ what the sections share
    @property
    def _worker(self):
        return self.jobs.worker

    @property
    def store(self) -> MapStore | None:
        return store_of(self.layer)

    @property
    def state(self) -> MapState | None:
        store = self.store
        return store.state if store is not None else None

    def shapes_choices(self, _widget: Any = None) -> list:
        return [(layer.name, layer) for layer in self.viewer.layers if isinstance(layer, Shapes)]

    def image_layer(self):
        state = self.state
        if state is None:
            raise BcdError("Choose a class map (classify a slide first).")
        if state.image in self.viewer.layers:
            return self.viewer.layers[state.image]
        raise BcdError(f"The image {state.image!r} this map was made on is no longer open; open it again.")

    def say(self, text: str) -> None:
        self._status.value = text

    def progress(self, done: int, total: int) -> None:
        self._progress.max, self._progress.value = max(int(total), 1), min(int(done), max(int(total), 1))

    def start(self, what: str, gen, on_yield, on_return, layers: tuple = ()) -> None:
        """Run one job of the dock (Retrain, Grad-CAM, Save in the model); removing ``layers`` cancels it."""
        self.jobs.what = what
        self.jobs.start(gen, on_yield, on_return, layers=(self.layer, *layers))

    def _set_running(self, running: bool) -> None:
        self._progress.visible = running
        if running:
            self._progress.value, self._progress.max = 0, 0
        for section in (self.correct, self.rule, self.explain):
            section.set_running(running)

    # ------------------------------------------------------------------ the map
    def _on_layers_changed(self, event=None) -> None:
        refresh_combo(self._map_combo)
        for section in (self.correct, self.regions):
            section.refresh_layers()

    def _on_map_changed(self) -> None:
        if self._unlisten is not None:
            self._unlisten()
            self._unlisten = None
        self.layer = self._map_combo.value
        store = self.store
        if store is not None:
            self._unlisten = store.listen(lambda state, reason: self._on_state(state, reason))
        self._on_state(self.state, "chosen")

    def _on_state(self, state: MapState | None, reason: str) -> None:
        """Every section follows the map: a new run, a retrain, an Apply, an Undo, a repainted cell."""
        if state is None:
            self.say("Classify a slide first (Classify slide dock): its map appears here.")
        elif reason in ("chosen", "new"):
            from pathlib import Path

            model = Path(state.model_path).name if state.model_path else "an unnamed model"
            self.say(f"The map of {state.image} by {model}.")
        for section in (self.correct, self.rule, self.regions, self.explain):
            section.show_state(state, reason)
