"""Running core generators in a terminal: tqdm bars for counted progress, a line per epoch."""

from __future__ import annotations

import sys
from collections.abc import Generator
from typing import Any

__all__ = ["drive", "progress_bar"]


def progress_bar(desc: str, total: int | None, unit: str = "it", unit_scale: bool = False):
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, unit=unit, unit_scale=unit_scale, file=sys.stderr, dynamic_ncols=True)


def drive(gen: Generator, desc: str, unit: str = "it") -> Any:
    """Run a core generator to the end with a progress bar and return its result.

    Items with ``done``/``total`` move the bar (a new total, e.g. the next
    stage, starts a new bar; a total of 0 shows nothing); items without them
    (training epochs) are printed as one line each.
    """
    bar = None
    try:
        while True:
            item = next(gen)
            total = getattr(item, "total", None)
            done = getattr(item, "done", None)
            if total is not None and done is not None:
                if not total:
                    continue
                if bar is None or bar.total != total:
                    if bar is not None:
                        bar.close()
                    bar = progress_bar(desc, total, unit=unit)
                bar.update(done - bar.n)
            else:
                if bar is not None:
                    bar.close()
                    bar = None
                print(_epoch_line(item), file=sys.stderr)
    except StopIteration as stop:
        return stop.value
    finally:
        if bar is not None:
            bar.close()


def _epoch_line(e) -> str:
    star = " *best*" if getattr(e, "best", False) else ""
    return (f"epoch {e.epoch:>3}/{e.epochs}  loss {e.train_loss:.4f}  acc {e.train_acc:.3f}  "
            f"val_loss {e.val_loss:.4f}  val_acc {e.val_acc:.3f}  {e.seconds:.2f} s{star}")
