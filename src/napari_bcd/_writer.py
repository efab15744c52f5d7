"""npe2 writers: Labels -> TIFF with resolution; Labels or Shapes -> QuPath GeoJSON."""

from __future__ import annotations

import logging
from typing import Any

import numpy as np

from ._fileio import atomic_path
from .classes import class_styles

__all__ = ["labels_to_annotations", "write_geojson_labels", "write_geojson_shapes", "write_labels_tiff"]

log = logging.getLogger(__name__)


def _mpp_of(meta: dict) -> tuple[float, float]:
    """µm per pixel from a layer's scale; napari-bcd layers are in µm."""
    scale = meta.get("scale")
    if scale is None:
        return (1.0, 1.0)
    return (float(scale[-2]), float(scale[-1]))


def _classes_of(meta: dict, data: Any) -> tuple[str, ...]:
    """The classes a napari-bcd Labels layer was made with (its metadata); a Labels layer made otherwise has classes
    named by its values ("1", "2"...), never another model's."""
    classes = ((meta.get("metadata") or {}).get("napari_bcd") or {}).get("classes")
    if classes:
        return tuple(classes)
    top = int(np.max(np.asarray(data))) if np.asarray(data).size else 0
    return tuple(str(v) for v in range(1, max(top, 2) + 1))


def write_labels_tiff(path: str, data: Any, meta: dict) -> list[str]:
    """A Labels layer as a palette TIFF whose resolution tags carry the layer's scale (µm/px)."""
    import tifffile

    arr = np.asarray(data)
    if arr.ndim != 2:
        raise ValueError(f"Only 2-D labels can be written as TIFF, this layer is {arr.ndim}-D.")
    my, mx = _mpp_of(meta)
    kwargs: dict[str, Any] = {"resolution": (1e4 / mx, 1e4 / my), "resolutionunit": "CENTIMETER"}
    if arr.max(initial=0) < 256 and arr.min(initial=0) >= 0:
        arr = arr.astype(np.uint8)
        cmap = np.zeros((3, 256), np.uint16)
        for st in class_styles(_classes_of(meta, arr)):
            cmap[:, st.label] = np.asarray(st.color, np.uint16) * 257
        kwargs.update(photometric="palette", colormap=cmap)
    translate = meta.get("translate")
    desc = {"napari_bcd": True, "scale_um": [my, mx],
            "translate_um": list(map(float, translate)) if translate is not None else [0, 0]}
    import json

    with atomic_path(path) as tmp:
        tifffile.imwrite(tmp, arr, compression="zlib", description=json.dumps(desc), metadata=None, **kwargs)
    return [path]


def labels_to_annotations(data: Any, meta: dict) -> list:
    """Polygons of every class region of a Labels layer, in level-0 pixels of its image.

    The layer's own ``scale``/``translate`` (µm) place its pixels; the image's
    µm/px and translate come from the napari-bcd metadata, or, for a layer drawn
    by hand (napari's new Labels layer takes the image's scale), from the
    layer itself: its pixels are then the image's pixels.
    """
    from .export import label_regions

    arr = np.asarray(data)
    sy, sx = _mpp_of(meta)
    ty, tx = (float(v) for v in (meta.get("translate") or (0.0, 0.0))[-2:])
    info = (meta.get("metadata") or {}).get("napari_bcd") or {}
    img_mpp = info.get("image_mpp") or (sy, sx)
    img_t = info.get("image_translate") or ((0.0, 0.0) if info.get("image_mpp") else (ty, tx))
    # Layer pixel i spans world [t + (i - 0.5) s, t + (i + 0.5) s); image pixel p is centred at p * mpp + image_t,
    # so world w is the level-0 coordinate (w - image_t) / mpp + 0.5 (pixel p spans [p, p + 1)).
    origin = ((ty - 0.5 * sy - img_t[0]) / img_mpp[0] + 0.5, (tx - 0.5 * sx - img_t[1]) / img_mpp[1] + 0.5)
    step = (sy / img_mpp[0], sx / img_mpp[1])
    return label_regions(arr, _classes_of(meta, arr), origin_px=origin, step_px=step)


def write_geojson_labels(path: str, data: Any, meta: dict) -> list[str]:
    """A Labels layer's class regions as QuPath GeoJSON (level-0 pixels of the image)."""
    from .annotations import write_geojson

    write_geojson(labels_to_annotations(data, meta), path, overwrite=True)
    return [path]


def write_geojson_shapes(path: str, data: Any, meta: dict) -> list[str]:
    """A Shapes layer (with a ``class`` feature) as QuPath GeoJSON."""
    from .annotations import write_geojson
    from .annotations.napari import shapes_data_to_annotations

    write_geojson(shapes_data_to_annotations(data, meta), path, overwrite=True)
    return [path]
