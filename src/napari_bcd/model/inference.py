"""Running a classifier fast: device choice, channels_last, autocast, uint8 transfers."""

from __future__ import annotations

import logging
from contextlib import nullcontext

import numpy as np
import torch

from ..errors import BcdError
from .classifier import Classifier
from .device import _same_device, choose_device
from .policy import PrecisionPolicy, check_request
from .precision import PRECISION_TOLERANCE, PrecisionCheck, agreement, bf16_is_fast, cpu_features, int8_available
from .tuning import TUNE_BATCHES, Batching, BatchTuner, Int8Trial

__all__ = ["PendingProbabilities", "Predictor", "choose_device"]

log = logging.getLogger(__name__)

#: Windows of a run's first batch computed in fp32 too, for the precision check (and, where int8 is tried,
#: its calibration): the smallest batch the CPU tuner times.  Measured here (``benchmarks/bench_cpu.py``,
#: 30 real H&E windows): int8 calibrated on 4 windows moved no label and no probability by more than 0.0005
#: (ResNet152V2) and 0.025 (trained DenseNet121) on the 26 it never saw, against 0.0004 and 0.017 on 8, both
#: far inside :data:`~.precision.PRECISION_TOLERANCE`; the 4 fp32 windows fewer save 1.4 s of every
#: stride-0.5 run of the bundled slide (15.9 s against 14.5 s).
CHECK_WINDOWS = 4


class PendingProbabilities:
    """A submitted batch's probabilities: ``result()`` waits for the device and returns ``N x classes`` float32."""

    def __init__(self, host: torch.Tensor, event: torch.cuda.Event | None = None,
                 spread: torch.Tensor | None = None) -> None:
        self._host, self._event, self._spread = host, event, spread

    def spread(self) -> np.ndarray | None:
        """With test-time augmentation, how far each window's views disagree (:func:`view_spread`); else None."""
        if self._spread is None:
            return None
        if self._event is not None:
            self._event.synchronize()
        return self._spread.cpu().numpy()

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
        ``"auto"``: bf16 on CUDA.  On a CPU, bf16 where it has bf16 matrix units (AVX-512 BF16 or AMX; with
        channels_last on AMX), else fp32; each run's first batch checks bf16 against fp32
        (:class:`~.precision.PrecisionCheck`), and on runs long enough for it to pay
        (:func:`~.tuning.int8_pays`) int8 too, on the same windows, calibrated by the same fp32 pass.  The run
        goes on in the faster format that agrees within ``tolerance`` (timed on its own batches, the
        ``int8_trial`` says which and why), fp32 if none does; where int8 outruns bf16 without timing (AVX-512
        BF16 without AMX: :func:`~.precision.int8_outruns_bf16`) bf16 is checked only where int8 is not kept.
        ``"fp32"`` (exact), ``"bf16"`` or ``"fp16"`` as asked, unchecked; ``"int8"`` quantised on the first
        batch and checked, fp32 where it disagrees.
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
        scripted = (model.card.head or {}).get("type") == "torchscript"
        check_request(precision, cpu=cpu, compile=compile, scripted=scripted, name=model.card.name)
        float_format = ("fp32" if scripted else
                        "bf16" if self.device.type == "cuda" or (cpu and bf16_is_fast("cpu")) else "fp32")
        #: Which format runs, run by run, and the record of its checks (:class:`~.policy.PrecisionPolicy`).
        self.policy = PrecisionPolicy(precision, float_format, auto_cpu=precision == "auto" and cpu and not scripted,
                                      tolerance=tolerance)
        precision = self.policy.precision
        self.precision = precision
        # (Set either way: the same model may have been converted by another Predictor, and fp32 results must not
        # depend on that.)
        fmt = self._layout(precision)
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
        #: Test-time augmentation: each window's probabilities are the mean over its dihedral views (:meth:`set_tta`).
        self.tta = False
        #: Whether :meth:`submit` returns before the batch is computed (CUDA): the engine then keeps one
        #: batch in flight.
        self.asynchronous = self.device.type == "cuda"
        #: On the CPU, whether batches are computed in chunks whose size (and thread count) is chosen by timing
        #: (:class:`~.tuning.BatchTuner`, one per precision, kept across runs); :meth:`begin_run` sets it.
        self.tune = cpu and not compile
        self._tuners: dict[str, BatchTuner] = {}

    def begin_run(self, windows: int | None = None, batch_size: int | None = None) -> int:
        """A new run of about ``windows`` windows; returns the batch size the engine should hand over.

        Under CPU *auto* the run starts in the fast float format and its first batch is checked against fp32
        again (the last run may have fallen back, or kept int8); where the run is long enough for it to pay
        (:func:`~.tuning.int8_pays`) or the backbone is quantised already, int8 is checked on the same
        windows and timed against the float format (on a CPU where int8 outruns bf16, bf16 is checked only
        where int8 is not kept).  Without ``batch_size`` the CPU chooses its own by
        timing (:class:`~.tuning.BatchTuner`).
        """
        if self.policy.auto_cpu:
            self.policy.begin_run(windows, int8_usable=self._int8_forwards is not False and int8_available(),
                                  int8_ready=bool(self._int8_forwards))
            self._use(self.policy.precision)
        self.tune = self.device.type == "cpu" and not self.compiled and batch_size is None
        return batch_size or self.default_batch_size

    @property
    def check(self) -> PrecisionCheck | None:
        """The check against fp32 of the format in use (:class:`~.precision.PrecisionCheck`), if one was made."""
        return self.policy.check

    @property
    def check_pending(self) -> bool:
        """Whether the next batch is the run's checked first batch."""
        return self.policy.check_pending

    @check_pending.setter
    def check_pending(self, value: bool) -> None:
        self.policy.check_pending = bool(value)

    @property
    def int8_trial(self) -> Int8Trial | None:
        """CPU *auto*'s int8 trial of this run (:class:`~.tuning.Int8Trial`), if one was made."""
        return self.policy.int8_trial

    @property
    def tolerance(self) -> float:
        return self.policy.tolerance

    @property
    def quantised(self) -> bool | None:
        """Whether the backbone has an int8 copy (None: never tried; False: it cannot be quantised)."""
        return None if self._int8_forwards is None else bool(self._int8_forwards)

    @property
    def int8_forwards(self) -> tuple | None:
        """The (uint8, float) forwards of the int8 copy, made once and kept for the predictor's life."""
        return self._int8_forwards or None

    @property
    def threads(self) -> int:
        """The CPU threads the predictor starts from (the tuner may time half of them too)."""
        return self._threads

    @property
    def tuning(self) -> Batching | None:
        """The CPU batch and threads of the current precision, and the rates timed to choose them."""
        tuner = self._tuners.get(self.precision)
        return tuner.record_of() if self.tune and tuner is not None else None

    def set_tta(self, on: bool) -> None:
        """Average every window's probabilities over its flips and rotations from now on (8 views of a square
        input, 4 of another: 8x or 4x the model's work); False: one view."""
        self.tta = bool(on)

    @property
    def views(self) -> int:
        """Model passes per window: 1, or the dihedral views test-time augmentation averages."""
        if not self.tta:
            return 1
        h, w = self.model.card.input_px
        return 8 if h == w else 4

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

    def _forwards(self, precision: str) -> tuple:
        """The (uint8, float) forwards that compute ``precision``."""
        return self._int8_forwards if precision == "int8" else self._float_forwards

    def _checked_logits(self, x: torch.Tensor, forward) -> torch.Tensor:
        """The first batch: fp32 on its first :data:`CHECK_WINDOWS` windows, then each format to check on the same
        windows (:class:`~.precision.PrecisionCheck`); the run goes on in the fastest that agrees, fp32 if none.

        Where int8 is to be checked and not quantised yet, the fp32 pass runs through the traced backbone with
        observers: the check's reference and int8's calibration in one pass.  The rest of the batch is computed
        in the format chosen.
        """
        import time

        policy = self.policy
        policy.check_pending = False
        k = min(len(x), CHECK_WINDOWS)
        slot = 0 if x.dtype == torch.uint8 else 1
        exact_forward, quantiser = forward, None
        if "int8" in policy.to_check and self._int8_forwards is None:
            try:
                quantiser, exact_forward = self._int8_quantiser(x)
            except BcdError as err:
                self._int8_forwards = False  # not traceable: never again on this predictor
                self._int8_refused(str(err))
        t0 = time.perf_counter()
        with torch.inference_mode():
            exact = exact_forward(x[:k]).float()
        exact_s = time.perf_counter() - t0
        if quantiser is not None:
            self._int8_converted(quantiser)
        exact_p = torch.softmax(exact, 1).numpy()
        logits = {"fp32": exact}
        for fmt in policy.to_check:
            if not policy.wants(fmt, bool(self._int8_forwards)):
                continue
            t0 = time.perf_counter()
            with torch.inference_mode(), self._autocast(fmt):
                logits[fmt] = self._forwards(fmt)[slot](x[:k]).float()
            fast_s = time.perf_counter() - t0
            same, change = agreement(exact_p, torch.softmax(logits[fmt], 1).numpy())
            policy.checks[fmt] = PrecisionCheck(fmt, k, same, change, policy.tolerance, exact_s, fast_s)
        kept = policy.checked(exact_s, k, lambda f: self._rate(f), timing=self.tune, timed=self._timed)
        self._use(kept)
        if k < len(x):
            with torch.inference_mode(), self._autocast(kept):
                rest = self._forwards(kept)[slot](x[k:]).float()
            return torch.cat([logits[kept], rest])
        return logits[kept]

    def _rate(self, fmt: str) -> float:
        """windows/s of ``fmt``: as timed by its tuner where that is done, else as it ran in the check."""
        tuner = self._tuners.get(fmt)
        return tuner.best_rate if tuner is not None and tuner.done else self.policy.racing[fmt]

    def _timed(self, fmt: str) -> bool:
        tuner = self._tuners.get(fmt)
        return tuner is not None and tuner.done

    def _int8_refused(self, why: str) -> None:
        if not self.policy.int8_refused(why):
            raise BcdError(why)

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
        views = self.views
        if views > 1:
            with torch.inference_mode():
                x = dihedral_views(x, channels_last=forward is self._forward, square=views == 8)
        if self.check_pending:
            logits = self._checked_logits(x, forward)
        elif self.tune and not cuda:
            logits = self._tuned_logits(x, forward)
        else:
            with torch.inference_mode(), self._autocast():
                logits = forward(x)
        spread = None
        with torch.inference_mode():
            probs = torch.softmax(logits.float(), dim=1)
            if views > 1:  # rows are view-major: view v of window i is row v * B + i
                per_view = probs.reshape(views, -1, probs.shape[1])[:, :n]
                probs = per_view.mean(0)
                spread = view_spread(per_view)
            else:
                probs = probs[:n]
            if not cuda:
                return PendingProbabilities(probs.cpu(), spread=spread)
            host = torch.empty(probs.shape, dtype=probs.dtype, pin_memory=True)
            host.copy_(probs, non_blocking=True)
            done = torch.cuda.Event()
            done.record()
        return PendingProbabilities(host, done, spread)

    def _int8_quantiser(self, x: torch.Tensor):
        """Trace the backbone for int8 (:class:`~.precision.Int8Quantiser`); returns it and the fp32 forward for
        inputs like ``x`` that also calibrates it."""
        from .precision import Int8Quantiser

        with torch.inference_mode():
            example = self.model.normalise(x[:1]) if x.dtype == torch.uint8 else x[:1]
        quantiser = Int8Quantiser(self.model.backbone, example.contiguous())
        return quantiser, self._with_head(quantiser.observe)[0 if x.dtype == torch.uint8 else 1]

    def _with_head(self, backbone) -> tuple:
        """The (uint8, float) forwards of the model with ``backbone`` (a traced copy) in place of its own."""
        head, normalise = self.model.head, self.model.normalise
        return lambda u: head(backbone(normalise(u).contiguous())), lambda f: head(backbone(f.contiguous()))

    def _int8_converted(self, quantiser) -> None:
        """The int8 forwards from the calibrated quantiser (kept for the predictor's life)."""
        import time

        t0 = time.perf_counter()
        try:
            qb = quantiser.convert()
        except BcdError as err:
            self._int8_forwards = False
            self._int8_refused(str(err))
            return
        self._int8_forwards = self._with_head(qb)
        log.info("napari-bcd: backbone converted to int8 in %.1f s", time.perf_counter() - t0)

    def _layout(self, precision: str) -> torch.memory_format:
        """The weights' memory format for ``precision``: channels_last where it pays.

        It pays on GPUs (tensor cores) and for bf16 on CPUs with AMX (oneDNN's blocked kernels: about 2x over
        bf16 alone); with AVX-512 BF16 only it neither gains nor loses (ResNet152V2, batch 16: 11.5 against 11.8
        windows/s), and converting ResNet152V2's weights costs 0.14 s at the start of a run; for fp32 on the CPU
        it is no faster.
        """
        if self.device.type == "cuda":
            return torch.channels_last
        if precision in ("bf16", "fp16") and (self.device.type != "cpu" or cpu_features()["amx"]):
            return torch.channels_last
        return torch.contiguous_format

    def _use(self, precision: str) -> None:
        """Run from now on in ``precision``: its forwards, and the memory format it wants (int8 keeps the float
        model as it is: the quantised copy has its own weights)."""
        self.precision = precision
        self._forward, self._forward_float = (self._int8_forwards if precision == "int8" and self._int8_forwards
                                              else self._float_forwards)
        if precision == "int8":
            return
        fmt = self._layout(precision)
        if fmt != self._memory_format:
            self.model.to(memory_format=fmt)
            self._memory_format = fmt

    def _tuned_logits(self, x: torch.Tensor, forward) -> torch.Tensor:
        """A CPU batch in chunks of the timed batch size and thread count (:class:`~.tuning.BatchTuner`); once this
        format is timed, the race between the formats that agreed with fp32 goes on
        (:meth:`~.policy.PrecisionPolicy.settle`)."""
        precision = self.precision
        tuner = self._tuners.setdefault(precision, BatchTuner(self._threads))
        with torch.inference_mode(), self._autocast():
            parts = tuner.run(len(x), lambda a, b: forward(x[a:b]), torch.set_num_threads)
        logits = parts[0] if len(parts) == 1 else torch.cat(parts)
        if self.policy.racing and tuner.done:  # this format is timed: the race between those that agreed goes on
            self._use(self.policy.settle(lambda f: self._rate(f), timing=self.tune, timed=self._timed))
        return logits

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


def dihedral_views(x: torch.Tensor, *, channels_last: bool, square: bool = True) -> torch.Tensor:
    """The batch's 8 flips and rotations (4 when the windows are not square: no quarter turns), view-major: rows
    ``v * N .. (v + 1) * N`` are view ``v`` of every window.  ``x`` is uint8 NHWC (``channels_last``) or float NCHW."""
    dims = (1, 2) if channels_last else (2, 3)
    turns = range(4) if square else (0, 2)
    views = []
    for k in turns:
        r = torch.rot90(x, k, dims) if k else x
        views += [r, torch.flip(r, (dims[1],))]
    out = torch.cat(views)
    return out.contiguous(memory_format=torch.channels_last) if (not channels_last and x.is_contiguous(
        memory_format=torch.channels_last)) else out.contiguous()


def view_spread(per_view: torch.Tensor) -> torch.Tensor:
    """How far a window's views disagree: the mean total-variation distance of each view's probabilities from their
    mean (0: all views agree; 1: each view certain of another class).  ``per_view`` is ``views x N x C``."""
    mean = per_view.mean(0, keepdim=True)
    return 0.5 * (per_view - mean).abs().sum(-1).mean(0)

