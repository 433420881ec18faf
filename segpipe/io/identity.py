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

# A SAMPLE_GRID x SAMPLE_GRID grid of regions of SAMPLE_SIDE px: at most 36,864 pixels hashed
# (read with the whole tiles or strips they touch), whatever the image's size. Changing any of
# these changes every result's ``source_sha256``, so results made before would no longer resume.
SAMPLE_GRID = 3
SAMPLE_SIDE = 64
_DIGEST_VERSION = "segpipe-pixel-sample-1"
# A window of several row spans of a stripped image is read whole up to this size, whatever
# its strips' (a small image's: a few MB on top of its strips saves decoding them again).
_MERGED_WINDOW_MIN_BYTES = 4 * 2**20

Window = tuple[int, int, int, int]  # (y0, y1, x0, x1), pixels of level 0


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
    ingest, ``gdaladdo``), which can be rebuilt otherwise without the image changing. Hashes
    those regions only (reading the tiles or strips under them: :func:`_sample_reads`),
    whatever the image's size, so two images of the same shape that differ outside them
    digest alike: a cheap guard against a replaced file, not a checksum
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
    for (wy0, wy1, wx0, wx1), regions in _sample_reads(reader):
        pixels = reader.read(wy0, wy1, wx0, wx1, 0)
        for y0, y1, x0, x1 in regions:
            region = pixels[y0 - wy0 : y1 - wy0, x0 - wx0 : x1 - wx0]
            h.update(np.ascontiguousarray(region, dtype=dtype).tobytes())
    return h.hexdigest()


def _sample_reads(reader: Reader) -> list[tuple[Window, list[Window]]]:
    """The windows of level 0 that :func:`pixel_sample_sha256` reads, each with the sampled
    regions cut from it, in the digest's order (by row, then column).

    A level in tiles reads each region alone: it decodes only the tiles under it. A level in
    strips (chunks as wide as the level: a stripped or untiled TIFF) decodes whole-width
    strips for any region, so the regions whose strips overlap are one window, each strip
    decoded once: one by one, the three regions of a row decoded its strips three times
    (19 MB of an RGB image 100k px wide, for each 64 px region). Row spans sharing a strip
    (a TIFF of one or a few strips) are one window while it holds at most a quarter of one
    strip's bytes (or :data:`_MERGED_WINDOW_MIN_BYTES`, if more): a window is held whole
    beside the strips decoded into it, and one over the three row spans of a 6000 px RGB
    image in one strip (108 MB) held 50 MB more; past that, a span's band is read alone,
    its strips decoded again. A reader without
    ``chunk_shape`` (not a :class:`~segpipe.io.readers.base.BaseReader`) reads region by
    region.
    """
    ny, nx, nc = reader.level_shapes[0]
    ys, xs = sample_spans(ny), sample_spans(nx)
    chunk_shape = getattr(reader, "chunk_shape", None)  # BaseReader's; not in the protocol
    if chunk_shape is None or chunk_shape(0)[1] < nx:
        return [((y0, y1, x0, x1), [(y0, y1, x0, x1)]) for y0, y1 in ys for x0, x1 in xs]
    cy, x0, x1 = chunk_shape(0)[0], xs[0][0], xs[-1][1]
    pixel = nc * np.dtype(reader.dtype).itemsize  # bytes
    budget = max(cy * nx * pixel // 4, _MERGED_WINDOW_MIN_BYTES)
    bands: list[list[tuple[int, int]]] = []
    for y0, y1 in ys:  # sorted and of one height: a band's last span ends furthest down
        if (
            bands
            and y0 // cy <= (bands[-1][-1][1] - 1) // cy
            and (y1 - bands[-1][0][0]) * (x1 - x0) * pixel <= budget
        ):
            bands[-1].append((y0, y1))
        else:
            bands.append([(y0, y1)])
    return [
        ((b[0][0], b[-1][1], x0, x1), [(y0, y1, *x) for y0, y1 in b for x in xs]) for b in bands
    ]
