"""Training pairs: where they are drawn, which augmentations they get, their value range."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import pytest

from segpipe.geometry.tiling import Geometry
from segpipe.synthetic import SyntheticSlide
from segpipe.training import Augmentation, patch_pair, sample_pairs

GEOMETRY = Geometry(halo=4, multiple=1, input_offset=0, shrinks=True)  # input 24, labels 16
PATCH = 16
MARGIN = 4  # the halo: the label crop's top-left in the input window


def _position_slide(height: int, width: int, seed: int = 0) -> SyntheticSlide:
    """A slide whose red channel is each pixel's row and green its column (uint8), blue
    random: a window tells where it was read, and how it was turned."""
    yy, xx = np.meshgrid(np.arange(height), np.arange(width), indexing="ij")
    rng = np.random.default_rng(seed)
    image = np.stack([yy, xx, rng.integers(0, 256, (height, width))], axis=-1).astype(np.uint8)
    labels = rng.integers(0, 3, (height, width)).astype(np.uint8)
    return SyntheticSlide(image, labels, np.zeros((height, width), np.int32))


def _crop_corners(images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(y, x) of each unturned pair's label crop, read off its position channels."""
    corner = np.rint(images[:, :2, MARGIN, MARGIN] * 255).astype(int)
    return corner[:, 0], corner[:, 1]


@pytest.mark.parametrize(("height", "width"), [(20, 28), (28, 20)])
def test_sample_pairs_draws_every_crop_position_inside_the_slide(height: int, width: int) -> None:
    """Label crops inside the slide, from 0 to side - 16 along each axis, both ends drawn;
    on a slide that is not square each axis by its own side."""
    slide = _position_slide(height, width)
    batch = sample_pairs([slide], GEOMETRY, PATCH, 200, np.random.default_rng(0), augmentation=None)
    ys, xs = _crop_corners(batch.images)
    assert set(ys.tolist()) == set(range(height - PATCH + 1))
    assert set(xs.tolist()) == set(range(width - PATCH + 1))


def test_sample_pairs_without_flips_does_not_turn_the_pairs() -> None:
    """``Augmentation(flips=False)``: each pair is the window at its place as
    :func:`patch_pair` reads it; with flips, some are turned."""
    slide = _position_slide(40, 40)

    def is_as_read(flips: bool) -> list[bool]:
        augmentation = Augmentation(flips=flips)
        batch = sample_pairs(
            [slide], GEOMETRY, PATCH, 12, np.random.default_rng(0), augmentation=augmentation
        )
        corners = _crop_corners(batch.images)
        out = []
        for image, labels, y, x in zip(batch.images, batch.labels, *corners, strict=True):
            ref_image, ref_labels = patch_pair(slide, int(y), int(x), GEOMETRY, PATCH)
            out.append(np.array_equal(image, ref_image) and np.array_equal(labels, ref_labels))
        return out

    assert all(is_as_read(flips=False))
    assert not all(is_as_read(flips=True))


@pytest.mark.parametrize(("scale", "high"), [(None, 1.0), (lambda p: p / 100.0, 2.55)])
def test_jittered_pairs_stay_in_the_range_a_scan_of_their_dtype_reaches(
    scale: Callable[[np.ndarray], np.ndarray] | None, high: float
) -> None:
    """Jitter is clipped to the uint8 range as the model scales it: [0, 1] by the dtype
    rule, [0, 2.55] for pixels / 100; a brighter scan could not go further."""
    rng = np.random.default_rng(0)
    image = rng.integers(0, 256, (40, 40, 3)).astype(np.uint8)
    slide = SyntheticSlide(image, np.zeros((40, 40), np.uint8), np.zeros((40, 40), np.int32))
    batch = sample_pairs(
        [slide],
        GEOMETRY,
        PATCH,
        16,
        np.random.default_rng(1),
        augmentation=Augmentation(flips=False, jitter=0.9),
        scale=scale,
    )
    assert batch.images.min() == 0.0
    assert batch.images.max() == np.float32(high)  # reached and clipped at both ends
