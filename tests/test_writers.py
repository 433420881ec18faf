"""Tests for segpipe.io.writers: pyramidal OME-TIFF checked with tifffile and read back."""

from __future__ import annotations

from pathlib import Path

import dask.array as da
import numpy as np
import pytest
import tifffile

from segpipe.io.readers import open_image
from segpipe.io.writers import write_pyramidal_tiff


def _image(channels: int = 3) -> np.ndarray:
    rng = np.random.default_rng(3)
    return rng.integers(0, 256, (300, 517, channels), dtype=np.uint8)


def _mean2x_reference(a: np.ndarray) -> np.ndarray:
    """2x2 block mean with round-half-up, odd last row/column dropped."""
    y, x = a.shape[0] // 2 * 2, a.shape[1] // 2 * 2
    s = a[0:y:2, 0:x:2].astype(np.int64) + a[1:y:2, 0:x:2] + a[0:y:2, 1:x:2] + a[1:y:2, 1:x:2]
    return ((s + 2) // 4).astype(a.dtype)


@pytest.mark.parametrize("channels", [3, 1])
@pytest.mark.parametrize(
    "as_array",
    [
        pytest.param(lambda a: a, id="numpy"),
        pytest.param(lambda a: da.from_array(a, chunks=(70, 200, -1)), id="dask-odd-chunks"),
    ],
)
def test_pyramid_round_trip(tmp_path: Path, channels: int, as_array: object) -> None:
    img = _image(channels)
    path = write_pyramidal_tiff(
        tmp_path / "out.ome.tif", as_array(img), pixel_size_um=0.25, tile=64, min_level_size=64
    )
    assert path == tmp_path / "out.ome.tif"
    expected = [img, _mean2x_reference(img)]
    expected.append(_mean2x_reference(expected[1]))  # 75 x 129; the next would be 37 < 64

    with tifffile.TiffFile(path) as tif:
        assert tif.is_ome
        assert tif.is_bigtiff
        series = tif.series[0]
        assert len(series.levels) == 3
        page = series.levels[0].keyframe
        assert (page.tilelength, page.tilewidth) == (64, 64)
        assert page.compression == tifffile.COMPRESSION.ADOBE_DEFLATE
        assert tif.pages.first.subifds is not None
        for level, want in zip(series.levels, expected, strict=True):
            np.testing.assert_array_equal(level.asarray().reshape(want.shape), want)
        # resolution tags: pixels per centimetre, doubling the pixel size per level
        unit = page.tags["ResolutionUnit"].value
        assert unit == tifffile.RESUNIT.CENTIMETER
        num, den = series.levels[2].keyframe.tags["XResolution"].value
        assert 1e4 * den / num == pytest.approx(1.0)
        assert 'PhysicalSizeX="0.25"' in tif.ome_metadata

    reader = open_image(path)
    assert reader.pixel_size_um == pytest.approx(0.25)
    assert reader.level_shapes == tuple(e.shape for e in expected)
    np.testing.assert_array_equal(reader.level(1).compute(), expected[1])


def test_single_level_when_small(tmp_path: Path) -> None:
    path = write_pyramidal_tiff(tmp_path / "s.ome.tif", _image()[:100, :120], pixel_size_um=1.0)
    reader = open_image(path)
    assert reader.level_shapes == ((100, 120, 3),)
    np.testing.assert_array_equal(reader.read(0, 100, 0, 120), _image()[:100, :120])


@pytest.mark.parametrize("compression", [None, "zstd", "jpeg"])
def test_compressions(tmp_path: Path, compression: str | None) -> None:
    img = _image()
    path = write_pyramidal_tiff(
        tmp_path / "c.ome.tif", img, pixel_size_um=0.5, compression=compression, tile=128
    )
    out = open_image(path).level(0).compute()
    if compression == "jpeg":
        assert np.abs(out.astype(int) - img).mean() < 60  # lossy on noise, but the same image
    else:
        np.testing.assert_array_equal(out, img)


@pytest.mark.parametrize(
    ("image", "kwargs", "fragment"),
    [
        (np.zeros((10, 10), np.uint8), {"pixel_size_um": 1.0}, "must be"),
        (np.zeros((32, 32, 3), np.uint8), {"pixel_size_um": 0.0}, "pixel_size_um"),
        (np.zeros((32, 32, 3), np.uint8), {"pixel_size_um": 1.0, "tile": 100}, "multiple of 16"),
        (np.zeros((32, 32, 3), np.complex64), {"pixel_size_um": 1.0}, "complex64"),
    ],
)
def test_rejects_bad_input(
    tmp_path: Path, image: np.ndarray, kwargs: dict[str, float], fragment: str
) -> None:
    path = tmp_path / "bad.ome.tif"
    with pytest.raises(ValueError, match=fragment) as info:
        write_pyramidal_tiff(path, image, **kwargs)
    assert str(path) in str(info.value)
    assert not path.exists()


def test_a_file_is_replaced_whole_even_from_its_own_pixels(tmp_path: Path) -> None:
    """Written beside and renamed in: tifffile truncated the file at the path first, so
    re-pyramiding a slide in place read its pixels from a 16-byte file, and a failure
    midway left a truncated file where the old one was."""
    path = tmp_path / "slide.ome.tif"
    rgb = np.random.default_rng(1).integers(0, 256, (300, 200, 3), dtype=np.uint8)
    write_pyramidal_tiff(path, rgb, pixel_size_um=0.5, tile=64, min_level_size=64)
    write_pyramidal_tiff(path, open_image(path).level(0), pixel_size_um=0.5, tile=32)
    np.testing.assert_array_equal(open_image(path).level(0).compute(), rgb)
    before = path.read_bytes()

    def fails(block: np.ndarray) -> np.ndarray:
        raise OSError("the disk is full")

    failing = da.from_array(rgb, chunks=(100, 200, 3)).map_blocks(fails, dtype=np.uint8)
    with pytest.raises(OSError, match="the disk is full"):
        write_pyramidal_tiff(path, failing, pixel_size_um=0.5, tile=32)
    assert path.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == [".slide.ome.tif.lock", "slide.ome.tif"]


def test_the_file_reaches_the_disk_before_it_is_renamed_into_place(tmp_path, monkeypatch):
    """After a power cut the rename may reach the disk before the data: a slide that looks
    written but is empty. The file is flushed to disk first, as atomic.replaced_file does."""
    import os

    out = tmp_path / "slide.ome.tif"
    calls: list[tuple[str, str]] = []
    fsync, replace = os.fsync, os.replace

    def synced(fd: int) -> None:
        calls.append(("fsync", os.readlink(f"/proc/self/fd/{fd}")))
        fsync(fd)

    def replaced(a, b) -> None:
        calls.append(("replace", str(a)))
        replace(a, b)

    monkeypatch.setattr(os, "fsync", synced)
    monkeypatch.setattr(os, "replace", replaced)
    write_pyramidal_tiff(out, np.zeros((64, 64, 3), np.uint8), pixel_size_um=0.5, tile=32)
    written = next(p for kind, p in calls if kind == "replace")
    assert ("fsync", written) in calls
    assert calls.index(("fsync", written)) < calls.index(("replace", written))


def test_a_killed_writes_scratch_is_removed_by_the_next_write(tmp_path: Path) -> None:
    """SIGKILL skips the scratch folder's clean-up: each killed write left one of about the
    image's size, hidden beside it, for ever."""
    import signal
    import subprocess
    import sys

    path = tmp_path / "slide.ome.tif"
    killed = (
        "import os, signal, numpy as np, segpipe.io.writers as w\n"
        "real = w._write_levels\n"
        "def levels(tif, image, levels, scratch, *rest):\n"
        "    (scratch / 'level1.npy').write_bytes(b'0' * 4096)\n"
        "    os.kill(os.getpid(), signal.SIGKILL)\n"
        "w._write_levels = levels\n"
        f"w.write_pyramidal_tiff({str(path)!r}, np.zeros((64, 64, 3), np.uint8), pixel_size_um=1)"
    )
    left = []
    for _ in range(2):  # the second removes the first's, then leaves its own
        run = subprocess.run([sys.executable, "-c", killed], check=False)
        assert run.returncode == -signal.SIGKILL
        left.append([p for p in tmp_path.iterdir() if p.name.startswith(".slide.ome.tif.wri")])
    assert [len(names) for names in left] == [1, 1] and left[0] != left[1]
    assert not path.exists()
    rgb = np.random.default_rng(2).integers(0, 256, (64, 64, 3), dtype=np.uint8)
    write_pyramidal_tiff(path, rgb, pixel_size_um=1.0)
    assert sorted(p.name for p in tmp_path.iterdir()) == [".slide.ome.tif.lock", "slide.ome.tif"]
    np.testing.assert_array_equal(open_image(path).read(0, 64, 0, 64), rgb)


@pytest.mark.parametrize("channels", [4, 2, 5])
def test_channels_beyond_rgb_are_data_bands_not_alpha(tmp_path: Path, channels: int) -> None:
    """A 4-band image (RGB + NIR, a 4-plex) was written as RGB with an unassociated alpha,
    so readers took its 4th band for a validity mask: every band reads back as data."""
    img = _image(channels)
    img[:50, :60, -1] = 0  # a last band of zeros would mark these pixels invalid as alpha
    path = write_pyramidal_tiff(
        tmp_path / "bands.ome.tif", img, pixel_size_um=0.5, tile=64, min_level_size=64
    )
    with tifffile.TiffFile(path) as tif:
        page = tif.series[0].levels[0].keyframe
        assert page.photometric == tifffile.PHOTOMETRIC.MINISBLACK
        assert tuple(page.extrasamples) == (tifffile.EXTRASAMPLE.UNSPECIFIED,) * (channels - 1)
    reader = open_image(path)
    assert reader.mask_kind is None
    assert "alpha" not in (reader.channel_names or ())
    assert reader.level_shapes[0] == img.shape
    np.testing.assert_array_equal(reader.level(0).compute(), img)


@pytest.mark.parametrize("rows", [66, 130, 131])  # a last band of 2 or 3 rows (tile 64)
def test_every_level_is_the_2x2_mean_whatever_the_last_bands_height(
    tmp_path: Path, rows: int
) -> None:
    """Each band of tile rows is halved into the next level on its way out; a last band of
    exactly 2 rows still makes the next level's last row."""
    img = np.random.default_rng(rows).integers(1, 256, (rows, 100, 3), dtype=np.uint8)
    path = write_pyramidal_tiff(
        tmp_path / "r.ome.tif", img, pixel_size_um=0.5, tile=64, min_level_size=16
    )
    expected = [img]
    while min(expected[-1].shape[:2]) // 2 >= 16:
        expected.append(_mean2x_reference(expected[-1]))
    with tifffile.TiffFile(path) as tif:
        levels = [level.asarray() for level in tif.series[0].levels]
    assert [a.shape for a in levels] == [e.shape for e in expected]
    for got, want in zip(levels, expected, strict=True):
        np.testing.assert_array_equal(got, want)


def test_reduced_levels_are_marked_reduced_so_gdal_sees_them_as_overviews(
    tmp_path: Path,
) -> None:
    """NewSubfileType 1 on each SubIFD level: without it tifffile still finds the pyramid,
    but GDAL (QGIS, rasterio) lists no overviews and reads level 0 to draw a zoomed-out view."""
    import warnings

    rasterio = pytest.importorskip("rasterio")
    path = write_pyramidal_tiff(
        tmp_path / "o.ome.tif", _image(), pixel_size_um=0.5, tile=64, min_level_size=64
    )
    with tifffile.TiffFile(path) as tif:
        kinds = [level.keyframe.subfiletype for level in tif.series[0].levels]
    assert kinds == [0, 1, 1]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # GDAL's notes on the OME-XML it does not read
        with rasterio.open(path) as ds:
            assert ds.overviews(1) == [2, 4]


def test_the_ome_xml_gives_square_pixels_of_the_size_given(tmp_path: Path) -> None:
    import warnings
    import xml.etree.ElementTree as ET

    path = write_pyramidal_tiff(
        tmp_path / "p.ome.tif", _image()[:64, :64], pixel_size_um=0.25, tile=64
    )
    with tifffile.TiffFile(path) as tif:
        root = ET.fromstring(tif.ome_metadata)
    pixels = next(e for e in root.iter() if e.tag.endswith("}Pixels"))
    sizes = {k: pixels.get(k) for k in ("PhysicalSizeX", "PhysicalSizeY")}
    units = {k: pixels.get(k) for k in ("PhysicalSizeXUnit", "PhysicalSizeYUnit")}
    assert {k: float(v) for k, v in sizes.items()} == {"PhysicalSizeX": 0.25, "PhysicalSizeY": 0.25}
    assert set(units.values()) <= {"µm", None}  # None: the OME schema's default, µm
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # anisotropic pixels would warn "differs in X and Y"
        assert open_image(path).pixel_size_um == 0.25


def test_every_levels_resolution_tags_give_its_pixel_size_in_x_and_y(tmp_path: Path) -> None:
    """Plain TIFF readers take each level's pixel size from its own X/YResolution (pixels
    per centimetre): level k's pixels are 2**k times the size of level 0's, in both axes."""
    path = write_pyramidal_tiff(
        tmp_path / "t.ome.tif", _image(), pixel_size_um=0.25, tile=64, min_level_size=64
    )
    with tifffile.TiffFile(path) as tif:
        levels = [level.keyframe.tags for level in tif.series[0].levels]
        assert len(levels) == 3
        for k, tags in enumerate(levels):
            assert tags["ResolutionUnit"].value == tifffile.RESUNIT.CENTIMETER
            for name in ("XResolution", "YResolution"):
                num, den = tags[name].value
                assert 1e4 * den / num == pytest.approx(0.25 * 2**k), (k, name)


@pytest.mark.parametrize("size", [237, 238, 245])
def test_a_name_too_long_for_the_scratch_folder_beside_it_is_refused_naming_it(
    tmp_path: Path, size: int
) -> None:
    """The scratch folder ``.NAME.writing-XXXXXXXX`` takes 18 bytes more than NAME, and a
    name holds at most 255: a longer one failed with an OSError naming that hidden folder."""
    out = tmp_path / ("a" * (size - len(".ome.tif")) + ".ome.tif")
    assert len(out.name.encode()) == size
    pixels = np.zeros((32, 32, 3), np.uint8)
    if size <= 255 - 18:
        write_pyramidal_tiff(out, pixels, pixel_size_um=1.0, tile=16)
        assert out.is_file()
        return
    with pytest.raises(ValueError, match=f"its name is {size} bytes") as info:
        write_pyramidal_tiff(out, pixels, pixel_size_um=1.0, tile=16)
    assert str(out) in str(info.value) and "at most 237 bytes" in str(info.value)
    assert not any(".writing-" in p.name for p in tmp_path.iterdir())
