"""TIFF family through tifffile: plain TIFF, BigTIFF, OME-TIFF, GeoTIFF and the TIFF-based
slide formats (Aperio SVS, Hamamatsu NDPI, Leica SCN, Philips TIFF, Ventana BIF).

Pixels come through tifffile's Zarr view of the main series (one level per pyramid level),
as viewers show them (:mod:`segpipe.io.readers.photometric`: a palette expanded to RGB,
min-is-white grey inverted, colour premultiplied by an associated alpha divided by it, CMYK and
other colour spaces refused; every level turned as level 0's Orientation tag says, a window at a
time);
the vendor, pixel size and magnification from :mod:`segpipe.io.readers.vendor`; a GeoTIFF's
CRS, affine, nodata and masks from GDAL (:mod:`segpipe.io.readers.geotiff`). Any other TIFF's
alpha sample (ExtraSamples: associated or unassociated alpha) is the channel named ``"alpha"``,
and a pixel where it is 0 holds no data, as GDAL reads it in a GeoTIFF.

A TIFF that goes through GDAL is refused if its Orientation is not 1: GDAL, and the GIS viewers
on it, place the stored rows and columns by the georeference and ignore the tag. A damaged or
lying structure (a looping or truncated chain of IFDs, tiles missing, sizes no image has) is
refused at open by :mod:`segpipe.io.readers.tiff_checks`; a multi-file OME-TIFF set missing a
file, or whose files are not the set's, by :mod:`segpipe.io.readers.ome_sets`.
"""

from __future__ import annotations

import math
import warnings
import xml.etree.ElementTree as ET
from dataclasses import replace
from pathlib import Path
from typing import Any, cast

import numpy as np

from segpipe.io.files import URLPath, changed_file, file_state
from segpipe.io.readers.base import DECODE_ERRORS, BaseReader, ImageReadError
from segpipe.io.readers.geotiff import raster_metadata, raster_valid_mask
from segpipe.io.readers.masks import check_per_channel
from segpipe.io.readers.ome_planes import check_ome_planes, file_open
from segpipe.io.readers.ome_sets import check_ome_set, has_ome_xml, named_files, pixels_sizes
from segpipe.io.readers.photometric import (
    ALPHA_SAMPLES,
    Photometric,
    level_photometric,
    stated_orientation,
)
from segpipe.io.readers.tiff_checks import (
    check_declared_data,
    check_ifd_chain,
    check_level_samples,
    guard_jpeg_frames,
)
from segpipe.io.readers.tiff_tags import check_tag_values
from segpipe.io.readers.vendor import SlideMetadata, slide_metadata

__all__ = ["TIFF_SUFFIXES", "TiffReader"]

# .svs Aperio, .ndpi Hamamatsu, .scn Leica, .bif Ventana; Philips writes .tiff
TIFF_SUFFIXES = (".tif", ".tiff", ".svs", ".ndpi", ".scn", ".bif", ".btf", ".tf8", ".tf2")

# GDAL writes nodata as this private tag; a TIFF with it, GeoKeys or an affine without a CRS
# (ModelPixelScale, ModelTiepoint, ModelTransformation) goes through GDAL too.
_GDAL_TAGS = (42113, 33550, 33922, 34264, 50844)  # and RPCs (50844): refused there
# Series that scanners write beside the slide (tifffile's names for them)
_VENDOR_EXTRAS = ("thumbnail", "label", "macro", "map", "overview", "mask")
# Series whose names are the user's (an OME Image's, tifffile's shaped metadata): a
# microscope's "overview" scan may be the image.
_USER_NAMED = ("ome", "shaped", "generic", "uniform", "imagej")


def _vendor_extra(series: Any) -> bool:
    """Whether ``series`` is an image a scanner adds beside a slide (its thumbnail, label)."""
    return series.kind not in _USER_NAMED and series.name.lower() in _VENDOR_EXTRAS


class TiffReader(BaseReader):
    """TIFF, BigTIFF, OME-TIFF, GeoTIFF and TIFF-based slides through tifffile's Zarr view.

    The main pyramid is the series with the most level-0 pixels (in an SVS, the baseline,
    not the thumbnail, label or macro images; in an NDPI not the macro or map; in an SCN the
    scanned region, not the macro image of the whole slide); other images it leaves out are
    warned of. Tiles are decoded on demand; a level is never read whole. Levels, their shapes
    and windows are as viewers show the image: a TIFF stored on its side (Orientation 5 to 8)
    has its rows and columns swapped.
    """

    def __init__(self, path: Path | URLPath, *, pixel_size_um: float | None = None) -> None:
        super().__init__(path, pixel_size_um)
        self._tif: Any = None
        self._gdal_name: str | None = None  # GDAL's name for the image, if not the file's
        import tifffile

        try:
            self._tif = tifffile.TiffFile(self._file())
            tif, size = self._tif, self._file_size()
            check_ifd_chain(tif, size, self.path)  # before tifffile walks it
            check_ome_planes(tif, size, self.path)  # before tifffile lists them
            if not tif.series:
                raise ImageReadError(f"{self.path}: the TIFF holds no image")
            check_ome_set(tif, self.path)
            self._series = _main_series(tif, self.path)
            series = tif.series[self._series]
            check_level_samples(series, self.path)
            # An OME-TIFF set's other files, as the file itself: a worker's copy (pickled)
            # refuses one rewritten since (it read the new pixels, its Dask token unchanged).
            files = {str(p.parent.filehandle.path) for lv in series.levels for p in lv.pages
                     if p is not None and p.parent is not tif}  # fmt: skip
            self._companions = {} if self.url else {f: file_state(f) for f in sorted(files)}
            check_declared_data(series, size, self.path)
            check_tag_values(tif, size, self.path)
            # tifffile's fallback: not a kind it reads first (shaped, Micro-Manager). It gave
            # up on the OME-XML and listed plain pages (of a renamed file, or TiffData past
            # its IFDs, still the image the OME-XML describes)
            is_damaged_ome = has_ome_xml(tif) and series.kind in ("generic", "uniform")
            levels = series.levels
            turn = _orientation(levels, self.path)
            self._photometric = tuple(
                replace(level_photometric(lv.keyframe, self.path, k), orientation=turn)
                for k, lv in enumerate(levels)
            )
            axes, shapes, dtype = _pixel_layout(levels, self._photometric, self.path)
            # opening each level's Zarr view reads metadata only; its chunks are the tiles
            self._native_shapes = tuple(shapes)
            with self._lock:
                chunks = [tuple(self._level_array(i).chunks) for i in range(len(levels))]
            try:
                # Orientation 5 to 8: stored on its side, its stored Y shown as X
                slide = slide_metadata(tif, self._series, self.path, is_transposed=turn >= 5)
            except ImageReadError as exc:
                if self.pixel_size_um is None:
                    raise ImageReadError(
                        f"{exc}; give the pixel size yourself (pixel_size_um, --pixel-size) "
                        "to read the image anyway"
                    ) from exc
                warnings.warn(f"{exc}; using pixel_size_um={self.pixel_size_um}", stacklevel=3)
                slide = SlideMetadata("unknown", None)
            self.vendor, self.magnification = slide.vendor, slide.magnification
            file_px = slide.pixel_size_um
            first = series.levels[0].keyframe
            photometric = self._photometric[0]
            if getattr(first, "is_geotiff", False) or any(t in first.tags for t in _GDAL_TAGS):
                if turn != 1:
                    raise ImageReadError(
                        f"{self.path}: a GeoTIFF (GDAL's tags) with Orientation {turn} (TIFF "
                        "tag 274): GDAL and GIS viewers place its stored rows and columns by "
                        "its georeference, ignoring the tag, while image viewers turn it; "
                        "segpipe will not guess which is meant. Rewrite it without the tag "
                        "(gdal_translate in.tif out.tif writes it as GDAL reads it) or turned "
                        "and with Orientation 1"
                    )
                raster = raster_metadata(self.url or self.path, tif, first)
                self._gdal_name = raster.gdal_name
                self.georeference, self.nodata = raster.georeference, raster.nodata
                self.mask_kind, self.channel_names = raster.mask_kind, raster.channel_names
                self._mask_shapes, self.sidecars = raster.mask_shapes, raster.sidecars
                if self.georeference is not None:
                    self.vendor = "geotiff"
                if self.mask_kind == "nodata" and not photometric.is_as_stored:
                    # GDAL's nodata is a stored value (an index, white as 0); the pixels
                    # given out are not, so GDAL's dataset mask says which hold data.
                    self.nodata, self.mask_kind = None, "mask"
            elif (names := _alpha_channel_names(first, axes[0])) is not None:
                self.mask_kind, self.channel_names = "alpha", names
            if photometric.palette is not None:
                self.channel_names = ("red", "green", "blue")
            try:
                self._set_layout(axes, shapes, chunks, dtype)
            except ImageReadError as exc:
                if not is_damaged_ome:
                    raise
                # no stack, however the pages are then laid out
                why = str(exc).removeprefix(f"{self.path}: ")
                raise _damaged_ome_xml(self.path, why) from exc
            # Level 0's size tag damaged: its reduced level the largest page, read at level 0's
            # pixel size
            yx = (str(series.keyframe.imagelength), str(series.keyframe.imagewidth))
            if is_damaged_ome and yx not in _ome_image_sizes(tif.ome_metadata, default={yx}):
                read = _series_text(self._series, series)
                raise _damaged_ome_xml(
                    self.path,
                    f"the largest, {read}, is of no size an OME Image has: a reduced level or "
                    "another image; restore the file from a copy as written",
                )
            # GDAL's view of a file tifffile reads otherwise (an OME series of channels) has
            # its own band count: its values would be matched to the wrong channels.
            check_per_channel(
                self.path,
                self.level_shapes[0][2],
                [("GDAL gives {n} nodata values", self.nodata),
                 ("GDAL gives {n} band names", self.channel_names)],
                "GDAL sees another image of the file; rewrite it with GDAL (gdal_translate) "
                "or without GDAL's tags",
            )  # fmt: skip
        except ImageReadError:
            self.close()
            raise
        except (tifffile.TiffFileError, SyntaxError, NotImplementedError, *DECODE_ERRORS) as exc:
            # tifffile raises on some files of an OME-TIFF set as it lists the set's planes
            others = "" if self._tif is None else ", ".join(map(repr, named_files(self._tif)))
            either = f", or a file of its OME-TIFF set ({others}) is not" if others else ""
            self.close()
            raise ImageReadError(
                f"{self.path}: not a readable TIFF{either} (corrupt, truncated or another "
                f"format): {type(exc).__name__}: {exc}"
            ) from exc
        if self.pixel_size_um is None:
            self.pixel_size_um = file_px

    def _open_level(self, level: int) -> Any:
        import tifffile
        import zarr

        if self._tif is None:
            self._tif = tifffile.TiffFile(self._file())
            if (changed := changed_file(self._companions)) is not None:
                raise ImageReadError(
                    f"{changed}, a file of the OME-TIFF set {self.path}, changed since it was "
                    "opened; run again"
                )
        series = self._tif.series[self._series]
        # Segments worth a thread (tifffile's own rule: compressed, not tiny) are decoded in
        # zarr's thread pool, not in zarr's one event-loop thread, where tifffile decodes them
        # on machines of under 6 cores: there every I/O thread's reads took turns (32 windows
        # of 1116^2 from 2 threads of a deflate OME-TIFF: 0.52 s of one core, 0.45 s over
        # two). Read-only whatever the file handle says (an fsspec memory file claims writable).
        threads = {"maxworkers": 2} if series.levels[level].keyframe.maxworkers > 0 else {}
        # tifffile picks a JPEG level's decoder as it first decodes, looking into its first tile
        # through its file's handle, which it closed for a set's other files: open it for that
        for page in {id(p.keyframe): p.keyframe for p in series.levels[level].pages if p}.values():
            with file_open(page):
                guard_jpeg_frames(page)  # builds the decoder (a cached property)
        store = series.aszarr(level=level, read_only=True, **threads)
        stored = cast("zarr.Array", zarr.open(store, mode="r"))
        array = self._photometric[level].view(stored, series.levels[level].axes)
        if tuple(array.shape) != self._native_shapes[level]:
            raise ImageReadError(
                f"{self.path}: level {level} reads as shape {array.shape}, expected "
                f"{self._native_shapes[level]}"
            )
        return array

    def _token(self) -> tuple[Any, ...]:
        # As the file's own: now, so that a set rewritten since names other chunks.
        return (*super()._token(), *((f, file_state(f)) for f in self._companions))

    def photometric(self, level: int = 0) -> Photometric:
        """How ``level``'s stored samples become its pixels (min-is-white grey inverted, a
        palette expanded, ...): what a reader of stored values undoes."""
        self._check_level(level)
        return self._photometric[level]

    def valid_mask(self, y0: int, y1: int, x0: int, x1: int, level: int = 0) -> np.ndarray | None:
        """``(y1 - y0, x1 - x0)`` bool, True where the window holds data: the mask band, else
        the alpha band (GDAL's colour interpretation, beside a nodata value too, where GDAL's
        own mask of a grey + alpha raster is the nodata's), else all bands at nodata; None
        without any of them.

        Nodata and alpha follow from the pixels (tifffile reads them ten times faster than
        a GDAL open per window); a mask band is read through GDAL."""
        if self.mask_kind != "mask":
            return super().valid_mask(y0, y1, x0, x1, level)
        self._check_level(level)
        source = self._gdal_name or self.url or self.path
        return raster_valid_mask(source, level, y0, y1, x0, x1, self._mask_shapes)

    def _handle_state(self) -> dict[str, Any]:
        return {"_tif": None}


def _damaged_ome_xml(path: str, why: str) -> ImageReadError:
    """The error for an OME-TIFF whose OME-XML tifffile gave up on, listing plain pages."""
    return ImageReadError(
        f"{path}: its OME-XML does not describe its images (sizes, channels or planes at odds "
        f"with the TIFF tags: the metadata is damaged); read as plain TIFF pages instead, {why}"
    )


def _ome_image_sizes(xml: str | None, *, default: set[tuple[str, str]]) -> set[tuple[str, str]]:
    """``(SizeY, SizeX)`` of each OME ``Pixels`` in ``xml``, as written; ``default`` where it
    does not parse (the pixel size is then warned of as unknown)."""
    try:
        root = ET.fromstring(xml or "")
    except ET.ParseError:
        return default
    return set(pixels_sizes(root))


def _main_series(tif: Any, path: str) -> int:
    """Index of the series of ``tif`` with the most level-0 pixels (Y x X; of two alike, the
    one with more samples, channels or planes), passing over transparency masks (GDAL's
    internal mask band is a series of its own, as large as the image) and the images a
    scanner adds beside the slide (thumbnail, label, macro, map, overview). Refused where one
    of several series has a size of 0, or an SVS's baseline is smaller than its thumbnail: a
    damaged file.

    Other images left out are warned of, naming them, unless a scanner or GDAL adds them
    beside every slide (thumbnail, label, macro, map, overview, mask)."""
    series = tif.series
    # tifffile drops a size tag it cannot read (ImageWidth 0): passed over, that image's
    # reduced level, or another image, would be read as the whole (a lone image's emptiness
    # is refused as it is laid out)
    for i, s in enumerate(series if len(series) > 1 else ()):
        for k, lv in enumerate(s.levels):
            if 0 in lv.shape:
                level = f" level {k} ({'x'.join(map(str, lv.shape))})" if k else ""
                raise ImageReadError(
                    f"{path}: {_series_text(i, s)}{level} is empty: a size tag (ImageWidth, "
                    "ImageLength, SamplesPerPixel) is damaged; the file cannot be read as it is"
                )
    images = [i for i, s in enumerate(series) if not s.keyframe.is_mask] or list(range(len(series)))
    # A slide's size tag damaged to a few rows made its thumbnail or macro the largest: read
    # as the slide, at the slide's pixel size.
    images = [i for i in images if not _vendor_extra(series[i])] or images
    if tif.is_svs and (thumbs := [s for s in series if s.name.lower() == "thumbnail"]):
        base, thumb = series[0], thumbs[0]  # tifffile's SVS series: Baseline first
        if any(b < t for b, t in zip(_plane_yx(base), _plane_yx(thumb), strict=True)):
            raise ImageReadError(
                f"{path}: the SVS's {_series_text(0, base)} is smaller than its "
                f"{_series_text(series.index(thumb), thumb)}, a reduction of it: a size tag "
                "(ImageWidth, ImageLength) of the slide is damaged; the file cannot be read "
                "as it is"
            )
    # samples, channels and Z planes are no pixels: a 600 x 600 RGB image is smaller than a
    # 1000 x 1000 grey one
    main = max(images, key=lambda i: (_plane_pixels(series[i]), math.prod(series[i].shape)))
    left = [
        i
        for i, s in enumerate(series)
        if i != main and not s.keyframe.is_mask and s.name.lower() not in _VENDOR_EXTRAS
    ]
    # A reduced-resolution image out of the pyramid's order (a second gdaladdo run appends
    # its overviews after the first's) is no other image: its own series, left out.
    overviews = [_series_text(i, series[i]) for i in left if series[i].keyframe.is_reduced]
    others = [_series_text(i, series[i]) for i in left if not series[i].keyframe.is_reduced]
    if overviews:
        warnings.warn(
            f"{path}: leaving out the overview{'s' if len(overviews) > 1 else ''} "
            f"{', '.join(overviews)}, stored out of the pyramid's order (as overviews added by "
            "a second gdaladdo run are); rebuild them in one run (gdaladdo -clean, then "
            "gdaladdo with every factor) for segpipe to read them",
            stacklevel=4,
        )
    if others:
        warnings.warn(
            f"{path}: holds {len(others) + 1} images; reading the largest, "
            f"{_series_text(main, series[main])}, and leaving out {', '.join(others)}; to read "
            "one of those, save it as a file of its own",
            stacklevel=4,
        )
    return main


def _plane_yx(series: Any) -> tuple[int, int]:
    """``(Y, X)`` pixels of ``series``' level 0."""
    sizes = dict(zip(series.axes, series.shape, strict=False))
    return int(sizes.get("Y", 1)), int(sizes.get("X", 1))


def _plane_pixels(series: Any) -> int:
    """Y x X pixels of ``series``' level 0."""
    return math.prod(_plane_yx(series))


def _series_text(index: int, series: Any) -> str:
    name = f" {series.name!r}" if series.name else ""
    return f"series {index}{name} ({'x'.join(map(str, series.shape))})"


def _orientation(levels: list[Any], path: str) -> int:
    """The Orientation (TIFF tag 274, 1 to 8) of every level: level 0's, which a reduced
    level without the tag shares (the levels are one image, reduced); a value outside 1 to 8
    is 1 (libtiff refuses it and keeps its default, 1). Refused when a reduced level states
    another."""
    turn = stated_orientation(levels[0].keyframe) or 1
    for k, level in enumerate(levels[1:], 1):
        if (own := stated_orientation(level.keyframe)) not in (None, turn):
            raise ImageReadError(
                f"{path}: level {k} states Orientation {own} (TIFF tag 274), level 0 {turn}; "
                "a pyramid's levels are one image turned one way: rewrite the file with the "
                "levels stored alike"
            )
    return turn


def _pixel_layout(
    levels: list[Any], photometric: tuple[Photometric, ...], path: str
) -> tuple[list[str], list[tuple[int, ...]], np.dtype[Any]]:
    """Axes and shape of each level's pixels (a palette's RGB included), and their dtype;
    refused when a level's pixels come out in another dtype than level 0's, naming the file
    of an OME-TIFF set that holds the level."""
    axes, shapes, dtypes = [], [], []
    for lv, p in zip(levels, photometric, strict=True):
        ax, shape, _, dtype = p.layout(lv.axes, tuple(lv.shape), (), np.dtype(lv.dtype))
        axes.append(ax)
        shapes.append(shape)
        dtypes.append(dtype)
    for k, dtype in enumerate(dtypes):
        if dtype != dtypes[0]:  # a palette level beside an RGB one, say
            held = levels[k].keyframe.parent
            where = "" if held is levels[k].parent else f" (stored in {held.filehandle.path})"
            raise ImageReadError(
                f"{path}: level {k}{where} reads as {dtype} pixels, level 0 as {dtypes[0]}"
            )
    return axes, shapes, dtypes[0]


def _alpha_channel_names(page: Any, axes: str) -> tuple[str, ...] | None:
    """A name per sample of ``page`` (``"alpha"`` for the first extra sample that is one, as
    GDAL takes it), or None without an alpha sample."""
    extra = [int(e) for e in page.extrasamples]
    alphas = [i for i, e in enumerate(extra) if e in ALPHA_SAMPLES]
    if "S" not in axes or not alphas:
        return None
    n = int(page.samplesperpixel)
    colour = n - len(extra)
    names = [f"band {i + 1}" for i in range(n)]
    if page.photometric == 2 and colour == 3:  # RGB
        names[:3] = ["red", "green", "blue"]
    elif page.photometric in (0, 1) and colour == 1:  # grey: min-is-white or min-is-black
        names[0] = "grey"
    names[colour + alphas[0]] = "alpha"
    return tuple(names)
