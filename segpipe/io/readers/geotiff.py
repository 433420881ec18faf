"""GeoTIFF georeference, nodata and validity masks, read through rasterio (GDAL).

Pixels of a GeoTIFF still come through tifffile (:class:`~segpipe.io.readers.TiffReader`);
GDAL reads what tifffile does not interpret: the CRS in any form (EPSG code, custom
projection, engineering/LOCAL_CS), the affine transform, per-band nodata values, the internal
mask band (``GDAL_TIFF_INTERNAL_MASK``) and alpha bands. GDAL's overviews of a GeoTIFF are the
reduced-resolution IFDs that tifffile reads as pyramid levels 1, 2, ...
"""

from __future__ import annotations

import math
import os
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import numpy as np

from segpipe.io.files import URLPath
from segpipe.io.readers.base import Georeference, ImageReadError

__all__ = ["RasterMetadata", "checked_transform", "raster_metadata", "raster_valid_mask"]


@dataclass(frozen=True)
class RasterMetadata:
    """What GDAL knows of a raster beyond its pixels.

    ``nodata`` holds one value per band (None for a band without one), or is None when no
    band has one; ``mask_kind`` says where invalid pixels are marked: ``"nodata"``,
    ``"mask"`` (an internal or sidecar mask band), ``"alpha"`` or None (every pixel valid).
    ``mask_shapes``: the ``(y, x)`` sizes of the TIFF's own mask pages (with ``"mask"``, when
    level 0 has one), which :func:`raster_valid_mask` takes to find the overviews without.
    ``gdal_name``: what GDAL opens the image by where it is not the file's first
    (``GTIFF_DIR:<n>:<path>``, the n-th IFD), else None. ``sidecars``: the other local files
    GDAL reads it with (a ``.msk`` mask band, an ``.aux.xml``'s nodata, a ``.tfw``).
    """

    georeference: Georeference | None
    nodata: tuple[float | None, ...] | None
    mask_kind: str | None
    channel_names: tuple[str, ...] | None
    mask_shapes: frozenset[tuple[int, int]] = frozenset()
    gdal_name: str | None = None
    sidecars: tuple[str, ...] = ()


@contextmanager
def _open(source: str | URLPath, level: int = 0, *, doing: str = "its metadata") -> Iterator[Any]:
    """The raster at ``source`` open in rasterio (``level`` > 0: that overview); whatever GDAL
    raises while it opens, or while the block reads ``doing`` (which names the level and
    window) from it, an ImageReadError naming the file."""
    import rasterio
    from rasterio._err import CPLE_BaseError
    from rasterio.errors import NotGeoreferencedWarning, RasterioError

    # GDAL's own errors (CPLE_*: a damaged directory, an unsupported BitsPerSample) reach
    # Python from properties and reads as CPLE_BaseError, which is no RasterioError; rasterio
    # has no public name for it (its own tests import it from rasterio._err).
    gdal_errors = (RasterioError, CPLE_BaseError)
    kwargs: dict[str, Any] = {"overview_level": level - 1} if level > 0 else {}
    path = str(source)
    if isinstance(source, URLPath):  # GDAL reads byte ranges through fsspec, as tifffile does
        fs, path = source.filesystem()
        kwargs["opener"] = fs
    where = f" (overview for level {level})" if level else ""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", NotGeoreferencedWarning)
            ds = rasterio.open(path, **kwargs)
    except gdal_errors as exc:
        raise ImageReadError(
            f"{source}: GDAL cannot open the raster{where} to read {doing}: {exc}"
        ) from exc
    with ds:
        try:
            yield ds
        except gdal_errors as exc:
            raise ImageReadError(
                f"{source}: GDAL cannot read {doing}; the file may be corrupt or "
                f"truncated ({_gdal_message(exc)})"
            ) from exc


def _gdal_message(exc: BaseException) -> str:
    """What GDAL said of ``exc``: rasterio's read errors say only "Read failed. See previous
    exception for details", the CPLE_* error that says why being their cause."""
    said = exc.__cause__ if exc.__cause__ is not None else exc
    return f"{type(said).__name__}: {said}"


def raster_metadata(source: str | URLPath, tif: Any, keyframe: Any) -> RasterMetadata:
    """Georeference, nodata, mask kind and band names of the raster at ``source`` (a local
    path or an fsspec URL); ``tif``: the same file, open in tifffile (the tags of the image's
    level-0 IFD, ``keyframe``, and its mask pages are read from it, not from a second open).

    GDAL reads a file's first IFD; an image in a later one (a file of several images, the
    largest not the first) is opened as ``GTIFF_DIR:<n>:<path>``.

    Raises
    ------
    ImageReadError
        The file does not open in GDAL, GDAL reads an image of another size than
        ``keyframe``'s (or cannot be pointed at it: in a SubIFD, at a URL), its CRS does
        not parse, or its transform is not
        finite, has a pixel size of 0, or is rotated or sheared, with a CRS or without
        (segpipe's tiles and results are grids of rows and columns: north-up, or south-up
        with a positive y pixel size); or GeoTIFF tags place it that GDAL makes no
        geotransform of. One placed by ground control points or RPCs reads unplaced, with a
        warning.
    """
    from rasterio.enums import ColorInterp, MaskFlags

    name = _gdal_name(source, tif, keyframe)
    with _open(name or source) as ds:
        level0 = (ds.height, ds.width)
        # the pixels are tifffile's: GDAL's placement, nodata and masks of an image of
        # another size would be another image's
        if level0 != (keyframe.imagelength, keyframe.imagewidth):
            raise ImageReadError(
                f"{source}: GDAL reads {name or 'its first image'} as {_px(level0)}, the image "
                f"read is {_px((keyframe.imagelength, keyframe.imagewidth))}: the georeference, "
                "nodata and masks are another image's; save the image as a file of its own"
            )
        georeference = _georeference(ds, source, keyframe.tags)
        own = os.path.abspath(str(source))  # a URL's sidecars are not stat'ed
        sidecars = () if isinstance(source, URLPath) else tuple(
            f for f in ds.files if os.path.abspath(f) != own and os.path.isfile(f)
        )  # fmt: skip
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
    elif ColorInterp.alpha in interp:
        # With a nodata value GDAL flags every band, the alpha too, "nodata"; the alpha band
        # still says which pixels hold data (rasterio's dataset_mask of an RGBA raster is it)
        kind = "alpha"
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
        _mask_shapes(tif, level0) if kind == "mask" else frozenset(),
        name,
        sidecars,
    )


def _px(shape: tuple[int, int]) -> str:
    return f"{shape[0]} x {shape[1]} px (Y x X)"


def _gdal_name(source: str | URLPath, tif: Any, keyframe: Any) -> str | None:
    """GDAL's name for the IFD ``keyframe`` (of ``tif``, the file at ``source``) where it is
    not the file's first (``GTIFF_DIR:<n>:<path>``, n from 1), else None; refused naming
    both images where GDAL cannot open it so."""
    index = keyframe.index
    if index == 0 and keyframe.parent is tif:
        return None
    if isinstance(index, int) and keyframe.parent is tif and not isinstance(source, URLPath):
        return f"GTIFF_DIR:{index + 1}:{source}"
    # a SubIFD has no GTIFF_DIR number; a URL's opener takes no GTIFF_DIR prefix
    with _open(source) as ds:
        first = (ds.height, ds.width)
    where, why = (
        (f"IFD {index}", "at a URL (a local copy reads)")
        if isinstance(index, int)
        else ("a SubIFD", "in a SubIFD")
    )
    raise ImageReadError(
        f"{source}: the image read, {_px((keyframe.imagelength, keyframe.imagewidth))} in "
        f"{where}, is not its first, {_px(first)}, and GDAL, which reads the georeference, "
        f"nodata and masks, cannot open it {why}; save the image as a file of its own"
    )


def raster_valid_mask(
    source: str | URLPath,
    level: int,
    y0: int,
    y1: int,
    x0: int,
    x1: int,
    mask_shapes: frozenset[tuple[int, int]] = frozenset(),
) -> np.ndarray:
    """``(y1 - y0, x1 - x0)`` bool: True where level ``level`` of the raster holds data.

    GDAL's dataset mask: a pixel is invalid where the mask band or the alpha band is 0, or
    where every band holds its nodata value. An overview without a mask of its own (the mask
    was added after the overviews were built; ``mask_shapes``: the sizes of the file's mask
    pages, :class:`RasterMetadata`'s) takes level 0's mask, sampled nearest.
    """
    from rasterio.windows import Window

    doing = f"the valid-pixel mask of level {level} at y {y0}:{y1}, x {x0}:{x1}"
    with _open(source, level, doing=doing) as ds:
        if level == 0 or not mask_shapes or (ds.height, ds.width) in mask_shapes:
            return np.asarray(ds.dataset_mask(window=Window(x0, y0, x1 - x0, y1 - y0))) > 0
        height, width = ds.height, ds.width
    with _open(source, doing=f"{doing} (from level 0's mask)") as ds:
        sy, sx = ds.height / height, ds.width / width
        window = Window(x0 * sx, y0 * sy, (x1 - x0) * sx, (y1 - y0) * sy)
        mask = ds.dataset_mask(window=window, out_shape=(y1 - y0, x1 - x0))
    return np.asarray(mask) > 0


def _mask_shapes(tif: Any, level0: tuple[int, int]) -> frozenset[tuple[int, int]]:
    """The ``(y, x)`` sizes of the TIFF's own mask pages (``tif``: open in tifffile) where
    level 0 (``level0``) has one, else none (a sidecar ``.msk`` is GDAL's to read): at open.
    An overview of another size takes level 0's mask (:func:`raster_valid_mask`), since GDAL
    then calls every pixel valid and says nothing of it (its mask flags are still level 0's)."""
    import tifffile

    pages = [p for p in tif.pages if isinstance(p, tifffile.TiffPage)]
    shapes = frozenset((p.imagelength, p.imagewidth) for p in pages if p.is_mask)
    return shapes if level0 in shapes else frozenset()


def checked_transform(
    values: Any, where: str, remedy: str
) -> tuple[float, float, float, float, float, float]:
    """The affine ``(a, b, c, d, e, f)`` of :class:`Georeference` as six finite floats with
    pixel sizes ``a`` and ``e`` not 0; else ImageReadError starting ``where`` (the file and
    the field), ending ``remedy``.

    >>> checked_transform([2, 0, 500, 0, -2, 900], "dem.tif: geotransform", "")
    (2.0, 0.0, 500.0, 0.0, -2.0, 900.0)
    """
    try:
        a, b, c, d, e, f = (float(v) for v in values)
    except (TypeError, ValueError) as exc:
        raise ImageReadError(f"{where} {values!r} is not six numbers; {remedy}") from exc
    # NaN would reach every result's coordinates, and JSON metadata as a bare NaN that
    # strict readers refuse; a pixel size of 0 puts the whole image on one line.
    if not all(math.isfinite(v) for v in (a, b, c, d, e, f)) or a == 0 or e == 0:
        raise ImageReadError(
            f"{where} {(a, b, c, d, e, f)} is not finite or has a pixel size of 0; {remedy}"
        )
    return a, b, c, d, e, f


def _georeference(ds: Any, source: str | URLPath, tags: Any) -> Georeference | None:
    from rasterio.errors import CRSError

    path = str(source)
    t = ds.transform
    # Decided from the file's tags, not from rasterio's NotGeoreferencedWarning: warning
    # filters are the process's, and other threads opening rasters change them.
    if not _placed_by_affine(ds, source, tags):
        return None
    # Refused without a CRS too: a broken transform, or one that puts the pixels on a
    # rotated grid, which a result's rows and columns would silently drop. A positive y
    # pixel size (south-up) is kept: results, coordinates and polygons follow its sign.
    # Rotation first: a 90 degree turn has pixel sizes a and e of 0, not a broken transform.
    if all(map(math.isfinite, tuple(t)[:6])) and (t.b != 0 or t.d != 0):
        raise ImageReadError(
            f"{path}: rotated/sheared GeoTIFF (transform {tuple(t)[:6]}) is not supported; "
            "warp it north-up first (gdalwarp)"
        )
    transform = checked_transform(
        tuple(t)[:6],
        f"{path}: geotransform",
        "fix or drop its georeference (gdal_edit.py -a_ullr, or -unsetgt)",
    )
    if t.is_identity:  # GDAL's default without a geotransform
        return None
    if ds.crs is None:
        warnings.warn(
            f"{path}: geotransform {transform} without a CRS: read unplaced, its results in "
            "pixels from 0; set its CRS (gdal_edit.py -a_srs) for results in map units",
            stacklevel=4,
        )
        return None
    try:
        # An authority code only when it names exactly this CRS; anything else (a custom
        # projection, a local engineering CRS) travels as WKT, which keeps every parameter.
        authority = ds.crs.to_authority(confidence_threshold=100)
        crs = ":".join(authority) if authority else ds.crs.to_wkt()
    except CRSError as exc:
        raise ImageReadError(f"{path}: its CRS cannot be read ({exc})") from exc
    return Georeference(crs, transform)


# GeoTIFF's tags that place the pixels, and what GDAL makes an affine geotransform of.
_PLACEMENT_TAGS = {
    33550: "ModelPixelScaleTag",
    33922: "ModelTiepointTag",
    34264: "ModelTransformationTag",
}


def _placed_by_affine(ds: Any, source: str | URLPath, tags: Any) -> bool:
    """Whether GDAL's geotransform of ``ds`` places its pixels: made of GeoTIFF tags GDAL
    reads so (a 16-value ModelTransformationTag, or a tiepoint of 6 values or more with a
    ModelPixelScaleTag of 2 or more), or of no tag (a world file, none). Placed by ground
    control points (tiepoints of 6 values each without such a scale) or RPCs, it is read
    unplaced, with a warning: pixels in the sensor's geometry are still an image to segment.
    Refused, naming the file and the tags, where tags place it that GDAL makes nothing of (a
    tiepoint of fewer than 6 values, or of a count no multiple of 6 without a scale; a scale
    without a tiepoint or with an x or y size of 0), which rasterio hands on as a transform
    at 0, 0 or the identity."""
    counts = {name: tags[code].count for code, name in _PLACEMENT_TAGS.items() if code in tags}
    tie, scale = counts.get("ModelTiepointTag", 0), counts.get("ModelPixelScaleTag", 0)
    # GDAL takes a scale whose x or y size is 0 for none, and the tiepoints for ground
    # control points, dropping the CRS (a NaN size it takes, and hands on)
    sizes = tuple(tags[33550].value[:2]) if scale >= 2 else ()
    is_size_0 = any(v == 0 for v in sizes)
    affine = counts.get("ModelTransformationTag") == 16 or (
        tie >= 6 and scale >= 2 and not is_size_0
    )
    gcps = not affine and tie >= 6 and tie % 6 == 0 and scale < 2
    if gcps or (not affine and ds.rpcs is not None):
        how = f"{tie // 6} ground control point(s)" if gcps else "RPCs"
        warnings.warn(
            f"{source}: placed by {how}, not by an affine geotransform: read unplaced, its "
            "results in pixels; warp it onto a grid first (gdalwarp) for results in its CRS",
            stacklevel=5,
        )
        return False
    if counts and not affine:
        listed = ", ".join(f"{name} of {n} value(s)" for name, n in counts.items())
        zero = f" (its x, y sizes {sizes} hold a 0)" if is_size_0 else ""
        raise ImageReadError(
            f"{source}: GDAL makes no geotransform of its {listed}{zero}: it takes a "
            "ModelTiepointTag of 6 values (pixel i, j, k at x, y, z) with a ModelPixelScaleTag "
            "(x, y, z sizes, x and y not 0), or a ModelTransformationTag of 16; fix them "
            "(gdal_edit.py -a_ullr) or drop them (gdal_edit.py -unsetgt)"
        )
    return True
