"""Running a classifier fast: device choice, channels_last, autocast, uint8 transfers."""

from __future__ import annotations

import logging
from contextlib import nullcontext

import numpy as np
import torch

from ..errors import BcdError
from .classifier import Classifier
from .precision import PRECISION_TOLERANCE, PrecisionCheck, agreement, bf16_is_fast
from .tuning import TUNE_BATCHES, BatchTuner, int8_pays

__all__ = ["PendingProbabilities", "Predictor", "choose_device"]

log = logging.getLogger(__name__)

#: Windows of a run's first batch computed in fp32 too, for the precision check.
CHECK_WINDOWS = 8


def choose_device(preference: str | torch.device | None = None) -> torch.device:
    """Pick the device: cuda > mps > cpu, unless one is asked for.

    Parameters
    ----------
    preference
        None or ``"auto"`` to choose; otherwise ``"cpu"``, ``"cuda"``,
        ``"cuda:1"``, ``"mps"``...

    Raises
    ------
    BcdError
        When the requested device is not available here.
    """
    if preference is None or str(preference) == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    try:
        dev = torch.device(preference)
    except RuntimeError as err:
        raise BcdError(f"{preference!r} is not a device; use auto, cpu, cuda or mps.") from err
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise BcdError("CUDA was asked for but no CUDA GPU is available here; use --device cpu or auto.")
    if dev.type == "mps" and not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
        raise BcdError("MPS was asked for but is not available here; use --device cpu or auto.")
    return dev


def _same_device(a: torch.device, b: torch.device) -> bool:
    """``cuda`` and ``cuda:0`` are the same device when the current device is 0."""
    if a.type != b.type:
        return False
    if a.type != "cuda" or a.index == b.index:
        return True
    current = torch.cuda.current_device()
    return (a.index if a.index is not None else current) == (b.index if b.index is not None else current)


class PendingProbabilities:
    """A submitted batch's probabilities: ``result()`` waits for the device and returns ``N x classes`` float32."""

    def __init__(self, host: torch.Tensor, event: torch.cuda.Event | None = None) -> None:
        self._host, self._event = host, event

    def result(self) -> np.ndarray:
        if self._event is not None:
            self._event.synchronize()
        return self._host.numpy()


class Predictor:
    """Class probabilities for uint8 RGB batches, as fast as the device allows.

    The model is put in eval mode (and channels_last on CUDA); batches travel to the
    device as uint8 (4x less than float32) and are normalised there; on CUDA
    the forward pass runs under bf16 autocast by default.

    Parameters
    ----------
    model
        The classifier.
    device
        Device or preference (see :func:`choose_device`).
    precision
        ``"auto"``: bf16 on CUDA; on a CPU with bf16 matrix units (AVX-512 BF16 or AMX) bf16 with
        channels_last, checked against fp32 on the first batch (:class:`~.precision.PrecisionCheck`,
        falling back to fp32 beyond ``tolerance``), and on runs long enough for it to pay
        (:func:`~.tuning.int8_pays`) int8 tried on the same windows, kept where it agrees and runs faster;
        fp32 elsewhere.  ``"fp32"`` (exact), ``"bf16"`` or ``"fp16"`` as asked, unchecked; ``"int8"``
        quantised on the first batch and checked.
    compile
        Wrap the model in :func:`torch.compile` (worth it for long runs on a GPU).
    tolerance
        The largest probability change the check accepts (:data:`~.precision.PRECISION_TOLERANCE`).
    """

    def __init__(
        self,
        model: Classifier,
        device: str | torch.device | None = None,
        precision: str = "auto",
        compile: bool = False,
        tolerance: float = PRECISION_TOLERANCE,
    ) -> None:
        self.device = choose_device(device)
        cpu = self.device.type == "cpu"
        #: Whether the first batch is run both ways (CPU *auto* with bf16 matrix units); the result in ``check``.
        self.check_pending = precision == "auto" and cpu and bf16_is_fast("cpu")
        self._checked_auto = self.check_pending
        self.check: PrecisionCheck | None = None
        self.tolerance = float(tolerance)
        if precision == "auto":
            precision = "bf16" if self.device.type == "cuda" or self.check_pending else "fp32"
        if precision not in ("fp32", "bf16", "fp16", "int8"):
            raise BcdError(f"Unknown precision {precision!r}; use auto, fp32, bf16, fp16 or int8.")
        if precision == "int8":
            if not cpu:
                raise BcdError("int8 runs on the CPU (x86, oneDNN); on a GPU use --precision auto (bf16).")
            if compile:
                raise BcdError("int8 and --compile do not go together; choose one.")
            self.check_pending = True  # quantised on the first batch, and checked against fp32 on it
        self.precision = precision
        # channels_last pays on GPUs (tensor cores) and for bf16 on CPUs with AMX (oneDNN's blocked kernels: about
        # 2x over bf16 alone); with AVX-512 BF16 only it neither gains nor loses (11.9 vs 11.6 windows/s measured);
        # for fp32 on the CPU it is no faster and converting costs a copy of the weights.
        # (Set either way: the same model may have been converted by another Predictor, and fp32 results must not
        # depend on that.)
        fmt = (torch.channels_last if self.device.type == "cuda" or precision in ("bf16", "fp16")
               else torch.contiguous_format)
        self.model = model.eval().to(self.device, memory_format=fmt)
        self.classes = model.classes
        self.compiled = bool(compile)
        self._forward = torch.compile(self.model.forward_uint8) if compile else self.model.forward_uint8
        self._forward_float = torch.compile(self.model.forward) if compile else self.model.forward
        self._float_forwards = (self._forward, self._forward_float)
        # quantised once and kept for the predictor's life; False when the backbone cannot be quantised
        self._int8_forwards: tuple | bool | None = None
        self._threads = torch.get_num_threads()
        self._memory_format = fmt
        self._resize: dict[tuple[int, int], tuple[torch.Tensor, torch.Tensor]] = {}
        #: With ``compile``, every batch is padded to this size: one shape, one compilation.
        self.fixed_batch: int | None = None
        #: A 3 x 3 optical-density map applied to every batch (stain normalisation), or None.
        self.stain_map: torch.Tensor | None = None
        #: Whether :meth:`submit` returns before the batch is computed (CUDA): the engine then keeps one
        #: batch in flight.
        self.asynchronous = self.device.type == "cuda"
        #: On the CPU, whether batches are computed in chunks whose size (and thread count) is chosen by timing
        #: (:class:`~.tuning.BatchTuner`, one per precision, kept across runs); :meth:`begin_run` sets it.
        self.tune = cpu and not compile
        self._tuners: dict[str, BatchTuner] = {}
        self._windows_left: int | None = None
        #: The first batch's windows and fp32 probabilities (CPU *auto*): what an int8 trial is checked on.
        self._check_windows: tuple[torch.Tensor, np.ndarray] | None = None
        #: The run's int8 trial under CPU *auto*: its check, both rates and ``kept`` (None while int8 is
        #: being timed, then True or False with ``why``); None when none was tried.
        self.int8_trial: dict | None = None

    def begin_run(self, windows: int | None = None, batch_size: int | None = None) -> int:
        """A new run of about ``windows`` windows; returns the batch size the engine should hand over.

        With a checked *auto* the run starts in bf16 and its first batch is checked again (the last run may
        have fallen back, or kept int8: the quantised backbone is kept and tried again on this run's
        windows at no quantising cost).  Without ``batch_size`` the CPU chooses its own by timing
        (:class:`~.tuning.BatchTuner`).
        """
        if self._checked_auto:
            self._use("bf16")
            self.check_pending, self.check = True, None
            self._check_windows, self.int8_trial = None, None
        self._windows_left = windows
        self.tune = self.device.type == "cpu" and not self.compiled and batch_size is None
        return batch_size or self.default_batch_size

    @property
    def tuning(self) -> dict | None:
        """The CPU batch and threads of the current precision, and the rates timed to choose them."""
        tuner = self._tuners.get(self.precision)
        return tuner.to_dict() if self.tune and tuner is not None else None

    def set_stain_map(self, m: np.ndarray | None) -> None:
        """Apply this OD map (:func:`napari_bcd.stain.macenko_transform`) to every batch from now on; None: off."""
        self.stain_map = None if m is None else torch.as_tensor(m, dtype=torch.float32, device=self.device)

    def host_batch(self, shape: tuple[int, ...]) -> torch.Tensor:
        """An empty uint8 CPU tensor for a batch: pinned when the model is on a CUDA GPU.

        The engine stacks windows straight into it, so :meth:`submit` starts the
        copy to the GPU from it without another copy.  (A torch tensor, not its
        numpy view: torch keeps pinned memory from reuse until the copy from it
        has finished only for its own tensors.)
        """
        return torch.empty(shape, dtype=torch.uint8, pin_memory=self.device.type == "cuda")

    @property
    def default_batch_size(self) -> int:
        """A batch that keeps a GPU busy; on the CPU the fastest measured by ``benchmarks/bench_cpu.py``.

        Measured here (ResNet152V2, 2 threads, AVX-512 BF16): fp32 5.3 windows/s at 4 and 5.5 at 16;
        bf16 with channels_last 11.9 at 4 and 8, 11.3 at 16, 10.5 at 32.  8 keeps a run's first batch
        (the one the precision check runs both ways) small.
        """
        if self.device.type == "cuda":
            return 128
        if self.tune:
            return max(TUNE_BATCHES)
        return 4 if self.precision == "fp32" and not self.check_pending else 8

    def _autocast(self, precision: str | None = None):
        precision = precision or self.precision
        if precision in ("fp32", "int8"):
            return nullcontext()
        dtype = torch.bfloat16 if precision == "bf16" else torch.float16
        return torch.autocast(self.device.type, dtype=dtype)

    def _checked_logits(self, x: torch.Tensor, forward) -> torch.Tensor:
        """The first batch both ways: keep the fast path if it agrees with fp32, else fall back for the run.

        fp32 runs on the first :data:`CHECK_WINDOWS` windows only (it is the check's whole cost); on a
        fallback the rest of the batch is computed in fp32 too.
        """
        import time

        self.check_pending = False
        fast = self.precision
        k = min(len(x), CHECK_WINDOWS)
        t0 = time.perf_counter()
        with torch.inference_mode():
            exact = forward(x[:k]).float()
        exact_s = time.perf_counter() - t0
        if self._checked_auto:
            self._check_windows = (x[:k].clone(), torch.softmax(exact, 1).numpy())
        fast_forward = self._quantise(x) if fast == "int8" else forward
        t0 = time.perf_counter()
        with torch.inference_mode(), self._autocast(fast):
            quick = fast_forward(x).float()
        fast_s = (time.perf_counter() - t0) * k / len(x)
        same, change = agreement(torch.softmax(exact, 1).numpy(), torch.softmax(quick[:k], 1).numpy())
        self.check = PrecisionCheck(fast, k, same, change, self.tolerance, exact_s, fast_s)
        if self.check.passed:
            return quick
        log.warning("napari-bcd: %s", self.check.describe())
        self._use("fp32")
        if k < len(x):
            with torch.inference_mode():
                exact = torch.cat([exact, forward(x[k:]).float()])
        return exact

    def __call__(self, batch: np.ndarray | torch.Tensor) -> np.ndarray:
        """Probabilities ``N x classes`` (float32) for a uint8 batch ``N x H x W x 3`` (host or device).

        Windows of another size than the model's input are resized here, on the
        device, after the uint8 transfer (PIL's BOX weights as two matrix
        products: see :func:`napari_bcd.windows.box_weights`).
        """
        return self.submit(batch).result()

    def submit(self, batch: np.ndarray | torch.Tensor) -> PendingProbabilities:
        """Start a batch and return at once (on CUDA); ``.result()`` waits for its probabilities.

        On a GPU the transfer in (from pinned memory), the forward pass and the
        copy of the probabilities back (into pinned memory) are queued on the
        device without waiting, so the caller can prepare and submit the next
        batch, and read this one's result after: the GPU always has the next
        batch queued.  Elsewhere the batch is computed before this returns.
        """
        x = torch.as_tensor(batch)
        if x.dtype != torch.uint8 or x.ndim != 4 or x.shape[-1] != 3:
            raise BcdError(f"Expected a uint8 batch N x H x W x 3, got {x.dtype} {tuple(x.shape)}.")
        n = x.shape[0]
        if self.fixed_batch and n < self.fixed_batch:  # pad the last batch: no recompilation
            x = torch.cat([x, x.new_zeros((self.fixed_batch - n, *x.shape[1:]))])
        cuda = self.device.type == "cuda"
        if _same_device(x.device, self.device):
            pass  # decoded on the device already (napari_bcd.io.device_decode)
        elif cuda and x.device.type == "cpu":
            # pinned memory comes from torch's caching host allocator (reused once the copy from it is done);
            # a batch stacked into host_batch() is pinned already
            x = (x if x.is_pinned() else x.pin_memory()).to(self.device, non_blocking=True)
        else:
            x = x.to(self.device)
        size = tuple(self.model.card.input_px)
        if self.stain_map is not None:
            with torch.inference_mode():
                od = -torch.log((x.float() + 1.0) / 255.0)
                x = (255.0 * torch.exp(-(od @ self.stain_map.T)) - 1.0).clamp_(0.0, 255.0)
        if tuple(x.shape[1:3]) == size:
            forward = self._forward
        else:
            with torch.inference_mode():
                x = self._resized(x, size)
            forward = self._forward_float
        if self.check_pending:
            logits = self._checked_logits(x, forward)
        elif self.tune and not cuda:
            logits = self._tuned_logits(x, forward)
        else:
            with torch.inference_mode(), self._autocast():
                logits = forward(x)
        if self._windows_left is not None:
            self._windows_left -= n
        with torch.inference_mode():
            probs = torch.softmax(logits[:n].float(), dim=1)
            if not cuda:
                return PendingProbabilities(probs.cpu())
            host = torch.empty(probs.shape, dtype=probs.dtype, pin_memory=True)
            host.copy_(probs, non_blocking=True)
            done = torch.cuda.Event()
            done.record()
        return PendingProbabilities(host, done)

    def _quantise(self, x: torch.Tensor):
        """Quantise the backbone, calibrated on this batch (once: kept for the predictor's life), and use it;
        returns the int8 forward for inputs like ``x``."""
        import time

        from .precision import quantise_int8

        if self._int8_forwards is None:
            t0 = time.perf_counter()
            with torch.inference_mode():
                calibration = self.model.normalise(x) if x.dtype == torch.uint8 else x
            qb = quantise_int8(self.model.backbone, calibration.contiguous())
            head, normalise = self.model.head, self.model.normalise
            self._int8_forwards = (lambda u: head(qb(normalise(u).contiguous())),
                                   lambda f: head(qb(f.contiguous())))
            log.info("napari-bcd: backbone quantised to int8 in %.1f s", time.perf_counter() - t0)
        self._use("int8")
        return self._forward if x.dtype == torch.uint8 else self._forward_float

    def _use(self, precision: str) -> None:
        """Run from now on in ``precision``: its forwards, and the memory format it wants (int8 keeps the float
        model as it is: the quantised copy has its own weights)."""
        self.precision = precision
        self._forward, self._forward_float = (self._int8_forwards if precision == "int8" and self._int8_forwards
                                              else self._float_forwards)
        if precision == "int8":
            return
        fmt = (torch.channels_last if self.device.type == "cuda" or precision in ("bf16", "fp16")
               else torch.contiguous_format)
        if fmt != self._memory_format:
            self.model.to(memory_format=fmt)
            self._memory_format = fmt

    def _tuned_logits(self, x: torch.Tensor, forward) -> torch.Tensor:
        """A CPU batch in chunks of the timed batch size and thread count (:class:`~.tuning.BatchTuner`); then,
        under *auto*, the int8 trial where the run is long enough for it to pay."""
        precision = self.precision
        tuner = self._tuners.setdefault(precision, BatchTuner(self._threads))
        with torch.inference_mode(), self._autocast():
            parts = tuner.run(len(x), lambda a, b: forward(x[a:b]), torch.set_num_threads)
        logits = parts[0] if len(parts) == 1 else torch.cat(parts)
        if self._checked_auto and tuner.done:
            if precision == "bf16" and self.int8_trial is None:
                self._try_int8(tuner.best_rate)
            elif precision == "int8" and self.int8_trial and self.int8_trial.get("kept") is None:
                self._settle_int8(tuner.best_rate)
        return logits

    def _try_int8(self, bf16_rate: float) -> None:
        """Quantise (or reuse the quantised backbone), check int8 on the first batch's windows against their fp32
        probabilities, and time it on the next batches (:meth:`_settle_int8`); bf16 stays where it does not pay,
        does not agree or cannot be quantised."""
        if self._check_windows is None or self.check is None or self._int8_forwards is False:
            return
        fp32_s = self.check.fp32_s / max(self.check.windows, 1)
        if self._int8_forwards is None and not int8_pays(self._windows_left or 0, 1.0 / bf16_rate, fp32_s):
            return
        import time

        xs, exact = self._check_windows
        try:
            forward = self._quantise(xs)
        except BcdError as err:
            self._int8_forwards = False  # not traceable: never again on this predictor
            self._use("bf16")
            self.int8_trial = {"kept": False, "why": str(err)}
            return
        t0 = time.perf_counter()
        with torch.inference_mode():
            quick = torch.softmax(forward(xs).float(), 1).numpy()
        same, change = agreement(exact, quick)
        check = PrecisionCheck("int8", len(xs), same, change, self.tolerance, self.check.fp32_s,
                               time.perf_counter() - t0)
        self.int8_trial = {"check": check.to_dict(), "bf16_windows_per_s": round(bf16_rate, 2), "kept": None}
        if not check.passed:
            self._use("bf16")
            self.int8_trial.update(kept=False, why=(
                f"int8 differed from fp32 on the first batch's windows beyond the tolerance {self.tolerance:g} "
                f"({check.agreement_text})."))

    def _settle_int8(self, int8_rate: float) -> None:
        """int8 timed: keep it where it is faster than bf16, else back to bf16 for the rest of the run."""
        trial = self.int8_trial
        trial["int8_windows_per_s"] = round(int8_rate, 2)
        if int8_rate > trial["bf16_windows_per_s"]:
            trial["kept"] = True
            self.check = PrecisionCheck.from_dict(trial["check"])
        else:
            trial.update(kept=False, why=f"int8 ran {int8_rate:.1f} windows/s, bf16 {trial['bf16_windows_per_s']}")
            self._use("bf16")

    def _resized(self, x: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
        """uint8 NHWC on the device -> normalised float NCHW at ``size``."""
        from ..windows import box_weights

        key = (int(x.shape[1]), int(x.shape[2]))
        if key not in self._resize:
            ry = torch.as_tensor(box_weights(key[0], size[0]), dtype=torch.float32, device=self.device)
            rx = torch.as_tensor(box_weights(key[1], size[1]), dtype=torch.float32, device=self.device)
            self._resize[key] = (ry, rx.T.contiguous())
        ry, rxt = self._resize[key]
        f = x.permute(0, 3, 1, 2).float()
        f = torch.matmul(torch.matmul(ry, f), rxt)  # N x 3 x h x w
        f = self.model.normalise_float(f)
        return f.contiguous(memory_format=torch.channels_last) if self._memory_format == torch.channels_last else f

    def warm_up(self, window_hw: tuple[int, int], batch_size: int) -> float:
        """Run one batch of this shape before the timed work (and compile, when asked); returns the seconds.

        With ``compile``, the batch size is fixed from here on (shorter batches are padded).
        """
        import time

        if self.compiled:
            self.fixed_batch = batch_size
        t0 = time.perf_counter()
        pending, self.check_pending = self.check_pending, False  # blank windows tell nothing about agreement
        try:
            self(np.zeros((batch_size if self.compiled else 1, *window_hw, 3), np.uint8))
        finally:
            self.check_pending = pending
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        return time.perf_counter() - t0
