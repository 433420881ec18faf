"""Checks of a TIFF's structure made at open, from its IFDs (and of a JPEG level the header of
one tile's stream; no pixel is decoded): the chain of IFDs ends inside the file, every level
lists the tiles or strips its size needs and they lie inside the file, and no level declares
tiles or samples no image has, or larger than its bytes can give.

tifffile reads what it can of a damaged file and says so only in its log: a chain of IFDs
that loops is walked forever, an IFD past the end (a file cut short) ends the pyramid there,
a tile it finds no offset for reads as zeros. A lying header makes it allocate what the
header declares. Each is refused here, naming the file, the level and the tag.
"""

from __future__ import annotations

import math
import struct
from typing import Any

from segpipe.io.readers.base import ImageReadError
from segpipe.io.readers.jpeg_streams import jpeg_ends_whole, jpeg_frame_size
from segpipe.io.readers.ome_planes import (
    check_level_files,
    check_planes_read_once,
)
from segpipe.io.readers.photometric import JPEG_COMPRESSIONS

__all__ = ["check_declared_data", "check_ifd_chain", "check_level_samples", "guard_jpeg_frames"]

# TiffPage refuses an IFD of more tags than this (tifffile's own bound; the TIFF tags defined
# by all specifications together are a few hundred).
_MAX_TAGS = 4096
# SamplesPerPixel is a SHORT (TIFF 6.0, section 8): no TIFF holds more samples.
_MAX_SAMPLES = 2**16 - 1
# One tile decodes into memory whole. A tile larger than its level (a small level of a
# pyramid, a small COG, keeps the tile size of level 0) is a few MiB in any file written; one
# of more bytes than this is a lying TileWidth, TileLength or SamplesPerPixel. Tiles are made
# small to be read one at a time: one of over 2 GiB decoded is a lie whatever the level.
_MAX_OVERSIZED_TILE_BYTES = 2**26
_MAX_TILE_BYTES = 2**31
# Compression: the most bytes its decoding gives per byte stored. A tile or strip declared far
# larger than the most its bytes can give is a lying size; one of another codec is bounded by
# the tile sizes above alone, and (JPEG) by the size its own stream states. None: 1; deflate:
# 1032, zlib's limit; PackBits: 128 from 2.
# LZW (TIFF 6.0, section 13): a code names an entry of its table, and entry i (from 258, after
# the 256 single bytes, Clear and EOI) is an earlier entry and one byte more: at most i - 256
# bytes. A code of w bits (9 to 12) names one below 2**w, at most 2**w - 257 bytes; the most
# for its bits at 12: 3839 bytes from 1.5, 2560 a byte. (A code cut off by the end is EOI.)
# zstd (RFC 8878, 3.1.1.2): a block is a 3-byte header and at least 1 byte (an RLE block's one
# byte, repeated) and gives at most Block_Maximum_Size, 128 KiB. (libzstd's one-shot decoder
# takes RLE blocks of up to 2 MiB, which the format forbids and no encoder writes.)
# LZMA (xz): a match gives at most 273 bytes, from 14 binary decisions at the fewest (the last
# distance again, the longest length), and each decision narrows the range coder's range to
# 2017/2048 of it at the most (its probabilities stay 31/2048 from 0 and 1): 0.022 bits, so
# 273 * 8 / (14 * 0.022) = 7090 bytes a byte. imagecodecs' encoders give 1355 (LZW), 32696
# (zstd) and 6851 (xz; LZMA1, not in TIFF: 7073) from 256 MiB of zeros.
_MOST_EXPANDED = {
    1: 1, 5: 2560, 8: 1032, 32946: 1032, 32773: 64, 34925: 7091, 34926: 32768, 50000: 32768,
}  # fmt: skip
# JPEG (JPEG_COMPRESSIONS): each tile or strip is a JPEG stream whose frame header (SOF
# marker) gives the size the decoder allocates and fills, whatever the tags say; a stream
# smaller than a tile declared 65,500 pixels or more a side is decoded into one that large,
# the rest filled in (grey). Writers put the SOF after a few table segments, hundreds of bytes
# in: at open it is looked for in the first stored tile's first bytes alone, as each tile is
# decoded in its whole stream (an application segment of 64 KiB may come first).
_JPEG_HEAD_BYTES = 2**16


def check_ifd_chain(tif: Any, file_size: int, path: str) -> None:
    """Refuse a TIFF whose chain of IFDs (the images of the file, a level each in an SVS or
    NDPI) loops back on itself, or leads past the end of the file or to an IFD cut off by it.

    tifffile walks a loop forever (it looks for one only at the 100th IFD, and not at all as
    it iterates pages) and ends the chain, only logging it, at an IFD past the end: the
    levels after it would be missing.
    ``tif``: an open ``tifffile.TiffFile``; ``file_size``: bytes of its file.
    """
    seen: dict[int, int] = {}
    fmt, fh = tif.tiff, tif.filehandle
    # The header's (tifffile drops an IFD past the end): BigTIFF's 8 bytes at 8, else 4 at 4
    # (NDPI's too, whose later offsets are 8 bytes).
    big = fmt.version == 43
    fh.seek(8 if big else 4)
    offset = int(struct.unpack(fmt.byteorder + ("Q" if big else "I"), fh.read(8 if big else 4))[0])
    while offset:
        k = len(seen)
        if offset in seen:
            raise ImageReadError(
                f"{path}: IFD {k - 1} gives IFD {seen[offset]} (byte {offset:,}) as the next "
                "one: the file's chain of IFDs loops back on itself and would never end; the "
                "file is damaged"
            )
        seen[offset] = k
        offset = _next_ifd(tif, offset, file_size, path, f"IFD {k}")
    # A lone image of no size: tifffile's series divide by it (a ZeroDivisionError). Of many,
    # it lists that series, refused as the reader lays them out.
    first = tif.pages.first if len(seen) == 1 else None
    if first is not None and not first.subifds and 0 in (first.imagelength, first.imagewidth):
        raise ImageReadError(
            f"{path}: the image is empty: IFD 0 declares {first.imagelength} x "
            f"{first.imagewidth} pixels (ImageLength, ImageWidth: TIFF tags 257, 256)"
        )


def check_level_samples(series: Any, path: str) -> None:
    """Refuse a pyramid whose reduced level stores another number of samples per pixel than
    level 0 (an RGBA or grey level under RGB): tifffile lays every level out as level 0's,
    and reading one then failed deep in a read, or even listing its pages."""
    first = int(series.levels[0].keyframe.samplesperpixel)
    for k, level in enumerate(series.levels[1:], start=1):
        if (n := int(level.keyframe.samplesperpixel)) != first:
            raise ImageReadError(
                f"{path}: level {k} stores {n} samples per pixel, level 0 {first} "
                "(SamplesPerPixel, TIFF tag 277): the levels of a pyramid hold the same "
                "channels; the file is damaged, or its levels are of other images"
            )


def _next_ifd(tif: Any, offset: int, file_size: int, path: str, name: str) -> int:
    """The offset of the IFD after the one at ``offset`` (0: none), refusing one that lies
    past the end of the file, is cut off by it, or lists more tags than any IFD has."""
    fmt, fh = tif.tiff, tif.filehandle
    if offset >= file_size:
        raise ImageReadError(
            f"{path}: {name} lies at byte {offset:,}, past the file's {file_size:,} bytes; "
            "the file is truncated"
        )
    fh.seek(offset)
    head = fh.read(fmt.tagnosize)
    tags = struct.unpack(fmt.tagnoformat, head)[0] if len(head) == fmt.tagnosize else 0
    end = offset + fmt.tagnosize + tags * fmt.tagsize + fmt.offsetsize
    if tags > _MAX_TAGS:
        raise ImageReadError(
            f"{path}: {name} (at byte {offset:,}) claims {tags:,} tags, more than any IFD "
            f"holds ({_MAX_TAGS}); the file is damaged"
        )
    if end > file_size:
        raise ImageReadError(
            f"{path}: {name} at byte {offset:,} runs past the end of the file ({file_size:,} "
            "bytes); the file is truncated"
        )
    fh.seek(end - fmt.offsetsize)
    return int(struct.unpack(fmt.offsetformat, fh.read(fmt.offsetsize))[0])


def check_declared_data(series: Any, file_size: int, path: str) -> None:
    """Refuse a TIFF whose level 0 points at no pixel data, or any level lists fewer tiles or
    strips than its size needs, or points at data past the end of the file it is stored in,
    or declares samples or tiles no image has, or whose level 0 lists reduced levels (SubIFDs)
    past it, or any level planes its metadata declares but no IFD holds, or one IFD read as
    two of its planes (tifffile would give zeros, or allocate what the header declares).

    ``file_size``: bytes of the file opened (``series.parent``). A page of another file of a
    multi-file OME-TIFF set (which tifffile opens by its path, beside a local file only) is
    checked against that file's size, its file's own IFD of the level against the level's
    keyframe (:func:`check_level_files`), and an error names that file.

    Checked from the IFDs (and a JPEG level's first stream header; no pixel is decoded): a
    header may declare any size, but the tiles or strips it lists must exist in the file. A
    truncated pyramid is refused at open, not when a reduced level is read (tifffile drops a
    level whose IFD is cut off, and the OME-XML written after it, without a word).
    """
    if 0 in series.shape:
        raise ImageReadError(f"{path}: the image is empty (shape {series.shape})")

    def stored_in(page: Any) -> tuple[str, int]:
        """The file holding ``page`` as an error names it, and its size in bytes."""
        if page.parent is series.parent:
            return path, file_size
        handle = page.parent.filehandle  # its size measured when tifffile opened it
        return f"{handle.path} (a file of {path}'s OME-TIFF set)", int(handle.size)

    for k, level in enumerate(series.levels):
        pages = [p for p in level.pages if p is not None]
        if len(pages) < len(level.pages):  # tifffile's placeholder for a plane it lacks
            raise ImageReadError(
                f"{path}: {len(level.pages) - len(pages)} of the {len(level.pages)} image "
                f"planes (channels, Z, T) of level {k} are in no IFD: its metadata declares "
                "planes that the file (or its OME-TIFF set) does not hold, which would read as "
                "zeros; write the file again with every plane, or without those it lacks"
            )
        if k == 0 and not any(int(c) for p in pages for c in getattr(p, "databytecounts", ())):
            raise ImageReadError(
                f"{path}: declares a {'x'.join(map(str, series.shape))} image but lists no "
                "pixel data (no tile or strip byte counts); the file is truncated or its "
                "header is wrong"
            )
        check_planes_read_once(pages, k, path)
        _check_chunks(level.keyframe, k, stored_in(level.keyframe)[0])
        check_level_files(series, k, lambda page: stored_in(page)[0])
        # tifffile decodes each file's tiles of a set by that file's keyframe at level 0: its
        # lying byte counts or JPEG stream are its own
        for keyframe in {id(p.keyframe): p.keyframe for p in pages if p.keyframe}.values():
            if keyframe is not level.keyframe:
                _check_chunks(keyframe, k, stored_in(keyframe)[0])
        ends: dict[tuple[str, int], int] = {}
        for p in pages:
            file = stored_in(p)
            _check_listed(p, level.keyframe, k, file[0])
            spans = zip(p.dataoffsets, p.databytecounts, strict=False)
            end = max((int(o) + int(c) for o, c in spans if c), default=0)
            ends[file] = max(ends.get(file, 0), end)
        for (name, size), end in ends.items():
            if end > size:
                raise ImageReadError(
                    f"{name}: the tiles or strips of level {k} extend to byte {end:,} but "
                    f"the file has {size:,} bytes; the file is truncated"
                )
    _check_subifds(series, *stored_in(series.levels[0].keyframe))


def _check_listed(page: Any, keyframe: Any, level: int, path: str) -> None:
    """Refuse ``page`` (of ``level``, whose ``keyframe`` says its size and tiling) if it lists
    fewer tiles or strips (offsets and byte counts) than its size needs: tifffile reads those
    it lacks as zeros. More whole rows of tiles are harmless (tifffile leaves them out; a
    Philips level's size is cut below its tags'), not a part of one: the tiles were laid out
    for another width, and tifffile places them by this one. A tile or strip of no bytes at
    an offset (a sparse one has neither) reads as zeros, where its bytes were lost."""
    need = math.prod(keyframe.chunked)  # tiles or strips per axis, planes of planar files too
    listed = min(len(page.dataoffsets), len(page.databytecounts))
    across = -(-keyframe.imagewidth // keyframe.tilewidth) if keyframe.is_tiled else 1
    if listed > need and listed % across:
        raise ImageReadError(
            f"{path}: level {level} lists {listed:,} tiles, no whole number of rows of the "
            f"{across:,} its width ({keyframe.imagewidth:,} pixels in tiles of "
            f"{keyframe.tilewidth:,}) needs across: its ImageWidth or TileWidth (TIFF tags 256, "
            "322) is wrong, and its tiles would read out of place"
        )
    spans = enumerate(zip(page.dataoffsets, page.databytecounts, strict=False))
    lost = [i for i, (offset, count) in spans if offset and not count]
    if lost:
        kind = "tile" if keyframe.is_tiled else "strip"
        raise ImageReadError(
            f"{path}: level {level} lists {kind} {lost[0]:,} ({len(lost):,} in all) at byte "
            f"{int(page.dataoffsets[lost[0]]):,} with a byte count of 0: its bytes are lost, "
            "and it would read as zeros; the file is damaged"
        )
    if listed < need:
        tiled = keyframe.is_tiled
        kind, tags, numbers = (
            ("tiles", "Tile", "324, 325") if tiled else ("strips", "Strip", "273, 279")
        )
        raise ImageReadError(
            f"{path}: level {level} lists {listed:,} of the {need:,} {kind} that its size "
            f"({keyframe.imagelength:,} x {keyframe.imagewidth:,} pixels) needs ({tags}Offsets, "
            f"{tags}ByteCounts: TIFF tags {numbers}); the file is truncated or its header is "
            "wrong, and the rest would read as zeros"
        )


def _check_chunks(page: Any, level: int, path: str) -> None:
    """Refuse a keyframe declaring more samples per pixel than a TIFF holds, tiles no writer
    writes (over 2 GiB decoded, or larger than the level and over 64 MiB), tiles or strips
    far larger decoded than the most the bytes it stores for one can give, or (JPEG) of
    another size than the stream of its first stored one states."""
    samples = int(page.samplesperpixel)
    if samples > _MAX_SAMPLES:
        raise ImageReadError(
            f"{path}: level {level} declares {samples:,} samples per pixel (SamplesPerPixel, "
            f"TIFF tag 277), more than the {_MAX_SAMPLES:,} a TIFF can hold; its header is "
            "damaged"
        )
    bits = max(page.bitspersample) if isinstance(page.bitspersample, tuple) else page.bitspersample
    nbytes = -(-math.prod(page.chunks) * int(bits) // 8)  # one tile or strip, decoded
    side = (page.imagelength, page.imagewidth)
    if page.is_tiled:
        chunk, tags = (
            f"tiles of {page.tilelength:,} x {page.tilewidth:,} pixels",
            "TileLength, TileWidth (TIFF tags 323, 322)",
        )
    else:  # a strip is at most the level's width and height: no larger than the level
        chunk, tags = (
            f"strips of {page.chunks[0]:,} rows",
            "ImageWidth, RowsPerStrip (TIFF tags 256, 278)",
        )
    larger = page.is_tiled and any(
        t > -(-s // 16) * 16 for t, s in zip((page.tilelength, page.tilewidth), side, strict=True)
    )
    ratio = _MOST_EXPANDED.get(int(page.compression))
    stored = max((int(c) for c in page.databytecounts), default=0)
    if page.is_tiled and nbytes > _MAX_TILE_BYTES:
        why = "more than any writer writes"
    elif larger and nbytes > _MAX_OVERSIZED_TILE_BYTES:
        why = "larger than the level"
    elif ratio and stored and nbytes > 4 * ratio * stored + 2**20:  # ample: lies are 1000-fold
        why = f"from at most {stored:,} bytes stored for one"
    else:
        _checkjpeg_frame_size(page, level, path, f"{chunk} in its {tags}")
        return
    raise ImageReadError(
        f"{path}: level {level} ({side[0]:,} x {side[1]:,} pixels) declares {chunk} of "
        f"{samples} samples, {nbytes / 2**20:,.0f} MiB each decoded, {why}; its {tags}, "
        "SamplesPerPixel (277) or BitsPerSample (258) is damaged"
    )


def _checkjpeg_frame_size(page: Any, level: int, path: str, declared: str) -> None:
    """Refuse a JPEG-compressed keyframe whose first stored tile or strip is a JPEG stream of
    another size (its SOF marker's) than the tile or strip, or its part inside the image.

    ``declared``: the tiles or strips and their tags, as an error names them. One read of at
    most ``_JPEG_HEAD_BYTES``; a stream not begun by SOI (an NDPI's, whose header tifffile
    keeps apart) or with no SOF in them is left to the decoder. The others are checked as
    they are read (:func:`guard_jpeg_frames`)."""
    counts, fh = page.databytecounts, page.parent.filehandle
    first = next((i for i, c in enumerate(counts) if c), None)
    if (
        int(page.compression) not in JPEG_COMPRESSIONS
        or page.imagedepth != 1
        or first is None
        or fh.closed
    ):
        return
    if int(page.dataoffsets[first]) >= fh.size:  # past the end: refused as truncated
        return
    fh.seek(int(page.dataoffsets[first]))
    frame = jpeg_frame_size(fh.read(min(int(counts[first]), _JPEG_HEAD_BYTES)))
    if frame is None or _frame_fits(page, first, frame):
        return
    length, width = page.imagelength, page.imagewidth
    raise ImageReadError(
        f"{path}: level {level} ({length:,} x {width:,} pixels) declares {declared}, but its "
        f"{_frame_misfit(page, first, frame)}: the tags or the stream are damaged"
    )


def guard_jpeg_frames(page: Any) -> None:
    """Build tifffile's decoder of ``page`` (a keyframe; its file open), and for a JPEG one,
    make it refuse, before decoding, a tile or strip whose JPEG stream states another size
    than it: the decoder allocates and fills the size the stream's SOF marker states (60,000
    x 60,000 took 10 GiB), and :func:`_check_jpeg_frame` looked at the first stored one alone.

    tifffile makes the decoder once a keyframe, a closure cached on the page (a
    ``functools.cached_property``); every frame of the keyframe and tifffile's Zarr view
    decode through it, so the check wraps it there. It raises ``ValueError``, which a read
    reports as a damaged file. A cheap look: a stream's markers up to its SOF, hundreds of
    bytes.

    Planar (band-interleaved) RGB JPEG, as GDAL writes it: each plane is a one-component
    stream, which tifffile 2026.3 decodes as RGB unless the stream has a JFIF marker ("Bogus
    JPEG colorspace"); told it has one before it builds the decoder, it decodes the planes
    as grey, as GDAL does."""
    if (
        int(page.compression) in JPEG_COMPRESSIONS
        and int(page.planarconfig) == 2
        and "decode" not in vars(page)
    ):
        page.__dict__["is_jfif"] = True  # a cached property too: read by the decoder alone
    decode = page.decode
    if int(page.compression) not in JPEG_COMPRESSIONS or page.imagedepth != 1:
        return
    if getattr(decode, "_guards_jpeg_frames", False):
        return

    def checked(data: bytes | None, index: int, /, **kwargs: Any) -> Any:
        if data is not None:
            # the whole stream: an application segment may put its SOF past the first 64 KiB
            frame = jpeg_frame_size(data if isinstance(data, bytes) else bytes(data))
            if frame is not None and not _frame_fits(page, index, frame):
                raise ValueError(
                    f"its {_frame_misfit(page, index, frame)}; the stream or the file's tags "
                    "are damaged"
                )
            # libjpeg only warns of a stream cut short and fills the rest grey, as the
            # decoder gives it; OpenSlide refuses it ("Premature end of JPEG file"). An NDPI
            # tile (a header beside it) is a run of restart intervals, with no end marker.
            if kwargs.get("jpegheader") is None and not jpeg_ends_whole(data):
                raise ValueError(
                    f"its JPEG stream ({len(data):,} bytes) has no end-of-image marker: it "
                    "is cut short (or its byte count in the file's tags is)"
                )
        return decode(data, index, **kwargs)

    checked._guards_jpeg_frames = True  # type: ignore[attr-defined]
    page.__dict__["decode"] = checked


def _frame_fits(page: Any, index: int, frame: tuple[int, int]) -> bool:
    """Whether a JPEG stream of ``frame`` (height, width) pixels fits tile or strip ``index``
    of ``page``: of its size, or of its part inside the image (as some writers crop the tiles
    at the image's edge)."""
    length, width = page.imagelength, page.imagewidth
    if page.is_tiled:  # tiles run across, then down, in each plane
        rows, cols = page.tilelength, page.tilewidth
        across = -(-width // cols)
        k = index % (across * -(-length // rows))
        y, x = k // across * rows, k % across * cols
    else:
        rows, cols = page.chunks[0], width
        y, x = index % -(-length // rows) * rows, 0
    return frame[0] in (rows, min(rows, length - y)) and frame[1] in (cols, min(cols, width - x))


def _frame_misfit(page: Any, index: int, frame: tuple[int, int]) -> str:
    kind = "tile" if page.is_tiled else "strip"
    return f"{kind} {index} is a JPEG stream of {frame[0]:,} x {frame[1]:,} pixels (its SOF marker)"


def _check_subifds(series: Any, name: str, size: int) -> None:
    """Refuse level 0 (in the file ``name`` of ``size`` bytes) listing reduced levels
    (SubIFDs) whose IFD lies past the end of the file or is cut off by it, or of an OME-TIFF
    that tifffile read fewer of (it leaves out a level it finds no plane of)."""
    keyframe = series.levels[0].keyframe
    subifds = [int(o) for o in keyframe.subifds or ()]
    for k, offset in enumerate(subifds, 1):
        if offset >= size:
            raise ImageReadError(
                f"{name}: level {k}'s IFD lies at byte {offset:,}, past the file's {size:,} "
                "bytes; the file is truncated"
            )
        if keyframe.parent is series.parent:  # another file of a set may be closed by now
            _next_ifd(keyframe.parent, offset, size, name, f"level {k}'s IFD")
    if series.kind == "ome" and len(series.levels) <= len(subifds):
        raise ImageReadError(
            f"{name}: level 0 lists {len(subifds)} reduced levels (SubIFDs) but tifffile read "
            f"{len(series.levels) - 1}: level {len(series.levels)} holds none of the image's "
            "planes; the file is damaged"
        )
