"""The result store: one Zarr v3 group per segmented image.

Layout (every array chunked like the output tiles, so a task writes whole chunks)::

    result.zarr/
        mask            (y, x)          uint8    argmax class, 0 where nothing was written
        probabilities   (class, y, x)   float16  softmax over classes (float32 on request)
        y, x            (y,), (x,)      float64  pixel positions in microns (or pixels)
        class           (class,)        str      class names
        _segpipe/tiles_done (tile_y, tile_x) uint8  1 where a tile is written (driver-owned)

The root attribute ``segpipe`` holds provenance and ``complete``, which turns true only after the
last tile is written; ``open_result`` refuses an incomplete result. Metadata is consolidated
once, at the end, so it never goes stale mid-run.
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
from typing import Any

import dask.array as da
import numpy as np
import xarray as xr
import zarr

from segpipe import __version__
from segpipe.tiling import Box

__all__ = [
    "IncompleteResultError",
    "ResultMeta",
    "ResultMismatchError",
    "class_pixels",
    "finalize_result",
    "is_complete",
    "mark_tiles_done",
    "open_result",
    "prepare_result",
    "read_meta",
    "tiles_done",
    "write_tiles",
]

PROBABILITY_DTYPES = ("float16", "float32")
_PROGRESS = "_segpipe/tiles_done"
_COUNTS = "_segpipe/class_pixels"
_PROGRESS_CHUNKS = (64, 64)


class IncompleteResultError(RuntimeError):
    """A result whose run has not finished (interrupted, or still running)."""


class ResultMismatchError(FileExistsError):
    """The output path holds something this run must not overwrite."""


@dataclass(frozen=True)
class ResultMeta:
    """What a result is: identity of its inputs and the parameters that shaped it.

    Two runs with equal ``identity()`` produce the same result, so one may finish the other's
    missing tiles.
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

    def __post_init__(self) -> None:
        if self.probability_dtype not in PROBABILITY_DTYPES:
            raise ValueError(
                f"probability_dtype must be one of {PROBABILITY_DTYPES}, got "
                f"{self.probability_dtype!r}"
            )

    def identity(self) -> dict[str, Any]:
        d = asdict(self)
        d["shape"] = list(self.shape)
        d["class_names"] = list(self.class_names)
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
        attrs = zarr.open_group(path, mode="r").attrs.asdict()
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


def _create(path: Path, meta: ResultMeta) -> None:
    ny, nx = meta.shape
    c, t = len(meta.class_names), meta.tile
    px = meta.pixel_size_um
    units = "micrometer" if px else "pixel"
    step = px or 1.0
    ds = xr.Dataset(
        {
            "mask": (("y", "x"), da.zeros((ny, nx), dtype="uint8", chunks=t)),
            "probabilities": (
                ("class", "y", "x"),
                da.zeros((c, ny, nx), dtype=meta.probability_dtype, chunks=(c, t, t)),
            ),
        },
        coords={
            "y": ("y", np.arange(ny) * step, {"units": units}),
            "x": ("x", np.arange(nx) * step, {"units": units}),
            # Variable-length strings: zarr-python has a v3 spec for those, not for fixed width.
            "class": ("class", np.array(meta.class_names, dtype=object)),
        },
    )
    ds["mask"].attrs.update(
        long_name="argmax class",
        flag_values=list(range(c)),
        flag_meanings=" ".join(meta.class_names),
    )
    ds["probabilities"].attrs.update(long_name="softmax class probability")
    ds.attrs["segpipe"] = {
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
    encoding = {
        "mask": {"chunks": (t, t), "fill_value": 0},
        "probabilities": {"chunks": (c, t, t), "fill_value": 0.0},
    }
    ds.to_zarr(path, mode="w-", compute=False, zarr_format=3, encoding=encoding, consolidated=False)
    grid = (-(-ny // t), -(-nx // t))
    root = zarr.open_group(path, mode="r+")
    # Driver-owned bookkeeping, chunked so a flush rewrites only the chunks it touched.
    root.create_array(
        _PROGRESS,
        shape=grid,
        chunks=_PROGRESS_CHUNKS,
        dtype="uint8",
        fill_value=0,
        dimension_names=("tile_y", "tile_x"),
    )
    root.create_array(
        _COUNTS,
        shape=(*grid, c),
        chunks=(*_PROGRESS_CHUNKS, c),
        dtype="int64",
        fill_value=0,
        dimension_names=("tile_y", "tile_x", "class"),
    )


def tiles_done(path: str | os.PathLike) -> np.ndarray:
    """(tile_y, tile_x) bool: which tiles of the result at ``path`` are written."""
    meta = read_meta(path)
    if meta.get("complete"):
        arr = zarr.open_array(Path(path) / _PROGRESS, mode="r")
        return np.ones(arr.shape, dtype=bool)
    return zarr.open_array(Path(path) / _PROGRESS, mode="r")[...].astype(bool)


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
        d, c = done[sl], counts[sl]
        for iy, ix in members:
            d[iy - ky * cy, ix - kx * cx] = 1
            c[iy - ky * cy, ix - kx * cx] = tile_counts[iy, ix]
        # Counts before flags: a tile flagged done always has its counts.
        counts[sl] = c
        done[sl] = d


def class_pixels(path: str | os.PathLike) -> np.ndarray:
    """(C,) int64 pixels of each class over the tiles written so far."""
    return zarr.open_array(Path(path) / _COUNTS, mode="r")[...].sum(axis=(0, 1))


@lru_cache(maxsize=8)
def _arrays(path: str) -> tuple[zarr.Array, zarr.Array]:
    # One open per worker process and result, not per tile.
    return (
        zarr.open_array(Path(path) / "mask", mode="r+"),
        zarr.open_array(Path(path) / "probabilities", mode="r+"),
    )


def write_tiles(path: str | os.PathLike, box: Box, probabilities: np.ndarray) -> np.ndarray:
    """Write (C, y, x) float probabilities over ``box`` and their argmax mask.

    ``box`` must cover whole tiles (chunks), so concurrent tasks never share a chunk.
    Returns the per-class pixel counts of the written mask, (C,) int64.
    """
    mask_arr, prob_arr = _arrays(str(Path(path)))
    mask = np.argmax(probabilities, axis=0).astype(np.uint8)
    prob_arr[(slice(None), *box.slices)] = probabilities.astype(prob_arr.dtype)
    mask_arr[box.slices] = mask
    return np.bincount(mask.ravel(), minlength=probabilities.shape[0]).astype(np.int64)


def finalize_result(path: str | os.PathLike, summary: dict[str, Any]) -> None:
    """Mark the result complete, add the run summary, consolidate metadata."""
    group = zarr.open_group(path, mode="r+")
    meta = dict(group.attrs["segpipe"])
    meta.update(summary, complete=True, finished=_now())
    group.attrs["segpipe"] = meta
    with _quiet_consolidated():
        zarr.consolidate_metadata(path)


def open_result(
    path: str | os.PathLike, *, allow_incomplete: bool = False, chunks: Any = None
) -> xr.Dataset:
    """Open a result lazily.

    Returns a Dataset with dask-backed ``mask`` (y, x) and ``probabilities`` (class, y, x);
    coordinates ``y``/``x`` in microns (``units`` attribute; pixels when the source did not say)
    and ``class`` holding the class names. Provenance is in ``attrs["segpipe"]``.
    """
    meta = read_meta(path)
    if not meta.get("complete") and not allow_incomplete:
        raise IncompleteResultError(
            f"{path} is an incomplete segpipe result (its run was interrupted or is still "
            "going); run segment again with the same output to finish it, or pass "
            "allow_incomplete=True to look at what is there"
        )
    kw: dict[str, Any] = {"chunks": chunks} if chunks is not None else {}
    with _quiet_consolidated():
        return xr.open_zarr(path, consolidated=bool(meta.get("complete")), **kw)


@contextlib.contextmanager
def _quiet_consolidated() -> Iterator[None]:
    # Consolidated metadata is a zarr-python extension to v3 that we use on purpose (one read
    # instead of one per array on object stores); its warning says nothing actionable.
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Consolidated metadata", category=UserWarning)
        yield
