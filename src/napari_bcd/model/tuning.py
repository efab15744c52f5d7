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
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .precision import PrecisionCheck

__all__ = ["INT8_SAVING_FP32_WINDOWS", "INT8_TRIAL_FP32_WINDOWS", "TUNE_BATCHES", "BatchTuner", "Batching", "Int8Trial",
           "describe_tuning", "int8_pays"]

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

    def record_of(self) -> Batching:
        """What the tuner chose and the rates it timed, as the run's record keeps it."""
        batch, threads = self.chosen
        return Batching(batch, threads, self.done, {f"{b}x{t}": round(r, 2) for (b, t), r in self.rates.items()})


@dataclass(frozen=True)
class Batching:
    """The CPU batch size and thread count a run used, and the rates (windows/s, by ``"<batch>x<threads>"``) timed
    to choose them."""

    batch: int
    threads: int
    chosen_by_timing: bool
    windows_per_s: dict[str, float] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {"batch": self.batch, "threads": self.threads, "chosen_by_timing": self.chosen_by_timing,
                "windows_per_s": dict(self.windows_per_s)}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Batching:
        return cls(int(d["batch"]), int(d["threads"]), bool(d["chosen_by_timing"]), dict(d.get("windows_per_s") or {}))

    def describe(self) -> str:
        rates = ", ".join(f"{k.replace('x', ' x ')} threads {v}/s" for k, v in self.windows_per_s.items())
        how = "chosen by timing" if self.chosen_by_timing else "while timing (the run ended first)"
        return f"batch {self.batch} on {self.threads} threads, {how} ({rates})."


@dataclass(frozen=True)
class Int8Trial:
    """CPU *auto*'s int8 trial on a long run: its check against fp32, both rates, and whether int8 was kept.

    Attributes
    ----------
    check
        int8 against fp32 on the run's first windows (None when int8 could not be made).
    float_precision
        The float format int8 was raced against (``"bf16"`` or ``"fp32"``).
    kept
        True, False, or None while the race is on.
    why
        Why int8 was not kept.
    int8_windows_per_s, float_windows_per_s
        The two rates (the float one None when it was not run).
    float_timed
        How the float rate was measured: ``"batches"``, ``"check"`` or ``"not run"``.
    """

    check: PrecisionCheck | None
    float_precision: str
    kept: bool | None = None
    why: str = ""
    int8_windows_per_s: float | None = None
    float_windows_per_s: float | None = None
    float_timed: str = ""

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"float_precision": self.float_precision, "kept": self.kept}
        if self.check is not None:
            out["check"] = self.check.to_dict()
        for k in ("why", "int8_windows_per_s", "float_windows_per_s", "float_timed"):
            v = getattr(self, k)
            if v not in ("", None):
                out[k] = v
        return out

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Int8Trial:
        from .precision import PrecisionCheck

        return cls(PrecisionCheck.from_dict(d["check"]) if d.get("check") else None, d.get("float_precision", "bf16"),
                   d.get("kept"), d.get("why", ""), d.get("int8_windows_per_s"), d.get("float_windows_per_s"),
                   d.get("float_timed", ""))

    def describe(self) -> str:
        other = self.float_precision
        change = f"{self.check.max_change:.5g}" if self.check is not None else "?"
        if self.kept and self.float_timed == "not run":
            return (f"int8 kept: {self.int8_windows_per_s} windows/s, largest probability change {change} against "
                    f"fp32 ({other} not run: on a CPU with AVX-512 BF16 and no AMX int8 runs about twice as fast).")
        if self.kept:
            where = " in its check" if self.float_timed == "check" else ""
            return (f"int8 kept: {self.int8_windows_per_s} windows/s against {other}'s {self.float_windows_per_s}"
                    f"{where}, largest probability change {change} against fp32.")
        if self.kept is False:
            return f"int8 tried, {other} kept: {self.why}"
        return ""


def describe_tuning(batching: Batching | None, int8_trial: Int8Trial | None) -> list[str]:
    """A run's batching and int8 trial (as :class:`~napari_bcd.engine.RunRecord` keeps them) in sentences."""
    out = [batching.describe()] if batching is not None else []
    text = int8_trial.describe() if int8_trial is not None else ""
    return [*out, text] if text else out
