"""Training pairs: where they are drawn, which augmentations they get, their value range."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import pytest

from segpipe.geometry.tiling import Geometry
from segpipe.synthetic import SyntheticSlide
from segpipe.training import Augmentation, patch_pair, sample_pairs

GEOMETRY = Geometry(halo=4, multiple=1, input_offset=0, shrinks=True)  # input 24, labels 16
SAME_PADDING = Geometry(halo=4, multiple=1, input_offset=0, shrinks=False)  # input = labels 24
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


def _crop_corners(images: np.ndarray, margin: int = MARGIN) -> tuple[np.ndarray, np.ndarray]:
    """(y, x) of each unturned pair's label crop, read off its position channels."""
    corner = np.rint(images[:, :2, margin, margin] * 255).astype(int)
    return corner[:, 0], corner[:, 1]


@pytest.mark.parametrize(
    ("geometry", "margin", "side"),
    [(GEOMETRY, MARGIN, PATCH), (SAME_PADDING, 0, 24)],
    ids=["valid", "same padding"],
)
@pytest.mark.parametrize("wide", [True, False], ids=["wide", "tall"])
def test_sample_pairs_draws_every_crop_position_inside_the_slide(
    geometry: Geometry, margin: int, side: int, wide: bool
) -> None:
    """Label crops inside the slide, from 0 to slide side - label side along each axis, both
    ends drawn; on a slide that is not square each axis by its own side. A same-padding
    model's labels are its whole window (24 px here, not the 16 asked for): a crop drawn up
    to side - 16 ran 8 px past the slide, training on mirrored, invented labels."""
    height, width = (side + 4, side + 12) if wide else (side + 12, side + 4)
    slide = _position_slide(height, width)
    batch = sample_pairs([slide], geometry, PATCH, 200, np.random.default_rng(0), augmentation=None)
    assert batch.labels.shape[1:] == (side, side)
    ys, xs = _crop_corners(batch.images, margin)
    assert set(ys.tolist()) == set(range(height - side + 1))
    assert set(xs.tolist()) == set(range(width - side + 1))


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


@pytest.mark.parametrize("flips", [False, True], ids=["as read", "turned"])
def test_each_pair_takes_the_weights_of_its_own_image(flips: bool) -> None:
    """``weight_maps[i]`` are the loss weights of ``slides[i]``: a pair of the second image
    with the first image's weights trains its labels on another image's border weights."""
    slides = [_position_slide(30, 30, seed=0), _position_slide(30, 30, seed=1)]
    for k, slide in enumerate(slides):
        slide.image[..., 2] = 100 * k  # blue tells the two images apart
    yy, xx = np.indices((30, 30))
    # Each map's weights say its image and each pixel's place: 1000 k + 30 y + x.
    maps = [(1000 * k + 30 * yy + xx).astype(np.float32) for k in range(2)]
    batch = sample_pairs(
        slides,
        GEOMETRY,
        PATCH,
        40,
        np.random.default_rng(0),
        augmentation=Augmentation(flips=flips),
        weight_maps=maps,
    )
    assert batch.weights is not None
    seen = set()
    for image, labels, weights in zip(batch.images, batch.labels, batch.weights, strict=True):
        k = int(np.rint(image[2, 0, 0] * 255)) // 100
        seen.add(k)
        # Each label pixel's own place in the slide, read off the (turned) image's centre.
        centre = np.rint(image[:2, MARGIN:-MARGIN, MARGIN:-MARGIN] * 255).astype(int)
        y, x = centre
        np.testing.assert_array_equal(weights, maps[k][y, x])
        np.testing.assert_array_equal(labels, slides[k].labels[y, x])
    assert seen == {0, 1}
