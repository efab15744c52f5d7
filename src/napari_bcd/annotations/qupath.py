"""Reading QuPath GeoJSON (0.2-0.5): annotations kept, detections, cells, tiles and points counted and skipped."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from ..errors import AnnotationError
from .model import Annotation, ReadReport
from .parse import make_annotations, to_ring, valid_parts

__all__ = ["read_geojson"]

_NOT_ANNOTATIONS = {"detection", "cell", "tile", "tma_core", "tmacore", "roi_detection"}
_QP02_IDS = {
    "PathDetectionObject": "detection",
    "PathCellObject": "cell",
    "PathTileObject": "tile",
    "TMACoreObject": "tma_core",
}


def read_geojson(raw: bytes, p: Path, report: ReadReport, label_map) -> list[Annotation]:
    try:
        doc = json.loads(raw.decode("utf-8-sig"))
    except (ValueError, UnicodeDecodeError) as err:
        raise AnnotationError(f"{p.name} is not valid JSON ({err}). Export it again from QuPath.") from err
    if isinstance(doc, list):
        features = doc  # QuPath 0.2/0.3 "export as GeoJSON": a bare list of features
    elif isinstance(doc, dict) and doc.get("type") == "FeatureCollection":
        features = doc.get("features") or []
    elif isinstance(doc, dict) and doc.get("type") == "Feature":
        features = [doc]
    elif isinstance(doc, dict) and ("coordinates" in doc or doc.get("type") == "GeometryCollection"):
        features = [{"type": "Feature", "geometry": doc, "properties": {}}]
    else:
        raise AnnotationError(f"{p.name} is JSON but not GeoJSON (no FeatureCollection, Feature or geometry).")
    out: list[Annotation] = []
    for i, feat in enumerate(features):
        if not isinstance(feat, dict):
            report.skip("entries that are not GeoJSON features")
            continue
        props = feat.get("properties") or {}
        if not isinstance(props, dict):
            report.skip("features whose properties are not an object")
            props = {}
        kind = str(props.get("objectType") or _QP02_IDS.get(str(feat.get("id")), "annotation")).lower()
        if kind in _NOT_ANNOTATIONS:
            report.skip(f"{kind} objects")
            continue
        label, color = _qupath_label(props)
        fid = feat.get("id")
        group = str(fid) if fid and str(fid) not in _QP02_IDS and fid != "PathAnnotationObject" else None
        geometries = _polygons_of(feat.get("geometry"), report)
        parts = []
        for j, rings in enumerate(geometries):
            where = f"{p.name} feature {i}" + (f" part {j}" if len(geometries) > 1 else "")
            if not rings:
                continue
            if not isinstance(rings, list):
                report.skip("polygons whose rings are not lists")
                continue
            outer = to_ring(rings[0], where)
            holes = [to_ring(r, where + " hole") for r in rings[1:]]
            parts += valid_parts(outer, holes, where, report)
        if parts:
            made = make_annotations(label, color, parts, group if len(parts) > 1 else None, label_map,
                                    f"{p.name} feature {i}")
            measurements = _measurements(props.get("measurements"))
            name = props.get("name") if isinstance(props.get("name"), str) else None
            for a in made:
                a.measurements = dict(measurements)
                a.name = name
            out += made
    return out


def _measurements(raw: Any) -> dict[str, float]:
    """QuPath's measurements: an object of name -> number (0.4+) or a list of ``{name, value}`` (0.2/0.3)."""
    items: list = []
    if isinstance(raw, dict):
        items = list(raw.items())
    elif isinstance(raw, list):
        items = [(m.get("name"), m.get("value")) for m in raw if isinstance(m, dict)]
    out = {}
    for k, v in items:
        if isinstance(k, str) and isinstance(v, int | float) and not isinstance(v, bool):
            out[k] = float(v)
    return out


def _polygons_of(geom: Any, report: ReadReport) -> list[list]:
    if not isinstance(geom, dict):
        report.skip("features without geometry")
        return []
    t = geom.get("type")
    coords = geom.get("coordinates")
    if t in ("Polygon", "MultiPolygon") and coords is not None and not isinstance(coords, list):
        report.skip("geometries whose coordinates are not lists")
        return []
    if t == "Polygon":
        return [coords or []]
    if t == "MultiPolygon":
        return [c for c in (coords or []) if isinstance(c, list)]
    if t == "GeometryCollection":
        return [r for g in geom.get("geometries") or [] for r in _polygons_of(g, report)]
    report.skip(f"{t} geometries (not areas)")
    return []


def _qupath_label(props: dict) -> tuple[str, tuple[int, int, int] | None]:
    cls = props.get("classification")
    color: tuple[int, int, int] | None = None
    label = ""
    if isinstance(cls, dict):
        label = str(cls.get("name") or "")
        if isinstance(cls.get("color"), list | tuple) and len(cls["color"]) >= 3:
            color = _rgb(cls["color"])
        elif isinstance(cls.get("colorRGB"), int | float):
            v = int(cls["colorRGB"]) & 0xFFFFFF  # QuPath 0.2/0.3: packed (A)RGB, a signed int
            color = ((v >> 16) & 255, (v >> 8) & 255, v & 255)
    elif isinstance(cls, str):
        label = cls
    if not label:
        label = str(props.get("name") or "")
    if color is None and isinstance(props.get("color"), list | tuple) and len(props["color"]) >= 3:
        color = _rgb(props["color"])
    return label, color


def _rgb(values: Any) -> tuple[int, int, int] | None:
    """Three 0-255 numbers, or None (the class colour is used) for anything else, e.g. ["red", ...]."""
    try:
        rgb = tuple(int(v) for v in list(values)[:3])
    except (TypeError, ValueError, OverflowError):
        return None
    return rgb if all(0 <= v <= 255 for v in rgb) else None  # type: ignore[return-value]
