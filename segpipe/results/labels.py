"""Label images a run adds beside the mask (the foreground mask), written by the driver.

The mask's own label image is created with the store and written by the tasks with the mask
(:func:`segpipe.results.store.write_block`). A label image that only some runs have is created
here on first use (so a resumed run finds it), written block by block at the levels a task
writes (``layout.levels_in_blocks``), one whole shard each;
:func:`segpipe.results.pyramid.build_pyramid` fills its other levels.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Mapping, Sequence
from typing import Any, Literal, cast

import numpy as np
import zarr

from segpipe.geometry.pixels import pyramid_shapes
from segpipe.geometry.tiling import Box
from segpipe.io.files import URLPath
from segpipe.results.layout import create_label_image, levels_in_blocks
from segpipe.results.pyramid import block_levels
from segpipe.results.schema import ResultMeta, label_path
from segpipe.results.store import write_together

__all__ = ["WRITE_GROUP_BYTES", "label_images", "write_label_image"]

WRITE_GROUP_BYTES = 24 << 20
"""Bytes of blocks a label image's writer holds before it writes them all at once (16 of the
default 1024 px blocks, whose levels take 1.3 MB each)."""


def _open(path: str | os.PathLike, mode: Literal["r", "r+"]) -> zarr.Group:
    return zarr.open_group(path if isinstance(path, URLPath) else os.fspath(path), mode=mode)


def label_images(path: str | os.PathLike) -> list[str]:
    """The label images the result at ``path`` lists (``"mask"`` first)."""
    labels = _open(path, "r").get("labels")
    if labels is None:
        return []
    return list(cast(Mapping[str, Any], labels.attrs.get("ome", {})).get("labels", []))


def write_label_image(
    path: str | os.PathLike,
    name: str,
    meanings: Sequence[str],
    blocks: Iterable[tuple[Box, np.ndarray]],
    *,
    long_name: str,
) -> None:
    """Write ``(y, x)`` uint8 ``blocks`` (level-0 pixels) into label image ``name`` of the
    result at ``path``, at level 0 and the levels the result's tasks write, creating the label
    image (every pyramid level, value ``i`` meaning ``meanings[i]``) if the result has none
    yet. Each box must be a task's block; pixels of no block keep the fill value, 0. Called
    by the driver only."""
    root = _open(path, "r+")
    meta = ResultMeta.from_attrs(cast(Mapping[str, Any], root.attrs["segpipe"]))
    if name not in label_images(path):
        shapes = pyramid_shapes(meta.shape, meta.config.min_level_size)
        create_label_image(root, name, shapes, meta, meanings, long_name=long_name)
    arrays = []
    for k in range(levels_in_blocks(meta) + 1):
        array = root[label_path(name, k, layout=meta.layout)]
        if not isinstance(array, zarr.Array):
            raise TypeError(f"{path}: label image {name!r} level {k} is not a Zarr array")
        arrays.append(array)
    # Written a group of blocks at a time, together (each level of a block is one whole
    # shard): 43 blocks of the 8192^2 demo slide's foreground took 0.67 s one write at a time.
    writes: list[tuple[zarr.Array, tuple[slice, ...], np.ndarray]] = []
    held = 0
    for box, values in blocks:
        levels = block_levels(box, np.asarray(values, dtype=np.uint8), "mode", len(arrays) - 1)
        for array, (at, level) in zip(arrays, levels, strict=True):
            writes.append((array, at.slices, level))
            held += level.nbytes
        if held >= WRITE_GROUP_BYTES:
            write_together(writes)
            writes, held = [], 0
    if writes:
        write_together(writes)
