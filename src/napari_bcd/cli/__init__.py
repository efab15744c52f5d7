"""The ``napari-bcd`` command line: one module per command group, options shared through :mod:`.options`.

argparse (standard library) rather than click/typer: no extra dependency, and
sub-commands import torch and friends only when they run, so ``--help`` is
instant.  Every :class:`~napari_bcd.errors.BcdError` becomes one plain
message and exit status 2, never a traceback.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import sys
from collections.abc import Iterator, Sequence
from typing import Any

from .._version import __version__
from ..errors import BcdError, os_error_text

__all__ = ["build_parser", "console", "main"]

log = logging.getLogger("napari_bcd")


def build_parser() -> argparse.ArgumentParser:
    from . import classify, model, review, train

    parser = argparse.ArgumentParser(
        prog="napari-bcd",
        description="Breast cancer classification of H&E slides (ICIAR 2018 / BACH classes).",
    )
    parser.add_argument("--version", action="version", version=f"napari-bcd {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="log more")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    model.register(sub)
    classify.register(sub)
    train.register(sub)
    review.register(sub)
    train.register_evaluate(sub)
    classify.register_demo(sub)
    model.register_selfcheck(sub)
    model.register_qupath(sub)
    return parser


@contextlib.contextmanager
def _terminate_as_interrupt() -> Iterator[None]:
    """While a command runs, SIGTERM (a scheduler, `kill`) and SIGINT end it like Ctrl-C: clean-up code runs, no
    temporary file is left; afterwards the handlers the process had are back (a program or a test that calls
    :func:`main` keeps its own).

    SIGINT gets Python's handler even when the parent ignored it (a shell starts background jobs so): a
    ``kill -INT`` then still stops the run cleanly instead of being lost.
    """
    import signal
    import threading

    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handler(signum: int, frame: Any) -> None:
        raise KeyboardInterrupt

    before = {sig: signal.getsignal(sig) for sig in (signal.SIGTERM, signal.SIGINT)}
    with contextlib.suppress(ValueError, OSError):
        signal.signal(signal.SIGTERM, handler)
        signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        yield
    finally:
        for sig, old in before.items():
            with contextlib.suppress(ValueError, OSError, TypeError):
                signal.signal(sig, old if old is not None else signal.SIG_DFL)


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``napari-bcd`` console script."""
    for stream in (sys.stdout, sys.stderr):  # a file name that is not valid UTF-8 is printed escaped, not a crash
        with contextlib.suppress(AttributeError, ValueError):
            stream.reconfigure(errors="backslashreplace")
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(levelname)s %(message)s")
    func = getattr(args, "func", None)
    if func is None:
        parser.print_help()
        return 1
    try:
        with _terminate_as_interrupt():
            return int(func(args) or 0)
    except BcdError as err:
        print(f"napari-bcd: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("napari-bcd: interrupted", file=sys.stderr)
        return 130
    except OSError as err:  # what the disk or the system refused, in a sentence that says what to do
        print(f"napari-bcd: {os_error_text(err)}", file=sys.stderr)
        return 1


def console() -> int:
    """The ``napari-bcd`` console script and ``python -m napari_bcd.cli``: :func:`main`, and a quicker exit.

    Before the interpreter shuts down, the objects left are frozen for the cyclic garbage collector
    (:func:`gc.freeze`): its passes over PyTorch's hundreds of thousands of objects took 0.5 s of every run's
    exit here (``python -c "import torch"``: 2.0 s, 1.6 s frozen).  Every file is written and closed by then;
    nothing else changes (objects are still freed, atexit handlers still run).
    """
    import gc

    code = main()
    gc.freeze()
    return code
