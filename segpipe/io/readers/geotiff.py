"""GeoTIFF georeference, nodata and validity masks, read through rasterio (GDAL).

Pixels of a GeoTIFF still come through tifffile (:class:`~segpipe.io.readers.TiffReader`);
GDAL reads what tifffile does not interpret: the CRS in any form (EPSG code, custom
projection, engineering/LOCAL_CS), the affine transform, per-band nodata values, the internal
mask band (``GDAL_TIFF_INTERNAL_MASK``) and alpha bands. GDAL's overviews of a GeoTIFF are the
reduced-resolution IFDs that tifffile reads as pyramid levels 1, 2, ...
"""

from __future__ import annotations

import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import numpy as np

from segpipe.io.files import URLPath
from segpipe.io.readers.base import Georeference, ImageReadError

__all__ = ["RasterMetadata", "raster_metadata", "raster_valid_mask"]


@dataclass(frozen=True)
class RasterMetadata:
    """What GDAL knows of a raster beyond its pixels.

    ``nodata`` holds one value per band (None for a band without one), or is None when no
    band has one; ``mask_kind`` says where invalid pixels are marked: ``"nodata"``,
    ``"mask"`` (an internal or sidecar mask band), ``"alpha"`` or None (every pixel valid).
    """

    georeference: Georeference | None
    nodata: tuple[float | None, ...] | None
    mask_kind: str | None
    channel_names: tuple[str, ...] | None


@contextmanager
def _open(source: str | URLPath, level: int = 0) -> Iterator[Any]:
    import rasterio
    from rasterio.errors import NotGeoreferencedWarning, RasterioError

    kwargs: dict[str, Any] = {"overview_level": level - 1} if level > 0 else {}
    path = str(source)
    if isinstance(source, URLPath):  # GDAL reads byte ranges through fsspec, as tifffile does
        fs, path = source.filesystem()
        kwargs["opener"] = fs
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", NotGeoreferencedWarning)
            ds = rasterio.open(path, **kwargs)
    except RasterioError as exc:
        where = f" (overview for level {level})" if level else ""
        raise ImageReadError(f"{source}: GDAL cannot open the raster{where}: {exc}") from exc
    with ds:
        yield ds


def raster_metadata(source: str | URLPath) -> RasterMetadata:
    """Georeference, nodata, mask kind and band names of the raster at ``source`` (a local
    path or an fsspec URL).

    Raises
    ------
    ImageReadError
        The file does not open in GDAL, its CRS does not parse, or its transform is rotated
        or sheared, with a CRS or without (segpipe's tiles and results are north-up grids).
    """
    from rasterio.enums import ColorInterp, MaskFlags

    with _open(source) as ds:
        georeference = _georeference(ds, str(source))
        nodata = tuple(None if v is None else float(v) for v in ds.nodatavals)
        flags = {f for band in ds.mask_flag_enums for f in band}
        interp = tuple(ds.colorinterp)
        # GDAL's alpha band is "alpha" whatever its description says ("Alpha", "mask"):
        # the name is how segpipe leaves it out of what a model sees (channels_taken).
        names = tuple(
            "alpha"
            if c == ColorInterp.alpha
            else d
            or (c.name if c not in (ColorInterp.undefined, ColorInterp.gray) else f"band {i + 1}")
            for i, (d, c) in enumerate(zip(ds.descriptions, interp, strict=True))
        )
    if MaskFlags.alpha in flags:
        kind: str | None = "alpha"
    elif MaskFlags.per_dataset in flags:
        kind = "mask"
    elif MaskFlags.nodata in flags:
        kind = "nodata"
    else:
        kind = None
    has_names = any(not n.startswith("band ") for n in names)
    return RasterMetadata(
        georeference,
        nodata if any(v is not None for v in nodata) else None,
        kind,
        names if has_names else None,
    )


def raster_valid_mask(
    source: str | URLPath, level: int, y0: int, y1: int, x0: int, x1: int
) -> np.ndarray:
    """``(y1 - y0, x1 - x0)`` bool: True where level ``level`` of the raster holds data.

    GDAL's dataset mask: a pixel is invalid where the mask band or the alpha band is 0, or
    where every band holds its nodata value.
    """
    from rasterio.windows import Window

    with _open(source, level) as ds:
        mask = ds.dataset_mask(window=Window(x0, y0, x1 - x0, y1 - y0))
    return np.asarray(mask) > 0


def _georeference(ds: Any, path: str) -> Georeference | None:
    t = ds.transform
    # Refused without a CRS too: the transform still puts the pixels on a rotated grid,
    # which a north-up result would silently drop.
    if t.b != 0 or t.d != 0:
        raise ImageReadError(
            f"{path}: rotated/sheared GeoTIFF (transform {tuple(t)[:6]}) is not supported; "
            "warp it north-up first (gdalwarp)"
        )
    if ds.crs is None or t.is_identity:  # identity: GDAL's default without a geotransform
        return None
    from rasterio.errors import CRSError

    try:
        # An authority code only when it names exactly this CRS; anything else (a custom
        # projection, a local engineering CRS) travels as WKT, which keeps every parameter.
        authority = ds.crs.to_authority(confidence_threshold=100)
        crs = ":".join(authority) if authority else ds.crs.to_wkt()
    except CRSError as exc:
        raise ImageReadError(f"{path}: its CRS cannot be read ({exc})") from exc
    return Georeference(crs, (t.a, t.b, t.c, t.d, t.e, t.f))
