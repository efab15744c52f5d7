"""The Review dock's "Uncertainty and thresholds" section: a decision rule and the most uncertain places."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from magicgui.widgets import ComboBox, Container, FloatSpinBox, PushButton

from ..app.review import check_rule, save_rule_job
from ..decision import DEFAULT_MEASURE, MEASURES
from ..errors import BcdError
from ._layout import Section, buttons, readonly_text
from ._worker import notify_error

if TYPE_CHECKING:
    from ..app.mapstate import MapState
    from ..decision import DecisionRule
    from .review import ReviewWidget

MEASURE_NAMES = {m.label: name for name, m in MEASURES.items()}


class RuleSection:
    """Per-class thresholds and cut-offs applied to the map (painted cells kept), saved in the model on request;
    the most uncertain regions, Next / Previous centring the view on each."""

    def __init__(self, dock: ReviewWidget) -> None:
        self.dock = dock
        self._measure_combo = ComboBox(label="uncertainty", choices=list(MEASURE_NAMES),
                                       value=MEASURES[DEFAULT_MEASURE].label)
        self._conf_spin = FloatSpinBox(label="uncertain below", value=0.0, min=0.0, max=1.0, step=0.05,
                                       tooltip="cells less confident than this are grey and out of the slide call")
        self._quality_spin = FloatSpinBox(label="min image quality", value=0.0, min=0.0, max=1.0, step=0.1,
                                          tooltip="cells with pen, blur or folds below this score are uncertain")
        self._thr_box = Container(labels=True, widgets=[])
        self._thr_spins: dict[str, FloatSpinBox] = {}
        self._apply_button = PushButton(text="Apply to the map")
        self._save_rule_button = PushButton(text="Save in the model")
        self._regions_text = readonly_text(max_height=120)
        self._prev_button = PushButton(text="◀ Previous")
        self._next_button = PushButton(text="Next ▶")
        self.section = Section("Uncertainty and thresholds", [
            self._measure_combo, self._conf_spin, self._quality_spin, self._thr_box,
            buttons(self._apply_button, self._save_rule_button), self._regions_text,
            buttons(self._prev_button, self._next_button)], open=False)
        self.regions: list = []
        #: What the last retrain did to the queue, in words (the Correct section says it with the retrain's result).
        self.resolved_text = ""
        self.index = -1
        self._apply_button.changed.connect(self.apply)
        self._save_rule_button.changed.connect(self.save)
        self._measure_combo.changed.connect(self._update_regions)
        self._next_button.changed.connect(lambda: self.go_to(self.index + 1))
        self._prev_button.changed.connect(lambda: self.go_to(self.index - 1))

    def set_running(self, running: bool) -> None:
        self._save_rule_button.enabled = not running

    def show_state(self, state: MapState | None, reason: str) -> None:
        from ..classes import class_styles

        if state is None or reason not in ("chosen", "new", "retrain", "undo"):
            if state is not None and reason == "rule":
                self._update_regions()
            return
        cm = state.class_map
        for name in list(self._thr_spins):
            self._thr_box.remove(self._thr_spins.pop(name))
        rule = cm.rule.to_dict()
        for st in class_styles(cm.classes):
            spin = FloatSpinBox(label=f"{st.display_name.replace(' carcinoma', '')} from p", min=0.0, max=1.0,
                                step=0.05, value=float((rule.get("thresholds") or {}).get(st.name, 0.0)),
                                tooltip=f"call {st.display_name} from this probability (0 = no threshold)")
            self._thr_spins[st.name] = spin
            self._thr_box.append(spin)
        self._conf_spin.value = float(rule.get("min_confidence", 0.0))
        self._quality_spin.value = float(rule.get("min_quality", 0.0))
        queued = list(self.regions) if reason == "retrain" else []
        self.resolved_text = ""
        self._update_regions()
        if queued:  # the loop closed: what the correction taught, said where the queue is
            from ..review.uncertain import resolved_regions

            done = resolved_regions(queued, state.shown, MEASURE_NAMES[self._measure_combo.value],
                                    self._threshold())
            self.resolved_text = (f"The retrain resolved {done} of the {len(queued)} queued uncertain regions; "
                                  f"{len(self.regions)} are queued now.")

    def rule(self) -> DecisionRule:
        from ..decision import DecisionRule

        return DecisionRule(thresholds={k: s.value for k, s in self._thr_spins.items() if s.value > 0},
                            min_confidence=self._conf_spin.value, measure=MEASURE_NAMES[self._measure_combo.value],
                            min_quality=self._quality_spin.value)

    def apply(self) -> None:
        """Relabel the map with the thresholds and cut-offs shown (probabilities unchanged; painted cells kept)."""
        store = self.dock.store
        if store is None:
            return
        try:
            rule = self.rule()
            check_rule(store.state, rule)
        except BcdError as err:
            notify_error(err)
            return
        store.apply_rule(rule)
        from ..summary import summarize

        s = summarize(store.state.shown)
        kept = len(store.state.corrected)
        self.dock.say(f"Rule: {s.decision}. Uncertain: {s.uncertain_area_mm2:.3f} mm²."
                      + (f" {kept} repainted cell(s) kept as painted." if kept else ""))

    def save(self) -> None:
        """Store the thresholds in the model's card (the weights are unchanged), in a worker."""
        state = self.dock.state
        if state is None or not state.model_path:
            notify_error(BcdError("This map does not say which model made it."))
            return
        rule = self.rule()
        self.dock.start("Saving the rule", save_rule_job(state.model_path, rule), lambda _: None,
                        lambda p: self.dock.say(f"Saved in {Path(p).name}: {rule.describe()}"))

    def _update_regions(self) -> None:
        from ..review import uncertain_regions

        state = self.dock.state
        if state is None:
            return
        self.regions = uncertain_regions(state.shown, MEASURE_NAMES[self._measure_combo.value], n=20,
                                         threshold=self._threshold())
        self.index = -1
        self._regions_text.value = ("\n".join(r.describe() for r in self.regions) if self.regions
                                    else "No region is that uncertain.")

    def _threshold(self) -> float:
        return 1.0 - self._conf_spin.value if self._conf_spin.value > 0 else 0.5

    def go_to(self, index: int) -> None:
        """Centre and zoom the view on uncertain region ``index`` (wrapping around)."""
        dock, state = self.dock, self.dock.state
        if not self.regions or state is None:
            return
        self.index = index % len(self.regions)
        region = self.regions[self.index]
        my, mx = state.class_map.grid.mpp
        ty, tx = state.translate
        cy, cx = region.centre_px
        dock.viewer.camera.center = (ty + cy * my, tx + cx * mx)
        y0, x0, y1, x1 = region.box_px
        span = max((y1 - y0) * my, (x1 - x0) * mx, 1e-6) * 3
        size = getattr(dock.viewer, "_canvas_size", None) or (600, 800)
        dock.viewer.camera.zoom = min(size) / span
        dock.say(region.describe())

    def selected_box(self) -> tuple[float, float, float, float] | None:
        """The level-0 box of the uncertain region last gone to, if any."""
        return self.regions[self.index].box_px if 0 <= self.index < len(self.regions) else None
