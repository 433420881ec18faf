"""segpipe.io.labelfiles: label images read as the ids they store, against the writers' own
readers (tifffile, Pillow)."""

import numpy as np
import pytest
import tifffile
from PIL import Image

from segpipe.io.labelfiles import label_plane
from segpipe.io.readers import open_image


def _ids(shape=(37, 53), n=5, seed=0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, n, shape).astype(np.uint8)


def test_a_bool_array_tifffile_wrote_reads_as_written(tmp_path):
    """tifffile writes it as 1-bit min-is-white and reads it back as stored; shown (inverted),
    a binary truth scored Dice 0 against a perfect prediction."""
    truth = _ids(n=2).astype(bool)
    tifffile.imwrite(tmp_path / "t.tif", truth)
    assert tifffile.TiffFile(tmp_path / "t.tif").pages.first.photometric == 0  # min-is-white
    np.testing.assert_array_equal(tifffile.imread(tmp_path / "t.tif"), truth)
    np.testing.assert_array_equal(label_plane(tmp_path / "t.tif", "ground truth"), truth)


@pytest.mark.parametrize("bits", [8, 16])
def test_min_is_white_ids_read_as_stored(tmp_path, bits):
    ids = _ids(n=7).astype(f"uint{bits}")
    tifffile.imwrite(tmp_path / "t.tif", ids, photometric="miniswhite")
    np.testing.assert_array_equal(label_plane(tmp_path / "t.tif", "ground truth"), ids)


def test_a_palette_png_reads_as_its_indices(tmp_path):
    """PASCAL VOC's label format; its palette has colours twice (here black for 0 and for
    every unused index), so the RGB could not be mapped back."""
    ids = _ids(n=4)
    ids[0, 0] = 200  # an index whose colour is black too
    img = Image.fromarray(ids, mode="P")
    img.putpalette([0, 0, 0, 128, 0, 0, 0, 128, 0, 128, 128, 0] + [0] * (3 * 252))
    img.save(tmp_path / "t.png")
    np.testing.assert_array_equal(np.asarray(Image.open(tmp_path / "t.png")), ids)
    np.testing.assert_array_equal(label_plane(tmp_path / "t.png", "ground truth"), ids)
    # With a transparent index (tRNS): still the indices.
    img.save(tmp_path / "trns.png", transparency=0)
    np.testing.assert_array_equal(label_plane(tmp_path / "trns.png", "ground truth"), ids)


def test_a_palette_tiff_reads_as_its_indices(tmp_path):
    ids = _ids(n=3)
    colours = np.zeros((3, 256), np.uint16)
    colours[:, 1], colours[:, 2] = (0, 65535, 0), (65535, 0, 0)
    tifffile.imwrite(tmp_path / "t.tif", ids, photometric="palette", colormap=colours)
    np.testing.assert_array_equal(label_plane(tmp_path / "t.tif", "ground truth"), ids)


def test_pictures_and_floats_are_no_label_images(tmp_path):
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(tmp_path / "rgb.png")
    with pytest.raises(ValueError, match=r"rgb\.png: ground truth must be a one-channel .* 3 ch"):
        label_plane(tmp_path / "rgb.png", "ground truth")
    tifffile.imwrite(tmp_path / "f.tif", np.zeros((8, 8), np.float32), photometric="miniswhite")
    with pytest.raises(ValueError, match=r"f\.tif: instances must be .* got float32"):
        label_plane(tmp_path / "f.tif", "instances")


PALETTE = [0, 0, 0, 255, 0, 0, 0, 255, 0, 0, 0, 255, 255, 255, 0] + [0] * (3 * 251)


@pytest.mark.parametrize(("orientation", "turns"), [(3, 2), (6, -1), (8, 1)])
def test_a_palette_png_with_an_exif_orientation_reads_turned_as_the_reader_shows_it(
    tmp_path, orientation, turns
):
    """The reader turns the picture by its EXIF Orientation (6: 90 degrees clockwise); its ids
    were returned unturned, of another shape than the image or the prediction."""
    ids = _ids(shape=(40, 60), n=5)
    img = Image.fromarray(ids, mode="P")
    img.putpalette(PALETTE)
    exif = Image.Exif()
    exif[0x0112] = orientation
    img.save(tmp_path / "t.png", exif=exif)
    turned = np.rot90(ids, turns)  # counter-clockwise quarter turns
    shown = open_image(tmp_path / "t.png")
    colours = np.asarray(PALETTE, np.uint8).reshape(-1, 3)
    np.testing.assert_array_equal(shown.read(0, shown.shape[0], 0, shown.shape[1]), colours[turned])
    np.testing.assert_array_equal(label_plane(tmp_path / "t.png", "ground truth"), turned)


def test_a_palette_tiff_stored_turned_is_refused(tmp_path):
    """Its ids are read as stored while the reader shows the image turned: refused rather than
    scored against a prediction of the turned image."""
    ids = _ids(shape=(40, 60), n=3)
    colours = np.zeros((3, 256), np.uint16)
    colours[:, 1], colours[:, 2] = (0, 65535, 0), (65535, 0, 0)
    path = tmp_path / "t.tif"
    tifffile.imwrite(
        path, ids, photometric="palette", colormap=colours, extratags=[(274, "H", 1, 6, True)]
    )
    assert tifffile.TiffFile(path).pages.first.tags["Orientation"].value == 6
    with pytest.raises(ValueError, match=r"t\.tif: ground truth is a palette image stored turned"):
        label_plane(path, "ground truth")
