"""The sliding-window engine: a slide and a model in, a :class:`ClassMap` out, with progress.

:func:`iter_classify` (:mod:`.run`) reads tissue windows in threads
(:mod:`.producer`), runs the model on them in batches, sums window
probabilities onto cells (:mod:`.classmap`) and records what it did
(:mod:`.record`); :func:`plan_windows` (:mod:`.plan`) says what a run would do.
"""

from .classmap import CellAccumulator, ClassMap, ModelRef
from .plan import WindowPlan, plan_windows
from .record import Progress, RunRecord, StainCheck
from .run import classify, iter_classify, stain_check

__all__ = ["CellAccumulator", "ClassMap", "ModelRef", "Progress", "RunRecord", "StainCheck", "WindowPlan", "classify",
           "iter_classify", "plan_windows", "stain_check"]
