"""Small PNG/JPEG images through Pillow, decoded whole (tiled TIFF is for anything large).

Pixels are turned as the EXIF orientation says, as every viewer shows them; an alpha channel
marks the transparent pixels as invalid (``mask_kind = "alpha"``, as a GeoTIFF's alpha band).
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np

from segpipe.io.files import URLPath
from segpipe.io.readers.base import BaseReader, ImageReadError
from segpipe.io.readers.photometric import ORIENTATION_TAG, orient

__all__ = ["MAX_PILLOW_PIXELS", "PILLOW_SUFFIXES", "PillowReader"]

PILLOW_SUFFIXES = (".png", ".jpg", ".jpeg")

# Pillow images are decoded whole into memory; anything bigger belongs in a tiled TIFF.
MAX_PILLOW_PIXELS = 20_000 * 20_000
_PILLOW_LIMIT_LOCK = threading.Lock()


class PillowReader(BaseReader):
    """A small PNG or JPEG, decoded whole into memory by Pillow (one level).

    Palette, CMYK and YCbCr images are converted to RGB(A); grey stays one channel. The
    alpha of RGBA or LA is the channel named ``"alpha"``; a pixel where it is 0 holds no data
    (:meth:`valid_mask`), unless no pixel is transparent: then it marks nothing.
    """

    def __init__(self, path: Path | URLPath, *, pixel_size_um: float | None = None) -> None:
        super().__init__(path, pixel_size_um)
        data, has_alpha = self._decode()
        axes = "YX" if data.ndim == 2 else "YXC"
        self._data: np.ndarray | None = data
        if has_alpha:
            rgba = data.shape[2] == 4
            self.channel_names = ("red", "green", "blue", "alpha") if rgba else ("grey", "alpha")
            # Checked once, as the image is in memory: an opaque alpha costs no mask pass.
            self.mask_kind = None if data[..., -1].all() else "alpha"
        chunk = tuple(min(n, 1024) for n in data.shape[:2]) + data.shape[2:]
        self._set_layout([axes], [data.shape], [chunk], data.dtype)

    def _decode(self) -> tuple[np.ndarray, bool]:
        """The pixels as viewers show them, and whether the last channel is alpha."""
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
                    turn = img.getexif().get(ORIENTATION_TAG, 1) if "exif" in img.info else 1
                    return orient(wide, turn), img.mode == "RGBA"
                img.load()
                turn = img.getexif().get(ORIENTATION_TAG, 1)
                return orient(np.asarray(img), turn), img.mode in ("RGBA", "LA")
        except Image.DecompressionBombError as exc:  # over twice the limit: no size said
            raise ImageReadError(
                f"{too_big} (got more than {2 * MAX_PILLOW_PIXELS:,} pixels)"
            ) from exc
        except (OSError, ValueError, SyntaxError) as exc:
            if isinstance(exc, ImageReadError):
                raise
            raise ImageReadError(
                f"{self.path}: not a readable PNG/JPEG (corrupt, truncated or another "
                f"format): {type(exc).__name__}: {exc}"
            ) from exc

    def _open_level(self, level: int) -> np.ndarray:
        if self._data is None:
            self._data = self._decode()[0]
        return self._data

    def _close_handles(self) -> None:
        self._data = None

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


def _png16(img: Any) -> np.ndarray | None:
    """A 16-bit colour PNG's pixels, decoded by imagecodecs (Pillow hands them out as 8
    bits, and its mode does not show it); None for 8 bits. The IHDR's bit depth is the byte
    after the signature, the chunk's length and type, the width and the height."""
    img.fp.seek(24)
    if img.fp.read(1) != b"\x10":
        return None
    import imagecodecs

    img.fp.seek(0)
    return np.asarray(imagecodecs.png_decode(img.fp.read()))
