"""The in-memory annotation: one polygon with holes, in level-0 pixels ``(y, x)``."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    from shapely.geometry import Polygon

__all__ = ["Annotation", "ReadReport"]


@dataclass
class Annotation:
    """One annotated region.

    Attributes
    ----------
    label
        The label text as written in the source file.
    class_name
        The class the label names (:func:`~napari_bcd.classes.canonical_class`: a known class's own name for
        any of its spellings, the label itself for any other class), or None when it names no class.
    polygon
        ``(N, 2)`` float array of ``(y, x)`` level-0 pixel vertices, open ring
        (the first vertex is not repeated at the end).
    holes
        Interior rings, each like ``polygon``.
    color
        The source file's colour ``(r, g, b)`` 0-255, when it has one.
    group
        Parts of one multi-polygon share a group (e.g. the GeoJSON feature id).
    measurements
        Named numbers QuPath shows in its measurement table (written to
        GeoJSON as ``properties.measurements``).
    name
        The object's name (QuPath's "Name" column), when it has one apart from its class.
    """

    label: str
    class_name: str | None
    polygon: np.ndarray
    holes: list[np.ndarray] = field(default_factory=list)
    color: tuple[int, int, int] | None = None
    group: str | None = None
    measurements: dict[str, float] = field(default_factory=dict)
    name: str | None = None

    def __post_init__(self) -> None:
        self.polygon = open_ring(np.asarray(self.polygon, dtype=np.float64).reshape(-1, 2))
        self.holes = [open_ring(np.asarray(h, dtype=np.float64).reshape(-1, 2)) for h in self.holes]

    def to_shapely(self) -> Polygon:
        """A shapely Polygon in ``(x, y)`` order (shapely's and GeoJSON's)."""
        from shapely.geometry import Polygon

        return Polygon(self.polygon[:, ::-1], [h[:, ::-1] for h in self.holes])

    @property
    def area_px(self) -> float:
        return float(self.to_shapely().area)


def open_ring(ring: np.ndarray) -> np.ndarray:
    """Drop repeated closing vertices (ImageScope and GeoJSON repeat the first)."""
    while len(ring) > 1 and np.array_equal(ring[0], ring[-1]):
        ring = ring[:-1]
    return ring


@dataclass
class ReadReport:
    """What reading an annotation file kept, skipped and repaired, so nothing is lost silently."""

    format: str = ""
    read: int = 0
    skipped: dict[str, int] = field(default_factory=dict)
    #: Labels that name no class (empty, "unclassified", QuPath's "Region*" / "Ignore*"), with their counts.
    unknown_labels: dict[str, int] = field(default_factory=dict)
    #: The classes the regions name, with their counts.
    classes: dict[str, int] = field(default_factory=dict)
    repaired: list[str] = field(default_factory=list)

    def skip(self, why: str) -> None:
        self.skipped[why] = self.skipped.get(why, 0) + 1

    def __str__(self) -> str:
        parts = [f"{self.read} region(s) read from {self.format}"]
        if self.classes:
            parts.append("classes: " + ", ".join(f"{k} ({n})" for k, n in self.classes.items()))
        if self.skipped:
            parts.append("skipped: " + ", ".join(f"{n} {why}" for why, n in self.skipped.items()))
        if self.unknown_labels:
            parts.append(
                "labels that name no class (kept unclassified): "
                + ", ".join(f"{k!r} ({n})" for k, n in self.unknown_labels.items())
            )
        if self.repaired:
            parts.append("repaired: " + "; ".join(self.repaired))
        return "; ".join(parts)
