"""Choosing the model to ship, on patients it has not seen: the tuned linear probe, or the head trained so long.

How validation is drawn (:func:`plan_validation`):

* **cross-validation over groups** (the default when the images carry
  patients, slides or regions): every image is predicted once by a model
  that never saw its group; the figure is the share of those predictions
  that are right, and the final model trains on every image;
* **a held-out set of groups** (the paper's protocol, or a split file):
  the model trained on the rest is the one shipped;
* **cross-validation over images** when no group is known: said plainly to
  be optimistic, and trusted to choose nothing but the probe's
  regularisation, towards the stronger (:mod:`.regularise`).

The candidates are the linear probe, its regularisation tuned inside each
fold on that fold's training images only (nested: the figure it is judged by
was not used to tune it), and, where validation is over groups, the head
after every ``eval_every`` steps of each :class:`~.headfit.Recipe`, started
from the fold's probe.  The simplest candidate within one standard error of
the best is chosen (the probe first, then fewer steps), so a head is shipped
only when it beats the probe by more than the noise of the validation: never
worse than the best-regularised linear model on new patients, as far as the
data can tell.  With validation over images only, no head is trained: the
probe is shipped, because nothing that can be measured there shows a more
complex model does better on new patients.
"""

from __future__ import annotations

import math
from collections.abc import Generator, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np

from .calibration import cross_entropy
from .headfit import FeatureBank, FitProgress, Recipe, fit_head, standardise
from .probe import ProbeHead, fit_probe_head
from .regularise import (
    LogisticProbe,
    Tuning,
    fit_logistic,
    inner_folds,
    pooled_features,
    training_rows,
    tune_c,
)
from .split import Split, group_folds, split_dataset

if TYPE_CHECKING:
    from .iciar import Dataset

__all__ = ["GROUP_FOLDS", "IMAGE_FOLDS", "Candidate", "Selection", "Validation", "plan_validation", "select_head"]


@dataclass(frozen=True)
class Validation:
    """How a training run is validated (see the module's text).

    Attributes
    ----------
    mode
        ``"cv"``, ``"holdout"`` or ``"none"``.
    folds
        ``(train rows, validation rows)`` per fold (one for a hold-out).
    split
        The hold-out :class:`~.split.Split` (None for cross-validation).
    grouped, group_kind, n_groups
        Whether no group is on both sides of any fold; what the groups are; how many.
    notes
        What a user should know.
    """

    mode: str
    folds: list[tuple[np.ndarray, np.ndarray]]
    split: Split | None
    grouped: bool
    group_kind: str = ""
    n_groups: int = 0
    notes: list[str] = field(default_factory=list)

    #: Per class, how many groups hold its images (when grouped).
    groups_per_class: dict[str, int] = field(default_factory=dict)

    @property
    def optimistic(self) -> bool:
        return self.mode != "none" and not self.grouped

    @property
    def too_few(self) -> bool:
        """Too few groups to promise anything about new patients: under 5 in all, or a class held by one."""
        return self.grouped and (self.n_groups < MIN_GROUPS or min(self.groups_per_class.values(), default=0) < 2)

    def too_few_text(self) -> str:
        """Why the figure promises little, in words ("" when there are enough groups)."""
        if not self.too_few:
            return ""
        kind = _plural(self.group_kind)
        single = sorted(k for k, n in self.groups_per_class.items() if n < 2)
        if single:
            return (f"{', '.join(single)}: the images come from one {_singular(self.group_kind)} only, so no model "
                    f"can be validated on a {_singular(self.group_kind)} it has not seen for "
                    f"{'it' if len(single) == 1 else 'them'}: the figure says nothing about new patients there. Add "
                    f"images from more {kind}.")
        return (f"Only {self.n_groups} {kind}: TOO FEW TO PROMISE ANYTHING about new patients; the spread across "
                f"folds is the size of the doubt.")

    @property
    def kind(self) -> str:
        """Short words for the card."""
        if self.mode == "cv":
            return f"cross-validation over {self.n_groups} {_plural(self.group_kind)}, {len(self.folds)} folds"
        if self.mode == "holdout" and self.split is not None:
            return self.split.kind
        return "none (all images train)"

    def describe(self) -> str:
        """How validation was drawn, in words a pathologist reads."""
        if self.mode == "cv" and not self.grouped:
            n = sum(len(v) for _, v in self.folds)
            return (f"each of {n} images predicted by a model trained on the others ({len(self.folds)}-fold "
                    f"cross-validation over images; no patient known, so optimistic); the model shipped is trained "
                    "on all of them")
        if self.mode == "cv":
            n = sum(len(v) for _, v in self.folds)
            return (f"each of {n} images predicted by a model that never saw its {_singular(self.group_kind)}: "
                    f"{len(self.folds)}-fold cross-validation over {self.n_groups} {_plural(self.group_kind)}; "
                    "the model shipped is trained on all of them")
        if self.mode == "holdout" and self.split is not None:
            return self.split.describe()
        return "no validation: nothing shows what this model does on new images"

    def to_dict(self) -> dict[str, Any]:
        return {"mode": self.mode, "kind": self.kind, "grouped": self.grouped, "group_kind": self.group_kind,
                "groups": self.n_groups, "groups_per_class": dict(self.groups_per_class), "folds": len(self.folds),
                "optimistic": self.optimistic, "too_few": self.too_few, "description": self.describe(),
                "notes": list(self.notes)}


#: Fewer groups than this promise little about new patients (said in the report).
MIN_GROUPS = 5


def _plural(kind: str) -> str:
    return f"{kind}s" if kind and kind != "group" else "groups"


def _singular(kind: str) -> str:
    return kind if kind and kind != "group" else "group"


#: Cross-validation folds by default: over groups, 10 (fewer when there are fewer groups); over images, 5.  A fold
#: over groups trains on fewer patients than the shipped model, so its figure is pessimistic, and less so the more
#: folds: measured on simulated new patients (real H&E DenseNet121, the logistic regression at a fixed C, 12 draws),
#: the grouped figure fell short of new-patient accuracy by 0.060 / 0.106 at 50 / 80 images per class with 5 folds,
#: 0.035 / 0.053 with 10 (whole runs, one draw: 0.091 / 0.166 against 0.041 / 0.094), for 1.5-2x the heads'
#: training.  Over images more folds would only make an optimistic figure more so.
GROUP_FOLDS, IMAGE_FOLDS = 10, 5


def plan_validation(dataset: Dataset, *, val_fraction: float = 0.2, seed: int = 0, split: Any = None,
                    mode: str = "auto", folds: int | None = None) -> Validation:
    """How to validate: cross-validation over groups (or over images when none is known), a hold-out, or nothing
    (see the module's text).

    ``mode``: ``"auto"`` or ``"cv"`` (cross-validation unless a split is given), or ``"holdout"``.  ``folds``: at
    most this many (None: :data:`GROUP_FOLDS` over groups, :data:`IMAGE_FOLDS` over images).
    """
    from ..errors import DatasetError

    if mode not in ("auto", "cv", "holdout"):
        raise DatasetError(f"Unknown validation {mode!r}; use auto, cv or holdout.")
    grouped_data = dataset.groups is not None
    folds = folds or (GROUP_FOLDS if grouped_data else IMAGE_FOLDS)
    per_class = _groups_per_class(dataset) if grouped_data else {}
    if split is None and val_fraction > 0 and mode in ("cv", "auto"):
        # over groups; over images (stratified: every class in every fold's training, none held out alone) without
        fl = (group_folds(dataset.labels, dataset.groups, dataset.classes, folds, seed) if grouped_data
              else inner_folds(dataset.labels, None, dataset.classes, folds, seed))
        if fl:
            # by images: the description says it is optimistic, the verdict why and what to do (not a third time)
            kind = dataset.group_kind or "group" if grouped_data else "image"
            v = Validation("cv", fl, None, grouped_data, kind, dataset.n_groups if grouped_data else len(dataset),
                           [], per_class)
            if v.too_few:
                v.notes.append(v.too_few_text())
            return v
        if mode == "cv":
            raise DatasetError("Cross-validation needs images from at least two groups; there are fewer.")
    s = split_dataset(dataset, val_fraction, seed, split)
    if not s.val:
        return Validation("none", [], s, s.grouped, s.group_kind, dataset.n_groups, list(s.notes), per_class)
    fold = [(np.asarray(s.train, np.int64), np.asarray(s.val, np.int64))]
    v = Validation("holdout", fold, s, s.grouped, s.group_kind, dataset.n_groups, list(s.notes), per_class)
    if v.too_few:
        v.notes.append(v.too_few_text())
    return v


def _groups_per_class(dataset: Dataset) -> dict[str, int]:
    groups = np.asarray(dataset.groups, dtype=object)
    labels = np.asarray(dataset.labels)
    return {name: len(set(groups[labels == k])) for k, name in enumerate(dataset.classes) if (labels == k).any()}


@dataclass
class Candidate:
    """One way to finish: the probe (``recipe`` None, step 0) or a recipe's head after ``step`` steps."""

    recipe: Recipe | None
    step: int
    correct: int = 0
    seen: int = 0
    loss_sum: float = 0.0
    fold_acc: list[float] = field(default_factory=list)

    @property
    def is_probe(self) -> bool:
        return self.recipe is None

    @property
    def accuracy(self) -> float:
        return self.correct / self.seen if self.seen else math.nan

    @property
    def loss(self) -> float:
        return self.loss_sum / self.seen if self.seen else math.nan

    @property
    def standard_error(self) -> float:
        """Of the accuracy: the spread over folds, or the binomial error of one hold-out."""
        if len(self.fold_acc) > 1:
            return float(np.std(self.fold_acc, ddof=1) / math.sqrt(len(self.fold_acc)))
        p = self.accuracy
        return math.sqrt(max(p * (1 - p), 1e-12) / max(self.seen, 1))

    def describe(self) -> str:
        if self.is_probe:
            return "the simple classifier (the head set to a logistic regression)"
        return f"the trained head ({self.step} steps, {self.recipe.describe()})"


@dataclass
class Selection:
    """The candidates measured on held-out groups and the one chosen.

    Attributes
    ----------
    chosen, probe
        The chosen candidate, and the probe's (for comparison).
    predictions
        Per dataset row: the chosen candidate's held-out prediction (-1 where
        never held out); its logits in ``logits``.
    states
        The hold-out's head states by step (a hold-out ships the model trained without its validation images).
    probe_head
        The hold-out's probe (fitted on its training rows).
    """

    candidates: list[Candidate]
    chosen: Candidate
    probe: Candidate
    predictions: np.ndarray
    logits: np.ndarray
    fold_accuracy: list[float] = field(default_factory=list)
    states: dict[int, dict] = field(default_factory=dict)
    probe_head: ProbeHead | None = None
    bank: FeatureBank | None = None
    stopped: bool = False
    held_out: np.ndarray | None = None
    probe_predictions: np.ndarray | None = None
    #: ``(recipe index, step)`` of the chosen head in ``states``; None for the probe.
    key: tuple[int, int] | None = None
    #: The probe's regularisation as chosen inside each fold (on that fold's training images only).
    fold_c: list[float] = field(default_factory=list)
    #: The hold-out's tuned probe and its tuning (a hold-out ships the model trained without its validation images).
    logistic: LogisticProbe | None = None
    tuning: Tuning | None = None
    #: Whether heads were measured (not with validation over images only).
    heads_measured: bool = True


def select_head(bank_raw, labels: np.ndarray, n_classes: int, validation: Validation, recipes: Sequence[Recipe],
                make_head, *, seed: int = 0, eval_every: int = 25, dtype: Any = None, probe_start: bool = True,
                standardise_features: bool = True, criterion: str = "accuracy", groups: Sequence[str] | None = None,
                classes: Sequence[str] = (), grid: Sequence[float] | None = None, stain_view: int | None = None,
                ) -> Generator[FitProgress, Any, Selection]:
    """Measure the tuned probe and each recipe's head on every fold; choose (see the module's text).

    Parameters
    ----------
    bank_raw
        ``images x views x C x h x w`` backbone features (rows = ``labels``' rows).
    make_head
        A callable giving a fresh, seeded Table II head.
    probe_start
        Start each head from the fold's probe (else from ``make_head``'s weights).
    standardise_features
        Standardise per channel with each fold's training statistics (else the raw features).
    criterion
        ``"accuracy"``: the simplest candidate within one standard error of the
        best; ``"loss"``: the lowest held-out loss (the paper's best epoch), the
        probe not among the candidates.
    groups, classes
        Each row's group (None when unknown) and the class names: the probe's regularisation is tuned inside
        each fold over these groups, or over images with the one-standard-error rule.
    grid
        The probe's regularisation grid (:data:`~.regularise.PROBE_CS`).
    stain_view
        The bank's view of the stain-jittered identity (stain augmentation): the probe trains on it too.
    """

    from .._progress import STOP
    from .regularise import PROBE_CS

    labels = np.asarray(labels, np.int64)
    holdout = validation.mode == "holdout"
    heads = bool(recipes) and (validation.grouped or criterion == "loss")
    probe_c = Candidate(None, 0)
    cands: dict[tuple[int, int], Candidate] = {}
    n = len(labels)
    oof_logits: dict[tuple[int, int] | None, np.ndarray] = {}
    sel = Selection([], probe_c, probe_c, np.full(n, -1), np.zeros((n, n_classes)), heads_measured=heads)
    pooled = pooled_features(bank_raw)
    extra = pooled_features(bank_raw, first=stain_view) if stain_view else None
    g = np.asarray(groups, dtype=object) if groups is not None else None
    k = len(validation.folds)
    for f, (train_rows, val_rows) in enumerate(validation.folds, start=1):
        inner_groups, inner_classes = None if g is None else g[train_rows], classes or range(n_classes)
        inner = inner_folds(labels[train_rows], inner_groups, inner_classes, seed=seed)
        tuning = tune_c(pooled[train_rows], labels[train_rows], inner, n_classes, grouped=g is not None,
                        grid=grid or PROBE_CS, seed=seed,
                        extra=extra[train_rows] if extra is not None else None)
        logistic = fit_logistic(*training_rows(pooled, labels, train_rows, extra), tuning.chosen, n_classes,
                                seed=seed)
        pl = logistic.logits(pooled[val_rows])
        _tally(probe_c, pl, labels[val_rows])
        oof_logits.setdefault(None, np.zeros((n, n_classes)))[val_rows] = pl
        sel.fold_c.append(tuning.chosen)
        if holdout:
            sel.logistic, sel.tuning = logistic, tuning
        if not heads:
            yield FitProgress(0, 0, math.nan, probe_c.loss, probe_c.accuracy, f if not holdout else 0,
                              k if not holdout else 0, "the probe")
            continue
        bank = _fold_bank(bank_raw, labels, train_rows, dtype, standardise_features)
        probe, _ = fit_probe_head(bank.z, train_rows, labels, n_classes, seed=seed, c=tuning.chosen)
        if holdout:
            sel.probe_head, sel.bank = probe, bank
        for r_i, recipe in enumerate(recipes):
            head = make_head()
            if probe_start:
                probe.fold_into(head)
            gen = fit_head(head, bank, train_rows, recipe, seed=seed, val_rows=val_rows, eval_every=eval_every,
                           keep_states=holdout, fold=f if not holdout else 0, folds=k if not holdout else 0)
            try:
                item = next(gen)
                while True:
                    request = yield item
                    if request == STOP:
                        sel.stopped = True
                    item = gen.send(STOP if sel.stopped else None)
            except StopIteration as stop:
                fit = stop.value
            for step, pred_logits in fit.logits.items():
                if step == 0:
                    continue  # the start: the probe (counted once above) or an untrained head
                c = cands.setdefault((r_i, step), Candidate(recipe, step))
                _tally(c, pred_logits, labels[val_rows])
                oof_logits.setdefault((r_i, step), np.zeros((n, n_classes)))[val_rows] = pred_logits
            if holdout:
                sel.states.update({(r_i, s): st for s, st in fit.states.items()})
            if sel.stopped:
                break
        if sel.stopped:
            break
    sel.candidates = [probe_c, *cands.values()] if (probe_start or not heads) else list(cands.values())
    complete = [c for c in sel.candidates if c.seen == probe_c.seen]  # a stopped run measured some folds only
    if criterion == "loss" and heads:
        sel.chosen = min(complete, key=lambda c: c.loss) if complete else probe_c
    else:
        sel.chosen = _one_standard_error(complete or [probe_c])
    key = None if sel.chosen.is_probe else (list(recipes).index(sel.chosen.recipe), sel.chosen.step)
    held = np.zeros(n, bool)
    for _, va in validation.folds:
        held[va] = True
    sel.held_out = held
    sel.logits = oof_logits.get(key, oof_logits[None])
    sel.predictions = np.where(held, sel.logits.argmax(1), -1)
    sel.probe_predictions = np.where(held, oof_logits[None].argmax(1), -1)
    sel.fold_accuracy = list(sel.chosen.fold_acc)
    sel.probe = probe_c
    sel.key = key
    return sel


def _fold_bank(bank_raw, labels: np.ndarray, train_rows: np.ndarray, dtype, standardise_features: bool):
    import torch

    if standardise_features:
        z, mean, std = standardise(bank_raw, train_rows, dtype)
    else:
        c = bank_raw.shape[2]
        z = bank_raw.to(dtype or torch.float32)
        mean, std = torch.zeros(c), torch.ones(c)
    return FeatureBank(z, torch.as_tensor(labels), mean, std)


def _tally(c: Candidate, logits: np.ndarray, y: np.ndarray) -> None:
    pred = logits.argmax(1)
    ok = int((pred == y).sum())
    c.correct += ok
    c.seen += len(y)
    c.loss_sum += float(cross_entropy(logits, y).sum())
    c.fold_acc.append(ok / max(len(y), 1))


#: A head ships only when it beats the probe fold by fold beyond what the best of the heads measured would show by
#: chance: the mean paired difference must exceed its standard error times Student's t at a family-wise 5 % over the
#: head recipes tried (one-sided, Bonferroni; the steps of one recipe move together): with 5 folds and 3 recipes
#: 3.3 standard errors.  Measured on simulated patients (``benchmarks/bench_generalise.py``): at a fixed two
#: standard errors a head won its 5 folds by 0.097 +- 0.046 (2.1 SE) and lost on new patients (0.653 against the
#: probe's 0.753); at one, 0.51 against 0.65.
HEAD_FAMILY_ERROR = 0.05


def head_evidence(folds: int, heads: int) -> float:
    """How many standard errors of the paired fold differences a head must win by (:data:`HEAD_FAMILY_ERROR`
    over ``heads`` candidates; Student's t with ``folds - 1`` degrees of freedom, the normal with one hold-out)."""
    from scipy import stats

    p = 1.0 - HEAD_FAMILY_ERROR / max(heads, 1)
    return float(stats.t.ppf(p, folds - 1)) if folds > 1 else float(stats.norm.ppf(p))


def _one_standard_error(cands: list[Candidate]) -> Candidate:
    """The simplest candidate whose accuracy is within one standard error of the best (ties: lower loss); a head
    only where it beats the probe clearly (:func:`head_evidence`), the probe otherwise."""
    probe = next((c for c in cands if c.is_probe), None)
    best = max(cands, key=lambda c: (c.accuracy, -c.loss))
    heads = len({c.recipe for c in cands if not c.is_probe})  # recipes: the steps of one recipe move together
    if probe is not None and best is not probe and not _clearly_better(best, probe, heads):
        return probe
    bar = best.accuracy - best.standard_error

    def simplicity(c: Candidate) -> tuple:
        # the probe first; then fewer steps; then the recipe that pulls hardest towards the probe
        r = c.recipe
        return (not c.is_probe, c.step, -(r.anchor if r else 0.0), -(r.dropout if r else 0.0),
                -(r.weight_decay if r else 0.0))

    ok = [c for c in cands if c.accuracy >= bar - 1e-12]
    return min(ok, key=simplicity)


def _clearly_better(head: Candidate, probe: Candidate, heads: int = 1) -> bool:
    """Whether ``head`` beats ``probe`` on the same folds by more than :func:`head_evidence` standard errors of the
    per-fold differences (one hold-out: of the binomial error of the difference)."""
    if len(head.fold_acc) == len(probe.fold_acc) > 1:
        diff = np.asarray(head.fold_acc) - np.asarray(probe.fold_acc)
        se = float(diff.std(ddof=1) / math.sqrt(len(diff)))
        return float(diff.mean()) > head_evidence(len(diff), heads) * max(se, 1e-9)
    return head.accuracy - probe.accuracy > head_evidence(1, heads) * math.hypot(head.standard_error,
                                                                                 probe.standard_error)
