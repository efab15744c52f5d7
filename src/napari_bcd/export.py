"""Writing a ClassMap: label TIFF, probabilities, summary, QuPath GeoJSON."""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import numpy as np

from ._fileio import atomic_path, atomic_write, check_writable
from .annotations import Annotation, write_geojson
from .classes import CLASS_COLORS, CLASS_IDS, DISPLAY_NAMES
from .engine import ClassMap
from .summary import Summary, summarize

__all__ = ["class_regions", "label_image", "write_label_tiff", "write_outputs", "write_probabilities"]


def class_regions(class_map: ClassMap) -> list[Annotation]:
    """One (multi-)polygon per class: the union of its cells, in level-0 pixels."""
    from shapely import union_all
    from shapely.geometry import MultiPolygon, Polygon, box

    g = class_map.grid
    # Shared edges must be bit-identical floats, or the union leaves slivers.
    ys = g.origin_px[0] + np.arange(g.n_cells[0] + 1) * g.stride_px[0]
    xs = g.origin_px[1] + np.arange(g.n_cells[1] + 1) * g.stride_px[1]
    out: list[Annotation] = []
    for i, name in enumerate(class_map.classes):
        cid = i + 1
        sel = class_map.labels == cid
        if not sel.any():
            continue
        rects = []
        for r in range(sel.shape[0]):
            row = sel[r]
            c = 0
            while c < row.size:  # merge runs along the row first: far fewer boxes to union
                if not row[c]:
                    c += 1
                    continue
                c1 = c
                while c1 < row.size and row[c1]:
                    c1 += 1
                rects.append(box(xs[c], ys[r], xs[c1], ys[r + 1]))
                c = c1
        merged = union_all(rects)
        polys = list(merged.geoms) if isinstance(merged, MultiPolygon) else [merged] if isinstance(merged, Polygon) else []
        for poly in polys:
            poly = poly.simplify(0)  # drop collinear vertices of the cell staircase
            out.append(
                Annotation(
                    label=name,
                    cls=CLASS_IDS.get(name, cid),
                    polygon=np.asarray(poly.exterior.coords)[:, ::-1],
                    holes=[np.asarray(h.coords)[:, ::-1] for h in poly.interiors],
                    color=CLASS_COLORS.get(CLASS_IDS.get(name, cid)),
                    group=f"class-{name}",
                )
            )
    return out


def label_image(class_map: ClassMap, max_size: int = 4096) -> tuple[np.ndarray, int]:
    """The label map over the whole slide at an integer downsample ``k`` of level 0.

    ``k`` is 1 (pixel-exact overlay) unless that would exceed ``max_size``.
    Each output pixel takes the label of the cell containing its centre.
    """
    g = class_map.grid
    H, W = class_map.slide_shape
    k = max(1, min(int(min(g.stride_px) // 4) or 1, math.ceil(max(H, W) / max_size)))
    h, w = math.ceil(H / k), math.ceil(W / k)
    yc = (np.arange(h) + 0.5) * k
    xc = (np.arange(w) + 0.5) * k
    r = np.floor((yc - g.origin_px[0]) / g.stride_px[0]).astype(int)
    c = np.floor((xc - g.origin_px[1]) / g.stride_px[1]).astype(int)
    rv = (r >= 0) & (r < g.n_cells[0])
    cv = (c >= 0) & (c < g.n_cells[1])
    img = np.zeros((h, w), np.uint8)
    img[np.ix_(rv, cv)] = class_map.labels[np.ix_(r[rv], c[cv])]
    return img, k


def _description(class_map: ClassMap, **extra) -> str:
    return json.dumps(
        {
            "napari_bcd": True,
            "slide": class_map.slide_name,
            "model": class_map.model_name,
            "classes": {str(i + 1): n for i, n in enumerate(class_map.classes)},
            "mpp_level0": list(class_map.grid.mpp),
            "grid": class_map.grid.to_dict(),
            **extra,
        }
    )


def write_label_tiff(class_map: ClassMap, path: str | os.PathLike[str], *, overwrite: bool = False) -> Path:
    """Label map as a palette TIFF with resolution metadata that overlays the slide.

    Pixel ``(i, j)`` covers level-0 pixels ``[i*k, (i+1)*k)``; XResolution /
    YResolution (per cm) give its physical size, so viewers that honour them
    (napari with ``scale``, QuPath, Fiji) overlay it on the slide.  The palette
    holds the class colours.
    """
    import tifffile

    p = check_writable(path, overwrite)
    img, k = label_image(class_map)
    my, mx = class_map.grid.mpp
    cmap = np.zeros((3, 256), np.uint16)
    for cid, rgb in CLASS_COLORS.items():
        cmap[:, cid] = np.asarray(rgb, np.uint16) * 257
    with atomic_path(p) as tmp:
        tifffile.imwrite(
            tmp,
            img,
            photometric="palette",
            colormap=cmap,
            compression="zlib",
            tile=(256, 256) if min(img.shape) >= 256 else None,
            resolution=(1e4 / (mx * k), 1e4 / (my * k)),
            resolutionunit="CENTIMETER",
            description=_description(class_map, downsample=k, labels={str(k_): v for k_, v in DISPLAY_NAMES.items()}),
            metadata=None,
        )
    return p


def write_probabilities(class_map: ClassMap, path: str | os.PathLike[str], *, overwrite: bool = False) -> Path:
    """Cell probabilities as float32 TIFF pages, one per class, with the grid in the description."""
    import tifffile

    p = check_writable(path, overwrite)
    data = np.moveaxis(class_map.probs, -1, 0).astype(np.float32)
    sy, sx = class_map.grid.cell_um
    with atomic_path(p) as tmp:
        tifffile.imwrite(
            tmp,
            data,
            photometric="minisblack",
            compression="zlib",
            resolution=(1e4 / sx, 1e4 / sy),
            resolutionunit="CENTIMETER",
            description=_description(class_map, axes="CYX", nan="not classified"),
            metadata=None,
        )
    return p


def write_outputs(
    class_map: ClassMap,
    out_dir: str | os.PathLike[str],
    *,
    stem: str | None = None,
    min_area_mm2: float = 0.0,
    overwrite: bool = False,
) -> dict[str, Path]:
    """Write every output of one slide into ``out_dir``; returns them by kind."""
    d = Path(out_dir)
    d.mkdir(parents=True, exist_ok=True)
    stem = stem or Path(class_map.slide_name).stem
    paths = {
        "labels": d / f"{stem}.labels.tif",
        "probabilities": d / f"{stem}.probabilities.tif",
        "summary_json": d / f"{stem}.summary.json",
        "summary_csv": d / f"{stem}.summary.csv",
        "geojson": d / f"{stem}.geojson",
    }
    for p in paths.values():
        check_writable(p, overwrite)
    summary: Summary = summarize(class_map, min_area_mm2=min_area_mm2)
    write_label_tiff(class_map, paths["labels"], overwrite=overwrite)
    write_probabilities(class_map, paths["probabilities"], overwrite=overwrite)
    with atomic_write(paths["summary_json"], "w") as fh:
        fh.write(summary.to_json())
    with atomic_write(paths["summary_csv"], "w") as fh:
        fh.write(summary.to_csv())
    write_geojson(class_regions(class_map), paths["geojson"], overwrite=overwrite)
    return paths
