"""Stitching window predictions into a region: the two sinks behind one seam.

``CropSink`` (exact mode) copies each window's output into the region; ``BlendSink`` (blend
mode) accumulates weighted sums and divides by the summed weights, as MONAI's and nnU-Net's
sliding-window inference do. Pure numpy: windows arrive already predicted.
"""

from __future__ import annotations

from functools import lru_cache
from typing import Protocol

import numpy as np

from segpipe.geometry.tiling import Box, Window

__all__ = ["BlendSink", "CropSink", "Sink", "gaussian_weights"]


@lru_cache(maxsize=16)
def gaussian_weights(side: int, sigma_scale: float = 0.125) -> np.ndarray:
    """(side, side) float32 Gaussian importance map, 1 at the centre.

    ``sigma = sigma_scale * side`` (MONAI's default 0.125). The rim is clamped to the smallest
    positive value so a pixel covered only by window rims still gets a finite average.

    >>> w = gaussian_weights(8)
    >>> w.shape, float(w.max()), bool(w[0, 0] > 0)
    ((8, 8), 1.0, True)
    """
    if side < 1 or sigma_scale <= 0:
        raise ValueError(f"need side >= 1 and sigma_scale > 0, got {side}, {sigma_scale}")
    centre = (side - 1) / 2.0
    r = np.arange(side, dtype=np.float64) - centre
    g = np.exp(-(r**2) / (2.0 * (sigma_scale * side) ** 2))
    w = np.outer(g, g)
    w /= w.max()
    w = np.maximum(w, w[w > 0].min(), out=w).astype(np.float32)
    w.setflags(write=False)
    return w


class Sink(Protocol):
    """Takes window predictions for one region and gives the stitched region."""

    def add(self, window: Window, probabilities: np.ndarray) -> None:
        """``probabilities``: (C, h, w) model output for ``window``, already cropped."""

    def result(self) -> np.ndarray:
        """(C, y, x) float32 over the region."""


class CropSink:
    """Exact mode: each pixel takes the value of the last window covering it.

    With overlap-tile windows every covering window gives the same value (valid convolutions,
    halo >= receptive field), so order does not matter; windows are added row-major anyway so
    that each tile keeps its own window's values. With ``computed`` (the region's shape, bool)
    only those pixels must be covered and are kept; the others are 0.
    """

    def __init__(self, region: Box, num_classes: int, computed: np.ndarray | None = None) -> None:
        self.region = region
        self.computed = computed
        self._out = np.zeros((num_classes, *region.shape), dtype=np.float32)
        self._covered = np.zeros(region.shape, dtype=bool)

    def add(self, window: Window, probabilities: np.ndarray) -> None:
        part = window.output.intersect(self.region)
        if part is None:
            return
        self._out[(slice(None), *part.relative_to(self.region))] = probabilities[
            (slice(None), *part.relative_to(window.output))
        ]
        self._covered[part.relative_to(self.region)] = True

    def result(self) -> np.ndarray:
        if self.computed is None:
            if not self._covered.all():
                raise RuntimeError(f"windows left pixels of {self.region} uncovered")
            return self._out
        if not self._covered[self.computed].all():
            raise RuntimeError(f"windows left pixels of {self.region} uncovered")
        self._out[:, ~self.computed] = 0
        return self._out


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

    def result(self) -> np.ndarray:
        if self.computed is None:
            if not (self._weight > 0).all():
                raise RuntimeError(f"windows left pixels of {self.region} uncovered")
            return self._sum / self._weight
        if not (self._weight[self.computed] > 0).all():
            raise RuntimeError(f"windows left pixels of {self.region} uncovered")
        out = np.zeros_like(self._sum)
        np.divide(self._sum, self._weight, out=out, where=self.computed)
        return out
