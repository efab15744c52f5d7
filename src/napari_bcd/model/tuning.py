"""CPU batch size and thread count, chosen by timing a run's own batches; when int8 is worth trying.

A fixed CPU batch is right on one machine only: measured here (ResNet152V2, 2 threads, AVX-512 BF16)
bf16 runs 11.9 windows/s at 4 and 8 and 11.3 at 16, fp32 5.3 at 4 and 5.5 at 16, and other CPUs
(more cores, AMX, larger caches) peak elsewhere.  :class:`BatchTuner` times each candidate on the
windows the run classifies anyway (nothing is computed twice) and keeps the fastest for the rest of the
run and for the runs after it on the same predictor.

int8 (:class:`~.precision.Int8Quantiser`) runs about 1.9x bf16 here, but trying it costs about as long as
15 fp32 windows; :func:`int8_pays` says when a run has enough windows for the trial to be worth it.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

__all__ = ["INT8_SAVING_FP32_WINDOWS", "INT8_TRIAL_FP32_WINDOWS", "TUNE_BATCHES", "BatchTuner", "describe_tuning",
           "int8_pays"]

#: Batch sizes timed on the CPU; the engine hands the predictor batches of the largest and the predictor
#: computes them in chunks of the size being timed, then of the fastest.
TUNE_BATCHES = (4, 8, 16)
#: What trying int8 costs a run, in fp32 windows: tracing the backbone, observing the fp32 check windows,
#: converting, and int8's first call on the check windows (ResNet152V2 here: 0.6 + 0.3 + 1.3 + 0.5 s against
#: 0.18 s a window in fp32).
INT8_TRIAL_FP32_WINDOWS = 15
#: What int8 saves a window against the fast float path, in fp32 windows, counted low: 0.22 measured here
#: (AVX-512 BF16 without AMX: bf16 0.085 s a window, int8 0.046 s, fp32 0.18 s); less where AMX makes bf16
#: faster.
INT8_SAVING_FP32_WINDOWS = 0.1


def int8_pays(windows: int | None) -> bool:
    """Whether a run of ``windows`` windows should try int8 (quantise the backbone on its first batch): what int8
    saves, counted low, covers what the trial costs (with the figures above, from 150 windows on).  Known only
    where the run says how many windows it has."""
    return windows is not None and windows * INT8_SAVING_FP32_WINDOWS >= INT8_TRIAL_FP32_WINDOWS


@dataclass
class BatchTuner:
    """Times candidate (batch, threads) configurations on real batches; then runs every batch the fastest way.

    ``threads`` is the thread count to start from (PyTorch's, one per physical core); with 4 or more, half
    of them is timed too, at the fastest batch (reading and decoding windows share the cores).
    """

    threads: int
    batches: tuple[int, ...] = TUNE_BATCHES
    #: windows/s of each timed ``(batch, threads)``.
    rates: dict[tuple[int, int], float] = field(default_factory=dict)

    def _candidates(self) -> list[tuple[int, int]]:
        out = [(b, self.threads) for b in self.batches]
        if self.threads >= 4 and len(self.rates) >= len(self.batches):
            out.append((self._best(out)[0], self.threads // 2))
        return out

    def _best(self, among: list[tuple[int, int]]) -> tuple[int, int]:
        timed = [c for c in among if c in self.rates]
        return max(timed, key=self.rates.__getitem__) if timed else among[0]

    @property
    def done(self) -> bool:
        return all(c in self.rates for c in self._candidates())

    @property
    def chosen(self) -> tuple[int, int]:
        """The configuration for the next batch: the first untimed candidate, or the fastest once all are timed."""
        for c in self._candidates():
            if c not in self.rates:
                return c
        return self._best(list(self.rates))

    @property
    def best_rate(self) -> float:
        return self.rates[self.chosen] if self.done else 0.0

    def record(self, config: tuple[int, int], windows: int, seconds: float) -> None:
        self.rates[config] = windows / max(seconds, 1e-9)

    def run(self, n: int, compute: Callable[[int, int], Any], set_threads: Callable[[int], None]) -> list[Any]:
        """Compute ``n`` windows in chunks of the chosen batch (``compute(start, stop)`` for each); a batch at
        least as large as an untimed candidate's is timed for it."""
        batch, threads = self.chosen
        set_threads(threads)
        timing = not self.done and n >= batch
        t0 = time.perf_counter()
        out = [compute(i, min(i + batch, n)) for i in range(0, n, batch)]
        if timing:
            self.record((batch, threads), n, time.perf_counter() - t0)
        return out

    def to_dict(self) -> dict[str, Any]:
        batch, threads = self.chosen
        return {"batch": batch, "threads": threads, "chosen_by_timing": self.done,
                "windows_per_s": {f"{b}x{t}": round(r, 2) for (b, t), r in self.rates.items()}}


def describe_tuning(batching: dict | None, int8_trial: dict | None) -> list[str]:
    """A run's batching and int8 trial (as :class:`~napari_bcd.engine.RunRecord` keeps them) in sentences."""
    out = []
    if batching:
        rates = ", ".join(f"{k.replace('x', ' x ')} threads {v}/s" for k, v in batching["windows_per_s"].items())
        how = "chosen by timing" if batching["chosen_by_timing"] else "while timing (the run ended first)"
        out.append(f"batch {batching['batch']} on {batching['threads']} threads, {how} ({rates}).")
    if int8_trial:
        other = int8_trial.get("float_precision", "bf16")
        if int8_trial.get("kept") and int8_trial.get("float_timed") == "not run":
            out.append(f"int8 kept: {int8_trial['int8_windows_per_s']} windows/s, largest probability change "
                       f"{int8_trial['check']['max_change']} against fp32 ({other} not run: on a CPU with AVX-512 "
                       f"BF16 and no AMX int8 runs about twice as fast).")
        elif int8_trial.get("kept"):
            where = " in its check" if int8_trial.get("float_timed") == "check" else ""
            out.append(f"int8 kept: {int8_trial['int8_windows_per_s']} windows/s against {other}'s "
                       f"{int8_trial['float_windows_per_s']}{where}, largest probability change "
                       f"{int8_trial['check']['max_change']} against fp32.")
        elif int8_trial.get("kept") is False:
            out.append(f"int8 tried, {other} kept: {int8_trial['why']}")
    return out
