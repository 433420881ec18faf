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
from segpipe.io.readers.photometric import (
    JPEG_COMPRESSIONS,
    level_photometric,
    stated_orientation,
)

__all__ = [
    "check_level_files",
    "check_ome_planes",
    "check_planes_read_once",
    "file_open",
]

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
    ("PhotometricInterpretation (TIFF tag 262)", lambda p: p.photometric),
    ("ExtraSamples (TIFF tag 338)", lambda p: tuple(p.extrasamples)),
    ("YCbCrSubSampling (TIFF tag 530)", lambda p: p.subsampling),
)
# tifffile decodes a JPEG stream by its own tables and frame header: these tags play no part
_NOT_IN_JPEG = (
    "Predictor (TIFF tag 317)",
    "FillOrder (TIFF tag 266)",
    "YCbCrSubSampling (TIFF tag 530)",
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
    """Refuse a level two of whose planes ``pages`` are one IFD of one file, which tifffile
    reads as both: an OME-XML naming one IFD for two planes (a TiffData without a UUID in a
    set is the IFD of the file opened), or two planes' SubIFDs tags pointing at one IFD."""
    first: dict[tuple[str, Any], int] = {}
    for i, p in enumerate(pages):
        # By the IFD's offset (a SubIFD's index is its level's number alone, the same for
        # every plane); a frame with no IFD of its own by its place in the tree.
        where = (str(p.parent.filehandle.path), p.offset or tuple(p.treeindex))
        if where in first:
            damaged = "its SubIFDs (TIFF tag 330) are" if level else "the OME-XML is"
            raise ImageReadError(
                f"{path}: level {level} reads {_ifd(p)} of {where[0]} as two of its planes "
                f"({first[where]} and {i} of {len(pages)}: channels, Z, T); {damaged} damaged"
            )
        first[where] = i


def check_level_files(series: Any, level: int, name_of: Callable[[Any], str]) -> None:
    """Refuse level ``level`` of ``series`` (a tifffile ``TiffPageSeries``) where a plane's own
    IFD stores it unlike what it is read by. Unlike the level's keyframe (its first plane, in
    a multi-file OME-TIFF set its first file's): in its size, tiles or strips, or dtype, which
    tifffile's Zarr view takes from that keyframe; in how its samples are shown
    (PhotometricInterpretation, ColorMap, ExtraSamples, Orientation), which segpipe takes from
    it. Unlike the keyframe tifffile decodes the plane's tiles by (the first plane of its file
    at level 0, the level's keyframe above): in how they are decoded (:data:`_DECODED_BY`).
    tifffile reads only the offsets and byte counts of a plane after a file's first, so
    without this check, a plane stored otherwise reads silently wrong.

    ``name_of``: the file holding a page, as an error names it. One IFD read a plane (its file
    opened for that if tifffile closed it)."""
    keyframe = series.levels[level].keyframe
    pages = [p for p in series.levels[level].pages if p is not None and p.keyframe is not None]
    turn = _orientation(series.levels[0].keyframe, 1)
    own, upright = name_of(keyframe), _orientation(keyframe, turn)
    shown = None  # the keyframe's, made when a first plane is compared with it
    firsts: set[str] = set()
    for i, p in enumerate(pages):
        name = name_of(p)
        subject = f"{name}: level {level}"
        if name in firsts:
            subject = f"{name}: plane {i + 1} of {len(pages)} of level {level} ({_ifd(p)})"
        firsts.add(name)
        if getattr(p, "is_virtual", False):  # no IFD of its own (NDTiff, contiguous data)
            continue
        page = _own_ifd(p)
        if page is keyframe:
            continue
        target = _Target(keyframe, name, own)
        _check_like_level(page, subject, target)
        shown = shown or _shown(keyframe, own, level)
        if _shown(page, name, level, plane=True) != shown:
            target.refuse(subject, _interpretation(page), _interpretation(keyframe), "shows")
        if (a := _orientation(page, turn)) != upright:
            target.refuse(subject, f"Orientation (TIFF tag 274) {a}", str(upright), "shows")
        decoder = p.keyframe  # what tifffile decodes the plane's tiles by
        if page is decoder:
            continue
        target = _Target(decoder, name, name_of(decoder))
        jpeg = {int(page.compression), int(decoder.compression)} <= set(JPEG_COMPRESSIONS)
        for label, value in _DECODED_BY:
            if jpeg and label in _NOT_IN_JPEG:
                continue
            if (a := value(page)) != (b := value(decoder)):
                target.refuse(subject, f"{label} {_text(a)}", _text(b), "decodes")


class _Target:
    """The page (``page``, in file ``name``) a plane of file ``plane_file`` is compared with,
    as an error words it: the level's keyframe in the set's first file, or a plane of the
    plane's own file."""

    def __init__(self, page: Any, plane_file: str, name: str) -> None:
        self.page, self.name = page, name
        self.same_file = name == plane_file

    @property
    def where(self) -> str:
        return f"its {_ifd(self.page)} has" if self.same_file else f"in {self.name}"

    @property
    def alike(self) -> tuple[str, str]:
        """What is read alike (every one of them), and what to write alike."""
        if self.same_file:
            return "plane of the level", "the level's planes"
        return "file of the set", "the set's files"

    def refuse(self, subject: str, stated: str, there: str, how: str) -> NoReturn:
        """Refuse ``subject``, which has ``stated`` where the target has ``there``; ``how``:
        ``"shows"`` (segpipe shows the level as its keyframe says) or ``"decodes"`` (tifffile
        decodes the plane's tiles by the target's tags)."""
        if self.same_file and how == "shows":
            reads = f"segpipe shows every plane of the level as its {_ifd(self.page)} says"
        elif self.same_file:
            reads = "tifffile decodes the tiles of every plane of a file's level by the tags of "
            reads += f"its {_ifd(self.page)}"
        elif how == "shows":
            reads = "segpipe shows every file of the set's level as the first file's"
        else:
            reads = "tifffile decodes the tiles of every file of the set at a reduced level by "
            reads += "the first file's"
        if not self.same_file:
            reads += " (the level's keyframe)"
        raise ImageReadError(
            f"{subject} has {stated}, {self.where} {there}; {reads} and would read this one "
            f"wrong: write {self.alike[1]} alike"
        )


def _ifd(page: Any) -> str:
    """``page``'s place in its file, as an error gives it: ``IFD i``, or a SubIFD's ``SubIFD of
    IFD i`` (tifffile's tree index of it, ``(i, level)``, names the level, not the SubIFD)."""
    tree = tuple(page.treeindex)
    return f"IFD {tree[0]}" if len(tree) == 1 else f"SubIFD of IFD {tree[0]}"


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


def _text(value: Any) -> str:
    """A tag's value as an error gives it: an enumeration's number and name."""
    name = getattr(value, "name", None)
    return str(value) if name is None else f"{int(value)} ({name})"


def _shown(page: Any, name: str, level: int, *, plane: bool = False) -> tuple[Any, ...] | None:
    """What segpipe does to ``page``'s samples to show them (:func:`level_photometric`). For
    samples it cannot show (CMYK, CFA, ...) the level is refused, naming them; for those of
    one ``plane`` of a level unlike its keyframe, None: the plane is refused as unlike it."""
    try:
        shown = level_photometric(page, name, level)
    except ImageReadError:
        if not plane:
            raise
        return None
    palette = None if shown.palette is None else (shown.palette.shape, shown.palette.tobytes())
    return (palette, shown.inverted, shown.bits_per_sample, shown.premultiplied, shown.alpha,
            shown.ycbcr, shown.widened)  # fmt: skip


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


def _check_like_level(page: Any, subject: str, target: _Target) -> None:
    """Refuse ``page``, a plane's own IFD (``subject`` in an error), whose size, tiles or
    strips, or dtype differ from those of the level's keyframe (``target``): tifffile's Zarr
    view places every plane's tiles by the level's tile grid and decodes them by their
    keyframe, which reshape fails on, or allocates what a lying tag declares."""

    def layout(page: Any) -> tuple[Any, ...]:
        return tuple(page.shape), tuple(page.chunks), page.dtype

    if layout(page) == layout(target.page):
        return

    def text(page: Any) -> str:
        kind = "tiles" if page.is_tiled else "strips"
        shape, chunks = ("x".join(map(str, s)) for s in (page.shape, page.chunks))
        return f"{shape} pixels of {page.dtype} in {kind} of {chunks}"

    every, fix = target.alike
    raise ImageReadError(
        f"{subject} is {text(page)}, {target.where} {text(target.page)}; tifffile reads every "
        f"{every} by one tile grid and pixel type. Its ImageWidth, ImageLength (TIFF tags "
        "256, 257), TileWidth, TileLength (322, 323), RowsPerStrip (278), SamplesPerPixel "
        "(277), BitsPerSample (258) or SampleFormat (339) is damaged, or "
        f"{fix} were written unalike: write them again alike"
    )
