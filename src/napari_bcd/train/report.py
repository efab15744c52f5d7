"""What a training run means, in a pathologist's words: one text for the command line and the Train dock."""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .result import TrainResult

__all__ = ["report_lines", "verdict"]

#: The linear probe, glossed once for people who do not train models.
PROBE_GLOSS = ("the simple classifier is a logistic regression on the averaged backbone features, the baseline any "
               "trained model must beat; "
               "'chance' always answers the most common class")


def verdict(result: TrainResult) -> str:
    """The figures in one paragraph: what new patients can expect, against the simple classifier and chance, which
    model was saved and why, and how much doubt the figure carries."""
    if result.checkpoint is None:
        return "Nothing was trained."
    v = result.validation
    if result.report is None:
        return ("No validation: no image could be held out, so nothing shows what this model does on new patients. "
                "Add images (or regions) from more patients, slides or regions. " + (result.why or "")).strip()
    acc = result.report.accuracy
    where = _where(v)
    few = v is not None and v.too_few
    if few and min(v.groups_per_class.values(), default=0) < 2:
        # a class of one patient is held out only from models that never saw the class: no figure means anything
        return " ".join(x for x in (f"No estimate for new patients: {v.too_few_text()}", result.why) if x)
    if v is not None and v.optimistic:
        head = f"Accuracy {acc:.1%} on held-out images ({where})."
    elif few:
        head = f"Accuracy on held-out {_plural(v)}: {acc:.1%} ({where})."
    else:
        head = f"Expected accuracy on new patients: {acc:.1%} ({where})."
    if len(result.fold_accuracy) > 1:
        import numpy as np

        folds = np.asarray(result.fold_accuracy)
        head += (f" Across the {len(folds)} folds: {folds.mean():.1%} ± {folds.std(ddof=1):.1%} (from {folds.min():.0%}"
                 f" to {folds.max():.0%}).")
    parts = [head]
    if few:
        parts.append(v.too_few_text())
    p = result.probe.report.accuracy if result.probe is not None and result.probe.report is not None else None
    if p is not None:
        parts.append(f"The simple classifier: {p:.1%}; chance: {result.chance:.1%}.")
    if result.why:
        parts.append(result.why)
    if result.head_below_probe and result.shipped == "head":
        parts.append("The head does WORSE than the simple classifier: it has not learnt what the features hold "
                     "(the auto protocol, or more images from more patients, usually helps).")
    if not result.beats_chance:
        parts.append("It does not beat chance.")
    if v is not None and v.optimistic:
        parts.append(f"CAUTION: this figure is optimistic. {_shared(v)}: expect less on new patients." + (
            "" if v.n_groups and v.group_kind != "image" else
            " Say which patient each image comes from (a third column in microscopy_ground_truth.csv, a groups file "
            "or a file-name pattern) to measure it on patients it has not seen."))
    return " ".join(x for x in parts if x)


def _where(v) -> str:
    """How the figure was measured, briefly where the verdict says the rest (an optimistic one's why, below)."""
    if v is None:
        return "held-out images"
    if not v.optimistic:
        return v.describe()
    if v.mode == "cv":
        return (f"each of {sum(len(f[1]) for f in v.folds)} predicted by a model trained on the others, "
                f"{len(v.folds)}-fold cross-validation over images")
    n = len(v.split.val) if v.split is not None else 0
    if v.split is not None and v.split.kind.startswith("file:"):
        return f"the {n} that {v.split.kind[5:]} lists"
    return f"{n} drawn at random"


def _shared(v) -> str:
    """Why an optimistic figure is: what validation shares with training."""
    if v.split is not None and v.split.kind.startswith("file:"):
        if v.n_groups and v.group_kind != "image":
            return f"The split file puts some {_plural(v)} on both sides, so validation shares them with training"
        return "The split file's validation images may share patients with the training images"
    return "No patient, slide or region was known, so the validation images share patients with the training images"


def _plural(v) -> str:
    kind = v.group_kind or "group"
    return f"{kind}s" if kind != "group" else "groups"


def report_lines(result: TrainResult) -> list[str]:
    """The report under the verdict: how it was validated, the simple classifier, the per-class table."""
    lines: list[str] = []
    card = result.card
    if card is not None:
        lines.append(f"pixels    {card.preprocessing.describe()} ({card.record.preprocessing_source or 'given'})")
    if result.validation is not None:
        lines.append(f"validated {result.validation.describe()}")
    if result.probe is not None and result.probe.report is not None:
        p = result.probe.report
        lines.append(f"simple classifier: accuracy {p.accuracy:.4f}, macro F1 {p.macro['f1']:.4f}")
        lines.append(f"({PROBE_GLOSS})")
    if result.tuning is not None:
        lines.append(f"its {result.tuning.describe()}")
    if result.report is not None:
        lines += ["", "the model saved, on the held-out images:", result.report.to_text()]
    t = result.timings
    if t:
        per = ""
        head_s = t.get("choosing", 0.0) + t.get("final", 0.0)
        if t.get("steps"):
            per = f" ({int(t['steps']):,} head steps, {100 * head_s / t['steps']:.1f} s per 100)"
        lines.append("time      " + ", ".join(f"{k} {t[k]:.1f} s" for k in ("features", "choosing", "final", "saving")
                                              if k in t) + per)
    for note in result.notes:
        lines.append(f"note: {note}")
    return lines
