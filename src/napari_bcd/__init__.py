"""napari-bcd: breast cancer classification of H&E whole slides (ICIAR 2018 / BACH classes).

The public names are imported lazily, so ``import napari_bcd`` does not import
torch, Qt or napari (napari reads the plugin manifest at start-up).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from ._lazy import lazy_names
from ._version import __version__

# public name -> submodule that defines it
_LAZY: dict[str, str] = {
    "BcdError": "errors",
    "ClassMap": "engine",
    "Slide": "io.slide",
    "Summary": "summary",
    "TissueParams": "tissue",
    "ClassifySettings": "settings",
    "classify": "engine",
    "iter_classify": "engine",
    "load_model": "model",
    "open_slide": "io",
    "summarize": "summary",
    "write_outputs": "export",
    "Annotation": "annotations",
    "write_geojson": "annotations",
    "read_annotations": "annotations",
    "BACH_CLASSES": "classes",
    "CLASS_NAMES": "classes",
    "Classifier": "model",
    "ModelCard": "model",
    "Predictor": "model",
    "Preprocessing": "model",
    "ResNet152V2": "model",
    "build_classifier": "model",
    "choose_device": "model",
    "fetch_imagenet_weights": "model",
    "import_keras_weights": "model",
    "load_checkpoint": "model",
    "load_keras_weights": "model",
    "save_checkpoint": "model",
}

__all__ = ["__version__", *sorted(_LAZY)]

if TYPE_CHECKING:  # pragma: no cover
    from .annotations import Annotation, read_annotations, write_geojson
    from .classes import BACH_CLASSES, CLASS_NAMES
    from .engine import ClassMap, classify, iter_classify
    from .errors import BcdError
    from .export import write_outputs
    from .io import Slide, open_slide
    from .model import (
        Classifier,
        ModelCard,
        Predictor,
        Preprocessing,
        ResNet152V2,
        build_classifier,
        choose_device,
        fetch_imagenet_weights,
        import_keras_weights,
        load_checkpoint,
        load_keras_weights,
        load_model,
        save_checkpoint,
    )
    from .settings import ClassifySettings
    from .summary import Summary, summarize
    from .tissue import TissueParams


__getattr__, __dir__ = lazy_names(__name__, _LAZY, globals())
