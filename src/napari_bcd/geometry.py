"""Small geometry helpers with no dependencies: the bottom of the import graph."""

from __future__ import annotations

import numbers
from collections.abc import Sequence

__all__ = ["as_pair"]


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
