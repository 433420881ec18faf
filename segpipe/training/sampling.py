"""Training pairs shaped by the model's geometry: (input window, label crop), in batches.

A pair's labels are the pixels the model predicts for its input window:

- valid padding (``Geometry.shrinks``): the label crop, and the input is that crop grown by the
  model's context (the halo) on every side;
- same padding: every pixel of the window, halo included (no context is added). Its outer
  pixels are learnt as the model sees them, next to its own zero padding, which is how blend
  windows (:mod:`segpipe.geometry.blending`) meet them at inference; exact tiles crop them off.

Windows are read with :func:`segpipe.io.readers.read_mirrored` as the pipeline reads its
windows, so what leaves the image is mirrored as in the U-Net paper and as it is at inference.
:func:`sample_pairs` draws a batch at random positions and augments each pair
(:mod:`segpipe.training.augmentation`). Pixels become model input through ``scale``, the
model's pixel contract (:meth:`segpipe.models.PixelContract.scale`), the very function the
predictor applies at inference; the dtype rule (``pixels.to_float01``) when none is given.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import NamedTuple

import numpy as np

from segpipe.analysis.evaluation import LabelledImage
from segpipe.geometry.pixels import to_float01
from segpipe.geometry.tiling import Box, Geometry
from segpipe.io.readers import ArrayReader, read_mirrored
from segpipe.training.augmentation import (
    Augmentation,
    elastic_deformation,
    flip_rotate,
    intensity_jitter,
    scaled_dtype_range,
)

__all__ = ["Batch", "patch_pair", "sample_batch", "sample_pairs"]

# The default augmentation: flips and rotations only (a frozen value, safe to share).
_FLIPS = Augmentation()

Scale = Callable[[np.ndarray], np.ndarray]
"""``(Y, X, C)`` native pixels -> float32 model input (a pixel contract's ``scale``)."""


class Batch(NamedTuple):
    """A training batch: ``(B, C, n, n)`` float32 images, ``(B, o, o)`` int64 labels and,
    with loss weights, ``(B, o, o)`` float32 weights."""

    images: np.ndarray
    labels: np.ndarray
    weights: np.ndarray | None


def _window_sides(geometry: Geometry, patch: int) -> tuple[int, int]:
    """(input side, label side) in pixels for a requested label side of ``patch``."""
    n = geometry.input_size(patch)
    return n, geometry.output_size(n)


def _mirrored(array: np.ndarray, box: Box) -> np.ndarray:
    """``array[box]`` of a ``(Y, X)`` or ``(Y, X, C)`` array, mirrored where ``box`` leaves it;
    as many dimensions as ``array``, its dtype."""
    window = read_mirrored(ArrayReader(array), box)
    return window if array.ndim == 3 else window[..., 0]


def _window(
    slide: LabelledImage,
    y: int,
    x: int,
    geometry: Geometry,
    patch: int,
    weights: np.ndarray | None,
    scale: Scale | None = None,
) -> tuple[np.ndarray, np.ndarray, np.ndarray | None, int, int]:
    """Image ``(C, n, n)``, labels and weights over the **whole** input window, margin, o."""
    n, o = _window_sides(geometry, patch)
    margin = (n - o) // 2  # the halo for valid convolutions, 0 for same padding
    box = Box(y - margin, y - margin + n, x - margin, x - margin + n)
    # The model's pixel contract, as at inference; else the dtype rule (uint8 / 255, ...).
    pixels = _mirrored(slide.image, box)
    image = (scale or to_float01)(pixels)
    image = np.ascontiguousarray(np.asarray(image, dtype=np.float32).transpose(2, 0, 1))
    labels = _mirrored(slide.labels, box).astype(np.int64)
    return image, labels, None if weights is None else _mirrored(weights, box), margin, o


def patch_pair(
    slide: LabelledImage,
    y: int,
    x: int,
    geometry: Geometry,
    patch: int,
    *,
    scale: Scale | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """One training pair whose label crop has its top-left corner at ``(y, x)``.

    The input window is the label crop grown by the model's context, centred on it::

        input window, n = geometry.input_size(patch) a side
        +----------------------+
        |  (n - o) / 2         |      mirrored where it leaves the slide
        |   +--------------+   |
        |   | labels, o a  |   |      o = geometry.output_size(n) >= patch
        |   | side         |   |
        |   +--------------+   |
        +----------------------+

    For a same-padding model ``o == n``: the labels are the whole window, which starts at
    ``(y, x)`` (see the module docstring).

    Parameters
    ----------
    slide
        Source of image and labels.
    y, x
        Top-left of the label crop in slide pixels; the crop may run past the slide's
        bottom/right edge, where it is mirrored like the context.
    geometry, patch
        The model's geometry and the requested label side (pixels).
    scale
        Native pixels to model input: the model's ``pixel_contract.scale``; default the dtype
        rule.

    Returns
    -------
    image
        ``(C, n, n)`` float32, scaled by ``scale``.
    labels
        ``(o, o)`` int64 class ids.
    """
    image, labels, _, m, o = _window(slide, y, x, geometry, patch, None, scale)
    return image, np.ascontiguousarray(labels[m : m + o, m : m + o])


def sample_pairs(
    slides: Sequence[LabelledImage],
    geometry: Geometry,
    patch: int,
    batch_size: int,
    rng: np.random.Generator,
    *,
    augmentation: Augmentation | None = _FLIPS,
    weight_maps: Sequence[np.ndarray] | None = None,
    scale: Scale | None = None,
) -> Batch:
    """A batch of pairs at uniformly random positions of randomly chosen images, each pair
    augmented as ``augmentation`` says (None: not at all); ``weight_maps[i]`` (per-pixel loss
    weights of ``slides[i]``) travel with the labels; ``scale`` makes pixels model input (the
    model's pixel contract; default the dtype rule).

    Images and labels are shaped as in :func:`patch_pair`.
    """
    o = _window_sides(geometry, patch)[1]
    images: list[np.ndarray] = []
    labels: list[np.ndarray] = []
    weights: list[np.ndarray] = []  # (o, o) each, with weight maps only
    for _ in range(batch_size):
        index = int(rng.integers(len(slides)))
        slide = slides[index]
        # Label crops inside the slide (true labels only); the context is mirrored at the
        # borders as it is at inference. A slide smaller than a crop gets mirrored labels too.
        y = int(rng.integers(max(slide.shape[0] - o, 0) + 1))
        x = int(rng.integers(max(slide.shape[1] - o, 0) + 1))
        w_map = None if weight_maps is None else weight_maps[index]
        image, label, weight, m, o = _window(slide, y, x, geometry, patch, w_map, scale)
        if augmentation is not None and augmentation.elastic_std_px > 0:
            # On the whole window, so that the labels' surroundings deform with them.
            image, label, weight = elastic_deformation(
                image,
                label,
                rng,
                std_px=augmentation.elastic_std_px,
                grid=augmentation.elastic_grid,
                weights=weight,
            )
        label = label[m : m + o, m : m + o]
        weight = None if weight is None else weight[m : m + o, m : m + o]
        if augmentation is not None and augmentation.flips:
            image, label, *rest = flip_rotate(
                rng, image, label, *([] if weight is None else [weight])
            )
            weight = rest[0] if rest else None
        if augmentation is not None and augmentation.jitter > 0:
            bounds = scaled_dtype_range(slide.image.dtype, image.shape[0], scale or to_float01)
            image = intensity_jitter(image, rng, augmentation.jitter, bounds)
        images.append(image)
        labels.append(np.ascontiguousarray(label))
        if weight is not None:
            weights.append(weight)
    return Batch(
        np.stack(images),
        np.stack(labels),
        None if weight_maps is None else np.stack(weights).astype(np.float32),
    )


def sample_batch(
    slides: Sequence[LabelledImage],
    geometry: Geometry,
    patch: int,
    batch_size: int,
    rng: np.random.Generator,
    *,
    is_augmented: bool = True,
) -> tuple[np.ndarray, np.ndarray]:
    """:func:`sample_pairs` with flips and rotations only (or nothing), as ``(images, labels)``.

    Returns ``(batch_size, C, n, n)`` float32 images and ``(batch_size, o, o)`` int64 labels,
    ``n`` and ``o`` as in :func:`patch_pair`.
    """
    batch = sample_pairs(
        slides,
        geometry,
        patch,
        batch_size,
        rng,
        augmentation=_FLIPS if is_augmented else None,
    )
    return batch.images, batch.labels
