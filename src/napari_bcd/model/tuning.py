"""CPU batch size and thread count, chosen by timing a run's own batches; when int8 is worth trying.

A fixed CPU batch is right on one machine only: measured here (ResNet152V2, 2 threads, AVX-512 BF16)
bf16 runs 11.9 windows/s at 4 and 8 and 11.3 at 16, fp32 5.3 at 4 and 5.5 at 16, and other CPUs
(more cores, AMX, larger caches) peak elsewhere.  :class:`BatchTuner` times each candidate on the
windows the run classifies anyway (nothing is computed twice) and keeps the fastest for the rest of the
run and for the runs after it on the same predictor.

int8 (:func:`~.precision.quantise_int8`) runs about 1.9x bf16 here, but quantising costs about as long as
25 fp32 windows; :func:`int8_pays` says when a run has enough windows left for a trial to be worth it.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

__all__ = ["INT8_EXPECTED_SAVING", "INT8_QUANTISE_WINDOWS", "TUNE_BATCHES", "BatchTuner", "describe_tuning",
           "int8_pays"]

#: Batch sizes timed on the CPU; the engine hands the predictor batches of the largest and the predictor
#: computes them in chunks of the size being timed, then of the fastest.
TUNE_BATCHES = (4, 8, 16)
#: Quantising a backbone to int8 (tracing, calibrating on the check windows, converting) costs about as long
#: as this many windows in fp32 (ResNet152V2: 4.3-6.5 s against 0.18 s a window; DenseNet121 3.6 s).
INT8_QUANTISE_WINDOWS = 35
#: The share of the bf16 time int8 is counted on saving when deciding whether to try it (1 - 11.3/21.8 = 0.48
#: measured here; counted low, so a trial that does not pay is rare).
INT8_EXPECTED_SAVING = 0.3


def int8_pays(windows_left: int, bf16_s_per_window: float, fp32_s_per_window: float) -> bool:
    """Whether a run with ``windows_left`` should try int8: the saving, counted low, covers the quantising cost.

    ``fp32_s_per_window`` comes from the precision check, the run's first fp32 batch, which carries the
    warm-up too (0.28 s a window there against 0.19 s later): with the saving counted at 0.3 rather than
    0.48 the rule asks for about 2.4 times the windows that would just repay quantising (ResNet152V2 here:
    about 375 left against 155).
    """
    cost = INT8_QUANTISE_WINDOWS * fp32_s_per_window
    return windows_left * bf16_s_per_window * INT8_EXPECTED_SAVING >= cost


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
        if int8_trial.get("kept"):
            out.append(f"int8 kept: {int8_trial['int8_windows_per_s']} windows/s against bf16's "
                       f"{int8_trial['bf16_windows_per_s']}, largest probability change "
                       f"{int8_trial['check']['max_change']} against fp32.")
        elif int8_trial.get("kept") is False:
            out.append(f"int8 tried, bf16 kept: {int8_trial['why']}")
    return out
