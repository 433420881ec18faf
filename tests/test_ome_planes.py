"""The open-time checks of an OME-TIFF's planes (segpipe/io/readers/ome_planes.py) on planes
of one file: tifffile reads a plane after a file's first by that first plane's tags (its
keyframe) and reads only the plane's offsets and byte counts, so a plane stored otherwise read
silently wrong. (Multi-file sets: test_vendor_formats.py.)"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import tifffile
import zarr

from segpipe.io.readers import ImageReadError, open_image

SHAPE = (128, 192)
CHANNELS = 3
_RAW = {"compression": None, "tile": (64, 64)}
_ZLIB = {"compression": "zlib", "tile": (64, 64)}


def _planes() -> np.ndarray:
    """``(C, Y, X)`` uint8 channels that differ from each other and from their own bytes
    compressed (so a plane decoded as another compression cannot read right by chance)."""
    rng = np.random.default_rng(7)
    return rng.integers(0, 256, (CHANNELS, *SHAPE), dtype=np.uint8)


def write_planes(
    path: Path, stored: list[dict[str, object]], reduced: list[dict[str, object]] | None = None
) -> np.ndarray:
    """One OME-TIFF of :data:`CHANNELS` channels, channel ``c`` in IFD ``c`` stored by tifffile
    keywords ``stored[c]``, reduced by 2 in a SubIFD stored by ``reduced[c]`` (raw 64 x 64
    tiles but for these) when given; returns the ``(Y, X, C)`` pixels."""
    planes = _planes()
    y, x = SHAPE
    channels = "".join(f'<Channel ID="Channel:0:{c}" SamplesPerPixel="1"/>' for c in range(3))
    xml = (
        '<?xml version="1.0" encoding="UTF-8"?><OME xmlns="http://www.openmicroscopy.org/'
        'Schemas/OME/2016-06"><Image ID="Image:0"><Pixels ID="Pixels:0" DimensionOrder="XYCZT" '
        f'Type="uint8" SizeX="{x}" SizeY="{y}" SizeC="{CHANNELS}" SizeZ="1" SizeT="1" '
        f'PhysicalSizeX="0.5" PhysicalSizeY="0.5">{channels}'
        f'<TiffData IFD="0" PlaneCount="{CHANNELS}"/></Pixels></Image></OME>'
    )
    with tifffile.TiffWriter(path) as tif:
        for c in range(CHANNELS):
            first = {"description": xml} if c == 0 else {}
            sub = {"subifds": 1} if reduced is not None else {}
            kw = {"photometric": "minisblack", "metadata": None, **stored[c], **first, **sub}
            tif.write(planes[c], **kw)
            if reduced is not None:
                kw = {"photometric": "minisblack", "metadata": None, **_RAW, **reduced[c]}
                tif.write(planes[c, ::2, ::2], subfiletype=1, **kw)
    return planes.transpose(1, 2, 0)


_TURNED = {"extratags": [(274, "H", 1, 3, True)]}  # Orientation 3: stored upside down


@pytest.mark.parametrize(
    ("third", "stated", "fix"),
    [
        (
            _ZLIB,
            "has Compression (TIFF tag 259) 8 (ADOBE_DEFLATE), its IFD 0 has 1 (NONE); "
            "tifffile decodes the tiles of every plane of a file's level by the tags of its IFD 0",
            "write the level's planes alike",
        ),
        (
            {**_RAW, "photometric": "miniswhite"},
            "has PhotometricInterpretation (TIFF tag 262) 0 (MINISWHITE), of 8-bit samples, "
            "its IFD 0 has PhotometricInterpretation (TIFF tag 262) 1 (MINISBLACK)",
            "write the level's planes alike",
        ),
        (
            {**_RAW, **_TURNED},
            "has Orientation (TIFF tag 274) 3, its IFD 0 has 1; segpipe shows every plane of "
            "the level as its IFD 0 says",
            "write the level's planes alike",
        ),
        (
            {**_RAW, "photometric": "cfa"},  # samples segpipe cannot show: this plane's alone
            "has PhotometricInterpretation (TIFF tag 262) 32803 (CFA), of 8-bit samples, its "
            "IFD 0 has PhotometricInterpretation (TIFF tag 262) 1 (MINISBLACK)",
            "write the level's planes alike",
        ),
        (
            {"compression": None, "tile": (128, 32)},  # as many tiles: tifffile takes it
            "is 128x192 pixels of uint8 in tiles of 128x32, its IFD 0 has 128x192 pixels of "
            "uint8 in tiles of 64x64; tifffile reads every plane of the level by one tile grid",
            "the level's planes were written unalike: write them again alike",
        ),
    ],
    ids=["compression", "min-is-white", "turned", "cfa", "tiles"],
)
def test_a_plane_stored_unlike_its_files_first_is_refused_naming_it(tmp_path, third, stated, fix):
    """Compression and tiles: tifffile decodes the third plane by IFD 0's tags (the premise,
    checked). Min-is-white and turned: tifffile reads its samples right, but segpipe shows the
    level as IFD 0 says (as stored, upright)."""
    path = tmp_path / "planes.ome.tif"
    want = write_planes(path, [_RAW, _RAW, third])
    with tifffile.TiffFile(path) as tif:
        assert tif.series[0].axes == "CYX"
        try:
            got = zarr.open(tif.series[0].aszarr(level=0), mode="r")[2]
        except ValueError:  # tiles of another shape: reshape fails
            got = None
        decoded_right = got is not None and np.array_equal(got, want[..., 2])
        assert decoded_right == ("tiles" not in stated and "Compression" not in stated)
    with pytest.raises(ImageReadError) as info:
        open_image(path)
    assert str(info.value).startswith(f"{path}: plane 3 of 3 of level 0 (IFD 2) {stated}")
    assert str(info.value).endswith(fix)


@pytest.mark.parametrize(
    ("third", "stated"),
    [
        (_ZLIB, "Compression (TIFF tag 259) 8 (ADOBE_DEFLATE), its SubIFD of IFD 0 has 1"),
        ({**_RAW, "photometric": "miniswhite"}, "PhotometricInterpretation (TIFF tag 262) 0"),
    ],
    ids=["compression", "min-is-white"],
)
def test_a_planes_reduced_level_stored_unlike_the_levels_first_is_refused(tmp_path, third, stated):
    """Above level 0 tifffile reads every plane's SubIFD by the first plane's: only the first
    plane's own SubIFD was compared (as a multi-file set's file), never the planes after it."""
    path = tmp_path / "planes.ome.tif"
    write_planes(path, [_RAW] * CHANNELS, reduced=[{}, {}, third])
    with pytest.raises(ImageReadError) as info:
        open_image(path)
    assert str(info.value).startswith(
        f"{path}: plane 3 of 3 of level 1 (SubIFD of IFD 2) has {stated}"
    )


@pytest.mark.parametrize("stored", [_RAW, _ZLIB], ids=["raw", "zlib"])
def test_planes_stored_alike_read_every_channel_at_every_level(tmp_path, stored):
    """Planes written one by one, stored alike, compressed or not: no false alarm."""
    path = tmp_path / "planes.ome.tif"
    want = write_planes(path, [stored] * CHANNELS, reduced=[stored] * CHANNELS)
    reader = open_image(path)
    assert reader.shape == (*SHAPE, CHANNELS)
    np.testing.assert_array_equal(reader.read(0, SHAPE[0], 0, SHAPE[1]), want)
    np.testing.assert_array_equal(reader.level(1).compute(), want[::2, ::2])


def test_a_channel_ome_tiff_written_by_tifffile_reads(tmp_path):
    """tifffile's own OME-TIFF of channels with a SubIFD pyramid: its planes are frames of one
    keyframe, each checked at open, and read as written."""
    path = tmp_path / "channels.ome.tif"
    planes = _planes()
    with tifffile.TiffWriter(path, ome=True) as tif:
        options = {"tile": (64, 64), "compression": "zlib", "photometric": "minisblack"}
        tif.write(planes, subifds=1, metadata={"axes": "CYX"}, **options)
        tif.write(planes[:, ::2, ::2], subfiletype=1, **options)
    reader = open_image(path, pixel_size_um=0.5)
    np.testing.assert_array_equal(reader.read(0, SHAPE[0], 0, SHAPE[1]), planes.transpose(1, 2, 0))
    np.testing.assert_array_equal(reader.level(1).compute(), planes[:, ::2, ::2].transpose(1, 2, 0))


def test_a_plane_without_an_ifd_of_its_own_is_read_by_its_keyframe(tmp_path):
    """tifffile makes some planes from an index, not an IFD (Micro-Manager NDTiff, a
    contiguous series): a virtual frame, read by its keyframe alone, with no IFD to compare.
    Reading one as a page raised ValueError, refusing the file as unreadable."""
    from types import SimpleNamespace

    from segpipe.io.readers.ome_planes import check_level_files

    path = tmp_path / "planes.ome.tif"
    write_planes(path, [_RAW] * CHANNELS)
    with tifffile.TiffFile(path) as tif:
        keyframe = tif.pages.first
        virtual = tifffile.TiffFrame(
            tif, 1, offset=None, keyframe=keyframe,
            dataoffsets=keyframe.dataoffsets, databytecounts=keyframe.databytecounts,
        )  # fmt: skip
        assert virtual.is_virtual
        level = SimpleNamespace(keyframe=keyframe, pages=[keyframe, virtual])
        check_level_files(SimpleNamespace(levels=[level]), 0, lambda page: str(path))


def test_two_planes_whose_subifds_are_one_ifd_are_refused(tmp_path):
    """Plane 2's SubIFDs tag pointed at plane 1's SubIFD: tifffile reads that IFD as both
    planes' level 1 (its tree index tells them apart, its offset does not)."""
    path = tmp_path / "planes.ome.tif"
    write_planes(path, [_RAW] * CHANNELS, reduced=[{}] * CHANNELS)
    with tifffile.TiffFile(path) as tif:
        first, tag = tif.pages[0].subifds[0], tif.pages[1].tags[330]
        assert tag.count == 1 and tif.tiff.offsetsize == 4
        at = tag.valueoffset  # one offset: in the tag's own entry
    data = bytearray(path.read_bytes())
    data[at : at + 4] = first.to_bytes(4, "little")
    path.write_bytes(bytes(data))
    with pytest.raises(ImageReadError) as info:
        open_image(path)
    assert str(info.value) == (
        f"{path}: level 1 reads SubIFD of IFD 1 of {path} as two of its planes (0 and 1 of 3: "
        "channels, Z, T); its SubIFDs (TIFF tag 330) are damaged"
    )
