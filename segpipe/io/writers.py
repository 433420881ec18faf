"""Write images as tiled, pyramidal OME-TIFF (BigTIFF), the format slide viewers open.

Follows tifffile's pyramid recipe: level 0 as the main IFD with the reduced levels in its
SubIFDs, OME-XML with ``PhysicalSizeX/Y`` and resolution tags in centimetres, so both
OME-aware readers and plain TIFF readers (and :func:`segpipe.io.readers.open_image`) find the
pixel size.

The image is streamed: level 0 is read in bands of tile rows (a dask array is computed one
band at a time), each band is written and halved into the next level, and the reduced levels
wait in a temporary memory-mapped file beside the output, never as whole arrays in RAM.
"""

from __future__ import annotations

import itertools
import math
import os
import shutil
import tempfile
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from segpipe.geometry.pixels import downsample_mean_2x, pyramid_shapes
from segpipe.io.locks import store_lock
from segpipe.io.siblings import check_name_room, siblings

__all__ = ["write_pyramidal_tiff"]


def write_pyramidal_tiff(
    path: str | os.PathLike[str],
    image: Any,
    *,
    pixel_size_um: float,
    tile: int = 256,
    compression: str | None = "zlib",
    min_level_size: int = 256,
) -> Path:
    """Write a ``(Y, X, C)`` image as a tiled pyramidal OME-TIFF (BigTIFF).

    Parameters
    ----------
    path
        Output file, usually ``*.ome.tif``; replaced whole if it exists (written beside it,
        then renamed over it: ``image`` may be read from it).
    image
        ``(Y, X, C)`` numpy or dask array, normally uint8 RGB (``C == 3``); any other ``C``
        is written as greyscale samples, none of them alpha (4 channels are 4 bands, not
        RGBA). Other integer and float dtypes are written as they are.
    pixel_size_um
        Microns per pixel at level 0 (> 0); level ``k`` gets ``pixel_size_um * 2**k``.
    tile
        Tile side in pixels, a multiple of 16 (TIFF requires it).
    compression
        tifffile codec name: ``"zlib"`` (lossless, default), ``"jpeg"``, ``"zstd"``, or
        ``None``/``"none"``.
    min_level_size
        Reduced levels are added while their smaller side stays ``>= min_level_size``
        (see :func:`segpipe.geometry.pixels.pyramid_shapes`).

    Returns
    -------
    Path
        The file written.

    Examples
    --------
    >>> import numpy as np
    >>> rgb = np.zeros((600, 1000, 3), dtype=np.uint8)
    >>> write_pyramidal_tiff("slide.ome.tif", rgb, pixel_size_um=0.5)  # doctest: +SKIP
    PosixPath('slide.ome.tif')
    """
    import tifffile

    out = Path(path)
    shape = tuple(int(n) for n in image.shape)
    if len(shape) != 3:
        raise ValueError(f"writing {out}: image must be (Y, X, C), got shape {shape}")
    if not (math.isfinite(pixel_size_um) and pixel_size_um > 0):
        raise ValueError(f"writing {out}: pixel_size_um must be > 0, got {pixel_size_um}")
    if tile < 16 or tile % 16:
        raise ValueError(f"writing {out}: tile must be a positive multiple of 16, got {tile}")
    dtype = np.dtype(image.dtype)
    if dtype.kind not in "uif":
        raise ValueError(f"writing {out}: cannot write pixels of dtype {dtype} to TIFF")
    if compression == "none":
        compression = None

    ny, nx, nc = shape
    levels = pyramid_shapes((ny, nx), min_level_size)
    # RGB only for exactly three channels: tifffile marks a 4th sample beside RGB as an
    # unassociated alpha, and readers (segpipe, GDAL, QuPath) then take a 4th band (NIR, a
    # 4-plex) as a validity mask. Any other count is grey with unspecified extra samples.
    photometric = "rgb" if nc == 3 else "minisblack"
    axes = "YXS" if nc > 1 else "YX"
    options: dict[str, Any] = {
        "photometric": photometric,
        "planarconfig": "contig" if nc > 1 else None,
        "extrasamples": (0,) * (nc - 1) if photometric == "minisblack" and nc > 1 else None,
        "tile": (tile, tile),
        "compression": compression,
        "resolutionunit": "CENTIMETER",
        "dtype": dtype,
    }
    metadata = {
        "axes": axes,
        "PhysicalSizeX": pixel_size_um,
        "PhysicalSizeXUnit": "µm",
        "PhysicalSizeY": pixel_size_um,
        "PhysicalSizeYUnit": "µm",
    }
    out.parent.mkdir(parents=True, exist_ok=True)
    # Written beside ``out`` and renamed over it whole: a failure, or ``image`` read from the
    # file at ``out`` itself, would otherwise leave a truncated file where the old one was.
    # One writer of ``out`` at a time, so the scratch folders beside it now are killed
    # writers' (an image's size each), never a live one's.
    with store_lock(out, after_kill=", and the next write removes what it left"):
        for old in siblings(out, "writing"):
            shutil.rmtree(old, ignore_errors=True)
        prefix = f".{out.name}.writing-"
        check_name_room(out, prefix + "x" * 8)  # and TemporaryDirectory's 8 characters
        with tempfile.TemporaryDirectory(dir=out.parent, prefix=prefix) as scratch:
            written = Path(scratch) / out.name
            with tifffile.TiffWriter(written, bigtiff=True, ome=True) as tif:
                _write_levels(
                    tif, image, levels, Path(scratch), tile, pixel_size_um, metadata, options
                )
            with open(written, "rb") as done:  # after a power cut the rename may land first
                os.fsync(done.fileno())
            os.replace(written, out)
    return out


def _write_levels(
    tif: Any,
    image: Any,
    levels: Sequence[tuple[int, int]],
    scratch: Path,
    tile: int,
    pixel_size_um: float,
    metadata: dict[str, Any],
    options: dict[str, Any],
) -> None:
    """Each of ``levels`` into ``tif``: level 0 from ``image``, each next one the last halved
    on its way into the file, kept memory-mapped in ``scratch``."""
    dtype, nc = options["dtype"], int(image.shape[2])
    source: Any = image
    for k, (ly, lx) in enumerate(levels):
        reduced = None
        if k + 1 < len(levels):
            ry, rx = levels[k + 1]
            reduced = np.lib.format.open_memmap(
                scratch / f"level{k + 1}.npy", mode="w+", dtype=dtype, shape=(ry, rx, nc)
            )
        px = pixel_size_um * 2**k
        level_shape = (ly, lx, nc) if nc > 1 else (ly, lx)
        tif.write(
            _tiles(_bands(source, tile), tile, reduced, nc),
            shape=level_shape,
            resolution=(1e4 / px, 1e4 / px),
            subifds=len(levels) - 1 if k == 0 and len(levels) > 1 else None,
            subfiletype=1 if k > 0 else 0,
            metadata=metadata if k == 0 else None,
            **options,
        )
        if reduced is not None:
            reduced.flush()
        source = reduced


def _bands(image: Any, height: int) -> Iterator[np.ndarray]:
    """Consecutive row bands of exactly ``height`` rows (the last may be shorter).

    A dask array is computed one of its own row chunks at a time (so no source chunk is
    computed twice), and the rows are regrouped into bands.
    """
    ny = image.shape[0]
    if hasattr(image, "chunks") and hasattr(image, "compute"):
        bounds = np.cumsum((0, *image.chunks[0]))
        blocks = (image[int(a) : int(b)].compute() for a, b in itertools.pairwise(bounds))
    else:
        blocks = (np.asarray(image[y : y + height]) for y in range(0, ny, height))
    pending: list[np.ndarray] = []
    n_pending = 0
    for block in blocks:
        pending.append(block)
        n_pending += block.shape[0]
        if n_pending < height:
            continue
        rows = np.concatenate(pending) if len(pending) > 1 else pending[0]
        full = (n_pending // height) * height
        for y in range(0, full, height):
            yield rows[y : y + height]
        pending = [rows[full:]] if full < n_pending else []
        n_pending -= full
    if n_pending:
        yield np.concatenate(pending)


def _tiles(
    bands: Iterator[np.ndarray], tile: int, reduced: np.ndarray | None, nc: int
) -> Iterator[np.ndarray]:
    """Tiles in row-major order for tifffile, halving each band into ``reduced`` on the way."""
    y = 0
    for band in bands:
        if reduced is not None and band.shape[0] >= 2:
            half = downsample_mean_2x(band)
            reduced[y // 2 : y // 2 + half.shape[0]] = half
        y += band.shape[0]
        for x0 in range(0, band.shape[1], tile):
            t = band[:, x0 : x0 + tile]
            yield t if nc > 1 else t[..., 0]
