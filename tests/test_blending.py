import warnings

import numpy as np
import pytest
from hypothesis import assume, given
from hypothesis import strategies as st

from segpipe.geometry.blending import (
    RIM_FLOOR,
    BlendSink,
    CropSink,
    blend_lattice,
    blend_window_side,
    gaussian_weights,
)
from segpipe.geometry.tiling import Box, Geometry, Window


@pytest.mark.parametrize("side", [1, 2, 7, 64])
def test_gaussian_weights_are_symmetric_positive_and_peak_at_centre(side):
    w = gaussian_weights(side)
    assert w.shape == (side, side) and w.dtype == np.float32
    assert (w > 0).all()
    np.testing.assert_array_equal(w, w[::-1, ::-1])
    np.testing.assert_array_equal(w, w.T)
    assert w.max() == pytest.approx(1.0)
    assert w[side // 2, side // 2] == w.max()


def test_gaussian_weights_follow_sigma():
    w = gaussian_weights(101, sigma_scale=0.1)
    # 1-D profile through the centre: exp(-r^2 / (2 sigma^2)), sigma = 10.1 px
    r = np.arange(101) - 50
    np.testing.assert_allclose(w[50], np.exp(-(r**2) / (2 * 10.1**2)), rtol=1e-5)


@pytest.mark.parametrize("sigma_scale", [0.01, 0.03, 0.05])
def test_a_narrow_gaussian_still_weighs_every_pixel_of_its_window(sigma_scale):
    """Below a sigma_scale of about 0.05 the corners' float64 weights are 0 in float32: a pixel
    covered only by a window's corner (the image's own corner, on MONAI's lattice) had no
    weight and the sink refused it as uncovered."""
    w = gaussian_weights(64, sigma_scale)
    assert (w >= np.float32(1e-20)).all() and w.max() == 1.0
    sink = BlendSink(Box(0, 64, 0, 64), 2, sigma_scale=sigma_scale)
    p = np.random.default_rng(0).random((2, 64, 64)).astype(np.float32)
    sink.add(Window(Box(0, 64, 0, 64), Box(0, 64, 0, 64), 0), p)
    np.testing.assert_allclose(sink.result(), p, rtol=1e-6)


@pytest.mark.parametrize("side", [1, 2, 7, 32, 33, 64])
@pytest.mark.parametrize("sigma_scale", [1e-4, 4e-4, 1e-12, 1e-200, 5e-324])
def test_a_vanishing_gaussian_keeps_its_centre_and_the_floor(side, sigma_scale):
    """A sigma of under about 0.018 px made an even window's centre weigh 0 in float64 (and
    any window's, once sigma² is 0): the map was NaN and the sink refused every pixel as
    uncovered (a 32 px window at 0.0004)."""
    w = gaussian_weights(side, sigma_scale)
    assert np.isfinite(w).all() and w.max() == 1.0 and w.min() >= np.float32(RIM_FLOOR)
    centre = slice((side - 1) // 2, side // 2 + 1)  # one pixel, or four for an even side
    expected = np.full((side, side), np.float32(RIM_FLOOR))
    expected[centre, centre] = 1.0
    np.testing.assert_array_equal(w, expected)
    sink = BlendSink(Box(0, side, 0, side), 2, sigma_scale=sigma_scale)
    p = np.random.default_rng(0).random((2, side, side)).astype(np.float32)
    sink.add(Window(Box(0, side, 0, side), Box(0, side, 0, side), 0), p)
    np.testing.assert_allclose(sink.result(), p, rtol=1e-6)


@pytest.mark.parametrize("side", [2, 7, 32, 64, 255, 1408])
@pytest.mark.parametrize("sigma_scale", [0.125, 0.05, 0.25])
def test_ordinary_gaussian_weights_are_the_plain_formula_to_the_bit(side, sigma_scale):
    """Blended results are compared with MONAI and with stored runs: an ordinary sigma must
    give exactly exp(-r² / 2 sigma²) over its peak, floored (1408 px at the default sigma is
    where weights relative to the largest exponent would round 8 weights differently)."""
    r = np.arange(side) - (side - 1) / 2
    g = np.exp(-(r**2) / (2 * (sigma_scale * side) ** 2))
    ref = np.outer(g, g)
    ref = np.maximum(ref / ref.max(), 1e-20).astype(np.float32)
    np.testing.assert_array_equal(gaussian_weights(side, sigma_scale), ref)


_REGION, _SIDE = Box(0, 20, 0, 20), 16
_origin = st.tuples(st.integers(-8, 24), st.integers(-8, 24))


def _blend(origins: list[tuple[int, int]], seed: int) -> tuple[BlendSink, np.ndarray, np.ndarray]:
    """A sink given a random ``_SIDE`` window at each origin, and the weighted sum and the
    weights an independent reference gets by pasting each window into a big canvas."""
    rng = np.random.default_rng(seed)
    sink = BlendSink(_REGION, 2)
    num, den = np.zeros((2, 20, 20)), np.zeros((20, 20))
    side = _SIDE
    for y, x in origins:
        p = rng.random((2, side, side)).astype(np.float32)
        win = Window(Box(y, y + side, x, x + side), Box(y, y + side, x, x + side), 0)
        sink.add(win, p)
        canvas_n, canvas_d = np.zeros((2, 60, 60)), np.zeros((60, 60))
        canvas_n[:, y + 20 : y + 20 + side, x + 20 : x + 20 + side] = p * gaussian_weights(side)
        canvas_d[y + 20 : y + 20 + side, x + 20 : x + 20 + side] = gaussian_weights(side)
        num += canvas_n[:, 20:40, 20:40]
        den += canvas_d[20:40, 20:40]
    return sink, num, den


def _axis(start: int, step: int) -> list[int]:
    """Origins from ``start`` every ``step`` until a window reaches the region's end."""
    return list(range(start, 20 - _SIDE + step, step))


@st.composite
def _covering(draw: st.DrawFn) -> list[tuple[int, int]]:
    """A lattice of windows covering the region (steps up to the window's side, starting at or
    before its first pixel) plus random extra windows, in a random order."""
    ys = _axis(draw(st.integers(-8, 0)), draw(st.integers(4, _SIDE)))
    xs = _axis(draw(st.integers(-8, 0)), draw(st.integers(4, _SIDE)))
    extra = draw(st.lists(_origin, max_size=4))
    return draw(st.permutations([(y, x) for y in ys for x in xs] + extra))


@given(origins=_covering(), seed=st.integers(0, 2**16))
def test_blend_sink_is_the_weighted_mean(origins, seed):
    """Every example covers the region, so the weighted mean (and a part of it, cut from the
    region's result) is checked each time; overlaps weigh each window by its Gaussian."""
    sink, num, den = _blend(origins, seed)
    assert (den > 0).all()
    np.testing.assert_allclose(sink.result(), num / den, rtol=1e-5)
    part = Box(5, 15, 3, 20)
    np.testing.assert_allclose(sink.result(part), num[:, 5:15, 3:20] / den[5:15, 3:20], rtol=1e-5)
    np.testing.assert_array_equal(sink.result(part), sink.result()[:, 5:15, 3:20])


@given(origins=st.lists(_origin, min_size=1, max_size=6), seed=st.integers(0, 2**16))
def test_blend_sink_refuses_an_uncovered_region(origins, seed):
    """Random windows seldom cover the region: the sink refuses the whole."""
    sink, _, den = _blend(origins, seed)
    assume(not (den > 0).all())
    with pytest.raises(RuntimeError, match="uncovered"):
        sink.result()


@st.composite
def _covering_a_part(draw: st.DrawFn) -> list[tuple[int, int]]:
    """Windows covering the part rows 5..14, columns 3..19 (two side by side, overlapping or
    touching) and none reaching row 19: the part covered, the region not."""
    y = draw(st.integers(-1, 3))
    left = draw(st.integers(-8, 3))
    right = draw(st.integers(4, left + _SIDE))
    extra = draw(st.lists(st.tuples(st.integers(-8, 3), st.integers(-8, 24)), max_size=3))
    return draw(st.permutations([(y, left), (y, right), *extra]))


@given(origins=_covering_a_part(), seed=st.integers(0, 2**16))
def test_blend_sink_gives_a_covered_part_of_an_uncovered_region(origins, seed):
    """A part all covered is given, the weighted mean there, while the region is refused
    (every example: drawn at random, such a case came up in 0 to 5 of 100)."""
    sink, num, den = _blend(origins, seed)
    assert (den[5:15, 3:20] > 0).all() and not (den > 0).all()
    expected = num[:, 5:15, 3:20] / den[5:15, 3:20]
    np.testing.assert_allclose(sink.result(Box(5, 15, 3, 20)), expected, rtol=1e-5)
    with pytest.raises(RuntimeError, match="uncovered"):
        sink.result()


def test_crop_sink_keeps_each_tile_from_its_own_window():
    region = Box(0, 8, 0, 8)
    sink = CropSink(region, 1)
    # two windows whose outputs overlap on columns 4..5; the later one wins there
    sink.add(Window(Box(0, 8, 0, 6), Box(0, 8, 0, 6), 0), np.full((1, 8, 6), 1.0, np.float32))
    sink.add(Window(Box(0, 8, 4, 10), Box(0, 8, 4, 10), 0), np.full((1, 8, 6), 2.0, np.float32))
    out = sink.result()[0]
    np.testing.assert_array_equal(out[:, :4], 1.0)
    np.testing.assert_array_equal(out[:, 4:], 2.0)


def test_crop_sink_refuses_gaps():
    sink = CropSink(Box(0, 4, 0, 4), 1)
    sink.add(Window(Box(0, 2, 0, 4), Box(0, 2, 0, 4), 0), np.ones((1, 2, 4), np.float32))
    with pytest.raises(RuntimeError, match="uncovered"):
        sink.result()
    np.testing.assert_array_equal(sink.result(Box(0, 2, 1, 4)), 1.0)  # a part all covered
    with pytest.raises(RuntimeError, match="uncovered"):
        sink.result(Box(1, 3, 0, 4))
    with pytest.raises(RuntimeError, match="uncovered"):
        CropSink(Box(0, 4, 0, 4), 1).result()  # no window at all


@pytest.mark.parametrize("computed", [None, np.eye(4, dtype=bool)])
def test_crop_sink_keeps_a_window_over_the_whole_region_without_a_copy(computed):
    region = Box(10, 14, 20, 24)
    output = np.arange(2 * 6 * 6, dtype=np.float32).reshape(2, 6, 6)
    expected = output[:, 1:5, 1:5].copy()
    sink = CropSink(region, 2, computed)
    # a window whose output holds the region and a pixel more on each side
    sink.add(Window(Box(9, 15, 19, 25), Box(9, 15, 19, 25), 0), output)
    sink.add(Window(Box(10, 12, 20, 22), Box(10, 12, 20, 22), 0), np.full((2, 2, 2), -1.0, "f4"))
    result = sink.result()
    assert np.shares_memory(result, output)
    expected[:, :2, :2] = -1.0  # the later window wins where it covers
    if computed is not None:
        expected[:, ~computed] = 0
    np.testing.assert_array_equal(result, expected)


@pytest.mark.parametrize("dtype", ["float64", "read-only float32"])
def test_crop_sink_copies_what_it_cannot_keep_as_float32_it_may_write(dtype):
    output = np.ones((1, 4, 4), np.float64 if dtype == "float64" else np.float32)
    output.flags.writeable = dtype == "float64"
    sink = CropSink(Box(0, 4, 0, 4), 1, np.eye(4, dtype=bool))
    sink.add(Window(Box(0, 4, 0, 4), Box(0, 4, 0, 4), 0), output)
    result = sink.result()
    assert result.dtype == np.float32 and not np.shares_memory(result, output)
    np.testing.assert_array_equal(result[0], np.eye(4))


@given(
    st.integers(0, 60),
    st.sampled_from([1, 2, 4, 8, 16]),
    st.integers(0, 15),
    st.booleans(),
    st.integers(1, 300),
)
def test_blend_window_side_is_the_smallest_the_model_takes(halo, multiple, offset, shrinks, window):
    g = Geometry(halo=halo, multiple=multiple, input_offset=offset, shrinks=shrinks)
    side = blend_window_side(g, window)
    pad = halo if shrinks else 0
    assert window <= side < window + multiple
    assert g.accepts(side + 2 * pad)
    assert all(not g.accepts(w + 2 * pad) for w in range(window, side))
    if shrinks:  # a valid model's window input is the one input_size gives
        assert side + 2 * halo == g.input_size(window)


def test_a_blend_window_off_the_size_rule_is_refused_naming_the_next_one():
    same = Geometry(halo=23, multiple=4)  # the depth-2 same-padding U-Net's and FCN's
    assert blend_window_side(same, 30) == 32
    with pytest.raises(ValueError, match="use 32"):
        blend_lattice((100, 100), same, window=30)


def test_an_overlap_near_one_warns_of_the_work_it_asks_for():
    """--overlap 0.9999 ran windows 8 px apart, each pixel in 1024 windows, without a word."""
    same = Geometry(halo=23, multiple=8)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # 0.875: each pixel in 64 windows, said nothing
        assert blend_lattice((512, 512), same, window=256, overlap=0.875).stride == 32
    with pytest.warns(UserWarning, match=r"8 px apart: each pixel is computed in about 1024 "):
        assert blend_lattice((512, 512), same, window=256, overlap=0.9999).stride == 8


def test_the_overlap_warning_counts_the_windows_the_image_has():
    """A 120x120 image at overlap 0.95 was said to put each pixel in about 289 windows (17
    along each axis); its whole lattice has 64, 8 origins along each axis."""
    valid = Geometry(halo=44, multiple=8, input_offset=4, shrinks=True)  # tissue-unet's
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        small = blend_lattice((120, 120), valid, window=260, overlap=0.95)
    assert (len(small.axis_origins(0)), len(small.axis_origins(1)), small.stride) == (8, 8, 16)
    # A strip as short: 17 windows along x, the 8 along y, 136 in all.
    with pytest.warns(UserWarning, match=r"16 px apart: each pixel is computed in about 136 "):
        blend_lattice((120, 4096), valid, window=260, overlap=0.95)


@pytest.mark.parametrize("rows", [64, 63, 20])
def test_a_same_padding_lattice_starts_at_the_edges_of_a_strip_shorter_than_a_window(rows):
    """A strip shorter than a window along y had a margin, mirrored pixels, on both axes: its
    border columns were 18x MONAI's error against a whole pass. Now one window starts at its
    top edge, and the windows along x stay inside, the last at the edge."""
    same = Geometry(halo=23, multiple=8)
    lattice = blend_lattice((rows, 200), same, window=64, overlap=0.25)
    assert lattice.axis_origins(1) == (0, 48, 96, 136)
    assert lattice.axis_origins(0) == (0,)
    valid = Geometry(halo=23, multiple=8, shrinks=True)  # context past the image anyway
    window = blend_window_side(valid, 64)
    assert blend_lattice((rows, 200), valid, window=window).axis_origins(0)[0] < 0


@pytest.mark.parametrize(
    ("overlap", "stride", "origins"),
    [
        # 256 * 0.9 = 230.4 px: of the multiples of 8 around it, 224 and 232, 232 is nearer
        (0.1, 232, (0, 232, 464, 696, 744)),
        # 256 * 0.8 = 204.8 px: 208 is nearer than 200
        (0.2, 208, (0, 208, 416, 624, 744)),
        (0.25, 192, (0, 192, 384, 576, 744)),  # 192 exactly
    ],
)
def test_the_blend_stride_is_the_nearest_multiple_to_the_unshared_window(overlap, stride, origins):
    """A stride truncated down to the multiple (200 for 204.8) shared more than --overlap."""
    same = Geometry(halo=44, multiple=8)
    lattice = blend_lattice((1000, 1000), same, window=256, overlap=overlap)
    assert lattice.stride == stride
    # Inside the image: every stride from 0, then the last window at the edge, 1000 - 256.
    assert lattice.axis_origins(0) == origins
    assert lattice.axis_origins(1) == origins
