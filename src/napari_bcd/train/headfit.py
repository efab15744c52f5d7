"""Training the Table II head on cached features, fast: one tensor in memory, one gather per step.

The backbone is frozen, so every image's features (in its eight flips and
rotations) are computed once (:mod:`.features`) and held here as one
standardised ``images x views x C x h x w`` tensor.  A step gathers its
batch from that tensor and runs the 143,620-parameter head forward and back:
no per-sample copies, no Python loop over samples.

:class:`Recipe` says how long and how hard the head is pulled away from
where it starts (the linear probe, :mod:`.probe`); :func:`fit_head` runs it
and measures the held-out images every ``eval_every`` steps, so one run
gives the whole curve a recipe's number of steps is chosen from.
"""

from __future__ import annotations

import math
import time
from collections.abc import Generator
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    import torch

__all__ = ["FeatureBank", "FitProgress", "FitResult", "Recipe", "fit_head", "standardise"]


@dataclass(frozen=True)
class Recipe:
    """How the head is trained from its start.

    Attributes
    ----------
    steps
        Optimiser steps.
    lr, batch_size
        Adam's learning rate; samples per step.
    anchor
        Weight of an L2 pull of every parameter towards its starting value
        (the probe), per step: 0 lets the head wander, larger keeps it near
        the probe unless the data insists.
    balanced
        Samples drawn with equal weight per class (with replacement); else
        shuffled epochs, every sample once per epoch (the paper's).
    dropout
        Share of the feature channels dropped in each training sample (whole channels: the head learns not to
        lean on a few of them).
    weight_decay
        Decoupled weight decay (AdamW) towards zero.
    """

    steps: int = 300
    lr: float = 1e-3
    batch_size: int = 128
    anchor: float = 0.0
    balanced: bool = True
    dropout: float = 0.0
    weight_decay: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def describe(self) -> str:
        pull = f", pulled towards the probe ({self.anchor:g})" if self.anchor else ""
        drop = f", {self.dropout:.0%} of the features dropped" if self.dropout else ""
        decay = f", weight decay {self.weight_decay:g}" if self.weight_decay else ""
        return f"{self.steps} steps of Adam (lr {self.lr:g}, batch {self.batch_size}){pull}{drop}{decay}"


@dataclass
class FeatureBank:
    """Standardised features of a dataset's images, in memory as one tensor.

    Attributes
    ----------
    z
        ``images x views x C x h x w`` float32, standardised per channel with
        ``mean``/``std`` (from the training rows).
    labels
        ``images`` 0-based classes (a torch tensor).
    mean, std
        ``C`` per-channel statistics; folded into the head's first conv when
        a model is saved.
    """

    z: Any
    labels: Any
    mean: Any
    std: Any

    @property
    def views(self) -> int:
        return int(self.z.shape[1])


def standardise(bank: torch.Tensor, rows: np.ndarray, dtype: Any = None,
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(standardised bank, mean, std)``: per-channel statistics of ``rows`` over views and positions.

    ``dtype`` is the bank's (float32 by default; bfloat16 halves its memory
    and, with :func:`fit_head`'s autocast, the time of a step).

    A dead (constant) channel is not blown up on new images: its std is
    floored at 1 % of the typical std.
    """
    import torch

    c = bank.shape[2]
    s1 = torch.zeros(c, dtype=torch.float64)
    s2 = torch.zeros(c, dtype=torch.float64)
    n = 0
    for k in range(0, len(rows), 16):  # in chunks: no float64 copy of the whole bank
        f = bank[torch.from_numpy(np.asarray(rows[k : k + 16], np.int64))].to(torch.float64)
        f = f.transpose(0, 2).reshape(c, -1)
        s1 += f.sum(1)
        s2 += (f * f).sum(1)
        n += f.shape[1]
    mean = s1 / max(n, 1)
    var = (s2 / max(n, 1) - mean * mean).clamp_min(0)
    floor = 1e-2 * float(var.mean().sqrt()) + 1e-12
    std = (var + floor * floor).sqrt()
    mean32, std32 = mean.float(), std.float()
    z = torch.empty(bank.shape, dtype=dtype or torch.float32)
    for k in range(0, bank.shape[0], 16):
        z[k : k + 16] = (bank[k : k + 16].float() - mean32.view(1, 1, -1, 1, 1)) / std32.view(1, 1, -1, 1, 1)
    return z, mean32, std32


@dataclass(frozen=True)
class FitProgress:
    """One measurement of a head being trained.

    ``val_*`` are NaN without held-out images; ``fold`` is the cross-validation
    fold (1-based), 0 for a model trained on every image.
    """

    step: int
    steps: int
    train_loss: float
    val_loss: float = math.nan
    val_acc: float = math.nan
    fold: int = 0
    folds: int = 0
    recipe: str = ""
    seconds: float = 0.0


@dataclass
class FitResult:
    """The curve of one run and the head's state at each measured step (when kept)."""

    curve: list[FitProgress] = field(default_factory=list)
    states: dict[int, dict] = field(default_factory=dict)
    #: The held-out rows' logits at each measured step.
    logits: dict[int, np.ndarray] = field(default_factory=dict)
    stopped: bool = False
    seconds: float = 0.0


def _autocast(z):
    """bf16 autocast when the bank is bf16 (its matrix products then run in bf16, accumulating in fp32)."""
    import contextlib

    import torch

    if z.dtype != torch.bfloat16:
        return contextlib.nullcontext()
    return torch.autocast(z.device.type, dtype=torch.bfloat16)


def _evaluate(head, z, labels, rows: np.ndarray) -> tuple[float, float, np.ndarray]:
    import torch

    head.eval()
    with torch.inference_mode(), _autocast(z):
        idx = torch.from_numpy(rows)
        logits = torch.cat([head(z[idx[k : k + 256], 0]).float() for k in range(0, len(rows), 256)])
        y = labels[idx]
        loss = float(torch.nn.functional.cross_entropy(logits, y))
        pred = logits.argmax(1)
    head.train()
    return loss, float((pred == y).float().mean()), logits.numpy()


def fit_head(head, bank: FeatureBank, train_rows: np.ndarray, recipe: Recipe, *, seed: int = 0,
             val_rows: np.ndarray | None = None, eval_every: int = 25, keep_states: bool = False,
             fold: int = 0, folds: int = 0,
             ) -> Generator[FitProgress, Any, FitResult]:
    """Train ``head`` (in place) on ``train_rows`` of ``bank``; yields a :class:`FitProgress` per measurement.

    Every ``eval_every`` steps (and at step 0, the start) the held-out
    ``val_rows`` are measured on their identity view.  ``keep_states``
    keeps the head's state at each measurement (to ship the best).  Sending
    :data:`~napari_bcd.train.STOP` in ends the run at the next measurement.

    Returns
    -------
    FitResult
    """
    import torch

    from .._progress import STOP

    t0 = time.perf_counter()
    rng = np.random.default_rng(seed)
    train_rows = np.asarray(train_rows, np.int64)
    val_rows = np.asarray(val_rows if val_rows is not None else [], np.int64)
    labels = bank.labels
    views = bank.views
    n = len(train_rows) * views
    pairs_i = np.repeat(train_rows, views)
    pairs_t = np.tile(np.arange(views), len(train_rows))
    probs = None
    if recipe.balanced:
        y = labels[torch.from_numpy(pairs_i)].numpy()
        counts = np.bincount(y, minlength=int(labels.max()) + 1).astype(float)
        probs = 1.0 / counts[y]
        probs /= probs.sum()
    params = [p for p in head.parameters() if p.requires_grad]
    start = [p.detach().clone() for p in params]
    opt = (torch.optim.AdamW(params, lr=recipe.lr, weight_decay=recipe.weight_decay) if recipe.weight_decay
           else torch.optim.Adam(params, lr=recipe.lr))
    result = FitResult()
    head.train()

    def measure(step: int, train_loss: float) -> FitProgress:
        v_loss = v_acc = math.nan
        if len(val_rows):
            v_loss, v_acc, result.logits[step] = _evaluate(head, bank.z, labels, val_rows)
        if keep_states:
            result.states[step] = {k: v.detach().clone() for k, v in head.state_dict().items()}
        item = FitProgress(step, recipe.steps, train_loss, v_loss, v_acc, fold, folds, recipe.describe(),
                           time.perf_counter() - t0)
        result.curve.append(item)
        return item

    if (yield measure(0, math.nan)) == STOP:
        result.stopped = True
        return result
    running = 0.0
    queue = np.zeros(0, np.int64)
    for step in range(1, recipe.steps + 1):
        if probs is not None:
            pick = rng.choice(n, size=min(recipe.batch_size, n), replace=True, p=probs)
        else:  # shuffled epochs (the paper's): every sample once per epoch, the last batch of an epoch shorter
            if not len(queue):
                queue = rng.permutation(n)
            pick, queue = queue[: recipe.batch_size], queue[recipe.batch_size :]
        i = torch.from_numpy(pairs_i[pick])
        t = torch.from_numpy(pairs_t[pick])
        x = bank.z[i, t]
        if recipe.dropout:
            x = torch.nn.functional.dropout2d(x.float(), recipe.dropout, training=True).to(x.dtype)
        with _autocast(bank.z):
            logits = head(x)
        loss = torch.nn.functional.cross_entropy(logits.float(), labels[i])
        if recipe.anchor:
            loss = loss + recipe.anchor * sum(((p - p0) ** 2).sum() for p, p0 in zip(params, start, strict=True))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        running = 0.9 * running + 0.1 * float(loss.detach()) if step > 1 else float(loss.detach())
        if (step % eval_every == 0 or step == recipe.steps) and (yield measure(step, running)) == STOP:
            result.stopped = True
            break
    head.eval()
    result.seconds = time.perf_counter() - t0
    return result
