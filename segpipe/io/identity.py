"""What identifies an image's pixels cheaply: a SHA-256 of a fixed sample of them.

A result records its source by path; an image replaced at that path by another of the same
shape (a re-scan saved under the same name, another tile of a survey) must not resume or
return the old result. :func:`pixel_sample_sha256` reads a few small regions through the
:class:`~segpipe.io.readers.Reader` protocol only, so it serves every format alike (files,
folders such as OME-Zarr and DICOM, URLs, in-memory arrays), and equal pixels give equal
digests whatever format holds them.
"""

from __future__ import annotations

import hashlib
import json

import numpy as np

from segpipe.io.readers import Reader

__all__ = ["SAMPLE_GRID", "SAMPLE_SIDE", "pixel_sample_sha256", "sample_spans"]

# A SAMPLE_GRID x SAMPLE_GRID grid of regions of SAMPLE_SIDE px: at most 36,864 pixels read
# (plus the whole tiles or strips they touch), whatever the image's size. Changing any of these
# changes every result's ``source_sha256``, so results made before would no longer resume.
SAMPLE_GRID = 3
SAMPLE_SIDE = 64
_DIGEST_VERSION = "segpipe-pixel-sample-1"


def sample_spans(n: int, side: int = SAMPLE_SIDE, grid: int = SAMPLE_GRID) -> list[tuple[int, int]]:
    """``(start, stop)`` pixels of the sampled spans along an axis of ``n`` pixels: ``grid``
    spans of ``side`` px centred in the axis's ``grid`` equal parts, moved inside it, equal
    ones once (an axis shorter than ``side`` is one span of it whole).

    >>> sample_spans(192)
    [(0, 64), (64, 128), (128, 192)]
    >>> sample_spans(1000)
    [(134, 198), (468, 532), (801, 865)]
    >>> sample_spans(100), sample_spans(40)
    ([(0, 64), (18, 82), (36, 100)], [(0, 40)])
    """
    s = min(side, n)
    starts = {min(max(0, (2 * i + 1) * n // (2 * grid) - s // 2), n - s) for i in range(grid)}
    return [(a, a + s) for a in sorted(starts)]


def pixel_sample_sha256(reader: Reader) -> str:
    """SHA-256 hex digest of ``reader``'s level-0 shape ``(Y, X, C)``, dtype, and the pixels
    of ``SAMPLE_GRID`` x ``SAMPLE_GRID`` regions of ``SAMPLE_SIDE`` x ``SAMPLE_SIDE`` px of
    level 0 (fewer and smaller on an image under ``SAMPLE_GRID * SAMPLE_SIDE`` px), centred in
    its equal parts (:func:`sample_spans`).

    Level 0 only: the image's own pixels, not a pyramid some tool computed from them (an
    ingest, ``gdaladdo``), which can be rebuilt otherwise without the image changing. Reads
    those regions only, whatever the image's size, so two images of the same shape that
    differ outside them digest alike: a cheap guard against a replaced file, not a checksum
    of every pixel. Deterministic; the pixels are hashed little-endian, so equal pixels in
    any format digest alike.

    >>> from segpipe.io.readers import ArrayReader
    >>> a = ArrayReader(np.zeros((100, 70, 3), np.uint8))
    >>> pixel_sample_sha256(a) == pixel_sample_sha256(ArrayReader(np.zeros((100, 70, 3), "u1")))
    True
    """
    dtype = np.dtype(reader.dtype).newbyteorder("<")
    ny, nx, nc = (int(n) for n in reader.level_shapes[0])
    h = hashlib.sha256(
        json.dumps({"v": _DIGEST_VERSION, "shape": [ny, nx, nc], "dtype": dtype.str}).encode()
    )
    for y0, y1 in sample_spans(ny):
        for x0, x1 in sample_spans(nx):
            pixels = reader.read(y0, y1, x0, x1, 0)
            h.update(np.ascontiguousarray(pixels, dtype=dtype).tobytes())
    return h.hexdigest()
