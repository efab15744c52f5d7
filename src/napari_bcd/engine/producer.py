"""Batches of window pixels, decoded ahead of the model in their own threads.

:class:`BatchProducer` runs :func:`~napari_bcd.windows.window_batches` in a
producer thread (tile rows decoded in a pool of reading threads; imagecodecs
releases the GIL) and hands batches over through a queue at most
``prefetch`` deep, so memory does not grow with the slide.  Used as a context
manager: leaving it (normally, on an error or on a cancel) stops the threads
and waits for them, so a cancelled run leaves none behind.
"""

from __future__ import annotations

import contextlib
import os
import queue
import threading
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np

from ..io.slide import Slide
from ..tiling import Grid
from ..windows import window_batches

__all__ = ["BatchProducer"]

_END = object()


class BatchProducer:
    """``(windows, pixels)`` batches of ``windows`` in row-major order, read ahead in threads.

    Parameters
    ----------
    workers
        Decoding threads (default: one per core, up to 8: they only decode, which
        releases the GIL; 4 threads decode 7,500 tiles/s, 8 threads 11,000).
    read_row, alloc
        See :func:`~napari_bcd.windows.window_batches` (a device decoder; pinned host batches).
    """

    def __init__(self, slide: Slide, grid: Grid, windows: np.ndarray, batch_size: int, *,
                 workers: int | None = None, prefetch: int = 2, read_row: Callable[..., Any] | None = None,
                 alloc: Callable[[tuple[int, ...]], Any] | None = None) -> None:
        self.pool = ThreadPoolExecutor(max_workers=workers or min(8, os.cpu_count() or 2),
                                       thread_name_prefix="bcd-read")
        self._stop = threading.Event()
        self._ready: queue.Queue = queue.Queue(maxsize=max(1, prefetch))
        self._args = (slide, grid, windows, batch_size)
        self._read_row, self._alloc = read_row, alloc
        self._thread = threading.Thread(target=self._produce, name="bcd-read-bands", daemon=True)

    def _produce(self) -> None:
        slide, grid, windows, batch_size = self._args
        try:
            for item in window_batches(slide, grid, windows, batch_size, self.pool, self._stop,
                                       read_row=self._read_row, alloc=self._alloc):
                while not self._stop.is_set():
                    try:
                        self._ready.put(item, timeout=0.1)
                        break
                    except queue.Full:
                        continue
                if self._stop.is_set():
                    return
            self._ready.put(_END)
        except BaseException as err:  # noqa: BLE001 - handed to the consumer, raised there
            self._ready.put(err)

    def __enter__(self) -> BatchProducer:
        self._thread.start()
        return self

    def __iter__(self) -> Iterator[tuple[np.ndarray, Any]]:
        while True:
            item = self._ready.get()
            if isinstance(item, BaseException):
                raise item
            if item is _END:
                return
            yield item

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        while self._thread.is_alive():  # unblock a producer waiting on a full queue
            with contextlib.suppress(queue.Empty):
                self._ready.get(timeout=0.05)
        self._thread.join()
        self.pool.shutdown(wait=True, cancel_futures=True)
