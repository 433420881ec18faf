"""DICOM whole-slide images through segpipe.io.readers.DicomReader (wsidicom).

The test writes a two-level VL Whole Slide Microscopy series with pydicom (TILED_FULL,
uncompressed 64 x 64 frames, one instance per level, PixelSpacing in the shared functional
groups) and reads it back against the pixels and the pixel spacing written.
"""

from __future__ import annotations

import contextlib
import pickle
import re
import struct
import threading
import warnings
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
from test_readers import closed_during_a_held_read

from segpipe.io.describe import describe_image
from segpipe.io.readers import DicomReader, ImageReadError, open_image

pydicom = pytest.importorskip("pydicom")
pytest.importorskip("wsidicom")


def _image() -> np.ndarray:
    yy, xx = np.mgrid[:200, :300]
    return np.stack([yy, xx * 0.8, (yy + xx) * 0.5], axis=-1).astype(np.uint8)


def write_dicom_wsi(
    folder: Path,
    img: np.ndarray,
    mpp: float = 0.25,
    tile: int = 64,
    *,
    name: str = "level",
    optical_paths: list[tuple[str, str | None]] | None = None,
    focal_planes: int = 1,
    pixel_spacing: bool = True,
    levels: tuple[int, ...] = (0, 1),
    uids: tuple[str, str, str] | None = None,
    origin_mm: tuple[float, float] = (20.0, 40.0),
    grey: str = "MONOCHROME2",
    x_mpp: float | None = None,
) -> Path:
    """One DICOM instance per level (level k = ``img[::2**k, ::2**k]``), tiles row by row,
    files ``{name}{k}.dcm``, a new series unless ``uids`` (study, series, frame of
    reference) names one.

    ``img`` is ``(Y, X, S * P)``: S samples (3: RGB, 1: grey) for each of the P
    ``optical_paths`` (``(identifier, description)`` each; one unnamed path by default);
    each path's tiles are repeated on ``focal_planes`` planes 1 um apart.
    ``pixel_spacing=False`` leaves PixelSpacing out. ``origin_mm``: (x, y) of the image's
    top-left corner on the slide; wsidicom makes images of one series at other origins
    pyramids of their own. ``grey``: the PhotometricInterpretation of grey samples.
    ``x_mpp``: the columns' spacing, when not ``mpp`` (the rows').
    """
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.sequence import Sequence
    from pydicom.uid import ExplicitVRLittleEndian, VLWholeSlideMicroscopyImageStorage, generate_uid

    folder.mkdir(parents=True, exist_ok=True)
    study, series, frame_of_reference = uids or (generate_uid(), generate_uid(), generate_uid())
    paths = optical_paths or [("0", None)]
    samples = img.shape[2] // len(paths)
    for k in levels:
        level, spacing_mm = img[:: 2**k, :: 2**k], mpp * 2**k / 1000
        ny, nx, nc = level.shape
        ty, tx = -(-ny // tile), -(-nx // tile)
        padded = np.zeros((ty * tile, tx * tile, nc), img.dtype)
        padded[:ny, :nx] = level
        tiles = padded.reshape(ty, tile, tx, tile, len(paths), samples).transpose(4, 0, 2, 1, 3, 5)
        # TILED_FULL order: tiles row by row, then focal planes, then optical paths
        frames = np.repeat(tiles[:, None], focal_planes, axis=1)
        ds = Dataset()
        ds.file_meta = FileMetaDataset()
        uid = generate_uid()
        ds.file_meta.MediaStorageSOPClassUID = VLWholeSlideMicroscopyImageStorage
        ds.file_meta.MediaStorageSOPInstanceUID = uid
        ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds.SOPClassUID, ds.SOPInstanceUID = VLWholeSlideMicroscopyImageStorage, uid
        ds.StudyInstanceUID, ds.SeriesInstanceUID = study, series
        ds.FrameOfReferenceUID, ds.Modality, ds.InstanceNumber = frame_of_reference, "SM", k + 1
        ds.ImageType = (
            ["ORIGINAL", "PRIMARY", "VOLUME", "NONE"]
            if k == 0
            else ["DERIVED", "PRIMARY", "VOLUME", "RESAMPLED"]
        )
        ds.Rows = ds.Columns = tile
        ds.TotalPixelMatrixRows, ds.TotalPixelMatrixColumns = ny, nx
        ds.TotalPixelMatrixFocalPlanes = focal_planes
        ds.NumberOfFrames = ty * tx * focal_planes * len(paths)
        ds.DimensionOrganizationType = "TILED_FULL"
        if samples == 3:
            ds.SamplesPerPixel, ds.PhotometricInterpretation, ds.PlanarConfiguration = 3, "RGB", 0
        else:
            ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, grey
        bits = img.dtype.itemsize * 8
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = (
            bits,
            bits,
            bits - 1,
            0,
        )
        ds.ImagedVolumeWidth, ds.ImagedVolumeHeight = nx * spacing_mm, ny * spacing_mm
        ds.ImagedVolumeDepth = 0.001
        if pixel_spacing:
            measures = Dataset()
            x_mm = spacing_mm if x_mpp is None else x_mpp * 2**k / 1000
            # PixelSpacing is (rows, columns): the spacing along y, then along x.
            measures.PixelSpacing, measures.SliceThickness = [spacing_mm, x_mm], 0.001
            measures.SpacingBetweenSlices = 0.001
            shared = Dataset()
            shared.PixelMeasuresSequence = Sequence([measures])
            ds.SharedFunctionalGroupsSequence = Sequence([shared])
        origin = Dataset()
        origin.XOffsetInSlideCoordinateSystem, origin.YOffsetInSlideCoordinateSystem = origin_mm
        ds.TotalPixelMatrixOriginSequence = Sequence([origin])
        ds.ImageOrientationSlide = [0, -1, 0, -1, 0, 0]  # the label on the left
        items = []
        for identifier, description in paths:
            item = Dataset()
            item.OpticalPathIdentifier = identifier
            if description is not None:
                item.OpticalPathDescription = description
            items.append(item)
        ds.OpticalPathSequence, ds.NumberOfOpticalPaths = Sequence(items), len(paths)
        ds.PixelData = frames.tobytes()
        ds.save_as(folder / f"{name}{k}.dcm", enforce_file_format=True)
    return folder


@pytest.fixture(scope="module")
def slide(tmp_path_factory):
    return write_dicom_wsi(tmp_path_factory.mktemp("dicom") / "slide", _image())


@pytest.mark.parametrize("by", ["folder", "file"])
def test_dicom_wsi_reads_back(slide, by):
    img = _image()
    reader = open_image(slide if by == "folder" else slide / "level1.dcm")
    assert isinstance(reader, DicomReader)
    assert reader.path == str(slide if by == "folder" else slide / "level1.dcm")
    assert reader.pixel_size_um == pytest.approx(0.25)
    assert reader.level_shapes == ((200, 300, 3), (100, 150, 3))
    assert reader.dtype == np.uint8
    np.testing.assert_array_equal(reader.read(0, 200, 0, 300), img)
    np.testing.assert_array_equal(reader.read(70, 130, 90, 250), img[70:130, 90:250])
    np.testing.assert_array_equal(
        reader.read(30, 80, 50, 140, level=1), img[::2, ::2][30:80, 50:140]
    )


def test_dicom_reader_pickles_and_computes_levels(slide):
    reader = pickle.loads(pickle.dumps(open_image(slide)))
    np.testing.assert_array_equal(reader.level(1).compute(), _image()[::2, ::2])


def test_describe_a_dicom_slide(slide):
    info = describe_image(slide)
    assert (info.vendor, info.pixel_size_um, info.channels) == ("dicom", 0.25, 3)


def test_a_folder_without_a_wsi_series_is_refused(tmp_path):
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "a.dcm").write_bytes(b"not dicom")
    with pytest.raises(ImageReadError, match="notes: no readable DICOM WSI series"):
        open_image(tmp_path / "notes")


def _other_image() -> np.ndarray:
    return np.random.default_rng(3).integers(0, 255, (140, 90, 3), dtype=np.uint8)


@pytest.fixture
def two_slides(tmp_path):
    """Two slides (series) in one folder: a0/a1.dcm of _image(), b0/b1.dcm of _other_image()."""
    write_dicom_wsi(tmp_path / "two", _image(), name="a")
    return write_dicom_wsi(tmp_path / "two", _other_image(), name="b")


@pytest.mark.parametrize(("file", "img"), [("b0.dcm", _other_image()), ("a1.dcm", _image())])
def test_a_file_reads_its_own_series_beside_another(two_slides, file, img):
    reader = open_image(two_slides / file)
    assert reader.level_shapes == (img.shape, img[::2, ::2].shape)
    np.testing.assert_array_equal(reader.read(0, img.shape[0], 0, img.shape[1]), img)
    assert reader.path == str(two_slides / file)
    clone = pickle.loads(pickle.dumps(reader))
    np.testing.assert_array_equal(clone.level(1).compute(), img[::2, ::2])


def test_a_folder_of_two_series_is_refused_naming_them(two_slides):
    uids = {pydicom.dcmread(two_slides / f).SeriesInstanceUID for f in ("a0.dcm", "b0.dcm")}
    with pytest.raises(ImageReadError) as info:
        open_image(two_slides)
    message = str(info.value)
    assert message.startswith(f"{two_slides}: holds 2 DICOM WSI series")
    assert all(uid in message for uid in uids)
    assert "200 x 300 px" in message and "140 x 90 px" in message
    assert "pass one file of the wanted slide" in message


def _garbled(uid: str) -> str:
    """``uid`` with its last digit changed, as a bit flipped in a copy would."""
    return uid[:-1] + ("2" if uid[-1] == "1" else "1")


@pytest.mark.parametrize(
    ("file", "stray", "read"), [("level0.dcm", "level1.dcm", 0), ("level1.dcm", "level0.dcm", 1)]
)
def test_a_level_of_the_slide_in_another_series_is_warned_of_naming_it(tmp_path, file, stray, read):
    """A SeriesInstanceUID garbled by a digit makes a level of the slide a series of its
    own: the file's series is read, and the level left out is named, with its series."""
    from pydicom.uid import generate_uid

    study, series, frame = generate_uid(), generate_uid(), generate_uid()
    folder = write_dicom_wsi(tmp_path / "slide", _image(), levels=(0,), uids=(study, series, frame))
    write_dicom_wsi(folder, _image(), levels=(1,), uids=(study, _garbled(series), frame))
    own, other = (series, _garbled(series)) if read == 0 else (_garbled(series), series)
    with pytest.warns(UserWarning, match="in other series are left out") as record:
        reader = open_image(folder / file)
    assert reader.level_shapes == (_image()[:: 2**read, :: 2**read].shape,)
    assert len(record) == 1 and record[0].filename == __file__
    assert str(record[0].message).startswith(
        f"{folder / file}: reading its series {own} only; pyramid level files beside it of "
        f"its slide (its study and frame of reference) in other series are left out: {stray} "
        f"of series {other}; if they belong to it"
    )


@pytest.mark.parametrize("other", ["label", "another container", "no frame of reference"])
def test_another_series_not_of_the_slides_levels_is_passed_over_quietly(tmp_path, other):
    """A slide's label in a series of its own, or another slide of the study (its own
    container, or a frame of reference that would tell them apart not stated): no stray."""
    from pydicom.uid import generate_uid

    study, series, frame = generate_uid(), generate_uid(), generate_uid()
    folder = write_dicom_wsi(tmp_path / "slide", _image(), uids=(study, series, frame))
    write_dicom_wsi(
        folder, _image(), levels=(0,), name="other", uids=(study, _garbled(series), frame)
    )
    if other == "label":
        _set(folder / "other0.dcm", ImageType=["ORIGINAL", "PRIMARY", "LABEL", "NONE"])
    for f in sorted(folder.iterdir()):
        if other == "another container":
            _set(f, ContainerIdentifier="B 7" if f.name == "other0.dcm" else "A 1")
        elif other == "no frame of reference":
            _set(f, FrameOfReferenceUID=None)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        reader = open_image(folder / "level0.dcm")
    assert reader.level_shapes == ((200, 300, 3), (100, 150, 3))


@pytest.mark.parametrize(
    ("paths", "samples", "dtype", "names"),
    [
        ([("b", "DAPI"), ("a", "FITC")], 1, np.uint16, ("DAPI", "FITC")),
        ([("b", None), ("a", None)], 1, np.uint8, ("b", "a")),
        (
            [("b", "BF"), ("a", "BF")],  # descriptions alike: named by identifier
            3,
            np.uint8,
            ("b red", "b green", "b blue", "a red", "a green", "a blue"),
        ),
    ],
)
def test_optical_paths_are_read_as_channels(tmp_path, paths, samples, dtype, names):
    """One optical path each (fluorescence), in the order the file lists them, named by
    their descriptions where those are distinct."""
    nc = samples * len(paths)
    img = np.random.default_rng(5).integers(0, 250, (130, 150, nc)).astype(dtype)
    reader = open_image(write_dicom_wsi(tmp_path / "fl", img, optical_paths=paths))
    assert reader.level_shapes == ((130, 150, nc), (65, 75, nc))
    assert reader.channel_names == names
    assert reader.dtype == dtype
    np.testing.assert_array_equal(reader.read(0, 130, 0, 150), img)
    np.testing.assert_array_equal(reader.read(10, 60, 20, 70, level=1), img[::2, ::2][10:60, 20:70])


def _paths_in_two_instances(folder: Path, second_dtype: type, second_levels: tuple[int, ...]):
    """Optical path "0" (uint8, levels 0 and 1) and "1" in instances of their own, one series."""
    from pydicom.uid import generate_uid

    uids = (generate_uid(), generate_uid(), generate_uid())
    first = np.random.default_rng(8).integers(0, 250, (130, 150, 1), dtype=np.uint8)
    second = (first.astype(np.uint16) * 3).astype(second_dtype)
    write_dicom_wsi(folder, first, optical_paths=[("0", None)], uids=uids, name="p0_")
    write_dicom_wsi(
        folder, second, optical_paths=[("1", None)], uids=uids, name="p1_", levels=second_levels
    )
    return np.concatenate([first, second], axis=2)


def test_only_levels_holding_every_optical_path_are_read(tmp_path):
    img = _paths_in_two_instances(tmp_path / "paths", np.uint8, second_levels=(0,))
    reader = open_image(tmp_path / "paths" / "p1_0.dcm")
    assert reader.level_shapes == ((130, 150, 2),)
    np.testing.assert_array_equal(reader.read(0, 130, 0, 150), img)


def test_optical_paths_of_different_dtypes_are_refused(tmp_path):
    _paths_in_two_instances(tmp_path / "mixed", np.uint16, second_levels=(0, 1))
    with pytest.raises(ImageReadError, match=r"mixed: optical paths 0, 1 of different pixel"):
        open_image(tmp_path / "mixed")


@pytest.mark.parametrize(("planes", "depths"), [(2, "0, 1"), (3, "0, 1, 2")])
def test_focal_planes_are_refused_as_a_stack(tmp_path, planes, depths):
    """Two planes are a stack too: read as a slide, one of them would be segmented silently."""
    folder = write_dicom_wsi(tmp_path / "z", _image(), focal_planes=planes)
    stack = rf"z: {planes} focal planes \(z = {depths} um\): .* not stacks; export one"
    with pytest.raises(ImageReadError, match=stack):
        open_image(folder)


def test_a_pixel_size_given_overrides_the_files_pixel_spacing(slide):
    """As for every other reader: a user who corrects a wrong PixelSpacing gets their value."""
    assert open_image(slide).pixel_size_um == 0.25
    reader = open_image(slide, pixel_size_um=2.0)
    assert reader.pixel_size_um == 2.0
    assert DicomReader(slide, pixel_size_um=0.5).pixel_size_um == 0.5


@pytest.mark.parametrize("pixel_size_um", [None, 0.5])
def test_a_slide_without_pixel_spacing_is_refused_naming_it(tmp_path, pixel_size_um):
    folder = write_dicom_wsi(tmp_path / "nompp", _image(), pixel_spacing=False)
    with pytest.raises(ImageReadError, match=r"nompp: the slide states no PixelSpacing"):
        open_image(folder, pixel_size_um=pixel_size_um)


def test_dicom_files_without_extension_are_recognised(tmp_path):
    """As on DICOM media: IM0, IM1 (the folder or one file); a file without extension that
    is no DICOM is still an unknown format."""
    folder = write_dicom_wsi(tmp_path / "media", _image())
    for k in range(2):
        (folder / f"level{k}.dcm").rename(folder / f"IM{k}")
    for path in (folder, folder / "IM0"):
        np.testing.assert_array_equal(open_image(path).read(0, 200, 0, 300), _image())
    (tmp_path / "notes").write_bytes(b"x" * 200)
    with pytest.raises(ImageReadError, match="unknown image format"):
        open_image(tmp_path / "notes")


def _copy_of(slide: Path, folder: Path) -> Path:
    folder.mkdir()
    for f in slide.iterdir():
        (folder / f.name).write_bytes(f.read_bytes())
    return folder


def _patch(path: Path, marker: bytes, offset: int, new: bytes) -> None:
    """Overwrite ``path`` with ``new`` at ``offset`` bytes past ``marker``'s first place."""
    data = bytearray(path.read_bytes())
    at = data.index(marker) + offset
    data[at : at + len(new)] = new
    path.write_bytes(bytes(data))


@pytest.mark.parametrize("damage", [b"UL\x03\x00", b"ZZ\x04\x00"])  # a short value, a bad VR
def test_a_damaged_dicom_file_beside_the_slide_is_named(slide, tmp_path, damage):
    """Whether it belongs to the slide cannot be told, so it is not passed over."""
    folder = _copy_of(slide, tmp_path / "damaged")
    rows = b"\x48\x00\x07\x00UL\x04\x00"  # TotalPixelMatrixRows, explicit VR
    header = (slide / "level1.dcm").read_bytes()
    assert header.count(rows) == 1
    (folder / "extra.dcm").write_bytes(header.replace(rows, rows[:4] + damage))
    with pytest.raises(ImageReadError, match=r"extra\.dcm: a damaged DICOM header"):
        open_image(folder / "level0.dcm")


def _set(path: Path, **elements) -> None:
    ds = pydicom.dcmread(path)
    for keyword, value in elements.items():
        if value is None:
            delattr(ds, keyword)
        else:
            setattr(ds, keyword, value)
    ds.save_as(path, enforce_file_format=False)  # as it is, an empty value too


def _damage_header(path: Path, damage: str) -> None:
    if damage == "meta length":  # FileMetaInformationVersion's length past the file's end
        _patch(path, b"\x02\x00\x01\x00OB\x00\x00", 8, (0x7FFFFFF0).to_bytes(4, "little"))
    elif damage == "cut":  # inside the header: SeriesInstanceUID and what follows lost
        path.write_bytes(path.read_bytes()[:529])
    elif damage == "class":  # a byte of MediaStorageSOPClassUID (the file meta's, ahead)
        _patch(path, b"1.2.840.10008.5.1.4.1.1.77.1.6", 28, b"?")
    elif damage == "series":
        _patch(path, str(pydicom.dcmread(path).SeriesInstanceUID).encode(), 0, b"?")
    elif damage == "kind":
        _set(path, ImageType=["ORIGINAL", "PRIMARY", "VOLUMF", "NONE"])
    else:  # a size wsidicom needs
        _set(path, Rows=None)


@pytest.mark.filterwarnings("ignore:Invalid value for VR UI")  # pydicom's, reading on
@pytest.mark.parametrize("by", ["folder", "level1.dcm"])
@pytest.mark.parametrize(
    ("damage", "problem"),
    [
        ("meta length", "no MediaStorageSOPClassUID, StudyInstanceUID"),
        ("cut", "no SeriesInstanceUID, Rows"),
        ("class", "garbled MediaStorageSOPClassUID '1.2.840.10008.5.1.4.1.1.77.1?6'"),
        ("series", "garbled SeriesInstanceUID '?."),
        ("kind", "garbled ImageType ['ORIGINAL', 'PRIMARY', 'VOLUMF', 'NONE']"),
        ("rows", "no Rows)"),
    ],
)
def test_a_damaged_base_level_is_refused_not_left_out(slide, tmp_path, damage, problem, by):
    """Passed over (by pydicom's reading, or wsidicom's), the slide would read at level 1:
    half the size at twice the pixel size, without a word."""
    folder = _copy_of(slide, tmp_path / "s")
    _damage_header(folder / "level0.dcm", damage)
    with pytest.raises(ImageReadError) as info:
        open_image(folder if by == "folder" else folder / "level1.dcm")
    assert str(info.value).startswith(f"{folder / 'level0.dcm'}: a damaged DICOM header (")
    assert problem in str(info.value)


def test_a_header_element_stating_4_gib_is_refused_without_allocating_them(slide, tmp_path):
    """pydicom reads an element's value in one read of its stated length, which allocated
    4 GiB (a MemoryError under an address-space limit) for a FileMetaInformationVersion
    stating 0xFFFFFFF0 bytes; reads are held to the file's bytes."""
    import tracemalloc

    folder = _copy_of(slide, tmp_path / "s")
    data = bytearray((folder / "level0.dcm").read_bytes())
    at = data.index(b"\x02\x00\x01\x00OB\x00\x00") + 8  # its 4-byte length
    data[at : at + 4] = (0xFFFFFFF0).to_bytes(4, "little")
    (folder / "level0.dcm").write_bytes(bytes(data))
    tracemalloc.start()
    try:
        with pytest.raises(ImageReadError) as info:
            open_image(folder)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert str(info.value).startswith(f"{folder / 'level0.dcm'}: a damaged DICOM header (")
    assert peak < 2**28, f"{peak / 2**20:,.0f} MiB allocated at the peak"


def _other_dicom(path: Path, sop_class: str, *, in_meta: bool = True) -> None:
    """A sound DICOM file of another SOP class; ``in_meta=False`` states it in the dataset
    alone (no MediaStorageSOPClassUID), as careless writers do."""
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, generate_uid

    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.preamble = b"\0" * 128
    if in_meta:
        ds.file_meta.MediaStorageSOPClassUID = sop_class
        ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    else:
        ds.SOPClassUID, ds.SOPInstanceUID = sop_class, generate_uid()
    ds.PatientName = "other"
    ds.save_as(path, enforce_file_format=False)


@pytest.mark.parametrize(
    ("name", "sop_class", "in_meta"),
    [
        ("DICOMDIR", "1.2.840.10008.1.3.10", True),  # Media Storage Directory
        ("capture.dcm", "1.2.840.10008.5.1.4.1.1.7", True),  # Secondary Capture
        ("capture.dcm", "1.2.840.10008.5.1.4.1.1.7", False),
    ],
)
def test_another_kind_of_dicom_file_beside_the_slide_is_passed_over(
    slide, tmp_path, name, sop_class, in_meta
):
    folder = _copy_of(slide, tmp_path / "s")
    _other_dicom(folder / name, sop_class, in_meta=in_meta)
    reader = open_image(folder)
    assert reader.level_shapes == ((200, 300, 3), (100, 150, 3))


def test_a_value_pydicom_cannot_unpack_is_a_damaged_header(slide, tmp_path):
    """OpticalPathIdentifier's VR SH made SV, whose 4-byte length pydicom unpacks from a
    short read (struct.error)."""
    folder = _copy_of(slide, tmp_path / "s")
    _patch(folder / "level0.dcm", b"\x48\x00\x06\x01SH", 5, b"V")
    with pytest.raises(ImageReadError) as info:
        open_image(folder / "level0.dcm")
    assert str(info.value).startswith(
        f"{folder / 'level0.dcm'}: a damaged DICOM header (struct.error: unpack requires"
    )


@pytest.mark.parametrize("damage", ["no orientation", "length"])
def test_a_header_wsidicom_cannot_load_is_named(slide, tmp_path, damage):
    """Damage pydicom reads past and wsidicom does not: an empty ImageOrientationSlide
    (marshmallow's ValidationError), NumberOfOpticalPaths of length 11 (pydicom's
    BytesLengthException, parsing it for wsidicom)."""
    folder = _copy_of(slide, tmp_path / "s")
    if damage == "no orientation":
        _set(folder / "level1.dcm", ImageOrientationSlide=[])
        error = "ValidationError: {'ImageOrientationSlide'"
    else:
        _patch(folder / "level1.dcm", b"\x48\x00\x02\x03UL\x04\x00", 6, b"\x0b")
        error = "BytesLengthException: Expected total bytes"
    with pytest.raises(ImageReadError) as info:
        open_image(folder / "level0.dcm")
    assert str(info.value).startswith(
        f"{folder / 'level0.dcm'}: no readable DICOM WSI series: wsidicom cannot open "
        f"level1.dcm ({error}"
    )


def test_a_region_wsidicom_cannot_read_names_the_level_and_window(slide, monkeypatch):
    """As pydicom fails parsing a value wsidicom reads on the way to the pixels."""
    import wsidicom
    from pydicom.errors import BytesLengthException

    reader = open_image(slide)

    def damaged(*args, **kwargs):
        raise BytesLengthException("Expected total bytes to be an even multiple")

    monkeypatch.setattr(wsidicom.WsiDicom, "read_region", damaged)
    with pytest.raises(ImageReadError) as info:
        reader.read(10, 40, 20, 70, level=1)
    assert str(info.value) == (
        f"{slide}: cannot read level 1 at y 10:40, x 20:70 (BytesLengthException: Expected "
        "total bytes to be an even multiple)"
    )


def test_rewriting_another_file_of_the_series_changes_the_token(slide, tmp_path):
    """A file's series is all its files: a level rewritten in place is new pixels to dask."""
    import os

    folder = _copy_of(slide, tmp_path / "copy")
    before = open_image(folder / "level0.dcm").level(1).name
    level1 = folder / "level1.dcm"
    stat = level1.stat()
    os.utime(level1, ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))
    assert open_image(folder / "level0.dcm").level(1).name != before


def _taller_image() -> np.ndarray:
    """Narrower than _image() (240 < 300 px) but of more pixels (320 x 240 > 200 x 300):
    wsidicom, which orders images by width, makes its pyramid the second."""
    return np.random.default_rng(4).integers(0, 255, (320, 240, 3), dtype=np.uint8)


def _one_series(
    folder: Path, *slides: tuple[str, np.ndarray, tuple[float, float], tuple[int, ...]]
):
    """Images (file name prefix, pixels, origin in mm, levels) as one series in ``folder``."""
    from pydicom.uid import generate_uid

    uids = (generate_uid(), generate_uid(), generate_uid())
    for name, img, origin_mm, levels in slides:
        write_dicom_wsi(folder, img, name=name, uids=uids, origin_mm=origin_mm, levels=levels)
    return folder


def test_of_several_pyramids_the_largest_is_read_naming_the_others(tmp_path):
    """As the TIFF reader does with a file of several images; moving a pyramid's files to a
    folder of their own reads it."""
    folder = _one_series(
        tmp_path / "regions",
        ("a", _image(), (20.0, 40.0), (0, 1)),
        ("b", _taller_image(), (5.0, 40.0), (0, 1)),
    )
    with pytest.warns(UserWarning, match="holds 2 pyramids") as caught:
        reader = open_image(folder / "a0.dcm")
    assert [str(w.message) for w in caught] == [
        f"{folder / 'a0.dcm'}: holds 2 pyramids (images of other places on the slide or depths "
        "of field); reading the largest, pyramid 1 (320 x 240 px (Y x X), origin x 5, y 40 mm: "
        "b0.dcm, b1.dcm), and leaving out pyramid 0 (200 x 300 px (Y x X), origin x 20, y 40 "
        "mm: a0.dcm, a1.dcm); to read one of those, move its files to a folder of their own"
    ]
    taller = _taller_image()
    assert reader.level_shapes == (taller.shape, taller[::2, ::2].shape)
    np.testing.assert_array_equal(reader.read(0, 320, 0, 240), taller)
    (tmp_path / "a").mkdir()
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a clone (a worker's) reopens the series without a word
        clone = pickle.loads(pickle.dumps(reader))
        np.testing.assert_array_equal(clone.level(1).compute(), taller[::2, ::2])
        for f in ("a0.dcm", "a1.dcm"):
            (folder / f).rename(tmp_path / "a" / f)
        np.testing.assert_array_equal(open_image(tmp_path / "a").read(0, 200, 0, 300), _image())


def test_a_level_file_wsidicom_places_in_no_pyramid_is_refused_naming_it(tmp_path):
    """Two images at one place of the slide: wsidicom keeps one file per pixel spacing, here
    b0 as level 0 and a1 as level 1, which read on would be levels of two images."""
    folder = _one_series(
        tmp_path / "rescan",
        ("a", _image(), (20.0, 40.0), (0, 1)),
        ("b", _other_image(), (20.0, 40.0), (0,)),
    )
    with pytest.raises(ImageReadError) as info:
        open_image(folder)
    assert str(info.value).startswith(
        f"{folder}: wsidicom places a0.dcm in no pyramid of the series, though a level it "
        "reads has its pixel spacing: a second image at the pixel spacing"
    )
    assert "move the files that are no part of the slide out of its folder" in str(info.value)


def test_a_level_of_its_own_tile_size_is_read(tmp_path):
    """Bio-Formats writes levels smaller than a tile with smaller tiles; wsidicom's strict
    default leaves such a level out."""
    from pydicom.uid import generate_uid

    uids = (generate_uid(), generate_uid(), generate_uid())
    folder = write_dicom_wsi(tmp_path / "s", _image(), tile=64, levels=(0, 1), uids=uids)
    write_dicom_wsi(folder, _image(), tile=32, levels=(2,), uids=uids)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        reader = open_image(folder)
    assert len(reader.level_shapes) == 3
    np.testing.assert_array_equal(reader.read(0, 50, 0, 75, level=2), _image()[::4, ::4])


def _undecodable(path) -> None:
    """Rewrite a level file of write_dicom_wsi in a codec wsidicom does not take (MPEG-2)."""
    from pydicom.encaps import encapsulate

    ds = pydicom.dcmread(path)
    n = int(ds.NumberOfFrames)
    size = len(ds.PixelData) // n
    ds.PixelData = encapsulate([ds.PixelData[k * size : (k + 1) * size] for k in range(n)])
    ds["PixelData"].VR, ds["PixelData"].is_undefined_length = "OB", True
    ds.file_meta.TransferSyntaxUID = "1.2.840.10008.1.2.4.100"  # MPEG-2
    ds.save_as(path, enforce_file_format=True)


def test_a_level_file_wsidicom_cannot_decode_is_left_out_with_a_warning(tmp_path):
    """A level of its own pixel spacing in a codec wsidicom does not take: read without it,
    as wsidicom reads the slide, and said."""
    folder = write_dicom_wsi(tmp_path / "s", _image(), levels=(0, 1, 2))
    _undecodable(folder / "level2.dcm")
    with pytest.warns(UserWarning, match=r"wsidicom reads no pyramid level from level2\.dcm"):
        reader = open_image(folder)
    assert reader.level_shapes == (_image().shape, _image()[::2, ::2].shape)
    np.testing.assert_array_equal(reader.read(0, 200, 0, 300), _image())


@pytest.mark.parametrize(
    ("levels", "named"),
    [
        ((0, 1), "level0.dcm and level1.dcm"),  # wsidicom: "Level files not found"
        ((1,), "level1.dcm"),  # wsidicom: level 1 passed over, a pyramid of one level
    ],
)
def test_min_is_white_dicom_is_refused_naming_the_files(tmp_path, levels, named):
    """wsidicom does not read MONOCHROME1 (the DICOM WSI IOD does not allow it), and says so
    nowhere: the refusal names the files and the photometric interpretation."""
    folder = write_dicom_wsi(tmp_path / "m1", _image()[..., :1])
    for k in levels:
        ds = pydicom.dcmread(folder / f"level{k}.dcm")
        ds.PhotometricInterpretation = "MONOCHROME1"
        ds.save_as(folder / f"level{k}.dcm")
    with pytest.raises(ImageReadError) as info:
        open_image(folder)
    assert str(info.value).startswith(
        f"{folder}/{named}: PhotometricInterpretation MONOCHROME1 (grey, white at 0), which "
        "wsidicom does not read"
    )
    assert "rewrite the files as MONOCHROME2" in str(info.value)


def test_threads_reading_an_unpickled_reader_open_the_series_once(slide, monkeypatch):
    """As dask's threads do with a reader that came to a worker pickled, handle-less."""
    import wsidicom

    reader = pickle.loads(pickle.dumps(open_image(slide)))
    opened, open_series = [], wsidicom.WsiDicom.open
    together = threading.Barrier(3, timeout=1)  # a reader opening unlocked: each thread opens

    def counted_open(files, **kw):
        opened.append(files)
        with contextlib.suppress(threading.BrokenBarrierError):  # one let in, as it should be
            together.wait()
        return open_series(files, **kw)

    monkeypatch.setattr(wsidicom.WsiDicom, "open", counted_open)
    boxes = [(0, 64, 0, 64), (64, 128, 64, 128), (136, 200, 236, 300)]
    with ThreadPoolExecutor(len(boxes)) as pool:
        reads = list(pool.map(lambda box: reader.read(*box), boxes))
    for pixels, (y0, y1, x0, x1) in zip(reads, boxes, strict=True):
        np.testing.assert_array_equal(pixels, _image()[y0:y1, x0:x1])
    assert len(opened) == 1


def test_close_under_a_read_leaves_the_handle_to_the_read(slide, monkeypatch):
    """As a pipeline closing its reader while a dask thread is still inside a read: the read
    gives its pixels (closed under it, it failed as if the file were damaged), the handle is
    closed as it ends, and a read after close opens the series again."""
    import wsidicom

    reader = open_image(slide)
    inside, go, closed = threading.Event(), threading.Event(), []
    read_region, close = wsidicom.WsiDicom.read_region, wsidicom.WsiDicom.close

    def slow_read(self, *args, **kwargs):
        inside.set()
        go.wait(timeout=5)
        return read_region(self, *args, **kwargs)

    def counted_close(self):
        closed.append(self)
        close(self)

    monkeypatch.setattr(wsidicom.WsiDicom, "read_region", slow_read)
    monkeypatch.setattr(wsidicom.WsiDicom, "close", counted_close)
    # tiles opening did not read (it read the top-left), so read from the files
    window = (136, 200, 236, 300)
    closed_by_close, pixels = closed_during_a_held_read(reader, window, inside, go, closed)
    np.testing.assert_array_equal(pixels, _image()[136:200, 236:300])
    assert closed_by_close == [] and len(closed) == 1  # by the read, as it ended
    np.testing.assert_array_equal(reader.read(64, 128, 0, 64), _image()[64:128, :64])
    reader.close()
    assert len(closed) == 2 and closed[0] is not closed[1]


def test_a_spacing_that_differs_in_x_and_y_is_warned_of_and_x_is_used(tmp_path):
    """As every other reader does: DICOM alone took the columns' spacing without a word."""
    folder = write_dicom_wsi(tmp_path / "s", _image(), mpp=0.25, x_mpp=0.5)
    with pytest.warns(UserWarning, match=r"s: PixelSpacing differs in X \(0\.5 µm\) and Y \(0\.25"):
        reader = open_image(folder)
    assert reader.pixel_size_um == 0.5


def _make_sparse(
    path: Path, moved: dict[int, tuple[int, int]] | None = None, paths: tuple[str, ...] = ("0",)
) -> None:
    """Rewrite a level file of write_dicom_wsi (one focal plane, the optical ``paths`` it was
    written with) as TILED_SPARSE, each frame's (column, row) and optical path stated per
    frame: its tile's corner (tiles of Rows x Columns), or ``moved[frame]``."""
    from pydicom.dataset import Dataset
    from pydicom.sequence import Sequence

    ds = pydicom.dcmread(path)
    rows, columns = int(ds.Rows), int(ds.Columns)
    across = -(-ds.TotalPixelMatrixColumns // columns)
    per_path = int(ds.NumberOfFrames) // len(paths)  # a path's tiles, then the next path's
    groups = []
    for k in range(int(ds.NumberOfFrames)):
        position = Dataset()
        tile = k % per_path
        corner = (tile % across * columns + 1, tile // across * rows + 1)
        column, row = (moved or {}).get(k, corner)
        position.ColumnPositionInTotalImagePixelMatrix = column
        position.RowPositionInTotalImagePixelMatrix = row
        position.XOffsetInSlideCoordinateSystem = position.YOffsetInSlideCoordinateSystem = 0.0
        position.ZOffsetInSlideCoordinateSystem = 0.0
        path_id = Dataset()
        path_id.OpticalPathIdentifier = paths[k // per_path]
        group = Dataset()
        group.PlanePositionSlideSequence = Sequence([position])
        group.OpticalPathIdentificationSequence = Sequence([path_id])
        groups.append(group)
    ds.PerFrameFunctionalGroupsSequence = Sequence(groups)
    ds.DimensionOrganizationType = "TILED_SPARSE"
    ds.save_as(path)


@pytest.mark.parametrize(
    ("moved", "problem"),
    [
        # the tile at column 65 stated at 71: wsidicom read it at 65, as if on the grid
        ({1: (71, 1)}, "frame 2 states column 71, row 1 (its Plane Position (Slide)), off"),
        # the same off the grid in y alone: wsidicom read it at row 1
        ({1: (65, 7)}, "frame 2 states column 65, row 7 (its Plane Position (Slide)), off"),
        # the second tile stated at the first's place: wsidicom read one over the other
        ({1: (1, 1)}, "frames 1 and 2 state one position (column 1, row 1, and one optical"),
    ],
    ids=["off the grid", "off the grid in y", "one place"],
)
def test_sparse_frames_off_the_grid_or_at_one_place_are_refused_naming_them(
    slide, tmp_path, moved, problem
):
    folder = _copy_of(slide, tmp_path / "s")
    _make_sparse(folder / "level0.dcm", moved)
    with pytest.raises(ImageReadError) as info:
        open_image(folder)
    assert str(info.value).startswith(f"{folder / 'level0.dcm'}: {problem}")


def test_sparse_frames_of_several_optical_paths_at_one_place_are_read(tmp_path):
    """A fluorescence slide stores one frame per optical path at each tile: no two frames
    of one place, and each path reads back as its channel."""
    img = np.random.default_rng(6).integers(0, 250, (130, 150, 2)).astype(np.uint8)
    paths = [("b", "DAPI"), ("a", "FITC")]
    folder = write_dicom_wsi(tmp_path / "fl", img, optical_paths=paths)
    _make_sparse(folder / "level0.dcm", paths=("b", "a"))
    reader = open_image(folder)
    assert reader.channel_names == ("DAPI", "FITC")
    np.testing.assert_array_equal(reader.read(0, 130, 0, 150), img)


def _concatenate(path: Path) -> None:
    """Split a level file into a concatenation of two, ``{stem}_part1.dcm`` and ``_part2``."""
    import copy

    from pydicom.sequence import Sequence
    from pydicom.uid import generate_uid

    ds = pydicom.dcmread(path)
    n, uid = int(ds.NumberOfFrames), generate_uid()
    size = len(ds.PixelData) // n
    for number, (a, b) in enumerate([(0, n // 2), (n // 2, n)], 1):
        part = copy.deepcopy(ds)
        part.SOPInstanceUID = part.file_meta.MediaStorageSOPInstanceUID = generate_uid()
        part.ConcatenationUID, part.SOPInstanceUIDOfConcatenationSource = uid, ds.SOPInstanceUID
        part.ConcatenationFrameOffsetNumber, part.InConcatenationNumber = a, number
        part.InConcatenationTotalNumber, part.NumberOfFrames = 2, b - a
        part.PixelData = ds.PixelData[a * size : b * size]
        if "PerFrameFunctionalGroupsSequence" in ds:
            part.PerFrameFunctionalGroupsSequence = Sequence(
                ds.PerFrameFunctionalGroupsSequence[a:b]
            )
        part.save_as(path.with_name(f"{path.stem}_part{number}.dcm"))
    path.unlink()


@pytest.mark.parametrize("organization", ["TILED_FULL", "TILED_SPARSE"])
def test_a_concatenation_missing_a_part_is_refused_naming_it(slide, tmp_path, organization):
    """wsidicom read a missing part's frames as blank (TILED_SPARSE) or failed at the first
    read of them (TILED_FULL)."""
    folder = _copy_of(slide, tmp_path / "s")
    if organization == "TILED_SPARSE":
        _make_sparse(folder / "level0.dcm")
    _concatenate(folder / "level0.dcm")
    np.testing.assert_array_equal(open_image(folder).read(0, 200, 0, 300), _image())
    (folder / "level0_part2.dcm").unlink()
    with pytest.raises(ImageReadError) as info:
        open_image(folder / "level1.dcm")
    uid = pydicom.dcmread(folder / "level0_part1.dcm").ConcatenationUID
    assert str(info.value).startswith(
        f"{folder / 'level0_part1.dcm'}: part 1 of a DICOM concatenation of 2 files "
        f"(ConcatenationUID {uid}), whose part(s) 2 are not in the series"
    )


def test_a_series_rewritten_since_it_was_opened_is_refused_as_tiffs_are(slide, tmp_path):
    """A worker's copy (pickled), or a read after close, opens the files again: it read the
    rescan saved over the slide without a word."""
    import os

    folder = _copy_of(slide, tmp_path / "s")
    reader = open_image(folder / "level1.dcm")
    blob = pickle.dumps(reader)
    write_dicom_wsi(tmp_path / "rescan", 255 - _image())
    os.replace(tmp_path / "rescan" / "level0.dcm", folder / "level0.dcm")
    np.testing.assert_array_equal(reader.read(0, 64, 0, 64), _image()[:64, :64])  # still open
    changed = re.escape(f"{folder / 'level0.dcm'} changed since it was opened; run again")
    with pytest.raises(ImageReadError, match=f"^{changed}$"):
        pickle.loads(blob).read(0, 64, 0, 64)
    reader.close()
    with pytest.raises(ImageReadError, match=f"^{changed}$"):
        reader.read(0, 64, 0, 64)


@pytest.mark.parametrize(
    ("pixels", "change", "problem"),
    [
        (_image(), {"PhotometricInterpretation": "YBR_FULL"}, "PhotometricInterpretation "
         "YBR_FULL uncompressed, which wsidicom does not read"),
        (_image(), {"PlanarConfiguration": 1}, "PlanarConfiguration 1 (each colour's plane"),
        (_image()[..., :1].astype(np.uint16), {"PixelRepresentation": 1},
         "PixelRepresentation 1 (signed values), which wsidicom does not read"),
        (_image()[..., :1].astype(np.uint16), {"BitsStored": 12, "HighBit": 11},
         "BitsStored 12 of BitsAllocated 16 uncompressed, which wsidicom does not read"),
    ],
    ids=["YBR_FULL", "planar", "signed", "12 of 16 bits"],
)  # fmt: skip
def test_pixels_wsidicom_cannot_read_are_refused_naming_the_files(
    tmp_path, pixels, change, problem
):
    """wsidicom passed over such levels ("Level files not found") or failed on a frame's
    length; the refusal names the files and what of their pixels it cannot read."""
    folder = write_dicom_wsi(tmp_path / "s", pixels)
    for k in (0, 1):
        _set(folder / f"level{k}.dcm", **change)
    with pytest.raises(ImageReadError) as info:
        open_image(folder)
    assert str(info.value).startswith(f"{folder}/level0.dcm and level1.dcm: {problem}")
    assert "or convert the slide to OME-TIFF" in str(info.value)


def test_compressed_pixels_of_12_of_16_bits_are_read(tmp_path):
    """Only uncompressed such pixels are beyond wsidicom: a JPEG 2000 slide of 12-bit
    samples reads back, not refused."""
    import imagecodecs
    from pydicom.encaps import encapsulate
    from pydicom.uid import JPEG2000Lossless

    img = _image()[..., :1].astype(np.uint16) * 16  # up to 4080: 12 bits
    folder = write_dicom_wsi(tmp_path / "j2k", img)
    for k in (0, 1):
        ds = pydicom.dcmread(folder / f"level{k}.dcm")
        frames = np.frombuffer(ds.PixelData, np.uint16).reshape(-1, 64, 64)
        ds.PixelData = encapsulate(
            [
                imagecodecs.jpeg2k_encode(f, level=0, codecformat="J2K", bitspersample=12)
                for f in frames
            ]
        )
        ds["PixelData"].VR = "OB"
        ds.file_meta.TransferSyntaxUID = JPEG2000Lossless
        ds.BitsStored, ds.HighBit = 12, 11
        ds.save_as(folder / f"level{k}.dcm")
    reader = open_image(folder)
    assert reader.dtype == np.uint16
    np.testing.assert_array_equal(reader.read(0, 200, 0, 300), img)
    np.testing.assert_array_equal(reader.read(0, 100, 0, 150, level=1), img[::2, ::2])


def test_a_label_whose_pixels_wsidicom_cannot_read_does_not_refuse_the_slide(tmp_path):
    """No level needs the slide's label image: a MONOCHROME1 label in the series is left to
    wsidicom, and the slide reads back."""
    from pydicom.uid import generate_uid

    uids = (generate_uid(), generate_uid(), generate_uid())
    folder = write_dicom_wsi(tmp_path / "s", _image(), uids=uids)
    write_dicom_wsi(folder, _image()[..., :1], levels=(0,), name="label", uids=uids)
    _set(
        folder / "label0.dcm",
        ImageType=["ORIGINAL", "PRIMARY", "LABEL", "NONE"],
        PhotometricInterpretation="MONOCHROME1",
    )
    reader = open_image(folder)
    assert reader.level_shapes == ((200, 300, 3), (100, 150, 3))
    np.testing.assert_array_equal(reader.read(0, 200, 0, 300), _image())


def test_a_media_folder_whose_first_files_are_no_dicom_is_read_as_a_slide(tmp_path):
    """Files without extension, as on DICOM media, sorted behind a few that are no DICOM
    (a README, a checksum list): the folder is still told a DICOM slide by sniffing."""
    folder = write_dicom_wsi(tmp_path / "media", _image())
    for k in range(2):
        (folder / f"level{k}.dcm").rename(folder / f"IM{k}")
    for name in ("CHECKSUMS", "HISTORY", "INDEX"):
        (folder / name).write_text("not a DICOM file\n")
    reader = open_image(folder)
    assert isinstance(reader, DicomReader)
    np.testing.assert_array_equal(reader.read(0, 200, 0, 300), _image())


@pytest.mark.parametrize(
    ("change", "problem"),
    [
        ({"Rows": 0}, "garbled Rows 0"),
        ({"TotalPixelMatrixColumns": 0}, "garbled TotalPixelMatrixColumns 0"),
        ({"ImageType": ["ORIGINAL", "PRIMARY"]}, "garbled ImageType ['ORIGINAL', 'PRIMARY']"),
    ],
    ids=["no rows", "no columns", "two values"],
)
def test_a_base_level_stating_sizes_of_0_or_a_short_image_type_is_refused(
    slide, tmp_path, change, problem
):
    """A size of 0 is no size, and an ImageType without its third value (VOLUME, LABEL...)
    states no kind: the header is damaged, and named, not read on (a ZeroDivisionError or
    an IndexError, or the slide read at level 1)."""
    folder = _copy_of(slide, tmp_path / "s")
    _set(folder / "level0.dcm", **change)
    with pytest.raises(ImageReadError) as info:
        open_image(folder)
    assert str(info.value).startswith(f"{folder / 'level0.dcm'}: a damaged DICOM header (")
    assert problem in str(info.value)


def test_a_base_level_wsidicom_cannot_decode_is_left_out_with_a_warning(tmp_path):
    """Finer than every level read (half level 1's spacing), the undecodable base level is
    no second image of a level's spacing: the slide reads from level 1, said, not refused."""
    folder = write_dicom_wsi(tmp_path / "s", _image(), levels=(0, 1, 2))
    _undecodable(folder / "level0.dcm")
    with pytest.warns(UserWarning, match=r"wsidicom reads no pyramid level from level0\.dcm"):
        reader = open_image(folder)
    assert reader.level_shapes == (_image()[::2, ::2].shape, _image()[::4, ::4].shape)
    assert reader.pixel_size_um == pytest.approx(0.5)
    np.testing.assert_array_equal(reader.read(0, 100, 0, 150), _image()[::2, ::2])


def _retiled(path, img: np.ndarray, rows: int, columns: int) -> None:
    """Rewrite the level file ``path`` of ``img`` (one optical path, one focal plane) in
    frames of ``rows`` x ``columns`` pixels (Rows, Columns: not square), still TILED_FULL."""
    ds = pydicom.dcmread(path)
    ny, nx, nc = img.shape
    ty, tx = -(-ny // rows), -(-nx // columns)
    padded = np.zeros((ty * rows, tx * columns, nc), img.dtype)
    padded[:ny, :nx] = img
    frames = padded.reshape(ty, rows, tx, columns, nc).transpose(0, 2, 1, 3, 4)
    ds.Rows, ds.Columns, ds.NumberOfFrames = rows, columns, ty * tx
    ds.PixelData = frames.tobytes()
    ds.save_as(path)


def test_sparse_frames_of_tiles_taller_or_wider_than_square_are_read(slide, tmp_path):
    """Rows and Columns differ: each frame at its tile's corner is on the grid of Rows x
    Columns (Y x X), not refused as off a grid of Columns x Rows."""
    folder = _copy_of(slide, tmp_path / "s")
    _retiled(folder / "level0.dcm", _image(), rows=32, columns=64)
    _make_sparse(folder / "level0.dcm")
    reader = open_image(folder)
    np.testing.assert_array_equal(reader.read(0, 200, 0, 300), _image())


def test_a_second_image_at_a_levels_row_spacing_is_refused_though_its_columns_differ(tmp_path):
    """Pixels twice as wide as tall (PixelSpacing 0.25 mm rows, 0.5 mm columns): wsidicom
    keys a level by its rows' spacing, so a second image of it at one place is a twin of
    the level read, refused, whatever its columns' spacing (which is a level's apart)."""
    from pydicom.uid import generate_uid

    uids = (generate_uid(), generate_uid(), generate_uid())
    folder = tmp_path / "rescan"
    for name, img in (("a", _image()), ("b", _other_image())):
        write_dicom_wsi(folder, img, name=name, uids=uids, levels=(0,), mpp=0.25, x_mpp=0.5)
    with pytest.raises(ImageReadError) as info:
        open_image(folder)
    assert re.match(
        rf"{re.escape(str(folder))}: wsidicom places [ab]0\.dcm in no pyramid of the series, "
        "though a level it reads has its pixel spacing",
        str(info.value),
    )


def _jpeg_series(folder: Path, img: np.ndarray, damage=None) -> Path:
    """``img`` as a DICOM WSI series of JPEG baseline frames (64 px tiles), frame 6 of
    level 0 (y 64:128, x 64:128) passed through ``damage`` first."""
    import io

    from PIL import Image
    from pydicom.encaps import encapsulate
    from pydicom.uid import JPEGBaseline8Bit

    write_dicom_wsi(folder, img)
    for k in (0, 1):
        ds = pydicom.dcmread(folder / f"level{k}.dcm")
        frames = []
        for tile in np.frombuffer(ds.PixelData, np.uint8).reshape(-1, 64, 64, 3):
            out = io.BytesIO()
            Image.fromarray(tile).save(out, "JPEG", quality=95)
            frames.append(out.getvalue())
        if damage is not None and k == 0:
            frames[6] = damage(frames[6])
        ds.PixelData = encapsulate(frames)
        ds["PixelData"].VR = "OB"
        ds.file_meta.TransferSyntaxUID = JPEGBaseline8Bit
        ds.PhotometricInterpretation = "YBR_FULL_422"
        ds.save_as(folder / f"level{k}.dcm")
    return folder


def _stating(height: int, width: int):
    def damage(stream: bytes) -> bytes:
        data = bytearray(stream)
        at = data.find(b"\xff\xc0")
        data[at + 5 : at + 9] = struct.pack(">HH", height, width)
        return bytes(data)

    return damage


@pytest.mark.parametrize(
    ("damage", "said"),
    [
        (lambda s: s[:-100], r"frame 6 of the level of 64 x 64 px tiles: its JPEG stream .* cut"),
        (_stating(128, 128), r"frame 6 .* states 128 x 128 px in its JPEG stream"),
        (_stating(20000, 20000), r"frame 6 .* states 20000 x 20000 px"),
    ],
    ids=["cut-short", "larger", "huge"],
)
def test_a_jpeg_frame_cut_short_or_larger_than_its_tiles_is_refused(tmp_path, damage, said):
    """wsidicom decoded such frames into made-up pixels without a word (a cut stream's rest
    grey, a larger frame cut down; 20,000² px took 1.1 GiB first), where the TIFF reader
    refuses them. An intact series of the same frames reads."""
    img = _image()
    intact = open_image(_jpeg_series(tmp_path / "intact", img)).read(0, 200, 0, 300)
    assert np.abs(intact.astype(int) - img).mean() < 4  # JPEG's loss, not another image
    reader = open_image(_jpeg_series(tmp_path / "damaged", img, damage))
    with pytest.raises(ImageReadError, match=said):
        reader.read(0, 200, 0, 300)
    np.testing.assert_array_equal(reader.read(0, 64, 0, 300), intact[:64])  # the frames above


@pytest.mark.parametrize(
    ("level1", "said"),
    [
        (lambda grey: grey.astype(np.uint16) * 257, r"level 1 stores uint16 x 1 samples"),
        (lambda grey: np.repeat(grey, 3, axis=2), r"level 1 stores uint8 x 3 samples"),
    ],
    ids=["16-bit", "rgb"],
)
def test_a_level_of_another_pixel_type_than_the_base_is_refused(tmp_path, level1, said):
    """The dtype and channels came from the base level alone: a 16-bit level 1 read as two
    uint8 channels a pixel, an RGB one as three of a level declared to have one."""
    from pydicom.uid import generate_uid

    grey = _image()[..., :1]
    uids = (generate_uid(), generate_uid(), generate_uid())
    write_dicom_wsi(tmp_path, grey, levels=(0,), uids=uids, name="a")
    write_dicom_wsi(tmp_path, level1(grey), levels=(1,), uids=uids, name="b")  # halved there
    with pytest.raises(ImageReadError, match=said):
        open_image(tmp_path)


def test_a_file_that_is_no_dicom_is_named_before_a_damaged_neighbour(tmp_path):
    """text.dcm beside a damaged DICOM file: the error named only the neighbour's header."""
    (tmp_path / "fake.dcm").write_bytes(b"\0" * 128 + b"DICM" + b"\0" * 64)
    text = tmp_path / "text.dcm"
    text.write_text("notes, not a slide\n")
    with pytest.raises(ImageReadError, match=r"text\.dcm: no readable DICOM WSI series: the file"):
        open_image(text)
    with pytest.raises(ImageReadError, match=r"fake\.dcm: a damaged DICOM header"):
        open_image(tmp_path)  # the folder: its files' own errors
