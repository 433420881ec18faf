"""A generated slide and the pieces both synthetic scenes are made of.

:class:`SyntheticSlide` holds an image with its class and instance labels; the tissue
scene's class names and label values are its defaults. The helpers make smooth fields cheaply:
Gaussian-filtered noise on a coarse grid (:func:`coarse_shape`, :func:`smooth_noise`),
bilinearly resized to full size row block by row block (:class:`Bilinear`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

import numpy as np
from scipy import ndimage

CLASS_NAMES = ("background", "tissue", "nucleus")
BACKGROUND, TISSUE, NUCLEUS = 0, 1, 2

_COARSE_CELLS = 512  # the coarse grid's longer side, in cells
ROW_BLOCK = 256  # rows per block of full-size work, to keep temporaries small


@dataclass(frozen=True)
class SyntheticSlide:
    """A generated slide and its ground truth.

    Attributes
    ----------
    image
        ``(Y, X, 3)`` uint8 RGB.
    labels
        ``(Y, X)`` uint8 class per pixel, ``class_names[k]`` for value ``k`` (tissue slides: 0
        background (glass), 1 tissue, 2 nucleus).
    instances
        ``(Y, X)`` int32 object id per pixel (nuclei, buildings), 0 outside objects; ids 1..n.
    pixel_size_um
        Side of one pixel in micrometres.
    class_names
        Names of the label values, in order.
    """

    image: np.ndarray
    labels: np.ndarray
    instances: np.ndarray
    pixel_size_um: float = 0.5
    class_names: tuple[str, ...] = CLASS_NAMES

    def __post_init__(self) -> None:
        shape = self.labels.shape
        if self.image.shape != (*shape, 3) or self.instances.shape != shape:
            raise ValueError(
                f"SyntheticSlide arrays disagree: image {self.image.shape}, labels {shape}, "
                f"instances {self.instances.shape}; expected (Y, X, 3), (Y, X), (Y, X)"
            )

    @property
    def shape(self) -> tuple[int, int]:
        """``(Y, X)`` in pixels."""
        return (int(self.labels.shape[0]), int(self.labels.shape[1]))

    def crop(self, y: int, x: int, size: int | tuple[int, int]) -> SyntheticSlide:
        """The ``size`` pixels (one int for a square) whose top-left corner is ``(y, x)``.

        The crop is a view (no copy) and must lie inside the slide.
        """
        h, w = parse_shape(size)
        if not (y >= 0 and x >= 0 and y + h <= self.shape[0] and x + w <= self.shape[1]):
            raise ValueError(
                f"crop at (y={y}, x={x}) of {(h, w)} px does not fit a slide of {self.shape} px"
            )
        sl = (slice(y, y + h), slice(x, x + w))
        return replace(
            self, image=self.image[sl], labels=self.labels[sl], instances=self.instances[sl]
        )

    def random_crop(self, size: int | tuple[int, int], rng: np.random.Generator) -> SyntheticSlide:
        """A crop of ``size`` pixels at a uniformly random position (a view, no copy).

        >>> from segpipe.synthetic import tissue_slide
        >>> slide = tissue_slide(128, seed=1)
        >>> slide.random_crop(32, np.random.default_rng(0)).shape
        (32, 32)
        """
        h, w = parse_shape(size)
        if h > self.shape[0] or w > self.shape[1]:
            raise ValueError(f"crop of {(h, w)} px is larger than the slide, {self.shape} px")
        y = int(rng.integers(0, self.shape[0] - h + 1))
        x = int(rng.integers(0, self.shape[1] - w + 1))
        return self.crop(y, x, (h, w))

    def class_fractions(self) -> np.ndarray:
        """Fraction of the pixels in each class, ``(C,)`` float64."""
        counts = np.bincount(self.labels.ravel(), minlength=len(self.class_names))
        return counts / self.labels.size


def parse_shape(shape: int | tuple[int, int]) -> tuple[int, int]:
    if isinstance(shape, int | np.integer):
        return (int(shape), int(shape))
    if len(shape) != 2:
        raise ValueError(f"shape must be an int or (Y, X), got {shape!r}")
    return (int(shape[0]), int(shape[1]))


def coarse_shape(shape: tuple[int, int]) -> tuple[int, int]:
    """The grid, at most ``_COARSE_CELLS`` a side, on which smooth fields are generated."""
    factor = max(1, math.ceil(max(shape) / _COARSE_CELLS))
    return (max(4, math.ceil(shape[0] / factor)), max(4, math.ceil(shape[1] / factor)))


def smooth_noise(
    rng: np.random.Generator, shape: tuple[int, int], sigma: float | tuple[float, float]
) -> np.ndarray:
    """Gaussian-filtered white noise, normalised to zero mean and unit standard deviation."""
    field = ndimage.gaussian_filter(rng.standard_normal(shape, dtype=np.float32), sigma)
    field -= field.mean()
    field /= max(float(field.std()), 1e-12)
    return field


class Bilinear:
    """Bilinear resize of a small ``field`` to ``shape``, row block by row block.

    Cell centres are aligned and edges clamped. Columns are interpolated once, on the few
    input rows; each block of output rows is then two contiguous row gathers, so a gigapixel
    plane is produced without any full-size temporary.
    """

    def __init__(self, field: np.ndarray, shape: tuple[int, int]) -> None:
        field = np.asarray(field, dtype=np.float32)
        self.y0, self.y1, self.wy = self._taps(shape[0], field.shape[0])
        x0, x1, wx = self._taps(shape[1], field.shape[1])
        wx = wx.T
        # C order matters: the row gathers below are then contiguous copies.
        self.rows_x = np.ascontiguousarray(field[:, x0] * (1 - wx) + field[:, x1] * wx)
        self.shape = shape

    @staticmethod
    def _taps(n_out: int, n_in: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        pos = (np.arange(n_out, dtype=np.float64) + 0.5) * (n_in / n_out) - 0.5
        pos = np.clip(pos, 0, n_in - 1)
        i0 = pos.astype(np.intp)
        i1 = np.minimum(i0 + 1, n_in - 1)
        return i0, i1, (pos - i0).astype(np.float32)[:, None]

    def rows(self, r0: int, r1: int, out: np.ndarray | None = None) -> np.ndarray:
        """Output rows ``r0 .. r1-1``, ``(r1 - r0, X)`` float32."""
        w = self.wy[r0:r1]
        out = np.multiply(self.rows_x[self.y0[r0:r1]], 1 - w, out=out)
        out += self.rows_x[self.y1[r0:r1]] * w
        return out

    def full(self) -> np.ndarray:
        out = np.empty(self.shape, dtype=np.float32)
        for r0 in range(0, self.shape[0], ROW_BLOCK):
            r1 = min(r0 + ROW_BLOCK, self.shape[0])
            self.rows(r0, r1, out=out[r0:r1])
        return out
