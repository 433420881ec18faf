"""Small file rules every writer shares: atomic JSON records, their UTC timestamps, and
locations that are fsspec URLs (``s3://bucket/...``) instead of local paths.

A location is a local :class:`~pathlib.Path` or a :class:`URLPath`, which carries the fsspec
``storage_options`` (endpoint, credentials) that reach it. :func:`location` makes one from
what a user typed::

    >>> location("/data/a.seg.zarr")
    PosixPath('/data/a.seg.zarr')
    >>> location("s3://bucket/a.seg.zarr", {"anon": True})  # doctest: +SKIP
    URLPath('s3://bucket/a.seg.zarr')
"""

from __future__ import annotations

import contextlib
import datetime as dt
import json
import os
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from zarr.storage import FsspecStore, StorePath

__all__ = [
    "REMOTE_READ_BLOCK",
    "URLPath",
    "check_literal_url",
    "is_url",
    "location",
    "mtime_of",
    "utc_now",
    "write_json_atomic",
    "write_text_atomic",
]

# Bytes fetched ahead of each read from a URL: tifffile reads a TIFF's header in many small
# pieces and its tiles one by one, each a ranged GET that brings this much more with it.
REMOTE_READ_BLOCK = 2**18
# What fsspec reads as a glob pattern in a path it is given to list or delete.
_GLOB_CHARACTERS = "[]*?"


def utc_now(timespec: str = "seconds") -> str:
    """The current UTC time, ISO 8601 to the second (``"2026-11-29T17:20:00+00:00"``) or as
    ``timespec`` says (:meth:`datetime.datetime.isoformat`'s)."""
    return dt.datetime.now(dt.UTC).isoformat(timespec=timespec)


def is_url(path: object) -> bool:
    """Whether ``path`` is an fsspec URL (``s3://``, ``gs://``, ``memory://``...), not a
    local path (``file://`` URLs count as local paths).

    >>> is_url("s3://bucket/a.tif"), is_url("/data/a.tif"), is_url("file:///data/a.tif")
    (True, False, False)
    """
    if isinstance(path, URLPath):
        return True
    return isinstance(path, str) and "://" in path and not path.startswith("file://")


def check_literal_url(url: URLPath, what: str) -> None:
    """Refuse ``url``, the location of ``what`` (``"an ingest"``), if it holds a glob
    character: fsspec reads one as a pattern, in ``rm`` too (deleting a result at ``res[1A]``
    deleted the objects of ``res1`` and ``resA``, and left its own)."""
    if any(c in _GLOB_CHARACTERS for c in str(url)):
        raise ValueError(
            f"{url}: {what}'s URL may not contain [, ], * or ?: fsspec reads them as a glob "
            "pattern, so deleting it could delete other objects; choose a name without them"
        )


def location(
    path: str | os.PathLike[str], storage_options: Mapping[str, Any] | None = None
) -> Path | URLPath:
    """A :class:`URLPath` for an fsspec URL (with ``storage_options``), else a local
    :class:`~pathlib.Path` (``storage_options`` are then not needed and ignored)."""
    if isinstance(path, URLPath):
        return path
    if is_url(path):
        return URLPath(str(path), storage_options)
    if isinstance(path, str) and path.startswith("file://"):
        return Path(path.removeprefix("file://"))
    return Path(path)


class URLPath(StorePath):
    """A file or a Zarr store at an fsspec URL, with the ``storage_options`` that reach it.

    Zarr opens it as it opens any store path (``zarr.open_group(p)``), through its
    ``FsspecStore``; it pickles with its options, so Dask tasks carry it to their workers. For
    the small files segpipe keeps beside results (state sidecars, reports, locks) it has the
    few :class:`pathlib.Path` methods they use, each one request to the store.

    ``p / "name"`` is Zarr's (a ``StorePath`` inside the store); join file paths with
    :meth:`joinpath`. It has no ``__fspath__`` at run time: code that would make it a local
    :class:`~pathlib.Path` fails with a ``TypeError`` instead of writing into a local folder
    named ``s3:``. For the type checker it is path-like, so functions typed
    ``str | os.PathLike`` that hand their argument to Zarr take it.
    """

    def __init__(self, url: str, storage_options: Mapping[str, Any] | None = None) -> None:
        self.url = url.rstrip("/")
        self.storage_options = dict(storage_options or {})
        store = FsspecStore.from_url(self.url, storage_options=dict(self.storage_options))
        super().__init__(store, "")

    if TYPE_CHECKING:

        def __fspath__(self) -> str: ...

    # -- naming ----------------------------------------------------------------------------
    def __str__(self) -> str:
        return self.url

    def __repr__(self) -> str:
        return f"URLPath({self.url!r})"

    def __eq__(self, other: object) -> bool:
        return (
            isinstance(other, URLPath)
            and self.url == other.url
            and self.storage_options == other.storage_options
        )

    def __hash__(self) -> int:
        return hash(self.url)

    @property
    def name(self) -> str:
        return self.url.rsplit("/", 1)[-1]

    @property
    def suffix(self) -> str:
        name = self.name
        return name[name.rfind(".") :] if "." in name.lstrip(".") else ""

    @property
    def parent(self) -> URLPath:
        return URLPath(self.url.rsplit("/", 1)[0], self.storage_options)

    def __truediv__(self, other: str) -> StorePath:
        # Zarr's meaning (a path inside the store), and a plain StorePath like Zarr's own.
        return StorePath(self.store, other)

    def with_name(self, name: str) -> URLPath:
        return self.parent.joinpath(name)

    def joinpath(self, *parts: str) -> URLPath:
        return URLPath("/".join([self.url, *(p.strip("/") for p in parts)]), self.storage_options)

    # -- the file system ---------------------------------------------------------------------
    def filesystem(self) -> tuple[Any, str]:
        """The (synchronous) fsspec file system and this URL's path in it.

        Its listings cache is dropped for this path first: Zarr writes through another
        (asynchronous) instance, and other processes write too.
        """
        import fsspec

        fs, path = fsspec.core.url_to_fs(self.url, **self.storage_options)
        fs.invalidate_cache(path)
        return fs, path

    # pathlib's meaning, not StorePath's coroutine: Zarr calls exists() only on the plain
    # StorePaths that ``/`` gives, never on a URLPath itself.
    def exists(self) -> bool:  # type: ignore[override]
        fs, path = self.filesystem()
        return bool(fs.exists(path))

    def is_dir(self) -> bool:
        fs, path = self.filesystem()
        return bool(fs.isdir(path))

    def mkdir(self, parents: bool = False, exist_ok: bool = False) -> None:
        """Nothing to do: object stores have no folders, a key's prefixes exist with it."""

    def modified(self) -> float:
        """When the object was last written, seconds since the epoch (the store's clock)."""
        fs, path = self.filesystem()
        return mtime_of(fs.info(path))

    def read_bytes(self) -> bytes:
        fs, path = self.filesystem()
        return bytes(fs.cat_file(path))

    def read_text(self, encoding: str = "utf-8") -> str:
        return self.read_bytes().decode(encoding)

    def write_bytes(self, data: bytes) -> int:
        """Write the whole object in one request: readers see the old one or the new one."""
        fs, path = self.filesystem()
        fs.pipe_file(path, data)
        return len(data)

    def write_text(self, text: str, encoding: str = "utf-8") -> int:
        return self.write_bytes(text.encode(encoding))

    def unlink(self, missing_ok: bool = False) -> None:
        fs, path = self.filesystem()
        try:
            fs.rm_file(path)
        except FileNotFoundError:
            if not missing_ok:
                raise

    def glob(self, pattern: str) -> list[URLPath]:
        """Objects directly under this prefix whose names match ``pattern``."""
        fs, path = self.filesystem()
        names = fs.glob(f"{path.rstrip('/')}/{pattern}")
        return [self.joinpath(str(n).rsplit("/", 1)[-1]) for n in names]

    def open_read(self) -> Any:
        """A seekable binary file over this URL that fetches byte ranges on demand
        (:data:`REMOTE_READ_BLOCK` ahead of each read), never the whole object."""
        fs, path = self.filesystem()
        return fs.open(path, "rb", block_size=REMOTE_READ_BLOCK, cache_type="readahead")


def mtime_of(info: Mapping[str, Any]) -> float:
    """A file's modification time, seconds since the epoch, from an fsspec ``info`` record.

    >>> mtime_of({"LastModified": "2026-11-29T17:20:00Z"})
    1795972800.0
    """
    # Local: "mtime"; memory: "created"; s3/gcs: "LastModified"/"updated" (datetime or str).
    for name in ("mtime", "LastModified", "last_modified", "updated", "created"):
        value = info.get(name)
        if value is None:
            continue
        if isinstance(value, dt.datetime):
            return value.timestamp()
        if isinstance(value, str):
            return dt.datetime.fromisoformat(value.replace("Z", "+00:00")).timestamp()
        return float(value)
    return 0.0


def write_json_atomic(path: str | os.PathLike[str], data: Mapping[str, Any]) -> Path | URLPath:
    """Write ``data`` as JSON so that readers see the old file or the new one, never half
    (:func:`write_text_atomic`)."""
    return write_text_atomic(path, json.dumps(data, indent=1, sort_keys=True))


def write_text_atomic(path: str | os.PathLike[str], text: str) -> Path | URLPath:
    """Write ``text`` (UTF-8) so that readers see the old file or the new one, never half.

    Locally the text goes to a temporary file in the same directory, then replaces ``path``
    in one rename (atomic on POSIX file systems); a failure leaves no temporary file behind.
    At a URL (a :class:`URLPath`) it is one PUT of the whole object, which object stores make
    visible whole or not at all.
    """
    if isinstance(path, URLPath) or is_url(path):
        target = location(path)
        target.write_text(text)
        return target
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    return path
