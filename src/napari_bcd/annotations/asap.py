"""Reading ASAP XML: polygons, rectangles and splines; dots and measurements counted and skipped."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from .model import Annotation, ReadReport
from .parse import make_annotations, number, to_ring, valid_parts

__all__ = ["read_asap"]


def _hex_color(value: str | None) -> tuple[int, int, int] | None:
    if not value or not value.startswith("#") or len(value) < 7:
        return None
    try:
        return (int(value[1:3], 16), int(value[3:5], 16), int(value[5:7], 16))
    except ValueError:
        return None


def _catmull_rom_closed(pts: np.ndarray, per_segment: int = 8) -> np.ndarray:
    """ASAP draws a Spline as a closed Catmull-Rom curve through its points."""
    n = len(pts)
    out = []
    for i in range(n):
        p0, p1, p2, p3 = pts[(i - 1) % n], pts[i], pts[(i + 1) % n], pts[(i + 2) % n]
        for t in np.linspace(0, 1, per_segment, endpoint=False):
            t2, t3 = t * t, t * t * t
            out.append(0.5 * ((2 * p1) + (-p0 + p2) * t + (2 * p0 - 5 * p1 + 4 * p2 - p3) * t2
                              + (-p0 + 3 * p1 - 3 * p2 + p3) * t3))
    return np.asarray(out)


def read_asap(root, p: Path, report: ReadReport, label_map) -> list[Annotation]:
    group_colors = {g.get("Name"): _hex_color(g.get("Color")) for g in root.findall("AnnotationGroups/Group")}
    out: list[Annotation] = []
    for ai, ann in enumerate(root.findall("Annotations/Annotation")):
        where = f"{p.name} annotation {ann.get('Name') or ai}"
        kind = (ann.get("Type") or "Polygon").lower()
        if kind in ("dot", "pointset", "measurement"):
            report.skip(f"{kind} annotations (not areas)")
            continue
        coords = ann.findall("Coordinates/Coordinate")
        orders = [number(c, "Order", where) if c.get("Order") is not None else float(k) for k, c in enumerate(coords)]
        coords = [coords[i] for _, i in sorted(zip(orders, range(len(coords)), strict=True))]
        pts = [(number(c, "X", where), number(c, "Y", where)) for c in coords]
        if len(pts) < 3 and not (kind == "rectangle" and len(pts) == 2):
            report.skip("annotations with fewer than 3 points")
            continue
        ring = to_ring(pts, where)  # open or closed rings alike
        if kind == "rectangle" and len(ring) == 2:
            (y0, x0), (y1, x1) = ring
            ring = np.array([[y0, x0], [y0, x1], [y1, x1], [y1, x0]])
        if kind == "spline":
            ring = _catmull_rom_closed(ring)
        label = ann.get("PartOfGroup") or ""
        label = "" if label == "None" else label
        color = _hex_color(ann.get("Color")) or group_colors.get(label)
        out += make_annotations(label, color, valid_parts(ring, [], where, report), None, label_map, where)
    return out
