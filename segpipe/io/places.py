"""Where a location is, told apart from how it is spelt: what an output must not do to an
input it would replace or clear (:func:`overlap`)."""

from __future__ import annotations

import os
import posixpath
from pathlib import Path, PurePosixPath

from fsspec.registry import known_implementations

from segpipe.io.files import URLPath, is_url, location

__all__ = ["check_replaceable", "overlap", "public_url"]


def overlap(a: str | os.PathLike[str], b: str | os.PathLike[str]) -> str | None:
    """How location ``a`` overlaps ``b`` ("is", "is inside", "holds"), or None: what an output
    must not do to an input it would replace or clear (links resolved; URLs by their store
    and path: ``local:///x`` is ``/x``, ``s3a://`` is ``s3://``, ``d/../x`` is ``x``).

    >>> overlap("s3a://b/d/../out.zarr", "s3://b/out.zarr/scan.svs")
    'holds'
    """
    (store_a, p), (store_b, q) = _place(a), _place(b)
    if store_a != store_b:
        return None
    if p == q:
        return "is"
    return "is inside" if q in p.parents else "holds" if p in q.parents else None


def public_url(path: str) -> str:
    """``path`` without the user-info of a URL's authority (``user:password@``): as a result
    or an ingest records its source, and a log shows it.

    >>> public_url("http://alice:secret@host:8080/a.tif"), public_url("/data/a@b.tif")
    ('http://host:8080/a.tif', '/data/a@b.tif')
    """
    from urllib.parse import urlsplit, urlunsplit

    url = urlsplit(path) if is_url(path) else None
    if url is None or "@" not in url.netloc:
        return path
    return urlunsplit(url._replace(netloc=url.netloc.rpartition("@")[2]))


def _place(path: str | os.PathLike[str]) -> tuple[str, PurePosixPath | Path]:
    """Where ``path`` is: its file system (fsspec's class of its protocol, not the spelling:
    the last of a chain like ``simplecache::s3://``) and its path there, normalised. Built
    from names alone: location() builds a URL's file system (its package, a login)."""
    if not is_url(path):
        return "local", Path(location(path)).resolve()
    protocol, _, rest = str(path).rpartition("::")[2].partition("://")
    store = known_implementations.get(protocol, {}).get("class", protocol)
    if store == "fsspec.implementations.local.LocalFileSystem":
        return "local", Path(rest).resolve()
    return store, PurePosixPath(posixpath.normpath("/" + rest.rstrip("/")))


def check_replaceable(target: Path | URLPath, kind: str, begins: bytes) -> None:
    """ValueError naming ``target``, an existing file, unless it begins with ``begins``
    (after whitespace): overwrite replaces a file of the ``kind`` the command writes (its
    GeoJSON, its table, its checkpoint), never one given by mistake: the result's source
    image, a store's ``zarr.json``. FileNotFoundError where there is none."""
    with target.open_read() if isinstance(target, URLPath) else open(target, "rb") as f:
        head = f.read(len(begins) + 4096).lstrip()
    if not head.startswith(begins):
        raise ValueError(
            f"{target} exists and is no {kind} segpipe wrote: segpipe replaces only such a "
            "file; move it away or name another file"
        )
