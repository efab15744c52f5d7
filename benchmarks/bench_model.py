"""Throughput of the whole classifier (ResNet152V2 + Table II head) at 256 x 256.

Prints inputs/s on the CPU in fp32 and, when CUDA is present, in eager bf16 and
with torch.compile.  Targets (issue 2): >= 3/s on 2 CPU cores; >= 4,500/s eager
bf16 and >= 10,000/s compiled on one H100.

    python benchmarks/bench_model.py [--seconds 20] [--batch 8] [--cuda-batch 256]
"""

from __future__ import annotations

import argparse
import logging
import time
import warnings

import numpy as np
import torch

from napari_bcd.classes import BACH_CLASSES
from napari_bcd.model import Predictor, build_classifier

logging.getLogger("napari_bcd").setLevel(logging.ERROR)  # the no-ImageNet warning is expected here


def measure(pred: Predictor, batch: int, seconds: float, px: int = 256) -> tuple[float, int]:
    x = np.random.default_rng(0).integers(0, 256, (batch, px, px, 3), dtype=np.uint8)
    xt = torch.from_numpy(x)
    if pred.device.type == "cuda":
        xt = xt.pin_memory()
    for _ in range(2):  # warm-up (and compilation)
        pred(xt)
    if pred.device.type == "cuda":
        torch.cuda.synchronize()
    n, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds or n == 0:
        pred(xt)  # returns numpy, so each call is synchronised
        n += batch
    return n / (time.perf_counter() - t0), n


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seconds", type=float, default=20.0)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--cuda-batch", type=int, default=256)
    ap.add_argument("--no-cpu", action="store_true")
    args = ap.parse_args()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = build_classifier("resnet152v2", classes=BACH_CLASSES)  # weights do not change the speed
    print(f"torch {torch.__version__}, {torch.get_num_threads()} CPU threads")
    if not args.no_cpu:
        rate, n = measure(Predictor(model, device="cpu", precision="fp32"), args.batch, args.seconds)
        gflop = 2 * 15.0  # ~15 GMAC per 256-px input (ResNet152V2), 2 FLOP per MAC
        print(f"cpu fp32        batch {args.batch:4d}: {rate:8.2f} inputs/s ({n} inputs, ~{rate * gflop:.0f} GFLOP/s) "
              " target >= 3")
    if torch.cuda.is_available():
        name = torch.cuda.get_device_name()
        torch.backends.cudnn.benchmark = True
        rate, n = measure(Predictor(model, device="cuda", precision="bf16"), args.cuda_batch, args.seconds)
        print(f"cuda bf16 eager batch {args.cuda_batch:4d}: {rate:8.0f} inputs/s on {name}  target >= 4500 (H100)")
        rate, n = measure(Predictor(model, device="cuda", precision="bf16", compile=True), args.cuda_batch,
                          args.seconds)
        print(f"cuda bf16 compiled batch {args.cuda_batch:4d}: {rate:8.0f} inputs/s on {name}  target >= 10000 (H100)")
    else:
        print("cuda: not available on this machine")


if __name__ == "__main__":
    main()
