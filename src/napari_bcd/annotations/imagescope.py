"""Reading Aperio ImageScope XML, as in the BACH slides: regions, negative regions as holes, ellipses."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np

from .model import Annotation, ReadReport
from .parse import make_annotations, number, to_ring, valid_parts

__all__ = ["read_imagescope"]


def _imagescope_color(value: str | None) -> tuple[int, int, int] | None:
    if not value:
        return None
    try:
        v = int(value)
    except ValueError:
        return None
    return (v & 255, (v >> 8) & 255, (v >> 16) & 255)  # ImageScope packs colours as 0xBBGGRR


def read_imagescope(root, p: Path, report: ReadReport, label_map) -> list[Annotation]:
    out: list[Annotation] = []
    for ai, ann in enumerate(root.findall("Annotation")):
        color = _imagescope_color(ann.get("LineColor"))
        ann_label = ann.get("Name") or ""
        for attr in ann.findall("Attributes/Attribute"):
            if not ann_label and attr.get("Value"):
                ann_label = attr.get("Value") or ""
        positives: list[tuple[str, np.ndarray]] = []
        negatives: list[np.ndarray] = []
        for ri, region in enumerate(ann.findall("Regions/Region")):
            where = f"{p.name} annotation {ai + 1} region {region.get('Id', ri + 1)}"
            rtype = region.get("Type", "0")
            if rtype in ("3", "4"):  # 3: arrow, 4: ruler
                report.skip("rulers and arrows")
                continue
            label = (region.get("Text") or "").strip()
            if not label:
                for attr in region.findall("Attributes/Attribute"):
                    if attr.get("Value"):
                        label = attr.get("Value", "").strip()
                        break
            label = label or ann_label.strip()
            pts = [(number(v, "X", where), number(v, "Y", where)) for v in region.findall("Vertices/Vertex")]
            if rtype == "2" and len(pts) >= 2:  # ellipse: two corners of its box
                corners = to_ring(pts[:2], where)  # checks the numbers: finite, in range
                if len(corners) < 2:
                    report.skip("ellipses of zero size")
                    continue
                ring = _ellipse(corners)
            elif len(pts) < 3:
                report.skip("regions with fewer than 3 vertices (points, lines)")
                continue
            else:
                ring = to_ring(pts, where)
            if region.get("NegativeROA") == "1":
                negatives.append(ring)
            else:
                positives.append((label, ring))
        for k, (label, ring) in enumerate(positives):
            holes = [n for n in negatives if _inside(n, ring)]
            negatives = [n for n in negatives if not any(n is h for h in holes)]
            parts = valid_parts(ring, holes, f"{p.name} annotation {ai + 1}", report)
            out += make_annotations(label, color, parts, None, label_map,
                                    f"{p.name} annotation {ai + 1} region {k + 1}")
        if negatives:
            report.skip("negative regions outside any region")
    return out


def _inside(inner: np.ndarray, outer: np.ndarray) -> bool:
    from shapely.geometry import Polygon

    try:
        return Polygon(outer[:, ::-1]).buffer(0).contains(Polygon(inner[:, ::-1]).buffer(0).representative_point())
    except Exception:  # noqa: BLE001 - degenerate rings are simply not holes
        return False


def _ellipse(corners: np.ndarray, n: int = 64) -> np.ndarray:
    c = corners.mean(0)
    r = np.abs(corners[1] - corners[0]) / 2
    t = np.linspace(0, 2 * math.pi, n, endpoint=False)
    return np.stack([c[0] + r[0] * np.sin(t), c[1] + r[1] * np.cos(t)], 1)
