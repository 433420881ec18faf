"""The arrays of a result store: creating its skeleton and finding its level-0 arrays.

Where each array lies is decided by :func:`segpipe.results.schema.level_path` and
:func:`~segpipe.results.schema.label_path` for the result's layout (``meta.layout``; see
:data:`~segpipe.results.schema.LAYOUTS`); this module creates the arrays there, and
:mod:`segpipe.results.store` only decides when to create, write and finish.
"""

from __future__ import annotations

import os
import posixpath
from collections.abc import Mapping, Sequence
from dataclasses import replace
from typing import Any, cast

import numpy as np
import zarr
from zarr.codecs import ZstdCodec
from zarr.core.array_spec import ArrayConfigParams
from zarr.core.buffer import Buffer

from segpipe.geometry.pixels import level_downsample, pyramid_shapes
from segpipe.io.files import URLPath, utc_now
from segpipe.io.ome import (
    OME_VERSION,
    PixelGrid,
    label_attributes,
    level0_placement,
    multiscale_attributes,
    omero_attributes,
)
from segpipe.results.schema import LABEL_NAME, ResultMeta, label_path, level_path, open_root
from segpipe.version import __version__

__all__ = [
    "COUNTS",
    "MIN_BLOCK_SHARD",
    "PROGRESS",
    "PROGRESS_CHUNKS",
    "UINT8_SCALE",
    "block_level_arrays",
    "create_label_image",
    "create_layout",
    "layout_documents",
    "level_tiling",
    "levels_in_blocks",
    "source_downsample",
]

PROGRESS = "_segpipe/tiles_done"
COUNTS = "_segpipe/class_pixels"
PROGRESS_CHUNKS = (64, 64)  # tiles per chunk of the two above
UINT8_SCALE = 1 / 255
# Level 1: a third less time than 3 for 2-3% more bytes on float16 probabilities, which
# compress poorly at any level (tasks spend it beside the model, on its cores).
_ZSTD = ZstdCodec(level=1, checksum=True)  # a flipped bit in a chunk is refused, not read
_SPARSE: ArrayConfigParams = {"write_empty_chunks": False}
# The smallest shard side (pixels) of a level the tasks write: smaller shards are many tiny
# objects, and the pass after the tasks builds such a level from 1/4**k of level 0 anyway.
MIN_BLOCK_SHARD = 256


def levels_in_blocks(meta: ResultMeta) -> int:
    """Pyramid levels above 0 each task writes with its block (layout 3; 0 before).

    Level ``k`` qualifies while ``2**k`` divides the tile (so blocks and rectangles of tiles
    halve exactly, as the whole level does), the block halved ``k`` times, the level's
    shard side, is still at least ``min(tile, MIN_BLOCK_SHARD)`` pixels, and that shard is
    whole chunks (:func:`level_tiling`'s chunk, the tile or the shard if smaller): a block of
    3 tiles of 512 px halves into shards of 768 px, not whole 512 px chunks, so it writes
    level 0 only.
    """
    if meta.layout < 3:
        return 0
    n = len(pyramid_shapes(meta.shape, meta.config.min_level_size)) - 1
    k, floor = 0, min(meta.tile, MIN_BLOCK_SHARD)
    while k < n and meta.tile % 2 ** (k + 1) == 0:
        shard = meta.shard >> (k + 1)
        if shard < floor or shard % min(meta.tile, shard):
            break
        k += 1
    return k


def level_tiling(meta: ResultMeta, level: int) -> tuple[int, int]:
    """``(chunk, shard)`` side in pixels of pyramid ``level``'s arrays: the tile and a task's
    block, except on levels 1..:func:`levels_in_blocks`, where the shard is the block halved
    ``level`` times (one task's share) and the chunk the tile or that, if smaller."""
    if 0 < level <= levels_in_blocks(meta):
        shard = meta.shard >> level
        return min(meta.tile, shard), shard
    return meta.tile, meta.shard


def _provenance(meta: ResultMeta) -> dict[str, Any]:
    return replace(
        meta,
        version=__version__,
        state="computing",
        # To the microsecond: it names this result apart from one made at the same path in the
        # same second (a run it replaced, whose driver must not record into it: TileRecord).
        started=utc_now("microseconds"),
        finished=None,
        summary=None,
    ).to_attrs()


def _group(root: zarr.Group, path: str) -> zarr.Group:
    """The group at ``path`` below ``root`` (``""``: root itself), created if missing."""
    return root.require_group(path) if path else root


def create_layout(path: str | os.PathLike, meta: ResultMeta) -> None:
    """Create the empty result store at ``path`` (a new local folder): the files of
    :func:`layout_documents`."""
    folders: set[str] = set()
    for key, data in layout_documents(meta).items():
        file = os.path.join(path, *key.split("/"))
        folder = os.path.dirname(file)
        if folder not in folders:
            os.makedirs(folder, exist_ok=True)
            folders.add(folder)
        with open(file, "wb") as f:
            f.write(data)


def layout_documents(meta: ResultMeta) -> dict[str, bytes]:
    """The objects of the empty result store of ``meta`` by their keys (``"0/mask/zarr.json"``),
    its arrays where ``meta.layout`` puts them.

    Every level's arrays and coordinates, the mask's label image, the driver's bookkeeping
    arrays, and the OME (``multiscales``, ``omero``) and ``segpipe`` attributes. Made in
    memory and written by the caller in one go: Zarr writing each of the ~70 objects to its
    store in turn took 0.15 s at 8192² against 0.05 s this way.
    """
    objects: dict[str, Buffer] = {}
    _build_layout(zarr.storage.MemoryStore(objects), meta)
    return {key: data.to_bytes() for key, data in objects.items()}


def _build_layout(store: zarr.storage.MemoryStore, meta: ResultMeta) -> None:
    shapes = pyramid_shapes(meta.shape, meta.config.min_level_size)
    grid = pixel_grid(meta)
    ome = {
        "version": OME_VERSION,
        "multiscales": [
            multiscale_attributes(
                "probabilities",
                [level_path(k, "probabilities", layout=meta.layout) for k in range(len(shapes))],
                _pixel_step(grid),
                grid.ome_unit,
                channel="class",
                method="mean",
                origin=_ome_origin(grid),
            )
        ],
        # Channel names and colours for viewers (napari's layers), from the one palette.
        "omero": omero_attributes(
            meta.class_names,
            maximum=255.0 if meta.config.probability_dtype == "uint8" else 1.0,
        ),
    }
    root = zarr.create_group(
        store, zarr_format=3, attributes={"ome": ome, "segpipe": _provenance(meta)}
    )
    for k, shape in enumerate(shapes):
        _create_level(_group(root, level_path(k, layout=meta.layout)), k, shape, meta, grid)
    create_label_image(root, LABEL_NAME, shapes, meta, meta.class_names, long_name="argmax class")

    tiles = (-(-meta.shape[0] // meta.tile), -(-meta.shape[1] // meta.tile))
    # Driver-owned bookkeeping, a shard per chunk: a record rewrites only the shards it
    # touched, each one file written in the driver's thread (segpipe.results.shards). Through
    # Zarr each chunk was read, merged and written on its event loop, legs waiting for the GIL.
    classes = (len(meta.class_names),)
    for name, dtype, extra in ((PROGRESS, "uint8", ()), (COUNTS, "int64", classes)):
        chunks, dims = (*PROGRESS_CHUNKS, *extra), ("tile_y", "tile_x", "class")
        root.create_array(
            name, shape=(*tiles, *extra), chunks=chunks, shards=chunks, dtype=dtype,
            fill_value=0, compressors=_ZSTD, dimension_names=dims[: len(chunks)],
        )  # fmt: skip


def _pixel_step(grid: PixelGrid) -> tuple[float, float]:
    return (abs(grid.step[0]), abs(grid.step[1]))


def _ome_origin(grid: PixelGrid) -> tuple[float, float]:
    # OME-Zarr has no CRS: a georeferenced result's OME coordinates stay pixels from 0.
    return grid.origin if grid.units in ("micrometer", "pixel") else (0.0, 0.0)


def pixel_grid(meta: ResultMeta) -> PixelGrid:
    """The coordinates of ``meta``'s result: CRS units, microns (:func:`source_origin_um`
    for the first pixel's centre) or else pixels of the source's level 0, as microns are
    placed (a level-1 result's first pixel centred at 0.5, its step 2)."""
    grid = PixelGrid.of(meta.pixel_size_um, meta.crs, meta.transform, source_origin_um(meta))
    if grid.units != "pixel" or meta.source_shape is None:
        return grid
    # As its areas (level-0 px²) and GeoJSON: in its own pixels they disagreed with both.
    dy, dx = source_downsample(meta, meta.source_shape)
    return PixelGrid(((dy - 1) / 2, (dx - 1) / 2), (float(dy), float(dx)), "pixel", None)


def source_origin_um(meta: ResultMeta) -> tuple[float, float]:
    """(y, x) microns of a result's first pixel centre: its source's (``meta.origin_um``, an
    OME-Zarr's translation; else 0) plus the centre of the source pixels it covers, ``(d - 1)
    / 2`` of them in (``d``: :func:`source_downsample` on the axis), as the result pyramid's
    levels place theirs, so results of any source level line up. That offset is 0 at level
    0 and for a result that predates ``source_shape``; all is 0 without a pixel size.

    >>> from segpipe.results.schema import ResultMeta
    >>> m = ResultMeta("s.tif", (50, 40), 1.0, ("a",), "m", "0", 0, source_shape=(100, 81))
    >>> source_origin_um(m), source_origin_um(replace(m, origin_um=(100.0, -3.0)))
    ((0.25, 0.25), (100.25, -2.75))
    """
    if not meta.pixel_size_um:
        return (0.0, 0.0)
    oy, ox = meta.origin_um or (0.0, 0.0)
    dy, dx = source_downsample(meta, meta.source_shape) if meta.source_shape else (1.0, 1.0)
    level0 = meta.pixel_size_um / dy  # the segmented level's pixel is dy of level 0's
    return (oy + (dy - 1) / 2 * level0, ox + (dx - 1) / 2 * level0)


def source_downsample(meta: ResultMeta, level0: tuple[int, int]) -> tuple[float, float]:
    """(y, x) pixels of the source's level 0 (``level0``, (y, x) pixels) per pixel of
    ``meta``'s segmented level: :func:`level_downsample` per axis, for a georeferenced result
    with ``overview_ratio``, as its transform was scaled."""
    pairs = zip(level0, meta.shape, strict=True)
    geo = bool(meta.transform)
    dy, dx = (level_downsample(n, m, overview_ratio=geo) for n, m in pairs)
    return dy, dx


def create_label_image(
    root: zarr.Group,
    name: str,
    shapes: Sequence[tuple[int, int]],
    meta: ResultMeta,
    meanings: Sequence[str],
    *,
    long_name: str,
    exist_ok: bool = False,
) -> None:
    """Add label image ``name`` to the result ``root``: one (y, x) uint8 array per pyramid level.

    ``shapes`` are the levels' (y, x) pixels, level 0 first, as the result's image has them
    (OME-Zarr asks a label for as many levels as its image); value ``i`` means
    ``meanings[i]``, which OME's ``image-label`` properties, the palette's colours and the
    arrays' CF ``flag_meanings`` say. The label joins the ``labels`` group's list, so a result
    can carry several (each is one call); :func:`segpipe.results.pyramid.build_pyramid` fills
    levels 1.. of every label listed by 2x2 mode.

    The name is listed last, after the arrays and the group's attributes: a label listed is
    whole, and a call killed part-way leaves it unlisted, for the next call to finish. Arrays
    already there with the shape and tiling asked for are kept (a killed call's, or what the
    tasks wrote into a listed one), others made anew. A label already listed is an error
    unless ``exist_ok``; then its missing arrays are made (a label listed by a release that
    listed it first and was killed before its arrays were all made).
    """
    labels = root.require_group("labels")
    if name in _listed(labels) and not exist_ok:
        raise ValueError(
            f"the result already has a label image {name!r} (labels: {_listed(labels)})"
        )
    group = label_path(name)
    paths = [label_path(name, k, layout=meta.layout) for k in range(len(shapes))]
    grid = pixel_grid(meta)  # unless the image says where it lies: an older release's grid
    step, origin = level0_placement(root.attrs.get("ome")) or (_pixel_step(grid), _ome_origin(grid))
    attrs = label_attributes(
        name, [posixpath.relpath(p, group) for p in paths], step, grid.ome_unit, meanings, origin
    )
    whole = name in _listed(labels)
    for k, (path, shape) in enumerate(zip(paths, shapes, strict=True)):
        if _is_label_array(root, path, shape, level_tiling(meta, k)):
            continue
        # Replacing what is there: a killed call's array, cut short or of other settings.
        parent, array = posixpath.split(path)
        _label_array(
            _group(root, parent), array, k, shape, meta, meanings, long_name, overwrite=True
        )
        whole = False
    image = root.require_group(group)
    if not whole or "ome" not in image.attrs:  # a resumed run's label: nothing to write
        image.attrs["ome"] = attrs
    if name not in _listed(labels):
        labels.attrs["ome"] = {"version": OME_VERSION, "labels": [*_listed(labels), name]}


def _listed(labels: zarr.Group) -> list[str]:
    return list(cast(Mapping[str, Any], labels.attrs.get("ome", {})).get("labels", []))


def _is_label_array(
    root: zarr.Group, path: str, shape: tuple[int, int], tiling: tuple[int, int]
) -> bool:
    """Whether ``path`` below ``root`` is a label array of ``shape`` and ``(chunk, shard)``
    sides ``tiling`` (False where missing, or left unreadable by a killed write)."""
    try:
        node = root.get(path)
    except ValueError:  # a zarr.json cut short (JSONDecodeError) or not an array's
        return False
    if not isinstance(node, zarr.Array):
        return False
    chunk, shard = tiling
    return (
        node.shape == shape
        and node.dtype == np.dtype("uint8")
        and node.chunks == (chunk, chunk)
        and node.shards == (shard, shard)
    )


def _label_array(
    group: zarr.Group,
    name: str,
    level: int,
    shape: tuple[int, int],
    meta: ResultMeta,
    meanings: Sequence[str],
    long_name: str,
    extra: dict[str, Any] | None = None,
    *,
    overwrite: bool = False,
) -> None:
    t, s = level_tiling(meta, level)
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
            "long_name": long_name,
            "flag_values": list(range(len(meanings))),
            # CF's meanings are words: "tumor stroma" is one, a blank name class_<id> (not none).
            "flag_meanings": " ".join(
                "_".join(m.split()) or f"class_{k}" for k, m in enumerate(meanings)
            ),
            **(extra or {}),
        },
        overwrite=overwrite,
    )


def _create_level(
    group: zarr.Group, k: int, shape: tuple[int, int], meta: ResultMeta, grid: PixelGrid
) -> None:
    ny, nx = shape
    c, (t, s) = len(meta.class_names), level_tiling(meta, k)
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
    _label_array(group, "mask", k, shape, meta, meta.class_names, "argmax class", geo)
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
        # ``step``: the spacing, which a one-pixel axis (an upper level, a one-row image)
        # cannot show; areas need it (analysis.regions.coordinate_step), with plain xarray too.
        step = grid.step[axis] * 2**k
        coord = group.create_array(
            dim, shape=(n,), chunks=(n,), dtype="float64", dimension_names=(dim,),
            attributes={"units": grid.units, "long_name": f"{dim} of pixel centre", "step": step},
        )  # fmt: skip
        coord[:] = grid.coordinates(axis, n, k)
    names = group.create_array("class", shape=(c,), dtype=str, dimension_names=("class",))
    names[:] = np.array(meta.class_names, dtype=object)


def block_level_arrays(path: str | URLPath) -> list[tuple[zarr.Array, zarr.Array, zarr.Array]]:
    """The ``mask``, ``probabilities`` and mask label arrays of every level a task writes with
    its block (level 0, then 1..:func:`levels_in_blocks`), where the result's layout keeps them (an
    unfinished result of an older layout resumes in it, its tasks writing level 0 only)."""
    # Never cached by path: a cached handle outlives an overwrite of the result and would
    # write the new store in the old layout. A caller writing many blocks keeps them per run
    # (execution.tasks).
    root, meta = open_root(path, "r+")
    return [
        (
            root[level_path(k, "mask", layout=meta.layout)],
            root[level_path(k, "probabilities", layout=meta.layout)],
            root[label_path(LABEL_NAME, k, layout=meta.layout)],
        )  # type: ignore[misc]
        for k in range(levels_in_blocks(meta) + 1)
    ]
