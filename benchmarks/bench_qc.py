"""What quality control costs beside the classify run it guards (issue 39's goal: at most 5 % of a CPU run), and
what test-time augmentation costs.

    python benchmarks/bench_qc.py [SLIDE] [--stride 1.0] [--precision auto] [--json out.json]

On the bundled slide by default (single level at 0.499 µm/px: its cached thumbnail, made for the tissue mask, is
fine enough to measure) and on 3-level pyramids made from it at 0.25 µm/px (a 40x scan's layout), one of the slide
and one of 3 x 3 copies (18 x 13 mm: the thumbnail is too coarse, the pass reads the 1 µm/px level), in one
process: the QC pass alone (median of 3; the thumbnail and tissue mask every run makes are not counted), then
the whole classify run with the paper's ResNet152V2 (random weights: the speed is the architecture's) with QC off
and on, and with test-time augmentation.  Prints seconds, the QC share of the run, TTA's factor and which CPU (AMX
or not) measured them.
"""

from __future__ import annotations

import argparse
import json
import logging
import statistics
import sys
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))
logging.getLogger("napari_bcd").setLevel(logging.ERROR)
warnings.simplefilter("ignore")


def _pyramid(rgb: np.ndarray, path: Path, mosaic: int = 1) -> Path:
    """The slide upsampled 2x (0.25 µm/px), ``mosaic`` x ``mosaic`` copies side by side, as a tiled JPEG pyramid of 3
    levels, as converters write a 40x scan."""
    import tifffile
    from PIL import Image

    big = np.asarray(Image.fromarray(rgb).resize((rgb.shape[1] * 2, rgb.shape[0] * 2), Image.Resampling.BICUBIC))
    big = np.tile(big, (mosaic, mosaic, 1))
    with tifffile.TiffWriter(path) as tw:
        level = big
        for i in range(3):
            tw.write(level, tile=(256, 256), compression="jpeg", photometric="rgb", subfiletype=1 if i else 0,
                     resolution=(1e4 / (0.25 * 4**i), 1e4 / (0.25 * 4**i)), resolutionunit="CENTIMETER")
            level = np.asarray(Image.fromarray(level).reduce(4))
    return path


def qc_seconds(path: Path, card, settings) -> tuple[float, dict]:
    from napari_bcd.io import open_slide
    from napari_bcd.qc import quality_control
    from napari_bcd.tiling import grid_for, slide_mpp
    from napari_bcd.windows import tissue_mask

    times = []
    for _ in range(3):
        with open_slide(path) as slide:
            mpp = slide_mpp(slide, None)
            mask, ds = tissue_mask(slide, settings.tissue, mpp)  # the run makes it (and the thumbnail) anyway
            t = time.perf_counter()
            qc = quality_control(slide, grid_for(slide, card, settings), mpp[0], need=mask, need_ds=ds)
            times.append(time.perf_counter() - t)
    return statistics.median(times), qc.to_dict()


def run_seconds(path: Path, model, settings) -> tuple[float, int]:
    from napari_bcd.engine import classify
    from napari_bcd.io import open_slide

    with open_slide(path) as slide:
        t = time.perf_counter()
        cmap = classify(slide, model, settings)
        return time.perf_counter() - t, int(cmap.run.windows)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("slide", nargs="?", help="a slide (default: the bundled one, and a pyramid made from it)")
    p.add_argument("--stride", type=float, default=1.0)
    p.add_argument("--precision", default="auto")
    p.add_argument("--json", help="write the figures here")
    args = p.parse_args(argv)

    import torch

    from napari_bcd._sample_data import SAMPLE_SLIDE
    from napari_bcd.io import open_slide
    from napari_bcd.model import build_classifier
    from napari_bcd.qc import QCSettings
    from napari_bcd.settings import ClassifySettings

    torch.manual_seed(0)
    model = build_classifier("resnet152v2", classes=("Normal", "Benign", "InSitu", "Invasive"),
                             backbone_weights=None).eval()
    base = ClassifySettings(device="cpu", precision=args.precision, stride=args.stride)
    amx = bool(getattr(torch.cpu, "_is_amx_tile_supported", lambda: False)())
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        slides = [Path(args.slide)] if args.slide else [Path(SAMPLE_SLIDE)]
        if not args.slide:
            with open_slide(SAMPLE_SLIDE) as s:
                rgb = s.read_region(0, 0, 0, *s.dimensions)
            slides.append(_pyramid(rgb, Path(tmp) / "pyramid-40x.tif"))
            # 3 x 3 copies: the thumbnail is too coarse, the pass reads the 1 µm/px level in chunks
            slides.append(_pyramid(rgb, Path(tmp) / "pyramid-40x-3x3.tif", mosaic=3))
        for path in slides:
            qc_s, qc = qc_seconds(path, model.card, base)
            off, windows = run_seconds(path, model, base.replace(qc=QCSettings(enabled=False)))
            on, windows_on = run_seconds(path, model, base)
            tta, _ = run_seconds(path, model, base.replace(tta=True))
            row = {"slide": path.name, "run_with_tta_s": round(tta, 2), "tta_cost": round(tta / off, 2),
                   "windows": windows, "windows_with_qc": windows_on, "qc_s": round(qc_s, 3),
                   "run_without_qc_s": round(off, 2), "run_with_qc_s": round(on, 2),
                   "qc_share_of_run": round(qc_s / off, 4), "qc_level": qc["level"],
                   "windows_failed": qc["windows_failed"]}
            rows.append(row)
            print(f"{path.name}: QC pass {qc_s * 1e3:.0f} ms (level {qc['level']}); classify {windows} windows "
                  f"{off:.1f} s without QC, {on:.1f} s with ({windows_on} windows); QC = {qc_s / off:.1%} of the run; "
                  f"failed {qc['windows_failed']}; with test-time augmentation (8 views) {tta:.1f} s = "
                  f"{tta / off:.1f}x")
    print(f"CPU: {'AMX' if amx else 'no AMX'}, torch threads {torch.get_num_threads()}, precision {args.precision}, "
          f"stride {args.stride}")
    if args.json:
        Path(args.json).write_text(json.dumps({"amx": amx, "rows": rows}, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
