"""What every annotation reader shares: rings checked and turned to ``(y, x)``, polygons repaired, labels mapped."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np

from ..classes import canonical_class
from ..errors import AnnotationError
from .model import Annotation, ReadReport, open_ring

__all__ = ["make_annotations", "number", "to_ring", "valid_parts"]


def to_ring(points: Any, where: str) -> np.ndarray:
    try:
        arr = np.asarray(points, dtype=np.float64)
    except (TypeError, ValueError, OverflowError) as err:
        raise AnnotationError(f"{where}: coordinates are not usable numbers ({err}).") from err
    if arr.ndim != 2 or arr.shape[1] < 2:
        raise AnnotationError(f"{where}: a ring must be a list of [x, y] pairs.")
    if not np.isfinite(arr[:, :2]).all():
        raise AnnotationError(f"{where}: coordinates include NaN or infinity. Fix or remove that region.")
    if np.abs(arr[:, :2]).max() > 1e9:
        raise AnnotationError(f"{where}: coordinates beyond a billion pixels; no slide is that large. Fix that region.")
    return open_ring(arr[:, 1::-1][:, :2].copy())  # [x, y] -> (y, x)


def valid_parts(outer: np.ndarray, holes: list[np.ndarray], where: str, report: ReadReport) -> list[tuple[np.ndarray,
                                                                                                           list[np.ndarray]]]:
    """The polygon, repaired with shapely's make_valid when it self-intersects."""
    from shapely import make_valid
    from shapely.geometry import MultiPolygon, Polygon

    if len(outer) < 3:
        report.skip("degenerate rings (fewer than 3 vertices)")
        return []
    poly = Polygon(outer[:, ::-1], [h[:, ::-1] for h in holes if len(h) >= 3])
    if poly.is_valid:
        return [(outer, [h for h in holes if len(h) >= 3])]
    fixed = make_valid(poly)
    polys = [g for g in getattr(fixed, "geoms", [fixed]) if isinstance(g, Polygon | MultiPolygon)]
    parts: list[tuple[np.ndarray, list[np.ndarray]]] = []
    for g in polys:
        for q in getattr(g, "geoms", [g]):
            if q.area > 0:
                parts.append(
                    (open_ring(np.asarray(q.exterior.coords)[:, ::-1]),
                     [open_ring(np.asarray(i.coords)[:, ::-1]) for i in q.interiors])
                )
    report.repaired.append(f"{where}: self-intersecting ring split into {len(parts)} valid polygon(s)")
    return parts


def make_annotations(label: str, color: tuple[int, int, int] | None, parts: list, group: str | None,
          label_map: Mapping[str, str | int] | None, where: str = "") -> list[Annotation]:
    name = canonical_class(label, label_map) if label else None
    if len(parts) > 1 and group is None:
        group = where or "group"  # the same file gives the same group names on every read
    return [Annotation(label=label, class_name=name, polygon=o, holes=h, color=color, group=group) for o, h in parts]




def number(el, key: str, where: str) -> float:
    try:
        return float(el.get(key))
    except (TypeError, ValueError) as err:
        raise AnnotationError(f"{where}: {key}={el.get(key)!r} is not a number.") from err
