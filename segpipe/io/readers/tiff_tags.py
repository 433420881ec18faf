"""TIFF tags whose values lie past the end of their file, which tifffile drops in silence."""

from __future__ import annotations

import struct
import warnings
from typing import Any

from segpipe.io.readers.base import ImageReadError

__all__ = ["check_tag_values"]


def check_tag_values(tif: Any, file_size: int, path: str) -> None:
    """Refuse a TIFF with a tag (of any IFD, SubIFDs too) whose values, too many for its IFD
    entry, lie past the end of the file: tifffile drops such a tag, only logging it, and
    takes its default (1 bit per sample, unsigned samples, no description: an SVS read as a
    plain TIFF without its pixel size; a reduced level cut there read as a series of its own).
    Run after the checks that name a truncated level: a cut file fails those first."""
    fmt, fh = tif.tiff, tif.filehandle
    if fmt.is_ndpi:
        return  # its offsets' high bits lie elsewhere (tifffile's NDPI handling)
    for k, page in enumerate(tif.pages):
        ifds = [(int(page.offset), f"IFD {k}")]
        ifds += [(int(o), f"IFD {k}'s SubIFD {j}") for j, o in enumerate(page.subifds or ())]
        for offset, name in ifds:
            fh.seek(offset)
            tags = struct.unpack(fmt.tagnoformat, fh.read(fmt.tagnosize))[0]
            entries = fh.read(tags * fmt.tagsize)
            for i in range(tags):
                entry = entries[i * fmt.tagsize : (i + 1) * fmt.tagsize]
                _check_tag_value(fmt, entry, file_size, path, name)


def _check_tag_value(fmt: Any, entry: bytes, file_size: int, path: str, name: str) -> None:
    import tifffile

    code, dtype = struct.unpack(fmt.tagformat1, entry[:4])
    count, value = struct.unpack(fmt.tagformat2, entry[4:])
    if (kind := tifffile.TIFF.DATA_FORMATS.get(dtype)) is None:
        return  # a type tifffile does not read: skipped by it too
    size = count * struct.calcsize(fmt.byteorder + kind)
    if size <= fmt.tagoffsetthreshold:
        return  # the values lie in the entry itself
    at = int(struct.unpack(fmt.offsetformat, value)[0])
    if at + size > file_size:
        if code not in tifffile.TIFF.TAGS:  # a vendor's private tag: nothing read changes
            warnings.warn(
                f"{path}: {name}'s private tag {code} has its values past the end of the "
                "file; left out, as tifffile does",
                stacklevel=4,
            )
            return
        tag = tifffile.TIFF.TAGS[code]
        raise ImageReadError(
            f"{path}: {name}'s tag {code} ({tag}) has its {count:,} values at bytes {at:,}-"
            f"{at + size:,}, past the end of the file ({file_size:,} bytes); the file is "
            "truncated or damaged"
        )
