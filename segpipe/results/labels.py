"""Label images a run adds beside the mask (the foreground mask).

The mask's own label image is created with the store and written by the tasks with the mask
(:func:`segpipe.results.store.write_block`). A label image that only some runs have is created
by the driver before the tasks start (:func:`add_label_image`; a resumed run finds it); each
task writes its block of it with its mask, in the same trip, at the levels a task writes
(:func:`label_block_arrays`, passed to ``write_block(labels=...)``);
:func:`segpipe.results.pyramid.build_pyramid` fills its other levels.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from typing import Any, cast

import zarr

from segpipe.geometry.pixels import pyramid_shapes
from segpipe.results.layout import create_label_image, levels_in_blocks
from segpipe.results.schema import label_path, open_root, store_of

__all__ = ["add_label_image", "label_block_arrays", "label_images"]


def label_images(path: str | os.PathLike) -> list[str]:
    """The label images the result at ``path`` lists (``"mask"`` first)."""
    labels = zarr.open_group(store_of(path), mode="r").get("labels")
    if labels is None:
        return []
    return list(cast(Mapping[str, Any], labels.attrs.get("ome", {})).get("labels", []))


def add_label_image(
    path: str | os.PathLike, name: str, meanings: Sequence[str], *, long_name: str
) -> None:
    """Create label image ``name`` of the result at ``path`` (every pyramid level, fill 0;
    value ``i`` meaning ``meanings[i]``) unless the result has it already. Called by the
    driver before the tasks, which write it.

    A label a killed call left unfinished is finished: unlisted with some of its arrays (the
    name is listed last), or, made by a release that listed it first, listed with arrays
    missing. The arrays already there are kept.
    """
    root, meta = open_root(path, "r+")
    shapes = pyramid_shapes(meta.shape, meta.config.min_level_size)
    create_label_image(root, name, shapes, meta, meanings, long_name=long_name, exist_ok=True)


def label_block_arrays(path: str | os.PathLike, name: str) -> list[zarr.Array]:
    """Label image ``name``'s arrays at the levels a task writes with its block (level 0,
    then 1..``layout.levels_in_blocks``); for ``write_block(labels=...)``."""
    root, meta = open_root(path, "r+")
    arrays = []
    for k in range(levels_in_blocks(meta) + 1):
        array = root[label_path(name, k, layout=meta.layout)]
        if not isinstance(array, zarr.Array):
            raise TypeError(f"{path}: label image {name!r} level {k} is not a Zarr array")
        arrays.append(array)
    return arrays
