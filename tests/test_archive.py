"""segpipe.archive (discover, state, claims, process): discovery, fingerprints, decisions,
claims, and one image start to finish."""

import concurrent.futures
import hashlib
import json
import multiprocessing
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
import uuid
from concurrent.futures import ProcessPoolExecutor, ThreadPoolExecutor
from datetime import UTC, datetime
from pathlib import Path

import fsspec
import pytest
import xarray as xr
from distributed.client import FutureCancelledError
from fsspec.implementations.memory import MemoryFileSystem

import segpipe.archive.process as archive_process
import segpipe.archive.watch as archive_watch
from segpipe import archive
from segpipe.archive import (
    ArchiveImage,
    Fingerprint,
    catalog,
    decide,
    discover_images,
    fingerprint_image,
    image_paths,
    process_image,
)
from segpipe.archive.claims import ClaimLostError, read_lock, try_claim
from segpipe.archive.sidecars import undecided_state
from segpipe.archive.state import MAX_KILLED_ATTEMPTS, decide_unreadable, retry_delay_s
from segpipe.config import SegmentConfig
from segpipe.results import (
    DamagedResultError,
    is_complete,
    open_result,
    read_meta,
    result_levels,
    tiles_done,
)

CONFIG = SegmentConfig(tile=64, scheduler="sync")


@pytest.fixture(scope="module")
def slide(tmp_path_factory):
    from segpipe.synthetic.demo import make_demo_slide

    return make_demo_slide(tmp_path_factory.mktemp("slide"), size=128, seed=3).image


def _touch(path, data=b"x", mtime=None):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    if mtime is not None:
        os.utime(path, (mtime, mtime))


# -- discovery -----------------------------------------------------------------------------


def test_discover_finds_images_recursively_by_key_and_leaves_the_rest(tmp_path):
    for name in ["b.svs", "day-1/a.tif", "day-1/deep/c.PNG", "notes.txt", ".hidden/d.tif"]:
        _touch(tmp_path / "archive" / name)
    _touch(tmp_path / "archive" / "out" / "x.thumb.png")
    found = discover_images(tmp_path / "archive", exclude=tmp_path / "archive" / "out")
    assert [i.key for i in found] == ["b.svs", "day-1/a.tif", "day-1/deep/c.PNG"]
    assert found[1].url == str(tmp_path / "archive" / "day-1" / "a.tif")
    assert found[1].size == 1
    assert [i.key for i in discover_images(tmp_path / "archive", pattern="day-1/*.tif")] == [
        "day-1/a.tif"
    ]


@pytest.mark.parametrize(
    ("pattern", "keys"),
    [
        ("c*", ["c.svs", "day-1/c-2.tif"]),  # a name alone, in any folder
        ("*.tif", ["day-1/a.tif", "day-1/c-2.tif"]),
        ("day-1/c*", ["day-1/c-2.tif"]),  # with a /: the path under the archive
        ("day-*", ["day-1/a.tif", "day-1/c-2.tif"]),  # a folder's prefix: * crosses folders
        ("a", []),
    ],
)
def test_a_pattern_matches_a_files_path_or_its_name_alone(tmp_path, pattern, keys):
    """The CLI's --pattern is "a file name glob": 'c*' found nothing in a dated folder."""
    for name in ["c.svs", "day-1/a.tif", "day-1/c-2.tif"]:
        _touch(tmp_path / name)
    assert [i.key for i in discover_images(tmp_path, pattern=pattern)] == keys


def test_discover_leaves_files_still_being_written(tmp_path):
    _touch(tmp_path / "old.tif", mtime=time.time() - 3600)
    _touch(tmp_path / "new.tif")
    assert [i.key for i in discover_images(tmp_path, min_age_s=60)] == ["old.tif"]


def test_discover_leaves_out_a_name_that_is_not_utf8_and_says_so(tmp_path, caplog):
    """Such a name (Latin-1 bytes from an old share) failed the whole archive run: its key
    could be written to no log, catalog or Prefect artifact, the other images' reports too."""
    _touch(tmp_path / "good.tif")
    folder = os.fsencode(tmp_path)
    with open(folder + b"/caf\xe9.tif", "wb") as f:
        f.write(b"x")
    os.mkdir(folder + b"/d\xfcr")
    with open(folder + b"/d\xfcr/inside.tif", "wb") as f:
        f.write(b"x")
    with caplog.at_level("WARNING", logger="segpipe.archive"):
        found = discover_images(tmp_path)
    assert [i.key for i in found] == ["good.tif"]
    said = "\n".join(r.getMessage() for r in caplog.records)
    assert "caf\\xe9.tif: its name is not UTF-8" in said
    assert "d\\xfcr/inside.tif: its name is not UTF-8" in said
    said.encode("utf-8")  # printable by any handler


def test_discover_refuses_a_missing_folder(tmp_path):
    with pytest.raises(FileNotFoundError, match="nowhere"):
        discover_images(tmp_path / "nowhere")


def test_discover_and_fingerprint_through_fsspec():
    fs = fsspec.filesystem("memory")
    fs.pipe("/scans-test/day-1/a.tif", b"abc" * 1000)
    try:
        (image,) = discover_images("memory://scans-test")
        assert image.key == "day-1/a.tif"
        assert image.url == "memory:///scans-test/day-1/a.tif"
        assert fingerprint_image(image).size == 3000
    finally:
        fs.rm("/scans-test", recursive=True)


def _memory_archive(files):
    """A remote (fsspec memory) archive of ``files`` (names under it), at a fresh URL."""
    root = f"memory://scans-{uuid.uuid4().hex}"
    fsspec.filesystem("memory").pipe({f"{root}/{name}": b"x" for name in files})
    return root


def test_discover_ignores_hidden_files_and_folders_in_a_remote_archive_too():
    """Hidden entries (a snapshot folder, a sync tool's temporary files) are no images on a
    store either: a ".snapshot" folder, a sync tool's partial file would be segmented too."""
    root = _memory_archive(["b.tif", ".snapshot/old.tif", ".c.tif", "day-1/.partial.tif"])
    try:
        assert [i.key for i in discover_images(root)] == ["b.tif"]
    finally:
        fsspec.filesystem("memory").rm(root, recursive=True)


def test_discover_excludes_an_output_root_inside_a_remote_archive():
    """The output root inside a bucket's archive holds thumbnails (PNGs, an image suffix):
    left out as it is locally, or every run would find its own outputs as new images."""
    root = _memory_archive(["b.tif", "out/b.tif.thumb.png", "outside/c.tif"])
    try:
        found = discover_images(root, exclude=f"{root}/out")
        assert [i.key for i in found] == ["b.tif", "outside/c.tif"]
    finally:
        fsspec.filesystem("memory").rm(root, recursive=True)


def test_discover_follows_symlinked_files_and_folders_without_looping(tmp_path):
    _touch(tmp_path / "archive" / "a.svs")
    _touch(tmp_path / "elsewhere" / "b.svs")
    os.symlink(tmp_path / "elsewhere", tmp_path / "archive" / "day-2")
    os.symlink(tmp_path / "elsewhere" / "b.svs", tmp_path / "archive" / "c.svs")
    os.symlink(tmp_path / "archive", tmp_path / "archive" / "day-2-loop")  # a link loop
    os.symlink(tmp_path / "gone.svs", tmp_path / "archive" / "dangling.svs")
    found = discover_images(tmp_path / "archive")
    assert [i.key for i in found] == ["a.svs", "c.svs", "day-2/b.svs"]
    assert found[2].url == str(tmp_path / "archive" / "day-2" / "b.svs")
    assert found[1].size == 1


def test_discover_excludes_output_root_however_it_is_spelled(tmp_path):
    _touch(tmp_path / "archive" / "a.svs")
    _touch(tmp_path / "archive" / "out" / "a.svs.thumb.png")
    _touch(tmp_path / "archive" / "outside" / "b.svs")  # shares a prefix with "out" only
    os.symlink(tmp_path / "archive", tmp_path / "link")
    expected = ["a.svs", "outside/b.svs"]
    for source, exclude in [
        (tmp_path / "link", tmp_path / "archive" / "out"),
        (tmp_path / "archive", tmp_path / "link" / "out"),
        (tmp_path / "archive", str(tmp_path / "archive" / "out") + "/"),
    ]:
        assert [i.key for i in discover_images(source, exclude=exclude)] == expected, exclude


@pytest.mark.parametrize("spelling", ["archive", ".", "link"])
def test_discover_refuses_an_output_root_that_is_or_holds_the_archive(tmp_path, spelling):
    _touch(tmp_path / "archive" / "a.svs")
    os.symlink(tmp_path / "archive", tmp_path / "link")
    exclude = tmp_path / spelling
    with pytest.raises(ValueError, match="is the archive") as err:
        discover_images(tmp_path / "archive", exclude=exclude)
    assert str(exclude) in str(err.value) and str(tmp_path / "archive") in str(err.value)


# -- fingerprints --------------------------------------------------------------------------


def _image(path):
    stat = path.stat()
    return ArchiveImage(str(path), path.name, stat.st_size, stat.st_mtime)


def test_fingerprint_reads_only_sampled_blocks_and_sees_changes_in_them(tmp_path):
    path = tmp_path / "big.tif"
    data = bytearray(os.urandom(1_000_000))
    _touch(path, bytes(data), mtime=1e9)
    base = fingerprint_image(_image(path), blocks=4, block_bytes=1000)
    assert base == fingerprint_image(_image(path), blocks=4, block_bytes=1000)

    data[500] ^= 0xFF  # inside the first sampled block
    _touch(path, bytes(data), mtime=1e9)
    changed = fingerprint_image(_image(path), blocks=4, block_bytes=1000)
    assert changed.sample_sha256 != base.sample_sha256
    assert (changed.size, changed.mtime) == (base.size, base.mtime)

    data[500] ^= 0xFF
    data[400_000] ^= 0xFF  # between the sampled blocks: only the mtime tells
    _touch(path, bytes(data), mtime=2e9)
    between = fingerprint_image(_image(path), blocks=4, block_bytes=1000)
    assert between.sample_sha256 == base.sample_sha256
    assert between != base


@pytest.mark.parametrize(("blocks", "block_bytes"), [(1, 1000), (0, 1000), (4, 0)])
def test_a_fingerprint_that_cannot_sample_both_ends_is_refused(tmp_path, blocks, block_bytes):
    """One block divided by zero; none, or empty ones, hashed the size alone."""
    path = tmp_path / "big.tif"
    _touch(path, os.urandom(10_000), mtime=1e9)
    with pytest.raises(ValueError, match=r"blocks must be >= 2 and block_bytes >= 1"):
        fingerprint_image(_image(path), blocks=blocks, block_bytes=block_bytes)


def test_small_files_are_hashed_whole(tmp_path):
    import hashlib

    _touch(tmp_path / "a.tif", b"hello", mtime=5.0)
    fp = fingerprint_image(_image(tmp_path / "a.tif"))
    assert fp == Fingerprint(5, 5.0, hashlib.sha256(b"5\nhello").hexdigest())


def test_the_fingerprint_reads_past_a_listing_cache(tmp_path, monkeypatch):
    """s3fs answers ``info`` from the listing discovery cached: the fingerprint taken after
    segmenting must see a file changed since, so it asks the store again."""
    from fsspec.implementations.local import LocalFileSystem

    from segpipe.archive import discover

    path = tmp_path / "a.tif"
    _touch(path, b"hello", mtime=5.0)
    image = _image(path)

    class ListingCached(LocalFileSystem):
        cachable = False  # fsspec's instance cache: a fresh listing for this test

        def __init__(self):
            super().__init__()
            self.listing = {str(path): super().info(str(path))}

        def info(self, p, **kwargs):
            return self.listing.get(p) or super().info(p, **kwargs)

        def invalidate_cache(self, p=None):
            self.listing.clear()

    fs = ListingCached()
    _touch(path, b"hello, world", mtime=6.0)
    monkeypatch.setattr(discover, "filesystem", lambda url, options: (fs, str(path)))
    fp = fingerprint_image(image)
    assert (fp.size, fp.mtime) == (12, 6.0)


# -- paths and decisions -------------------------------------------------------------------


def test_image_paths_derive_from_the_key(tmp_path):
    paths = image_paths(tmp_path, "day-1/a.svs")
    assert paths.result == tmp_path / "day-1" / "a.svs.seg.zarr"
    assert paths.state == tmp_path / "day-1" / "a.svs.seg.json"
    assert paths.thumbnail == tmp_path / "day-1" / "a.svs.thumb.png"
    assert paths.lock == tmp_path / "day-1" / "a.svs.lock"
    assert image_paths(tmp_path, "a.tif").result != image_paths(tmp_path, "a.svs").result


@pytest.mark.parametrize("key", ["../a.tif", "/etc/a.tif", "a/../../b.tif", ""])
def test_image_paths_refuse_keys_leaving_the_root(tmp_path, key):
    with pytest.raises(ValueError, match="relative path"):
        image_paths(tmp_path, key)


def test_decide_says_why_an_image_is_due(tmp_path):
    paths = image_paths(tmp_path, "a.tif")
    fp = Fingerprint(10, 1.0, "abc")
    assert decide(paths, fp, "m1", CONFIG).reason == "new image"
    state = {"fingerprint": fp.as_dict(), "model_sha256": "m1", "params": CONFIG.result_settings()}
    paths.state.write_text(json.dumps(state | {"status": "failed"}))  # no time: due now
    once_failed = archive.Decision(True, "previous run failed", failures=1)
    assert decide(paths, fp, "m1", CONFIG) == once_failed
    assert decide(paths, Fingerprint(11, 1.0, "abc"), "m1", CONFIG).reason == "image changed"
    assert decide(paths, fp, "m2", CONFIG.replace(tile=128)).reason == (
        "model changed, parameters changed"
    )
    # Execution settings never make an image due (every setting: tests/test_config.py).
    faster = CONFIG.replace(batch_size=16, device="cpu", n_workers=8, scheduler=None)
    assert decide(paths, fp, "m1", faster) == once_failed


def test_a_complete_result_replaced_by_another_models_run_is_due(tmp_path):
    """The sidecar says complete with model m; the result at its path was since made by
    another model (segment --overwrite into the archive's output): not up to date."""
    import numpy as np
    from test_query import make_result

    paths = image_paths(tmp_path, "a.tif")
    fp, made_by = Fingerprint(10, 1.0, "abc"), "0" * 64  # make_result's model
    make_result(paths.result, np.zeros((16, 16), np.uint8), classes=("bg", "fg"))
    config = CONFIG.replace(tile=16)
    for model, reason in ((made_by, "up to date"), ("m1", "result made by another model")):
        state = {"fingerprint": fp.as_dict(), "model_sha256": model, "status": "complete"}
        paths.state.write_text(json.dumps(state | {"params": config.result_settings()}))
        assert decide(paths, fp, model, config).reason == reason


def test_an_edited_foreground_mask_file_makes_an_image_due(tmp_path):
    """A mask file's contents are part of a result's identity, as ``segment`` keeps them: the
    archive recorded its path alone, and left a result made with the old mask up to date."""
    from segpipe.archive.state import state_params

    paths = image_paths(tmp_path, "a.tif")
    fp = Fingerprint(10, 1.0, "abc")
    mask = tmp_path / "mask.png"
    mask.write_bytes(b"one mask")
    config = CONFIG.replace(foreground=str(mask))
    state = {"fingerprint": fp.as_dict(), "model_sha256": "m1", "params": state_params(config)}
    paths.state.write_text(json.dumps(state | {"status": "failed"}))
    assert decide(paths, fp, "m1", config).reason == "previous run failed"
    mask.write_bytes(b"another mask")
    assert decide(paths, fp, "m1", config).reason == "parameters changed"


def test_a_sidecar_from_before_segment_config_still_matches(tmp_path):
    """Sidecars written before SegmentConfig recorded only the settings there were; the others
    ran with their defaults, so an image with such a sidecar is not due again."""
    paths = image_paths(tmp_path, "a.tif")
    fp = Fingerprint(10, 1.0, "abc")
    old_params = {
        "tile": 64,
        "mode": "exact",
        "level": 0,
        "pixel_size_um": None,
        "probability_dtype": "float16",
        "window": None,
        "overlap": 0.25,
        "sigma_scale": 0.125,
    }
    state = {"fingerprint": fp.as_dict(), "model_sha256": "m1", "params": old_params}
    paths.state.write_text(json.dumps(state | {"status": "failed"}))
    assert decide(paths, fp, "m1", CONFIG).reason == "previous run failed"
    assert decide(paths, fp, "m1", CONFIG.replace(task_tiles=1)).reason == "parameters changed"


def test_a_sidecar_recording_level_0_since_version_2_matches_a_run_at_level_0(tmp_path):
    """Only sidecars before version 2 recorded level 0 for the default (now None); from
    version 2 on, level 0 is a run's own choice: a run at level 0 matches it, else every such
    image would be segmented again for nothing ("parameters changed") on every run."""
    from segpipe.archive.state import state_params

    paths = image_paths(tmp_path, "a.tif")
    fp = Fingerprint(10, 1.0, "abc")
    level_0 = CONFIG.replace(level=0)
    state = {"fingerprint": fp.as_dict(), "model_sha256": "m1", "status": "failed"}
    for version in (2, 3):
        paths.state.write_text(
            json.dumps(state | {"version": version, "params": state_params(level_0)})
        )
        assert decide(paths, fp, "m1", level_0).reason == "previous run failed"
        assert decide(paths, fp, "m1", CONFIG).reason == "parameters changed"


# -- claims --------------------------------------------------------------------------------


def test_claim_is_exclusive_until_released(tmp_path):
    lock = tmp_path / "sub" / "a.lock"
    first = try_claim(lock, owner="run-1")
    assert first is not None
    assert json.loads(lock.read_text())["owner"] == "run-1"
    assert try_claim(lock, owner="run-2") is None
    first.release()
    assert not lock.exists()
    with try_claim(lock, owner="run-2") as second:
        assert second.is_held()
    assert not lock.exists()


def test_claim_is_released_when_the_work_fails(tmp_path):
    lock = tmp_path / "a.lock"
    with pytest.raises(RuntimeError), try_claim(lock):
        raise RuntimeError("boom")
    assert not lock.exists()


def test_heartbeat_keeps_a_slow_claim_alive(tmp_path):
    lock = tmp_path / "a.lock"
    with try_claim(lock, ttl_s=0.4) as claim:
        time.sleep(1.0)  # well past the ttl, but heartbeats every 0.1 s
        assert try_claim(lock, ttl_s=0.4) is None
        claim.check()


def _stale_lock(lock, owner="dead-run"):
    lock.write_text(json.dumps({"owner": owner, "token": "dead", "ttl_s": 1.0}))
    os.utime(lock, (time.time() - 60, time.time() - 60))


def test_a_stale_lock_is_reclaimed_and_its_owner_finds_out(tmp_path):
    lock = tmp_path / "a.lock"
    old = try_claim(lock, ttl_s=60)
    old._stop.set()  # the owner freezes: no more heartbeats
    old._thread.join()
    os.utime(lock, (time.time() - 120, time.time() - 120))
    new = try_claim(lock, owner="new")
    assert new is not None
    assert not old.is_held()
    with pytest.raises(ClaimLostError, match="no longer holds"):
        old.check()
    old.release()  # must not remove the new owner's lock
    assert new.is_held()
    new.release()


def _frozen_stale_claim(lock):
    """A claim whose owner froze (no more heartbeats) long enough for its lock to go stale."""
    claim = try_claim(lock, ttl_s=60)
    claim._stop.set()
    claim._thread.join()
    os.utime(lock, (time.time() - 120, time.time() - 120))
    return claim


def test_a_release_never_removes_the_lock_of_a_run_that_took_it_over_meanwhile(
    tmp_path, monkeypatch
):
    """The owner of a stale lock releases it just as another run takes it over: between the
    release's read of its token and its unlink. The new owner keeps its lock (or the takeover
    waits for the release), so no third run can claim the image beside it."""
    from segpipe.archive import claims

    lock = tmp_path / "a.lock"
    old = _frozen_stale_claim(lock)
    real_read, taken = claims.read_lock, []

    def takeover_after_the_first_read(path):
        data = real_read(path)
        if not taken:  # the release's read: another run takes over right after it
            taken.append(None)
            taken[0] = try_claim(lock, owner="new")
        return data

    monkeypatch.setattr(claims, "read_lock", takeover_after_the_first_read)
    old.release()
    monkeypatch.undo()
    (new,) = taken
    if new is None:  # the release held the takeover off, then removed its own lock
        assert not lock.exists()
    else:
        assert new.is_held(), "the release removed the new owner's lock"
        assert try_claim(lock, owner="third") is None
        new.release()
    assert not list(tmp_path.glob("*.reclaim-*"))


def test_a_release_leaves_the_lock_while_another_claimer_holds_its_guard(tmp_path):
    """A claimer taking this lock's version over holds its guard: the owner's release removes
    nothing then, or its unlink could land after the takeover and delete the new owner's lock,
    letting a third run claim the image beside it."""
    from segpipe.archive import claims

    lock = tmp_path / "a.lock"
    claim = try_claim(lock, ttl_s=600)
    guard = claims._guard_path(lock, claim.token)
    with claims._guard(lock, claim.token) as guarded:  # another claimer's, under way
        assert guarded and guard.exists()
        claim.release()
        assert lock.exists() and read_lock(lock)["token"] == claim.token
    assert not guard.exists()


def test_a_claim_killed_holding_its_guard_is_reclaimed_at_once(tmp_path):
    """SIGKILL inside release, its guard file taken: the lock's pid and the guard's holder are
    gone, yet the image stayed busy for the lock's whole ttl (the guard's age counted alone)."""
    lock = tmp_path / "a.svs.lock"
    code = f"""
import os, signal
import segpipe.archive.claims as claims
claim = claims.try_claim({str(lock)!r}, ttl_s=600)
claims._lock_token = lambda path: os.kill(os.getpid(), signal.SIGKILL)  # under the guard
claim.release()
"""
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, timeout=120)
    assert done.returncode == -signal.SIGKILL
    assert lock.exists() and len(list(tmp_path.glob("*.reclaim-*"))) == 1
    with try_claim(lock, ttl_s=600, owner="next") as claim:
        assert claim is not None and claim.is_held()
    assert not list(tmp_path.glob("*.reclaim-*"))


def test_the_lock_of_an_image_of_a_long_name_is_released_and_reclaimed(tmp_path):
    """A lock named for an image of 220 bytes: its guard, ``<lock>.reclaim-<32 hex>``, was too
    long for the file system, so no release removed the lock and no claim could reclaim it
    once its claimer had died (ENAMETOOLONG on every run)."""
    lock = tmp_path / ("a" * 215 + ".svs.lock")
    with try_claim(lock, ttl_s=600) as claim:
        assert claim is not None
    assert not lock.exists()
    code = f"""
import os, signal
import segpipe.archive.claims as claims
claims.try_claim({str(lock)!r}, ttl_s=600)
os.kill(os.getpid(), signal.SIGKILL)
"""
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, timeout=120)
    assert done.returncode == -signal.SIGKILL and lock.exists()
    with try_claim(lock, ttl_s=600, owner="next") as claim:
        assert claim is not None and claim.is_held()
    assert not lock.exists() and not list(tmp_path.glob("*.reclaim-*"))


@pytest.mark.parametrize("at", ["write", "link", "unlink"])
def test_a_claimer_killed_creating_its_lock_leaves_the_image_free_at_once(tmp_path, at):
    """SIGKILL between creating the lock and writing its record left an empty lock, which no
    one can tell from one being written: the next run found the image "claimed by another
    run" for the claimer's whole ttl (600 s). Now killed while the record is written beside,
    before it is linked into place, or after: the next run claims it at once, and removes
    the copy the killed claimer left beside it (which nothing removed)."""
    lock = tmp_path / "a.svs.lock"
    code = f"""
import os, signal
import segpipe.archive.claims as claims
real = getattr(os, {at!r})
def killed(*args, **kwargs):
    if any(str(a).endswith(".part") for a in args) or {at!r} == "write":
        os.kill(os.getpid(), signal.SIGKILL)
    return real(*args, **kwargs)
setattr(claims.os, {at!r}, killed)
claims.try_claim({str(lock)!r}, ttl_s=600)
"""
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, timeout=120)
    assert done.returncode == -signal.SIGKILL, done.stderr.decode()[-500:]
    assert len(list(tmp_path.glob(".*.part"))) == 1
    with try_claim(lock, ttl_s=600, owner="next") as claim:
        assert claim is not None and claim.is_held()
    assert not list(tmp_path.glob(".*")), "a killed claimer's copy left beside the lock"


@pytest.mark.parametrize("namespace", ["this", "other", "unrecorded", "earlier-boot"])
def test_a_claim_of_a_dead_pid_is_stale_at_once_only_in_its_own_pid_namespace(tmp_path, namespace):
    """A container sharing the host name (host networking) numbers its processes apart: a
    live run's pid, gone here, let another container take its claim at once. A claim of an
    earlier boot of this machine is taken at once (its first version waited for the ttl)."""
    import json
    import socket

    from segpipe.atomic import pid_namespace

    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    lock = tmp_path / "a.svs.lock"
    boot, _, inode = (pid_namespace() or "boot:1").rpartition(":")
    recorded = {
        "this": pid_namespace(),
        "other": f"{boot}:{int(inode) + 1}",  # another container's, this boot
        "earlier-boot": f"another-boot:{inode}",  # every process of it is gone
        "unrecorded": None,
    }
    record = {"owner": "a run", "token": "t", "host": socket.gethostname(), "pid": dead.pid}
    if namespace != "unrecorded":  # a claim of an older release: the host alone
        record["pidns"] = recorded[namespace]
    lock.write_text(json.dumps({**record, "acquired": "now", "ttl_s": 600}))
    claim = try_claim(lock, ttl_s=600, owner="next")
    assert (claim is not None) == (namespace != "other")
    if claim is not None:
        claim.release()


def test_a_lost_claim_leaves_the_lock_on_release(tmp_path):
    """A claim that counts itself lost (no heartbeat for its ttl) removes nothing: another run
    may be taking the lock over right now; a lock left behind goes stale and is reclaimed."""
    lock = tmp_path / "a.lock"
    claim = _frozen_stale_claim(lock)
    claim._lost = True  # as its heartbeat thread decides after a ttl of failed beats
    claim.release()
    assert lock.exists()
    with try_claim(lock, owner="next") as claim:
        assert claim is not None and claim.is_held()


@pytest.mark.parametrize("content", [b"", b'{"owner": "killed", "tok'], ids=["empty", "truncated"])
def test_an_unwritten_or_truncated_lock_goes_stale_after_the_ttl(tmp_path, content):
    # Its claimer died (or ran out of disk) between creating the lock and writing it.
    lock = tmp_path / "a.lock"
    lock.write_bytes(content)
    assert try_claim(lock, ttl_s=60) is None, "it may be being written right now"
    os.utime(lock, (0, 0))
    with try_claim(lock, ttl_s=1, owner="next") as claim:
        assert claim is not None and claim.is_held()
        assert json.loads(lock.read_text())["owner"] == "next"
    assert not list(tmp_path.glob("*.reclaim-*"))


class _ConditionalMemoryFS(MemoryFileSystem):
    """In memory, S3's conditional writes as object claims use them: a create refused where
    the key exists, a write or delete refused unless ``IfMatch`` is the object's ETag."""

    protocol = ("condmem", "s3")
    store: dict = {}  # noqa: RUF012 (fsspec's own layout: one store per class)
    pseudo_dirs = [""]  # noqa: RUF012

    @classmethod
    def _strip_protocol(cls, path):
        return super()._strip_protocol(str(path).removeprefix("condmem://"))

    def etag(self, path):
        return hashlib.md5(self.cat_file(path)).hexdigest()

    def pipe_file(self, path, value, mode="overwrite", IfMatch=None, **kwargs):
        if IfMatch is not None and (not self.exists(path) or self.etag(path) != IfMatch):
            raise OSError(f"{path}: precondition failed")
        super().pipe_file(path, value, mode=mode)
        return {"ETag": self.etag(path)}

    def info(self, path, **kwargs):
        info = super().info(path, **kwargs)
        return info | {"ETag": self.etag(path)} if info["type"] == "file" else info

    def call_s3(self, method, Bucket, Key, IfMatch):
        assert method == "delete_object"
        if self.etag(f"{Bucket}/{Key}") != IfMatch:
            raise OSError(f"{Bucket}/{Key}: precondition failed")
        self.rm_file(f"{Bucket}/{Key}")


@pytest.mark.parametrize("content", [b"", b"garbage", b'{"owner": "someone"}'])
def test_an_object_lock_without_a_token_goes_stale_after_the_ttl(content):
    """A lock object without a token (empty, garbage, a record without one) blocks its image
    only for the claimer's ttl, as a local lock file does, never for good."""
    fsspec.register_implementation("condmem", _ConditionalMemoryFS, clobber=True)
    fs = fsspec.filesystem("condmem")
    key = f"/claims-{uuid.uuid4().hex}/a.lock"
    url = f"condmem:/{key}"
    fs.pipe_file(key, content)
    assert try_claim(url, ttl_s=60) is None, "as young as its ttl: maybe a live claimer's"
    fs.store[key].created = datetime(2000, 1, 1, tzinfo=UTC)
    claim = try_claim(url, ttl_s=60, owner="next")
    assert claim is not None, "a token-less lock older than the ttl must be reclaimed"
    assert claim.is_held() and read_lock(url)["owner"] == "next"
    claim.release()
    assert not fs.exists(key)


def test_a_lock_whose_record_cannot_be_written_is_removed(tmp_path, monkeypatch):
    import errno

    def disk_full(fd):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "fsync", disk_full)
    with pytest.raises(OSError, match="No space"):
        try_claim(tmp_path / "a.lock")
    assert not (tmp_path / "a.lock").exists()


@pytest.mark.parametrize("ttl_s", [0, -1.0])
def test_a_claim_without_a_positive_ttl_is_refused(tmp_path, ttl_s):
    """A ttl of 0 makes the lock stale at once (any run takes it over while it is held) and
    its heartbeat thread spin without a pause: refused before a lock is made."""
    with pytest.raises(ValueError, match="ttl_s must be > 0 seconds"):
        try_claim(tmp_path / "a.lock", ttl_s=ttl_s)
    assert not (tmp_path / "a.lock").exists()


def test_a_release_that_cannot_take_its_guard_leaves_the_lock_and_the_works_error(
    tmp_path, monkeypatch
):
    """A full disk (or a read-only folder) refuses the release's guard file: the lock is left
    to go stale, and the caller sees the error of its work, not one of the release."""
    import errno

    lock, real_open = tmp_path / "a.lock", os.open

    def disk_full(path, *args, **kwargs):
        if ".reclaim-" in os.fspath(path) or os.fspath(path).endswith(".part"):
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_open(path, *args, **kwargs)

    def work(claim):
        with claim:
            monkeypatch.setattr(os, "open", disk_full)  # the disk fills up meanwhile
            raise ValueError("segmenting failed")

    with pytest.raises(ValueError, match="segmenting failed"):
        work(try_claim(lock, ttl_s=60))
    monkeypatch.undo()
    assert lock.exists() and not list(tmp_path.glob("*.reclaim-*"))


def _failing_reads(monkeypatch, times):
    """Make the claims' lock reads fail ``times`` times (ESTALE, as NFS says), then work."""
    from segpipe.archive import claims

    real, calls = claims.read_lock, []

    def flaky(path):
        calls.append(path)
        if len(calls) <= times:
            raise OSError(116, "Stale file handle")
        return real(path)

    monkeypatch.setattr(claims, "read_lock", flaky)
    return calls


def test_a_failed_heartbeat_is_retried(tmp_path, monkeypatch):
    lock = tmp_path / "a.lock"
    with try_claim(lock, ttl_s=1.0) as claim:
        calls = _failing_reads(monkeypatch, times=1)
        time.sleep(1.5)  # the failed beat, then good ones (every 0.25 s) past the ttl
        assert len(calls) > 2
        assert claim._thread.is_alive()
        assert time.time() - lock.stat().st_mtime < 1.0, "heartbeats went on"
        claim.check()


def test_a_claim_without_a_heartbeat_for_its_ttl_is_lost(tmp_path, monkeypatch):
    lock = tmp_path / "a.lock"
    with try_claim(lock, ttl_s=0.4) as claim:
        _failing_reads(monkeypatch, times=10**6)
        claim._thread.join(timeout=5)
        assert not claim._thread.is_alive()
        with pytest.raises(ClaimLostError):
            claim.check()
        monkeypatch.undo()


def test_a_claim_whose_heartbeats_all_fail_is_lost_after_one_ttl(tmp_path, monkeypatch):
    """Past its ttl without a heartbeat, another run may take the lock over: the claim counts
    itself lost then (at its first failed beat past the ttl), not only after twice that. The
    heartbeat thread's clock moves 0.3 ttl per reading, so no real time is waited for."""
    import types

    from segpipe.archive import claims

    ttl_s = 0.2
    readings = []

    def monotonic():
        readings.append(None)
        return len(readings) * 0.3 * ttl_s

    monkeypatch.setattr(claims, "time", types.SimpleNamespace(time=time.time, monotonic=monotonic))
    lock = tmp_path / "a.lock"
    calls = _failing_reads(monkeypatch, times=10**6)
    claim = try_claim(lock, ttl_s=ttl_s)
    claim._thread.join(timeout=30)
    assert not claim._thread.is_alive()
    # Failed beats at 0.3, 0.6, 0.9 and 1.2 ttl after the last good one: lost at the fourth.
    assert len(calls) == 4
    monkeypatch.undo()
    with pytest.raises(ClaimLostError):
        claim.check()
    claim.release()


def _claim_many(lock, n, barrier=None):
    def attempt(i):
        if barrier is not None:
            barrier.wait()
        claim = try_claim(lock, owner=f"claimer-{i}")
        return claim

    with ThreadPoolExecutor(n) as pool:
        return [c for c in pool.map(attempt, range(n)) if c is not None]


@pytest.mark.parametrize("stale", [False, True])
def test_concurrent_threads_never_both_win(tmp_path, stale):
    for round_ in range(20):
        lock = tmp_path / f"round-{round_}.lock"
        if stale:
            _stale_lock(lock)
        winners = _claim_many(lock, 8, threading.Barrier(8))
        assert len(winners) == 1, [w.owner for w in winners]
        assert winners[0].is_held()
        winners[0].release()
    assert not list(tmp_path.glob("*.reclaim-*")), "reclaimed locks are cleaned up"


def _claim_at(lock, start, owner):
    time.sleep(max(0.0, start - time.time()))
    claim = try_claim(lock, owner=owner)
    if claim is None:
        return False
    time.sleep(max(0.0, start + 2.0 - time.time()))  # hold it while the others try
    claim.release()
    return True


def _warm_up(seconds):
    time.sleep(seconds)  # one per worker: each process is up with this module imported


@pytest.mark.slow
def test_concurrent_processes_never_both_win(tmp_path):
    # A stale lock to start from: the claimers race through the reclaim and the create.
    lock = tmp_path / "a.lock"
    _stale_lock(lock)
    spawn = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(4, mp_context=spawn) as pool:
        list(pool.map(_warm_up, [0.5] * 4))
        start = time.time() + 0.5
        wins = list(pool.map(_claim_at, [lock] * 4, [start] * 4, [f"p{i}" for i in range(4)]))
    assert sum(wins) == 1


# -- one image start to finish -------------------------------------------------------------


def _archive(tmp_path, slide, *names):
    source = tmp_path / "archive"
    for name in names:
        (source / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(slide, source / name)
    return source


def _one_image(tmp_path, slide):
    """An archive of one slide, a.ome.tif: its image, the output root and the image's paths."""
    (image,) = discover_images(_archive(tmp_path, slide, "a.ome.tif"))
    out = tmp_path / "out"
    return image, out, image_paths(out, "a.ome.tif")


def test_another_archives_image_under_the_same_key_is_refused_and_its_result_kept(
    tmp_path, slide, random_checkpoint
):
    """Two archives writing to one output root, each with an a.ome.tif: the second's image
    is not a change of the first's (deleting its result every run, each in turn) but a
    conflict, refused naming both; the first's result and state stay as they were."""
    first = _archive(tmp_path, slide, "a.ome.tif")
    other = tmp_path / "other"
    other.mkdir()
    shutil.copy(slide, other / "a.ome.tif")
    with open(other / "a.ome.tif", "ab") as f:
        f.write(b"\0" * 10)  # another image, the same key
    out = tmp_path / "out"
    (image,) = discover_images(first)
    process_image(image, out, random_checkpoint, config=CONFIG)
    paths = image_paths(out, "a.ome.tif")
    finished = read_meta(paths.result).finished
    (theirs,) = discover_images(other)
    with pytest.raises(archive.SourceConflictError, match="own output root"):
        process_image(theirs, out, random_checkpoint, config=CONFIG)
    assert is_complete(paths.result) and read_meta(paths.result).finished == finished
    assert archive.read_state(paths.state)["source"] == image.url


def test_the_same_archive_by_a_link_and_by_its_real_path_is_no_conflict(
    tmp_path, slide, random_checkpoint
):
    """Run 1 lists the archive through a link (an automount), later runs by its real path:
    once the image changed, its own result was refused as another archive's on every run."""
    real = _archive(tmp_path, slide, "a.ome.tif")
    (tmp_path / "link").symlink_to(real)
    out = tmp_path / "out"
    (linked,) = discover_images(tmp_path / "link")
    assert process_image(linked, out, random_checkpoint, config=CONFIG).status == "segmented"
    later = time.time() + 5
    os.utime(real / "a.ome.tif", (later, later))  # saved again
    (image,) = discover_images(real)
    outcome = process_image(image, out, random_checkpoint, config=CONFIG)
    assert outcome.status == "segmented" and "moved" not in outcome.reason
    assert is_complete(image_paths(out, "a.ome.tif").result)


@pytest.mark.parametrize(
    "text",
    ['{"status": "compl', "[]", '{"image": "a.ome.tif", "unreadable": {"failures": 1}}'],
    ids=["torn", "no-object", "read-failures-only"],
)
def test_an_unreadable_sidecar_never_deletes_another_archives_result(
    tmp_path, slide, random_checkpoint, text
):
    """A sidecar that cannot be read (or records read failures only, as one written over an
    unreadable one does) cannot say whose the result beside it is: a result made from another
    image (another archive under the same key) is kept and the image refused, naming the
    sidecar; nothing is written over that sidecar either."""
    first = _archive(tmp_path, slide, "a.ome.tif")
    other = tmp_path / "other"
    other.mkdir()
    shutil.copy(slide, other / "a.ome.tif")
    out = tmp_path / "out"
    (image,) = discover_images(first)
    process_image(image, out, random_checkpoint, config=CONFIG)
    paths = image_paths(out, "a.ome.tif")
    finished = read_meta(paths.result).finished
    paths.state.write_text(text)
    (theirs,) = discover_images(other)
    with pytest.raises(archive.SourceConflictError, match=re.escape(str(paths.state))):
        process_image(theirs, out, random_checkpoint, config=CONFIG)
    assert is_complete(paths.result) and read_meta(paths.result).finished == finished
    assert read_meta(paths.result).source == image.url
    assert paths.state.read_text() == text
    # The result's own image: provably its result (the URL it records), replaced as new.
    again = process_image(image, out, random_checkpoint, config=CONFIG)
    assert (again.status, again.reason) == ("segmented", "new image")


def test_an_unreadable_sidecar_beside_the_result_of_this_image_by_a_link_is_no_conflict(
    tmp_path, slide, random_checkpoint
):
    """The result records the image by a link to its folder; run by the real path with the
    sidecar torn, it is still this image's (as a readable sidecar's source would be): replaced
    as new, not refused on every run as another archive's."""
    real = _archive(tmp_path, slide, "a.ome.tif")
    link = tmp_path / "link"
    link.symlink_to(real, target_is_directory=True)
    out = tmp_path / "out"
    (by_link,) = discover_images(link)
    process_image(by_link, out, random_checkpoint, config=CONFIG)
    image_paths(out, "a.ome.tif").state.write_text('{"status": "compl')
    (by_path,) = discover_images(real)
    again = process_image(by_path, out, random_checkpoint, config=CONFIG)
    assert (again.status, again.reason) == ("segmented", "new image")


def test_an_image_under_a_top_level_catalog_folder_is_refused_leaving_the_catalog_whole(
    tmp_path, slide, random_checkpoint
):
    """The output root's _catalog/ is segpipe's: an image at the archive's
    _catalog/records/b.ome.tif put its sidecar (and result, report) among the catalog's
    records, and every read of the catalog failed after. It is refused, naming the folder; the
    other images are archived and their catalog reads; the order of a run's images still works
    it out."""
    source = _archive(tmp_path, slide, "a.ome.tif", "_catalog/records/b.ome.tif")
    out = tmp_path / "out"
    images = discover_images(source)
    assert [i.key for i in images] == ["_catalog/records/b.ome.tif", "a.ome.tif"]
    assert [i.key for i in archive.killed_last(images, out)] == [i.key for i in images]
    with pytest.raises(ValueError, match="top-level folder _catalog/ holds segpipe's catalog"):
        process_image(images[0], out, random_checkpoint, config=CONFIG)
    assert not (out / "_catalog").exists()
    assert process_image(images[1], out, random_checkpoint, config=CONFIG).status == "segmented"
    assert list(catalog.open_catalog(out)["image"].values) == ["a.ome.tif"]
    assert image_paths(out, "_catalog.svs").result == out / "_catalog.svs.seg.zarr"  # a file


def test_an_archive_named_by_a_percent_encoded_file_url_is_listed(tmp_path, slide):
    """Path.as_uri() of "my scans" is ".../my%20scans": location() read it, fsspec did not, so
    the CLI's check passed and every run found "no such folder"."""
    source = _archive(tmp_path, slide, "a.ome.tif").rename(tmp_path / "my scans")
    url = source.as_uri()
    assert "%20" in url
    assert [i.key for i in discover_images(url, exclude=(tmp_path / "out").as_uri())] == [
        "a.ome.tif"
    ]


def test_a_moved_archive_is_up_to_date_where_it_was(tmp_path, slide, random_checkpoint):
    """The archive remounted elsewhere (the same files, the same fingerprints): its complete
    results are kept, not recomputed."""
    source, out = _archive(tmp_path, slide, "a.ome.tif"), tmp_path / "out"
    (image,) = discover_images(source)
    process_image(image, out, random_checkpoint, config=CONFIG)
    moved = source.rename(tmp_path / "remounted")
    (image,) = discover_images(moved)
    again = process_image(image, out, random_checkpoint, config=CONFIG)
    assert again.status == "skipped" and again.reason.startswith("up to date (moved from")
    paths = image_paths(out, "a.ome.tif")
    finished = read_meta(paths.result).finished
    # Its sidecar and catalog record name it at its new place: another image at the old one
    # is another archive's, refused. Named at the old place, its run took the sidecar for its
    # own and replaced the moved archive's result, which was then refused for good.
    record = json.loads(catalog.record_path(out, "a.ome.tif").read_text())
    assert archive.read_state(paths.state)["source"] == image.url == record["source"]
    assert f"| source | `{image.url}` |" in paths.report.read_text()  # it named the old place
    (source / "a.ome.tif").parent.mkdir(parents=True)
    shutil.copy(slide, source / "a.ome.tif")
    with open(source / "a.ome.tif", "ab") as f:
        f.write(b"\0" * 10)  # other bytes, another image
    (theirs,) = discover_images(source)
    with pytest.raises(archive.SourceConflictError, match="another image than"):
        process_image(theirs, out, random_checkpoint, config=CONFIG)
    assert read_meta(paths.result).finished == finished and is_complete(paths.result)
    shutil.rmtree(source)
    # Rescanned there later: a change of its own image (the old place is gone), not another
    # archive's; it was refused as a conflict on every run, --retry-failed too.
    with open(moved / "a.ome.tif", "ab") as f:
        f.write(b"\0" * 10)
    (image,) = discover_images(moved)
    changed = process_image(image, out, random_checkpoint, config=CONFIG)
    assert (changed.status, changed.reason) == ("segmented", "image changed")
    assert archive.read_state(paths.state)["source"] == image.url
    assert read_meta(paths.result).source == image.url and is_complete(paths.result)


@pytest.mark.parametrize("how", ["moved", "copied"])
def test_a_moved_output_roots_catalog_and_reports_name_its_results_where_they_are(
    tmp_path, slide, random_checkpoint, how
):
    """The catalog's result column and each report kept naming the old output root's results
    (gone, or another root's when copied), and no run corrected them."""
    source, out = _archive(tmp_path, slide, "a.ome.tif"), tmp_path / "out"
    (image,) = discover_images(source)
    process_image(image, out, random_checkpoint, config=CONFIG)
    there = tmp_path / "there"
    shutil.copytree(out, there) if how == "copied" else out.rename(there)
    paths = image_paths(there, "a.ome.tif")
    finished = read_meta(paths.result).finished
    again = process_image(image, there, random_checkpoint, config=CONFIG)
    assert again.status == "skipped" and read_meta(paths.result).finished == finished
    ds = catalog.open_catalog(there)
    assert str(ds["result"].values[0]) == str(paths.result)
    assert f"| result | `{paths.result}` |" in paths.report.read_text()
    if how == "copied":  # the first root's own are as they were
        assert str(catalog.open_catalog(out)["result"].values[0]) == str(out / "a.ome.tif.seg.zarr")


def test_a_recorded_source_whose_store_cannot_be_asked_is_another_archives_result(
    tmp_path, monkeypatch
):
    """Whether the image a sidecar records is still there cannot be told (its store refuses,
    a URL without its storage options): the result is another archive's, refused and kept.
    Taken for moved, a changed image under the same key at another URL would delete it."""
    import segpipe.archive.state as archive_state

    paths, _, state = _sidecar(tmp_path)
    theirs = "s3://other-archive/a.tif"
    state |= {"version": 3, "source": theirs, "status": "complete", "failures": 0}
    paths.state.write_text(json.dumps(state))
    real = archive_state.location

    def location(url, *args, **kwargs):
        if str(url) == theirs:
            raise PermissionError("the store refuses")
        return real(url, *args, **kwargs)

    monkeypatch.setattr(archive_state, "location", location)
    ours = Fingerprint(11, 2.0, "def")
    with pytest.raises(archive.SourceConflictError, match="own output root"):
        decide(paths, ours, "m1", CONFIG, source=str(tmp_path / "archive" / "a.tif"))
    assert archive.read_state(paths.state) == state


def _raises(error: Exception):
    def raising(*args, **kwargs):
        raise error

    return raising


def test_the_lock_of_a_run_killed_after_its_last_write_goes_with_the_next_run(
    tmp_path, slide, random_checkpoint, monkeypatch
):
    """Killed after "complete" was written, before its claim was released: every later run
    skipped the image before claiming it, and the lock stayed for good. A live run's stays."""
    source, out = _archive(tmp_path, slide, "a.ome.tif"), tmp_path / "out"
    (image,) = discover_images(source)
    process_image(image, out, random_checkpoint, config=CONFIG)
    paths = image_paths(out, "a.ome.tif")
    code = f"""
import os, signal
from segpipe.archive.claims import try_claim
claim = try_claim({str(paths.lock)!r}, ttl_s=600)
os.kill(os.getpid(), signal.SIGKILL)
"""
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, timeout=120)
    assert done.returncode == -signal.SIGKILL and paths.lock.exists()
    with try_claim(paths.lock, ttl_s=600, owner="live") as live:  # its holder died: taken
        assert live is not None
        skipped = process_image(image, out, random_checkpoint, config=CONFIG)
        assert skipped.status == "skipped" and live.is_held()
    assert not paths.lock.exists()
    subprocess.run([sys.executable, "-c", code], capture_output=True, timeout=120)
    assert paths.lock.exists()
    with monkeypatch.context() as m:  # a read-only output root: still skipped, up to date
        m.setattr(archive_process, "try_claim", _raises(PermissionError(13, "Read-only")))
        assert process_image(image, out, random_checkpoint, config=CONFIG).status == "skipped"
    skipped = process_image(image, out, random_checkpoint, config=CONFIG)
    assert skipped.status == "skipped" and not paths.lock.exists()


def test_process_image_segments_reports_catalogs_then_skips(tmp_path, slide, random_checkpoint):
    source, out = _archive(tmp_path, slide, "day-1/a.ome.tif"), tmp_path / "out"
    (image,) = discover_images(source)
    done = process_image(image, out, random_checkpoint, config=CONFIG)
    assert (done.status, done.reason) == ("segmented", "new image")
    paths = image_paths(out, "day-1/a.ome.tif")
    assert is_complete(paths.result)
    assert paths.report.is_file() and paths.thumbnail.is_file()
    assert not paths.lock.exists()
    assert archive.read_state(paths.state)["status"] == "complete"
    assert list(catalog.open_catalog(out)["image"].values) == ["day-1/a.ome.tif"]
    assert done.tiles_computed == 4

    again = process_image(image, out, random_checkpoint, config=CONFIG)
    assert (again.status, again.reason, again.tiles_computed) == ("skipped", "up to date", 0)
    assert again.tiles_skipped is None  # not the last run's count, shown as this run's


def test_a_model_loaded_once_serves_every_image_and_results_record_its_name(
    tmp_path, slide, random_checkpoint, monkeypatch
):
    import segpipe
    from segpipe import models

    source, out = _archive(tmp_path, slide, "a.ome.tif", "b.ome.tif"), tmp_path / "out"
    loaded = archive.load_model(random_checkpoint)
    assert loaded.sha256 == models.fingerprint(models.load(random_checkpoint))
    real_load, loads = models.load, []
    monkeypatch.setattr(models, "load", lambda m: loads.append(m) or real_load(m))
    for image in discover_images(source):
        assert process_image(image, out, loaded, config=CONFIG).status == "segmented"
    assert loads == [], "no image loaded the model again"
    for key in ("a.ome.tif", "b.ome.tif"):
        paths = image_paths(out, key)
        meta = read_meta(paths.result)
        assert meta.model_name == str(random_checkpoint), "the model's name, not 'unet'"
        assert meta.model_sha256 == loaded.sha256
        assert archive.read_state(paths.state)["model"] == str(random_checkpoint)
    # The very result segmenting by the model's path makes: found complete, not recomputed.
    result = image_paths(out, "a.ome.tif").result
    finished = read_meta(result).finished
    segpipe.segment(source / "a.ome.tif", result, random_checkpoint, CONFIG)
    assert read_meta(result).finished == finished


def test_a_changed_image_is_segmented_again(tmp_path, slide, random_checkpoint):
    source, out = _archive(tmp_path, slide, "a.ome.tif"), tmp_path / "out"
    (image,) = discover_images(source)
    process_image(image, out, random_checkpoint, config=CONFIG)
    finished = read_meta(image_paths(out, "a.ome.tif").result).finished
    with open(source / "a.ome.tif", "ab") as f:
        f.write(b"\0" * 10)  # still a valid TIFF, other bytes
    (image,) = discover_images(source)
    again = process_image(image, out, random_checkpoint, config=CONFIG)
    assert (again.status, again.reason) == ("segmented", "image changed")
    assert (again.tiles_computed, again.tiles_skipped) == (4, 0), "replaced, not resumed"
    record = catalog.read_records(out)[0]
    assert record["fingerprint"]["size"] == image.size
    assert read_meta(image_paths(out, "a.ome.tif").result).finished >= finished


def _files(root):
    """{path under ``root``: bytes} of every file below ``root``."""
    return {p.relative_to(root): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.mark.parametrize("theirs", ["folder", "file", "link to a result"])
def test_the_users_data_at_a_changed_images_result_path_fails_it_and_is_kept(
    tmp_path, slide, random_checkpoint, theirs
):
    """What the user put at a changed image's result path (a folder, a file; a link, which
    segpipe never deletes through) cannot be replaced: the image's failure, recorded under
    its claim (count, time, a reason naming the path), held by the next run, tried again
    with retry_failed, never resumed (the result the link leads to, made before the image
    changed, would pass for this one), and the user's data untouched throughout."""
    image, out, paths = _one_image(tmp_path, slide)

    def run(**kw):
        return process_image(image, out, random_checkpoint, config=CONFIG, **kw)

    run()
    kept = tmp_path / "kept.zarr"
    paths.result.rename(kept)
    if theirs == "folder":
        paths.result.mkdir()
        (paths.result / "notes.txt").write_text("mine")
    elif theirs == "file":
        paths.result.write_text("mine")
    else:
        paths.result.symlink_to(kept, target_is_directory=True)
    with open(image.url, "ab") as f:
        f.write(b"\0" * 10)  # still a valid TIFF with the same pixels, other bytes
    (image,) = discover_images(tmp_path / "archive")

    def users_data():
        where = paths.result
        if where.is_symlink():
            return os.readlink(where), _files(kept)
        return _files(where) if where.is_dir() else where.read_bytes()

    before = users_data()
    with pytest.raises(FileExistsError, match=re.escape(str(paths.result))) as raised:
        run()
    state = archive.read_state(paths.state)
    assert (state["status"], state["failures"]) == ("failed", 1) and state["failed_at"]
    assert state["reason"] == f"FileExistsError: {raised.value}"
    assert state["fingerprint"]["size"] == image.size, "the inputs it failed with"
    assert not paths.lock.exists() and users_data() == before
    held = run()
    assert held.status == "held" and "failed 1 time" in held.reason
    with pytest.raises(FileExistsError, match=re.escape(str(paths.result))):
        run(retry_failed=True)
    assert archive.read_state(paths.state)["failures"] == 2
    assert users_data() == before and not paths.lock.exists()


class _Killed(BaseException):
    """Stands in for SIGKILL: nothing after it runs."""


def test_a_result_deletion_killed_halfway_is_finished_by_the_next_run(
    tmp_path, slide, random_checkpoint, monkeypatch
):
    source, out = _archive(tmp_path, slide, "a.ome.tif"), tmp_path / "out"
    (image,) = discover_images(source)
    process_image(image, out, random_checkpoint, config=CONFIG)
    with open(source / "a.ome.tif", "ab") as f:
        f.write(b"\0" * 10)  # changed: the old result must go
    (image,) = discover_images(source)

    def killed_halfway(path, *args, **kwargs):
        (Path(path) / "zarr.json").unlink()  # what made it a result goes; chunks stay
        raise _Killed

    with monkeypatch.context() as m:
        m.setattr(shutil, "rmtree", killed_halfway)
        with pytest.raises(_Killed):
            process_image(image, out, random_checkpoint, config=CONFIG)

    again = process_image(image, out, random_checkpoint, config=CONFIG)
    assert (again.status, again.reason) == ("segmented", "image changed")
    assert (again.tiles_computed, again.tiles_skipped) == (4, 0)
    hidden = [p.name for p in out.iterdir() if p.name.startswith(".")]
    assert [n for n in hidden if not n.endswith(".seg.zarr.lock")] == []  # locks stay


def test_a_report_that_cannot_be_written_fails_the_image_with_its_reason(
    tmp_path, slide, random_checkpoint, monkeypatch
):
    """The result is complete but its report fails (a full disk, a bad template): the image
    is failed with that reason, not left "running" with none, and the next run finishes it
    without computing again."""
    from segpipe.archive import reports

    image, out, paths = _one_image(tmp_path, slide)

    def no_space(*args, **kwargs):
        raise OSError(28, "No space left on device")

    with monkeypatch.context() as m:
        m.setattr(reports, "image_report", no_space)
        with pytest.raises(OSError, match="No space"):
            process_image(image, out, random_checkpoint, config=CONFIG)
    state = archive.read_state(paths.state)
    assert state["status"] == "failed" and "No space left on device" in state["reason"]
    assert not paths.lock.exists() and catalog.read_records(out) == []
    _age_failure(paths, 3600)  # the next run, past the retry delay
    again = process_image(image, out, random_checkpoint, config=CONFIG)
    assert again.status == "segmented" and paths.report.is_file()
    assert archive.read_state(paths.state)["status"] == "complete"


def test_a_failure_is_recorded_releases_the_claim_and_the_next_run_resumes(
    tmp_path, slide, random_checkpoint
):
    import segpipe

    image, out, paths = _one_image(tmp_path, slide)

    def flaky(source, output, model, config, **kw):
        # write part of the result, then die the way a lost worker would
        calls = []

        def stop_after_first(done, total):
            calls.append(done)
            if len(calls) == 1:
                raise OSError("worker lost")

        return segpipe.segment(source, output, model, config, on_progress=stop_after_first, **kw)

    with pytest.raises(OSError, match="worker lost"):
        process_image(image, out, random_checkpoint, config=CONFIG, run_segment=flaky)
    assert not paths.lock.exists()
    assert archive.read_state(paths.state)["reason"] == "OSError: worker lost"
    assert catalog.read_records(out) == []

    _age_failure(paths, 3600)  # the next run, past the retry delay
    again = process_image(image, out, random_checkpoint, config=CONFIG)
    assert (again.status, again.reason) == ("segmented", "previous run failed: resuming")
    assert again.tiles_skipped > 0


def test_an_image_claimed_by_another_run_is_left_alone(tmp_path, slide, random_checkpoint):
    source, out = _archive(tmp_path, slide, "a.ome.tif"), tmp_path / "out"
    (image,) = discover_images(source)
    with try_claim(image_paths(out, "a.ome.tif").lock, owner="the other run"):
        outcome = process_image(image, out, random_checkpoint, config=CONFIG)
    assert (outcome.status, outcome.reason) == ("busy", "claimed by the other run")
    assert not image_paths(out, "a.ome.tif").result.exists()


def test_a_remote_image_is_segmented_where_it_lies_without_a_local_copy(
    tmp_path, slide, random_checkpoint
):
    fs = fsspec.filesystem("memory")
    fs.pipe("/remote-archive/r.ome.tif", slide.read_bytes())
    try:
        (image,) = discover_images("memory://remote-archive")
        out = tmp_path / "out"
        done = process_image(image, out, random_checkpoint, config=CONFIG)
        assert done.status == "segmented"
        assert not (out / "_staging").exists()
        assert catalog.read_records(out)[0]["source"] == "memory:///remote-archive/r.ome.tif"
        assert read_meta(image_paths(out, "r.ome.tif").result).source == image.url
    finally:
        fs.rm("/remote-archive", recursive=True)


def test_a_report_failure_after_segmenting_is_finished_by_the_next_run(
    tmp_path, slide, random_checkpoint, monkeypatch
):
    from segpipe.archive import reports

    image, out, paths = _one_image(tmp_path, slide)
    with monkeypatch.context() as m:
        m.setattr(reports, "write_thumbnail", lambda *a, **k: 1 / 0)
        with pytest.raises(ZeroDivisionError):
            process_image(image, out, random_checkpoint, config=CONFIG)
    assert is_complete(paths.result), "the segmentation itself finished"
    finished = read_meta(paths.result).finished

    again = process_image(image, out, random_checkpoint, config=CONFIG, retry_failed=True)
    assert (again.status, again.reason) == ("segmented", "previous run failed: resuming")
    assert read_meta(paths.result).finished == finished, "nothing was segmented again"
    assert paths.report.is_file() and paths.thumbnail.is_file()
    assert [r["image"] for r in catalog.read_records(out)] == ["a.ome.tif"]


def test_a_deleted_catalog_is_rebuilt_by_the_next_run(tmp_path, slide, random_checkpoint):
    source, out = _archive(tmp_path, slide, "a.ome.tif"), tmp_path / "out"
    (image,) = discover_images(source)
    process_image(image, out, random_checkpoint, config=CONFIG)
    shutil.rmtree(out / catalog.CATALOG_DIR)
    again = process_image(image, out, random_checkpoint, config=CONFIG)
    assert again.status == "skipped"
    assert [r["image"] for r in catalog.read_records(out)] == ["a.ome.tif"]


@pytest.mark.parametrize("deleted", [("report",), ("thumbnail",), ("report", "thumbnail")])
def test_a_deleted_report_or_thumbnail_is_written_again_by_the_next_run(
    tmp_path, slide, random_checkpoint, deleted
):
    """As a deleted catalog record is: the image up to date, nothing segmented again, the
    files the same as its run wrote them. They stayed missing on every later run."""
    source, out = _archive(tmp_path, slide, "a.ome.tif"), tmp_path / "out"
    (image,) = discover_images(source)
    first = process_image(image, out, random_checkpoint, config=CONFIG)
    paths = image_paths(out, "a.ome.tif")
    written = {what: getattr(paths, what).read_bytes() for what in ("report", "thumbnail")}
    finished = read_meta(paths.result).finished
    for what in deleted:
        getattr(paths, what).unlink()
    again = process_image(image, out, random_checkpoint, config=CONFIG)
    assert (again.status, again.report, again.thumbnail) == (
        "skipped",
        first.report,
        first.thumbnail,
    )
    assert {what: getattr(paths, what).read_bytes() for what in written} == written
    assert read_meta(paths.result).finished == finished
    assert not paths.lock.exists(), "the claim it wrote them under is released"


@pytest.mark.parametrize("kind", ["report", "thumbnail"])
@pytest.mark.parametrize("stale", [False, True], ids=["new", "stale"])
def test_a_users_file_where_a_report_or_thumbnail_goes_is_kept(
    tmp_path, slide, random_checkpoint, kind, stale
):
    """An output root that the user keeps other files in may hold a.ome.tif.report.md of
    theirs: it was replaced by the report (or removed with a stale result), without a word.
    The image fails, naming it; the user's file stays, and the result of earlier settings."""
    source, out = _archive(tmp_path, slide, "a.ome.tif"), tmp_path / "out"
    (image,) = discover_images(source)
    paths = image_paths(out, "a.ome.tif")
    if stale:
        process_image(image, out, random_checkpoint, config=CONFIG)
    made = read_meta(paths.result).finished if stale else None
    theirs = getattr(paths, kind)
    theirs.parent.mkdir(parents=True, exist_ok=True)
    theirs.write_text("notes on a.ome.tif: the user's\n")
    config = CONFIG.replace(tile=32) if stale else CONFIG
    with pytest.raises(
        ValueError, match=f"{re.escape(str(theirs))} exists and is no archive {kind} segpipe wrote"
    ):
        process_image(image, out, random_checkpoint, config=config)
    assert theirs.read_text() == "notes on a.ome.tif: the user's\n"
    assert archive.read_state(paths.state)["status"] == "failed"
    if stale:  # refused before it was deleted
        assert read_meta(paths.result).finished == made
    theirs.unlink()  # moved away: the next run, once the failure's back-off is over, makes all
    _age_failure(paths, 3600)
    done = process_image(image, out, random_checkpoint, config=config)
    assert done.status == "segmented" and getattr(paths, kind).exists()


def test_a_result_damaged_since_is_segmented_again_not_called_up_to_date(
    tmp_path, slide, random_checkpoint
):
    """A level-0 shard deleted from a complete result: open_result refused it as damaged, and
    every archive run called it up to date, its report and record describing lost pixels."""
    source, out = _archive(tmp_path, slide, "a.ome.tif"), tmp_path / "out"
    (image,) = discover_images(source)
    process_image(image, out, random_checkpoint, config=CONFIG)
    paths = image_paths(out, "a.ome.tif")
    want = open_result(paths.result).load()
    shard = max((paths.result / "0" / "mask" / "c").rglob("*"), key=lambda p: p.is_file())
    shard.unlink()
    with pytest.raises(DamagedResultError):
        open_result(paths.result)
    again = process_image(image, out, random_checkpoint, config=CONFIG)
    assert again.status == "segmented" and "result damaged" in again.reason, again
    xr.testing.assert_equal(open_result(paths.result).load(), want)  # the run's times differ
    assert process_image(image, out, random_checkpoint, config=CONFIG).status == "skipped"


# -- failures back off, a lost claim stops, the catalog under the claim, a moving image ----


def _age_failure(paths, seconds):
    """Move the recorded failure (or a run's start, for one that never ended) ``seconds``
    into the past: the next run, that much later."""
    from datetime import datetime, timedelta

    state = archive.read_state(paths.state)
    if "unreadable" in state:  # a read failure, recorded apart
        failure = state["unreadable"]
        when = datetime.fromisoformat(failure["failed_at"]) - timedelta(seconds=seconds)
        failure["failed_at"] = when.isoformat()
        paths.state.write_text(json.dumps(state))
        return
    field = "updated" if state["status"] == "running" else "failed_at"
    when = datetime.fromisoformat(state[field]) - timedelta(seconds=seconds)
    paths.state.write_text(json.dumps(state | {field: when.isoformat()}))


def _sidecar(tmp_path):
    """An image's paths, its fingerprint and the sidecar fields of its last run's inputs (the
    model "m1", CONFIG's settings), for a test to add the run's status to."""
    fp = Fingerprint(10, 1.0, "abc")
    state = {"fingerprint": fp.as_dict(), "model_sha256": "m1", "params": CONFIG.result_settings()}
    return image_paths(tmp_path, "a.tif"), fp, state


def _ago(seconds):
    """The sidecar's spelling of a time ``seconds`` ago."""
    from datetime import UTC, datetime, timedelta

    return (datetime.now(UTC) - timedelta(seconds=seconds)).isoformat(timespec="seconds")


def test_a_failing_image_backs_off_for_ever_until_it_changes(tmp_path, slide, random_checkpoint):
    from segpipe.archive import reports

    source, out = _archive(tmp_path, slide, "a.ome.tif"), tmp_path / "out"
    paths = image_paths(out, "a.ome.tif")
    attempts = []

    def corrupt(*args, **kwargs):
        attempts.append(1)
        raise ValueError("corrupt tile directory")

    def run(**kw):
        (image,) = discover_images(source)
        return process_image(image, out, random_checkpoint, config=CONFIG, **kw)

    def fails(**kw):
        with pytest.raises(ValueError, match="corrupt"):
            run(run_segment=corrupt, **kw)

    fails()
    state = archive.read_state(paths.state)
    assert (state["status"], state["failures"]) == ("failed", 1) and state["failed_at"]
    held = run(run_segment=corrupt)  # the next run, at once: nothing read, nothing tried
    assert (held.status, len(attempts)) == ("held", 1)
    assert "failed 1 time" in held.reason and "corrupt tile directory" in held.reason
    _age_failure(paths, 11 * 60)  # past the first delay (10 minutes)
    fails()
    assert archive.read_state(paths.state)["failures"] == 2
    _age_failure(paths, 11 * 60)  # the second delay is twice as long
    assert run(run_segment=corrupt).status == "held" and len(attempts) == 2
    _age_failure(paths, 10 * 60)
    fails()
    _age_failure(paths, 30 * 60)  # the third delay: 40 minutes
    held = run(run_segment=corrupt)
    assert (held.status, len(attempts)) == ("held", 3)
    assert "failed 3 times; next attempt after" in held.reason
    now = "(or now: --retry-failed, retry_failed=True); last: ValueError: corrupt tile directory"
    assert now in held.reason
    assert "1 held after failing (a.ome.tif)" in reports.describe_run([held])
    assert "retry_failed" in reports.run_markdown([held])
    _age_failure(paths, 30 * 24 * 3600)  # an outage, say: not given up, tried again
    fails()
    assert (archive.read_state(paths.state)["failures"], len(attempts)) == (4, 4)

    fails(retry_failed=True)  # the user asks
    assert archive.read_state(paths.state)["failures"] == 5
    with open(source / "a.ome.tif", "ab") as f:
        f.write(b"\0" * 10)  # a new file: a fresh start
    again = run()
    assert (again.status, again.reason) == ("segmented", "image changed")
    assert archive.read_state(paths.state)["failures"] == 0


def test_a_failed_sidecar_of_the_previous_release_still_reads(tmp_path):
    """Before failure counts, a failed sidecar had a reason and the run's start time only:
    one failure, as old as that time."""
    from datetime import UTC, datetime, timedelta

    paths, fp, state = _sidecar(tmp_path)
    state |= {
        "version": 2,
        "status": "failed",
        "reason": "OSError: worker lost",
    }
    for age_s, due in [(60, False), (3600, True)]:
        updated = (datetime.now(UTC) - timedelta(seconds=age_s)).isoformat(timespec="seconds")
        paths.state.write_text(json.dumps(state | {"updated": updated}))
        decision = decide(paths, fp, "m1", CONFIG)
        assert decision.process is due, decision
        assert decision.process or "failed 1 time; next attempt after" in decision.reason
        assert decision.process or decision.reason.endswith("; last: OSError: worker lost")
    assert decide(paths, fp, "m1", CONFIG, retry_failed=True).process


@pytest.mark.parametrize(
    "edit",
    [{"failures": "many"}, {"failures": True}, {"model_sha256": 5}, {"source": 7},
     {"fingerprint": []}, {"updated": 3}],
)  # fmt: skip
def test_a_sidecar_whose_field_is_of_another_type_is_unreadable_naming_it(tmp_path, edit, caplog):
    """Edited by hand, "failures": "many" failed the image with "invalid literal for int()",
    naming no file, and held back its complete result; a garbled sidecar is read as none."""
    paths, fp, state = _sidecar(tmp_path)
    paths.state.parent.mkdir(parents=True, exist_ok=True)
    paths.state.write_text(json.dumps(state | {"status": "failed", "failures": 2} | edit))
    with caplog.at_level("WARNING", logger="segpipe.archive"):
        decision = decide(paths, fp, "m1", CONFIG)
    assert (decision.process, decision.reason) == (True, "new image")
    (field,) = edit
    assert f"{paths.state}: unreadable state sidecar (its {field} is a" in caplog.text


def test_a_failure_recorded_at_a_time_to_come_waits_no_longer_than_its_delay(tmp_path):
    """failed_at in 2099 (a clock set wrong, a hand) held the image till then."""
    from datetime import UTC, datetime, timedelta

    paths, fp, state = _sidecar(tmp_path)
    paths.state.parent.mkdir(parents=True, exist_ok=True)
    state |= {"status": "failed", "failures": 1, "reason": "OSError: x"}
    paths.state.write_text(json.dumps(state | {"failed_at": "2099-01-01T00:00:00+00:00"}))
    decision = decide(paths, fp, "m1", CONFIG)
    at = re.search(r"next attempt after (\S+ \S+) UTC", decision.reason)[1]
    when = datetime.fromisoformat(at).replace(tzinfo=UTC)
    assert decision.held and when <= datetime.now(UTC) + timedelta(seconds=601), decision


@pytest.mark.parametrize(
    ("failures", "delay_s"), [(4, 80 * 60), (9, 6 * 3600), (50, 6 * 3600), (5000, 6 * 3600)]
)
def test_a_failed_image_is_retried_for_ever_at_most_six_hours_apart(tmp_path, failures, delay_s):
    """However often the same inputs failed (an outage of the output disk, a share, the GPU),
    the image is tried again after its delay, which doubles up to 6 hours and stays there."""
    from datetime import datetime, timedelta

    paths, fp, state = _sidecar(tmp_path)
    state |= {
        "status": "failed",
        "reason": "OSError: share gone",
        "failures": failures,
    }
    assert retry_delay_s(failures) == delay_s
    failed_at = _ago(delay_s - 60)
    paths.state.write_text(json.dumps(state | {"failed_at": failed_at}))
    held = decide(paths, fp, "m1", CONFIG)
    retry_at = datetime.fromisoformat(failed_at) + timedelta(seconds=delay_s)
    assert (held.process, held.held, held.failures) == (False, True, failures)
    assert held.reason == (
        f"failed {failures} times; next attempt after {retry_at:%Y-%m-%d %H:%M:%S} UTC "
        "(or now: --retry-failed, retry_failed=True); last: OSError: share gone"
    )
    assert decide(paths, fp, "m1", CONFIG, retry_failed=True).process
    paths.state.write_text(json.dumps(state | {"failed_at": _ago(delay_s + 60)}))
    assert decide(paths, fp, "m1", CONFIG) == archive.Decision(
        True, "previous run failed", failures=failures
    )


def test_a_running_sidecar_is_resumed_at_once_until_max_killed_attempts(tmp_path):
    """A run that never ended (killed, or still running: decide cannot tell, the claim does)
    is resumed at once while its count is below MAX_KILLED_ATTEMPTS, then waits its retry
    delay from its start like a failure."""
    paths, fp, state = _sidecar(tmp_path)
    state |= {
        "status": "running",
        "owner": "run-7",
        "updated": _ago(3 * 60),
    }
    paths.state.write_text(json.dumps(state | {"failures": MAX_KILLED_ATTEMPTS - 1}))
    assert decide(paths, fp, "m1", CONFIG) == archive.Decision(
        True, "previous run running", failures=MAX_KILLED_ATTEMPTS - 1
    )
    paths.state.write_text(json.dumps(state | {"failures": MAX_KILLED_ATTEMPTS}))
    held = decide(paths, fp, "m1", CONFIG)
    assert (held.process, held.held) == (False, True)
    assert held.reason.startswith(f"failed {MAX_KILLED_ATTEMPTS} times; next attempt after")
    assert held.reason.endswith("last: started by run-7, never ended (killed, or still running)")
    assert decide(paths, fp, "m1", CONFIG, retry_failed=True).process
    delay_s = retry_delay_s(MAX_KILLED_ATTEMPTS)
    paths.state.write_text(
        json.dumps(state | {"failures": MAX_KILLED_ATTEMPTS, "updated": _ago(delay_s + 60)})
    )
    assert decide(paths, fp, "m1", CONFIG).process


def test_a_killed_run_waits_from_its_last_sign_of_life(tmp_path):
    """A run killed hours after it started waits its retry delay from its last "alive", not
    from its start: counted from the start it would be resumed at once."""
    paths, fp, state = _sidecar(tmp_path)
    delay_s = retry_delay_s(MAX_KILLED_ATTEMPTS)
    state |= {
        "status": "running",
        "owner": "run-7",
        "failures": MAX_KILLED_ATTEMPTS,
        "updated": _ago(delay_s + 3600),
    }
    paths.state.write_text(json.dumps(state))
    assert decide(paths, fp, "m1", CONFIG).process
    paths.state.write_text(json.dumps(state | {"alive": _ago(60)}))
    held = decide(paths, fp, "m1", CONFIG)
    assert (held.process, held.held) == (False, True)
    paths.state.write_text(json.dumps(state | {"alive": _ago(delay_s + 60)}))
    assert decide(paths, fp, "m1", CONFIG).process


def test_a_running_sidecar_records_signs_of_life(tmp_path, slide, random_checkpoint, monkeypatch):
    """While segment reports progress, the claim holder's sidecar gets a fresh "alive"."""
    monkeypatch.setattr(archive_watch, "ALIVE_INTERVAL_S", 0.0)
    image, out, paths = _one_image(tmp_path, slide)
    seen = []

    def segment(*args, on_progress, **kwargs):
        before = archive.read_state(paths.state)
        on_progress(1, 2)
        seen.append((before, archive.read_state(paths.state)))
        raise RuntimeError("stands in for SIGKILL")

    with pytest.raises(RuntimeError, match="SIGKILL"):
        process_image(image, out, random_checkpoint, config=CONFIG, run_segment=segment)
    ((before, after),) = seen
    assert "alive" not in before and after["status"] == "running"
    assert after == before | {"alive": after["alive"]}
    assert datetime.fromisoformat(after["alive"]) >= datetime.fromisoformat(before["updated"])


def test_signs_of_life_come_every_alive_interval_while_progress_reports_come(monkeypatch):
    """With the real intervals (progress every few seconds, a claim check every 2 s, "alive"
    every minute) a run writes its sign of life once a minute: a killed run's retry delay
    counts from it. A clock of its own lets 5 minutes of progress pass at once."""
    import types

    clock = [1000.0]
    monkeypatch.setattr(archive_watch, "time", types.SimpleNamespace(monotonic=lambda: clock[0]))

    class Held:
        checks = 0

        def check(self):
            Held.checks += 1

    alive = []
    check = archive_watch.stop_when_lost(
        Held(), archive_watch.CLAIM_CHECK_INTERVAL_S, alive=lambda: alive.append(clock[0])
    )
    for _ in range(100):  # a progress report every 3 s for 300 s
        clock[0] += 3.0
        check(1, 10)
    assert archive_watch.ALIVE_INTERVAL_S == 60.0
    assert alive == [1060.0, 1120.0, 1180.0, 1240.0, 1300.0]
    assert Held.checks == 100 + len(alive)  # each progress report, and before each "alive"


def test_a_run_killed_without_a_word_counts_as_a_failure(tmp_path, slide, random_checkpoint):
    """SIGKILL, the OOM killer, a crash in a C decoder: nothing after it runs, so the
    "running" sidecar written at the start counts the attempt. Killed runs are resumed at once
    until MAX_KILLED_ATTEMPTS, then the image backs off; a completed run resets the count."""
    image, out, paths = _one_image(tmp_path, slide)
    left = []

    def killed(*args, **kwargs):
        left.append(paths.state.read_text())  # the sidecar as a kill here leaves it
        raise RuntimeError("stands in for SIGKILL")

    for attempt in range(1, MAX_KILLED_ATTEMPTS + 1):
        with pytest.raises(RuntimeError, match="SIGKILL"):
            process_image(image, out, random_checkpoint, config=CONFIG, run_segment=killed)
        paths.state.write_text(left[-1])  # what ran after the kill, undone
        assert archive.read_state(paths.state)["failures"] == attempt
    held = process_image(image, out, random_checkpoint, config=CONFIG, run_segment=killed)
    assert (held.status, len(left)) == ("held", MAX_KILLED_ATTEMPTS)
    assert "never ended (killed, or still running)" in held.reason
    _age_failure(paths, retry_delay_s(MAX_KILLED_ATTEMPTS) + 60)
    done = process_image(image, out, random_checkpoint, config=CONFIG)
    assert (done.status, done.reason) == ("segmented", "previous run running")
    assert archive.read_state(paths.state)["failures"] == 0


def _process_in_a_subprocess(source, out, model, config, *, owner, ttl_s, fault, skip=0):
    """``process_image`` on the one image of ``source``, in a fresh process with ``fault``
    armed (:mod:`segpipe.faults`); returns the finished ``Popen`` and its stderr."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("SEGPIPE_FAULT")}
    env |= {"SEGPIPE_FAULT": fault, "SEGPIPE_FAULT_SKIP": str(skip)}
    code = (
        "from segpipe.archive import discover_images, process_image; "
        "from segpipe.config import SegmentConfig; "
        f"(image,) = discover_images({str(source)!r}); "
        f"process_image(image, {str(out)!r}, {str(model)!r}, "
        f"config=SegmentConfig(**{config.as_dict()!r}), owner={owner!r}, ttl_s={ttl_s!r})"
    )
    proc = subprocess.Popen([sys.executable, "-c", code], env=env, stderr=subprocess.PIPE)
    _, stderr = proc.communicate(timeout=300)
    return proc, stderr.decode()


def _result_arrays(result):
    """Every level's mask and probabilities as raw bytes (bit-identity, not closeness)."""
    import segpipe

    out = {}
    for level in range(len(result_levels(result))):
        ds = segpipe.open_result(result, level)
        for name in ("mask", "probabilities"):
            out[f"{level}/{name}"] = (ds[name].dtype, ds[name].shape, ds[name].values.tobytes())
    return out


@pytest.mark.slow
def test_a_sigkilled_run_is_reclaimed_once_stale_resumed_and_bit_identical(
    tmp_path, slide, random_checkpoint
):
    """A real SIGKILL (segpipe.faults) right after the second of four blocks is recorded:
    nothing after it runs. The sidecar says "running" with the attempt counted, the lock
    stays with no heartbeat. Were its run on another machine, the image would be busy until
    the lock's ttl passed; its owner died on this one, so the next run reclaims the lock at
    once, resumes the blocks left and ends bit-identical to a run never killed."""
    config = SegmentConfig(tile=64, task_tiles=1, probability_dtype="float32", scheduler="sync")
    ttl_s = 3.0  # heartbeats every 0.75 s: fresh well past the checks right after the kill
    image, out, paths = _one_image(tmp_path, slide)
    model = archive.load_model(random_checkpoint)  # the checks after the kill take no time
    killed, stderr = _process_in_a_subprocess(
        tmp_path / "archive",
        out,
        random_checkpoint,
        config,
        owner="killed run",
        ttl_s=ttl_s,
        fault="block.recorded",
        skip=1,
    )
    assert killed.returncode == -signal.SIGKILL, f"the fault point was never reached: {stderr}"
    state = archive.read_state(paths.state)
    assert (state["status"], state["failures"], state["owner"]) == ("running", 1, "killed run")
    assert (read_lock(paths.lock) or {}).get("pid") == killed.pid, "the dead run's lock stays"
    assert read_meta(paths.result).state == "computing"
    assert int(tiles_done(paths.result).sum()) == 2
    record = paths.lock.read_text()
    paths.lock.write_text(json.dumps({**json.loads(record), "host": "another-machine"}))
    busy = process_image(image, out, model, config=config, owner="next run", ttl_s=ttl_s)
    assert (busy.status, busy.reason) == ("busy", "claimed by killed run")

    paths.lock.write_text(record)  # a fresh heartbeat, but no process behind it
    done = process_image(image, out, model, config=config, owner="next run", ttl_s=ttl_s)
    assert (done.status, done.reason) == ("segmented", "previous run running: resuming")
    assert (done.tiles_computed, done.tiles_skipped) == (4, 2), "only the 2 blocks left"
    state = archive.read_state(paths.state)
    assert (state["status"], state["failures"], state["owner"]) == ("complete", 0, "next run")
    assert not paths.lock.exists() and not list(out.glob("*.reclaim-*"))
    assert [r["image"] for r in catalog.read_records(out)] == ["a.ome.tif"]

    reference, reference_out, reference_paths = _one_image(tmp_path / "uninterrupted", slide)
    process_image(reference, reference_out, model, config=config)
    expected = _result_arrays(reference_paths.result)
    assert _result_arrays(paths.result) == expected, "not bit-identical to an uninterrupted run"


def test_a_live_run_past_max_killed_attempts_is_busy_and_a_dead_one_held(
    tmp_path, slide, random_checkpoint
):
    """A "running" sidecar at MAX_KILLED_ATTEMPTS is a dead run's or a live one's; the claim
    tells them apart: held while the lock is stale or gone, busy while its run holds it."""
    image, out, paths = _one_image(tmp_path, slide)
    left = []

    def killed(*args, **kwargs):
        left.append(paths.state.read_text())
        raise RuntimeError("stands in for SIGKILL")

    for _ in range(MAX_KILLED_ATTEMPTS):
        with pytest.raises(RuntimeError):
            process_image(image, out, random_checkpoint, config=CONFIG, run_segment=killed)
        paths.state.write_text(left[-1])
    assert process_image(image, out, random_checkpoint, config=CONFIG).status == "held"
    assert not paths.lock.exists(), "a held image's claim is let go"
    with try_claim(paths.lock, owner="the live run"):
        busy = process_image(image, out, random_checkpoint, config=CONFIG)
    assert (busy.status, busy.reason) == ("busy", "claimed by the live run")


def test_a_failure_is_counted_once(tmp_path, slide, random_checkpoint):
    """The attempt counted at its start is the failure: an Exception adds nothing more."""
    image, out, paths = _one_image(tmp_path, slide)
    seen = []

    def corrupt(*args, **kwargs):
        seen.append(archive.read_state(paths.state)["failures"])
        raise ValueError("corrupt tile directory")

    with pytest.raises(ValueError, match="corrupt"):
        process_image(image, out, random_checkpoint, config=CONFIG, run_segment=corrupt)
    state = archive.read_state(paths.state)
    assert seen == [1] and (state["status"], state["failures"]) == ("failed", 1)


@pytest.mark.parametrize(
    "stop",
    [
        KeyboardInterrupt(),
        SystemExit(),
        concurrent.futures.CancelledError(),
        FutureCancelledError("segpipe-block-0", "client-close"),
    ],
    ids=["ctrl-c", "exit", "cancelled", "dask-cancelled"],
)
def test_an_interrupted_run_is_no_failure_and_resumes_at_once(
    tmp_path, slide, random_checkpoint, stop
):
    """Ctrl-C, a shutdown, a Prefect cancellation, a future cancelled as the run's cluster
    closes (an Exception, as when deciding) stop the run, not the image: "interrupted", the
    count as it was before the attempt, and the next run resumes it at once."""
    import segpipe

    image, out, paths = _one_image(tmp_path, slide)

    def corrupt(*args, **kwargs):
        raise ValueError("share gone")

    def stopped_after_the_first_task(source, output, model, config, **kw):
        def stop_now(done, todo):
            raise stop

        return segpipe.segment(source, output, model, config, on_progress=stop_now, **kw)

    with pytest.raises(ValueError, match="share gone"):
        process_image(image, out, random_checkpoint, config=CONFIG, run_segment=corrupt)
    _age_failure(paths, 3600)
    with pytest.raises(type(stop)):
        process_image(
            image, out, random_checkpoint, config=CONFIG, run_segment=stopped_after_the_first_task
        )
    state = archive.read_state(paths.state)
    assert (state["status"], state["failures"]) == ("interrupted", 1)
    assert state["reason"].startswith(type(stop).__name__)
    assert not paths.lock.exists()
    again = process_image(image, out, random_checkpoint, config=CONFIG)
    assert (again.status, again.reason) == ("segmented", "previous run interrupted: resuming")
    assert again.tiles_skipped > 0
    assert archive.read_state(paths.state)["failures"] == 0


def test_a_lost_claim_stops_segmenting_within_a_task(tmp_path, slide, random_checkpoint):
    """Another run takes the image over (our lock had gone stale) after the first task: the
    real segment stops there, nothing more is recorded, and the new owner's lock stays."""
    import segpipe

    image, out, paths = _one_image(tmp_path, slide)
    theirs = {"owner": "the other run", "token": "theirs", "ttl_s": 600.0}
    reported = []

    def taken_over(source, output, model, config, *, on_progress=None, **kw):
        def after_each_task(done, todo):
            reported.append(done)
            paths.lock.write_text(json.dumps(theirs))
            if on_progress is not None:
                on_progress(done, todo)

        return segpipe.segment(source, output, model, config, on_progress=after_each_task, **kw)

    one_tile_a_task = CONFIG.replace(task_tiles=1)  # 4 tasks of the 128 px slide
    with pytest.raises(ClaimLostError):
        process_image(image, out, random_checkpoint, config=one_tile_a_task, run_segment=taken_over)
    assert reported == [1], "no task reported after the first"
    assert not is_complete(paths.result)
    assert json.loads(paths.lock.read_text())["token"] == "theirs"
    assert archive.read_state(paths.state)["status"] == "running", "not ours to write"


def test_a_missing_catalog_record_is_written_only_under_the_claim(
    tmp_path, slide, random_checkpoint, monkeypatch
):
    from segpipe.archive import process

    source, out = _archive(tmp_path, slide, "a.ome.tif"), tmp_path / "out"
    (image,) = discover_images(source)
    process_image(image, out, random_checkpoint, config=CONFIG)
    claims = []
    real_claim = process.try_claim
    monkeypatch.setattr(
        process, "try_claim", lambda *a, **k: claims.append(1) or real_claim(*a, **k)
    )
    assert process_image(image, out, random_checkpoint, config=CONFIG).status == "skipped"
    assert claims == [], "an up-to-date image with its record takes no lock"

    shutil.rmtree(out / catalog.CATALOG_DIR)
    with try_claim(image_paths(out, "a.ome.tif").lock, owner="the other run"):
        # The other run may be replacing the result: its record is the other run's to write.
        held = process_image(image, out, random_checkpoint, config=CONFIG)
        assert held.status == "skipped"
        assert catalog.read_records(out) == []
    again = process_image(image, out, random_checkpoint, config=CONFIG)
    assert again.status == "skipped" and len(claims) == 2
    assert [r["image"] for r in catalog.read_records(out)] == ["a.ome.tif"]


def test_an_image_that_changes_while_it_is_segmented_is_done_again(
    tmp_path, slide, random_checkpoint
):
    import segpipe
    from segpipe.archive import reports

    source, out = _archive(tmp_path, slide, "a.ome.tif"), tmp_path / "out"
    (image,) = discover_images(source)
    paths = image_paths(out, "a.ome.tif")

    def scanner_still_writing(source, output, model, config, **kw):
        result = segpipe.segment(source, output, model, config, **kw)
        with open(source, "ab") as f:
            f.write(b"\0" * 10)
        return result

    moved = process_image(
        image, out, random_checkpoint, config=CONFIG, run_segment=scanner_still_writing
    )
    assert (moved.status, moved.reason) == ("changed", "image changed while segmenting")
    state = archive.read_state(paths.state)
    assert (state["status"], state["reason"]) == ("changed", "image changed while segmenting")
    assert catalog.read_records(out) == [] and not paths.report.exists()
    summary = reports.describe_run([moved])
    assert summary.endswith(", 1 changed while segmenting, due again (a.ome.tif)")

    (image,) = discover_images(source)
    again = process_image(image, out, random_checkpoint, config=CONFIG)
    assert (again.status, again.reason) == ("segmented", "image changed")
    assert (again.tiles_computed, again.tiles_skipped) == (4, 0)
    assert archive.read_state(paths.state)["fingerprint"]["size"] == image.size


def _changes_while_segmented(paths, older_attempts_files=False):
    """A run_segment writing a small result (no segmentation) while the image changes (a
    scanner still writing it); with ``older_attempts_files``, a report and a thumbnail of an
    older attempt lie at the image's paths meanwhile."""
    import numpy as np
    from test_query import make_result

    def segment(source, output, model, config, **kwargs):
        make_result(output, np.zeros((16, 16), np.uint8))
        if older_attempts_files:
            paths.thumbnail.write_bytes(b"an older attempt's thumbnail")
            paths.report.write_text("an older attempt's report")
        with open(source, "ab") as f:
            f.write(b"\0" * 10)

    return segment


def test_a_changed_outcome_names_no_older_attempts_report_or_thumbnail(
    tmp_path, slide, random_checkpoint
):
    """The report and thumbnail beside a result made while its image changed are an older
    attempt's (one that failed writing its report, say): the "changed" outcome names neither,
    or the run's report shows another result's numbers and picture for this image."""
    image, out, paths = _one_image(tmp_path, slide)
    segment = _changes_while_segmented(paths, older_attempts_files=True)
    changed = process_image(image, out, random_checkpoint, config=CONFIG, run_segment=segment)
    assert (changed.status, changed.reason) == ("changed", "image changed while segmenting")
    assert paths.report.exists() and paths.thumbnail.exists()
    assert (changed.result, changed.report, changed.thumbnail) == (str(paths.result), None, None)


def test_an_image_changed_while_segmenting_keeps_its_failure_count(
    tmp_path, slide, random_checkpoint
):
    """An image that changed under its segmentation did not fail: its sidecar keeps the
    failures in a row from before the attempt, not one more (its retry delay would grow,
    and a scanner's slow writes would count towards holding the image back)."""
    image, out, paths = _one_image(tmp_path, slide)
    with pytest.raises(ValueError, match="corrupt"):
        process_image(
            image, out, random_checkpoint, config=CONFIG, run_segment=_raises(ValueError("corrupt"))
        )
    assert archive.read_state(paths.state)["failures"] == 1
    segment = _changes_while_segmented(paths)
    changed = process_image(
        image, out, random_checkpoint, config=CONFIG, run_segment=segment, retry_failed=True
    )
    assert changed.status == "changed"
    state = archive.read_state(paths.state)
    assert (state["status"], state["failures"]) == ("changed", 1)


def test_a_run_that_lost_its_claim_while_segmenting_writes_no_changed_state(
    tmp_path, slide, random_checkpoint, monkeypatch
):
    """The "changed while segmenting" sidecar was written without checking the claim: a run
    that lost it wrote over the new holder's state."""
    import segpipe
    from segpipe.archive.claims import ClaimLostError

    source, out = _archive(tmp_path, slide, "a.ome.tif"), tmp_path / "out"
    (image,) = discover_images(source)
    paths = image_paths(out, "a.ome.tif")
    real = archive_process.fingerprint_image
    taken = []

    def taken_over_meanwhile(image, **kw):
        if taken:  # the second fingerprint, after segmenting: another run holds it now
            paths.lock.unlink()
            taken.append(try_claim(paths.lock, owner="the next run"))
            paths.state.write_text('{"status": "the next run\'s"}')
            with open(source / "a.ome.tif", "ab") as f:
                f.write(b"\0" * 10)
        taken.append(None)
        return real(image, **kw)

    monkeypatch.setattr(archive_process, "fingerprint_image", taken_over_meanwhile)
    with pytest.raises(ClaimLostError):
        process_image(image, out, random_checkpoint, config=CONFIG, run_segment=segpipe.segment)
    assert paths.state.read_text() == '{"status": "the next run\'s"}'
    taken[1].release()


def test_a_resume_that_segment_refuses_starts_again_instead_of_failing_every_run(
    tmp_path, slide, random_checkpoint
):
    """The archive's fingerprint says resume, but segment refuses the result (its recorded
    pixel sample differs: another release, another decoder): the archive's own result is
    replaced and the image segmented, not failed on every run for good."""
    import zarr

    import segpipe

    image, out, paths = _one_image(tmp_path, slide)

    def stopped(source, output, model, config, **kw):
        def stop_now(done, todo):
            raise KeyboardInterrupt

        return segpipe.segment(source, output, model, config, on_progress=stop_now, **kw)

    with pytest.raises(KeyboardInterrupt):
        process_image(image, out, random_checkpoint, config=CONFIG, run_segment=stopped)
    group = zarr.open_group(paths.result, mode="r+")
    attrs = dict(group.attrs["segpipe"])
    attrs["identity"] = attrs["identity"] | {"source_sha256": "0" * 64}
    group.attrs["segpipe"] = attrs
    again = process_image(image, out, random_checkpoint, config=CONFIG)
    assert (again.status, again.reason) == ("segmented", "previous run interrupted: resuming")
    assert again.tiles_skipped == 0, "started again: no tile of the refused result kept"
    assert is_complete(paths.result)
    assert read_meta(paths.result).source_sha256 != "0" * 64


@pytest.mark.parametrize(
    "error",
    [
        PermissionError(13, "Permission denied"),
        FileNotFoundError(2, "No such file or directory"),
        RuntimeError("s3://scans: no credentials found"),
    ],
    ids=["permission", "vanished", "store-error"],
)
def test_an_unreadable_image_backs_off_like_a_failure_and_is_tried_once_it_reads(
    tmp_path, slide, random_checkpoint, monkeypatch, error
):
    """An image that cannot even be fingerprinted (its permissions, an I/O error, gone since
    it was listed, a store's own error) is recorded failed under the claim and held until its
    retry delay, not read and failed again by every run; once it reads again it is segmented
    at once."""
    image, out, paths = _one_image(tmp_path, slide)

    def unreadable(*args, **kwargs):
        raise error

    def run():
        return process_image(image, out, random_checkpoint, config=CONFIG)

    with monkeypatch.context() as m:
        m.setattr(archive_process, "fingerprint_image", unreadable)
        with pytest.raises(type(error)):
            run()
        # Recorded beside the sidecar's fingerprint and status (none here: a new image).
        failure = archive.read_state(paths.state)["unreadable"]
        assert failure["failures"] == 1
        assert failure["reason"] == f"{type(error).__name__}: {error}"
        assert not paths.lock.exists() and not paths.result.exists()
        held = run()
        assert held.status == "held" and "failed 1 time" in held.reason
        _age_failure(paths, 11 * 60)  # past the first delay: tried, and counted, again
        with pytest.raises(type(error)):
            run()
        assert archive.read_state(paths.state)["unreadable"]["failures"] == 2
        assert run().status == "held"
    done = run()  # it reads again, within its delay: never segmented, so new
    assert (done.status, done.reason) == ("segmented", "new image")
    state = archive.read_state(paths.state)
    assert state["failures"] == 0 and "unreadable" not in state


def test_retry_failed_tries_an_image_held_for_its_read_failures_at_once(tmp_path):
    """retry_failed (the user fixed the permissions, say) tries an image held back for its
    read failures now, as it does a failed one, not after up to 6 hours of delay."""
    paths = image_paths(tmp_path, "a.tif")
    failure = {"failures": 2, "reason": "PermissionError: denied", "failed_at": _ago(60)}
    paths.state.write_text(json.dumps({"version": 3, "image": "a.tif", "unreadable": failure}))
    held = decide_unreadable(paths)
    assert (held.process, held.held, held.failures) == (False, True, 2)
    retried = decide_unreadable(paths, retry_failed=True)
    assert retried == archive.Decision(True, "unreadable", failures=2)


def test_an_image_unreadable_for_a_while_keeps_its_result_and_its_read_failures_end(
    tmp_path, slide, random_checkpoint, monkeypatch
):
    """A complete image that cannot be read for a while (an I/O error, its permissions taken
    away and given back) has not changed: once it reads again it is up to date, its result
    neither deleted nor segmented again, and its read failures are over: unreadable again
    later, it counts from one and waits the first retry delay, not the third."""
    import errno
    from datetime import datetime, timedelta

    image, out, paths = _one_image(tmp_path, slide)
    readable, real = [True], archive_process.fingerprint_image

    def fingerprint(*args, **kwargs):
        if readable[0]:
            return real(*args, **kwargs)
        raise OSError(errno.EIO, "Input/output error")

    def run():
        return process_image(image, out, random_checkpoint, config=CONFIG)

    def fails_to_read():
        readable[0] = False
        with pytest.raises(OSError, match="Input/output error"):
            run()
        readable[0] = True
        return archive.read_state(paths.state)["unreadable"]

    monkeypatch.setattr(archive_process, "fingerprint_image", fingerprint)
    run()
    complete = archive.read_state(paths.state)
    before = (paths.result / "zarr.json").stat()
    assert fails_to_read()["failures"] == 1
    _age_failure(paths, 11 * 60)  # past the first delay
    assert fails_to_read()["failures"] == 2
    again = run()
    assert (again.status, again.reason) == ("skipped", "up to date")
    after = (paths.result / "zarr.json").stat()
    assert (after.st_ino, after.st_mtime_ns) == (before.st_ino, before.st_mtime_ns)
    assert archive.read_state(paths.state) == complete, "the read failures gone, the rest kept"
    sidecar = paths.state.stat()
    assert run().status == "skipped"
    after = paths.state.stat()
    assert (after.st_ino, after.st_mtime_ns) == (sidecar.st_ino, sidecar.st_mtime_ns), (
        "nothing to clear: not written"
    )

    failure = fails_to_read()
    assert failure["failures"] == 1
    readable[0] = False
    held = run()
    retry_at = datetime.fromisoformat(failure["failed_at"]) + timedelta(seconds=retry_delay_s(1))
    assert held.status == "held"
    assert f"failed 1 time; next attempt after {retry_at:%Y-%m-%d %H:%M:%S} UTC" in held.reason


@pytest.mark.parametrize(
    ("damage", "error", "message"),
    [
        # Deciding fails on it: a result, its metadata unreadable (a state of no release).
        ({"state": "bogus"}, ValueError, "its result metadata cannot be read"),
        # JSON, but no Zarr metadata: no result any more, so never deleted; segment refuses it.
        ([], FileExistsError, "is not a segpipe result"),
    ],
    ids=["unreadable-state", "no-zarr-metadata"],
)
def test_a_result_whose_metadata_cannot_be_read_fails_the_image_which_backs_off(
    tmp_path, slide, random_checkpoint, damage, error, message
):
    """A result whose metadata is damaged fails the image like any other failure, recorded
    (count, time, a reason naming the result), held by the next runs for its retry delay,
    tried again with retry_failed, and the result left where it is."""
    import zarr

    image, out, paths = _one_image(tmp_path, slide)

    def run(**kw):
        return process_image(image, out, random_checkpoint, config=CONFIG, **kw)

    run()
    meta = paths.result / "zarr.json"
    if isinstance(damage, dict):
        group = zarr.open_group(paths.result, mode="r+")
        group.attrs["segpipe"] = dict(group.attrs["segpipe"]) | damage
    else:
        meta.write_text(json.dumps(damage))
    damaged = meta.read_bytes()
    with try_claim(paths.lock, owner="the other run"):
        assert run().status == "busy"  # its holder decides again, and records what it finds
    assert archive.read_state(paths.state)["status"] == "complete"
    with pytest.raises(error, match=message) as raised:
        run()
    state = archive.read_state(paths.state)
    assert (state["status"], state["failures"]) == ("failed", 1) and state["failed_at"]
    reason = f"{error.__name__}: {raised.value}"
    assert state["reason"] == reason and str(paths.result) in reason
    assert not paths.lock.exists()
    held = run()
    assert held.status == "held" and "failed 1 time" in held.reason
    with pytest.raises(error, match=re.escape(str(paths.result))):  # tried: the same damage
        run(retry_failed=True)
    assert archive.read_state(paths.state)["failures"] == 2
    assert meta.read_bytes() == damaged and paths.report.is_file() and paths.thumbnail.is_file()


def test_a_sidecar_field_deciding_fails_on_is_recorded_over_and_the_image_backs_off(
    tmp_path, slide, random_checkpoint
):
    """A sidecar field of the wrong type makes deciding raise: recorded as a failure in a
    sidecar the next runs can read (so they hold the image for its retry delay, not fail on
    it at once), and retry_failed tries the image again."""
    image, out, paths = _one_image(tmp_path, slide)

    def run(**kw):
        return process_image(image, out, random_checkpoint, config=CONFIG, **kw)

    run()
    state = archive.read_state(paths.state)
    paths.state.write_text(json.dumps(state | {"version": "3"}))
    with pytest.raises(TypeError):
        run()
    failed = archive.read_state(paths.state)
    assert (failed["status"], failed["failures"], failed["version"]) == ("failed", 1, 3)
    assert failed["fingerprint"] == state["fingerprint"] and failed["reason"].startswith("Type")
    assert run().status == "held"
    again = run(retry_failed=True)
    assert again.status == "segmented" and is_complete(paths.result)
    assert archive.read_state(paths.state)["status"] == "complete"


# Result settings as older releases recorded them: before task_tiles was one (it ran with its
# default), and the level of a version 1 sidecar (0, the default then: None now).
_WITHOUT_TASK_TILES = {k: v for k, v in CONFIG.result_settings().items() if k != "task_tiles"}
_V1_LEVEL_0 = CONFIG.result_settings() | {"level": 0}


@pytest.mark.parametrize(
    ("recorded", "failures", "stale"),
    [
        ({"status": "failed", "failures": 4}, 5, False),
        ({"status": "failed"}, 2, False),  # written before counts were: one failure
        ({"status": "complete", "failures": 0}, 1, False),
        # A field of another type: read as no sidecar, so nothing says whose the result is.
        ({"status": "failed", "failures": "four"}, 1, True),
        # Other inputs: a result there is theirs, which these must not resume.
        ({"status": "failed", "failures": 4, "model_sha256": "m0"}, 1, True),
        ({"status": "failed", "failures": 1, "stale_result": True}, 2, True),
        # An older release's sidecar, as decide reads it: the same inputs.
        ({"status": "failed", "failures": 2, "params": _WITHOUT_TASK_TILES}, 3, False),
        ({"status": "failed", "version": 1, "params": _V1_LEVEL_0}, 2, False),
        ({"status": "failed", "version": "one", "params": _V1_LEVEL_0}, 1, True),
    ],
)
def test_an_error_deciding_counts_on_from_the_failures_of_the_same_inputs(
    tmp_path, recorded, failures, stale
):
    paths, fp, state = _sidecar(tmp_path)
    paths.state.write_text(json.dumps(state | recorded))
    run = {"fingerprint": fp.as_dict(), "model_sha256": "m1", "params": CONFIG.result_settings()}
    failed = undecided_state(paths, run, ValueError("damaged"), unreadable=False)
    assert (failed["status"], failed["failures"]) == ("failed", failures)
    assert failed["reason"] == "ValueError: damaged" and failed["failed_at"]
    assert failed.get("stale_result", False) is stale
    paths.state.write_text(json.dumps(failed))
    assert decide(paths, fp, "m1", CONFIG).held
    paths.result.mkdir()
    again = decide(paths, fp, "m1", CONFIG, retry_failed=True)
    assert (again.resume, again.reason) == (
        (False, "previous run failed: starting again")
        if stale
        else (True, "previous run failed: resuming")
    )


def test_an_older_sidecars_result_outlives_an_error_deciding(
    tmp_path, slide, random_checkpoint, monkeypatch
):
    """A complete result whose sidecar an older release wrote (without a setting added since)
    is up to date; a store's error while deciding fails the image, and the retry resumes the
    result (every tile done) rather than deleting and computing it anew."""
    import segpipe.archive.state as archive_state

    image, out, paths = _one_image(tmp_path, slide)

    def run(**kw):
        return process_image(image, out, random_checkpoint, config=CONFIG, **kw)

    assert run().status == "segmented"
    state = archive.read_state(paths.state)
    paths.state.write_text(json.dumps(state | {"params": _WITHOUT_TASK_TILES}))
    assert run().status == "skipped"
    made = (paths.result / "zarr.json").stat().st_mtime_ns
    real, errors = archive_state.read_meta, [2]  # before the claim, and under it

    def flaky(path):
        if errors[0]:
            errors[0] -= 1
            raise OSError("503 Slow Down")
        return real(path)

    monkeypatch.setattr(archive_state, "read_meta", flaky)
    with pytest.raises(OSError, match="Slow Down"):
        run()
    assert not archive.read_state(paths.state).get("stale_result")
    again = run(retry_failed=True)
    assert (again.status, again.reason) == ("segmented", "previous run failed: resuming")
    assert (paths.result / "zarr.json").stat().st_mtime_ns == made


@pytest.mark.parametrize(
    "stop", [KeyboardInterrupt, archive.RunStopped, concurrent.futures.CancelledError]
)
@pytest.mark.parametrize("when", ["before the claim", "under the claim"])
def test_a_stop_while_deciding_is_no_failure_and_records_nothing(
    tmp_path, slide, random_checkpoint, monkeypatch, stop, when
):
    """The run's stop raised while an image is decided (Ctrl-C; RunStopped; a cancelled
    future, an Exception) passes through as it is: not the image's failure, nothing recorded."""
    image, out, paths = _one_image(tmp_path, slide)
    calls = []

    def stopped(*args, **kwargs):
        calls.append(1)
        if when == "before the claim" or len(calls) > 1:
            raise stop
        return decide(*args, **kwargs)

    monkeypatch.setattr(archive_process, "decide", stopped)
    with pytest.raises(stop):
        process_image(image, out, random_checkpoint, config=CONFIG)
    assert len(calls) == (1 if when == "before the claim" else 2)
    assert not paths.state.exists() and not paths.lock.exists()


@pytest.mark.parametrize("text", ["5", "[1]", '"complete"'])
def test_a_sidecar_that_is_no_json_object_is_read_as_none(tmp_path, text):
    paths, fp, _ = _sidecar(tmp_path)
    paths.state.write_text(text)
    assert archive.read_state(paths.state) is None
    assert decide(paths, fp, "m1", CONFIG).reason == "new image"
    assert decide_unreadable(paths).process


def test_a_resume_started_again_leaves_no_record_of_the_result_it_deleted(
    tmp_path, slide, random_checkpoint
):
    """A run indexed its result, then died before writing "complete". The next run resumes,
    segment refuses the result, which is deleted to start again: should that attempt fail
    too, the catalog keeps no record of the deleted result."""
    from segpipe.results import ResultMismatchError

    image, out, paths = _one_image(tmp_path, slide)
    process_image(image, out, random_checkpoint, config=CONFIG)
    state = archive.read_state(paths.state)
    paths.state.write_text(json.dumps(state | {"status": "interrupted"}))
    calls = []

    def refused_then_failing(*args, **kwargs):
        calls.append(1)
        if len(calls) == 1:
            raise ResultMismatchError(f"{paths.result}: made from other pixels")
        raise OSError("worker lost")

    with pytest.raises(OSError, match="worker lost"):
        process_image(
            image, out, random_checkpoint, config=CONFIG, run_segment=refused_then_failing
        )
    assert len(calls) == 2 and not paths.result.exists()
    assert catalog.read_records(out) == []


@pytest.mark.parametrize("during", ["report", "catalog"])
def test_a_claim_lost_while_reporting_commits_nothing_after_it(
    tmp_path, slide, random_checkpoint, monkeypatch, during
):
    """Another run takes the image over while the report (or the catalog record) is written:
    no catalog record after a lost report, no "complete" sidecar after either."""
    from segpipe.archive import reports

    image, out, paths = _one_image(tmp_path, slide)
    module, name = (reports, "image_report") if during == "report" else (catalog, "record_result")
    real = getattr(module, name)

    def taken_over(*args, **kwargs):
        paths.lock.write_text(json.dumps({"owner": "the other run", "token": "theirs"}))
        return real(*args, **kwargs)

    monkeypatch.setattr(module, name, taken_over)
    with pytest.raises(ClaimLostError):
        process_image(image, out, random_checkpoint, config=CONFIG)
    assert archive.read_state(paths.state)["status"] == "running", "not ours to write"
    assert json.loads(paths.lock.read_text())["token"] == "theirs"
    if during == "report":
        assert catalog.read_records(out) == []


def test_a_stopped_run_stops_its_image_which_is_interrupted_not_failed(
    tmp_path, slide, random_checkpoint
):
    """The run's main thread got Ctrl-C (or SIGTERM, a cancellation) and set ``stop``: the
    image segmenting in another thread stops at its next progress report, "interrupted" and
    not counted; an image not started yet is not started."""
    import segpipe

    image, out, paths = _one_image(tmp_path, slide)
    stop, reported = threading.Event(), []

    def stopped_meanwhile(source, output, model, config, *, on_progress, **kw):
        def after_each_task(done, todo):
            reported.append(done)
            stop.set()
            on_progress(done, todo)

        return segpipe.segment(source, output, model, config, on_progress=after_each_task, **kw)

    one_tile_a_task = CONFIG.replace(task_tiles=1)
    with pytest.raises(archive.RunStopped):
        process_image(
            image,
            out,
            random_checkpoint,
            config=one_tile_a_task,
            run_segment=stopped_meanwhile,
            stop=stop,
        )
    assert reported == [1]
    state = archive.read_state(paths.state)
    assert (state["status"], state["failures"]) == ("interrupted", 0)
    assert not paths.lock.exists()
    with pytest.raises(archive.RunStopped):
        process_image(image, out, random_checkpoint, config=CONFIG, stop=stop)
    assert archive.read_state(paths.state) == state, "not started, nothing recorded"


def test_the_thumbnail_closes_the_image_it_opened(tmp_path, slide, random_checkpoint, monkeypatch):
    import segpipe
    from segpipe.archive import reports

    result = segpipe.segment(slide, tmp_path / "a.seg.zarr", random_checkpoint, CONFIG)
    real_open, closed = reports.open_image, []

    def tracked(*args, **kwargs):
        reader = real_open(*args, **kwargs)
        real_close = reader.close
        reader.close = lambda: closed.append(1) or real_close()
        return reader

    monkeypatch.setattr(reports, "open_image", tracked)
    reports.write_thumbnail(slide, result, tmp_path / "a.thumb.png")
    assert closed == [1]
    monkeypatch.setattr(reports, "thumbnail_level", lambda *a, **k: 1 / 0)
    with pytest.raises(ZeroDivisionError):
        reports.write_thumbnail(slide, result, tmp_path / "b.thumb.png")
    assert closed == [1, 1]


def test_a_changed_image_that_fails_leaves_no_report_of_the_result_deleted(
    tmp_path, slide, random_checkpoint
):
    """Re-scanned and cut short: its result and catalog record went, but its report and
    thumbnail stayed, showing a deleted result's class table."""
    image, out, paths = _one_image(tmp_path, slide)
    assert process_image(image, out, random_checkpoint, config=CONFIG).status == "segmented"
    assert paths.report.is_file() and paths.thumbnail.is_file()
    whole = Path(image.url).read_bytes()
    Path(image.url).write_bytes(whole[: len(whole) // 3])
    (changed,) = discover_images(tmp_path / "archive")
    from segpipe.io.readers import ImageReadError

    with pytest.raises(ImageReadError, match=r"a\.ome\.tif"):
        process_image(changed, out, random_checkpoint, config=CONFIG)
    assert not paths.result.exists() and catalog.read_records(out) == []
    assert not paths.report.exists() and not paths.thumbnail.exists()
    assert archive.read_state(paths.state)["status"] == "failed"


def test_images_whose_last_attempt_never_ended_go_last_in_their_order(tmp_path):
    """Several killed ones keep their order after the others; a sidecar that cannot be read
    (here a folder in its place) fails nothing: that image's own attempt will say why."""
    from types import SimpleNamespace

    out = tmp_path / "out"
    images = [SimpleNamespace(key=k) for k in ("a.tif", "b.tif", "c.tif", "d.tif", "e.tif")]
    for key, status in (("a.tif", "running"), ("c.tif", "running"), ("d.tif", "complete")):
        state = image_paths(out, key).state
        state.parent.mkdir(parents=True, exist_ok=True)
        state.write_text(json.dumps({"status": status}))
    image_paths(out, "e.tif").state.mkdir()
    order = [i.key for i in archive.killed_last(images, out)]
    assert order == ["b.tif", "d.tif", "e.tif", "a.tif", "c.tif"]


@pytest.mark.parametrize(
    ("status", "field", "failures"),
    [("failed", "failed_at", 1), ("running", "updated", MAX_KILLED_ATTEMPTS)],
)
def test_a_sidecar_time_without_a_zone_is_no_time_to_wait_from(tmp_path, status, field, failures):
    """A failure time written without a zone (by hand, by another tool) cannot be compared
    with the aware now: the image is due now rather than the decision raising TypeError."""
    paths, fp, state = _sidecar(tmp_path)
    naive = datetime.now().isoformat(timespec="seconds")  # zoned, it would be held for its delay
    assert datetime.fromisoformat(naive).tzinfo is None, "the case this test is about"
    state |= {"status": status, "failures": failures, field: naive}
    state |= {"reason": "OSError: share gone"} if status == "failed" else {"owner": "run-7"}
    paths.state.write_text(json.dumps(state))
    decision = decide(paths, fp, "m1", CONFIG)
    assert (decision.process, decision.held, decision.failures) == (True, False, failures)
    # The same for a read failure, recorded apart.
    unreadable = {"failures": 1, "failed_at": naive, "reason": "PermissionError: denied"}
    paths.state.write_text(json.dumps({"unreadable": unreadable}))
    assert decide_unreadable(paths).process
