"""Writing a ClassMap: label TIFF, probabilities, summary, QuPath GeoJSON, as one set with its done-record
(:mod:`.done`: what a set vouches for, and the lock one slide's writer holds)."""

from __future__ import annotations

import datetime as _dt
import json
import math
import os
import shutil
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ._fileio import atomic_path, atomic_write, check_writable, file_digest
from .annotations import Annotation, write_geojson
from .classes import canonical_class, class_styles
from .done import DONE_SUFFIX, WRITING_SUFFIX, outputs_complete, slide_lock
from .engine import ClassMap
from .io.formats import LABELS_SUFFIX, PROBABILITIES_SUFFIX
from .summary import Summary, summarize

__all__ = [
    "OUTPUTS",
    "Output",
    "cells_to_image",
    "class_regions",
    "label_image",
    "label_regions",
    "output_paths",
    "outputs_complete",
    "qc_regions",
    "slide_lock",
    "write_label_tiff",
    "write_output",
    "write_outputs",
    "write_probabilities",
]


def label_regions(
    labels: np.ndarray,
    classes: tuple[str, ...] | list[str],
    *,
    origin_px: tuple[float, float] = (0.0, 0.0),
    step_px: tuple[float, float] = (1.0, 1.0),
    clip_to: tuple[int, int] | None = None,
) -> list[Annotation]:
    """One (multi-)polygon per class of a label array, in level-0 pixels.

    Element ``(i, j)`` covers level-0 ``[origin + i * step, origin + (i + 1) * step)``
    (a class map's cells, or a napari Labels layer's pixels).  Runs along each
    row are merged before the union, so a 512² map takes well under a second.
    ``clip_to`` (level-0 ``(h, w)``) cuts the regions at the image's edge.
    """
    from shapely import union_all
    from shapely.geometry import MultiPolygon, Polygon, box

    # Shared edges must be bit-identical floats, or the union leaves slivers.
    ys = origin_px[0] + np.arange(labels.shape[0] + 1) * step_px[0]
    xs = origin_px[1] + np.arange(labels.shape[1] + 1) * step_px[1]
    frame = box(0, 0, clip_to[1], clip_to[0]) if clip_to is not None else None
    out: list[Annotation] = []
    for st in class_styles(classes):
        sel = labels == st.label
        if not sel.any():
            continue
        rects = []
        for r in np.flatnonzero(sel.any(axis=1)):
            row = sel[r]
            # run starts and ends of True along the row
            edges = np.flatnonzero(np.diff(np.concatenate(([0], row.view(np.int8), [0]))))
            for c0, c1 in zip(edges[::2], edges[1::2], strict=True):
                rects.append(box(xs[c0], ys[r], xs[c1], ys[r + 1]))
        merged = union_all(rects)
        if frame is not None:
            merged = merged.intersection(frame)
        polys = list(merged.geoms) if isinstance(merged, MultiPolygon) else [merged] if isinstance(merged,
                                                                                                   Polygon) else []
        for poly in polys:
            if poly.is_empty or poly.area <= 0:
                continue
            poly = poly.simplify(0)  # drop collinear vertices of the cell staircase
            out.append(
                Annotation(
                    label=st.name,
                    class_name=canonical_class(st.name),
                    polygon=np.asarray(poly.exterior.coords)[:, ::-1],
                    holes=[np.asarray(h.coords)[:, ::-1] for h in poly.interiors],
                    color=st.color,
                    group=f"class-{st.name}",
                )
            )
    return out


def class_regions(class_map: ClassMap, measurements: bool = True) -> list[Annotation]:
    """One (multi-)polygon per class: the union of its cells, cut at the image's edge, in level-0 pixels.

    With ``measurements`` each class's region carries what QuPath shows in
    its measurement table: its area (mm²), share of the classified tissue,
    and the mean probability of every class over its cells.
    """
    g = class_map.grid
    regions = label_regions(class_map.labels, class_map.classes, origin_px=g.origin_px, step_px=g.stride_px,
                            clip_to=class_map.slide_shape if all(class_map.slide_shape) else None)
    if measurements and regions:
        summary = {c.name: c for c in summarize(class_map).classes}
        for a in regions:
            row = summary.get(a.label)
            if row is None:
                continue
            k = class_map.classes.index(a.label) + 1
            probs = class_map.probs[class_map.labels == k]
            m = {"Area mm^2": row.area_mm2, "Tissue %": row.percent_of_tissue, "Windows": float(row.windows)}
            if len(probs):
                for name, v in zip(class_map.classes, np.nanmean(probs, axis=0), strict=True):
                    m[f"Mean p({name})"] = round(float(v), 6)
            a.measurements = m
    return regions + qc_regions(class_map)


def qc_regions(class_map: ClassMap) -> list[Annotation]:
    """The tissue quality control left out, one region per reason, as QuPath "Ignore*" objects (QuPath leaves
    classes ending in "*" out of its measurements and training) named by their reason, with their tissue area."""
    from .qc import REASON_COLOURS, REASON_WORDS, REASONS

    if class_map.qc_cells is None or not class_map.qc_cells.any():
        return []
    g = class_map.grid
    regions = label_regions(class_map.qc_cells, REASONS, origin_px=g.origin_px, step_px=g.stride_px,
                            clip_to=class_map.slide_shape if all(class_map.slide_shape) else None)
    left = summarize(class_map).left_out
    for a in regions:
        reason = a.label
        a.label, a.class_name, a.color, a.group = "Ignore*", None, REASON_COLOURS[reason], f"qc-{reason}"
        a.name = f"QC: {REASON_WORDS[reason]}"
        a.measurements = {"Tissue left out mm^2": left.get(reason, 0.0)}
    return regions


def cells_to_image(class_map: ClassMap, values: np.ndarray, max_size: int = 4096,
                   fill: float | int = 0) -> tuple[np.ndarray, int]:
    """Per-cell ``values`` rasterised over exactly the slide, at an integer downsample ``k`` of level 0.

    Each output pixel takes the value of the cell containing its centre; the
    raster ends where the image ends, so cells that run past the edge are cut
    there.  ``k`` is 1 (pixel-exact) unless that would exceed ``max_size``.
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
    img = np.full((h, w), fill, values.dtype)
    img[np.ix_(rv, cv)] = values[np.ix_(r[rv], c[cv])]
    return img, k


def label_image(class_map: ClassMap, max_size: int = 4096) -> tuple[np.ndarray, int]:
    """The label map over exactly the whole slide at an integer downsample ``k`` of level 0.

    See :func:`cells_to_image`.
    """
    return cells_to_image(class_map, class_map.labels, max_size, fill=0)


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
    styles = class_styles(class_map.classes)
    for st in styles:
        cmap[:, st.label] = np.asarray(st.color, np.uint16) * 257
    unsure = class_map.uncertain_label
    cmap[:, unsure] = 158 * 257
    legend = {"0": "Background", **{str(st.label): st.display_name for st in styles}, str(unsure): "Uncertain"}
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
            description=_description(class_map, downsample=k, labels=legend),
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




def _write_summary_json(class_map: ClassMap, summary: Summary, path: Path) -> None:
    with atomic_write(path, "w") as fh:
        fh.write(summary.to_json())


def _write_summary_csv(class_map: ClassMap, summary: Summary, path: Path) -> None:
    with atomic_write(path, "w") as fh:
        fh.write(summary.to_csv())


@dataclass(frozen=True)
class Output:
    """One kind of output of a classified slide: the one row to add an output to.

    ``write(class_map, summary, path)`` writes it (atomically); ``label`` names
    it on the Classify dock's export buttons.
    """

    kind: str
    suffix: str
    label: str
    write: Callable[[ClassMap, Summary, Path], None]


OUTPUTS: tuple[Output, ...] = (
    Output("labels", LABELS_SUFFIX, "Label TIFF",
           lambda cm, s, p: write_label_tiff(cm, p, overwrite=True)),
    Output("probabilities", PROBABILITIES_SUFFIX, "Probabilities TIFF",
           lambda cm, s, p: write_probabilities(cm, p, overwrite=True)),
    Output("summary_json", ".summary.json", "Summary JSON", _write_summary_json),
    Output("summary_csv", ".summary.csv", "CSV summary", _write_summary_csv),
    Output("geojson", ".geojson", "GeoJSON for QuPath",
           lambda cm, s, p: write_geojson(class_regions(cm), p, overwrite=True)),
)
OUTPUT_KINDS = {o.kind: o for o in OUTPUTS}




def output_paths(out_dir: str | os.PathLike[str], stem: str) -> dict[str, Path]:
    """The files one slide's outputs are, by kind (the done-record not included)."""
    d = Path(out_dir)
    return {o.kind: d / f"{stem}{o.suffix}" for o in OUTPUTS}


def write_output(kind: str, class_map: ClassMap, path: str | os.PathLike[str],
                 summary: Summary | None = None) -> Path:
    """Write one output of a class map (a dock's export button) to ``path``, replacing it."""
    p = Path(path)
    OUTPUT_KINDS[kind].write(class_map, summary or summarize(class_map), p)
    return p


def write_outputs(
    class_map: ClassMap,
    out_dir: str | os.PathLike[str],
    *,
    stem: str | None = None,
    min_area_mm2: float = 0.0,
    overwrite: bool = False,
    summary: Summary | None = None,
    record: dict | None = None,
) -> dict[str, Path]:
    """Write every output of one slide into ``out_dir`` as one set; returns them by kind.

    The files are written into a temporary folder beside them, moved into
    place, and a done-record (``<stem>.done.json``: each file's size and
    SHA-256, plus ``record``) is written last.  With ``overwrite`` the old
    record goes first, so an interrupted replacement never leaves a record
    vouching for a mixed set.  Hold :func:`slide_lock` around the whole run when
    several processes may write the same folder.
    """
    d = Path(out_dir)
    d.mkdir(parents=True, exist_ok=True)
    stem = stem or Path(class_map.slide_name).stem
    paths = output_paths(d, stem)
    done = d / f"{stem}{DONE_SUFFIX}"
    for p in [*paths.values(), done]:
        check_writable(p, overwrite)
    summary = summary or summarize(class_map, min_area_mm2=min_area_mm2)
    tmp = Path(tempfile.mkdtemp(prefix=f".{stem}.partial-", dir=d))
    try:
        staged = {k: tmp / p.name for k, p in paths.items()}
        for o in OUTPUTS:
            o.write(class_map, summary, staged[o.kind])
        files = {k: {"name": paths[k].name, "bytes": p.stat().st_size, "sha256": file_digest(p)} for k,
                 p in staged.items()}
        done.unlink(missing_ok=True)
        marker = d / f".{stem}{WRITING_SUFFIX}"  # until the done-record: these files are ours, half-replaced
        marker.touch()
        for k, p in staged.items():
            os.replace(p, paths[k])
        from ._version import __version__

        doc = {"slide": class_map.slide_name, "model": class_map.model_name, "files": files,
               "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
               "package_version": __version__, **(record or {})}
        with atomic_write(done, "w") as fh:
            json.dump(doc, fh, indent=2)
        marker.unlink(missing_ok=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return paths
