"""What the docks do, without Qt: the controllers the widgets are thin shells over.

* :mod:`.mapstate`: one class map, one truth (:class:`MapState`, :class:`MapStore`);
* :mod:`.classify`: the Classify dock's card, estimate and run (:class:`ClassifyController`);
* :mod:`.review`: what a retrain learns from, the map after it, the decision rule, Grad-CAM.

The Train dock's core is :func:`napari_bcd.train.regions.iter_train_from_regions`.
"""

from __future__ import annotations

from .classify import ClassifyController, Estimate, Stage
from .mapstate import MapState, MapStore

__all__ = ["ClassifyController", "Estimate", "MapState", "MapStore", "Stage"]
