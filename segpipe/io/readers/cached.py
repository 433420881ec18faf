"""A reader that keeps the tiles its reads decoded, for the reads after them.

An exact-mode window is its block plus a halo (44 px for the shipped U-Net) on every side, and
a file decodes whole tiles or chunks: a 1024 px block of a Zarr in 1024 px chunks decodes nine
chunks for one chunk's pixels (50 ms of CPU against 5 ms), a 256 px tiled TIFF 36 tiles for 16.
Neighbouring blocks read each other's tiles as halo, so a run keeps the tiles it decoded
(:class:`CachedReader`), up to a budget of bytes, the least recently used dropped first.
"""

from __future__ import annotations

import mmap
import threading
from collections import OrderedDict
from typing import Any

import dask.array as da
import numpy as np

from segpipe.io.readers.array import ArrayReader
from segpipe.io.readers.base import BaseReader, Reader

__all__ = ["CachedReader", "cached_reads"]

# Per run and process, at most. A row of 1024 px blocks of an RGB image in 1024 px chunks
# keeps three rows of chunks (72 MiB at 8192 px wide), so a block's halo above finds the row
# above's tiles still here; on a wider image the budget keeps the latest blocks' tiles, and
# a block decodes the column right of it and the row below (3 tiles of 9 instead of 1).
DEFAULT_CACHE_BYTES = 96 << 20
# Levels whose tiles are larger than this share of the budget are read as they are: a
# stripped or untiled file's "tile" is a band of the whole width, or the whole image.
_MIN_TILES = 32
# Kept tiles of at least this many bytes get pages of their own (_own_pages): 16 pages.
_OWN_PAGES_FROM = 16 * mmap.PAGESIZE


class CachedReader:
    """``reader``'s pixels, each of its tiles decoded once while ``max_bytes`` (the decoded
    tiles kept, bytes) allow: :meth:`read` takes the tiles it finds kept, waits for those
    another thread is decoding, and reads the rest in rectangles of whole tiles. The same
    pixels as ``reader.read``; safe to share between threads.
    """

    def __init__(self, reader: BaseReader, max_bytes: int = DEFAULT_CACHE_BYTES) -> None:
        self.reader = reader
        self.path = reader.path
        self.pixel_size_um = reader.pixel_size_um
        self.level_shapes = reader.level_shapes
        self.dtype = reader.dtype
        self.max_bytes = max_bytes
        self._tiles: OrderedDict[tuple[int, int, int], np.ndarray] = OrderedDict()
        # Tiles a read is decoding now: a read needing one waits for it instead of decoding it
        # again (two I/O threads read neighbouring blocks, which share halo tiles, at once).
        self._decoding: dict[tuple[int, int, int], threading.Event] = {}
        self._bytes = 0
        self._lock = threading.Lock()

    @property
    def shape(self) -> tuple[int, int, int]:
        """``(Y, X, C)`` of level 0."""
        return self.reader.shape

    def __getattr__(self, name: str) -> Any:
        # The rest of what a reader says of itself (nodata, mask_kind, georeference,
        # valid_mask, chunk_shape...) is the reader's own, uncached.
        if name == "reader":  # not set yet (a copy being made): no recursion
            raise AttributeError(name)
        return getattr(self.reader, name)

    @property
    def cached_bytes(self) -> int:
        """Bytes of decoded tiles kept now."""
        return self._bytes

    def level(self, level: int = 0) -> da.Array:
        """The reader's lazy level (not cached: Dask keeps its own chunks)."""
        return self.reader.level(level)

    def read(self, y0: int, y1: int, x0: int, x1: int, level: int = 0) -> np.ndarray:
        """Pixels ``[y0:y1, x0:x1]`` of ``level`` as ``(y1 - y0, x1 - x0, C)``, as
        ``reader.read`` gives them."""
        self.reader._check_window(y0, y1, x0, x1, level)
        ny, nx, nc = self.level_shapes[level]
        ty, tx = self.reader.chunk_shape(level)
        if ty * tx * nc * self.dtype.itemsize > self.max_bytes // _MIN_TILES:
            return self.reader.read(y0, y1, x0, x1, level)  # strips, an untiled file
        rows, cols = range(y0 // ty, (y1 - 1) // ty + 1), range(x0 // tx, (x1 - 1) // tx + 1)
        found: dict[tuple[int, int], np.ndarray] = {}
        waiting: dict[tuple[int, int], threading.Event] = {}  # tiles another read is decoding
        missing: list[tuple[int, int]] = []
        with self._lock:
            for r in rows:
                for c in cols:
                    key = (level, r, c)
                    if (tile := self._tiles.get(key)) is not None:
                        self._tiles.move_to_end(key)
                        found[r, c] = tile
                    elif (other := self._decoding.get(key)) is not None:
                        waiting[r, c] = other
                    else:
                        missing.append((r, c))
            # One event a rectangle: a read waiting for one tile waits for its rectangle only.
            rects = [(rect, threading.Event()) for rect in _rectangles(missing)]
            for rect, event in rects:
                for r, c in _tiles_of(rect):
                    self._decoding[level, r, c] = event
        kept = 0
        try:
            for (r0, r1, c0, c1), event in rects:
                pixels = self.reader.read(
                    r0 * ty, min(r1 * ty, ny), c0 * tx, min(c1 * tx, nx), level
                )
                decoded = {}
                for r, c in _tiles_of((r0, r1, c0, c1)):
                    ry, rx = (r - r0) * ty, (c - c0) * tx
                    decoded[r, c] = _own_pages(pixels[ry : ry + ty, rx : rx + tx])
                found.update(decoded)
                self._keep(level, decoded, event)
                kept += 1
        finally:  # rectangles a failed read left: their waiters decode them themselves
            with self._lock:
                for rect, _ in rects[kept:]:
                    for r, c in _tiles_of(rect):
                        del self._decoding[level, r, c]
            for _, event in rects[kept:]:
                event.set()
        for (r, c), event in waiting.items():
            event.wait()
            with self._lock:
                tile = self._tiles.get((level, r, c))
            if tile is None:  # that read failed, or its tile was dropped already
                y, x = r * ty, c * tx
                tile = self.reader.read(y, min(y + ty, ny), x, min(x + tx, nx), level)
            found[r, c] = tile
        out = np.empty((y1 - y0, x1 - x0, nc), dtype=self.dtype)
        for (r, c), tile in found.items():
            ty0, tx0 = r * ty, c * tx
            a0, a1 = max(y0, ty0), min(y1, ty0 + tile.shape[0])
            b0, b1 = max(x0, tx0), min(x1, tx0 + tile.shape[1])
            out[a0 - y0 : a1 - y0, b0 - x0 : b1 - x0] = tile[
                a0 - ty0 : a1 - ty0, b0 - tx0 : b1 - tx0
            ]
        return out

    def _keep(
        self, level: int, tiles: dict[tuple[int, int], np.ndarray], event: threading.Event
    ) -> None:
        """Keep ``tiles`` (dropping the least recently used over the budget), no longer
        decoding, and wake the reads waiting for them (``event``)."""
        with self._lock:
            for (r, c), tile in tiles.items():
                # read() keeps no tile above max_bytes / _MIN_TILES: each fits.
                old = self._tiles.pop((level, r, c), None)
                self._bytes -= 0 if old is None else _held(old)
                self._tiles[level, r, c] = tile
                self._bytes += _held(tile)
                if self._decoding.get((level, r, c)) is event:
                    del self._decoding[level, r, c]
            while self._bytes > self.max_bytes:
                _, dropped = self._tiles.popitem(last=False)
                self._bytes -= _held(dropped)
        event.set()

    def __repr__(self) -> str:
        return f"CachedReader({self.reader!r}, max_bytes={self.max_bytes})"


def cached_reads(
    reader: Reader, band: int | None = None, *, level: int = 0, max_bytes: int = DEFAULT_CACHE_BYTES
) -> Reader:
    """``reader`` with its decoded tiles kept (:class:`CachedReader`) where that saves
    decoding: a file's reader; an in-memory array (nothing to decode) or a reader of another
    kind comes back as it is.

    ``band``: the height (pixels of ``level``) of the rows of blocks read one after another,
    left to right: the budget is what a band and its halo tiles hold across the level's width
    (the band above is still there for the halo of the one below), at most ``max_bytes``.
    """
    if not isinstance(reader, BaseReader) or isinstance(reader, ArrayReader):
        return reader
    if band is not None:
        ty, tx = reader.chunk_shape(level)
        _, nx, nc = reader.level_shapes[level]
        pixel = nc * reader.dtype.itemsize
        # At least as many tiles as a level may hold (a small image's band holds few).
        needed = max((band + 2 * ty) * nx * pixel, _MIN_TILES * ty * tx * pixel)
        max_bytes = min(max_bytes, needed)
    return reader if max_bytes <= 0 else CachedReader(reader, max_bytes)


def _own_pages(pixels: np.ndarray) -> np.ndarray:
    """A copy of ``pixels`` in memory mapped for it alone, given back to the system when it is
    dropped: kept tiles outlive the blocks' buffers around them, and from malloc's heap (which
    segpipe tells to keep freed memory) they pinned it, 220 MiB more at 16384² for a 96 MiB
    budget. Tiles under :data:`_OWN_PAGES_FROM` bytes are copied on the heap: a mapping each
    would round them up to whole pages and could reach the kernel's limit on mappings."""
    if pixels.nbytes < _OWN_PAGES_FROM:
        return pixels.copy()
    pages = mmap.mmap(-1, pixels.nbytes)
    copy = np.frombuffer(pages, dtype=pixels.dtype, count=pixels.size).reshape(pixels.shape)
    copy[...] = pixels
    return copy


def _held(tile: np.ndarray) -> int:
    """Bytes ``tile`` holds: its own pages, whole (:func:`_own_pages`), or its size."""
    if tile.nbytes < _OWN_PAGES_FROM:
        return tile.nbytes
    return -(-tile.nbytes // mmap.PAGESIZE) * mmap.PAGESIZE


def _tiles_of(rect: tuple[int, int, int, int]) -> list[tuple[int, int]]:
    """The (row, column) tiles of ``(r0, r1, c0, c1)``."""
    r0, r1, c0, c1 = rect
    return [(r, c) for r in range(r0, r1) for c in range(c0, c1)]


def _rectangles(tiles: list[tuple[int, int]]) -> list[tuple[int, int, int, int]]:
    """``tiles`` (row, column) as few ``(r0, r1, c0, c1)`` rectangles, one read each: runs of
    adjacent columns in a row, joined with the same run in the rows below. A halo's missing
    tiles are an L or a band; their bounding box would decode tiles kept already.

    >>> _rectangles([(0, 2), (1, 0), (1, 1), (1, 2), (2, 0), (2, 1), (2, 2)])
    [(0, 1, 2, 3), (1, 3, 0, 3)]
    >>> _rectangles([(0, 0), (0, 2)])  # a tile kept between: not decoded again
    [(0, 1, 0, 1), (0, 1, 2, 3)]
    """
    runs: list[tuple[int, int, int]] = []  # (row, c0, c1)
    for r, c in sorted(tiles):
        if runs and runs[-1][0] == r and runs[-1][2] == c:
            runs[-1] = (r, runs[-1][1], c + 1)
        else:
            runs.append((r, c, c + 1))
    rects: list[tuple[int, int, int, int]] = []
    for r, c0, c1 in runs:
        for i, (q0, q1, d0, d1) in enumerate(rects):
            if q1 == r and (d0, d1) == (c0, c1):
                rects[i] = (q0, r + 1, d0, d1)
                break
        else:
            rects.append((r, r + 1, c0, c1))
    return rects
