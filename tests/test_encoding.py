"""The float16 casts of segpipe.results.encoding against numpy's, and the pyramid's float16
mean (results.pyramid.halve) against the float64 mean of geometry.pixels."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from segpipe.geometry.pixels import downsample_mean_2x
from segpipe.results.encoding import as_float16, as_float32, encode_probabilities
from segpipe.results.pyramid import halve


def _bits(a: np.ndarray) -> np.ndarray:
    return a.view(np.uint16) if a.dtype == np.float16 else a.view(np.uint32)


def _near_float16_midpoints(rng: np.random.Generator, n: int) -> np.ndarray:
    """float64 values on and a hair either side of the midpoints between float16 neighbours,
    over the normal and subnormal ranges and both signs: where a second rounding goes wrong."""
    halves = rng.integers(1, 0x7BFF, n, dtype=np.uint16).view(np.float16)
    low = halves.astype(np.float64)
    high = np.nextafter(halves, np.float16(np.inf)).astype(np.float64)
    middle = (low + high) / 2
    nudge = rng.choice([-1.0, 0.0, 1.0], n) * np.abs(middle) * 2.0**-40
    signs = rng.choice([-1.0, 1.0], n)
    return signs * (middle + nudge)


def test_as_float16_rounds_float64_once_as_numpy_does() -> None:
    rng = np.random.default_rng(0)
    values = np.concatenate(
        [
            _near_float16_midpoints(rng, 200_000),
            rng.normal(0, 1e-6, 10_000),  # float16 subnormals
            [0.0, -0.0, 65504.0, 65519.99, 65520.0, 1e300, -1e300, np.inf, -np.inf],
        ]
    )
    with np.errstate(over="ignore"):
        expected = values.astype(np.float16)
    got = as_float16(values)
    np.testing.assert_array_equal(_bits(got), _bits(expected))
    # Two roundings to nearest (torch's own float64 cast) miss some of these values: the
    # test can tell a correct cast from a naive one.
    naive = torch.from_numpy(values).to(torch.float16).numpy()
    assert (_bits(naive) != _bits(expected)).sum() > 100
    assert np.isnan(as_float16(np.array([np.nan]))).all()


def test_as_float16_of_float32_views_as_numpy_does() -> None:
    rng = np.random.default_rng(1)
    values = rng.normal(0, 1e-3, (3, 40, 50)).astype(np.float32)
    for view in (values, values[:, ::-1], values[:, 3:30, 5:41], values.T):
        np.testing.assert_array_equal(_bits(as_float16(view)), _bits(view.astype(np.float16)))
        assert as_float16(view).flags.c_contiguous
    frozen = values.copy()
    frozen.flags.writeable = False
    np.testing.assert_array_equal(as_float16(frozen), values.astype(np.float16))
    with pytest.raises(TypeError, match="float32 or float64"):
        as_float16(values.astype(np.float16))


def test_as_float32_is_exact() -> None:
    every = np.arange(2**16, dtype=np.uint32).astype(np.uint16).view(np.float16)
    finite = every[np.isfinite(every)]
    got = as_float32(finite[::-1])
    np.testing.assert_array_equal(_bits(got), _bits(finite[::-1].astype(np.float32)))
    with pytest.raises(TypeError, match="float16"):
        as_float32(finite.astype(np.float32))


@pytest.mark.parametrize("shape", [(3, 64, 64), (2, 33, 17), (1, 2, 2), (5, 7)])
def test_float16_mean_is_the_exact_mean_rounded_once(shape: tuple[int, ...]) -> None:
    rng = np.random.default_rng(sum(shape))
    # Every float16 pattern but the non-finite ones: subnormals, signs, the largest values.
    values = rng.integers(0, 0x7C00, shape, dtype=np.uint16).view(np.float16)
    values = np.where(rng.random(shape) < 0.5, values, -values)
    yx = (len(shape) - 2, len(shape) - 1)
    expected = downsample_mean_2x(values, yx_axes=yx)  # summed in float64, one numpy cast
    assert expected.dtype == np.float16
    np.testing.assert_array_equal(_bits(halve(values, "mean")), _bits(expected))
    flipped = values[..., ::-1, :]
    np.testing.assert_array_equal(
        _bits(halve(flipped, "mean")), _bits(downsample_mean_2x(flipped, yx_axes=yx))
    )


def test_float16_mean_of_probabilities_near_a_midpoint() -> None:
    # (2**-24 + 1 + 1 + 2**-10) / 4 lies just past the midpoint between 0.5 and the float16
    # above it: summed in float32 and rounded again, it would go down to 0.5.
    block = np.array([[2**-24, 1.0], [1.0, 2**-10]], dtype=np.float16)
    assert halve(block, "mean").item() == 0.5 + 2**-11


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_uint8_probabilities_are_round_p_times_255_at_the_halves(dtype):
    """Every float32 within 64 steps of each code's half, (k + 0.5) / 255: stored as
    round(p * 255) (ties to even) computed exactly, in Python's integers and fractions.
    Divided by float32's 1/255 they rounded twice: 191 of these were one code low."""
    from fractions import Fraction

    bits = np.float32([(k + 0.5) / 255 for k in range(255)]).view(np.uint32)
    p = (bits[:, None] + np.arange(-64, 65)).astype(np.uint32).view(np.float32).ravel()
    expected = [round(Fraction(float(v)) * 255) for v in p]  # round(): ties to even
    np.testing.assert_array_equal(encode_probabilities(p.astype(dtype), "uint8"), expected)
