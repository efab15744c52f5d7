"""The window grid: which level-0 boxes the model sees, and the cells results live on.

Geometry (DESIGN.md): a model card fixes ``field_um`` (what one input shows)
and ``input_px``.  On a slide of ``mpp`` µm/px a window is
``field_um / mpp`` level-0 pixels; it is read from the coarsest level that is
still at least as fine as the network input (never coarser) and resized to
``input_px`` with area averaging.

Windows step by ``stride`` from the image's top-left corner and cover all
of it; windows running past the edge see glass there.  Results live on a grid of *cells*, one stride
in size: a window covers ``k = round(field / stride)`` cells per axis, and a
cell's probabilities are the mean of every window covering it.  With
``stride = field`` (the default) cells and windows coincide.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from .errors import BcdError
from .geometry import as_pair, pixel_size

__all__ = ["Grid", "grid_for", "make_grid", "slide_mpp"]


@dataclass(frozen=True)
class Grid:
    """Windows and cells of one slide, in level-0 pixels ``(y, x)``.

    Attributes
    ----------
    window_px
        Window size in level-0 px (float: the exact field).
    stride_px
        Step between windows (= cell size) in level-0 px.
    origin_px
        Level-0 position of the first window's top-left corner.
    n_windows
        Windows per axis ``(rows, cols)``.
    cells_per_window
        Cells one window covers per axis.
    level, level_downsample
        Pyramid level read and its downsample.
    mpp
        Level-0 µm per pixel ``(y, x)``.
    input_px
        Network input size.
    """

    window_px: tuple[float, float]
    stride_px: tuple[float, float]
    origin_px: tuple[float, float]
    n_windows: tuple[int, int]
    cells_per_window: tuple[int, int]
    level: int
    level_downsample: tuple[float, float]
    mpp: tuple[float, float]
    input_px: tuple[int, int]

    @property
    def n_cells(self) -> tuple[int, int]:
        return (
            self.n_windows[0] - 1 + self.cells_per_window[0],
            self.n_windows[1] - 1 + self.cells_per_window[1],
        )

    @property
    def cell_um(self) -> tuple[float, float]:
        return (self.stride_px[0] * self.mpp[0], self.stride_px[1] * self.mpp[1])

    def window_box(self, row: int, col: int) -> tuple[float, float, float, float]:
        """Level-0 ``(y, x, h, w)`` of window ``(row, col)``."""
        return (
            self.origin_px[0] + row * self.stride_px[0],
            self.origin_px[1] + col * self.stride_px[1],
            self.window_px[0],
            self.window_px[1],
        )

    def read_box(self, row: int, col: int) -> tuple[int, int, int, int]:
        """``(y, x, h, w)`` in pixels of ``level`` to read for window ``(row, col)``."""
        y, x, h, w = self.window_box(row, col)
        dy, dx = self.level_downsample
        y0, x0 = int(round(y / dy)), int(round(x / dx))
        return y0, x0, max(1, int(round(h / dy))), max(1, int(round(w / dx)))

    def cell_inside_fraction(self, slide_shape: tuple[int, int]) -> np.ndarray:
        """``(rows, cols)`` fraction of each cell's area that lies on the image (edge cells run past it)."""
        def along(n: int, origin: float, step: float, size: int) -> np.ndarray:
            start = origin + np.arange(n) * step
            return np.clip(np.minimum(start + step, size) - np.maximum(start, 0), 0, None) / step

        rows = along(self.n_cells[0], self.origin_px[0], self.stride_px[0], int(slide_shape[0]))
        cols = along(self.n_cells[1], self.origin_px[1], self.stride_px[1], int(slide_shape[1]))
        return np.outer(rows, cols)

    def cell_of_point(self, y: float, x: float) -> tuple[int, int] | None:
        """The cell containing level-0 point ``(y, x)``, or None outside the grid."""
        r = int(np.floor((y - self.origin_px[0]) / self.stride_px[0]))
        c = int(np.floor((x - self.origin_px[1]) / self.stride_px[1]))
        if 0 <= r < self.n_cells[0] and 0 <= c < self.n_cells[1]:
            return r, c
        return None

    def to_dict(self) -> dict:
        from dataclasses import asdict

        d = asdict(self)
        d["n_cells"] = list(self.n_cells)
        d["cell_um"] = list(self.cell_um)
        return d


#: One run's limits: the class map holds 4 float32 per cell (1e8 cells: 1.6 GB).
_MAX_WINDOWS = 20_000_000
_MAX_CELLS = 100_000_000


def make_grid(
    slide_shape: tuple[int, int],
    mpp: tuple[float, float],
    field_um: tuple[float, float],
    input_px: tuple[int, int],
    level_downsamples: list[tuple[float, float]],
    stride: float | tuple[float, float] = 1.0,
    stride_um: float | tuple[float, float] | None = None,
) -> Grid:
    """Lay the window grid over a slide.

    Parameters
    ----------
    slide_shape
        Level-0 ``(h, w)`` px.
    mpp
        Level-0 µm/px ``(y, x)``.
    field_um, input_px
        From the model card.
    level_downsamples
        Downsample ``(y, x)`` of each pyramid level.
    stride
        Step as a fraction of the field (0.5 = half-overlapping windows).
    stride_um
        Step in µm; overrides ``stride``.

    Raises
    ------
    BcdError
        When the image is smaller than one window or the stride is not positive.
    """
    H, W = slide_shape

    def positive(values: float | Sequence[float], what: str) -> None:
        vals = (values, values) if np.isscalar(values) else tuple(values)
        if not all(np.isfinite(v) and v > 0 for v in vals):
            raise BcdError(f"{what} must be positive, got {values}.")

    positive(mpp, "The pixel size (µm/px, --mpp)")
    positive(field_um, "The model's field (µm, field_um in its card or --field-um)")
    win = (field_um[0] / mpp[0], field_um[1] / mpp[1])
    if stride_um is not None:
        positive(stride_um, "The stride in µm (--stride-um)")
        su = as_pair(stride_um)
        step = (su[0] / mpp[0], su[1] / mpp[1])
    else:
        sf = as_pair(stride)
        if not all(0 < f <= 1 for f in sf):  # type: ignore[operator]
            raise BcdError(f"stride is a fraction of the field in (0, 1], got {stride}. Use stride_um for µm.")
        step = (win[0] * sf[0], win[1] * sf[1])  # type: ignore[operator]
    if step[0] <= 0 or step[1] <= 0:
        raise BcdError(f"The stride must be positive, got {stride_um or stride}.")
    # A few pixels short of a window still counts as one: an ICIAR photo is
    # exactly one field, and rounding of mpp should not lose it.
    tol = (0.02 * win[0], 0.02 * win[1])
    if H + tol[0] < win[0] or W + tol[1] < win[1]:
        raise BcdError(
            f"The image is {H * mpp[0]:.0f} x {W * mpp[1]:.0f} µm, smaller than one model window "
            f"({field_um[0]:.0f} x {field_um[1]:.0f} µm). Check the mpp, or use a model with a smaller field."
        )
    # Cover the whole image: the last row/column may run past the edge (read
    # as glass) so tissue at the border is classified too.
    # A sliver of under 2 % of a window left at the edge gets no extra row.
    rows = max(0, int(np.ceil((H - win[0] - tol[0]) / step[0]))) + 1
    cols = max(0, int(np.ceil((W - win[1] - tol[1]) / step[1]))) + 1
    origin = (0.0, 0.0)
    k = (max(1, int(round(win[0] / step[0]))), max(1, int(round(win[1] / step[1]))))
    cells = (rows - 1 + k[0]) * (cols - 1 + k[1])
    if rows * cols > _MAX_WINDOWS or cells > _MAX_CELLS:
        raise BcdError(
            f"This stride gives {rows * cols:,} windows on {cells:,} cells, more than napari-bcd handles in one run "
            f"({_MAX_WINDOWS:,} windows). Choose a larger stride (e.g. --stride 0.5 or a --stride-um of tens of µm)."
        )
    need = min(win[0] / input_px[0], win[1] / input_px[1])
    level = 0
    for i, ds in enumerate(level_downsamples):
        if min(ds) <= need * 1.001:
            level = i
    return Grid(
        window_px=win,
        stride_px=step,
        origin_px=origin,
        n_windows=(rows, cols),
        cells_per_window=k,
        level=level,
        level_downsample=tuple(level_downsamples[level]),  # type: ignore[arg-type]
        mpp=tuple(mpp),  # type: ignore[arg-type]
        input_px=tuple(input_px),  # type: ignore[arg-type]
    )


def slide_mpp(slide, mpp: float | tuple[float, float] | None = None) -> tuple[float, float]:
    """Level-0 µm/px ``(y, x)``: the one given, else the slide's own; the one message when neither is known."""
    if mpp is not None:
        return pixel_size(mpp)
    if slide.mpp is not None:
        return tuple(slide.mpp)  # type: ignore[return-value]
    raise BcdError(
        f"{slide.name} does not say its pixel size (µm per pixel). State it (mpp=..., --mpp, or the dock's "
        "µm / pixel box); 0.25 is typical for 40x scans, 0.5 for 20x."
    )


def grid_for(slide, card, settings=None, *, input_px: tuple[int, int] | None = None,
             field_um: tuple[float, float] | None = None) -> Grid:
    """The window grid a model (its card's field and input) lays over a slide with these settings.

    The one way to a grid: the engine, window counts, retraining, patch export
    and the docks all come here.  ``settings`` is a
    :class:`~napari_bcd.settings.ClassifySettings` (stride, stride in µm, mpp);
    ``input_px``/``field_um`` replace the card's (patches cut at another size).
    """
    from .settings import ClassifySettings

    settings = settings or ClassifySettings()
    if card is None and (field_um is None or input_px is None):
        raise ValueError("grid_for needs a model card, or both field_um and input_px")
    return make_grid(slide.dimensions, slide_mpp(slide, settings.mpp),
                     field_um if field_um is not None else card.field_um,
                     input_px if input_px is not None else card.input_px,
                     [info.downsample for info in slide.level_info], stride=settings.stride,
                     stride_um=settings.stride_um)
