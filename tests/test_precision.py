"""bf16 where the CPU runs it fast, checked against fp32 on each run's first batch, with fp32 as the fallback."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from conftest import DATA, SAMPLE_SLIDE, drain, load_rgb, two_kinds_dataset
from napari_bcd.classes import BACH_CLASSES
from napari_bcd.model.inference import CHECK_WINDOWS
from napari_bcd.model.precision import PrecisionCheck, agreement, bf16_is_fast

fast_cpu = pytest.mark.skipif(not bf16_is_fast("cpu"), reason="this CPU has no bf16 matrix units")


def _he_windows(n: int = 8, px: int = 64) -> np.ndarray:
    """Real H&E crops (the test tiles), ``n x px x px x 3``."""
    src = load_rgb(DATA / "tiatoolbox-target-1000.png")
    return np.stack([src[k * 97 % 900 : k * 97 % 900 + px, k * 53 % 900 : k * 53 % 900 + px] for k in range(n)])


def test_agreement_measures_labels_and_the_largest_change() -> None:
    exact = np.array([[0.9, 0.1], [0.45, 0.55], [0.5, 0.5]])
    fast = np.array([[0.85, 0.15], [0.55, 0.45], [0.5, 0.5]])
    same, change = agreement(exact, fast)
    assert same == pytest.approx(2 / 3) and change == pytest.approx(0.10)
    assert agreement(exact, np.full_like(exact, np.nan))[1] == np.inf  # NaN is never "within tolerance"
    check = PrecisionCheck("bf16", 3, same, change, 0.15, 1.0, 0.4)
    assert check.passed and check.kept == "bf16" and "checked against fp32" in check.describe()
    worse = PrecisionCheck("bf16", 3, same, change, 0.05, 1.0, 0.4)
    assert not worse.passed and worse.kept == "fp32" and worse.describe().startswith("fell back to fp32")


@fast_cpu
def test_auto_runs_bf16_checked_against_fp32(tiny_model) -> None:
    from napari_bcd.model.inference import Predictor

    x = _he_windows()
    exact = Predictor(tiny_model, device="cpu", precision="fp32")(x)
    auto = Predictor(tiny_model, device="cpu")
    assert auto.precision == "bf16" and auto.check_pending and auto.default_batch_size == 16  # timed in chunks
    first = auto(x)
    check = auto.check
    assert check is not None and check.passed and auto.precision == "bf16"
    k = CHECK_WINDOWS
    assert check.windows == k < len(x) and check.label_agreement == 1.0
    assert 0 < check.max_change <= check.tolerance
    assert np.abs(first[:k] - exact[:k]).max() == pytest.approx(check.max_change, rel=1e-4)
    assert np.abs(first[k:] - exact[k:]).max() <= check.tolerance  # the rest of the batch in bf16
    auto(x)  # later batches run bf16 unchecked
    assert auto.check is check and not auto.check_pending


@fast_cpu
def test_auto_falls_back_to_exact_fp32_beyond_the_tolerance(tiny_model) -> None:

    from napari_bcd.model.inference import Predictor

    x = _he_windows()
    exact = Predictor(tiny_model, device="cpu", precision="fp32")(x)
    strict = Predictor(tiny_model, device="cpu", tolerance=0.0)
    first = strict(x)
    assert strict.precision == "fp32" and not strict.check.passed
    # the fallback's batch is the fp32 batch (computed in NHWC: the last bits differ), not the bf16 one
    np.testing.assert_allclose(first, exact, atol=1e-5)
    np.testing.assert_array_equal(strict(x), exact)  # and the rest of the run is exactly fp32
    assert all(p.is_contiguous() for p in strict.model.parameters())  # back to the fp32 layout
    strict.begin_run()  # the next run checks again, starting from bf16
    assert strict.precision == "bf16" and strict.check is None and strict.check_pending


def test_auto_is_plain_fp32_without_bf16_units(tiny_model, monkeypatch: pytest.MonkeyPatch) -> None:
    from napari_bcd.model import inference

    monkeypatch.setattr(inference, "bf16_is_fast", lambda device: False)
    p = inference.Predictor(tiny_model, device="cpu")
    assert p.precision == "fp32" and not p.check_pending and p.default_batch_size == 16
    assert p.begin_run(batch_size=4) == 4 and not p.tune and p.default_batch_size == 4  # as given: never timed
    p(_he_windows(2))
    assert p.check is None
    forced = inference.Predictor(tiny_model, device="cpu", precision="fp32")
    assert forced.precision == "fp32" and not forced.check_pending  # asked for: exact, never checked


def test_an_explicit_bf16_is_checked_like_auto_and_falls_back_when_it_moves_labels(tiny_model) -> None:
    """--precision bf16 asked for is no licence to move labels unseen: its first batch is checked against fp32 as
    auto's is, the check is kept in the run's record, and beyond the tolerance the run is fp32 and says so."""
    from napari_bcd.model.inference import Predictor

    x = _he_windows()
    exact = Predictor(tiny_model, device="cpu", precision="fp32")(x)
    asked = Predictor(tiny_model, device="cpu", precision="bf16")
    assert asked.check_pending
    asked(x)
    assert asked.precision == "bf16" and asked.check is not None and asked.check.fast == "bf16"
    assert asked.check.passed and asked.check.windows == CHECK_WINDOWS
    strict = Predictor(tiny_model, device="cpu", precision="bf16", tolerance=0.0)
    np.testing.assert_allclose(strict(x), exact, atol=1e-5)
    assert strict.precision == "fp32" and strict.check is not None and not strict.check.passed


@fast_cpu
def test_a_run_records_its_check_and_a_fallback_run_equals_fp32(tiny_model) -> None:
    from napari_bcd import open_slide
    from napari_bcd.engine import iter_classify
    from napari_bcd.model.inference import Predictor

    with open_slide(SAMPLE_SLIDE) as slide:
        _, auto = drain(iter_classify(slide, Predictor(tiny_model, device="cpu")))
        _, strict = drain(iter_classify(slide, Predictor(tiny_model, device="cpu", tolerance=0.0)))
        _, exact = drain(iter_classify(slide, tiny_model, precision="fp32"))
    check = auto.info["precision_check"]
    assert auto.info["precision"] == "bf16" and check["kept"] == "bf16" and check["windows"] == CHECK_WINDOWS
    assert strict.info["precision"] == "fp32" and strict.info["precision_check"]["kept"] == "fp32"
    assert exact.info["precision_check"] is None
    for run in (auto, strict, exact):  # the CPU batch chosen by timing the run's own batches
        batching = run.info["batching"]
        assert batching["batch"] in (4, 8, 16) and batching["threads"] >= 1 and batching["windows_per_s"]
    np.testing.assert_allclose(strict.probs, exact.probs, atol=1e-6)
    np.testing.assert_array_equal(strict.labels, exact.labels)
    assert np.nanmax(np.abs(auto.probs - exact.probs)) < 0.15


@fast_cpu
def test_features_are_cached_apart_by_precision(tiny_model, tmp_path: Path) -> None:
    from napari_bcd.config import cache_dir
    from napari_bcd.train.features import backbone_features
    from napari_bcd.train.iciar import read_iciar
    from napari_bcd.windows import resize_area

    ds = read_iciar(two_kinds_dataset(tmp_path / "ds", n=3))
    size = tuple(tiny_model.card.input_px)

    def bank(precision):
        return drain(backbone_features(tiny_model, ds, list(range(len(ds))), 1,
                                       lambda i: resize_area(ds.load(i), size), "cpu", 8, True,
                                       precision=precision))[1]

    fp32, bf16 = bank("fp32"), bank("bf16")
    entries = sorted(p.name for p in (cache_dir() / "features").iterdir() if p.is_dir())
    assert len(entries) == 2 and sum(e.endswith("-bf16") for e in entries) == 1
    assert not np.array_equal(fp32.numpy(), bf16.numpy())  # bf16 features are not fp32 features
    np.testing.assert_allclose(bf16.float().numpy(), fp32.float().numpy(), atol=0.1 * float(fp32.abs().max()))
    np.testing.assert_array_equal(bank("bf16").numpy(), bf16.numpy())  # read back from its own entry
    assert all(p.is_contiguous() for p in tiny_model.backbone.parameters())  # the weights as saved, after the NHWC pass


@fast_cpu
@pytest.mark.slow
def test_the_real_resnet152v2_passes_the_check_on_real_he(monkeypatch) -> None:
    import torch

    from napari_bcd.model import build_classifier, policy
    from napari_bcd.model.inference import Predictor

    monkeypatch.setattr(policy, "int8_outruns_bf16", lambda: False)  # both checked, as with AMX

    torch.manual_seed(0)
    model = build_classifier("resnet152v2", classes=BACH_CLASSES,
                             backbone_weights=None)  # the exact network; random weights offline
    x = _he_windows(2, 256)
    p = Predictor(model, device="cpu")
    p(x)
    assert p.check is not None and p.check.windows == 2
    assert p.check.passed, p.check.describe()
    p.begin_run(windows=1000, batch_size=2)  # long enough: int8 is traced, calibrated by the fp32 pass and checked
    p(x)
    assert set(p.policy.checks) == {"bf16", "int8"} and all(c.passed for c in p.policy.checks.values()), p.policy.checks
    assert p.int8_trial.kept is (p.precision == "int8") and p.check.fast == p.precision


def test_int8_is_quantised_on_the_run_and_checked(tiny_model) -> None:
    from napari_bcd.errors import BcdError
    from napari_bcd.model.inference import Predictor

    x = _he_windows()
    exact = Predictor(tiny_model, device="cpu", precision="fp32")(x)
    q = Predictor(tiny_model, device="cpu", precision="int8")
    probs = q(x)
    check = q.check
    assert check is not None and check.fast == "int8" and check.windows == CHECK_WINDOWS
    assert np.abs(probs - (exact if not check.passed else probs)).max() < 1e-5
    if check.passed:  # kept: the probabilities are int8's, within the tolerance of fp32
        assert q.precision == "int8" and 0 < np.abs(probs - exact).max() <= check.tolerance
    strict = Predictor(tiny_model, device="cpu", precision="int8", tolerance=0.0)
    np.testing.assert_allclose(strict(x), exact, atol=1e-5)
    assert strict.precision == "fp32" and strict.check.kept == "fp32"
    np.testing.assert_array_equal(strict(x), exact)
    with pytest.raises(BcdError, match="CPU"):
        Predictor(tiny_model, device="meta", precision="int8")


def test_the_batch_tuner_times_each_candidate_then_keeps_the_fastest() -> None:
    from napari_bcd.model.tuning import BatchTuner

    t = BatchTuner(threads=2)
    for config, rate in (((4, 2), 10.0), ((8, 2), 12.0), ((16, 2), 11.0)):
        assert t.chosen == config and not t.done
        t.record(config, 16, 16 / rate)
    assert t.done and t.chosen == (8, 2) and t.best_rate == pytest.approx(12.0)
    many = BatchTuner(threads=8)  # 4 or more threads: half of them is timed too, at the fastest batch
    for b, rate in ((4, 10.0), (8, 12.0), (16, 11.0)):
        many.record((b, 8), 16, 16 / rate)
    assert not many.done and many.chosen == (8, 4)
    many.record((8, 4), 16, 1.0)
    assert many.done and many.chosen == (8, 4) and many.record_of().windows_per_s["8x4"] == 16.0


def test_the_batch_tuner_computes_every_window_once_and_times_only_full_candidates() -> None:
    from napari_bcd.model.tuning import BatchTuner, describe_tuning

    t, chunks, threads = BatchTuner(threads=2), [], []
    out = t.run(16, lambda a, b: chunks.append((a, b)) or b - a, threads.append)
    assert chunks == [(0, 4), (4, 8), (8, 12), (12, 16)] and out == [4, 4, 4, 4] and threads == [2]
    assert list(t.rates) == [(4, 2)]
    chunks.clear()
    t.run(5, lambda a, b: chunks.append((a, b)), threads.append)  # shorter than the next candidate (8): not timed
    assert chunks == [(0, 5)] and list(t.rates) == [(4, 2)]
    text = describe_tuning(t.record_of(), None)[0]
    assert text.startswith("batch 8 on 2 threads, while timing") and "4 x 2 threads" in text


@fast_cpu
def test_a_tuned_predictor_gives_the_models_probabilities(tiny_model) -> None:
    import torch

    from napari_bcd.model.inference import Predictor

    x = _he_windows(16)
    with torch.inference_mode():
        expected = torch.softmax(tiny_model.eval().forward_uint8(torch.from_numpy(x)), 1).numpy()
    p = Predictor(tiny_model, device="cpu", precision="fp32")
    assert p.begin_run(windows=64) == 16
    for _ in range(4):
        np.testing.assert_allclose(p(x), expected, atol=1e-5)
    assert p.tuning.chosen_by_timing and set(p.tuning.windows_per_s) == {"4x2", "8x2", "16x2"} | (
        set() if p.threads == 2 else set(p.tuning.windows_per_s))


@fast_cpu
def test_auto_checks_int8_beside_bf16_on_long_runs_and_keeps_the_faster_that_agrees(tiny_model, monkeypatch) -> None:
    import torch

    from napari_bcd.model import policy

    monkeypatch.setattr(policy, "int8_outruns_bf16", lambda: False)  # as with AMX: both are timed

    from napari_bcd.model import build_classifier
    from napari_bcd.model.inference import Predictor

    # its spread head: int8 calibrated and checked on windows 4-7 moves window 7 (near a tie) by 0.98
    refused = Predictor(tiny_model, device="cpu")
    refused.begin_run(windows=1_000_000)
    for _ in range(4):
        refused(_he_windows(20)[4:])
    assert refused.int8_trial.kept is False and refused.precision == "bf16" and refused.check.fast == "bf16"
    assert refused.int8_trial.why.startswith("int8 differed from fp32 on the first batch's windows beyond")

    torch.manual_seed(0)
    tiny_model = build_classifier("timm:resnet18", classes=BACH_CLASSES, backbone_weights=None, input_px=(64, 64),
                                  field_um=(200.0, 200.0))
    x = _he_windows(16)
    exact = Predictor(tiny_model, device="cpu", precision="fp32")(x)
    short = Predictor(tiny_model, device="cpu")
    short.begin_run(windows=80)
    for _ in range(5):
        short(x)
    assert short.int8_trial is None and short.precision == "bf16"  # trying int8 would cost more than it saves
    assert short.quantised is None  # never quantised

    long = Predictor(tiny_model, device="cpu")
    long.begin_run(windows=1_000_000)
    first = long(x)  # fp32 on the check windows (calibrating int8 on the way), then bf16 and int8 on the same
    trial = long.int8_trial
    assert set(long.policy.checks) == {"bf16", "int8"} and all(c.passed for c in long.policy.checks.values())
    assert trial.check.fast == "int8" and trial.float_precision == "bf16" and trial.kept is None
    assert long.check is long.policy.checks[long.precision]
    k = CHECK_WINDOWS
    assert np.abs(first[:k] - exact[:k]).max() == pytest.approx(long.check.max_change, rel=1e-4, abs=1e-7)
    for _ in range(8):  # each format that may be faster is timed at 4, 8 and 16 windows, then the faster is kept
        probs = long(x)
    trial = long.int8_trial  # the record as the race ended (a frozen value, replaced as the trial goes)
    assert trial.kept is not None and not long.policy.racing
    rates = {"int8": trial.int8_windows_per_s, "bf16": trial.float_windows_per_s}
    assert long.precision == max(rates, key=rates.get) and trial.kept is (long.precision == "int8")
    assert long.check.fast == long.precision and np.abs(probs - exact).max() <= 0.15
    assert long.tuning.chosen_by_timing

    quantised = long.int8_forwards
    for fast in ("int8", "bf16"):  # the next run reuses the quantised backbone: checked at once, never quantised again
        long.begin_run(windows=100, batch_size=16)  # a fixed batch: decided on the check
        assert long.precision == "bf16" and long.int8_trial is None and long.check_pending
        long._rate = lambda fmt, fast=fast: 100.0 if fmt == fast else 1.0  # as if timed so
        long(x)
        assert long.int8_forwards is quantised and long.precision == fast and long.int8_trial.kept is (
            fast == "int8")
        if fast == "bf16":
            assert long.int8_trial.why == "int8 ran 1.0 windows/s, bf16 100.0" and long.check.fast == "bf16"


def test_without_amx_bf16_is_only_int8s_fallback(tiny_model, monkeypatch) -> None:
    import torch

    from napari_bcd.model import build_classifier, inference, policy
    from napari_bcd.model.tuning import describe_tuning

    monkeypatch.setattr(inference, "bf16_is_fast", lambda device: True)
    monkeypatch.setattr(policy, "int8_outruns_bf16", lambda: True)  # AVX-512 BF16 without AMX
    # the spread head: int8 calibrated and checked on windows 4-7 moves window 7 by 0.98, so bf16 is checked
    refused = inference.Predictor(tiny_model, device="cpu")
    refused.begin_run(windows=1_000_000)
    refused(_he_windows(20)[4:])
    assert set(refused.policy.checks) == {"int8", "bf16"}
    assert refused.precision == "bf16" and refused.check.fast == "bf16"
    assert refused.int8_trial.kept is False and refused.int8_trial.float_precision == "bf16"

    torch.manual_seed(0)
    model = build_classifier("timm:resnet18", classes=BACH_CLASSES, backbone_weights=None, input_px=(64, 64),
                             field_um=(200.0, 200.0))
    x = _he_windows(16)
    exact = inference.Predictor(model, device="cpu", precision="fp32")(x)
    p = inference.Predictor(model, device="cpu")
    p.begin_run(windows=1_000_000)
    first = p(x)
    trial = p.int8_trial
    assert set(p.policy.checks) == {"int8"} and p.policy.checks["int8"].passed  # int8 agreed: bf16 never ran
    assert trial.float_precision == "bf16" and trial.kept is None and p.precision == "int8"
    for _ in range(4):  # int8 timed at 4, 8 and 16 windows, then the race ends with nothing to race
        probs = p(x)
    trial = p.int8_trial
    assert trial.kept is True and trial.float_timed == "not run" and trial.float_windows_per_s is None
    assert trial.int8_windows_per_s > 0 and not p.policy.racing and p.tuning.chosen_by_timing
    assert max(np.abs(first - exact).max(), np.abs(probs - exact).max()) <= 0.15
    text = describe_tuning(None, trial)[0]
    assert text.startswith("int8 kept:") and "bf16 not run" in text


def test_auto_races_int8_against_fp32_on_a_cpu_without_bf16_units(tiny_model, monkeypatch) -> None:
    import torch

    from napari_bcd.model import build_classifier, inference
    from napari_bcd.model.tuning import describe_tuning

    monkeypatch.setattr(inference, "bf16_is_fast", lambda device: False)
    torch.manual_seed(0)
    model = build_classifier("timm:resnet18", classes=BACH_CLASSES, backbone_weights=None, input_px=(64, 64),
                             field_um=(200.0, 200.0))
    x = _he_windows(16)
    exact = inference.Predictor(model, device="cpu", precision="fp32")(x)
    p = inference.Predictor(model, device="cpu")
    assert p.begin_run(windows=10) == 16 and not p.check_pending  # short: plain fp32, nothing to check
    np.testing.assert_array_equal(p(x), exact)
    p.begin_run(windows=1_000_000, batch_size=16)  # a fixed batch: the race is decided on the check's timings
    probs = p(x)
    trial = p.int8_trial
    assert set(p.policy.checks) == {"int8"} and trial.float_precision == "fp32" and trial.kept is not None
    assert p.precision == ("int8" if trial.kept else "fp32") and not p.policy.racing
    assert trial.float_timed == "check"  # a fixed batch: nothing timed in chunks
    if trial.kept:
        assert trial.int8_windows_per_s > trial.float_windows_per_s and p.check.fast == "int8"
        assert 0 < np.abs(probs - exact).max() <= 0.15
        text = describe_tuning(None, trial)[0]
        assert text.startswith("int8 kept:") and "against fp32's" in text and "in its check" in text
    else:
        assert p.check is None and trial.why.startswith("int8 ran")
        np.testing.assert_allclose(probs, exact, atol=1e-5)


def test_a_backbone_that_cannot_be_traced_keeps_auto_on_its_float_format(tiny_model, monkeypatch) -> None:
    from napari_bcd.errors import BcdError
    from napari_bcd.model import inference, precision

    def untraceable(self, backbone, example):
        raise BcdError("int8 is not available for this backbone (TraceError: control flow); use --precision auto.")

    monkeypatch.setattr(precision.Int8Quantiser, "__init__", untraceable)
    p = inference.Predictor(tiny_model, device="cpu", tolerance=1.0)
    p.begin_run(windows=1_000_000)
    p(_he_windows(16))
    assert p.int8_trial.kept is False and p.int8_trial.why.startswith("int8 is not available for this backbone")
    assert p.precision == p.policy.float_format and p.quantised is False
    p.begin_run(windows=1_000_000)
    assert "int8" not in p.policy.to_check  # never tried again on this predictor
    with pytest.raises(BcdError, match="not available for this backbone"):  # asked for: said, not swallowed
        inference.Predictor(tiny_model, device="cpu", precision="int8")(_he_windows(8))


def test_the_precision_policy_through_its_public_methods(monkeypatch) -> None:
    """The policy alone, no model: a long CPU auto run checks bf16 and int8, races the two that agree, keeps the
    faster once both are timed, and records the trial; one that disagrees is never raced; nothing agreeing is fp32
    with the check that says why."""
    from napari_bcd.model import policy as pol
    from napari_bcd.model.precision import PrecisionCheck

    monkeypatch.setattr(pol, "int8_outruns_bf16", lambda: False)
    p = pol.PrecisionPolicy("auto", "bf16", auto_cpu=True)
    p.begin_run(10_000, int8_usable=True, int8_ready=False)
    assert p.precision == "bf16" and p.check_pending and p.to_check == ("bf16", "int8")
    assert p.wants("bf16", int8_ready=False) and not p.wants("int8", int8_ready=False)
    p.checks = {"bf16": PrecisionCheck("bf16", 4, 1.0, 0.01, 0.15, 1.0, 0.4),
                "int8": PrecisionCheck("int8", 4, 1.0, 0.02, 0.15, 1.0, 0.2)}
    timed: set[str] = set()
    rates = {"bf16": 10.0, "int8": 20.0}
    kept = p.checked(1.0, 4, lambda f: p.racing[f] if f not in timed else rates[f], timing=True,
                     timed=lambda f: f in timed)
    assert kept == "int8" and set(p.racing) == {"bf16", "int8"} and p.int8_trial.kept is None
    timed.add("int8")  # the tuner timed int8, still the fastest: the race ends

    def rate(f: str) -> float:
        return rates[f] if f in timed else p.racing[f]

    assert p.settle(rate, timing=True, timed=lambda f: f in timed) == "int8"
    assert p.int8_trial.kept is True and p.int8_trial.int8_windows_per_s == 20.0 and not p.racing
    assert p.check.fast == "int8"
    # int8 beyond the tolerance: recorded, never raced
    q = pol.PrecisionPolicy("auto", "bf16", auto_cpu=True)
    q.begin_run(10_000, int8_usable=True, int8_ready=True)
    q.checks = {"bf16": PrecisionCheck("bf16", 4, 1.0, 0.01, 0.15, 1.0, 0.4),
                "int8": PrecisionCheck("int8", 4, 0.5, 0.6, 0.15, 1.0, 0.2)}
    assert q.checked(1.0, 4, lambda f: q.racing[f], timing=False) == "bf16"
    assert q.int8_trial.kept is False and "beyond the tolerance" in q.int8_trial.why
    # nothing agrees: fp32, and the check that says why
    r = pol.PrecisionPolicy("auto", "bf16", auto_cpu=True)
    r.begin_run(10, int8_usable=True, int8_ready=False)
    assert r.to_check == ("bf16",)  # a short run: int8 would cost more than it saves
    r.checks = {"bf16": PrecisionCheck("bf16", 4, 0.5, 0.5, 0.15, 1.0, 0.4)}
    assert r.checked(1.0, 4, lambda f: r.racing[f], timing=False) == "fp32" and not r.check.passed
    # asked for int8 and it cannot be made: the caller raises; under auto the trial records why
    assert not pol.PrecisionPolicy("int8", "bf16", auto_cpu=False).int8_refused("no x86 engine")
    s = pol.PrecisionPolicy("auto", "bf16", auto_cpu=True)
    assert s.int8_refused("no x86 engine") and s.int8_trial.why == "no x86 engine"
    assert set(pol.FORMATS) == {"fp32", "bf16", "fp16", "int8"} and pol.FORMATS["fp32"].exact


def test_compile_on_the_cpu_says_its_cost_before_it_is_paid(tiny_model, caplog) -> None:
    """Issue 40: --compile on the CPU ran past five minutes without a word; now the cost is said at once (and
    int8 with it is refused before any work)."""
    import logging

    from napari_bcd.errors import BcdError
    from napari_bcd.model.inference import Predictor

    with caplog.at_level(logging.WARNING, logger="napari_bcd"):
        Predictor(tiny_model, device="cpu", precision="fp32", compile=True)
    assert "--compile on the CPU builds its kernels before the first window" in caplog.text
    with pytest.raises(BcdError, match="int8 and --compile do not go together"):
        Predictor(tiny_model, device="cpu", precision="int8", compile=True)
    with pytest.raises(BcdError, match="Unknown precision 'fp8'"):
        Predictor(tiny_model, device="cpu", precision="fp8")
