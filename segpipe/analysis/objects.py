"""Connected objects of a class, labelled chunk by chunk and merged across chunk borders.

Each chunk of the mask is labelled on its own (scipy), then the label pairs that touch across
chunk borders are merged with a union-find, so a gigapixel mask is never whole in memory and an
object spanning many chunks is counted once.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import dask
import numpy as np
import pandas as pd
import xarray as xr
from scipy import ndimage

from segpipe.analysis.regions import (
    Region,
    as_dataset,
    class_index,
    coordinate_step,
    pixel_area,
    select_region,
    threshold_mask,
)
from segpipe.results import naming_damage

__all__ = ["OBJECT_COLUMNS", "UnionFind", "object_labels", "object_table"]

# The columns of object_table, in order (an empty table keeps them).
OBJECT_COLUMNS = (
    "label",
    "area_px",
    "area",
    "centroid_y",
    "centroid_x",
    "bbox_y0",
    "bbox_x0",
    "bbox_y1",
    "bbox_x1",
    "mean_probability",
)


@dataclass(frozen=True)
class _Block:
    """Objects of one chunk: provisional ids (unique over the image), their sums, edges."""

    ids: np.ndarray  # (n,) int64
    area: np.ndarray
    sum_y: np.ndarray  # of row indices, for centroids
    sum_x: np.ndarray
    sum_p: np.ndarray  # of probabilities, for means
    y0: np.ndarray  # bbox, half-open, image pixel indices
    x0: np.ndarray
    y1: np.ndarray
    x1: np.ndarray
    top: np.ndarray  # provisional ids along the chunk's edges, 0 = background
    bottom: np.ndarray
    left: np.ndarray
    right: np.ndarray


def _structure(connectivity: int) -> np.ndarray:
    if connectivity not in (1, 2):
        raise ValueError(f"connectivity must be 1 (4-neighbours) or 2 (8), got {connectivity}")
    return ndimage.generate_binary_structure(2, connectivity)


def _label(fg: np.ndarray, connectivity: int) -> tuple[np.ndarray, int]:
    lab, n = ndimage.label(fg, structure=_structure(connectivity))
    return lab.astype(np.int64), int(n)


def _block_objects(
    fg: np.ndarray, prob: np.ndarray, y0: int, x0: int, offset: int, connectivity: int
) -> _Block:
    lab, n = _label(fg, connectivity)
    flat = lab.ravel()
    h, w = fg.shape
    rows = np.broadcast_to(np.arange(h, dtype=np.float64)[:, None], fg.shape).ravel()
    cols = np.broadcast_to(np.arange(w, dtype=np.float64)[None, :], fg.shape).ravel()

    def sums(weights: np.ndarray | None) -> np.ndarray:
        return np.bincount(flat, weights=weights, minlength=n + 1)[1:]

    area = sums(None)
    bb = np.array(
        [[s[0].start, s[1].start, s[0].stop, s[1].stop] for s in ndimage.find_objects(lab)],
        dtype=np.int64,
    ).reshape(-1, 4) + np.array([y0, x0, y0, x0])
    ids = np.where(lab > 0, lab + offset, 0)
    return _Block(
        ids=np.arange(1, n + 1, dtype=np.int64) + offset,
        area=area.astype(np.int64),
        sum_y=sums(rows) + y0 * area,
        sum_x=sums(cols) + x0 * area,
        sum_p=sums(prob.ravel().astype(np.float64)),
        y0=bb[:, 0],
        x0=bb[:, 1],
        y1=bb[:, 2],
        x1=bb[:, 3],
        top=ids[0].copy(),
        bottom=ids[-1].copy(),
        left=ids[:, 0].copy(),
        right=ids[:, -1].copy(),
    )


class UnionFind:
    """Disjoint sets over ``0..n-1``; the root of a set is its smallest member.

    >>> uf = UnionFind(4)
    >>> uf.union(3, 1); uf.union(1, 2)
    >>> [uf.find(i) for i in range(4)]
    [0, 1, 1, 1]
    """

    def __init__(self, n: int) -> None:
        self.parent = np.arange(n, dtype=np.int64)

    def find(self, i: int) -> int:
        root = i
        while self.parent[root] != root:
            root = int(self.parent[root])
        while self.parent[i] != root:  # path compression
            self.parent[i], i = root, int(self.parent[i])
        return root

    def union(self, a: int, b: int) -> None:
        ra, rb = self.find(a), self.find(b)
        if ra != rb:
            self.parent[max(ra, rb)] = min(ra, rb)


def _touching(a: np.ndarray, b: np.ndarray, connectivity: int) -> np.ndarray:
    """(k, 2) id pairs of two facing edges (``a`` on one side, ``b`` on the other)."""
    shifts = (0,) if connectivity == 1 else (-1, 0, 1)
    pairs = []
    for s in shifts:
        lo, hi = max(0, s), len(a) + min(0, s)
        pa, pb = a[lo:hi], b[lo - s : hi - s]
        keep = (pa > 0) & (pb > 0)
        pairs.append(np.stack([pa[keep], pb[keep]], axis=1))
    return np.concatenate(pairs)


def _border_pairs(grid: list[list[_Block]], connectivity: int) -> np.ndarray:
    pairs = [np.empty((0, 2), np.int64)]
    ny, nx = len(grid), len(grid[0])
    for i in range(ny):
        for j in range(nx):
            b = grid[i][j]
            if i + 1 < ny:
                pairs.append(_touching(b.bottom, grid[i + 1][j].top, connectivity))
            if j + 1 < nx:
                pairs.append(_touching(b.right, grid[i][j + 1].left, connectivity))
            if connectivity == 2 and i + 1 < ny and j + 1 < nx:
                # Diagonal chunk corners: 8-connected objects may meet only there.
                for p, q in (
                    (b.bottom[-1], grid[i + 1][j + 1].top[0]),
                    (grid[i][j + 1].bottom[0], grid[i + 1][j].top[-1]),
                ):
                    if p > 0 and q > 0:
                        pairs.append(np.array([[p, q]], dtype=np.int64))
    return np.unique(np.concatenate(pairs), axis=0)


@dataclass(frozen=True)
class _Objects:
    table: pd.DataFrame
    provisional: np.ndarray  # sorted provisional ids
    final: np.ndarray  # their labels, 1..N
    offsets: list[list[int]]  # per chunk
    chunks: tuple[tuple[int, ...], ...]


def _foreground(ds: xr.Dataset, class_name: str, threshold: float | None) -> xr.DataArray:
    if threshold is None:
        return ds["mask"] == class_index(ds, class_name)
    return threshold_mask(ds, class_name, threshold)


def _find_objects(
    ds: xr.Dataset,
    class_name: str,
    *,
    threshold: float | None,
    connectivity: int,
    chunks: Any,
    offset_yx: tuple[int, int],
) -> _Objects:
    found = _foreground(ds, class_name, threshold)
    if isinstance(chunks, Mapping):  # by dimension name ({"y": 1024}): dask's rechunk refuses
        found, chunks = found.chunk(chunks), None
    fg = found.data if chunks is None else found.data.rechunk(chunks)
    prob = ds["probabilities"].sel({"class": class_name}, drop=True).data
    prob = prob.rechunk(fg.chunks)
    cy, cx = fg.chunks
    starts_y, starts_x = np.cumsum((0, *cy)), np.cumsum((0, *cx))
    stride = max(cy) * max(cx) + 1  # more than any chunk's label count: ids never collide
    fg_blocks, prob_blocks = fg.to_delayed(), prob.to_delayed()
    offsets = [[(i * len(cx) + j) * stride for j in range(len(cx))] for i in range(len(cy))]
    todo = [
        [
            dask.delayed(_block_objects)(
                fg_blocks[i, j],
                prob_blocks[i, j],
                int(starts_y[i]) + offset_yx[0],
                int(starts_x[j]) + offset_yx[1],
                offsets[i][j],
                connectivity,
            )
            for j in range(len(cx))
        ]
        for i in range(len(cy))
    ]
    grid: list[list[_Block]] = [list(row) for row in dask.compute(*todo)]
    blocks = [b for row in grid for b in row]
    ids = np.concatenate([b.ids for b in blocks])  # sorted: offsets grow row-major
    uf = UnionFind(len(ids))
    for a, b in _border_pairs(grid, connectivity):
        uf.union(int(np.searchsorted(ids, a)), int(np.searchsorted(ids, b)))
    roots = np.array([uf.find(i) for i in range(len(ids))], dtype=np.int64)
    _, final = np.unique(roots, return_inverse=True)
    final = final.astype(np.int64) + 1
    n = int(final.max()) if final.size else 0

    def cat(name: str) -> np.ndarray:
        return np.concatenate([getattr(b, name) for b in blocks])

    def total(name: str) -> np.ndarray:
        return np.bincount(final, weights=cat(name), minlength=n + 1)[1:]

    def extreme(name: str, ufunc: np.ufunc, start: int) -> np.ndarray:
        out = np.full(n + 1, start, dtype=np.int64)
        ufunc.at(out, final, cat(name))
        return out[1:]

    area = total("area")
    big = np.iinfo(np.int64).max
    sy, sx = coordinate_step(ds["y"]), coordinate_step(ds["x"])
    y_first = float(ds["y"][0]) - sy * (offset_yx[0])
    x_first = float(ds["x"][0]) - sx * (offset_yx[1])
    with np.errstate(invalid="ignore", divide="ignore"):
        table = pd.DataFrame(
            {
                "label": np.arange(1, n + 1, dtype=np.int64),
                "area_px": area.astype(np.int64),
                "area": area * pixel_area(ds),
                "centroid_y": y_first + sy * total("sum_y") / area,
                "centroid_x": x_first + sx * total("sum_x") / area,
                "bbox_y0": extreme("y0", np.minimum, big),
                "bbox_x0": extreme("x0", np.minimum, big),
                "bbox_y1": extreme("y1", np.maximum, 0),
                "bbox_x1": extreme("x1", np.maximum, 0),
                "mean_probability": total("sum_p") / area,
            },
            columns=list(OBJECT_COLUMNS),
        )
    table.attrs["units"] = ds["x"].attrs.get("units", "pixel")
    return _Objects(table, ids, final, offsets, fg.chunks)


def _region_offset(full: xr.Dataset, part: xr.Dataset) -> tuple[int, int]:
    """Pixel index of ``part``'s first pixel in ``full`` (its level)."""
    return (
        int(full.indexes["y"].get_loc(part["y"].values[0])),
        int(full.indexes["x"].get_loc(part["x"].values[0])),
    )


def object_table(
    result: str | os.PathLike | xr.Dataset,
    class_name: str,
    *,
    region: Region | None = None,
    level: int = 0,
    threshold: float | None = None,
    connectivity: int = 1,
    chunks: Any = None,
) -> pd.DataFrame:
    """Connected components of ``class_name``, one row per object.

    The mask is labelled chunk by chunk (in parallel) and labels that touch across a chunk
    border are merged with a union-find, so an object cut by chunk edges is one object.

    Parameters
    ----------
    result
        A result path or a Dataset from :func:`segpipe.open_result`.
    class_name
        The class whose pixels form objects (``mask == class``).
    region
        ``(x0, y0, x1, y1)`` in coordinate units; objects are clipped to it.
    level
        Pyramid level (paths only).
    threshold
        Objects from ``probability > threshold`` instead of the argmax mask.
    connectivity
        1: pixels sharing an edge are connected; 2: corners too.
    chunks
        Rechunk before labelling, as xarray's ``chunk`` takes it (``{"y": 1024, "x": 1024}``,
        a tuple, an int; default: the stored chunks).

    Returns
    -------
    pandas.DataFrame
        ``label`` (1..N, in row-major order of each object's first chunk), ``area_px``,
        ``area`` (coordinate units squared: µm² when the pixel size is known),
        ``centroid_y``/``centroid_x`` (coordinates), ``bbox_y0, bbox_x0, bbox_y1, bbox_x1``
        (half-open pixel indices of the level), ``mean_probability`` (of ``class_name``).
    """
    return _objects_of(result, class_name, region, level, threshold, connectivity, chunks)[1].table


def _objects_of(
    result: str | os.PathLike | xr.Dataset,
    class_name: str,
    region: Region | None,
    level: int,
    threshold: float | None,
    connectivity: int,
    chunks: Any,
) -> tuple[xr.Dataset, _Objects]:
    """The region of ``result`` the objects are found in, and its objects (computed now)."""
    full = as_dataset(result, level)
    # A loaded Dataset (``open_result(...).load()``) as one chunk; a lazy one keeps its chunks.
    ds = select_region(full, region).chunk()
    # A chunk that cannot be read is named by the result it is of, where a path says which.
    damage = contextlib.nullcontext() if isinstance(result, xr.Dataset) else naming_damage(result)
    with damage:
        objects = _find_objects(
            ds,
            class_name,
            threshold=threshold,
            connectivity=connectivity,
            chunks=chunks,
            offset_yx=_region_offset(full, ds),
        )
    return ds, objects


def _relabel(
    fg: np.ndarray,
    offsets: list[list[int]],
    connectivity: int,
    provisional: np.ndarray,
    final: np.ndarray,
    block_id: tuple[int, int] = (0, 0),
) -> np.ndarray:
    lab, _ = _label(fg, connectivity)
    on = lab > 0
    out = np.zeros(lab.shape, dtype=np.int64)
    out[on] = final[np.searchsorted(provisional, lab[on] + offsets[block_id[0]][block_id[1]])]
    return out


def object_labels(
    result: str | os.PathLike | xr.Dataset,
    class_name: str,
    *,
    region: Region | None = None,
    level: int = 0,
    threshold: float | None = None,
    connectivity: int = 1,
    chunks: Any = None,
) -> tuple[xr.DataArray, pd.DataFrame]:
    """(y, x) int64 object labels (0 = none), lazy, and the :func:`object_table` they match.

    The table is computed now (one pass over the chunks); each chunk's labels are computed
    again, and renumbered to the table's, when the returned array is.
    """
    ds, objs = _objects_of(result, class_name, region, level, threshold, connectivity, chunks)
    fg = _foreground(ds, class_name, threshold).data.rechunk(objs.chunks)
    labels = fg.map_blocks(
        _relabel,
        objs.offsets,
        connectivity,
        objs.provisional,
        objs.final,
        dtype=np.int64,
        meta=np.empty((0, 0), np.int64),
    )
    arr = xr.DataArray(
        labels, dims=("y", "x"), coords={"y": ds["y"], "x": ds["x"]}, name=f"{class_name}_objects"
    )
    return arr, objs.table
