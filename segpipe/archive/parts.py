"""The files an archive's image is made of besides the one discovered: the other files of a
multi-file OME-TIFF set, an MRXS slide's data folder, the JPEGs a Hamamatsu VMS or VMU names.

Every file of an OME-TIFF set opens the whole set (tifffile follows the OME-XML's file
names), so discovery keeps one image of a set, and the fingerprint covers every part: a rescan
that rewrites a data file alone is segmented again. Only file names a listing holds count; a
part that is missing is the reader's to refuse, naming it.
"""

from __future__ import annotations

import configparser
import posixpath
from collections.abc import Collection
from dataclasses import dataclass, field
from typing import Any

from segpipe.io.files import REMOTE_READ_BLOCK
from segpipe.io.readers.base import DECODE_ERRORS
from segpipe.io.readers.ome_sets import other_set_files

__all__ = ["ImageParts", "image_parts"]

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
    sets: dict[str, list[str]] = {}  # an OME-TIFF's other files of its set
    for path in images:
        lower = path.lower()
        if lower.endswith(_OME_SUFFIXES):
            if named := _listed(path, _ome_set_names(fs, path), listed):
                sets[path] = named
        elif lower.endswith(".mrxs"):
            folder = path[: -len(".mrxs")] + "/"  # its data folder, named as the slide
            if data := sorted(p for p in listed if p.startswith(folder)):
                found.parts[path] = tuple(data)
        elif lower.endswith((".vms", ".vmu")):
            found.parts[path] = tuple(_listed(path, _vms_names(fs, path), listed))
            found.part_of.update(dict.fromkeys(found.parts[path], path))
    # Every file of a Bio-Formats set names the others: the first by path stands for them.
    # A file naming none (an OME-XML of its own plane only) is no image of its own; one that
    # no other names (a copy of a set's file, under a name of its own) is.
    for path in sorted(sets):
        if path not in found.part_of:
            found.parts[path] = tuple(sets[path])
            for part in sets[path]:
                if part not in found.parts:
                    found.part_of.setdefault(part, path)
    return found


def _listed(path: str, names: list[str], listed: set[str]) -> list[str]:
    """``names`` (relative to ``path``'s folder) as listed paths; the rest left out."""
    folder = posixpath.dirname(path)
    paths = {posixpath.normpath(posixpath.join(folder, name)) for name in names if name}
    return sorted(p for p in paths if p in listed and p != path)


def _ome_set_names(fs: Any, path: str) -> list[str]:
    import tifffile

    try:
        # a remote file by ranges: fsspec's default block (s3fs: 50 MiB) fetched it whole
        with (
            fs.open(path, "rb", block_size=REMOTE_READ_BLOCK, cache_type="readahead") as f,
            tifffile.TiffFile(f) as tif,
        ):
            description = tif.pages.first.description or ""
    except DECODE_ERRORS:
        return []
    return other_set_files(description, posixpath.basename(path))


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
