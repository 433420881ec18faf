"""Stitching window predictions into a region: the two sinks behind one seam, and blend
mode's window lattice.

``CropSink`` (exact mode) copies each window's output into the region; ``BlendSink`` (blend
mode) accumulates weighted sums and divides by the summed weights, as MONAI's and nnU-Net's
sliding-window inference do, over the windows of one global :class:`BlendLattice`
(:func:`blend_lattice`, :func:`blend_windows`). Pure numpy: windows arrive already predicted.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass
from functools import lru_cache
from typing import Protocol

import numpy as np

from segpipe.geometry.tiling import Box, Geometry, Window

__all__ = [
    "BlendLattice",
    "BlendSink",
    "CropSink",
    "Sink",
    "blend_lattice",
    "blend_window_side",
    "blend_windows",
    "gaussian_weights",
]


RIM_FLOOR = 1e-20
"""The least blend weight (the default sigma's corners weigh 1.3e-7, untouched)."""


@lru_cache(maxsize=16)
def gaussian_weights(side: int, sigma_scale: float = 0.125) -> np.ndarray:
    """(side, side) float32 Gaussian importance map, 1 at the centre.

    ``sigma = sigma_scale * side`` (MONAI's default 0.125). Weights are at least
    :data:`RIM_FLOOR`, so a pixel covered only by window rims still gets a finite average: below
    a ``sigma_scale`` of about 0.05 a corner's weight, about ``exp(-1 / (4 sigma_scale²))``,
    is 0 in float32 (a 64 px window at 0.03 had 1680 zero weights), and below about 0.07 its
    products with probabilities would leave float32's normal range. This holds for any
    ``sigma_scale`` > 0, however small: the weights are then 1 at the centre pixel (four
    pixels, for an even side) and :data:`RIM_FLOOR` elsewhere.

    >>> w = gaussian_weights(8)
    >>> w.shape, float(w.max()), bool(w[0, 0] > 0)
    ((8, 8), 1.0, True)
    >>> w = gaussian_weights(32, 1e-4)
    >>> float(w.max()), float(w.min()) == float(np.float32(RIM_FLOOR))
    (1.0, True)
    """
    if side < 1 or sigma_scale <= 0:
        raise ValueError(f"need side >= 1 and sigma_scale > 0, got {side}, {sigma_scale}")
    centre = (side - 1) / 2.0
    r = np.arange(side, dtype=np.float64) - centre
    with np.errstate(divide="ignore", invalid="ignore"):  # sigma² is 0 below about 1e-162 px
        g = np.exp(-(r**2) / (2.0 * (sigma_scale * side) ** 2))
    w = np.outer(g, g)
    peak = w.max()
    if peak > 0:
        w /= peak
    else:
        # An even side's centre pixels sit half a pixel off the peak: below a sigma of about
        # 0.018 px (a 32 px window at sigma_scale 0.0004) their weight exp(-1 / (8 sigma²))²
        # is 0 in float64 (NaN for any side once sigma² is), and dividing by it gave NaN
        # weights. Relative to the centre every other pixel then weighs at most
        # exp(-1 / sigma²), 0 in float64 too, so the map is the centre alone: what weights
        # relative to the largest exponent give, without computing them. Only here, not
        # always: that way rounds differently, and ordinary maps must stay as they were (at
        # the default sigma a 1408 px window would change 8 weights by a float32 ulp).
        g = (np.abs(r) == np.abs(r).min()).astype(np.float64)
        w = np.outer(g, g)
    w = np.maximum(w, RIM_FLOOR).astype(np.float32)
    w.setflags(write=False)
    return w


class Sink(Protocol):
    """Takes window predictions for one region and gives the stitched region."""

    def add(self, window: Window, probabilities: np.ndarray) -> None:
        """``probabilities``: (C, h, w) model output for ``window``, already cropped."""

    def result(self, part: Box | None = None) -> np.ndarray:
        """(C, y, x) float32 over ``part`` of the region (default: all of it), once every
        window over it was added."""


class CropSink:
    """Exact mode: each pixel takes the value of the last window covering it.

    With overlap-tile windows every covering window gives the same value (valid convolutions,
    halo >= receptive field), so order does not matter; windows are added row-major anyway so
    that each tile keeps its own window's values. With ``computed`` (the region's shape, bool)
    only those pixels must be covered and are kept; the others are 0. A first window that
    covers the whole region (a block under one window) is kept as it is, a view of the
    model's output that later windows write into, not copied into a new array.
    """

    def __init__(self, region: Box, num_classes: int, computed: np.ndarray | None = None) -> None:
        self.region = region
        self.computed = computed
        self._classes = num_classes
        self._out: np.ndarray | None = None
        self._covered: np.ndarray | None = None  # None once a window covered everything

    def add(self, window: Window, probabilities: np.ndarray) -> None:
        part = window.output.intersect(self.region)
        if part is None:
            return
        if self._out is None:
            whole = part == self.region and probabilities.dtype == np.float32
            if whole and probabilities.flags.writeable:
                self._out = probabilities[(slice(None), *part.relative_to(window.output))]
                return
            self._out = np.zeros((self._classes, *self.region.shape), dtype=np.float32)
            self._covered = np.zeros(self.region.shape, dtype=bool)
        self._out[(slice(None), *part.relative_to(self.region))] = probabilities[
            (slice(None), *part.relative_to(window.output))
        ]
        if self._covered is not None:
            self._covered[part.relative_to(self.region)] = True

    def result(self, part: Box | None = None) -> np.ndarray:
        """(C, y, x) float32 over ``part`` of the region (default: all of it; a view of the
        sink's array, or of a window's output)."""
        part = part or self.region
        at = part.relative_to(self.region)
        computed = None if self.computed is None else self.computed[at]
        if self._out is None or (
            self._covered is not None
            and not (self._covered[at] if computed is None else self._covered[at] | ~computed).all()
        ):
            raise RuntimeError(f"windows left pixels of {part} uncovered")
        out = self._out[(slice(None), *at)]
        if computed is not None:
            # A broadcast mask, not boolean indexing: 9x faster over a (C, 1024, 1024) block.
            np.copyto(out, 0, where=~computed)
        return out


class BlendSink:
    """Blend mode: sum of ``weight * p`` over windows divided by the sum of weights; with
    ``computed`` (the region's shape, bool) over those pixels only, the others 0."""

    def __init__(
        self,
        region: Box,
        num_classes: int,
        *,
        sigma_scale: float = 0.125,
        computed: np.ndarray | None = None,
    ) -> None:
        self.region = region
        self.sigma_scale = sigma_scale
        self.computed = computed
        self._sum = np.zeros((num_classes, *region.shape), dtype=np.float32)
        self._weight = np.zeros(region.shape, dtype=np.float32)

    def add(self, window: Window, probabilities: np.ndarray) -> None:
        part = window.output.intersect(self.region)
        if part is None:
            return
        h, w = window.output.shape
        if h != w:
            raise ValueError(f"blend windows are square, got {window.output}")
        weights = gaussian_weights(h, self.sigma_scale)[part.relative_to(window.output)]
        src = probabilities[(slice(None), *part.relative_to(window.output))]
        dst = part.relative_to(self.region)
        self._sum[(slice(None), *dst)] += src * weights
        self._weight[dst] += weights

    def result(self, part: Box | None = None) -> np.ndarray:
        part = part or self.region
        at = part.relative_to(self.region)
        total, weight = self._sum[(slice(None), *at)], self._weight[at]
        if self.computed is None:
            if not (weight > 0).all():
                raise RuntimeError(f"windows left pixels of {part} uncovered")
            return total / weight
        computed = self.computed[at]
        if not (weight[computed] > 0).all():
            raise RuntimeError(f"windows left pixels of {part} uncovered")
        out = np.zeros_like(total)
        np.divide(total, weight, out=out, where=computed)
        return out


@dataclass(frozen=True)
class BlendLattice:
    """Sliding windows of ``window`` output pixels every ``stride`` pixels, starting at ``-margin``.

    The lattice is global (a function of the image shape alone), which is what makes blended
    tiles agree across task boundaries. With ``inside`` (same-padding models) the margin is 0:
    along an axis shorter than a window one window starts at the image's edge (mirrored
    pixels past the other), and along a longer one the last window is moved back to end
    at the image's edge (as MONAI's ``dense_patch_slices`` does), snapped up to the pooling
    multiple: border pixels are then predicted with the model's own zero padding, as a pass
    over the whole image predicts them, instead of from mirrored pixels.
    """

    shape: tuple[int, int]
    window: int
    stride: int
    margin: int
    geometry: Geometry
    inside: bool = False

    def axis_margin(self, axis: int) -> int:
        """Pixels the first window along ``axis`` starts before the image: ``margin``, or 0
        where the windows stay inside (``inside``)."""
        return 0 if self.inside else self.margin

    def axis_origins(self, axis: int) -> tuple[int, ...]:
        """Every window origin (output pixels) along ``axis``, ascending."""
        w, s, m, n = self.window, self.stride, self.axis_margin(axis), self.shape[axis]
        count = math.ceil(max(n + 2 * m - w, 0) / s) + 1
        origins = [-m + k * s for k in range(count)]
        if self.inside and n < w:  # one window from the edge, as one pass over the axis
            return (0,)
        if self.inside:
            # Snapped up: at most multiple - 1 mirrored pixels past the edge keep the phase.
            last = -(-(n - w) // self.geometry.multiple) * self.geometry.multiple
            origins = [o for o in origins if o < last] + [last]
        return tuple(origins)

    def origins(self, axis: int, lo: int, hi: int) -> list[int]:
        """Origins (output pixels) along ``axis`` of the windows that overlap ``[lo, hi)``."""
        return [o for o in self.axis_origins(axis) if o < hi and o + self.window > lo]

    def window_at(self, y: int, x: int) -> Window:
        pad = _pad(self.geometry)
        n = self.window + 2 * pad
        inp = Box(y - pad, y - pad + n, x - pad, x - pad + n)
        return Window(inp, Box(y, y + self.window, x, x + self.window), 0)


def _pad(geometry: Geometry) -> int:
    # Same-padding models see the window itself; valid ones need their halo around it.
    return geometry.halo if geometry.shrinks else 0


def blend_window_side(geometry: Geometry, window: int) -> int:
    """The smallest blend window side (output pixels) of at least ``window`` whose input the
    model accepts: the window itself for a same-padding model, grown by the halo for a valid
    one, snapped up to the size rule.

    >>> blend_window_side(Geometry(halo=23, multiple=4), 30)
    32
    >>> blend_window_side(Geometry(halo=44, multiple=8, input_offset=4, shrinks=True), 61)
    68
    """
    if window < 1:
        raise ValueError(f"blend window must be >= 1 pixel, got {window}")
    pad = _pad(geometry)
    n = window + 2 * pad
    return n + (geometry.input_offset - n) % geometry.multiple - 2 * pad


def blend_lattice(
    shape: tuple[int, int], geometry: Geometry, *, window: int, overlap: float = 0.25
) -> BlendLattice:
    """The global sliding-window lattice for ``blend`` mode.

    ``window`` is the output side of one window in pixels, ``overlap`` the fraction shared by
    neighbours (MONAI's ``overlap``). Sizes snap to ``geometry.multiple`` so every window keeps
    the pooling phase. A valid-padding model needs context past the image anyway: its windows
    start ``margin`` pixels before the image so that border pixels sit inside some window
    rather than on its low-weight rim (the mirrored image fills them). A same-padding model's
    windows start at the image's edges (``BlendLattice.inside``).
    """
    if not 0.0 <= overlap < 1.0:
        raise ValueError(f"overlap must be in [0, 1), got {overlap}")
    g = geometry
    if not g.accepts(window + 2 * _pad(g)):
        raise ValueError(
            f"blend window {window} px does not fit the model's geometry {g}: use "
            f"{blend_window_side(g, window)}"
        )
    m = g.multiple
    if window < m:
        raise ValueError(f"blend window {window} px is smaller than the model's multiple {m}")
    # A stride off the multiple would change the pooling phase from window to window, and one
    # longer than the window would leave gaps.
    stride = min(max(m, round(window * (1.0 - overlap) / m) * m), window // m * m)
    # A strip shorter than a window along one axis keeps its windows inside the image along
    # both (BlendLattice.axis_origins): with a margin on both, its long borders were 18x
    # MONAI's error against a whole pass; now below MONAI's, which zero-pads the short axis.
    margin = max(0, (window - stride) // 2) // m * m
    lattice = BlendLattice((int(shape[0]), int(shape[1])), window, stride, margin, g, not g.shrinks)
    # Counted on the lattice itself: along an axis with fewer origins than a window spans
    # strides (an image smaller than a window) a pixel lies in fewer windows than that.
    along = [min(math.ceil(window / stride), len(lattice.axis_origins(a))) for a in (0, 1)]
    if (per_pixel := along[0] * along[1]) > 64:  # MONAI's usual 0.25-0.75: 2-16
        warnings.warn(
            f"blend overlap {overlap} gives windows {stride} px apart: each pixel is computed "
            f"in about {per_pixel} windows, {per_pixel}x the work of overlap 0",
            stacklevel=2,
        )
    return lattice


def blend_windows(lattice: BlendLattice, region: Box) -> list[Window]:
    """Windows of ``lattice`` whose output overlaps ``region``, row-major."""
    return [
        lattice.window_at(y, x)
        for y in lattice.origins(0, region.y0, region.y1)
        for x in lattice.origins(1, region.x0, region.x1)
    ]
