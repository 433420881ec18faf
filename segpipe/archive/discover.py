"""Finding an archive's images and fingerprinting them cheaply, on local disks or fsspec URLs."""

from __future__ import annotations

import fnmatch
import hashlib
import logging
import os
import posixpath
import time
from collections.abc import Iterator, Mapping
from dataclasses import asdict, dataclass
from pathlib import PurePosixPath
from typing import Any

from segpipe.archive.parts import image_parts
from segpipe.io.files import is_url, location, mtime_of
from segpipe.io.readers import IMAGE_SUFFIXES

__all__ = [
    "ArchiveImage",
    "Fingerprint",
    "discover_images",
    "filesystem",
    "fingerprint_image",
]

log = logging.getLogger("segpipe.archive")

# Sampled-content hash: the first and last blocks hold a TIFF's header and (often, for BigTIFF
# and SVS) its IFDs; the blocks between catch re-scans that keep the size.
_SAMPLE_BLOCKS = 4
_SAMPLE_BLOCK_BYTES = 64 * 1024


@dataclass(frozen=True)
class ArchiveImage:
    """One image found in an archive.

    Attributes
    ----------
    url
        What opens it: a local path, or an fsspec URL (``s3://bucket/scans/a.svs``).
    key
        Its path relative to the archive root, ``/``-separated; names its outputs.
    size
        Bytes.
    mtime
        Modification time, seconds since the epoch (as the file system reports it).
    parts
        The other files the image is made of (:mod:`segpipe.archive.parts`: a multi-file
        OME-TIFF set's, an MRXS data folder's, the JPEGs of a VMS), as ``url`` is spelled;
        ``size`` is theirs and its own summed, ``mtime`` the latest.
    """

    url: str
    key: str
    size: int
    mtime: float
    parts: tuple[str, ...] = ()

    @property
    def is_local(self) -> bool:
        return "://" not in self.url


@dataclass(frozen=True)
class Fingerprint:
    """Cheap content identity: size, mtime and a SHA-256 of a few sampled blocks.

    All three must match for an image to count as unchanged, so a touched or rewritten file is
    segmented again even when the sampled blocks happen to agree.
    """

    size: int
    mtime: float
    sample_sha256: str

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def discover_images(
    source: str | os.PathLike[str],
    *,
    pattern: str = "*",
    suffixes: tuple[str, ...] = IMAGE_SUFFIXES,
    min_age_s: float = 0.0,
    exclude: str | os.PathLike[str] | None = None,
    storage_options: Mapping[str, Any] | None = None,
) -> list[ArchiveImage]:
    """Images under ``source``, sorted by key.

    Parameters
    ----------
    source
        A local folder or an fsspec URL of one (``s3://bucket/scans``); listed recursively.
    pattern
        ``fnmatch`` pattern over the key (the path relative to ``source``); ``*`` also crosses
        folders, so ``"2026-*/*.svs"`` and ``"*.svs"`` both reach nested files. A pattern
        without ``/`` also matches the file's name alone: ``"case-1*"`` finds
        ``day-2/case-17.svs``.
    suffixes
        File name endings to keep (case-insensitive); default every format segpipe reads
        from a single file (Zarr stores are directories and are not discovered).
    min_age_s
        Leave out files modified less than this many seconds ago: a scanner may still be
        writing them.
    exclude
        A folder to leave out, e.g. ``output_root`` when it lies inside the archive (its
        thumbnails are PNGs); local paths are compared resolved, so any spelling of it
        through symbolic links counts. ValueError when it is the archive or holds it.
    storage_options
        Passed to fsspec for remote URLs (credentials, endpoint).

    Hidden files and folders (a name starting with ``.``) are ignored. Local symbolic links
    to files and folders are followed, each real folder listed once. A multi-file OME-TIFF
    set is one image (:mod:`segpipe.archive.parts`), found when any of its files matches
    ``pattern`` and left for later while any is too young.
    """
    fs, root = filesystem(str(source), storage_options)
    if not fs.isdir(root):
        what = "is a file, not a folder" if fs.isfile(root) else "no such folder (or bucket prefix)"
        raise FileNotFoundError(f"archive {source}: {what}")
    root = root.rstrip("/")
    local = _is_local(fs)
    skip = _excluded_folder(fs, root, exclude, storage_options)
    files = _local_files(root, skip) if local else _remote_files(fs, root, skip)
    listed = {path: (size, mtime) for path, size, mtime in files}
    ends = tuple(s.lower() for s in suffixes)
    keys = {p: str(PurePosixPath(p).relative_to(root)) for p in listed}
    shown = {p for p, key in keys.items() if not any(n.startswith(".") for n in key.split("/"))}
    candidates = sorted(p for p in shown if keys[p].lower().endswith(ends))
    made_of = image_parts(fs, candidates, shown)
    is_candidate = set(candidates)
    now = time.time()
    found = []
    for path in candidates:
        if path in made_of.part_of:
            continue  # its image stands for it (a JPEG of a VMS, a file of an OME-TIFF set)
        key, parts = keys[path], made_of.parts.get(path, ())
        if not any(_matches(keys[p], pattern) for p in (path, *parts) if p in is_candidate):
            continue
        if bad := [p for p in (path, *parts) if not _is_utf8(p)]:
            # Its key would name its outputs, catalog record, logs and Prefect artifacts, all
            # UTF-8 text: one such name failed the whole run, the other images' reports too.
            log.warning(
                "%s: its name is not UTF-8 (undecodable bytes shown as \\x..), left out: "
                "rename it", _shown(bad[0]),
            )  # fmt: skip
            continue
        size = sum(listed[p][0] for p in (path, *parts))
        mtime = max(listed[p][1] for p in (path, *parts))
        if min_age_s and now - mtime < min_age_s:
            log.info("%s: modified %.0f s ago, left for a later run", key, now - mtime)
            continue
        if not local:
            path, parts = fs.unstrip_protocol(path), tuple(map(fs.unstrip_protocol, parts))
        found.append(ArchiveImage(url=path, key=key, size=size, mtime=mtime, parts=parts))
    return sorted(found, key=lambda image: image.key)


def _is_utf8(name: str) -> bool:
    """Whether ``name`` (as os.scandir gives it: undecodable bytes as lone surrogates) is
    UTF-8 text."""
    try:
        name.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def _shown(name: str) -> str:
    """``name`` printable whatever its bytes: undecodable ones as ``\\xe9``."""
    return os.fsencode(name).decode("utf-8", "backslashreplace")


def _matches(key: str, pattern: str) -> bool:
    """Whether ``key`` matches ``pattern``, or its file name alone a pattern without ``/``."""
    by_name = "/" not in pattern and fnmatch.fnmatch(key.rsplit("/", 1)[-1], pattern)
    return by_name or fnmatch.fnmatch(key, pattern)


def _excluded_folder(
    fs: Any,
    root: str,
    exclude: str | os.PathLike[str] | None,
    storage_options: Mapping[str, Any] | None,
) -> str | None:
    """``exclude`` as ``root`` is spelled (resolved, for local paths), or None when it lies in
    another store; ValueError when it is the archive or holds it (its outputs would then be
    all there is to find, and the archive's images none)."""
    if exclude is None:
        return None
    other_fs, skip = filesystem(str(exclude), storage_options)
    if other_fs.protocol != fs.protocol:
        return None
    if _is_local(fs):
        skip, where = os.path.realpath(skip), os.path.realpath(root)
    else:
        skip, where = skip.rstrip("/"), root
    if _within(where, skip):
        raise ValueError(
            f"output_root {exclude} is the archive {root} or contains it; put the outputs "
            "in a folder of their own, beside the archive or inside it"
        )
    return skip


def _within(path: str, folder: str) -> bool:
    """Whether ``path`` is ``folder`` or lies below it (by whole names, not a string prefix).

    >>> _within("/data/out/a.png", "/data/out"), _within("/data/outputs", "/data/out")
    (True, False)
    """
    return PurePosixPath(path).is_relative_to(PurePosixPath(folder))


def _remote_files(fs: Any, root: str, skip: str | None) -> Iterator[tuple[str, int, float]]:
    for path, info in fs.find(root, detail=True).items():
        if info.get("type") == "file" and not (skip and _within(path, skip)):
            yield path, int(info["size"]), mtime_of(info)


def _local_files(root: str, skip: str | None) -> Iterator[tuple[str, int, float]]:
    """(path, size, mtime) of the files under ``root``, through symbolic links to files and
    folders (fsspec's ``find`` skips both), each real folder once: a link loop ends there.

    Paths keep the spelling under ``root``; ``skip`` is a resolved folder.
    """
    seen: set[str] = set()
    folders = [root]
    while folders:
        folder = folders.pop()
        real = os.path.realpath(folder)
        if real in seen or (skip and _within(real, skip)):
            continue
        seen.add(real)
        try:
            entries = sorted(os.scandir(folder), key=lambda e: e.name, reverse=True)
        except OSError as exc:
            log.warning("%s: cannot list it (%s), left out", folder, exc)
            continue
        for entry in entries:
            if entry.name.startswith("."):
                continue  # hidden: never an image of the archive (and maybe a huge .snapshot)
            try:
                if entry.is_dir():  # follows links, as is_file does
                    folders.append(entry.path)
                elif entry.is_file() and not (skip and _within(os.path.realpath(entry), skip)):
                    st = entry.stat()
                    yield entry.path, st.st_size, st.st_mtime
            except OSError:  # a dangling link, or a file gone meanwhile
                continue


def fingerprint_image(
    image: ArchiveImage,
    *,
    blocks: int = _SAMPLE_BLOCKS,
    block_bytes: int = _SAMPLE_BLOCK_BYTES,
    storage_options: Mapping[str, Any] | None = None,
) -> Fingerprint:
    """The image's :class:`Fingerprint`, reading at most ``blocks * block_bytes`` bytes.

    Size and mtime are read again (not taken from discovery, nor from the file system's
    listing cache), so a file replaced since it was listed gets its new identity. An image
    made of several files (``image.parts``) has their sizes summed, the latest mtime, and a
    hash over each file's name (relative to the image's folder), size and sampled hash.
    ``blocks`` >= 2 (the first and the last bytes among them), ``block_bytes`` >= 1.
    """
    # one block could not reach both ends (and divided by zero); none sampled no content
    if blocks < 2 or block_bytes < 1:
        raise ValueError(f"blocks must be >= 2 and block_bytes >= 1, got {blocks}, {block_bytes}")
    fs, path = filesystem(image.url, storage_options)
    own = _file_print(fs, path, blocks, block_bytes)
    if not image.parts:
        return own
    folder, prints = posixpath.dirname(path), {".": own}
    for part in image.parts:
        where = filesystem(part, storage_options)[1]
        prints[posixpath.relpath(where, folder)] = _file_print(fs, where, blocks, block_bytes)
    h = hashlib.sha256()
    for name, p in sorted(prints.items()):  # names relative to the image: a moved set keeps it
        h.update(f"{name}\n{p.size}\n{p.sample_sha256}\n".encode())
    size = sum(p.size for p in prints.values())
    return Fingerprint(size, max(p.mtime for p in prints.values()), h.hexdigest())


def _file_print(fs: Any, path: str, blocks: int, block_bytes: int) -> Fingerprint:
    # s3fs (and others) answer info from the listing that discovery cached: a file changed
    # since (the re-fingerprint after segmenting looks for just that) would not show.
    fs.invalidate_cache(path)
    info = fs.info(path)
    size = int(info["size"])
    h = hashlib.sha256(f"{size}\n".encode())
    if size <= blocks * block_bytes:
        h.update(fs.cat_file(path))
    else:
        step = (size - block_bytes) / (blocks - 1)
        for i in range(blocks):
            start = round(i * step)
            h.update(fs.cat_file(path, start=start, end=start + block_bytes))
    return Fingerprint(size=size, mtime=mtime_of(info), sample_sha256=h.hexdigest())


def filesystem(url: str, storage_options: Mapping[str, Any] | None) -> tuple[Any, str]:
    import fsspec

    if not is_url(url):  # a file:// URL decoded as location() reads it ("my%20scans")
        url = str(location(url))
    return fsspec.core.url_to_fs(url, **dict(storage_options or {}))


def _is_local(fs: Any) -> bool:
    protocol = fs.protocol if isinstance(fs.protocol, tuple) else (fs.protocol,)
    return "file" in protocol
