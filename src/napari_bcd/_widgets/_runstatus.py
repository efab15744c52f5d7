"""A dock's progress for one kind of job: its bar and status line, and a bar in napari's activity dock."""

from __future__ import annotations

from magicgui.widgets import Label, ProgressBar

from ..app.classify import duration
from ._layout import wrapped


class RunStatus:
    """The bar (busy while a phase has no count), the status line, and napari's activity bar of a running job."""

    def __init__(self) -> None:
        self.progress = ProgressBar(label="", value=0, min=0, max=1, visible=False)
        self.status = wrapped(Label(label="", value=""))
        #: napari's activity-dock bar while a job runs, else None.
        self.pbar = None

    def say(self, text: str) -> None:
        self.status.value = text

    def running(self, running: bool, description: str = "") -> None:
        """Show the bar (busy) and open an activity bar when a job starts; close them when it ends."""
        from napari.utils import progress

        self.progress.visible = running
        if running:
            self.progress.value, self.progress.max = 0, 0  # busy until the work is counted
            self.say("Starting…")
            self.pbar = progress(total=0, desc=description)
        elif self.pbar is not None:
            self.pbar.close()
            self.pbar = None

    def stage(self, message: str) -> None:
        """A phase without a count (loading the model, finding tissue): the bar shows it is busy."""
        self.progress.max = 0
        self.say(message)

    def count(self, done: int, total: int, rate: float, eta_s: float | None, unit: str = "windows") -> None:
        self.progress.max, self.progress.value = max(total, 1), done
        eta = f", about {duration(eta_s)} left" if eta_s is not None else ""
        self.say(f"{done} / {total} {unit}, {rate:.1f}/s{eta}")
        if self.pbar is not None:
            if self.pbar.total != total:
                self.pbar.total = total
            self.pbar.update(done - self.pbar.n)
