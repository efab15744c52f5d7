"""The paper, reproduced: its protocol on the BACH photos, two splits, one report.

The paper trains a frozen ImageNet ResNet152V2 with the Table II head (Adam,
lr 1e-4, batch 128, 25 epochs) on a random stratified 80/20 split of the 400
BACH photos and reports accuracy 96.47 %, precision 96.24 %, recall 96.63 %
and F1 97.18 %.  :func:`iter_reproduce` trains that protocol twice, on the
paper's random split and on the patient-aware split (a patient's photos on
one side only), puts both Table III reports beside the paper's claims with a
linear probe on the same features, and writes Markdown, JSON and confusion
matrices.  Features are computed once and shared by both runs.
"""

from __future__ import annotations

import json
import os
from collections.abc import Generator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .._fileio import check_output, output_file
from .finetune import TrainResult, iter_finetune
from .iciar import Dataset

__all__ = ["PAPER_CLAIMS", "ReproduceResult", "Stage", "iter_reproduce"]

#: The paper's reported figures (%), as printed.
PAPER_CLAIMS = {"accuracy": 96.47, "precision": 96.24, "recall": 96.63, "f1": 97.18}
SPLITS = {
    "random": ("random stratified 80/20 (the paper's)", None),
    "patient": ("patient-aware (eva's BACH split)", "bach-patient"),
}


@dataclass(frozen=True)
class Stage:
    """A step of the reproduction starts."""

    message: str


@dataclass
class ReproduceResult:
    """Both runs, the report files, and the model that should become the default."""

    runs: dict[str, TrainResult]
    report_md: Path
    report_json: Path
    best: str | None
    files: list[Path] = field(default_factory=list)

    @property
    def best_checkpoint(self) -> Path | None:
        return self.runs[self.best].checkpoint if self.best else None


def iter_reproduce(
    dataset: Dataset,
    out: str | os.PathLike[str],
    *,
    splits: tuple[str, ...] = ("random", "patient"),
    backbone: str = "resnet152v2",
    backbone_weights: str | os.PathLike[str] | None = "imagenet",
    input_px: tuple[int, int] = (256, 256),
    device: str | None = None,
    seed: int = 0,
    data_note: str = "",
    overwrite: bool = False,
) -> Generator[Any, Any, ReproduceResult]:
    """Train the paper's protocol on each split and write the comparison report.

    Parameters
    ----------
    dataset
        The BACH photos (:func:`~napari_bcd.train.read_iciar`).
    out
        Folder for the checkpoints (``paper-<split>.safetensors``),
        ``report.md``, ``report.json`` and ``confusion-<split>.png``.
    splits
        ``"random"`` and/or ``"patient"`` (needs the 400 official photos).
    backbone, backbone_weights, input_px
        The paper's by default; smaller ones serve tests and quick looks.
    data_note
        Where the data came from, for the report.
    overwrite
        Replace files of these names that napari-bcd did not write (a rerun replaces its own unchanged ones).
    """
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    replace = "any" if overwrite else "ours"
    from ..model.checkpoint import check_checkpoint_target

    for key in splits:  # before hours of training: nothing of the user's is in the way
        check_checkpoint_target(out / f"paper-{key}.safetensors", True if overwrite else "ours")
    for name in ("report.md", "report.json", *(f"confusion-{key}.png" for key in splits)):
        check_output(out / name, replace)
    runs: dict[str, TrainResult] = {}
    for key in splits:
        title, split = SPLITS[key]
        if split == "bach-patient" and not _is_official_bach(dataset):
            yield Stage(f"skipping the {title} split: it needs the 400 official BACH photos (100 per class)")
            continue
        yield Stage(f"training the paper's protocol on the {title} split")
        runs[key] = yield from iter_finetune(
            dataset, out=out / f"paper-{key}.safetensors", protocol="paper", split=split, backbone=backbone,
            backbone_weights=backbone_weights, input_px=input_px, device=device, seed=seed,
            name=f"paper-{key}-split", overwrite=True if overwrite else "ours",  # a rerun replaces its own
        )
    yield Stage("writing the report")
    files = []
    for key, r in runs.items():
        if r.report is not None:
            files.append(r.report.save_confusion_png(out / f"confusion-{key}.png", replace))
    eligible = {k: r for k, r in runs.items() if r.beats_chance}
    best = max(eligible, key=lambda k: eligible[k].report.accuracy) if eligible else None  # type: ignore[union-attr]
    doc = _report_json(dataset, runs, best, data_note)
    md = out / "report.md"
    js = out / "report.json"
    with output_file(js, "w", replace) as fh:
        json.dump(doc, fh, indent=2)
    with output_file(md, "w", replace) as fh:
        fh.write(_report_md(doc, runs))
    return ReproduceResult(runs, md, js, best, files)


def _is_official_bach(dataset: Dataset) -> bool:
    return len(dataset) == 400 and all(v == 100 for v in dataset.counts().values())


def _figures(r: TrainResult) -> dict[str, float] | None:
    if r.report is None:
        return None
    rep = r.report
    return {"accuracy": 100 * rep.accuracy, "precision": 100 * rep.macro["precision"],
            "recall": 100 * rep.macro["recall"], "f1": 100 * rep.macro["f1"],
            "weighted_f1": 100 * rep.weighted["f1"],
            "probe_accuracy": 100 * r.probe.report.accuracy if r.probe and r.probe.report else None}


def _report_json(dataset: Dataset, runs: dict[str, TrainResult], best: str | None, data_note: str) -> dict:
    card = next(iter(runs.values())).card
    return {
        "paper_claims_percent": PAPER_CLAIMS,
        "data": {"root": str(dataset.root), "counts": dataset.counts(), "images": len(dataset), "note": data_note},
        "model": {"backbone": card.backbone if card else None,
                  "backbone_weights": card.backbone_weights if card else None,
                  "input_px": list(card.input_px) if card else None},
        "protocol": card.record.protocol if card else None,
        "runs": {
            key: {
                "split": SPLITS[key][0],
                "checkpoint": str(r.checkpoint) if r.checkpoint else None,
                "train_images": r.card.record.split["train"] if r.card else None,
                "val_images": r.card.record.split["val"] if r.card else None,
                "figures_percent": _figures(r),
                "table3": r.report.to_dict() if r.report else None,
                "probe": r.probe.to_dict() if r.probe else None,
                "hyperparameters": r.card.record.hyperparameters if r.card else None,
            }
            for key, r in runs.items()
        },
        "default_model": best,
    }


def _report_md(doc: dict, runs: dict[str, TrainResult]) -> str:
    keys = list(runs)
    head = "| | the paper | " + " | ".join(f"{SPLITS[k][0]} split" for k in keys) + " |"
    lines = [
        "# The paper's model, reproduced",
        "",
        f"Backbone {doc['model']['backbone']} ({doc['model']['backbone_weights']}), Table II head, input "
        f"{doc['model']['input_px']} px; protocol: {doc['protocol']['description'] if doc['protocol'] else ''}.",
        f"Data: {doc['data']['images']} photos ({', '.join(f'{k} {v}' for k, v in doc['data']['counts'].items())})"
        + (f"; {doc['data']['note']}" if doc["data"]["note"] else "") + ".",
        "",
        head,
        "|---|---|" + "---|" * len(keys),
    ]
    rows = (("accuracy", "accuracy"), ("precision (macro)", "precision"), ("recall (macro)", "recall"),
            ("F1 (macro)", "f1"), ("F1 (weighted)", "weighted_f1"), ("simple classifier (linear probe) accuracy",
                                                                "probe_accuracy"))
    for label, key in rows:
        cells = []
        for k in keys:
            fig = doc["runs"][k]["figures_percent"]
            v = fig.get(key) if fig else None
            cells.append("—" if v is None else f"{v:.2f} %")
        paper = PAPER_CLAIMS.get(key)
        lines.append(f"| {label} | {'—' if paper is None else f'{paper:.2f} %'} | " + " | ".join(cells) + " |")
    lines.append("")
    for k in keys:
        r = runs[k]
        lines += [f"## Table III — {SPLITS[k][0]} split", ""]
        if r.report is None:
            lines += ["No validation images: no report.", ""]
            continue
        lines += [f"{doc['runs'][k]['train_images']} photos trained, {doc['runs'][k]['val_images']} validated; "
                  f"kept after {r.steps} optimiser steps (the epoch with the lowest validation loss). {r.verdict()}",
                  "", "```text", r.report.to_text(), "```", "",
                  f"![confusion matrix, {k} split](confusion-{k}.png)", ""]
    lines += [
        "## Notes",
        "",
        "- The random split lets photos of one patient sit on both sides (BACH has several photos per patient), so "
        "its figures are optimistic; the patient-aware split keeps each patient on one side and is the honest "
        "estimate.",
        "- The paper's F1 (97.18 %) is above both its precision (96.24 %) and recall (96.63 %). Per class, F1 is at "
        "most the mean of precision and recall, so no macro or weighted average of F1 can exceed both averages: "
        "the printed figures cannot all hold together as stated.",
        "- The simple classifier (a linear probe: logistic regression on the averaged frozen features, same split) "
        "is the baseline any head should reach.",
        f"- Default model: {doc['default_model'] + ' split' if doc['default_model'] else 'none (no run beat chance)'} "
        "(the run with the higher validation accuracy among those that beat chance).",
        "",
    ]
    return "\n".join(lines)
