"""What a retrain learns from: the windows it computes features for, the model's own training images, the pools.

Windows: the corrected cells' (in their flips and rotations), the affected
region's (re-predicted, and kept to the parent where uncorrected), up to
``anchors`` windows spread over the rest of the slide, pulled towards the
parent's own probabilities during training, and, where the slide has more,
up to a quarter as many others never trained on, which measure how much of
the slide outside the corrections the new model changes.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from .._progress import STOP
from ..errors import BcdError
from .corrections import Corrections

__all__ = ["Features", "Pools", "Windows", "choose_windows", "compute_features", "original_images", "pools"]


@dataclass
class Windows:
    """The windows a retrain computes features for (row-major) and what each is for.

    ``region``: the re-predicted windows (bool over the grid); ``held``: per
    window of ``wins``, held out to measure the change outside the
    corrections (never trained on); ``box``: the affected cells ``r0, r1, c0, c1``.
    """

    wins: np.ndarray
    region: np.ndarray
    held: np.ndarray
    box: tuple[int, int, int, int]


def affected_box(grid, corrections: Corrections, margin: int) -> tuple[int, int, int, int]:
    """Cells of the region around the corrections: their bounding box grown by ``margin`` windows."""
    kh, kw = grid.cells_per_window
    rows = [c.row for c in corrections.cells]
    cols = [c.col for c in corrections.cells]
    return (max(min(rows) - margin * kh, 0), min(max(rows) + 1 + margin * kh, grid.n_cells[0]),
            max(min(cols) - margin * kw, 0), min(max(cols) + 1 + margin * kw, grid.n_cells[1]))


def choose_windows(grid, corrections: Corrections, slide, class_map, margin: int, n_anchor: int,
                   min_tissue: float, rng: np.random.Generator) -> Windows:
    from ..windows import select_windows, tissue_fractions

    kh, kw = grid.cells_per_window
    if class_map is not None:
        classified = class_map.window_done.copy()
    else:
        win_frac, _, _ = tissue_fractions(slide, grid, None, grid.mpp)
        classified = select_windows(win_frac, min_tissue)
    r0, r1, c0, c1 = affected_box(grid, corrections, margin)
    region = np.zeros_like(classified)
    region[max(r0 - kh + 1, 0) : r1, max(c0 - kw + 1, 0) : c1] = True
    region &= classified
    others = np.argwhere(classified & ~region)
    pick = rng.permutation(len(others))
    # up to n_anchor anchors kept to the parent; of the windows left, up to a quarter as many measure the change
    spread = others[pick[: n_anchor + min(n_anchor // 4, max(len(others) - n_anchor, 0))]]
    held_rc = {(int(r), int(c)) for r, c in spread[n_anchor:]}
    wins = np.concatenate([np.argwhere(region), spread]) if len(spread) else np.argwhere(region)
    order = np.lexsort((wins[:, 1], wins[:, 0])) if len(wins) else np.arange(0)
    wins = wins[order]
    held = np.array([(int(r), int(c)) in held_rc for r, c in wins], bool)
    return Windows(wins, region, held, (r0, r1, c0, c1))


def original_images(card, data, notes: list[str]):
    """The parent's training images (where its card says, or ``data``), split as it was: ``(dataset, train, val)``."""
    root = None
    if data == "card":
        root = card.record.data_root
        if root and not Path(root).is_dir():
            notes.append(f"the model's training images are not at {root}: retrained without them")
            root = None
    elif data is not None:
        root = str(data)
    if not root:
        return None, [], []
    from ..train.iciar import read_iciar

    try:
        dataset = read_iciar(root)
    except BcdError as err:
        notes.append(f"the training images at {root} cannot be read ({err}): retrained without them")
        return None, [], []
    if dataset.problems:
        notes.append(f"{len(dataset.problems)} problem(s) with the training images at {root}, e.g. "
                     f"{dataset.problems[0]}")
    if tuple(dataset.classes) != tuple(card.classes):
        notes.append("the training images' classes differ from the model's: retrained without them")
        return None, [], []
    from ..train.groups import image_ids, listed_images

    # paths in the folder (older cards: names, a name two images share holding both out)
    val_idx = listed_images(card.record.val_files, image_ids(dataset), by_name=True)[0]
    train_idx = [i for i in range(len(dataset)) if i not in set(val_idx)]
    return dataset, train_idx, val_idx


@dataclass
class Features:
    corrected: Any  # n x views x C x h x w
    windows: Any  # len(wins) x C x h x w (identity view)
    original: Any = None  # images x T x C x h x w, or None
    labels: Any = None
    views: int = 1
    train_rows: np.ndarray | None = None
    val_rows: np.ndarray | None = None


def compute_features(model, dev, slide, grid, corrections: Corrections, wins: np.ndarray, views: int, dataset,
                     train_idx: list[int], val_idx: list[int], feature_batch: int, progress):
    """Backbone features, once: corrected windows in ``views`` flips, the windows, the original images (cached).

    Yields ``progress(done, total)`` items; returns :class:`Features`, or None when stopped.
    """
    import torch

    from ..model.classifier import feature_shape
    from ..train.features import dihedral
    from ..windows import resize_area, window_batches

    size = tuple(model.card.input_px)
    total = len(corrections) * views + len(wins) + len(train_idx) + len(val_idx)
    done = 0

    def backbone(batch: np.ndarray) -> torch.Tensor:
        with torch.inference_mode():
            x = model.normalise(torch.from_numpy(np.ascontiguousarray(batch)).to(dev))
            return model.backbone(x).float().cpu()

    shape = feature_shape(model.backbone, size)
    yield progress(0, total)
    corr_feats = []
    per = max(1, feature_batch // views)
    dy, dx = grid.level_downsample
    for k in range(0, len(corrections), per):
        chunk = corrections.cells[k : k + per]
        imgs = []
        for c in chunk:
            y, x, h, w = c.box_px
            px = slide.read_region(grid.level, int(round(y / dy)), int(round(x / dx)),
                                   max(1, int(round(h / dy))), max(1, int(round(w / dx))))
            imgs.extend(dihedral(resize_area(px, size), t) for t in range(views))
        corr_feats.append(backbone(np.stack(imgs)).view(len(chunk), views, *shape))
        done += len(chunk) * views
        if (yield progress(done, total)) == STOP:
            return None
    win_f = torch.zeros((len(wins), *shape))
    pos = {(int(r), int(c)): i for i, (r, c) in enumerate(wins)}
    for batch_rc, pixels in window_batches(slide, grid, wins, feature_batch):  # each tile decoded once
        f = backbone(np.stack([resize_area(p, size) for p in pixels]))
        for (r, c), fi in zip(batch_rc, f, strict=True):
            win_f[pos[(int(r), int(c))]] = fi
        done += len(batch_rc)
        if (yield progress(done, total)) == STOP:
            return None
    out = Features(torch.cat(corr_feats), win_f)
    if dataset is None:
        return out
    bank = yield from _original_bank(model, dataset, train_idx, val_idx, views, dev, feature_batch, progress, done,
                                     total, out)
    return bank


def _original_bank(model, dataset, train_idx, val_idx, views, dev, feature_batch, progress, done, total, out):
    import torch

    from ..train.features import FeatureProgress, backbone_features
    from ..windows import resize_area

    size = tuple(model.card.input_px)
    out.views = views if model.card.record.augmented else 1
    needed = sorted(set(train_idx) | set(val_idx))
    gen = backbone_features(model, dataset, needed, out.views, lambda i: resize_area(dataset.load(i), size), dev,
                            feature_batch, True)
    try:
        item = next(gen)
        while True:
            if isinstance(item, FeatureProgress):
                yield progress(done + item.done, total)
            item = gen.send(None)
    except StopIteration as stop:
        bank = stop.value
    row = {i: k for k, i in enumerate(needed)}
    out.original = bank.float()
    out.labels = torch.as_tensor(dataset.labels)
    out.train_rows = np.asarray([row[i] for i in train_idx], np.int64)
    out.val_rows = np.asarray([row[i] for i in val_idx], np.int64)
    return out


@dataclass
class Pools:
    """Training samples: features, target distributions, sampling weights; what the windows say before."""

    features: Any
    targets: Any
    weights: Any
    share: np.ndarray  # per window: share of its cells corrected
    parent_probs: Any  # per window: the parent's probabilities
    new_idx: Any  # per correction: the new class index


def pools(parent_probs, feats: Features, corrections: Corrections, chosen: Windows, grid, classes,
          weight: float, views: int, train_idx: list[int]) -> Pools:
    """Corrections (one-hot), the windows (mixed targets over corrected cells, the parent's elsewhere; the held-out
    anchors left out), the original images."""
    import torch

    n_cls = len(classes)
    kh, kw = grid.cells_per_window
    new_idx = torch.as_tensor([classes.index(c.new) for c in corrections.cells])
    # The grid windows over corrected cells decide what the map shows there (a cell is the mean of its windows):
    # each is pulled towards the corrected classes at twice the share of its cells corrected (at most all of it),
    # towards the parent for the rest.  At the share alone, the corner cell of a corrected block at 50 % overlap
    # would average to 0.56 of its new class even when every window is learnt exactly, a coin's toss; at twice it,
    # 0.88, while the cell just outside the block averages to 0.38 and keeps its class.
    new_of = {(c.row, c.col): classes.index(c.new) for c in corrections.cells}
    mix = torch.zeros((len(chosen.wins), n_cls))
    for i, (r, c) in enumerate(chosen.wins):
        for rr in range(int(r), int(r) + kh):
            for cc in range(int(c), int(c) + kw):
                if (rr, cc) in new_of:
                    mix[i, new_of[(rr, cc)]] += 1.0 / (kh * kw)
    share = mix.sum(1).numpy().astype(np.float64)
    pull = torch.as_tensor(np.minimum(2.0 * share, 1.0), dtype=torch.float32)
    mix = mix * (pull / torch.as_tensor(np.maximum(share, 1e-12), dtype=torch.float32)).view(-1, 1)
    win_target = mix + (1.0 - pull).view(-1, 1) * parent_probs
    train = torch.from_numpy(~chosen.held)
    features = [feats.corrected.flatten(0, 1), feats.windows[train]]
    targets = [torch.nn.functional.one_hot(new_idx.repeat_interleave(views), n_cls).float(), win_target[train]]
    weights = [torch.full((len(corrections) * views,), weight / views),
               torch.as_tensor(np.where(share == 0, 1.0, weight * share), dtype=torch.float32)[train]]
    if feats.original is not None and len(feats.train_rows):
        f = feats.original[torch.from_numpy(feats.train_rows)].flatten(0, 1)
        features.append(f)
        targets.append(torch.nn.functional.one_hot(feats.labels[train_idx].repeat_interleave(feats.views),
                                                   n_cls).float())
        weights.append(torch.full((len(f),), 1.0 / feats.views))
    return Pools(torch.cat(features), torch.cat(targets), torch.cat(weights).double(), share, parent_probs, new_idx)
