"""Retrain from corrections: learn the pathologist's fixes, re-predict where they matter.

The backbone stays frozen, so every window's backbone features are computed
once: the corrected cells' windows (in their eight flips and rotations), the
windows of the affected region (which serve twice: as "keep what you did not
correct" anchors and to re-predict the region without a second pass), and
the model's own training images (from the feature cache when it was trained
here and the images are still where its card says).

The head starts from the parent model's head and is trained on three pools,
sampled in proportion to their weights:

* the corrected windows, one-hot on their new class, each cell counting as
  ``weight`` training images;
* anchors: the region's other windows and up to ``anchors`` classified
  windows spread over the slide, each pulled towards the parent's own
  probabilities (soft targets), so cells nobody corrected keep their class;
* the original training images, one-hot on their labels (when available).

Features are standardised per channel during training and folded back into
the head's first 1x1 convolution when saved, so the new checkpoint is a plain
Table II model.  It records its parent, the corrections and the metrics
before and after; nothing is overwritten (``<parent>-r1``, ``-r2``...).
"""

from __future__ import annotations

import copy
import logging
import math
import os
import time
from collections.abc import Generator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from .._progress import STOP
from ..errors import BcdError
from .corrections import Corrections

if TYPE_CHECKING:
    import torch

    from ..engine import ClassMap
    from ..io.slide import Slide
    from ..model.classifier import Classifier

__all__ = ["RetrainPlan", "RetrainProgress", "RetrainResult", "iter_retrain", "next_model_path"]

log = logging.getLogger(__name__)



@dataclass(frozen=True)
class RetrainPlan:
    corrections: int
    by_class: dict[str, int]
    region_windows: int
    anchor_windows: int
    original_images: int
    steps: int
    out: Path
    notes: tuple[str, ...] = ()

    @property
    def message(self) -> str:
        by = ", ".join(f"{n} to {k}" for k, n in sorted(self.by_class.items()))
        orig = (f"{self.original_images} original training images" if self.original_images
                else "no original training images")
        lines = [f"{self.corrections} corrected cell(s) ({by}); {self.region_windows} windows to re-predict, "
                 f"{self.anchor_windows} anchor windows, {orig}; {self.steps} steps -> {self.out.name}"]
        return "\n".join(lines + [f"note: {n}" for n in self.notes])


@dataclass(frozen=True)
class RetrainProgress:
    """``stage``: ``"features"``, ``"training"`` or ``"predicting"``."""

    stage: str
    done: int
    total: int
    loss: float = math.nan
    corrected_agree: float = math.nan

    @property
    def fraction(self) -> float:
        return self.done / self.total if self.total else 1.0

    @property
    def desc(self) -> str:
        return self.stage

    def __str__(self) -> str:
        extra = (f", loss {self.loss:.3f}, corrections learnt {self.corrected_agree:.0%}"
                 if self.stage == "training" and not math.isnan(self.loss) else "")
        return f"{self.stage}: {self.done}/{self.total}{extra}"


@dataclass
class RetrainResult:
    """What a retrain produced.

    Attributes
    ----------
    checkpoint, parent
        The new model and the one it was retrained from.
    class_map
        The re-predicted class map (the affected region replaced, or the whole
        slide), or None when no class map was given and no whole-slide
        prediction was asked for.
    changed_cells
        Cells whose label differs from the class map given.
    corrected_before, corrected_after
        Share of the corrected windows the model puts in their new class.
    anchors_kept
        Share of the anchor windows that keep the parent's class.
    validation_before, validation_after
        Accuracy / macro F1 on the parent's validation images (None without them).
    """

    checkpoint: Path
    parent: Path
    card: Any
    class_map: Any = None
    changed_cells: int = 0
    corrected_before: float = math.nan
    corrected_after: float = math.nan
    anchors_kept: float = math.nan
    validation_before: dict | None = None
    validation_after: dict | None = None
    seconds: float = 0.0
    stopped: str = "completed"
    notes: list[str] = field(default_factory=list)

    def describe(self) -> str:
        text = (f"Saved {self.checkpoint.name} (from {self.parent.name}): corrections learnt "
                f"{self.corrected_before:.0%} -> {self.corrected_after:.0%}, anchors kept {self.anchors_kept:.0%}")
        if self.validation_before and self.validation_after:
            text += (f"; validation accuracy {self.validation_before['accuracy']:.3f} -> "
                     f"{self.validation_after['accuracy']:.3f}")
        if self.class_map is not None:
            text += f"; {self.changed_cells} cell(s) changed on the map"
        return text + f" ({self.seconds:.1f} s)."


def next_model_path(parent: str | os.PathLike[str]) -> Path:
    """``<parent>-r1.safetensors`` beside the parent, or the first ``-rN`` that does not exist."""
    from ..model.card import checkpoint_paths

    weights, _ = checkpoint_paths(parent)
    stem = weights.name[: -len(".safetensors")]
    base = stem.rsplit("-r", 1)[0] if "-r" in stem and stem.rsplit("-r", 1)[1].isdigit() else stem
    k = 1
    while True:
        cand = weights.with_name(f"{base}-r{k}.safetensors")
        if not cand.exists() and not cand.with_suffix(".json").exists():
            return cand
        k += 1


def _affected(grid, corrections: Corrections, margin: int):
    """Cells of the region around the corrections: their bounding box grown by ``margin`` windows."""
    kh, kw = grid.cells_per_window
    rows = [c.row for c in corrections.cells]
    cols = [c.col for c in corrections.cells]
    r0 = max(min(rows) - margin * kh, 0)
    r1 = min(max(rows) + 1 + margin * kh, grid.n_cells[0])
    c0 = max(min(cols) - margin * kw, 0)
    c1 = min(max(cols) + 1 + margin * kw, grid.n_cells[1])
    return r0, r1, c0, c1


def iter_retrain(
    checkpoint: str | os.PathLike[str],
    corrections: Corrections,
    slide: Slide,
    *,
    class_map: ClassMap | None = None,
    out: str | os.PathLike[str] | None = None,
    weight: float = 4.0,
    whole_slide: bool = False,
    margin: int = 1,
    anchors: int = 64,
    steps: int = 300,
    lr: float = 3e-4,
    batch_size: int = 64,
    views: int = 8,
    data: str | os.PathLike[str] | None = "card",
    device: str | None = None,
    mpp: float | tuple[float, float] | None = None,
    stride: float = 1.0,
    min_tissue: float = 0.25,
    seed: int = 0,
    feature_batch: int = 8,
) -> Generator[RetrainPlan | RetrainProgress, Any, RetrainResult]:
    """Retrain a model's head from corrected cells; yields progress, returns a :class:`RetrainResult`.

    Parameters
    ----------
    checkpoint
        The model that made the class map (the parent).
    corrections
        From :func:`~.corrections.corrections_from_labels` or
        :func:`~.corrections.read_corrections`, on the same grid.
    slide
        The slide the corrections are on (:func:`~napari_bcd.open_slide`).
    class_map
        The map the corrections were made on; its affected region is
        re-predicted in place.  Without it (the CLI), the grid comes from the
        slide, the card and ``stride``.
    out
        The new checkpoint (default ``<parent>-rN.safetensors``); never replaces a file.
    weight
        How many training images each corrected cell counts as.
    whole_slide
        Re-predict the whole slide with the new model instead of the region.
    margin
        The region re-predicted (and anchored): the corrections' bounding box
        grown by this many windows.
    data
        The original training images: ``"card"`` (where the card says),
        a folder, or None.

    Raises
    ------
    BcdError
        Before any work: no corrections, an existing ``out``, a grid that does not match.
    """
    from ..model.card import checkpoint_paths, read_card
    from ..model.checkpoint import check_checkpoint_target

    if not len(corrections):
        raise BcdError("There are no corrected cells: repaint cells of the classes layer with another class "
                       "(or draw classified shapes) first.")
    if weight <= 0 or steps < 1 or lr <= 0 or batch_size < 1 or views not in (1, 2, 4, 8):
        raise BcdError("weight and lr must be positive, steps and batch size at least 1, views 1, 2, 4 or 8.")
    parent = checkpoint_paths(checkpoint)[0]
    card = read_card(parent)
    unknown = sorted({c.new for c in corrections.cells} - set(card.classes))
    if unknown:
        raise BcdError(f"Corrections name classes the model does not have: {', '.join(unknown)}.")
    out_path = Path(out) if out is not None else next_model_path(parent)
    out_path = check_checkpoint_target(out_path, overwrite=False)
    if class_map is not None:
        grid = class_map.grid
    else:
        from ..settings import ClassifySettings
        from ..tiling import grid_for

        grid = grid_for(slide, card, ClassifySettings(stride=stride, mpp=mpp))
    if corrections.grid:
        want = [round(v, 3) for v in corrections.grid.get("stride_px", grid.stride_px)]
        if want != [round(v, 3) for v in grid.stride_px]:
            raise BcdError("The corrections were made on a class map with another cell size; correct the map "
                           "this run made, or classify again with the same overlap.")
    bad = [c for c in corrections.cells if not (0 <= c.row < grid.n_cells[0] and 0 <= c.col < grid.n_cells[1])]
    if bad:
        raise BcdError(f"{len(bad)} corrected cell(s) lie outside this slide's grid: are they from another slide?")
    return _retrain(parent, card, corrections, slide, class_map, grid, out_path, float(weight), whole_slide,
                    int(margin), int(anchors), int(steps), float(lr), int(batch_size), int(views), data, device,
                    float(min_tissue), int(seed), int(feature_batch))


@dataclass
class _Windows:
    """The windows a retrain computes features for: the region's (re-predicted, anchors) and spread anchors."""

    wins: np.ndarray  # (n, 2) window rows/cols, row-major
    region: np.ndarray  # (window rows, window cols) bool: re-predicted
    box: tuple[int, int, int, int]  # the affected cells r0, r1, c0, c1


def _choose_windows(grid, corrections: Corrections, slide, class_map, margin: int, n_anchor: int,
                    min_tissue: float, rng: np.random.Generator) -> _Windows:
    from ..windows import select_windows, tissue_fractions

    kh, kw = grid.cells_per_window
    if class_map is not None:
        classified = class_map.window_done.copy()
    else:
        win_frac, _, _ = tissue_fractions(slide, grid, None, grid.mpp)
        classified = select_windows(win_frac, min_tissue)
    r0, r1, c0, c1 = _affected(grid, corrections, margin)
    region = np.zeros_like(classified)
    region[max(r0 - kh + 1, 0) : r1, max(c0 - kw + 1, 0) : c1] = True
    region &= classified
    others = np.argwhere(classified & ~region)
    spread = others[rng.choice(len(others), size=min(n_anchor, len(others)), replace=False)] if len(others) else others
    wins = np.concatenate([np.argwhere(region), spread]) if len(spread) else np.argwhere(region)
    order = np.lexsort((wins[:, 1], wins[:, 0])) if len(wins) else np.arange(0)
    return _Windows(wins[order], region, (r0, r1, c0, c1))


def _original_images(card, data, notes: list[str]):
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
    if tuple(dataset.classes) != tuple(card.classes):
        notes.append("the training images' classes differ from the model's: retrained without them")
        return None, [], []
    val_names = set(card.record.val_files)
    val_idx = [i for i, p in enumerate(dataset.paths) if p.name in val_names]
    train_idx = [i for i in range(len(dataset)) if i not in set(val_idx)]
    return dataset, train_idx, val_idx


@dataclass
class _Features:
    corrected: Any  # n x views x C x h x w
    windows: Any  # len(wins) x C x h x w (identity view)
    original: Any = None  # images x T x C x h x w, or None
    labels: Any = None
    views: int = 1
    train_rows: np.ndarray | None = None
    val_rows: np.ndarray | None = None


def _compute_features(model, dev, slide, grid, corrections: Corrections, wins: np.ndarray, views: int, dataset,
                      train_idx: list[int], val_idx: list[int], feature_batch: int):
    """Backbone features, once: corrected windows in ``views`` flips, the windows, the original images (cached).

    Yields :class:`RetrainProgress`; returns :class:`_Features`, or None when stopped.
    """
    import torch

    from ..train.finetune import dihedral
    from ..windows import resize_area, window_batches

    card = model.card
    size = tuple(card.input_px)
    total = len(corrections) * views + len(wins) + len(train_idx) + len(val_idx)
    done = 0

    def backbone(batch: np.ndarray) -> torch.Tensor:
        with torch.inference_mode():
            x = model.normalise(torch.from_numpy(np.ascontiguousarray(batch)).to(dev))
            return model.backbone(x).float().cpu()

    yield RetrainProgress("features", 0, total)
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
        corr_feats.append(backbone(np.stack(imgs)).view(len(chunk), views, *backbone_shape(model, size)))
        done += len(chunk) * views
        if (yield RetrainProgress("features", done, total)) == STOP:
            return None
    win_f = torch.zeros((len(wins), *backbone_shape(model, size)))
    pos = {(int(r), int(c)): i for i, (r, c) in enumerate(wins)}
    for batch_rc, pixels in window_batches(slide, grid, wins, feature_batch):  # each tile decoded once
        f = backbone(np.stack([resize_area(p, size) for p in pixels]))
        for (r, c), fi in zip(batch_rc, f, strict=True):
            win_f[pos[(int(r), int(c))]] = fi
        done += len(batch_rc)
        if (yield RetrainProgress("features", done, total)) == STOP:
            return None
    out = _Features(torch.cat(corr_feats), win_f)
    if dataset is None:
        return out
    from ..train.finetune import FeatureProgress, backbone_features

    out.views = views if card.record.augmented else 1
    needed = sorted(set(train_idx) | set(val_idx))
    gen = backbone_features(model, dataset, needed, out.views, lambda i: resize_area(dataset.load(i), size), dev,
                            feature_batch, True)
    try:
        item = next(gen)
        while True:
            if isinstance(item, FeatureProgress):
                yield RetrainProgress("features", done + item.done, total)
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
class _Pools:
    """Training samples: features, target distributions, sampling weights; what the windows say before."""

    features: Any
    targets: Any
    weights: Any
    share: np.ndarray  # per window: share of its cells corrected
    parent_probs: Any  # per window: the parent's probabilities
    new_idx: Any  # per correction: the new class index


def _pools(head, feats: _Features, corrections: Corrections, wins: np.ndarray, grid, n_cls: int, classes,
           weight: float, views: int, train_idx: list[int], dev) -> _Pools:
    """Corrections (one-hot), the windows (mixed targets over corrected cells, the parent's elsewhere), originals."""
    import torch

    kh, kw = grid.cells_per_window
    with torch.inference_mode():
        parent_p = torch.softmax(_head_batches(head, feats.windows, dev), 1).cpu()
    new_idx = torch.as_tensor([classes.index(c.new) for c in corrections.cells])
    # The grid windows over corrected cells decide what the map shows there: each is pulled towards the
    # corrected classes in proportion to the share of its cells corrected, towards the parent elsewhere.
    new_of = {(c.row, c.col): classes.index(c.new) for c in corrections.cells}
    mix = torch.zeros((len(wins), n_cls))
    for i, (r, c) in enumerate(wins):
        for rr in range(int(r), int(r) + kh):
            for cc in range(int(c), int(c) + kw):
                if (rr, cc) in new_of:
                    mix[i, new_of[(rr, cc)]] += 1.0 / (kh * kw)
    share = mix.sum(1).numpy().astype(np.float64)
    win_target = mix + (1.0 - torch.as_tensor(share, dtype=torch.float32)).view(-1, 1) * parent_p
    features = [feats.corrected.flatten(0, 1), feats.windows]
    targets = [torch.nn.functional.one_hot(new_idx.repeat_interleave(views), n_cls).float(), win_target]
    weights = [torch.full((len(corrections) * views,), weight / views),
               torch.as_tensor(np.where(share == 0, 1.0, weight * share), dtype=torch.float32)]
    if feats.original is not None and len(feats.train_rows):
        f = feats.original[torch.from_numpy(feats.train_rows)].flatten(0, 1)
        features.append(f)
        targets.append(torch.nn.functional.one_hot(feats.labels[train_idx].repeat_interleave(feats.views),
                                                   n_cls).float())
        weights.append(torch.full((len(f),), 1.0 / feats.views))
    return _Pools(torch.cat(features), torch.cat(targets), torch.cat(weights).double(), share, parent_p, new_idx)


def _train_head(head, pools: _Pools, feats: _Features, wins: np.ndarray, corrections: Corrections, grid, steps: int,
                lr: float, batch_size: int, dev, rng: np.random.Generator):
    """Adam on standardised features from the parent's head; yields progress; returns ``(stopped, steps run, norm)``.

    The standardisation is folded into ``head.conv1`` before training (so it
    starts exactly from the parent) and must be folded back by the caller.
    """
    import torch

    kh, kw = grid.cells_per_window
    F = pools.features
    mean = F.mean(dim=(0, 2, 3))
    std = F.transpose(0, 1).reshape(F.shape[1], -1).std(1)
    std = torch.sqrt(std**2 + (1e-2 * float(std.mean())) ** 2 + 1e-12)
    with torch.no_grad():
        w1 = head.conv1.weight.detach().cpu()
        b1 = head.conv1.bias.detach().cpu()
        head.conv1.bias.copy_((b1 + (w1[:, :, 0, 0] * mean).sum(1)).to(head.conv1.bias))
        head.conv1.weight.copy_((w1 * std.view(1, -1, 1, 1)).to(head.conv1.weight))
    mean_d, std_d = mean.to(dev).view(1, -1, 1, 1), std.to(dev).view(1, -1, 1, 1)
    Fz, Y = F.to(dev), pools.targets.to(dev)
    opt = torch.optim.Adam(head.parameters(), lr=lr)
    probs_w = (pools.weights / pools.weights.sum()).numpy()
    over = torch.from_numpy(pools.share > 0)
    win_z = feats.windows[over].to(dev)
    cells = [(c.row, c.col) for c in corrections.cells]
    stopped, step = "completed", 0
    for step in range(1, steps + 1):
        idx = torch.from_numpy(rng.choice(len(Fz), size=min(batch_size, len(Fz)), replace=True, p=probs_w)).to(dev)
        loss = -(Y[idx] * torch.log_softmax(head((Fz[idx] - mean_d) / std_d), 1)).sum(1).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if step % 10 == 0 or step == steps:
            with torch.inference_mode():
                p_now = pools.parent_probs.numpy().copy()
                p_now[over.numpy()] = torch.softmax(head((win_z - mean_d) / std_d), 1).cpu().numpy()
                agree = _cells_agree(wins, p_now, cells, pools.new_idx.numpy(), kh, kw)
            if (yield RetrainProgress("training", step, steps, float(loss.detach()), agree)) == STOP:
                stopped = "stopped by the user"
                break
    head.eval()
    return stopped, step, (mean, std)


def _validation(parent_head, head, feats: _Features, val_idx: list[int], classes, dev):
    """Accuracy and macro F1 on the parent's validation images, before and after (None without them)."""
    if feats.original is None or not len(feats.val_rows):
        return None, None
    import torch

    from ..train.evaluate import report_from_predictions

    vf = feats.original[torch.from_numpy(feats.val_rows), 0]
    y_true = feats.labels[val_idx].tolist()
    out = []
    for h in (parent_head, head):
        with torch.inference_mode():
            pred = _head_batches(h, vf, dev).argmax(1).tolist()
        r = report_from_predictions(y_true, pred, classes)
        out.append({"accuracy": r.accuracy, "macro_f1": r.macro["f1"], "images": len(y_true)})
    return out[0], out[1]


def _retrain(parent, card, corrections, slide, class_map, grid, out_path, weight, whole_slide, margin, n_anchor,
             steps, lr, batch_size, views, data, device, min_tissue, seed, feature_batch):
    import torch

    from ..decision import DecisionRule, decide
    from ..model.checkpoint import load_checkpoint, save_checkpoint
    from ..model.inference import choose_device
    from ..train.finetune import fold_standardisation

    t_start = time.perf_counter()
    rng = np.random.default_rng(seed)
    notes = list(corrections.notes)
    kh, kw = grid.cells_per_window
    chosen = _choose_windows(grid, corrections, slide, class_map, margin, n_anchor, min_tissue, rng)
    wins = chosen.wins
    dataset, train_idx, val_idx = _original_images(card, data, notes)
    yield RetrainPlan(len(corrections), corrections.counts(), int(chosen.region.sum()), len(wins),
                      len(train_idx) + len(val_idx), steps, out_path, tuple(notes))

    dev = choose_device(device)
    model = load_checkpoint(parent)
    model.to(dev).eval()
    feats = yield from _compute_features(model, dev, slide, grid, corrections, wins, views, dataset, train_idx,
                                         val_idx, feature_batch)
    if feats is None:
        return None  # stopped before training: nothing is saved
    head = model.head
    parent_head = copy.deepcopy(head).eval()
    pools = _pools(parent_head, feats, corrections, wins, grid, len(card.classes), card.classes, weight, views,
                   train_idx, dev)
    cells = [(c.row, c.col) for c in corrections.cells]
    corrected_before = _cells_agree(wins, pools.parent_probs.numpy(), cells, pools.new_idx.numpy(), kh, kw)
    for p in model.backbone.parameters():
        p.requires_grad_(False)
    stopped, step, norm = yield from _train_head(head, pools, feats, wins, corrections, grid, steps, lr, batch_size,
                                                 dev, rng)
    # fold the standardisation back: a plain Table II head on raw features
    state = {k: v.detach().clone() for k, v in model.state_dict().items() if k.startswith("head.")}
    model.load_state_dict({**model.state_dict(), **fold_standardisation(state, norm)})
    with torch.inference_mode():
        new_win_p = torch.softmax(_head_batches(head, feats.windows, dev), 1).cpu()
    corrected_after = _cells_agree(wins, new_win_p.numpy(), cells, pools.new_idx.numpy(), kh, kw)
    anchor_mask = pools.share == 0
    kept = (new_win_p.argmax(1) == pools.parent_probs.argmax(1)).numpy()
    anchors_kept = float(kept[anchor_mask].mean()) if anchor_mask.any() else math.nan
    val_before, val_after = _validation(parent_head, head, feats, val_idx, card.classes, dev)
    # ---- the new checkpoint: never over an existing file
    record = {
        "parent": {"path": str(parent), "name": card.name, "weights_sha256": card.weights_sha256},
        "slide": corrections.slide or slide.name,
        "created": corrections.created,
        "corrections": [c.to_dict() for c in corrections.cells],
        "erased_cells": corrections.erased,
        "weight": weight, "steps": steps, "steps_run": step, "lr": lr, "views": views,
        "batch_size": batch_size, "anchors": int(anchor_mask.sum()), "original_images": len(train_idx) + len(val_idx),
        "corrected_before": corrected_before, "corrected_after": corrected_after, "anchors_kept": anchors_kept,
        "validation_before": val_before, "validation_after": val_after, "stopped": stopped,
        "notes": notes,
    }
    metrics = dict(card.metrics)
    if val_after:
        metrics.update(accuracy=val_after["accuracy"], macro_f1=val_after["macro_f1"])
    new_card = card.replace(name=out_path.name[: -len(".safetensors")],
                            training=card.record.with_retrain(record).to_dict(), metrics=metrics)
    model.cpu()
    saved = save_checkpoint(model, new_card, out_path, overwrite=False)
    model.to(dev)
    # ---- re-predict: the region from the features already computed, or the whole slide
    new_map = None
    changed = 0
    rule = class_map.rule if class_map is not None else DecisionRule.from_dict(card.decision)
    if whole_slide:
        from ..engine import iter_classify
        from ..settings import ClassifySettings

        settings = ClassifySettings(stride_um=grid.cell_um, device=str(dev), mpp=grid.mpp, decision=rule,
                                    min_tissue=class_map.run.min_tissue if class_map is not None and class_map.run
                                    else min_tissue)
        gen = iter_classify(slide, model, settings)
        try:
            while True:
                p = next(gen)
                if p.stage == "classify":
                    yield RetrainProgress("predicting", p.done, p.total)
        except StopIteration as stop:
            new_map = stop.value
    elif class_map is not None:
        new_map = _repredict_region(class_map, grid, wins, chosen.region, new_win_p.numpy(), chosen.box, rule,
                                    saved, decide)
    if new_map is not None:
        new_map.model_name = new_card.name
        new_map.info = {**new_map.info, "model_path": str(saved), "retrained_from": str(parent)}
        new_map.model_path = str(saved)
        if class_map is not None and new_map.labels.shape == class_map.labels.shape:
            changed = int((new_map.labels != class_map.labels).sum())
    yield RetrainProgress("predicting", 1, 1)
    return RetrainResult(saved, parent, model.card, new_map, changed, corrected_before, corrected_after,
                         anchors_kept, val_before, val_after, time.perf_counter() - t_start, stopped, notes)


def backbone_shape(model: Classifier, size: tuple[int, int]) -> tuple[int, int, int]:
    """``(C, h, w)`` of the backbone's output for an input of ``size`` (measured once per model)."""
    from ..model.classifier import feature_shape

    cached = getattr(model, "_bcd_feature_shape", None)
    if cached is None or cached[0] != tuple(size):
        cached = (tuple(size), feature_shape(model.backbone, tuple(size)))
        model._bcd_feature_shape = cached
    return cached[1]


def _cells_agree(wins, win_probs, cells, new_idx, kh: int, kw: int) -> float:
    """Share of the corrected cells whose mean over their windows (as the map averages) is the new class."""
    ok = 0
    n = 0
    for (r, c), k in zip(cells, new_idx, strict=True):
        cover = [(i) for i, (wr, wc) in enumerate(wins) if wr <= r < wr + kh and wc <= c < wc + kw]
        if not cover:
            continue
        n += 1
        ok += int(np.asarray(win_probs)[cover].mean(0).argmax() == k)
    return ok / n if n else math.nan


def _head_batches(head, feats, dev, bs: int = 256):
    import torch

    with torch.inference_mode():
        return torch.cat([head(feats[k : k + bs].to(dev)).float() for k in range(0, len(feats), bs)]) \
            if len(feats) else torch.zeros((0, head.out.out_features), device=dev)


def _repredict_region(class_map, grid, wins, region_win, win_probs, box, rule, saved, decide):
    """The class map with the cells of ``box`` recomputed from the new window probabilities."""
    import dataclasses

    r0, r1, c0, c1 = box
    kh, kw = grid.cells_per_window
    n_cls = len(class_map.classes)
    sums = np.zeros((r1 - r0, c1 - c0, n_cls))
    counts = np.zeros((r1 - r0, c1 - c0), np.int32)
    for (r, c), p in zip(wins, win_probs, strict=True):
        r, c = int(r), int(c)
        if not region_win[r, c]:
            continue
        ya, yb = max(r, r0), min(r + kh, r1)
        xa, xb = max(c, c0), min(c + kw, c1)
        if ya < yb and xa < xb:
            sums[ya - r0 : yb - r0, xa - c0 : xb - c0] += p
            counts[ya - r0 : yb - r0, xa - c0 : xb - c0] += 1
    probs = class_map.probs.copy()
    covered_old = class_map.labels[r0:r1, c0:c1] > 0
    with np.errstate(invalid="ignore", divide="ignore"):
        region_p = (sums / counts[..., None]).astype(np.float32)
    upd = counts > 0
    sub = probs[r0:r1, c0:c1]
    sub[upd] = region_p[upd]
    probs[r0:r1, c0:c1] = sub
    labels = class_map.labels.copy()
    quality = class_map.quality[r0:r1, c0:c1] if class_map.quality is not None else None
    new_lab, _ = decide(probs[r0:r1, c0:c1], covered_old, tuple(class_map.classes), rule, quality)
    labels[r0:r1, c0:c1] = new_lab
    info = {**class_map.info, "repredicted_cells": [int(r0), int(r1), int(c0), int(c1)]}
    return dataclasses.replace(class_map, probs=probs, labels=labels, info=info)
