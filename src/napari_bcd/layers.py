"""ClassMap -> napari layer-data tuples (no napari import: plain data and kwargs)."""

from __future__ import annotations

from typing import Any

import numpy as np

from .classes import CLASS_NAMES, class_styles
from .engine import ClassMap

__all__ = ["classmap_layers", "describe_hover", "label_colors"]


def label_colors(classes: tuple[str, ...] | list[str] = CLASS_NAMES) -> dict[int | None, tuple[float, float, float, float]]:
    """Colours of a model's classes for a Labels layer (label = output index + 1); background transparent."""
    colors: dict[int | None, tuple[float, float, float, float]] = {None: (0, 0, 0, 0), 0: (0, 0, 0, 0)}
    for st in class_styles(classes):
        r, g, b = st.color
        colors[st.label] = (r / 255, g / 255, b / 255, 1.0)
    return colors


def classmap_layers(
    class_map: ClassMap,
    image_name: str,
    image_translate: tuple[float, float] = (0.0, 0.0),
    probabilities: bool = False,
) -> list[tuple[np.ndarray, dict[str, Any], str]]:
    """Layer data for a classification: the Labels layer, and optionally one image per class.

    The cells are placed in the image's world space (µm): see
    :meth:`ClassMap.layer_transform`.
    """
    scale, translate = class_map.layer_transform()
    translate = (translate[0] + image_translate[0], translate[1] + image_translate[1])
    meta = {"napari_bcd": {"image": image_name, "image_mpp": list(class_map.grid.mpp), "classes": list(class_map.classes)}}
    out: list[tuple[np.ndarray, dict[str, Any], str]] = [
        (
            class_map.labels,
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
            rgb = st.color
            out.append(
                (
                    np.nan_to_num(class_map.probs[..., i], nan=0.0),
                    {
                        "name": f"{image_name} p({cname})",
                        "scale": scale,
                        "translate": translate,
                        "contrast_limits": (0.0, 1.0),
                        "colormap": _ramp(cname, rgb),
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


def describe_hover(class_map: ClassMap, world_yx: tuple[float, float], image_translate: tuple[float, float] = (0, 0)) -> str:
    """Text for the window under the mouse: its class and probabilities."""
    my, mx = class_map.grid.mpp
    # world (µm) -> level-0 continuous pixels (pixel centres at i * mpp)
    y = (world_yx[0] - image_translate[0]) / my
    x = (world_yx[1] - image_translate[1]) / mx
    h, w = class_map.slide_shape
    if h and w and not (-0.5 <= y < h - 0.5 and -0.5 <= x < w - 0.5):
        return ""  # off the image: nothing to say
    label, probs = class_map.at_level0(y, x)
    if probs is None:
        return ""
    parts = " ".join(f"{n[:3]} {p:.2f}" for n, p in zip(class_map.classes, probs, strict=True))
    styles = class_styles(class_map.classes)
    shown = styles[label - 1].display_name if 0 < label <= len(styles) else "not classified"
    return f"{shown}  ({parts})"
