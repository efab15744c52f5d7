"""Tissue detection on a low-resolution image of the slide.

Method (on an RGB thumbnail, typically <= 2,000 px wide):

1. A pixel is a tissue candidate when it is coloured like H&E: saturation
   ``(max - min) / max`` at least ``threshold`` (default 0.1, the one setting a
   user normally changes: lower it for pale stains, raise it for dirty glass),
   not near-black (ink, debris) nor near-white (glass), and with an H&E hue — haematoxylin and eosin
   are purple to pink, i.e. blue at least a quarter of the way from green to
   red.  Red, green and black marker pens fail this test.
2. The candidate mask is smoothed (closing then opening with a disk of about
   ``smooth_um``) and components smaller than ``min_area_um2`` are dropped.
3. Components that are dark on average (median brightness below 125 of 255)
   are marker pen or folds of ink, not tissue: stained tissue seen at low
   resolution is lighter than that.

Everything here is plain NumPy / scikit-image on a small image.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .errors import BcdError

__all__ = ["TissueParams", "detect_tissue"]


@dataclass(frozen=True)
class TissueParams:
    """Settings of :func:`detect_tissue`.

    Attributes
    ----------
    threshold
        Minimum saturation (0-1) of a tissue pixel.
    min_value, dark_component
        Brightness (0-255) below which a pixel, or a component's median, is ink.
    max_mean
        Mean grey level (0-255) above which a pixel is glass.
    smooth_um, min_area_um2
        Morphological smoothing radius and smallest kept component, in µm / µm².
    work_mpp
        Finer images are block-averaged to about this many µm/px first: the
        morphology then costs milliseconds, and the mask comes back at the
        input's size.
    """

    threshold: float = 0.1
    work_mpp: float = 4.0
    min_value: float = 60.0
    max_mean: float = 230.0
    dark_component: float = 125.0
    smooth_um: float = 30.0
    min_area_um2: float = 20_000.0

    def __post_init__(self) -> None:
        if not 0 <= self.threshold <= 1:
            raise BcdError(f"The tissue threshold is a saturation between 0 and 1, not {self.threshold}.")


def detect_tissue(rgb: np.ndarray, mpp: float | None = None, params: TissueParams | None = None) -> np.ndarray:
    """Boolean tissue mask of an RGB image.

    Parameters
    ----------
    rgb
        ``(h, w, 3)`` uint8 image, usually a thumbnail.
    mpp
        µm per pixel of ``rgb``; sizes in ``params`` are converted with it.
        When None, 8 µm/px (a typical thumbnail) is assumed.
    params
        Settings; see :class:`TissueParams`.

    Returns
    -------
    np.ndarray
        ``(h, w)`` bool.
    """
    p = params or TissueParams()
    if rgb.ndim != 3 or rgb.shape[-1] < 3:
        raise BcdError(f"Tissue detection needs an RGB image, got shape {rgb.shape}.")
    scale = 8.0 if mpp is None else float(mpp)
    f = int(p.work_mpp // scale) if scale < p.work_mpp else 1
    if f > 1:
        small = _block_mean(rgb[..., :3], f)
        mask = _detect(small, scale * f, p)
        full = np.repeat(np.repeat(mask, f, axis=0), f, axis=1)
        return full[: rgb.shape[0], : rgb.shape[1]]
    return _detect(rgb[..., :3].astype(np.float32), scale, p)


def _block_mean(rgb: np.ndarray, f: int) -> np.ndarray:
    """Means of ``f x f`` blocks, the image padded with white to a multiple of ``f``, as float32."""
    h, w = rgb.shape[:2]
    H, W = -(-h // f) * f, -(-w // f) * f
    a = np.full((H, W, 3), 255.0, np.float32)
    a[:h, :w] = rgb
    return a.reshape(H // f, f, W // f, f, 3).mean(axis=(1, 3))


def _detect(a: np.ndarray, scale: float, p: TissueParams) -> np.ndarray:
    # scipy.ndimage only: scikit-image's import alone took half a second of every classify run
    from scipy import ndimage

    r, g, b = a[..., 0], a[..., 1], a[..., 2]
    vmax = np.maximum(np.maximum(r, g), b)
    sat = (vmax - np.minimum(np.minimum(r, g), b)) / np.maximum(vmax, 1.0)
    mean = (r + g + b) / 3.0
    mask = (
        (sat >= p.threshold)
        & (vmax >= p.min_value)
        & (mean <= p.max_mean)
        & ((b - g) > 0.25 * (r - g))
    )
    radius = max(0, int(round(p.smooth_um / scale / 2)))
    if radius:
        yy, xx = np.ogrid[-radius : radius + 1, -radius : radius + 1]
        fp = yy * yy + xx * xx <= radius * radius  # a disk
        # Pad so closing does not eat tissue touching the border.
        padded = np.pad(mask, radius, mode="edge")
        padded = ndimage.binary_opening(ndimage.binary_closing(padded, fp), fp)
        mask = padded[radius:-radius, radius:-radius]
    min_px = int(p.min_area_um2 / (scale * scale))
    labels, n = ndimage.label(mask, structure=np.ones((3, 3), bool))  # 8-connected components
    if n == 0:
        return mask
    areas = np.bincount(labels.ravel(), minlength=n + 1)
    big = np.flatnonzero(areas >= max(min_px, 1))
    big = big[big > 0]
    keep = np.zeros(n + 1, dtype=bool)
    if len(big):
        medians = np.asarray(ndimage.median(vmax, labels, big), np.float64).reshape(-1)
        keep[big] = medians >= p.dark_component
    return keep[labels]
