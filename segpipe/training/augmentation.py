"""Augmentation of training pairs, the same on image, labels and loss weights.

As in the U-Net paper, few annotated images go a long way when each window is deformed before
it is learnt: a random elastic deformation (:func:`elastic_deformation`), a random one of the
8 flips and rotations of the square (:func:`flip_rotate`), a random grey-value change
(:func:`intensity_jitter`). :class:`Augmentation` says which of them
:func:`segpipe.training.sampling.sample_pairs` applies. Pure numpy/scipy.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
from scipy import ndimage

__all__ = [
    "Augmentation",
    "augment",
    "elastic_deformation",
    "flip_rotate",
    "intensity_jitter",
    "scaled_dtype_range",
]


@dataclass(frozen=True)
class Augmentation:
    """What :func:`segpipe.training.sampling.sample_pairs` does to each pair, in this order;
    the defaults are the loop's original flips and rotations only.

    Parameters
    ----------
    elastic_std_px, elastic_grid
        :func:`elastic_deformation`; 0 px turns it off.
    flips
        A random one of the 8 flips/rotations of the square (:func:`flip_rotate`).
    jitter
        :func:`intensity_jitter` strength; 0 turns it off.
    """

    elastic_std_px: float = 0.0
    elastic_grid: int = 3
    flips: bool = True
    jitter: float = 0.0


def flip_rotate(rng: np.random.Generator, *arrays: np.ndarray) -> list[np.ndarray]:
    """A random one of the 8 flips/rotations of the square, the same on every array.

    Arrays are ``(..., n, n)`` (image ``(C, n, n)``, labels and weights ``(o, o)`` centred in
    it) and turn about their centres, so they stay aligned. Draws two integers from ``rng``.
    Returns contiguous copies.
    """
    k = int(rng.integers(4))
    flip = bool(rng.integers(2))
    out = []
    for a in arrays:
        a = np.rot90(a, k, axes=(-2, -1))
        out.append(np.ascontiguousarray(a[..., ::-1] if flip else a))
    return out


def augment(
    image: np.ndarray, labels: np.ndarray, rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray]:
    """:func:`flip_rotate` of an image ``(C, n, n)`` and its labels ``(o, o)``."""
    image, labels = flip_rotate(rng, image, labels)
    return image, labels


def elastic_deformation(
    image: np.ndarray,
    labels: np.ndarray,
    rng: np.random.Generator,
    *,
    std_px: float,
    grid: int = 3,
    weights: np.ndarray | None = None,
) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    """A random smooth deformation of the window, the same field on every array.

    As in the U-Net paper: displacement vectors drawn from ``N(0, std_px**2)`` on a coarse
    ``grid`` x ``grid`` grid, interpolated to every pixel with a cubic spline. Each output pixel
    samples the input at its position plus the displacement: the image (``(C, n, n)``) and
    ``weights`` bilinearly, ``labels`` (``(n, n)``) at the nearest pixel (a class id cannot be
    interpolated). Positions outside the window are mirrored.
    """
    n = labels.shape[-1]
    coarse = rng.normal(0.0, std_px, size=(2, grid, grid))
    field = np.stack([ndimage.zoom(c, n / grid, order=3, mode="nearest")[:n, :n] for c in coarse])
    ys, xs = np.meshgrid(np.arange(n), np.arange(n), indexing="ij")
    coords = np.stack([ys + field[0], xs + field[1]])
    # Nearest for labels as map_coordinates does it: sample at the rounded position.
    warped = [ndimage.map_coordinates(c, coords, order=1, mode="mirror") for c in image]
    out_labels = ndimage.map_coordinates(labels, np.rint(coords), order=0, mode="mirror")
    out_weights = (
        None
        if weights is None
        else ndimage.map_coordinates(weights, coords, order=1, mode="mirror")
    )
    return np.stack(warped).astype(np.float32), out_labels, out_weights


def intensity_jitter(
    image: np.ndarray,
    rng: np.random.Generator,
    strength: float,
    bounds: tuple[np.ndarray, np.ndarray] | None = None,
) -> np.ndarray:
    """Random grey-value change of a ``(C, n, n)`` scaled image: per-channel gain within
    ``±strength / 2``, contrast about the mean within ``±strength`` and brightness within
    ``±strength / 2``; an affine change per channel, clipped to ``bounds`` (per channel, low
    and high, or one value each; None: not clipped).

    ``bounds`` are what a brighter or darker scan could reach: the pixels' dtype's range,
    scaled as the model scales it (:func:`scaled_dtype_range`). Data scaled by its dtype
    (8-bit: ``/ 255``) is clipped to [0, 1]; a range or percentile scaling leaves the
    brightest pixels above 1 at inference too, and clipping them at 1 here would flatten
    them in training only.
    """
    c = image.shape[0]
    gain = 1 + rng.uniform(-strength / 2, strength / 2, size=(c, 1, 1))
    contrast = 1 + rng.uniform(-strength, strength)
    brightness = rng.uniform(-strength, strength) * 0.5
    out = image * gain
    mean = out.mean()
    out = (out - mean) * contrast + mean + brightness
    if bounds is not None:
        low, high = (np.asarray(b, dtype=np.float64).reshape(-1, 1, 1) for b in bounds)
        out = np.clip(out, low, high)
    return out.astype(np.float32)


def scaled_dtype_range(dtype: np.dtype, channels: int, scale: Any) -> tuple[np.ndarray, np.ndarray]:
    """``(low, high)``, ``(channels,)`` each: the smallest and largest value ``dtype`` holds,
    scaled by ``scale`` (a ``(..., C)`` pixels to float callable): the range a saturated
    scan reaches. A float dtype's is unbounded (``±inf``)."""
    dtype = np.dtype(dtype)
    if dtype.kind == "f":
        return np.full(channels, -np.inf), np.full(channels, np.inf)
    info = np.iinfo(dtype)
    ends = np.array([[info.min] * channels, [info.max] * channels], dtype=dtype)[None]
    scaled = np.asarray(scale(ends), dtype=np.float64)[0]
    return np.minimum(scaled[0], scaled[1]), np.maximum(scaled[0], scaled[1])
