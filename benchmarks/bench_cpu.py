"""The CPU paths, measured in one sitting: model alone per number format, agreement on real H&E, whole runs.

1. Model alone (ResNet152V2 + the Table II head, 256 px): fp32; bf16 autocast without and with
   channels_last; int8 (PyTorch's x86 FX quantisation); batch sizes and thread counts for the fast path.
2. Agreement with fp32 on real H&E windows (the tiles in ``tests/data``): label agreement and the largest
   probability change, for ResNet152V2 and, where ``../shared`` has it, the real trained DenseNet121 backbone;
   int8 calibrated on a run's check windows (``CHECK_WINDOWS``) as a run is, and its agreement on the windows
   it did not see.
3. Adaptive overlap (``--refine``) against full overlap at stride 0.25 (75 %), on the bundled slide and on a
   2 x 2 pyramid of it: windows used and cells equal (real features: the trained DenseNet121 where present).
4. The fixed start of a classify run: process start to its first batch of windows (Python, imports,
   checkpoint, slide, tissue, stain), fp32 and auto, the median of three, and what the
   ``torch`` import alone takes of it.
5. The whole ``napari-bcd classify`` run of the bundled slide at stride 0.5, default settings against
   ``--precision fp32 --batch-size 4`` (the old CPU default), and each run's time outside the windows
   (start: Python, imports, checkpoint, tissue; and writing), the batch size chosen by timing, auto's int8
   trial and, with ``--long``, the same at stride 0.25 (about 700 windows).

    python benchmarks/bench_cpu.py [--seconds 8] [--json cpu.json] [--skip-cli] [--skip-model-alone]
        [--skip-agreement] [--skip-refine] [--skip-start] [--small] [--long]

Weights do not change the speed; the head is spread (normal, std 0.5) so the classes differ and the
agreement figures mean something.  Ratios are measured in one run: the machine is noisy.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np
import torch

from napari_bcd.classes import BACH_CLASSES

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT / "tests" / "data"
SLIDE = ROOT / "src" / "napari_bcd" / "data" / "CMU-1-Small-Region.svs"
CAPRICORN = ROOT.parent / "shared" / "data" / "weights" / "capricorn-densenet121.safetensors"

logging.getLogger("napari_bcd").setLevel(logging.ERROR)


def he_windows(px: int = 256) -> np.ndarray:
    """Every non-overlapping ``px`` square of the real H&E tiles in tests/data."""
    from PIL import Image

    out = []
    for p in sorted(DATA.glob("*.png")) + sorted(DATA.glob("*.jpg")):
        a = np.asarray(Image.open(p).convert("RGB"))
        for y in range(0, a.shape[0] - px + 1, px):
            for x in range(0, a.shape[1] - px + 1, px):
                out.append(a[y : y + px, x : x + px])
    return np.stack(out)


def spread_head(model, windows: np.ndarray, seed: int = 0, logit_std: float = 2.0):
    """A random head whose logits on ``windows`` spread by about ``logit_std``: probabilities neither saturated
    (where no format could change them) nor all equal."""
    torch.manual_seed(seed)
    for p in model.head.parameters():
        torch.nn.init.normal_(p, std=0.05)
    model.eval()
    with torch.inference_mode():
        logits = model.forward_uint8(torch.from_numpy(windows[:16]))
    last = [m for m in model.head.modules() if isinstance(m, torch.nn.Linear)][-1]
    scale = logit_std / max(float(logits.std()), 1e-6)
    with torch.no_grad():
        last.weight.mul_(scale)
        last.bias.mul_(scale)
    return model


def paper_model(windows: np.ndarray):
    """ResNet152V2 + the Table II head with a 128 µm field (as the issue's whole-run figure)."""
    from napari_bcd.model import build_classifier

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return spread_head(build_classifier("resnet152v2", classes=BACH_CLASSES, backbone_weights=None,
                                            field_um=(128.0, 128.0)), windows)


def rate(pred, x: np.ndarray, seconds: float) -> float:
    pred(x)  # warm-up (and the int8 quantisation / the precision check)
    n, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds or n == 0:
        pred(x)
        n += len(x)
    return n / (time.perf_counter() - t0)


def predictor(model, precision: str, channels_last: bool = True, calibration: np.ndarray | None = None):
    from napari_bcd.model.inference import Predictor

    p = Predictor(model, device="cpu", precision=precision, tolerance=1.0)
    p.begin_run(batch_size=1)  # every batch as given: no batch timing here
    if precision == "bf16" and not channels_last:
        p.model.to(memory_format=torch.contiguous_format)
        p._memory_format = torch.contiguous_format
    if calibration is not None:  # quantise on real windows, not on the timing batch
        p(calibration)
    return p


def model_alone(model, seconds: float, windows: np.ndarray) -> dict:
    rng = np.random.default_rng(0)
    fig: dict = {}

    def batch(n):
        return windows[rng.choice(len(windows), n)]

    fig["fp32_b4"] = rate(predictor(model, "fp32"), batch(4), seconds)
    fig["fp32_b16"] = rate(predictor(model, "fp32"), batch(16), seconds)
    fig["bf16_b16"] = rate(predictor(model, "bf16", channels_last=False), batch(16), seconds)
    for b in (4, 8, 16, 32):
        fig[f"bf16_channels_last_b{b}"] = rate(predictor(model, "bf16"), batch(b), seconds)
    threads = torch.get_num_threads()
    if threads > 1:
        torch.set_num_threads(1)
        fig["bf16_channels_last_b16_1_thread"] = rate(predictor(model, "bf16"), batch(16), seconds)
        torch.set_num_threads(threads)
    t0 = time.perf_counter()
    q = predictor(model, "int8", calibration=batch(16))
    fig["int8_quantise_s"] = round(time.perf_counter() - t0, 1)
    fig["int8_b16"] = rate(q, batch(16), seconds)
    predictor(model, "fp32")  # leave the model contiguous
    return {k: round(v, 2) for k, v in fig.items()}


def agreement_on(model, windows: np.ndarray) -> dict:
    """bf16 and int8 against fp32; int8 calibrated on the first ``CHECK_WINDOWS`` windows as a run does (its
    check windows), and its agreement on the windows it never saw given apart."""
    from napari_bcd.model.inference import CHECK_WINDOWS
    from napari_bcd.model.precision import agreement

    exact = predictor(model, "fp32")(windows)
    out = {"windows": len(windows)}

    def figures(a, b):
        same, change = agreement(a, b)
        return {"label_agreement": round(same, 4), "max_change": round(change, 4),
                "median_change": round(float(np.median(np.abs(a - b).max(1))), 5)}

    for fmt in ("bf16", "int8"):
        p = predictor(model, fmt, calibration=windows[:CHECK_WINDOWS] if fmt == "int8" else None)
        fast = np.concatenate([p(windows[i : i + 16]) for i in range(0, len(windows), 16)])
        out[fmt] = figures(exact, fast)
        if fmt == "int8":
            out["int8_unseen"] = {"windows": len(windows) - CHECK_WINDOWS,
                                  **figures(exact[CHECK_WINDOWS:], fast[CHECK_WINDOWS:])}
    predictor(model, "fp32")
    return out


def saved_checkpoint(work: Path, model) -> Path:
    """``model`` saved in ``work`` (once), dated a minute back as a user's checkpoint is: one verified within
    2 s of being written is hashed again at the next start (``config.remember_weights``)."""
    from napari_bcd.model import save_checkpoint

    work.mkdir(parents=True, exist_ok=True)
    ckpt = work / "paper.safetensors"
    if not ckpt.is_file():
        save_checkpoint(model, path=ckpt)
        past = time.time() - 60
        os.utime(ckpt, (past, past))
    return ckpt


def cli_runs(work: Path, model, stride: float = 0.5) -> dict:
    ckpt = saved_checkpoint(work, model)
    ckpt.read_bytes()  # in the page cache for both runs: the first must not pay a cold read the second does not
    out: dict = {}
    for name, extra in (("default", []), ("fp32_batch4", ["--precision", "fp32", "--batch-size", "4"])):
        t0 = time.perf_counter()
        subprocess.run([sys.executable, "-m", "napari_bcd.cli", "classify", str(SLIDE), "--model", str(ckpt),
                        "--stride", str(stride), "--out", str(work / name), *extra], check=True, capture_output=True)
        wall = time.perf_counter() - t0
        info = json.loads((work / name / f"{SLIDE.stem}.summary.json").read_text())["info"]
        out[name] = {"wall_s": round(wall, 2), "classify_s": info["seconds"], "windows": info["windows"],
                     "windows_per_s": info["windows_per_s"], "precision": info["precision"],
                     "start_and_writing_s": round(wall - info["seconds"], 2), "check": info.get("precision_check"),
                     "batching": info.get("batching"), "int8_trial": info.get("int8_trial")}
    out["speedup"] = round(out["fp32_batch4"]["wall_s"] / out["default"]["wall_s"], 2)
    import tifffile

    la = tifffile.imread(work / "default" / f"{SLIDE.stem}.labels.tif")
    lb = tifffile.imread(work / "fp32_batch4" / f"{SLIDE.stem}.labels.tif")
    out["label_pixels_equal"] = round(float((la == lb).mean()), 5)
    return out


def start_figures(work: Path, model, repeats: int = 3) -> dict:
    """Process start to the first batch of a classify run of the bundled slide, median of ``repeats``.

    One run first, not counted: it verifies the new checkpoint (hashed once, then trusted while unchanged),
    as a user's first run of a model does, and brings the files into the page cache."""
    ckpt = saved_checkpoint(work, model)
    harness = Path(__file__).parent / "_start.py"
    out: dict = {}
    for precision in ("fp32", "auto"):
        runs = []
        for i in range(repeats + 1):
            done = subprocess.run([sys.executable, str(harness), "classify", str(SLIDE), "--model", str(ckpt),
                                   "--precision", precision, "--out", str(work / f"{precision}{i}")],
                                  check=True, capture_output=True, text=True)
            runs.append(float(done.stdout.split("START")[-1]))
        out[precision] = {"median_s": round(float(np.median(runs[1:])), 2), "runs_s": runs[1:], "first_s": runs[0]}
    took = []
    for _ in range(repeats):
        done = subprocess.run([sys.executable, "-c", "import time; t = time.perf_counter(); import torch; "
                               "print(time.perf_counter() - t)"], check=True, capture_output=True, text=True)
        took.append(float(done.stdout))
    out["import_torch_s"] = round(float(np.median(took)), 2)
    return out


def trained_model(tmp: Path):
    """The real DenseNet121 backbone with the Table II head trained (default protocol) on crops of the real
    H&E tiles in tests/data, four sources standing in for the four classes (tests/conftest.py's dataset)."""
    sys.path.insert(0, str(ROOT / "tests"))
    from conftest import four_kinds_dataset
    from napari_bcd.model.checkpoint import load_checkpoint
    from napari_bcd.train.finetune import iter_finetune
    from napari_bcd.train.iciar import read_iciar

    ds = read_iciar(four_kinds_dataset(tmp / "ds", n=16, px=128))
    gen = iter_finetune(ds, out=tmp / "dn.safetensors", backbone="timm:densenet121",
                        backbone_weights=str(CAPRICORN), input_px=(128, 128), field_um=(128.0, 128.0))
    while True:
        try:
            next(gen)
        except StopIteration as stop:
            return load_checkpoint(stop.value.checkpoint)


def refine_figures(model, slide_path: Path, stride: float = 0.25) -> dict:
    """Adaptive overlap against full overlap at ``stride``: windows used, cells equal, seconds."""
    from napari_bcd import open_slide
    from napari_bcd.engine import iter_classify

    def run(**kw):
        t0 = time.perf_counter()
        with open_slide(slide_path) as slide:
            gen = iter_classify(slide, model, stride=stride, **kw)
            while True:
                try:
                    next(gen)
                except StopIteration as stop:
                    return stop.value, time.perf_counter() - t0

    full, full_s = run()
    adaptive, adaptive_s = run(refine=True)
    mapped = full.labels > 0
    return {"slide": slide_path.name, "stride": stride, "full_windows": int(full.info["windows"]),
            "refine_windows": int(adaptive.info["windows"]),
            "windows_share": round(adaptive.info["windows"] / max(full.info["windows"], 1), 3),
            "cells_equal": round(float((adaptive.labels == full.labels)[mapped].mean()), 4),
            "cells": int(mapped.sum()), "full_s": round(full_s, 1), "refine_s": round(adaptive_s, 1)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seconds", type=float, default=8.0)
    ap.add_argument("--json", type=Path)
    ap.add_argument("--skip-cli", action="store_true")
    ap.add_argument("--skip-model-alone", action="store_true")
    ap.add_argument("--skip-refine", action="store_true")
    ap.add_argument("--skip-agreement", action="store_true")
    ap.add_argument("--skip-start", action="store_true")
    ap.add_argument("--small", action="store_true", help="adaptive overlap on the bundled slide only")
    ap.add_argument("--long", action="store_true",
                    help="also the whole CLI run at stride 0.25 (about 700 windows)")
    args = ap.parse_args()
    from napari_bcd.model.precision import cpu_features

    figs: dict = {"torch": torch.__version__, "threads": torch.get_num_threads(), "cpu": cpu_features()}
    print(f"torch {figs['torch']}, {figs['threads']} threads, {figs['cpu']}")
    windows = he_windows()
    model = paper_model(windows)
    if not args.skip_model_alone:
        figs["model_alone_windows_per_s"] = model_alone(model, args.seconds, windows)
        for k, v in figs["model_alone_windows_per_s"].items():
            print(f"  model alone {k:34s} {v:8.2f}")
    if not args.skip_agreement:
        figs["agreement_resnet152v2"] = agreement_on(model, windows)
        print(f"  agreement ResNet152V2 on {len(windows)} real H&E windows: {figs['agreement_resnet152v2']}")
    if CAPRICORN.is_file() and not args.skip_agreement:
        from napari_bcd.model import build_classifier

        dn = spread_head(build_classifier("timm:densenet121", classes=BACH_CLASSES, backbone_weights=str(CAPRICORN)),
                         windows)
        figs["agreement_densenet121_trained"] = agreement_on(dn, windows)
        print(f"  agreement trained DenseNet121: {figs['agreement_densenet121_trained']}")
    if CAPRICORN.is_file() and not args.skip_refine:
        sys.path.insert(0, str(Path(__file__).parent))
        from _slides import tiled_slide

        with tempfile.TemporaryDirectory() as tmp:
            # a map with real structure: the trained DenseNet121 and a head trained on real H&E (128 µm at 128 px)
            dn = trained_model(Path(tmp))
            figs["refine"] = [refine_figures(dn, SLIDE)]
            print(f"  refine: {figs['refine'][0]}")
            if not args.small:
                big = tiled_slide(Path(tmp) / "pyramid.tif", (2, 2))
                figs["refine"].append(refine_figures(dn, big))
                print(f"  refine: {figs['refine'][1]}")
    if not args.skip_start:
        with tempfile.TemporaryDirectory() as tmp:
            figs["start"] = start_figures(Path(tmp), model)
            print(f"  start of a classify run (to its first batch): {figs['start']}")
    if not args.skip_cli:
        with tempfile.TemporaryDirectory() as tmp:
            figs["cli_stride_0.5"] = cli_runs(Path(tmp), model)
            print(f"  whole CLI run, stride 0.5: {figs['cli_stride_0.5']}")
            if args.long:  # four times the windows: the trial's cost spread over more
                figs["cli_stride_0.25"] = cli_runs(Path(tmp) / "long", model, stride=0.25)
                print(f"  whole CLI run, stride 0.25: {figs['cli_stride_0.25']}")
    if args.json:
        args.json.write_text(json.dumps(figs, indent=2))


if __name__ == "__main__":
    main()
