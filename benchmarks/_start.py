"""Run ``napari-bcd classify`` and stop it as its first batch of windows is about to be read.

Prints ``START <seconds>``: from the process's start (the kernel's clock, so the interpreter's own start
counts) to that moment: Python, imports, checkpoint, slide, tissue and stain (auto's precision check
runs on the first batch, after it: the whole-run figures hold it).
Used by ``bench_cpu.py``; arguments are the CLI's.
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path


def _process_start() -> float:
    """Wall-clock time this process started, from /proc (Linux)."""
    fields = Path("/proc/self/stat").read_text().rsplit(")", 1)[1].split()
    started = int(fields[19]) / os.sysconf("SC_CLK_TCK")  # field 22: start time, clock ticks after boot
    uptime = float(Path("/proc/uptime").read_text().split()[0])
    return time.time() - (uptime - started)


T0 = _process_start()

from napari_bcd.engine import producer  # noqa: E402


def _stop_here(self):
    print(f"START {time.time() - T0:.3f}", flush=True)
    os._exit(0)


producer.BatchProducer.__enter__ = _stop_here

from napari_bcd.cli import main  # noqa: E402

sys.exit(main(sys.argv[1:]))
