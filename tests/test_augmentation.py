"""Augmentation of training pairs: the deformation field, how each array is sampled, jitter."""

from __future__ import annotations

import numpy as np
import pytest
from scipy import ndimage

from segpipe.training.augmentation import elastic_deformation, intensity_jitter


def _ramps(n: int) -> tuple[np.ndarray, np.ndarray]:
    """Row and column index of every pixel of an ``(n, n)`` window, float32."""
    ys, xs = np.meshgrid(
        np.arange(n, dtype=np.float32), np.arange(n, dtype=np.float32), indexing="ij"
    )
    return ys, xs


def _bilinear(values: np.ndarray, ys: np.ndarray, xs: np.ndarray) -> np.ndarray:
    """``values`` (``(n, n)``) at the positions ``(ys, xs)`` inside it, bilinearly, by hand."""
    n = values.shape[0]
    y0 = np.clip(np.floor(ys).astype(int), 0, n - 2)
    x0 = np.clip(np.floor(xs).astype(int), 0, n - 2)
    wy, wx = ys - y0, xs - x0
    return (
        values[y0, x0] * (1 - wy) * (1 - wx)
        + values[y0 + 1, x0] * wy * (1 - wx)
        + values[y0, x0 + 1] * (1 - wy) * wx
        + values[y0 + 1, x0 + 1] * wy * wx
    )


def _deformed_positions(seed: int, n: int = 24, std_px: float = 6.0) -> dict[str, np.ndarray]:
    """One deformation of a window whose first two channels are its row and column ramps,
    the third random values; labels number every pixel and the weights are random too.

    Bilinear sampling is exact on a ramp, mirrored ones included (the mirror's kink falls on
    a pixel), so the first two output channels are where each output pixel sampled the
    window, already mirrored back into it: the reference for everything else."""
    rng = np.random.default_rng(100 + seed)
    ys, xs = _ramps(n)
    values = rng.uniform(0, 1, (n, n)).astype(np.float32)
    weights = rng.uniform(1, 3, (n, n)).astype(np.float32)
    labels = np.arange(n * n, dtype=np.int64).reshape(n, n)
    image = np.stack([ys, xs, values])
    out, out_labels, out_weights = elastic_deformation(
        image, labels, np.random.default_rng(seed), std_px=std_px, weights=weights
    )
    return {
        "py": out[0].astype(np.float64),
        "px": out[1].astype(np.float64),
        "values": values,
        "out_values": out[2],
        "labels": labels,
        "out_labels": out_labels,
        "weights": weights,
        "out_weights": out_weights,
    }


@pytest.mark.parametrize("grid", [3, 4])
def test_elastic_field_is_a_cubic_spline_of_the_coarse_draws(grid: int) -> None:
    """As the U-Net paper and the docstring say: displacements drawn on a coarse grid, then a
    cubic spline to every pixel (a linear one has kinks the network would learn)."""
    n, std = 48, 3.0
    ys, xs = _ramps(n)
    image = np.stack([ys, xs])
    out, _, _ = elastic_deformation(
        image, np.zeros((n, n), np.int64), np.random.default_rng(0), std_px=std, grid=grid
    )
    # The same draws: the displacements are the first thing it draws, (2, grid, grid).
    coarse = np.random.default_rng(0).normal(0.0, std, size=(2, grid, grid))
    field = np.stack([ndimage.zoom(c, n / grid, order=3, mode="nearest")[:n, :n] for c in coarse])
    inner = (slice(None), slice(12, -12), slice(12, -12))  # where no position leaves the window
    np.testing.assert_allclose((out - image)[inner], field[inner], atol=1e-3)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_elastic_labels_take_the_nearest_pixel_of_the_image_position(seed: int) -> None:
    """Labels sample where the image samples, mirrored alike where that leaves the window
    (``mode="mirror"``: the edge pixel not repeated): else a class sits beside the wrong
    pixels at the window's edge."""
    d = _deformed_positions(seed)
    n = d["labels"].shape[0]
    py, px = d["py"], d["px"]
    # Float32 positions: a half-way one may round either way.
    clear = (np.abs(py % 1 - 0.5) > 1e-3) & (np.abs(px % 1 - 0.5) > 1e-3)
    expected = d["labels"][np.rint(py).astype(int), np.rint(px).astype(int)]
    np.testing.assert_array_equal(d["out_labels"][clear], expected[clear])
    # The deformation reached past the edge, where the mirror modes differ.
    assert ((py > n - 1.5) | (px > n - 1.5) | (py < 0.5) | (px < 0.5)).sum() > 20


@pytest.mark.parametrize("seed", [0, 1])
def test_elastic_image_and_weights_are_sampled_bilinearly(seed: int) -> None:
    """The image and the loss weights are interpolated bilinearly at the labels' positions:
    no spline overshoot of the grey values, no blocky weights."""
    d = _deformed_positions(seed)
    py, px = d["py"], d["px"]
    np.testing.assert_allclose(d["out_values"], _bilinear(d["values"], py, px), atol=1e-4)
    np.testing.assert_allclose(d["out_weights"], _bilinear(d["weights"], py, px), atol=1e-4)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_intensity_jitter_contrast_is_about_the_whole_image_mean(seed: int) -> None:
    """Gain per channel, then contrast about the mean of the whole image and one brightness:
    ``out_k = a_k * x_k + d`` with one offset ``d`` for every channel. Contrast about each
    channel's own mean would give each its own offset (and change the colour balance)."""
    rng = np.random.default_rng(seed)
    low = np.array([0.1, 0.5, 0.7], np.float32).reshape(3, 1, 1)
    image = (low + rng.uniform(0, 0.2, (3, 8, 8))).astype(np.float32)
    out = intensity_jitter(image, np.random.default_rng(seed), 0.5)
    x, y = image.reshape(3, -1).astype(np.float64), out.reshape(3, -1).astype(np.float64)
    slope = [np.polyfit(xk, yk, 1) for xk, yk in zip(x, y, strict=True)]
    np.testing.assert_allclose([p[1] for p in slope], slope[0][1], atol=1e-4)
    assert not np.allclose([p[0] for p in slope], 1.0, atol=1e-3)  # it did change them


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_intensity_jitter_draws_a_gain_for_each_channel(seed: int) -> None:
    """Gain per channel (the colour balance changes, as stains and scanners vary it), then
    one contrast for the whole image: the channels' slopes ``a_k = gain_k * contrast``
    differ. One gain for every channel would leave the colour balance as it was."""
    rng = np.random.default_rng(seed)
    image = rng.uniform(0.2, 0.8, (3, 8, 8)).astype(np.float32)
    out = intensity_jitter(image, np.random.default_rng(seed), 0.5)
    x, y = image.reshape(3, -1).astype(np.float64), out.reshape(3, -1).astype(np.float64)
    slopes = [np.polyfit(xk, yk, 1)[0] for xk, yk in zip(x, y, strict=True)]
    assert np.ptp(slopes) > 1e-2, slopes


def test_a_signed_dtypes_range_reaches_below_zero() -> None:
    """int16 pixels run from -32768 to 32767: a jittered signed image (a difference image, a
    CT-like scan) is clipped where its dtype ends, not at what pixel value 0 scales to,
    which would flatten every negative value in training only."""
    from segpipe.geometry.pixels import to_float01
    from segpipe.training.augmentation import scaled_dtype_range

    low, high = scaled_dtype_range(np.dtype("int16"), 2, to_float01)
    np.testing.assert_allclose(low, [-32768 / 32767] * 2)
    np.testing.assert_allclose(high, [1.0, 1.0])
    image = np.full((2, 4, 4), -0.5, np.float32)  # negative pixels, well inside the range
    out = intensity_jitter(image, np.random.default_rng(0), 0.2, (low, high))
    assert (out < 0).all()
