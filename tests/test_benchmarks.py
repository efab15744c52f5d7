"""The GPU benchmark is run on a GPU by hand, rarely: its GPU table's code is rehearsed here on the CPU, so the
one prepared GPU call does not fail on a typo."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

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
