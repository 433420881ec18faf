"""Claims on S3: a :class:`~segpipe.archive.claims.Claim` whose lock is an object, every
write of it conditional (see :mod:`segpipe.archive.claims`)."""

from __future__ import annotations

import contextlib
import json
import logging
import time
import uuid
from typing import Any

from segpipe.archive.claims import Claim, UnsupportedStoreError, read_lock
from segpipe.io.files import URLPath, mtime_of

__all__ = ["ObjectClaim"]

log = logging.getLogger("segpipe.archive")

# (endpoint, bucket) -> whether the store honours If-None-Match; checked once per process
_CONDITIONAL_WRITES: dict[tuple[str, str], bool] = {}


class ObjectClaim(Claim):
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
            if not self.is_held():
                return  # another run took the lock over: the beat ends at its next check
            # Still this claim's, not renewed (a 503, the network): a failed beat, which
            # Claim._beat counts, giving the claim up after a ttl of them before another run
            # may take the lock, not a renewal.
            raise
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
