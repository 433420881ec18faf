"""One writer at a time per local store: an ``flock`` on a lock file beside it.

A run that writes a store (a result, :mod:`segpipe.results.lock`; an ingest,
:func:`segpipe.io.ingest.ingest`) holds its lock exclusively from before it prepares the store
until after it finalises it; a run that only reads a store while it works (a segmentation
reading an ingested image) holds it shared, so no ingest replaces the image under it while
readers may share it. A second run never waits: it stops at once with :class:`StoreBusyError`
(or a subclass) before it writes anything.

The kernel releases a ``flock`` when its holder's last descriptor closes, so a run killed
(SIGKILL, the OOM killer) frees its store at once. A store at a URL (object storage has no
locks) takes none; neither does a file system that cannot ``flock`` (it says so, and the run
goes on unlocked with a warning).
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import logging
import os
import socket
from collections.abc import Iterator
from pathlib import Path

from segpipe.io.files import URLPath, utc_now
from segpipe.io.siblings import check_name_room

__all__ = ["StoreBusyError", "lock_path", "store_lock"]

log = logging.getLogger("segpipe")


class StoreBusyError(RuntimeError):
    """Another run holds the lock of the store asked for (:func:`store_lock`)."""


def lock_path(path: str | os.PathLike[str]) -> Path:
    """The lock file of the local store at ``path``: ``.<name>.lock`` in its folder (named
    like the ``.<name>.creating-*`` and ``.<name>.deleting-*`` siblings a run makes), beside
    the real path, so every symbolic link to a store shares its one lock.

    >>> lock_path("/data/slide.seg.zarr").name
    '.slide.seg.zarr.lock'
    """
    real = Path(os.path.realpath(path))
    check_name_room(real, f".{real.name}.lock")
    return real.with_name(f".{real.name}.lock")


# A file system that cannot flock (NFS without a lock manager, some FUSE mounts) says so with
# these: runs there go on unlocked, guarded by the stamp alone, as a URL result is.
_NO_FLOCK = (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL)


@contextlib.contextmanager
def store_lock(
    path: str | os.PathLike[str] | URLPath,
    *,
    shared: bool = False,
    busy: type[StoreBusyError] = StoreBusyError,
    after_kill: str = "",
) -> Iterator[None]:
    """Hold the lock of the store at ``path`` while the body runs: exclusively (a writer), or
    ``shared`` with other readers.

    Raises ``busy`` at once (it never waits) where another run holds it in a mode that
    excludes this one: in another process, on any machine that shares the file system, or in
    this process (each call opens the lock file anew, and ``flock`` locks per open file). Its
    message names the store, the holder (pid, host, start time, as the holder wrote them into
    the lock file; with several readers, the latest) and the lock file, then ``after_kill``.
    The file (:func:`lock_path`, made with its folder if missing) is never deleted: a run
    removing it while another opens it would let a third lock a new file of the same name.
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
            fcntl.flock(fd, (fcntl.LOCK_SH if shared else fcntl.LOCK_EX) | fcntl.LOCK_NB)
        except BlockingIOError:
            raise busy(
                f"{path} is in use by another segpipe run ({_holder(fd)}; lock file {lock}): "
                "wait for that run to end, or stop it, then run again (a run that is killed "
                f"releases the lock at once{after_kill})"
            ) from None
        except OSError as e:
            if e.errno not in _NO_FLOCK:
                raise
            log.warning("%s: the file system cannot lock (%s); running without a lock", lock, e)
        else:
            with contextlib.suppress(OSError):  # a read-only lock file: the lock still holds
                holder = {
                    "pid": os.getpid(),
                    "host": socket.gethostname(),
                    "since": utc_now(),
                    "use": "reading" if shared else "writing",
                }
                os.ftruncate(fd, 0)
                os.pwrite(fd, json.dumps(holder).encode(), 0)
        yield
    finally:
        os.close(fd)


def _open(lock: Path) -> int | None:
    """A new descriptor of ``lock``, created if missing; None where it cannot be created
    because its folder is read-only to this process, which then cannot write a store
    there either (a complete one is still read; anything else fails where it writes)."""
    try:
        lock.parent.mkdir(parents=True, exist_ok=True)
        return os.open(lock, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o666)
    except FileExistsError as e:  # said "File exists" of a file where a folder should be
        raise NotADirectoryError(
            errno.ENOTDIR, "a file, where the output's folder should be", e.filename
        ) from e
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
    if isinstance(data.get("use"), str):
        who += f", {data['use']} it"
    if data["pid"] == os.getpid() and data["host"] == socket.gethostname():
        who += ": another run in this process"
    return who
