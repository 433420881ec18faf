"""Tests for segpipe.geometry.pixels: axis layout, value scaling, 2x mean pyramids."""

from __future__ import annotations

from typing import Any

import dask.array as da
import numpy as np
import pytest
from hypothesis import example, given
from hypothesis import strategies as st

from segpipe.geometry.pixels import (
    downsample_mean_2x,
    pyramid_shapes,
    to_float01,
    to_yxc,
    unit_scale,
    valid_mean_2x,
    yxc_shape,
)

Y, X, C = 5, 7, 3
YXC = np.arange(Y * X * C, dtype=np.uint16).reshape(Y, X, C)


def _mean2x_reference(a: np.ndarray) -> np.ndarray:
    """2x2 block mean of (Y, X, ...) with round-half-up, by explicit strided sums."""
    y, x = a.shape[0] // 2 * 2, a.shape[1] // 2 * 2
    s = a[0:y:2, 0:x:2].astype(np.int64) + a[1:y:2, 0:x:2] + a[0:y:2, 1:x:2] + a[1:y:2, 1:x:2]
    return ((s + 2) // 4).astype(a.dtype)


# (source array built from the reference (Y, X, C) image, its axes, the expected (Y, X, C))
LAYOUTS = [
    pytest.param(YXC, "YXC", YXC, id="YXC"),
    pytest.param(YXC, "YXS", YXC, id="YXS"),
    pytest.param(YXC.transpose(2, 0, 1), "CYX", YXC, id="CYX"),
    pytest.param(YXC.transpose(2, 0, 1), "syx", YXC, id="syx-lowercase"),
    pytest.param(YXC[..., 0], "YX", YXC[..., :1], id="YX"),
    pytest.param(YXC.transpose(2, 0, 1)[None, :, None], "TCZYX", YXC, id="TCZYX"),
    pytest.param(YXC.transpose(1, 0, 2), "XYC", YXC, id="XYC"),
    pytest.param(YXC[None], "CYXS", YXC, id="CYXS-C1"),
    pytest.param(YXC[..., :1].transpose(2, 0, 1)[None], "ZCYX", YXC[..., :1], id="ZCYX-grey"),
]


@pytest.mark.parametrize(("source", "axes", "expected"), LAYOUTS)
@pytest.mark.parametrize("lazy", [False, True], ids=["numpy", "dask"])
def test_to_yxc(source: np.ndarray, axes: str, expected: np.ndarray, lazy: bool) -> None:
    array = da.from_array(source, chunks=2) if lazy else source
    out = to_yxc(array, axes)
    assert isinstance(out, da.Array) == lazy
    assert out.shape == expected.shape
    assert yxc_shape(source.shape, axes) == expected.shape
    np.testing.assert_array_equal(np.asarray(out), expected)


def test_to_yxc_numpy_is_a_view() -> None:
    source = YXC.transpose(2, 0, 1)
    assert np.shares_memory(to_yxc(source, "CYX"), source)


@pytest.mark.parametrize(
    ("shape", "axes", "fragment"),
    [
        ((2, Y, X), "ZYX", "Z=2"),
        ((3, 1, Y, X), "TCYX", "T=3"),
        ((Y, X), "YXC", "2 axes"),
        ((Y, X, 3), "YZC", "must name Y and X"),
        ((Y, Y, X), "YYX", "must name Y and X"),
        ((2, Y, X, 3), "CYXS", "two channel axes"),
    ],
)
def test_to_yxc_rejects(shape: tuple[int, ...], axes: str, fragment: str) -> None:
    with pytest.raises(ValueError, match=fragment) as info:
        to_yxc(np.zeros(shape, np.uint8), axes)
    assert repr(axes) in str(info.value)
    assert str(shape) in str(info.value)


@pytest.mark.parametrize(
    ("dtype", "scale"),
    [
        (np.uint8, 255.0),
        (np.uint16, 65535.0),
        (np.uint32, 4294967295.0),
        (np.int8, 127.0),
        (np.int16, 32767.0),
        (np.float16, 1.0),
        (np.float32, 1.0),
        (np.float64, 1.0),
        (np.bool_, 1.0),
    ],
)
def test_unit_scale(dtype: type, scale: float) -> None:
    assert unit_scale(dtype) == scale
    assert unit_scale(np.dtype(dtype)) == scale


@pytest.mark.parametrize("dtype", [np.complex64, np.dtype("U3"), np.dtype(object)])
def test_unit_scale_rejects(dtype: np.dtype) -> None:
    with pytest.raises(ValueError, match=str(np.dtype(dtype))):
        unit_scale(dtype)


@pytest.mark.parametrize(
    ("values", "expected"),
    [
        (np.array([0, 51, 255], np.uint8), [0.0, 0.2, 1.0]),
        (np.array([0, 65535], np.uint16), [0.0, 1.0]),
        (np.array([False, True]), [0.0, 1.0]),
        (np.array([-0.5, 0.25, 2.0], np.float64), [-0.5, 0.25, 2.0]),  # floats pass through
    ],
)
@pytest.mark.parametrize("lazy", [False, True], ids=["numpy", "dask"])
def test_to_float01(values: np.ndarray, expected: list[float], lazy: bool) -> None:
    array = da.from_array(values) if lazy else values
    out = to_float01(array)
    assert out.dtype == np.float32
    assert isinstance(out, da.Array) == lazy
    np.testing.assert_allclose(np.asarray(out), expected, rtol=1e-6)


@pytest.mark.parametrize(
    ("shape", "min_size", "expected"),
    [
        ((300, 517), 64, ((300, 517), (150, 258), (75, 129))),
        ((8192, 8192), 256, tuple((8192 >> k, 8192 >> k) for k in range(6))),
        ((100, 5000), 256, ((100, 5000),)),
        ((513, 1024), 256, ((513, 1024), (256, 512))),
    ],
)
def test_pyramid_shapes(
    shape: tuple[int, int], min_size: int, expected: tuple[tuple[int, int], ...]
) -> None:
    assert pyramid_shapes(shape, min_size) == expected


def test_pyramid_shapes_rejects_zero() -> None:
    with pytest.raises(ValueError, match="min_level_size"):
        pyramid_shapes((10, 10), 0)


@pytest.mark.parametrize("dtype", [np.uint8, np.uint16, np.int16])
def test_downsample_numpy_matches_reference(dtype: type) -> None:
    rng = np.random.default_rng(1)
    info = np.iinfo(dtype)
    a = rng.integers(info.min, info.max, (31, 17, 3), dtype=dtype, endpoint=True)
    np.testing.assert_array_equal(downsample_mean_2x(a), _mean2x_reference(a))


@pytest.mark.parametrize("dtype", [np.int64, np.uint64, np.dtype("q"), np.dtype("Q")])
def test_downsample_of_64_bit_integers_is_exact_at_their_extremes(dtype: Any) -> None:
    # Four int64s overflow an int64 sum, and float64 rounds them: Python's integers are exact.
    info = np.iinfo(dtype)
    rng = np.random.default_rng(2)
    a = rng.integers(info.min, info.max, (6, 10), dtype=np.dtype(dtype).str, endpoint=True)
    a[:2, :2], a[2:4, :2] = info.max, info.min
    a = a.astype(dtype)
    out = downsample_mean_2x(a[..., None])[..., 0]
    expected = [
        [(sum(int(v) for v in a[y : y + 2, x : x + 2].ravel()) + 2) // 4 for x in range(0, 10, 2)]
        for y in range(0, 6, 2)
    ]
    assert out.dtype == a.dtype
    assert [[int(v) for v in row] for row in out] == expected
    assert out[0, 0] == info.max and out[1, 0] == info.min


def test_downsample_float_and_bool() -> None:
    f = np.array([[0.0, 1.0], [0.5, 0.5]], np.float32)
    assert downsample_mean_2x(f).dtype == np.float32
    np.testing.assert_allclose(downsample_mean_2x(f), [[0.5]])
    b = np.array([[True, True, False], [False, False, True]])
    np.testing.assert_array_equal(downsample_mean_2x(b), [[True]])


@pytest.mark.parametrize("float32_sum", [False, True])
@pytest.mark.parametrize("dtype", [np.float16, np.float32, np.float64])
def test_downsample_float_within_ulps_of_the_exact_mean(dtype: type, float32_sum: bool) -> None:
    # Values in [0, 1) as probabilities are, on a strided view as the tasks pass (C, y, x)
    # crops: within 2 ulps of the float64 mean of the four, whether float32 is summed in
    # float32 (float32_sum) or float64.
    rng = np.random.default_rng(3)
    a = rng.random((3, 42, 38)).astype(dtype)[:, 1:-1, 3:-1]
    out = downsample_mean_2x(a, yx_axes=(1, 2), float32_sum=float32_sum)
    assert out.dtype == dtype and out.shape == (3, 20, 17)
    exact = a[:, :40, :34].astype(np.float64).reshape(3, 20, 2, 17, 2).mean(axis=(2, 4))
    np.testing.assert_allclose(out, exact, rtol=2 * np.finfo(dtype).eps, atol=0)
    assert not np.shares_memory(out, a)


def test_downsample_float32_keeps_extremes_and_signs() -> None:
    # Rasters' float32 (GeoTIFF nodata -FLT_MAX, values of both signs) are summed in float64
    # unless asked: no overflow, no cancellation.
    low = np.finfo(np.float32).min
    a = np.array([[low, low, 1.0, 1e8], [low, low, -1e8, 1.0]], np.float32)
    np.testing.assert_array_equal(downsample_mean_2x(a), [[low, 0.5]])
    with np.errstate(over="ignore"):
        fast = downsample_mean_2x(a, float32_sum=True)
    assert np.isinf(fast[0, 0])  # why it is only for probabilities


def test_downsample_channel_first() -> None:
    rng = np.random.default_rng(2)
    cyx = rng.integers(0, 256, (2, 9, 12), dtype=np.uint8)
    out = downsample_mean_2x(cyx, yx_axes=(1, 2))
    expected = _mean2x_reference(cyx.transpose(1, 2, 0)).transpose(2, 0, 1)
    np.testing.assert_array_equal(out, expected)


@given(
    ny=st.integers(2, 40),
    nx=st.integers(2, 40),
    cy=st.integers(1, 15),
    cx=st.integers(1, 15),
)
def test_downsample_dask_matches_numpy_for_any_chunks(ny: int, nx: int, cy: int, cx: int) -> None:
    a = np.random.default_rng(ny * 100 + nx).integers(0, 256, (ny, nx, 2), dtype=np.uint8)
    lazy = downsample_mean_2x(da.from_array(a, chunks=(cy, cx, 2)))
    assert isinstance(lazy, da.Array)
    np.testing.assert_array_equal(lazy.compute(), _mean2x_reference(a))


@pytest.mark.parametrize("shape", [(1, 5, 3), (5, 1)])
def test_downsample_rejects_too_small(shape: tuple[int, ...]) -> None:
    with pytest.raises(ValueError, match=r"cannot halve"):
        downsample_mean_2x(np.zeros(shape, np.uint8))


@pytest.mark.parametrize(
    ("n0", "n", "gdal", "scale"),
    [
        (1203, 601, 2, 2), (1203, 37, 32, 32), (1203, 18, 64, 64), (39, 4, 8, 8),
        (1000, 500, 2, 2), (517, 259, 517 / 259, 2),
        (1001, 501, 1001 / 501, 2), (1001, 334, 1001 / 334, 3),  # rounded up
    ],
)  # fmt: skip
def test_a_levels_pixel_is_its_whole_factor(n0, n, gdal, scale):
    """Past a few levels the ratio rounded to another factor that fits too (1203 px, level
    6: 18 px, 66.8; ceil(1203 / 67) is 18): that level's pixel size was 67 level-0 pixels,
    and level 3 of a 39 px ingested raster was placed at 4.875 m pixels, not 4. A level
    rounded up is GDAL's overview, whose transform GDAL scales by the ratio."""
    from segpipe.geometry.pixels import level_downsample

    assert level_downsample(n0, n) == scale
    assert level_downsample(n0, n, overview_ratio=True) == gdal


@pytest.mark.parametrize(("n0", "n"), [(10, 25), (3, 10), (100, 250)])
def test_a_level_larger_than_level_0_is_its_size_ratio(n0, n):
    """A level more than twice level 0's side (a mask finer than its image) and no power of
    two of it: the size ratio, below 1."""
    from segpipe.geometry.pixels import level_downsample

    assert level_downsample(n0, n) == pytest.approx(n0 / n)
    assert level_downsample(n0, n, overview_ratio=True) == pytest.approx(n0 / n)


@given(st.integers(1, 100_000), st.integers(0, 16))
@example(33, 4)  # 3 px: 11 before
@example(129, 6)  # 3 px: 43 before
def test_a_level_halved_k_times_is_two_to_the_k(n0, k):
    """Every side a level halved ``k`` times can have (rounded down or up) gives 2**k, or
    another power of two that makes that side too: 33 px at level 4 is 3 px, and its factor
    came out 11 (the ratio), not 16."""
    from segpipe.geometry.pixels import level_downsample

    for n in {n0 // 2**k, -(-n0 // 2**k)} - {0}:
        d = level_downsample(n0, n)
        assert d == 2**k or (float(d).is_integer() and int(d).bit_count() == 1), (n, d)
        assert n0 // d == n or -(-n0 // d) == n


@pytest.mark.parametrize(
    ("dtype", "nodata", "moved"),
    [
        ("bool", 0.0, True),  # three bands of (T,F,F), (F,T,F), (F,F,T) average to False
        ("uint8", 0.0, 1),
        ("uint8", 255.0, 254),
        ("int16", -32768.0, -32767),
        ("float32", 0.0, np.nextafter(np.float32(0), np.float32(1))),
        ("float32", float(np.finfo(np.float32).max), np.nextafter(np.finfo(np.float32).max, 0)),
    ],
)
def test_a_valid_mean_equal_to_nodata_moves_one_step_off_it(dtype, nodata, moved) -> None:
    """A mean that is nodata in every band would read as nodata; with one band off it, not."""
    block = np.full((2, 2, 4), nodata, dtype=dtype)
    valid = np.zeros((2, 4), bool)
    valid[:, :2] = True  # left block: 4 valid pixels all of nodata's value; right: none valid
    out = valid_mean_2x(block, valid, (nodata, nodata), off_nodata=True)
    assert out.dtype == np.dtype(dtype)
    assert out[:, 0, 0].tolist() == [moved, nodata]
    assert out[:, 0, 1].tolist() == [nodata, nodata], "no valid pixel: nodata"
    kept = valid_mean_2x(block, valid, (nodata, nodata))
    assert kept[:, 0, 0].tolist() == [nodata, nodata], "only when asked"


@pytest.mark.parametrize("dtype", ["uint8", "int16", "float32"])
def test_a_valid_mean_equal_to_nodata_in_one_band_only_stays(dtype) -> None:
    """Only a mean equal to nodata in every band reads as nodata: one band at nodata's value
    with another off it is a valid pixel already, left as it is."""
    block = np.zeros((2, 2, 2), dtype=dtype)
    block[1] = 5  # band 0 at nodata (0), band 1 at 5
    out = valid_mean_2x(block, np.ones((2, 2), bool), (0.0, 0.0), off_nodata=True)
    assert out[:, 0, 0].tolist() == [0, 5]
