"""Running core generators in napari thread workers, one job per dock, cancelled when what it needs goes away."""

from __future__ import annotations

from collections.abc import Callable, Generator, Sequence
from typing import TYPE_CHECKING, Any

from napari.qt.threading import GeneratorWorker, create_worker
from napari.utils.notifications import show_error, show_info

from ..errors import BcdError

if TYPE_CHECKING:
    import napari
    from qtpy.QtWidgets import QWidget

__all__ = ["DockJobs", "notify_error", "start_job"]


def _drive(gen: Generator) -> Generator:
    return (yield from gen)


def notify_error(err: BaseException) -> None:
    """Show an error as a napari notification, in words a user can act on."""
    if isinstance(err, BcdError):
        show_error(str(err))
    else:
        show_error(f"Unexpected {type(err).__name__}: {err}. Please report this with the steps that led to it.")


def error_text(err: BaseException) -> str:
    return f"Stopped: {err}" if isinstance(err, BcdError) else f"Failed: {type(err).__name__}: {err}"


def start_job(
    gen: Generator,
    on_yield: Callable[[Any], None],
    on_return: Callable[[Any], None],
    on_finish: Callable[[], None],
    on_error: Callable[[BaseException], None] | None = None,
) -> GeneratorWorker:
    """Run a core generator in a thread; errors become notifications (and ``on_error``).

    The generator is closed when the worker finishes, so a cancelled job
    releases its reading threads and files at once.
    """

    from . import _guard_against_two_llvms

    # again here, not only on import: a script may import the docks before its viewer loads Mesa's LLVM, and a job
    # is where timm first pulls Triton in (a crash in LLVM's initialisers, not an error anyone can catch)
    _guard_against_two_llvms()

    def errored(err: BaseException) -> None:
        notify_error(err)
        if on_error is not None:
            on_error(err)

    # Handing "errored" to create_worker matters: without it superqt also connects a handler that re-raises
    # the error in the Qt event loop, and napari shows the user a traceback.  And connected before the thread
    # starts, an error raised at once is never missed.
    worker = create_worker(_drive, gen, _start_thread=False,
                           _connect={"yielded": on_yield, "returned": on_return, "errored": errored})

    def finished() -> None:
        gen.close()
        on_finish()

    worker.finished.connect(finished)
    worker.start()
    return worker


class DockJobs:
    """The one job a dock runs at a time, cancelled by Cancel, by closing the dock, or by removing a layer it reads.

    ``on_running(bool)`` enables and disables the dock's buttons;
    ``on_status(text)`` shows what happened.  A cancelled job's result is
    never shown (a map on an empty canvas, a model saved after the dock was
    closed), and the user is told why it stopped.
    """

    def __init__(self, dock: QWidget, viewer: napari.viewer.Viewer, what: str,
                 on_running: Callable[[bool], None], on_status: Callable[[str], None]) -> None:
        from qtpy.QtCore import QEvent, QObject

        self.what = what
        self.worker: GeneratorWorker | None = None
        self.cancelled = ""
        self._layers: tuple = ()
        self._on_running, self._on_status = on_running, on_status
        self._dock = dock
        jobs = self

        class _Closed(QObject):
            def eventFilter(self, obj: Any, event: Any) -> bool:
                if event.type() == QEvent.Type.ParentChange and obj.parent() is None and jobs.running:
                    jobs.cancel("the dock was closed", notify=True)
                return False

        self._filter = _Closed()
        dock.installEventFilter(self._filter)
        viewer.layers.events.removed.connect(self._on_layer_removed)

    @property
    def running(self) -> bool:
        return self.worker is not None

    def start(self, gen: Generator, on_yield: Callable[[Any], None], on_return: Callable[[Any], None], *,
              layers: Sequence[Any] = (), on_error: Callable[[BaseException], None] | None = None) -> GeneratorWorker:
        """Run ``gen``; ``layers`` are those it reads (removing one cancels it)."""
        self.cancelled = ""
        self._layers = tuple(layers)
        self._on_running(True)

        def returned(value: Any) -> None:
            if not self.cancelled:
                on_return(value)

        self.worker = start_job(gen, on_yield, returned, self._finished,
                                on_error or (lambda err: self._on_status(error_text(err))))
        return self.worker

    def send(self, value: Any) -> None:
        if self.worker is not None:
            self.worker.send(value)

    def cancel(self, why: str = "", *, notify: bool = False) -> None:
        """Stop the job at its next step; nothing it would have made is shown or kept."""
        if self.worker is None:
            return
        self.cancelled = why or "cancelled"
        self.worker.quit()
        text = f"{self.what} cancelled" + (f": {why}" if why else "") + "; nothing was changed."
        self._on_status(text)
        if notify:
            show_info(text)

    def _finished(self) -> None:
        aborted = self.worker is not None and self.worker.abort_requested
        self.worker = None
        self._layers = ()
        self._on_running(False)
        if aborted and self.cancelled:
            why = "" if self.cancelled == "cancelled" else f": {self.cancelled}"
            self._on_status(f"{self.what} cancelled{why}; nothing was changed.")

    def _on_layer_removed(self, event: Any) -> None:
        if self.worker is not None and any(event.value is layer for layer in self._layers):
            self.cancel(f"the layer {event.value.name!r} was removed", notify=True)


class Latest:
    """Runs a function in a thread and hands its result (or its exception) to ``deliver`` only when no newer
    call was made meanwhile: counting windows while the user changes settings shows the last count only."""

    def __init__(self, deliver: Callable[[Any], None]) -> None:
        self._deliver = deliver
        self._token = 0
        #: The newest thread worker (None before the first call).
        self.worker = None

    def __call__(self, fn: Callable[[], Any]) -> None:
        from napari.qt.threading import create_worker

        token = self.forget()
        self.worker = create_worker(fn, _start_thread=False, _connect={
            "returned": lambda result: self._done(result, token), "errored": lambda err: self._done(err, token)})
        self.worker.start()

    def forget(self) -> int:
        """Results of the calls made so far will not be delivered."""
        self._token += 1
        return self._token

    def _done(self, result: Any, token: int) -> None:
        if token == self._token:
            self._deliver(result)
