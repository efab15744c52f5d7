"""Why the model said so: Grad-CAM over the windows of a region, as an image aligned with the slide.

Grad-CAM (Selvaraju et al., ICCV 2017) on the backbone's last feature map:
the gradient of the chosen class's score (the logit, before the softmax)
with respect to each feature channel, averaged over positions, weighs the
channels; the weighted sum, through a ReLU, says where in the window the
evidence for that class lies.  It works for any backbone whose output is a
feature map: the paper's Keras-layout ResNet152V2 (its last block, after
the final batch-norm and ReLU) and timm CNNs and ViTs (tokens folded back
into their grid).  The map has the feature map's resolution (8 x 8 for
ResNet152V2 at 256 px), upsampled bilinearly to the input.
"""

from __future__ import annotations

from collections.abc import Generator
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from ..errors import BcdError

if TYPE_CHECKING:
    import torch

    from ..io.slide import Slide
    from ..model.classifier import Classifier
    from ..tiling import Grid

__all__ = ["SaliencyMap", "gradcam", "iter_saliency"]


def gradcam(model: Classifier, batch: np.ndarray, class_index: int | None = None,
            device: str | torch.device | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Grad-CAM maps ``(N, h, w)`` (0..1, each window scaled by its own maximum) and probabilities ``(N, C)``.

    ``batch`` is uint8 ``N x h x w x 3`` at the model's input size;
    ``class_index`` None explains each window's most probable class.
    """
    import torch
    import torch.nn.functional as F

    dev = torch.device(device) if device is not None else next(model.parameters()).device
    model.eval()
    x = model.normalise(torch.from_numpy(np.ascontiguousarray(batch)).to(dev))
    with torch.enable_grad():
        feats = model.backbone(x).detach().requires_grad_(True)
        logits = model.head(feats)
        probs = torch.softmax(logits.float(), 1)
        target = probs.argmax(1) if class_index is None else torch.full((len(x),), int(class_index), device=dev)
        score = logits.gather(1, target.view(-1, 1)).sum()
        (grads,) = torch.autograd.grad(score, feats)
    w = grads.mean(dim=(2, 3), keepdim=True)
    cam = F.relu((w * feats).sum(1, keepdim=True))
    cam = F.interpolate(cam, size=tuple(batch.shape[1:3]), mode="bilinear", align_corners=False)[:, 0]
    peak = cam.flatten(1).amax(1).clamp_min(1e-12).view(-1, 1, 1)
    return (cam / peak).detach().cpu().numpy().astype(np.float32), probs.detach().cpu().numpy()


@dataclass
class SaliencyMap:
    """A Grad-CAM image over a box of the slide.

    Pixel ``(i, j)`` covers level-0 ``origin_px + (i, j) * step_px`` to the
    next; ``napari_layer()`` gives the matching scale and translate in µm.
    """

    image: np.ndarray
    origin_px: tuple[float, float]
    step_px: tuple[float, float]
    mpp: tuple[float, float]
    class_name: str | None
    windows: int

    def layer_kwargs(self, image_translate: tuple[float, float] = (0.0, 0.0)) -> dict:
        sy, sx = self.step_px[0] * self.mpp[0], self.step_px[1] * self.mpp[1]
        return {
            "scale": (sy, sx),
            # napari places pixel centres at index * scale + translate
            "translate": (image_translate[0] + (self.origin_px[0] + self.step_px[0] / 2 - 0.5) * self.mpp[0],
                          image_translate[1] + (self.origin_px[1] + self.step_px[1] / 2 - 0.5) * self.mpp[1]),
            "colormap": "inferno", "blending": "additive", "opacity": 0.6, "contrast_limits": (0.0, 1.0),
            "units": ("µm", "µm"),
        }


def iter_saliency(slide: Slide, model: Classifier, grid: Grid, box_px: tuple[float, float, float, float], *,
                  class_name: str | None = None, max_windows: int = 64, batch_size: int = 8,
                  device: str | torch.device | None = None) -> Generator[tuple[int, int], None, SaliencyMap]:
    """Grad-CAM of every window of ``grid`` overlapping level-0 ``box_px = (y0, x0, y1, x1)``; overlaps averaged.

    Yields ``(done, total)``; returns a :class:`SaliencyMap`.  ``class_name``
    None explains each window's most probable class.

    Raises
    ------
    BcdError
        When the box holds more than ``max_windows`` windows (zoom in), or names an unknown class.
    """
    from ..windows import read_window

    classes = tuple(model.card.classes)
    if class_name is not None and class_name not in classes:
        raise BcdError(f"{class_name!r} is not one of the model's classes ({', '.join(classes)}).")
    y0, x0, y1, x1 = box_px
    gy, gx = grid.origin_px
    sy, sx = grid.stride_px
    wh, ww = grid.window_px
    r0 = max(int(np.floor((y0 - gy - wh) / sy)) + 1, 0)
    r1 = min(int(np.ceil((y1 - gy) / sy)), grid.n_windows[0])
    c0 = max(int(np.floor((x0 - gx - ww) / sx)) + 1, 0)
    c1 = min(int(np.ceil((x1 - gx) / sx)), grid.n_windows[1])
    # Overlapping windows add nothing to an explanation: every k-th one tiles the region edge to edge.
    kh, kw = grid.cells_per_window
    wins = [(r, c) for r in range(r0, r1, kh) for c in range(c0, c1, kw)]
    if not wins:
        raise BcdError("No model window overlaps this region.")
    if len(wins) > max_windows:
        raise BcdError(f"This view holds {len(wins)} windows; Grad-CAM explains at most {max_windows} at a time. "
                       "Zoom in (or choose a smaller region).")
    ih, iw = grid.input_px
    step = (wh / ih, ww / iw)
    oy, ox = gy + r0 * sy, gx + c0 * sx
    H = int(np.ceil(((max(r for r, _ in wins) - r0) * sy + wh) / step[0]))
    W = int(np.ceil(((max(c for _, c in wins) - c0) * sx + ww) / step[1]))
    acc = np.zeros((H, W), np.float64)
    cnt = np.zeros((H, W), np.float64)
    k = classes.index(class_name) if class_name else None
    yield (0, len(wins))
    for i in range(0, len(wins), batch_size):
        chunk = wins[i : i + batch_size]
        batch = np.stack([read_window(slide, grid, r, c, (ih, iw)) for r, c in chunk])
        cams, _ = gradcam(model, batch, k, device)
        for (r, c), cam in zip(chunk, cams, strict=True):
            py = int(round((r - r0) * sy / step[0]))
            px = int(round((c - c0) * sx / step[1]))
            hh, ww_ = min(ih, H - py), min(iw, W - px)
            acc[py : py + hh, px : px + ww_] += cam[:hh, :ww_]
            cnt[py : py + hh, px : px + ww_] += 1
        yield (min(i + batch_size, len(wins)), len(wins))
    with np.errstate(invalid="ignore"):
        img = np.where(cnt > 0, acc / np.maximum(cnt, 1), 0).astype(np.float32)
    # Windows overhang the slide's edges (read as glass): the explanation ends where the slide ends.
    sh, sw = slide.dimensions
    top, left = max(int(np.ceil(-oy / step[0])), 0), max(int(np.ceil(-ox / step[1])), 0)
    bottom = min(H, max(int(np.ceil((sh - oy) / step[0])), top))
    right = min(W, max(int(np.ceil((sw - ox) / step[1])), left))
    img = img[top:bottom, left:right]
    return SaliencyMap(img, (oy + top * step[0], ox + left * step[1]), step, tuple(grid.mpp), class_name, len(wins))
