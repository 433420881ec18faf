"""The run lock of a local result (segpipe.results.lock): one run at a time writes it."""

import json
import os
import re
import signal
import socket

import pytest
from test_results import meta, store_files

import segpipe
from segpipe.io.files import URLPath
from segpipe.io.locks import lock_path
from segpipe.results import (
    ResultBusyError,
    delete_result,
    is_result,
    prepare_result,
    read_meta,
    result_lock,
)


def test_a_second_run_in_another_process_is_refused_naming_the_holder(tmp_path, held_elsewhere):
    path = tmp_path / "r.seg.zarr"
    holder = held_elsewhere(path)
    with pytest.raises(ResultBusyError) as raised, result_lock(path):
        pass
    message = str(raised.value)
    for part in (str(path), f"pid {holder.pid} on {socket.gethostname()}", "wait", "stop it"):
        assert part in message, message
    assert "this process" not in message
    # The holder, from the lock file its holder wrote: since when, to the second.
    since = json.loads(lock_path(path).read_text())["since"]
    assert f"since {since}" in message
    assert not path.exists(), "the lock is beside the result, not in it"


def test_the_lock_of_a_killed_run_is_free_at_once_and_its_file_stays(tmp_path, held_elsewhere):
    """SIGKILL leaves no chance to clean up: the kernel releases the flock with the process."""
    path = tmp_path / "r.seg.zarr"
    holder = held_elsewhere(path)
    with pytest.raises(ResultBusyError), result_lock(path):
        pass
    holder.send_signal(signal.SIGKILL)
    assert holder.wait() == -signal.SIGKILL
    with result_lock(path):
        record = json.loads(lock_path(path).read_text())
        assert (record["pid"], record["host"]) == (os.getpid(), socket.gethostname())
    # Never deleted: a file removed while another run opens it would be locked apart from
    # the one a third run creates anew.
    assert lock_path(path).exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == [".r.seg.zarr.lock"]


def test_a_second_run_in_the_same_process_is_refused(tmp_path):
    path = tmp_path / "r.seg.zarr"
    with result_lock(path):
        with pytest.raises(ResultBusyError, match="another run in this process"), result_lock(path):
            pass
        with pytest.raises(ResultBusyError, match=f"pid {os.getpid()} "), result_lock(str(path)):
            pass
    with result_lock(path):  # released with the body
        pass


def test_a_result_reached_through_a_link_shares_the_lock_of_its_target(tmp_path):
    target, link = tmp_path / "real.zarr", tmp_path / "r.zarr"
    target.mkdir()
    link.symlink_to(target, target_is_directory=True)
    assert lock_path(link) == tmp_path / ".real.zarr.lock"
    with result_lock(target), pytest.raises(ResultBusyError), result_lock(link):
        pass


def test_a_url_result_takes_no_lock(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    url = URLPath(f"memory://lock-{os.getpid()}/r.zarr")
    with result_lock(url), result_lock(url):
        pass
    assert list(tmp_path.iterdir()) == [], "no local file for a URL"


def test_a_result_another_run_holds_is_not_deleted(tmp_path, held_elsewhere):
    path = tmp_path / "r.zarr"
    prepare_result(path, meta())
    before = store_files(path)
    holder = held_elsewhere(path)
    with pytest.raises(ResultBusyError, match=f"pid {holder.pid} "):
        delete_result(path)
    assert store_files(path) == before
    holder.kill()
    holder.wait()
    delete_result(path)
    assert not path.exists()


@pytest.mark.parametrize("there", ["nothing", "another result"])
def test_segment_into_a_result_another_run_holds_fails_before_writing_anything(
    tmp_path, held_elsewhere, small_slide, random_checkpoint, there
):
    """Run B (overwrite, other settings) into the result run A is writing: B stops with
    ResultBusyError before it prepares anything, A's result (or the empty path) as it was;
    once A is gone (killed), B runs."""
    out = tmp_path / "r.seg.zarr"
    settings = {"tile": 64, "task_tiles": 1, "foreground": "none", "scheduler": "sync"}
    if there == "another result":
        prepare_result(out, meta())  # run A's, started
    before = store_files(out) if out.exists() else None
    holder = held_elsewhere(out)
    with pytest.raises(ResultBusyError, match=re.escape(f"{out} is in use by another segpipe")):
        segpipe.segment(small_slide.image, out, random_checkpoint, overwrite=True, **settings)
    assert (store_files(out) if out.exists() else None) == before
    assert sorted(p.name for p in tmp_path.iterdir() if p.name != ".r.seg.zarr.lock") == (
        ["r.seg.zarr"] if before else []
    ), "no skeleton built beside it either"
    holder.kill()
    holder.wait()
    segpipe.segment(small_slide.image, out, random_checkpoint, overwrite=True, **settings)
    assert is_result(out) and read_meta(out).state == "complete" and read_meta(out).tile == 64
