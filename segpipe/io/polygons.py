"""Polygons (GeoJSON or shapely, in level-0 pixels) burned into the cells of a mask over an
image's level: which cells' pixels they meet, exactly, whatever the cells' sizes."""

from __future__ import annotations

from typing import Any

import numpy as np

__all__ = ["FAR", "cells_polygons_meet", "clipped"]

# Cells from the mask's origin within which GDAL burns a polygon as it is (past 2**31 it
# dropped one): only a polygon reaching farther is cut, its self-crossings made valid first.
FAR = 2**29


def clipped(
    polygon: dict[str, Any], bounds: Any, rect: tuple[float, ...], reach: tuple[float, ...]
) -> Any:
    """``polygon`` as it is where its ``bounds`` lie within ``reach`` ``(x0, y0, x1, y1)``,
    else cut to ``rect`` (a shapely geometry), None where nothing of it is left."""
    x0, y0, x1, y1 = reach
    if x0 <= bounds[0] and y0 <= bounds[1] and bounds[2] <= x1 and bounds[3] <= y1:
        return polygon
    import shapely
    from shapely.geometry import shape

    with np.errstate(all="ignore"):  # 1e300 coordinates overflow in the cut, harmlessly
        cut = shapely.clip_by_rect(shapely.make_valid(shape(polygon)), *rect)
    return None if cut.is_empty else cut


def cells_polygons_meet(
    polygons: list[Any],
    downsample: tuple[float, float],
    level: tuple[int, int],
    cells: tuple[int, int],
) -> np.ndarray:
    """``cells`` ``(my, mx)`` bool over a level of ``level`` ``(ny, nx)`` pixels of
    ``downsample`` level-0 pixels each: True where a polygon (level-0 pixels, GeoJSON or
    shapely) reaches into one of the cell's pixels (meets its inside, not only its sides).

    A cell holds the level pixels that start in it (``i * m // n``), so where ``n`` is no
    whole number of ``m`` cells hold unequal runs of pixels, which no affine grid draws (a
    uniform one moved cell edges by up to a pixel; one cell OR-ed with the next marked cells
    up to a cell away). Each cell is scaled onto a unit square instead, with a vertex put
    where an edge crosses a cell's side, so that each piece of an edge lies in one cell, and
    marks that cell; a cell no edge crosses is inside a polygon or outside all, as its centre
    is (GDAL's all_touched, the alternative, missed corners cut off by less than a pixel).
    """
    import shapely
    from rasterio.features import rasterize
    from rasterio.transform import Affine
    from shapely.geometry import shape

    burned = np.zeros(cells, dtype=bool)
    geometries = (g if isinstance(g, shapely.Geometry) else shape(g) for g in polygons)
    parts = [p for g in geometries for p in _polygon_parts(shapely.force_2d(g))]
    # An invalid polygon's edges need not border its inside (a spike out and back, a hole
    # on its shell's side): made valid, they do. A shell's self-crossings enclose their
    # union (an hourglass is two triangles), and its holes are cut out of it.
    invalid = [i for i, valid in enumerate(shapely.is_valid(parts)) if not valid]
    for i in reversed(invalid):
        parts[i : i + 1] = _polygon_parts(shapely.make_valid(parts[i], method="structure"))
    if not parts:
        return burned
    # All rings at once (50 000 nuclei in seconds): coordinates, where each ring starts.
    _, xy, (starts, ends) = shapely.to_ragged_array(parts)
    xy = xy / np.array(downsample[::-1])  # level pixels (x, y)
    # Level pixels where each cell starts, and the level's end: cell j from ceil(j * n / m).
    sides = [-(-np.arange(m + 1) * n // m) for n, m in zip(level, cells, strict=True)][::-1]
    last = np.zeros(len(xy), dtype=bool)
    last[starts[1:] - 1] = True  # a ring's closing point starts no edge
    edge = np.flatnonzero(~last)
    p, q = xy[edge], xy[edge + 1]
    # Points keyed by (the coordinate they follow, how far along its edge): every coordinate
    # at 0, and on each edge a point at every cell side it crosses (axis 0: x, 1: y).
    keys, ats, axes = [np.arange(len(xy))], [np.zeros(len(xy))], [np.full(len(xy), -1)]
    for a, side in enumerate(sides):
        lo, hi = np.minimum(p[:, a], q[:, a]), np.maximum(p[:, a], q[:, a])
        first, count = np.searchsorted(side, lo, "right"), np.searchsorted(side, hi, "left")
        count = np.maximum(count - first, 0)
        e = np.repeat(np.arange(len(edge)), count)
        k = first[e] + np.arange(count.sum()) - np.repeat(np.cumsum(count) - count, count)
        keys.append(edge[e])
        ats.append((side[k] - p[e, a]) / (q[e, a] - p[e, a]))
        axes.append(np.full(len(e), a))
    key, t, axis = (np.concatenate(v) for v in (keys, ats, axes))
    order = np.lexsort((t, key))
    key, t, axis = key[order], t[order, None], axis[order]
    nxt = np.minimum(key + 1, len(xy) - 1)
    points = xy[key] + t * (xy[nxt] - xy[key])
    units = np.stack([_cell_units(points[:, a], side) for a, side in enumerate(sides)], axis=1)
    for a in (0, 1):  # a crossing lies on its cell side exactly, whatever the rounding
        units[axis == a, a] = np.round(units[axis == a, a])
    ring_starts = np.searchsorted(key, starts)  # where each ring's first coordinate went
    # Each piece of an edge marks the cell it lies in; one along a side (its middle on a
    # cell edge) none.
    closing = np.zeros(len(units), dtype=bool)
    closing[ring_starts[1:] - 1] = True
    piece = np.flatnonzero(~closing)
    middle = (units[piece] + units[piece + 1]) / 2
    middle = middle[(middle != np.floor(middle)).all(axis=1)]
    cx, cy = np.floor(middle).astype(np.int64).T
    keep = (cx >= 0) & (cx < cells[1]) & (cy >= 0) & (cy < cells[0])
    burned[cy[keep], cx[keep]] = True
    # The cells no edge crosses are inside a polygon or outside all, as their centres are.
    warped = shapely.from_ragged_array(shapely.GeometryType.POLYGON, units, (ring_starts, ends))
    burned |= rasterize(
        warped, out_shape=cells, transform=Affine.identity(), fill=0, default_value=1,
        dtype="uint8",
    ).astype(bool)  # fmt: skip
    return burned


def _polygon_parts(geometry: Any) -> list[Any]:
    """The non-empty polygons of a shapely geometry, at any depth of collections."""
    import shapely

    if isinstance(geometry, shapely.Polygon):
        return [] if geometry.is_empty else [geometry]
    if isinstance(geometry, shapely.MultiPolygon | shapely.GeometryCollection):
        return [p for g in geometry.geoms for p in _polygon_parts(g)]
    return []  # a line or point make_valid left of a collapsed ring: no area


def _cell_units(v: np.ndarray, starts: np.ndarray) -> np.ndarray:
    """Level pixels ``v`` along an axis as cells (cell ``j`` from ``starts[j]``), linear
    within each cell and, outside the level, as wide as the cell at that end."""
    inner = np.interp(v, starts, np.arange(len(starts), dtype=np.float64))
    before = v / (starts[1] - starts[0])
    after = len(starts) - 1 + (v - starts[-1]) / (starts[-1] - starts[-2])
    return np.where(v < 0, before, np.where(v > starts[-1], after, inner))
