"""Live loss and accuracy curves of a training run (matplotlib in a Qt canvas), redrawn at most every REDRAW_MS;
where only the simple classifier was measured, its regularisation curve instead."""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from ..train.headfit import FitProgress
    from ..train.regularise import Tuning

__all__ = ["REDRAW_MS", "CurvePlot"]

#: The curves are redrawn at most this often (ms): drawing on the Qt thread at every epoch froze the viewer.
REDRAW_MS = 500


class CurvePlot:
    """Live loss and accuracy curves (matplotlib in a Qt canvas), redrawn at most every REDRAW_MS."""

    def __init__(self) -> None:
        from matplotlib.backends.backend_qtagg import FigureCanvasQTAgg
        from matplotlib.figure import Figure
        from qtpy.QtCore import QTimer

        self.figure = Figure(figsize=(4, 2.0), dpi=90, tight_layout=True)
        from qtpy.QtWidgets import QSizePolicy

        self.canvas = FigureCanvasQTAgg(self.figure)
        self.canvas.setMinimumHeight(150)
        # Take the dock's width, never widen it (a figure asks for its figsize, which clipped the dock).
        self.canvas.setMinimumWidth(120)
        self.canvas.setSizePolicy(QSizePolicy.Policy.Ignored, QSizePolicy.Policy.Fixed)
        self.canvas.setFixedHeight(170)
        self.canvas.setVisible(False)  # no empty axes before the first epoch
        self.ax_loss = self.figure.add_subplot(121)
        self.ax_acc = self.figure.add_subplot(122)
        self.epochs: list = []
        self.tuning: Tuning | None = None  # shown instead of the steps (show_tuning)
        self._timer = QTimer()
        self._timer.setSingleShot(True)
        self._timer.setInterval(REDRAW_MS)
        self._timer.timeout.connect(self._draw)

    def clear(self) -> None:
        self.epochs = []
        self.tuning = None
        self._timer.stop()
        self.canvas.setVisible(False)

    def add(self, stats: FitProgress) -> None:
        self.epochs.append(stats)
        if not self._timer.isActive():
            self._timer.start()

    def flush(self) -> None:
        """Draw what has arrived now (the run ended)."""
        self._timer.stop()
        if self.epochs and self.tuning is None:
            self._draw()

    def _draw(self) -> None:
        self.canvas.setVisible(True)
        # One line per run (a fold and recipe, or the final fit); NaN points (no held-out images) are not drawn.
        runs: dict[tuple, list] = {}
        for s in self.epochs:
            runs.setdefault((s.fold, s.recipe), []).append(s)
        for ax, key, title in ((self.ax_loss, "val_loss", "held-out loss"), (self.ax_acc, "val_acc",
                                                                            "held-out accuracy")):
            ax.clear()
            for (fold, _recipe), items in runs.items():
                ax.plot([s.step for s in items], [getattr(s, key) for s in items], lw=1,
                        label=f"fold {fold}" if fold else "held out")
            ax.set_title(title, fontsize=9)
            ax.set_xlabel("steps", fontsize=7)
            ax.tick_params(labelsize=7)
        self.canvas.draw_idle()

    @property
    def heads_trained(self) -> bool:
        """Whether any head steps were measured (else only the simple classifier was, once per fold)."""
        return any(s.steps for s in self.epochs)

    def show_tuning(self, tuning: Tuning) -> None:
        """The simple classifier's held-out loss and accuracy at each ``C`` tried, the chosen one marked: what
        decided the model when no head was trained (a curve over steps would be single points)."""
        import numpy as np

        if not tuning.folds or not tuning.loss:
            return
        self.tuning = tuning
        self._timer.stop()
        self.canvas.setVisible(True)
        grid = np.asarray(tuning.grid)
        chosen = f"C (- - chosen: {tuning.chosen:g})"
        for ax, mean, se, title, label in (
                (self.ax_loss, tuning.loss, tuning.loss_standard_error, "held-out loss", chosen),
                (self.ax_acc, tuning.accuracy, tuning.standard_error, "held-out accuracy", "smaller C: stronger")):
            ax.clear()
            m, e = np.asarray(mean, float), np.asarray(se, float)
            ax.fill_between(grid, m - e, m + e, alpha=0.2, lw=0)
            ax.plot(grid, m, lw=1, marker=".", ms=3)
            ax.axvline(tuning.chosen, color="k", ls="--", lw=0.8)
            ax.set_xscale("log")
            ax.set_title(title, fontsize=9)
            ax.set_xlabel(label, fontsize=7)
            ax.tick_params(labelsize=7)
        self.canvas.draw_idle()
