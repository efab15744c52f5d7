"""Training benchmark: from an ICIAR folder to a trained default model, per stage.

Stages, timed from the generator's own progress items: building the model
(and loading its backbone weights), backbone features of every image and view
(a cold cache, then a warm one), the linear probe, the head's epochs, and
writing the checkpoint + making it the default.  Both protocols run on the same
images: ``auto`` (the default for a user's regions) and ``paper``.  Images are
real H&E crops of the bundled CMU slide, in an ICIAR folder.

    python benchmarks/bench_train.py [--images 24] [--backbone resnet152v2] [--device auto]
"""

from __future__ import annotations

import argparse
import logging
import os
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np

logging.getLogger("napari_bcd").setLevel(logging.ERROR)


def make_dataset(root: Path, n: int) -> Path:
    import tifffile
    from PIL import Image

    src = tifffile.imread(Path(__file__).parents[1] / "src" / "napari_bcd" / "data" / "CMU-1-Small-Region.svs")
    rng = np.random.default_rng(0)
    rows = []
    for k in range(n):
        cls = ("Normal", "Benign", "InSitu", "Invasive")[k % 4]
        (root / cls).mkdir(parents=True, exist_ok=True)
        y, x = rng.integers(0, src.shape[0] - 768), rng.integers(800, src.shape[1] - 1024)
        name = f"img{k:03d}.png"
        Image.fromarray(src[y : y + 768, x : x + 1024]).save(root / cls / name)
        rows.append(f"{name},{cls}")
    (root / "microscopy_ground_truth.csv").write_text("\n".join(rows) + "\n")
    return root


def timed_run(ds, out: Path, **kw) -> dict:
    """Run iter_finetune, stamping each progress item; return the stage times and the result."""
    from napari_bcd.config import set_default_model
    from napari_bcd.train import EpochStats, FeatureProgress, TrainPlan, iter_finetune

    stamps: dict[str, float] = {}
    t0 = time.perf_counter()
    gen = iter_finetune(ds, out=out, **kw)
    epochs = 0
    while True:
        try:
            item = next(gen)
        except StopIteration as stop:
            result = stop.value
            break
        now = time.perf_counter()
        if isinstance(item, TrainPlan):
            stamps["plan"] = now
        elif isinstance(item, FeatureProgress):
            stamps.setdefault("features_start", now)
            stamps["features_end"] = now
        elif isinstance(item, EpochStats):
            stamps.setdefault("head_start", now)
            stamps["head_end"] = now
            epochs += 1
    stamps["saved"] = time.perf_counter()
    set_default_model(result.checkpoint)
    stamps["default"] = time.perf_counter()
    probe = result.probe.seconds if result.probe else 0.0
    return {
        "build": stamps["features_start"] - stamps["plan"],
        "features": stamps["features_end"] - stamps["features_start"],
        "probe": probe,
        "head": stamps["head_end"] - stamps["head_start"] + (stamps["head_start"] - stamps["features_end"] - probe),
        "save": stamps["default"] - stamps["head_end"],
        "total": stamps["default"] - t0,
        "epochs": result.epochs_run, "steps": result.steps_run, "result": result,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--images", type=int, default=24)
    ap.add_argument("--backbone", default="resnet152v2")
    ap.add_argument("--input-px", type=int, default=256)
    ap.add_argument("--device", default="auto")
    args = ap.parse_args()
    import torch

    from napari_bcd.model.imagenet import cached_imagenet_weights as _cached
    from napari_bcd.model.inference import choose_device
    from napari_bcd.train import read_iciar

    cached_imagenet_weights_path = _cached()
    with tempfile.TemporaryDirectory(prefix="bcd-train-") as d:
        imagenet = args.backbone == "resnet152v2" and cached_imagenet_weights_path is not None
        os.environ["NAPARI_BCD_CACHE_DIR"] = str(Path(d) / "cache")  # a cold feature cache
        os.environ["NAPARI_BCD_CONFIG_DIR"] = str(Path(d) / "config")
        ds = read_iciar(make_dataset(Path(d) / "iciar", args.images))
        weights = None
        if imagenet:  # the cached ImageNet weights, linked into the benchmark's cold cache
            from napari_bcd.model.imagenet import CACHE_NAME

            (Path(d) / "cache").mkdir()
            os.symlink(cached_imagenet_weights_path, Path(d) / "cache" / CACHE_NAME)
            weights = "imagenet"
        common = {"backbone": args.backbone, "backbone_weights": weights, "device": args.device,
                  "input_px": (args.input_px, args.input_px)}
        print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, device {choose_device(args.device)}; "
              f"backbone {args.backbone} ({weights or 'random weights'}) at {args.input_px} px; {len(ds)} images "
              "(an ICIAR folder)")
        print(f"{'run':<22} {'build':>7} {'features':>9} {'probe':>7} {'head':>8} {'save+default':>13} {'total':>8}"
              f"  epochs/steps   head acc / probe acc")
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            for name, kw in (("auto, cold cache", {"protocol": "auto"}),
                             ("auto, warm cache", {"protocol": "auto"}),
                             ("paper, warm cache", {"protocol": "paper"})):
                r = timed_run(ds, Path(d) / f"{name.split(',')[0]}.safetensors", **common, **kw)
                res = r["result"]
                acc = f"{res.report.accuracy:.3f} / {res.probe.report.accuracy:.3f}" if res.report else "no validation"
                print(f"{name:<22} {r['build']:>6.2f}s {r['features']:>8.2f}s {r['probe']:>6.2f}s {r['head']:>7.2f}s "
                      f"{r['save']:>12.2f}s {r['total']:>7.2f}s  {r['epochs']:>4}/{r['steps']:<5}      {acc}")
        n_feat = len(ds) * 8
        print(f"features: {n_feat} backbone inputs (8 views per image) in the cold run")


if __name__ == "__main__":
    main()
