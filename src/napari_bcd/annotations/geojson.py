"""QuPath GeoJSON: write (and, in :mod:`.read`, read) classified annotations."""

from __future__ import annotations

import json
import os
import uuid
from collections.abc import Iterable
from pathlib import Path

import numpy as np

from .._fileio import atomic_write, check_writable
from ..classes import class_styles, order_classes
from .model import Annotation

__all__ = ["to_feature_collection", "write_geojson"]


def _ring(arr: np.ndarray) -> list[list[float]]:
    xy = arr[:, ::-1].tolist()
    return [*xy, xy[0]] if xy else xy  # GeoJSON rings are closed


def _rnd(v: float) -> float:
    r = round(float(v), 3)
    return int(r) if r.is_integer() else r


def _polygon_coords(a: Annotation) -> list:
    return [[[_rnd(x), _rnd(y)] for x, y in _ring(a.polygon)]] + [
        [[_rnd(x), _rnd(y)] for x, y in _ring(h)] for h in a.holes
    ]


def to_feature_collection(annotations: Iterable[Annotation]) -> dict:
    """A GeoJSON FeatureCollection as QuPath 0.4+ writes it.

    Each feature: ``objectType: annotation``, ``classification {name, color}``
    (the class colour, or the annotation's own), a UUID ``id``; parts sharing a
    ``group`` become one MultiPolygon.  Coordinates are level-0 pixels ``[x, y]``.
    """
    groups: dict[str, list[Annotation]] = {}
    order: list[str] = []
    for a in annotations:
        key = a.group or f"_single_{id(a)}"
        if key not in groups:
            groups[key] = []
            order.append(key)
        groups[key].append(a)
    features = []
    styles = {st.name: st for st in class_styles(order_classes(a.class_name for a in annotations if a.class_name))}
    for key in order:
        parts = groups[key]
        first = parts[0]
        if len(parts) == 1:
            geometry = {"type": "Polygon", "coordinates": _polygon_coords(first)}
        else:
            geometry = {"type": "MultiPolygon", "coordinates": [_polygon_coords(p) for p in parts]}
        st = styles.get(first.class_name) if first.class_name else None
        known = st.color if st is not None and st.iciar_id is not None else None
        color = known or first.color or (st.color if st is not None else None) or (128, 128, 128)
        props: dict = {"objectType": "annotation", "isLocked": False}
        name = first.label
        if st is not None:
            # One name per class whatever the label said ("Invasive", "Invasive carcinoma", "4"); a label that is
            # not the class's own name stays as the object's name.
            name = st.display_name
            if first.label and first.label != name:
                props["name"] = first.label
        elif (name or "").strip().lower() == "unclassified":
            name = ""  # QuPath's unclassified: no classification at all (and no class's colour)
        if name:
            props["classification"] = {"name": name, "color": [int(c) for c in color]}
        if first.name:
            props["name"] = first.name
        if first.measurements:
            # QuPath 0.4+ writes (and reads) measurements as one object of name -> number.
            props["measurements"] = {str(k): float(v) for k, v in first.measurements.items()
                                     if v is not None and np.isfinite(v)}
        fid = key if first.group and _is_uuid(key) else str(uuid.uuid4())
        features.append({"type": "Feature", "id": fid, "geometry": geometry, "properties": props})
    return {"type": "FeatureCollection", "features": features}


def _is_uuid(text: str) -> bool:
    try:
        uuid.UUID(text)
    except ValueError:
        return False
    return True


def write_geojson(
    annotations: Iterable[Annotation], path: str | os.PathLike[str], *, overwrite: bool = False
) -> Path:
    """Write annotations as a QuPath-importable GeoJSON FeatureCollection (atomically).

    Parameters
    ----------
    annotations
        Regions in level-0 pixels.
    path
        Output ``.geojson`` file.
    overwrite
        Replace an existing file.
    """
    p = check_writable(path, overwrite)
    doc = to_feature_collection(annotations)
    with atomic_write(p, "w") as fh:
        json.dump(doc, fh)
    return p
