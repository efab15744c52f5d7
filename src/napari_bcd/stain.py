"""Stain statistics, the distance between two stainings, and Macenko normalisation.

Two estimators of the stain vectors.  Macenko et al. (ISBI 2009): in optical density (OD = -ln((I + 1) / 255)),
H&E pixels lie near the plane of two stain vectors.  From the tissue pixels
(OD above 0.15 in every channel) the plane is the span of the two main
eigenvectors of their OD covariance; the stain vectors are the directions at
the 1st and 99th percentiles of the pixels' angle in that plane
(hematoxylin: the one with more red OD); each pixel's stain concentrations
are its least-squares coordinates on the two vectors, and their 99th
percentiles measure how strongly each stain was applied.  Vahadane et al.
(IEEE TMI 2016): sparse non-negative matrix factorisation OD ≈ W H (W the
3 x 2 stain matrix, H the concentrations, an L1 penalty of 0.1 on H), solved
here by multiplicative updates started from the Macenko vectors (300
iterations on up to 20,000 tissue pixels); it keeps each pixel's
concentrations non-negative and sparse, which suits slides with one stain
dominating.

:class:`StainStats` holds the two vectors, the two concentration
percentiles and the mean OD.  :func:`stain_distance` compares two of them:
the angle between the hematoxylin vectors and between the eosin vectors
(degrees), and the ratio of the concentration percentiles; a slide *differs*
from the training set when an angle exceeds 8° or a ratio leaves [1/1.5, 1.5]
(heuristic thresholds: flips and crops of one image move the statistics by
well under a degree and a few per cent; a restained copy moves them by
tens of degrees).  :func:`macenko_transform` is the 3 x 3 OD map that gives
a slide the reference's vectors and concentration scale; the engine applies
it to every window on the model's device.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from .errors import BcdError

__all__ = ["METHODS", "StainStats", "apply_od_transform", "macenko_transform", "reference_stats", "stain_distance",
           "stain_noise", "stain_stats"]

METHODS = ("macenko", "vahadane")

IO = 255.0
BETA = 0.15
ALPHA = 1.0
MAX_ANGLE_DEG = 8.0
MAX_RATIO = 1.5


@dataclass(frozen=True)
class StainStats:
    """Macenko stain vectors (unit, OD space, RGB order), the 99th-percentile concentrations, the mean OD."""

    h_vector: tuple[float, float, float]
    e_vector: tuple[float, float, float]
    max_conc: tuple[float, float]
    od_mean: tuple[float, float, float]
    pixels: int

    def to_dict(self, method: str = "macenko") -> dict:
        return {"method": method, "h_vector": list(self.h_vector), "e_vector": list(self.e_vector),
                "max_conc": list(self.max_conc), "od_mean": list(self.od_mean), "pixels": self.pixels}

    @classmethod
    def from_dict(cls, d: dict | None) -> StainStats | None:
        if not d:
            return None
        try:
            stats = cls(tuple(float(v) for v in d["h_vector"]), tuple(float(v) for v in d["e_vector"]),
                        tuple(float(v) for v in d["max_conc"]), tuple(float(v) for v in d["od_mean"]),
                        int(d.get("pixels", 0)))
        except (KeyError, TypeError, ValueError) as err:
            raise BcdError(f"The model card's stain statistics are malformed ({err}); train the model again, or "
                           "remove the card's \"stain\" entry to classify without the stain check.") from err
        numbers = np.asarray([*stats.h_vector, *stats.e_vector, *stats.max_conc, *stats.od_mean])
        if (len(stats.h_vector) != 3 or len(stats.e_vector) != 3 or len(stats.max_conc) != 2
                or not np.isfinite(numbers).all() or min(stats.max_conc) <= 0
                or np.linalg.norm(stats.h_vector) == 0 or np.linalg.norm(stats.e_vector) == 0):
            raise BcdError("The model card's stain statistics are not usable (NaN, infinite, zero or the wrong "
                           "length): train the model again, or remove the card's \"stain\" entry to classify "
                           "without the stain check.")
        return stats

    @property
    def matrix(self) -> np.ndarray:
        """3 x 2: hematoxylin and eosin vectors as columns."""
        return np.stack([self.h_vector, self.e_vector], axis=1)


def _od(rgb: np.ndarray) -> np.ndarray:
    return -np.log((np.asarray(rgb, np.float64).reshape(-1, 3) + 1.0) / IO)


def stain_stats(images: np.ndarray | Sequence[np.ndarray], max_pixels: int = 200_000, seed: int = 0,
                method: str = "macenko") -> StainStats:
    """Stain statistics of the tissue pixels of one RGB image or several (a sample of ``max_pixels``).

    ``method``: ``"macenko"`` or ``"vahadane"`` (see the module's text).

    Raises
    ------
    BcdError
        When there are too few tissue pixels (under 500) to estimate them.
    """
    imgs = [images] if isinstance(images, np.ndarray) else list(images)
    rng = np.random.default_rng(seed)
    per = max(1, max_pixels // max(1, len(imgs)))
    ods = []
    for img in imgs:
        od = _od(np.asarray(img)[..., :3])
        od = od[(od > BETA).all(axis=1)]
        if len(od) > per:
            od = od[rng.choice(len(od), per, replace=False)]
        ods.append(od)
    od = np.concatenate(ods) if ods else np.zeros((0, 3))
    if len(od) < 500:
        raise BcdError(f"Too little stained tissue ({len(od)} pixels) to measure the stain.")
    _, vecs = np.linalg.eigh(np.cov(od.T))
    plane = vecs[:, 1:3]  # the two largest
    proj = od @ plane
    phi = np.arctan2(proj[:, 1], proj[:, 0])
    lo, hi = np.percentile(phi, ALPHA), np.percentile(phi, 100 - ALPHA)
    v1 = plane @ np.array([math.cos(lo), math.sin(lo)])
    v2 = plane @ np.array([math.cos(hi), math.sin(hi)])
    v1 = v1 if v1.sum() >= 0 else -v1
    v2 = v2 if v2.sum() >= 0 else -v2
    h, e = (v1, v2) if v1[0] > v2[0] else (v2, v1)
    h, e = h / np.linalg.norm(h), e / np.linalg.norm(e)
    if method == "vahadane":
        sub = od if len(od) <= 20_000 else od[rng.choice(len(od), 20_000, replace=False)]
        w, _ = _snmf(sub.T, np.stack([h, e], 1))
        h, e = w[:, 0], w[:, 1]
        conc = _nonneg_conc(np.stack([h, e], 1), od.T)
    elif method == "macenko":
        conc, *_ = np.linalg.lstsq(np.stack([h, e], 1), od.T, rcond=None)
    else:
        raise BcdError(f"Unknown stain method {method!r}; use macenko or vahadane.")
    max_c = np.percentile(conc, 99, axis=1)
    return StainStats(tuple(float(v) for v in h), tuple(float(v) for v in e), (float(max_c[0]), float(max_c[1])),
                      tuple(float(v) for v in od.mean(0)), int(len(od)))


def reference_stats(card_stain: dict | None, method: str = "macenko") -> StainStats | None:
    """The training images' statistics by ``method`` from a model card's ``stain`` entry (None when absent)."""
    if not card_stain:
        return None
    if method == "macenko":
        return StainStats.from_dict(card_stain)
    return StainStats.from_dict(card_stain.get(method))


def _snmf(v: np.ndarray, w0: np.ndarray, lam: float = 0.1, iters: int = 300) -> tuple[np.ndarray, np.ndarray]:
    """Sparse NMF ``v ≈ w h`` (w 3 x 2 unit columns, h >= 0 with an L1 penalty) by multiplicative updates."""
    eps = 1e-9
    w = np.clip(w0, eps, None)
    h = np.clip(np.linalg.lstsq(w, v, rcond=None)[0], eps, None)
    for _ in range(iters):
        h *= (w.T @ v) / (w.T @ w @ h + lam + eps)
        w *= (v @ h.T) / (w @ (h @ h.T) + eps)
        norm = np.linalg.norm(w, axis=0, keepdims=True)
        w /= norm
        h *= norm.T
    if w[0, 0] < w[0, 1]:  # hematoxylin first: more red OD
        w, h = w[:, ::-1], h[::-1]
    return w, h


def _nonneg_conc(w: np.ndarray, v: np.ndarray, iters: int = 50) -> np.ndarray:
    """Non-negative concentrations of ``v`` on the stain matrix ``w`` (projected least squares, then refined)."""
    eps = 1e-9
    h = np.clip(np.linalg.lstsq(w, v, rcond=None)[0], eps, None)
    for _ in range(iters):
        h *= (w.T @ v) / (w.T @ w @ h + eps)
    return h


def stain_noise(images: Sequence[np.ndarray], stats: StainStats, resamples: int = 8, seed: int = 0) -> dict:
    """How far :func:`stain_stats` of these images moves when the images are drawn again (a bootstrap).

    Returns the largest H/E angle (°) and the largest strength ratio (>= 1) between ``stats`` and an
    estimate from images drawn with replacement: the estimate's own noise, which a comparison with a
    model's training stain must exceed before a slide is said to be stained differently.
    """
    rng = np.random.default_rng(seed)
    imgs = list(images)
    worst_angle, worst_ratio = 0.0, 1.0
    for _ in range(resamples if len(imgs) > 1 else 0):
        sample = [imgs[i] for i in rng.integers(0, len(imgs), len(imgs))]
        try:
            again = stain_stats(sample, max_pixels=50_000, seed=int(rng.integers(1 << 30)))
        except BcdError:
            continue
        d = _raw_distance(again, stats)
        worst_angle = max(worst_angle, d[0], d[1])
        worst_ratio = max(worst_ratio, d[2])
    return {"angle_deg": round(worst_angle, 3), "ratio": round(worst_ratio, 4), "resamples": resamples}


def _raw_distance(a: StainStats, b: StainStats) -> tuple[float, float, float, float, float]:
    """H angle, E angle (°), the worst strength ratio (>= 1), and the two ratios a / b."""
    def angle(u: Sequence[float], v: Sequence[float]) -> float:
        c = float(np.clip(np.dot(u, v) / (np.linalg.norm(u) * np.linalg.norm(v)), -1, 1))
        return math.degrees(math.acos(c))

    rh = a.max_conc[0] / max(b.max_conc[0], 1e-9)
    re_ = a.max_conc[1] / max(b.max_conc[1], 1e-9)
    worst = max(max(rh, 1 / max(rh, 1e-9)), max(re_, 1 / max(re_, 1e-9)))
    return angle(a.h_vector, b.h_vector), angle(a.e_vector, b.e_vector), worst, rh, re_


def stain_distance(slide: StainStats, reference: StainStats, noise: dict | None = None) -> dict:
    """Angles (°) between the H and between the E vectors, concentration ratios, and whether they differ.

    With ``noise`` (:func:`stain_noise` of the slide's sample) the thresholds grow by twice the estimate's
    own spread: a sample of a few windows can be 10° from another sample of the same slide (measured on
    the bundled slide: 4 of 28 pairs of 16-window samples beyond 8°), and that is not a stain difference.
    """
    ah, ae, worst_ratio, rh, re_ = _raw_distance(slide, reference)
    max_angle, max_ratio = MAX_ANGLE_DEG, MAX_RATIO
    if noise:
        max_angle += 2 * float(noise.get("angle_deg", 0.0))
        max_ratio *= float(noise.get("ratio", 1.0)) ** 2
    differs = max(ah, ae) > max_angle or worst_ratio > max_ratio
    out = {"h_angle_deg": round(ah, 3), "e_angle_deg": round(ae, 3), "h_ratio": round(rh, 4),
           "e_ratio": round(re_, 4), "differs": bool(differs),
           "thresholds": {"max_angle_deg": round(max_angle, 3), "max_ratio": round(max_ratio, 4)}}
    if noise:
        out["noise"] = noise
    return out


def macenko_transform(source: StainStats, target: StainStats) -> np.ndarray:
    """3 x 3 map of optical densities: a pixel stained like ``source`` comes out stained like ``target``.

    The same map serves both estimators: concentrations on the source's
    vectors, scaled to the target's strengths, recombined with its vectors.
    """
    scale = np.diag([target.max_conc[0] / max(source.max_conc[0], 1e-9),
                     target.max_conc[1] / max(source.max_conc[1], 1e-9)])
    return target.matrix @ scale @ np.linalg.pinv(source.matrix)


def apply_od_transform(rgb: np.ndarray, m: np.ndarray) -> np.ndarray:
    """Apply an OD map to uint8 RGB (N x ... x 3) on the CPU (the engine does the same on its device)."""
    shape = np.asarray(rgb).shape
    od = _od(rgb) @ np.asarray(m).T
    out = IO * np.exp(-od) - 1.0
    return np.clip(np.round(out), 0, 255).astype(np.uint8).reshape(shape)
