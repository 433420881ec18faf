"""One run at a time per local result (an exclusive ``flock`` on a lock file beside it), and
what a write that got past it leaves at the result's path (:func:`is_debris`).

The ``started`` stamp (:func:`~segpipe.results.tiles.check_not_replaced`) lets a run notice,
before each write, that another has replaced its result; between that check and the write
the other run can still replace it, and the write then lands in (or recreates) the new one.
Two runs on one machine or one shared file system never get there: :func:`segpipe.segment`
holds :func:`result_lock` from before it prepares its result until after it finalises it, and
:func:`~segpipe.results.store.delete_result` while it deletes, so a second run stops at once
with :class:`ResultBusyError`, before it writes anything.

The kernel releases a ``flock`` when its holder's last descriptor closes, so a run killed
(SIGKILL, the OOM killer) frees its result at once and the next run resumes it. What the lock
does not cover: a result at a URL (object storage has no locks; the stamp alone guards it),
and the tasks of a run whose driver died while its cluster's workers go on: the lock went with
the driver and those tasks are stopped only by the stamp. Such a late write by path, into a
result a new run has renamed away, makes the folders of its chunk anew: a folder of chunks
with no ``zarr.json``, which the next run recognises (:func:`is_debris`) and removes.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import logging
import os
import re
import socket
from collections.abc import Iterator
from pathlib import Path

from segpipe.io.files import URLPath, utc_now

__all__ = ["ResultBusyError", "is_debris", "lock_path", "result_lock"]

log = logging.getLogger("segpipe")


class ResultBusyError(RuntimeError):
    """Another run holds the lock of the result asked for: it is writing or deleting that
    result now (:func:`result_lock`)."""


def lock_path(path: str | os.PathLike[str]) -> Path:
    """The lock file of the local result at ``path``: ``.<name>.lock`` in its folder (named
    like the ``.<name>.creating-*`` and ``.<name>.deleting-*`` siblings a run makes), beside
    the real path, so every symbolic link to a result shares its one lock.

    >>> lock_path("/data/slide.seg.zarr").name
    '.slide.seg.zarr.lock'
    """
    real = Path(os.path.realpath(path))
    return real.with_name(f".{real.name}.lock")


# A file system that cannot flock (NFS without a lock manager, some FUSE mounts) says so with
# these: runs there go on unlocked, guarded by the stamp alone, as a URL result is.
_NO_FLOCK = (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL)


@contextlib.contextmanager
def result_lock(path: str | os.PathLike[str] | URLPath) -> Iterator[None]:
    """Hold the run lock of the result at ``path`` while the body runs.

    Raises :class:`ResultBusyError` at once (it never waits) where another run holds it: in
    another process, on any machine that shares the file system, or in this process (each
    call opens the lock file anew, and ``flock`` locks per open file). The holder's pid, host
    and start time are written into the lock file for that message. The file
    (:func:`lock_path`, made with its folder if missing) is never deleted: a run removing it
    while another opens it would let a third lock a new file of the same name alongside.

    A result at a URL (:class:`~segpipe.io.files.URLPath`, object storage) takes no lock:
    the body runs unguarded by one, and the ``started`` stamp is its only protection.
    """
    if isinstance(path, URLPath):
        yield
        return
    lock = lock_path(path)
    fd = _open(lock)
    if fd is None:
        yield
        return
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise ResultBusyError(
                f"{path} is in use by another segpipe run ({_holder(fd)}; lock file {lock}): "
                "wait for that run to end, or stop it, then run again (a run that is killed "
                "releases the lock at once, and its result resumes)"
            ) from None
        except OSError as e:
            if e.errno not in _NO_FLOCK:
                raise
            log.warning("%s: the file system cannot lock (%s); running without a lock", lock, e)
        else:
            with contextlib.suppress(OSError):  # a read-only lock file: the lock still holds
                holder = {"pid": os.getpid(), "host": socket.gethostname(), "since": utc_now()}
                os.ftruncate(fd, 0)
                os.pwrite(fd, json.dumps(holder).encode(), 0)
        yield
    finally:
        os.close(fd)


def _open(lock: Path) -> int | None:
    """A new descriptor of ``lock``, created if missing; None where it cannot be created
    because its folder is read-only to this process, which then cannot write a result
    there either (a complete result is still read; anything else fails where it writes)."""
    try:
        lock.parent.mkdir(parents=True, exist_ok=True)
        return os.open(lock, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o666)
    except OSError as e:
        if e.errno not in (errno.EACCES, errno.EPERM, errno.EROFS):
            raise
    try:  # a lock file another user made: a read-only descriptor locks it as well
        return os.open(lock, os.O_RDONLY | os.O_CLOEXEC)
    except FileNotFoundError:
        return None


def _holder(fd: int) -> str:
    """Who holds the lock, as its holder wrote into the file."""
    try:
        data = json.loads(os.pread(fd, 4096, 0))
        who = f"pid {int(data['pid'])} on {data['host']}, since {data['since']}"
    except (ValueError, KeyError, TypeError, OSError):
        return "a run that has not written who it is yet"
    if data["pid"] == os.getpid() and data["host"] == socket.gethostname():
        who += ": another run in this process"
    return who


# The arrays whose chunks a run writes after its skeleton, in any layout (schema.level_path,
# label_path; layout.PROGRESS, COUNTS), as patterns of their keys' parts. Never a zarr.json:
# only a skeleton writes those, and it is renamed into place whole.
_WRITTEN_ARRAYS = (
    ("[0-9]+", "mask|probabilities"),  # layouts 2-3: level k's
    ("mask|probabilities",),  # layout 1: level 0's, at the root
    ("levels", "[0-9]+", "mask|probabilities"),  # layout 1: level k's
    ("labels", "[^/]+", "[0-9]+", "[^/]+"),  # a label image's level k, layouts 2-3
    ("labels", "[^/]+", "[0-9]+"),  # layout 1
    ("_segpipe", "tiles_done|class_pixels"),
)
# A chunk's last key part, or the file of its write cut short (zarr's LocalStore writes
# ``<part>.<uuid hex>.partial`` and renames it).
_LAST_INDEX = re.compile(r"[0-9]+(\.[0-9a-f]+\.partial)?")


def is_debris(path: Path) -> bool:
    """Whether the folder at ``path`` holds nothing but what late writes by path leave there
    once the result has been renamed away: chunks of a result's arrays (``0/mask/c/1/2``,
    ``_segpipe/tiles_done/c/0/0``), a chunk write cut short, and the folders on their way;
    no ``zarr.json`` (a root's or a user's group's) and no link anywhere. An empty folder, a
    link, or anything else is not: never deleted as debris."""
    if path.is_symlink() or not path.is_dir() or not any(path.iterdir()):
        return False
    for folder, folders, files in os.walk(path):
        for name in folders + files:
            entry = Path(folder, name)
            key = entry.relative_to(path).as_posix()
            if entry.is_symlink() or not _is_written_key(key, folder=name in folders):
                return False
    return True


def _is_written_key(key: str, *, folder: bool) -> bool:
    """Whether ``key`` is a chunk of :data:`_WRITTEN_ARRAYS` (``<array>/c/<i>/<j>...``), or
    with ``folder`` a folder on the way to one."""
    parts = key.split("/")
    for array in _WRITTEN_ARRAYS:
        pattern = (*array, "c")
        head, index = parts[: len(pattern)], parts[len(pattern) :]
        if not all(re.fullmatch(p, s) for p, s in zip(pattern, head, strict=False)):
            continue
        if folder and all(s.isdigit() and s.isascii() for s in index):
            return True
        if not folder and len(head) == len(pattern) and index:
            *inner, last = index
            if all(s.isdigit() and s.isascii() for s in inner) and _LAST_INDEX.fullmatch(last):
                return True
    return False
