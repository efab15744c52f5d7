"""Training from regions a pathologist drew on a slide: the field chosen, patches cut, the model trained.

:func:`suggest_field` picks the largest field (what one model input shows)
at which every annotated class yields windows, since realistic regions of
90-250 µm give nothing at a 256 µm field; :func:`iter_train_from_regions` is
the whole job as one generator (the Train dock runs it): the windows per
class first (:class:`RegionCheck`), then the patches, then
:func:`~.finetune.iter_finetune`, which validates on regions the model was
not trained on.
"""

from __future__ import annotations

import os
from collections.abc import Generator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .._progress import STOP
from ..errors import BcdError
from .patches import PatchPlan, iter_export_patches, plan_patches

__all__ = ["FIELDS_UM", "MIN_WINDOWS", "RegionCheck", "iter_train_from_regions", "suggest_field"]

#: The fields (µm, square) tried when none is chosen, largest first: a larger field shows more context.
FIELDS_UM = (256.0, 200.0, 160.0, 128.0, 100.0, 64.0)
#: Windows per class a field must give to be chosen (fewer leave a class almost nothing to learn from).
MIN_WINDOWS = 4


@dataclass(frozen=True)
class RegionCheck:
    """Windows per class with the field and coverage in use (the first thing a run yields)."""

    plan: PatchPlan
    chosen: bool = False

    @property
    def message(self) -> str:
        fh, fw = self.plan.field_um
        how = " (chosen from the regions)" if self.chosen else ""
        return f"field {fh:.0f} x {fw:.0f} µm{how}; windows per class: " + self.plan.table()


def suggest_field(slide, annotations: Sequence, *, coverage: float = 0.5, stride: float = 1.0,
                  fields: Sequence[float] = FIELDS_UM, min_windows: int = MIN_WINDOWS) -> PatchPlan:
    """The plan of the largest field in ``fields`` at which every annotated class yields ``min_windows``
    windows; when none does, the one whose poorest class yields most (ties: the larger field)."""
    best: PatchPlan | None = None
    for f in fields:
        plan = plan_patches(slide, annotations, field_um=(f, f), coverage=coverage, stride=stride)
        poorest = min((plan.counts.get(k, 0) for k in plan.regions), default=0)
        if poorest >= min_windows:
            return plan
        if best is None or poorest > min((best.counts.get(k, 0) for k in best.regions), default=0):
            best = plan
    assert best is not None
    return best


def iter_train_from_regions(slide, annotations: Sequence, out: str | os.PathLike[str], *,
                            field_um: tuple[float, float] | None = None, coverage: float = 0.5, stride: float = 1.0,
                            patches: str | os.PathLike[str] | None = None, plan: PatchPlan | None = None,
                            **train: Any) -> Generator[Any, Any, Any]:
    """Patches from the regions, then a trained model; yields progress, returns the
    :class:`~.finetune.TrainResult` (None when stopped before training).

    Parameters
    ----------
    field_um
        What one window shows; None: :func:`suggest_field`.
    patches
        The ICIAR folder the patches go to (default ``<out>-patches`` beside the model).
    plan
        A plan already made (the dock's count before Train), reused.
    train
        :func:`~.finetune.iter_finetune`'s options (protocol, backbone, backbone_weights...).

    Raises
    ------
    BcdError
        Before any feature is computed: a class with regions but no window (with what to do).
    """
    from ..model.backbones import PAPER_BACKBONE, check_backbone_weights
    from ..model.checkpoint import check_checkpoint_target
    from .finetune import iter_finetune
    from .iciar import read_iciar

    out = Path(out)
    # what would stop the training stops the job now, not after the patches are cut
    check_checkpoint_target(out, train.get("overwrite", False))
    check_backbone_weights(train.get("backbone", PAPER_BACKBONE), train.get("backbone_weights", "imagenet"))
    chosen = plan is None and field_um is None
    if plan is None:
        plan = (suggest_field(slide, annotations, coverage=coverage, stride=stride) if field_um is None else
                plan_patches(slide, annotations, field_um=field_um, coverage=coverage, stride=stride))
    if (yield RegionCheck(plan, chosen)) == STOP:
        return None
    if plan.empty_classes:
        raise BcdError(plan.advice())
    folder = Path(patches) if patches is not None else out.with_name(f"{out.stem}-patches")
    export = iter_export_patches(slide, annotations, folder, field_um=plan.field_um, plan=plan)
    try:
        item = next(export)
        while True:
            if (yield item) == STOP:
                export.close()
                return None
            item = next(export)
    except StopIteration:
        pass
    return (yield from iter_finetune(read_iciar(folder), out=out, **train))
