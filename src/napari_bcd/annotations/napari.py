"""Annotations <-> napari Shapes layers (Qt-free: plain layer data tuples).

Coordinates: an :class:`Annotation` is in level-0 pixels where pixel ``i``
spans ``[i, i + 1)`` (QuPath's and ImageScope's convention); napari puts
pixel *centres* at integer data coordinates.  So shape data = level-0
coordinates - 0.5, and the Shapes layer takes the image layer's ``scale``
(µm per pixel) and ``translate`` so both line up in world (µm) space.

Limits: napari Shapes have no holes.  A polygon with holes becomes its outer
ring plus one shape per hole with ``class`` = "hole" and ``parent`` = the
outer shape's index, so :func:`shapes_to_annotations` can put them back; a
hole drawn by hand in napari can be marked the same way.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import numpy as np

from ..classes import canonical_class, class_styles, order_classes
from ..errors import AnnotationError
from .model import Annotation

if TYPE_CHECKING:
    from napari.layers import Image, Shapes

__all__ = ["annotations_to_shapes", "shapes_data_to_annotations", "shapes_to_annotations"]

HOLE = "hole"
_UNCLASSIFIED = (0.6, 0.6, 0.6, 1.0)


def _rgba(rgb: tuple[int, int, int] | None, alpha: float) -> tuple[float, float, float, float]:
    if rgb is None:
        return (*_UNCLASSIFIED[:3], alpha)
    return (rgb[0] / 255, rgb[1] / 255, rgb[2] / 255, alpha)


def annotations_to_shapes(
    annotations: Sequence[Annotation],
    scale: tuple[float, float] = (1.0, 1.0),
    translate: tuple[float, float] = (0.0, 0.0),
    name: str = "annotations",
    units: tuple[str, str] | None = None,
) -> tuple[list[np.ndarray], dict[str, Any], str]:
    """A napari Shapes layer-data tuple: polygons with ``class``, ``label`` and ``parent`` features.

    Parameters
    ----------
    annotations
        Regions in level-0 pixels.
    scale, translate
        The image layer's (µm per pixel, µm), so the shapes overlay it.
    units
        The image layer's units (napari warns when layers' units differ).
    """
    data: list[np.ndarray] = []
    classes: list[str] = []
    labels: list[str] = []
    parents: list[int] = []
    edge: list[tuple] = []
    face: list[tuple] = []
    # the classes these regions name, each in its vocabulary colour (or a palette's, in a stable order)
    styles = {st.name: st for st in class_styles(order_classes(a.class_name for a in annotations if a.class_name))}
    for a in annotations:
        outer = len(data)
        data.append(a.polygon - 0.5)
        st = styles.get(a.class_name) if a.class_name else None
        classes.append(st.display_name if st else "unclassified")
        labels.append(a.label)
        parents.append(-1)
        known = st.color if st is not None and st.iciar_id is not None else None
        rgb = known or a.color or (st.color if st else None)
        edge.append(_rgba(rgb, 1.0))
        face.append(_rgba(rgb, 0.25))
        for h in a.holes:
            data.append(h - 0.5)
            classes.append(HOLE)
            labels.append(a.label)
            parents.append(outer)
            edge.append((1.0, 1.0, 1.0, 1.0))
            face.append((1.0, 1.0, 1.0, 0.0))
    kwargs = {
        "name": name,
        "shape_type": ["polygon"] * len(data),
        "scale": tuple(scale),
        "translate": tuple(translate),
        "features": {"class": classes, "label": labels, "parent": parents},
        "edge_color": edge if edge else "white",
        "face_color": face if face else "transparent",
        "edge_width": _edge_width(data),
        # The class name on every region, so a pathologist reads what each outline is.
        "text": {"string": "{class}", "color": "white", "size": 10, "anchor": "upper_left"},
        "metadata": {"napari_bcd": {"annotations": True}},
    }
    if units is not None:
        kwargs["units"] = tuple(str(u) for u in units)
    return data, kwargs, "shapes"


def _edge_width(data: Sequence[np.ndarray]) -> float:
    """An outline that stays visible when the whole slide is on screen: 0.3 % of the regions' extent (data px)."""
    if not data:
        return 1.0
    pts = np.concatenate([np.asarray(d, float) for d in data])
    extent = float(np.max(pts.max(0) - pts.min(0)))
    return max(2.0, 0.003 * extent)


def shapes_data_to_annotations(
    data: Sequence[np.ndarray],
    meta: dict[str, Any],
    image_scale: tuple[float, float] | None = None,
    image_translate: tuple[float, float] = (0.0, 0.0),
    label_map: dict[str, str | int] | None = None,
) -> list[Annotation]:
    """Annotations from Shapes layer data and its state (``features``, ``shape_type``, ``scale``...).

    Shapes are mapped into the image's pixel space through world coordinates:
    ``image px = (data * scale + translate - image_translate) / image_scale + 0.5``.
    ``image_scale`` defaults to the Shapes layer's own scale (shapes drawn on
    the image they annotate).
    """
    n = len(data)
    features = meta.get("features")
    feats = _features_dict(features, n)
    types = meta.get("shape_type") or ["polygon"] * n
    scale = np.asarray(meta.get("scale") or (1.0, 1.0), float)[-2:]
    translate = np.asarray(meta.get("translate") or (0.0, 0.0), float)[-2:]
    iscale = np.asarray(image_scale if image_scale is not None else scale, float)[-2:]
    itrans = np.asarray(image_translate, float)[-2:]
    classes = feats.get("class") or [None] * n
    labels = feats.get("label") or [None] * n
    parents = feats.get("parent") or [-1] * n
    out: dict[int, Annotation] = {}
    holes: list[tuple[int, np.ndarray]] = []
    for i, (shape, kind) in enumerate(zip(data, types, strict=False)):
        pts = np.asarray(shape, float)[:, -2:]
        if kind not in ("polygon", "rectangle", "ellipse", "path") or len(pts) < 3:
            continue
        px = (pts * scale + translate - itrans) / iscale + 0.5
        if kind == "ellipse":
            px = _ellipse_polygon(px)
        cls_text = classes[i]
        if cls_text == HOLE and parents[i] is not None and int(parents[i]) >= 0:
            holes.append((int(parents[i]), px))
            continue
        label = str(labels[i]) if labels[i] not in (None, "") and str(labels[i]) != "nan" else (
            str(cls_text) if cls_text not in (None, "") else ""
        )
        name = None
        for text in (cls_text, label):
            if text not in (None, "") and str(text) != "nan":
                name = canonical_class(str(text), label_map)
                if name is not None:
                    break
        out[i] = Annotation(label=label or "unclassified", class_name=name, polygon=px)
    for parent, ring in holes:
        if parent not in out:
            raise AnnotationError(f"A hole refers to shape {parent}, which is not a polygon of this layer.")
        out[parent].holes.append(ring)
    return list(out.values())


def shapes_to_annotations(shapes_layer: Shapes, image_layer: Image | None = None,
                          label_map: dict[str, str | int] | None = None) -> list[Annotation]:
    """Annotations from a napari Shapes layer, in the pixel space of ``image_layer`` (if given)."""
    meta = {
        "features": shapes_layer.features,
        "shape_type": list(shapes_layer.shape_type),
        "scale": tuple(shapes_layer.scale),
        "translate": tuple(shapes_layer.translate),
    }
    iscale = tuple(image_layer.scale[-2:]) if image_layer is not None else None
    itrans = tuple(image_layer.translate[-2:]) if image_layer is not None else (0.0, 0.0)
    return shapes_data_to_annotations(shapes_layer.data, meta, iscale, itrans, label_map)


def _features_dict(features: Any, n: int) -> dict[str, list]:
    if features is None:
        return {}
    if hasattr(features, "to_dict"):
        return {k: list(v.values()) if isinstance(v, dict) else list(v) for k,
                v in features.to_dict(orient="list").items()}
    if isinstance(features, dict):
        return {k: list(v) for k, v in features.items()}
    return {}


def _ellipse_polygon(corners: np.ndarray, n: int = 64) -> np.ndarray:
    c = corners.mean(0)
    r = np.abs(corners - c).max(0)
    t = np.linspace(0, 2 * np.pi, n, endpoint=False)
    return np.stack([c[0] + r[0] * np.sin(t), c[1] + r[1] * np.cos(t)], 1)
