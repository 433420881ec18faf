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

from segpipe.io.files import URLPath, location, mtime_of, utc_now

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
        "acquired": utc_now(),
        "ttl_s": ttl_s,
    }
    target = location(lock)
    if isinstance(target, URLPath):
        return _ObjectClaim.try_create(target, record)
    path = target
    path.parent.mkdir(parents=True, exist_ok=True)
    body = json.dumps(record).encode()
    for _ in range(3):
        try:
            fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            if not _reclaim_if_stale(path, ttl_s):
                return None
            continue
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(body)
                f.flush()
                os.fsync(f.fileno())
        except BaseException:
            # A lock without a token would block the image until it goes stale.
            path.unlink(missing_ok=True)
            raise
        return Claim(path, token, owner, ttl_s)
    return None


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
    """Whether the lock has had no heartbeat for its ttl; an unreadable lock (no token, no
    ttl of its own) may be one being written right now, so it gets the claimer's ``ttl_s``."""
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

    Only the claimer that creates the guard file ``<lock>.reclaim-<stale lock's id>``
    (``O_EXCL`` again) may remove the stale lock, so a lock is never removed by someone who
    read an older one: all others back off, and so does its owner's release, which takes the
    same guard (:meth:`Claim.release`). A guard left by a claimer that died mid-reclaim is
    removed once it is older than the lock's ttl.
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
                if time.time() - guard.stat().st_mtime > float(data.get("ttl_s", ttl_s)):
                    guard.unlink()
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
    return path.with_name(f"{path.name}.reclaim-{lock_id}")


@contextlib.contextmanager
def _guard(path: Path, lock_id: str) -> Iterator[bool]:
    """Hold the guard file ``<lock>.reclaim-<lock_id>`` (``O_EXCL``) while the body runs:
    True, or False when another holds it. Only its holder may remove that version of the
    lock: a claimer reclaiming it stale, or its owner releasing it."""
    guard = _guard_path(path, lock_id)
    held = True
    try:
        os.close(os.open(guard, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644))
    except FileExistsError:
        held = False
    try:
        yield held
    finally:
        if held:
            guard.unlink()


# (endpoint, bucket) -> whether the store honours If-None-Match; checked once per process
_CONDITIONAL_WRITES: dict[tuple[str, str], bool] = {}


class _ObjectClaim(Claim):
    """A claim on S3: every write of the lock object is conditional (see the module doc).

    The record carries a heartbeat count, so every heartbeat gets a new ETag (S3's ETag of a
    plain PUT is the MD5 of its bytes) and a takeover conditional on a stale ETag fails once
    the owner has beaten since.
    """

    def __init__(self, path: URLPath, record: dict[str, Any], etag: str) -> None:
        self._url = path
        self._record = record
        self._etag = etag
        super().__init__(path, record["token"], record["owner"], record["ttl_s"])

    @classmethod
    def try_create(cls, path: URLPath, record: dict[str, Any]) -> Claim | None:
        fs, key = path.filesystem()
        cls._require_conditional_writes(path, fs, key)
        for _ in range(3):
            try:
                out = fs.pipe_file(key, json.dumps(record).encode(), mode="create")
                return cls(path, record, out["ETag"])
            except FileExistsError:
                pass
            try:
                info = fs.info(key)
            except FileNotFoundError:
                continue  # released meanwhile
            data = read_lock(path)
            if data is None:
                continue  # released meanwhile
            # A lock without a token (empty, garbage) gets this claimer's ttl, as a local one.
            ttl = float(data.get("ttl_s", 600.0)) if "token" in data else record["ttl_s"]
            if time.time() - mtime_of(info) <= ttl:
                return None
            try:  # take over exactly the stale version read, or nothing
                out = fs.pipe_file(key, json.dumps(record).encode(), IfMatch=info["ETag"])
            except (OSError, FileNotFoundError):
                return None
            log.warning("%s: reclaiming stale lock of %s", path, data.get("owner"))
            return cls(path, record, out["ETag"])
        return None

    @classmethod
    def _require_conditional_writes(cls, path: URLPath, fs: Any, key: str) -> None:
        protocols = fs.protocol if isinstance(fs.protocol, tuple) else (fs.protocol,)
        if "s3" not in protocols:
            raise UnsupportedStoreError(
                f"{path}: claims need an atomic create-if-absent, which segpipe knows only for "
                f"S3 (conditional writes), not {protocols[0]}://; put output_root on a local or "
                "shared file system, or run one runner at a time"
            )
        bucket = key.split("/", 1)[0]
        endpoint = str(getattr(fs, "client_kwargs", {}).get("endpoint_url"))
        if (endpoint, bucket) not in _CONDITIONAL_WRITES:
            probe = f"{key.rsplit('/', 1)[0]}/.segpipe-probe-{uuid.uuid4().hex}"
            fs.pipe_file(probe, b"", mode="create")
            try:
                _CONDITIONAL_WRITES[endpoint, bucket] = _honours_conditions(fs, probe)
            finally:
                fs.rm_file(probe)
        if not _CONDITIONAL_WRITES[endpoint, bucket]:
            raise UnsupportedStoreError(
                f"{path}: this S3 store ignores conditional writes (If-None-Match, or "
                "If-Match on a write or a delete), so two "
                "runs could claim one image; use a store that supports them (AWS S3, recent "
                "MinIO), put output_root on a local or shared file system, or run one runner "
                "at a time"
            )

    def _touch(self) -> None:
        fs, key = self._url.filesystem()
        self._record["beat"] = self._record.get("beat", 0) + 1
        try:
            out = fs.pipe_file(key, json.dumps(self._record).encode(), IfMatch=self._etag)
        except (OSError, FileNotFoundError):
            return  # another run took the lock over: is_held says so at the next beat
        self._etag = out["ETag"]

    def _remove(self) -> None:
        fs, key = self._url.filesystem()
        bucket, _, name = key.partition("/")
        with contextlib.suppress(OSError, FileNotFoundError):  # gone, or no longer ours
            fs.call_s3("delete_object", Bucket=bucket, Key=name, IfMatch=self._etag)
        fs.invalidate_cache(key)


def _honours_conditions(fs: Any, probe: str) -> bool:
    """Whether the S3 store refuses, on the existing object ``probe``, a create
    (``If-None-Match: *``), and a write and a delete whose ``If-Match`` ETag is not the
    object's: a claim's heartbeat and release rely on the last two as its take-over on the
    first; a store that ignored them would let a run that lost its lock overwrite or delete
    the new owner's."""
    stale = '"00000000000000000000000000000000"'
    bucket, _, name = probe.partition("/")
    for attempt in (
        lambda: fs.pipe_file(probe, b"", mode="create"),
        lambda: fs.pipe_file(probe, b"", IfMatch=stale),
        lambda: fs.call_s3("delete_object", Bucket=bucket, Key=name, IfMatch=stale),
    ):
        try:
            attempt()
        except (OSError, FileNotFoundError):  # refused (FileExistsError is an OSError)
            continue
        return False
    fs.invalidate_cache(probe)
    return bool(fs.exists(probe))
