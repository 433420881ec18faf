"""Scanner metadata in TIFF-based slide files: which vendor wrote the file, its pixel size, the
objective's magnification.

Each vendor keeps the pixel size somewhere else; this module reads it the way OpenSlide and
tiffslide do (their test files and ours agree, see ``tests/test_vendor_formats.py``):

=============  ==========================================================================
Aperio SVS     ``MPP = 0.499`` in the ImageDescription (µm)
Hamamatsu      NDPI: X/YResolution with ResolutionUnit centimetre; magnification in tag 65421
Leica SCN      XML ImageDescription: the image's ``view/@sizeX`` (nm) over its r=0
               ``dimension/@sizeX`` (pixels)
Philips TIFF   XML ImageDescription: the first ``DICOM_PIXEL_SPACING`` ("row col", mm)
Ventana BIF    XMP (tag 700) of the level-0 page: ``iScan/@ScanRes`` (µm)
OME-TIFF       OME-XML ``Pixels/@PhysicalSizeX`` with its unit, of the Image whose TiffData
               list the series' first IFD
any TIFF       X/YResolution with ResolutionUnit inch (finer than 10 µm: else a print
               resolution), centimetre, millimetre or micrometre
ImageJ TIFF    X/YResolution in the ``unit`` of its ImageDescription (ResolutionUnit none)
=============  ==========================================================================

Files give X and Y sizes along the stored columns and rows; where they differ the shown X's
is used (with a warning), which in an image stored on its side (TIFF Orientation 5 to 8,
shown with rows and columns swapped) is the stored Y's.

Metadata that is present but unreadable (XML that does not parse, a spacing that is not a
number) is an :class:`ImageReadError` naming the file; metadata that is absent leaves the
pixel size unknown (the resolution tags are tried next).
"""

from __future__ import annotations

import math
import posixpath
import re
import warnings
import xml.etree.ElementTree as ET
from dataclasses import dataclass, replace
from typing import Any

from segpipe.io.readers.base import ImageReadError
from segpipe.io.readers.ome_sets import has_ome_xml, local_name
from segpipe.io.units import UM_PER_UNIT, pixel_size_of_xy, positive_or_none

__all__ = ["SlideMetadata", "slide_metadata"]

# TIFF ResolutionUnit: 2 inch, 3 centimetre (baseline); 4 mm, 5 µm (DNG, tifffile).
_UM_PER_RESUNIT = {2: 25_400.0, 3: 10_000.0, 4: 1_000.0, 5: 1.0}
# Microns per pixel at 2540 dpi: no print or document scan is finer, no slide scanner coarser.
_FINEST_PRINT_UM = 10.0
# The ResolutionUnits a print or scan resolution is written in (TIFF 6.0 has no other).
_PRINT_RESUNITS = {2: "inch", 3: "centimetre"}
_NDPI_MAGNIFICATION = 65421
_XMP = 700


@dataclass(frozen=True)
class SlideMetadata:
    """What a slide file says about itself.

    ``vendor`` is one of ``"aperio"``, ``"hamamatsu"``, ``"leica"``, ``"philips"``,
    ``"ventana"``, ``"ome"`` or ``"generic-tiff"``; ``pixel_size_um`` microns per pixel at
    level 0 (None when the file does not say); ``magnification`` the scan objective (20, 40).
    """

    vendor: str
    pixel_size_um: float | None
    magnification: float | None = None


def slide_metadata(
    tif: Any, series_index: int, path: str, *, is_transposed: bool = False
) -> SlideMetadata:
    """The vendor, pixel size and magnification of series ``series_index`` of a tifffile
    ``TiffFile``; raises :class:`ImageReadError` on vendor metadata that cannot be read.

    A pixel size the vendor's metadata does not give comes from the resolution tags.
    ``is_transposed``: the image is shown with its stored rows and columns swapped (TIFF
    Orientation 5 to 8), so a size along its stored Y is the shown X's."""
    keyframe = tif.series[series_index].levels[0].keyframe
    found = _vendor_metadata(tif, series_index, keyframe, path, is_transposed)
    if found.pixel_size_um is not None:
        return found
    px = _resolution_tags_um(tif, keyframe, path, is_transposed)
    return replace(found, pixel_size_um=px)


def _vendor_metadata(
    tif: Any, series_index: int, keyframe: Any, path: str, is_transposed: bool
) -> SlideMetadata:
    if tif.is_svs:
        desc = tif.pages.first.description or ""
        mpp = _aperio_field(desc, "MPP")
        px = None if mpp is None else _number(mpp, path, "Aperio MPP")
        return SlideMetadata("aperio", px, positive_or_none(_aperio_field(desc, "AppMag")))
    if tif.is_ome and tif.ome_metadata:
        px = _ome_pixel_size_um(tif, series_index, keyframe, path, is_transposed)
        return SlideMetadata("ome", px)
    if has_ome_xml(tif):  # cut short: tifffile reads no OME-XML from it
        warnings.warn(f"{path}: OME-XML is cut short; pixel size unknown", stacklevel=3)
    if tif.is_ndpi:
        mag = keyframe.tags.valueof(_NDPI_MAGNIFICATION)
        return SlideMetadata("hamamatsu", None, positive_or_none(mag))
    if tif.is_scn:
        desc = tif.pages.first.description
        return SlideMetadata("leica", *_leica_scn(desc, series_index, path, is_transposed))
    if tif.is_philips:
        px = _philips_spacing_um(tif.philips_metadata, path, is_transposed)
        return SlideMetadata("philips", px)
    if tif.is_bif:
        return SlideMetadata("ventana", *_ventana_xmp(keyframe.tags.valueof(_XMP), path))
    return SlideMetadata("generic-tiff", None)


def _number(text: str, path: str, what: str) -> float:
    try:
        value = float(text.strip().strip('"'))
    except ValueError:
        raise ImageReadError(f"{path}: {what} {text!r} is not a number") from None
    if not (math.isfinite(value) and value > 0):
        raise ImageReadError(f"{path}: {what} {text!r} is not a positive number")
    return value


def _xml(text: str | bytes | None, path: str, what: str) -> ET.Element | None:
    if not text:
        return None
    try:
        return ET.fromstring(text)
    except ET.ParseError as exc:
        raise ImageReadError(f"{path}: the {what} does not parse as XML ({exc})") from exc


def _resolution_tags_um(tif: Any, page: Any, path: str, is_transposed: bool) -> float | None:
    """Microns per pixel from X/YResolution (pixels per unit) in ResolutionUnit, or, in a file
    ImageJ wrote (ResolutionUnit none), in the ``unit`` of its ImageDescription; of the X
    shown (YResolution's in an image stored on its side, ``is_transposed``).

    An inch or centimetre resolution coarser than :data:`_FINEST_PRINT_UM` is a document's
    print or scan resolution (72, 300, 600 dpi: photos, scans, drawings), not a microscope's
    pixel size; it leaves the pixel size unknown, with a warning."""
    unit_tag = page.tags.get("ResolutionUnit")
    unit = None if unit_tag is None else int(unit_tag.value)
    if tif.is_imagej and unit in (None, 1):
        calibration = str((tif.imagej_metadata or {}).get("unit", ""))
        um_per_unit = _imagej_um_per_unit(calibration)
        # a calibration segpipe cannot read is no uncalibrated image: say why the size is lost
        if um_per_unit is None and calibration.strip().lower() not in ("", "pixel", "pixels"):
            warnings.warn(
                f"{path}: ImageJ calibration unit {calibration!r} unknown; pixel size unknown "
                "(give it as pixel_size_um or --pixel-size)",
                stacklevel=5,
            )
    else:
        um_per_unit = _UM_PER_RESUNIT.get(unit or 0)
    if um_per_unit is None:
        return None
    per_unit = {}  # pixels per unit along the stored X and Y, as (numerator, denominator)
    for axis in "XY":
        tag = page.tags.get(f"{axis}Resolution")
        num, den = (0, 0) if tag is None else tag.value
        if num > 0 and den > 0:
            per_unit[axis] = (num, den)
    um = {axis: um_per_unit * den / num for axis, (num, den) in per_unit.items()}
    shown_x = next((a for a in ("YX" if is_transposed else "XY") if a in um), None)
    if shown_x is None:
        return None
    # only a ResolutionUnit tag's: ImageJ's calibration (unit none) is measured, any unit
    if (name := _PRINT_RESUNITS.get(unit or 0)) and um[shown_x] > _FINEST_PRINT_UM:
        num, den = per_unit[shown_x]
        warnings.warn(
            f"{path}: its resolution of {num / den:g} pixels per {name} ({um[shown_x]:.4g} µm "
            "per pixel) is a print or scan resolution, not a microscope's; pixel size unknown "
            "(give it as pixel_size_um or --pixel-size if the image has one)",
            stacklevel=5,
        )
        return None
    return _shown_pixel_size(um.get("X"), um.get("Y"), path, "TIFF X/YResolution", is_transposed)


def _shown_pixel_size(
    x: float | None, y: float | None, path: str, what: str, is_transposed: bool
) -> float | None:
    """:func:`~segpipe.io.units.pixel_size_of_xy` of ``x`` and ``y``, microns per pixel along
    the stored X and Y (``what``, in ``path``), taken along the axes shown: an image stored on
    its side (``is_transposed``: TIFF Orientation 5 to 8) shows its stored Y as X."""
    if not is_transposed:
        return pixel_size_of_xy(x, y, path, what)
    turned = f"{what} of an image stored on its side (Orientation 5 to 8: its Y shown as X)"
    return pixel_size_of_xy(y, x, path, turned)


def _imagej_um_per_unit(name: str) -> float | None:
    """Microns per ImageJ calibration unit (``micron(s)``, ``um``, ``\\u00B5m`` as ImageJ
    escapes µm, ``mm``, ``nm``, ``cm``, ``inch``); None for ``pixel`` or an unknown unit."""
    name = name.strip().replace("\\u00B5", "µ").replace("\\u00b5", "µ")
    return UM_PER_UNIT.get(name, UM_PER_UNIT.get(name.lower()))


def _aperio_field(desc: str, key: str) -> str | None:
    # Aperio's description: "Aperio Image Library v12 \r\n 46000x32914 ... |MPP = 0.4990|..."
    match = re.search(rf"\|\s*{key}\s*=\s*([^|\r\n]*)", desc)
    return None if match is None else match.group(1)


def _leica_scn(
    desc: str, series_index: int, path: str, is_transposed: bool
) -> tuple[float | None, float | None]:
    """Pixel size and objective of the SCN image that tifffile made series ``series_index``.

    tifffile makes one series per ``image`` element that lists ``pixels/dimension`` entries,
    in document order; the image's ``view`` gives its extent on the slide in nanometres.
    """
    root = _xml(desc, path, "Leica SCN ImageDescription")
    images = [] if root is None else [e for e in root.iter() if local_name(e.tag) == "image"]
    images = [im for im in images if any(local_name(e.tag) == "dimension" for e in im.iter())]
    if series_index >= len(images):
        return None, None
    image = images[series_index]
    view = next((e for e in image if local_name(e.tag) == "view"), None)
    dims = [e for e in image.iter() if local_name(e.tag) == "dimension"]
    full = [d for d in dims if d.get("r", "0") == "0" and d.get("z", "0") == "0"] or dims
    if view is None:
        return None, None
    nm_per_px: dict[str, float] = {}
    for axis in "XY":
        extent, count = view.get(f"size{axis}"), full[0].get(f"size{axis}")
        if extent is not None and count is not None:
            what = f"Leica SCN view/dimension size{axis}"
            nm_per_px[axis] = _number(extent, path, what) / _number(count, path, what)
    px = _shown_pixel_size(
        nm_per_px["X"] / 1000 if "X" in nm_per_px else None,
        nm_per_px["Y"] / 1000 if "Y" in nm_per_px else None,
        path,
        "Leica SCN pixel size",
        is_transposed,
    )
    objective = next((e.text for e in image.iter() if local_name(e.tag) == "objective"), None)
    return px, positive_or_none(objective)


def _philips_spacing_um(xml: str | None, path: str, is_transposed: bool) -> float | None:
    root = _xml(xml, path, "Philips TIFF ImageDescription")
    if root is None:
        return None
    spacing = next(
        (e.text for e in root.iter("Attribute") if e.get("Name") == "DICOM_PIXEL_SPACING"), None
    )
    if spacing is None:
        return None
    values = spacing.replace('"', " ").split()
    if len(values) != 2:
        raise ImageReadError(
            f"{path}: Philips DICOM_PIXEL_SPACING {spacing!r} is not two numbers (row, column)"
        )
    row, col = (_number(v, path, "Philips DICOM_PIXEL_SPACING") for v in values)
    what = "Philips DICOM_PIXEL_SPACING"
    return _shown_pixel_size(col * 1000, row * 1000, path, what, is_transposed)


def _ventana_xmp(xmp: bytes | str | None, path: str) -> tuple[float | None, float | None]:
    if isinstance(xmp, bytes):
        xmp = xmp.rstrip(b"\0").decode("utf-8", errors="replace")
    root = _xml(xmp, path, "Ventana BIF XMP (tag 700)")
    scan = (
        None
        if root is None
        else next((e for e in root.iter() if local_name(e.tag) == "iScan"), None)
    )
    if scan is None:
        return None, None
    res = scan.get("ScanRes")
    px = None if res is None else _number(res, path, "Ventana iScan ScanRes")
    return px, positive_or_none(scan.get("Magnification"))


def _ome_pixel_size_um(
    tif: Any, series_index: int, keyframe: Any, path: str, is_transposed: bool
) -> float | None:
    """``PhysicalSizeX/Y`` of the OME Image that is series ``series_index`` (level-0 keyframe
    ``keyframe``), in microns."""
    try:
        root = ET.fromstring(tif.ome_metadata)
    except ET.ParseError:
        warnings.warn(f"{path}: OME-XML does not parse; pixel size unknown", stacklevel=4)
        return None
    pixels = _ome_series_pixels(root, tif, series_index, keyframe)
    if pixels is None:
        return None
    attrs = pixels.attrib
    sizes = {}
    for axis in "XY":
        value = attrs.get(f"PhysicalSize{axis}")
        if value is None:
            continue
        unit = attrs.get(f"PhysicalSize{axis}Unit", "µm")  # the OME schema's default
        if unit not in UM_PER_UNIT:
            warnings.warn(f"{path}: OME PhysicalSize unit {unit!r} is not a length", stacklevel=4)
            return None
        # ImageReadError for a value that is no number: a given pixel_size_um may stand in.
        sizes[axis] = _number(value, path, f"OME PhysicalSize{axis}") * UM_PER_UNIT[unit]
    return _shown_pixel_size(
        sizes.get("X"), sizes.get("Y"), path, "OME PhysicalSize", is_transposed
    )


def _ome_series_pixels(
    root: ET.Element, tif: Any, series_index: int, keyframe: Any
) -> ET.Element | None:
    """The ``Pixels`` of the OME ``Image`` that tifffile made series ``series_index``.

    tifffile makes a series of each Image in document order but skips those it finds no pages
    for (no TiffData, IFDs past the end, pages of another shape; a set missing a file is
    refused before this, by the TIFF reader), so the i-th series need not be the i-th Image.
    The Image is the one whose TiffData list the series' level-0 keyframe (its IFD number in
    its file); only where none or several do, the ``series_index``-th Pixels (the first past
    the end).
    """
    where = (keyframe.parent.filename.lower(), keyframe.index)
    own = (tif.filename.lower(), root.get("UUID"))
    found = [
        pixels
        for image in root
        if local_name(image.tag) == "Image"
        for pixels in image
        if local_name(pixels.tag) == "Pixels"
        and any(_tiffdata_holds(d, where, own) for d in pixels if local_name(d.tag) == "TiffData")
    ]
    if len(found) == 1:
        return found[0]
    listed = [e for e in root.iter() if local_name(e.tag) == "Pixels"]
    return listed[series_index if series_index < len(listed) else 0] if listed else None


def _tiffdata_holds(data: ET.Element, where: tuple[str, Any], own: tuple[str, str | None]) -> bool:
    """Whether OME ``TiffData`` ``data`` lists IFD ``where = (file name, IFD number)``;
    ``own``: the name and OME UUID of the file whose OME-XML it is (names lower case).

    Read as tifffile reads it: ``IFD`` (0) is the first, ``PlaneCount`` or ``NumPlanes`` (1
    with an ``IFD``, else every IFD to the end) how many; a ``UUID`` child's ``FileName``
    names another file of the set, unless that UUID is the OME's own."""
    file, ifd = where
    uuid = next((e for e in data if local_name(e.tag) == "UUID"), None)
    name = own[0]
    if uuid is not None and uuid.text != own[1] and uuid.get("FileName"):
        name = posixpath.basename(str(uuid.get("FileName")).replace("\\", "/")).lower()
    try:
        first = int(data.get("IFD", 0))
        count = int(data.get("PlaneCount", data.get("NumPlanes", 1 if "IFD" in data.attrib else 0)))
    except ValueError:  # tifffile could not read it either
        return False
    # a SubIFD's index is a tuple: no TiffData lists it
    in_range = isinstance(ifd, int) and first <= ifd and (not count or ifd < first + count)
    return name == file and in_range
