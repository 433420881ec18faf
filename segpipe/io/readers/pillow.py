"""Small PNG/JPEG images through Pillow, decoded whole (tiled TIFF is for anything large).

Pixels are turned as the EXIF orientation says, as every viewer shows them; an alpha channel
marks the transparent pixels as invalid (``mask_kind = "alpha"``, as a GeoTIFF's alpha band),
and so does a grey or RGB PNG's tRNS colour (``mask_kind = "nodata"``, as GDAL reads it).
"""

from __future__ import annotations

import io
import re
import struct
import threading
import warnings
import zlib
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np

from segpipe.io.files import URLPath
from segpipe.io.readers.base import DECODE_ERRORS, BaseReader, ImageReadError
from segpipe.io.readers.photometric import ORIENTATION_TAG, orient

__all__ = ["MAX_PILLOW_PIXELS", "PILLOW_SUFFIXES", "PillowReader"]

PILLOW_SUFFIXES = (".png", ".jpg", ".jpeg")

# Pillow images are decoded whole into memory; anything bigger belongs in a tiled TIFF.
MAX_PILLOW_PIXELS = 20_000 * 20_000
_PILLOW_LIMIT_LOCK = threading.Lock()
_UNREADABLE = "not a readable PNG/JPEG (corrupt, truncated or another format)"
_HEADER_LIES = "the file is truncated or its header is wrong"
# Deflate's most bytes from one stored: a 258-byte match coded in 2 bits (RFC 1951, 3.2.5).
_DEFLATE_MOST_EXPANDED = 1032
# PNG colour type (IHDR) -> samples a pixel; Adam7's passes as (x0, y0, dx, dy).
_PNG_SAMPLES = {0: 1, 2: 3, 3: 1, 4: 2, 6: 4}
_ADAM7 = ((0, 0, 8, 8), (4, 0, 8, 8), (0, 4, 4, 8), (2, 0, 4, 4), (0, 2, 2, 4), (1, 0, 2, 2),
          (0, 1, 1, 2))  # fmt: skip
# A Huffman-coded JPEG spends a bit at least on each 8 x 8 block of a component (its DC
# difference), and a component's blocks cover at most 4 x 4 times that (sampling factors 1
# to 4): 2048 pixels a byte. Arithmetic coding (SOF9 to SOF15) has no such floor.
_JPEG_MOST_PIXELS_PER_BYTE = 2048
_ARITHMETIC_SOF = {0xC9, 0xCA, 0xCB, 0xCD, 0xCE, 0xCF}
# Where a scan's coded data ends: a marker (FF, then neither a stuffed 00 nor a fill FF).
_JPEG_MARKER = re.compile(rb"\xff+[^\x00\xff]")


class PillowReader(BaseReader):
    """A small PNG or JPEG, decoded whole into memory by Pillow (one level).

    Palette, CMYK and YCbCr images are converted to RGB(A); grey stays one channel. The
    alpha of RGBA or LA is the channel named ``"alpha"``; a pixel where it is 0 holds no data
    (:meth:`valid_mask`), unless no pixel is transparent: then it marks nothing. A grey or
    RGB PNG's tRNS colour is its ``nodata`` (a pixel holding it on every channel holds no
    data), marking nothing in the same way where no pixel holds it.
    """

    def __init__(self, path: Path | URLPath, *, pixel_size_um: float | None = None) -> None:
        super().__init__(path, pixel_size_um)
        data, has_alpha, nodata = self._decode()
        axes = "YX" if data.ndim == 2 else "YXC"
        self._data: np.ndarray | None = data
        # Checked once, as the image is in memory: an opaque image costs no mask pass.
        if has_alpha:
            rgba = data.shape[2] == 4
            self.channel_names = ("red", "green", "blue", "alpha") if rgba else ("grey", "alpha")
            self.mask_kind = None if data[..., -1].all() else "alpha"
        elif nodata is not None:
            self.nodata = nodata
            keyed = np.all(data.reshape(*data.shape[:2], -1) == np.array(nodata), axis=-1)
            self.mask_kind = "nodata" if keyed.any() else None
        chunk = tuple(min(n, 1024) for n in data.shape[:2]) + data.shape[2:]
        self._set_layout([axes], [data.shape], [chunk], data.dtype)

    def _decode(self, *, warn: bool = True) -> tuple[np.ndarray, bool, tuple[float, ...] | None]:
        """The pixels as viewers show them, whether the last channel is alpha, and the tRNS
        colour as per-channel nodata (None without one); ``warn``: about an EXIF that does not
        parse (once, not again as the reader re-opens)."""
        from PIL import Image

        too_big = (
            f"{self.path}: too large to hold in memory as PNG/JPEG (limit "
            f"{MAX_PILLOW_PIXELS:,} pixels); convert it to a tiled pyramidal TIFF "
            f"(e.g. vips tiffsave --tile --pyramid) and open that"
        )
        img: Image.Image
        try:
            with _pillow_limit():
                opened = Image.open(self._file())
            with opened as img:
                if img.width * img.height > MAX_PILLOW_PIXELS:
                    raise ImageReadError(f"{too_big} (got {img.width}x{img.height})")
                if img.format == "PNG":
                    _check_png_chunks(img.fp, self.path)
                elif img.format in ("JPEG", "MPO"):
                    _check_jpeg_scans(img.fp, img.size, self.path)
                nodata = _trns_nodata(img)
                if img.mode in ("P", "PA"):
                    has_alpha = img.mode == "PA" or "transparency" in img.info
                    img = img.convert("RGBA" if has_alpha else "RGB")
                elif img.mode in ("CMYK", "YCbCr", "LAB", "HSV"):
                    img = img.convert("RGB")
                elif (
                    img.format == "PNG"
                    and img.mode in ("RGB", "RGBA")
                    and (wide := _png16(img)) is not None
                ):
                    # An eXIf after the pixels is found only by Pillow decoding them (at 8
                    # bits, for nothing); one before them (Pillow writes it there) is read.
                    turn = self._orientation(img, warn) if "exif" in img.info else 1
                    # imagecodecs adds an alpha of its own for a tRNS; that is nodata here
                    return orient(wide[..., : len(img.mode)], turn), img.mode == "RGBA", nodata
                img.load()
                turn = self._orientation(img, warn)
                return orient(np.asarray(img), turn), img.mode in ("RGBA", "LA"), nodata
        except Image.DecompressionBombError as exc:  # over twice the limit: no size said
            raise ImageReadError(
                f"{too_big} (got more than {2 * MAX_PILLOW_PIXELS:,} pixels)"
            ) from exc
        except (SyntaxError, *DECODE_ERRORS) as exc:  # imagecodecs.PngError is a RuntimeError
            if isinstance(exc, ImageReadError):
                raise
            raise ImageReadError(
                f"{self.path}: {_UNREADABLE}: {type(exc).__name__}: {exc}"
            ) from exc

    def _orientation(self, img: Any, warn: bool) -> Any:
        """The EXIF orientation, 1 where there is none, and 1 where the EXIF does not parse:
        browsers and viewers show such a file as stored rather than refuse it."""
        try:
            return img.getexif().get(ORIENTATION_TAG, 1)
        except (struct.error, SyntaxError, *DECODE_ERRORS) as exc:
            if warn:
                warnings.warn(
                    f"{self.path}: its EXIF does not parse ({type(exc).__name__}: {exc}); "
                    "reading the pixels as stored (orientation 1), as viewers show them",
                    stacklevel=5,
                )
            return 1

    def _open_level(self, level: int) -> np.ndarray:
        if self._data is None:
            self._data = self._decode(warn=False)[0]
        return self._data

    def _handle_state(self) -> dict[str, Any]:
        return {"_data": None}


@contextmanager
def _pillow_limit() -> Iterator[None]:
    """Pillow's decompression-bomb limit set to segpipe's, :data:`MAX_PILLOW_PIXELS`, while
    an image opens (Pillow checks it there): Pillow's own default refuses 179 million pixels,
    under segpipe's limit, so the limit a refusal stated was not the one applied. Set back
    after; the lock keeps two opens from setting back each other's value (other code that
    opens an image meanwhile sees segpipe's limit)."""
    from PIL import Image

    with _PILLOW_LIMIT_LOCK:
        before = Image.MAX_IMAGE_PIXELS
        # Pillow warns above the value and refuses twice it; ours refuses above it.
        Image.MAX_IMAGE_PIXELS = MAX_PILLOW_PIXELS
        try:
            yield
        finally:
            Image.MAX_IMAGE_PIXELS = before


def _trns_nodata(img: Any) -> tuple[float, ...] | None:
    """A grey or RGB PNG's tRNS colour as per-channel nodata in the pixels Pillow gives (a
    palette's tRNS becomes an alpha channel instead); None without one. Pillow gives 1-bit
    grey as bool and 2- or 4-bit grey scaled to 0-255, but the tRNS as stored."""
    key = img.info.get("transparency") if img.format == "PNG" else None
    if key is None or img.mode not in ("1", "L", "I;16", "RGB"):
        return None
    if img.mode == "RGB":
        return tuple(float(v) for v in key)
    if img.mode == "1":
        return (float(key != 0),)
    bits = _png_bit_depth(img)
    return (float(key * (255 // (2**bits - 1)) if bits < 8 else key),)


def _png_bit_depth(img: Any) -> int:
    """A PNG's bits per sample: the IHDR's byte after the signature, the chunk's length and
    type, the width and the height (read before Pillow decodes and closes the file)."""
    img.fp.seek(24)
    return int(img.fp.read(1)[0])


def _png16(img: Any) -> np.ndarray | None:
    """A 16-bit colour PNG's pixels, decoded by imagecodecs (Pillow hands them out as 8
    bits, and its mode does not show it); None for 8 bits."""
    if _png_bit_depth(img) != 16:
        return None
    import imagecodecs

    img.fp.seek(0)
    return np.asarray(imagecodecs.png_decode(img.fp.read()))


def _check_png_chunks(fp: Any, path: str) -> None:
    """Refuse a PNG (open in ``fp``, its position kept) any of whose chunks states more bytes
    than the file holds after it, naming the chunk.

    Pillow reads the rest of an image data chunk in one ``read`` of its stated length, which
    allocates that length before reading: 4 GiB for a length of 0xFFFFFFFF, or a MemoryError
    under an address-space limit, however small the image. Catching that MemoryError would
    not do: without a limit the allocation succeeds and the image reads. Walked before the
    decode, 8 bytes a chunk: a local file's pages come back from the page cache as the decode
    reads them next (a 27 MB PNG of 8 KiB chunks: 7 ms, its decode 120 ms); a file at a URL
    is fetched once more.
    """
    here, size = fp.tell(), fp.seek(0, 2)
    at = 8  # past the signature
    idat: list[tuple[int, int]] = []  # (offset, length): the first run of IDAT, Pillow's
    while at + 8 <= size:
        fp.seek(at)
        length, kind = struct.unpack(">I4s", fp.read(8))
        end = at + 12 + length  # length, type, data, CRC
        if end > size:
            name = kind.decode("latin-1")
            raise ImageReadError(
                f"{path}: {_UNREADABLE}: its {name!r} chunk at byte {at:,} states {length:,} "
                f"bytes of data, past the file's end ({size:,} bytes)"
            )
        if kind == b"IEND":
            break
        if kind == b"IDAT" and (not idat or sum(idat[-1]) + 4 == at):
            idat.append((at + 8, length))
        at = end
    _check_png_data(fp, idat, path)
    fp.seek(here)


def _check_png_data(fp: Any, idat: list[tuple[int, int]], path: str) -> None:
    """Refuse a PNG whose image data (``idat``: offset and length of each chunk) inflate to
    fewer bytes than the rows its header (IHDR) declares: Pillow ends the image where the
    data end and leaves the rows after them 0, without a word. Refused unread where the
    header declares more than deflate could give from those bytes at its most; else inflated
    once more before Pillow decodes them (some half of its time again), the output counted
    and dropped, never held whole."""
    fp.seek(16)
    width, height, bits, colour, _, _, interlace = struct.unpack(">IIBBBBB", fp.read(13))
    if colour not in _PNG_SAMPLES:
        return  # Pillow refuses it
    need = _png_filtered_bytes(width, height, bits * _PNG_SAMPLES[colour], interlace == 1)
    stored = sum(length for _, length in idat)
    declares = f"the {width:,} x {height:,} pixels its header (IHDR) declares need {need:,} bytes"
    if need > _DEFLATE_MOST_EXPANDED * stored:
        raise ImageReadError(
            f"{path}: {declares} inflated, but its image data (IDAT) are {stored:,} bytes, "
            f"which inflate to {_DEFLATE_MOST_EXPANDED * stored:,} at most; {_HEADER_LIES}"
        )
    inflater, got = zlib.decompressobj(), 0
    try:
        for offset, length in idat:
            fp.seek(offset)
            block = fp.read(length)
            while block and got < need and not inflater.eof:
                got += len(inflater.decompress(block, 2**20))  # the output at most, at once
                block = inflater.unconsumed_tail
    except zlib.error as exc:
        raise ImageReadError(f"{path}: {_UNREADABLE}: its image data: {exc}") from exc
    if got < need:
        raise ImageReadError(
            f"{path}: its image data (IDAT) inflate to {got:,} bytes, but {declares}; the "
            f"rows after them would read as 0; {_HEADER_LIES}"
        )


def _png_filtered_bytes(width: int, height: int, bits_per_pixel: int, adam7: bool) -> int:
    """Bytes a PNG's image data inflate to: each row (of each Adam7 pass) a filter byte and
    its pixels, whole bytes.

    >>> _png_filtered_bytes(700, 600, 24, False), _png_filtered_bytes(3, 1, 1, True)
    (1260600, 6)
    """
    passes = _ADAM7 if adam7 else ((0, 0, 1, 1),)
    total = 0
    for x0, y0, dx, dy in passes:
        cols, rows = max(0, -(-(width - x0) // dx)), max(0, -(-(height - y0) // dy))
        if cols:
            total += rows * (1 + -(-cols * bits_per_pixel // 8))
    return total


def _check_jpeg_scans(fp: Any, size: tuple[int, int], path: str) -> None:
    """Refuse a JPEG (open in ``fp``) whose coded data end before the ``size`` (width, height)
    its frame header (SOF) declares: libjpeg fills the rest in ("Premature end of JPEG file",
    a warning Pillow drops). Refused undecoded where its bytes cannot code that many pixels.

    A scan cut short is told from a whole one by what follows its coded data, as no decoder
    says which it is: libjpeg takes a marker there for the end of the data, and skips bytes
    between a finished scan and the next marker. With filler bytes and restart markers put
    there (:func:`_filler`), a whole scan decodes as before and one cut short decodes the
    filler as its rest. Both are decoded at a quarter of the size and compared: the blocks'
    lowest frequencies (at an eighth, the DC alone, a block made up of filler can round to
    the same), a 16th of the memory, before the whole image is; together they take some
    0.7 (baseline) to 1.1 (progressive) times a whole decode's time.
    """
    fp.seek(0)
    data = fp.read()
    scans = _jpeg_filled_scans(data)
    if scans is None:
        return  # no end-of-image marker: Pillow refuses the file, waiting for more data
    whole, filled, arithmetic = scans
    if arithmetic:  # its decoder reads on past a whole scan, which the filler then changes
        return
    width, height = size
    if width * height > 4 * _JPEG_MOST_PIXELS_PER_BYTE * len(data) + 2**20:
        raise ImageReadError(
            f"{path}: its frame header (SOF) declares {width:,} x {height:,} pixels, more "
            f"than its {len(data):,} bytes can code (a bit at least for each 8 x 8 block); "
            f"{_HEADER_LIES}"
        )
    try:
        expected = _jpeg_draft(whole, size)
    except DECODE_ERRORS:
        return  # the decode to come names what is wrong
    try:
        same = np.array_equal(expected, _jpeg_draft(filled, size))
    except DECODE_ERRORS:
        same = False  # only a scan cut short reads the filler, which broke it
    if not same:
        raise ImageReadError(
            f"{path}: its coded data end before the {width:,} x {height:,} pixels its frame "
            'header (SOF) declares, and the decoder would make up the rest ("Premature end '
            f'of JPEG file"); {_HEADER_LIES}'
        )


def _jpeg_filled_scans(data: bytes) -> tuple[bytes, bytes, bool] | None:
    """``data`` to its end-of-image marker, the same with :func:`_filler` after each scan's
    coded data, and whether it is arithmetic-coded; None without an end-of-image marker.

    >>> scan = b"\\xff\\xda\\x00\\x02" + b"\\x12\\xff\\x00\\x34\\xff\\xd0\\x56"  # SOS, data, RST0
    >>> whole, filled, _ = _jpeg_filled_scans(b"\\xff\\xd8" + scan + b"\\xff\\xd9 tail")
    >>> whole.endswith(b"\\x56\\xff\\xd9"), filled == whole[:-2] + _filler(1) + whole[-2:]
    (True, True)
    """
    parts: list[bytes] = []
    at, start, arithmetic = 2, 0, False
    while at + 2 <= len(data):
        marker = data[at + 1]
        if data[at] != 0xFF or marker == 0xFF:  # padding between segments; fill bytes
            at += 1
        elif marker == 0xD9:  # EOI
            return data[: at + 2], b"".join([*parts, data[start : at + 2]]), arithmetic
        elif 0xD0 <= marker <= 0xD7 or marker == 0x01:  # RSTn, TEM: no length
            at += 2
        else:
            arithmetic |= marker in _ARITHMETIC_SOF
            at += 2 + int.from_bytes(data[at + 2 : at + 4], "big")
            if marker != 0xDA:  # not SOS: a segment without coded data after it
                continue
            restarts, found = 0, _JPEG_MARKER.search(data, at)
            while found and 0xD0 <= found[0][-1] <= 0xD7:
                restarts, found = restarts + 1, _JPEG_MARKER.search(data, found.end())
            if found is None:
                return None
            at = found.start()
            parts += [data[start:at], _filler(restarts)]
            start = at
    return None


def _filler(restarts: int) -> bytes:
    """What follows a scan's coded data in :func:`_check_jpeg_scans`: varied bits (no FF)
    that a scan cut short decodes as coefficients, and among them the restart markers that
    a scan of restart intervals expects after ``restarts`` of them (one cut short at the end
    of an interval looks for the next, and skips bytes before it)."""
    noise = bytes(np.random.default_rng(0).integers(0, 255, 512, dtype=np.uint8))
    markers = [bytes((0xFF, 0xD0 + (restarts + k) % 8)) for k in range(4)]
    return noise + noise.join(markers) + noise


def _jpeg_draft(data: bytes, size: tuple[int, int]) -> np.ndarray:
    """A JPEG decoded at a quarter of ``size`` (width, height)."""
    from PIL import Image

    with _pillow_limit():
        img = Image.open(io.BytesIO(data))
    with img:
        img.draft(None, (max(1, size[0] // 4), max(1, size[1] // 4)))
        img.load()
        return np.asarray(img)
