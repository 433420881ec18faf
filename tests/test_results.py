import asyncio
import dataclasses
import json
import os
import re
import shutil
import threading
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import xarray as xr
import zarr
from hypothesis import given, settings
from hypothesis import strategies as st
from test_query import finish, run_summary
from zarr.storage import LocalStore, StorePath

from segpipe.analysis.summary import summarise
from segpipe.config import SegmentConfig
from segpipe.geometry.pixels import pyramid_shapes
from segpipe.geometry.tiling import Box, tile_grid
from segpipe.query import class_areas
from segpipe.results import (
    IncompleteResultError,
    ResultMeta,
    ResultMismatchError,
    ResultReplacedError,
    TileRecord,
    class_pixels,
    delete_result,
    finalize_result,
    is_complete,
    is_result,
    mark_tiles_done,
    open_result,
    prepare_result,
    read_attrs,
    read_meta,
    shards,
    tiles_done,
    write_block,
    write_tiles,
)
from segpipe.results.layout import (
    PROGRESS_CHUNKS,
    block_level_arrays,
    level_tiling,
    levels_in_blocks,
)
from segpipe.results.schema import label_path, level_path, result_levels
from segpipe.results.store import quiet_consolidated
from segpipe.results.tiles import check_not_replaced, result_started, tile_class_pixels

# Settings that live in ResultMeta.config (pixel_size_um is the result's own field too).
SETTINGS = {f.name for f in dataclasses.fields(SegmentConfig)} - {
    f.name for f in dataclasses.fields(ResultMeta)
}


def meta(**kw):
    """A 100 x 70 px result's metadata; settings of SegmentConfig among ``kw`` go to config."""
    config = dict(tile=32, mode="exact", level=0, task_tiles=1)
    config.update({k: kw.pop(k) for k in list(kw) if k in SETTINGS})
    base = dict(
        source="s.tif",
        shape=(100, 70),
        pixel_size_um=0.5,
        class_names=("bg", "fg"),
        model_name="m",
        model_sha256="0" * 64,
        halo=4,
    )
    base.update(kw)
    return ResultMeta(**base, config=SegmentConfig(**config))


def test_new_resumed_and_complete(tmp_path):
    path = tmp_path / "r.zarr"
    done = prepare_result(path, meta(source_shape=(400, 280)))
    assert done.shape == (4, 3) and not done.any()
    mark_tiles_done(path, {(0, 0): np.array([5, 6]), (3, 2): np.array([1, 0])})
    again = prepare_result(path, meta())
    assert again.sum() == 2 and again[0, 0] and again[3, 2]
    np.testing.assert_array_equal(class_pixels(path), [6, 6])
    assert not is_complete(path)
    finish(path)
    assert read_meta(path).summary.tiles_total == 12
    # Provenance, not identity: kept through finalising, and a run that does not say it
    # (a release before it) resumes the same result.
    assert read_meta(path).source_shape == (400, 280)
    assert read_attrs(path)["source_shape"] == [400, 280]
    assert read_meta(path).identity() == meta().identity()
    assert is_complete(path)
    assert tiles_done(path).all()


def test_a_result_with_tiles_not_written_is_not_finalised(tmp_path):
    path = tmp_path / "r.zarr"
    prepare_result(path, meta())
    mark_tiles_done(path, {(0, 0): np.array([5, 6])})
    with pytest.raises(IncompleteResultError, match="11 of 12 tiles are not written"):
        finalize_result(path, run_summary(path))
    assert not is_complete(path) and read_attrs(path)["state"] == "computing"


def test_a_run_replaced_by_another_records_and_finalises_nothing_there(tmp_path):
    """Run A's driver keeps its record of the result while run B replaces it (overwrite, other
    settings) at the same path, even within the same second: A's next record and its
    finalising are refused, and B's result keeps its own tiles and stays unfinished."""
    path = tmp_path / "r.zarr"
    prepare_result(path, meta())
    ours = result_started(path)
    record = TileRecord(path)
    record.mark({(0, 0): np.array([5, 6])})
    prepare_result(path, meta(halo=8), overwrite=True)  # run B
    with pytest.raises(ResultReplacedError, match="replaced by another run") as raised:
        record.mark({(1, 0): np.array([5, 6])})
    # Not a mismatch, which callers answer by replacing the result: B's, here.
    assert not isinstance(raised.value, ResultMismatchError)
    assert not tiles_done(path).any()
    with pytest.raises(IncompleteResultError):
        finalize_result(path, run_summary(path))
    assert not is_complete(path) and read_meta(path).halo == 8
    # A record opened after B came, with the stamp A read when it prepared its result.
    with pytest.raises(ResultReplacedError, match="replaced by another run"):
        mark_tiles_done(path, {(1, 0): np.array([5, 6])}, started=ours)
    assert not tiles_done(path).any()


def test_a_result_deleted_while_its_metadata_is_consolidated_is_not_marked_complete(
    tmp_path, monkeypatch
):
    """At a URL (no lock) another run's overwrite deleted the result while the consolidation
    read it; the consolidation wrote the root back with this run's stamp, the fence passed,
    and `complete` was written over nothing: it read as all background."""
    import segpipe.results.store as store

    path = tmp_path / "r.zarr"
    prepare_result(path, meta())
    stamp = result_started(path)
    mark_tiles_done(path, {(y, x): np.array([5, 6]) for y in range(4) for x in range(3)})
    real = zarr.consolidate_metadata

    def deleted_meanwhile(where, *args, **kwargs):
        root = (path / "zarr.json").read_bytes()
        shutil.rmtree(path)  # another run's delete, between the reads and the root's write
        path.mkdir()
        (path / "zarr.json").write_bytes(root)
        return real(where, *args, **kwargs)

    monkeypatch.setattr(store.zarr, "consolidate_metadata", deleted_meanwhile)
    with pytest.raises(ResultReplacedError, match="deleted by another run while this run"):
        finalize_result(path, run_summary(path), started=stamp)
    assert not is_complete(path)


def test_a_local_results_stamp_is_read_from_its_zarr_json_without_opening_a_group(
    tmp_path, monkeypatch
):
    """The fence reads the stamp twice a block: from the root zarr.json, parsed here, the
    same stamp as the group's attributes say, never a Zarr group opened (2.4 ms of Python a
    call). Nothing there, a file where the result should be, and a zarr.json that is no JSON
    are said, naming the path."""
    path = tmp_path / "r.zarr"
    prepare_result(path, meta())
    stamp = zarr.open_group(path, mode="r").attrs["segpipe"]["started"]
    monkeypatch.setattr(zarr, "open_group", lambda *a, **k: pytest.fail("opened a group"))
    assert result_started(path) == stamp
    assert result_started(str(path)) == stamp
    with pytest.raises(FileNotFoundError, match=r"no segpipe result at .*none\.zarr"):
        result_started(tmp_path / "none.zarr")
    (tmp_path / "file.zarr").write_bytes(b"not a folder")
    with pytest.raises(FileNotFoundError, match=r"file\.zarr"):
        result_started(tmp_path / "file.zarr")
    (tmp_path / "other.zarr").mkdir()
    (tmp_path / "other.zarr" / "zarr.json").write_text('{"zarr_format": 3, "node_type": "group"}')
    assert result_started(tmp_path / "other.zarr") is None
    (tmp_path / "other.zarr" / "zarr.json").write_text("{no json")
    with pytest.raises(ValueError, match=r"other\.zarr: its zarr\.json is no JSON"):
        result_started(tmp_path / "other.zarr")


def test_a_tile_record_keeps_each_progress_chunk_of_a_wide_result_apart(tmp_path):
    """The record keeps each chunk of the progress arrays it read (64 x 64 tiles): a result
    more than a chunk of tiles wide (or high) has tiles in several, each written to its own
    place, whether they come in one mark or in marks one after another."""
    cy, cx = PROGRESS_CHUNKS
    path = tmp_path / "r.zarr"
    prepare_result(path, meta(shape=(16 * (cy + 2), 16 * (cx + 6)), tile=16))
    record = TileRecord(path)
    marks = [
        {(0, 1): np.array([1, 2])},  # chunk (0, 0), read first
        {(1, cx + 2): np.array([3, 4]), (2, 3): np.array([5, 6])},  # chunks (0, 1) and (0, 0)
        {(cy + 1, cx + 5): np.array([7, 8])},  # chunk (1, 1): the last row and column
    ]
    expected = np.zeros((cy + 2, cx + 6), dtype=bool)
    counts = np.zeros((cy + 2, cx + 6, 2), dtype=np.int64)
    for mark in marks:
        record.mark(mark)
        for (iy, ix), c in mark.items():
            expected[iy, ix], counts[iy, ix] = True, c
        np.testing.assert_array_equal(tiles_done(path), expected)
        np.testing.assert_array_equal(tile_class_pixels(path), counts)
    # A record opened afterwards reads every chunk as written and adds to it.
    TileRecord(path).mark({(cy, 0): np.array([9, 9])})
    expected[cy, 0], counts[cy, 0] = True, [9, 9]
    np.testing.assert_array_equal(tiles_done(path), expected)
    np.testing.assert_array_equal(tile_class_pixels(path), counts)


@pytest.mark.parametrize("text", ["[]", '"a string"', "null", "3", '{"attributes": []}'])
def test_a_zarr_json_of_no_object_has_no_stamp_and_fences_off_the_run(tmp_path, text):
    """JSON that is no object (or whose attributes are none) holds no stamp: no result of
    this run, so its fence stops it, and no AttributeError from parsing it."""
    path = tmp_path / "r.zarr"
    path.mkdir()
    (path / "zarr.json").write_text(text)
    assert result_started(path) is None
    with pytest.raises(ResultReplacedError, match="replaced by another run"):
        check_not_replaced(path, "2024-01-01T00:00:00.000000+00:00")


def test_marking_no_tiles_opens_nothing(tmp_path, monkeypatch):
    """No tiles to record: no store opened (a remote store's round trips for nothing), so
    not even a result at the path is needed."""
    path = tmp_path / "r.zarr"
    prepare_result(path, meta())
    monkeypatch.setattr(zarr, "open_array", lambda *a, **k: pytest.fail("opened an array"))
    monkeypatch.setattr(zarr, "open_group", lambda *a, **k: pytest.fail("opened a group"))
    mark_tiles_done(path, {})
    mark_tiles_done(tmp_path / "none.zarr", {})
    monkeypatch.undo()
    assert not tiles_done(path).any()
    mark_tiles_done(path, {(0, 0): np.array([1, 2])})  # and a mark still records
    assert tiles_done(path)[0, 0]


def store_files(path, *, but=()):
    """Every file of the store at ``path`` (none: nothing there), by relative path, as bytes;
    ``but``: relative paths left out."""
    return {
        f.relative_to(path).as_posix(): f.read_bytes()
        for f in sorted(path.rglob("*"))
        if f.is_file() and f.relative_to(path).as_posix() not in but
    }


@pytest.mark.parametrize("then", ["replaced", "deleted"])
def test_a_block_of_a_run_whose_result_was_replaced_is_not_written(tmp_path, then):
    """A task of run A still running when run B replaced (or deleted) A's result at the same
    path writes by path: fenced by A's stamp, it raises and writes nothing, so B's block
    (another model's pixels, recorded done by B) stays byte for byte; a deleted result's path
    stays empty (a write there would also block B's rename into place)."""
    path, box = tmp_path / "r.zarr", Box(0, 64, 0, 64)
    prepare_result(path, meta(task_tiles=2))
    ours = result_started(path)
    arrays = block_level_arrays(path)  # opened by A's first task, before B came
    if then == "replaced":
        prepare_result(path, meta(task_tiles=2, halo=8), overwrite=True)
        write_block(path, box, random_probabilities((64, 64), seed=1))  # B's block
    else:
        delete_result(path)
    before = store_files(path)
    theirs = result_started(path) if then == "replaced" else "is gone"
    assert theirs != ours
    with pytest.raises(ResultReplacedError) as raised:
        write_block(path, box, random_probabilities((64, 64), seed=2), arrays=arrays, started=ours)
    assert all(s in str(raised.value) for s in (str(path), ours, theirs)), raised.value
    assert store_files(path) == before
    assert path.exists() == (then == "replaced")


def test_a_block_fenced_by_its_results_own_stamp_is_written_as_without_one(tmp_path, monkeypatch):
    """With the stamp of the result at the path, write_block writes the same bytes as without
    one, at the cost of one read of the root zarr.json, from the store at every block (a
    handle opened earlier would still hold a replaced result's metadata)."""
    from zarr.storage import LocalStore

    m, box, probs = meta(task_tiles=2), Box(0, 64, 0, 64), random_probabilities((64, 64))
    fenced, plain = tmp_path / "fenced.zarr", tmp_path / "plain.zarr"
    for p in (fenced, plain):
        prepare_result(p, m)
    arrays = block_level_arrays(fenced)
    reads = []
    get = LocalStore.get

    async def counting(self, key, *args, **kw):
        reads.append(key)
        return await get(self, key, *args, **kw)

    read_bytes = Path.read_bytes

    def counting_file(self):  # the fence reads a local result's zarr.json itself
        if self.is_relative_to(fenced):
            reads.append(self.relative_to(fenced).as_posix())
        return read_bytes(self)

    ours = read_attrs(fenced)["started"]
    monkeypatch.setattr(LocalStore, "get", counting)
    monkeypatch.setattr(Path, "read_bytes", counting_file)
    for _ in range(2):
        write_block(fenced, box, probs, arrays=arrays, started=ours)
    assert reads == ["zarr.json", "zarr.json"]
    write_block(plain, box, probs)
    monkeypatch.undo()
    assert store_files(fenced, but={"zarr.json"}) == store_files(plain, but={"zarr.json"})
    np.testing.assert_array_equal(zarr.open_array(fenced / "0" / "mask")[:64, :64], probs.argmax(0))


def test_a_run_replaced_mid_run_leaves_the_replacing_runs_result_as_if_alone(
    tmp_path, monkeypatch, small_slide, random_checkpoint
):
    """Run A's result is replaced by run B (another model, overwrite) once A's first block is
    written: A's blocks in flight then are fenced, A stops with ResultReplacedError, and B's
    result is bit-identical to B's run made alone (A's pixels in none of B's blocks). B takes
    no run lock here: it stands in for a run after A's driver died (its lock gone with it)
    while A's tasks go on, on a shared cluster; with A's driver alive B would be refused."""
    import contextlib
    import itertools
    import threading

    import torch

    import segpipe
    from segpipe import models
    from segpipe.execution import cluster, tasks
    from segpipe.execution import segment as segment_module

    torch.manual_seed(1)
    other = models.build("unet", class_names=("a", "b", "c"), width=4, depth=2)
    other = models.save(other, tmp_path / "other-unet.pt")
    settings = {"tile": 64, "task_tiles": 1, "foreground": "none", "scheduler": "sync"}
    out, alone = tmp_path / "r.seg.zarr", tmp_path / "alone.seg.zarr"
    segpipe.segment(small_slide.image, alone, other, min_level_size=64, **settings)

    a_run, a_blocks, lock = [], itertools.count(), threading.Lock()
    first_written, replaced = threading.Event(), threading.Event()

    def block_of_a_or_b(block, job):  # segment_block as run_blocks calls it
        with lock:
            a_run[:] = a_run or [job.predictor_key]  # A's blocks come first
            n = next(a_blocks) if job.predictor_key == a_run[0] else None
        if n is None:  # B's own blocks
            return tasks.segment_block(block, job)
        if n > 0:  # A's second block runs B whole once A's first is written; the rest wait
            first_written.wait()
            if n == 1:
                try:
                    segpipe.segment(
                        small_slide.image, out, other, overwrite=True, min_level_size=64, **settings
                    )
                finally:  # B failing must not leave A's blocks waiting for ever
                    replaced.set()
            replaced.wait()
        try:
            return tasks.segment_block(block, job)
        finally:
            first_written.set()

    run_lock = segment_module.result_lock
    monkeypatch.setattr(
        segment_module, "result_lock", lambda p: contextlib.nullcontext() if a_run else run_lock(p)
    )
    monkeypatch.setattr(cluster, "segment_block", block_of_a_or_b)
    with pytest.raises(ResultReplacedError, match="replaced by another run") as raised:
        segpipe.segment(small_slide.image, out, random_checkpoint, min_level_size=64, **settings)
    assert replaced.is_set() and is_complete(out)
    got, expected = store_files(out, but={"zarr.json"}), store_files(alone, but={"zarr.json"})
    assert got.keys() == expected.keys()
    differing = [k for k in expected if got[k] != expected[k]]
    assert not differing, f"B's result is not what B alone made: {differing}"
    assert any(e.name == "write_block" for e in raised.traceback), "not from A's tasks"


def test_tile_record_writes_through_and_keeps_earlier_marks(tmp_path):
    # The driver's record reads each chunk once and writes every mark at once: what another
    # writer marked before it opened (background tiles) stays, and each mark is on disk
    # when mark() returns (a kill after it loses nothing).
    path = tmp_path / "r.zarr"
    prepare_result(path, meta())  # 4 x 3 tiles
    mark_tiles_done(path, {(3, 2): np.array([7, 0])})
    record = TileRecord(path)
    record.mark({(0, 0): np.array([5, 6])})
    assert tiles_done(path).sum() == 2 and tiles_done(path)[3, 2]
    np.testing.assert_array_equal(class_pixels(path), [12, 6])
    record.mark({(1, 1): np.array([1, 2]), (2, 0): np.array([3, 4])})
    done = tiles_done(path)
    assert done.sum() == 4 and done[0, 0] and done[1, 1] and done[2, 0] and done[3, 2]
    np.testing.assert_array_equal(class_pixels(path), [16, 12])


def unsharded_bookkeeping(path):
    """Make the result at ``path``'s bookkeeping arrays as results made before stop 52 kept
    them: plain 64 x 64 tile chunks (Zarr's codecs), which a record writes through Zarr."""
    root = zarr.open_group(path, mode="r+")
    for name in ("_segpipe/tiles_done", "_segpipe/class_pixels"):
        old = root[name]
        root.create_array(
            name, shape=old.shape, chunks=(*PROGRESS_CHUNKS, *old.shape[2:]), dtype=old.dtype,
            fill_value=0, dimension_names=old.metadata.dimension_names, overwrite=True,
        )  # fmt: skip


@pytest.mark.parametrize("sharded", [True, False], ids=["sharded", "made-before"])
def test_a_tile_record_failing_between_its_two_writes_flags_no_tile_done(
    tmp_path, monkeypatch, sharded
):
    """Counts written before flags: a record cut off between them (disk full, a kill) left a
    tile done without its class pixels, which a resumed run then trusted. Both ways a record
    writes: its shard files stored here, or (a result made before they were shards) Zarr."""
    path = tmp_path / "r.zarr"
    prepare_result(path, meta())
    if not sharded:
        unsharded_bookkeeping(path)
    record = TileRecord(path)
    writes = []
    if sharded:
        owner, name = shards, "_store_file"
        store = shards._store_file

        def second_fails(where, data):
            writes.append(where.relative_to(path).parts[1])  # _segpipe/<array>/c/...
            if len(writes) == 2:
                raise OSError(28, "No space left on device")
            return store(where, data)
    else:
        owner, name = zarr.AsyncArray, "setitem"
        setitem = zarr.AsyncArray.setitem

        async def second_fails(self, key, value):
            writes.append(self.path.split("/")[-1])
            if len(writes) == 2:
                raise OSError(28, "No space left on device")
            return await setitem(self, key, value)

    monkeypatch.setattr(owner, name, second_fails)
    with pytest.raises(OSError, match="No space left"):
        record.mark({(0, 0): np.array([1000, 24])})
    monkeypatch.undo()
    assert writes == ["class_pixels", "tiles_done"]
    assert not tiles_done(path)[0, 0]
    assert class_pixels(path).tolist() == [1000, 24]
    # The next record writes both: the tile is done, with its counts.
    TileRecord(path).mark({(0, 0): np.array([1000, 24])})
    assert tiles_done(path)[0, 0] and class_pixels(path).tolist() == [1000, 24]


def test_a_tile_record_stores_its_shards_without_zarrs_writes(tmp_path, monkeypatch):
    """A record of a result made now stores each progress chunk's shard itself, as Zarr
    would have (read back by Zarr below), never through Zarr's writes: those went to its
    event loop's one thread and back, each leg waiting for the GIL beside the I/O threads."""
    path = tmp_path / "r.zarr"
    prepare_result(path, meta())
    record = TileRecord(path)

    async def no_zarr_write(*args, **kwargs):
        raise AssertionError("written through Zarr")

    monkeypatch.setattr(LocalStore, "set", no_zarr_write)
    record.mark({(0, 0): np.array([5, 6]), (3, 2): np.array([1, 0])})
    record.mark({(1, 1): np.array([2, 2])})
    monkeypatch.undo()
    expected = np.zeros((4, 3), dtype=bool)
    expected[0, 0] = expected[3, 2] = expected[1, 1] = True
    np.testing.assert_array_equal(tiles_done(path), expected)
    np.testing.assert_array_equal(tile_class_pixels(path)[3, 2], [1, 0])
    np.testing.assert_array_equal(class_pixels(path), [8, 8])


def test_a_result_made_before_its_bookkeeping_was_sharded_still_records(tmp_path):
    """A result whose bookkeeping is plain Zarr chunks (made before stop 52, resumed now)
    is recorded through Zarr, each chunk kept as before."""
    cy, _ = PROGRESS_CHUNKS
    path = tmp_path / "r.zarr"
    prepare_result(path, meta(shape=(16 * (cy + 2), 16 * 3), tile=16))
    unsharded_bookkeeping(path)
    mark_tiles_done(path, {(0, 1): np.array([1, 2]), (cy + 1, 2): np.array([3, 4])})
    TileRecord(path).mark({(cy, 0): np.array([5, 6])})
    done = tiles_done(path)
    assert done.sum() == 3 and done[0, 1] and done[cy + 1, 2] and done[cy, 0]
    np.testing.assert_array_equal(class_pixels(path), [9, 12])
    assert zarr.open_array(path, path="_segpipe/tiles_done").shards is None


@pytest.mark.parametrize("store", ["local", "zarr"])
def test_a_failed_write_is_raised_after_the_others_end(tmp_path, monkeypatch, store):
    # A block's writes go to the store together: one failing raises, but only once the others
    # have ended, so no write of the block is still running when the task reports. A local
    # store's shards are stored in the caller's thread, one after another; others through
    # Zarr, side by side.
    from segpipe.results import shards

    path = tmp_path / "r.zarr"
    m = meta(task_tiles=2)
    prepare_result(path, m)
    store_set, store_file = StorePath.set, shards._store_file

    async def failing(self, value, *args, **kw):
        if "/probabilities/" in self.path:
            raise OSError(f"disk full writing {self.path}")
        await asyncio.sleep(0.05)  # still running when the failure comes
        return await store_set(self, value, *args, **kw)

    def failing_file(file, data):
        if "/probabilities/" in file.as_posix():
            raise OSError(f"disk full writing {file.relative_to(path).as_posix()}")
        store_file(file, data)

    if store == "zarr":  # as a store other than a local one is written
        monkeypatch.setattr(shards, "local_file", lambda where, writing=False: None)
    monkeypatch.setattr(StorePath, "set", failing)
    monkeypatch.setattr(shards, "_store_file", failing_file)
    probs = random_probabilities((64, 64))
    with pytest.raises(OSError, match="disk full writing 0/probabilities"):
        write_tiles(path, Box(0, 64, 0, 64), probs)
    monkeypatch.undo()
    # The masks were written: every write ran to its end before the error came out.
    np.testing.assert_array_equal(zarr.open_array(path / "0" / "mask")[:64, :64], probs.argmax(0))
    assert zarr.open_array(path / "0" / "probabilities")[:, :64, :64].max() == 0


def test_empty_chunks_are_not_written(tmp_path):
    path = tmp_path / "r.zarr"
    prepare_result(path, meta())
    background = np.zeros((2, 32, 32), np.float32)
    background[0] = 1.0  # class 0 everywhere: the mask chunk equals its fill value
    counts = write_tiles(path, Box(0, 32, 0, 32), background)
    np.testing.assert_array_equal(counts, [32 * 32, 0])
    mixed = background.copy()
    mixed[:, :4] = mixed[::-1, :4]
    write_tiles(path, Box(32, 64, 0, 32), mixed)
    chunks = sorted(
        os.path.relpath(os.path.join(d, f), path / "0" / "mask")
        for d, _, files in os.walk(path / "0" / "mask")
        for f in files
        if f != "zarr.json"
    )
    assert chunks == [os.path.join("c", "1", "0")]
    assert zarr.open_array(path / "0" / "mask")[0:32, 0:32].max() == 0
    assert (path / "0" / "probabilities" / "c" / "0" / "0" / "0").exists()


def test_label_images_are_written_with_the_blocks_at_every_level(tmp_path):
    """A label image added to a result is written by write_block beside the mask, at the
    levels the tasks write (halved by mode), then the pyramid pass fills the rest: every
    level equals the mode pyramid of level 0; blocks not written keep 0. Adding it again
    keeps what was written."""
    from segpipe.results import labels
    from segpipe.results.pyramid import halve

    path = tmp_path / "r.zarr"
    m = meta(shape=(200, 140), tile=16, task_tiles=2, min_level_size=16)
    assert levels_in_blocks(m) == 1
    prepare_result(path, m)
    labels.add_label_image(path, "extra", ("none", "a", "b"), long_name="x")
    arrays = labels.label_block_arrays(path, "extra")
    assert len(arrays) == 2
    rng = np.random.default_rng(3)
    expected = np.zeros(m.shape, np.uint8)
    for i, block in enumerate(tile_grid(m.shape, m.tile).blocks(2)):
        if i == 5:
            continue  # a block with no foreground: not written
        box = Box(block[0].box.y0, block[-1].box.y1, block[0].box.x0, block[-1].box.x1)
        values = rng.integers(0, 3, box.shape, dtype=np.uint8)
        expected[box.slices] = values
        write_block(path, box, random_probabilities(box.shape), labels=[(arrays, values)])
    labels.add_label_image(path, "extra", ("none", "a", "b"), long_name="x")
    finish(path)
    assert labels.label_images(path) == ["mask", "extra"]
    level = expected
    shapes = pyramid_shapes(m.shape, m.config.min_level_size)
    assert len(shapes) == 4
    for k in range(len(shapes)):
        stored = zarr.open_array(path, path=label_path("extra", k, layout=m.layout), mode="r")
        np.testing.assert_array_equal(stored[...], level, err_msg=f"level {k}")
        level = halve(level[: level.shape[0] // 2 * 2, : level.shape[1] // 2 * 2], "mode")
    box, short = Box(0, 32, 0, 32), [(arrays, expected[:16, :32])]
    with pytest.raises(ValueError, match="do not cover the block"):
        write_block(path, box, random_probabilities((32, 32)), labels=short)


def test_a_blocks_writes_skip_zarrs_chunk_comparison(tmp_path, monkeypatch):
    """Zarr compares every chunk with the fill value before encoding it (1 ms per 512^2);
    a block's shards are encoded by results.shards instead, which leaves out fill-valued
    chunks itself: an all-background mask shard is not stored, and what is read back is
    what was written."""
    from zarr.core.buffer.core import NDBuffer

    compared = []
    all_equal = NDBuffer.all_equal

    def counting(self, other, equal_nan=True):
        compared.append(self.dtype)
        return all_equal(self, other, equal_nan)

    monkeypatch.setattr(NDBuffer, "all_equal", counting)
    path = tmp_path / "r.zarr"
    prepare_result(path, meta(task_tiles=2))
    compared.clear()  # the store's coordinates
    write_tiles(path, Box(64, 100, 0, 64), random_probabilities((36, 64)))
    background = np.zeros((2, 64, 64), np.float32)
    background[0] = 1.0
    write_tiles(path, Box(0, 64, 0, 64), background)
    assert not compared
    mask = zarr.open_array(path / "0" / "mask", mode="r")
    expected = random_probabilities((36, 64)).argmax(axis=0)
    np.testing.assert_array_equal(mask[64:100, 0:64], expected)
    assert mask[0:64, 0:64].max() == 0
    assert not (path / "0" / "mask" / "c" / "0" / "0").exists()
    assert (path / "0" / "mask" / "c" / "1" / "0").exists()
    probabilities = zarr.open_array(path / "0" / "probabilities", mode="r")
    np.testing.assert_array_equal(probabilities[:, 0:64, 0:64], background.astype(np.float16))


def test_mismatch_and_foreign_directories(tmp_path):
    path = tmp_path / "r.zarr"
    prepare_result(path, meta())
    # Each key with both values, so the user sees which run asks for what; long ones cut.
    zeros, ones = "'" + "0" * 64 + "'", "'" + "1" * 64 + "'"
    why = f"differs in: model_sha256: {zeros} stored, {ones} in this run; tile: 32 stored, 64 in"
    with pytest.raises(ResultMismatchError, match=re.escape(why)):
        prepare_result(path, meta(tile=64, model_sha256="1" * 64))
    with pytest.raises(ResultMismatchError, match=r"source: 's.tif' stored, '/s{75}\.\.\. in th"):
        prepare_result(path, meta(source="/" + "s" * 100 + ".tif"))
    prepare_result(path, meta(tile=64), overwrite=True)
    assert zarr.open_array(path / "0" / "mask").chunks == (64, 64)

    plain = zarr.create_array(tmp_path / "user.zarr", shape=(4,), dtype="uint8")
    plain[...] = 7
    with pytest.raises(ResultMismatchError, match="not a segpipe result"):
        prepare_result(tmp_path / "user.zarr", meta(), overwrite=True)
    assert zarr.open_array(tmp_path / "user.zarr")[...].tolist() == [7] * 4


@pytest.mark.parametrize("kept", ["source", "mask", "model"])
def test_a_result_holding_an_input_of_a_run_is_not_replaced(tmp_path, kept):
    """A scan (or a foreground mask file, or the run's checkpoint) filed inside a result's
    folder went with the result when a run replaced it; now that run is refused, naming
    both, and the file stays."""
    path = tmp_path / "r.zarr"
    prepare_result(path, meta())
    inside = path / "scan.tif"
    inside.write_bytes(b"the only copy")
    name = {"source": "source", "mask": "foreground", "model": "model_name"}[kept]
    given = {name: str(inside)}
    if kept == "mask":
        given["foreground_sha256"] = "1" * 64
    what = "source image" if kept == "source" else "input"
    with pytest.raises(ResultMismatchError, match=re.escape(f"{path} holds the {what} {inside}")):
        prepare_result(path, meta(**given), overwrite=True)
    assert inside.read_bytes() == b"the only copy" and is_result(path)
    with pytest.raises(ResultMismatchError, match=re.escape(f"{inside} is the {what} {inside}")):
        prepare_result(inside, meta(**given))


@pytest.mark.parametrize("damage", [{"layout": 99}, {"state": "melting"}])
def test_a_result_this_version_cannot_parse_still_keeps_the_inputs_it_names(tmp_path, damage):
    """A newer release's layout, or a damaged setting: the check of what the result holds
    gave up on the ValueError, and an overwrite or a deletion took the scan filed in it."""
    path = tmp_path / "r.zarr"
    inside = path / "scan.tif"
    prepare_result(path, meta())
    inside.write_bytes(b"the only copy")  # and the result says it was made of it

    def filed_and_damaged(doc):
        _segpipe(doc).update(damage, source=str(inside))
        _segpipe(doc)["identity"]["source"] = str(inside)

    _edited(path, filed_and_damaged)
    with pytest.raises(ValueError, match=str(path)):
        read_meta(path)  # the case: this version cannot parse it
    holds = re.escape(f"{path} holds the source image {inside}")
    with pytest.raises(ResultMismatchError, match=holds):
        prepare_result(path, meta(tile=64), overwrite=True)
    with pytest.raises(ResultMismatchError, match=holds):
        delete_result(path)
    assert inside.read_bytes() == b"the only copy"


def test_a_local_result_of_a_url_source_is_checked_without_opening_the_url(tmp_path):
    """The overlap check built the source URL's file system (no options): replacing or
    deleting a local result made from gs:// failed where gcsfs is missing, ftp:// logged in."""
    from segpipe.io.places import overlap
    from segpipe.results.inputs import check_not_source

    path = tmp_path / "r.zarr"
    for source in ("gs://scans/slide.svs", "ftp://10.255.255.1/slide.svs"):
        check_not_source(path, source)  # a URL and a local path never overlap
    assert overlap("s3://b/r.zarr/x.tif", "s3://b/r.zarr/") == "is inside"
    prepare_result(path, meta(source="/elsewhere/slide.svs"))
    _edited(path, lambda d: _segpipe(d)["identity"].update(source="gs://scans/slide.svs"))
    prepare_result(path, meta(), overwrite=True)
    delete_result(path)
    assert not path.exists()


def test_results_named_by_url_strings_are_made_and_deleted_where_the_urls_say(
    tmp_path, monkeypatch
):
    """prepare_result and delete_result take str: a URL string was made a local Path, so
    "memory://b/r.zarr" was deleted silently not at all (its local parent missing), and a
    result "made" at ./memory:/b/r.zarr; a file:// URL names the local folder, as everywhere."""
    from segpipe.io.files import URLPath

    monkeypatch.chdir(tmp_path)
    url = f"memory://segpipe-{os.getpid()}/r.zarr"
    prepare_result(url, meta(source="memory://segpipe/s.tif"))
    assert is_result(URLPath(url)) and not (tmp_path / "memory:").exists()
    delete_result(url)
    assert not is_result(URLPath(url))
    local = tmp_path / "r.zarr"
    prepare_result(local, meta(source=str(tmp_path / "s.tif")))
    delete_result(local.as_uri())
    assert not local.exists()


def test_a_result_holding_its_own_source_is_not_deleted(tmp_path):
    """The stored source counts too: a result moved over its scan's folder, replaced or deleted."""
    source = tmp_path / "x" / "scan.tif"
    prepare_result(tmp_path / "r.zarr", meta(source=str(source)))
    (tmp_path / "r.zarr").rename(tmp_path / "x")
    source.write_bytes(b"the only copy")
    why = re.escape(f"{tmp_path / 'x'} holds the source image {source}")
    with pytest.raises(ResultMismatchError, match=why):
        prepare_result(tmp_path / "x", meta(), overwrite=True)
    with pytest.raises(ResultMismatchError, match=why):
        delete_result(tmp_path / "x")
    assert source.read_bytes() == b"the only copy" and is_result(tmp_path / "x")


@pytest.mark.parametrize(
    "text",
    [
        "[]",
        "5",
        "null",
        '{"zarr_format": "x"}',
        '{"zarr_format": 3, "node_ty',  # no JSON: a write cut short
        '{"zarr_format": 3, "node_type": "group", "attributes": 5}',
        '{"zarr_format": 3, "node_type": "group", "attributes": {"segpipe": 5}}',
    ],
)
def test_a_zarr_json_of_no_group_metadata_is_no_result_and_reading_it_names_it(tmp_path, text):
    """A result's zarr.json that is JSON but no Zarr group metadata (or no JSON, or a
    segpipe attribute that is no object) makes no result: is_result and is_complete say
    False; reading it raises a ValueError naming it; nothing replaces or deletes it."""
    path = tmp_path / "r.zarr"
    prepare_result(path, meta())
    (path / "zarr.json").write_text(text)
    assert not is_result(path) and not is_complete(path)
    for read in (read_attrs, read_meta, result_levels):
        with pytest.raises(
            ValueError, match=re.escape(str(path)) + " is (no|a Zarr group but not)"
        ):
            read(path)
    with pytest.raises(ResultMismatchError, match="not a segpipe result"):
        prepare_result(path, meta(), overwrite=True)
    with pytest.raises(ResultMismatchError, match="not a segpipe result"):
        delete_result(path)
    assert (path / "zarr.json").read_text() == text and (path / "0").is_dir()


def test_metadata_a_release_cannot_read_names_the_result(tmp_path):
    path = tmp_path / "r.zarr"
    prepare_result(path, meta())
    group = zarr.open_group(path, mode="r+")
    group.attrs["segpipe"] = {**read_attrs(path), "state": "bogus"}
    with pytest.raises(ValueError, match=re.escape(f"{path}: unreadable") + ".*'bogus'"):
        read_meta(path)
    del group.attrs["segpipe"]  # what was a result is another Zarr group now
    assert not is_result(path) and not is_complete(path)
    with pytest.raises(ValueError, match=re.escape(f"{path} is a Zarr group but not")):
        read_attrs(path)


def test_identity_keys_of_later_releases_are_compared_only_where_stored(tmp_path):
    """A result whose identity lacks source_sha256 (made before it existed) resumes with a run
    that has it; one that has it is refused, naming the key, by a run whose pixels differ."""
    old, new = tmp_path / "old.zarr", tmp_path / "new.zarr"
    prepare_result(old, meta())
    mark_tiles_done(old, {(1, 2): np.array([3, 4])})
    assert "source_sha256" not in read_attrs(old)["identity"]
    done = prepare_result(old, meta(source_sha256="a" * 64))
    assert done.sum() == 1 and done[1, 2]
    with pytest.raises(ResultMismatchError, match="differs in: halo"):  # others still count
        prepare_result(old, meta(source_sha256="a" * 64, halo=8))

    prepare_result(new, meta(source_sha256="a" * 64))
    mark_tiles_done(new, {(0, 0): np.array([1, 1])})
    finish(new)
    assert read_meta(new).source_sha256 == "a" * 64  # kept through finalising
    assert prepare_result(new, meta(source_sha256="a" * 64)).all()
    for other in (meta(source_sha256="b" * 64), meta()):
        with pytest.raises(
            ResultMismatchError,
            match=r"differs in: source_sha256 \(the source's pixels differ from those the",
        ):
            prepare_result(new, other)
    prepare_result(new, meta(source_sha256="b" * 64), overwrite=True)
    assert read_attrs(new)["identity"]["source_sha256"] == "b" * 64
    assert not tiles_done(new).any()


def test_a_checkpoint_or_mask_spelt_otherwise_resumes_by_its_contents(tmp_path):
    """The same checkpoint and mask given from another folder (``../model.pt``), or copied:
    a killed run was refused as "another result", and only --overwrite (losing its finished
    blocks) went on. Their hashes decide; a changed file still does not resume."""
    path = tmp_path / "r.zarr"
    made = dict(model_name="model.pt", foreground="mask.png", foreground_sha256="c" * 64)
    prepare_result(path, meta(**made))
    mark_tiles_done(path, {(1, 2): np.array([3, 4])})
    elsewhere = dict(made, model_name="../model.pt", foreground="/data/copy-of-mask.png")
    assert prepare_result(path, meta(**elsewhere)).sum() == 1
    with pytest.raises(ResultMismatchError, match=r"differs in: foreground_sha256 \(the mask"):
        prepare_result(path, meta(**dict(elsewhere, foreground_sha256="d" * 64)))
    with pytest.raises(ResultMismatchError, match=r"differs in: model_sha256: "):
        prepare_result(path, meta(**dict(elsewhere, model_sha256="1" * 64)))


def test_a_result_made_before_mask_files_were_hashed_resumes_with_its_mask(tmp_path):
    """A mask-file foreground joined the identity a release before its contents' hash did:
    such a result was refused as if "the mask file's contents differ"."""
    old = tmp_path / "old.zarr"
    prepare_result(old, meta(foreground="tissue.png"))
    mark_tiles_done(old, {(1, 2): np.array([3, 4])})
    assert "foreground_sha256" not in read_attrs(old)["identity"]
    done = prepare_result(old, meta(foreground="tissue.png", foreground_sha256="c" * 64))
    assert done.sum() == 1 and done[1, 2]
    with pytest.raises(ResultMismatchError, match="differs in: foreground"):  # the path counts
        prepare_result(old, meta(foreground="other.png", foreground_sha256="c" * 64))


def test_a_source_at_origin_zero_resumes_results_made_before_origins_counted(tmp_path):
    """A source whose first pixel lies at (0, 0) um (a plain TIFF's reader says so) keeps the
    identity it had before the origin joined it, no ``origin_um`` key: its results, stored
    without one, resume. Only an origin elsewhere tells two results apart."""
    path = tmp_path / "r.zarr"
    prepare_result(path, meta())
    mark_tiles_done(path, {(1, 2): np.array([3, 4])})
    assert meta(origin_um=(0.0, 0.0)).identity() == meta().identity()
    done = prepare_result(path, meta(origin_um=(0.0, 0.0)))
    assert done.sum() == 1 and done[1, 2]
    with pytest.raises(ResultMismatchError, match=r"differs in: origin_um"):
        prepare_result(path, meta(origin_um=(0.0, 5.0)))


@pytest.mark.parametrize(
    "stored",
    [{"threads": 0}, {"threads": -1}, {"threads": 2.5}, {"batch_size": 0, "n_workers": -2}],
)
def test_a_result_recorded_with_execution_settings_now_refused_still_reads(tmp_path, stored):
    """threads=0 meant torch's default, and was recorded so, before it was refused; -1 and 2.5
    were recorded by releases that failed in torch once the result was made. They never
    changed the numbers: the result reads, resumes and is replaced, with their defaults."""
    path = tmp_path / "r.zarr"
    prepare_result(path, meta())
    mark_tiles_done(path, {(1, 2): np.array([3, 4])})
    group = zarr.open_group(path, mode="r+")
    attrs = group.attrs["segpipe"]
    group.attrs["segpipe"] = {**attrs, "config": {**attrs["config"], **stored}}
    config = read_meta(path).config
    assert all(getattr(config, k) == getattr(SegmentConfig(), k) for k in stored)
    assert prepare_result(path, meta()).sum() == 1  # resumed
    prepare_result(path, meta(tile=64), overwrite=True)
    group.attrs["segpipe"] = {**attrs, "config": {**attrs["config"], "tile": -1}}
    with pytest.raises(ValueError, match=r"unreadable segpipe metadata.*tile must be >= 1"):
        read_meta(path)  # a result setting is never guessed


def test_open_result_coordinates_without_pixel_size(tmp_path):
    path = tmp_path / "r.zarr"
    prepare_result(path, meta(pixel_size_um=None))
    finish(path)
    ds = open_result(path)
    assert ds["x"].attrs["units"] == "pixel"
    np.testing.assert_array_equal(ds["x"].values[:3], [0, 1, 2])
    assert ds["mask"].dtype == np.uint8
    assert ds["probabilities"].dtype == np.float16


def write_everywhere(path, m, probabilities):
    """Write (C, y, x) probabilities block by block, as the tasks of a run do."""
    from segpipe.geometry.tiling import tile_grid

    for block in tile_grid(m.shape, m.tile).blocks(m.config.task_tiles):
        box = Box(block[0].box.y0, block[-1].box.y1, block[0].box.x0, block[-1].box.x1)
        write_tiles(path, box, probabilities[(slice(None), *box.slices)])


def random_probabilities(shape, c=2, seed=0):
    p = np.random.default_rng(seed).random((c, *shape))
    return (p / p.sum(0)).astype(np.float32)


def test_uint8_probabilities_decode_with_xarray_to_within_1_255(tmp_path):
    path = tmp_path / "r.zarr"
    m = meta(probability_dtype="uint8", task_tiles=2)
    prepare_result(path, m)
    probs = random_probabilities(m.shape)
    write_everywhere(path, m, probs)
    finish(path)
    stored = zarr.open_array(path / "0" / "probabilities")
    assert stored.dtype == np.uint8
    assert stored.attrs["scale_factor"] == pytest.approx(1 / 255)
    decoded = xr.open_zarr(path, group="0")["probabilities"]
    assert decoded.dtype.kind == "f"
    assert np.abs(decoded.values - probs).max() <= 1 / 255
    np.testing.assert_array_equal(xr.open_zarr(path, group="0")["mask"].values, probs.argmax(0))


def test_shards_are_task_blocks_and_empty_ones_are_not_written(tmp_path):
    path = tmp_path / "r.zarr"
    m = meta(task_tiles=2)  # 32 px tiles, 64 px shards
    prepare_result(path, m)
    assert zarr.open_array(path / "0" / "mask").shards == (64, 64)
    assert zarr.open_array(path / "0" / "probabilities").shards == (2, 64, 64)
    background = np.zeros((2, 64, 64), np.float32)
    background[0] = 1.0
    write_tiles(path, Box(0, 64, 0, 64), background)  # mask all 0: its shard is not stored
    write_tiles(path, Box(64, 100, 0, 64), random_probabilities((36, 64)))
    stored = sorted(
        os.path.relpath(os.path.join(d, f), path / "0" / "mask")
        for d, _, files in os.walk(path / "0" / "mask")
        for f in files
        if f != "zarr.json"
    )
    assert stored == [os.path.join("c", "1", "0")]


def test_levels_and_tree(tmp_path):
    path = tmp_path / "r.zarr"
    m = meta(min_level_size=16)  # 100 x 70 -> 50 x 35 -> 25 x 17
    prepare_result(path, m)
    probs = random_probabilities(m.shape)
    write_everywhere(path, m, probs)
    finish(path)
    tree = open_result(path, tree=True)
    assert [tree[k].sizes["x"] for k in tree.children] == [70, 35, 17]
    level2 = open_result(path, level=2)
    assert level2.attrs["level"] == 2 and level2.attrs["segpipe"]["complete"] is True
    # Level 2 pixel i covers level-0 pixels 4i..4i+3, centred at 0.5 * (4i + 1.5) um.
    np.testing.assert_allclose(level2["y"].values[:2], [0.75, 2.75])
    expected = probs[:, :100, :68].reshape(2, 25, 4, 17, 4).mean(axis=(2, 4))
    np.testing.assert_allclose(level2["probabilities"].values, expected, atol=2e-3)
    for level in (3, -1, "1", 1.0, True):  # "1" failed as "'<=' not supported"
        with pytest.raises(ValueError, match=rf"levels 0\.\.2, not level {level!r}"):
            open_result(path, level=level)


def test_incomplete_result_is_refused_at_every_level(tmp_path):
    path = tmp_path / "r.zarr"
    prepare_result(path, meta())
    with pytest.raises(IncompleteResultError, match="incomplete"):
        open_result(path, level=1)
    with pytest.raises(IncompleteResultError):
        open_result(path, tree=True)
    assert open_result(path, allow_incomplete=True)["mask"].shape == (100, 70)


def test_pyramid_tasks_are_whole_shards(tmp_path):
    from segpipe.results.pyramid import shard_boxes

    path = tmp_path / "r.zarr"
    # 32 px blocks: the tasks write level 1 (16 px shards), level 2 (200 x 140 -> 100 x 70
    # -> 50 x 35) is built after them with 32 px shards, each from a 64 px block of level 1.
    m = meta(shape=(200, 140), tile=16, task_tiles=2, min_level_size=16)
    assert levels_in_blocks(m) == 1
    prepare_result(path, m)
    assert zarr.open_array(path / "1" / "probabilities").shards == (2, 16, 16)
    level2 = zarr.open_array(path / "2" / "probabilities")
    assert level2.shape == (2, 50, 35)
    assert shard_boxes(level2.shape, level2.shards[1:]) == [
        Box(0, 32, 0, 32),
        Box(0, 32, 32, 35),
        Box(32, 50, 0, 32),
        Box(32, 50, 32, 35),
    ], "one write per level-2 shard, the last ones cut by the level's end"


def test_the_pyramid_pass_writes_whole_shards_the_same_on_any_number_of_threads(
    tmp_path, monkeypatch
):
    """Every shard the pass writes is encoded whole by results.shards (none left to Zarr's
    partial writes); one thread or four give the same arrays; a failing write is raised."""
    from segpipe.results import pyramid, shards

    m = meta(shape=(300, 262), tile=16, task_tiles=2, min_level_size=16)
    assert levels_in_blocks(m) == 1
    paths, encoded, to_zarr = [], [], []
    shard_write = shards.shard_write

    def spy(array, selection, values, cache):
        written = shard_write(array, selection, values, cache)
        (encoded if written is not None else to_zarr).append(array.path)
        return written

    for threads in (1, 4):
        path = tmp_path / f"{threads}.zarr"
        prepare_result(path, m)
        probs = random_probabilities(m.shape, seed=9)
        for block in tile_grid(m.shape, m.tile).blocks(2):
            box = Box(block[0].box.y0, block[-1].box.y1, block[0].box.x0, block[-1].box.x1)
            write_block(path, box, probs[(slice(None), *box.slices)])
        encoded.clear()
        monkeypatch.setattr(shards, "shard_write", spy)
        pyramid.build_pyramid(path, threads=threads)
        monkeypatch.undo()
        assert encoded and not to_zarr
        assert {p.split("/")[0] for p in encoded} >= {"2", "3", "labels"}
        paths.append(path)
    for name in ("2/mask", "3/probabilities", label_path("mask", 3, layout=m.layout)):
        a, b = (zarr.open_array(p, path=name, mode="r")[...] for p in paths)
        np.testing.assert_array_equal(a, b, err_msg=name)

    def failing(writes, before_storing=None):
        raise OSError("disk full")

    monkeypatch.setattr(pyramid, "write_together", failing)
    with pytest.raises(OSError, match="disk full"):
        pyramid.build_pyramid(paths[0], threads=2)


@pytest.mark.parametrize(
    ("shape", "tile", "task_tiles", "min_level_size", "levels", "tiling"),
    [
        # level 1: 64 px shards, 32 px chunks; level 2: 32 px shards and chunks
        ((300, 260), 32, 4, 16, 2, [(32, 128), (32, 64), (32, 32), (32, 128)]),
        # a 512 px tile in 1024 px blocks: 512 and 256 px shards, then the block again
        ((4096, 4096), 512, 2, 256, 2, [(512, 1024), (512, 512), (256, 256), (512, 1024)]),
        # 2**k must divide the tile: 24 = 8 * 3 stops at level 3, shards down to 24 px
        ((800, 800), 24, 8, 16, 3, [(24, 192), (24, 96), (24, 48), (24, 24), (24, 192)]),
        # a block of one tile halves down to the tile's floor only (256 px)
        ((4096, 4096), 512, 1, 256, 1, [(512, 512), (256, 256), (512, 512)]),
        # the pyramid's own end comes first
        ((100, 70), 16, 4, 32, 1, [(16, 64), (16, 32)]),
        # an odd block: 768 px halves into 384 px, not whole 512 px chunks: level 0 only
        ((8192, 8192), 512, 3, 256, 0, [(512, 1536), (512, 1536)]),
        ((8192, 8192), 256, 5, 256, 0, [(256, 1280), (256, 1280)]),
        # 6 tiles halve once into whole chunks (3 of them), not twice
        ((8192, 8192), 256, 6, 256, 1, [(256, 1536), (256, 768), (256, 1536)]),
        ((300, 300), 32, 3, 32, 0, [(32, 96), (32, 96)]),
    ],
)
def test_block_levels_and_their_tiling(shape, tile, task_tiles, min_level_size, levels, tiling):
    m = meta(shape=shape, tile=tile, task_tiles=task_tiles, min_level_size=min_level_size)
    assert levels_in_blocks(m) == levels
    assert [level_tiling(m, k) for k in range(len(tiling))] == tiling
    assert levels_in_blocks(dataclasses.replace(m, layout=2)) == 0


STEP = {"float16": 1e-3, "uint8": 1 / 255, "float32": 1e-6}  # one rounding to the dtype


@pytest.mark.parametrize("dtype", ["float16", "uint8", "float32"])
def test_levels_the_tasks_write_match_the_pass_after_them(tmp_path, dtype):
    """The same blocks written into a result whose tasks write levels 1-2 and into one of
    layout 2 (every level built after the tasks): the same masks and label images at every
    level, and probabilities within one rounding of each other and of the plain block mean
    of the model's probabilities."""
    m = meta(
        shape=(300, 262), tile=32, task_tiles=4, min_level_size=16, probability_dtype=dtype,
        class_names=("a", "b", "c"),
    )  # fmt: skip
    assert levels_in_blocks(m) == 2
    probs = random_probabilities(m.shape, c=3, seed=4)
    grid = tile_grid(m.shape, m.tile)
    # A block's part inside one rectangle of tiles only, as a task with foreground skipping
    # computes it; the other tiles keep the fill value at every level.
    blocks = [b[1:3] if i % 3 == 1 else b for i, b in enumerate(grid.blocks(4))]
    written = np.zeros(m.shape, bool)
    for b in blocks:
        written[b[0].box.y0 : b[-1].box.y1, b[0].box.x0 : b[-1].box.x1] = True
    paths = {}
    for layout in (2, 3):
        path = paths[layout] = tmp_path / f"layout{layout}.zarr"
        prepare_result(path, dataclasses.replace(m, layout=layout))
        write_blocks(path, m, probs, blocks)
    arrays = ("0/probabilities", "1/probabilities", "2/mask", "labels/mask/1/mask")
    before = {a: zarr.open_array(paths[3] / a)[...] for a in arrays}
    assert before["1/probabilities"].any() and before["labels/mask/1/mask"].any()
    for path in paths.values():
        finish(path)
    assert read_meta(paths[2]).layout == 2 and read_meta(paths[3]).layout == 3
    for k in range(5):
        new, old = open_result(paths[3], level=k), open_result(paths[2], level=k)
        np.testing.assert_array_equal(new["mask"].values, old["mask"].values)
        np.testing.assert_array_equal(
            zarr.open_array(paths[3] / f"labels/mask/{k}/mask")[...],
            zarr.open_array(paths[2] / f"labels/mask/{k}/mask")[...],
        )
        # Levels 1-2 of layout 3 are rounded once, layout 2's once per level.
        np.testing.assert_allclose(
            new["probabilities"].values, old["probabilities"].values, atol=(k + 1) * STEP[dtype]
        )
        if k <= 2:
            f = 2**k
            ny, nx = new.sizes["y"], new.sizes["x"]
            mean = (probs * written)[:, : ny * f, : nx * f].reshape(3, ny, f, nx, f).mean((2, 4))
            np.testing.assert_allclose(new["probabilities"].values, mean, atol=STEP[dtype])
    for a in arrays:  # finalising did not rewrite what the tasks wrote
        np.testing.assert_array_equal(zarr.open_array(paths[3] / a)[...], before[a])


@pytest.mark.parametrize("layout", [2, 3])
def test_uint8_probabilities_built_from_the_level_below_do_not_drift(tmp_path, layout):
    """Levels built from the uint8 level below as stored (every level of layout 2, those past
    the tasks' of layout 3) round each 2x2 mean half to even: against the float means of
    level 0 as stored the mean error stays within 0.05 of a step at every level (half up
    drifted 1/8 of a step a level) and a pixel's class sums within 255 +- the classes."""
    names = ("a", "b", "c", "d")
    m = meta(
        shape=(1024, 1024), tile=128, task_tiles=2, min_level_size=16, probability_dtype="uint8",
        class_names=names, layout=layout,
    )  # fmt: skip
    # Softmax of logits that vary over 64 px cells: the upper levels' values stay spread out
    # (independent pixels would all average to 1/4, rounding alike).
    rng = np.random.default_rng(5)
    logits = rng.normal(0, 2, (len(names), 16, 16)).repeat(64, 1).repeat(64, 2)
    logits += rng.normal(0, 1, logits.shape)
    probs = np.exp(logits - logits.max(0))
    probs = (probs / probs.sum(0)).astype(np.float32)
    path = tmp_path / "r.zarr"
    prepare_result(path, m)
    write_everywhere(path, m, probs)
    finish(path)
    assert levels_in_blocks(read_meta(path)) < len(result_levels(path)) - 1

    def level(k: int) -> np.ndarray:
        return zarr.open_array(path / level_path(k, "probabilities", layout=layout))[...]

    reference = level(0).astype(np.float64)
    for k in range(len(result_levels(path))):
        if k:
            ny, nx = reference.shape[1] // 2, reference.shape[2] // 2
            reference = reference.reshape(len(names), ny, 2, nx, 2).mean((2, 4))
        stored = level(k)
        assert stored.dtype == np.uint8 and stored.shape == reference.shape
        error = (stored - reference).mean()
        assert abs(error) < 0.05, f"level {k}: mean error {error:+.3f} of 1/255"
        sums = stored.sum(0, dtype=np.int64)
        assert 255 - len(names) <= sums.min() and sums.max() <= 255 + len(names), f"level {k}"


def test_an_unfinished_layout_2_result_resumes_without_block_levels(tmp_path):
    m = meta(shape=(300, 262), tile=32, task_tiles=4, min_level_size=16)
    reference = tmp_path / "ref.zarr"
    probs = complete_result(reference, m)
    old = tmp_path / "old.zarr"
    prepare_result(old, dataclasses.replace(m, layout=2))
    blocks = list(tile_grid(m.shape, m.tile).blocks(4))
    write_blocks(old, m, probs, blocks[:2])
    assert prepare_result(old, m).sum() == sum(len(b) for b in blocks[:2])  # resumed
    write_blocks(old, m, probs, blocks[2:])
    assert not zarr.open_array(old / "1" / "mask")[...].any(), "level 1 waits for the pass"
    finish(old)
    assert read_meta(old).layout == 2
    assert zarr.open_array(old / "1" / "mask").shards == (128, 128)
    alike_levels(old, reference, n=5)


def test_a_result_written_before_segment_config_still_opens_and_resumes(tmp_path, small_slide):
    # Results written before SegmentConfig carried no "config" or "state" keys: their settings
    # are rebuilt from the identity, which kept its layout, so they open and count as done.
    import segpipe
    from segpipe.results import read_attrs

    out = tmp_path / "old.seg.zarr"
    settings = {"tile": 64, "mode": "blend", "window": 32, "task_tiles": 1}
    segpipe.segment(small_slide.image, out, scheduler="sync", **settings)
    current = read_attrs(out)
    assert current["source_shape"] == [300, 300]  # the source's level 0
    legacy = {k: v for k, v in current.items() if k not in ("config", "state", "source_shape")}
    zarr.open_group(out, mode="r+").attrs["segpipe"] = legacy

    meta = read_meta(out)
    assert meta.complete and meta.state == "complete" and meta.source_shape is None
    written = current["config"]  # the resolved settings (the window snapped to the model)
    rebuilt = meta.config.result_settings()
    assert rebuilt == {k: written[k] for k in rebuilt}
    assert (rebuilt["tile"], rebuilt["mode"], rebuilt["task_tiles"]) == (64, "blend", 1)
    assert meta.identity() == current["identity"]
    assert segpipe.open_result(out)["mask"].shape == (300, 300)
    again = segpipe.segment(small_slide.image, out, scheduler="sync", **settings)
    assert read_meta(again).summary == meta.summary  # recognised as the same, complete result


# --- layouts -------------------------------------------------------------------------------


def stored_arrays(path):
    """Paths of every array in the store at ``path``, read from the zarr.json files."""
    return {
        f.parent.relative_to(path).as_posix()
        for f in path.rglob("zarr.json")
        if json.loads(f.read_text(encoding="utf-8"))["node_type"] == "array"
    }


def level_arrays(group):
    return {f"{group}/{name}".lstrip("/") for name in ("mask", "probabilities", "y", "x", "class")}


BOOKKEEPING = {"_segpipe/tiles_done", "_segpipe/class_pixels"}
# Three levels (100 x 70 -> 50 x 35 -> 25 x 17), as each layout keeps them.
LAYOUT_2 = (
    set().union(*(level_arrays(str(k)) for k in range(3)))
    | {f"labels/mask/{k}/mask" for k in range(3)}
    | BOOKKEEPING
)
LAYOUT_1 = (
    level_arrays("")
    | level_arrays("levels/1")
    | level_arrays("levels/2")
    | {f"labels/mask/{k}" for k in range(3)}
    | BOOKKEEPING
)


def to_layout_1(path):
    """Move a result's arrays by hand to where segpipe kept them before layout 2: level 0 at
    the root, level k in ``levels/<k>``, label level k at ``labels/mask/<k>``, no ``layout``
    key. (Compared once against a result written by that version: the same nodes and
    metadata.)"""
    root_file = path / "zarr.json"
    doc = json.loads(root_file.read_text(encoding="utf-8"))
    (multiscale,) = doc["attributes"]["ome"]["multiscales"]
    n = len(multiscale["datasets"])
    for item in (path / "0").iterdir():
        if item.name != "zarr.json":
            item.rename(path / item.name)
    shutil.rmtree(path / "0")
    (path / "levels").mkdir()
    group = {"zarr_format": 3, "node_type": "group", "attributes": {}}
    (path / "levels" / "zarr.json").write_text(json.dumps(group), encoding="utf-8")
    for k in range(1, n):
        (path / str(k)).rename(path / "levels" / str(k))
    label = path / "labels" / "mask"
    for k in range(n):
        (label / str(k) / "mask").rename(label / f"moving-{k}")
        shutil.rmtree(label / str(k))
        (label / f"moving-{k}").rename(label / str(k))
    label_doc = json.loads((label / "zarr.json").read_text(encoding="utf-8"))
    for k, d in enumerate(label_doc["attributes"]["ome"]["multiscales"][0]["datasets"]):
        d["path"] = str(k)
    (label / "zarr.json").write_text(json.dumps(label_doc), encoding="utf-8")
    for k, d in enumerate(multiscale["datasets"]):
        d["path"] = "probabilities" if k == 0 else f"levels/{k}/probabilities"
    del doc["attributes"]["segpipe"]["layout"]
    consolidated = doc.pop("consolidated_metadata", None) is not None
    root_file.write_text(json.dumps(doc), encoding="utf-8")
    if consolidated:
        with quiet_consolidated():
            zarr.consolidate_metadata(str(path))
    return path


def write_blocks(path, m, probabilities, blocks):
    """Write and record ``blocks`` of tiles as a run's tasks and driver do."""
    for block in blocks:
        box = Box(block[0].box.y0, block[-1].box.y1, block[0].box.x0, block[-1].box.x1)
        counts = write_tiles(path, box, probabilities[(slice(None), *box.slices)])
        mark_tiles_done(path, {t.index: counts * 0 for t in block} | {block[0].index: counts})


def complete_result(path, m):
    probs = random_probabilities(m.shape)
    prepare_result(path, m)
    write_blocks(path, m, probs, tile_grid(m.shape, m.tile).blocks(m.config.task_tiles))
    finish(path)
    return probs


def _edited(path, edit):
    """The result at ``path`` with its root ``zarr.json`` edited by ``edit(document)``."""
    document = json.loads((path / "zarr.json").read_text())
    edit(document)
    (path / "zarr.json").write_text(json.dumps(document))
    return path


def _segpipe(document):
    return document["attributes"]["segpipe"]


@pytest.mark.parametrize(
    ("edit", "why"),
    [
        (lambda d: _segpipe(d).update(layout=9), "result layout 9 is unknown"),
        (lambda d: d["attributes"].update(ome=[]), "unreadable OME metadata"),
        (lambda d: d["attributes"]["ome"].update(multiscales=[]), "unreadable OME metadata"),
        (lambda d: _segpipe(d)["identity"].update(pixel_size_um=-0.5), "not a positive number"),
        (lambda d: _segpipe(d)["identity"].update(pixel_size_um="0.5"), "TypeError"),
        (lambda d: _segpipe(d).update(source_shape=[0, 0]), r"source_shape \(0, 0\): no pix"),
        (lambda d: _segpipe(d)["identity"].update(transform=[1, 2]), "not six finite numbers"),
    ],
)
def test_damaged_metadata_is_refused_naming_the_result(tmp_path, edit, why):
    """Opening and querying a result of unreadable metadata raised AttributeError, IndexError
    or "math domain error", naming no file; now a ValueError names the result and the fault."""
    path = tmp_path / "r.zarr"
    complete_result(path, meta(source_shape=(400, 280)))
    _edited(path, edit)
    for read in (open_result, summarise, class_areas, result_levels):
        with pytest.raises(ValueError, match=re.escape(str(path)) + ".*" + why):
            read(path)


@pytest.mark.parametrize(
    "edit",
    [
        lambda d: _segpipe(d).update(complete="false"),  # a truthy string
        lambda d: _segpipe(d).update(state="computing"),  # complete true, state not
        lambda d: _segpipe(d).update(complete=1),
    ],
)
def test_complete_is_one_answer_whoever_asks(tmp_path, edit):
    """A hand-edited completeness was complete to open_result, is_complete and a resuming run
    (every tile done) while read_meta said not: now one predicate says not complete."""
    path = tmp_path / "r.zarr"
    complete_result(path, meta())
    _edited(path, edit)
    mark_tiles_done(path, {})  # the progress array as it was when the run stopped
    zarr.open_array(path / "_segpipe" / "tiles_done", mode="r+")[0, 0] = 0
    assert not is_complete(path) and not read_meta(path).complete
    assert not tiles_done(path)[0, 0] and tiles_done(path).sum() == tiles_done(path).size - 1
    with pytest.raises(IncompleteResultError, match=re.escape(str(path))):
        open_result(path)


def test_a_complete_result_without_consolidated_metadata_opens(tmp_path):
    """An attribute edit through zarr without consolidation drops the consolidated metadata:
    the result opened with zarr's "Consolidated metadata requested ... not found"."""
    path = tmp_path / "r.zarr"
    probs = complete_result(path, meta())
    root = zarr.open_group(path, mode="r+", use_consolidated=False)
    root.attrs["note"] = "checked by hand"
    assert "consolidated_metadata" not in json.loads((path / "zarr.json").read_text())
    with pytest.warns(RuntimeWarning, match="non-consolidated"):
        ds = open_result(path)
    np.testing.assert_array_equal(ds["mask"].values, probs.argmax(0))


def same_levels(a, b, n=3):
    for k in range(n):
        xr.testing.assert_identical(
            open_result(a, level=k).drop_attrs(), open_result(b, level=k).drop_attrs()
        )


def alike_levels(a, b, n=3):
    """The same masks; float16 probabilities within a rounding per level: a result whose
    tasks wrote levels beside one of an older layout, which built them after its tasks."""
    for k in range(n):
        x, y = open_result(a, level=k), open_result(b, level=k)
        np.testing.assert_array_equal(x["mask"].values, y["mask"].values)
        np.testing.assert_allclose(
            x["probabilities"].values, y["probabilities"].values, atol=(k + 1) * 1e-3
        )


def test_open_datatree_opens_a_fresh_result(tmp_path):
    path = tmp_path / "r.zarr"
    probs = complete_result(path, meta(min_level_size=16))
    assert stored_arrays(path) == LAYOUT_2
    tree = xr.open_datatree(path, engine="zarr")
    assert not tree.dataset.data_vars, "the root holds no level"
    for k, shape in enumerate([(100, 70), (50, 35), (25, 17)]):
        level = tree[str(k)]
        assert (level.sizes["y"], level.sizes["x"]) == shape
        assert level["probabilities"].dims == ("class", "y", "x")
        np.testing.assert_array_equal(tree[f"labels/mask/{k}"]["mask"], level["mask"])
        ours = open_result(path, level=k)
        np.testing.assert_array_equal(level["mask"].values, ours["mask"].values)
        np.testing.assert_array_equal(level["x"].values, ours["x"].values)
    np.testing.assert_array_equal(tree["0"]["mask"].values, probs.argmax(0))
    xr.testing.assert_identical(
        xr.open_zarr(path, group="1").drop_attrs(), tree["1"].to_dataset().drop_attrs()
    )
    assert read_meta(path).layout == read_attrs(path)["layout"] == 3


def test_pyramid_is_announced_as_a_stage_of_levels(tmp_path):
    from segpipe.progress import reporting

    path = tmp_path / "r.zarr"
    prepare_result(path, meta(min_level_size=16))
    events = []
    with reporting(events.append):
        finish(path)
    pyramid = [(e.kind, e.done, e.total) for e in events if e.stage == "pyramid"]
    assert pyramid == [("start", 0, 2), ("advance", 1, 2), ("advance", 2, 2), ("end", 2, 2)]


def test_a_layout_1_result_still_opens_and_counts_as_complete(tmp_path):
    from segpipe import query
    from segpipe.analysis.ngff import export_ngff04

    m = meta(min_level_size=16)
    new, old = tmp_path / "new.zarr", tmp_path / "old.zarr"
    complete_result(new, m)
    shutil.copytree(new, old)
    to_layout_1(old)
    assert stored_arrays(old) == LAYOUT_1
    assert "layout" not in read_attrs(old) and read_meta(old).layout == 1
    assert is_complete(old) and read_meta(old).summary == read_meta(new).summary
    assert read_meta(old).identity() == read_meta(new).identity()
    same_levels(old, new)
    tree = open_result(old, tree=True)
    assert [tree[k].sizes["x"] for k in tree.children] == [70, 35, 17]
    # Plain xarray read level 0 at the root of these, and still does.
    xr.testing.assert_identical(
        xr.open_zarr(old).drop_attrs(), xr.open_zarr(new, group="0").drop_attrs()
    )
    xr.testing.assert_identical(
        query.class_areas(old).compute().drop_attrs(),
        query.class_areas(new).compute().drop_attrs(),
    )
    copy = export_ngff04(old, tmp_path / "old04.zarr")
    assert zarr.open_group(copy, mode="r")["labels/mask/2"].shape == (25, 17)
    # The same inputs again: recognised as the same complete result, left as it is.
    before = read_attrs(old)
    assert prepare_result(old, m).all()
    assert read_attrs(old) == before and stored_arrays(old) == LAYOUT_1


def test_an_unfinished_layout_1_result_is_finished_in_its_own_layout(tmp_path):
    m = meta(min_level_size=16, task_tiles=2)
    reference = tmp_path / "ref.zarr"
    probs = complete_result(reference, m)
    old = tmp_path / "old.zarr"
    prepare_result(old, m)
    blocks = list(tile_grid(m.shape, m.tile).blocks(2))
    write_blocks(old, m, probs, blocks[:3])
    to_layout_1(old)

    done = prepare_result(old, m)  # resumed, not replaced
    assert done.sum() == sum(len(b) for b in blocks[:3]) < done.size
    with pytest.raises(IncompleteResultError):
        open_result(old)
    write_blocks(old, m, probs, blocks[3:])
    finish(old)
    assert stored_arrays(old) == LAYOUT_1, "no layout-2 array appeared"
    assert read_meta(old).complete and read_meta(old).layout == 1
    alike_levels(old, reference)
    for k in range(3):
        labels = zarr.open_array(old / "labels" / "mask" / str(k), mode="r")[...]
        np.testing.assert_array_equal(labels, open_result(reference, level=k)["mask"].values)


def test_a_result_of_an_unknown_layout_is_refused_with_the_reason(tmp_path):
    path = tmp_path / "r.zarr"
    prepare_result(path, meta())
    group = zarr.open_group(path, mode="r+")
    group.attrs["segpipe"] = {**read_attrs(path), "layout": 4}
    with pytest.raises(ValueError, match="newer segpipe"):
        read_meta(path)
    with pytest.raises(ValueError, match="layout 4"):
        open_result(path, allow_incomplete=True)


# --- the arithmetic of a block's levels ---------------------------------------------------


def brute_mode_2x(labels):
    """Reference: per 2x2 block, the most frequent value; ties to the top-left pixel when it
    is among the most frequent, else to the smaller value."""
    ny, nx = labels.shape[0] // 2, labels.shape[1] // 2
    out = np.zeros((ny, nx), labels.dtype)
    for i in range(ny):
        for j in range(nx):
            block = labels[2 * i : 2 * i + 2, 2 * j : 2 * j + 2].ravel().tolist()
            top = max(block.count(v) for v in block)
            best = [v for v in block if block.count(v) == top]
            out[i, j] = block[0] if block[0] in best else min(best)
    return out


@settings(max_examples=60, deadline=None)
@given(
    st.integers(1, 9), st.integers(1, 9), st.sampled_from([1, 2, 5, 16, 17, 40]),
    st.integers(0, 2**32 - 1),
)  # fmt: skip
def test_mode_2x_is_the_most_frequent_value_of_each_block(ny, nx, values, seed):
    # under 16 values: the table; from 16 (a label of 16 or more): the comparisons
    from segpipe.results.pyramid import mode_2x

    labels = np.random.default_rng(seed).integers(0, values, (ny, nx)).astype(np.uint8)
    np.testing.assert_array_equal(mode_2x(labels), brute_mode_2x(labels))


def test_mode_2x_table_holds_every_block_of_values_under_16():
    from segpipe.results.pyramid import mode_2x

    # one 2x2 block per code: top-left, top-right, bottom-left, bottom-right nibbles
    code = np.arange(1 << 16)
    labels = np.zeros((2, 2 << 16), np.uint8)
    labels[0, 0::2], labels[0, 1::2] = code & 15, (code >> 4) & 15
    labels[1, 0::2], labels[1, 1::2] = (code >> 8) & 15, (code >> 12) & 15
    np.testing.assert_array_equal(mode_2x(labels), brute_mode_2x(labels))


@settings(max_examples=60, deadline=None)
@given(st.integers(1, 6), st.integers(0, 2**32 - 1), st.booleans())
def test_class_map_is_argmax_with_ties_to_the_first(classes, seed, coarse):
    from segpipe.results.encoding import class_map

    rng = np.random.default_rng(seed)
    p = rng.random((classes, 17, 9)).astype(np.float32)
    if coarse:  # many ties
        p = np.round(p * 2) / 2
    np.testing.assert_array_equal(class_map(p), np.argmax(p, axis=0))


def test_float16_encoding_is_numpys_cast_bit_for_bit():
    from segpipe.results.encoding import encode_probabilities

    rng = np.random.default_rng(0)
    logits = rng.normal(0, 15, (3, 64, 64))
    p = np.exp(logits - logits.max(0))
    p = (p / p.sum(0)).astype(np.float32)  # softmax tails: float16 subnormals and zeros
    assert (p < 2**-14).mean() > 0.2
    encoded = encode_probabilities(p, "float16")
    assert encoded.dtype == np.float16
    np.testing.assert_array_equal(encoded.view(np.uint16), p.astype(np.float16).view(np.uint16))
    crop = p[:, 3:60, 5:50]  # a window's crop, as the exact sink hands it on: strided
    encoded = encode_probabilities(crop, "float16")
    assert encoded.flags.c_contiguous
    np.testing.assert_array_equal(encoded.view(np.uint16), crop.astype(np.float16).view(np.uint16))
    backwards = p[:, ::-1]  # a negative stride, which torch does not take
    encoded = encode_probabilities(backwards, "float16")
    np.testing.assert_array_equal(encoded, backwards.astype(np.float16))
    frozen = p.copy()
    frozen.flags.writeable = False
    np.testing.assert_array_equal(encode_probabilities(frozen, "float16"), p.astype(np.float16))


def test_no_pyramid_stage_when_the_tasks_wrote_every_level(tmp_path):
    from segpipe.progress import reporting

    path = tmp_path / "r.zarr"
    m = meta(tile=16, task_tiles=4, min_level_size=32)  # 100 x 70 -> 50 x 35, in the blocks
    assert levels_in_blocks(m) == 1
    prepare_result(path, m)
    probs = random_probabilities(m.shape)
    write_everywhere(path, m, probs)
    events = []
    with reporting(events.append):
        finish(path)
    assert not [e for e in events if e.stage == "pyramid"]
    expected = brute_mode_2x(np.argmax(probs, axis=0).astype(np.uint8))
    np.testing.assert_array_equal(open_result(path, level=1)["mask"].values, expected)


def _levels_written_in_blocks_of(path: Path, task_tiles: int) -> list[np.ndarray]:
    """Every level's mask of a result of 300 x 262 px in 16 px tiles, blocks of ``task_tiles``
    tiles, written with the same random probabilities whichever the blocks."""
    probs = random_probabilities((300, 262), seed=5)
    m = meta(shape=(300, 262), tile=16, task_tiles=task_tiles, min_level_size=16)
    prepare_result(path, m)
    write_everywhere(path, m, probs)
    finish(path)
    levels = range(len(pyramid_shapes(m.shape, m.config.min_level_size)))
    return [open_result(path, level=k)["mask"].values for k in levels]


@pytest.fixture(scope="module")
def levels_of_one_tile_blocks(tmp_path_factory) -> list[np.ndarray]:
    """The reference of the test below, made once: 323 blocks of one tile each."""
    return _levels_written_in_blocks_of(tmp_path_factory.mktemp("one") / "r1.zarr", 1)


@pytest.mark.parametrize("task_tiles", [3, 5, 6])
def test_results_of_blocks_of_any_number_of_tiles_are_created_and_read_back(
    tmp_path, task_tiles, levels_of_one_tile_blocks
):
    """Blocks of 3, 5 or 6 tiles (shards that halve into parts of a chunk) make results whose
    every level holds the same mask as blocks of one tile give, whichever of the tasks and
    the pass after them writes it."""
    many = _levels_written_in_blocks_of(tmp_path / f"r{task_tiles}.zarr", task_tiles)
    assert len(many) == 5
    for k, (one, level) in enumerate(zip(levels_of_one_tile_blocks, many, strict=True)):
        np.testing.assert_array_equal(level, one, err_msg=f"level {k}")


def _label_levels(path, m, name):
    return [
        zarr.open_array(path, path=label_path(name, k, layout=m.layout), mode="r")
        for k in range(len(pyramid_shapes(m.shape, m.config.min_level_size)))
    ]


def test_a_label_image_killed_while_it_is_created_is_finished_by_the_next_call(
    tmp_path, monkeypatch
):
    """A run killed while it adds a label image leaves it unlisted (listed last); the next
    call makes the arrays still missing, and the tasks then find every level they write."""
    from segpipe.results import labels, layout

    path = tmp_path / "r.zarr"
    m = meta(shape=(200, 140), tile=16, task_tiles=2, min_level_size=16)
    prepare_result(path, m)
    real, made = layout._label_array, []

    def killed_after_two(*args, **kwargs):
        if len(made) == 2:
            raise KeyboardInterrupt("killed")
        made.append(args[1])
        return real(*args, **kwargs)

    monkeypatch.setattr(layout, "_label_array", killed_after_two)
    with pytest.raises(KeyboardInterrupt):
        labels.add_label_image(path, "extra", ("none", "a"), long_name="x")
    assert labels.label_images(path) == ["mask"], "listed before its arrays were made"
    monkeypatch.setattr(layout, "_label_array", real)
    labels.add_label_image(path, "extra", ("none", "a"), long_name="x")
    assert labels.label_images(path) == ["mask", "extra"]
    arrays = labels.label_block_arrays(path, "extra")
    assert len(arrays) == levels_in_blocks(m) + 1 == 2
    values = np.ones((32, 32), np.uint8)
    write_block(path, Box(0, 32, 0, 32), random_probabilities((32, 32)), labels=[(arrays, values)])
    finish(path)
    stored = _label_levels(path, m, "extra")
    assert len(stored) == 4
    assert stored[0][:32, :32].all() and not stored[0][32:, :].any()
    assert stored[2][:8, :8].all() and stored[2].attrs["flag_meanings"] == "none a"


def test_a_label_image_listed_before_its_arrays_is_finished_keeping_what_was_written(tmp_path):
    """A release that listed a label first, killed before its arrays were all made: the name
    is listed, its upper levels missing (one cut short). Adding it again makes them, keeps the
    level the tasks already wrote, and the pyramid pass then finds every level."""
    from segpipe.results import labels

    path = tmp_path / "r.zarr"
    m = meta(shape=(200, 140), tile=16, task_tiles=2, min_level_size=16)
    prepare_result(path, m)
    labels.add_label_image(path, "extra", ("none", "a"), long_name="x")
    arrays = labels.label_block_arrays(path, "extra")
    values = np.ones((32, 32), np.uint8)
    write_block(path, Box(0, 32, 0, 32), random_probabilities((32, 32)), labels=[(arrays, values)])
    shutil.rmtree(path / label_path("extra", 3, layout=m.layout))
    (path / label_path("extra", 2, layout=m.layout) / "zarr.json").write_text('{"zarr_fo')
    labels.add_label_image(path, "extra", ("none", "a"), long_name="x")
    assert labels.label_images(path) == ["mask", "extra"]
    finish(path)
    stored = _label_levels(path, m, "extra")
    assert stored[0][:32, :32].all() and not stored[0][32:, :].any()
    assert stored[3][:4, :4].all() and not stored[3][4:, :].any()


@pytest.mark.parametrize("shape", [(33, 40), (65, 98), (34, 35), (96, 67)])
def test_images_just_past_a_shard_write_every_level_they_reach(tmp_path, shape):
    """An image 1-3 px past a shard (32 px here) has a last row or column of blocks that
    halving empties after a level or two: the tasks write the levels it reaches and the rest
    stays the whole level's (before, halving 1 px raised). Every level equals the level below
    halved by 2x2 mode, odd last rows and columns dropped."""
    from segpipe.results.pyramid import mode_2x

    probs = random_probabilities(shape, c=3, seed=7)
    path = tmp_path / "r.zarr"
    m = meta(shape=shape, tile=16, task_tiles=2, min_level_size=4)
    prepare_result(path, m)
    write_everywhere(path, m, probs)
    finish(path)
    levels = [open_result(path, level=k)["mask"].values for k in range(len(result_levels(path)))]
    assert len(levels) >= 3
    np.testing.assert_array_equal(levels[0], np.argmax(probs, axis=0))
    for k in range(1, len(levels)):
        below = levels[k - 1]
        even = below[: below.shape[0] // 2 * 2, : below.shape[1] // 2 * 2]
        np.testing.assert_array_equal(levels[k], mode_2x(even), err_msg=f"level {k}")


def test_mode_2x_refuses_labels_it_cannot_score():
    from segpipe.results.pyramid import mode_2x

    with pytest.raises(TypeError, match="uint8"):
        mode_2x(np.array([[300, 0], [300, 0]], dtype=np.uint16))


@pytest.mark.parametrize("where", ["local", "memory"])
def test_a_result_overwritten_by_another_run_reads_as_the_new_one(tmp_path, where):
    """Dask names chunks; xarray names a store's by its path (and a local one's mtime), so a
    URL overwritten by another run gave the new arrays the old ones' names, and dask took
    the two for one (a == b was all True over differing pixels). Names follow the run."""
    import torch

    import segpipe
    from segpipe import models
    from segpipe.io.readers import ArrayReader

    image = np.random.default_rng(0).integers(0, 255, (96, 80, 3), dtype=np.uint8)
    out = f"memory://overwrite-{os.getpid()}/r.zarr" if where == "memory" else tmp_path / "r.zarr"
    opened = []
    for favoured in (0, 1):
        torch.manual_seed(0)
        net = models.build("unet", width=4, depth=2)
        head = [m for m in net.modules() if isinstance(m, torch.nn.Conv2d)][-1]
        with torch.no_grad():
            head.bias[:] = torch.tensor([10.0, -10.0] if favoured == 0 else [-10.0, 10.0])
        result = segpipe.segment(
            ArrayReader(image), out, net, tile=32, scheduler="sync", overwrite=True
        )
        # Persisted, as a client keeps what it computed: the chunks live on under their names.
        opened.append(segpipe.open_result(result).persist())
    old, new = opened
    assert (old.mask.values == 0).all() and (new.mask.values == 1).all()
    assert old.mask.data.name != new.mask.data.name
    assert not bool((old.mask == new.mask).any())


def test_leftovers_of_other_names_are_kept_for_a_name_with_glob_characters(tmp_path):
    """``r[1A].zarr``'s leftovers were looked up with its name as a glob pattern, which
    matched (and deleted) those of ``r1.zarr`` and ``rA.zarr``."""
    others = [tmp_path / f".r{c}.zarr.deleting-0123456789ab" for c in "1A"]
    for other in others:
        other.mkdir()
        (other / "zarr.json").write_text("{}")
    delete_result(tmp_path / "r[1A].zarr")
    assert all((other / "zarr.json").exists() for other in others)


def test_a_skeleton_failing_part_way_leaves_no_hidden_copy_beside_the_output(tmp_path, monkeypatch):
    """A skeleton half-built when its writing failed (disk full) was left hidden beside it."""
    import segpipe.results.store as store

    create_layout = store.create_layout

    def full_disk(path, m):
        create_layout(path, m)
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(store, "create_layout", full_disk)
    with pytest.raises(OSError, match="No space left"):
        prepare_result(tmp_path / "r.zarr", meta())
    assert not list(tmp_path.glob(".r.zarr.creating-*"))
    assert not (tmp_path / "r.zarr").exists()


def test_a_creating_leftover_is_removed_only_once_old(tmp_path):
    """A skeleton another run is building right now beside the output was deleted under it."""
    other = tmp_path / ".r.zarr.creating-0123456789ab"
    other.mkdir()
    (other / "zarr.json").write_text("{}")
    prepare_result(tmp_path / "r.zarr", meta())
    assert (other / "zarr.json").exists(), "a fresh one may be another run's: kept"
    old = other.stat().st_mtime - 700  # past the 600 s a run may take to build one
    os.utime(other, (old, old))
    prepare_result(tmp_path / "r.zarr", meta())  # resumed
    assert not other.exists(), "an old one is a killed run's: removed"


def test_a_result_opened_unfinished_is_read_anew_once_finished(tmp_path):
    """Dask names a result's chunks: an unfinished result's names were those it kept when
    finished, so a client that had persisted it served the zeros of then. An unfinished
    result is named anew at each open (its pixels change while its run goes on), a finished
    one after the run that finished it."""
    import distributed

    path = tmp_path / "r.zarr"
    m = meta()
    prepare_result(path, m)
    probs = random_probabilities(m.shape)
    with distributed.Client(processes=False, n_workers=1, dashboard_address=":0"):
        early = open_result(path, allow_incomplete=True).persist()
        assert not early.mask.values.any()
        write_everywhere(path, m, probs)
        again = open_result(path, allow_incomplete=True)
        np.testing.assert_array_equal(again.mask.values, probs.argmax(0))
        finish(path)
        done = open_result(path)
        np.testing.assert_array_equal(done.mask.values, probs.argmax(0))
        assert again.mask.data.name != early.mask.data.name
        assert done.mask.data.name not in (early.mask.data.name, again.mask.data.name)
        assert done.mask.data.name == open_result(path).mask.data.name


def test_a_model_of_more_classes_than_a_uint8_mask_holds_is_refused_before_any_store(tmp_path):
    """Masks and label images are uint8: 257 classes failed only in the tasks, the store
    made."""
    names = tuple(f"c{i}" for i in range(257))
    with pytest.raises(ValueError, match=r"257 classes.*at most 256"):
        prepare_result(tmp_path / "r.zarr", meta(class_names=names))
    assert not (tmp_path / "r.zarr").exists()
    prepare_result(tmp_path / "r.zarr", meta(class_names=names[:256]))
    assert read_meta(tmp_path / "r.zarr").class_names == names[:256]


def test_class_names_with_blanks_are_one_cf_flag_meaning_each(tmp_path):
    """CF reads ``flag_meanings`` as blank-separated words, one per flag value: a class named
    "tumor stroma" gave four words for three values."""
    path = tmp_path / "r.zarr"
    m = meta(class_names=("background", "tumor stroma", "nucleus\tcell"))
    prepare_result(path, m)
    for k, level in enumerate(_label_levels(path, m, "mask")):
        words = level.attrs["flag_meanings"].split()
        assert len(words) == len(level.attrs["flag_values"]) == 3, k
        assert words == ["background", "tumor_stroma", "nucleus_cell"]
    # A blank name was no word at all: the meanings came out one short of the values.
    blank = tmp_path / "blank.zarr"
    prepare_result(blank, meta(class_names=("background", "", " ")))
    for level in _label_levels(blank, meta(class_names=("background", "", " ")), "mask"):
        assert level.attrs["flag_meanings"].split() == ["background", "class_1", "class_2"]


@pytest.mark.parametrize(
    "replace",
    [lambda path: prepare_result(path, meta(tile=64), overwrite=True), delete_result],
    ids=["overwrite", "delete"],
)
def test_a_result_reached_through_a_symbolic_link_is_never_renamed_or_deleted(tmp_path, replace):
    """Replacing or deleting renames the result aside: through a link, the link went aside,
    rmtree refused it, and the next runs hid that error for good. Refused, naming both."""
    target, link = tmp_path / "real.zarr", tmp_path / "r.zarr"
    prepare_result(target, meta())
    link.symlink_to(target, target_is_directory=True)
    mark_tiles_done(link, {(0, 0): np.array([1, 2])})  # resuming through a link writes in place
    with pytest.raises(
        ResultMismatchError, match=re.escape(f"{link} is a symbolic link to {target}")
    ):
        replace(link)
    # (deleting locks the result, in a file beside the link's target: lock.lock_path)
    beside = sorted(p.name for p in tmp_path.iterdir() if p.name != ".real.zarr.lock")
    assert beside == ["r.zarr", "real.zarr"]
    assert link.is_symlink() and read_meta(link).tile == 32 and tiles_done(link)[0, 0]


def test_a_pyramid_the_tasks_wrote_whole_needs_no_label_list(tmp_path):
    """build_pyramid read the label list before it found it had nothing to build."""
    from segpipe.results import build_pyramid

    path = tmp_path / "r.zarr"
    m = meta(tile=16, task_tiles=4, min_level_size=32)  # every level in the blocks
    prepare_result(path, m)
    write_everywhere(path, m, random_probabilities(m.shape))
    shutil.rmtree(path / "labels")

    def levels() -> dict[str, bytes]:
        return {
            str(f.relative_to(path)): f.read_bytes()
            for f in sorted(path.rglob("*"))
            if f.is_file() and f.parts[len(path.parts)].isdigit()
        }

    written = levels()
    assert len({k.split("/")[0] for k in written}) > 1, "the tasks wrote upper levels"
    build_pyramid(path)
    assert levels() == written, "levels the tasks wrote whole are left as they are"


def record_every_tile(path):
    """Record every tile not recorded yet as done (no counts), as a run that wrote them."""
    todo = np.argwhere(~tiles_done(path))
    classes = len(read_meta(path).class_names)
    mark_tiles_done(path, {(int(y), int(x)): np.zeros(classes, np.int64) for y, x in todo})


@pytest.mark.parametrize(
    "when", ["before", "in the pyramid", "result.pyramid", "result.consolidated"]
)
def test_a_run_replaced_while_it_finalises_leaves_the_replacing_runs_result_untouched(
    tmp_path, monkeypatch, when
):
    """Run B (overwrite, other settings) replaces run A's result, every tile of A recorded:
    before A finalises, once A's pyramid is built, or once A's metadata is consolidated. A
    raises ResultReplacedError at its next root write, and B's result (every tile written and
    recorded, not finalised) stays byte for byte, not complete: A consolidated it and marked
    it complete with A's summary, or went on finalising it as its own. In A's pyramid pass
    (no lock at a URL), A's later shards landed in B's result, or A failed on a checksum."""
    from segpipe.results import pyramid, store

    path, m, b = tmp_path / "r.zarr", meta(min_level_size=16), meta(halo=8, min_level_size=16)
    prepare_result(path, m)
    ours = result_started(path)
    write_everywhere(path, m, random_probabilities(m.shape))
    record_every_tile(path)
    summary = run_summary(path)
    before = {}

    def run_b():
        prepare_result(path, b, overwrite=True)
        write_everywhere(path, b, random_probabilities(b.shape, seed=1))
        record_every_tile(path)
        before.update(store_files(path))

    if when == "before":
        run_b()
    elif when == "in the pyramid":
        halve, once = pyramid._halve_into, threading.Lock()  # the pass runs on a pool

        def b_comes_first(*args):
            with once:
                if not before:
                    run_b()
            return halve(*args)

        monkeypatch.setattr(pyramid, "_halve_into", b_comes_first)
    else:
        point = store.fault_point

        def b_comes(name):
            if name == when:
                run_b()
            point(name)

        monkeypatch.setattr(store, "fault_point", b_comes)
    with pytest.raises(ResultReplacedError, match="replaced by another run") as raised:
        finalize_result(path, summary, started=ours)
    assert ours in str(raised.value)
    assert before and store_files(path) == before
    assert not is_complete(path) and read_attrs(path)["state"] == "computing"
    assert read_meta(path).halo == 8


def debris_at(path):
    """What a replaced run's late writes leave at ``path``: its result renamed away (by the run
    replacing it) and deleted, then a block and a record written by path from the arrays it
    opened before (past its fence): the folders of their chunks and a chunk write cut short,
    no ``zarr.json``."""
    from segpipe.results.layout import PROGRESS

    prepare_result(path, meta(task_tiles=2))
    arrays = block_level_arrays(path)
    record = zarr.open_array(path / PROGRESS, mode="r+")
    aside = path.with_name(f".{path.name}.deleting-0123456789ab")
    path.rename(aside)
    shutil.rmtree(aside)
    write_block(path, Box(0, 64, 0, 64), random_probabilities((64, 64)), arrays=arrays)
    record[0, 0] = 1
    (path / "0" / "probabilities" / "c" / "0" / "0" / f"1.{'ab' * 16}.partial").write_bytes(b"x")
    assert not (path / "zarr.json").exists() and not is_result(path)
    assert {"0/mask/c/0/0", "_segpipe/tiles_done/c/0/0"} <= set(store_files(path))


@pytest.mark.parametrize("overwrite", [False, True], ids=["resume", "overwrite"])
def test_chunks_a_replaced_run_wrote_late_are_removed_and_the_next_run_completes(
    tmp_path, small_slide, random_checkpoint, overwrite
):
    """Such a folder was refused as "not a segpipe result", overwrite or not: the path was
    stuck until removed by hand. It is removed, and the run ends as one at an empty path."""
    import segpipe

    settings = {"tile": 64, "task_tiles": 1, "foreground": "none", "scheduler": "sync"}
    out, clean = tmp_path / "r.seg.zarr", tmp_path / "clean.seg.zarr"
    debris_at(out)
    segpipe.segment(small_slide.image, out, random_checkpoint, overwrite=overwrite, **settings)
    segpipe.segment(small_slide.image, clean, random_checkpoint, **settings)
    assert is_complete(out)
    assert store_files(out, but={"zarr.json"}) == store_files(clean, but={"zarr.json"})
    names = {p.name for p in tmp_path.iterdir()} - {"clean.seg.zarr", ".clean.seg.zarr.lock"}
    assert names == {"r.seg.zarr", ".r.seg.zarr.lock"}


@pytest.mark.parametrize("folder", ["0/mask/c/0", "_segpipe/tiles_done/c"])
def test_a_late_write_killed_before_its_chunk_leaves_debris_that_is_removed(tmp_path, folder):
    """Killed between its mkdir and its chunk, a late write leaves chunk folders alone: they
    are removed as debris, not refused as a user's folder (the path would be stuck)."""
    path = tmp_path / "r.zarr"
    (path / folder).mkdir(parents=True)
    prepare_result(path, meta())
    assert is_result(path)


def test_delete_result_removes_chunks_a_replaced_run_wrote_late(tmp_path):
    path = tmp_path / "r.zarr"
    debris_at(path)
    delete_result(path)
    assert not path.exists()
    assert [p.name for p in tmp_path.iterdir()] == [".r.zarr.lock"]


def test_chunks_written_late_while_a_new_skeleton_is_built_are_removed_before_it_goes_in(
    tmp_path, monkeypatch
):
    """Run A's block write past its fence lands after run B renamed A's result away and
    before B's skeleton is renamed into place: that rename failed (ENOTEMPTY), and the path
    was left stuck. B removes the chunks and renames again: its store as if A never wrote."""
    from segpipe.results import store

    path, fresh = tmp_path / "r.zarr", tmp_path / "fresh.zarr"
    prepare_result(path, meta(task_tiles=2))
    arrays = block_level_arrays(path)  # opened by A's task before B came
    point = store.fault_point

    def late_write(name):
        if name == "result.skeleton":
            write_block(path, Box(0, 64, 0, 64), random_probabilities((64, 64)), arrays=arrays)
            assert (path / "0" / "mask" / "c" / "0" / "0").exists()
        point(name)

    monkeypatch.setattr(store, "fault_point", late_write)
    prepare_result(path, meta(task_tiles=2, halo=8), overwrite=True)
    monkeypatch.undo()
    prepare_result(fresh, meta(task_tiles=2, halo=8))
    assert read_meta(path).halo == 8 and not tiles_done(path).any()
    assert store_files(path, but={"zarr.json"}) == store_files(fresh, but={"zarr.json"})
    assert sorted(p.name for p in tmp_path.iterdir()) == ["fresh.zarr", "r.zarr"]


@pytest.mark.parametrize(
    "extra",
    [
        "notes.txt",
        "0/photo.png",
        "0/mask/c/0/notes",
        "labels/zarr.json",  # a user's group, in the folder
        "0/mask/zarr.json",
        "_segpipe/zarr.json",
        "link",
    ],
)
def test_chunks_beside_anything_else_are_refused_and_kept(tmp_path, extra):
    """Only a folder of nothing but those chunks is removed: anything else (a user's file, a
    Zarr group's metadata, a link) makes it someone's data, refused and kept."""
    path = tmp_path / "r.zarr"
    debris_at(path)
    if extra == "link":
        (tmp_path / "user.bin").write_bytes(b"user's")
        (path / "0" / "mask" / "c" / "0" / "7").symlink_to(tmp_path / "user.bin")
    else:
        (path / extra).parent.mkdir(parents=True, exist_ok=True)
        (path / extra).write_text("user's")
    before = store_files(path)
    with pytest.raises(ResultMismatchError, match="not a segpipe result"):
        prepare_result(path, meta(), overwrite=True)
    with pytest.raises(ResultMismatchError, match="not a segpipe result"):
        delete_result(path)
    assert store_files(path) == before
    assert (tmp_path / "user.bin").exists() or extra != "link"


@pytest.mark.parametrize("folders", [["1", "2"], ["0/mask", "1/probabilities"], ["_segpipe"]])
def test_folders_alone_named_like_a_results_are_no_debris(tmp_path, folders):
    """A user's folder of empty subfolders named as a result's levels (1/, 2/) passed for the
    leftovers of late chunk writes and was deleted by a run writing there: no chunk and no
    chunk folder, no debris. It is refused as any other folder that is not a result."""
    path = tmp_path / "out"
    for folder in folders:
        (path / folder).mkdir(parents=True)
    with pytest.raises(ResultMismatchError, match="not a segpipe result"):
        prepare_result(path, meta(), overwrite=True)
    with pytest.raises(ResultMismatchError, match="not a segpipe result"):
        delete_result(path)
    assert all((path / folder).is_dir() for folder in folders)


@pytest.mark.parametrize(
    ("settings", "match"),
    [
        # A chunk is padded to its whole size: 2 classes x 10⁶² px float16 is 3.6 TiB.
        ({"tile": 1_000_000}, r"tile 1000000 px \(--tile\) makes result chunks of 3,725"),
        ({"tile": 16_384, "probability_dtype": "float32"}, r"chunks of 2\.0 GiB"),
        ({"task_tiles": 1_000_000}, r"task_tiles 1000000 \(--task-tiles\) is more than 2048"),
    ],
)
def test_tiles_no_store_can_hold_are_refused_before_anything_is_made(tmp_path, settings, match):
    """They failed after the model ran, allocating terabytes (a MemoryError traceback)."""
    with pytest.raises(ValueError, match=match):
        prepare_result(tmp_path / "r.zarr", meta(**settings))
    assert list(tmp_path.iterdir()) == []
    prepare_result(tmp_path / "ok.zarr", meta(tile=16_384, probability_dtype="float16"))


def test_a_result_whose_class_names_were_edited_to_fewer_than_it_counts_is_refused(tmp_path):
    """Two names for three counted classes: info dropped a class (its fractions summed to
    96%) and an export failed in numpy, naming nothing."""
    path = tmp_path / "r.zarr"
    prepare_result(path, meta(class_names=("bg", "fg", "x")))
    mark_tiles_done(path, {(0, 0): np.array([5, 6, 1])})
    finish(path)
    assert read_meta(path).summary.class_pixels[:3] == (5, 6, 1)
    root = path / "zarr.json"
    stored = json.loads(root.read_text())
    stored["attributes"]["segpipe"]["identity"]["class_names"] = ["bg", "fg"]
    root.write_text(json.dumps(stored))
    with pytest.raises(ValueError, match=rf"^{path}: .*class_pixels counts 3 classes, not 2"):
        read_meta(path)


def test_a_result_on_an_older_releases_grid_keeps_it_for_new_labels_and_areas(tmp_path):
    """A result without a pixel size segmented at source level 1 was, before, in its own
    pixels (x 0, 1, 2..., OME scale 1); now source level-0 pixels (x 0.5, 2.5..., scale 2).
    One made before: its reader's step came from today's grid (2), against its own x, and a
    label added on resuming it (the foreground) got today's OME scale beside its image's 1."""
    from segpipe.results import open_result
    from segpipe.results.labels import add_label_image

    path = tmp_path / "r.zarr"
    m = meta(pixel_size_um=None, source_shape=(200, 140), level=1)
    prepare_result(path, m)
    root = zarr.open_group(path, mode="r+")
    ome = root.attrs["ome"]
    level0 = ome["multiscales"][0]["datasets"][0]["coordinateTransformations"]
    assert level0 == [
        {"type": "scale", "scale": [1.0, 2.0, 2.0]},
        {"type": "translation", "translation": [0.0, 0.5, 0.5]},
    ]
    # As the older release wrote it: its own pixels.
    ome["multiscales"][0]["datasets"][0]["coordinateTransformations"] = [
        {"type": "scale", "scale": [1.0, 1.0, 1.0]}
    ]
    root.attrs["ome"] = ome
    for dim, n in (("y", 100), ("x", 70)):
        coordinate = zarr.open_array(path / "0" / dim, mode="r+")
        coordinate[:] = np.arange(n, dtype=coordinate.dtype)
        coordinate.attrs.pop("step", None)  # as results stored before the step attribute
    add_label_image(path, "extra", ["none", "some"], long_name="extra")
    extra = zarr.open_group(path / "labels" / "extra", mode="r").attrs["ome"]["multiscales"][0]
    assert extra["datasets"][0]["coordinateTransformations"] == [
        {"type": "scale", "scale": [1.0, 1.0]}
    ]
    x = open_result(path, allow_incomplete=True)["x"]
    assert x.values[:2].tolist() == [0.0, 1.0] and x.attrs["step"] == 1.0


@pytest.mark.parametrize("seed", range(4))
def test_mode_2x_of_labels_up_to_16_is_the_most_frequent_value(seed):
    """A label of 16 (a model of 17 classes) does not fit the lookup table's 4-bit nibbles:
    packed, it spills into the next pixel's, and [[16, 16], [16, 3]] would read as 1."""
    from segpipe.results.pyramid import mode_2x

    labels = np.random.default_rng(seed).integers(0, 17, (8, 8)).astype(np.uint8)
    labels[:2, :2] = [[16, 16], [16, 3]]
    np.testing.assert_array_equal(mode_2x(labels), brute_mode_2x(labels))
    assert mode_2x(labels)[0, 0] == 16


def test_the_pyramid_pass_writes_each_shard_of_each_array_once(tmp_path, monkeypatch):
    from segpipe.results import pyramid

    m = meta(shape=(200, 140), tile=16, task_tiles=2, min_level_size=16)
    assert levels_in_blocks(m) == 1
    path = tmp_path / "r.zarr"
    prepare_result(path, m)
    probs = random_probabilities(m.shape, seed=4)
    for block in tile_grid(m.shape, m.tile).blocks(2):
        box = Box(block[0].box.y0, block[-1].box.y1, block[0].box.x0, block[-1].box.x1)
        write_block(path, box, probs[(slice(None), *box.slices)])
    written = Counter()
    write_together = pyramid.write_together

    def spy(writes, **kw):
        written.update((a.path, repr(sel)) for a, sel, _ in writes)
        return write_together(writes, **kw)

    monkeypatch.setattr(pyramid, "write_together", spy)
    pyramid.build_pyramid(path, threads=2)
    assert written and {p.split("/")[0] for p, _ in written} >= {"2", "labels"}
    assert max(written.values()) == 1, [w for w, n in written.items() if n > 1][:3]


def test_a_result_in_a_folder_taking_no_files_is_refused_naming_it(tmp_path, monkeypatch):
    """A read-only folder's error named the hidden copy built beside the result
    (".r.zarr.creating-501de36441a0: Permission denied"), a path the user never gave."""
    import segpipe.atomic as atomic

    def read_only(*args, **kwargs):
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(atomic.tempfile, "TemporaryFile", read_only)
    path = tmp_path / "r.zarr"
    with pytest.raises(OSError, match="takes no new files") as raised:
        prepare_result(path, meta())
    assert raised.value.filename == str(path) and "creating" not in str(raised.value)
    assert list(tmp_path.iterdir()) == []
