"""Whole shards of a Zarr v3 array, encoded here and handed to the array's store as bytes.

Zarr 3.1 writes a sharded array through its partial-write path even when a write covers a
whole shard: it looks for the shard in the store first, fills a new array with the fill value
for every chunk and copies the chunk into it, then sends each chunk to a thread of its own to
be encoded. A task's 1024^2 block (float16 probabilities and two uint8 masks, four levels)
took 51-71 ms of CPU to store that way against 35-40 ms here, for the same bytes; its whole
``write_block`` on real probabilities 103-118 ms against 71-85 ms. Only the formats segpipe's
layouts create are encoded here (:meth:`ShardFormat.of` says which: ``bytes`` then optionally
``zstd`` inside the shard, its index ``bytes`` then ``crc32c`` at its end); anything else, and
any write that is not one whole shard, goes through Zarr. :func:`write_together` is how the
tasks (``write_block``) and the pyramid pass write: many arrays' shards in one trip; a local
store's shard files are written (and :func:`read_region`'s read) in the caller's thread, as
Zarr's ``LocalStore`` would, not through Zarr's event loop (:func:`local_file`).
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import uuid
from collections.abc import Callable, Coroutine, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import google_crc32c
import numpy as np
import zarr
from numcodecs.zstd import Zstd
from zarr.codecs import BytesCodec, Crc32cCodec, ShardingCodec, ZstdCodec
from zarr.codecs.sharding import ShardingCodecIndexLocation
from zarr.core.buffer import default_buffer_prototype
from zarr.core.sync import sync
from zarr.storage import LocalStore, StorePath

__all__ = [
    "Encoded",
    "ShardFormat",
    "ShardWrite",
    "local_file",
    "read_region",
    "shard_write",
    "write_together",
]

log = logging.getLogger("segpipe")

_EMPTY = np.iinfo(np.uint64).max  # an index entry's offset and length for a chunk not stored


try:  # chunks follow one another in Zarr's order, so a shard is byte for byte Zarr's
    from zarr.core.indexing import morton_order_iter as _chunk_order
except ImportError:  # pragma: no cover - a Zarr that moved it: C order reads the same

    def _chunk_order(chunk_shape: tuple[int, ...]) -> Iterator[tuple[int, ...]]:
        return iter(np.ndindex(*chunk_shape))


def _morton(counts: tuple[int, ...]) -> list[tuple[int, ...]]:
    return [tuple(int(i) for i in c) for c in _chunk_order(counts)]


@dataclass(frozen=True)
class ShardFormat:
    """How one array's shards are laid out: shard and chunk shapes (elements), the stored
    dtype (little endian), the fill value, and the zstd level and checksum (None: no zstd).
    Two formats are equal only with fill values of the same bits (``0.0`` is not ``-0.0``)."""

    shard: tuple[int, ...]
    chunk: tuple[int, ...]
    dtype: np.dtype[Any]
    fill: Any = field(compare=False)
    zstd: tuple[int, bool] | None
    fill_bits: bytes = field(init=False)  # what formats compare, derived from ``fill``

    def __post_init__(self) -> None:
        object.__setattr__(self, "fill_bits", np.asarray(self.fill, self.dtype).tobytes())

    @classmethod
    def of(cls, array: zarr.Array) -> ShardFormat | None:
        """The format of ``array``'s shards, or None where it is not one encoded here."""
        codecs: tuple[Any, ...] = tuple(getattr(array.metadata, "codecs", ()))
        if len(codecs) != 1 or type(codecs[0]) is not ShardingCodec:
            return None
        sharding = codecs[0]
        inner: tuple[Any, ...] = tuple(sharding.codecs)
        index: tuple[Any, ...] = tuple(sharding.index_codecs)
        little = ("little", None)
        if (
            sharding.index_location != ShardingCodecIndexLocation.end
            or len(index) != 2
            or type(index[0]) is not BytesCodec
            or getattr(index[0].endian, "value", index[0].endian) not in little
            or type(index[1]) is not Crc32cCodec
            or not inner
            or type(inner[0]) is not BytesCodec
            or getattr(inner[0].endian, "value", inner[0].endian) not in little
            or len(inner) > 2
            or (len(inner) == 2 and type(inner[1]) is not ZstdCodec)
        ):
            return None
        dtype = np.dtype(array.dtype)
        if dtype.kind not in "biuf":
            return None
        zstd = (inner[1].level, inner[1].checksum) if len(inner) == 2 else None
        shard = tuple(int(n) for n in array.metadata.chunk_grid.chunk_shape)  # type: ignore[attr-defined]
        return cls(
            shard=shard,
            chunk=tuple(int(n) for n in sharding.chunk_shape),
            dtype=dtype.newbyteorder("<"),
            fill=array.metadata.fill_value,
            zstd=zstd,
        )

    def encode(self, values: np.ndarray, *, write_empty: bool = True) -> bytes | None:
        """The stored bytes of a shard holding ``values``: the shard's part of the array,
        the whole shard or, at the array's far edge, its first ``values.shape`` elements (the
        rest of a chunk there is stored as the fill value; chunks wholly beyond the edge are
        not stored). Without ``write_empty``, chunks all equal to the fill value are not
        stored either; None when no chunk is."""
        if values.ndim != len(self.shard) or any(
            n > s for n, s in zip(values.shape, self.shard, strict=True)
        ):
            raise ValueError(f"values of shape {values.shape} do not fit a shard {self.shard}")
        values = values.astype(self.dtype, copy=False)
        zstd = None if self.zstd is None else Zstd(level=self.zstd[0], checksum=self.zstd[1])
        counts = tuple(s // c for s, c in zip(self.shard, self.chunk, strict=True))
        index = np.full((*counts, 2), _EMPTY, dtype="<u8")
        chunks: list[tuple[tuple[int, ...], np.ndarray]] = []
        for coords in _morton(counts):
            start = [i * c for i, c in zip(coords, self.chunk, strict=True)]
            if any(s >= n for s, n in zip(start, values.shape, strict=True)):
                continue  # wholly beyond the array's edge
            part = values[tuple(slice(s, s + c) for s, c in zip(start, self.chunk, strict=True))]
            if not write_empty and _all_fill(part, self.fill):
                continue
            if part.shape != self.chunk:
                padded = np.full(self.chunk, self.fill, dtype=self.dtype)
                padded[tuple(slice(0, n) for n in part.shape)] = part
                part = padded
            chunks.append((coords, part))
        # One chunk copied contiguous at a time. Not on a thread per core: zstd lets go of the
        # GIL, and a chunk pool was 1.8x faster alone, but end to end at 8192² (2 cores) it
        # changed nothing measurable, and a forked child would need its own pool.
        parts = [
            data.tobytes() if zstd is None else zstd.encode(data)
            for data in (np.ascontiguousarray(part) for _, part in chunks)
        ]
        offset = 0
        for (coords, _), encoded in zip(chunks, parts, strict=True):
            index[coords] = (offset, len(encoded))
            offset += len(encoded)
        if not parts:
            return None
        index_bytes = index.tobytes()
        checksum = google_crc32c.value(index_bytes).to_bytes(4, "little")
        return b"".join([*parts, index_bytes, checksum])

    def decode(self, data: bytes | None, *, name: str = "shard") -> np.ndarray:
        """The whole shard's values from its stored bytes (None: not stored), chunks not
        stored as the fill value: what :meth:`encode` wrote, or Zarr for this format.
        ``name`` (its key) is what a ``ValueError`` for bytes that are no such shard says."""
        values = np.full(self.shard, self.fill, dtype=self.dtype)
        if data is None:
            return values
        counts = tuple(s // c for s, c in zip(self.shard, self.chunk, strict=True))
        size = int(np.prod(counts)) * 16
        if len(data) < size + 4:
            raise ValueError(f"{name}: {len(data)} bytes, shorter than its index ({size + 4})")
        stored = memoryview(data)
        index_bytes = data[len(data) - size - 4 : len(data) - 4]  # bytes: crc32c takes no view
        if google_crc32c.value(index_bytes).to_bytes(4, "little") != data[-4:]:
            raise ValueError(f"{name}: the checksum of its index does not match")
        index = np.frombuffer(index_bytes, dtype="<u8").reshape(*counts, 2)
        zstd = None if self.zstd is None else Zstd()
        raw_size = int(np.prod(self.chunk)) * self.dtype.itemsize
        for coords in np.ndindex(*counts):
            offset, length = (int(n) for n in index[coords])
            if offset == _EMPTY and length == _EMPTY:
                continue
            if offset + length > len(data) - size - 4:
                raise ValueError(f"{name}: chunk {coords} lies past the end of its chunks")
            part = stored[offset : offset + length]
            try:
                raw = part if zstd is None else zstd.decode(part)
            except Exception as err:  # numcodecs' RuntimeError for bytes that are no frame
                raise ValueError(f"{name}: chunk {coords} does not decode: {err}") from None
            if len(raw) != raw_size:
                raise ValueError(f"{name}: chunk {coords} holds {len(raw)} bytes, not {raw_size}")
            start = [i * c for i, c in zip(coords, self.chunk, strict=True)]
            where = tuple(slice(s, s + c) for s, c in zip(start, self.chunk, strict=True))
            values[where] = np.frombuffer(raw, dtype=self.dtype).reshape(self.chunk)
        return values


def read_region(array: zarr.Array, box: tuple[slice, ...]) -> np.ndarray:
    """``array[box]`` (slices, step 1, within the array), each shard of a format encoded here
    fetched in one read and decoded here (:meth:`ShardFormat.decode`), all in one trip to
    the store (a local store's files read here: :func:`local_file`); Zarr reads other
    formats. Zarr 3.1 reads a shard's index and then each chunk apart: the pyramid pass
    spent most of its time opening the small shards of a level."""
    form = ShardFormat.of(array)
    ranges = [range(*b.indices(n)) for b, n in zip(box, array.shape, strict=True)]
    if form is None or any(r.step != 1 for r in ranges):
        return np.asarray(array[box])
    spans = [range(r.start // s, -(-r.stop // s)) for r, s in zip(ranges, form.shard, strict=True)]
    grid = list(itertools.product(*spans))
    keys = [array.metadata.encode_chunk_key(coords) for coords in grid]
    values = np.empty([len(r) for r in ranges], dtype=array.dtype)
    for coords, key, data in zip(grid, keys, _shard_bytes(array.store_path, keys), strict=True):
        shard = form.decode(data, name=f"{array.store_path}/{key}")
        # The part of this shard inside ``box``, in the shard's and in the result's indices
        inside, into = [], []
        for c, s, r in zip(coords, form.shard, ranges, strict=True):
            lo, hi = max(r.start, c * s), min(r.stop, (c + 1) * s)
            inside.append(slice(lo - c * s, hi - c * s))
            into.append(slice(lo - r.start, hi - r.start))
        values[tuple(into)] = shard[tuple(inside)]
    return values


def _shard_bytes(where: StorePath, keys: list[str]) -> list[bytes | None]:
    """The stored bytes of each of ``keys`` under ``where`` (None: not stored): a local
    store's files read here, others' in one trip through Zarr."""
    folder = local_file(where)
    if folder is not None:
        found: list[bytes | None] = []
        for key in keys:
            try:
                found.append(Path(folder, key).read_bytes())
            except (FileNotFoundError, IsADirectoryError, NotADirectoryError):  # as Zarr's
                found.append(None)
        return found
    prototype = default_buffer_prototype()

    async def read_all() -> list[Any]:
        return await asyncio.gather(*((where / k).get(prototype) for k in keys))

    return [None if b is None else b.to_bytes() for b in sync(read_all())]


def _all_fill(values: np.ndarray, fill: Any) -> bool:
    # 10-70 us for a 512^2 chunk, where Zarr's own comparison took 0.7-1 ms. Floats compare
    # by their bits, as Zarr's does (-0.0 is not a fill of 0.0), unless the fill is NaN.
    if values.dtype.kind == "f":
        if np.isnan(fill):
            return bool(np.isnan(values).all())
        bits = f"u{values.dtype.itemsize}"
        values, fill = values.view(bits), np.asarray(fill, values.dtype).view(bits)[()]
    if values.flat[0] != fill:
        return False
    return not values.any() if fill == 0 else bool((values == fill).all())


@dataclass(frozen=True)
class ShardWrite:
    """One shard's bytes (None: the shard holds nothing and is deleted) and where they go."""

    where: StorePath
    data: bytes | None

    async def run(self) -> None:
        """Store the bytes, or delete the shard when there are none."""
        if self.data is None:
            await self.where.delete()
        else:
            await self.where.set(default_buffer_prototype().buffer.from_bytes(self.data))

    def run_here(self, path: Path) -> None:
        """:meth:`run` in this thread, the shard being ``path`` (its :func:`local_file`), as
        Zarr's ``LocalStore`` stores it (written beside, as ``<name>.<hex>.partial``, and
        renamed over)."""
        if self.data is None:
            path.unlink(missing_ok=True)
        else:
            _store_file(path, self.data)


def local_file(where: StorePath, *, writing: bool = False) -> Path | None:
    """The file of ``where`` when its store is a local one (Zarr's ``LocalStore`` itself;
    ``writing``: one open for writing), else None. Such files are read and written in the
    caller's thread: through Zarr, every shard went to its event loop's one thread and back,
    a round trip each task's thread (8 of them beside a GPU) waited on, each leg waiting for
    the GIL."""
    store = where.store
    if type(store) is not LocalStore or (writing and store.read_only):
        return None
    return Path(store.root, where.path)


def _store_file(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_suffix(f".{uuid.uuid4().hex}.partial")
    try:
        partial.write_bytes(data)
        partial.replace(path)
    except BaseException:
        partial.unlink(missing_ok=True)
        raise


Encoded = dict[tuple[int, ShardFormat, bool], bytes | None]


def shard_write(
    array: zarr.Array,
    selection: tuple[slice, ...],
    values: np.ndarray,
    encoded: Encoded | None = None,
) -> ShardWrite | None:
    """``array[selection] = values`` as one shard's bytes, when ``selection`` is exactly one
    whole shard (cut at the array's edge) of a format encoded here; else None (Zarr writes
    it). Chunks equal to the fill value are left out as ``array``'s ``write_empty_chunks``
    says, as Zarr would. ``encoded``: shards already encoded by the caller, by ``id`` of
    their values, format and ``write_empty_chunks``; a level's mask and its label image, the
    same values in the same format, are encoded once. The caller keeps the values alive."""
    form = ShardFormat.of(array)
    if form is None or len(selection) != array.ndim or values.shape != _shape(array, selection):
        return None
    coords = []
    for sel, n, s in zip(selection, array.shape, form.shard, strict=True):
        start, stop, step = sel.indices(n)
        if step != 1 or start % s or stop != min(start + s, n):
            return None
        coords.append(start // s)
    key = array.metadata.encode_chunk_key(tuple(coords))
    write_empty = bool(array.config.write_empty_chunks)
    encoded = {} if encoded is None else encoded
    same = (id(values), form, write_empty)
    if same not in encoded:
        encoded[same] = form.encode(values, write_empty=write_empty)
    return ShardWrite(array.store_path / key, encoded[same])


def _shape(array: zarr.Array, selection: tuple[slice, ...]) -> tuple[int, ...] | None:
    if not all(isinstance(s, slice) for s in selection):
        return None
    return tuple(len(range(*s.indices(n))) for s, n in zip(selection, array.shape, strict=True))


def write_together(
    writes: Sequence[tuple[zarr.Array, tuple[slice, ...], np.ndarray]],
    *,
    before_storing: Callable[[], object] | None = None,
) -> None:
    """``array[selection] = values`` for each write, in one trip to the stores. A write of one
    whole shard in a format :mod:`segpipe.results.shards` knows is encoded here, in the
    caller's thread (the one core an I/O section holds), and only stored in the trip (a
    local store's file, here too: :func:`local_file`); others go to Zarr, whose threads
    encode them side by side. Each write must be whole shards no other write of the call
    touches. Returns when every write has ended; raises the failure of the first write that
    failed, in the order given. ``before_storing`` runs once the shards are encoded, right
    before the trip: what it raises is raised, nothing stored."""
    outcomes: list[BaseException | None] = [None] * len(writes)
    pending: dict[int, Coroutine[Any, Any, None]] = {}
    here: dict[int, tuple[ShardWrite, Path]] = {}  # a local store's: stored in this thread
    encoded: Encoded = {}
    for i, (array, selection, values) in enumerate(writes):
        try:
            shard = shard_write(array, selection, values, encoded)
        except Exception as e:  # encoding failed: the other writes still run to their end
            outcomes[i] = e
            continue
        path = None if shard is None else local_file(shard.where, writing=True)
        if shard is not None and path is not None:
            here[i] = (shard, path)
        else:
            pending[i] = (
                shard.run() if shard is not None else array.async_array.setitem(selection, values)
            )

    try:
        if before_storing is not None:
            before_storing()
        for i, (shard, path) in here.items():
            try:
                shard.run_here(path)
            except Exception as e:  # the other writes still run to their end
                outcomes[i] = e
    except BaseException:  # the fence's refusal, or a stop (Ctrl-C, SIGTERM's SystemExit)
        for coroutine in pending.values():  # nothing more is stored: never to be awaited
            coroutine.close()
        raise

    async def write_all() -> list[BaseException | None]:
        return await asyncio.gather(*pending.values(), return_exceptions=True)

    if pending:
        for i, outcome in zip(pending, sync(write_all()), strict=True):
            if isinstance(outcome, BaseException):
                outcomes[i] = outcome
    failures = [o for o in outcomes if o is not None]
    for other in failures[1:]:
        log.warning("another write of the same call failed too: %r", other)
    if failures:
        raise failures[0]
