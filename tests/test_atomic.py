import hashlib
import os
import signal
import socket
import stat
import subprocess
import sys
import textwrap

import pytest

from segpipe.atomic import _namespace_key, pid_namespace, replaced_file, scratch_file


def _litter(folder):
    return sorted(p.name for p in folder.iterdir() if p.name.startswith("."))


def test_the_written_file_replaces_the_old_one_with_the_users_permissions(tmp_path):
    target = tmp_path / "new" / "folder" / "model.pt"  # folders made as needed
    script = textwrap.dedent(
        f"""
        from pathlib import Path
        from segpipe.atomic import replaced_file
        target = Path({str(target)!r})
        for text in ("first", "second"):
            with replaced_file(target) as part:
                assert part.parent == target.parent and part != target
                part.write_text(text)
                assert not target.exists() or target.read_text() == "first"
            assert target.read_text() == text
        """
    )
    # The umask is read at import (reading it sets it): a process of its own sets it first.
    subprocess.run([sys.executable, "-c", script], check=True, umask=0o027)
    assert target.read_text() == "second"
    # mkstemp's 0600 would hide a shared root's checkpoint from the group; the umask decides.
    assert stat.S_IMODE(target.stat().st_mode) == 0o640
    assert _litter(target.parent) == []


def test_an_unwritable_place_is_named_not_the_temporary_file(tmp_path):
    (tmp_path / "folder.pt").mkdir()
    with (
        pytest.raises(IsADirectoryError, match=r"\S*/folder\.pt cannot be written: Is a dir"),
        replaced_file(tmp_path / "folder.pt") as part,
    ):
        part.write_text("x")
    assert [p.name for p in tmp_path.iterdir()] == ["folder.pt"]
    if os.path.isdir("/proc/self"):  # takes no new files, even from root
        with (
            pytest.raises(FileNotFoundError, match=r"^\[Errno 2\] /proc/x\.pt cannot be wr"),
            replaced_file("/proc/x.pt") as part,
        ):
            part.write_text("x")


@pytest.mark.parametrize("error", [ValueError("bad payload"), KeyboardInterrupt()])
def test_a_failed_write_leaves_the_old_file_and_no_copy(tmp_path, error):
    target = tmp_path / "state.json"
    target.write_text("old")

    def write_then_fail():
        with replaced_file(target) as part:
            part.write_text("half of the ne")
            raise error

    with pytest.raises(type(error)):
        write_then_fail()
    assert target.read_text() == "old"
    assert _litter(tmp_path) == []


def test_a_kill_mid_write_leaves_the_old_file_readable(tmp_path):
    target = tmp_path / "weights.pt"
    target.write_bytes(b"old weights")
    script = textwrap.dedent(
        f"""
        import os, signal
        from segpipe.atomic import replaced_file
        with replaced_file({str(target)!r}) as part:
            with open(part, "wb") as f:
                f.write(b"new wei")
                f.flush()
                os.kill(os.getpid(), signal.SIGKILL)
        """
    )
    run = subprocess.run([sys.executable, "-c", script], check=False)
    assert run.returncode == -signal.SIGKILL
    assert target.read_bytes() == b"old weights"
    # The killed write's copy stays (nothing ran to remove it), under a name of its own that
    # says who wrote it; the next write removes it (its pid is gone), not another's.
    (left,) = _litter(tmp_path)
    host = _hash(socket.gethostname())
    assert left.startswith(f".weights.pt.{host}-") and left.endswith(".part")
    boot, ns = _namespace_key(pid_namespace()) or ("", "")
    alive = tmp_path / f".weights.pt.{host}-{os.getpid()}-{boot}.{ns}-x.part"
    alive.write_bytes(b"a write of this process, under way")
    # On a shared folder: another machine's, even one whose name this one's begins, and
    # another container's of this host name (its pids are not this one's)
    elsewhere = [
        tmp_path / f".weights.pt.{_hash(socket.gethostname() + '-7')}-1-x.part",
        tmp_path / f".weights.pt.{host}-1-{boot}.1-x.part",
    ]
    # An earlier boot's, whatever its pid (this process's own here), and an older release's
    # (no namespace in its name) of a pid that is gone
    gone = [
        tmp_path / f".weights.pt.{host}-{os.getpid()}-{_hash('another boot')}.{ns}-x.part",
        tmp_path / f".weights.pt.{host}-{_dead_pid()}-x.part",
    ]
    for path in elsewhere + gone:
        path.write_bytes(b"another's write")
    with replaced_file(target) as part:
        part.write_bytes(b"new weights")
    assert target.read_bytes() == b"new weights"
    assert sorted(_litter(tmp_path)) == sorted([alive.name, *(p.name for p in elsewhere)])


def _dead_pid() -> int:
    done = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                          capture_output=True, text=True, check=True)  # fmt: skip
    return int(done.stdout)


def _hash(host: str) -> str:
    return hashlib.sha256(host.encode()).hexdigest()[:12]


@pytest.mark.parametrize("name", ["m.pt", "m" * 160 + ".pt"], ids=["short", "long"])
def test_a_scratch_file_written_whole_and_killed_is_removed_by_the_next_write(tmp_path, name):
    """A scored model's copy is a scratch file written through replaced_file: a kill then
    left the scratch's own copy for good (of a long name, too, cut where a glob of copies
    of copies missed it); the scratch's folder now holds it, and goes whole."""
    target = tmp_path / name
    script = textwrap.dedent(
        f"""
        import os, signal
        from segpipe.atomic import _namespace_key, pid_namespace, replaced_file, scratch_file
        with scratch_file({str(target)!r}) as scratch:
            with replaced_file(scratch) as part:
                part.write_bytes(b"half a model")
                os.kill(os.getpid(), signal.SIGKILL)
        """
    )
    run = subprocess.run([sys.executable, "-c", script], check=False)
    assert run.returncode == -signal.SIGKILL
    (left,) = _litter(tmp_path)
    (copy,) = (tmp_path / left).iterdir()  # replaced_file's copy of the scratch, killed
    assert copy.read_bytes() == b"half a model"
    with scratch_file(target) as scratch:
        assert _litter(tmp_path) == [scratch.parent.name] and scratch.name == name
        scratch.write_bytes(b"a model")
    assert _litter(tmp_path) == []


def test_writers_at_once_each_land_whole(tmp_path):
    """Processes replacing one file at once, each writing it in pieces as a slow disk does,
    while it is read over and over: every read is one writer's whole text, and nothing is
    left beside it."""
    target = tmp_path / "report.txt"
    target.write_text("0" * 100_000)
    script = textwrap.dedent(
        f"""
        import sys, time
        from segpipe.atomic import replaced_file
        text = sys.argv[1] * 100_000
        for _ in range(20):
            with replaced_file({str(target)!r}) as part:
                with open(part, "w") as f:
                    for k in range(0, len(text), 10_000):
                        f.write(text[k : k + 10_000])
                        f.flush()
                        time.sleep(0.001)
        """
    )
    writers = [subprocess.Popen([sys.executable, "-c", script, str(i)]) for i in range(1, 4)]
    seen = set()
    while any(w.poll() is None for w in writers):
        seen.add(target.read_text())
    assert [w.wait() for w in writers] == [0, 0, 0]
    assert seen <= {str(i) * 100_000 for i in range(4)}, "a read saw a part-written file"
    assert len(seen) > 1, "no read came while the writers wrote"
    assert target.read_text() in seen | {str(i) * 100_000 for i in range(1, 4)}
    assert _litter(tmp_path) == []


@pytest.mark.parametrize("name", ["n" * 250 + ".pt", "é" * 118 + ".json"], ids=["ascii", "utf-8"])
def test_a_long_name_fits_the_file_systems_limit(tmp_path, name):
    """A temporary name of 1 + 250 + 13 would not fit; 150 characters of 2-byte letters are
    300 bytes (NAME_MAX counts bytes): a 241-byte name that wrote before failed."""
    target = tmp_path / name
    with replaced_file(target) as part:
        part.write_bytes(b"x")
    assert target.read_bytes() == b"x"


@pytest.mark.parametrize(
    ("error", "named"),
    [
        (OSError(28, "No space left on device"), True),
        (OSError(28, "No space left on device", "/x/part"), False),  # names its file already
        (OSError(13, "Permission denied"), False),  # not the disk's: raised as it is
        (OSError(5, "Input/output error"), False),  # a failing source's read raises it too
        (ConnectionError("no scheduler"), False),
    ],
)
def test_a_full_disk_is_named_by_the_store_being_written(error, named):
    import re

    from segpipe.atomic import write_errors_named

    with (
        pytest.raises(OSError, match=re.escape(error.strerror or str(error))) as raised,
        write_errors_named("/data/out.seg.zarr"),
    ):
        raise error
    assert (raised.value is not error) == named
    if named:
        assert raised.value.filename == "/data/out.seg.zarr" and raised.value.errno == 28
