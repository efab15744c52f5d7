"""Engine benchmarks (issue 3), all figures from one run on this machine.

1. End-to-end windows/s of ``iter_classify`` / model-alone windows/s on the same
   windows, ResNet152V2 fp32 (target >= 0.90 on 2 CPU cores).
2. Peak RSS classifying a slide and one ~10x larger (real H&E pixels), small
   model (target: less than 64 MiB apart).
3. Region reads/s on one core for 256-px regions of a slide with 256-px JPEG
   tiles (target >= 2,000).
4. The whole ``napari-bcd classify`` run on the CMU slide against model-alone
   time for the same windows (target >= 0.85), and its peak RSS (<= 1 GiB).

The ResNet152V2 model here has a 128 µm field at 256 px (0.5 µm/px, the usual
resolution of patch classifiers such as WSInfer's), so the small CMU slide
gives enough windows; weights do not change the speed.

    python benchmarks/bench_engine.py [--quick]
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import resource
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).parent))
from _slides import SAMPLE, tiled_slide

from napari_bcd.classes import BACH_CLASSES

logging.getLogger("napari_bcd").setLevel(logging.ERROR)
MiB = 1 << 20


def paper_model(field_um: float = 128.0):
    from napari_bcd.model import build_classifier

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return build_classifier("resnet152v2", classes=BACH_CLASSES, field_um=(field_um, field_um),
                                name="bench-resnet152v2")


def end_to_end_vs_model(slide_path: Path, batch: int) -> None:
    from napari_bcd.engine import classify
    from napari_bcd.io import open_slide
    from napari_bcd.model import Predictor
    from napari_bcd.windows import resize_area

    pred = Predictor(paper_model(), device="cpu", precision="fp32")
    pred(np.zeros((batch, 256, 256, 3), np.uint8))  # warm-up
    figures = []
    for _ in range(2):  # interleave: the machine is noisy
        with open_slide(slide_path) as slide:  # a fresh Slide each pass: cold thumbnail and tile cache
            t0 = time.perf_counter()
            cmap = classify(slide, pred, batch_size=batch)
            e2e = time.perf_counter() - t0
            g = cmap.grid
            boxes = [g.read_box(int(r), int(c)) for r, c in np.argwhere(cmap.window_done)]
            inputs = np.stack([resize_area(slide.read_region(g.level, *b), g.input_px) for b in boxes])
        t0 = time.perf_counter()
        for i in range(0, len(inputs), batch):
            pred(inputs[i : i + batch])
        alone = time.perf_counter() - t0
        n = len(inputs)
        figures.append((n / e2e, n / alone))
    for i, (a, b) in enumerate(figures):
        print(f"[1] run {i + 1}: {n} windows; end-to-end {a:.2f}/s (incl. tissue detection), model alone {b:.2f}/s, "
              f"ratio {a / b:.3f}")
    ratio = float(np.mean([a / b for a, b in figures]))
    print(f"[1] end-to-end / model-alone = {ratio:.3f}  (target >= 0.90)")
    return figures[-1][1]


def rss_child(path: str) -> None:
    """Run in a subprocess: classify ``path`` with a small model, print peak RSS in bytes."""
    import torch

    from napari_bcd.engine import classify
    from napari_bcd.io import open_slide
    from napari_bcd.model import build_classifier

    torch.manual_seed(0)
    model = build_classifier("timm:resnet18", classes=BACH_CLASSES, backbone_weights=None, input_px=(64, 64),
                             field_um=(100.0, 100.0))
    with open_slide(path) as slide:
        cmap = classify(slide, model, batch_size=32)
    print(json.dumps({"rss": vm_hwm(), "windows": cmap.n_windows, "shape": list(slide.dimensions)}))


def vm_hwm() -> int:
    """Peak RSS of this process in bytes.

    VmHWM belongs to the address space, which exec() makes anew; getrusage's
    ru_maxrss survives fork and exec, so a child of this (large) benchmark
    process would report the parent's peak.
    """
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


_CLI_CHILD = (
    "import sys; sys.path.insert(0, {here!r}); from bench_engine import vm_hwm; from napari_bcd.cli import main\n"
    "rc = main(sys.argv[1:]); print('VmHWM', vm_hwm(), file=sys.stderr); sys.exit(rc)"
)


def peak_rss(small: Path, large: Path) -> None:
    out = []
    for p in (small, large):
        res = subprocess.run([sys.executable, __file__, "--rss-child", str(p)], capture_output=True, text=True,
                             check=True)
        out.append(json.loads(res.stdout.strip().splitlines()[-1]))
    a, b = out
    area = (b["shape"][0] * b["shape"][1]) / (a["shape"][0] * a["shape"][1])
    print(f"[2] peak RSS {a['rss'] / MiB:.0f} MiB ({a['windows']} windows, {a['shape'][1]}x{a['shape'][0]} px) vs "
          f"{b['rss'] / MiB:.0f} MiB ({b['windows']} windows, {area:.1f}x the area): "
          f"difference {(b['rss'] - a['rss']) / MiB:+.0f} MiB  (target < 64 MiB)")


def region_reads(path: Path, seconds: float) -> None:
    from napari_bcd.io import open_slide

    rng = np.random.default_rng(0)
    with open_slide(path, cache_mb=0) as slide:
        H, W = slide.dimensions
        n, t0 = 0, time.perf_counter()
        while time.perf_counter() - t0 < seconds:
            ty, tx = rng.integers(0, H // 256), rng.integers(0, W // 256)
            slide.read_region(0, int(ty * 256), int(tx * 256), 256, 256)
            n += 1
        aligned = n / (time.perf_counter() - t0)
    with open_slide(path) as slide:
        n, t0 = 0, time.perf_counter()
        y, x = 0, 0
        while time.perf_counter() - t0 < seconds:  # a sliding window walk, unaligned, 50 % overlap
            slide.read_region(0, y + 37, x + 91, 256, 256)
            x += 128
            if x + 256 >= W - 91:
                x, y = 0, (y + 128) % (H - 400)
            n += 1
        walk = n / (time.perf_counter() - t0)
    print(f"[3] region reads/s on one core, 256 px, JPEG 256-px tiles: {aligned:.0f} tile-aligned (no cache), "
          f"{walk:.0f} overlapping walk (tile cache)  (target >= 2000)")


def classify_cli(model_rate: float, workdir: Path) -> None:
    from napari_bcd.model import save_checkpoint

    ckpt = save_checkpoint(paper_model(), path=workdir / "resnet152v2-128um.safetensors")
    for stride in ("1", "0.5"):
        out = workdir / f"cli-out-{stride}"
        code = _CLI_CHILD.format(here=str(Path(__file__).parent))
        t0 = time.perf_counter()
        res = subprocess.run([sys.executable, "-c", code, "classify", str(SAMPLE), "--model", str(ckpt), "--out",
                              str(out),
                              "--device", "cpu", "--stride", stride], capture_output=True, text=True)
        wall = time.perf_counter() - t0
        if res.returncode:
            raise SystemExit(f"napari-bcd classify failed: {res.stderr[-2000:]}")
        rss = int(next(line.split()[1] for line in res.stderr.splitlines() if line.startswith("VmHWM")))
        summary = json.loads((out / "CMU-1-Small-Region.summary.json").read_text())
        n = summary["windows"]
        alone = n / model_rate
        print(f"[4] napari-bcd classify CMU-1-Small-Region.svs --stride {stride}: {n} windows in {wall:.1f} s wall "
              f"(start-up, tissue, inference, writing); model alone {alone:.1f} s; ratio {alone / wall:.3f}  "
              f"(target >= 0.85); peak RSS {rss / MiB:.0f} MiB  (target <= 1024 MiB)")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rss-child")
    ap.add_argument("--quick", action="store_true", help="smaller slides, shorter timings")
    ap.add_argument("--batch", type=int, default=8)
    args = ap.parse_args()
    if args.rss_child:
        rss_child(args.rss_child)
        return
    import torch

    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {os.cpu_count()} CPUs")
    with tempfile.TemporaryDirectory(prefix="bcd-bench-") as d:
        work = Path(d)
        base = tiled_slide(work / "base.tif", (1, 1))
        rate = end_to_end_vs_model(base, args.batch)
        small = tiled_slide(work / "small.tif", (2, 2))
        large = tiled_slide(work / "large.tif", (6, 7) if not args.quick else (4, 5))
        peak_rss(small, large)
        region_reads(small, 2.0 if args.quick else 5.0)
        classify_cli(rate, work)


if __name__ == "__main__":
    main()
