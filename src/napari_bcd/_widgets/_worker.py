"""Running core generators in napari thread workers."""

from __future__ import annotations

from collections.abc import Callable, Generator
from typing import Any

from napari.qt.threading import GeneratorWorker, create_worker
from napari.utils.notifications import show_error

from ..errors import BcdError

__all__ = ["notify_error", "start_job"]


def _drive(gen: Generator) -> Generator:
    return (yield from gen)


def notify_error(err: BaseException) -> None:
    """Show an error as a napari notification, in words a user can act on."""
    if isinstance(err, BcdError):
        show_error(str(err))
    else:
        show_error(f"Unexpected {type(err).__name__}: {err}. Please report this with the steps that led to it.")


def start_job(
    gen: Generator,
    on_yield: Callable[[Any], None],
    on_return: Callable[[Any], None],
    on_finish: Callable[[], None],
) -> GeneratorWorker:
    """Run a core generator in a thread; errors become notifications.

    The generator is closed when the worker finishes, so a cancelled job
    releases its reading threads and files at once.
    """
    # Handing "errored" to create_worker matters: without it superqt also connects a handler that re-raises
    # the error in the Qt event loop, and napari shows the user a traceback.
    worker = create_worker(_drive, gen, _start_thread=False,
                           _connect={"yielded": on_yield, "returned": on_return, "errored": notify_error})

    def finished() -> None:
        gen.close()
        on_finish()

    worker.finished.connect(finished)
    worker.start()
    return worker
