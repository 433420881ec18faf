"""Local files replaced whole: readers see the old file or the new one, never half of one.

Every local file segpipe writes in one piece (checkpoints, training state, JSON, reports,
PNG overlays) is written beside its target and renamed over it, so a kill, a full disk or an
exception mid-write leaves the file that was there before, readable, and no stray copy (a
killed writer's, which nothing could remove, goes at the next write of the file).
"""

from __future__ import annotations

import contextlib
import errno
import functools
import glob
import hashlib
import os
import shutil
import socket
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

__all__ = [
    "check_overwrite",
    "check_writable",
    "died_here",
    "file_beside",
    "pid_namespace",
    "process_gone",
    "replaced_file",
    "scratch_file",
    "write_errors_named",
]


def _read_umask() -> int:
    """The process's umask (read by setting it and putting it back: done once, at import,
    since another thread creating a file in between would get the one set)."""
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


_UMASK = _read_umask()


@contextlib.contextmanager
def replaced_file(path: str | os.PathLike[str]) -> Iterator[Path]:
    """Yield a temporary path beside ``path`` for the caller to write; when the block ends,
    flush it to disk and rename it over ``path`` in one step (atomic on POSIX file systems).

    If the block raises, the temporary file is removed and ``path`` is left as it was. The
    folder is created when missing. An OSError of the file system names ``path``. Each call
    gets a name of its own, so threads and processes writing the same ``path`` at once do not
    share one; the last rename wins.
    """
    path = Path(path)
    fd, tmp = file_beside(path)
    os.close(fd)
    try:
        yield tmp
        # After a power cut the rename may reach the disk before the data: fsync first.
        with open(tmp, "rb") as written:
            os.fsync(written.fileno())
        try:
            os.replace(tmp, path)
        except OSError as err:  # a folder there, a read-only file system
            raise OSError(err.errno, f"{path} cannot be written: {err.strerror}") from err
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)


def file_beside(path: str | os.PathLike[str]) -> tuple[int, Path]:
    """A new hidden file beside ``path`` for a copy of it, open for writing: ``(fd, its
    path)``, the caller's to close and remove. Named for this host and process, so the next
    call for ``path`` removes one a killed writer left; readable as the umask says. The folder
    is created when missing; an OSError of the file system names ``path``."""
    fd, name = _copy_beside(Path(path), tempfile.mkstemp)
    try:
        # mkstemp's file is the owner's alone (0600); a copy renamed or linked into place
        # must be readable as any other the user writes (a shared output root's files).
        os.fchmod(fd, 0o666 & ~_UMASK)
    except BaseException:
        os.close(fd)
        os.unlink(name)
        raise
    return fd, Path(name)


@contextlib.contextmanager
def scratch_file(path: str | os.PathLike[str]) -> Iterator[Path]:
    """Yield a path named as ``path`` in a new hidden folder beside it
    (``.<name>.<host>-<pid>-*.part/``) for the caller to write, removed with all it holds when
    the block ends: a file written whole there (:func:`replaced_file`'s copy) goes with it.
    Folders that writers killed on this machine left beside ``path`` are removed first. The
    folder is created when missing; an OSError of the file system names ``path``."""
    path = Path(path)
    folder = _copy_beside(path, tempfile.mkdtemp)
    try:
        yield Path(folder) / path.name
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def _copy_beside(path: Path, make: Callable[..., Any]) -> Any:
    """What ``make`` (``tempfile.mkstemp``, ``mkdtemp``) returns for a hidden copy beside
    ``path``, named for this host and process; the folder made and the copies killed writers
    left removed first. An OSError names ``path``, not the copy the user never asked for."""
    path.parent.mkdir(parents=True, exist_ok=True)
    _remove_killed_copies(path)
    try:
        # Within NAME_MAX (255 bytes) whatever the target's name: mkstemp adds 8 characters.
        # Who writes it is in its name: a killed writer's copy is removed by the next write.
        key = _namespace_key(pid_namespace())
        tag = f"{key[0]}.{key[1]}-" if key else ""  # which container's pid: see died_here
        prefix = f"{_copy_prefix(path)}{os.getpid()}-{tag}"
        return make(dir=path.parent, prefix=prefix, suffix=".part")
    except OSError as err:
        raise OSError(err.errno, f"{path} cannot be written: {err.strerror}") from err


def _copy_prefix(path: Path) -> str:
    """``.<name>.<host>-`` of this machine's copies of ``path``: the name cut to 150 bytes
    (NAME_MAX is 255 bytes, not characters), the host as 12 hex digits of its whole name's
    hash (pods of one deployment share their first 30 characters; "node" prefixes "node-7")."""
    name = os.fsencode(path.name)[:150].decode("utf-8", "ignore")
    host = hashlib.sha256(socket.gethostname().encode()).hexdigest()[:12]
    return f".{name}.{host}-"


def _remove_killed_copies(path: Path) -> None:
    """Remove the copies of ``path`` that writers killed on this machine left (a whole
    checkpoint each): their pid is gone (:func:`died_here`). Another machine's, on a shared
    folder, are left. A copy's name is ``<prefix><pid>-[<boot>.<namespace>-]<random>.part``
    (mkstemp's random part has no ``-``; copies of older releases have no namespace)."""
    here = _copy_prefix(path)
    with contextlib.suppress(OSError):
        for left in path.parent.glob(f"{glob.escape(here)}*.part"):
            with contextlib.suppress(OSError, ValueError):
                pid, *tag, _ = left.name[len(here) :].split("-")
                key = tuple(tag[0].split(".", 1)) if tag else None
                if not _gone(pid, key):
                    continue
                if left.is_dir():  # scratch_file's
                    shutil.rmtree(left)
                else:  # replaced_file's
                    left.unlink()


@functools.cache
def pid_namespace() -> str | None:
    """This process's pid namespace (the boot's id and the namespace's inode), None where
    ``/proc`` does not tell: containers sharing a host name (host networking) each number
    their processes apart, so a pid of one means nothing in another."""
    try:
        boot = Path("/proc/sys/kernel/random/boot_id").read_text().strip()
        return f"{boot}:{os.stat('/proc/self/ns/pid').st_ino}"
    except OSError:
        return None


def died_here(host: Any, pid: Any, namespace: Any = None) -> bool:
    """Whether process ``pid`` of machine ``host`` (in pid ``namespace``, where its maker
    recorded :func:`pid_namespace`) is gone, told on that machine alone (False elsewhere):
    every process of an earlier boot is; one of another container's namespace is not told."""
    if host != socket.gethostname():
        return False
    key = None if namespace is None else _namespace_key(str(namespace))
    if namespace is not None and key is None:  # recorded, but unreadable: nothing to tell by
        return False
    return _gone(pid, key)


def _namespace_key(namespace: str | None) -> tuple[str, str] | None:
    """(12 hex digits of the boot id's hash, the namespace's inode) of a :func:`pid_namespace`."""
    if not namespace or ":" not in namespace:
        return None
    boot, _, inode = namespace.rpartition(":")
    return hashlib.sha256(boot.encode()).hexdigest()[:12], inode


def _gone(pid: Any, recorded: tuple[str, ...] | None) -> bool:
    """Whether process ``pid`` of this machine, of the ``recorded`` :func:`_namespace_key`
    (None: not recorded, an older release's), is gone."""
    if recorded is not None:
        mine = _namespace_key(pid_namespace())
        if mine is None:  # /proc does not tell here
            return False
        if recorded[0] != mine[0]:  # an earlier boot's
            return True
        if tuple(recorded) != mine:  # another container's pid: nothing to tell by
            return False
    return process_gone(pid)


def process_gone(pid: Any) -> bool:
    """Whether no process ``pid`` runs on this machine: what a file naming its maker's pid
    (a claim, a scratch copy) left by a killed run is known by. False where that cannot be
    told (another user's process; no pid)."""
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return True
    except (OSError, TypeError, ValueError, OverflowError):
        pass
    return False


def check_writable(path: str | os.PathLike[str]) -> None:
    """Refuse, before long work, a local ``path`` (a file or folder to be made) below which
    nothing can be written: OSError naming it when its nearest existing folder takes no new
    file. Makes nothing."""
    path = Path(path)
    folder = path if path.is_dir() else path.parent
    while not folder.exists():
        folder = folder.parent
    if not folder.is_dir():
        raise NotADirectoryError(f"{path} cannot be written: {folder} is a file, not a folder")
    try:
        # A test write: as root, os.access says yes to /proc and to read-only mounts.
        with tempfile.TemporaryFile(dir=folder):
            pass
    except OSError as err:
        why = f"cannot be written: {folder} takes no new files ({err.strerror})"
        raise OSError(err.errno, why, str(path)) from err


# A write's errors of the disk, not of a file's name or rights.
# Not EIO: a failing source's read raises it too, which would be blamed on the output.
_DISK_ERRORS = (errno.ENOSPC, errno.EDQUOT, errno.EFBIG, errno.EROFS)


@contextlib.contextmanager
def write_errors_named(path: str | os.PathLike[str]) -> Iterator[None]:
    """Re-raise a full disk's OSError (which a ``write()`` raises naming no file) naming
    ``path``, the store being written: the output, the image and Prefect's home may each lie
    on another disk. At a URL, an object store's bare "not found" (s3fs's "The specified
    bucket does not exist", no errno) is the store's too."""
    try:
        yield
    except OSError as exc:
        at_url = not isinstance(path, str | os.PathLike)  # a URLPath
        if at_url and isinstance(exc, FileNotFoundError) and exc.errno is exc.filename is None:
            raise FileNotFoundError(errno.ENOENT, f"cannot be written ({exc})", str(path)) from exc
        if exc.filename is not None or exc.errno not in _DISK_ERRORS:
            raise
        raise OSError(exc.errno, exc.strerror, os.fspath(path)) from exc


def check_overwrite(overwrite: object) -> bool:
    """``overwrite`` when it is a bool; TypeError else: ``overwrite="no"`` (from a config
    file, an environment variable) is truthy, and replaced what it was meant to keep."""
    if type(overwrite).__name__ not in ("bool", "bool_"):  # numpy's np.True_ too
        raise TypeError(f"overwrite must be True or False, got {overwrite!r}")
    return bool(overwrite)
