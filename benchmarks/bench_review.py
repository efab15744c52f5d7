"""Review-loop benchmark: the time from "Retrain" to the updated class map, per stage, on the real CMU slide.

For each setting: classify the bundled slide, repaint a block of cells to
another class (as the dock's brush would), then time iter_retrain from the
call to the re-predicted map (features of the corrected windows in 8 views
and of the region's windows, head training, re-prediction).  Also: the
engine's cost of the window quality score (quality on / off, same run).

    python benchmarks/bench_review.py [--backbone resnet152v2] [--device auto] [--steps 300]

Without ImageNet weights here the backbone is random: the timings are those of
the real network's size.
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
SLIDE = Path(__file__).parents[1] / "src" / "napari_bcd" / "data" / "CMU-1-Small-Region.svs"


def block_edit(cm, size: int):
    from napari_bcd.export import cells_to_image

    raster, k = cells_to_image(cm, cm.labels)
    cov = cm.labels > 0
    blocks = [(r, c) for r, c in np.argwhere(cov) if cov[r : r + size, c : c + size].all()]
    r, c = blocks[len(blocks) // 2]
    target = 1 + int(cm.labels[r, c]) % len(cm.classes)
    g = cm.grid
    raster[int(np.ceil(r * g.stride_px[0] / k)) : int((r + size) * g.stride_px[0] / k),
           int(np.ceil(c * g.stride_px[1] / k)) : int((c + size) * g.stride_px[1] / k)] = target
    return raster


def run(backbone: str, field_um: float | None, input_px: int, block: int, device: str, steps: int, tmp: Path) -> None:
    import torch

    from napari_bcd import classify, open_slide
    from napari_bcd.model import build_classifier, save_checkpoint
    from napari_bcd.review import corrections_from_labels, iter_retrain

    torch.manual_seed(0)
    kw = {"field_um": (field_um, field_um)} if field_um else {}
    model = build_classifier(backbone, classes=BACH_CLASSES, backbone_weights=None, input_px=(input_px, input_px), **kw)
    for p in model.head.parameters():
        torch.nn.init.normal_(p, std=0.3)
    ckpt = save_checkpoint(model.eval(), path=tmp / f"{backbone.replace(':', '_')}-{field_um}.safetensors")
    with open_slide(SLIDE) as slide:
        t = time.perf_counter()
        cm = classify(slide, model, device=device)
        t_classify = time.perf_counter() - t
        corr = corrections_from_labels(cm, block_edit(cm, block))
        t0 = time.perf_counter()
        stages: dict[str, float] = {}
        last, stage = t0, None
        gen = iter_retrain(ckpt, corr, slide, class_map=cm, device=device, steps=steps)
        try:
            while True:
                item = next(gen)
                s = getattr(item, "stage", "plan")
                if s != stage:
                    now = time.perf_counter()
                    if stage is not None:
                        stages[stage] = stages.get(stage, 0.0) + now - last
                    stage, last = s, now
        except StopIteration as stop:
            res = stop.value
        now = time.perf_counter()
        stages[stage] = stages.get(stage, 0.0) + now - last
        total = now - t0
    field = f"{cm.grid.window_px[0] * cm.grid.mpp[0]:.0f} µm"
    print(f"\n{backbone} {input_px} px, field {field}: {cm.n_windows} windows on a {cm.grid.n_cells[0]}x"
          f"{cm.grid.n_cells[1]} map, classified in {t_classify:.1f} s")
    print(f"  {len(corr)} corrected cell(s); Retrain -> updated map: {total:.1f} s  ("
          + ", ".join(f"{k} {v:.1f} s" for k, v in stages.items()) + ")")
    print(f"  corrections learnt {res.corrected_before:.0%} -> {res.corrected_after:.0%}, anchors kept "
          f"{res.anchors_kept:.0%}, {res.changed_cells} cell(s) changed")


def quality_cost(device: str) -> None:
    import torch

    from napari_bcd import classify, open_slide
    from napari_bcd.model import build_classifier

    torch.manual_seed(0)
    model = build_classifier("timm:resnet18", classes=BACH_CLASSES, backbone_weights=None, input_px=(64, 64),
                             field_um=(100.0, 100.0))
    with open_slide(SLIDE) as slide:
        classify(slide, model, device=device)  # warm: thumbnail, threads
        times = {}
        for q in (False, True, False, True):
            t = time.perf_counter()
            cm = classify(slide, model, device=device, quality=q)
            times.setdefault(q, []).append(time.perf_counter() - t)
    off, on = min(times[False]), min(times[True])
    print(f"\nquality score: {cm.n_windows} windows (resnet18, 64 px, 100 µm): {off:.2f} s without, {on:.2f} s with "
          f"(ratio {on / off:.2f})")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--backbone", default="resnet152v2")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--steps", type=int, default=300)
    args = ap.parse_args()
    warnings.filterwarnings("ignore")
    import torch

    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, device {args.device}")
    with tempfile.TemporaryDirectory() as d:
        run(args.backbone, None, 256, 1, args.device, args.steps, Path(d))  # the paper's field (ICIAR photo)
        run(args.backbone, 200.0, 256, 2, args.device, args.steps, Path(d))  # a finer map
    quality_cost(args.device)


if __name__ == "__main__":
    main()
