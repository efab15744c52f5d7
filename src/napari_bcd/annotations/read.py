"""Reading annotation files: QuPath GeoJSON, Aperio ImageScope XML, ASAP XML.

The format is recognised from the content, not the extension.  Everything
that is not kept — detections, points, lines, labels that are not classes —
is counted in the :class:`ReadReport`, never dropped silently.  XML is parsed
with defusedxml: entity declarations are refused.
"""

from __future__ import annotations

import json
import logging
import math
import os
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import numpy as np

from ..classes import class_id
from ..errors import AnnotationError
from .model import Annotation, ReadReport, open_ring

__all__ = ["AnnotationList", "read_annotations"]

log = logging.getLogger(__name__)

_NOT_ANNOTATIONS = {"detection", "cell", "tile", "tma_core", "tmacore", "roi_detection"}
_QP02_IDS = {
    "PathDetectionObject": "detection",
    "PathCellObject": "cell",
    "PathTileObject": "tile",
    "TMACoreObject": "tma_core",
}


class AnnotationList(list):
    """A list of :class:`Annotation` with the :class:`ReadReport` of the file it came from."""

    report: ReadReport

    def __init__(self, items: Iterable[Annotation] = (), report: ReadReport | None = None) -> None:
        super().__init__(items)
        self.report = report or ReadReport()


def read_annotations(
    path: str | os.PathLike[str], label_map: Mapping[str, str | int] | None = None
) -> AnnotationList:
    """Read polygons and their labels from an annotation file.

    Parameters
    ----------
    path
        QuPath GeoJSON (0.2-0.5), Aperio ImageScope XML (as in the BACH slides)
        or ASAP XML.
    label_map
        Your own label names to our classes, e.g. ``{"Tumor": "Invasive"}``.

    Returns
    -------
    AnnotationList
        The annotations (level-0 pixels, ``(y, x)``); ``.report`` says what
        was skipped, repaired, or not recognised as a class.

    Raises
    ------
    AnnotationError
        When the file is missing, malformed, unsafe, or holds no polygon.
    """
    p = Path(path)
    try:
        raw = p.read_bytes()
    except FileNotFoundError:
        raise AnnotationError(f"{p} does not exist. Check the path.") from None
    except IsADirectoryError:
        raise AnnotationError(f"{p} is a folder. Give an annotation file (GeoJSON, ImageScope or ASAP XML).") from None
    except OSError as err:
        why = "a symbolic link that leads nowhere (or in a loop)" if p.is_symlink() else (err.strerror or str(err))
        raise AnnotationError(f"{p} cannot be read: {why}.") from err
    raw = _as_utf8(raw, p)
    head = raw.lstrip()[:1]
    if raw.startswith(b"\xef\xbb\xbf"):
        head = raw[3:].lstrip()[:1]
    report = ReadReport()
    try:
        items = _read_any(raw, head, p, report, label_map)
    except AnnotationError:
        raise
    except (ValueError, TypeError, KeyError, AttributeError, IndexError, OverflowError, RecursionError) as err:
        # Whatever a malformed file trips over inside the readers: one message naming the file.
        raise AnnotationError(f"{p.name} is malformed ({type(err).__name__}: {str(err)[:200]}). Export it again from "
                              "the program that made it.") from err
    except Exception as err:  # shapely's GEOSException and friends on impossible geometry
        if type(err).__module__.startswith("shapely"):
            raise AnnotationError(f"{p.name} holds geometry that cannot be used ({err}).") from err
        raise
    for a in items:
        if a.cls is None:
            report.unknown_labels[a.label] = report.unknown_labels.get(a.label, 0) + 1
    report.read = len(items)
    if not items:
        skipped = f" (skipped: {', '.join(f'{n} {w}' for w, n in report.skipped.items())})" if report.skipped else ""
        raise AnnotationError(f"{p.name} holds no polygon annotations{skipped}. Draw or export regions as polygons.")
    log.info("%s: %s", p.name, report)
    return AnnotationList(items, report)


def _as_utf8(raw: bytes, p: Path) -> bytes:
    """UTF-16 files (Windows tools write them) re-encoded as UTF-8; other bytes as they are."""
    if raw.startswith((b"\xff\xfe", b"\xfe\xff")):
        try:
            return raw.decode("utf-16").encode("utf-8")
        except UnicodeDecodeError as err:
            raise AnnotationError(f"{p.name} starts like UTF-16 text but does not decode as it ({err}).") from err
    return raw


def _read_any(raw: bytes, head: bytes, p: Path, report: ReadReport, label_map) -> list[Annotation]:
    if head in (b"{", b"["):
        report.format = "QuPath GeoJSON"
        return _read_geojson(raw, p, report, label_map)
    if head == b"<":
        return _read_xml(raw, p, report, label_map)
    raise AnnotationError(
        f"{p.name} is not an annotation file napari-bcd reads (QuPath GeoJSON, ImageScope XML, ASAP XML)."
    )


# --------------------------------------------------------------------------- geometry helpers
def _ring(points: Any, where: str) -> np.ndarray:
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


def _valid_parts(outer: np.ndarray, holes: list[np.ndarray], where: str, report: ReadReport) -> list[tuple[np.ndarray,
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


def _make(label: str, color: tuple[int, int, int] | None, parts: list, group: str | None,
          label_map: Mapping[str, str | int] | None, where: str = "") -> list[Annotation]:
    cid = class_id(label, label_map) if label else None
    if len(parts) > 1 and group is None:
        group = where or "group"  # the same file gives the same group names on every read
    return [Annotation(label=label, cls=cid, polygon=o, holes=h, color=color, group=group) for o, h in parts]


# --------------------------------------------------------------------------- GeoJSON
def _read_geojson(raw: bytes, p: Path, report: ReadReport, label_map) -> list[Annotation]:
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
            outer = _ring(rings[0], where)
            holes = [_ring(r, where + " hole") for r in rings[1:]]
            parts += _valid_parts(outer, holes, where, report)
        if parts:
            made = _make(label, color, parts, group if len(parts) > 1 else None, label_map, f"{p.name} feature {i}")
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


# --------------------------------------------------------------------------- XML
def _read_xml(raw: bytes, p: Path, report: ReadReport, label_map) -> list[Annotation]:
    import defusedxml.ElementTree as ET
    from defusedxml import DefusedXmlException

    try:
        root = ET.fromstring(raw)
    except DefusedXmlException as err:
        raise AnnotationError(
            f"{p.name} declares XML entities or a DTD, which napari-bcd refuses for safety ({type(err).__name__}). "
            "Remove the <!DOCTYPE ...> / <!ENTITY ...> lines."
        ) from err
    except ET.ParseError as err:
        raise AnnotationError(f"{p.name} is not well-formed XML ({err}).") from err
    if root.tag == "Annotations":
        report.format = "Aperio ImageScope XML"
        return _read_imagescope(root, p, report, label_map)
    if root.tag == "ASAP_Annotations":
        report.format = "ASAP XML"
        return _read_asap(root, p, report, label_map)
    raise AnnotationError(f"{p.name} is XML with root <{root.tag}>, not ImageScope <Annotations> or "
                          "<ASAP_Annotations>.")


def _num(el, key: str, where: str) -> float:
    try:
        return float(el.get(key))
    except (TypeError, ValueError) as err:
        raise AnnotationError(f"{where}: {key}={el.get(key)!r} is not a number.") from err


def _imagescope_color(value: str | None) -> tuple[int, int, int] | None:
    if not value:
        return None
    try:
        v = int(value)
    except ValueError:
        return None
    return (v & 255, (v >> 8) & 255, (v >> 16) & 255)  # ImageScope packs colours as 0xBBGGRR


def _read_imagescope(root, p: Path, report: ReadReport, label_map) -> list[Annotation]:
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
            pts = [(_num(v, "X", where), _num(v, "Y", where)) for v in region.findall("Vertices/Vertex")]
            if rtype == "2" and len(pts) >= 2:  # ellipse: two corners of its box
                corners = _ring(pts[:2], where)  # checks the numbers: finite, in range
                if len(corners) < 2:
                    report.skip("ellipses of zero size")
                    continue
                ring = _ellipse(corners)
            elif len(pts) < 3:
                report.skip("regions with fewer than 3 vertices (points, lines)")
                continue
            else:
                ring = _ring(pts, where)
            if region.get("NegativeROA") == "1":
                negatives.append(ring)
            else:
                positives.append((label, ring))
        for k, (label, ring) in enumerate(positives):
            holes = [n for n in negatives if _inside(n, ring)]
            negatives = [n for n in negatives if not any(n is h for h in holes)]
            parts = _valid_parts(ring, holes, f"{p.name} annotation {ai + 1}", report)
            out += _make(label, color, parts, None, label_map, f"{p.name} annotation {ai + 1} region {k + 1}")
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


def _read_asap(root, p: Path, report: ReadReport, label_map) -> list[Annotation]:
    group_colors = {g.get("Name"): _hex_color(g.get("Color")) for g in root.findall("AnnotationGroups/Group")}
    out: list[Annotation] = []
    for ai, ann in enumerate(root.findall("Annotations/Annotation")):
        where = f"{p.name} annotation {ann.get('Name') or ai}"
        kind = (ann.get("Type") or "Polygon").lower()
        if kind in ("dot", "pointset", "measurement"):
            report.skip(f"{kind} annotations (not areas)")
            continue
        coords = ann.findall("Coordinates/Coordinate")
        orders = [_num(c, "Order", where) if c.get("Order") is not None else float(k) for k, c in enumerate(coords)]
        coords = [coords[i] for _, i in sorted(zip(orders, range(len(coords)), strict=True))]
        pts = [(_num(c, "X", where), _num(c, "Y", where)) for c in coords]
        if len(pts) < 3 and not (kind == "rectangle" and len(pts) == 2):
            report.skip("annotations with fewer than 3 points")
            continue
        ring = _ring(pts, where)  # open or closed rings alike
        if kind == "rectangle" and len(ring) == 2:
            (y0, x0), (y1, x1) = ring
            ring = np.array([[y0, x0], [y0, x1], [y1, x1], [y1, x0]])
        if kind == "spline":
            ring = _catmull_rom_closed(ring)
        label = ann.get("PartOfGroup") or ""
        label = "" if label == "None" else label
        color = _hex_color(ann.get("Color")) or group_colors.get(label)
        out += _make(label, color, _valid_parts(ring, [], where, report), None, label_map, where)
    return out
