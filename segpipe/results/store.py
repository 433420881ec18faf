"""Writing a result: create or resume the store, write whole shards, record progress, finish.

Arrays are chunked like the output tiles and sharded by one task's block of tiles
(``task_tiles * tile`` pixels): every task writes whole shards, which is what makes concurrent
writers safe in Zarr v3. The driver alone writes the ``_segpipe`` bookkeeping arrays.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import time
import uuid
import warnings
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any, cast

import numpy as np
import zarr
from zarr.codecs import ZstdCodec
from zarr.core.array_spec import ArrayConfigParams

from segpipe.faults import fault_point
from segpipe.geometry.pixels import pyramid_shapes
from segpipe.geometry.tiling import Box
from segpipe.io.files import utc_now
from segpipe.io.ome import (
    OME_VERSION,
    PixelGrid,
    label_attributes,
    multiscale_attributes,
    omero_attributes,
)
from segpipe.results.pyramid import build_pyramid
from segpipe.results.schema import (
    LABEL_NAME,
    ResultMeta,
    ResultMismatchError,
    RunSummary,
    is_result,
    level_path,
    read_attrs,
)
from segpipe.version import __version__

__all__ = [
    "class_pixels",
    "encode_probabilities",
    "finalize_result",
    "mark_tiles_done",
    "prepare_result",
    "quiet_consolidated",
    "tiles_done",
    "write_block",
    "write_tiles",
]

_PROGRESS = "_segpipe/tiles_done"
_COUNTS = "_segpipe/class_pixels"
_PROGRESS_CHUNKS = (64, 64)
_UINT8_SCALE = 1 / 255
_ZSTD = ZstdCodec(level=3)
_SPARSE: ArrayConfigParams = {"write_empty_chunks": False}


def prepare_result(
    path: str | os.PathLike, meta: ResultMeta, *, overwrite: bool = False
) -> np.ndarray:
    """Create the result store, or reopen a compatible unfinished one.

    Returns the (tile_y, tile_x) bool map of tiles already written: all False for a new store,
    what an interrupted run finished for a resumed one, all True for a complete one.

    Raises ``ResultMismatchError`` when ``path`` holds anything else: a result of other inputs
    or parameters (unless ``overwrite``), or something that is not a segpipe result at all
    (an image, user data: never deleted, whatever ``overwrite`` says).

    A result appears at ``path`` whole or not at all: its skeleton is built beside it and
    renamed into place, and a replaced result is renamed aside before it is deleted, so a run
    killed at any instant leaves either nothing, the old result, or the new skeleton.
    """
    path = Path(path)
    source = Path(meta.source).resolve()
    if path.resolve() == source or source in path.resolve().parents:
        raise ResultMismatchError(
            f"{path} is the source image {meta.source} or lies inside it; a result must go "
            "elsewhere (writing there could destroy the image)"
        )
    _remove_leftovers(path)
    if path.exists():
        if not is_result(path):
            raise ResultMismatchError(
                f"{path} exists and is not a segpipe result; refusing to write into it. "
                "Choose another output path."
            )
        old = read_attrs(path)
        if old.get("identity") == meta.identity():
            return tiles_done(path)
        if not overwrite:
            changed = sorted(
                k for k, v in meta.identity().items() if old.get("identity", {}).get(k) != v
            )
            raise ResultMismatchError(
                f"{path} holds a segpipe result made with other inputs or parameters "
                f"(differs in: {', '.join(changed)}); pass overwrite=True (--overwrite) to "
                "replace it, or choose another output path."
            )
        trash = _sibling(path, "deleting")
        os.rename(path, trash)
        shutil.rmtree(trash)
    building = _sibling(path, "creating")
    try:
        _create(building, meta)
        fault_point("result.skeleton")
        os.rename(building, path)
    except BaseException:
        shutil.rmtree(building, ignore_errors=True)
        raise
    fault_point("result.created")
    return tiles_done(path)


# Leftovers of a killed run beside a result: a half-built skeleton or a half-deleted result.
_LEFTOVER_KINDS = ("creating", "deleting")
# A skeleton younger than this may belong to a run creating it right now.
_LEFTOVER_AGE_S = 600.0


def _sibling(path: Path, kind: str) -> Path:
    return path.with_name(f".{path.name}.{kind}-{uuid.uuid4().hex[:12]}")


def _remove_leftovers(path: Path) -> None:
    if not path.parent.is_dir():
        return
    now = time.time()
    for kind in _LEFTOVER_KINDS:
        for old in path.parent.glob(f".{path.name}.{kind}-*"):
            with contextlib.suppress(OSError):
                if kind == "deleting" or now - old.stat().st_mtime > _LEFTOVER_AGE_S:
                    shutil.rmtree(old)


def _provenance(meta: ResultMeta) -> dict[str, Any]:
    return replace(
        meta,
        version=__version__,
        state="computing",
        started=utc_now(),
        finished=None,
        summary=None,
    ).to_attrs()


def _create(path: Path, meta: ResultMeta) -> None:
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
        _PROGRESS,
        shape=tiles,
        chunks=_PROGRESS_CHUNKS,
        dtype="uint8",
        fill_value=0,
        dimension_names=("tile_y", "tile_x"),
    )
    root.create_array(
        _COUNTS,
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
        attrs.update(scale_factor=_UINT8_SCALE, add_offset=0.0)
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


def tiles_done(path: str | os.PathLike) -> np.ndarray:
    """(tile_y, tile_x) bool: which tiles of the result at ``path`` are written."""
    if read_attrs(path).get("complete"):
        arr = zarr.open_array(Path(path) / _PROGRESS, mode="r")
        return np.ones(arr.shape, dtype=bool)
    return np.asarray(zarr.open_array(Path(path) / _PROGRESS, mode="r")[...]).astype(bool)


def mark_tiles_done(
    path: str | os.PathLike, tile_counts: dict[tuple[int, int], np.ndarray]
) -> None:
    """Record tiles as written, with their (C,) class pixel counts.

    Called by the driver only, so the bookkeeping arrays have one writer.
    """
    if not tile_counts:
        return
    done = zarr.open_array(Path(path) / _PROGRESS, mode="r+")
    counts = zarr.open_array(Path(path) / _COUNTS, mode="r+")
    cy, cx = _PROGRESS_CHUNKS
    by_chunk: dict[tuple[int, int], list[tuple[int, int]]] = {}
    for iy, ix in tile_counts:
        by_chunk.setdefault((iy // cy, ix // cx), []).append((iy, ix))
    for (ky, kx), members in by_chunk.items():
        sl = (slice(ky * cy, (ky + 1) * cy), slice(kx * cx, (kx + 1) * cx))
        d, c = np.asarray(done[sl]), np.asarray(counts[sl])
        for iy, ix in members:
            d[iy - ky * cy, ix - kx * cx] = 1
            c[iy - ky * cy, ix - kx * cx] = tile_counts[iy, ix]
        # Counts before flags: a tile flagged done always has its counts.
        counts[sl] = c
        done[sl] = d
    fault_point("block.recorded")


def class_pixels(path: str | os.PathLike) -> np.ndarray:
    """(C,) int64 pixels of each class over the tiles written so far."""
    return np.asarray(zarr.open_array(Path(path) / _COUNTS, mode="r")[...]).sum(axis=(0, 1))


def _arrays(path: str) -> tuple[zarr.Array, zarr.Array, zarr.Array]:
    # Opened per block, never cached by path: a cached handle outlives an overwrite of the
    # result and would write the new store in the old layout. One open is a few small JSON
    # reads, nothing beside a block's forward passes.
    root = zarr.open_group(path, mode="r+")
    return (
        root["mask"],
        root["probabilities"],
        root[f"labels/{LABEL_NAME}/0"],
    )  # type: ignore[return-value]


def encode_probabilities(probabilities: np.ndarray, dtype: str) -> np.ndarray:
    """Float probabilities in the stored dtype (uint8: ``round(p * 255)``).

    >>> encode_probabilities(np.array([0.0, 0.5, 1.0]), "uint8").tolist()
    [0, 128, 255]
    """
    if dtype == "uint8":
        return np.rint(np.clip(probabilities, 0.0, 1.0) / _UINT8_SCALE).astype(np.uint8)
    return probabilities.astype(dtype)


def write_block(path: str | os.PathLike, box: Box, probabilities: np.ndarray) -> np.ndarray:
    """Write (C, y, x) float probabilities over ``box`` and their argmax mask.

    ``box`` must cover whole shards (one task's block of tiles, or its part inside the
    image), so concurrent tasks never share a shard. Returns the (y, x) uint8 mask written.
    """
    mask_arr, prob_arr, label_arr = _arrays(str(Path(path)))
    mask = np.argmax(probabilities, axis=0).astype(np.uint8)
    prob_arr[(slice(None), *box.slices)] = encode_probabilities(probabilities, prob_arr.dtype.name)
    mask_arr[box.slices] = mask
    label_arr[box.slices] = mask
    fault_point("block.written")
    return mask


def write_tiles(path: str | os.PathLike, box: Box, probabilities: np.ndarray) -> np.ndarray:
    """:func:`write_block`, returning the per-class pixel counts of the mask, (C,) int64."""
    mask = write_block(path, box, probabilities)
    return np.bincount(mask.ravel(), minlength=probabilities.shape[0]).astype(np.int64)


def finalize_result(path: str | os.PathLike, summary: RunSummary) -> ResultMeta:
    """Build the pyramid, consolidate the metadata, then mark the result complete.

    ``complete`` is the last thing written, in one atomic write of the root ``zarr.json``
    (which keeps the consolidated metadata), after everything reading needs. Finalising again
    after an interruption redoes the same steps with the same outcome. Returns the result's
    metadata as now stored.
    """
    group = zarr.open_group(path, mode="r+")
    meta = ResultMeta.from_attrs(cast(dict[str, Any], group.attrs["segpipe"]))
    group.attrs["segpipe"] = replace(meta, state="finalising").to_attrs()
    build_pyramid(path)
    fault_point("result.pyramid")
    with quiet_consolidated():
        zarr.consolidate_metadata(path)
        group = zarr.open_group(path, mode="r+")
    fault_point("result.consolidated")
    meta = replace(meta, state="complete", finished=utc_now(), summary=summary)
    group.attrs["segpipe"] = meta.to_attrs()
    return meta


@contextlib.contextmanager
def quiet_consolidated() -> Iterator[None]:
    # Consolidated metadata is a zarr-python extension to v3 that we use on purpose (one read
    # instead of one per array on object stores); its warning says nothing actionable.
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Consolidated metadata", category=UserWarning)
        yield
