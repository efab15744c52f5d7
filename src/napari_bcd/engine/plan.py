"""What a run would do, before it runs: windows on tissue, the cell size (reads only the thumbnail)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from ..io.slide import Slide
from ..settings import ClassifySettings
from ..tiling import Grid, grid_for, slide_mpp
from ..windows import mapped_cells, select_windows, tissue_fractions

if TYPE_CHECKING:
    from ..model.card import ModelCard

__all__ = ["WindowPlan", "plan_windows"]


@dataclass(frozen=True)
class WindowPlan:
    """What a run would do, before it runs: windows in the grid and on tissue, and the cell size.

    Attributes
    ----------
    total
        Windows in the grid over the whole image.
    on_tissue
        Windows the run would send to the model (the same selection as :func:`~.run.iter_classify`).
    cell_um
        One cell of the class map, ``(h, w)`` µm (the stride).
    cells_on_tissue
        Cells the map would hold on tissue (a coarse map has few).
    """

    total: int
    on_tissue: int
    cell_um: tuple[float, float]
    cells_on_tissue: int
    grid: Grid

    def seconds(self, windows_per_s: float) -> float:
        return self.on_tissue / max(windows_per_s, 1e-9)


def plan_windows(slide: Slide, card: ModelCard, settings: ClassifySettings | None = None,
                 **changes) -> WindowPlan:
    """Count the windows a run with these settings would classify; ``card`` is the model's (no weights needed)."""
    s = (settings or ClassifySettings()).replace(**changes) if changes else (settings or ClassifySettings())
    grid = grid_for(slide, card, s)
    win_frac, cell_frac, _ = tissue_fractions(slide, grid, s.tissue, slide_mpp(slide, s.mpp))
    selected = select_windows(win_frac, s.min_tissue)
    cells = mapped_cells(selected, cell_frac, grid.cells_per_window, s.min_tissue)
    return WindowPlan(int(win_frac.size), int(selected.sum()), grid.cell_um, int(cells.sum()), grid)
