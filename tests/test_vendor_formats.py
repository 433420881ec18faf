"""Scanner formats read through segpipe.io.readers: NDPI, Leica SCN, Philips TIFF, Ventana BIF,
and which OME Image an OME-TIFF's pixel size comes from.

Each test writes a small slide with tifffile, laid out and tagged as the vendor's scanners do,
and reads it back against the pixels written and the pixel size written; OpenSlide and tiffslide
(the maintained readers of these formats) read the same files as independent references.
"""

from __future__ import annotations

import struct
import warnings
import xml.etree.ElementTree as ET
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import tifffile
import zarr

from segpipe.io.describe import describe_image
from segpipe.io.readers import ImageReadError, open_image

SHAPE = (256, 384)
KW = {"photometric": "rgb", "compression": "zlib", "metadata": None}


def _image() -> np.ndarray:
    """Smooth (256, 384, 3) uint8 gradients (JPEG keeps them within a grey level or two)."""
    yy, xx = np.mgrid[: SHAPE[0], : SHAPE[1]]
    return np.stack([yy, xx * 0.6, (yy + xx) * 0.3], axis=-1).astype(np.uint8)


# --- writers ---------------------------------------------------------------------------------


def to_ndpi_layout(src: Path, dst: Path) -> Path:
    """Rewrite a little-endian classic TIFF in NDPI's layout.

    NDPI is classic TIFF with 64-bit offsets: the header's first-IFD offset and each IFD's
    next-IFD offset take 8 bytes, and every IFD is followed by the high 32 bits of each tag's
    value or offset. Under 4 GB all high bits are 0, so each IFD is copied to the end with that
    zero block after it and the offsets are re-pointed; pixel data stays where it is.
    """
    data = bytearray(src.read_bytes())
    assert data[:4] == b"II*\x00"
    ifds, offset = [], struct.unpack_from("<I", data, 4)[0]
    while offset:
        n = struct.unpack_from("<H", data, offset)[0]
        ifds.append(bytes(data[offset : offset + 2 + 12 * n]))
        offset = struct.unpack_from("<I", data, offset + 2 + 12 * n)[0]
    assert struct.unpack_from("<I", data, 4)[0] == 8  # the old first IFD (now unused) at byte 8
    data[8:12] = bytes(4)  # high bits of the first-IFD offset
    pointer = 4
    for ifd in ifds:
        n = struct.unpack_from("<H", ifd)[0]
        data += bytes(len(data) % 2)  # IFDs start on a word boundary
        struct.pack_into("<I", data, pointer, len(data))
        pointer = len(data) + 2 + 12 * n
        data += ifd + bytes(8) + bytes(4 * n)
    dst.write_bytes(bytes(data))
    return dst


def write_ndpi(path: Path, img: np.ndarray, mpp: float = 0.4527, *, jpeg: bool = False) -> Path:
    """Hamamatsu NDPI: baseline and one reduced level as separate IFDs with NDPI's private tags
    (FileFormat 65420, Magnification 65421, slide-centre offsets), resolution in pixels per cm,
    and a macro image (magnification -1). ``jpeg``: one JPEG strip per level, as scanners write
    and as OpenSlide requires."""
    levels = [img, img[::2, ::2], img[::8, ::8]]  # baseline, reduced, macro
    classic = path.with_suffix(".classic.tif")
    with tifffile.TiffWriter(classic) as tif:
        for k, (level, mag) in enumerate(zip(levels, [20.0, 10.0, -1.0], strict=True)):
            ndpi = [(65420, "I", 1, 1, True), (65421, "f", 1, mag, True)]
            ndpi += [(code, "i", 1, 0, True) for code in (65422, 65423, 65424)]
            per_cm = 1e4 / (mpp * 2**k) if mag > 0 else 1e4 / (mpp * 8)
            layout = (
                {"rowsperstrip": level.shape[0], "compression": "jpeg"}
                if jpeg
                else {"tile": (64, 64), "compression": "zlib"}
            )
            tif.write(
                level,
                photometric="rgb",
                metadata=None,
                resolution=(per_cm, per_cm),
                resolutionunit="CENTIMETER",
                extratags=[*ndpi, (271, "s", 0, "Hamamatsu", True)],
                **layout,
            )
    to_ndpi_layout(classic, path)
    classic.unlink()
    return path


def scn_xml(nm_per_px: float = 500.0, *, objective: str = "20") -> str:
    """Leica SCN collection: a macro image of the whole slide (IFD 0) and one scanned region
    (IFDs 1, 2) whose view is 384 x 256 pixels of ``nm_per_px`` nanometres."""
    w, h = int(SHAPE[1] * nm_per_px), int(SHAPE[0] * nm_per_px)
    device = '<device model="Leica SCN400;Leica SCN" version="1.5"/>'

    def settings(obj: str, na: float) -> str:
        return (
            f"<scanSettings><objectiveSettings><objective>{obj}</objective></objectiveSettings>"
            f"<illuminationSettings><numericalAperture>{na}</numericalAperture>"
            "<illuminationSource>brightfield</illuminationSource></illuminationSettings>"
            "</scanSettings>"
        )

    return f"""<?xml version="1.0" encoding="utf-8"?>
<scn xmlns="http://www.leica-microsystems.com/scn/2010/10/01">
 <collection name="segpipe" uuid="1" sizeX="{2 * w}" sizeY="{2 * h}">
  <image name="macro" uuid="2"><creationDate>2026-11-29T00:00:00.00Z</creationDate>{device}
   <pixels sizeX="96" sizeY="64"><dimension sizeX="96" sizeY="64" r="0" ifd="0"/></pixels>
   <view sizeX="{2 * w}" sizeY="{2 * h}" offsetX="0" offsetY="0" spacingZ="0"/>
   {settings("1.25", 0.04)}
  </image>
  <image name="main" uuid="3"><creationDate>2026-11-29T00:00:00.00Z</creationDate>{device}
   <pixels sizeX="{SHAPE[1]}" sizeY="{SHAPE[0]}">
    <dimension sizeX="{SHAPE[1]}" sizeY="{SHAPE[0]}" r="0" ifd="1"/>
    <dimension sizeX="{SHAPE[1] // 2}" sizeY="{SHAPE[0] // 2}" r="1" ifd="2"/>
   </pixels>
   <view sizeX="{w}" sizeY="{h}" offsetX="{w // 2}" offsetY="{h // 2}" spacingZ="0"/>
   {settings(objective, 0.7)}
  </image>
 </collection>
</scn>"""


def write_scn(path: Path, img: np.ndarray, nm_per_px: float = 500.0, **xml: str) -> Path:
    with tifffile.TiffWriter(path) as tif:
        tif.write(img[::4, ::4], tile=(16, 16), description=scn_xml(nm_per_px, **xml), **KW)
        tif.write(img, tile=(64, 64), **KW)
        tif.write(img[::2, ::2], tile=(64, 64), **KW)
    return path


def philips_xml(spacing_mm: list[str]) -> str:
    """Philips DP XML: one PixelDataRepresentation per level with DICOM_PIXEL_SPACING in mm."""
    levels = "".join(
        '<DataObject ObjectType="PixelDataRepresentation"><Attribute Name="DICOM_PIXEL_SPACING"'
        f' Group="0x0028" Element="0x0030" PMSVR="IDoubleArray">&quot;{s}&quot; &quot;{s}&quot;'
        "</Attribute></DataObject>"
        for s in spacing_mm
    )
    return (
        '<?xml version="1.0" encoding="UTF-8" ?><DataObject ObjectType="DPUfsImport">'
        '<Attribute Name="DICOM_MANUFACTURER" PMSVR="IString">PHILIPS</Attribute>'
        '<Attribute Name="PIM_DP_SCANNED_IMAGES" PMSVR="IDataObjectArray"><Array>'
        '<DataObject ObjectType="DPScannedImage">'
        '<Attribute Name="PIM_DP_IMAGE_TYPE" PMSVR="IString">WSI</Attribute>'
        '<Attribute Name="PIIM_PIXEL_DATA_REPRESENTATION_SEQUENCE" PMSVR="IDataObjectArray">'
        f"<Array>{levels}</Array></Attribute></DataObject></Array></Attribute></DataObject>"
    )


def write_philips(path: Path, img: np.ndarray, spacing_mm: str = "0.00025") -> Path:
    second = "0.0005" if spacing_mm == "0.00025" else spacing_mm
    software = "Philips DP v1.0"
    with tifffile.TiffWriter(path) as tif:
        xml = philips_xml([spacing_mm, second])
        tif.write(img, tile=(64, 64), software=software, description=xml, **KW)
        tif.write(img[::2, ::2], tile=(64, 64), subfiletype=1, software=software, **KW)
    return path


def write_bif(path: Path, img: np.ndarray, scan_res: str = "0.2325") -> Path:
    """Ventana BIF: a label image, then pages described ``level=N mag=M quality=Q``; the XMP
    (tag 700) of the label and level-0 pages holds ``<iScan ScanRes=...>`` (µm per pixel)."""
    xmp = (
        '<?xml version="1.0" encoding="utf-8"?><Metadata><iScan Magnification="40" '
        f'ScanRes="{scan_res}" ScannerModel="VENTANA DP 200" /></Metadata>'
    ).encode()
    software = "ScanOutputManager 1.1.0.15854"
    with tifffile.TiffWriter(path, bigtiff=True) as tif:
        xmp_tag = [(700, "B", len(xmp), xmp, True)]
        tif.write(
            img[::4, ::4], description="Label_Image", software=software, extratags=xmp_tag, **KW
        )
        tif.write(
            img,
            tile=(64, 64),
            description="level=0 mag=40 quality=90",
            software=software,
            extratags=xmp_tag,
            **KW,
        )
        tif.write(
            img[::2, ::2],
            tile=(64, 64),
            description="level=1 mag=20 quality=90",
            software=software,
            **KW,
        )
    return path


def write_svs_like(path: Path, img: np.ndarray, field: str) -> Path:
    """One Aperio page whose description carries ``field`` (e.g. ``"MPP = 0.5"``)."""
    desc = f"Aperio Image Library v12.0.15 \r\n384x256 (64x64) JPEG/RGB Q=70|AppMag = 20|{field}"
    tifffile.imwrite(path, img, tile=(64, 64), description=desc, **KW)
    return path


# --- reading back ----------------------------------------------------------------------------

# name -> writer(dir, img), vendor, pixel size (µm), magnification
VENDORS: list[tuple[str, Callable[[Path, np.ndarray], Path], str, float, float | None]] = [
    ("ndpi", lambda d, i: write_ndpi(d / "slide.ndpi", i), "hamamatsu", 0.4527, 20.0),
    ("scn", lambda d, i: write_scn(d / "slide.scn", i), "leica", 0.5, 20.0),
    ("philips", lambda d, i: write_philips(d / "slide.tiff", i), "philips", 0.25, None),
    ("bif", lambda d, i: write_bif(d / "slide.bif", i), "ventana", 0.2325, 40.0),
]
IDS = [v[0] for v in VENDORS]


@pytest.mark.parametrize(("name", "write", "vendor", "px", "mag"), VENDORS, ids=IDS)
def test_vendor_slide_reads_back_with_pixel_size_and_levels(tmp_path, name, write, vendor, px, mag):
    img = _image()
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)  # the macro, label, map: no news
        reader = open_image(write(tmp_path, img))
    assert reader.vendor == vendor
    assert reader.pixel_size_um == pytest.approx(px, rel=1e-6)
    assert reader.magnification == mag
    assert reader.level_shapes == ((256, 384, 3), (128, 192, 3))
    np.testing.assert_array_equal(reader.read(0, 256, 0, 384), img)
    np.testing.assert_array_equal(reader.level(1).compute(), img[::2, ::2])
    np.testing.assert_array_equal(reader.read(100, 130, 200, 260, level=0), img[100:130, 200:260])


@pytest.mark.parametrize(("name", "write", "vendor", "px", "mag"), VENDORS[:3], ids=IDS[:3])
def test_pixel_size_agrees_with_tiffslide(tmp_path, name, write, vendor, px, mag):
    """tiffslide parses the same vendor metadata independently (it has no BIF pixel size)."""
    tiffslide = pytest.importorskip("tiffslide")
    path = write(tmp_path, _image())
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "hamamatsu-format metadata parsing only partially"
        with tiffslide.TiffSlide(path) as slide:
            theirs = float(slide.properties["tiffslide.mpp-x"])
            level1 = slide.level_dimensions[1]
    ours = open_image(path)
    assert ours.pixel_size_um == pytest.approx(theirs, rel=1e-6)
    if name != "scn":  # tiffslide lays SCN regions on a slide-wide canvas; segpipe reads the region
        assert level1 == ours.level_shapes[1][1::-1]


def test_ndpi_agrees_with_openslide(tmp_path):
    """OpenSlide, the reference reader of NDPI, reads the JPEG-stripped file as Hamamatsu with
    the same pixel size and the same decoded pixels."""
    openslide = pytest.importorskip("openslide")
    img = _image()
    path = write_ndpi(tmp_path / "scan.ndpi", img, mpp=0.2263, jpeg=True)
    ours = open_image(path)
    slide = openslide.OpenSlide(str(path))
    try:
        assert slide.properties["openslide.vendor"] == "hamamatsu"
        assert ours.pixel_size_um == pytest.approx(float(slide.properties["openslide.mpp-x"]))
        theirs = np.asarray(slide.read_region((0, 0), 0, (384, 256)))[..., :3]
        half = np.asarray(slide.read_region((0, 0), 1, (192, 128)))[..., :3]
    finally:
        slide.close()
    np.testing.assert_allclose(ours.read(0, 256, 0, 384), theirs, atol=2)
    np.testing.assert_allclose(ours.level(1).compute(), half, atol=2)
    assert np.abs(ours.read(0, 256, 0, 384).astype(int) - img).mean() < 2  # JPEG, near the truth


@pytest.mark.parametrize(("name", "write"), [(v[0], v[1]) for v in VENDORS[1:3]], ids=IDS[1:3])
def test_openslide_recognises_the_written_vendor_files(tmp_path, name, write):
    openslide = pytest.importorskip("openslide")
    path = write(tmp_path, _image())
    assert (
        openslide.OpenSlide.detect_format(str(path)) == {"scn": "leica", "philips": "philips"}[name]
    )


def test_describe_a_slide(tmp_path):
    info = describe_image(write_ndpi(tmp_path / "s.ndpi", _image()))
    assert info.vendor == "hamamatsu"
    assert info.to_dict()["levels"] == [[256, 384, 3], [128, 192, 3]]
    assert info.pixel_size_um == pytest.approx(0.4527)
    assert info.crs is None
    assert info.lines()[0].endswith("(hamamatsu, uint8, 3 channel(s), 0.4527 µm/px, 20x)")


def test_an_aperio_slide_gives_its_appmag_as_its_magnification(tmp_path):
    """The objective power a scanner used is in an SVS's description alone (AppMag); lost,
    a slide was described without it and read at no magnification."""
    path = write_svs_like(tmp_path / "s.svs", _image(), "MPP = 0.5")
    reader = open_image(path)
    assert (reader.vendor, reader.pixel_size_um, reader.magnification) == ("aperio", 0.5, 20.0)
    assert describe_image(path).lines()[0].endswith("(aperio, uint8, 3 channel(s), 0.5 µm/px, 20x)")


def test_pixel_size_argument_overrides_the_vendors(tmp_path):
    path = write_bif(tmp_path / "s.bif", _image())
    assert open_image(path, pixel_size_um=0.5).pixel_size_um == 0.5


# --- resolution tags -------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("per_unit", "unit", "px"),
    [
        (72, "INCH", None),  # a photo's, a screen's
        (600, "INCH", None),  # a document scanner's
        (2540, "INCH", 10.0),
        (101_600, "INCH", 0.25),  # a slide scanner's, in inches
        (28.35, "CENTIMETER", None),  # 72 dpi, as a writer in centimetres says it
        (400, "CENTIMETER", None),  # 1016 dpi: 25 µm per pixel
        (1000, "CENTIMETER", 10.0),
        (40_000, "CENTIMETER", 0.25),
        (4, "MICROMETER", 0.25),  # ResolutionUnit 5, as some microscopes write it
    ],
)
def test_a_resolution_coarser_than_a_microscopes_is_a_print_resolution(
    tmp_path, per_unit, unit, px
):
    path = tmp_path / "photo.tif"
    tifffile.imwrite(path, _image(), resolution=(per_unit, per_unit), resolutionunit=unit, **KW)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        reader = open_image(path)
    said = [str(w.message) for w in caught if "print or scan resolution" in str(w.message)]
    if px is None:
        assert reader.pixel_size_um is None
        assert len(said) == 1 and said[0].startswith(f"{path}: its resolution of {per_unit} ")
    else:
        assert reader.pixel_size_um == pytest.approx(px) and not said


# Stored 0.25 µm per pixel along X (its columns), 0.5 µm along Y (its rows).
_STORED_XY_UM = (0.25, 0.5)


def _xy_warning(path: Path, what: str, orientation: int) -> str:
    """The warning about X and Y sizes of ``_STORED_XY_UM`` as an image of ``orientation``
    is shown: on its side (5 to 8) its stored Y is the X shown."""
    x, y = _STORED_XY_UM[::-1] if orientation >= 5 else _STORED_XY_UM
    if orientation >= 5:
        what += " of an image stored on its side (Orientation 5 to 8: its Y shown as X)"
    return f"{path}: {what} differs in X ({x} µm) and Y ({y} µm); using X"


def _write_tiff_xy(path: Path, orientation: int) -> Path:
    x, y = _STORED_XY_UM
    per_cm = (round(10_000 / x), round(10_000 / y))
    turn = [(274, "H", 1, orientation, True)]
    tifffile.imwrite(
        path, _image(), resolution=per_cm, resolutionunit="CENTIMETER", extratags=turn, **KW
    )
    return path


def _write_ome_xy(path: Path, orientation: int) -> Path:
    x, y = _STORED_XY_UM
    image = ome_image(0, "slide", SHAPE, x, '<TiffData IFD="0" PlaneCount="1"/>')
    image = image.replace(f'PhysicalSizeY="{x}"', f'PhysicalSizeY="{y}"')
    turn = [(274, "H", 1, orientation, True)]
    tifffile.imwrite(path, _image(), description=ome_xml(image), extratags=turn, **KW)
    return path


def _write_philips_xy(path: Path, orientation: int) -> Path:
    x, y = (f"{um / 1000:g}" for um in _STORED_XY_UM)
    xml = philips_xml([x]).replace(
        f"&quot;{x}&quot; &quot;{x}&quot;", f"&quot;{y}&quot; &quot;{x}&quot;"
    )
    assert f"&quot;{y}&quot; &quot;{x}&quot;" in xml  # row, column
    turn = [(274, "H", 1, orientation, True)]
    tifffile.imwrite(
        path, _image(), description=xml, software="Philips DP v1.0", extratags=turn, **KW
    )
    return path


@pytest.mark.parametrize("orientation", [1, 2, 5, 6, 8])
@pytest.mark.parametrize(
    ("write", "what"),
    [
        (_write_tiff_xy, "TIFF X/YResolution"),
        (_write_ome_xy, "OME PhysicalSize"),
        (_write_philips_xy, "Philips DICOM_PIXEL_SPACING"),
    ],
    ids=["resolution-tags", "ome", "philips"],
)
def test_x_and_y_pixel_sizes_are_those_of_the_axes_shown(tmp_path, write, what, orientation):
    """An image stored on its side (Orientation 5 to 8) is shown with its rows and columns
    swapped: the X shown is the stored Y, and its size is the pixel size."""
    path = write(tmp_path / "xy.tif", orientation)
    with pytest.warns(UserWarning, match="differs in X") as caught:
        reader = open_image(path)
    shown = (SHAPE[::-1] if orientation >= 5 else SHAPE) + (3,)
    assert reader.level_shapes[0] == shown  # the premise: turned as shown
    assert reader.pixel_size_um == _STORED_XY_UM[orientation >= 5]
    said = [str(w.message) for w in caught if "differs in X" in str(w.message)]
    assert said == [_xy_warning(path, what, orientation)]


@pytest.mark.parametrize(
    ("unit", "px"),
    [
        ("um", 0.5),
        ("micron", 0.5),
        ("microns", 0.5),  # as users type it into ImageJ's Set Scale
        ("Microns", 0.5),
        ("micrometre", 0.5),
        ("micrometres", 0.5),
        ("micrometers", 0.5),
        ("\\u00B5m", 0.5),  # how ImageJ writes µm
        ("nm", 0.0005),
        ("mm", 500.0),
        ("cm", 5000.0),
        ("pixel", None),  # uncalibrated
    ],
)
def test_imagej_calibration_gives_the_pixel_size(tmp_path, unit, px):
    path = tmp_path / "imagej.tif"
    grey = _image()[..., 0]
    tifffile.imwrite(path, grey, imagej=True, resolution=(2, 2), metadata={"unit": unit})
    with tifffile.TiffFile(path) as tif:  # ImageJ's way: the unit in the description
        assert tif.pages.first.tags["ResolutionUnit"].value == 1  # none
    reader = open_image(path)
    assert reader.pixel_size_um == (None if px is None else pytest.approx(px))
    np.testing.assert_array_equal(reader.read(0, 256, 0, 384)[..., 0], grey)


@pytest.mark.parametrize("unit", ["furlong", "px2"])
def test_an_imagej_unit_segpipe_does_not_know_is_warned_of(tmp_path, unit):
    """A calibration in a unit segpipe cannot convert left the pixel size unknown without a
    word, as if the image were uncalibrated."""
    path = tmp_path / "imagej.tif"
    grey = _image()[..., 0]
    tifffile.imwrite(path, grey, imagej=True, resolution=(2, 2), metadata={"unit": unit})
    with pytest.warns(UserWarning, match=rf"^{path}: ImageJ calibration unit '{unit}' unknown"):
        reader = open_image(path)
    assert reader.pixel_size_um is None
    reader.close()


def test_an_uncalibrated_imagej_file_is_not_warned_of(tmp_path):
    path = tmp_path / "imagej.tif"
    tifffile.imwrite(path, _image()[..., 0], imagej=True, metadata={"unit": "pixel"})
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)
        reader = open_image(path)
    assert reader.pixel_size_um is None
    reader.close()


def test_a_magnification_that_is_no_finite_number_is_unknown_to_both_readers(tmp_path):
    path = tmp_path / "a.svs"
    desc = "Aperio Image Library v12.0.15 \r\n384x256 (64x64) RGB|AppMag = inf|MPP = 0.5"
    tifffile.imwrite(path, _image(), tile=(64, 64), description=desc, **KW)
    assert open_image(path).magnification is None
    pytest.importorskip("openslide")
    from segpipe.io.readers import OpenSlideReader

    slide = OpenSlideReader(path)  # OpenSlide passes AppMag on as it is
    assert (slide.magnification, slide.pixel_size_um) == (None, 0.5)


# --- bad vendor metadata -----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("write", "match"),
    [
        (lambda d, i: write_philips(d / "p.tiff", i, "abc"), "'abc'"),
        (lambda d, i: write_bif(d / "b.bif", i, "-0.25"), "ScanRes '-0.25' is not a positive"),
        (lambda d, i: write_bif(d / "b.bif", i, "fine"), "ScanRes 'fine' is not a number"),
        (lambda d, i: write_scn(d / "s.scn", i, 0.0), "Leica SCN view/dimension sizeX"),
        (
            lambda d, i: write_svs_like(d / "a.svs", i, "MPP = n/a"),
            "Aperio MPP 'n/a' is not a number.*--pixel-size",
        ),
    ],
    ids=["philips-spacing", "bif-negative", "bif-text", "scn-zero-extent", "aperio-mpp"],
)
def test_bad_vendor_metadata_is_refused_naming_file_and_field(tmp_path, write, match):
    path = write(tmp_path, _image())
    with pytest.raises(ImageReadError, match=match) as caught:
        open_image(path)
    assert str(path) in str(caught.value)


def test_a_pixel_size_given_reads_past_bad_vendor_metadata(tmp_path):
    path = write_bif(tmp_path / "b.bif", _image(), "fine")
    with pytest.warns(UserWarning, match="ScanRes 'fine' is not a number; using pixel_size_um"):
        reader = open_image(path, pixel_size_um=0.25)
    assert reader.pixel_size_um == 0.25
    np.testing.assert_array_equal(reader.read(0, 256, 0, 384), _image())


def test_scn_xml_that_does_not_parse_is_refused(tmp_path):
    path = tmp_path / "broken.scn"
    img = _image()
    with tifffile.TiffWriter(path) as tif:
        tif.write(img, tile=(64, 64), description="<scn><collection><image></scn>", **KW)
    with pytest.raises(ImageReadError, match=r"broken\.scn"):
        open_image(path)


# --- OME-TIFF: the OME Image that is the series read ---------------------------------------------

OME_NS = "http://www.openmicroscopy.org/Schemas/OME/2016-06"


def ome_image(index: int, name: str, shape: tuple[int, int], px: float, tiffdata: str) -> str:
    """An OME ``Image`` of RGB pixels ``shape`` (y, x) of ``px`` µm, its planes at
    ``tiffdata`` (TiffData elements; none: pixels the file does not hold)."""
    (y, x), i = shape, index
    return (
        f'<Image ID="Image:{i}" Name="{name}"><Pixels ID="Pixels:{i}" DimensionOrder="XYCZT" '
        f'Type="uint8" SizeX="{x}" SizeY="{y}" SizeC="3" SizeZ="1" SizeT="1" '
        f'PhysicalSizeX="{px}" PhysicalSizeY="{px}"><Channel ID="Channel:{i}:0" '
        f'SamplesPerPixel="3"/>{tiffdata}</Pixels></Image>'
    )


def ome_xml(*images: str, uuid: str | None = "urn:uuid:0") -> str:
    """OME-XML of ``images``; ``uuid``, the file's own (optional in OME: None, none)."""
    own = f' UUID="{uuid}"' if uuid else ""
    return f'<?xml version="1.0" encoding="UTF-8"?><OME xmlns="{OME_NS}"{own}>' + (
        "".join(images) + "</OME>"
    )


def in_file(name: str, uuid: str, ifd: int = 0) -> str:
    """TiffData of IFD ``ifd`` of file ``name`` of a multi-file set."""
    return f'<TiffData IFD="{ifd}" PlaneCount="1"><UUID FileName="{name}">{uuid}</UUID></TiffData>'


def named_as(uuid: str) -> dict[str, object]:
    """tifffile keywords writing a file of a multi-file set whose own OME-XML states ``uuid``,
    the UUID the set names it by (tifffile gives each ``.ome.tif`` a fresh one otherwise)."""
    return {"metadata": {"UUID": uuid}}


def test_ome_pixel_size_is_the_slide_images_when_an_image_before_it_has_no_pixels(tmp_path):
    """tifffile makes no series of an Image without TiffData: the slide is series 0 but
    Image 1, and Image 0's size (a label's, here) is not the slide's."""
    path, img = tmp_path / "skipped.ome.tif", _image()
    xml = ome_xml(
        ome_image(0, "label", (40, 60), 5.0, ""),
        ome_image(1, "slide", SHAPE, 0.25, '<TiffData IFD="0" PlaneCount="1"/>'),
    )
    tifffile.imwrite(path, img, description=xml, **KW)
    with tifffile.TiffFile(path) as tif:  # the premise
        assert [s.name for s in tif.series] == ["slide"]
    reader = open_image(path)
    assert (reader.vendor, reader.pixel_size_um) == ("ome", 0.25)
    np.testing.assert_array_equal(reader.read(0, 256, 0, 384), img)


def test_ome_pixel_size_in_a_multi_file_set_is_that_of_the_image_in_the_slides_file(tmp_path):
    """Image 0 names IFD 1 of a file with one IFD (tifffile skips it); the label is IFD 0 of
    the file opened, the slide IFD 0 of another: only the file tells the two Images apart, and
    the i-th series (the slide is series 1) is Image 2."""
    slide = np.broadcast_to(_image()[:1], (*SHAPE, 3)).copy()  # small once compressed
    xml = ome_xml(
        ome_image(0, "gone", (40, 60), 7.0, in_file("set_1.ome.tif", "urn:uuid:2", ifd=1)),
        ome_image(1, "label", (40, 60), 5.0, in_file("set.ome.tif", "urn:uuid:1")),
        ome_image(2, "slide", SHAPE, 0.25, in_file("set_1.ome.tif", "urn:uuid:2")),
        uuid="urn:uuid:1",
    )
    tifffile.imwrite(
        tmp_path / "set.ome.tif", np.zeros((40, 60, 3), np.uint8), description=xml, **KW
    )
    tifffile.imwrite(tmp_path / "set_1.ome.tif", slide, **{**KW, **named_as("urn:uuid:2")})
    with tifffile.TiffFile(tmp_path / "set.ome.tif") as tif:  # the premise
        assert [(s.name, s.keyframe.index) for s in tif.series] == [("label", 0), ("slide", 0)]
    reader = open_image(tmp_path / "set.ome.tif")
    assert reader.pixel_size_um == 0.25
    np.testing.assert_array_equal(reader.read(0, 256, 0, 384), slide)


def write_two_file_set(
    tmp_path: Path,
    *,
    pyramid: bool,
    own: dict[str, object] | None = None,
    compression: str | None = None,
) -> tuple[Path, Path]:
    """An OME-TIFF set of two files: the one opened, ``set.ome.tif``, holds the OME-XML and a
    small label, the slide (:func:`_image`, stored raw or in ``compression``, reduced by 2 in
    a SubIFD if ``pyramid``) is IFD 0 of ``set_1.ome.tif``, a file many times larger. ``own``:
    tifffile keywords of that file's own OME-XML (:func:`named_as` the set's ``urn:uuid:2``)."""
    xml = ome_xml(
        ome_image(0, "label", (40, 60), 5.0, in_file("set.ome.tif", "urn:uuid:1")),
        ome_image(1, "slide", SHAPE, 0.25, in_file("set_1.ome.tif", "urn:uuid:2")),
        uuid="urn:uuid:1",
    )
    opened, other = tmp_path / "set.ome.tif", tmp_path / "set_1.ome.tif"
    tifffile.imwrite(opened, np.zeros((40, 60, 3), np.uint8), description=xml, **KW)
    raw = {**KW, "compression": compression, "tile": (64, 64)}
    own = named_as("urn:uuid:2") if own is None else own
    with tifffile.TiffWriter(other) as tif:
        tif.write(_image(), subifds=int(pyramid), **{**raw, **own})
        if pyramid:
            tif.write(_image()[::2, ::2], subfiletype=1, **raw)
    return opened, other


@pytest.mark.parametrize("pyramid", [False, True])
def test_a_multi_file_ome_set_whose_slide_is_in_a_larger_file_reads(tmp_path, pyramid):
    """Each level's tiles are checked against the size of the file that holds them, not that
    of the file opened."""
    opened, other = write_two_file_set(tmp_path, pyramid=pyramid)
    with tifffile.TiffFile(opened) as tif:  # the premise: the slide's data lie past its end
        page = tif.series[1].keyframe
        assert page.parent.filehandle.size == other.stat().st_size
        assert page.dataoffsets[-1] > opened.stat().st_size
    reader = open_image(opened)
    assert reader.pixel_size_um == 0.25
    np.testing.assert_array_equal(reader.read(0, 256, 0, 384), _image())
    if pyramid:
        np.testing.assert_array_equal(reader.level(1).compute(), _image()[::2, ::2])


def test_a_multi_file_ome_set_whose_other_file_is_rewritten_is_refused_by_a_workers_copy(
    tmp_path,
):
    """The file holding the slide saved over after open (same name and UUID): a worker's copy
    checked only the file named and read the new pixels, under an unchanged Dask token."""
    import os
    import pickle

    from dask.base import tokenize

    opened, other = write_two_file_set(tmp_path, pyramid=False)
    reader = open_image(opened)
    shipped, token = pickle.dumps(reader), tokenize(reader.level(0))
    new = other.with_suffix(".new")
    with tifffile.TiffWriter(new) as tif:
        tif.write(255 - _image(), **{**KW, "tile": (64, 64), **named_as("urn:uuid:2")})
    os.replace(new, other)
    copy = pickle.loads(shipped)
    assert tokenize(copy.level(0)) != token
    with pytest.raises(ImageReadError, match=r"set_1\.ome\.tif, a file of the OME-TIFF set .*"
                       "changed since it was opened"):  # fmt: skip
        copy.read(0, 4, 0, 4)


@pytest.mark.parametrize(("pyramid", "level"), [(False, 0), (True, 1)])
def test_a_multi_file_ome_set_with_a_truncated_file_is_refused_naming_it(tmp_path, pyramid, level):
    """The last 1000 bytes of the slide's file cut off: the tiles of its last level (the
    SubIFD's, whose IFD is whole, in a pyramid)."""
    opened, other = write_two_file_set(tmp_path, pyramid=pyramid)
    with tifffile.TiffFile(opened) as tif:
        page = tif.series[1].levels[level].keyframe
        end = max(o + c for o, c in zip(page.dataoffsets, page.databytecounts, strict=True))
    keep = other.stat().st_size - 1000
    assert keep < end  # the premise
    with open(other, "r+b") as f:
        f.truncate(keep)
    with pytest.raises(ImageReadError) as info:
        open_image(opened)
    assert str(info.value) == (
        f"{other} (a file of {opened}'s OME-TIFF set): the tiles or strips of level {level} "
        f"extend to byte {end:,} but the file has {keep:,} bytes; the file is truncated"
    )


def ome_channels(tiffdata: str) -> str:
    """An OME ``Image`` of two uint8 channels of ``SHAPE`` (C, y, x), its planes at
    ``tiffdata``."""
    (y, x), channels = SHAPE, "".join(f'<Channel ID="Channel:0:{c}"/>' for c in range(2))
    return (
        f'<Image ID="Image:0" Name="fluo"><Pixels ID="Pixels:0" DimensionOrder="XYCZT" '
        f'Type="uint8" SizeX="{x}" SizeY="{y}" SizeC="2" SizeZ="1" SizeT="1" '
        f'PhysicalSizeX="0.5" PhysicalSizeY="0.5">{channels}{tiffdata}</Pixels></Image>'
    )


_RAW_TILES = {"compression": None, "tile": (64, 64)}


def write_channel_set(
    tmp_path: Path,
    own: dict[str, object] | None = None,
    layouts: tuple[dict[str, object], dict[str, object]] = (_RAW_TILES, _RAW_TILES),
    reduced: tuple[dict[str, object], dict[str, object]] = ({}, {}),
) -> tuple[Path, Path, np.ndarray]:
    """A fluorescence OME-TIFF set: channel c of :func:`ome_channels` is IFD 0 of
    ``c{c}.ome.tif`` (the first holds the OME-XML), each reduced by 2 in a SubIFD; returns
    the two files and the (y, x, channel) pixels. ``own``: tifffile keywords of
    ``c1.ome.tif``'s own OME-XML (:func:`named_as` the set's ``urn:uuid:2``); ``layouts``:
    tifffile keywords storing each file's IFD 0; ``reduced``: its SubIFD (raw 64 x 64 tiles
    but for these)."""
    planes = _image()[..., :2]
    xml = ome_xml(
        ome_channels(
            "".join(
                f'<TiffData FirstC="{c}" IFD="0" PlaneCount="1">'
                f'<UUID FileName="c{c}.ome.tif">urn:uuid:{c + 1}</UUID></TiffData>'
                for c in range(2)
            )
        ),
        uuid="urn:uuid:1",
    )
    raw = {"photometric": "minisblack", "metadata": None, **_RAW_TILES}
    own = named_as("urn:uuid:2") if own is None else own
    for c, first in enumerate(({"description": xml}, own)):
        stored = {"photometric": "minisblack", "metadata": None, **layouts[c], **first}
        with tifffile.TiffWriter(tmp_path / f"c{c}.ome.tif") as tif:
            tif.write(planes[..., c], subifds=1, **stored)
            tif.write(planes[::2, ::2, c], subfiletype=1, **{**raw, **reduced[c]})
    return tmp_path / "c0.ome.tif", tmp_path / "c1.ome.tif", planes


def test_a_multi_file_ome_set_with_a_channel_per_file_reads_every_channel(tmp_path):
    opened, _, planes = write_channel_set(tmp_path)
    reader = open_image(opened)
    np.testing.assert_array_equal(reader.read(0, 256, 0, 384), planes)
    np.testing.assert_array_equal(reader.level(1).compute(), planes[::2, ::2])


def test_a_multi_file_ome_set_whose_slide_is_in_jpeg_in_another_file_reads(tmp_path):
    """tifffile looks into a JPEG level's first tile (is it JFIF?) when it first decodes one,
    and had closed the set's other files once it had read their IFDs: an AssertionError at
    open. Compared with tifffile's decoding of the slide's file on its own."""
    opened, other = write_two_file_set(tmp_path, pyramid=True, compression="jpeg")
    reader = open_image(opened)
    for level in (0, 1):
        want = tifffile.imread(other, is_ome=False, level=level)
        np.testing.assert_array_equal(reader.level(level).compute(), want)


def test_a_multi_file_ome_set_whose_files_differ_in_compression_alone_reads(tmp_path):
    """tifffile decodes each file's tiles by that file's own keyframe: its compression."""
    zlib = {**_RAW_TILES, "compression": "zlib"}
    opened, _, planes = write_channel_set(tmp_path, layouts=(_RAW_TILES, zlib))
    reader = open_image(opened)
    np.testing.assert_array_equal(reader.read(0, 256, 0, 384), planes)
    np.testing.assert_array_equal(reader.level(1).compute(), planes[::2, ::2])


@pytest.mark.parametrize(
    ("layout", "stored"),
    [({"tile": (32, 32)}, "tiles of 32x32"), ({"rowsperstrip": 16}, "strips of 16x384")],
    ids=["tiles", "strips"],
)
def test_a_multi_file_ome_set_whose_files_are_tiled_unalike_is_refused_naming_one(
    tmp_path, layout, stored
):
    """tifffile's Zarr view, which segpipe reads, places every file's tiles by the level's
    tile grid (its first file's), though it decodes each by its own file's keyframe: a
    reshape error at the first read, or (strips) "the file is truncated" for a whole file.
    tifffile's own asarray, plane by plane, reads the set right."""
    opened, other, planes = write_channel_set(
        tmp_path, layouts=(_RAW_TILES, {"compression": None, **layout})
    )
    with tifffile.TiffFile(opened) as tif:  # the premise
        np.testing.assert_array_equal(tif.series[0].asarray(), planes.transpose(2, 0, 1))
        with pytest.raises(ValueError, match="cannot reshape"):
            zarr.open(tif.series[0].aszarr(level=0), mode="r")[:]
    with pytest.raises(ImageReadError) as info:
        open_image(opened)
    assert str(info.value).startswith(
        f"{other} (a file of {opened}'s OME-TIFF set): level 0 is 256x384 pixels of uint8 in "
        f"{stored}, in {opened} 256x384 pixels of uint8 in tiles of 64x64; tifffile reads "
        "every file of the set by one tile grid and pixel type. Its ImageWidth, ImageLength "
    )


_TURNED = {"extratags": [(274, "H", 1, 3, True)]}  # Orientation 3: stored upside down


@pytest.mark.parametrize("level", [0, 1])
@pytest.mark.parametrize(
    ("stored", "stated"),
    [
        ({"photometric": "miniswhite"}, "PhotometricInterpretation (TIFF tag 262) 0 (MINISWHITE)"),
        (_TURNED, "Orientation (TIFF tag 274) 3"),
    ],
    ids=["min-is-white", "turned"],
)
def test_a_multi_file_ome_set_whose_file_is_shown_unlike_the_first_is_refused_naming_it(
    tmp_path, level, stored, stated
):
    """segpipe inverts min-is-white grey and turns an image as its Orientation says, from each
    level's keyframe, the first file's: c1 stored min-is-white or upside down beside a c0
    stored as is was read as stored, silently wrong."""
    raw = {**_RAW_TILES, **stored}
    opened, other, _ = write_channel_set(
        tmp_path,
        layouts=(_RAW_TILES, raw if level == 0 else _RAW_TILES),
        reduced=({}, stored if level == 1 else {}),
    )
    with pytest.raises(ImageReadError) as info:
        open_image(opened)
    assert str(info.value).startswith(
        f"{other} (a file of {opened}'s OME-TIFF set): level {level} has {stated}"
    )
    assert "segpipe shows every file of the set's level as the first file's" in str(info.value)


@pytest.mark.parametrize(
    ("c0", "c1", "stated"),
    [
        ({}, {"compression": "zlib"}, "Compression (TIFF tag 259) 8 (ADOBE_DEFLATE), in"),
        (
            {"compression": "zlib"},
            {"compression": "zlib", "predictor": True},
            "Predictor (TIFF tag 317) 2",
        ),
        ({}, {"tile": (128, 32)}, "128x192 pixels of uint8 in tiles of 128x32, in"),
    ],
    ids=["compression", "predictor", "tiles"],
)
def test_a_multi_file_ome_set_whose_reduced_level_is_stored_unlike_the_first_is_refused(
    tmp_path, c0, c1, stated
):
    """tifffile reads every file's SubIFD of a level by the first file's (its keyframe),
    whatever the file's own tags say: another compression failed at read as "may be
    corrupt", another predictor or tile shape (as many tiles) read silently wrong. Each file's
    own SubIFD is compared at open. (At level 0 each file is decoded by its own keyframe.)"""
    opened, other, _ = write_channel_set(tmp_path, reduced=(c0, c1))
    own = tifffile.imread(other, is_ome=False, level=1)  # c1's level 1, by its own tags
    with tifffile.TiffFile(opened) as tif:  # the premise: through the set, read otherwise
        try:
            in_set = zarr.open(tif.series[0].aszarr(level=1), mode="r")[1]
        except (ValueError, tifffile.TiffFileError):  # a tile decoded as another compression
            in_set = None
        assert in_set is None or not np.array_equal(in_set, own)
    with pytest.raises(ImageReadError) as info:
        open_image(opened)
    assert str(info.value).startswith(
        f"{other} (a file of {opened}'s OME-TIFF set): level 1 has {stated}"
        if "pixels" not in stated
        else f"{other} (a file of {opened}'s OME-TIFF set): level 1 is {stated}"
    )


def test_a_multi_file_ome_set_whose_level_is_of_another_dtype_names_its_file(tmp_path):
    """The slide's levels are in set_1.ome.tif: the error named the file opened alone."""
    opened, other = write_two_file_set(tmp_path, pyramid=True)
    with tifffile.TiffWriter(other) as tif:
        tif.write(_image(), subifds=1, tile=(64, 64), **{**KW, **named_as("urn:uuid:2")})
        tif.write(_image()[::2, ::2].astype(np.uint16), subfiletype=1, tile=(64, 64), **KW)
    with pytest.raises(ImageReadError) as info:
        open_image(opened)
    assert str(info.value) == (
        f"{opened}: level 1 (stored in {other}) reads as uint16 pixels, level 0 as uint8"
    )


@pytest.mark.parametrize("how", ["missing", "no TIFF"])
@pytest.mark.parametrize("layout", ["slide", "pyramid", "channel"])
def test_a_multi_file_ome_set_without_one_of_its_files_is_refused_naming_it(tmp_path, layout, how):
    """tifffile leaves out the slide's Image (the label was read as the image) or zeroes the
    channel in the file it cannot open, with a log message only."""
    if layout == "channel":
        opened, other, _ = write_channel_set(tmp_path)
    else:
        opened, other = write_two_file_set(tmp_path, pyramid=layout == "pyramid")
    if how == "missing":
        other.unlink()
    else:
        other.write_bytes(b"not a TIFF " * 100)
    with pytest.raises(ImageReadError) as info:
        open_image(opened)
    problem = "is not there" if how == "missing" else "was not read (no TIFF, or without the IFDs"
    assert str(info.value).startswith(
        f"{opened}: one file of an OME-TIFF set whose OME-XML places image planes in "
        f"'{other.name}', in {tmp_path.resolve()}; '{other.name}' {problem}"
    )
    assert str(info.value).endswith(
        "put the set's files together again in one folder, as they were written, and open "
        "this file there"
    )


def _of_another_set(layout: str) -> str:
    """OME-XML of a file of another export of the set (its own UUID ``urn:uuid:9``), as
    Bio-Formats writes each file of a set: the whole set's XML, or ``BinaryOnly``."""
    if layout == "binary only":
        return ome_xml(
            '<BinaryOnly MetadataFile="set.companion.ome" UUID="urn:uuid:8"/>', uuid="urn:uuid:9"
        )
    slide = ome_image(0, "slide", SHAPE, 0.25, in_file("set_1.ome.tif", "urn:uuid:9"))
    return ome_xml(slide, uuid="urn:uuid:9")


@pytest.mark.parametrize("layout", ["whole XML", "binary only"])
def test_a_multi_file_ome_set_with_a_file_of_another_set_is_refused_naming_both(tmp_path, layout):
    """The file under a name the set gives is a file of another set (its OME-XML names files
    by UUID, its own another): another acquisition or export saved under that name. tifffile
    reads its planes as the set's all the same."""
    own = {"description": _of_another_set(layout)}
    opened, other = write_two_file_set(tmp_path, pyramid=False, own=own)
    with tifffile.TiffFile(opened) as tif:  # the premise: tifffile reads it as the set's
        assert other.name in {p.parent.filename for s in tif.series for p in s.pages}
    with pytest.raises(ImageReadError) as info:
        open_image(opened)
    assert str(info.value).startswith(
        f"{opened}: one file of an OME-TIFF set whose OME-XML names its files by UUID; it "
        f"gives '{other.name}' as urn:uuid:2, but {other.resolve()} is urn:uuid:9 (the UUID "
        "of that file's own OME-XML, which names a set of its own): a file of another"
    )


_SLIDE_HERE = ome_image(0, "slide", SHAPE, 0.25, '<TiffData IFD="0" PlaneCount="1"/>')


@pytest.mark.parametrize(
    ("description", "is_ome"),
    [
        ("set_1, the slide", False),  # no OME-XML
        (ome_xml(_SLIDE_HERE, uuid=None), True),  # OME-XML of no UUID of its own
        (ome_xml(_SLIDE_HERE, uuid="urn:uuid:7"), True),  # tifffile's: of no set
        (_of_another_set("whole XML").replace("urn:uuid:9", "URN:UUID:2"), True),
    ],
    ids=["no OME-XML", "no UUID of its own", "of no set", "the set's UUID in capitals"],
)
def test_a_multi_file_ome_set_whose_file_states_no_other_uuid_reads(tmp_path, description, is_ome):
    opened, other = write_two_file_set(tmp_path, pyramid=False, own={"description": description})
    with tifffile.TiffFile(other) as tif:  # the premise: tifffile wrote no OME-XML of its own
        assert (tif.is_ome, tif.pages.first.description) == (is_ome, description)
    reader = open_image(opened)
    np.testing.assert_array_equal(reader.read(0, 256, 0, 384), _image())


def test_a_multi_file_ome_set_put_together_by_hand_with_tifffile_reads(tmp_path):
    """c1.ome.tif gets tifffile's own OME-XML, with a fresh UUID of its own (tifffile's author
    builds sets so): no set's file, so read as the set's, as tifffile and Bio-Formats read it."""
    opened, other, planes = write_channel_set(tmp_path, own={})
    with tifffile.TiffFile(other) as tif:  # the premise
        assert tif.is_ome and ET.fromstring(tif.ome_metadata).get("UUID") != "urn:uuid:2"
    np.testing.assert_array_equal(open_image(opened).read(0, 256, 0, 384), planes)


def edit_description(path: Path, old: str, new: str) -> None:
    """Replace ``old`` (which must be there) with ``new`` in the first IFD's ImageDescription
    of ``path``, in place, as a hand edit or a damaged copy would leave the OME-XML."""
    with tifffile.TiffFile(path, mode="r+b") as tif:
        tag = tif.pages.first.tags["ImageDescription"]
        assert old in tag.value  # the premise
        tag.overwrite(tag.value.replace(old, new))


def _trade_names(a: Path, b: Path) -> None:
    a.rename(a.with_name("trading"))
    b.rename(a)
    a.with_name("trading").rename(b)


@pytest.mark.parametrize(
    ("layout", "edit", "conflict"),
    [
        (
            "channel",
            ('"c1.ome.tif">urn:uuid:2', '"c1.ome.tif">urn:uuid:1'),
            "urn:uuid:1: 'c0.ome.tif' (this file), 'c1.ome.tif'",
        ),
        (
            "channel",
            ('"c1.ome.tif">urn:uuid:2', '"c0.ome.tif">urn:uuid:2'),
            "'c0.ome.tif' (this file): urn:uuid:1, urn:uuid:2",
        ),
        (
            "renamed",
            None,
            "'c1.ome.tif' (this file): urn:uuid:1, urn:uuid:2; "
            "urn:uuid:1: 'c0.ome.tif', 'c1.ome.tif' (this file)",
        ),
        (
            "pyramid",
            ('"set_1.ome.tif">urn:uuid:2', '"set_1.ome.tif">urn:uuid:1'),
            "urn:uuid:1: 'set.ome.tif' (this file), 'set_1.ome.tif'",
        ),
    ],
    ids=["its own UUID to another", "two UUIDs to itself", "two files renamed", "slide's"],
)
def test_a_multi_file_ome_set_whose_xml_names_its_files_at_odds_is_refused(
    tmp_path, layout, edit, conflict
):
    """tifffile finds a set's files by UUID (the OME element's is the file opened; the first
    name given for another), Bio-Formats by name. Where they disagree tifffile read one file's
    planes as another's without a word: channel 0 twice, or (the slide's UUID the label's) the
    label in the slide's place. "renamed": c0.ome.tif and c1.ome.tif trade names."""
    if layout == "pyramid":
        opened, _ = write_two_file_set(tmp_path, pyramid=True)
    else:
        opened, other, _ = write_channel_set(tmp_path)
    if layout == "renamed":
        _trade_names(opened, other)
        opened = other
    else:
        edit_description(opened, *edit)
    with pytest.raises(ImageReadError) as info:
        open_image(opened)
    assert str(info.value) == (
        f"{opened}: one file of an OME-TIFF set whose OME-XML gives a file two UUIDs or a UUID "
        f"two files ({conflict}): tifffile finds the files by UUID, Bio-Formats by name, and "
        "would read one file's planes as another's. Put the set's files together again under "
        "the names they were written with, or correct the OME-XML"
    )


@pytest.mark.parametrize(
    ("old", "new", "damage"),
    [
        (  # channel 1's TiffData without its UUID: IFD 0 of the file opened, channel 0 again
            '<UUID FileName="c1.ome.tif">urn:uuid:2</UUID>',
            "",
            "level 0 reads IFD 0 of {opened} as two of its planes (0 and 1 of 2: channels, "
            "Z, T); the OME-XML is damaged",
        ),
        (  # tifffile indexes a file's pages by it, as Python does: -1 is the last
            'FirstC="1" IFD="0"',
            'FirstC="1" IFD="-1"',
            "its OME-XML places a plane at IFD -1 (TiffData), a negative one, which tifffile "
            "counts from the last IFD; the OME-XML is damaged",
        ),
        (  # without C both TiffData place their plane at index 0: one channel of two read
            'DimensionOrder="XYCZT"',
            'DimensionOrder="XYZT"',
            "its OME-XML gives DimensionOrder 'XYZT', not one of XYZCT, XYZTC, XYCTZ, XYCZT, "
            "XYTCZ, XYTZC: tifffile would read one plane in place of several; the OME-XML is "
            "damaged",
        ),
    ],
    ids=["one IFD for two planes", "negative IFD", "DimensionOrder without C"],
)
def test_a_multi_file_ome_set_whose_xml_places_planes_at_odds_is_refused(
    tmp_path, old, new, damage
):
    opened, _, _ = write_channel_set(tmp_path)
    edit_description(opened, old, new)
    with pytest.raises(ImageReadError) as info:
        open_image(opened)
    assert str(info.value) == f"{opened}: " + damage.format(opened=opened)


@pytest.mark.parametrize("keep", [8, 1000], ids=["its header", "its IFD, not its values"])
def test_a_multi_file_ome_set_with_a_file_tifffile_fails_on_names_the_set(tmp_path, keep):
    """tifffile raises (not logs) on some files of a set cut short, as it lists the set's
    planes: the error named the file opened alone, which is whole, as not a TIFF."""
    opened, other, _ = write_channel_set(tmp_path)
    other.write_bytes(other.read_bytes()[:keep])
    with pytest.raises(ImageReadError) as info:
        open_image(opened)
    assert str(info.value).startswith(
        f"{opened}: not a readable TIFF, or a file of its OME-TIFF set ('c1.ome.tif') is not "
        "(corrupt, truncated or another format): "
    )


def test_a_multi_file_ome_set_naming_a_file_by_an_empty_name_is_refused(tmp_path):
    """tifffile cannot open the folder it names: it leaves out the slide's Image, and the
    label was read in its place."""
    opened, _ = write_two_file_set(tmp_path, pyramid=False)
    edit_description(opened, 'FileName="set_1.ome.tif"', 'FileName=""')
    with pytest.raises(ImageReadError, match=r"places image planes in '', in .*; '' was not"):
        open_image(opened)


def test_a_renamed_ome_tiff_naming_itself_by_its_old_name_and_own_uuid_reads(tmp_path):
    """Bio-Formats names a single file's own planes by its name and UUID: renamed, the name
    is of no file beside it, and tifffile and Bio-Formats both read this file by the UUID."""
    path, img = tmp_path / "renamed.ome.tif", _image()
    slide = ome_image(0, "slide", SHAPE, 0.25, in_file("orig.ome.tif", "urn:uuid:1"))
    tifffile.imwrite(path, img, description=ome_xml(slide, uuid="urn:uuid:1"), **KW)
    np.testing.assert_array_equal(open_image(path).read(0, 256, 0, 384), img)


def test_a_renamed_ome_tiff_naming_itself_by_its_uuid_in_other_case_is_refused_saying_so(
    tmp_path,
):
    """UUIDs are one whatever their letter case, but tifffile compares them as written: it
    looks for the planes in the old name's file and zeroes them. Refused, saying that (not
    that a file of a set is missing); the advice given, followed, makes the file read."""
    path, img = tmp_path / "renamed.ome.tif", _image()
    slide = ome_image(0, "slide", SHAPE, 0.25, in_file("orig.ome.tif", "urn:uuid:ab"))
    tifffile.imwrite(path, img, description=ome_xml(slide, uuid="urn:uuid:AB"), **KW)
    with pytest.raises(ImageReadError) as info:
        open_image(path)
    assert str(info.value) == (
        f"{path}: its OME-XML places its planes in 'orig.ome.tif' by this file's own UUID "
        "written in other letter case ('urn:uuid:AB' and 'urn:uuid:ab'), which tifffile takes "
        "for another file's: it would read zeros in their place. Write the UUIDs alike in the "
        "OME-XML (e.g. with tifffile's tiffcomment) and open it again"
    )
    with tifffile.TiffFile(path) as tif:
        xml = tif.pages.first.description
    tifffile.tiffcomment(path, xml.replace("urn:uuid:AB", "urn:uuid:ab"))
    np.testing.assert_array_equal(open_image(path).read(0, 256, 0, 384), img)


@pytest.mark.parametrize(
    ("layout", "damage"),
    [
        ("pyramid", "cut short"),  # tifffile takes it for no OME-XML: the label is read
        ("channel", "cut short"),  # channel 0 alone is read
        ("channel", "not well-formed"),  # channel 0 alone is read, warned of as no pixel size
    ],
)
def test_a_multi_file_ome_set_whose_xml_is_damaged_is_refused(tmp_path, layout, damage):
    if layout == "pyramid":
        opened, other = write_two_file_set(tmp_path, pyramid=True)
    else:
        opened, other, _ = write_channel_set(tmp_path)
    with tifffile.TiffFile(opened) as tif:
        xml = tif.pages.first.description
    edit = xml[-40:] if damage == "cut short" else "</Pixels>"
    edit_description(opened, edit, "" if damage == "cut short" else "</Pixel>")
    with pytest.raises(ImageReadError) as info:
        open_image(opened)
    assert str(info.value) == (
        f"{opened}: its OME-XML is damaged ({damage}) and names other files of an OME-TIFF "
        f"set ('{other.name}'): only this file's own planes would be read, as an image of "
        "their own. Restore the OME-XML from a copy of the set as written, or open the set "
        "converted into one OME-TIFF"
    )


def test_a_renamed_ome_tiff_without_a_uuid_of_its_own_reads(tmp_path):
    """Its OME-XML knows its planes by the file's old name alone (no root UUID): tifffile,
    finding no such file, reads this file's pages, which are the image."""
    path, img = tmp_path / "renamed.ome.tif", _image()
    slide = ome_image(0, "slide", SHAPE, 0.25, in_file("orig.ome.tif", "urn:uuid:1"))
    tifffile.imwrite(path, img, description=ome_xml(slide, uuid=None), **KW)
    reader = open_image(path)
    assert (reader.vendor, reader.pixel_size_um) == ("ome", 0.25)
    np.testing.assert_array_equal(reader.read(0, 256, 0, 384), img)


_SLIDE_ELSEWHERE = ome_image(1, "slide", SHAPE, 0.25, in_file("set_1.ome.tif", "urn:uuid:2"))


@pytest.mark.parametrize(
    ("images", "pixels"),
    [
        # A placeholder of the label's size, the label an Image of no pixels.
        ((ome_image(0, "label", (40, 60), 5.0, ""), _SLIDE_ELSEWHERE), (40, 60)),
        # An Image in this file (a TiffData without UUID), another of its size in another.
        ((ome_image(0, "slide 0", SHAPE, 0.25, '<TiffData IFD="0"/>'), _SLIDE_ELSEWHERE), SHAPE),
        # Images of this file's size in two other files.
        (
            (
                ome_image(0, "slide 0", SHAPE, 0.25, in_file("set_2.ome.tif", "urn:uuid:3")),
                _SLIDE_ELSEWHERE,
            ),
            SHAPE,
        ),
        # The slide at IFD 1 of its file: not this file, of one IFD.
        ((ome_image(0, "slide", SHAPE, 0.25, in_file("set_1.ome.tif", "urn:uuid:2", 1)),), SHAPE),
    ],
)
def test_a_set_without_uuids_missing_the_file_of_its_slide_is_refused(tmp_path, images, pixels):
    """Not a renamed file (:func:`test_a_renamed_ome_tiff_without_a_uuid_of_its_own_reads`):
    this one does not hold the slide its OME-XML, of no UUID of its own, places elsewhere."""
    path = tmp_path / "set.ome.tif"
    xml = ome_xml(*images, uuid=None)
    tifffile.imwrite(path, np.zeros((*pixels, 3), np.uint8), description=xml, **KW)
    with pytest.raises(ImageReadError, match=r"'set_1\.ome\.tif' is not there"):
        open_image(path)


def test_a_multi_file_ome_set_opened_at_a_url_is_refused(tmp_path):
    """tifffile opens a set's other files beside a local file only."""
    import fsspec

    memory = fsspec.filesystem("memory")
    for file in write_two_file_set(tmp_path, pyramid=False):
        memory.pipe(f"/segpipe-ome-set/{file.name}", file.read_bytes())
    try:
        with pytest.raises(ImageReadError) as info:
            open_image("memory://segpipe-ome-set/set.ome.tif")
    finally:
        memory.rm("/segpipe-ome-set", recursive=True)
    assert str(info.value) == (
        "memory://segpipe-ome-set/set.ome.tif: one file of an OME-TIFF set whose OME-XML "
        "places image planes in 'set_1.ome.tif', opened at a URL, where tifffile opens none of "
        "a set's other files; copy the set's files into one local folder and open this file "
        "there"
    )


def test_a_file_of_an_ome_set_whose_xml_is_in_a_companion_file_is_refused(tmp_path):
    """tifffile reads no companion OME-XML: it read this file's one channel as the image."""
    path = tmp_path / "c1.ome.tif"
    xml = (
        f'<?xml version="1.0" encoding="UTF-8"?><OME xmlns="{OME_NS}" UUID="urn:uuid:2">'
        '<BinaryOnly MetadataFile="set.companion.ome" UUID="urn:uuid:0"/></OME>'
    )
    tifffile.imwrite(path, _image()[..., 1], metadata=None, description=xml)
    with pytest.raises(ImageReadError) as info:
        open_image(path)
    assert str(info.value) == (
        f"{path}: one file of an OME-TIFF set whose OME-XML is in 'set.companion.ome' "
        "(BinaryOnly), which tifffile does not read: only this file's planes would be read, "
        "as an image of their own. Convert the set into one OME-TIFF (bfconvert "
        "set.companion.ome out.ome.tif) and open that"
    )


@pytest.mark.parametrize(
    "tiffdata",
    [
        '<TiffData IFD="0" PlaneCount="1"/>',  # two channels, one plane listed
        '<TiffData FirstC="0" IFD="0" PlaneCount="1"/><TiffData FirstC="1" IFD="4" '
        'PlaneCount="1"/>',  # the second at an IFD past the file's one
    ],
)
def test_an_ome_tiff_declaring_planes_it_does_not_hold_is_refused(tmp_path, tiffdata):
    """tifffile gives the channel it finds no IFD for as zeros."""
    path = tmp_path / "one.ome.tif"
    tifffile.imwrite(
        path,
        _image()[..., 0],
        photometric="minisblack",
        metadata=None,
        description=ome_xml(ome_channels(tiffdata)),
    )
    with pytest.raises(ImageReadError) as info:
        open_image(path)
    assert str(info.value).startswith(
        f"{path}: 1 of the 2 image planes (channels, Z, T) of level 0 are in no IFD"
    )


def test_ome_pixel_size_of_several_series_tifffile_wrote_is_the_slides(tmp_path):
    path = tmp_path / "three.ome.tif"
    label, slide = np.zeros((40, 60, 3), np.uint8), _image()
    with tifffile.TiffWriter(path, ome=True) as tif:
        tif.write(label, photometric="rgb", metadata={"Name": "label", "PhysicalSizeX": 5.0})
        tif.write(slide, photometric="rgb", metadata={"Name": "slide", "PhysicalSizeX": 0.25})
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)  # a label beside the slide: no news
        assert open_image(path).pixel_size_um == 0.25


def test_ome_tiffdata_that_list_no_ifd_read_give_the_image_in_series_order(tmp_path):
    """TiffData pointing past the file's IFDs: tifffile reads the pages as a series of its
    own, which no Image lists; the Image in the series' place gives the size, as before."""
    path = tmp_path / "nowhere.ome.tif"
    xml = ome_xml(ome_image(0, "slide", SHAPE, 0.5, '<TiffData IFD="7" PlaneCount="1"/>'))
    tifffile.imwrite(path, _image(), description=xml, **KW)
    assert open_image(path).pixel_size_um == 0.5


def _damage_level_0_length(path: Path, rows: int) -> Path:
    """``path`` with its first IFD's ImageLength (TIFF tag 257) overwritten to ``rows``, as a
    bit flip or a hand edit leaves it."""
    with tifffile.TiffFile(path) as tif:
        tag = tif.pages.first.tags["ImageLength"]
        at, fmt = tag.valueoffset, tif.byteorder + ("H" if tag.dtype == 3 else "I")
    with open(path, "r+b") as f:
        f.seek(at)
        f.write(struct.pack(fmt, rows))
    return path


def write_svs(path: Path, img: np.ndarray, *, macro: bool = False) -> Path:
    """Aperio SVS as scanners lay it out: the tiled baseline (MPP 0.5), a stripped thumbnail
    (reduced by 8), a tiled level reduced by 2, and with ``macro`` a 150 x 200 macro image."""
    aperio = "Aperio Image Library v12.0.15\r\n"
    pages = [
        (img, {"tile": (64, 64)}, f"{aperio}384x256 (64x64) JPEG/RGB Q=70|AppMag = 20|MPP = 0.5"),
        (img[::8, ::8], {}, f"{aperio}thumbnail"),
        (img[::2, ::2], {"tile": (64, 64)}, aperio),
        *([(np.zeros((150, 200, 3), np.uint8), {}, f"{aperio}macro 200x150")] if macro else []),
    ]
    with tifffile.TiffWriter(path) as tif:
        for pixels, layout, desc in pages:
            tif.write(np.ascontiguousarray(pixels), description=desc, **layout, **KW)
    return path


@pytest.mark.filterwarnings("ignore:.*holds 2 images:UserWarning")
def test_an_ome_pyramid_whose_level_0_size_tag_is_damaged_is_refused(tmp_path):
    """tifffile gives up on the OME-XML and lists plain pages, the reduced level (its SubIFD)
    the largest: it was read as the whole image, at level 0's OME pixel size."""
    path, img = tmp_path / "pyramid.ome.tif", _image()
    with tifffile.TiffWriter(path, ome=True) as tif:
        meta = {"axes": "YXS", "PhysicalSizeX": 0.25, "PhysicalSizeY": 0.25}
        tif.write(img, subifds=1, tile=(64, 64), photometric="rgb", metadata=meta)
        tif.write(img[::2, ::2], subfiletype=1, tile=(64, 64), photometric="rgb")
    assert open_image(path).level_shapes == ((256, 384, 3), (128, 192, 3))
    _damage_level_0_length(path, 7)
    with tifffile.TiffFile(path) as tif:  # the premise: two plain series, the reduced largest
        assert [(s.kind, s.shape) for s in tif.series] == [
            ("generic", (7, 384, 3)),
            ("generic", (128, 192, 3)),
        ]
    with pytest.raises(ImageReadError) as info:
        open_image(path)
    assert str(info.value).startswith(
        f"{path}: its OME-XML does not describe its images (sizes, channels or planes at odds "
        "with the TIFF tags: the metadata is damaged); read as plain TIFF pages instead, the "
        "largest, series 1 (128x192x3), is of no size an OME Image has"
    )


@pytest.mark.parametrize(
    ("write", "rows", "message"),
    [
        # The thumbnail, the largest image left, was read as the slide at the slide's MPP.
        (
            write_svs,
            2,
            r"the SVS's series 0 'Baseline' \(2x384x3\) is smaller than its series 1 "
            r"'Thumbnail' \(32x48x3\), a reduction of it: a size tag .* is damaged",
        ),
        # Larger than the thumbnail, smaller than the macro, which was read as the slide.
        (
            lambda p, i: write_svs(p, i, macro=True),
            40,
            r"pyramid level 1 \(128, 192, 3\) .* is not a reduction of level 0 \(40, 384, 3\)",
        ),
    ],
    ids=["svs-thumbnail", "svs-macro"],
)
def test_a_slide_whose_level_0_size_tag_is_damaged_is_refused_not_read_as_its_macro(
    tmp_path, write, rows, message
):
    path = write(tmp_path / "slide.svs", _image())
    assert open_image(path).level_shapes[0] == (256, 384, 3)
    _damage_level_0_length(path, rows)
    with pytest.raises(ImageReadError, match=rf"slide\.svs: {message}"):
        open_image(path)


# --- OpenSlide, for the formats tifffile cannot read (MRXS, VMS, ...) ---------------------------


def test_openslide_reader_reads_what_tifffile_reads(tmp_path):
    """OpenSlideReader's levels, pixel size and pixels agree with TiffReader's on one NDPI."""
    pytest.importorskip("openslide")
    import pickle

    from segpipe.io.readers import OpenSlideReader

    path = write_ndpi(tmp_path / "scan.ndpi", _image(), mpp=0.2263, jpeg=True)
    ours, theirs = OpenSlideReader(path), open_image(path)
    assert ours.vendor == "hamamatsu" and ours.magnification == 20.0
    assert ours.pixel_size_um == pytest.approx(theirs.pixel_size_um)
    assert ours.level_shapes[:2] == theirs.level_shapes  # OpenSlide adds smaller levels of its own
    np.testing.assert_allclose(ours.read(10, 200, 30, 300), theirs.read(10, 200, 30, 300), atol=2)
    half = pickle.loads(pickle.dumps(ours)).level(1).compute()  # handles re-open after pickling
    np.testing.assert_allclose(half, theirs.level(1).compute(), atol=2)
    assert ours.mask_kind == "alpha" and ours.valid_mask(0, 256, 0, 384).all()


def test_openslide_formats_are_routed_and_errors_name_the_file(tmp_path):
    pytest.importorskip("openslide")
    path = tmp_path / "slide.mrxs"
    path.write_text("[GENERAL]\nnot a real slide\n")
    with pytest.raises(ImageReadError, match=r"slide\.mrxs: OpenSlide cannot open it"):
        open_image(path)


def test_missing_openslide_says_what_to_install(tmp_path, monkeypatch):
    import sys

    monkeypatch.setitem(sys.modules, "openslide", None)  # import openslide now fails
    path = tmp_path / "slide.mrxs"
    path.write_text("[GENERAL]\n")
    with pytest.raises(ImageReadError, match=r"slide\.mrxs: .*segpipe\[slides\]"):
        open_image(path)


@pytest.mark.parametrize("name", ["overview", "label", "Thumbnail"])
def test_a_plain_tiffs_image_named_like_a_scanners_extra_is_still_the_image(tmp_path, name):
    """The names a scanner gives the images beside a slide were left out of any TIFF: a
    user's image named "overview" was passed over for a 100 x 120 one, without a word."""
    image = np.random.default_rng(0).integers(0, 255, (100, 120), dtype=np.uint8)
    path = tmp_path / "named.tif"
    with tifffile.TiffWriter(path) as tif:
        tif.write(np.kron(image, np.ones((10, 10), np.uint8)), metadata={"name": name})
        tif.write(image, metadata={"name": "other"})
    with pytest.warns(UserWarning, match=r"leaving out series 1 'other'"):
        reader = open_image(path)
    assert reader.level_shapes[0][:2] == (1000, 1200)
    # Beside another image, an image of that name is no news, left out without a word.
    with tifffile.TiffWriter(path) as tif:
        tif.write(np.kron(image, np.ones((10, 10), np.uint8)), metadata={"name": "slide"})
        tif.write(image, metadata={"name": name})
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)
        assert open_image(path).level_shapes[0][:2] == (1000, 1200)


def _jfif_ycbcr(rgb: np.ndarray) -> np.ndarray:
    """JFIF's RGB to YCbCr (BT.601, full range), rounded to uint8: what Aperio's encoder keeps."""
    r, g, b = (rgb[..., k].astype(np.float64) for k in range(3))
    y = 0.299 * r + 0.587 * g + 0.114 * b
    cb = 128 - 0.168736 * r - 0.331264 * g + 0.5 * b
    cr = 128 + 0.5 * r - 0.418688 * g - 0.081312 * b
    return np.stack([y, cb, cr], axis=-1).round().clip(0, 255).astype(np.uint8)


def test_an_aperio_jpeg_2000_ycbcr_slide_reads_as_rgb_as_openslide_reads_it(tmp_path):
    """Aperio's compression 33003 holds YCbCr in JPEG 2000 tiles tagged RGB; the codec gives
    Y, Cb, Cr, which were read as red, green and blue (a pink tissue came out blue)."""
    imagecodecs = pytest.importorskip("imagecodecs")
    yy, xx = np.mgrid[:192, :256]
    rgb = np.stack([np.full(yy.shape, 200), xx * 0.9 + 10, yy + 40], -1).astype(np.uint8)
    ycc = _jfif_ycbcr(rgb)
    tiles = (
        imagecodecs.jpeg2k_encode(
            ycc[y : y + 64, x : x + 64], level=0, codecformat="J2K", mct=False
        )
        for y in range(0, 192, 64)
        for x in range(0, 256, 64)
    )
    path = tmp_path / "j2k.svs"
    desc = "Aperio Image Library v10.0.50\r\n256x192 (64x64) J2K/YUV16 Q=70|MPP = 0.5"
    layout = {"shape": (192, 256, 3), "dtype": np.uint8, "tile": (64, 64), "photometric": "rgb"}
    tifffile.imwrite(path, tiles, compression=33003, description=desc, metadata=None, **layout)
    with tifffile.TiffFile(path) as tif:  # the premise: tifffile hands out the YCbCr samples
        assert tif.pages[0].compression == 33003 and np.array_equal(tif.pages[0].asarray(), ycc)
    pixels = open_image(path).read(0, 192, 0, 256)
    # lossless tiles: within the rounding of the YCbCr samples of the image written
    assert np.abs(pixels.astype(int) - rgb).max() <= 1
    openslide = pytest.importorskip("openslide")
    with openslide.OpenSlide(path) as slide:
        theirs = np.asarray(slide.read_region((0, 0), 0, (256, 192)))[..., :3]
    np.testing.assert_array_equal(pixels, theirs)
    assert np.array_equal(open_image(path).read(17, 90, 33, 201), theirs[17:90, 33:201])
