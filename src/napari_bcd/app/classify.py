"""What the Classify dock does, without Qt: the model's card, what a run would do and how long it takes, the run.

The dock reads its fields into a :class:`~napari_bcd.settings.ClassifySettings`
and calls these; the model and its Predictor come from the process's
:class:`~napari_bcd.model.ModelCache` (shared with cohorts and the demo), so
a compiled model compiles once and a retrained checkpoint is seen.
"""

from __future__ import annotations

from collections.abc import Generator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..errors import BcdError

if TYPE_CHECKING:
    from ..engine import ClassMap, Progress, WindowPlan
    from ..io.slide import Slide
    from ..model.card import ModelCard
    from ..settings import ClassifySettings

__all__ = ["ClassifyController", "Estimate", "Stage"]


@dataclass(frozen=True)
class Stage:
    """A phase of a run starts (loading the model, finding tissue...)."""

    message: str


@dataclass(frozen=True)
class Estimate:
    """What a run would do, said before it runs."""

    plan: WindowPlan
    seconds: float
    measured: bool
    overlapped: bool = False
    refine: bool = False
    qc: bool = False
    views: int = 1

    @property
    def text(self) -> str:
        p = self.plan
        if p.on_tissue == 0:
            return (f"No window of the grid ({p.total:,}) has enough tissue: nothing would be classified. Lower the "
                    "tissue threshold or the minimum tissue share.")
        ch, cw = p.cell_um
        when = f"about {duration(self.seconds)}" + ("" if self.measured else " (a first guess from the model's size; "
                                                                              "runs here will refine it)")
        if self.refine:
            when = f"at most {when}"
            text = (f"at most {p.on_tissue:,} windows on tissue (of {p.total:,}): full overlap only where the map is "
                    f"in doubt; one cell = {ch:.0f} x {cw:.0f} µm; {when}.")
        else:
            text = f"{p.on_tissue:,} windows on tissue (of {p.total:,}); one cell = {ch:.0f} x {cw:.0f} µm; {when}."
        if self.views > 1:
            text += (f" Test-time augmentation: {self.views} views of every window, {self.views}x the model's work "
                     "(counted in the time).")
        if self.qc:
            text += " Quality control may then leave out pen ink, folds, debris and blur: fewer windows and cells."
        if p.cells_on_tissue < 30 and not self.overlapped:
            text += (f" A coarse map ({p.cells_on_tissue} cells on tissue): overlap 50 % gives about 4x the cells, "
                     "75 % about 16x.")
        return text


def duration(seconds: float) -> str:
    if seconds < 90:
        return f"{max(1, round(seconds))} s"
    if seconds < 5400:
        return f"{round(seconds / 60)} min"
    return f"{seconds / 3600:.1f} h"


class ClassifyController:
    """The Classify dock's core: reads cards, plans, runs, and remembers how fast runs went."""

    def __init__(self, cache: Any = None) -> None:
        from ..model.loaded import shared_cache

        self.cache = cache or shared_cache()

    @staticmethod
    def checkpoint(path: str | Path | None) -> Path | None:
        """The checkpoint a run would use: ``path``, else the default model."""
        from ..config import default_model_path

        chosen = Path(path) if path else default_model_path()
        return Path(chosen) if chosen else None

    def card(self, path: str | Path | None) -> ModelCard:
        """The model's card, read without loading it (no torch, no weights).

        Raises
        ------
        BcdError
            No model yet (saying how to get one), or a card that cannot be read.
        """
        from ..model.card import read_card

        chosen = self.checkpoint(path)
        if chosen is None:
            raise BcdError("No model yet: train one (Train dock, or `napari-bcd reproduce`) or choose a checkpoint.")
        return read_card(chosen)

    def estimate(self, slide: Slide, card: ModelCard, settings: ClassifySettings) -> Estimate:
        """Windows, cell size and about how long (reads only the thumbnail)."""
        from ..config import measured_rate
        from ..engine import plan_windows

        plan = plan_windows(slide, card, settings)
        overlapped = settings.stride_um is not None or settings.stride != 1.0
        views = tta_views(card, settings)
        rate = measured_rate(_rate_key(card, settings.device))
        measured = bool(rate)
        rate = (rate or _guess_rate(card, settings)) / views  # rates are kept per view: one model pass
        return Estimate(plan, plan.seconds(rate), measured, overlapped, settings.refine, settings.qc.enabled, views)

    def job(self, slide: Slide, path: str | Path | None, settings: ClassifySettings,
            ) -> Generator[Stage | Progress, Any, ClassMap]:
        """Load the model if needed (in the worker), then classify; each phase announced as it starts."""
        from ..engine import iter_classify

        key_known = self.cache.is_current(path)
        yield Stage("Using the model loaded before…" if key_known else
                    "Loading the model (a large one takes several seconds the first time)…")
        loaded = self.cache.get(path, device=settings.device, precision=settings.precision,
                                compile=settings.compile)
        yield Stage("Finding tissue…")
        class_map = yield from iter_classify(slide, loaded.predictor, settings)
        return class_map

    @staticmethod
    def remember(class_map: ClassMap, card: ModelCard, device: str) -> None:
        """Keep this machine's speed, so the next estimate is its own."""
        from ..config import remember_rate

        run = class_map.run
        if run is not None and run.windows >= 4 and run.windows_per_s > 0:
            views = tta_views(card, class_map.settings) if class_map.settings is not None else 1
            remember_rate(_rate_key(card, device), run.windows_per_s * views)


def tta_views(card: ModelCard, settings: ClassifySettings) -> int:
    """Model passes per window: 1, or with test-time augmentation 8 (a square input) or 4 (flips only)."""
    if not settings.tta:
        return 1
    h, w = card.input_px
    return 8 if h == w else 4


def _rate_key(card: ModelCard, device: str) -> str:
    return f"{card.backbone}@{device}"


def _guess_rate(card: ModelCard, settings: ClassifySettings) -> float:
    """Windows/s before any run here: the backbone's CPU speed scaled by its input size (a GPU: much more)."""
    from ..model.backbones import backbone_spec

    try:
        rate = backbone_spec(card.backbone).cpu_windows_per_s
    except BcdError:
        rate = 30.0
    rate *= (256 * 256) / max(card.input_px[0] * card.input_px[1], 1)
    return rate * (300.0 if settings.device.startswith("cuda") else 1.0)
