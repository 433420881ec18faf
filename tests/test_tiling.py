import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from segpipe.geometry.blending import blend_lattice, blend_windows
from segpipe.geometry.tiling import (
    Box,
    Geometry,
    exact_side,
    exact_window,
    exact_windows,
    mirror_indices,
    tile_grid,
)

shapes = st.tuples(st.integers(1, 700), st.integers(1, 700))
# Images for properties that hold block by block: a few blocks a side are enough, and a
# grid of 700^2 one-pixel tiles took a minute of CI per test.
small_shapes = st.tuples(st.integers(1, 300), st.integers(1, 300))


def at_least(k: int, multiple: int, least: int) -> int:
    """``k`` times the smallest multiple of ``multiple`` that is at least ``least``."""
    return k * -(-least // multiple) * multiple


geometries = st.builds(
    lambda depth, valid: Geometry(
        halo=6 * 2**depth - 4 if valid else 3 * 2**depth,
        multiple=2**depth,
        input_offset=(-4 * (2**depth - 1)) % 2**depth if valid else 0,
        shrinks=valid,
    ),
    st.integers(0, 4),
    st.booleans(),
)


@given(shape=shapes, tile=st.integers(4, 300))
def test_every_pixel_in_exactly_one_tile(shape, tile):
    grid = tile_grid(shape, tile)
    count = np.zeros(shape, dtype=np.int32)
    for t in grid:
        count[t.box.slices] += 1
        assert t.box.y1 <= shape[0] and t.box.x1 <= shape[1]
    assert (count == 1).all()


@given(shape=shapes, tile=st.integers(3, 200), side=st.integers(1, 5))
def test_blocks_partition_the_grid(shape, tile, side):
    grid = tile_grid(shape, tile)
    seen = [t.index for block in grid.blocks(side) for t in block]
    assert sorted(seen) == sorted(t.index for t in grid)
    assert all(len(b) <= side * side for b in grid.blocks(side))


@given(geometry=geometries, k=st.integers(1, 20), shape=shapes)
@settings(max_examples=200)
def test_exact_windows_cover_their_tile_with_halo(geometry, k, shape):
    tile = at_least(k, geometry.multiple, 4)
    grid = tile_grid(shape, tile)
    sizes = set()
    for t in grid:
        w = exact_window(t, tile, geometry)
        n = w.input.shape[0]
        sizes.add(w.input.shape)
        assert geometry.accepts(n)
        assert w.output.shape == (geometry.output_size(n) - 2 * geometry.crop,) * 2
        # the tile lies inside the usable output, with a full halo around it in the input
        assert w.output.intersect(t.box) == t.box
        assert w.input.y0 == t.box.y0 - geometry.halo
        assert w.input.y1 >= t.box.y1 + geometry.halo
        # window origins keep the pooling phase of a whole-image pass
        assert (w.input.y0 + geometry.halo) % geometry.multiple == 0
    assert len(sizes) == 1, "all windows share one shape, so batches stack"


@given(
    geometry=geometries,
    k=st.integers(1, 6),
    tiles_per_window=st.integers(1, 4),
    task_tiles=st.integers(1, 4),
    shape=small_shapes,
)
@settings(max_examples=200)
def test_windows_larger_than_tiles_cover_each_block_in_phase(
    geometry, k, tiles_per_window, task_tiles, shape
):
    tile = at_least(k, geometry.multiple, 8)
    side = tiles_per_window * tile
    grid = tile_grid(shape, tile)
    for block in grid.blocks(task_tiles):
        region = Box(block[0].box.y0, block[-1].box.y1, block[0].box.x0, block[-1].box.x1)
        covered = np.zeros(region.shape, dtype=int)
        windows = exact_windows(region, side, geometry)
        if region.shape[0] % side == 0 and region.shape[1] % side == 0:
            assert len({w.input.shape for w in windows}) == 1, "whole steps: one shape"
        m = geometry.multiple
        for w in windows:
            # each window's output covers its step, cut at the region's end (rounded up to
            # the multiple), with a full halo on every side and the pooling phase kept
            step = [
                min(side, -(-(end - start) // m) * m)
                for start, end in ((w.output.y0, region.y1), (w.output.x0, region.x1))
            ]
            assert w.input.shape == tuple(geometry.input_size(s) for s in step)
            assert w.input.y0 == w.output.y0 - geometry.halo
            assert w.input.x0 == w.output.x0 - geometry.halo
            assert (w.input.y0 + geometry.halo) % geometry.multiple == 0
            assert w.output.shape[0] >= step[0] and w.output.shape[1] >= step[1]
            part = Box(w.output.y0, w.output.y0 + side, w.output.x0, w.output.x0 + side)
            inside = part.intersect(region)
            assert inside is not None
            covered[inside.relative_to(region)] += 1
        assert (covered == 1).all(), "the windows' steps partition the block"


@given(geometry=geometries, k=st.integers(1, 8), n=st.integers(1, 6), budget=st.integers(1, 10**6))
def test_exact_side_is_the_largest_window_that_fits(geometry, k, n, budget):
    tile = k * geometry.multiple
    region = Box(0, n * tile, 0, max(1, n * tile - 1))
    side = exact_side(region, tile, geometry, budget)
    assert side % tile == 0 and tile <= side <= n * tile
    fits = geometry.input_size(side) ** 2 <= budget
    assert fits or side == tile, "only the one-tile window may exceed the budget"
    if side < n * tile:
        assert geometry.input_size(side + tile) ** 2 > budget, "one tile more would not fit"


def test_exact_windows_refuse_a_region_off_the_pooling_phase():
    g = Geometry(halo=44, multiple=8, input_offset=4, shrinks=True)
    with pytest.raises(ValueError, match="multiple of the model's size multiple 8"):
        exact_windows(Box(4, 20, 0, 16), 16, g)


def test_exact_window_rejects_tile_off_the_multiple():
    g = Geometry(halo=92, multiple=16, input_offset=12, shrinks=True)
    with pytest.raises(ValueError, match="multiple of the model's size multiple 16; use 512"):
        exact_window(tile_grid((600, 600), 500)[0, 0], 500, g)


@pytest.mark.parametrize(
    ("halo", "multiple", "offset", "min_out", "expected"),
    [(92, 16, 12, 388, 572), (92, 16, 12, 1, 188), (0, 1, 0, 7, 7), (10, 8, 0, 5, 32)],
)
def test_input_size(halo, multiple, offset, min_out, expected):
    g = Geometry(halo=halo, multiple=multiple, input_offset=offset, shrinks=True)
    assert g.input_size(min_out) == expected
    assert g.accepts(expected)
    assert g.output_size(expected) >= min_out
    smaller = [n for n in range(1, expected) if g.accepts(n) and n - 2 * halo >= min_out]
    assert smaller == [], "input_size is the smallest that serves min_out"


@pytest.mark.parametrize(
    ("halo", "multiple", "offset"), [(4, 1, 0), (0, 1, 0), (4, 4, 0), (3, 2, 0), (92, 16, 8)]
)
def test_a_valid_padding_model_accepts_only_inputs_with_some_output(halo, multiple, offset):
    """An input of 2 * halo, an empty output, was accepted, and output_size gave 0."""
    g = Geometry(halo=halo, multiple=multiple, input_offset=offset, shrinks=True)
    for n in range(0, 2 * halo + 3 * multiple + 1):
        # By hand: at least one output pixel, n - 2 * halo >= 1, on the size rule.
        expected = n - 2 * halo >= 1 and (n - offset) % multiple == 0
        assert g.accepts(n) == expected, n
        if expected:
            assert g.output_size(n) == n - 2 * halo
        else:
            with pytest.raises(ValueError, match="not accepted"):
                g.output_size(n)
    assert not g.accepts(2 * halo)


@given(
    geometry=geometries,
    shape=shapes,
    k=st.integers(2, 8),
    overlap=st.sampled_from([0.0, 0.25, 0.5]),
    region=st.tuples(
        st.integers(0, 699), st.integers(1, 300), st.integers(0, 699), st.integers(1, 300)
    ),
)
@settings(max_examples=200)
def test_blend_windows_cover_region_and_match_global_lattice(geometry, shape, k, overlap, region):
    window = at_least(k, geometry.multiple, 8)
    pad = geometry.halo if geometry.shrinks else 0
    if not geometry.accepts(window + 2 * pad):
        window = geometry.input_size(window) - 2 * pad
    lattice = blend_lattice(shape, geometry, window=window, overlap=overlap)
    y0, h, x0, w = region
    y0, x0 = min(y0, shape[0] - 1), min(x0, shape[1] - 1)
    box = Box(y0, min(y0 + h, shape[0]), x0, min(x0 + w, shape[1]))
    wins = blend_windows(lattice, box)
    covered = np.zeros(box.shape, dtype=bool)
    for win in wins:
        part = win.output.intersect(box)
        assert part is not None, "only windows that touch the region"
        covered[part.relative_to(box)] = True
        assert geometry.accepts(win.input.shape[0])
        on_lattice = (win.output.y0 + lattice.axis_margin(0)) % lattice.stride == 0
        assert on_lattice or win.output.y0 == lattice.axis_origins(0)[-1]
        assert win.output.y0 % geometry.multiple == 0
        if lattice.inside:  # same padding: windows inside the image, as in a whole-image pass
            past = max(geometry.multiple, window - shape[0] + geometry.multiple)
            assert win.input.y0 >= 0 and win.input.y1 <= shape[0] + past
    assert covered.all()
    # the windows over a region are those of the whole image that touch it: tasks agree
    everything = blend_windows(lattice, Box(0, shape[0], 0, shape[1]))
    touching = [w for w in everything if w.output.intersect(box) is not None]
    assert touching == wins


@given(start=st.integers(-50, 50), length=st.integers(1, 60), size=st.integers(1, 20))
def test_mirror_indices_match_numpy_reflect(start, length, size):
    a = np.arange(size)
    far = 200
    padded = np.pad(a, far, mode="reflect") if size > 1 else np.zeros(size + 2 * far, int)
    expected = padded[start + far : start + far + length]
    np.testing.assert_array_equal(a[mirror_indices(start, start + length, size)], expected)


def test_box_rejects_empty():
    with pytest.raises(ValueError, match="empty box"):
        Box(3, 3, 0, 1)
