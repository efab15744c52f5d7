"""Which rule for choosing the probe's ``C`` holds across many worlds, when no patient is known?

    python benchmarks/bench_c_rules.py [--seeds 2] [--sizes 5 20] [--json out.json]

``bench_generalise.py`` measures the shipped training on one simulated world, whose best ``C`` is weak (0.3-3),
where issue 37's real held-out breast photos had the strongest tried (0.001) best.  One world cannot say whether
a rule is robust, so this builds many, on the real geometry of a trained H&E backbone's features: the real
DenseNet121 (``../shared/data/weights``) on ~1,100 real H&E crops (the bundled slide and tiles, each seen through
its own stain), and each world's images are ``mean + class direction x s + patient offset x p + photo x 0.5``, the
offsets and photos real crops' deviations from the mean.  Worlds vary:

* where the classes differ: along a real crop's deviation (``crop``), in the 10 leading principal directions,
  where tissue varies most (``top``), or in minor ones (``minor``, principal directions 50-250);
* how strongly (``s``), how far patients differ (``p``), photos per patient, images per class;
* whether the new patients come from the same tissue as the training ones (``same``) or another (``shift``: the
  training patients' offsets from the slide's crops, the new ones' from the other tiles', a new hospital).

In each, the probe's grid is measured by the package's own ``tune_c`` on folds over images (no groups: the common
case), and every rule picks its ``C`` from that curve (``regularise.choose_c`` for the shipped one); the rule is
scored by the logistic regression at that ``C`` on 120 new patients, against the best ``C`` on them (the oracle).
It prints each rule's loss against the oracle (mean, 90th percentile, worst over worlds) and per family; the
grouped rule (folds over the true patients) is given for reference, and so is a model with no ``C`` at all: a
linear discriminant with Ledoit-Wolf shrinkage in the probe's place (below zero where it beats the best ``C``).
A feature-space model: it measures the rules, not breast histology, and no world here reproduces how badly
image-level validation misled on the real photos (C = 1 lost 0.056 there), so it says which rule is *robust*, not
which is right for real data: that is ``bench_generalise.py --data`` on real patients.
"""

from __future__ import annotations

import argparse
import itertools
import json
import logging
import os
import sys
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

KINDS = ("crop", "top", "minor")
CLASSES = 4
PHOTO = 0.5


def crop_features(work: Path, weights: str | None, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """``(features, source)`` of real H&E crops: the bundled slide (source 0) and tiles (1...), each crop twice
    through its own stain (HED x0.75-1.25), by the real backbone through the package's own feature code."""
    import tifffile
    from bench_generalise import Features, _sources
    from PIL import Image
    from skimage.color import hed2rgb, rgb2hed

    from napari_bcd.train import read_iciar

    cmu = tifffile.imread(ROOT / "src" / "napari_bcd" / "data" / "CMU-1-Small-Region.svs")
    images = [cmu] + [im for name, ims in _sources().items() if name in ("InSitu", "Invasive") for im in ims]
    rng = np.random.default_rng(seed)
    rows, source = [], []
    for d in ("a", "b"):
        (work / d).mkdir(parents=True, exist_ok=True)
    for k, img in enumerate(images):
        side = 256 if min(img.shape[:2]) > 600 else 128
        for y, x in itertools.product(range(0, img.shape[0] - side + 1, side // 3),
                                      range(0, img.shape[1] - side + 1, side // 3)):
            crop = img[y : y + side, x : x + side]
            if (crop.mean(-1) < 215).mean() < 0.5:  # glass
                continue
            for _ in range(2):
                a, b = rng.uniform(0.75, 1.25, 3), rng.uniform(-0.04, 0.04, 3)
                rgb = np.clip(np.round(hed2rgb(rgb2hed(crop) * a + b) * 255), 0, 255).astype(np.uint8)
                name = f"c{len(rows):05d}.png"
                folder = "ab"[len(rows) % 2]  # two folders only because a dataset needs two classes
                Image.fromarray(rgb).resize((256, 256)).save(work / folder / name)
                rows.append(f"{name},{folder}")
                source.append(k)
    (work / "microscopy_ground_truth.csv").write_text("\n".join(rows) + "\n")
    ds = read_iciar(work)
    build = {"backbone": "timm:densenet121", "backbone_weights": weights, "input_px": (256, 256),
             "field_um": (128.0, 128.0), "classes": list(ds.classes)}
    x = Features(build, precision="fp32").pooled(ds)
    order = [int(p.stem[1:]) for p in ds.paths]
    return x, np.asarray(source)[order]


def world(feats: np.ndarray, source: np.ndarray, kind: str, s: float, seed: int, shift: bool):
    """``(class directions, training pool, new pool)``: deviations from the mean the offsets are drawn from."""
    rng = np.random.default_rng(seed)
    dev = feats - feats.mean(0)
    _, sv, vt = np.linalg.svd(dev, full_matrices=False)
    if kind == "crop":
        dirs = dev[rng.choice(len(dev), CLASSES, replace=False)]
    elif kind == "top":
        dirs = (rng.standard_normal((CLASSES, 10)) * sv[:10] / np.sqrt(len(dev))) @ vt[:10] * 3
    else:
        lo, hi = (50, 250) if len(sv) >= 250 else (max(1, len(sv) // 20), max(2, len(sv) // 4))  # small: tests
        dirs = (rng.standard_normal((CLASSES, hi - lo)) * sv[lo:hi]) @ vt[lo:hi]
        dirs *= np.linalg.norm(dev, axis=1).mean() / np.linalg.norm(dirs, axis=1, keepdims=True)
    if shift:
        a, b = dev[source == 0], dev[source > 0]
        return dirs * s, a - a.mean(0), b - b.mean(0)
    return dirs * s, dev, dev


def draw(rng, mean, dirs, pool, p: float, patients: int, photos: int):
    """``(x, y, patient)``: ``patients`` per class, ``photos`` each."""
    x, y, g = [], [], []
    for k in range(CLASSES):
        for q in range(patients):
            offset = p * pool[rng.integers(len(pool))]
            for _ in range(photos):
                x.append(mean + dirs[k] + offset + PHOTO * pool[rng.integers(len(pool))])
                y.append(k)
                g.append(f"{k}-{q}")
    return np.asarray(x), np.asarray(y), g


def one_world(feats, source, kind, s, p, photos, n, seed, shift) -> dict:
    """One world and seed: the new-patient accuracy at every ``C`` and each rule's pick."""
    from bench_generalise import lda_correct, replay_rules

    from napari_bcd.train.regularise import PROBE_CS, fit_logistic, inner_folds, repeated_folds, tune_c

    dirs, train_pool, new_pool = world(feats, source, kind, s, seed, shift)
    rng = np.random.default_rng(seed + 1)
    mean = feats.mean(0)
    x, y, g = draw(rng, mean, dirs, train_pool, p, max(2, -(-2 * n // photos)), photos)
    rows = np.concatenate([np.sort(rng.choice(np.flatnonzero(y == k), n, replace=False)) for k in range(CLASSES)])
    x, y, g = x[rows], y[rows], [g[i] for i in rows]
    x_new, y_new, _ = draw(rng, mean, dirs, new_pool, p, 30, 3)
    lr_new = [float((fit_logistic(x, y, c, CLASSES).logits(x_new).argmax(1) == y_new).mean()) for c in PROBE_CS]
    names = [str(k) for k in range(CLASSES)]
    out = {"kind": kind, "s": s, "p": p, "photos": photos, "n": n, "seed": seed, "shift": shift, "lr_new": lr_new}
    for scheme, groups in (("images", None), ("patients", g)):
        t = tune_c(x, y, inner_folds(y, groups, names, 4, 0), CLASSES, grouped=groups is not None,
                   repeats=repeated_folds(y, groups, names, 4, 0))
        picks = replay_rules(t.to_dict(), lr_new, PROBE_CS)
        if scheme == "images":
            out["rules"] = picks
        else:
            out["rules"]["grouped lowest (ref.)"] = picks["lowest loss"]
    out["rules"]["shrinkage LDA (ref.)"] = float(lda_correct(x, y, x_new, y_new).mean())
    return out


def summarise(runs: list[dict]) -> dict:
    """Each rule's loss against the oracle: over worlds (mean, 90th percentile, worst) and per family."""
    worlds: dict[tuple, list[dict]] = {}
    for r in runs:
        worlds.setdefault((r["shift"], r["kind"], r["s"], r["p"], r["photos"], r["n"]), []).append(r["rules"])
    rules = [k for k in runs[0]["rules"] if k != "oracle"]
    loss = {w: {k: float(np.mean([v["oracle"] - v[k] for v in vs])) for k in rules} for w, vs in worlds.items()}
    out = {"worlds": len(worlds), "runs": len(runs), "rules": {}}
    for k in rules:
        v = np.array([loss[w][k] for w in loss])
        fam = {f"{'shift' if sh else 'same'}/{kind}": round(float(np.mean([loss[w][k] for w in loss
                                                                            if w[:2] == (sh, kind)])), 4)
               for sh in (False, True) for kind in KINDS if any(w[:2] == (sh, kind) for w in loss)}
        out["rules"][k] = {"mean": round(float(v.mean()), 4), "p90": round(float(np.quantile(v, 0.9)), 4),
                           "worst": round(float(v.max()), 4), "by_family": fam}
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seeds", type=int, default=2)
    ap.add_argument("--sizes", type=int, nargs="+", default=[5, 20], help="training images per class")
    ap.add_argument("--strengths", type=float, nargs="+", default=[0.35, 0.7], help="class separation s")
    ap.add_argument("--patient-spread", type=float, nargs="+", default=[0.5, 1.5], help="patient offsets p")
    ap.add_argument("--photos", type=int, nargs="+", default=[3, 10], help="photos per patient")
    ap.add_argument("--kinds", nargs="+", default=list(KINDS), choices=KINDS)
    ap.add_argument("--backbone-weights", default=str(ROOT.parent / "shared" / "data" / "weights"
                                                       / "capricorn-densenet121.safetensors"))
    ap.add_argument("--json", help="also write every run and the summary here")
    args = ap.parse_args()
    logging.getLogger("napari_bcd").setLevel(logging.ERROR)
    warnings.simplefilter("ignore")
    import torch

    weights = args.backbone_weights if Path(args.backbone_weights).is_file() else None
    if weights is None:
        print("NOTE: no trained H&E backbone found: a RANDOM one gives the features' geometry (pass "
              "--backbone-weights FILE)", file=sys.stderr)
    with tempfile.TemporaryDirectory(prefix="bcd-c-rules-") as d:
        os.environ.setdefault("NAPARI_BCD_CACHE_DIR", str(Path(d) / "cache"))
        t0 = time.perf_counter()
        feats, source = crop_features(Path(d) / "crops", weights)
    print(f"{len(feats)} real H&E crops' features ({'trained' if weights else 'random'} DenseNet121) in "
          f"{time.perf_counter() - t0:.0f} s; CPU {'with' if torch.cpu._is_amx_tile_supported() else 'without'} AMX",
          flush=True)
    runs = []
    grid = itertools.product((False, True), args.kinds, args.strengths, args.patient_spread, args.photos,
                             args.sizes, range(args.seeds))
    for shift, kind, s, p, photos, n, seed in grid:
        runs.append(one_world(feats, source, kind, s, p, photos, n, seed, shift))
    summary = summarise(runs)
    fams = list(next(iter(summary["rules"].values()))["by_family"])
    print(f"\n{summary['worlds']} worlds x {args.seeds} seeds, no patients known: new-patient accuracy lost against "
          "the best C (oracle)\n")
    print(f"{'rule':<24}{'mean':>7}{'p90':>7}{'worst':>7}" + "".join(f"{f:>13}" for f in fams))
    for k, v in summary["rules"].items():
        print(f"{k:<24}{v['mean']:>7.3f}{v['p90']:>7.3f}{v['worst']:>7.3f}"
              + "".join(f"{v['by_family'][f]:>13.3f}" for f in fams))
    if args.json:
        Path(args.json).write_text(json.dumps({"runs": runs, "summary": summary}, indent=1))


if __name__ == "__main__":
    main()
