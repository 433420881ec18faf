"""segpipe.io.labelfiles: label images read as the ids they store, against the writers' own
readers (tifffile, Pillow)."""

import numpy as np
import pytest
import tifffile
from PIL import Image

from segpipe.io.labelfiles import label_plane


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
