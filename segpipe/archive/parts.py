"""The files an archive's image is made of besides the one discovered: the other files of a
multi-file OME-TIFF set, an MRXS slide's data folder, the JPEGs a Hamamatsu VMS or VMU names.

Every file of an OME-TIFF set opens the whole set (tifffile follows the OME-XML's file
names), so discovery keeps one image of a set, and the fingerprint covers every part: a rescan
that rewrites a data file alone is segmented again. Only file names a listing holds count; a
part that is missing is the reader's to refuse, naming it.
"""

from __future__ import annotations

import configparser
import logging
import posixpath
from collections.abc import Collection
from dataclasses import dataclass, field
from typing import Any

from segpipe.io.readers.base import DECODE_ERRORS
from segpipe.io.readers.ome_sets import files_named

__all__ = ["ImageParts", "image_parts"]

log = logging.getLogger("segpipe.archive")

_OME_SUFFIXES = (".ome.tif", ".ome.tiff", ".ome.tf2", ".ome.tf8", ".ome.btf")
# Hamamatsu's index keys naming a file of the slide (OpenSlide's vms/vmu reader)
_VMS_KEYS = ("imagefile", "mapfile", "optimisationfile")


@dataclass
class ImageParts:
    """What :func:`image_parts` found: ``parts`` (an image's path -> its other files' paths,
    sorted) and ``part_of`` (a file that is a part -> the path of its image, which stands for
    it: for an OME-TIFF set, the first by path of the files that name the others)."""

    parts: dict[str, tuple[str, ...]] = field(default_factory=dict)
    part_of: dict[str, str] = field(default_factory=dict)


def image_parts(fs: Any, images: list[str], listed: Collection[str]) -> ImageParts:
    """The other files each of ``images`` (paths in ``fs``, sorted) is made of, among the
    ``listed`` paths (every file found, of any name).

    Reads each OME-TIFF's first IFD (its OME-XML) and each VMS/VMU index; an unreadable one
    is taken as a file of its own (opening it names the problem).
    """
    found = ImageParts()
    listed = set(listed)
    links: dict[str, set[str]] = {path: set() for path in images}
    named_others: set[str] = set()
    for path in images:
        lower = path.lower()
        if lower.endswith(_OME_SUFFIXES):
            named = _listed(path, _ome_set_names(fs, path), listed)
            if named:
                named_others.add(path)
            for other in named:
                links[path].add(other)
                links.setdefault(other, set()).add(path)
        elif lower.endswith(".mrxs"):
            folder = path[: -len(".mrxs")] + "/"  # its data folder, named as the slide
            if data := sorted(p for p in listed if p.startswith(folder)):
                found.parts[path] = tuple(data)
        elif lower.endswith((".vms", ".vmu")) and (
            named := _listed(path, _vms_names(fs, path), listed)
        ):
            found.parts[path] = tuple(named)
    seen: set[str] = set()
    for path in images:
        if path in seen or not links[path]:
            continue
        members, todo = set(), [path]
        while todo:
            p = todo.pop()
            if p not in members:
                members.add(p)
                todo.extend(links.get(p, ()))
        seen |= members
        # a file named but naming none (e.g. one with an OME-XML of its own plane only) opens
        # as that plane alone: the set's first file by path that names others stands for it
        first = min(members & named_others)
        found.parts[first] = tuple(sorted(members - {first}))
    for path, parts in found.parts.items():
        for part in parts:
            found.part_of.setdefault(part, path)
            log.debug("%s: a part of %s, segmented as that", part, path)
    return found


def _listed(path: str, names: list[str], listed: set[str]) -> list[str]:
    """``names`` (relative to ``path``'s folder) as listed paths; the rest left out."""
    folder = posixpath.dirname(path)
    paths = {posixpath.normpath(posixpath.join(folder, name)) for name in names if name}
    return sorted(p for p in paths if p in listed and p != path)


def _ome_set_names(fs: Any, path: str) -> list[str]:
    import tifffile

    try:
        with fs.open(path, "rb") as f, tifffile.TiffFile(f) as tif:
            description = tif.pages.first.description or ""
    except DECODE_ERRORS:
        return []
    return files_named(description, posixpath.basename(path))


def _vms_names(fs: Any, path: str) -> list[str]:
    parser = configparser.ConfigParser(interpolation=None, strict=False)
    try:
        parser.read_string(fs.cat_file(path).decode("utf-8", "replace"))
    except (OSError, configparser.Error):
        return []
    return [
        value.strip()
        for section in parser.sections()
        for key, value in parser.items(section)
        if key.split("(", 1)[0].strip() in _VMS_KEYS
    ]
