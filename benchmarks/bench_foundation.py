"""How fast each pathology foundation backbone row runs here: windows/s at its own input size, fp32 and auto.

    python benchmarks/bench_foundation.py [--rows hibou-b kaiko-vitb16 ...] [--windows 8] [--json out.json]

Each row is built with random weights (the real weights are gated or cannot be downloaded here; the speed is the
architecture's, not the weights') at its 224-px input, then classifies ``--windows`` real H&E windows of the bundled
slide through the engine's predictor: fp32, and *auto* (bf16 where the CPU has bf16 units, checked against fp32 on
the first batch) in the same process, so the ratio is measured in one sitting.  The features a training run
computes once per image cost the same per window.  Which CPU (AMX or not) is printed with the figures.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
import warnings
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))
logging.getLogger("napari_bcd").setLevel(logging.ERROR)
warnings.simplefilter("ignore")


def _windows(n: int, px: int) -> np.ndarray:
    from napari_bcd._sample_data import SAMPLE_SLIDE
    from napari_bcd.io import open_slide

    with open_slide(SAMPLE_SLIDE) as slide:
        out = []
        for k in range(n):
            y, x = 600 + 180 * (k % 6), 700 + 200 * (k // 6)
            out.append(np.asarray(slide.read_region(0, y, x, px, px))[..., :3])
    return np.stack(out)


def bench_row(name: str, windows: int) -> dict:
    import torch

    from napari_bcd.model import build_classifier
    from napari_bcd.model.backbones import BACKBONES
    from napari_bcd.model.inference import Predictor

    spec = BACKBONES[name]
    px = spec.input_px or 224
    torch.manual_seed(0)
    t = time.perf_counter()
    model = build_classifier(name, classes=("a", "b"), backbone_weights=None, input_px=(px, px),
                             field_um=(px * (spec.mpp or 0.5),) * 2)
    built = time.perf_counter() - t
    x = _windows(windows, px)
    row = {"row": name, "input_px": px, "params_m": round(sum(p.numel() for p in model.backbone.parameters()) / 1e6,
                                                           1), "build_s": round(built, 1)}
    for precision in ("fp32", "auto"):
        pred = Predictor(model, device="cpu", precision=precision)
        pred.begin_run(windows, batch_size=4)
        pred(x[:4])  # the first batch: checks (auto) and warms up, not counted
        t = time.perf_counter()
        pred(x)
        row[f"{precision}_windows_per_s"] = round(windows / (time.perf_counter() - t), 3)
        row[f"{precision}_ran"] = pred.precision
    row["auto_over_fp32"] = round(row["auto_windows_per_s"] / row["fp32_windows_per_s"], 2)
    return row


def main() -> int:
    import torch

    from napari_bcd.model.backbones import FOUNDATION

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", nargs="+", default=[s.name for s in FOUNDATION], help="which rows (default: all)")
    ap.add_argument("--windows", type=int, default=8, help="windows timed per format")
    ap.add_argument("--json", help="also write the figures here")
    args = ap.parse_args()
    cpu = "AMX" if torch.cpu._is_amx_tile_supported() else "no AMX"
    print(f"CPU: {torch.get_num_threads()} threads, {cpu}; {args.windows} windows per format, batch 4")
    print(f"{'row':<14}{'px':>5}{'params M':>10}{'build s':>9}{'fp32 win/s':>12}{'auto win/s':>12}{'ran':>6}"
          f"{'auto/fp32':>10}")
    rows = []
    for name in args.rows:
        r = bench_row(name, args.windows)
        rows.append(r)
        print(f"{r['row']:<14}{r['input_px']:>5}{r['params_m']:>10}{r['build_s']:>9}{r['fp32_windows_per_s']:>12}"
              f"{r['auto_windows_per_s']:>12}{r['auto_ran']:>6}{r['auto_over_fp32']:>10}", flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps({"cpu": cpu, "rows": rows}, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
