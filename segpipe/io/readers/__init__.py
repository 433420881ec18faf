"""Lazy image readers behind one small protocol, :class:`Reader`.

One reader per container: TIFF (plain, BigTIFF, OME-TIFF, GeoTIFF, and the TIFF-based slides:
Aperio SVS, Hamamatsu NDPI, Leica SCN, Philips TIFF, Ventana BIF) through tifffile's Zarr view,
with GeoTIFF georeference, nodata and masks from rasterio; Zarr v3 / OME-Zarr 0.5 through zarr;
and small PNG/JPEG through Pillow. Each one knows
its file's axis letters and hands them to :func:`segpipe.geometry.pixels.to_yxc`, so every
reader gives ``(Y, X, C)`` pixels in the file's own dtype.

Readers are shipped to Dask worker processes: they pickle as their path and parameters and
re-open the file on first use after unpickling (tifffile and Pillow handles cannot be pickled).

>>> reader = open_image("slide.svs")  # doctest: +SKIP
>>> reader.shape, reader.pixel_size_um  # doctest: +SKIP
((300, 517, 3), 0.499)
>>> reader.read(0, 256, 0, 256).shape  # doctest: +SKIP
(256, 256, 3)
"""

from __future__ import annotations

import errno
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from segpipe.io.files import location
from segpipe.io.readers.array import ArrayReader
from segpipe.io.readers.base import (
    Georeference,
    ImageReadError,
    Reader,
    read_mirrored,
)
from segpipe.io.readers.dicom import DICOM_SUFFIXES, DicomReader, is_dicom_file, is_dicom_folder
from segpipe.io.readers.masks import valid_mask
from segpipe.io.readers.omezarr import ZARR_SUFFIXES, ZarrReader
from segpipe.io.readers.openslide import OPENSLIDE_SUFFIXES, OpenSlideReader
from segpipe.io.readers.pillow import MAX_PILLOW_PIXELS, PILLOW_SUFFIXES, PillowReader
from segpipe.io.readers.tiff import TIFF_SUFFIXES, TiffReader
from segpipe.io.units import check_pixel_size

__all__ = [
    "DICOM_SUFFIXES",
    "IMAGE_SUFFIXES",
    "MAX_PILLOW_PIXELS",
    "OPENSLIDE_SUFFIXES",
    "PILLOW_SUFFIXES",
    "TIFF_SUFFIXES",
    "ZARR_SUFFIXES",
    "ArrayReader",
    "DicomReader",
    "Georeference",
    "ImageReadError",
    "OpenSlideReader",
    "PillowReader",
    "Reader",
    "TiffReader",
    "ZarrReader",
    "open_image",
    "read_mirrored",
    "valid_mask",
]

# Files a folder or archive holds as images (Zarr stores are directories, found by path).
IMAGE_SUFFIXES = TIFF_SUFFIXES + OPENSLIDE_SUFFIXES + PILLOW_SUFFIXES


def open_image(
    path: str | os.PathLike[str],
    *,
    pixel_size_um: float | None = None,
    storage_options: Mapping[str, Any] | None = None,
) -> Reader:
    """Open an image lazily, choosing the reader from the path.

    Parameters
    ----------
    path
        ``.tif``/``.tiff``/``.ome.tif``/``.btf`` (TIFF, BigTIFF, OME-TIFF, GeoTIFF, Philips
        TIFF), ``.svs`` (Aperio), ``.ndpi`` (Hamamatsu), ``.scn`` (Leica), ``.bif`` (Ventana),
        ``.mrxs``/``.vms``/``.vmu``/``.svslide`` through OpenSlide (``segpipe[slides]``),
        a DICOM WSI file (``.dcm`` or without extension; its series is read) or a folder of
        one series through wsidicom (``segpipe[dicom]``),
        a Zarr v3 store (a directory, usually ``.zarr``: an OME-Zarr 0.5 image or a plain
        array with ``dimension_names``), or a small ``.png``/``.jpg``.
    pixel_size_um
        Microns per pixel at level 0; overrides what the file says (> 0).
    storage_options
        fsspec options (endpoint, credentials) for a ``path`` that is a URL
        (``s3://bucket/a.svs``). A URL is read by byte ranges as tiles are needed, never
        downloaded whole (PNG/JPEG, decoded whole anyway, are read whole).

    Returns
    -------
    Reader
        Picklable; opens the file again in each process that unpickles it.

    Raises
    ------
    ImageReadError
        Naming the path: missing file, unknown format, corrupt file, unreadable scanner or
        GeoTIFF metadata, a stack (Z or T > 1), an unsupported dtype, a Pillow image too large
        to hold in memory.
    ValueError
        ``pixel_size_um`` not a positive number.
    """
    if pixel_size_um is not None:
        pixel_size_um = check_pixel_size(pixel_size_um, "pixel_size_um")
    p = location(path, storage_options)
    if not p.exists():
        if isinstance(p, Path) and p.is_symlink():  # a link's target gone, or a loop
            why = "a symbolic link loop" if _loops(p) else "a symbolic link to nothing"
            raise ImageReadError(f"{p}: {why} ({os.readlink(p)})")
        raise ImageReadError(f"{p}: no such file or directory")
    if isinstance(p, Path):
        _check_readable(p)
    name = p.name.lower()
    if name.endswith(DICOM_SUFFIXES) or (isinstance(p, Path) and is_dicom_folder(p)):
        return DicomReader(p, pixel_size_um=pixel_size_um)
    if p.is_dir() or name.endswith(ZARR_SUFFIXES):
        return ZarrReader(p, pixel_size_um=pixel_size_um)
    if name.endswith(TIFF_SUFFIXES):
        return TiffReader(p, pixel_size_um=pixel_size_um)
    if name.endswith(OPENSLIDE_SUFFIXES):
        return OpenSlideReader(p, pixel_size_um=pixel_size_um)
    if name.endswith(PILLOW_SUFFIXES):
        return PillowReader(p, pixel_size_um=pixel_size_um)
    if isinstance(p, Path) and is_dicom_file(p):  # DICOM media name files without extension
        return DicomReader(p, pixel_size_um=pixel_size_um)
    raise ImageReadError(
        f"{p}: unknown image format {p.suffix!r}; segpipe reads "
        f"{', '.join(IMAGE_SUFFIXES + ZARR_SUFFIXES)} "
        f"(convert others to a tiled pyramidal OME-TIFF, e.g. with bfconvert or vips)"
    )


def _loops(path: Path) -> bool:
    try:
        path.resolve(strict=True)
    except RuntimeError:  # Python < 3.13
        return True
    except OSError as exc:
        return exc.errno == errno.ELOOP
    return False


def _check_readable(path: Path) -> None:
    """ImageReadError naming ``path`` where this user may not read it (a file; a folder's
    listing and its ``zarr.json``): each reader called it corrupt or truncated."""
    try:
        if path.is_dir():
            os.listdir(path)
            path = path / "zarr.json"
        if path.exists():
            open(path, "rb").close()
    except PermissionError as exc:
        raise ImageReadError(f"{path}: permission denied: this user may not read it") from exc
