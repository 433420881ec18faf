"""Per-image claims: one run at a time processes an image, across processes and machines.

A claim is a lock file created atomically (``O_CREAT | O_EXCL``) beside the image's outputs
(``ImagePaths.lock`` in :mod:`segpipe.archive`). It records its owner and a random token; its
mtime is a heartbeat that a daemon thread refreshes while the claim is held. A lock without a
heartbeat for its ``ttl_s`` is stale (its owner died) and the next claimer reclaims it; a
claimer that was only slow learns from :meth:`Claim.check` that it lost the lock, before it
commits anything.

>>> with try_claim("/data/segpipe/a.svs.lock", owner="nightly") as claim:  # doctest: +SKIP
...     ...  # segment, then
...     claim.check()  # raises ClaimLostError if another run took the lock over

On S3 (a lock at an ``s3://`` :class:`~segpipe.io.files.URLPath`) the same rules hold through
conditional writes: the lock object is created with ``If-None-Match: *`` (of any number of
claimers exactly one succeeds), and every heartbeat, takeover of a stale lock and release is a
write conditional on the ETag last seen (``If-Match``), so a claimer that lost the lock can
neither refresh nor delete the new owner's. Staleness compares the object's ``LastModified``
with this machine's clock: clocks must agree to well within ``ttl_s``. A store that ignores
conditional writes (checked once per bucket) or another protocol raises
:class:`UnsupportedStoreError`: put ``output_root`` on a local or shared file system, or run
one runner at a time.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import logging
import os
import socket
import threading
import time
import uuid
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

from segpipe.atomic import died_here, file_beside, pid_namespace
from segpipe.io.files import URLPath, location, utc_now

__all__ = [
    "Claim",
    "ClaimLostError",
    "UnsupportedStoreError",
    "default_owner",
    "read_lock",
    "try_claim",
]

# Claims are part of an archive run: its logging configuration and filters keep seeing them.
log = logging.getLogger("segpipe.archive")


class ClaimLostError(RuntimeError):
    """Another run reclaimed this image's lock (ours had gone stale): stop, write nothing."""


class UnsupportedStoreError(ValueError):
    """The output store lacks the atomic create-if-absent that claims need."""


class Claim:
    """A held per-image lock file; release it with :meth:`release` or as a context manager.

    The file holds the owner and a random token; its mtime is the heartbeat, refreshed by a
    daemon thread every ``ttl_s / 4`` seconds: without one for ``ttl_s`` it is stale (its
    owner died) and :func:`try_claim` may reclaim it."""

    def __init__(self, path: Path | URLPath, token: str, owner: str, ttl_s: float) -> None:
        self.path = path
        self.token = token
        self.owner = owner
        self.ttl_s = ttl_s
        self._stop = threading.Event()
        self._lost = False
        self._thread = threading.Thread(
            target=self._beat, name=f"claim-heartbeat-{path.name}", daemon=True
        )
        self._thread.start()

    def _beat(self) -> None:
        renewed = time.monotonic()
        while not self._stop.wait(self.ttl_s / 4):
            try:
                if not self.is_held():
                    self._lost = True
                    log.error("%s: claim lost (lock taken over after it went stale)", self.path)
                    return
                self._touch()
            except Exception:
                # A failed beat (stale NFS handle, network error) may heal: keep beating. But
                # after a ttl without one, another run may take the lock: count it as lost.
                if time.monotonic() - renewed > self.ttl_s:
                    self._lost = True
                    log.exception("%s: claim lost (no heartbeat for %.0f s)", self.path, self.ttl_s)
                    return
                log.warning("%s: heartbeat failed, retrying", self.path, exc_info=True)
                continue
            renewed = time.monotonic()

    def _touch(self) -> None:
        with contextlib.suppress(FileNotFoundError):
            os.utime(self.path)

    def _remove(self) -> None:
        # Under the guard a takeover of this lock's version needs (_reclaim_if_stale): a read
        # of our token, then a takeover, then our unlink would remove the new owner's lock.
        # A guard already there is a takeover under way: the lock is no longer ours to remove.
        path = Path(self.path)
        try:
            with _guard(path, self.token) as guarded:
                if guarded and _lock_token(path) == self.token:
                    path.unlink(missing_ok=True)
        except OSError:
            # No guard (a full disk, a read-only folder): left to go stale like a dead run's
            # lock; raising would replace the error of the work in the `with claim:` block.
            log.warning("%s: lock not released, stale in %.0f s", path, self.ttl_s, exc_info=True)

    def is_held(self) -> bool:
        """Whether the lock file still carries this claim's token."""
        return not self._lost and _lock_token(self.path) == self.token

    def check(self) -> None:
        """Raise :class:`ClaimLostError` unless this claim still holds the lock (call it
        before committing anything the lock protects)."""
        if not self.is_held():
            raise ClaimLostError(
                f"{self.path}: this run no longer holds the lock (it went stale after "
                f"{self.ttl_s:.0f} s without a heartbeat and another run reclaimed it); "
                "raise ttl_s if images take long and heartbeats were starved"
            )

    def release(self) -> None:
        """Stop the heartbeat and remove the lock, if it is still ours: never once the claim
        is lost (another run may be taking it over; a lock left behind goes stale)."""
        self._stop.set()
        if self._thread is not threading.current_thread():
            self._thread.join()
        if not self._lost:
            self._remove()

    def __enter__(self) -> Claim:
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()


def default_owner() -> str:
    """``host:pid:thread``, the owner a lock records when none is given."""
    return f"{socket.gethostname()}:{os.getpid()}:{threading.get_ident()}"


def try_claim(
    lock: str | os.PathLike[str], *, owner: str | None = None, ttl_s: float = 600.0
) -> Claim | None:
    """Claim the lock file ``lock``: a :class:`Claim`, or None when a live owner holds it.

    Creation is atomic (``O_CREAT | O_EXCL``), so of any number of claimers exactly one wins.
    A stale lock (no heartbeat for its ``ttl_s``) is removed by the one claimer that wins a
    guard file named after the stale lock's token, and the claim is then made as for a fresh
    lock. A claimer that was only slow, not dead, learns it lost the lock from its heartbeat
    and from :meth:`Claim.check`, which callers run before committing.

    Parameters
    ----------
    lock
        The lock file (``ImagePaths.lock``); its folder is created.
    owner
        Who holds it, for people reading the file (default :func:`default_owner`).
    ttl_s
        Seconds without a heartbeat after which the lock counts as stale. Heartbeats come every
        ``ttl_s / 4`` seconds from a thread, so only a frozen process lets its lock expire.
    """
    if ttl_s <= 0:
        raise ValueError(f"ttl_s must be > 0 seconds, got {ttl_s}")
    owner = owner or default_owner()
    token = uuid.uuid4().hex
    record = {
        "owner": owner,
        "token": token,
        "host": socket.gethostname(),
        "pid": os.getpid(),
        "pidns": pid_namespace(),
        "acquired": utc_now(),
        "ttl_s": ttl_s,
    }
    target = location(lock)
    if isinstance(target, URLPath):
        from segpipe.archive.object_claims import ObjectClaim  # it subclasses Claim

        return ObjectClaim.try_create(target, record)
    path = target
    path.parent.mkdir(parents=True, exist_ok=True)
    body = json.dumps(record).encode()
    for _ in range(3):
        if _created_whole(path, body):
            return Claim(path, token, owner, ttl_s)
        if not _reclaim_if_stale(path, ttl_s):
            return None
    return None


def _created_whole(path: Path, body: bytes) -> bool:
    """Create ``path`` holding ``body``, whole, unless it exists (False). Written beside and
    hard-linked into place: created and then written, a SIGKILL between the two left an empty
    lock, which no one can tell from one being written, and the image read as claimed by
    another run for the claimer's whole ttl. Where the file system has no hard links
    (FAT, some network shares), created and then written."""
    # Named for this process: one a claimer killed meanwhile is removed at the next claim.
    fd, beside = file_beside(path)
    try:
        try:
            _write_all(fd, body)
        finally:
            os.close(fd)
        os.link(beside, path)
        return True
    except FileExistsError:
        return False
    except OSError as exc:
        if exc.errno not in (errno.EPERM, errno.ENOTSUP, errno.EOPNOTSUPP, errno.EXDEV):
            raise
    finally:
        os.unlink(beside)
    try:
        fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
    except FileExistsError:
        return False
    try:
        _write_all(fd, body)
    except BaseException:
        path.unlink(missing_ok=True)  # a lock without a token blocks until it goes stale
        raise
    finally:
        os.close(fd)
    return True


def _write_all(fd: int, body: bytes) -> None:
    view = memoryview(body)
    while view:  # os.write may write less than it is given
        view = view[os.write(fd, view) :]
    os.fsync(fd)


def read_lock(path: str | os.PathLike[str]) -> dict[str, Any] | None:
    """The lock file's record (owner, token, host, pid, acquired, ttl_s); None when there is no
    lock, ``{}`` when it is unreadable: its claimer has created it but not yet written it, or
    died (or ran out of disk) before it wrote it whole."""
    try:
        data = json.loads(location(path).read_bytes())
    except FileNotFoundError:
        return None
    except ValueError:
        return {}
    return data if isinstance(data, dict) else {}


def _lock_token(path: Path | URLPath) -> str | None:
    return (read_lock(path) or {}).get("token")


def _is_stale(path: Path, data: Mapping[str, Any], ttl_s: float) -> bool:
    """Whether the lock has had no heartbeat for its ttl, or its owner died on this machine
    (no heartbeat will come); an unreadable lock (no token, no ttl of its own) may be one
    being written right now, so it gets the claimer's ``ttl_s``."""
    if "token" in data and died_here(data.get("host"), data.get("pid"), data.get("pidns")):
        return True
    try:
        age = time.time() - path.stat().st_mtime
    except FileNotFoundError:
        return False
    return age > float(data.get("ttl_s", 600.0) if "token" in data else ttl_s)


def _lock_id(path: Path, data: Mapping[str, Any]) -> str | None:
    """What names this version of the lock: its token, or for an unreadable lock its inode and
    mtime (None when it is gone)."""
    if "token" in data:
        return str(data["token"])
    try:
        st = path.stat()
    except FileNotFoundError:
        return None
    return f"unreadable-{st.st_ino}-{st.st_mtime_ns}"


def _reclaim_if_stale(path: Path, ttl_s: float) -> bool:
    """Remove ``path`` if it is a stale lock; True when the caller should try to create it.

    Only the claimer that creates the guard file ``.<digest>.reclaim-<stale lock's id>``
    (``O_EXCL`` again) may remove the stale lock, so a lock is never removed by someone who
    read an older one: all others back off, and so does its owner's release, which takes the
    same guard (:meth:`Claim.release`). A guard left by a process that died holding it is
    removed at once where it died on this machine, else once it is older than the lock's ttl.
    """
    data = read_lock(path)
    if data is None:
        return True  # released meanwhile
    stale_id = _lock_id(path, data)
    if stale_id is None:
        return True
    if not _is_stale(path, data, ttl_s):
        return False
    with _guard(path, stale_id) as guarded:
        if not guarded:
            guard = _guard_path(path, stale_id)
            with contextlib.suppress(FileNotFoundError):
                old = time.time() - guard.stat().st_mtime > float(data.get("ttl_s", ttl_s))
                if old or _guard_holder_gone(guard):
                    guard.unlink()
                    return _reclaim_if_stale(path, ttl_s)  # the guard is free now
            return False
        current = read_lock(path)
        if (
            current is not None
            and _lock_id(path, current) == stale_id
            and _is_stale(path, current, ttl_s)
        ):
            log.warning("%s: reclaiming stale lock of %s", path, data.get("owner"))
            path.unlink(missing_ok=True)
    return True


def _guard_path(path: Path, lock_id: str) -> Path:
    # Named by a digest of the lock's name, not the name: an image's name of 215 bytes or more
    # made every guard too long for the file system, its lock never released.
    digest = hashlib.sha256(path.name.encode("utf-8", "surrogateescape")).hexdigest()[:16]
    return path.with_name(f".{digest}.reclaim-{lock_id}")


@contextlib.contextmanager
def _guard(path: Path, lock_id: str) -> Iterator[bool]:
    """Hold the guard file ``.<digest>.reclaim-<lock_id>`` (``O_EXCL``) while the body runs:
    True, or False when another holds it. Only its holder may remove that version of the
    lock: a claimer reclaiming it stale, or its owner releasing it."""
    guard = _guard_path(path, lock_id)
    # who holds it: a guard of a process killed holding it is removed at once
    holder = f"{socket.gethostname()}\n{os.getpid()}\n{pid_namespace()}".encode()
    held = _created_whole(guard, holder)
    try:
        yield held
    finally:
        if held:
            guard.unlink()


def _guard_holder_gone(guard: Path) -> bool:
    """Whether the guard file's holder died on this machine (it never removes it then)."""
    try:  # host, pid and pid namespace ("None": /proc did not tell; older guards lack it)
        host, pid, *namespace = guard.read_text().split("\n")
    except (OSError, UnicodeDecodeError, ValueError):  # one being written, or gone
        return False
    return died_here(host, pid, namespace[0] if namespace and namespace[0] != "None" else None)
