"""The arrays of a result store: creating its skeleton and finding its level-0 arrays.

Everything that knows where a result keeps which array lives here (and in
:func:`segpipe.results.schema.level_path`); :mod:`segpipe.results.store` only decides when to
create, write and finish.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import zarr
from zarr.codecs import ZstdCodec
from zarr.core.array_spec import ArrayConfigParams

from segpipe.geometry.pixels import pyramid_shapes
from segpipe.io.files import utc_now
from segpipe.io.ome import (
    OME_VERSION,
    PixelGrid,
    label_attributes,
    multiscale_attributes,
    omero_attributes,
)
from segpipe.results.schema import LABEL_NAME, ResultMeta, level_path
from segpipe.version import __version__

__all__ = ["COUNTS", "PROGRESS", "UINT8_SCALE", "create_layout", "level0_arrays"]

PROGRESS = "_segpipe/tiles_done"
COUNTS = "_segpipe/class_pixels"
_PROGRESS_CHUNKS = (64, 64)
UINT8_SCALE = 1 / 255
_ZSTD = ZstdCodec(level=3)
_SPARSE: ArrayConfigParams = {"write_empty_chunks": False}


def _provenance(meta: ResultMeta) -> dict[str, Any]:
    return replace(
        meta,
        version=__version__,
        state="computing",
        started=utc_now(),
        finished=None,
        summary=None,
    ).to_attrs()


def create_layout(path: Path, meta: ResultMeta) -> None:
    shapes = pyramid_shapes(meta.shape, meta.config.min_level_size)
    grid = PixelGrid.of(meta.pixel_size_um, meta.crs, meta.transform)
    unit = grid.ome_unit
    step = (abs(grid.step[0]), abs(grid.step[1]))
    levels = [level_path(k) for k in range(len(shapes))]
    ome = {
        "version": OME_VERSION,
        "multiscales": [
            multiscale_attributes(
                "probabilities",
                [f"{g}/probabilities".lstrip("/") for g in levels],
                step,
                unit,
                channel="class",
                method="mean",
            )
        ],
        # Channel names and colours for viewers (napari's layers), from the one palette.
        "omero": omero_attributes(
            meta.class_names,
            maximum=255.0 if meta.config.probability_dtype == "uint8" else 1.0,
        ),
    }
    root = zarr.create_group(
        str(path), zarr_format=3, attributes={"ome": ome, "segpipe": _provenance(meta)}
    )
    for k, (ny, nx) in enumerate(shapes):
        group = root if k == 0 else root.require_group(levels[k])
        _create_level(group, k, (ny, nx), meta, grid)
    labels = root.create_group(
        "labels", attributes={"ome": {"version": OME_VERSION, "labels": [LABEL_NAME]}}
    )
    label = labels.create_group(
        LABEL_NAME,
        attributes={"ome": label_attributes(LABEL_NAME, len(shapes), step, unit, meta.class_names)},
    )
    for k, shape in enumerate(shapes):
        _mask_array(label, str(k), shape, meta)

    tiles = (-(-meta.shape[0] // meta.tile), -(-meta.shape[1] // meta.tile))
    # Driver-owned bookkeeping, chunked so a flush rewrites only the chunks it touched.
    root.create_array(
        PROGRESS,
        shape=tiles,
        chunks=_PROGRESS_CHUNKS,
        dtype="uint8",
        fill_value=0,
        dimension_names=("tile_y", "tile_x"),
    )
    root.create_array(
        COUNTS,
        shape=(*tiles, len(meta.class_names)),
        chunks=(*_PROGRESS_CHUNKS, len(meta.class_names)),
        dtype="int64",
        fill_value=0,
        dimension_names=("tile_y", "tile_x", "class"),
    )


def _mask_array(
    group: zarr.Group,
    name: str,
    shape: tuple[int, int],
    meta: ResultMeta,
    extra: dict[str, Any] | None = None,
) -> None:
    t, s = meta.tile, meta.shard
    group.create_array(
        name,
        shape=shape,
        chunks=(t, t),
        shards=(s, s),
        dtype="uint8",
        fill_value=0,
        compressors=_ZSTD,
        dimension_names=("y", "x"),
        config=_SPARSE,
        attributes={
            "long_name": "argmax class",
            "flag_values": list(range(len(meta.class_names))),
            "flag_meanings": " ".join(meta.class_names),
            **(extra or {}),
        },
    )


def _create_level(
    group: zarr.Group, k: int, shape: tuple[int, int], meta: ResultMeta, grid: PixelGrid
) -> None:
    ny, nx = shape
    c, t, s = len(meta.class_names), meta.tile, meta.shard
    geo: dict[str, Any] = {}
    if grid.crs_wkt is not None:
        # CF grid mapping, as rioxarray writes and reads it: ds.rio.crs works on any level.
        a, _, x0, _, e, y0 = grid.transform or ()
        ref = group.create_array("spatial_ref", shape=(), dtype="int64", dimension_names=())
        ref.attrs.update(
            crs_wkt=grid.crs_wkt,
            spatial_ref=grid.crs_wkt,
            GeoTransform=f"{x0} {a * 2**k} 0 {y0} 0 {e * 2**k}",
        )
        ref[()] = 0
        geo = {"grid_mapping": "spatial_ref", "coordinates": "spatial_ref"}
    _mask_array(group, "mask", shape, meta, geo)
    attrs: dict[str, Any] = {"long_name": "softmax class probability", **geo}
    if meta.config.probability_dtype == "uint8":
        # CF packing: xarray (and netCDF tools) decode value * scale_factor + add_offset.
        attrs.update(scale_factor=UINT8_SCALE, add_offset=0.0)
    group.create_array(
        "probabilities",
        shape=(c, ny, nx),
        chunks=(c, t, t),
        shards=(c, s, s),
        dtype=meta.config.probability_dtype,
        fill_value=0,
        compressors=_ZSTD,
        dimension_names=("class", "y", "x"),
        config=_SPARSE,
        attributes=attrs,
    )
    for axis, (dim, n) in enumerate((("y", ny), ("x", nx))):
        coord = group.create_array(
            dim, shape=(n,), chunks=(n,), dtype="float64", dimension_names=(dim,),
            attributes={"units": grid.units, "long_name": f"{dim} of pixel centre"},
        )  # fmt: skip
        coord[:] = grid.coordinates(axis, n, k)
    names = group.create_array("class", shape=(c,), dtype=str, dimension_names=("class",))
    names[:] = np.array(meta.class_names, dtype=object)


def level0_arrays(path: str) -> tuple[zarr.Array, zarr.Array, zarr.Array]:
    # Opened per block, never cached by path: a cached handle outlives an overwrite of the
    # result and would write the new store in the old layout. One open is a few small JSON
    # reads, nothing beside a block's forward passes.
    root = zarr.open_group(path, mode="r+")
    return (
        root["mask"],
        root["probabilities"],
        root[f"labels/{LABEL_NAME}/0"],
    )  # type: ignore[return-value]
