"""The locks of local stores (segpipe.io.locks): a writer excludes everyone, readers share; an
ingest writes its store under one, and a run segmenting an ingested image reads under one."""

import json
import os
import re
import socket
from pathlib import Path

import numpy as np
import pytest
import tifffile

import segpipe
from segpipe.io.ingest import ingest, ingested_image
from segpipe.io.locks import StoreBusyError, lock_path, store_lock
from segpipe.io.readers import open_image
from segpipe.results import ResultBusyError, result_lock


def test_readers_share_a_lock_and_a_writer_excludes_them(tmp_path):
    path = tmp_path / "s.zarr"
    reading = pytest.raises(StoreBusyError, match=r", reading it: another run in this process")
    # two readers, then a writer
    with store_lock(path, shared=True), store_lock(path, shared=True), reading, store_lock(path):
        pass
    writing = pytest.raises(StoreBusyError, match=r", writing it: another run in this process")
    with store_lock(path), writing, store_lock(path, shared=True):
        pass
    with store_lock(path), store_lock(tmp_path / "other.zarr"):  # released; others apart
        pass


def test_the_busy_message_names_the_store_the_holder_and_what_a_kill_leaves(
    tmp_path, held_elsewhere
):
    path = tmp_path / "s.zarr"
    holder = held_elsewhere(path, shared=True)
    with pytest.raises(ResultBusyError) as raised, result_lock(path):
        pass
    message = str(raised.value)
    for part in (str(path), f"pid {holder.pid} ", "reading it", str(lock_path(path))):
        assert part in message, message
    assert message.endswith("releases the lock at once, and its result resumes)"), message
    with store_lock(path, shared=True):  # another reader: shares it
        pass
    assert json.loads(lock_path(path).read_text())["use"] == "reading"


def _tiff(path: Path, seed: int = 0) -> Path:
    img = np.random.default_rng(seed).integers(0, 256, (96, 130, 3), dtype=np.uint8)
    tifffile.imwrite(path, img, photometric="rgb")
    return path


@pytest.mark.parametrize("call", ["ingest", "ingested_image"])
def test_an_ingest_into_a_store_another_run_writes_stops_before_touching_it(
    tmp_path, held_elsewhere, call
):
    """Run A's unfinished ingest stays as it is while A holds its lock (B, asked to replace
    it, used to rename it aside and write its own copy under A's feet); once A is gone, B
    redoes it."""
    src, out = _tiff(tmp_path / "a.tif"), tmp_path / "a.ome.zarr"
    ingest(src, out)
    root = json.loads((out / "zarr.json").read_text())
    root["attributes"]["segpipe"]["complete"] = False  # A's, still being written
    (out / "zarr.json").write_text(json.dumps(root))
    before = sorted(p.relative_to(out).as_posix() for p in out.rglob("*"))
    inode = out.stat().st_ino

    holder = held_elsewhere(out)
    again = {
        "ingest": lambda: ingest(src, out, overwrite=True),
        "ingested_image": lambda: ingested_image(src, out),
    }[call]
    with pytest.raises(StoreBusyError, match=f"pid {holder.pid} .*, writing it.*unfinished"):
        again()
    assert out.stat().st_ino == inode
    assert sorted(p.relative_to(out).as_posix() for p in out.rglob("*")) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == [".a.ome.zarr.lock", "a.ome.zarr", "a.tif"]
    holder.kill()
    holder.wait()
    again()
    reader = open_image(out)  # a complete ingest again
    np.testing.assert_array_equal(reader.read(0, 96, 0, 130), tifffile.imread(src))
    reader.close()


def test_an_image_a_run_segments_is_not_replaced_and_one_being_ingested_is_not_read(
    tmp_path, held_elsewhere, random_checkpoint
):
    src, image = _tiff(tmp_path / "a.tif"), tmp_path / "a.ome.zarr"
    ingest(src, image)
    settings = {"tile": 64, "task_tiles": 1, "foreground": "none", "scheduler": "sync"}

    reader = held_elsewhere(image, shared=True)  # a run segmenting it, elsewhere
    with pytest.raises(StoreBusyError, match=f"pid {reader.pid} .*, reading it"):
        ingest(_tiff(tmp_path / "b.tif", seed=1), image, overwrite=True)
    out = segpipe.segment(image, tmp_path / "r.seg.zarr", random_checkpoint, **settings)
    assert segpipe.open_result(out).mask.shape == (96, 130), "readers share the image"
    reader.kill()
    reader.wait()

    writer = held_elsewhere(image)  # an ingest into it, elsewhere
    with pytest.raises(StoreBusyError, match=f"pid {writer.pid} .*, writing it"):
        segpipe.segment(image, tmp_path / "r2.seg.zarr", random_checkpoint, **settings)
    assert not (tmp_path / "r2.seg.zarr").exists()


def test_segmenting_a_file_that_is_no_ingest_leaves_no_lock_beside_it(tmp_path, random_checkpoint):
    src = _tiff(tmp_path / "a.tif")
    settings = {"tile": 64, "task_tiles": 1, "foreground": "none", "scheduler": "sync"}
    segpipe.segment(src, tmp_path / "out" / "r.seg.zarr", random_checkpoint, **settings)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.tif", "out"]


@pytest.mark.parametrize(("size", "most"), [(232, None), (233, 232), (250, 249)])
def test_a_store_name_too_long_for_its_hidden_siblings_is_refused_before_anything(
    tmp_path, random_checkpoint, size, most
):
    """A legal 250-byte output name failed with ".NAME.lock: File name too long", naming a
    file the user never typed (240 bytes: at ".NAME.creating-...", its lock file left). Each
    hidden file checks its own room: the lock 6 bytes, a result's skeleton 23."""
    src = _tiff(tmp_path / "a.tif")
    out = tmp_path / ("r" * (size - 9) + ".seg.zarr")
    settings = {"tile": 64, "task_tiles": 1, "foreground": "none", "scheduler": "sync"}
    if most is None:
        segpipe.segment(src, out, random_checkpoint, **settings)
        assert lock_path(out).exists()
        return
    with pytest.raises(ValueError, match=rf"{out}: its name is {size} bytes.* at most {most}"):
        segpipe.segment(src, out, random_checkpoint, **settings)
    assert sorted(p.name for p in tmp_path.iterdir() if not p.name.endswith(".lock")) == ["a.tif"]


def test_a_long_name_needing_only_a_lock_beside_it_is_written(tmp_path):
    """A 235-byte TIFF name needs only .NAME.lock (241 bytes): it was refused by the limit
    made for a result's longer siblings."""
    from segpipe.io.writers import write_pyramidal_tiff

    out = tmp_path / ("t" * 227 + ".ome.tif")
    write_pyramidal_tiff(out, np.zeros((64, 64, 3), np.uint8), pixel_size_um=0.5, tile=64)
    assert open_image(out).shape == (64, 64, 3)


def test_a_holder_record_shorter_than_the_last_ones_replaces_it_whole(tmp_path):
    """Lock files stay beside stores, so a run's record is written over an earlier run's; a
    shorter one left the older one's tail, the file was no JSON, and the busy message named
    "a run that has not written who it is yet" instead of the holder."""
    path = tmp_path / "s.zarr"
    earlier = {
        "pid": 4194303,
        "host": "a-host-name-longer-than-any-linux-allows-" + "x" * 40,  # HOST_NAME_MAX 64
        "since": "2026-01-01T00:00:00+00:00",
        "use": "writing",
    }
    lock_path(path).write_text(json.dumps(earlier))
    with store_lock(path, shared=True):
        record = json.loads(lock_path(path).read_text())
        assert record["pid"] == os.getpid() and record["host"] == socket.gethostname()
        assert record["use"] == "reading"
        holder = rf"pid {os.getpid()} on {re.escape(socket.gethostname())}, since .*, reading it"
        with pytest.raises(StoreBusyError, match=holder), store_lock(path):
            pass


def test_a_store_below_a_file_is_refused_naming_the_file(tmp_path):
    """``afile/out.zarr``, where ``afile`` is a file: Python's "File exists" named the path
    but not the problem."""
    (tmp_path / "afile").write_text("x")
    source = tmp_path / "in.tif"
    tifffile.imwrite(source, np.zeros((40, 50, 3), np.uint8), photometric="rgb")
    with pytest.raises(NotADirectoryError, match="a file, where the output's folder") as err:
        ingest(source, tmp_path / "afile" / "out.zarr")
    assert err.value.filename == str(tmp_path / "afile")
    assert (tmp_path / "afile").read_text() == "x"
