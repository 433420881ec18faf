"""Which pixels of an image hold data: nodata values, mask bands, alpha channels.

A GeoTIFF (or an orthomosaic made of several scenes) marks the pixels outside its footprint;
segmenting them wastes time and invents classes where there is nothing. Readers say how their
file marks them (``reader.mask_kind``: ``"nodata"``, ``"mask"``, ``"alpha"`` or None) and read
the mask of a window (``reader.valid_mask(y0, y1, x0, x1, level)``); :func:`valid_mask` reads
it for a tile's box, mirrored like its pixels.

>>> pixel_valid_mask(np.array([[[0, 0], [0, 9]]]), (0.0, 0.0), "nodata", None).tolist()
[[False, True]]
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import TYPE_CHECKING, Any

import dask.array as da
import numpy as np

from segpipe.geometry.tiling import Box, mirror_indices

if TYPE_CHECKING:
    from segpipe.io.readers.base import Reader

__all__ = ["check_per_channel", "pixel_valid_mask", "valid_mask", "valid_mask_array"]


def pixel_valid_mask(
    pixels: np.ndarray,
    nodata: tuple[float | None, ...] | None,
    mask_kind: str | None,
    channel_names: tuple[str, ...] | None,
) -> np.ndarray | None:
    """``(y, x)`` bool from ``(y, x, C)`` pixels: True where they hold data; None when
    ``mask_kind`` marks nothing the pixels can show (None, or ``"mask"``: a separate band).

    GDAL's rule: a pixel is invalid where every band holds its nodata value (NaN matches NaN;
    a band without a nodata value is valid everywhere), or where the ``"alpha"`` channel is 0.
    """
    names = channel_names or ()
    if mask_kind == "alpha" and "alpha" in names:
        return np.asarray(pixels[..., names.index("alpha")] > 0)
    if mask_kind != "nodata" or nodata is None:
        return None
    invalid = np.ones(pixels.shape[:2], dtype=bool)
    for band, value in zip(np.moveaxis(pixels, -1, 0), nodata, strict=True):
        if value is None:
            return np.ones(pixels.shape[:2], dtype=bool)
        invalid &= np.isnan(band) if np.isnan(value) else band == value
    return ~invalid


def valid_mask(reader: Reader, box: Box, level: int = 0) -> np.ndarray:
    """``(y, x)`` bool of ``box`` of ``level``: True where the image holds data.

    Mirrored where the box leaves the image, exactly as
    :func:`~segpipe.io.readers.read_mirrored` mirrors the pixels, so
    ``read_mirrored(r, box)[valid_mask(r, box)]`` are the box's valid pixels. All True for a
    reader without nodata, mask band or alpha (``mask_kind`` None, or no ``valid_mask``).

    >>> from segpipe.io.readers import ArrayReader
    >>> valid_mask(ArrayReader(np.zeros((4, 4), np.uint8)), Box(0, 2, 3, 5)).tolist()
    [[True, True], [True, True]]
    """
    ny, nx, _ = reader.level_shapes[level]
    iy = mirror_indices(box.y0, box.y1, ny)
    ix = mirror_indices(box.x0, box.x1, nx)
    y0, y1, x0, x1 = int(iy.min()), int(iy.max()) + 1, int(ix.min()), int(ix.max()) + 1
    read = getattr(reader, "valid_mask", None)
    src = read(y0, y1, x0, x1, level=level) if read is not None else None
    if src is None:
        return np.ones((len(iy), len(ix)), dtype=bool)
    return np.asarray(src, dtype=bool)[np.ix_(iy - y0, ix - x0)]


def valid_mask_array(reader: Reader, chunk: int, level: int = 0) -> da.Array:
    """Lazy ``(Y, X)`` uint8 of ``level``, ``chunk`` pixels a side: 1 where the pixel holds
    data (``reader.valid_mask``; everywhere when it marks nothing), else 0."""
    source = _ValidSource(reader, level)
    return da.from_array(source, (chunk, chunk), name=False, meta=np.empty((0, 0), np.uint8))


class _ValidSource:
    """``reader.valid_mask`` of a level as an array-like for ``da.from_array``; pickles as its
    reader."""

    def __init__(self, reader: Reader, level: int) -> None:
        self.reader, self.level = reader, level
        self.shape, self.dtype, self.ndim = reader.level_shapes[level][:2], np.dtype(np.uint8), 2

    def __getitem__(self, key: tuple[slice, ...]) -> np.ndarray:
        (y0, y1, _), (x0, x1, _) = (k.indices(n) for k, n in zip(key, self.shape, strict=True))
        valid = getattr(self.reader, "valid_mask", None)
        if valid is None or y1 <= y0 or x1 <= x0:  # no mask, or nothing to ask one of
            return np.ones((max(y1 - y0, 0), max(x1 - x0, 0)), np.uint8)
        mask = valid(y0, y1, x0, x1, self.level)
        return np.ones((y1 - y0, x1 - x0), np.uint8) if mask is None else mask.astype(np.uint8)


def check_per_channel(
    path: str,
    channels: int,
    labelled: Iterable[tuple[str, Sequence[Any] | None]],
    remedy: str,
) -> None:
    """Refuse a reader's per-channel values (nodata, channel names) of another count than its
    ``channels``: a short nodata failed every mask read with a bare ValueError, and a lone
    ``"alpha"`` name made the red channel the alpha. ``labelled``: ``(label, values)`` pairs,
    each label saying where the values come from, with ``{n}`` for their count."""
    from segpipe.io.readers.base import ImageReadError  # base imports this module

    for label, values in labelled:
        if values is not None and len(values) != channels:
            raise ImageReadError(
                f"{path}: {label.format(n=len(values))} {list(values)} for an image of "
                f"{channels} channel(s) as segpipe reads it; {remedy}"
            )
