"""The result store: one Zarr v3 group per segmented image, laid out as OME-Zarr 0.5.

Layout::

    result.zarr/                 OME image (the class probabilities, axes class/y/x) + "segpipe"
        mask           (y, x)          uint8    argmax class, 0 where nothing was written
        probabilities  (class, y, x)   float16  softmax (float32, or uint8 with CF scale_factor)
        y, x           (y,), (x,)      float64  pixel centres: microns, CRS units or pixels
        class          (class,)        str      class names
        spatial_ref    ()              int64    georeferenced input only: CF grid mapping
                                                (CRS WKT), as rioxarray reads and writes it
        levels/<k>/    the same for pyramid level k = 1, 2, ... (2**k smaller)
        labels/mask/<k> (y, x) uint8   the mask as an OME label image, one array per level,
                                       with "image-label" colours and class names
        _segpipe/      tiles_done, class_pixels (driver-owned bookkeeping)

Level 0 at the root keeps ``xarray.open_zarr(result)`` a plain Dataset, and
``xarray.open_zarr(result, group="levels/<k>")`` one level; OME readers (napari through
ome-zarr-py, ome-zarr-models) see the probability pyramid and the ``labels/mask`` pyramid.
The label arrays repeat the mask (uint8, a few percent of the store) because OME wants labels
under ``labels/`` and xarray wants a level's variables side by side.

Arrays are chunked like the output tiles and sharded by one task's block of tiles
(``task_tiles * tile`` pixels): every task writes whole shards, which is what makes
concurrent writers safe in Zarr v3. Chunks equal to the fill value are not stored.

The root attribute ``segpipe`` holds provenance and ``complete``, which turns true only after
the last tile is written and the pyramid built; ``open_result`` refuses an incomplete result.
Metadata is consolidated once, at the end, so it never goes stale mid-run.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import os
import shutil
import warnings
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any, cast

import dask.array as da
import numpy as np
import xarray as xr
import zarr
from zarr.codecs import ZstdCodec
from zarr.core.array_spec import ArrayConfigParams

from segpipe import __version__
from segpipe.pixels import pyramid_shapes
from segpipe.pyramid import (
    OME_VERSION,
    PixelGrid,
    label_attributes,
    multiscale_attributes,
    reduce_level,
)
from segpipe.tiling import Box

__all__ = [
    "LABEL_NAME",
    "PROBABILITY_DTYPES",
    "IncompleteResultError",
    "ResultMeta",
    "ResultMismatchError",
    "build_pyramid",
    "class_pixels",
    "encode_probabilities",
    "finalize_result",
    "is_complete",
    "level_path",
    "mark_tiles_done",
    "open_result",
    "prepare_result",
    "read_meta",
    "result_levels",
    "tiles_done",
    "write_block",
    "write_tiles",
]

PROBABILITY_DTYPES = ("float16", "float32", "uint8")
LABEL_NAME = "mask"
_PROGRESS = "_segpipe/tiles_done"
_COUNTS = "_segpipe/class_pixels"
_PROGRESS_CHUNKS = (64, 64)
_UINT8_SCALE = 1 / 255
_ZSTD = ZstdCodec(level=3)
_SPARSE: ArrayConfigParams = {"write_empty_chunks": False}


class IncompleteResultError(RuntimeError):
    """A result whose run has not finished (interrupted, or still running)."""


class ResultMismatchError(FileExistsError):
    """The output path holds something this run must not overwrite."""


@dataclass(frozen=True)
class ResultMeta:
    """What a result is: identity of its inputs and the parameters that shaped it.

    Two runs with equal ``identity()`` produce the same result, so one may finish the other's
    missing tiles. ``task_tiles`` fixes the shard side (``task_tiles * tile``) and
    ``min_level_size`` the pyramid, so they are part of it too.
    """

    source: str
    shape: tuple[int, int]  # (y, x) pixels of the segmented level
    level: int
    pixel_size_um: float | None  # at the segmented level
    class_names: tuple[str, ...]
    model_name: str
    model_sha256: str
    tile: int
    halo: int
    mode: str
    probability_dtype: str = "float16"
    params: dict[str, Any] = field(default_factory=dict)  # other knobs that change numbers
    task_tiles: int = 1
    min_level_size: int = 256
    crs: str | None = None  # georeferenced input: "EPSG:..." and the segmented level's
    transform: tuple[float, ...] | None = None  # pixel-corner affine (a, b, c, d, e, f)

    def __post_init__(self) -> None:
        if self.probability_dtype not in PROBABILITY_DTYPES:
            raise ValueError(
                f"probability_dtype must be one of {PROBABILITY_DTYPES}, got "
                f"{self.probability_dtype!r}"
            )
        if self.task_tiles < 1 or self.min_level_size < 1:
            raise ValueError(
                f"task_tiles and min_level_size must be >= 1, got {self.task_tiles} and "
                f"{self.min_level_size}"
            )

    @property
    def shard(self) -> int:
        """Shard side in pixels: one task's block of tiles."""
        return self.task_tiles * self.tile

    def identity(self) -> dict[str, Any]:
        d = asdict(self)
        d["shape"] = list(self.shape)
        d["class_names"] = list(self.class_names)
        d["transform"] = list(self.transform) if self.transform else None
        return d


def _now() -> str:
    return dt.datetime.now(dt.UTC).isoformat(timespec="seconds")


def _is_result(path: Path) -> bool:
    try:
        return "segpipe" in zarr.open_group(path, mode="r").attrs
    except (FileNotFoundError, ValueError, KeyError, zarr.errors.GroupNotFoundError):
        return False


def read_meta(path: str | os.PathLike) -> dict[str, Any]:
    """The ``segpipe`` attribute of a result (provenance, parameters, ``complete``)."""
    path = Path(path)
    try:
        attrs: dict[str, Any] = zarr.open_group(path, mode="r").attrs.asdict()
    except (FileNotFoundError, zarr.errors.GroupNotFoundError) as e:
        raise FileNotFoundError(f"no segpipe result at {path}") from e
    if "segpipe" not in attrs:
        raise ValueError(
            f"{path} is a Zarr group but not a segpipe result (no 'segpipe' attribute)"
        )
    return attrs["segpipe"]


def is_complete(path: str | os.PathLike) -> bool:
    """Whether the result at ``path`` exists and its last tile was written."""
    try:
        return bool(read_meta(path).get("complete", False))
    except (FileNotFoundError, ValueError):
        return False


def level_path(level: int) -> str:
    """The group of pyramid ``level`` inside a result: ``""`` (the root) or ``levels/<k>``."""
    return "" if level == 0 else f"levels/{level}"


def result_levels(path: str | os.PathLike) -> list[tuple[int, int]]:
    """(y, x) pixels of every pyramid level of the result at ``path``, level 0 first.

    The number of levels is what the store's OME metadata lists (one, for a result written
    before results had pyramids).
    """
    attrs: dict[str, Any] = zarr.open_group(path, mode="r").attrs.asdict()
    ident = attrs["segpipe"]["identity"]
    datasets = attrs.get("ome", {}).get("multiscales", [{}])[0].get("datasets", [None])
    return list(pyramid_shapes(tuple(ident["shape"]), 1)[: len(datasets)])


def prepare_result(
    path: str | os.PathLike, meta: ResultMeta, *, overwrite: bool = False
) -> np.ndarray:
    """Create the result store, or reopen a compatible unfinished one.

    Returns the (tile_y, tile_x) bool map of tiles already written: all False for a new store,
    what an interrupted run finished for a resumed one, all True for a complete one.

    Raises ``ResultMismatchError`` when ``path`` holds anything else: a result of other inputs
    or parameters (unless ``overwrite``), or something that is not a segpipe result at all
    (never deleted, whatever ``overwrite`` says).
    """
    path = Path(path)
    if path.exists():
        if not _is_result(path):
            raise ResultMismatchError(
                f"{path} exists and is not a segpipe result; refusing to write into it. "
                "Choose another output path."
            )
        old = read_meta(path)
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
        shutil.rmtree(path)
    _create(path, meta)
    return tiles_done(path)


def _provenance(meta: ResultMeta) -> dict[str, Any]:
    return {
        "version": __version__,
        "complete": False,
        "identity": meta.identity(),
        "source": meta.source,
        "model": meta.model_name,
        "model_sha256": meta.model_sha256,
        "tile": meta.tile,
        "halo": meta.halo,
        "mode": meta.mode,
        "pixel_size_um": meta.pixel_size_um,
        "class_names": list(meta.class_names),
        "started": _now(),
        "finished": None,
    }


def _create(path: Path, meta: ResultMeta) -> None:
    shapes = pyramid_shapes(meta.shape, meta.min_level_size)
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
    if meta.probability_dtype == "uint8":
        # CF packing: xarray (and netCDF tools) decode value * scale_factor + add_offset.
        attrs.update(scale_factor=_UINT8_SCALE, add_offset=0.0)
    group.create_array(
        "probabilities",
        shape=(c, ny, nx),
        chunks=(c, t, t),
        shards=(c, s, s),
        dtype=meta.probability_dtype,
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
    meta = read_meta(path)
    if meta.get("complete"):
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


def class_pixels(path: str | os.PathLike) -> np.ndarray:
    """(C,) int64 pixels of each class over the tiles written so far."""
    return np.asarray(zarr.open_array(Path(path) / _COUNTS, mode="r")[...]).sum(axis=(0, 1))


@lru_cache(maxsize=8)
def _arrays(path: str) -> tuple[zarr.Array, zarr.Array, zarr.Array]:
    # One open per worker process and result, not per tile.
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
    return mask


def write_tiles(path: str | os.PathLike, box: Box, probabilities: np.ndarray) -> np.ndarray:
    """:func:`write_block`, returning the per-class pixel counts of the mask, (C,) int64."""
    mask = write_block(path, box, probabilities)
    return np.bincount(mask.ravel(), minlength=probabilities.shape[0]).astype(np.int64)


def build_pyramid(path: str | os.PathLike) -> None:
    """Compute levels 1.. of the result at ``path`` from level 0, one shard per task.

    Each level is read back from the one just written (bounded memory; Dask's threaded
    scheduler), probabilities by 2x2 mean, the mask by 2x2 mode.
    """
    root = zarr.open_group(path, mode="r+")

    def array(name: str) -> zarr.Array:
        node = root[name.lstrip("/")]
        if not isinstance(node, zarr.Array):
            raise TypeError(f"{path}/{name} is not a Zarr array: not a segpipe result layout")
        return node

    for k in range(1, len(result_levels(path))):
        below, here = level_path(k - 1), level_path(k)
        targets = [array(f"{here}/mask"), array(f"{here}/probabilities")]
        mask = reduce_level(array(f"{below}/mask"), "mode", targets[0].shards or ())
        probs = reduce_level(array(f"{below}/probabilities"), "mean", targets[1].shards or ())
        label = array(f"labels/{LABEL_NAME}/{k}")
        # dask types targets as numpy array-likes; a zarr.Array has the setitem it needs
        da.store([mask, probs, mask], [*targets, label], lock=False)  # type: ignore[list-item]


def finalize_result(path: str | os.PathLike, summary: dict[str, Any]) -> None:
    """Build the pyramid, mark the result complete, add the run summary, consolidate."""
    build_pyramid(path)
    group = zarr.open_group(path, mode="r+")
    meta = dict(cast(dict[str, Any], group.attrs["segpipe"]))
    meta.update(summary, complete=True, finished=_now())
    group.attrs["segpipe"] = meta
    with _quiet_consolidated():
        zarr.consolidate_metadata(path)


def open_result(
    path: str | os.PathLike,
    level: int = 0,
    *,
    tree: bool = False,
    allow_incomplete: bool = False,
    chunks: Any = None,
) -> Any:
    """Open a result lazily, one pyramid level as a Dataset or every level as a DataTree.

    Parameters
    ----------
    path
        The result's Zarr directory.
    level
        Pyramid level (0 = as segmented; level ``k`` is ``2**k`` times smaller).
    tree
        Return an ``xarray.DataTree`` whose children ``"0"``, ``"1"``, ... are the levels.
    allow_incomplete
        Open a result whose run has not finished (``IncompleteResultError`` otherwise);
        its levels above 0 are empty until the run's end builds them.
    chunks
        Dask chunks (default: the stored chunks).

    Returns
    -------
    xarray.Dataset or xarray.DataTree
        Dask-backed ``mask`` (y, x) and ``probabilities`` (class, y, x) (uint8 storage decoded
        to float32); coordinates ``y``/``x`` at pixel centres in microns (``units``
        attribute; the CRS's units with a ``spatial_ref`` grid mapping, which rioxarray
        reads, for a georeferenced input; pixels when the source did not say) and ``class``
        holding the class names. Provenance is in ``attrs["segpipe"]``, the level in
        ``attrs["level"]``.

    Examples
    --------
    >>> ds = open_result("slide.seg.zarr", level=2)  # doctest: +SKIP
    >>> ds["probabilities"].sel({"class": "nucleus"}) > 0.8  # doctest: +SKIP
    """
    meta = read_meta(path)
    if not meta.get("complete") and not allow_incomplete:
        raise IncompleteResultError(
            f"{path} is an incomplete segpipe result (its run was interrupted or is still "
            "going); run segment again with the same output to finish it, or pass "
            "allow_incomplete=True to look at what is there"
        )
    n_levels = len(result_levels(path))
    if tree:
        levels = {str(k): _open_level(path, k, meta, chunks) for k in range(n_levels)}
        return xr.DataTree.from_dict(
            {"/": xr.Dataset(attrs={"segpipe": meta}), **levels}, name=Path(path).name
        )
    if not 0 <= level < n_levels:
        raise ValueError(f"{path} has pyramid levels 0..{n_levels - 1}, not level {level}")
    return _open_level(path, level, meta, chunks)


def _open_level(path: str | os.PathLike, level: int, meta: dict[str, Any], chunks: Any) -> Any:
    kw: dict[str, Any] = {"chunks": chunks} if chunks is not None else {}
    with _quiet_consolidated():
        ds = xr.open_zarr(
            path, group=level_path(level) or None, consolidated=bool(meta.get("complete")), **kw
        )
    ds.attrs = {"segpipe": meta, "level": level}
    if ds["probabilities"].encoding.get("dtype") == np.uint8:
        # CF decoding multiplies by a JSON (float64) scale_factor; float32 holds 1/255 steps.
        ds["probabilities"] = ds["probabilities"].astype(np.float32)
    return ds


@contextlib.contextmanager
def _quiet_consolidated() -> Iterator[None]:
    # Consolidated metadata is a zarr-python extension to v3 that we use on purpose (one read
    # instead of one per array on object stores); its warning says nothing actionable.
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Consolidated metadata", category=UserWarning)
        yield
