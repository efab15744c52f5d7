"""Cohort benchmark: slides per minute in one process, and on a Dask LocalCluster of 1 and 2 worker processes.

The cohort is N pyramids cut from the bundled CMU slide (0.5 µm/px, JPEG
tiles); the model a small timm network (``--backbone``) with random weights,
so the figures show the cohort machinery (task scheduling, model loading
once per worker, reading, writing) more than the network.  Each setting
writes into a fresh folder; the cluster figures include starting the cluster.

    python benchmarks/bench_cohort.py [--slides 8] [--backbone timm:resnet18] [--stride 0.5]
"""

from __future__ import annotations

import argparse
import logging
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np

from napari_bcd.classes import BACH_CLASSES

logging.getLogger("napari_bcd").setLevel(logging.ERROR)
logging.getLogger("distributed").setLevel(logging.ERROR)
SLIDE = Path(__file__).parents[1] / "src" / "napari_bcd" / "data" / "CMU-1-Small-Region.svs"


def make_cohort(d: Path, n: int) -> list[Path]:
    import tifffile

    src = tifffile.imread(SLIDE)
    paths = []
    for k in range(n):
        y, x = (150 * k) % 1300, (100 * k) % 600
        img = np.ascontiguousarray(src[y : y + 1600, x : x + 1600])
        p = d / f"case{k:02d}.tif"
        with tifffile.TiffWriter(p) as tw:
            lvl = img
            for i in range(2):
                tw.write(lvl, tile=(256, 256), compression="jpeg", photometric="rgb", subfiletype=1 if i else 0,
                         resolution=(1e4 / (0.5 * 2**i), 1e4 / (0.5 * 2**i)), resolutionunit="CENTIMETER")
                lvl = lvl[::2, ::2].copy()
        paths.append(p)
    return paths


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--slides", type=int, default=8)
    ap.add_argument("--backbone", default="timm:resnet18")
    ap.add_argument("--stride", type=float, default=0.5)
    args = ap.parse_args()
    warnings.filterwarnings("ignore")
    import torch
    from distributed import Client, LocalCluster

    from napari_bcd.cohort import collect_slides, iter_cohort
    from napari_bcd.model import build_classifier, save_checkpoint
    from napari_bcd.settings import ClassifySettings

    with tempfile.TemporaryDirectory() as tmp:
        d = Path(tmp)
        make_cohort(d, args.slides)
        torch.manual_seed(0)
        model = build_classifier(args, classes=BACH_CLASSES.backbone, backbone_weights=None, input_px=(128, 128),
                                 field_um=(200.0, 200.0))
        ckpt = save_checkpoint(model, path=d / "m.safetensors")
        items = collect_slides([str(d)])
        settings = ClassifySettings(stride=args.stride)
        print(f"{len(items)} slides of 1600 x 1600 px, {args.backbone} 128 px / 200 µm, stride {args.stride}, "
              f"torch threads {torch.get_num_threads()}")
        t = time.perf_counter()
        rows = [r.row() for r in iter_cohort(items, d / "single", str(ckpt), settings)]
        dt = time.perf_counter() - t
        print(f"  one process:        {dt:6.1f} s  {len(rows) / dt * 60:6.1f} slides/min "
              f"({sum(r.get('windows', 0) for r in rows)} windows)")
        for n in (1, 2):
            t = time.perf_counter()
            with LocalCluster(n_workers=n, threads_per_worker=1, processes=True, dashboard_address=":0") as lc, \
                    Client(lc) as client:
                t_up = time.perf_counter() - t
                rows = [r.row() for r in iter_cohort(items, d / f"cluster{n}", str(ckpt), settings, client=client)]
            dt = time.perf_counter() - t
            print(f"  LocalCluster({n}):    {dt:6.1f} s  {len(rows) / dt * 60:6.1f} slides/min "
                  f"(cluster start {t_up:.1f} s; statuses {sorted({r['status'] for r in rows})})")
        t = time.perf_counter()
        rows = [r.row() for r in iter_cohort(items, d / "single", str(ckpt), settings)]
        print(f"  resumed, all done:  {time.perf_counter() - t:6.2f} s  "
              f"({[r['status'] for r in rows].count('skipped')} "
              "skipped)")


if __name__ == "__main__":
    main()
