"""Which number formats a device runs fast, and whether the fast one agrees with fp32 on a run's own windows.

On a CPU, bf16 pays only with AVX-512 BF16 or AMX (ResNet152V2 + the head, 2 threads: with AVX-512 BF16
alone 5.3 windows/s in fp32, 11.9 in bf16 with or without channels_last, 22 in int8; on an AMX machine
5.4, 13 and 26-28 with channels_last); without them PyTorch emulates bf16 and it is slower than fp32.  On CUDA GPUs
bf16 runs on the tensor cores from Ampere on.

*auto* on a CPU runs the first batch of every run both ways (:class:`PrecisionCheck`): the fast format is
kept only when no class probability of any window moves by more than :data:`PRECISION_TOLERANCE`;
otherwise the run falls back to fp32 and says why.  On runs long enough for it to pay, int8
(:class:`Int8Quantiser`) is checked on the same windows, calibrated by the same fp32 pass, and the
Predictor keeps the faster of the formats that agree.  A top class can only flip where the fp32 margin is
below twice the largest change, so the tolerance also bounds which labels can change.
"""

from __future__ import annotations

import functools
import warnings
from dataclasses import asdict, dataclass
from typing import Any

__all__ = ["PRECISION_TOLERANCE", "Int8Quantiser", "PrecisionCheck", "agreement", "bf16_is_fast", "cpu_features",
           "int8_available", "int8_outruns_bf16", "quantise_int8"]

#: The largest change of any window's class probability (fp32 against the fast path, on the run's first batch)
#: at which *auto* keeps the fast path.  Measured on real H&E with a trained DenseNet121 head: bf16 moves
#: probabilities by up to 0.10 (95 of 96 labels unchanged, the one change at a near tie).
PRECISION_TOLERANCE = 0.15


@dataclass(frozen=True)
class PrecisionCheck:
    """fp32 against the fast path on the same windows: how far they agree, how fast each ran, which was kept."""

    fast: str
    windows: int
    label_agreement: float
    max_change: float
    tolerance: float
    fp32_s: float
    fast_s: float

    @property
    def passed(self) -> bool:
        return self.max_change <= self.tolerance

    @property
    def kept(self) -> str:
        return self.fast if self.passed else "fp32"

    @property
    def agreement_text(self) -> str:
        return (f"{self.label_agreement:.0%} of {self.windows} windows with the same class, largest probability "
                f"change {self.max_change:.2g}")

    def describe(self) -> str:
        same = self.agreement_text
        if self.passed:
            return f"{self.fast} checked against fp32 on the first batch: {same} (tolerance {self.tolerance:g})."
        return (f"fell back to fp32: {self.fast} differed from fp32 on the first batch beyond the tolerance "
                f"{self.tolerance:g} ({same}).")

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> PrecisionCheck:
        """The check from :meth:`to_dict`'s JSON (a summary's ``info.precision_check``)."""
        return cls(**{k: d[k] for k in cls.__dataclass_fields__})

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "kept": self.kept, "fp32_s": round(self.fp32_s, 3), "fast_s": round(self.fast_s, 3),
                "max_change": round(self.max_change, 5)}


def agreement(exact: Any, fast: Any) -> tuple[float, float]:
    """Share of rows with the same top class, and the largest absolute difference, of two ``N x classes`` arrays."""
    import numpy as np

    a, b = np.asarray(exact, np.float64), np.asarray(fast, np.float64)
    if not len(a):
        return 1.0, 0.0
    return float((a.argmax(1) == b.argmax(1)).mean()), float(np.nan_to_num(np.abs(a - b), nan=np.inf).max())


@functools.cache
def cpu_features() -> dict[str, bool]:
    """The CPU's bf16-related instruction sets, as PyTorch detects them."""
    import torch

    def probe(name: str) -> bool:
        fn = getattr(torch.cpu, name, None)
        try:
            return bool(fn()) if fn is not None else False
        except (RuntimeError, AttributeError):  # pragma: no cover - very old builds
            return False

    return {"avx512_bf16": probe("_is_avx512_bf16_supported"), "amx": probe("_is_amx_tile_supported"),
            "avx512": probe("_is_avx512_supported")}


def bf16_is_fast(device: Any) -> bool:
    """Whether bf16 matrix products run faster than fp32 on ``device`` (a torch.device or its name)."""
    import torch

    dev = torch.device(device)
    if dev.type == "cuda":
        return bool(torch.cuda.is_available() and torch.cuda.is_bf16_supported())
    if dev.type == "cpu":
        f = cpu_features()
        return f["avx512_bf16"] or f["amx"]
    return False


def int8_outruns_bf16() -> bool:
    """Whether int8 runs well ahead of bf16 on this CPU, so that timing bf16 against it would only cost time: AVX-512
    BF16 without AMX, where int8's dot products (VNNI) do twice the multiply-adds of bf16's per instruction
    (ResNet152V2 measured here: int8 21, bf16 10 windows/s).  With AMX, bf16's tiles close the gap and both are
    timed."""
    f = cpu_features()
    return f["avx512_bf16"] and not f["amx"]


def int8_available() -> bool:
    """Whether this PyTorch runs int8 convolutions on this CPU (the x86 engine: oneDNN and FBGEMM)."""
    import torch

    return "x86" in torch.backends.quantized.supported_engines


class Int8Quantiser:
    """A backbone on its way to int8 for x86 CPUs, with PyTorch's own tooling (FX graph mode, the x86 qconfig).

    Tracing inserts min/max observers (rather than the x86 default's histograms: measured on real H&E as
    close to fp32, in half the time); :meth:`observe` is the backbone's fp32 forward that also records the
    activations' ranges, so a run's fp32 check batch calibrates at the same time; :meth:`convert` then gives
    the int8 backbone (weights per channel; the head stays fp32).  Stack traces are not recorded while
    tracing (``torch.fx.config.do_not_emit_stack_traces``): recording them took 1.9 of the 2.5 s tracing
    ResNet152V2 here, and imported torch._dynamo on the way.

    Raises
    ------
    BcdError
        When the backbone cannot be traced (control flow in its forward).
    """

    def __init__(self, backbone: Any, example: Any) -> None:
        inner = getattr(backbone, "model", None)
        self._timm = inner is not None and hasattr(inner, "forward_features") and hasattr(backbone, "to_map")
        self._backbone = backbone
        # timm networks: trace timm's own network; the layout fix-up (Python control flow) stays outside the graph
        net = _ForwardFeatures(inner) if self._timm else backbone
        with _int8_tooling():
            from torch.ao.quantization import QConfig, get_default_qconfig, get_default_qconfig_mapping, quantize_fx
            from torch.ao.quantization.observer import MinMaxObserver

            x86 = get_default_qconfig("x86")
            qconfig = QConfig(activation=MinMaxObserver.with_args(reduce_range=True), weight=x86.weight)
            mapping = get_default_qconfig_mapping("x86").set_global(qconfig)
            self._prepared = quantize_fx.prepare_fx(net.eval(), mapping, (example[:1],))

    def _wrap(self, net: Any) -> Any:
        backbone = self._backbone
        return (lambda x: backbone.to_map(net(x), x.shape[-2:])) if self._timm else net

    def observe(self, x: Any) -> Any:
        """The backbone's fp32 features of ``x`` (normalised float NCHW), recording its activations' ranges."""
        with _int8_tooling(translate=False):  # a failure here is the fp32 pass's, not int8's
            return self._wrap(self._prepared)(x)

    def convert(self) -> Any:
        """The int8 backbone, calibrated on everything :meth:`observe` has seen."""
        with _int8_tooling():
            from torch.ao.quantization import quantize_fx

            return self._wrap(quantize_fx.convert_fx(self._prepared).eval())


def quantise_int8(backbone: Any, calibration: Any) -> Any:
    """``backbone`` quantised to int8 (:class:`Int8Quantiser`), calibrated on ``calibration``: a batch of
    normalised float NCHW inputs, the run's own windows."""
    import torch

    q = Int8Quantiser(backbone, calibration)
    with torch.inference_mode():
        q.observe(calibration)
    return q.convert()


class _int8_tooling:
    """Quiet PyTorch's FX quantisation (it warns about its own deprecation), skip stack traces while tracing,
    and (with ``translate``) turn its failures into a :class:`BcdError` that says what to do."""

    def __init__(self, translate: bool = True) -> None:
        self._translate = translate

    def __enter__(self) -> None:
        import torch.fx

        config = getattr(torch.fx, "config", None)
        self._config, self._was = config, getattr(config, "do_not_emit_stack_traces", None)
        if self._was is not None:
            config.do_not_emit_stack_traces = True
        self._warnings = warnings.catch_warnings()
        self._warnings.__enter__()
        warnings.simplefilter("ignore")

    def __exit__(self, kind, err, tb) -> bool:
        import torch

        self._warnings.__exit__(kind, err, tb)
        if self._was is not None:
            self._config.do_not_emit_stack_traces = self._was
        failures = (torch.fx.proxy.TraceError, NotImplementedError, RuntimeError, TypeError)
        if self._translate and err is not None and isinstance(err, failures):
            from ..errors import BcdError

            raise BcdError(f"int8 is not available for this backbone ({type(err).__name__}: {err}); "
                           "use --precision auto or bf16.") from err
        return False


def _ForwardFeatures(net: Any) -> Any:
    import torch

    class ForwardFeatures(torch.nn.Module):
        def __init__(self, inner) -> None:
            super().__init__()
            self.inner = inner

        def forward(self, x):
            return self.inner.forward_features(x)

    return ForwardFeatures(net)
