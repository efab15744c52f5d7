"""The retrain's head: trained from the parent's, measured before and after, and the map re-predicted from it."""

from __future__ import annotations

import dataclasses
import math

import numpy as np

from .._progress import STOP
from .corrections import Corrections
from .retrain_data import Features, Pools, Windows

__all__ = ["TIE", "cells_agree", "decided", "drift", "head_batches", "repredict_region", "train_head", "validation"]


def head_batches(head, feats, dev, bs: int = 256):
    """The head's logits over ``feats``, in batches."""
    import torch

    with torch.inference_mode():
        return torch.cat([head(feats[k : k + bs].to(dev)).float() for k in range(0, len(feats), bs)]) \
            if len(feats) else torch.zeros((0, head.out.out_features), device=dev)


def cells_agree(wins, win_probs, cells, new_idx, kh: int, kw: int) -> float:
    """Share of the corrected cells whose mean over their windows (as the map averages) is the new class."""
    ok = 0
    n = 0
    for (r, c), k in zip(cells, new_idx, strict=True):
        cover = [i for i, (wr, wc) in enumerate(wins) if wr <= r < wr + kh and wc <= c < wc + kw]
        if not cover:
            continue
        n += 1
        ok += int(np.asarray(win_probs)[cover].mean(0).argmax() == k)
    return ok / n if n else math.nan


def train_head(head, pools: Pools, feats: Features, chosen: Windows, corrections: Corrections, grid, steps: int,
               lr: float, batch_size: int, dev, rng: np.random.Generator, progress):
    """Adam on standardised features from the parent's head; yields progress; returns ``(stopped, steps run, norm)``.

    The standardisation is folded into the head's first layer before training (so it
    starts exactly from the parent) and must be folded back by the caller.
    """
    import torch

    kh, kw = grid.cells_per_window
    F = pools.features
    mean = F.mean(dim=(0, 2, 3))
    std = F.transpose(0, 1).reshape(F.shape[1], -1).std(1)
    std = torch.sqrt(std**2 + (1e-2 * float(std.mean())) ** 2 + 1e-12)
    with torch.no_grad():
        first = head.first
        w1 = first.weight.detach().cpu()
        b1 = first.bias.detach().cpu()
        first.bias.copy_((b1 + (w1.reshape(w1.shape[0], w1.shape[1]) * mean).sum(1)).to(first.bias))
        first.weight.copy_((w1 * std.view(1, -1, *([1] * (w1.dim() - 2)))).to(first.weight))
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
                agree = cells_agree(chosen.wins, p_now, cells, pools.new_idx.numpy(), kh, kw)
            if (yield progress(step, steps, float(loss.detach()), agree)) == STOP:
                stopped = "stopped by the user"
                break
    head.eval()
    return stopped, step, (mean, std)


def validation(parent_head, head, feats: Features, val_idx: list[int], classes, dev):
    """Accuracy and macro F1 on the parent's validation images, before and after (None without them)."""
    if feats.original is None or not len(feats.val_rows):
        return None, None
    import torch

    from ..train.evaluate import report_from_predictions

    vf = feats.original[torch.from_numpy(feats.val_rows), 0]
    y_true = feats.labels[val_idx].tolist()
    out = []
    for h in (parent_head, head):
        pred = head_batches(h, vf, dev).argmax(1).tolist()
        r = report_from_predictions(y_true, pred, classes)
        out.append({"accuracy": r.accuracy, "macro_f1": r.macro["f1"], "images": len(y_true)})
    return out[0], out[1]


#: Below this gap between its two most probable classes a cell is a tie: it has no class to keep or change.
TIE = 1e-3


def decided(probs) -> np.ndarray:
    """Which rows of ``(n, C)`` probabilities have a most probable class (not a tie)."""
    top2 = np.sort(np.asarray(probs, np.float64), axis=-1)[..., -2:]
    return np.nan_to_num(top2[..., 1] - top2[..., 0]) >= TIE


def drift(parent_probs, new_probs, chosen: Windows) -> tuple[float, int]:
    """Share of the held-out anchor windows (spread over the slide, never trained on; ties left out) whose class the
    new model changes, and how many there were: the change to expect outside the corrections."""
    held = chosen.held & decided(parent_probs)
    if not held.any():
        return math.nan, 0
    before = np.asarray(parent_probs)[held].argmax(1)
    after = np.asarray(new_probs)[held].argmax(1)
    return float((before != after).mean()), int(held.sum())


def repredict_region(class_map, grid, chosen: Windows, win_probs, rule):
    """The class map with the cells of the affected box recomputed from the new window probabilities."""
    from ..decision import decide
    from ..engine import CellAccumulator

    r0, r1, c0, c1 = chosen.box
    acc = CellAccumulator(grid, len(class_map.classes), box=chosen.box)
    inside = np.array([bool(chosen.region[int(r), int(c)]) for r, c in chosen.wins], bool)
    acc.add(chosen.wins[inside], np.asarray(win_probs)[inside])
    probs = class_map.probs.copy()
    region_p = acc.probabilities()
    upd = acc.counts > 0
    sub = probs[r0:r1, c0:c1]
    sub[upd] = region_p[upd]
    probs[r0:r1, c0:c1] = sub
    labels = class_map.labels.copy()
    quality = class_map.quality[r0:r1, c0:c1] if class_map.quality is not None else None
    covered_old = class_map.labels[r0:r1, c0:c1] > 0
    new_lab, _ = decide(probs[r0:r1, c0:c1], covered_old, tuple(class_map.classes), rule, quality)
    labels[r0:r1, c0:c1] = new_lab
    spread = class_map.view_spread
    if spread is not None:  # re-predicted from one view: the views' disagreement there is no longer known
        spread = spread.copy()
        spread[r0:r1, c0:c1][upd] = np.nan
    return dataclasses.replace(class_map, probs=probs, labels=labels, view_spread=spread,
                               repredicted=(int(r0), int(r1), int(c0), int(c1)))
