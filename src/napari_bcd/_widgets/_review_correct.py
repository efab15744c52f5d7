"""The Review dock's "Correct and retrain" section."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

from magicgui.widgets import CheckBox, ComboBox, FloatSpinBox, Label, PushButton
from napari.utils.notifications import show_info, show_warning

from ..app.review import Learning, after_retrain, learning, retrain_job
from ..errors import BcdError
from ._layers import refresh_combo, slide_for_layer
from ._layout import Section, buttons, wrapped
from ._maplayer import flush_paint
from ._worker import notify_error

if TYPE_CHECKING:
    from ..app.mapstate import MapState
    from .review import ReviewWidget


class CorrectSection:
    """Paint cells (and, if chosen, classified shapes), Retrain, Undo; a new model that changes much of the
    slide is shown to the user before it is used."""

    def __init__(self, dock: ReviewWidget) -> None:
        self.dock = dock
        self._paint_help = wrapped(Label(label="", value=""), rich=True)
        self._paint_combo = ComboBox(label="paint class", choices=[])
        self._shapes_combo = ComboBox(label="shapes as corrections", choices=dock.shapes_choices, nullable=True,
                                      tooltip="none: only the painted cells. A Shapes layer chosen here: its shapes "
                                              "with a class correct the cells under them.")
        self._corr_label = wrapped(Label(label="", value=""))
        self._weight_spin = FloatSpinBox(label="weight", value=4.0, min=0.5, max=100.0, step=0.5,
                                         tooltip="how many training images each corrected cell counts as")
        self._whole_check = CheckBox(text="re-predict the whole slide (slower)", value=False)
        self._retrain_button = PushButton(text="Retrain")
        self._cancel_button = PushButton(text="Cancel", enabled=False)
        self._undo_button = PushButton(text="Undo", enabled=False,
                                       tooltip="back to the map (and model) before the last Retrain or Apply")
        self._use_button = PushButton(text="Use the new model", visible=False)
        self._discard_button = PushButton(text="Keep the old one", visible=False)
        self.section = Section("Correct and retrain", [
            self._paint_help, self._paint_combo, self._shapes_combo, self._corr_label, self._weight_spin,
            self._whole_check, buttons(self._retrain_button, self._cancel_button, self._undo_button),
            buttons(self._use_button, self._discard_button)])
        self._pending: tuple[Any, Any] | None = None  # (result, state before) waiting for the user's word
        self._shapes = None
        self._paint_combo.changed.connect(self._on_paint_class)
        self._shapes_combo.changed.connect(self._on_shapes_changed)
        self._retrain_button.changed.connect(self.retrain)
        self._cancel_button.changed.connect(lambda: dock.jobs.cancel())
        self._undo_button.changed.connect(self.undo)
        self._use_button.changed.connect(lambda: self.decide(True))
        self._discard_button.changed.connect(lambda: self.decide(False))

    def refresh_layers(self) -> None:
        refresh_combo(self._shapes_combo, pick=None)  # only what the user chooses becomes a correction

    def set_running(self, running: bool) -> None:
        self._retrain_button.enabled = not running
        self._cancel_button.enabled = running
        store = self.dock.store
        self._undo_button.enabled = not running and store is not None and bool(store.history)

    def show_state(self, state: MapState | None, reason: str) -> None:
        from ..classes import class_styles
        from ..layers import UNCERTAIN_RGBA

        self.set_running(self.dock.jobs.running)
        if state is None:
            self._paint_help.value = self._corr_label.value = ""
            return
        if reason in ("chosen", "new"):
            cm = state.class_map
            swatch = '<span style="background-color: rgb{}; color: rgb{}">&nbsp;&nbsp;</span>'
            parts = [f"{swatch.format(st.color, st.color)} {st.label} {st.display_name}" for st in
                     class_styles(cm.classes)]
            grey = tuple(int(v * 255) for v in UNCERTAIN_RGBA[:3])
            parts.append(f"{swatch.format(grey, grey)} {cm.uncertain_label} uncertain (not a class)")
            self._paint_help.value = "Paint cells with napari's brush or fill (label numbers):<br>" + "<br>".join(parts)
            self._paint_combo.choices = [st.display_name for st in class_styles(cm.classes)]
        self._show_learning()

    def learning(self) -> Learning:
        """What Retrain would learn from now (the brush's last stroke counted first)."""
        from ..annotations.napari import shapes_to_annotations

        dock = self.dock
        if dock.layer is None or dock.state is None:
            raise BcdError("Choose a class map (classify a slide first).")
        flush_paint(dock.layer)
        shapes = self._shapes
        anns = shapes_to_annotations(shapes, dock.image_layer()) if shapes is not None and len(shapes.data) else []
        return learning(dock.state, anns, shapes.name if shapes is not None else None)

    def _show_learning(self) -> None:
        try:
            self._corr_label.value = self.learning().text
        except BcdError as err:
            self._corr_label.value = str(err)

    def _on_paint_class(self) -> None:
        from ..classes import class_styles

        dock, state = self.dock, self.dock.state
        if state is None or not self._paint_combo.value:
            return
        for st in class_styles(state.class_map.classes):
            if st.display_name == self._paint_combo.value:
                dock.layer.selected_label = st.label
                dock.layer.mode = "paint"
                dock.viewer.layers.selection.active = dock.layer

    def _on_shapes_changed(self) -> None:
        if self._shapes is not None:
            self._shapes.events.data.disconnect(self._show_learning)
            self._shapes.events.features.disconnect(self._show_learning)
        self._shapes = self._shapes_combo.value
        if self._shapes is not None:
            self._shapes.events.data.connect(self._show_learning)
            self._shapes.events.features.connect(self._show_learning)
        self._show_learning()

    # ------------------------------------------------------------------ retrain
    def retrain(self) -> None:
        """Retrain from what :meth:`learning` says (a new checkpoint) and re-predict, in a worker."""
        dock = self.dock
        try:
            learnt = self.learning()
            state = dock.state
            slide = slide_for_layer(dock.image_layer(), state.class_map.grid.mpp[1])
            gen = retrain_job(state, learnt, slide, weight=self._weight_spin.value,
                              whole_slide=self._whole_check.value)
        except BcdError as err:
            dock.say(str(err))
            notify_error(err)
            return
        dock.say(learnt.text.replace("Retrain learns from", "Retraining from", 1))
        extra = (self._shapes,) if self._shapes is not None else ()
        dock.start("Retrain", gen, self._on_progress, lambda res: self._on_retrained(res, state),
                   layers=(dock.image_layer(), *extra))

    def _on_progress(self, item) -> None:
        if hasattr(item, "message"):
            self.dock.say(item.message)
            return
        self.dock.progress(item.done, item.total)
        self.dock.say(str(item))

    def _on_retrained(self, result, before: MapState) -> None:
        dock = self.dock
        if result is None:
            dock.say("Stopped before training: nothing was saved.")
            return
        if result.warning:  # the user sees it before the new model is used anywhere
            self._pending = (result, before)
            self._use_button.visible = self._discard_button.visible = True
            dock.say(f"{result.describe()}\n{result.warning}")
            show_warning("The new model changes much of the slide outside your corrections: see the Review dock.")
            return
        self._apply(result, before)

    def decide(self, use: bool) -> None:
        """The user's word on a new model that changes much of the slide: use it, or keep the old one."""
        if self._pending is None:
            return
        result, before = self._pending
        self._pending = None
        self._use_button.visible = self._discard_button.visible = False
        if use:
            self._apply(result, before)
        else:
            self.dock.say(f"Kept {Path(before.model_path).name}; {result.checkpoint.name} is saved but not used "
                          "(delete it if you do not want it).")

    def _apply(self, result, before: MapState) -> None:
        dock = self.dock
        state, kept = after_retrain(dock.state if dock.state is not None else before, result)
        dock.store.replace(state, "retrain")  # the layer, the Classify dock and its exports follow
        note = (f" {kept} repainted cell(s) the new model still calls otherwise stay as you painted them." if kept
                else "")
        queue = f"\n{dock.rule.resolved_text}" if dock.rule.resolved_text else ""
        dock.say(result.describe() + note + queue)
        show_info(f"Retrained: {result.checkpoint.name}")

    def undo(self) -> None:
        """Back to the map (and its model) before the last Retrain or Apply."""
        store = self.dock.store
        if store is None or store.undo() is None:
            return
        model = Path(store.state.model_path).name if store.state.model_path else "the model before"
        self.dock.say(f"Undone: back to the map of {model}.")
