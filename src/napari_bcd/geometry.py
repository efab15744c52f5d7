"""Small geometry helpers with no dependencies: the bottom of the import graph."""

from __future__ import annotations

import numbers
from collections.abc import Sequence

__all__ = ["as_pair", "pixel_size"]


def as_pair(value: float | Sequence[float]) -> tuple[float, float]:
    """``(y, x)`` from one number (the same both ways) or a pair: µm/px, strides, fields."""
    if isinstance(value, numbers.Real):  # numpy scalars too
        return (float(value), float(value))
    try:
        y, x = (float(v) for v in value)
    except (TypeError, ValueError) as err:
        from .errors import BcdError

        raise BcdError(f"Expected a number or a (y, x) pair, got {value!r}.") from err
    return (y, x)


def pixel_size(value: float | Sequence[float], where: str = "") -> tuple[float, float]:
    """A level-0 pixel size ``(y, x)`` in µm, checked: the one place that says what a pixel size may be (finite,
    positive, under a millimetre); anything else is a :class:`~napari_bcd.errors.BcdError` naming ``where``."""
    import math

    from .errors import BcdError

    try:
        pair = as_pair(value)
    except BcdError:
        pair = (math.nan, math.nan)
    if not all(math.isfinite(v) and 0 < v < 1000 for v in pair):
        raise BcdError(f"{where + ': ' if where else ''}the pixel size must be a positive number of µm per pixel "
                       f"(0.25 at 40x, 0.5 at 20x), got {value!r}.")
    return pair
