"""Which number format a predictor runs in, run by run: the formats, and the policy that chooses among them.

:data:`FORMATS` says once, for each number format, where it runs, whether it must be checked against fp32 before
a run uses it, and how it is timed.  :class:`PrecisionPolicy` is the state of one predictor's choice: at the start
of a run (:meth:`~PrecisionPolicy.begin_run`) which formats its first batch checks against fp32; from the checks
(:meth:`~PrecisionPolicy.checked`) which of the formats that agreed it races, and, as the CPU tuner times them
(:meth:`~PrecisionPolicy.settle`), which it keeps; with the record of it all (:attr:`~PrecisionPolicy.check`,
:attr:`~PrecisionPolicy.int8_trial`).  The :class:`~.inference.Predictor` computes what the policy asks and runs
in the format it names.  No torch here.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable
from dataclasses import dataclass

from ..errors import BcdError
from .precision import PRECISION_TOLERANCE, PrecisionCheck, int8_available, int8_outruns_bf16
from .tuning import Int8Trial, int8_pays

__all__ = ["FORMATS", "NumberFormat", "PrecisionPolicy", "check_request"]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class NumberFormat:
    """One number format a model runs in.

    Attributes
    ----------
    name
        ``"fp32"``, ``"bf16"``, ``"fp16"`` or ``"int8"``.
    devices
        The device types it runs on.
    exact
        The reference every other format is checked against.
    checked_when_asked
        Checked against fp32 on the first batch even when the user asked for it, as *auto* checks it (int8: quantised
        from that batch): an explicit ``--precision bf16`` that moves labels beyond the tolerance runs in fp32 and
        says why, and the check is in the run record either way.
    """

    name: str
    devices: tuple[str, ...]
    exact: bool = False
    checked_when_asked: bool = False


#: The formats, by name.  *auto* chooses among them (see :class:`PrecisionPolicy`).
FORMATS: dict[str, NumberFormat] = {f.name: f for f in (
    NumberFormat("fp32", ("cpu", "cuda", "mps"), exact=True),
    NumberFormat("bf16", ("cpu", "cuda"), checked_when_asked=True),
    NumberFormat("fp16", ("cuda", "mps", "cpu"), checked_when_asked=True),
    NumberFormat("int8", ("cpu",), checked_when_asked=True),
)}


class PrecisionPolicy:
    """One predictor's choice of number format, run by run (see the module's text).

    Parameters
    ----------
    asked
        The format asked for: ``"auto"`` or one of :data:`FORMATS`.
    float_format
        The fast float format of this device (``"bf16"`` where it runs fast, else ``"fp32"``).
    auto_cpu
        *auto* on a CPU: every run starts in ``float_format``, checked against fp32, and races int8 on long runs.
    tolerance
        The largest probability change a check accepts.

    Attributes
    ----------
    precision
        The format the predictor runs in now.
    check_pending
        Whether the next batch is the checked first batch.
    check
        The check of the format in use (None for fp32, or before the first batch).
    checks
        This run's checks against fp32, by format.
    racing
        The formats that agreed and are still being timed against each other, with the windows/s each ran in its
        check.
    int8_trial
        CPU *auto*'s int8 trial of this run (None when none was tried).
    """

    def __init__(self, asked: str, float_format: str, *, auto_cpu: bool,
                 tolerance: float = PRECISION_TOLERANCE) -> None:
        self.auto_cpu = auto_cpu
        self.float_format = float_format
        self.tolerance = float(tolerance)
        self.precision = float_format if asked == "auto" else asked
        fmt = FORMATS[self.precision]
        #: The formats the next first batch checks against fp32; empty: it is computed like any other.
        self.to_check: tuple[str, ...] = (self.precision,) if fmt.checked_when_asked else ()
        self.check_pending = bool(self.to_check)
        self.check: PrecisionCheck | None = None
        self.checks: dict[str, PrecisionCheck] = {}
        self.racing: dict[str, float] = {}
        self.int8_trial: Int8Trial | None = None
        #: Where int8 outruns bf16 without timing and int8 is tried, bf16 is checked only where int8 is not kept.
        self.bf16_fallback = False

    def begin_run(self, windows: int | None, int8_usable: bool, int8_ready: bool) -> None:
        """A new run of about ``windows`` windows (CPU *auto* only): back to the float format, its first batch checked
        again, with int8 where it can run (``int8_usable``) and either is quantised already (``int8_ready``) or the
        run is long enough to pay for quantising (:func:`~.tuning.int8_pays`)."""
        if not self.auto_cpu:
            return
        self.precision = self.float_format
        int8 = int8_usable and (int8_ready or int8_pays(windows))
        self.to_check = (("bf16",) if self.float_format == "bf16" else ()) + (("int8",) if int8 else ())
        self.bf16_fallback = int8 and self.float_format == "bf16" and int8_outruns_bf16()
        if self.bf16_fallback:
            self.to_check = ("int8", "bf16")
        self.check_pending, self.check = bool(self.to_check), None
        self.checks, self.racing, self.int8_trial = {}, {}, None

    def wants(self, fmt: str, int8_ready: bool) -> bool:
        """Whether the first batch checks ``fmt`` now (in :attr:`to_check` order, after the checks made so far)."""
        if fmt == "int8" and not int8_ready:
            return False
        return not (fmt == "bf16" and self.bf16_fallback and "int8" in self.checks and self.checks["int8"].passed)

    def checked(self, exact_s: float, windows: int, rate: Callable[[str], float], *, timing: bool,
                timed: Callable[[str], bool] = lambda f: False) -> str:
        """The first batch's checks are in (:attr:`checks`, fp32 took ``exact_s`` on ``windows``): the formats that
        agreed race (:meth:`settle`), int8's trial starts; returns the format to run in now."""
        self.check_pending = False
        passed = [fmt for fmt, c in self.checks.items() if c.passed]
        if self.float_format == "fp32" and self.auto_cpu:
            passed.append("fp32")  # exact: races int8 on a CPU without bf16 units
        self.racing = {fmt: windows / max(self.checks[fmt].fast_s if fmt in self.checks else exact_s, 1e-9)
                       for fmt in passed}
        if "int8" in self.checks:
            self._int8_trial_started()
        self.settle(rate, timing=timing, timed=timed, first=True)
        if self.precision == "fp32" and self.check is not None:
            log.warning("napari-bcd: %s", self.check.describe())
        elif self.int8_trial is not None and self.int8_trial.kept is False:
            log.info("napari-bcd: int8 not used: %s", self.int8_trial.why)
        return self.precision

    def settle(self, rate: Callable[[str], float], *, timing: bool, timed: Callable[[str], bool] = lambda f: False,
               first: bool = False) -> str:
        """Run in the fastest format that agreed with fp32 (``rate``: its windows/s, timed or from its check); one
        not yet timed (``timed``) while the CPU times batches (``timing``) is timed next, then compared again; once
        the fastest has been timed (or nothing is timed) the race ends.  Returns the format to run in."""
        if not self.racing:
            if first:  # nothing agreed with fp32: fp32 for the rest of the run, and the check that says why
                self.check = next(iter(self.checks.values()), None)
                self.precision = "fp32"
            return self.precision
        best = max(self.racing, key=rate)
        self.precision = best
        self.check = self.checks.get(best)  # None for fp32: exact
        if timing and not timed(best):
            return best  # timed on the next batches, then compared again
        self._end_race(best, rate, timed)
        return best

    def _end_race(self, kept: str, rate: Callable[[str], float], timed: Callable[[str], bool]) -> None:
        trial = self.int8_trial
        if trial is not None and trial.kept is None:
            int8, other = rate("int8"), trial.float_precision
            check = self.checks["int8"]
            if other not in self.racing and self.bf16_fallback:  # bf16 not run: int8 outruns it on this CPU
                self.int8_trial = dataclasses.replace(trial, int8_windows_per_s=round(int8, 2), float_timed="not run",
                                                      kept=kept == "int8")
            else:
                versus = rate(other) if other in self.racing else check.windows / max(check.fp32_s, 1e-9)
                self.int8_trial = dataclasses.replace(
                    trial, float_windows_per_s=round(versus, 2), int8_windows_per_s=round(int8, 2),
                    float_timed="batches" if timed(other) else "check", kept=kept == "int8",
                    why="" if kept == "int8" else f"int8 ran {int8:.1f} windows/s, {other} {versus:.1f}")
        self.racing = {}

    def _int8_trial_started(self) -> None:
        """Record the int8 check (CPU *auto* only: an int8 asked for is no trial)."""
        if not self.auto_cpu:
            return
        check = self.checks["int8"]
        other = "bf16" if "bf16" in self.racing or (self.bf16_fallback and check.passed) else "fp32"
        self.int8_trial = Int8Trial(check, other)
        if not check.passed:
            self.int8_trial = Int8Trial(check, other, kept=False, why=(
                f"int8 differed from fp32 on the first batch's windows beyond the tolerance {self.tolerance:g} "
                f"({check.agreement_text})."))

    def int8_refused(self, why: str) -> bool:
        """int8 cannot be made for this backbone: under CPU *auto* the trial records why (returns True); an int8
        asked for is the caller's error to raise (returns False)."""
        if self.auto_cpu:
            self.int8_trial = Int8Trial(None, self.float_format, kept=False, why=why)
            return True
        return False


def check_request(precision: str, *, cpu: bool, compile: bool, scripted: bool = False, name: str = "") -> None:
    """Refuse, before any work, a number format that cannot run as asked; say the cost of ``compile`` on a CPU.

    ``scripted``: the model is TorchScript (a WSInfer model), which autocast does not reach into: fp32 only.

    Raises
    ------
    BcdError
    """
    if precision not in ("auto", *FORMATS):
        raise BcdError(f"Unknown precision {precision!r}; use auto, {', '.join(FORMATS)}.")
    if precision == "int8":
        if not cpu:
            raise BcdError("int8 runs on the CPU (x86, oneDNN); on a GPU use --precision auto (bf16).")
        if compile:
            raise BcdError("int8 and --compile do not go together; choose one.")
        if not int8_available():
            raise BcdError("int8 needs an x86 CPU (PyTorch's x86 quantised engine is not available here); "
                           "use --precision auto.")
    if scripted and precision not in ("auto", "fp32"):
        raise BcdError(f"{name} is a TorchScript (WSInfer) model, which runs here in fp32 only; use --precision auto "
                       "or fp32.")
    if compile and cpu:  # no silent five minutes: the cost said before it is paid
        log.warning("napari-bcd: --compile on the CPU builds its kernels before the first window (minutes on a few "
                    "cores for ResNet152V2) and pays back only on runs of thousands of windows; leave it out here "
                    "otherwise.")
