"""TIFF family: plain TIFF, BigTIFF, OME-TIFF, Aperio SVS and GeoTIFF, through tifffile.

Pixels come through tifffile's Zarr view of the main series (one level per pyramid level);
the pixel size from Aperio's ``MPP``, OME-XML ``PhysicalSizeX`` or the resolution tags, and a
GeoTIFF's CRS and affine from its GeoKeys.
"""

from __future__ import annotations

import math
import os
import re
import warnings
import xml.etree.ElementTree as ET
from pathlib import Path
from typing import Any, cast

import numpy as np

from segpipe.io.readers.base import DECODE_ERRORS, BaseReader, Georeference, ImageReadError
from segpipe.io.units import UM_PER_UNIT, pixel_size_of_xy, positive_or_none

__all__ = ["TIFF_SUFFIXES", "TiffReader"]

TIFF_SUFFIXES = (".tif", ".tiff", ".svs", ".btf", ".tf8", ".tf2")

# TIFF ResolutionUnit: 2 inch, 3 centimetre (baseline); 4 mm, 5 µm (DNG, tifffile).
_UM_PER_RESUNIT = {2: 25_400.0, 3: 10_000.0, 4: 1_000.0, 5: 1.0}


class TiffReader(BaseReader):
    """TIFF, BigTIFF, OME-TIFF and Aperio SVS through tifffile's Zarr view.

    The main pyramid is the series with the most level-0 pixels (in an SVS, the baseline,
    not the thumbnail, label or macro images). Tiles are decoded on demand; a level is never
    read whole.
    """

    def __init__(self, path: Path, *, pixel_size_um: float | None = None) -> None:
        super().__init__(path, pixel_size_um)
        self._tif: Any = None
        import tifffile

        try:
            self._tif = tifffile.TiffFile(self.path)
            tif = self._tif
            if not tif.series:
                raise ImageReadError(f"{self.path}: the TIFF holds no image")
            self._series = max(range(len(tif.series)), key=lambda i: math.prod(tif.series[i].shape))
            series = tif.series[self._series]
            _check_declared_data(series, os.path.getsize(self.path), self.path)
            levels = series.levels
            axes = [lv.axes for lv in levels]
            shapes = [tuple(lv.shape) for lv in levels]
            # opening each level's Zarr view reads metadata only; its chunks are the tiles
            self._native_shapes = tuple(shapes)
            chunks = [tuple(self._level_array(i).chunks) for i in range(len(levels))]
            dtype = np.dtype(series.dtype)
            file_px = _tiff_pixel_size_um(tif, self._series, self.path)
            self.georeference = _geotiff_georeference(series.pages[0], self.path)
            self._set_layout(axes, shapes, chunks, dtype)
        except ImageReadError:
            self.close()
            raise
        except (tifffile.TiffFileError, *DECODE_ERRORS) as exc:
            self.close()
            raise ImageReadError(
                f"{self.path}: not a readable TIFF (corrupt, truncated or another format): "
                f"{type(exc).__name__}: {exc}"
            ) from exc
        if self.pixel_size_um is None:
            self.pixel_size_um = file_px

    def _open_level(self, level: int) -> Any:
        import tifffile
        import zarr

        if self._tif is None:
            self._tif = tifffile.TiffFile(self.path)
        store = self._tif.series[self._series].aszarr(level=level)
        array = cast("zarr.Array", zarr.open(store, mode="r"))
        if tuple(array.shape) != self._native_shapes[level]:
            raise ImageReadError(
                f"{self.path}: level {level} reads as shape {array.shape}, expected "
                f"{self._native_shapes[level]}"
            )
        return array

    def _close_handles(self) -> None:
        if self._tif is not None:
            self._tif.close()
            self._tif = None

    def _handle_state(self) -> dict[str, Any]:
        return {"_tif": None}


def _check_declared_data(series: Any, file_size: int, path: str) -> None:
    """Refuse a TIFF whose level 0 points at no pixel data, or at data past the file's end.

    Checked from the IFDs alone (no pixel is decoded): a header may declare any size, but the
    tiles or strips it lists must exist in the file.
    """
    if 0 in series.shape:
        raise ImageReadError(f"{path}: the image is empty (shape {series.shape})")
    pages = [p for p in series.levels[0].pages if p is not None]
    offsets = [int(o) for p in pages for o in getattr(p, "dataoffsets", ())]
    counts = [int(c) for p in pages for c in getattr(p, "databytecounts", ())]
    if not counts or not any(counts):
        raise ImageReadError(
            f"{path}: declares a {'x'.join(map(str, series.shape))} image but lists no pixel "
            "data (no tile or strip byte counts); the file is truncated or its header is wrong"
        )
    end = max((o + c for o, c in zip(offsets, counts, strict=False) if c), default=0)
    if end > file_size:
        raise ImageReadError(
            f"{path}: its tiles or strips extend to byte {end:,} but the file has "
            f"{file_size:,} bytes; the file is truncated"
        )


# GeoKeys: GTRasterTypeGeoKey 2 = RasterPixelIsPoint (tiepoints name pixel centres).
_PIXEL_IS_POINT = 2


def _geotiff_georeference(page: Any, path: str) -> Georeference | None:
    """The CRS and pixel-to-CRS transform of a north-up GeoTIFF page; None without GeoTIFF
    tags. Rotated or sheared rasters (a ModelTransformation tag) are refused."""
    tags = page.geotiff_tags if getattr(page, "is_geotiff", False) else None
    if not tags:
        return None
    if "ModelTransformation" in tags:
        raise ImageReadError(
            f"{path}: rotated/sheared GeoTIFF (ModelTransformation) is not supported; "
            "warp it north-up first (gdalwarp)"
        )
    scale, tie = tags.get("ModelPixelScale"), tags.get("ModelTiepoint")
    code = tags.get("ProjectedCSTypeGeoKey") or tags.get("GeographicTypeGeoKey")
    if scale is None or tie is None or code is None:
        return None
    sx, sy = float(scale[0]), float(scale[1])
    col, row, x, y = float(tie[0]), float(tie[1]), float(tie[3]), float(tie[4])
    c, f = x - col * sx, y + row * sy
    if int(tags.get("GTRasterTypeGeoKey", 1)) == _PIXEL_IS_POINT:
        c, f = c - sx / 2, f + sy / 2
    return Georeference(f"EPSG:{int(code)}", (sx, 0.0, c, 0.0, -sy, f))


def _tiff_pixel_size_um(tif: Any, series_index: int, path: str) -> float | None:
    """Microns per pixel from Aperio MPP, OME-XML PhysicalSize, or the resolution tags."""
    first = tif.pages.first
    if tif.is_svs:
        match = re.search(r"\|\s*MPP\s*=\s*([0-9.eE+-]+)", first.description or "")
        if match:
            return positive_or_none(float(match.group(1)), path, "Aperio MPP")
    if tif.is_ome and tif.ome_metadata:
        size = _ome_xml_pixel_size_um(tif.ome_metadata, series_index, path)
        if size is not None:
            return size
    page = tif.series[series_index].keyframe
    unit_tag = page.tags.get("ResolutionUnit")
    x_tag = page.tags.get("XResolution")
    if unit_tag is None or x_tag is None:
        return None
    um_per_unit = _UM_PER_RESUNIT.get(int(unit_tag.value))
    num, den = x_tag.value
    if um_per_unit is None or num <= 0 or den <= 0:
        return None
    return um_per_unit * den / num


def _ome_xml_pixel_size_um(xml: str, image_index: int, path: str) -> float | None:
    try:
        root = ET.fromstring(xml)
    except ET.ParseError:
        warnings.warn(f"{path}: OME-XML does not parse; pixel size unknown", stacklevel=3)
        return None
    pixels = [el for el in root.iter() if el.tag.rsplit("}", 1)[-1] == "Pixels"]
    if not pixels:
        return None
    attrs = pixels[image_index if image_index < len(pixels) else 0].attrib
    sizes = {}
    for axis in "XY":
        value = attrs.get(f"PhysicalSize{axis}")
        if value is None:
            continue
        unit = attrs.get(f"PhysicalSize{axis}Unit", "µm")  # the OME schema's default
        if unit not in UM_PER_UNIT:
            warnings.warn(f"{path}: OME PhysicalSize unit {unit!r} is not a length", stacklevel=3)
            return None
        sizes[axis] = float(value) * UM_PER_UNIT[unit]
    return pixel_size_of_xy(sizes.get("X"), sizes.get("Y"), path, "OME PhysicalSize")
