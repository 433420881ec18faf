"""Checks of an OME-TIFF image's planes made at open: the planes its OME-XML declares, and (in
a multi-file set) each file's IFDs against the ones tifffile reads them all by.

tifffile reads a level of a set through one keyframe, its first file's: its Zarr view places
every file's tiles by that keyframe's shape, tiles and dtype, and segpipe shows them as its
PhotometricInterpretation and Orientation say. At level 0 tifffile decodes each file's tiles by
that file's own keyframe, but at a reduced level (SubIFD) by the first file's alone, whatever
the other files' own tags say. A file that differs in any of these is refused here, naming the
file and the level, instead of read as a tile "that may be corrupt" or silently wrong.
"""

from __future__ import annotations

import math
import os
import re
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any, NoReturn

import numpy as np

from segpipe.io.readers.base import ImageReadError
from segpipe.io.readers.photometric import level_photometric, stated_orientation

__all__ = ["check_level_files", "check_ome_planes", "check_planes_read_once", "file_open"]

# The fewest bytes of an IFD (its tag count, one entry, the next offset): no file of n bytes
# holds more than n / this pages.
_MIN_IFD_BYTES = 2 + 12 + 4
_SIZE_ATTRIBUTES = re.compile(r'\bSize([CZT])\s*=\s*"\s*(\d+)\s*"')
_DIMENSION_ORDER = re.compile(r"""\bDimensionOrder\s*=\s*(["'])(.*?)\1""")
_IFD_ATTRIBUTE = re.compile(r"""\bIFD\s*=\s*(["'])(.*?)\1""")
# OME's DimensionOrder: X and Y first; tifffile takes the letters as they stand
_DIMENSION_ORDERS = ("XYZCT", "XYZTC", "XYCTZ", "XYCZT", "XYTCZ", "XYTZC")
# What tifffile decodes a tile by (TiffPage.decode; its layout aside): at a reduced level of a
# set, the first file's, for every file. (Byte order is each file's own: tifffile reads a
# big-endian file's SubIFD beside a little-endian one right.)
_DECODED_BY: tuple[tuple[str, Callable[[Any], Any]], ...] = (
    ("Compression (TIFF tag 259)", lambda p: p.compression),
    ("Predictor (TIFF tag 317)", lambda p: p.predictor),
    ("FillOrder (TIFF tag 266)", lambda p: p.fillorder),
    ("BitsPerSample (TIFF tag 258)", lambda p: p.bitspersample),
    ("PhotometricInterpretation (TIFF tag 262)", lambda p: p.tags.valueof(262)),
    ("ExtraSamples (TIFF tag 338)", lambda p: tuple(p.extrasamples)),
    ("YCbCrSubSampling (TIFF tag 530)", lambda p: p.subsampling),
)


def check_ome_planes(tif: Any, file_size: int, path: str) -> None:
    """Refuse an OME-TIFF whose OME-XML declares an image of more planes (SizeC x SizeZ x
    SizeT) than the set's files could hold pages: tifffile lists a page for each (a SizeT
    of 2**31 took 16 GiB before anything was checked). ``file_size``: bytes of ``tif``'s
    file; the set's other files, where present beside it, add theirs. Refused too: a
    DimensionOrder not one of OME's six (tifffile then places several planes at one) and a
    negative TiffData IFD (tifffile indexes pages from the end by it)."""
    if not tif.is_ome or not tif.pages.first.description:
        return
    xml = tif.pages.first.description
    folder = os.path.dirname(str(tif.filehandle.path))
    others = set(re.findall(r'FileName\s*=\s*"([^"]+)"', xml)) - {tif.filehandle.name}
    total = file_size + sum(
        os.path.getsize(f) for n in others if os.path.isfile(f := os.path.join(folder, n))
    )
    for pixels in re.findall(r"<(?:\w+:)?Pixels\b[^>]*>", xml):
        order = _DIMENSION_ORDER.search(pixels)
        if order is not None and order.group(2) not in _DIMENSION_ORDERS:
            raise ImageReadError(
                f"{path}: its OME-XML gives DimensionOrder {order.group(2)!r}, not one of "
                f"{', '.join(_DIMENSION_ORDERS)}: tifffile would read one plane in place of "
                "several; the OME-XML is damaged"
            )
        sizes = dict(_SIZE_ATTRIBUTES.findall(pixels))
        planes = math.prod(int(sizes.get(k, 1)) for k in "CZT")
        if planes > total // _MIN_IFD_BYTES + 1:
            raise ImageReadError(
                f"{path}: its OME-XML declares an image of {planes:,} planes (SizeC x SizeZ x "
                f"SizeT), more than its {total:,} bytes could hold; the OME-XML is damaged"
            )
    for tiffdata in re.findall(r"<(?:\w+:)?TiffData\b[^>]*>", xml):
        ifd = _IFD_ATTRIBUTE.search(tiffdata)
        if ifd is not None and ifd.group(2).strip().startswith("-"):
            raise ImageReadError(
                f"{path}: its OME-XML places a plane at IFD {ifd.group(2).strip()} (TiffData), "
                "a negative one, which tifffile counts from the last IFD; the OME-XML is damaged"
            )


def check_planes_read_once(pages: list[Any], level: int, path: str) -> None:
    """Refuse a level two of whose planes ``pages`` are one IFD of one file: an OME-XML naming
    one IFD for two planes (a TiffData without a UUID in a set is the IFD of the file opened),
    which tifffile reads as both."""
    first: dict[tuple[str, Any], int] = {}
    for i, p in enumerate(pages):
        where = (str(p.parent.filehandle.path), p.index)
        if where in first:
            ifd = where[1] if isinstance(where[1], int) else where[1][0]  # a SubIFD's: (IFD, k)
            raise ImageReadError(
                f"{path}: level {level} reads IFD {ifd} of {where[0]} as two of its planes "
                f"({first[where]} and {i} of {len(pages)}: channels, Z, T); the OME-XML is "
                "damaged"
            )
        first[where] = i


def check_level_files(series: Any, level: int, name_of: Callable[[Any], str]) -> None:
    """Refuse level ``level`` of ``series`` (a tifffile ``TiffPageSeries``) where a file of its
    multi-file OME-TIFF set stores it unlike the level's keyframe (in its first file): in its
    size, tiles or strips, or dtype, which tifffile's Zarr view takes from that keyframe; in
    how its samples are shown (PhotometricInterpretation, ColorMap, ExtraSamples, Orientation),
    which segpipe takes from it; and at a reduced level, in how its tiles are decoded
    (:data:`_DECODED_BY`), which tifffile takes from it too.

    ``name_of``: the file holding a page, as an error names it. At a reduced level a file's
    own tags are read from its first page's IFD (its file opened for that if tifffile closed
    it): one IFD a file."""
    keyframe = series.levels[level].keyframe
    pages = [p for p in series.levels[level].pages if p is not None and p.keyframe is not None]
    theirs = {name_of(keyframe): keyframe}
    for p in pages:
        if level == 0:
            theirs.setdefault(name_of(p.keyframe), p.keyframe)
        elif (name := name_of(p)) not in theirs:
            theirs[name] = _own_ifd(p)
    own = name_of(keyframe)
    turn = _orientation(series.levels[0].keyframe, 1)
    for name, page in theirs.items():
        if page is keyframe:
            continue
        _check_like_level(page, keyframe, level, name, own)
        showing = "segpipe shows every file of the set's level as"
        if _shown(page, name, level) != _shown(keyframe, own, level):
            _refuse(name, level, _interpretation(page), own, _interpretation(keyframe), showing)
        if (a := _orientation(page, turn)) != (b := _orientation(keyframe, turn)):
            _refuse(name, level, f"Orientation (TIFF tag 274) {a}", own, str(b), showing)
        reading = "tifffile decodes the tiles of every file of the set at a reduced level by"
        for label, value in _DECODED_BY if level else ():
            if (a := value(page)) != (b := value(keyframe)):
                _refuse(name, level, f"{label} {_text(a)}", own, _text(b), reading)


def _own_ifd(frame: Any) -> Any:
    """``frame``'s IFD read as a tifffile ``TiffPage``: its own tags, not its keyframe's."""
    with file_open(frame):
        return frame.aspage()


@contextmanager
def file_open(page: Any) -> Iterator[None]:
    """The file holding ``page`` (a tifffile page or frame) open for the block: tifffile closes
    a set's other files once it has read their IFDs; closed again after, if it was."""
    handle = page.parent.filehandle
    closed = handle.closed
    if closed:
        handle.open()
    try:
        yield
    finally:
        if closed:
            handle.close()


def _refuse(name: str, level: int, stated: str, own: str, there: str, reads: str) -> NoReturn:
    """Refuse ``name``'s ``level``, which ``stated``, ``own`` (the level keyframe's file)
    ``there``; ``reads``: who reads every file by the keyframe, and how."""
    raise ImageReadError(
        f"{name}: level {level} has {stated}, in {own} {there}; {reads} the first file's "
        "(the level's keyframe) and would read this one wrong: write the set's files alike"
    )


def _text(value: Any) -> str:
    """A tag's value as an error gives it: an enumeration's number and name."""
    name = getattr(value, "name", None)
    return str(value) if name is None else f"{int(value)} ({name})"


def _shown(page: Any, name: str, level: int) -> tuple[Any, ...]:
    """What segpipe does to ``page``'s samples to show them (:func:`level_photometric`)."""
    shown = level_photometric(page, name, level)
    palette = None if shown.palette is None else (shown.palette.shape, shown.palette.tobytes())
    return palette, shown.inverted, shown.bits_per_sample, shown.premultiplied, shown.alpha


def _interpretation(page: Any) -> str:
    """The tags saying how ``page``'s samples are shown, as an error gives them."""
    photometric = page.tags.valueof(262)
    told = "none" if photometric is None else _text(page.photometric)
    if page.colormap is not None:
        told += f" with a ColorMap (320) of {np.asarray(page.colormap).size:,} values"
    if page.extrasamples:
        told += f", ExtraSamples (338) {tuple(int(e) for e in page.extrasamples)}"
    return f"PhotometricInterpretation (TIFF tag 262) {told}, of {page.bitspersample}-bit samples"


def _orientation(page: Any, unstated: int) -> int:
    """``page``'s Orientation (TIFF tag 274) as the TIFF reader takes it, ``unstated`` where
    it states none."""
    stated = stated_orientation(page)
    return unstated if stated is None else stated


def _check_like_level(keyframe: Any, level_keyframe: Any, level: int, name: str, own: str) -> None:
    """Refuse ``keyframe``, of a file (``name``) of a multi-file OME-TIFF set, whose size,
    tiles or strips, or dtype differ from those of ``level_keyframe`` (in ``own``): tifffile's
    Zarr view places every file's tiles by the level's tile grid and decodes them by their
    file's keyframe, which reshape fails on, or allocates what a lying tag declares."""

    def layout(page: Any) -> tuple[Any, ...]:
        return tuple(page.shape), tuple(page.chunks), page.dtype

    if layout(keyframe) == layout(level_keyframe):
        return

    def text(page: Any) -> str:
        kind = "tiles" if page.is_tiled else "strips"
        shape, chunks = ("x".join(map(str, s)) for s in (page.shape, page.chunks))
        return f"{shape} pixels of {page.dtype} in {kind} of {chunks}"

    raise ImageReadError(
        f"{name}: level {level} is {text(keyframe)}, in {own} {text(level_keyframe)}; "
        "tifffile reads every file of the set by one tile grid and pixel type. Its ImageWidth, "
        "ImageLength (TIFF tags 256, 257), TileWidth, TileLength (322, 323), RowsPerStrip "
        "(278), SamplesPerPixel (277), BitsPerSample (258) or SampleFormat (339) is damaged, "
        "or the set's files were written unalike: write them again alike"
    )
