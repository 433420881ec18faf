"""DICOM whole-slide images through segpipe.io.readers.DicomReader (wsidicom).

The test writes a two-level VL Whole Slide Microscopy series with pydicom (TILED_FULL,
uncompressed 64 x 64 frames, one instance per level, PixelSpacing in the shared functional
groups) and reads it back against the pixels and the pixel spacing written.
"""

from __future__ import annotations

import pickle
from pathlib import Path

import numpy as np
import pytest

from segpipe.io.describe import describe_image
from segpipe.io.readers import DicomReader, ImageReadError, open_image

pydicom = pytest.importorskip("pydicom")
pytest.importorskip("wsidicom")


def _image() -> np.ndarray:
    yy, xx = np.mgrid[:200, :300]
    return np.stack([yy, xx * 0.8, (yy + xx) * 0.5], axis=-1).astype(np.uint8)


def write_dicom_wsi(folder: Path, img: np.ndarray, mpp: float = 0.25, tile: int = 64) -> Path:
    """One DICOM instance per level (level k = ``img[::2**k, ::2**k]``), tiles row by row."""
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.sequence import Sequence
    from pydicom.uid import ExplicitVRLittleEndian, VLWholeSlideMicroscopyImageStorage, generate_uid

    folder.mkdir(parents=True, exist_ok=True)
    study, series, frame_of_reference = generate_uid(), generate_uid(), generate_uid()
    for k in range(2):
        level, spacing_mm = img[:: 2**k, :: 2**k], mpp * 2**k / 1000
        ny, nx, _ = level.shape
        ty, tx = -(-ny // tile), -(-nx // tile)
        padded = np.zeros((ty * tile, tx * tile, 3), np.uint8)
        padded[:ny, :nx] = level
        frames = padded.reshape(ty, tile, tx, tile, 3).swapaxes(1, 2)
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
        ds.TotalPixelMatrixFocalPlanes, ds.NumberOfFrames = 1, ty * tx
        ds.DimensionOrganizationType = "TILED_FULL"
        ds.SamplesPerPixel, ds.PhotometricInterpretation, ds.PlanarConfiguration = 3, "RGB", 0
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 8, 8, 7, 0
        ds.ImagedVolumeWidth, ds.ImagedVolumeHeight = nx * spacing_mm, ny * spacing_mm
        ds.ImagedVolumeDepth = 0.001
        measures = Dataset()
        measures.PixelSpacing, measures.SliceThickness = [spacing_mm, spacing_mm], 0.001
        shared = Dataset()
        shared.PixelMeasuresSequence = Sequence([measures])
        ds.SharedFunctionalGroupsSequence = Sequence([shared])
        origin = Dataset()
        origin.XOffsetInSlideCoordinateSystem, origin.YOffsetInSlideCoordinateSystem = 20.0, 40.0
        ds.TotalPixelMatrixOriginSequence = Sequence([origin])
        optical_path = Dataset()
        optical_path.OpticalPathIdentifier = "0"
        ds.OpticalPathSequence, ds.NumberOfOpticalPaths = Sequence([optical_path]), 1
        ds.PixelData = frames.tobytes()
        ds.save_as(folder / f"level{k}.dcm", enforce_file_format=True)
    return folder


@pytest.fixture(scope="module")
def slide(tmp_path_factory):
    return write_dicom_wsi(tmp_path_factory.mktemp("dicom") / "slide", _image())


@pytest.mark.parametrize("by", ["folder", "file"])
def test_dicom_wsi_reads_back(slide, by):
    img = _image()
    reader = open_image(slide if by == "folder" else slide / "level1.dcm")
    assert isinstance(reader, DicomReader)
    assert reader.path == str(slide)
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
