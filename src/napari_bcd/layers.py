"""ClassMap -> napari layer-data tuples (no napari import: plain data and kwargs)."""

from __future__ import annotations

from typing import Any

import numpy as np

from .classes import class_styles
from .engine import ClassMap

__all__ = ["classmap_layers", "describe_hover", "label_colors", "qc_colors", "qc_layer"]


def label_colors(classes: tuple[str, ...] | list[str]) -> dict[int | None, tuple[float, float, float, float]]:
    """Colours of a model's classes for a Labels layer (label = output index + 1); background transparent."""
    colors: dict[int | None, tuple[float, float, float, float]] = {None: (0, 0, 0, 0), 0: (0, 0, 0, 0)}
    for st in class_styles(classes):
        r, g, b = st.color
        colors[st.label] = (r / 255, g / 255, b / 255, 1.0)
    colors[len(tuple(classes)) + 1] = UNCERTAIN_RGBA
    return colors


def qc_colors() -> dict[int | None, tuple[float, float, float, float]]:
    """Colours of the quality-control layer: one per reason (:data:`napari_bcd.qc.REASONS`), passing cells clear."""
    from .qc import REASON_COLOURS, REASONS

    colors: dict[int | None, tuple[float, float, float, float]] = {None: (0, 0, 0, 0), 0: (0, 0, 0, 0)}
    for i, r in enumerate(REASONS):
        red, green, blue = REASON_COLOURS[r]
        colors[i + 1] = (red / 255, green / 255, blue / 255, 1.0)
    return colors


def qc_layer(class_map: ClassMap, image_name: str, image_translate: tuple[float, float] = (0.0, 0.0),
             max_size: int = 4096) -> tuple[np.ndarray, dict[str, Any], str] | None:
    """The Labels layer of what quality control left out (a reason code per pixel), or None when nothing was."""
    from .export import cells_to_image
    from .qc import REASON_WORDS, REASONS

    if class_map.qc_cells is None or not class_map.qc_cells.any():
        return None
    data, k = cells_to_image(class_map, class_map.qc_cells, max_size, fill=0)
    my, mx = class_map.grid.mpp
    legend = {str(i + 1): REASON_WORDS[r] for i, r in enumerate(REASONS)}
    return (data, {"name": f"{image_name} quality control", "scale": (my * k, mx * k),
                   "translate": (image_translate[0] + (k - 1) / 2 * my, image_translate[1] + (k - 1) / 2 * mx),
                   "opacity": 0.6, "units": ("µm", "µm"),
                   "metadata": {"napari_bcd": {"qc_legend": legend, "image": image_name}}}, "labels")


#: Uncertain cells (see :mod:`napari_bcd.decision`): grey.
UNCERTAIN_RGBA = (0.62, 0.62, 0.62, 1.0)


def classmap_layers(
    class_map: ClassMap,
    image_name: str,
    image_translate: tuple[float, float] = (0.0, 0.0),
    probabilities: bool = False,
    max_size: int = 4096,
) -> list[tuple[np.ndarray, dict[str, Any], str]]:
    """Layer data for a classification: the Labels layer, and optionally one image per class.

    The cells are rasterised over exactly the image (:func:`~napari_bcd.export.cells_to_image`),
    pixel-exact up to ``max_size`` px, so the class map ends where the slide
    ends; a raster pixel covering level-0 ``[i k, (i + 1) k)`` is centred at
    ``(i k + (k - 1) / 2) * mpp`` in the image's world space (µm).
    """
    from .export import cells_to_image

    labels, k = cells_to_image(class_map, class_map.labels, max_size, fill=0)
    my, mx = class_map.grid.mpp
    scale = (my * k, mx * k)
    translate = (image_translate[0] + (k - 1) / 2 * my, image_translate[1] + (k - 1) / 2 * mx)
    meta = {"napari_bcd": {"image": image_name, "image_mpp": [my, mx], "image_translate": list(image_translate),
                           "classes": list(class_map.classes), "downsample": k, "grid": class_map.grid.to_dict(),
                           "model_path": class_map.model_path}}
    out: list[tuple[np.ndarray, dict[str, Any], str]] = [
        (
            labels,
            {
                "name": f"{image_name} classes",
                "scale": scale,
                "translate": translate,
                "opacity": 0.5,
                "metadata": meta,
                "units": ("µm", "µm"),
            },
            "labels",
        )
    ]
    if probabilities:
        for i, (cname, st) in enumerate(zip(class_map.classes, class_styles(class_map.classes), strict=True)):
            p, pk = cells_to_image(class_map, np.nan_to_num(class_map.probs[..., i], nan=0.0).astype(np.float32),
                                   min(max_size, 1024))
            out.append(
                (
                    p,
                    {
                        "name": f"{image_name} p({cname})",
                        "scale": (my * pk, mx * pk),
                        "translate": (image_translate[0] + (pk - 1) / 2 * my, image_translate[1] + (pk - 1) / 2 * mx),
                        "contrast_limits": (0.0, 1.0),
                        "colormap": _ramp(cname, st.color),
                        "blending": "additive",
                        "opacity": 0.6,
                        "visible": False,
                        "metadata": meta,
                        "units": ("µm", "µm"),
                    },
                    "image",
                )
            )
    return out


def _ramp(name: str, rgb: tuple[int, int, int]) -> dict:
    return {"name": f"bcd-{name}", "colors": [[0, 0, 0, 0], [rgb[0] / 255, rgb[1] / 255, rgb[2] / 255, 1]]}


def describe_hover(class_map: ClassMap, world_yx: tuple[float, float], image_translate: tuple[float,
                                                                                              float] = (0, 0)) -> str:
    """Text for the window under the mouse: its class and probabilities."""
    my, mx = class_map.grid.mpp
    # world (µm) -> level-0 continuous pixels (pixel centres at i * mpp)
    y = (world_yx[0] - image_translate[0]) / my
    x = (world_yx[1] - image_translate[1]) / mx
    h, w = class_map.slide_shape
    if h and w and not (-0.5 <= y < h - 0.5 and -0.5 <= x < w - 0.5):
        return ""  # off the image: nothing to say
    label, probs = class_map.at_level0(y, x)
    left_out = _left_out_reason(class_map, y, x) if label == 0 else ""
    if probs is None:
        return f"left out by quality control: {left_out} (not classified)" if left_out else ""
    parts = " ".join(f"{n[:3]} {p:.2f}" for n, p in zip(class_map.classes, probs, strict=True))
    styles = class_styles(class_map.classes)
    shown = (styles[label - 1].display_name if 0 < label <= len(styles)
             else "uncertain" if label == class_map.uncertain_label else "not classified")
    if left_out:
        shown = f"left out by quality control: {left_out}; the model said"
    return f"{shown}  ({parts})"


def _left_out_reason(class_map: ClassMap, y: float, x: float) -> str:
    """The quality-control reason of the cell under level-0 pixel ``(y, x)`` in words, or ""."""
    from .qc import REASON_WORDS, REASONS

    if class_map.qc_cells is None:
        return ""
    cell = class_map.grid.cell_of_point(y + 0.5, x + 0.5)
    code = int(class_map.qc_cells[cell]) if cell is not None else 0
    return REASON_WORDS[REASONS[code - 1]] if code else ""
