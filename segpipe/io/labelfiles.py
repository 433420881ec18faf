"""Label images (ground truth, instance ids) read as the ids they store, not as they show.

A reader gives pixels as viewers show them (:mod:`segpipe.io.readers.photometric`): a palette
expanded to RGB, min-is-white grey inverted. That is right for a picture and for a mask drawn
in a viewer, and wrong for a label image, whose samples are ids: a palette PNG (PASCAL VOC's
label format) stores one class id a pixel, and tifffile writes a bool array as 1-bit
min-is-white, which tifffile, GDAL and Pillow all read back as stored.
"""

from __future__ import annotations

import os
from typing import Any, cast

import dask.array as da
import numpy as np

from segpipe.io.readers import PillowReader, Reader, open_image
from segpipe.io.readers.photometric import min_is_black

__all__ = ["label_plane"]


def label_plane(path: str | os.PathLike[str], what: str) -> da.Array:
    """Lazy ``(Y, X)`` level 0 of the one-channel image of integer ids at ``path`` (ground
    truth, instances) as stored: a palette image's indices, min-is-white grey not inverted.
    ``ValueError`` naming ``path`` and ``what`` for anything else."""
    reader = open_image(path)
    plane = _stored_ids(path, reader, what)
    if plane is None:
        if reader.shape[2] != 1:
            raise ValueError(
                f"{path}: {what} must be a one-channel label image of integer class ids, got "
                f"{reader.shape[2]} channels"
            )
        plane = reader.level(0)[..., 0]
    if not (np.issubdtype(plane.dtype, np.integer) or plane.dtype == bool):
        raise ValueError(
            f"{path}: {what} must be a one-channel label image and must hold integer class "
            f"ids, got {plane.dtype} (a dtype {plane.dtype} image holds no class ids)"
        )
    return plane


def _stored_ids(path: str | os.PathLike[str], reader: Reader, what: str) -> da.Array | None:
    """The ids ``reader`` would show otherwise, or None where it shows them as stored."""
    shown = getattr(reader, "photometric", None)  # TiffReader's
    if callable(shown):
        p = shown(0)
        if p.palette is not None:
            return _palette_tiff(path, reader, what, p.orientation)
        if p.inverted and reader.shape[2] == 1:
            grey = reader.level(0)[..., 0]
            return grey.map_blocks(min_is_black, p.bits_per_sample, dtype=grey.dtype)
        return None
    if not isinstance(reader, PillowReader):
        return None
    from PIL import Image, ImageOps

    with Image.open(cast(Any, reader)._file()) as img:  # Pillow's reader expands a palette
        if img.mode != "P":
            return None
        ids = np.asarray(ImageOps.exif_transpose(img))  # turned as the reader turns it
    return da.from_array(ids)


def _palette_tiff(
    path: str | os.PathLike[str], reader: Reader, what: str, orientation: int
) -> da.Array:
    import tifffile

    if orientation != 1:
        raise ValueError(
            f"{path}: {what} is a palette image stored turned (TIFF Orientation "
            f"{orientation}); save its ids as stored, or as a grey image"
        )
    ids = tifffile.imread(cast(Any, reader)._file(), series=cast(Any, reader)._series, level=0)
    return da.from_array(np.asarray(ids))
