"""segpipe.io.polygons: polygons in level-0 pixels burned into a mask's cells, against masks
drawn by hand with numpy (a cell is marked where a polygon's inside meets one of its pixels)."""

import json

import numpy as np
import pytest

from segpipe.io.maskfiles import read_mask_file
from segpipe.io.polygons import cells_polygons_meet
from segpipe.io.readers import ArrayReader


def _pooled(pixels: np.ndarray, cells: tuple[int, int]) -> np.ndarray:
    """``pixels`` (a level's bool mask) OR-ed into ``cells``: pixel (y, x) in cell
    (y * my // ny, x * mx // nx)."""
    (ny, nx), (my, mx) = pixels.shape, cells
    out = np.zeros(cells, bool)
    ys, xs = np.nonzero(pixels)
    np.logical_or.at(out, (ys * my // ny, xs * mx // nx), True)
    return out


FAR = 1e12  # "to the edge of the image", drawn huge: far past 2**31 cells


@pytest.mark.parametrize(
    ("ring", "rows", "columns"),
    [
        ([(10, 10), (FAR, 10), (FAR, 50), (10, 50)], np.s_[10:50], np.s_[10:]),  # +x
        ([(-FAR, 10), (50, 10), (50, 50), (-FAR, 50)], np.s_[10:50], np.s_[:50]),  # -x
        ([(10, 10), (50, 10), (50, FAR), (10, FAR)], np.s_[10:], np.s_[10:50]),  # +y
        ([(10, -FAR), (50, -FAR), (50, 50), (10, 50)], np.s_[:50], np.s_[10:50]),  # -y
        ([(-FAR, -FAR), (FAR, -FAR), (FAR, FAR), (-FAR, FAR)], np.s_[:], np.s_[:]),  # around
    ],
    ids=["right", "left", "down", "up", "around"],
)
def test_a_polygon_reaching_far_past_the_image_on_any_side_marks_what_it_covers(
    tmp_path, ring, rows, columns
):
    """GDAL's rasteriser drops a polygon reaching past 2**31 cells: one drawn to y = 1e12
    ("to the bottom") left the file refused as overlapping nothing, as one drawn far in x
    did before it was cut to the mask."""
    path = tmp_path / "far.geojson"
    closed = [list(p) for p in (*ring, ring[0])]
    path.write_text(json.dumps({"type": "Polygon", "coordinates": [closed]}))
    expected = np.zeros((100, 100), bool)
    expected[rows, columns] = True
    mask = read_mask_file(path, ArrayReader(np.zeros((100, 100, 3), np.uint8)), (100, 100))
    np.testing.assert_array_equal(mask, expected)


@pytest.mark.parametrize(
    "ring",
    [
        [(10, 10), (50, 10), (50, 50), (25.5, 50), (25.5, 90), (25.5, 50), (10, 50)],
        [(10, 10), (50, 10), (50, 30.5), (90, 30.5), (50, 30.5), (50, 50), (10, 50)],
    ],
    ids=["down", "right"],
)
@pytest.mark.parametrize(
    "cells", [(100, 100), (50, 50), (30, 40)], ids=["pixels", "pairs", "uneven"]
)
def test_a_spike_out_and_back_off_the_cell_sides_marks_no_cell_outside(ring, cells):
    """A zero-width spike (a slip of a drawing tool) encloses nothing: its edge pieces lie
    inside cells outside the polygon, which marked them until it was made valid."""
    closed = [list(p) for p in (*ring, ring[0])]
    pixels = np.zeros((100, 100), bool)
    pixels[10:50, 10:50] = True  # the square; the spike has no area
    burned = cells_polygons_meet(
        [{"type": "Polygon", "coordinates": [closed]}], (1, 1), (100, 100), cells
    )
    np.testing.assert_array_equal(burned, _pooled(pixels, cells))
