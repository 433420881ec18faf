"""Small PNG/JPEG images through Pillow, decoded whole (tiled TIFF is for anything large).

Pixels are turned as the EXIF orientation says, as every viewer shows them; an alpha channel
marks the transparent pixels as invalid (``mask_kind = "alpha"``, as a GeoTIFF's alpha band),
and so does a grey or RGB PNG's tRNS colour (``mask_kind = "nodata"``, as GDAL reads it).
"""

from __future__ import annotations

import struct
import threading
import warnings
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
        at = end
    fp.seek(here)
