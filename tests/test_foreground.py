"""Foreground masks: tissue detection, which tiles a mask selects, and segment() computing
exactly those tiles, the others reading as class 0 with the mask stored beside the result."""

import hashlib
import itertools
import json
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import zarr
from hypothesis import given
from hypothesis import strategies as st
from PIL import Image

import segpipe
from segpipe import models
from segpipe.analysis.summary import summarise
from segpipe.execution.foreground import (
    FOREGROUND_LABEL,
    compute_foreground,
    low_resolution,
    read_mask_file,
    resolve_foreground,
    valid_low_resolution,
)
from segpipe.geometry.foreground import (
    MaskPatch,
    cover_boxes,
    foreground_pixels,
    mask_rows,
    pool_mask,
    tiles_touching,
    upsample_mask,
)
from segpipe.geometry.pixels import downsample_mean_2x
from segpipe.geometry.tiling import Box, tile_grid
from segpipe.geometry.tissue import clean_mask, otsu_threshold, saturation, tissue_mask
from segpipe.io import maskfiles
from segpipe.io.readers import ArrayReader
from segpipe.results import (
    ResultMismatchError,
    read_attrs,
    read_meta,
    result_levels,
    tiles_done,
)
from segpipe.results.schema import label_path
from segpipe.synthetic import tissue_slide

CLASSES = ("background", "tissue", "nucleus")


# -- pure geometry -------------------------------------------------------------------------


def nearest_reference(mask: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    """The level's pixels of ``mask`` by the rule written out with floats: level pixel y
    lies in mask row floor(y * my / ny)."""
    my, mx = mask.shape
    iy = np.floor(np.arange(shape[0]) * (my / shape[0]) + 1e-9).astype(int)
    ix = np.floor(np.arange(shape[1]) * (mx / shape[1]) + 1e-9).astype(int)
    return mask[iy][:, ix]


masks = st.tuples(st.integers(1, 12), st.integers(1, 12), st.integers(0, 2**31 - 1)).map(
    lambda a: np.random.default_rng(a[2]).random((a[0], a[1])) < 0.2
)


@given(mask=masks, ny=st.integers(1, 90), nx=st.integers(1, 90), tile=st.integers(1, 40))
def test_tiles_touching_are_the_tiles_holding_upsampled_foreground(mask, ny, nx, tile):
    full = nearest_reference(mask, (ny, nx))
    np.testing.assert_array_equal(upsample_mask(mask, (ny, nx)), full)
    expected = np.array(
        [
            [full[y : y + tile, x : x + tile].any() for x in range(0, nx, tile)]
            for y in range(0, ny, tile)
        ]
    )
    np.testing.assert_array_equal(tiles_touching(mask, (ny, nx), tile), expected)
    assert foreground_pixels(mask, (ny, nx)) == int(full.sum())


@given(
    mask=masks,
    ny=st.integers(1, 90),
    nx=st.integers(1, 90),
    cut=st.tuples(*[st.floats(0, 1)] * 8),
)
def test_a_mask_patch_gives_its_box_as_the_whole_mask_does(mask, ny, nx, cut):
    """A task's patch of the mask (its box's cells only) upsamples any box within to the
    pixels the whole mask gives there, and refuses a box beyond it."""

    def within(y0, y1, x0, x1, a, b, c, d):
        ys = sorted((y0 + round(a * (y1 - y0 - 1)), y0 + 1 + round(b * (y1 - y0 - 1))))
        xs = sorted((x0 + round(c * (x1 - x0 - 1)), x0 + 1 + round(d * (x1 - x0 - 1))))
        return Box(ys[0], max(ys[1], ys[0] + 1), xs[0], max(xs[1], xs[0] + 1))

    box = within(0, ny, 0, nx, *cut[:4])
    patch = MaskPatch.of(mask, (ny, nx), box)
    rows, cols = mask_rows(ny, mask.shape[0])[box.y0 : box.y1], mask_rows(nx, mask.shape[1])
    cols = cols[box.x0 : box.x1]
    assert patch.cells.shape == (rows[-1] - rows[0] + 1, cols[-1] - cols[0] + 1), "only its cells"
    inner = within(box.y0, box.y1, box.x0, box.x1, *cut[4:])
    np.testing.assert_array_equal(
        patch.pixels(inner), upsample_mask(mask, (ny, nx), (inner.y0, inner.y1, inner.x0, inner.x1))
    )
    rows = mask_rows(ny, mask.shape[0]) - patch.origin[0]
    if rows.min() < 0 or rows.max() >= patch.cells.shape[0]:  # rows of the level beyond it
        outside = Box(0, ny, box.x0, box.x1)
        with pytest.raises(ValueError, match="outside the mask patch"):
            patch.pixels(outside)


@given(
    seed=st.integers(0, 2**31 - 1),
    ny=st.integers(1, 60),
    nx=st.integers(1, 60),
    my=st.integers(1, 12),
    mx=st.integers(1, 12),
    cuts=st.lists(st.floats(0, 1), max_size=3),
)
def test_pool_mask_ors_each_pixel_into_the_cell_that_reads_it_back(seed, ny, nx, my, mx, cuts):
    """Pooled in strips cut anywhere (a cell's rows split between two), each cell is the OR
    of the level pixels nearest-neighbour upsampling gives it: no foreground pixel is lost."""
    level = np.random.default_rng(seed).random((ny, nx)) < 0.05
    rows, cols = mask_rows(ny, my), mask_rows(nx, mx)
    expected = np.array(
        [[level[rows == i][:, cols == j].any() for j in range(mx)] for i in range(my)]
    )
    edges = sorted({0, ny, *(round(c * ny) for c in cuts)})
    pooled = np.zeros((my, mx), bool)
    for y0, y1 in itertools.pairwise(edges):
        if y1 > y0:
            pool_mask(pooled, level[y0:y1], (ny, nx), y0)
    np.testing.assert_array_equal(pooled, expected)
    assert upsample_mask(pooled, (ny, nx))[level].all()


@given(
    seed=st.integers(0, 2**31 - 1),
    grid=st.tuples(st.integers(1, 40), st.integers(1, 40)),
    level=st.tuples(st.integers(1, 40), st.integers(1, 40)),
    cells=st.tuples(st.integers(1, 9), st.integers(1, 9)),
)
def test_a_grid_of_another_size_pooled_over_a_level_keeps_what_its_pixels_show(
    seed, grid, level, cells
):
    """A mask file's grid (finer or coarser than the level, stretched over it): each level
    pixel showing a foreground index (``i * s // n``) reads back foreground, and each
    foreground index of a finer grid reaches the cell of the first pixel it overlaps. A
    level-0 mask over level 1 (301 columns over 150) left column 200 out of column 100."""
    (gy, gx), (ly, lx), (my, mx) = grid, level, cells
    g = np.random.default_rng(seed).random((gy, gx)) < 0.1
    pooled = pool_mask(np.zeros((my, mx), bool), g, (gy, gx), 0, level=(ly, lx))
    back = upsample_mask(pooled, (ly, lx)).astype(bool)
    shown = g[np.ix_(np.arange(ly) * gy // ly, np.arange(lx) * gx // lx)]
    assert back[shown].all()
    for y, x in zip(*np.nonzero(g), strict=True):
        py, px = (y * ly // gy if gy > ly else None), (x * lx // gx if gx > lx else None)
        if py is not None and px is not None:
            assert pooled[py * my // ly, px * mx // lx]
    column = np.zeros((1, 301), bool)
    column[0, 200] = True
    assert pool_mask(np.zeros((1, 150), bool), column, (1, 301), level=(1, 150))[0, 100]


def window_cost(boxes, halo):
    return sum((b.shape[0] + 2 * halo) * (b.shape[1] + 2 * halo) for b in boxes)


@given(
    cells=masks,
    cell=st.sampled_from([4, 8, 16]),
    cut=st.tuples(st.integers(0, 3), st.integers(0, 3)),
    halo=st.integers(0, 40),
)
def test_cover_boxes_hold_every_foreground_cell_tightly_and_cheaply(cells, cell, cut, halo):
    cy, cx = cells.shape
    # The region's last cells may be cut by its end (an image's edge).
    region = Box(cell * 2, cell * (2 + cy) - cut[0], cell * 3, cell * (3 + cx) - cut[1])
    boxes = cover_boxes(cells, cell, region, halo=halo)
    fg = np.kron(cells, np.ones((cell, cell), bool))[: region.shape[0], : region.shape[1]]
    covered = np.zeros(region.shape, int)
    for b in boxes:
        assert b.intersect(region) == b, "inside the region"
        assert (b.y0 - region.y0) % cell == 0 and (b.x0 - region.x0) % cell == 0
        assert (b.y1 - region.y0) % cell == 0 or b.y1 == region.y1
        assert (b.x1 - region.x0) % cell == 0 or b.x1 == region.x1
        r0, r1 = (b.y0 - region.y0) // cell, -(-(b.y1 - region.y0) // cell)
        c0, c1 = (b.x0 - region.x0) // cell, -(-(b.x1 - region.x0) // cell)
        sub = cells[r0:r1, c0:c1]
        assert sub[0].any() and sub[-1].any() and sub[:, 0].any() and sub[:, -1].any(), "tight"
        covered[b.relative_to(region)] += 1
    assert (covered <= 1).all(), "boxes are disjoint"
    assert covered[fg].all(), "every foreground pixel is in a box"
    assert bool(boxes) == bool(cells.any())
    if cells.any():
        ys, xs = np.nonzero(fg)
        # the bounding box of the foreground, out to whole cells
        y0, y1 = ys.min() // cell * cell, min(-(-(ys.max() + 1) // cell) * cell, region.shape[0])
        x0, x1 = xs.min() // cell * cell, min(-(-(xs.max() + 1) // cell) * cell, region.shape[1])
        whole = Box(y0 + region.y0, y1 + region.y0, x0 + region.x0, x1 + region.x0)
        assert window_cost(boxes, halo) <= window_cost([whole], halo)
        if len(boxes) > 1:
            assert window_cost(boxes, halo) < window_cost([whole], halo), "split only to gain"


def test_cover_boxes_split_far_apart_foreground_only_when_the_halo_is_small():
    cells = np.zeros((8, 8), bool)
    cells[0, 0] = cells[7, 7] = True
    region = Box(0, 64, 0, 64)
    assert cover_boxes(cells, 8, region, halo=4) == [Box(0, 8, 0, 8), Box(56, 64, 56, 64)]
    assert cover_boxes(cells, 8, region, halo=200) == [region]


def test_cover_boxes_cut_where_the_foreground_parts_not_at_the_middle():
    # A strip along the top and a blob at the bottom left: one cut under the strip gives two
    # tight boxes; quarters would cut the strip in two and pay a third window.
    cells = np.zeros((8, 8), bool)
    cells[0, :] = True
    cells[5:, :2] = True
    boxes = cover_boxes(cells, 8, Box(0, 64, 0, 64), halo=4)
    assert boxes == [Box(0, 8, 0, 64), Box(40, 64, 0, 16)]


def test_clean_mask_fills_holes_removes_dust_and_grows():
    m = np.zeros((20, 20), bool)
    m[2:12, 2:12] = True
    m[5:7, 5:7] = False  # a 4 px hole
    m[16, 16] = True  # a 1 px speck
    out = clean_mask(m, min_object_px=2, max_hole_px=4)
    expected = np.zeros_like(m)
    expected[2:12, 2:12] = True
    np.testing.assert_array_equal(out, expected)
    assert not clean_mask(m, max_hole_px=3)[5, 5]  # a larger hole stays
    grown = clean_mask(expected, grow_px=2)
    np.testing.assert_array_equal(grown[0:14, 0:14], True)
    assert grown.sum() == 14 * 14


@pytest.mark.parametrize("min_object_px", [15, 16, 17])
def test_clean_mask_keeps_an_object_of_exactly_min_object_px(min_object_px):
    """Objects of exactly min_object_px pixels were removed as dust, not only smaller ones."""
    m = np.zeros((32, 32), bool)
    m[2:6, 2:6] = True  # 16 px
    m[20:23, 20:25] = True  # 15 px
    m[10:13, 25:31] = True  # 18 px
    expected = np.zeros_like(m)
    for box, size in (((slice(2, 6), slice(2, 6)), 16), ((slice(20, 23), slice(20, 25)), 15)):
        expected[box] = size >= min_object_px
    expected[10:13, 25:31] = True
    np.testing.assert_array_equal(clean_mask(m, min_object_px=min_object_px), expected)


@pytest.mark.parametrize(("rows", "cols", "found"), [(4, 4, 16), (3, 5, 0)])
def test_tissue_mask_keeps_a_piece_of_exactly_min_object_px(rows, cols, found):
    """Tissue of exactly min_object_px (16 px, the default) was dropped as dust, like 15 px."""
    rgb = np.full((64, 64, 3), 245, np.uint8)  # glass
    rgb[20 : 20 + rows, 20 : 20 + cols] = (230, 120, 200)  # stained
    assert tissue_mask(rgb, grow_px=0).sum() == found


@pytest.mark.parametrize("gap", [0.3, 0.6])
def test_otsu_splits_two_modes(gap):
    rng = np.random.default_rng(0)
    values = np.concatenate([rng.normal(0.1, 0.02, 500), rng.normal(0.1 + gap, 0.02, 300)])
    t = otsu_threshold(values)
    assert 0.1 + 0.06 < t < 0.1 + gap - 0.06
    # Brute force: the cut of largest between-class variance over the sorted values.
    v = np.sort(values)
    scores = [i * (v.size - i) * (v[:i].mean() - v[i:].mean()) ** 2 for i in range(1, v.size)]
    best = int(np.argmax(scores)) + 1
    assert v[best - 1] <= t < v[best]


def between_class(values, upper):
    a, b = values[~upper], values[upper]
    return 0.0 if not a.size or not b.size else a.size * b.size * (a.mean() - b.mean()) ** 2


@given(
    counts=st.lists(st.integers(0, 6), min_size=2, max_size=16),
    start=st.integers(0, 240),
    dtype=st.sampled_from([np.float32, np.float64]),
)
def test_otsus_cut_applied_as_greater_than_is_the_split_it_scored(counts, start, dtype):
    """Values on the 1/256 grid of uint8 saturations fall on histogram edges: the cut was an
    edge, whose values the histogram scored in the upper class and ``> cut`` left in the lower
    (0.48828125 ten times below its split, between-class 1.46 against 6.71)."""
    grid = (start + np.arange(len(counts))) / 256
    values = np.concatenate([[0.0, 1.0], np.repeat(grid, counts)]).astype(dtype)
    t = otsu_threshold(values)
    assert not (values == t).any()
    assert between_class(values, values > t) >= between_class(values, values >= t)
    known = np.repeat(np.array([0, 125, 127, 130, 131, 256]) / 256, [1, 10, 5, 4, 5, 1])
    t = otsu_threshold(known.astype(dtype))
    assert 0 < t < 125 / 256  # {0} against the rest, as the histogram scored it


def test_saturation_is_hsv_saturation():
    import colorsys

    rgb = np.random.default_rng(1).integers(0, 256, (5, 7, 3), dtype=np.uint8)
    expected = [[colorsys.rgb_to_hsv(*(px / 255.0))[1] for px in row] for row in rgb]
    np.testing.assert_allclose(saturation(rgb), expected, atol=1e-6)


@pytest.mark.parametrize("fraction", [0.3, 1.0])
def test_tissue_mask_finds_the_synthetic_slides_tissue(fraction):
    slide = tissue_slide(512, seed=2, tissue_fraction=fraction)
    truth = slide.labels > 0
    assert abs(truth.mean() - fraction) < 0.02
    small = downsample_mean_2x(slide.image.astype(np.float32))
    found = tissue_mask(small, grow_px=0)
    truth_small = truth.reshape(256, 2, 256, 2).mean(axis=(1, 3)) >= 0.5
    dice = 2 * (found & truth_small).sum() / (found.sum() + truth_small.sum())
    assert dice > 0.95
    glass = tissue_slide(64, seed=2, tissue_region=np.zeros((1, 1), bool))
    assert (glass.labels == 0).all()
    assert not tissue_mask(glass.image).any()


def test_tissue_region_confines_tissue_and_nuclei():
    region = np.zeros((4, 4), bool)
    region[1, 2] = True
    slide = tissue_slide(128, seed=0, tissue_fraction=1.0, tissue_region=region)
    inside = np.zeros((128, 128), bool)
    inside[32:64, 64:96] = True
    assert (slide.labels[~inside] == 0).all() and (slide.instances[~inside] == 0).all()
    assert (slide.labels[inside] > 0).all()
    np.testing.assert_array_equal(slide.labels == 2, slide.instances > 0)


@pytest.mark.parametrize("bad", [0.0, 1.5, -0.2])
def test_bad_tissue_fraction_is_refused(bad):
    with pytest.raises(ValueError, match="tissue_fraction"):
        tissue_slide(32, tissue_fraction=bad)


# -- segment() with a foreground mask --------------------------------------------------------


def tiny_unet(padding="valid"):
    torch.manual_seed(0)
    net = models.build("unet", class_names=CLASSES, width=4, depth=2, padding=padding)
    return net.eval()


TILE, SIDE, BLOCK = 64, 512, 2
# Tiles (iy, ix) that hold tissue; each one's tissue is inset from its edges, so that no
# neighbour holds any.
TISSUE_TILES = [(0, 0), (1, 1), (2, 5), (3, 4), (5, 2), (6, 6), (6, 7), (7, 0)]


@pytest.fixture(scope="module")
def known_slide():
    region = np.zeros((SIDE, SIDE), bool)
    inset = 12
    for iy, ix in TISSUE_TILES:
        y, x = iy * TILE, ix * TILE
        region[y + inset : y + TILE - inset, x + inset : x + TILE - inset] = True
    return tissue_slide(SIDE, seed=3, tissue_fraction=1.0, tissue_region=region)


def expected_computed(labels: np.ndarray) -> np.ndarray:
    """From the truth alone: the tiles holding tissue. (Cells are tiles at this size, and no
    two tiles of a block here are cheaper as one box but for (6, 6) and (6, 7), side by side.)"""
    return per_tile(labels > 0).any(axis=(2, 3))


def run(slide, out, mode="exact", **settings):
    extra = {"window": 32, "overlap": 0.25} if mode == "blend" else {}
    return segpipe.segment(
        ArrayReader(slide.image, pixel_size_um=slide.pixel_size_um),
        out,
        tiny_unet("same" if mode == "blend" else "valid"),
        tile=TILE,
        task_tiles=BLOCK,
        mode=mode,
        level=0,
        scheduler="sync",
        probability_dtype="float32",
        **extra,
        **settings,
    )


def per_tile(values: np.ndarray) -> np.ndarray:
    n = SIDE // TILE
    return values.reshape(n, TILE, n, TILE).transpose(0, 2, 1, 3)


@pytest.mark.parametrize("mode", ["exact", "blend"])
def test_a_slide_with_known_tissue_computes_exactly_its_tiles(known_slide, tmp_path, mode):
    expected = expected_computed(known_slide.labels)
    assert 0 < expected.sum() < expected.size / 2

    on = run(known_slide, tmp_path / "on.zarr", mode)
    off = run(known_slide, tmp_path / "off.zarr", mode, foreground="none")
    meta = read_meta(on)
    assert meta.config.foreground == "tissue"  # "auto" on an RGB image with a pixel size
    s = meta.summary
    assert (s.tiles_computed, s.tiles_background) == (expected.sum(), (~expected).sum())
    assert s.tiles_total == expected.size and s.tiles_skipped == 0
    assert s.windows > 0

    ds_on, ds_off = segpipe.open_result(on), segpipe.open_result(off)
    p_on, p_off = ds_on["probabilities"].values, ds_off["probabilities"].values
    computed = per_tile(p_on.sum(axis=0)).mean(axis=(2, 3)) > 0.5
    np.testing.assert_array_equal(computed, expected)
    # Computed tiles are what a run without a mask computes; the others are class 0, p = 0.
    where = np.kron(expected, np.ones((TILE, TILE), bool))
    np.testing.assert_allclose(p_on[:, where], p_off[:, where], rtol=0, atol=1e-6)
    assert (p_on[:, ~where] == 0).all()
    mask_on = ds_on["mask"].values
    np.testing.assert_array_equal(mask_on[where], ds_off["mask"].values[where])
    assert (mask_on[~where] == 0).all()
    np.testing.assert_array_equal(s.class_pixels, np.bincount(mask_on.ravel(), minlength=3))

    # The mask is stored as a label image: 1 on the truth's tissue, 0 on skipped tiles.
    fg = zarr.open_group(on, mode="r")[label_path(FOREGROUND_LABEL, 0, layout=meta.layout)][...]
    tissue = known_slide.labels > 0
    assert fg[tissue].mean() > 0.97
    assert (fg[~where] == 0).all()
    assert s.foreground_pixels == int(fg.sum())
    assert read_meta(off).summary.foreground_pixels is None
    if mode == "exact":  # a valid OME label image with the mask's pyramid levels
        from ome_zarr_models.v05.image_label import ImageLabel

        group = zarr.open_group(on, mode="r")
        label = ImageLabel.from_zarr(group[label_path(FOREGROUND_LABEL)])
        assert len(label.ome_attributes.multiscales[0].datasets) == len(result_levels(on))
        assert group["labels"].attrs["ome"]["labels"] == ["mask", FOREGROUND_LABEL]
        level1 = group[label_path(FOREGROUND_LABEL, 1, layout=meta.layout)][...]
        assert level1.shape == (SIDE // 2, SIDE // 2) and 0 < level1.mean() < 0.5
    summary = summarise(on)
    assert summary.tiles_background == (~expected).sum()
    assert summary.foreground_area_um2 == pytest.approx(fg.sum() * 0.5**2)
    assert summary.foreground_fraction == pytest.approx(fg.mean())
    assert summarise(off).foreground_pixels is None


def test_a_mostly_glass_slide_computes_boxes_around_its_tissue(tmp_path, monkeypatch):
    """Cells of 16 px (4 a tile side): each block computes boxes of them around its tissue,
    exactly as a run without a mask there, and nothing else."""
    import segpipe.execution.foreground as fg

    monkeypatch.setattr(fg, "MIN_CELL", 16)
    slide = tissue_slide(SIDE, seed=4, tissue_fraction=0.3)
    on = run(slide, tmp_path / "on.zarr")
    off = run(slide, tmp_path / "off.zarr", foreground="none")
    p_on = segpipe.open_result(on)["probabilities"].values
    p_off = segpipe.open_result(off)["probabilities"].values
    computed = p_on.sum(axis=0) > 0.5
    tissue = slide.labels > 0
    assert computed[tissue].mean() > 0.999
    np.testing.assert_allclose(p_on[:, computed], p_off[:, computed], rtol=0, atol=1e-6)
    assert (p_on[:, ~computed] == 0).all()
    # Boxes are unions of 16 px cells and hold no cell far from tissue.
    cells = computed.reshape(SIDE // 16, 16, SIDE // 16, 16)
    assert np.isin(cells.mean(axis=(1, 3)), [0.0, 1.0]).all()
    s = read_meta(on).summary
    tiles = per_tile(computed).any(axis=(2, 3))
    assert s.tiles_computed == tiles.sum()
    # Sub-tile boxes leave glass out of computed tiles: fewer pixels than their tiles hold.
    assert computed.mean() < tiles.mean() - 0.05
    assert computed.mean() < 0.6
    # A box may span glass between tissue where one window is cheaper than two, but every
    # box holds tissue: no computed 16 px cell is farther than a block from it.
    from scipy import ndimage

    far = ~ndimage.binary_dilation(tissue, iterations=BLOCK * TILE + 24)
    assert not (computed & far).any()


def test_a_block_of_some_computed_tiles_is_written_as_whole_shards_unless_resumed(
    known_slide, tmp_path, monkeypatch
):
    """A fresh run writes a block whose tissue is in some of its tiles as its whole shard
    (the others 0, the fill value) through segpipe's encoder, never Zarr's partial writes; a
    resumed run writes only its tiles, so what an earlier run stored beside them stays."""
    from segpipe.results import shards

    written, partial = [], []
    shard_write = shards.shard_write

    def spy(array, selection, values, cache):
        out = shard_write(array, selection, values, cache)
        (written if out is not None else partial).append(array.path)
        return out

    monkeypatch.setattr(shards, "shard_write", spy)
    fresh = run(known_slide, tmp_path / "fresh.zarr")
    assert written and not partial, partial[:3]
    # Tile (7, 0) is the only tissue of its block (tiles 6-7, 0-1): stop after the first
    # block is recorded, plant a value in tile (6, 0), left out, then resume.
    calls = []

    def stop(done, total):
        calls.append(done)
        raise KeyboardInterrupt

    out = tmp_path / "resumed.zarr"
    with pytest.raises(KeyboardInterrupt):
        run(known_slide, out, on_progress=stop)
    assert not tiles_done(out)[7, 0]
    mask = zarr.open_group(out, mode="r+")["0/mask"]
    mask[6 * TILE : 7 * TILE, 0:TILE] = 2
    written.clear()
    run(known_slide, out)
    assert partial, "a resumed run writes its tiles only"
    stored = segpipe.open_result(out)["mask"].values
    assert (stored[6 * TILE : 7 * TILE, 0:TILE] == 2).all(), "an earlier run's tile was lost"
    expected = segpipe.open_result(fresh)["mask"].values
    np.testing.assert_array_equal(stored[7 * TILE :, :TILE], expected[7 * TILE :, :TILE])


def test_tiles_already_done_keep_their_counts_when_the_selection_leaves_them_out(
    known_slide, tmp_path
):
    """A result begun by an older release, which chose other tiles: what it computed keeps
    its record; only tiles not yet done are recorded as class 0."""
    from segpipe.execution.foreground import select_tiles
    from segpipe.results.layout import COUNTS

    out = run(known_slide, tmp_path / "r.zarr")
    counts = zarr.open_array(out, path=COUNTS, mode="r")
    before = counts[0, 0].copy()
    assert before[1:].sum() > 0, "tile (0, 0) holds tissue"
    small = np.zeros((64, 64), np.uint8)
    small[8:16, 40:48] = 255  # only tile (1, 5)
    mask = tmp_path / "mask.png"
    Image.fromarray(small).save(mask)
    reader = ArrayReader(known_slide.image, pixel_size_um=known_slide.pixel_size_um)
    grid = tile_grid((SIDE, SIDE), TILE)
    common = dict(task_tiles=BLOCK, num_classes=3, geometry=tiny_unet().geometry)
    done = np.ones(grid.grid_shape, bool)
    foreground = compute_foreground(reader, 0, str(mask))
    select_tiles(grid, out, foreground, done=done, **common)
    np.testing.assert_array_equal(counts[0, 0], before)
    select_tiles(grid, out, foreground, **common)  # nothing done: all recorded
    np.testing.assert_array_equal(counts[0, 0], [TILE * TILE, 0, 0])


def test_left_out_edge_tiles_count_their_own_pixels_as_background(tmp_path):
    """100 x 70 px in tiles of 32: the edge tiles are 4 px high or 6 px wide. Tiles the mask
    leaves out are recorded as class 0 by their own h x w pixels, so the class pixels are the
    stored mask's, summing to the image's."""
    image = np.random.default_rng(0).integers(0, 256, (100, 70, 3), dtype=np.uint8)
    marked = np.zeros((100, 70), np.uint8)
    marked[:20, :20] = 255  # tile (0, 0) only
    Image.fromarray(marked).save(tmp_path / "mask.png")
    out = segpipe.segment(
        ArrayReader(image), tmp_path / "r.zarr", tiny_unet(), tile=32, scheduler="sync",
        foreground=str(tmp_path / "mask.png"),
    )  # fmt: skip
    s = read_meta(out).summary
    assert (s.tiles_computed, s.tiles_background) == (1, 4 * 3 - 1)
    stored = segpipe.open_result(out)["mask"].values
    np.testing.assert_array_equal(s.class_pixels, np.bincount(stored.ravel(), minlength=3))
    assert sum(s.class_pixels) == 100 * 70


def test_a_selection_for_a_result_another_run_replaced_writes_nothing_there(known_slide, tmp_path):
    """The run's stamp is not the result's (another run replaced it): neither the background
    record nor the foreground label image is written into the other run's result."""
    from segpipe.execution.foreground import select_tiles
    from segpipe.results import ResultReplacedError

    out = run(known_slide, tmp_path / "r.zarr")
    before = {f: f.read_bytes() for f in sorted(out.rglob("*")) if f.is_file()}
    small = np.zeros((64, 64), np.uint8)
    small[8:16, 40:48] = 255
    mask = tmp_path / "mask.png"
    Image.fromarray(small).save(mask)
    reader = ArrayReader(known_slide.image, pixel_size_um=known_slide.pixel_size_um)
    grid = tile_grid((SIDE, SIDE), TILE)
    common = dict(task_tiles=BLOCK, num_classes=3, geometry=tiny_unet().geometry)
    for done in (np.ones(grid.grid_shape, bool), None):  # nothing to record; the background
        with pytest.raises(ResultReplacedError, match="replaced by another run"):
            select_tiles(
                grid,
                out,
                compute_foreground(reader, 0, str(mask)),
                done=done,
                started="another run's",
                **common,
            )
    assert {f: f.read_bytes() for f in sorted(out.rglob("*")) if f.is_file()} == before


@pytest.mark.parametrize("kind", ["png", "geojson"])
def test_a_user_mask_file_selects_its_tiles(known_slide, tmp_path, kind):
    if kind == "png":
        small = np.zeros((64, 64), np.uint8)
        small[8:16, 40:48] = 255  # level pixels 64..128 x 320..384: tile (1, 5)
        path = tmp_path / "mask.png"
        Image.fromarray(small).save(path)
    else:
        ring = [[330, 70], [370, 70], [370, 120], [330, 120], [330, 70]]  # x, y: tile (1, 5)
        feature = {"type": "Feature", "geometry": {"type": "Polygon", "coordinates": [ring]}}
        path = tmp_path / "mask.geojson"
        path.write_text(json.dumps({"type": "FeatureCollection", "features": [feature]}))
    out = run(known_slide, tmp_path / "r.zarr", foreground=str(path))
    s = read_meta(out).summary
    assert (s.tiles_computed, s.tiles_background) == (1, 63)
    p = segpipe.open_result(out)["probabilities"].values
    computed = per_tile(p.sum(axis=0)).mean(axis=(2, 3)) > 0.5
    assert computed[1, 5] and computed.sum() == 1


@pytest.mark.parametrize("mode", ["exact", "blend"])
def test_scattered_foreground_is_read_without_the_glass_between(
    known_slide, tmp_path, monkeypatch, mode
):
    """Two corner tiles of one task: blend mode read the bounds of all the task's windows,
    the whole image between them ("the other tiles are never read")."""
    from segpipe.execution import stitching

    small = np.zeros((64, 64), np.uint8)
    small[1:7, 1:7] = small[57:63, 57:63] = 255  # tiles (0, 0) and (7, 7)
    Image.fromarray(small).save(tmp_path / "corners.png")
    reader = ArrayReader(known_slide.image, pixel_size_um=known_slide.pixel_size_um)
    read, pixels = stitching.read_mirrored, []

    def spied(reader, box, level=0):
        pixels.append(box.shape[0] * box.shape[1])
        return read(reader, box, level)

    monkeypatch.setattr(stitching, "read_mirrored", spied)
    extra = {"window": 32, "overlap": 0.25} if mode == "blend" else {}
    out = segpipe.segment(
        reader, tmp_path / "r.zarr", tiny_unet("same" if mode == "blend" else "valid"),
        tile=TILE, task_tiles=BLOCK, mode=mode, scheduler="sync", probability_dtype="float32",
        foreground=str(tmp_path / "corners.png"), **extra,
    )  # fmt: skip
    assert read_meta(out).summary.tiles_computed == 2
    assert sum(pixels) < 0.1 * SIDE * SIDE, f"read {sum(pixels)} px of {SIDE * SIDE}"
    whole = run(known_slide, tmp_path / "whole.zarr", mode, foreground="none")
    p, q = (segpipe.open_result(r)["probabilities"].values for r in (out, whole))
    for sl in (np.s_[:, :TILE, :TILE], np.s_[:, -TILE:, -TILE:]):
        np.testing.assert_allclose(p[sl], q[sl], rtol=0, atol=1e-5)


def test_auto_means_tissue_for_slides_only(tmp_path):
    rgb = np.zeros((32, 32, 3), np.uint8)
    assert resolve_foreground("auto", ArrayReader(rgb, pixel_size_um=0.5)) == "tissue"
    assert resolve_foreground("auto", ArrayReader(rgb)) == "none"  # no microns: not a slide
    assert resolve_foreground("auto", ArrayReader(rgb[..., :1], pixel_size_um=0.5)) == "none"
    assert resolve_foreground("none", ArrayReader(rgb, pixel_size_um=0.5)) == "none"
    with pytest.raises(FileNotFoundError, match=r"missing\.png"):
        resolve_foreground(str(tmp_path / "missing.png"), ArrayReader(rgb))
    # A file:// URL names the local file (it was refused as missing)
    spaced = tmp_path / "a mask.png"
    Image.fromarray(np.full((8, 8), 255, np.uint8)).save(spaced)
    assert resolve_foreground(spaced.as_uri(), ArrayReader(rgb)) == str(spaced)
    # the archive hashes the setting as given (it failed: 'file:/tmp/.../a%20mask.png')
    from segpipe.io.maskfiles import mask_file_sha256

    assert mask_file_sha256(spaced.as_uri()) == mask_file_sha256(spaced)


def test_tissue_leaves_out_pixels_its_alpha_marks_transparent(tmp_path):
    """Unassociated alpha keeps the colour under a transparent region: it was taken for
    tissue (153,600 of 153,600 px), while the reader says none of it is valid."""
    import tifffile

    from segpipe.geometry.foreground import upsample_mask
    from segpipe.io.readers import open_image

    img = np.full((512, 768, 4), 240, np.uint8)
    img[..., 3] = 255
    img[100:200, 500:700, :3] = (230, 120, 200)  # tissue, opaque
    img[:, :300, :3], img[:, :300, 3] = (200, 60, 160), 0  # stained colour, transparent
    path = tmp_path / "rgba.tif"
    tifffile.imwrite(path, img, photometric="rgb", extrasamples=["unassalpha"],
                     resolution=(20000, 20000), resolutionunit="CENTIMETER")  # fmt: skip
    reader = open_image(path)
    assert resolve_foreground("auto", reader) == "tissue"
    selected = upsample_mask(compute_foreground(reader, 0, "tissue").mask, (512, 768)) > 0
    assert not selected[:, :300].any()
    assert selected[100:200, 500:700].all()


def test_tissue_on_an_image_without_colour_is_refused_before_anything_is_made(tmp_path):
    """Tissue is found by colour: a one-channel image is refused naming the file and what to
    use instead, before the result exists."""
    gray = np.full((32, 32, 1), 200, np.uint8)
    source = tmp_path / "gray.zarr"
    zarr.create_array(source, data=gray, chunks=(16, 16, 1), dimension_names=("y", "x", "c"))
    torch.manual_seed(0)
    net = models.build("unet", class_names=CLASSES, in_channels=1, width=4, depth=2).eval()
    out = tmp_path / "r.zarr"
    with pytest.raises(ValueError, match=rf"{source}.*1 channel.*'none'.*'nodata'"):
        segpipe.segment(source, out, net, tile=16, foreground="tissue", scheduler="sync")
    assert not out.exists()


def test_an_image_smaller_than_the_mask_keeps_its_tissue(tmp_path):
    """At or below MASK_SIDE the mask is the image itself: its dust and hole sizes shrink with
    it, or a small image's tissue would all be dust (a 3 x 3 px one had nothing computed)."""
    pink = np.full((3, 3, 3), (230, 120, 200), np.uint8)
    reader = ArrayReader(pink, pixel_size_um=0.5)
    assert compute_foreground(reader, 0, "tissue").mask.all()
    out = segpipe.segment(reader, tmp_path / "r.zarr", tiny_unet(), tile=8, scheduler="sync")
    s = read_meta(out).summary
    assert (s.tiles_computed, s.foreground_pixels) == (1, 9)
    assert read_meta(out).config.foreground == "tissue"


def test_low_resolution_is_a_block_mean(monkeypatch):
    import segpipe.execution.foreground as fg

    monkeypatch.setattr(fg, "MASK_SIDE", 16)
    image = np.random.default_rng(0).integers(0, 256, (70, 50, 3), dtype=np.uint8)
    small = low_resolution(ArrayReader(image), 0)  # factor 70 // 16 = 4, a partial last row
    assert small.shape == (18, 13, 3)
    np.testing.assert_allclose(small[3, 2], image[12:16, 8:12].reshape(-1, 3).mean(0), atol=1e-4)
    np.testing.assert_allclose(small[17, 12], image[68:, 48:].reshape(-1, 3).mean(0), atol=1e-4)


def test_nodata_tiles_of_a_geotiff_are_not_computed(tmp_path):
    """A GeoTIFF with an internal mask band: "auto" means nodata; tiles with no valid pixel
    (from the mask as written) are class 0, the others computed as without a mask."""
    import rasterio
    from rasterio.transform import Affine

    rng = np.random.default_rng(0)
    data = rng.integers(0, 256, (3, 200, 300), dtype=np.uint8)
    valid = np.ones((200, 300), bool)
    valid[100:, 200:] = False
    valid[:30, :] = False
    path = tmp_path / "masked.tif"
    profile = dict(driver="GTiff", width=300, height=200, count=3, dtype="uint8", tiled=True)
    with (
        rasterio.Env(GDAL_TIFF_INTERNAL_MASK=True),
        rasterio.open(
            path, "w", crs="EPSG:32633", transform=Affine(2, 0, 5e5, 0, -2, 5e6), **profile
        ) as ds,
    ):
        ds.write(data)
        ds.write_mask(valid.astype(np.uint8) * 255)
    tile = 40
    expected = np.array(
        [
            [valid[y : y + tile, x : x + tile].any() for x in range(0, 300, tile)]
            for y in range(0, 200, tile)
        ]
    )
    settings = dict(tile=tile, task_tiles=1, level=0, scheduler="sync")
    on = segpipe.segment(path, tmp_path / "on.zarr", tiny_unet(), **settings)
    off = segpipe.segment(path, tmp_path / "off.zarr", tiny_unet(), foreground="none", **settings)
    meta = read_meta(on)
    assert meta.config.foreground == "nodata"
    assert (meta.summary.tiles_computed, meta.summary.tiles_background) == (
        expected.sum(),
        (~expected).sum(),
    )
    where = np.kron(expected, np.ones((tile, tile), bool))[:200, :300]
    m_on, m_off = segpipe.open_result(on)["mask"].values, segpipe.open_result(off)["mask"].values
    np.testing.assert_array_equal(m_on[where], m_off[where])
    assert (m_on[~where] == 0).all()


def test_an_interrupted_run_resumes_with_the_same_tiles(known_slide, tmp_path):
    expected = expected_computed(known_slide.labels)
    reference = run(known_slide, tmp_path / "ref.zarr")

    class Stop(Exception):
        pass

    def stop(done, total):
        raise Stop

    out = tmp_path / "r.zarr"
    with pytest.raises(Stop):
        run(known_slide, out, on_progress=stop)
    done = tiles_done(out)
    assert done[~expected].all(), "tiles without tissue are recorded before any is computed"
    before = int(done[expected].sum())
    assert 0 < before < expected.sum()
    run(known_slide, out)
    s = read_meta(out).summary
    assert (s.tiles_computed, s.tiles_skipped) == (expected.sum(), before)
    assert s.tiles_background == (~expected).sum()
    np.testing.assert_array_equal(
        segpipe.open_result(out)["probabilities"].values,
        segpipe.open_result(reference)["probabilities"].values,
    )
    assert s.class_pixels == read_meta(reference).summary.class_pixels


def test_the_mask_is_a_stage_of_the_run(known_slide, tmp_path):
    from segpipe.progress import reporting

    events = []
    with reporting(events.append):
        run(known_slide, tmp_path / "r.zarr")
    stages = [e.stage for e in events if e.kind == "start"]
    assert stages.index("tissue mask") < stages.index("segment")
    events.clear()
    with reporting(events.append):
        run(known_slide, tmp_path / "none.zarr", foreground="none")
    assert "tissue mask" not in {e.stage for e in events}


# -- nodata and mask files: read at full resolution, pooled by the tiles' rule -------------


def test_nodata_is_read_at_the_level_not_a_nearest_overview(tmp_path):
    """A GeoTIFF's nearest-neighbour overviews drop a one-pixel valid column; the mask,
    pooled from level 0 itself, keeps it, and its tiles are computed."""
    import rasterio
    from rasterio.enums import Resampling
    from rasterio.transform import Affine

    from segpipe.io.readers import open_image

    side = 4096
    data = np.zeros((1, side, side), np.uint8)
    data[0, :, 1001] = 7
    path = tmp_path / "strip.tif"
    profile = dict(driver="GTiff", width=side, height=side, count=1, dtype="uint8", nodata=0)
    with rasterio.open(
        path, "w", crs="EPSG:32633", transform=Affine(1, 0, 5e5, 0, -1, 5e6), tiled=True,
        compress="deflate", **profile,
    ) as ds:  # fmt: skip
        ds.write(data)
    with rasterio.open(path, "r+") as ds:
        ds.build_overviews([2, 4], Resampling.nearest)
    reader = open_image(path)
    assert len(reader.level_shapes) == 3 and reader.mask_kind == "nodata"
    assert not reader.valid_mask(0, 1024, 0, 1024, 2).any(), "the overview lost the column"
    mask = valid_low_resolution(reader, 0)
    expected = np.zeros((1024, 1024), bool)
    expected[:, 1001 * 1024 // side] = True
    np.testing.assert_array_equal(mask, expected)
    tiles = compute_foreground(reader, 0, "nodata").tiles(512)
    np.testing.assert_array_equal(tiles, np.arange(8)[None, :].repeat(8, 0) == 1)


@pytest.mark.parametrize("strip_pixels", [1 << 24, 5121 * 3])
def test_nodata_cells_follow_the_rule_the_tiles_read_them_by(monkeypatch, strip_pixels):
    """5121 px wide: cells are not whole blocks of 5 px. A valid pixel at x = 3584 (the
    first of tile 7) must land in the cell tile 7 reads it back from, in one strip or many:
    tile 7 is computed (and tile 6, whose last pixels share that cell)."""
    monkeypatch.setattr(maskfiles, "STRIP_PIXELS", strip_pixels)
    image = np.zeros((8, 5121, 1), np.uint8)
    image[:, 3584] = 1
    reader = ArrayReader(image)
    reader.mask_kind, reader.nodata = "nodata", (0.0,)
    foreground = compute_foreground(reader, 0, "nodata")
    tiles = foreground.tiles(512)
    cols = mask_rows(5121, foreground.mask.shape[1])
    sharing = set(np.flatnonzero(cols == cols[3584]) // 512)
    assert sharing == {6, 7}
    assert tiles.shape == (1, 11)
    assert set(np.flatnonzero(tiles[0])) == sharing
    assert foreground.pixels >= 8, "the valid column itself is foreground"


def mask_tiles(path, side=SIDE, tile=TILE):
    """The (tile_y, tile_x) tiles a mask file selects over a side x side image."""
    reader = ArrayReader(np.broadcast_to(np.uint8(0), (side, side, 3)))
    mask = read_mask_file(path, reader, (side // 8, side // 8))
    return tiles_touching(mask, (side, side), tile)


ONLY_1_5 = np.zeros((8, 8), bool)
ONLY_1_5[1, 5] = True


@pytest.mark.parametrize(
    ("mode", "colour", "alpha"),
    [
        ("RGBA", 255, "region"),  # a white image whose alpha cuts out the region
        ("LA", 200, "region"),
        ("RGBA", "region", 255),  # opaque: alpha says nothing, the colours do
        ("RGBA", "region", 0),  # fully transparent export: the colours still do
    ],
)
def test_a_mask_image_with_alpha_uses_the_alpha_when_it_varies(tmp_path, mode, colour, alpha):
    channels = len(mode)
    pixels = np.zeros((64, 64, channels), np.uint8)
    region = (slice(8, 16), slice(40, 48))  # tile (1, 5) of the 512 px slide
    for index, value in ((slice(0, channels - 1), colour), (channels - 1, alpha)):
        if value == "region":
            pixels[(*region, index)] = 255
        else:
            pixels[..., index] = value
    path = tmp_path / "mask.png"
    Image.fromarray(pixels, mode).save(path)
    np.testing.assert_array_equal(mask_tiles(path), ONLY_1_5)


@pytest.mark.parametrize("row", [504, 505])
def test_a_mask_longer_on_one_axis_and_shorter_on_the_other_keeps_every_row(tmp_path, row):
    """1010 x 995 px over 1000 x 1000 cells (an aspect within 2%): its rows were thinned by
    nearest neighbour to stretch its columns, and a one-pixel stroke on row 504 was lost."""
    pixels = np.zeros((1010, 995), np.uint8)
    pixels[row, 100:900] = 255
    Image.fromarray(pixels).save(tmp_path / "mask.png")
    reader = ArrayReader(np.broadcast_to(np.uint8(0), (1000, 1000, 3)))
    mask = read_mask_file(tmp_path / "mask.png", reader, (1000, 1000))
    assert mask.any(axis=1).sum() == 1 and mask.sum() >= 800


def test_a_mask_tiff_is_read_at_its_level_0_not_a_reduced_level_another_tool_made(tmp_path):
    """Its overviews (GDAL's default: nearest neighbour) had lost a one-pixel stroke, and the
    coarsest level at least the mask's size was the one read: no foreground at all."""
    import tifffile

    pixels = np.zeros((4096, 4096), np.uint8)
    pixels[1001, 500:3500] = 255
    flat, pyramid = tmp_path / "flat.tif", tmp_path / "pyramid.tif"
    tifffile.imwrite(flat, pixels, tile=(256, 256))
    with tifffile.TiffWriter(pyramid) as tif:
        tif.write(pixels, tile=(256, 256), subifds=2)
        for step in (2, 4):
            tif.write(pixels[::step, ::step], tile=(256, 256), subfiletype=1)
    assert not pixels[::4, ::4].any(), "the stroke is gone from the overview"
    reader = ArrayReader(np.broadcast_to(np.uint8(0), (4096, 4096, 1)))
    expected = read_mask_file(flat, reader, (1024, 1024))
    assert expected.sum() == 750
    np.testing.assert_array_equal(read_mask_file(pyramid, reader, (1024, 1024)), expected)


@pytest.mark.parametrize(
    ("dtype", "photometric"),
    [(bool, None), (np.uint8, "miniswhite"), (np.uint16, "miniswhite"), (np.uint8, "minisblack")],
)
@pytest.mark.parametrize(
    ("name", "how"),
    [("m.tif", {}), ("m.ome.tif", {}), ("m.tif", {"metadata": None})],
    ids=["shaped", "ome", "no-description"],
)
def test_a_mask_tiff_tifffile_wrote_from_an_array_is_that_array(
    tmp_path, dtype, photometric, name, how
):
    """tifffile writes a bool array as 1-bit min-is-white: shown (as PIL shows it), the mask
    was its inverse, and a run computed what the user marked as glass and left the tissue.
    Read as stored, as tifffile and GDAL read it, also when tifffile wrote no JSON
    description (an OME-TIFF, metadata=None). (A mask drawn in a viewer is taken as it
    shows: test_readers.py.)"""
    import tifffile

    rasterio = pytest.importorskip("rasterio")
    stored = np.zeros((64, 96), dtype)
    stored[8:24, 16:40] = 1
    tifffile.imwrite(tmp_path / name, stored, photometric=photometric, **how)
    with rasterio.open(tmp_path / name) as gdal:
        independent = gdal.read(1) != 0
    np.testing.assert_array_equal(independent, stored != 0)
    reader = ArrayReader(np.broadcast_to(np.uint8(0), (64, 96, 3)))
    np.testing.assert_array_equal(read_mask_file(tmp_path / name, reader, (64, 96)), independent)


@pytest.mark.parametrize("strip_pixels", [1 << 24, 4096 * 1024])
def test_a_large_mask_image_is_pooled_in_strips_not_thinned(tmp_path, monkeypatch, strip_pixels):
    """A 4096 px mask over a 1024-cell mask: 3 x 3 pixels off the nearest-neighbour grid,
    and one at the bottom right, all kept, whether read in one strip or four."""
    monkeypatch.setattr(maskfiles, "STRIP_PIXELS", strip_pixels)
    side = 4096
    pixels = np.zeros((side, side), np.uint8)
    pixels[1:4, 1:4] = 1
    pixels[-1, -1] = 1
    path = tmp_path / "big.png"
    Image.fromarray(pixels).save(path)
    reads = []
    monkeypatch.setattr(maskfiles, "open_image", lambda p: spy_reads(segpipe.open_image(p), reads))
    reader = ArrayReader(np.broadcast_to(np.uint8(0), (side, side, 3)))
    mask = read_mask_file(path, reader, (1024, 1024))
    expected = np.zeros((1024, 1024), bool)
    expected[0, 0] = expected[-1, -1] = True
    np.testing.assert_array_equal(mask, expected)
    assert len(reads) == side * side // strip_pixels
    assert all(y1 - y0 <= strip_pixels // side for y0, y1 in reads)


def spy_reads(reader, reads):
    read = reader.read

    def spied(y0, y1, x0, x1, level=0):
        reads.append((y0, y1))
        return read(y0, y1, x0, x1, level)

    reader.read = spied
    return reader


@pytest.mark.parametrize("shape", [(64, 128), (128, 64), (64, 62)])
def test_a_mask_image_of_another_aspect_ratio_is_refused(tmp_path, shape):
    path = tmp_path / "wide.png"
    Image.fromarray(np.full(shape, 255, np.uint8)).save(path)
    with pytest.raises(ValueError, match=rf"wide\.png.*{shape[0]} x {shape[1]}.*512 x 512"):
        mask_tiles(path)


@pytest.mark.parametrize("shape", [(64, 65), (63, 64), (512, 509), (1, 1)])
def test_a_mask_image_within_rounding_of_the_aspect_ratio_is_taken(tmp_path, shape):
    path = tmp_path / "mask.png"
    Image.fromarray(np.full(shape, 255, np.uint8)).save(path)
    assert mask_tiles(path).all()


@pytest.mark.parametrize(
    ("strip_pixels", "rows"),
    [(1, 16), (40 * 20, 16), (40 * 33, 32), (1 << 24, 112)],
    ids=["under-a-chunk-row", "a-chunk-row-and-some", "two-chunk-rows-and-some", "default"],
)
def test_row_strips_are_whole_rows_of_chunks_of_about_strip_pixels(monkeypatch, strip_pixels, rows):
    """A 100 x 40 px level in chunks of 16 rows: strips of whole chunk rows (a strip ending
    inside one decodes it twice), one chunk row even where it exceeds STRIP_PIXELS, every
    row once."""
    monkeypatch.setattr(maskfiles, "STRIP_PIXELS", strip_pixels)
    reader = SimpleNamespace(level_shapes=((100, 40, 1),), chunk_shape=lambda level: (16, 16))
    expected = [(y0, min(100, y0 + rows)) for y0 in range(0, 100, rows)]
    assert maskfiles.row_strips(reader, 0) == expected


def test_a_two_channel_mask_tiff_without_named_channels_takes_its_second_as_alpha(tmp_path):
    """tifffile writes grey and alpha as two samples, the second "unspecified": no channel
    is named alpha, yet of two channels the last is the alpha, as of four."""
    import tifffile

    pixels = np.zeros((64, 64, 2), np.uint8)
    pixels[..., 0] = 255  # white everywhere
    pixels[8:16, 40:48, 1] = 255  # the alpha cuts out tile (1, 5)
    path = tmp_path / "grey_alpha.tif"
    tifffile.imwrite(path, pixels, photometric="minisblack", planarconfig="contig")
    assert not getattr(segpipe.open_image(path), "channel_names", None)
    np.testing.assert_array_equal(mask_tiles(path), ONLY_1_5)


@pytest.mark.parametrize("marked", [True, False], ids=["read", "refused"])
def test_a_mask_image_is_closed_once_read_or_refused(tmp_path, monkeypatch, marked):
    """A run reads one mask per image of an archive: each mask's file handles are let go,
    the mask read or refused as marking nothing."""
    pixels = np.zeros((64, 64), np.uint8)
    pixels[8:16, 40:48] = 255 if marked else 0
    path = tmp_path / "mask.png"
    Image.fromarray(pixels).save(path)
    closed = []

    def opened(p):
        image = segpipe.open_image(p)
        close = image.close
        image.close = lambda: (closed.append(p), close())[1]
        return image

    monkeypatch.setattr(maskfiles, "open_image", opened)
    reader = ArrayReader(np.zeros((64, 64, 3), np.uint8))
    if marked:
        assert read_mask_file(path, reader, (64, 64)).sum() == 64
    else:
        with pytest.raises(ValueError, match="marks no foreground"):
            read_mask_file(path, reader, (64, 64))
    assert closed == [path]


@pytest.mark.parametrize("name", ["MASK.GEOJSON", "mask.GeoJSON", "Mask.JSON"])
def test_a_geojson_mask_named_in_capitals_is_geojson(tmp_path, name):
    """Windows tools write MASK.GEOJSON: it is GeoJSON, not an image of an unknown format."""
    path = tmp_path / name
    polygons = {"type": "FeatureCollection", "features": [square(330, 70, 370, 120)]}
    path.write_text(json.dumps(polygons))
    np.testing.assert_array_equal(mask_tiles(path), ONLY_1_5)


def test_a_mask_image_is_stretched_over_the_segmented_levels_pixels(tmp_path):
    """Level 1 of a 301 x 517 image is 150 x 258: a 100 x 172 mask stretched over it shows
    its row 1 on level row 2 only (2 * 100 // 150), its column 1 on level column 2 only
    (2 * 172 // 258). Stretched over level 0 instead (rows 4..6 of 301, then halved) it
    marked row and column 1 as well."""
    reader = SimpleNamespace(level_shapes=((301, 517, 3), (150, 258, 3)))
    pixels = np.zeros((100, 172), np.uint8)
    pixels[1, :] = 255
    pixels[:, 1] = 255
    Image.fromarray(pixels).save(tmp_path / "m.png")
    rows = np.arange(150) * 100 // 150 == 1  # level pixel y shows mask row y * my // ny
    cols = np.arange(258) * 172 // 258 == 1
    assert np.flatnonzero(rows).tolist() == [2] and np.flatnonzero(cols).tolist() == [2]
    got = read_mask_file(tmp_path / "m.png", reader, (150, 258), level=1)
    np.testing.assert_array_equal(got, rows[:, None] | cols[None, :])


def square(x0, y0, x1, y1):
    ring = [[x0, y0], [x1, y0], [x1, y1], [x0, y1], [x0, y0]]
    return {"type": "Feature", "geometry": {"type": "Polygon", "coordinates": [ring]}}


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (5, "the top level is 5"),
        ([square(0, 0, 10, 10), 5], "feature 1 is 5"),  # a list: QuPath's Features
        ({"type": "GeometryCollection", "geometries": 5}, "GeometryCollection holds 5: not"),
        ({"type": "GeometryCollection", "geometries": [None]}, r"holds \[null\]: not a list"),
        ({"type": "FeatureCollection", "features": [square(0, 0, 9, 9), None]}, "feature 1"),
        ({"type": "FeatureCollection", "features": [{"geometry": 5}]}, "feature 0"),
        ({"type": "FeatureCollection", "features": 7}, "feature 0 is 7"),
        ({"type": "Polygon", "coordinates": None}, "coordinates hold null: not a list"),
        ({"type": "FeatureCollection", "features": []}, "no Polygon"),
        ({"type": "Polygon", "coordinates": []}, "no Polygon"),  # empty: a null geometry
        # rasterio's bounds crashed the process (SIGSEGV) on these strings; NaN went through
        (
            {"type": "Polygon", "coordinates": [[["a", "b"], [1, 2], [3, 4], [1, 2]]]},
            r'\["a", "b"\]',
        ),
        ({"type": "Polygon", "coordinates": [[[float("nan"), 1], [1, 2], [3, 4], [1, 2]]]}, "NaN"),
        ({"type": "Polygon", "coordinates": [[[True, 1], [1, 2], [3, 4], [1, 2]]]}, "true"),
        ({"type": "Polygon", "coordinates": [[[1], [1, 2], [3, 4], [1, 2]]]}, r"\[1\]: not finite"),
        ({"type": "MultiPolygon", "coordinates": [[[1, 2], [3, 4]]]}, r"hold \[1, 2\]: not"),
        ({"type": "Polygon", "coordinates": [5]}, "coordinates hold 5: not a list"),
        # a ring of fewer than 4 positions, none at all, a 400-digit number (OverflowError)
        ({"type": "Polygon", "coordinates": [[[1, 2], [3, 4], [1, 2]]]}, "not a ring"),
        ({"type": "MultiPolygon", "coordinates": [[]]}, r"hold \[\]: empty"),
        ({"type": "Polygon", "coordinates": [[[10**400, 1]] * 4]}, "not finite x, y"),
    ],
)
def test_malformed_geojson_is_refused_naming_the_file(tmp_path, content, message):
    path = tmp_path / "mask.geojson"
    path.write_text(json.dumps(content))
    with pytest.raises(ValueError, match=rf"mask\.geojson: .*{message}"):
        mask_tiles(path)


@pytest.mark.parametrize(
    "feature",
    [
        square(2000, 100, 2400, 300),  # microns of a 0.25 um/px slide
        square(100, -300, 300, -100),  # GIS: y up
    ],
)
def test_geojson_polygons_outside_the_image_are_refused(tmp_path, feature):
    path = tmp_path / "mask.geojson"
    inside = square(330, 70, 370, 120)  # tile (1, 5)
    path.write_text(json.dumps({"type": "FeatureCollection", "features": [feature]}))
    with pytest.raises(ValueError, match=r"mask\.geojson: no polygon overlaps.*level-0 pixels"):
        mask_tiles(path)
    # No area (a line drawn as a polygon), in the image or across its edge: not called outside.
    for x0 in (330, -5):
        line = [[x0, 70], [370, 70], [350, 70], [x0, 70]]
        path.write_text(json.dumps({"type": "Polygon", "coordinates": [line]}))
        with pytest.raises(ValueError, match=rf"polygons \(x {x0}\.\.370, y 70\.\.70\) enclose no"):
            mask_tiles(path)
    # Area, in the image, yet no pixel (a hole filling its shell): not called outside either.
    ring = square(330, 70, 370, 120)["geometry"]["coordinates"][0]
    path.write_text(json.dumps({"type": "Polygon", "coordinates": [ring, ring]}))
    with pytest.raises(ValueError, match=r"meet the image but cover no pixel of level 0 \(hol"):
        mask_tiles(path)
    # One polygon overlapping is enough; the others mark nothing.
    path.write_text(json.dumps({"type": "FeatureCollection", "features": [feature, inside]}))
    np.testing.assert_array_equal(mask_tiles(path), ONLY_1_5)


def test_a_top_level_list_of_features_is_a_feature_collection(tmp_path):
    """QuPath's scripted export (no FEATURE_COLLECTION option) writes its Features as a JSON
    array: it was refused as "not GeoJSON", though the README says QuPath's exports are read."""
    path = tmp_path / "qupath.geojson"
    path.write_text(json.dumps([square(330, 70, 370, 120), square(-50, -50, -10, -10)]))
    np.testing.assert_array_equal(mask_tiles(path), ONLY_1_5)


def test_polygons_inside_a_geometry_collection_are_read(tmp_path):
    """Only a feature's own Polygon or MultiPolygon was taken: one in a GeometryCollection
    (nested too) was dropped without a word."""
    inside = square(330, 70, 370, 120)["geometry"]
    nested = {"type": "GeometryCollection", "geometries": [inside]}
    line = {"type": "LineString", "coordinates": [[0, 0], [500, 500]]}
    collection = {"type": "GeometryCollection", "geometries": [line, nested]}
    path = tmp_path / "mask.geojson"
    path.write_text(json.dumps({"type": "Feature", "geometry": collection, "properties": {}}))
    np.testing.assert_array_equal(mask_tiles(path), ONLY_1_5)


@pytest.mark.parametrize("far", [2**31 + 100, 1e15, 1e200])
def test_a_polygon_reaching_far_past_the_image_marks_what_it_covers(tmp_path, far):
    """A polygon reaching past 2**31 mask cells was dropped by GDAL's rasteriser: alone, the
    file was refused as overlapping nothing; beside another, it was silently lost."""
    reader = ArrayReader(np.zeros((300, 400, 3), np.uint8))
    band = square(-10, 10.5, far, 19.5)  # rows 10..19, every column, in cells of one pixel
    small = square(300.5, 250.5, 309.5, 259.5)
    expected = np.zeros((300, 400), bool)
    expected[10:20] = True
    path = tmp_path / "far.geojson"
    for features in ([band], [band, small]):
        path.write_text(json.dumps({"type": "FeatureCollection", "features": features}))
        mask = read_mask_file(path, reader, (300, 400))
        np.testing.assert_array_equal(mask[:250], expected[:250])  # the band's rows
        assert mask[250:].sum() == (100 if small in features else 0)


@pytest.mark.parametrize("far", [2**31 + 100, 1e15])
def test_a_polygon_reaching_far_past_the_image_marks_what_it_covers_at_a_coarser_level(
    tmp_path, far
):
    """Level 1 of a 400 x 400 image, each pixel 2 x 2 of level 0's: a "whole image" polygon
    drawn huge is cut to the level's cells in level-0 pixels, and marks every cell."""
    reader = SimpleNamespace(level_shapes=((400, 400, 3), (200, 200, 3)), georeference=None)
    path = tmp_path / "far.geojson"
    path.write_text(json.dumps(square(-far, -far, far, far)))
    assert read_mask_file(path, reader, (200, 200), level=1).all()
    assert read_mask_file(path, reader, (100, 100), level=1).all()  # cells of 2 x 2 pixels


def test_a_thin_far_spike_entering_the_image_marks_the_edge_cell_it_enters(tmp_path):
    """A slip of the pen out to (-1e15, -1e15) and back: a spike thinner than a pixel that
    enters the image at column 0, row 116. The polygon is cut a cell beyond the image before
    it is burned; cut at the image's edge itself, the cut spike had no area left in cell
    (116, 0), which its inside meets. (A case a random search found.)"""
    import shapely

    points = [
        (516.2927318407204, 224.22629282947037),
        (532.7542962144423, 259.9374882125882),
        (215.13717490944532, 332.1280712092267),
        (-1e15, -1e15),
        (236.02708358545766, 414.6373071849749),
    ]
    polygon = shapely.make_valid(shapely.Polygon(points))
    path = tmp_path / "spike.geojson"
    path.write_text(json.dumps({"type": "Polygon", "coordinates": [[*points, points[0]]]}))
    reader = SimpleNamespace(level_shapes=((301, 517, 3),), georeference=None)
    expected = cells_meeting([polygon], (301, 517), (301, 517))
    assert expected[116, 0]
    np.testing.assert_array_equal(read_mask_file(path, reader, (301, 517)), expected)


@pytest.mark.parametrize("past", [200, 2**31])
def test_a_self_crossing_polygon_past_the_image_burns_as_gdal_burns_it(tmp_path, past):
    """Every polygon past the image's edge was cut first, and a hand-drawn outline that
    crosses itself (an hourglass) came out garbled: 8656 cells marked for GDAL's 3010."""

    reader = ArrayReader(np.zeros((1000, 1000), np.uint8))
    left = -200 if past == 200 else -past
    ring = [[left, 100], [1200, 900], [1200, 100], [left, 900], [left, 100]]
    geometry = {"type": "Polygon", "coordinates": [ring]}
    path = tmp_path / "bowtie.geojson"
    path.write_text(json.dumps({"type": "Feature", "properties": {}, "geometry": geometry}))
    mask = read_mask_file(path, reader, (100, 100))
    if past == 200:  # as GDAL fills it: two triangles meeting at the waist (500, 500)
        import shapely

        left = shapely.Polygon([(-200, 100), (500, 500), (-200, 900)])
        right = shapely.Polygon([(1200, 900), (1200, 100), (500, 500)])
        np.testing.assert_array_equal(mask, cells_meeting([left, right], (1000, 1000), (100, 100)))
        assert not mask[15, 40:60].any()  # the hourglass's waist
    else:  # its waist far to the left: in the image, the band between the two edges
        assert mask[11:89].all() and not mask[:9].any() and not mask[91:].any()
    assert mask[50].all() and not mask[5].any()


@pytest.mark.parametrize(
    ("said", "found"),
    [
        ({"properties": {"coordinates": "micron"}}, r'properties\.coordinates "micron"'),
        ({"properties": {"coordinates": "crs"}}, r'properties\.coordinates "crs"'),
        ({"crs": {"type": "name", "properties": {"name": "urn:ogc:def:crs:EPSG::32633"}}}, "crs"),
    ],
)
def test_geojson_that_says_its_coordinates_are_not_pixels_is_refused(tmp_path, said, found):
    """segpipe's own export in microns or in a CRS (which writes a ``crs`` member) was taken
    as pixels: a mask scaled by the pixel size, or flipped upside down."""
    path = tmp_path / "mask.geojson"
    collection = {"type": "FeatureCollection", "features": [square(330, 70, 370, 120)]}
    path.write_text(json.dumps(collection | said))
    with pytest.raises(ValueError, match=rf"mask\.geojson: .*{found}.*level-0 pixels"):
        mask_tiles(path)
    collection["crs"] = None  # GeoJSON 2008's "no CRS"; pixels said so are pixels
    path.write_text(json.dumps(collection | {"properties": {"coordinates": "pixel"}}))
    np.testing.assert_array_equal(mask_tiles(path), ONLY_1_5)


def test_segpipes_own_export_is_a_mask_in_pixels_only(known_slide, tmp_path):
    """Its pixel-coordinate polygons give back the result's foreground pixel for pixel. (A
    random network's result, tens of thousands of specks, took a minute to trace.)"""
    from test_query import make_result

    from segpipe import vectors

    out, _ = make_result(tmp_path / "r.zarr", known_slide.labels, tile=TILE)
    pixel, micron = tmp_path / "pixel.geojson", tmp_path / "micron.geojson"
    vectors.export_geojson(out, pixel, coords="pixel")
    vectors.export_geojson(out, micron, coords="micron")
    reader = ArrayReader(known_slide.image, pixel_size_um=known_slide.pixel_size_um)
    mask = read_mask_file(pixel, reader, (SIDE, SIDE))
    np.testing.assert_array_equal(mask, known_slide.labels != 0)
    with pytest.raises(ValueError, match=r"micron\.geojson: .*\"micron\".*coords='pixel'"):
        read_mask_file(micron, reader, (SIDE, SIDE))


@pytest.mark.parametrize(
    ("name", "pixels"),
    [
        ("zeros.png", np.zeros((64, 64), np.uint8)),
        ("zeros.png", np.zeros((64, 64, 4), np.uint8)),  # a transparent black RGBA
        ("zeros.tif", np.zeros((64, 64), np.float32)),
    ],
)
def test_a_mask_image_that_marks_nothing_is_refused(tmp_path, name, pixels):
    """It gave a "complete" result of no computed tile, where a GeoJSON marking nothing is
    refused."""
    import tifffile

    path = tmp_path / name
    if name.endswith(".png"):
        Image.fromarray(pixels).save(path)
    else:
        tifffile.imwrite(path, pixels)
    with pytest.raises(ValueError, match=rf"{name.replace('.', '[.]')} marks no foreground"):
        mask_tiles(path)


@pytest.mark.parametrize("where", [np.s_[:], np.s_[40:41, 3]])
def test_a_mask_image_holding_nan_is_refused(tmp_path, where):
    """NaN is no 0: an all-NaN float mask was taken as all foreground."""
    import tifffile

    pixels = np.zeros((64, 64), np.float32)
    pixels[8:16, 40:48] = 1.0
    pixels[where] = np.nan
    tifffile.imwrite(tmp_path / "nan.tif", pixels)
    with pytest.raises(ValueError, match=r"nan\.tif holds NaN"):
        mask_tiles(tmp_path / "nan.tif")


def write_geotiff(path, data, transform, crs="EPSG:32633"):
    import rasterio

    profile = dict(driver="GTiff", width=data.shape[1], height=data.shape[0], count=1)
    with rasterio.open(path, "w", dtype=data.dtype, crs=crs, transform=transform, **profile) as ds:
        ds.write(data[None])
    return path


def test_a_georeferenced_mask_must_lie_on_the_georeferenced_image(tmp_path):
    """Its CRS and transform were ignored and it was stretched over the image: a mask of
    other ground (shifted, or in another CRS) marked the image's pixels it has no part of."""
    from rasterio.transform import Affine

    image = write_geotiff(
        tmp_path / "image.tif", np.full((40, 60), 9, np.uint8), Affine(10, 0, 5e5, 0, -10, 5e6)
    )
    reader = segpipe.open_image(image)
    half = np.zeros((20, 30), np.uint8)
    half[:, :15] = 1  # the image's left half, on a grid of 20 m
    expected = np.zeros((40, 60), bool)
    expected[:, :30] = True
    # On the image's ground: a coarser grid, or the same off by a thousandth of a pixel.
    for name, transform in (
        ("coarse.tif", Affine(20, 0, 5e5, 0, -20, 5e6)),
        ("rounded.tif", Affine(20.0001, 0, 5e5 + 0.02, 0, -20, 5e6)),
    ):
        mask = write_geotiff(tmp_path / name, half, transform)
        np.testing.assert_array_equal(read_mask_file(mask, reader, (40, 60)), expected)
    for name, transform, crs in (
        ("shifted.tif", Affine(20, 0, 5e5 + 300, 0, -20, 5e6), "EPSG:32633"),
        ("larger.tif", Affine(21, 0, 5e5, 0, -20, 5e6), "EPSG:32633"),
        ("flipped.tif", Affine(20, 0, 5e5, 0, 20, 5e6 - 400), "EPSG:32633"),
        ("othercrs.tif", Affine(20, 0, 5e5, 0, -20, 5e6), "EPSG:32634"),
    ):
        mask = write_geotiff(tmp_path / name, half, transform, crs)
        with pytest.raises(ValueError, match=rf"{name[:-4]}\.tif is georeferenced.*image\.tif"):
            read_mask_file(mask, reader, (40, 60))
    # Only one of the two georeferenced: stretched over the image, as before.
    plain = tmp_path / "plain.png"
    Image.fromarray(half * 255).save(plain)
    np.testing.assert_array_equal(read_mask_file(plain, reader, (40, 60)), expected)
    unplaced = ArrayReader(np.zeros((40, 60, 3), np.uint8))
    shifted = tmp_path / "shifted.tif"
    np.testing.assert_array_equal(read_mask_file(shifted, unplaced, (40, 60)), expected)


def test_an_edited_mask_file_is_another_result(known_slide, tmp_path):
    """The mask file's content is part of the result's identity: rewritten, the same output
    is refused rather than returned; unchanged, the complete result is returned."""
    path = tmp_path / "mask.png"
    small = np.zeros((64, 64), np.uint8)
    small[8:16, 40:48] = 255  # tile (1, 5)
    Image.fromarray(small).save(path)
    out = run(known_slide, tmp_path / "r.zarr", foreground=str(path))
    identity = read_attrs(out)["identity"]
    assert identity["foreground_sha256"] == hashlib.sha256(path.read_bytes()).hexdigest()
    run(known_slide, out, foreground=str(path))  # the same file: already complete
    small[:] = 0
    small[48:56, 16:24] = 255  # tile (6, 2)
    Image.fromarray(small).save(path)
    with pytest.raises(ResultMismatchError, match="foreground_sha256"):
        run(known_slide, out, foreground=str(path))
    assert read_meta(out).summary.tiles_computed == 1


def test_a_result_without_a_mask_file_keeps_its_identity(known_slide, tmp_path):
    out = run(known_slide, tmp_path / "r.zarr", foreground="tissue")
    identity = read_attrs(out)["identity"]
    assert identity["foreground"] == "tissue" and "foreground_sha256" not in identity


def test_auto_means_tissue_for_a_slide_that_marks_empty_space_by_alpha():
    """OpenSlide's readers mark a scanner's empty space by alpha (``mask_kind``); a slide
    is still a slide. Without a pixel size, or not 8-bit RGB, alpha means nodata."""

    def reader(channels=3, dtype=np.uint8, names=None, **kwargs):
        r = ArrayReader(np.zeros((32, 32, channels), dtype), **kwargs)
        r.mask_kind, r.channel_names = "alpha", names
        return r

    rgba = ("red", "green", "blue", "alpha")
    assert resolve_foreground("auto", reader(pixel_size_um=0.25)) == "tissue"
    assert resolve_foreground("auto", reader(4, names=rgba, pixel_size_um=0.25)) == "tissue"
    assert resolve_foreground("auto", reader()) == "nodata"
    assert resolve_foreground("auto", reader(4, np.uint16, rgba, pixel_size_um=0.25)) == "nodata"
    assert resolve_foreground("auto", reader(4, pixel_size_um=0.25)) == "nodata"


def touched(n, size, lo, hi):
    """Which of ``n`` pixels, each ``size`` level-0 pixels from 0, the span ``lo..hi`` (level-0
    pixels, no edge on a pixel's) reaches into."""
    starts = np.arange(n) * size
    return (starts + size > lo) & (starts < hi)


def test_a_geojson_mask_at_a_coarser_level_of_odd_side_uses_its_whole_downsample(tmp_path):
    """Level 1 of a 301 x 517 image is 150 x 258, each pixel 2 x 2 of level 0's (level 0's
    last row and column in none), as the result's pixel polygons and microns place it. A
    polygon's edge burns the level-1 pixel holding it, not the one the size ratio (517 / 258,
    301 / 150) would: x 402.5 is in column 201 ([402, 404)), not 200 ([400.8, 402.8))."""
    from segpipe.io.writers import write_pyramidal_tiff

    source = write_pyramidal_tiff(
        tmp_path / "odd.ome.tif", np.zeros((301, 517, 3), np.uint8), pixel_size_um=0.5,
        tile=64, min_level_size=64,
    )  # fmt: skip
    reader = segpipe.open_image(source)
    assert reader.level_shapes[1][:2] == (150, 258)
    x0, y0, x1, y1 = 402.5, 102.2, 600.0, 250.3
    assert 200 * 517 / 258 < x0 < 201 * 517 / 258  # size ratio: in column 200
    assert y1 < 125 * 301 / 150 and 50 * 301 / 150 < y0 < 51 * 301 / 150  # rows 50..124
    path = tmp_path / "mask.geojson"
    path.write_text(json.dumps({"type": "FeatureCollection", "features": [square(x0, y0, x1, y1)]}))
    expected = np.outer(touched(150, 2, y0, y1), touched(258, 2, x0, x1))  # rows 51..125
    level0 = read_mask_file(path, reader, (301, 517))
    halved = level0[:300, :516].reshape(150, 2, 258, 2).any(axis=(1, 3))
    np.testing.assert_array_equal(halved, expected)  # the reference agrees with level 0
    np.testing.assert_array_equal(read_mask_file(path, reader, (150, 258), level=1), expected)
    # Cells of 2 x 2 level-1 pixels: each holds what its pixels hold.
    cells = read_mask_file(path, reader, (75, 129), level=1)
    np.testing.assert_array_equal(cells, expected.reshape(75, 2, 129, 2).any(axis=(1, 3)))
    # A run at level 1 takes the same mask (the level reaches the mask file).
    foreground = compute_foreground(reader, 1, str(path))
    assert foreground is not None and foreground.shape == (150, 258)
    np.testing.assert_array_equal(upsample_mask(foreground.mask, (150, 258)), expected)


def test_a_geojson_mask_at_a_gdal_overview_uses_its_size_ratio(tmp_path):
    """A georeferenced level is GDAL's overview, 151 x 259 under 301 x 517, whose transform
    (and so the result's pixel polygons) GDAL scales by the size ratio: the mask follows it.
    x 401.5 is in column 201 by the ratio ([401.2, 403.2)), in 200 by the whole factor."""
    import rasterio
    from rasterio.enums import Resampling
    from rasterio.transform import Affine

    path = tmp_path / "odd.tif"
    profile = dict(driver="GTiff", width=517, height=301, count=1, dtype="uint8")
    with rasterio.open(
        path, "w", crs="EPSG:32633", transform=Affine(1, 0, 5e5, 0, -1, 5e6), **profile
    ) as ds:
        ds.write(np.ones((1, 301, 517), np.uint8))
        ds.build_overviews([2], Resampling.nearest)
    reader = segpipe.open_image(path)
    assert reader.georeference is not None and reader.level_shapes[1][:2] == (151, 259)
    x0, y0, x1, y1 = 401.5, 101.8, 600.0, 250.3
    mask = tmp_path / "mask.geojson"
    mask.write_text(json.dumps({"type": "FeatureCollection", "features": [square(x0, y0, x1, y1)]}))
    expected = np.outer(touched(151, 301 / 151, y0, y1), touched(259, 517 / 259, x0, x1))
    assert not expected[:, 200].any() and expected[:, 201].any()
    np.testing.assert_array_equal(read_mask_file(mask, reader, (151, 259), level=1), expected)


@pytest.mark.parametrize(
    ("level", "mask"),
    # (rows, cols) of the segmented level and of the mask file, of one aspect: masks smaller
    # than the run's cells (about 1024 a side) and larger, at ratios that are no integer.
    [((3001, 50), (1234, 21)), ((100_000, 100), (1000, 1)), ((60_000, 80), (1500, 2))],
)
def test_a_mask_file_selects_every_cell_a_level_pixel_it_marks_lies_in(tmp_path, level, mask):
    """Stretched to the cells, then the cells over the level, the mask was rounded twice:
    a mask row stretching over level rows 127-128 was read at 128-129, and up to half the
    rows a sparse mask marked on a 100 000 px level were never computed."""
    from types import SimpleNamespace

    from segpipe.execution.foreground import _mask_shape

    rng = np.random.default_rng(sum(level))
    user = rng.random(mask) < 0.02
    Image.fromarray(user.astype(np.uint8) * 255).save(tmp_path / "m.png")
    cells = _mask_shape(level)
    reader = SimpleNamespace(level_shapes=((*level, 3),))
    got = read_mask_file(tmp_path / "m.png", reader, cells)
    # Independently: the level's pixels as the mask shows them, each cell True where one is.
    shown = user[mask_rows(level[0], mask[0])][:, mask_rows(level[1], mask[1])]
    cell_y, cell_x = mask_rows(level[0], cells[0]), mask_rows(level[1], cells[1])
    want = np.zeros(cells, bool)
    ys, xs = np.nonzero(shown)
    want[cell_y[ys], cell_x[xs]] = True
    np.testing.assert_array_equal(got, want)


def test_a_mask_file_that_cannot_be_used_leaves_nothing_at_the_output(known_slide, tmp_path):
    """It was read after the result was made, whose identity held the bad file's hash: the
    corrected run was refused as another result, though nothing had been computed."""
    outside = [[5000, 5000], [5100, 5000], [5100, 5100], [5000, 5000]]
    feature = {"type": "Feature", "geometry": {"type": "Polygon", "coordinates": [outside]}}
    bad = tmp_path / "bad.geojson"
    bad.write_text(json.dumps({"type": "FeatureCollection", "features": [feature]}))
    wide = tmp_path / "wide.png"
    Image.fromarray(np.full((10, 40), 255, np.uint8)).save(wide)
    out = tmp_path / "r.zarr"
    for mask, why in ((bad, "no polygon overlaps the image"), (wide, "another aspect ratio")):
        with pytest.raises(ValueError, match=why):
            run(known_slide, out, foreground=str(mask))
        assert sorted(p.name for p in tmp_path.iterdir()) == ["bad.geojson", "wide.png"]
    ring = [[330, 70], [370, 70], [370, 120], [330, 120], [330, 70]]
    feature["geometry"]["coordinates"] = [ring]
    bad.write_text(json.dumps({"type": "FeatureCollection", "features": [feature]}))
    assert read_meta(run(known_slide, out, foreground=str(bad))).summary.tiles_computed == 1


def test_a_polygon_inside_any_level_pixel_selects_that_pixel(tmp_path):
    """Cells of 2049 / 1025 level pixels: a cell holds the pixels that start in it, and a
    polygon in a cell's last pixel, past the rasteriser's cell edge, burned only the next
    cell (307 of 2049 such pixels were never computed)."""
    from segpipe.execution.foreground import _mask_shape

    reader = ArrayReader(np.zeros((8, 2049, 3), np.uint8))
    shape = _mask_shape((8, 2049))
    lost = []
    for x in range(0, 2049, 7):
        ring = [[x + 0.3, 2.3], [x + 0.7, 2.3], [x + 0.7, 2.7], [x + 0.3, 2.7], [x + 0.3, 2.3]]
        (tmp_path / "p.geojson").write_text(json.dumps({"type": "Polygon", "coordinates": [ring]}))
        mask = read_mask_file(tmp_path / "p.geojson", reader, shape, 0)
        if not upsample_mask(mask, (8, 2049))[2, x]:
            lost.append(x)
    assert lost == []


def cells_meeting(geometries, level, cells, d=1):
    """Independently (shapely): the ``cells`` ``(my, mx)`` over a level of ``level`` ``(ny,
    nx)`` pixels (pixel ``i`` in cell ``i * m // n``) of ``d`` level-0 pixels, whose inside a
    geometry (level-0 pixels) meets."""
    import shapely

    ys, xs = (-(-np.arange(m + 1) * n // m) * d for n, m in zip(level, cells, strict=True))
    gy, gx = np.meshgrid(np.arange(cells[0]), np.arange(cells[1]), indexing="ij")
    boxes = shapely.box(xs[gx], ys[gy], xs[gx + 1], ys[gy + 1]).ravel()
    tree = shapely.STRtree(boxes)
    met = np.zeros(boxes.size, bool)
    for g in geometries:
        hits = tree.query(g, predicate="intersects")
        met[hits[shapely.relate_pattern(g, boxes[hits], "T********")]] = True
    return met.reshape(cells)


@pytest.mark.parametrize(
    ("shapes", "level"),
    # Levels whose sides are no whole number of cells (2049 / 1025, 3001 / 1501), at level
    # 0 and at a level 1 of 2 x 2 level-0 pixels; and one of whole cells (2048 / 1024).
    [
        (((2049, 1537),), 0),
        (((1500, 3001),), 0),
        (((4098, 3074), (2049, 1537)), 1),
        (((2048, 2048),), 0),
    ],
)
def test_a_geojson_mask_marks_exactly_the_cells_whose_pixels_it_meets(tmp_path, shapes, level):
    """Burned on a uniform grid and each cell then OR-ed with the next one, cells of unequal
    runs of pixels were marked up to a cell from any polygon (1645 extra of 2049 x 1537);
    GDAL's all_touched missed corners cut off by less than a pixel."""
    from types import SimpleNamespace

    import shapely

    from segpipe.execution.foreground import _mask_shape

    d = 2**level
    rng = np.random.default_rng(sum(shapes[-1]))
    blobs = [
        shapely.Point(*(rng.random(2) * shapes[0][::-1])).buffer(rng.uniform(1, 60) * d, 5)
        for _ in range(40)
    ]
    blobs.append(shapely.box(11.3 * d, 7.2 * d, 11.6 * d, 7.9 * d))  # inside one pixel
    blobs.append(shapely.box(20 * d, 30 * d, 40 * d, 50 * d))  # edges on pixels' edges
    ring = shapely.Point(900 * d, 500 * d).buffer(200 * d)
    blobs.append(ring.difference(shapely.Point(900 * d, 500 * d).buffer(150 * d)))  # a hole
    features = [{"type": "Feature", "geometry": shapely.geometry.mapping(b)} for b in blobs]
    path = tmp_path / "m.geojson"
    path.write_text(json.dumps({"type": "FeatureCollection", "features": features}))
    reader = SimpleNamespace(level_shapes=tuple((*s, 3) for s in shapes), georeference=None)
    pixels = shapes[level]
    cells = _mask_shape(pixels)
    got = read_mask_file(path, reader, cells, level)
    np.testing.assert_array_equal(got, cells_meeting(blobs, pixels, cells, d))


def georeferenced(path, crs, transform, width, height):
    import rasterio

    profile = dict(driver="GTiff", width=width, height=height, count=1, dtype="uint8")
    with rasterio.open(path, "w", crs=crs, transform=transform, **profile) as ds:
        ds.write(np.ones((1, height, width), np.uint8))
    return segpipe.open_image(path)


def polygons_file(path, *rings, **top):
    features = [square(0, 0, 1, 1) for _ in rings]
    for feature, ring in zip(features, rings, strict=True):
        feature["geometry"]["coordinates"] = [[list(p) for p in ring]]
    path.write_text(json.dumps({"type": "FeatureCollection", "features": features, **top}))
    return path


def test_geojson_in_longitude_latitude_over_a_georeferenced_image_is_refused(tmp_path):
    """RFC 7946 GeoJSON (longitude/latitude, no ``crs`` member) over a UTM raster was read as
    pixels: the middle half of the image became a speck at pixel (15, 45), one tile of 153
    was computed and the result said complete."""
    from rasterio.transform import from_origin
    from rasterio.warp import transform as reproject

    reader = georeferenced(
        tmp_path / "utm.tif", "EPSG:32633", from_origin(5e5, 5e6, 2, 2), 1031, 517
    )

    def lonlat(fy, fx):  # a ring over fractions of the image, in longitude/latitude
        xs = [5e5 + 2 * 1031 * f for f in (fx[0], fx[1], fx[1], fx[0], fx[0])]
        ys = [5e6 - 2 * 517 * f for f in (fy[0], fy[0], fy[1], fy[1], fy[0])]
        return list(zip(*reproject("EPSG:32633", "EPSG:4326", xs, ys), strict=True))

    middle, larger = lonlat((0.25, 0.75), (0.25, 0.75)), lonlat((-0.5, 1.5), (-0.5, 1.5))
    far = [(16.0, 44.0), (16.1, 44.0), (16.1, 44.1), (16.0, 44.1), (16.0, 44.0)]  # 100 km
    for rings in ([middle], [larger], [middle, far]):
        mask = polygons_file(tmp_path / "aoi.geojson", *rings)
        with pytest.raises(ValueError, match=f"{mask}: its polygons .* look like longitude/lat"):
            read_mask_file(mask, reader, (517, 1031))
    # Said to be pixels, they are taken as pixels (whatever they select).
    mask = polygons_file(tmp_path / "aoi.geojson", middle, properties={"coordinates": "pixel"})
    assert read_mask_file(mask, reader, (517, 1031)).sum() == 1
    # Coordinates of the image's CRS lie far from its pixels: refused as overlapping nothing.
    xs, ys = [5e5, 5e5 + 500, 5e5 + 500, 5e5], [5e6, 5e6, 5e6 - 500, 5e6 - 500]
    mask = polygons_file(tmp_path / "aoi.geojson", list(zip(xs, ys, strict=True)))
    with pytest.raises(ValueError, match="no polygon overlaps the image"):
        read_mask_file(mask, reader, (517, 1031))


@pytest.mark.parametrize(
    ("crs", "transform", "size"),
    [
        ("EPSG:4326", (0.1, 0, -180, 0, -0.1, 90), (3600, 1800)),  # the world, in degrees
        ("EPSG:3857", (39135.76, 0, -20037508.34, 0, -39135.76, 20037508.34), (1024, 1024)),
        (  # a local engineering CRS from 0, in metres (a site plan)
            'ENGCRS["local",EDATUM["site"],CS[Cartesian,2],AXIS["x",east,ORDER[1],LENGTHUNIT'
            '["metre",1]],AXIS["y",north,ORDER[2],LENGTHUNIT["metre",1]]]',
            (1, 0, 0, 0, -1, 2000),
            (2000, 2000),
        ),
    ],
)
def test_pixel_geojson_over_a_georeferenced_image_is_not_taken_for_degrees(
    tmp_path, crs, transform, size
):
    """A check that refused polygons within the image's footprint in its own CRS refused
    every pixel mask over a world raster, or one in a local CRS from 0."""
    from rasterio.transform import Affine

    reader = georeferenced(tmp_path / "g.tif", crs, Affine(*transform), *size)
    box = [(20, 10), (150, 10), (150, 80), (20, 80), (20, 10)]
    cells = (size[1] // 2, size[0] // 2)
    mask = read_mask_file(polygons_file(tmp_path / "m.geojson", box), reader, cells)
    assert mask.sum() == 65 * 35


def test_an_invalid_polygons_edges_mark_only_cells_its_inside_meets(tmp_path):
    """Every edge piece marked its cell: a spike out and back marked 19 cells outside the
    polygon, a hole on its shell's side 90 cells inside the hole."""
    reader = ArrayReader(np.zeros((300, 400, 3), np.uint8))
    shell = [(5, 5), (205, 5), (205, 205), (5, 205), (5, 5)]
    spiked = [(5, 5), (205, 5), (205, 100), (395, 100), (205, 100), (205, 205), (5, 205), (5, 5)]
    hole = [(5, 55), (105, 55), (105, 155), (5, 155), (5, 55)]
    expected = np.zeros((300, 400), bool)
    expected[5:205, 5:205] = True
    for geometry in ({"type": "Polygon", "coordinates": [spiked]},):
        path = tmp_path / "m.geojson"
        path.write_text(json.dumps(geometry))
        np.testing.assert_array_equal(read_mask_file(path, reader, (300, 400)), expected)
    expected[55:155, 5:105] = False
    path.write_text(json.dumps({"type": "Polygon", "coordinates": [shell, hole]}))
    np.testing.assert_array_equal(read_mask_file(path, reader, (300, 400)), expected)


@pytest.mark.parametrize("threshold", [0.5, 0.25])
def test_tissue_mask_takes_a_saturation_at_the_threshold_for_glass(threshold):
    """Tissue is saturation above the threshold: a pixel exactly at it is glass."""
    rgb = np.full((8, 8, 3), 245, np.uint8)  # glass
    rgb[2:6, 2:6] = (200, 100, 100)  # saturation 0.5
    rgb[2:6, 6:8] = (200, 150, 150)  # saturation 0.25
    sat = saturation(rgb)
    assert (sat == threshold).any(), "the case this test is about"
    got = tissue_mask(rgb, threshold=threshold, grow_px=0, min_object_px=0, max_hole_px=0)
    np.testing.assert_array_equal(got, sat > threshold)


@pytest.mark.parametrize(("side", "grown"), [(128, 0), (512, 1), (1024, 2), (2048, 2)])
def test_tissue_mask_grows_tissue_by_a_margin_scaled_with_sizes_at(side, grown):
    """grow_px (2) is pixels of an image of sizes_at's side (1024): an image 1/8 of that
    grows by round(2/8) = 0 pixels, one of half that by 1; a larger one keeps 2."""
    rgb = np.full((side, side, 3), 245, np.uint8)  # glass
    rgb[40:80, 40:80] = (230, 120, 200)  # eosin-pink tissue
    expected = np.zeros((side, side), bool)
    expected[40 - grown : 80 + grown, 40 - grown : 80 + grown] = True  # grown 8-connected
    np.testing.assert_array_equal(tissue_mask(rgb, sizes_at=1024), expected)
