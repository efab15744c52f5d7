"""Training benchmark (issue 6): the cost of epoch 1 against later epochs, and head samples/s.

Epoch 1 includes computing the backbone features of every image and its
eight flips/rotations (cached afterwards); later epochs train only the
Table II head on cached features.  Target: later epochs <= 10 % of the first.
Images are real H&E crops of the bundled CMU slide, in an ICIAR folder.

    python benchmarks/bench_train.py [--images 24] [--backbone resnet152v2] [--epochs 5]
"""

from __future__ import annotations

import argparse
import logging
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


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--images", type=int, default=24)
    ap.add_argument("--epochs", type=int, default=5)
    ap.add_argument("--backbone", default="resnet152v2")
    ap.add_argument("--device", default="auto")
    args = ap.parse_args()
    import torch

    from napari_bcd.train import iter_finetune, read_iciar
    from napari_bcd.train.finetune import EpochStats, FeatureProgress

    with tempfile.TemporaryDirectory(prefix="bcd-train-") as d:
        import os

        os.environ["NAPARI_BCD_CACHE_DIR"] = str(Path(d) / "cache")  # a cold feature cache
        ds = read_iciar(make_dataset(Path(d) / "iciar", args.images))
        weights = None if args.backbone != "resnet152v2" else "imagenet"
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            gen = iter_finetune(ds, out=Path(d) / "m.safetensors", backbone=args.backbone, backbone_weights=weights,
                                epochs=args.epochs, batch_size=128, device=args.device)
            t0 = time.perf_counter()
            feature_s = None
            epochs: list[EpochStats] = []
            for item in gen:
                if isinstance(item, FeatureProgress) and item.done == item.total and feature_s is None and item.total:
                    feature_s = time.perf_counter() - t0
                if isinstance(item, EpochStats):
                    epochs.append(item)
        n_train = round(len(ds) * 0.8) * 8
        first = (feature_s or 0.0) + epochs[0].seconds
        later = float(np.mean([e.seconds for e in epochs[1:]])) if len(epochs) > 1 else float("nan")
        print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; backbone {args.backbone}; "
              f"{len(ds)} images x 8 flips/rotations")
        print(f"epoch 1: {first:.2f} s (backbone features {feature_s:.2f} s + head {epochs[0].seconds:.3f} s)")
        print(f"later epochs: {later:.4f} s each = {100 * later / first:.3f} % of epoch 1  (target <= 10 %)")
        print(f"head training: {n_train / later:,.0f} samples/s on cached features")


if __name__ == "__main__":
    main()
