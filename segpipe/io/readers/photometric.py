"""What a TIFF's samples mean (its PhotometricInterpretation), turned into the pixels viewers show.

tifffile hands out samples as stored: a palette image's indices, a min-is-white image's grey
with 0 for white, CMYK's four inks. A model, a mask file or a nodata value read from those would
see something else than the user does, so each level's keyframe says how its samples become
pixels (:func:`level_photometric`): a palette is expanded to RGB, min-is-white grey is turned
into min-is-black, and an interpretation segpipe cannot show as a viewer would (CMYK, CIELab,
YCbCr that no JPEG codec turned into RGB, raw sensor data) is refused naming the file.

>>> Photometric(np.zeros((256, 3), np.uint16)).layout("YX", (64, 80), (64, 64), np.dtype("u1"))
('YXS', (64, 80, 3), (64, 64, 3), dtype('uint16'))
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from segpipe.io.readers.base import ImageReadError

__all__ = ["Photometric", "level_photometric"]

# PhotometricInterpretation values (TIFF 6.0, section 8; tifffile.PHOTOMETRIC)
_MINISWHITE, _MINISBLACK, _RGB, _PALETTE, _MASK, _YCBCR = 0, 1, 2, 3, 4, 6
# Compressions whose codec turns YCbCr into RGB as it decodes (old JPEG, JPEG, lossy DNG
# JPEG, Aperio's alternative JPEG): tifffile's own set. Other YCbCr comes out as Y, Cb, Cr.
_RGB_DECODING = (6, 7, 34892, 33007)
_PHOTOMETRIC_TAG = 262


@dataclass(frozen=True, eq=False)
class Photometric:
    """How one level's stored samples become pixels.

    ``palette``: ``(N, 3)`` RGB of each of the ``N`` indices; the indices are expanded through
    it, adding a trailing sample axis ``S`` of 3. ``inverted``: how many leading samples are
    min-is-white grey, turned into min-is-black (:func:`_invert`; ``bits_per_sample``, the
    TIFF's BitsPerSample, says where white is). Neither: the samples as stored.
    """

    palette: np.ndarray | None = None
    inverted: int = 0
    bits_per_sample: int | None = None

    @property
    def is_as_stored(self) -> bool:
        """Whether the pixels are the stored samples."""
        return self.palette is None and not self.inverted

    def layout(
        self, axes: str, shape: tuple[int, ...], chunks: tuple[int, ...], dtype: np.dtype[Any]
    ) -> tuple[str, tuple[int, ...], tuple[int, ...], np.dtype[Any]]:
        """The axes, shape, chunks and dtype of the pixels, from the stored samples'."""
        if self.palette is None:
            return axes, shape, chunks, dtype
        return axes + "S", (*shape, 3), (*chunks, 3), self.palette.dtype

    def view(self, array: Any, axes: str) -> Any:
        """``array`` (the stored samples, in ``axes``) as something sliced like it that gives
        pixels; ``array`` itself when the samples are the pixels."""
        if self.is_as_stored:
            return array
        return _PixelView(array, axes, self)


class _PixelView:
    """The stored samples of a level (a zarr array) sliced in their own axes, given out as
    pixels by a :class:`Photometric`: a palette's RGB on a trailing axis, min-is-white grey
    inverted."""

    def __init__(self, array: Any, axes: str, photometric: Photometric) -> None:
        self.array, self.photometric = array, photometric
        self._samples = axes.find("S")  # -1: one sample, no axis for it
        _, shape, chunks, dtype = photometric.layout(
            axes, tuple(array.shape), tuple(array.chunks), np.dtype(array.dtype)
        )
        self.shape, self.chunks, self.dtype, self.ndim = shape, chunks, dtype, len(shape)

    def __getitem__(self, key: tuple[Any, ...]) -> np.ndarray:
        key = (*key, *(slice(None),) * (self.ndim - len(key)))
        palette, s = self.photometric.palette, self._samples
        if palette is not None:  # an index past the palette's end is an IndexError: corrupt
            return np.take(palette, np.asarray(self.array[key[:-1]]), axis=0)[..., key[-1]]
        bits = self.photometric.bits_per_sample
        if s < 0:
            return _invert(np.asarray(self.array[key]), bits)
        # Every sample of the window, so the grey ones are known whatever the key keeps.
        stored = np.asarray(self.array[(*key[:s], slice(None), *key[s + 1 :])])
        n = self.photometric.inverted
        grey, rest = np.split(stored, [n], axis=s)
        pixels = np.concatenate([_invert(grey, bits), rest], axis=s)
        return pixels[(slice(None),) * s + (key[s],)]


def _invert(grey: np.ndarray, bits_per_sample: int | None) -> np.ndarray:
    """Min-is-white grey as min-is-black: ``2**bits_per_sample - 1 - v`` for unsigned
    integers (a 12-bit sample in a uint16 has its white at 4095, not 65535), the dtype's
    maximum plus minimum minus the value (``~v``) for signed ones, booleans negated and
    ``1 - v`` for floats, taken in [0, 1].

    >>> _invert(np.array([0, 10, 255], np.uint8), 8).tolist(), _invert(np.array([True]), 1).tolist()
    ([255, 245, 0], [False])
    >>> _invert(np.array([0, 10, 4095], np.uint16), 12).tolist()
    [4095, 4085, 0]
    """
    if grey.dtype.kind == "f":
        return 1 - grey
    if grey.dtype.kind == "u" and bits_per_sample is not None:
        # decoded samples of that many bits never pass white: no wrap-around
        return (2**bits_per_sample - 1) - grey
    return np.invert(grey)


def level_photometric(page: Any, path: str, level: int) -> Photometric:
    """How level ``level``'s keyframe ``page`` (a tifffile ``TiffPage``) stores its pixels.

    Raises
    ------
    ImageReadError
        Naming the file, the level and the interpretation, for one segpipe cannot read as
        viewers show it (CMYK, CIELab, YCbCr not decoded to RGB, CFA, LogLuv, ...), or a
        palette image without a usable colormap.
    """
    if _PHOTOMETRIC_TAG not in page.tags:
        # No tag (tifffile then says min-is-white): libtiff and GDAL take the samples as
        # they are stored, and so did segpipe.
        return Photometric()
    kind = int(page.photometric)
    colour = int(page.samplesperpixel) - len(page.extrasamples)
    if kind in (_MINISBLACK, _RGB, _MASK) or (
        kind == _YCBCR and int(page.compression) in _RGB_DECODING
    ):
        return Photometric()
    if kind == _MINISWHITE and colour >= 1:
        return Photometric(inverted=colour, bits_per_sample=int(page.bitspersample))
    colormap = page.colormap if kind == _PALETTE else None
    if colormap is not None and colour == 1 and not page.extrasamples:
        colormap = np.asarray(colormap)
        # 16 bits a value, as TIFF says; one of values up to 255 was written in 8 bits by its
        # writer (tifffile's asrgb takes it so too), and expands to 8-bit RGB.
        dtype = np.uint8 if colormap.max() <= 255 else np.uint16
        return Photometric(palette=np.ascontiguousarray(colormap.T.astype(dtype)))
    name = _photometric_name(kind)
    what = "a palette without a colormap or with extra samples" if kind == _PALETTE else name
    raise ImageReadError(
        f"{path}: level {level} stores {what} (PhotometricInterpretation {kind}), which "
        "segpipe cannot show as viewers do; it reads grey, RGB, palette and JPEG-compressed "
        "YCbCr TIFFs: convert the image to RGB first (e.g. vips colourspace in.tif out.tif srgb)"
    )


def _photometric_name(kind: int) -> str:
    import tifffile

    try:
        name = tifffile.PHOTOMETRIC(kind).name
    except ValueError:
        return "an unknown interpretation"
    return {"SEPARATED": "SEPARATED (CMYK inks)", "YCBCR": "YCbCr"}.get(name, name)
