"""Which tiles of a result are written, and their class pixel counts: the ``_segpipe``
bookkeeping arrays, which the driver alone writes (the tasks write pixels, never these); and
the fence both keep, the driver before each record and the tasks before each block's shards:
the result at the path must still be the one the run prepared (:func:`check_not_replaced`).
Two runs of :func:`segpipe.segment` on one local result never get that far: its run lock
keeps them apart (:mod:`segpipe.results.lock`). The fence stops what that cannot: a run at a
URL, and the tasks of a run whose driver died while they go on.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import zarr

from segpipe.faults import fault_point
from segpipe.io.files import URLPath
from segpipe.results.layout import COUNTS, PROGRESS, PROGRESS_CHUNKS
from segpipe.results.schema import read_attrs, store_of, stored_complete
from segpipe.results.shards import write_together

__all__ = [
    "ResultReplacedError",
    "TileRecord",
    "check_not_replaced",
    "class_pixels",
    "mark_tiles_done",
    "result_started",
    "tile_class_pixels",
    "tiles_done",
]


class ResultReplacedError(RuntimeError):
    """Another run replaced the result this run was writing (an overwrite at the same path):
    this run stops. Not a :class:`~segpipe.results.schema.ResultMismatchError`, which callers
    answer by replacing what is at the path: here that is the other run's result."""


def result_started(path: str | os.PathLike) -> str | None:
    """The ``started`` stamp (an ISO 8601 time to the microsecond) of the result at ``path``,
    as its root ``zarr.json`` says now: one read of that one file (``read_attrs`` asks for
    Zarr v2's three files besides), from the store each time, never from a handle opened
    earlier (Zarr handles keep the metadata they read). ``FileNotFoundError``: nothing there.
    A local result's file is read and parsed here: opening it as a Zarr group took 2.4 ms of
    Python, twice a block (the fence of its shards and of its record)."""
    if isinstance(path, URLPath):
        try:
            group = zarr.open_group(store_of(path), mode="r", zarr_format=3)
        except (FileNotFoundError, zarr.errors.GroupNotFoundError) as e:
            raise FileNotFoundError(f"no segpipe result at {path}") from e
        attrs = group.attrs.get("segpipe")
    else:
        try:
            document = json.loads(Path(path, "zarr.json").read_bytes())
        except (FileNotFoundError, NotADirectoryError) as e:
            raise FileNotFoundError(f"no segpipe result at {path}") from e
        except ValueError as e:  # as Zarr's opening: what is no JSON is no group
            raise ValueError(f"{path}: its zarr.json is no JSON ({e})") from None
        found = document.get("attributes") if isinstance(document, dict) else None
        attrs = found.get("segpipe") if isinstance(found, dict) else None
    return attrs.get("started") if isinstance(attrs, dict) else None


def check_not_replaced(path: str | os.PathLike, started: str | None) -> None:
    """Raise :class:`ResultReplacedError` unless the result at ``path`` is still the one
    stamped ``started`` (:func:`result_started`): the one this run prepared, not one another
    run has put there since (an overwrite at the same path, even within the same second)."""
    try:
        now = result_started(path)
    except FileNotFoundError:
        raise ResultReplacedError(
            f"{path} is gone (deleted, or being replaced by another run) while this run wrote "
            f"the result started {started} there: this run stops and writes nothing more there"
        ) from None
    if now != started:
        raise ResultReplacedError(
            f"{path} was replaced by another run (the result there now started {now}) while "
            f"this run wrote the one started {started}: this run stops and writes nothing "
            "more there"
        )


def tiles_done(path: str | os.PathLike) -> np.ndarray:
    """(tile_y, tile_x) bool: which tiles of the result at ``path`` are written."""
    arr = zarr.open_array(store_of(path), path=PROGRESS, mode="r")
    if stored_complete(read_attrs(path)):
        return np.ones(arr.shape, dtype=bool)
    return np.asarray(arr[...]).astype(bool)


def mark_tiles_done(
    path: str | os.PathLike,
    tile_counts: dict[tuple[int, int], np.ndarray],
    *,
    started: str | None = None,
) -> None:
    """Record tiles as written, with their (C,) class pixel counts, into the result stamped
    ``started`` (:class:`TileRecord`).

    Called by the driver only, so the bookkeeping arrays have one writer. A driver that
    records many blocks of a run keeps one :class:`TileRecord` instead.
    """
    if tile_counts:  # nothing to open for (a remote store's round trips) otherwise
        TileRecord(path, started=started).mark(tile_counts)


class TileRecord:
    """A result's tiles-done flags and class pixel counts, as their one writer (the driver)
    keeps them during a run: each chunk is read once, then written from memory (a block's
    record cost two opens, two reads and two writes; now the two writes). ``started``: the
    stamp of the result the run prepared (:func:`result_started` then), so its record and
    its tasks' writes are fenced alike; None: the stamp of the result at ``path`` now."""

    def __init__(self, path: str | os.PathLike, *, started: str | None = None) -> None:
        self._path = path
        # The result this run records into: a run that replaced it (overwrite) made another.
        self._started = started if started is not None else result_started(path)
        self._done = zarr.open_array(store_of(path), path=PROGRESS, mode="r+")
        self._counts = zarr.open_array(store_of(path), path=COUNTS, mode="r+")
        self._chunks: dict[tuple[int, int], tuple[np.ndarray, np.ndarray]] = {}

    def mark(self, tile_counts: dict[tuple[int, int], np.ndarray]) -> None:
        """Record ``tile_counts``' tiles (``(tile_y, tile_x)``) as written, with their counts."""
        if not tile_counts:
            return
        check_not_replaced(self._path, self._started)
        cy, cx = PROGRESS_CHUNKS
        ny, nx = self._done.shape
        by_chunk: dict[tuple[int, int], list[tuple[int, int]]] = {}
        for iy, ix in tile_counts:
            by_chunk.setdefault((iy // cy, ix // cx), []).append((iy, ix))
        for (ky, kx), members in by_chunk.items():
            # The chunk's tiles, cut at the array's edge: one whole shard of each array.
            sl = (slice(ky * cy, min((ky + 1) * cy, ny)), slice(kx * cx, min((kx + 1) * cx, nx)))
            if (ky, kx) not in self._chunks:
                self._chunks[ky, kx] = (np.asarray(self._done[sl]), np.asarray(self._counts[sl]))
            d, c = self._chunks[ky, kx]
            for iy, ix in members:
                d[iy - ky * cy, ix - kx * cx] = 1
                c[iy - ky * cy, ix - kx * cx] = tile_counts[iy, ix]
            # Counts before flags: a tile flagged done always has its counts. Each a file
            # stored here (a result made before its bookkeeping was sharded: through Zarr).
            write_together([(self._counts, (*sl, slice(None)), c)])
            write_together([(self._done, sl, d)])
            fault_point("block.recording")
        fault_point("block.recorded")


def tile_class_pixels(path: str | os.PathLike) -> np.ndarray:
    """(tile_y, tile_x, C) int64 pixels of each class in each tile written so far (0 where
    none is)."""
    return np.asarray(zarr.open_array(store_of(path), path=COUNTS, mode="r")[...])


def class_pixels(path: str | os.PathLike) -> np.ndarray:
    """(C,) int64 pixels of each class over the tiles written so far."""
    return tile_class_pixels(path).sum(axis=(0, 1))
