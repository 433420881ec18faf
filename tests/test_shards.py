"""Shards encoded by segpipe.results.shards are the bytes Zarr itself stores for the same
write, and writes it does not know go to Zarr."""

import gc
import pathlib
import re
import warnings

import google_crc32c
import numpy as np
import pytest
import zarr
from hypothesis import given, settings
from hypothesis import strategies as st
from zarr.codecs import BloscCodec, BytesCodec, Crc32cCodec, ShardingCodec, ZstdCodec
from zarr.core.buffer import default_buffer_prototype
from zarr.core.sync import sync
from zarr.storage import LocalStore, MemoryStore

from segpipe.results.shards import ShardFormat, read_region, shard_write, write_together


def stored(array: zarr.Array, key: str) -> bytes | None:
    found = sync(array.store_path.store.get(f"{array.path}/{key}", default_buffer_prototype()))
    return None if found is None else found.to_bytes()


def assert_written_as_zarr(ours, reference, selection, values, key):
    """``values`` written at ``selection`` by Zarr into ``reference`` and by one shard
    encoded here into ``ours``: the shard at ``key`` is the same bytes."""
    reference[selection] = values
    write = shard_write(ours, selection, values)
    assert write is not None
    sync(write.run())
    assert stored(ours, key) == stored(reference, key)


def create(store, name, shape, chunks, shards, dtype, fill=0, compressors="zstd", **kw):
    codec = {"zstd": ZstdCodec(level=1), None: None}[compressors]
    return zarr.create_array(
        store, name=name, shape=shape, chunks=chunks, shards=shards, dtype=dtype,
        fill_value=fill, compressors=codec, **kw,
    )  # fmt: skip


@settings(max_examples=80, deadline=None)
@given(
    data=st.data(),
    dtype=st.sampled_from(["uint8", "float16", "float32", "int16", "bool"]),
    compressors=st.sampled_from(["zstd", None]),
    fill=st.sampled_from([0, 3, -0.0, float("nan")]),
    write_empty=st.booleans(),
    classes=st.sampled_from([None, 1, 3]),
)
def test_a_shard_is_the_bytes_zarr_stores(data, dtype, compressors, fill, write_empty, classes):
    floats = np.dtype(dtype).kind == "f"
    if not floats and isinstance(fill, float):
        fill = 0  # -0.0 and NaN are float fills
    if dtype == "bool":
        fill = bool(fill)
    chunk = data.draw(st.sampled_from([4, 8]))
    per_shard = data.draw(st.sampled_from([1, 2, 4]))
    shard = chunk * per_shard
    shape = tuple(data.draw(st.integers(1, 3 * shard)) for _ in range(2))
    lead = () if classes is None else (classes,)
    store = MemoryStore()
    kw = dict(dtype=dtype, fill=fill, compressors=compressors)
    reference = create(
        store, "zarr", (*lead, *shape), (*lead, chunk, chunk), (*lead, shard, shard), **kw
    )
    ours = create(
        store, "ours", (*lead, *shape), (*lead, chunk, chunk), (*lead, shard, shard), **kw
    )
    config = {"write_empty_chunks": write_empty}
    reference, ours = reference.with_config(config), ours.with_config(config)
    # A whole shard, or one cut by the far edge, some of its chunks all fill value.
    sy, sx = (data.draw(st.integers(0, (n - 1) // shard)) for n in shape)
    box = tuple(
        slice(i * shard, min((i + 1) * shard, n)) for i, n in zip((sy, sx), shape, strict=True)
    )
    rng = np.random.default_rng(data.draw(st.integers(0, 2**16)))
    values = rng.integers(0, 6, (*lead, *(b.stop - b.start for b in box))).astype(dtype)
    # Some chunks all fill value; of floats, some all the other zero, or all NaN: Zarr
    # compares bits (a chunk of -0.0 is not a fill of 0.0).
    others = [0.0, -0.0, np.nan] if floats else []
    for cy in range(0, values.shape[-2], chunk):
        for cx in range(0, values.shape[-1], chunk):
            draw = rng.random()
            if draw < 0.4:
                values[..., cy : cy + chunk, cx : cx + chunk] = fill
            elif draw < 0.6 and others:
                values[..., cy : cy + chunk, cx : cx + chunk] = others[rng.integers(3)]
    selection = (*(slice(None) for _ in lead), *box)
    reference[selection] = values
    write = shard_write(ours, selection, values)
    assert write is not None
    sync(write.run())
    key = reference.metadata.encode_chunk_key((*(0 for _ in lead), sy, sx))
    assert stored(ours, key) == stored(reference, key)
    np.testing.assert_array_equal(ours[...], reference[...])


def test_an_all_fill_shard_is_deleted_unless_empty_chunks_are_written():
    store = MemoryStore()
    array = create(store, "a", (16, 16), (4, 4), (8, 8), "uint8")
    array[:8, :8] = 7
    assert stored(array, "c/0/0") is not None
    sync(shard_write(array, (slice(0, 8), slice(0, 8)), np.zeros((8, 8), np.uint8)).run())
    assert stored(array, "c/0/0") is None
    dense = array.with_config({"write_empty_chunks": True})
    sync(shard_write(dense, (slice(0, 8), slice(0, 8)), np.zeros((8, 8), np.uint8)).run())
    assert stored(array, "c/0/0") is not None
    assert array[...].max() == 0


@pytest.mark.parametrize(
    "selection",
    [
        (slice(0, 4), slice(0, 8)),  # part of a shard
        (slice(4, 12), slice(0, 8)),  # across two shards
        (slice(0, 16), slice(0, 8)),  # two whole shards
        (slice(0, 8, 2), slice(0, 8)),  # a step
    ],
)
def test_writes_of_other_than_one_whole_shard_go_to_zarr(selection):
    store = MemoryStore()
    array = create(store, "a", (20, 20), (4, 4), (8, 8), "float32")
    shape = tuple(len(range(*s.indices(20))) for s in selection)
    values = np.arange(np.prod(shape), dtype=np.float32).reshape(shape) + 1
    assert shard_write(array, selection, values) is None
    write_together([(array, selection, values)])
    np.testing.assert_array_equal(array[selection], values)


@pytest.mark.parametrize(
    "codecs",
    [
        dict(compressors=BloscCodec()),  # not zstd
        dict(shards=None),  # not sharded
        dict(index_location="start"),
    ],
)
@pytest.mark.filterwarnings("ignore:Combining a `sharding_indexed` codec")
def test_formats_not_encoded_here_go_to_zarr(codecs):
    store = MemoryStore()
    kw = dict(shape=(16, 16), chunks=(4, 4), shards=(8, 8), dtype="uint8", fill_value=0)
    if "index_location" in codecs:
        sharding = ShardingCodec(
            chunk_shape=(4, 4), codecs=[BytesCodec(), ZstdCodec()], index_location="start",
            index_codecs=[BytesCodec(), Crc32cCodec()],
        )  # fmt: skip
        kw = dict(shape=(16, 16), chunks=(8, 8), dtype="uint8", fill_value=0)
        array = zarr.create_array(store, name="a", serializer=sharding, **kw)
    else:
        array = zarr.create_array(store, name="a", **{**kw, **codecs})
    assert ShardFormat.of(array) is None
    values = np.arange(64, dtype=np.uint8).reshape(8, 8)
    selection = (slice(0, 8), slice(8, 16))
    assert shard_write(array, selection, values) is None
    write_together([(array, selection, values)])
    np.testing.assert_array_equal(array[selection], values)


def test_values_larger_than_a_shard_are_refused():
    array = create(MemoryStore(), "a", (16, 16), (4, 4), (8, 8), "uint8")
    form = ShardFormat.of(array)
    assert form is not None and form.shard == (8, 8) and form.chunk == (4, 4)
    with pytest.raises(ValueError, match=r"do not fit a shard \(8, 8\)"):
        form.encode(np.zeros((9, 8), np.uint8))


def test_the_same_values_in_the_same_format_are_encoded_once(monkeypatch):
    store = MemoryStore()
    mask, label, other = (create(store, n, (16, 16), (4, 4), (8, 8), "uint8") for n in "abc")
    other = other.with_config({"write_empty_chunks": True})  # the same format, another rule
    calls = []
    encode = ShardFormat.encode
    monkeypatch.setattr(
        ShardFormat, "encode", lambda self, v, **kw: calls.append(v) or encode(self, v, **kw)
    )
    values = np.arange(64, dtype=np.uint8).reshape(8, 8)
    where = (slice(8, 16), slice(0, 8))
    write_together([(mask, where, values), (label, where, values), (other, where, values)])
    assert len(calls) == 2
    assert stored(mask, "c/1/0") == stored(label, "c/1/0") == stored(other, "c/1/0")
    np.testing.assert_array_equal(label[where], values)


class _Refused(Exception):
    pass


def test_what_runs_before_storing_sees_the_shards_encoded_and_may_store_nothing(monkeypatch):
    store = MemoryStore()
    ours = create(store, "a", (16, 16), (4, 4), (8, 8), "uint8")
    kw = dict(shape=(16, 16), chunks=(4, 4), shards=(8, 8), dtype="uint8", fill_value=0)
    theirs = zarr.create_array(store, name="b", compressors=BloscCodec(), **kw)  # Zarr encodes
    events = []
    encode = ShardFormat.encode
    monkeypatch.setattr(
        ShardFormat,
        "encode",
        lambda self, v, **kw: events.append("encoded") or encode(self, v, **kw),
    )
    values = np.arange(1, 65, dtype=np.uint8).reshape(8, 8)
    where = (slice(0, 8), slice(8, 16))
    writes = [(ours, where, values), (theirs, where, values)]

    def refuse() -> None:
        events.append("checked")
        raise _Refused

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with pytest.raises(_Refused):
            write_together(writes, before_storing=refuse)
        gc.collect()
    assert not [w for w in caught if "never awaited" in str(w.message)]
    assert events == ["encoded", "checked"]
    assert sorted(sync(_keys(store))) == ["a/zarr.json", "b/zarr.json", "zarr.json"]
    write_together(writes, before_storing=lambda: events.append("checked"))
    np.testing.assert_array_equal(ours[where], values)
    np.testing.assert_array_equal(theirs[where], values)


async def _keys(store: MemoryStore) -> list[str]:
    return [k async for k in store.list()]


@settings(max_examples=60, deadline=None)
@given(
    data=st.data(),
    dtype=st.sampled_from(["uint8", "float16", "float32", "bool"]),
    compressors=st.sampled_from(["zstd", None]),
    fill=st.sampled_from([0, 3, float("nan")]),
    classes=st.sampled_from([None, 2]),
)
def test_a_region_reads_as_zarr_reads_it(data, dtype, compressors, fill, classes):
    """Zarr writes (every chunk or only those not all fill, shards cut by the far edge, some
    never written); ``read_region`` decodes its shards itself and gives what Zarr reads."""
    if np.dtype(dtype).kind != "f" and isinstance(fill, float):
        fill = 0
    if dtype == "bool":
        fill = bool(fill)
    chunk = data.draw(st.sampled_from([4, 8]))
    shard = chunk * data.draw(st.sampled_from([1, 2]))
    shape = tuple(data.draw(st.integers(1, 3 * shard)) for _ in range(2))
    lead = () if classes is None else (classes,)
    array = create(
        MemoryStore(), "a", (*lead, *shape), (*lead, chunk, chunk), (*lead, shard, shard),
        dtype=dtype, fill=fill, compressors=compressors,
    ).with_config({"write_empty_chunks": data.draw(st.booleans())})  # fmt: skip
    rng = np.random.default_rng(data.draw(st.integers(0, 2**16)))
    values = rng.integers(0, 3, (*lead, *shape)).astype(dtype)
    values[..., : shape[0] // 2, :] = fill  # chunks all fill: not stored, or stored
    array[...] = values
    first = (0,) * len(lead) + (0, 0)
    if data.draw(st.booleans()):  # a shard never written (or deleted) reads as fill
        sync(array.store_path.store.delete(f"a/{array.metadata.encode_chunk_key(first)}"))
    y0, x0 = (data.draw(st.integers(0, n - 1)) for n in shape)
    y1, x1 = data.draw(st.integers(y0 + 1, shape[0] + 2)), data.draw(st.integers(x0 + 1, shape[1]))
    box = (*(slice(None) for _ in lead), slice(y0, y1), slice(x0, x1))  # past the edge: cut
    got = read_region(array, box)
    expected = array[box]
    assert got.dtype == expected.dtype and got.shape == expected.shape
    np.testing.assert_array_equal(got, expected)


def test_a_region_of_a_format_not_encoded_here_is_read_by_zarr(monkeypatch):
    kw = dict(shape=(16, 16), chunks=(4, 4), shards=(8, 8), dtype="uint8", fill_value=0)
    array = zarr.create_array(MemoryStore(), name="b", compressors=BloscCodec(), **kw)
    array[...] = np.arange(256, dtype=np.uint8).reshape(16, 16)
    monkeypatch.setattr(ShardFormat, "decode", lambda *a, **k: pytest.fail("decoded here"))
    box = (slice(3, 13), slice(5, 16))
    np.testing.assert_array_equal(read_region(array, box), array[box])


@pytest.mark.parametrize(
    ("damage", "compressors", "message"),
    [
        (lambda b: b[:10], None, "shorter than its index"),
        (lambda b: b[:-1] + bytes([b[-1] ^ 1]), None, "checksum of its index"),
        (lambda b: b[1:], None, r"chunk \(1, 1\) lies past the end"),  # a byte lost
        (lambda b: b"\0" * 8 + b, "zstd", r"chunk \(0, 0\) does not decode"),  # bytes added
    ],
)
def test_a_damaged_shard_is_refused_naming_it(damage, compressors, message):
    store = MemoryStore()
    array = create(store, "a", (16, 16), (4, 4), (8, 8), "uint8", compressors=compressors)
    array[...] = np.arange(256, dtype=np.uint8).reshape(16, 16)
    key = "a/c/1/0"
    good = stored(array, "c/1/0")
    assert good is not None
    sync(store.set(key, default_buffer_prototype().buffer.from_bytes(damage(good))))
    with pytest.raises(ValueError, match=message) as caught:
        read_region(array, (slice(0, 16), slice(0, 16)))
    assert "c/1/0" in str(caught.value)


def test_a_local_stores_shards_are_written_and_read_here_as_zarr_would(tmp_path, monkeypatch):
    """A local store's shard files are stored and read in the caller's thread, never through
    Zarr's event loop: the same files as Zarr's LocalStore writes (nothing left beside them),
    an all-fill shard deleted, and what Zarr reads back; a read-only store goes through Zarr."""
    from segpipe.results import shards

    def arrays(root):
        return [create(LocalStore(root), n, (20, 20), (4, 4), (8, 8), "uint8") for n in ("a", "b")]

    ours, theirs = arrays(tmp_path / "ours"), arrays(tmp_path / "theirs")
    values = np.arange(1, 65, dtype=np.uint8).reshape(8, 8)
    edge = np.full((4, 8), 7, np.uint8)  # a shard cut by the far edge
    writes = [((slice(8, 16), slice(0, 8)), values), ((slice(16, 20), slice(8, 16)), edge)]
    for array in theirs:  # Zarr's own writes
        for selection, v in writes:
            array[selection] = v
    monkeypatch.setattr(shards, "sync", lambda *a, **k: pytest.fail("through Zarr's loop"))
    write_together([(a, sel, v) for a in ours for sel, v in writes])
    for mine, zarrs in zip(ours, theirs, strict=True):
        for key in ("c/1/0", "c/2/1"):
            assert stored(mine, key) is not None and stored(mine, key) == stored(zarrs, key)
        np.testing.assert_array_equal(
            read_region(mine, (slice(3, 20), slice(0, 17))), zarrs[3:, :17]
        )
    assert not list(tmp_path.rglob("*.partial"))
    write_together([(ours[0], (slice(8, 16), slice(0, 8)), np.zeros((8, 8), np.uint8))])
    assert stored(ours[0], "c/1/0") is None  # all fill: deleted, as Zarr does
    assert read_region(ours[0], (slice(8, 16), slice(0, 8))).max() == 0
    monkeypatch.undo()
    read_only = zarr.open_array(LocalStore(tmp_path / "ours", read_only=True), path="b")
    assert shards.local_file(read_only.store_path, writing=True) is None
    with pytest.raises(ValueError, match=r"read.only"):
        write_together([(read_only, (slice(8, 16), slice(0, 8)), values)])


def test_a_stop_while_a_local_shard_is_stored_stores_nothing_more(tmp_path, monkeypatch):
    """Ctrl-C (or SIGTERM's SystemExit) while a local store's shard is written: it is
    raised at once, and the writes Zarr would have made are never started (nor left as
    coroutines never awaited)."""
    from segpipe.results import shards

    ours = create(LocalStore(tmp_path), "a", (16, 16), (4, 4), (8, 8), "uint8")
    kw = dict(shape=(16, 16), chunks=(4, 4), shards=(8, 8), dtype="uint8", fill_value=0)
    theirs = zarr.create_array(MemoryStore(), name="b", compressors=BloscCodec(), **kw)

    def interrupted(path, data):
        raise KeyboardInterrupt

    monkeypatch.setattr(shards, "_store_file", interrupted)
    values = np.arange(1, 65, dtype=np.uint8).reshape(8, 8)
    where = (slice(0, 8), slice(8, 16))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with pytest.raises(KeyboardInterrupt):
            write_together([(ours, where, values), (theirs, where, values)])
        gc.collect()
    assert not [w for w in caught if "never awaited" in str(w.message)]
    assert stored(ours, "c/0/1") is None
    assert theirs[where].max() == 0, "Zarr's write was started"


_NOT_STORED = np.iinfo(np.uint64).max  # an index entry's offset and length for no chunk


@pytest.mark.parametrize(
    ("codecs", "index_codecs"),
    [
        ([BytesCodec(), ZstdCodec()], [BytesCodec(endian="big"), Crc32cCodec()]),
        ([BytesCodec(endian="big"), ZstdCodec()], [BytesCodec(), Crc32cCodec()]),
        ([BytesCodec(), ZstdCodec(), Crc32cCodec()], [BytesCodec(), Crc32cCodec()]),
    ],
    ids=["big-endian index", "big-endian chunks", "a checksum after zstd"],
)
def test_formats_differing_in_byte_order_or_codecs_go_to_zarr(codecs, index_codecs):
    sharding = ShardingCodec(chunk_shape=(4, 4), codecs=codecs, index_codecs=index_codecs)
    kw = dict(shape=(16, 16), chunks=(8, 8), dtype="uint16", fill_value=0, compressors=None)
    array = zarr.create_array(MemoryStore(), name="a", serializer=sharding, **kw)
    reference = zarr.create_array(MemoryStore(), name="a", serializer=sharding, **kw)
    assert ShardFormat.of(array) is None
    values = np.arange(1, 65, dtype=np.uint16).reshape(8, 8) * 257
    selection = (slice(0, 8), slice(8, 16))
    assert shard_write(array, selection, values) is None
    write_together([(array, selection, values)])
    reference[selection] = values
    assert stored(array, "c/0/1") == stored(reference, "c/0/1")
    np.testing.assert_array_equal(array[selection], values)
    np.testing.assert_array_equal(read_region(array, selection), values)


@pytest.mark.parametrize("checksum", [True, False])
def test_a_shard_with_a_zstd_checksum_is_the_bytes_zarr_stores(checksum):
    store = MemoryStore()
    kw = dict(shape=(16, 16), chunks=(4, 4), shards=(8, 8), dtype="uint8", fill_value=0)
    codec = ZstdCodec(level=5, checksum=checksum)
    reference = zarr.create_array(store, name="zarr", compressors=codec, **kw)
    ours = zarr.create_array(store, name="ours", compressors=codec, **kw)
    form = ShardFormat.of(ours)
    assert form is not None and form.zstd == (5, checksum)
    values = np.arange(64, dtype=np.uint8).reshape(8, 8)
    selection = (slice(8, 16), slice(0, 8))
    assert_written_as_zarr(ours, reference, selection, values, "c/1/0")
    np.testing.assert_array_equal(ours[selection], values)


@pytest.mark.parametrize("dtype", ["float16", "float32"])
def test_a_chunk_of_other_nans_is_a_fill_of_nan(dtype):
    store = MemoryStore()
    reference = create(store, "zarr", (16, 16), (4, 4), (8, 8), dtype, fill=float("nan"))
    ours = create(store, "ours", (16, 16), (4, 4), (8, 8), dtype, fill=float("nan"))
    bits = np.dtype(f"u{np.dtype(dtype).itemsize}")
    canonical = np.asarray(np.nan, dtype).view(bits)[()]
    values = np.arange(1, 65, dtype=dtype).reshape(8, 8)
    other = np.full((4, 4), canonical | (canonical >> 1), bits).view(
        dtype
    )  # quiet, another payload
    negative = (-np.full((4, 4), np.nan, dtype)).astype(dtype)
    assert np.isnan(other).all() and np.isnan(negative).all()
    assert other.view(bits)[0, 0] != canonical and negative.view(bits)[0, 0] != canonical
    values[:4, :4], values[4:, 4:] = other, negative
    selection = (slice(0, 8), slice(8, 16))
    assert_written_as_zarr(ours, reference, selection, values, "c/0/1")
    np.testing.assert_array_equal(ours[selection], reference[selection])


@pytest.mark.parametrize("box", [(slice(0, 16, 2), slice(3, 13)), (slice(1, 20), slice(2, 19, 3))])
def test_a_region_with_a_step_reads_as_zarr_reads_it(box):
    array = create(MemoryStore(), "a", (20, 20), (4, 4), (8, 8), "uint8")
    array[...] = np.arange(400).reshape(20, 20).astype(np.uint8)
    np.testing.assert_array_equal(read_region(array, box), array[box])


@pytest.mark.parametrize(
    ("box", "keys"),
    [
        ((slice(0, 8), slice(0, 16)), ["c/0/0", "c/0/1"]),
        ((slice(7, 16), slice(8, 9)), ["c/0/1", "c/1/1"]),
        ((slice(16, 20), slice(16, 24)), ["c/2/2"]),
    ],
)
def test_a_region_reads_only_the_shards_it_touches(monkeypatch, box, keys):
    from segpipe.results import shards

    array = create(MemoryStore(), "a", (20, 24), (4, 4), (8, 8), "uint8")
    array[...] = np.arange(480).reshape(20, 24).astype(np.uint8)
    read = []
    shard_bytes = shards._shard_bytes

    def spy(where, wanted):
        read.extend(wanted)
        return shard_bytes(where, wanted)

    monkeypatch.setattr(shards, "_shard_bytes", spy)
    np.testing.assert_array_equal(shards.read_region(array, box), array[box])
    assert read == keys


def _shard(parts: bytes, index: np.ndarray) -> bytes:
    index_bytes = index.astype("<u8").tobytes()
    return parts + index_bytes + google_crc32c.value(index_bytes).to_bytes(4, "little")


def _put(array, key: str, data: bytes) -> None:
    store = array.store_path.store
    sync(store.set(f"a/{key}", default_buffer_prototype().buffer.from_bytes(data)))


def test_a_shard_of_its_index_alone_reads_as_fill():
    array = create(MemoryStore(), "a", (16, 16), (4, 4), (8, 8), "uint8", fill=3, compressors=None)
    _put(array, "c/0/0", _shard(b"", np.full((2, 2, 2), _NOT_STORED, np.uint64)))
    np.testing.assert_array_equal(read_region(array, (slice(0, 8), slice(0, 8))), array[:8, :8])
    assert (read_region(array, (slice(0, 8), slice(0, 8))) == 3).all()


@pytest.mark.parametrize(
    ("entry", "message"),
    [
        ((_NOT_STORED, 16), r"chunk \(0, 1\) lies past the end"),  # half an empty entry
        ((16, 15), r"chunk \(0, 1\) holds 15 bytes, not 16"),  # a chunk a byte short
    ],
)
def test_a_handmade_index_entry_that_is_no_chunk_is_refused_naming_it(entry, message):
    array = create(MemoryStore(), "a", (16, 16), (4, 4), (8, 8), "uint8", compressors=None)
    form = ShardFormat.of(array)
    assert form is not None
    index = np.full((2, 2, 2), _NOT_STORED, np.uint64)
    index[0, 0] = (0, 16)
    index[0, 1] = entry
    _put(array, "c/1/0", _shard(bytes(range(32)), index))
    with pytest.raises(ValueError, match=message) as caught:
        read_region(array, (slice(0, 16), slice(0, 16)))
    assert "c/1/0" in str(caught.value)


def test_an_all_fill_shard_never_stored_is_nothing_to_delete(tmp_path):
    array = create(LocalStore(tmp_path), "a", (16, 16), (4, 4), (8, 8), "uint8")
    write_together([(array, (slice(8, 16), slice(0, 8)), np.zeros((8, 8), np.uint8))])
    assert stored(array, "c/1/0") is None
    assert read_region(array, (slice(0, 16), slice(0, 16))).max() == 0


def test_a_shard_file_that_cannot_be_put_in_place_leaves_no_partial_file(tmp_path):
    array = create(LocalStore(tmp_path), "a", (16, 16), (4, 4), (8, 8), "uint8")
    in_the_way = tmp_path / "a" / "c" / "1" / "0"
    (in_the_way / "x").mkdir(parents=True)  # a folder, not empty, where the shard goes
    values = np.arange(1, 65, dtype=np.uint8).reshape(8, 8)
    np.testing.assert_array_equal(
        read_region(array, (slice(4, 16), slice(0, 8))), array[4:16, 0:8]
    )  # the folder reads as fill, as Zarr reads it
    with pytest.raises(OSError, match=r"Is a directory|Directory not empty"):
        write_together([(array, (slice(8, 16), slice(0, 8)), values)])
    assert not list(tmp_path.rglob("*.partial"))
    assert in_the_way.is_dir()


def test_a_stop_while_a_shard_file_is_renamed_leaves_no_partial_file(tmp_path, monkeypatch):
    array = create(LocalStore(tmp_path), "a", (16, 16), (4, 4), (8, 8), "uint8")
    values = np.arange(1, 65, dtype=np.uint8).reshape(8, 8)

    def interrupted(self, target):
        raise KeyboardInterrupt

    monkeypatch.setattr(pathlib.Path, "replace", interrupted)
    with pytest.raises(KeyboardInterrupt):
        write_together([(array, (slice(8, 16), slice(0, 8)), values)])
    monkeypatch.undo()
    assert not list(tmp_path.rglob("*.partial"))
    assert stored(array, "c/1/0") is None


def test_a_shard_file_is_written_beside_as_zarrs_partial_name(tmp_path, monkeypatch):
    """``<name>.<32 hex>.partial``, a new name each time, as Zarr's LocalStore names it: two
    writers of one shard (a run replaced, writing late) never write into the same file."""

    array = create(LocalStore(tmp_path), "a", (16, 16), (4, 4), (8, 8), "uint8")
    names = []
    write_bytes = pathlib.Path.write_bytes

    def spy(self, data):
        names.append(self.name)
        return write_bytes(self, data)

    monkeypatch.setattr(pathlib.Path, "write_bytes", spy)
    values = np.arange(1, 65, dtype=np.uint8).reshape(8, 8)
    for _ in range(2):
        write_together([(array, (slice(8, 16), slice(0, 8)), values)])
    assert len(names) == 2 and names[0] != names[1]
    assert all(re.fullmatch(r"0\.[0-9a-f]{32}\.partial", n) for n in names), names
    np.testing.assert_array_equal(array[8:16, 0:8], values)


def test_the_first_failure_in_the_order_given_is_raised_after_every_write(tmp_path):
    local = create(LocalStore(tmp_path / "rw"), "a", (16, 16), (4, 4), (8, 8), "uint8")
    create(LocalStore(tmp_path / "ro"), "b", (16, 16), (4, 4), (8, 8), "uint8")
    read_only = zarr.open_array(LocalStore(tmp_path / "ro", read_only=True), path="b")
    (tmp_path / "rw" / "a" / "c" / "1" / "0" / "x").mkdir(parents=True)  # in the way
    values = np.arange(1, 65, dtype=np.uint8).reshape(8, 8)
    fine = (slice(0, 8), slice(0, 8))
    writes = [
        (read_only, fine, values),  # Zarr's write, after the local ones: refused
        (local, (slice(8, 16), slice(0, 8)), values),  # stored here, first: a folder in the way
        (local, fine, values),
    ]
    with pytest.raises(ValueError, match=r"read.only"):
        write_together(writes)
    np.testing.assert_array_equal(local[fine], values)


def test_a_write_that_fails_to_encode_fails_alone(monkeypatch):
    store = MemoryStore()
    first, second = (create(store, n, (16, 16), (4, 4), (8, 8), "uint8") for n in "ab")
    bad = np.arange(64, dtype=np.uint8).reshape(8, 8)
    good = bad + 1
    encode = ShardFormat.encode

    def refusing(self, values, **kw):
        if values is bad:
            raise ValueError("cannot encode")
        return encode(self, values, **kw)

    monkeypatch.setattr(ShardFormat, "encode", refusing)
    where = (slice(0, 8), slice(8, 16))
    with pytest.raises(ValueError, match="cannot encode"):
        write_together([(first, where, bad), (second, where, good)])
    assert stored(first, "c/0/1") is None
    np.testing.assert_array_equal(second[where], good)


def test_what_runs_before_storing_may_store_nothing_in_a_local_store(tmp_path):
    array = create(LocalStore(tmp_path), "a", (16, 16), (4, 4), (8, 8), "uint8")
    values = np.arange(1, 65, dtype=np.uint8).reshape(8, 8)
    where = (slice(0, 8), slice(8, 16))

    def refuse() -> None:
        assert not (tmp_path / "a" / "c").exists(), "stored before the fence"
        raise _Refused

    with pytest.raises(_Refused):
        write_together([(array, where, values)], before_storing=refuse)
    assert stored(array, "c/0/1") is None
    assert not (tmp_path / "a" / "c").exists()
