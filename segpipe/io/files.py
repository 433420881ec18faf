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
import errno
import fnmatch
import functools
import json
import math
import os
import posixpath
import stat
from collections.abc import Iterable, Mapping
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import TYPE_CHECKING, Any

from zarr.abc.store import Store
from zarr.storage import FsspecStore, StorePath

from segpipe.atomic import replaced_file

__all__ = [
    "REMOTE_READ_BLOCK",
    "URLPath",
    "changed_file",
    "delete_marked_store",
    "file_state",
    "is_url",
    "json_number",
    "location",
    "mtime_of",
    "remove_literal",
    "utc_now",
    "write_json_atomic",
    "write_text_atomic",
]

# Bytes fetched ahead of each read from a URL: tifffile reads a TIFF's header in many small
# pieces and its tiles one by one, each a ranged GET that brings this much more with it.
REMOTE_READ_BLOCK = 2**18
# Deletions in flight at once of the keys deleted one by one: an object store takes one
# request per key (S3's 20-50 ms each), and a result holds a few thousand.
_DELETES_IN_FLIGHT = 16
# What fsspec's expand_path (glob.has_magic: * ? [) and its glob read as a pattern.
_GLOB_CHARACTERS = frozenset("[]*?")


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
        # RFC 8089, as Path.as_uri() writes it: percent-encoded, an empty or localhost host
        from urllib.parse import urlsplit
        from urllib.request import url2pathname

        url = urlsplit(path)
        if url.netloc not in ("", "localhost"):
            raise ValueError(f"{path}: a file URL of another host ({url.netloc}) is not local")
        if "?" in path or "#" in path:  # cut off as a query or fragment: another path
            raise ValueError(
                f"{path}: in a file URL '?' and '#' end the path; write them %3F and %23 (as "
                "Path.as_uri() does), or give the path itself"
            )
        return Path(url2pathname(url.path))
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
        store = _LiteralFsspecStore.from_url(self.url, storage_options=dict(self.storage_options))
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
        head = self.url.rpartition("/")[0]
        if head.endswith(":/") or not head:  # "memory://x" was in a local folder "memory:"
            raise ValueError(f"{self.url} is a store's root, nothing beside it: name a path in it")
        return URLPath(head, self.storage_options)

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
        try:
            fs.pipe_file(path, data)
        except FileNotFoundError as exc:  # s3fs's "The specified bucket does not exist"
            raise FileNotFoundError(errno.ENOENT, f"cannot be written ({exc})", str(self)) from exc
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
        """Objects directly under this prefix whose names match ``pattern`` (:mod:`fnmatch`'s
        rules); the prefix is taken as written, never as a pattern (``fs.glob`` reads the
        ``[1]`` of ``out[1]/`` as one, and lists ``out1/``)."""
        fs, path = self.filesystem()
        try:
            listed = fs.ls(path, detail=False)
        except FileNotFoundError:
            return []
        names = (str(n).rstrip("/").rsplit("/", 1)[-1] for n in listed)
        return [self.joinpath(n) for n in names if fnmatch.fnmatchcase(n, pattern)]

    def open_read(self) -> Any:
        """A seekable binary file over this URL that fetches byte ranges on demand
        (:data:`REMOTE_READ_BLOCK` ahead of each read), never the whole object."""
        fs, path = self.filesystem()
        return fs.open(path, "rb", block_size=REMOTE_READ_BLOCK, cache_type="readahead")


class _LiteralFsspecStore(FsspecStore):
    """Zarr's ``FsspecStore``, deleting each key as named.

    Zarr deletes a chunk written empty (``write_empty_chunks=False``) and what it overwrites
    through fsspec's ``rm``, which reads ``[ ] * ?`` as a glob pattern: the empty mask shard
    of a result at ``res[1A].zarr`` deleted that shard of ``res1.zarr`` and ``resA.zarr``.
    """

    async def delete(self, key: str) -> None:
        self._check_writable()
        path = f"{self.path.rstrip('/')}/{key}".rstrip("/")
        with contextlib.suppress(FileNotFoundError, *self.allowed_exceptions):
            await self.fs._rm_file(path)

    async def delete_dir(self, prefix: str) -> None:
        # Zarr's generic one: the keys listed below the prefix (a listing, never a pattern),
        # each deleted by delete() above.
        await Store.delete_dir(self, prefix)

    async def clear(self) -> None:
        await Store.clear(self)


def remove_literal(fs: Any, paths: str | Iterable[str], *, recursive: bool = False) -> None:
    """Delete ``paths`` (as ``fs.find`` names them) from the fsspec file system ``fs``, each
    as named, never as a pattern.

    fsspec's ``rm`` (through ``expand_path``) reads ``[``, ``]``, ``*`` and ``?`` in a path as
    a glob pattern: ``rm("out/res[1A].zarr", recursive=True)`` deleted ``out/res1.zarr`` and
    ``out/resA.zarr`` and kept ``out/res[1A].zarr``. Here each path is one file; with
    ``recursive`` each is a folder (a key prefix): every file ``find`` lists below it (a
    listing by prefix), then the empty folders a file system keeps (local, memory; an object
    store keeps none). The files without those characters go in one ``rm`` of their list,
    which ``expand_path`` takes literally (S3: one request per 1000 keys); the others one by
    one with ``rm_file`` (one DELETE of that key). s3fs's bulk delete ignores a key it failed
    to delete, so one listing then finds those left, deleted one by one too (raising that
    key's error). The files go in no particular order: a caller that needs one deletes in
    steps. A path already gone is no error.
    """
    roots = [paths] if isinstance(paths, str) else list(paths)
    files = [f for root in roots for f in fs.find(root)] if recursive else roots
    plain = {f for f in files if not _GLOB_CHARACTERS.intersection(f)}
    if plain:
        # What rm left (it stops at a file gone already, locally and in memory; a folder
        # named, which rm_file refuses as before) is listed, then deleted one by one.
        with contextlib.suppress(OSError, ValueError):
            fs.rm(sorted(plain))
        common = posixpath.commonpath(plain)
        fs.invalidate_cache(common)
        there = set(fs.find(common, withdirs=True))
        files = [f for f in files if f not in plain or f in there]
    if files:
        with ThreadPoolExecutor(min(len(files), _DELETES_IN_FLIGHT)) as pool:
            list(pool.map(functools.partial(_remove_file, fs), files))
    if recursive:
        for root in roots:
            _remove_folders(fs, root)
            fs.invalidate_cache(root)
            if left := fs.find(root):  # written meanwhile: a replaced run's late write
                remove_literal(fs, left)
                _remove_folders(fs, root)


def _remove_file(fs: Any, path: str) -> None:
    with contextlib.suppress(FileNotFoundError):
        fs.rm_file(path)


def _remove_folders(fs: Any, root: str) -> None:
    """Remove the empty folders at and below ``root``, each before its parent."""
    if not fs.isdir(root):
        return
    listed = fs.find(root, withdirs=True, detail=True)
    folders = [name for name, info in listed.items() if info.get("type") == "directory"]
    for folder in sorted(folders, reverse=True):
        try:
            fs.rmdir(folder)
        except FileNotFoundError:  # a memory file system's, implied by its files, went too
            pass
        except OSError as err:  # not empty: a file written meanwhile (s3fs's FileExistsError)
            if not isinstance(err, FileExistsError) and err.errno != errno.ENOTEMPTY:
                raise


def delete_marked_store(url: URLPath, root: str, marker: tuple[str, ...]) -> None:
    """Delete the store at ``url`` so that a kill at any instant leaves it reading as
    unfinished, never as complete with objects missing: its root document ``root`` first
    marked ``complete: false`` (at the keys ``marker``, e.g. ``("attributes", "segpipe")``;
    one PUT), then every other object, the root document last, then the folders a file
    system (not a bucket) keeps."""
    document_path = url.joinpath(root)
    document = json.loads(document_path.read_text())
    node = document
    for key in marker:
        node = node[key]
    node["complete"] = False
    document_path.write_text(json.dumps(document))
    fs, path = url.filesystem()
    path = path.rstrip("/")
    remove_literal(fs, [key for key in fs.find(path) if key.rstrip("/") != f"{path}/{root}"])
    document_path.unlink()
    remove_literal(fs, path, recursive=True)


def file_state(path: str | os.PathLike[str]) -> tuple[int, ...] | None:
    """``(inode, size, mtime in ns)`` of the regular file at ``path``: what changes when it is
    rewritten or another file is saved over it; None for anything else. Not the device: each
    machine of a cluster numbers an NFS mount its own way."""
    try:
        s = os.stat(path)
    except OSError:
        return None
    return (s.st_ino, s.st_size, s.st_mtime_ns) if stat.S_ISREG(s.st_mode) else None


def changed_file(states: Mapping[str, tuple[int, ...] | None]) -> str | None:
    """The first of ``states``' files (path: its :func:`file_state` when it was read) whose
    state is another now; None when none is."""
    return next((f for f, state in states.items() if file_state(f) != state), None)


def json_number(value: Any) -> Any:
    """``value``, a non-finite float as its text (``"NaN"``, ``"Infinity"``, ``"-Infinity"``,
    which ``float()`` reads back): strict JSON, and so a Zarr attribute, has none of them."""
    if not isinstance(value, float) or math.isfinite(value):
        return value
    return "NaN" if math.isnan(value) else "Infinity" if value > 0 else "-Infinity"


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
    target = location(path)  # a file:// URL is a local path too
    if isinstance(target, URLPath):
        target.write_text(text)
        return target
    with replaced_file(target) as tmp:
        tmp.write_text(text, encoding="utf-8")
    return target
