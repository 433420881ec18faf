"""What a TIFF's samples mean (its PhotometricInterpretation, its alpha, its Orientation), turned
into the pixels viewers show.

tifffile hands out samples as stored: a palette image's indices, a min-is-white image's grey
with 0 for white, CMYK's four inks, colour premultiplied by an associated alpha, rows in the
order the Orientation tag says they were written. A model, a mask file or a nodata value read
from those would see something else than the user does, so each level's keyframe says how its
samples become pixels (:func:`level_photometric`): a palette is expanded to RGB, min-is-white
grey is turned into min-is-black, samples of 2 to 7 bits are scaled to 0-255, premultiplied
colour is divided by its alpha, Aperio's JPEG 2000 YCbCr (tagged RGB) is turned into RGB as
OpenSlide does, and an interpretation segpipe
cannot show as a viewer would (CMYK, CIELab, YCbCr that no JPEG codec turned into RGB, raw
sensor data) is refused naming the file. The TIFF reader sets each level's
``orientation``; :func:`orient` turns pixels as a viewer does, for EXIF's orientation too.

>>> Photometric(np.zeros((256, 3), np.uint16)).layout("YX", (64, 80), (64, 64), np.dtype("u1"))
('YXS', (64, 80, 3), (64, 64, 3), dtype('uint16'))
>>> Photometric(orientation=6).layout("YXS", (64, 80, 3), (16, 32, 3), np.dtype("u1"))
('YXS', (80, 64, 3), (32, 16, 3), dtype('uint8'))
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any

import numpy as np

from segpipe.io.readers.base import ImageReadError

__all__ = [
    "ALPHA_SAMPLES",
    "JPEG_COMPRESSIONS",
    "ORIENTATION_TAG",
    "Photometric",
    "level_photometric",
    "min_is_black",
    "orient",
    "stated_orientation",
    "unpremultiply",
]

# PhotometricInterpretation values (TIFF 6.0, section 8; tifffile.PHOTOMETRIC)
_MINISWHITE, _MINISBLACK, _RGB, _PALETTE, _MASK, _YCBCR = 0, 1, 2, 3, 4, 6
# TIFF's JPEG compressions (JPEG, lossy DNG JPEG, Aperio's alternative JPEG): each tile or
# strip a whole JPEG stream, decoded by its own tables and frame header.
JPEG_COMPRESSIONS = (7, 34892, 33007)
# Compressions whose codec turns YCbCr into RGB as it decodes (old JPEG and the JPEGs):
# tifffile's own set. Other YCbCr comes out as Y, Cb, Cr.
_RGB_DECODING = (6, *JPEG_COMPRESSIONS)
# Aperio's JPEG 2000 of YCbCr samples (no colour transform in the codestream), tagged RGB
# (openslide.org/formats/aperio): the codec hands out Y, Cb, Cr, which OpenSlide turns into RGB.
APERIO_JP2K_YCBCR = 33003
_PHOTOMETRIC_TAG = 262
# TIFF's Orientation (section 8) and EXIF's (0x0112) are one tag with the same 8 values.
ORIENTATION_TAG = 274
# ExtraSamples values: associated (premultiplied) and unassociated alpha
_ASSOCIATED = 1
ALPHA_SAMPLES = (_ASSOCIATED, 2)


@dataclass(frozen=True, eq=False)
class Photometric:
    """How one level's stored samples become pixels.

    ``palette``: ``(N, 3)`` RGB of each of the ``N`` indices; the indices are expanded through
    it, adding a trailing sample axis ``S`` of 3. ``inverted``: how many leading samples are
    min-is-white grey, turned into min-is-black (:func:`min_is_black`; ``bits_per_sample``, the
    TIFF's BitsPerSample, says where white is). ``premultiplied``: how many leading samples are
    colour multiplied by the associated alpha, sample ``alpha``, and divided by it
    (:func:`unpremultiply`). ``orientation``: the TIFF Orientation (1 to 8), rows and columns
    turned as :func:`orient` does. ``ycbcr``: the three samples are JFIF YCbCr, turned into
    RGB (:func:`ycbcr_to_rgb`). ``widened``: the BitsPerSample (2 to 7) of samples that
    tifffile gives in uint8 unscaled (a 4-bit grey's white is 15), scaled up to 0-255 last,
    as viewers and Pillow show them. None of them: the samples as stored.
    """

    palette: np.ndarray | None = None
    inverted: int = 0
    bits_per_sample: int | None = None
    premultiplied: int = 0
    alpha: int = 0
    orientation: int = 1
    ycbcr: bool = False
    widened: int | None = None

    @property
    def is_as_stored(self) -> bool:
        """Whether the pixels are the stored samples, each where it is stored."""
        return (
            self.palette is None
            and not self.inverted
            and not self.premultiplied
            and not self.ycbcr
            and self.orientation == 1
            and self.widened is None
        )

    def layout(
        self, axes: str, shape: tuple[int, ...], chunks: tuple[int, ...], dtype: np.dtype[Any]
    ) -> tuple[str, tuple[int, ...], tuple[int, ...], np.dtype[Any]]:
        """The axes, shape, chunks and dtype of the pixels, from the stored samples' (``chunks``
        may be empty: it then stays so)."""
        if _turns(self.orientation)[0]:  # stored on its side: Y and X swap sizes
            y, x = axes.index("Y"), axes.index("X")
            shape = _swapped(shape, y, x)
            chunks = _swapped(chunks, y, x) if chunks else chunks
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
    """The stored samples of a level (a zarr array) given out as pixels by a
    :class:`Photometric`, sliced as the pixels are laid out: a palette's RGB on a trailing axis,
    min-is-white grey inverted, premultiplied colour divided by its alpha, rows and columns as
    the orientation shows them. A window decodes the stored tiles under it, no more."""

    def __init__(self, array: Any, axes: str, photometric: Photometric) -> None:
        self.array, self.photometric = array, photometric
        self._samples = axes.find("S")  # -1: one sample, no axis for it
        self._yx = (axes.index("Y"), axes.index("X"))
        _, shape, chunks, dtype = photometric.layout(
            axes, tuple(array.shape), tuple(array.chunks), np.dtype(array.dtype)
        )
        self.shape, self.chunks, self.dtype, self.ndim = shape, chunks, dtype, len(shape)

    def __getitem__(self, key: tuple[Any, ...]) -> np.ndarray:
        key = (*key, *(slice(None),) * (self.ndim - len(key)))
        turn, (y, x) = self.photometric.orientation, self._yx
        rows, columns = self.shape[y], self.shape[x]
        stored_y, stored_x = _stored_window(
            turn, _span(key[y], rows), _span(key[x], columns), (rows, columns)
        )
        stored = list(key)
        stored[y], stored[x] = slice(*stored_y), slice(*stored_x)
        return orient(self._pixels(tuple(stored)), turn, (y, x))

    def _pixels(self, key: tuple[Any, ...]) -> np.ndarray:
        """The pixels of ``key``, a window in the stored rows and columns."""
        pixels, bits = self._shown(key), self.photometric.widened
        if bits is None:
            return pixels
        white = 2**bits - 1  # v * 255 / white, rounded: 4 bits x 17, 2 bits x 85
        return ((pixels.astype(np.uint16) * 255 + white // 2) // white).astype(np.uint8)

    def _shown(self, key: tuple[Any, ...]) -> np.ndarray:
        p, s = self.photometric, self._samples
        if p.palette is not None:  # an index past the palette's end is an IndexError: corrupt
            return np.take(p.palette, np.asarray(self.array[key[:-1]]), axis=0)[..., key[-1]]
        if s < 0:
            stored = np.asarray(self.array[key])
            return min_is_black(stored, p.bits_per_sample) if p.inverted else stored
        if not (p.inverted or p.premultiplied or p.ycbcr):
            return np.asarray(self.array[key])
        # Every sample of the window, so the grey, colour and alpha are known whatever the key
        # keeps.
        pixels = np.asarray(self.array[(*key[:s], slice(None), *key[s + 1 :])])
        if p.premultiplied:
            colour, rest = np.split(pixels, [p.premultiplied], axis=s)
            alpha = np.take(pixels, [p.alpha], axis=s)
            white = 1 if pixels.dtype.kind == "f" else 2 ** (p.bits_per_sample or 1) - 1
            pixels = np.concatenate([unpremultiply(colour, alpha, white), rest], axis=s)
        if p.inverted:
            grey, rest = np.split(pixels, [p.inverted], axis=s)
            pixels = np.concatenate([min_is_black(grey, p.bits_per_sample), rest], axis=s)
        if p.ycbcr:
            colour, rest = np.split(pixels, [3], axis=s)
            rgb = np.moveaxis(ycbcr_to_rgb(np.moveaxis(colour, s, -1)), -1, s)
            pixels = np.concatenate([rgb, rest], axis=s)
        return pixels[(slice(None),) * s + (key[s],)]


def _swapped(sizes: tuple[int, ...], i: int, j: int) -> tuple[int, ...]:
    out = list(sizes)
    out[i], out[j] = out[j], out[i]
    return tuple(out)


def _span(key: Any, size: int) -> tuple[int, int]:
    """``[start, stop)`` of a slice of a side ``size`` long; only steps of 1 are windows."""
    if not isinstance(key, slice):
        raise TypeError(f"a window of rows or columns is a slice, not {key!r}")
    start, stop, step = key.indices(size)
    if step != 1:
        raise TypeError(f"a window of rows or columns has a step of 1, not {step}")
    return start, max(start, stop)


def _turns(orientation: int) -> tuple[bool, bool, bool]:
    """Whether the stored rows and columns swap, then whether the rows, and the columns, are
    shown in reverse (TIFF 6.0's Orientation; a value outside 1 to 8 shows as stored, as
    Pillow's ``exif_transpose`` leaves it)."""
    if orientation in (5, 6, 7, 8):  # stored on its side
        return True, orientation in (7, 8), orientation in (6, 7)
    return False, orientation in (3, 4), orientation in (2, 3)


def orient(pixels: np.ndarray, orientation: int, yx: tuple[int, int] = (0, 1)) -> np.ndarray:
    """``pixels`` (rows on axis ``yx[0]``, columns on ``yx[1]``) as viewers show a file with
    this TIFF or EXIF orientation (1 as stored, 6 turned clockwise, ...; what
    ``PIL.ImageOps.exif_transpose`` does, for 16-bit pixels too).

    >>> orient(np.array([[1, 2, 3], [4, 5, 6]]), 6).tolist()
    [[4, 1], [5, 2], [6, 3]]
    """
    swap, flip_y, flip_x = _turns(orientation)
    y, x = yx
    if swap:
        pixels = pixels.swapaxes(y, x)
    index = [slice(None)] * pixels.ndim
    index[y] = slice(None, None, -1 if flip_y else 1)
    index[x] = slice(None, None, -1 if flip_x else 1)
    return np.ascontiguousarray(pixels[tuple(index)])


def _stored_window(
    orientation: int, ys: tuple[int, int], xs: tuple[int, int], shown: tuple[int, int]
) -> tuple[tuple[int, int], tuple[int, int]]:
    """The stored rows and columns (``[start, stop)`` each) whose pixels :func:`orient` shows
    as the rows ``ys`` and columns ``xs`` of a level shown ``shown`` (rows, columns) large."""
    swap, flip_y, flip_x = _turns(orientation)
    rows, columns = shown
    if flip_y:
        ys = (rows - ys[1], rows - ys[0])
    if flip_x:
        xs = (columns - xs[1], columns - xs[0])
    return (xs, ys) if swap else (ys, xs)


def unpremultiply(colour: np.ndarray, alpha: np.ndarray, white: float) -> np.ndarray:
    """``colour`` stored multiplied by ``alpha`` (broadcast against it; ``white`` is full
    opacity and full colour) as viewers show it: ``colour * white // alpha`` for integers,
    rounded down and at most ``white`` (as openslide-python undoes OpenSlide's premultiplied
    ARGB), ``colour * white / alpha`` for floats; where ``alpha`` is 0, as stored.

    >>> colour, alpha = np.array([0, 1, 37, 250, 20], np.uint8), np.array([0, 2, 100, 255, 10])
    >>> unpremultiply(colour, alpha, 255).tolist()
    [0, 127, 94, 250, 255]
    """
    if colour.dtype.kind == "f":
        with np.errstate(divide="ignore", invalid="ignore"):
            return np.where(alpha > 0, colour * white / alpha, colour).astype(colour.dtype)
    # colour * white needs twice the bits of a sample (level_photometric refuses wider ones)
    wide = np.dtype(np.uint32 if colour.dtype.itemsize <= 2 else np.uint64)
    opacity, full = alpha.astype(wide), np.asarray(white, wide)
    scaled = np.multiply(colour.astype(wide), full)
    shown = np.minimum(np.floor_divide(scaled, np.maximum(opacity, 1)), full)
    return np.where(np.greater(opacity, 0), shown, colour).astype(colour.dtype)


def _rounded(x: np.ndarray) -> np.ndarray:
    """C's ``round``: halves away from zero (numpy's goes to even)."""
    return np.sign(x) * np.floor(np.abs(x) + 0.5)


# JFIF's YCbCr to RGB (BT.601, full range), each chroma's part a table by its 8-bit value, in
# OpenSlide's integers (its make-tables.c): green's two parts in 16-bit fixed point, the
# rounding's half added to one of them.
_CHROMA = np.arange(256, dtype=np.float64) - 128
_R_CR = _rounded(1.402 * _CHROMA).astype(np.int32)
_G_CB = _rounded(65536 * (0.5 - 0.34414 * _CHROMA)).astype(np.int32)
_G_CR = _rounded(65536 * -0.71414 * _CHROMA).astype(np.int32)
_B_CB = _rounded(1.772 * _CHROMA).astype(np.int32)


def ycbcr_to_rgb(ycbcr: np.ndarray) -> np.ndarray:
    """8-bit RGB of ``(..., 3)`` uint8 JFIF YCbCr (BT.601, full range), as OpenSlide gives
    Aperio's JPEG 2000 tiles (compression 33003): its tables' integers, clipped to 0-255.

    >>> ycbcr_to_rgb(np.array([[93, 111, 204]], np.uint8)).tolist()
    [[200, 45, 63]]
    """
    y, cb, cr = (ycbcr[..., k].astype(np.int32) for k in range(3))
    rgb = np.stack([y + _R_CR[cr], y + ((_G_CB[cb] + _G_CR[cr]) >> 16), y + _B_CB[cb]], axis=-1)
    return np.clip(rgb, 0, 255).astype(np.uint8)


def min_is_black(grey: np.ndarray, bits_per_sample: int | None) -> np.ndarray:
    """Min-is-white grey as min-is-black: ``2**bits_per_sample - 1 - v`` for unsigned
    integers (a 12-bit sample in a uint16 has its white at 4095, not 65535), the dtype's
    maximum plus minimum minus the value (``~v``) for signed ones, booleans negated and
    ``1 - v`` for floats, taken in [0, 1].

    >>> min_is_black(np.array([0, 10, 255], np.uint8), 8).tolist()
    [255, 245, 0]
    >>> min_is_black(np.array([True]), 1).tolist()
    [False]
    >>> min_is_black(np.array([0, 10, 4095], np.uint16), 12).tolist()
    [4095, 4085, 0]
    """
    if grey.dtype.kind == "f":
        return 1 - grey
    if grey.dtype.kind == "u" and bits_per_sample is not None:
        # decoded samples of that many bits never pass white: no wrap-around
        return (2**bits_per_sample - 1) - grey
    return np.invert(grey)


def stated_orientation(page: Any) -> int | None:
    """``page``'s Orientation (TIFF tag 274), None where it states none; a value outside 1 to 8
    is 1 (libtiff refuses it and keeps its default, 1)."""
    value = page.tags.valueof(ORIENTATION_TAG)
    if value is None:
        return None
    return int(value) if 1 <= int(value) <= 8 else 1


def level_photometric(page: Any, path: str, level: int) -> Photometric:
    """How level ``level``'s keyframe ``page`` (a tifffile ``TiffPage``) stores its samples
    (:func:`_stored_as`), samples of 2 to 7 bits in uint8 scaled up (``widened``)."""
    shown = _stored_as(page, path, level)
    bits = page.bitspersample
    bits = max(bits) if isinstance(bits, tuple) else int(bits)
    if shown.palette is None and np.dtype(page.dtype) == np.uint8 and 1 < bits < 8:
        return replace(shown, widened=bits)
    return shown


def _stored_as(page: Any, path: str, level: int) -> Photometric:
    """How level ``level``'s keyframe ``page`` (a tifffile ``TiffPage``) stores its samples
    (as stored in its rows and columns: the orientation is the reader's to set).

    Raises
    ------
    ImageReadError
        Naming the file, the level and the interpretation, for one segpipe cannot read as
        viewers show it (CMYK, CIELab, YCbCr not decoded to RGB, CFA, LogLuv, ...), a
        palette image without a usable colormap, or an associated alpha in samples other
        than unsigned integers of up to 32 bits or floats.
    """
    colour = int(page.samplesperpixel) - len(page.extrasamples)
    premultiplied = _premultiplied(page, colour, path, level)
    if _PHOTOMETRIC_TAG not in page.tags:
        # No tag (tifffile then says min-is-white): libtiff and GDAL take the samples as
        # they are stored, and so did segpipe.
        return premultiplied
    kind = int(page.photometric)
    if kind == _RGB and int(page.compression) == APERIO_JP2K_YCBCR:
        if colour != 3 or int(page.bitspersample) != 8:
            raise ImageReadError(
                f"{path}: level {level} stores {colour} samples of {page.bitspersample} bits "
                f"in Aperio's JPEG 2000 YCbCr (compression {APERIO_JP2K_YCBCR}), which holds "
                "three of 8 bits: the file is damaged"
            )
        return replace(premultiplied, ycbcr=True)
    if kind in (_MINISBLACK, _RGB, _MASK) or (
        kind == _YCBCR and int(page.compression) in _RGB_DECODING
    ):
        return premultiplied
    if kind == _MINISWHITE and colour >= 1:
        return replace(premultiplied, inverted=colour, bits_per_sample=int(page.bitspersample))
    colormap = page.colormap if kind == _PALETTE else None
    if colormap is not None and colour == 1 and not page.extrasamples:
        colormap = np.asarray(colormap)
        entries = 2 ** int(page.bitspersample)  # one RGB per index a sample can hold
        # TIFF 6.0's count is 3 x 2**BitsPerSample. tifffile gives one not divisible by 3 flat;
        # a shorter one leaves indices without a colour; a longer one is read by its first.
        if colormap.ndim != 2 or colormap.shape[0] != 3 or colormap.shape[1] < entries:
            raise ImageReadError(
                f"{path}: level {level}'s ColorMap (TIFF tag 320) holds {colormap.size:,} "
                f"values; a palette of {page.bitspersample}-bit indices needs 3 x {entries:,} "
                "(red, green, blue of each index): the file is damaged"
            )
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


def _premultiplied(page: Any, colour: int, path: str, level: int) -> Photometric:
    """The samples as stored, but for colour premultiplied by an associated alpha: the first
    alpha among the extra samples (the one taken as the image's alpha) if it is associated."""
    extra = [int(e) for e in page.extrasamples]
    alphas = [i for i, e in enumerate(extra) if e in ALPHA_SAMPLES]
    if not alphas or extra[alphas[0]] != _ASSOCIATED or colour < 1:
        return Photometric()
    dtype = np.dtype(page.dtype)
    if not (dtype.kind == "f" or (dtype.kind == "u" and dtype.itemsize <= 4)):
        raise ImageReadError(
            f"{path}: level {level} stores colour premultiplied by an associated alpha in "
            f"{dtype} samples, which segpipe cannot divide by the alpha; it does so for "
            "unsigned integers of up to 32 bits and floats: store the alpha unassociated"
        )
    return Photometric(
        premultiplied=colour, alpha=colour + alphas[0], bits_per_sample=int(page.bitspersample)
    )


def _photometric_name(kind: int) -> str:
    import tifffile

    try:
        name = tifffile.PHOTOMETRIC(kind).name
    except ValueError:
        return "an unknown interpretation"
    return {"SEPARATED": "SEPARATED (CMYK inks)", "YCBCR": "YCbCr"}.get(name, name)
