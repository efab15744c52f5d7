"""The linear probe: the honest baseline, and the head a model falls back to.

A *linear probe* is a logistic regression (scikit-learn) on the frozen
backbone's features averaged over the image: the simplest classifier those
features allow.  When the trained Table II head does worse than it on
patients it has not seen, the head has learnt the training patients rather
than the classes.

:class:`ProbeHead` is that probe in a form the Table II head computes
*exactly*: the probe's class scores at every position of the feature map,
pooled as the head pools (the midrange of each 2 x 2 block, i.e. the mean of
its largest and smallest score, averaged over the blocks, which on the
training images gives the same calls as the probe's average).  :meth:`ProbeHead.fold_into` writes it into a
:class:`~napari_bcd.model.head.Table2Head`, whose outputs are then the
probe head's probabilities (to float precision): the head training starts
from it, and a model whose trained head is no better ships it.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np

from .calibration import fit_temperature
from .evaluate import Report, report_from_predictions

if TYPE_CHECKING:
    import torch

__all__ = ["PROBE_WORDS", "ProbeHead", "ProbeResult", "fit_probe_head", "fit_temperature", "linear_probe"]

#: In words, for reports and cards.
PROBE_WORDS = "a simple classifier (logistic regression) on the averaged backbone features"


@dataclass
class ProbeResult:
    """The probe's validation report (None without validation data) and its cost."""

    report: Report | None
    train_accuracy: float
    seconds: float
    description: str = "logistic regression on average-pooled frozen features (scikit-learn, standardised)"
    #: The fitted scikit-learn pipeline (StandardScaler, LogisticRegression); not saved.
    pipeline: Any = field(default=None, repr=False)

    def to_dict(self) -> dict:
        return {
            "kind": self.description,
            "in_words": PROBE_WORDS,
            "validation_report": self.report.to_dict() if self.report is not None else None,
            "accuracy": self.report.accuracy if self.report is not None else None,
            "macro_f1": self.report.macro["f1"] if self.report is not None else None,
            "train_accuracy": self.train_accuracy,
            "seconds": self.seconds,
        }


def _logistic(seed: int, c: float = 1.0):
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    return make_pipeline(StandardScaler(), LogisticRegression(C=c, max_iter=2000, class_weight="balanced",
                                                              random_state=seed))


def linear_probe(
    train_x: np.ndarray,
    train_y: np.ndarray,
    val_x: np.ndarray | None,
    val_y: np.ndarray | None,
    classes: Sequence[str],
    *,
    seed: int = 0,
) -> ProbeResult:
    """Fit a logistic regression on pooled features and report it on validation.

    Parameters
    ----------
    train_x, val_x
        ``N x C`` pooled features (several views of an image may be several rows).
    train_y, val_y
        0-based class indices.
    classes
        Class names in index order.
    """
    t0 = time.perf_counter()
    clf = _logistic(seed)
    clf.fit(np.asarray(train_x, np.float32), np.asarray(train_y))
    train_acc = float((clf.predict(train_x) == train_y).mean())
    report = None
    if val_x is not None and val_y is not None and len(val_y):
        pred = clf.predict(np.asarray(val_x, np.float32))
        report = report_from_predictions(np.asarray(val_y).tolist(), pred.tolist(), classes)
    return ProbeResult(report, train_acc, time.perf_counter() - t0, pipeline=clf)


@dataclass
class ProbeHead:
    """The linear probe as the Table II head computes it (see the module's text).

    Attributes
    ----------
    weights, bias
        ``K x C`` and ``K``: the probe's class scores at one position of the
        (standardised) feature map, ``z = weights @ f + bias``, for the ``K``
        classes it saw in training (``present``).
    margin
        ``K``: added to ``z`` and to ``-z`` so both stay positive through the
        head's ReLUs (from the training features' range, with room to spare).
    present
        The 0-based class index of each of the ``K`` scores.
    n_classes
        The model's classes; one the probe never saw is never called.
    temperature
        Logits are divided by it (fitted on held-out groups, so the
        probabilities mean on new patients what they say); 1 by default.
    """

    weights: np.ndarray
    bias: np.ndarray
    margin: np.ndarray
    present: list[int]
    n_classes: int
    temperature: float = 1.0

    def pooled_scores(self, feats: torch.Tensor) -> torch.Tensor:
        """``N x K``: the probe's scores pooled as the head pools them: block midranges, averaged."""
        import torch
        import torch.nn.functional as F

        w = torch.as_tensor(self.weights, dtype=torch.float32, device=feats.device)
        b = torch.as_tensor(self.bias, dtype=torch.float32, device=feats.device)
        z = torch.einsum("nchw,kc->nkhw", feats.float(), w) + b.view(1, -1, 1, 1)
        top = F.max_pool2d(z, 2).flatten(2).mean(2)
        low = -F.max_pool2d(-z, 2).flatten(2).mean(2)
        return (top + low) / 2

    def logits(self, feats: torch.Tensor) -> torch.Tensor:
        """``N x n_classes`` logits of standardised features ``N x C x h x w`` (the folded head's, exactly)."""
        import torch

        s = self.pooled_scores(feats) / self.temperature
        out = torch.full((s.shape[0], self.n_classes), _ABSENT, dtype=s.dtype, device=s.device)
        out[:, self.present] = s
        return out

    def fold_into(self, head: Any) -> None:
        """Write the probe head into a :class:`~napari_bcd.model.head.Table2Head` (standardised inputs).

        Channels ``2k`` and ``2k + 1`` of the first conv carry ``z_k + m_k`` and
        ``-z_k + m_k``; the next four layers pass them on unchanged; after the
        2 x 2 max-pool they hold each block's ``max z_k + m_k`` and
        ``m_k - min z_k``, and the last Dense averages their difference over
        the blocks: the block midranges of ``z_k``.  The head's other channels
        keep their start and feed nothing, so training can still use them.
        """
        import torch

        k_all = self.weights.shape[0]
        n = 2 * k_all
        if n > min(head.conv2.out_channels, head.dense2.out_features):
            raise ValueError(f"{k_all} classes are too many for the Table II head to hold the probe.")
        with torch.no_grad():
            conv1 = head.conv1
            w = torch.as_tensor(self.weights, dtype=conv1.weight.dtype)
            b = torch.as_tensor(self.bias, dtype=conv1.weight.dtype)
            m = torch.as_tensor(self.margin, dtype=conv1.weight.dtype)
            conv1.weight[:n] = 0
            conv1.weight[0:n:2, :, 0, 0] = w
            conv1.weight[1:n:2, :, 0, 0] = -w
            conv1.bias[0:n:2] = b + m
            conv1.bias[1:n:2] = -b + m
            eye = torch.arange(n)
            for layer in (head.conv2, head.conv3, head.dense1, head.dense2):
                wl = layer.weight.view(layer.weight.shape[0], layer.weight.shape[1])
                wl[:n] = 0
                wl[:, :n] = 0
                wl[eye, eye] = 1.0
                layer.bias[:n] = 0
            out = head.out
            width = head.dense2.out_features
            blocks = out.in_features // width
            wo = out.weight.view(out.out_features, blocks, width)
            wo.zero_()
            out.bias.fill_(_ABSENT)
            scale = 1.0 / (2.0 * blocks * self.temperature)
            for r, cls in enumerate(self.present):
                wo[cls, :, 2 * r] = scale
                wo[cls, :, 2 * r + 1] = -scale
                out.bias[cls] = 0.0  # the margins cancel: (max z + m) - (m - min z)


#: The logit of a class the probe never saw in training: never called.
_ABSENT = -30.0


def fit_probe_head(bank: torch.Tensor, rows: np.ndarray, labels: np.ndarray, n_classes: int, *,
                   seed: int = 0, views: int = 1, c: float = 1.0) -> tuple[ProbeHead, Any]:
    """Fit the probe (scikit-learn) on the pooled features of ``rows``, and its exact Table II form.

    Parameters
    ----------
    bank
        ``images x views x C x h x w`` standardised features.
    rows
        The bank rows (images) to fit on; ``labels`` are the bank's labels (0-based, per row of the bank).
    c
        The regularisation (scikit-learn's ``C``), as tuned (:mod:`.regularise`).
    views
        Views per image the probe is fitted on: the identity view alone by default.  Averaged over the
        image, a flipped or rotated copy's features are a near-duplicate of the original's; fitting on
        eight near-copies of each image weakens the regression's regularisation eightfold, and measured on
        new simulated patients it cost 1-6 points (the head, whose weights differ by position, does learn
        from the views).  The margin is taken over every view of the bank.

    Returns
    -------
    (ProbeHead, the scikit-learn pipeline on average-pooled features)
    """
    import torch

    rows = np.asarray(rows, np.int64)
    y = np.repeat(np.asarray(labels, np.int64)[rows], views)
    pooled = torch.cat([bank[torch.from_numpy(rows[k : k + 64]), :views].float().mean(dim=(-2, -1))
                        for k in range(0, len(rows), 64)]).reshape(-1, bank.shape[2]).numpy()
    first = _logistic(seed, c)
    first.fit(pooled, y)
    scaler, lr = first[0], first[-1]
    coef = np.asarray(lr.coef_, np.float64) / np.asarray(scaler.scale_, np.float64)[None]
    intercept = np.asarray(lr.intercept_, np.float64) - coef @ np.asarray(scaler.mean_, np.float64)
    present = [int(c) for c in lr.classes_]
    if coef.shape[0] == 1 and len(present) == 2:  # scikit-learn's binary form: one row for the second class
        coef, intercept = np.stack([-coef[0] / 2, coef[0] / 2]), np.array([-intercept[0] / 2, intercept[0] / 2])
    wt = torch.as_tensor(coef, dtype=torch.float32)
    bt = torch.as_tensor(intercept, dtype=torch.float32).view(1, -1, 1, 1)
    zmax = np.zeros(len(present))
    for k in range(0, len(rows), 32):
        f = bank[torch.from_numpy(rows[k : k + 32])].flatten(0, 1).float()
        z = torch.einsum("nchw,kc->nkhw", f, wt) + bt
        zmax = np.maximum(zmax, z.abs().amax(dim=(0, 2, 3)).double().numpy())
    probe = ProbeHead(coef, intercept, 2.0 * zmax + 1.0, present, n_classes)
    return probe, first
