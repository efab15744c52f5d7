"""What a drawn region holds: area, tissue, each class's mm² and share, mean probabilities, uncertain share.

Areas are exact: each cell is a rectangle in level-0 pixels and the region's
overlap with it is computed by shapely (cells and region both cut at the
image's edge), so a region over half a cell counts half its area.
"""

from __future__ import annotations

import csv
import io
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np

from ..classes import class_styles

if TYPE_CHECKING:
    from shapely.geometry.base import BaseGeometry

    from ..annotations import Annotation
    from ..engine import ClassMap

__all__ = ["RegionRow", "region_annotations", "region_table", "region_table_csv"]


@dataclass(frozen=True)
class RegionRow:
    """One region's figures (areas in mm², shares in %).

    Attributes
    ----------
    class_mm2, class_share
        Per class name: area labelled with it, and its share of the region's classified area.
    mean_probability
        Per class name: mean probability over the region's classified (and uncertain) area.
    uncertain_share
        Uncertain area as a share of the classified + uncertain area.
    """

    name: str
    area_mm2: float
    tissue_mm2: float
    classified_mm2: float
    class_mm2: dict[str, float] = field(default_factory=dict)
    class_share: dict[str, float] = field(default_factory=dict)
    mean_probability: dict[str, float] = field(default_factory=dict)
    uncertain_mm2: float = 0.0
    uncertain_share: float = 0.0

    @property
    def majority(self) -> str | None:
        """The class covering most of the region, or None when nothing in it is classified."""
        if not self.classified_mm2:
            return None
        return max(self.class_mm2, key=self.class_mm2.get)

    def measurements(self) -> dict[str, float]:
        """The figures as QuPath measurement names."""
        m = {"Area mm^2": self.area_mm2, "Tissue mm^2": self.tissue_mm2, "Classified mm^2": self.classified_mm2}
        for name in self.class_mm2:
            m[f"{name} mm^2"] = self.class_mm2[name]
            m[f"{name} %"] = self.class_share[name]
            m[f"{name} mean p"] = self.mean_probability[name]
        m["Uncertain mm^2"] = self.uncertain_mm2
        m["Uncertain %"] = self.uncertain_share
        return m


def _shape_of(region):
    """A shapely geometry in level-0 ``(x, y)`` from an Annotation or a shapely geometry."""
    return region.to_shapely() if hasattr(region, "to_shapely") else region


def region_table(class_map: ClassMap, regions: Sequence[Annotation | BaseGeometry],
                 names: Sequence[str] | None = None) -> list[RegionRow]:
    """Figures for each region over a class map.

    Parameters
    ----------
    class_map
        A :class:`~napari_bcd.ClassMap`.
    regions
        :class:`~napari_bcd.Annotation` objects or shapely geometries, in level-0 pixels.
    names
        A name per region (default: the annotation's name or label, else ``region N``).
    """
    import shapely
    from shapely.geometry import box

    g = class_map.grid
    H, W = class_map.slide_shape
    frame = box(0, 0, W, H) if H and W else None
    mm2_per_px = g.mpp[0] * g.mpp[1] / 1e6
    classes = tuple(class_map.classes)
    unsure = class_map.uncertain_label
    tissue = np.clip(np.nan_to_num(class_map.tissue), 0, 1)
    rows: list[RegionRow] = []
    for i, region in enumerate(regions):
        geom = _shape_of(region)
        if not geom.is_valid:
            geom = shapely.make_valid(geom)
        if frame is not None:
            geom = geom.intersection(frame)
        name = (names[i] if names is not None else None) or getattr(region, "name", None) \
            or getattr(region, "label", None) or f"region {i + 1}"
        if geom.is_empty or geom.area <= 0:
            rows.append(RegionRow(str(name), 0.0, 0.0, 0.0, dict.fromkeys(classes, 0.0), dict.fromkeys(classes, 0.0),
                                  {c: float("nan") for c in classes}))
            continue
        minx, miny, maxx, maxy = geom.bounds
        r0 = max(int(np.floor((miny - g.origin_px[0]) / g.stride_px[0])), 0)
        r1 = min(int(np.ceil((maxy - g.origin_px[0]) / g.stride_px[0])), g.n_cells[0])
        c0 = max(int(np.floor((minx - g.origin_px[1]) / g.stride_px[1])), 0)
        c1 = min(int(np.ceil((maxx - g.origin_px[1]) / g.stride_px[1])), g.n_cells[1])
        rr, cc = np.meshgrid(np.arange(r0, r1), np.arange(c0, c1), indexing="ij")
        rr, cc = rr.ravel(), cc.ravel()
        ys = g.origin_px[0] + rr * g.stride_px[0]
        xs = g.origin_px[1] + cc * g.stride_px[1]
        cells = shapely.box(xs, ys, xs + g.stride_px[1], ys + g.stride_px[0])
        shapely.prepare(geom)
        overlap = shapely.area(shapely.intersection(cells, geom)) * mm2_per_px
        lab = class_map.labels[rr, cc]
        probs = class_map.probs[rr, cc]
        class_mm2 = {c: float(overlap[lab == k + 1].sum()) for k, c in enumerate(classes)}
        classified = float(sum(class_mm2.values()))
        unsure_mm2 = float(overlap[lab == unsure].sum())
        weighted = (lab > 0) & np.isfinite(probs).all(-1)
        wsum = float(overlap[weighted].sum())
        mean_p = {c: (float((probs[weighted, k] * overlap[weighted]).sum() / wsum) if wsum else float("nan"))
                  for k, c in enumerate(classes)}
        both = classified + unsure_mm2
        rows.append(RegionRow(
            name=str(name),
            area_mm2=float(geom.area * mm2_per_px),
            tissue_mm2=float((overlap * tissue[rr, cc]).sum()),
            classified_mm2=classified,
            class_mm2=class_mm2,
            class_share={c: (100.0 * v / classified if classified else 0.0) for c, v in class_mm2.items()},
            mean_probability=mean_p,
            uncertain_mm2=unsure_mm2,
            uncertain_share=100.0 * unsure_mm2 / both if both else 0.0,
        ))
    return rows


def region_table_csv(rows: list[RegionRow], slide: str = "") -> str:
    """The table as CSV: one line per region, a column per figure."""
    out = io.StringIO()
    w = csv.writer(out, lineterminator="\n")
    classes = list(rows[0].class_mm2) if rows else []
    w.writerow(["slide", "region", "area_mm2", "tissue_mm2", "classified_mm2",
                *[f"{c}_mm2" for c in classes], *[f"{c}_percent" for c in classes],
                *[f"{c}_mean_p" for c in classes], "uncertain_mm2", "uncertain_percent", "majority"])
    for r in rows:
        w.writerow([slide, r.name, f"{r.area_mm2:.6f}", f"{r.tissue_mm2:.6f}", f"{r.classified_mm2:.6f}",
                    *[f"{r.class_mm2[c]:.6f}" for c in classes], *[f"{r.class_share[c]:.2f}" for c in classes],
                    *["" if np.isnan(r.mean_probability[c]) else f"{r.mean_probability[c]:.4f}" for c in classes],
                    f"{r.uncertain_mm2:.6f}", f"{r.uncertain_share:.2f}", r.majority or ""])
    return out.getvalue()


def region_annotations(regions: Sequence[Annotation | BaseGeometry], rows: list[RegionRow],
                       classes: Sequence[str] | None = None) -> list[Annotation]:
    """The regions as annotations carrying their figures as QuPath measurements (for GeoJSON).

    Each keeps its own label and class; ``classes`` (the model's) only colours
    regions that have none.
    """
    from shapely.geometry import MultiPolygon, Polygon

    from ..annotations import Annotation

    styles = {st.name: st for st in class_styles(classes)} if classes else {}
    out = []
    for k, (region, row) in enumerate(zip(regions, rows, strict=True)):
        geom = _shape_of(region)
        polys = list(geom.geoms) if isinstance(geom, MultiPolygon) else [geom] if isinstance(geom, Polygon) else []
        label = getattr(region, "label", None) or ""
        cls = getattr(region, "class_name", None)
        color = getattr(region, "color", None) or (styles[row.majority].color if row.majority in styles else None)
        for poly in polys:
            out.append(Annotation(label=label, class_name=cls, polygon=np.asarray(poly.exterior.coords)[:, ::-1],
                                  holes=[np.asarray(h.coords)[:, ::-1] for h in poly.interiors], color=color,
                                  group=f"region-{k + 1}", measurements=row.measurements(), name=row.name))
    return out
