"""Running core generators in a terminal: tqdm bars for counted progress and for epochs."""

from __future__ import annotations

import math
import sys
from collections.abc import Generator
from typing import Any

__all__ = ["STOP", "drive", "progress_bar"]

#: Sent into a running job generator (``gen.send(STOP)``): end at the next step and keep what is done so far.
STOP = "stop"


def progress_bar(desc: str, total: int | None, unit: str = "it", unit_scale: bool = False) -> Any:
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, unit=unit, unit_scale=unit_scale, file=sys.stderr, dynamic_ncols=True)


def drive(gen: Generator, desc: str, unit: str = "it") -> Any:
    """Run a core generator to the end with a progress bar and return its result.

    Items with ``done``/``total`` move the bar (a new total, e.g. the next
    stage, starts a new bar; a total of 0 shows nothing); a head being trained
    (``step``/``steps``) moves a step bar per fold with the held-out accuracy
    beside it; items with a ``message`` are printed as they come.
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
                d, u = getattr(item, "desc", desc), getattr(item, "unit", unit)
                if bar is None or bar.total != total or bar.desc != d:
                    if bar is not None:
                        bar.close()
                    bar = progress_bar(d, total, unit=u, unit_scale=u == "B")
                bar.update(done - bar.n)
            elif hasattr(item, "steps") and hasattr(item, "step") and not item.steps:  # a probe measured: one line
                if bar is not None:
                    bar.close()
                    bar = None
                where = f"fold {item.fold}/{item.folds}: " if item.folds else ""
                print(f"{where}the simple classifier, {_fit_text(item)}".rstrip(", "), file=sys.stderr)
            elif hasattr(item, "steps") and hasattr(item, "step"):  # a head being trained (train.FitProgress)
                d = f"fold {item.fold}/{item.folds}" if item.folds else "train"
                if bar is None or bar.desc != d or item.step < bar.n:
                    if bar is not None:
                        bar.close()
                    bar = progress_bar(d, item.steps, unit="step")
                bar.set_postfix_str(_fit_text(item), refresh=False)
                bar.update(item.step - bar.n)
            elif hasattr(item, "message"):
                if bar is not None:
                    bar.close()
                    bar = None
                print(item.message, file=sys.stderr)
    except StopIteration as stop:
        return stop.value
    finally:
        if bar is not None:
            bar.close()


def _fit_text(e) -> str:
    text = "" if math.isnan(e.train_loss) else f"loss {e.train_loss:.4f}"
    if not math.isnan(e.val_loss):
        text += f" held-out loss {e.val_loss:.4f} accuracy {e.val_acc:.3f}"
    return text.strip()
