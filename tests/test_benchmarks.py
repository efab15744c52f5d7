"""The GPU benchmark is run on a GPU by hand, rarely: its GPU table's code is rehearsed here on the CPU, so the
one prepared GPU call does not fail on a typo."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

BENCH = Path(__file__).parents[1] / "benchmarks" / "bench_gpu.py"


def test_bench_gpu_rehearses_its_gpu_table_on_the_cpu(tmp_path: Path) -> None:
    out = tmp_path / "figures.json"
    res = subprocess.run([sys.executable, str(BENCH), "--rehearse", "--json", str(out)], capture_output=True,
                         text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    figures = json.loads(out.read_text())
    for key in ("model_alone_eager", "device_decode_tiles_per_s", "ratio_eager", "cli_run_s", "cli_classify_s"):
        assert figures[key] > 0, key
    for key in ("feeder_cpu_decode", "feeder_device_decode", "end_to_end_eager", "end_to_end_eager_cpu_decode",
                "end_to_end_eager_with_quality"):
        assert figures[key]["windows_per_s"] > 0, key
    # the device path really ran (torchvision or TorchCodec on the CPU), each tile decoded once
    assert " on cpu (YCBCR-JPEG" in figures["end_to_end_eager"]["decode"]
    assert " on cpu (YCBCR-JPEG" in figures["feeder_device_decode"]["decode"]
    e2e = figures["end_to_end_eager"]
    assert e2e["decoded_tiles"] == e2e["tiles_touched"] > 0


def _bench_generalise():
    import importlib.util

    spec = importlib.util.spec_from_file_location("bench_generalise", BENCH.parent / "bench_generalise.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_bench_generalise_replays_each_rule_for_c_on_a_runs_own_curve() -> None:
    """The replay picks what each rule picks from the curve the run wrote, and scores it at that C on the new
    patients: a user's real run says which rule is right for their data."""
    from napari_bcd.train.regularise import PROBE_CS, Tuning, choose_c

    bench = _bench_generalise()
    grid = PROBE_CS  # 1e-4 ... 3: the lowest loss at 0.3; 1e-2 ... 1 within one standard error of it
    loss = [0.90, 0.80, 0.70, 0.60, 0.52, 0.51, 0.505, 0.50, 0.515, 0.60]
    se = [0.03] * len(grid)
    new = [0.40 + 0.01 * i for i in range(len(grid))]  # every C scores differently: the pick can be read back
    tuning = Tuning(grid, accuracy=[0.5] * len(grid), standard_error=se, loss=loss, loss_standard_error=se,
                    chosen=choose_c(grid, loss, se, grouped=False)[0], folds=4).to_dict()
    got = bench.replay_rules(tuning, new, grid)
    at = dict(zip(grid, new, strict=True))
    assert got["lowest loss"] == at[0.3]
    assert got["1-SE most reg."] == at[1e-2]
    assert got["1-SE middle"] == at[0.1] == at[tuning["chosen_c"]]  # the middle of the band 1e-2 ... 1
    assert got["C=0.001"] == at[1e-3] and got["C=1"] == at[1.0] and got["oracle"] == max(new)
    assert bench.replay_rules(None, new, grid) == {}  # no curve measured (nothing could be held out)
    assert bench.replay_rules({**tuning, "grid": [1.0]}, new, grid) == {}  # another grid: nothing to replay


def test_bench_generalise_scores_the_saved_probabilities_on_the_new_patients() -> None:
    """The new patients' cross-entropy and ECE at the saved temperature, at 1 and at their own best: the saved one
    is read back from the logits the model shows, and no temperature beats the new patients' own best."""
    from napari_bcd.train.regularise import fit_logistic

    bench = _bench_generalise()
    rng = np.random.default_rng(0)
    y = np.arange(80) % 4
    x = np.eye(4)[y] @ rng.normal(0, 1, (4, 16)) + rng.normal(0, 0.8, (80, 16))
    lr = fit_logistic(x[:40], y[:40], 1.0, 4)
    lr.temperature = 0.5
    got = bench.new_calibration(lr, x[40:], y[40:])
    assert got["t"] == 0.5 and got["t_new"] > 0
    z = lr.logits(x[40:])  # what the model shows: its logits over the saved temperature
    z = z - z.max(1, keepdims=True)
    assert got["shipped"][0] == pytest.approx(-(z[np.arange(40), y[40:]] - np.log(np.exp(z).sum(1))).mean())
    assert got["oracle"][0] <= min(got["shipped"][0], got["one"][0]) + 1e-9
    assert all(0 <= got[k][1] <= 1 for k in ("shipped", "one", "oracle"))


def test_bench_c_rules_scores_every_rule_against_the_best_c_of_each_world() -> None:
    """The worlds benchmark on stand-in features (its own are a real backbone's, minutes to compute): each rule's
    loss is the oracle's accuracy minus the accuracy at the C it picks, never negative; shift draws the new
    patients from the other sources."""
    import importlib.util

    from napari_bcd.train.regularise import PROBE_CS

    spec = importlib.util.spec_from_file_location("bench_c_rules", BENCH.parent / "bench_c_rules.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    rng = np.random.default_rng(0)
    feats = rng.gamma(2.0, 1.0, (160, 24))  # non-negative, as pooled ReLU features are
    source = np.repeat([0, 1, 2, 3], 40)
    dirs, train_pool, new_pool = bench.world(feats, source, "crop", 0.5, 0, shift=True)
    assert dirs.shape == (4, 24) and len(train_pool) == 40 and len(new_pool) == 120
    runs = [bench.one_world(feats, source, kind, 0.6, 1.0, 3, 5, 0, shift) for kind in ("top", "minor")
            for shift in (False, True)]
    for r in runs:
        assert len(r["lr_new"]) == len(PROBE_CS) and r["rules"]["oracle"] == max(r["lr_new"])
        assert r["rules"]["C=1"] == r["lr_new"][PROBE_CS.index(1.0)]
        assert {"lowest loss", "1-SE middle", "1-SE most reg.", "grouped lowest (ref.)",
                "shrinkage LDA (ref.)"} <= set(r["rules"])
    summary = bench.summarise(runs)
    assert summary["worlds"] == 4 and "oracle" not in summary["rules"]
    for k, v in summary["rules"].items():
        floor = -1.0 if k == "shrinkage LDA (ref.)" else 0.0  # no C: it may beat the best C, a C rule never can
        assert floor <= v["mean"] <= v["worst"] <= 1.0 and set(v["by_family"]) == {"same/top", "shift/top",
                                                                                    "same/minor", "shift/minor"}


def test_bench_generalise_lda_weighs_the_classes_equally_as_the_probe_does() -> None:
    """The linear discriminant measured beside the probe: fitted with equal priors (the probe is class-balanced),
    so a point just past the middle of two classes goes to the rarer one, where the data's 5:1 priors would not."""
    from sklearn.discriminant_analysis import LinearDiscriminantAnalysis

    bench = _bench_generalise()
    corners = np.array([[-0.5, -0.5], [-0.5, 0.5], [0.5, -0.5], [0.5, 0.5]])
    step = np.array([1.0, 0.0])
    x = np.concatenate([np.tile(corners - step, (5, 1)), corners + step])  # 20 of class 0, 4 of class 1
    y = np.array([0] * 20 + [1] * 4)
    new, y_new = np.array([[0.1, 0.0], [-0.1, 0.0]]), np.array([1, 0])
    assert bench.lda_correct(x, y, new, y_new).tolist() == [True, True]
    by_data = LinearDiscriminantAnalysis(solver="lsqr", shrinkage="auto").fit(x, y)
    assert by_data.predict(new).tolist() == [0, 0]  # what the equal priors change
