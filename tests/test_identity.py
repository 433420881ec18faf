"""pixel_sample_sha256: a digest of a few regions of an image's pixels, through the Reader
protocol alone, equal for equal pixels in any format and cheap for any size."""

import hashlib
import json

import numpy as np
import pytest
import tifffile
import zarr

from segpipe.io.identity import SAMPLE_SIDE, pixel_sample_sha256, sample_spans
from segpipe.io.readers import ArrayReader, open_image


class CountingReader:
    """A reader's pixels, counting what is read and at which levels."""

    def __init__(self, reader):
        self.reader = reader
        self.path, self.pixel_size_um = reader.path, reader.pixel_size_um
        self.level_shapes, self.dtype = reader.level_shapes, reader.dtype
        self.pixels, self.levels = 0, set()

    def read(self, y0, y1, x0, x1, level=0):
        self.pixels += (y1 - y0) * (x1 - x0)
        self.levels.add(level)
        return self.reader.read(y0, y1, x0, x1, level)


class PyramidReader:
    """Levels given as arrays: a pyramid of any shapes, for the level the sample picks."""

    path, pixel_size_um = "<pyramid>", None

    def __init__(self, levels):
        self.levels = levels
        self.level_shapes = tuple(a.shape for a in levels)
        self.dtype = levels[0].dtype

    def read(self, y0, y1, x0, x1, level=0):
        return self.levels[level][y0:y1, x0:x1]


def image(shape=(300, 400, 3), seed=0):
    return np.random.default_rng(seed).integers(0, 256, shape, dtype=np.uint8)


def test_equal_pixels_digest_alike_in_every_format_and_call(tmp_path):
    pixels = image()
    tifffile.imwrite(tmp_path / "a.tif", pixels, tile=(64, 64), photometric="rgb")
    arr = zarr.create_array(
        tmp_path / "a.zarr", shape=pixels.shape, chunks=(32, 32, 3), dtype="uint8",
        dimension_names=("y", "x", "c"),
    )  # fmt: skip
    arr[...] = pixels
    readers = [
        ArrayReader(pixels),
        ArrayReader(pixels.copy()),
        open_image(tmp_path / "a.tif"),
        open_image(tmp_path / "a.zarr"),
    ]
    digests = {pixel_sample_sha256(r) for r in readers} | {pixel_sample_sha256(readers[0])}
    assert len(digests) == 1
    # Byte order is the file's business, not the pixels': equal values digest alike.
    wide = pixels.astype("<u2") * 257
    assert pixel_sample_sha256(ArrayReader(wide)) == pixel_sample_sha256(
        ArrayReader(wide.astype(">u2"))
    )


def test_a_changed_sampled_pixel_changes_the_digest_and_one_outside_the_sample_does_not():
    pixels = image()
    before = pixel_sample_sha256(ArrayReader(pixels))
    (y0, _), (x0, _) = sample_spans(300)[1], sample_spans(400)[2]
    inside = pixels.copy()
    inside[y0 + 5, x0 + 7, 1] ^= 1
    assert pixel_sample_sha256(ArrayReader(inside)) != before
    # The price of reading regions only: a pixel between them is not seen.
    outside = pixels.copy()
    outside[299, 399, 0] ^= 1
    assert max(sample_spans(300))[1] <= 299 and max(sample_spans(400))[1] <= 399
    assert pixel_sample_sha256(ArrayReader(outside)) == before


def test_the_shapes_and_dtype_are_part_of_the_digest():
    pixels = image()
    base = pixel_sample_sha256(ArrayReader(pixels))
    assert pixel_sample_sha256(ArrayReader(pixels.astype(np.uint16))) != base
    # Wider, with the same pixels where the sample of the narrower one lies: other shapes.
    wider = np.concatenate([pixels, pixels[:, :8]], axis=1)
    assert pixel_sample_sha256(ArrayReader(wider)) != base
    # A pyramid over the same level 0 is the same image: its overviews are a tool's.
    two_levels = PyramidReader([pixels, pixels[::2, ::2]])
    assert pixel_sample_sha256(two_levels) == base


def test_the_digest_is_of_the_regions_an_independent_slicing_gives():
    # Pinned on purpose: another digest of the same pixels is another source_sha256, and
    # every result made before it would stop resuming.
    pixels = image()
    h = hashlib.sha256()
    h.update(b'{"v": "segpipe-pixel-sample-1", "shape": [300, 400, 3], "dtype": "|u1"}')
    for y0, y1 in [(18, 82), (118, 182), (218, 282)]:
        for x0, x1 in [(34, 98), (168, 232), (301, 365)]:
            h.update(pixels[y0:y1, x0:x1].tobytes())
    assert pixel_sample_sha256(ArrayReader(pixels)) == h.hexdigest()


def test_a_100k_px_single_level_image_is_sampled_by_nine_small_regions():
    huge = np.broadcast_to(np.arange(3, dtype=np.uint8), (100_000, 100_000, 3))
    counting = CountingReader(ArrayReader(huge))
    pixel_sample_sha256(counting)
    assert counting.pixels == 9 * SAMPLE_SIDE**2 and counting.levels == {0}


def test_a_pyramid_is_sampled_at_level_0_whatever_its_overviews():
    """An ingest's or gdaladdo's overviews can be rebuilt otherwise (another downsampling,
    more levels) without the image changing: only level 0 is read."""
    pixels = image((800, 1000, 3))
    mean = pixels.reshape(400, 2, 500, 2, 3).mean(axis=(1, 3)).astype(np.uint8)
    counting = CountingReader(PyramidReader([pixels, pixels[::2, ::2], pixels[::4, ::4]]))
    digest = pixel_sample_sha256(counting)
    assert counting.levels == {0} and counting.pixels == 9 * SAMPLE_SIDE**2
    assert pixel_sample_sha256(PyramidReader([pixels, mean])) == digest


@pytest.mark.parametrize(
    ("n", "spans"),
    [
        (192, [(0, 64), (64, 128), (128, 192)]),
        (1000, [(134, 198), (468, 532), (801, 865)]),
        (100, [(0, 64), (18, 82), (36, 100)]),
        (40, [(0, 40)]),
        (1, [(0, 1)]),
    ],
)
def test_sample_spans_lie_inside_the_axis_centred_in_its_thirds(n, spans):
    assert sample_spans(n) == spans


def pattern(shape):
    """(Y, X, C) uint8 pixels, a formula of their place: the same on any machine or numpy."""
    yy, xx, cc = np.indices(shape)
    return ((yy * 7 + xx * 3 + cc * 11 + (yy * xx) % 13) % 256).astype(np.uint8)


# Computed by the nine-reads code before strips were read once a band: a digest recorded then
# must match now, whatever the layout of the file it is read from.
PINNED_RGB = "5865a8b630dca2da6c98f97a84cecb53fb41fca0e58eae61cc66e7f9d808dce2"
PINNED_U16 = "db559e0225bdd976476f4af457b539db143a1992c01c77beb1a00e61c87c9940"


@pytest.mark.parametrize(
    "layout",
    [{"rowsperstrip": 16}, {"rowsperstrip": 128}, {"rowsperstrip": 300}, {"tile": (64, 64)}],
    ids=["strips-16", "strips-128", "one-strip", "tiles-64"],
)
def test_digests_recorded_before_still_match(tmp_path, layout):
    pixels = pattern((300, 1000, 3))
    tifffile.imwrite(tmp_path / "p.tif", pixels, photometric="rgb", **layout)
    assert pixel_sample_sha256(open_image(tmp_path / "p.tif")) == PINNED_RGB
    assert pixel_sample_sha256(ArrayReader(pixels)) == PINNED_RGB
    yy, xx = np.indices((250, 700))
    grey = (yy * 257 + xx * 31).astype(np.uint16)
    tifffile.imwrite(tmp_path / "g.tif", grey, rowsperstrip=24, byteorder=">")
    assert pixel_sample_sha256(open_image(tmp_path / "g.tif")) == PINNED_U16


@pytest.fixture
def decoded_segments(monkeypatch):
    """The index of every strip or tile tifffile decodes from now on, in order."""
    indices = []
    build = tifffile.TiffPage.decode.func

    def counting(page):
        decode = build(page)

        def wrapped(data, index, **kwargs):
            indices.append(index)
            return decode(data, index, **kwargs)

        return wrapped

    monkeypatch.setattr(tifffile.TiffPage, "decode", property(counting))
    return indices


def recorded_reads(reader):
    """``reader`` with the windows its reads ask for recorded in the returned list."""
    windows = []
    read = reader.read

    def recording(y0, y1, x0, x1, level=0):
        windows.append((y0, y1, x0, x1))
        return read(y0, y1, x0, x1, level)

    reader.read = recording
    return windows


# sample_spans(300) and sample_spans(1000), as pinned above
ROWS, COLS = [(18, 82), (118, 182), (218, 282)], [(134, 198), (468, 532), (801, 865)]


@pytest.mark.parametrize("rows_per_strip", [16, 128, 300])
def test_a_stripped_tiff_decodes_each_strip_it_samples_once(
    tmp_path, decoded_segments, rows_per_strip
):
    """Three regions side by side share whole-width strips: read one by one, each strip of a
    band was decoded three times (19 MB a region at 100k px wide)."""
    tifffile.imwrite(
        tmp_path / "s.tif", pattern((300, 1000, 3)), photometric="rgb",
        rowsperstrip=rows_per_strip, compression="zlib",
    )  # fmt: skip
    reader = open_image(tmp_path / "s.tif")
    decoded_segments.clear()
    assert pixel_sample_sha256(reader) == PINNED_RGB
    sampled = {y // rows_per_strip for y0, y1 in ROWS for y in range(y0, y1)}
    assert sorted(decoded_segments) == sorted(sampled)


def test_a_tiled_tiff_is_read_region_by_region(tmp_path, decoded_segments):
    """Region by region, as before: each read decodes the tiles under its region only."""
    tifffile.imwrite(
        tmp_path / "t.tif", pattern((300, 1000, 3)), photometric="rgb", tile=(64, 64),
        compression="zlib",
    )  # fmt: skip
    reader = open_image(tmp_path / "t.tif")
    windows = recorded_reads(reader)
    decoded_segments.clear()
    assert pixel_sample_sha256(reader) == PINNED_RGB
    assert windows == [(y0, y1, x0, x1) for y0, y1 in ROWS for x0, x1 in COLS]
    # each region decodes the (up to four) tiles under its corners, as it always did
    under = [
        {(y // 64, x // 64) for y in (y0, y1 - 1) for x in (x0, x1 - 1)}
        for y0, y1 in ROWS
        for x0, x1 in COLS
    ]
    assert len(decoded_segments) == sum(map(len, under))


def test_a_single_strip_tiffs_sample_windows_stay_under_a_quarter_of_its_strip(
    tmp_path, decoded_segments
):
    """One strip of 2000 x 2000 RGB (12 MB): a window is held whole beside the strip decoded
    into it, and one over the three row spans was 5.9 MB; the first two spans make one of
    3.1 MB (at most a quarter of the strip, or 4 MiB), the last its own, the strip decoded
    for each. The digest is the region-by-region one."""
    pixels = pattern((2000, 2000, 3))
    tifffile.imwrite(tmp_path / "one.tif", pixels, photometric="rgb", rowsperstrip=2000)
    reader = open_image(tmp_path / "one.tif")
    windows = recorded_reads(reader)
    decoded_segments.clear()
    assert pixel_sample_sha256(reader) == pixel_sample_sha256(PyramidReader([pixels]))
    (top, _), (_, middle), (last, bottom) = sample_spans(2000)
    assert windows == [(top, middle, top, bottom), (last, bottom, top, bottom)]
    assert decoded_segments == [0, 0]
    largest = max((y1 - y0) * (x1 - x0) * 3 for y0, y1, x0, x1 in windows)
    assert largest <= max(pixels.nbytes // 4, 4 * 2**20)


@pytest.mark.parametrize("dtype", ["u2", "i4", "f4", "f8"])
def test_pixels_digest_alike_in_either_byte_order(dtype):
    """The pixels are hashed little-endian: an in-memory array (segpipe.segment takes one) or
    a Zarr store may hold them big-endian. Values whose bytes differ from each other, so a
    byte-swapped hash could not pass by chance (x * 257 reads alike either way round)."""
    rng = np.random.default_rng(4)
    pixels = rng.integers(0, 30_000, (200, 230, 2)).astype(np.dtype(dtype).newbyteorder("<"))
    swapped = pixels.astype(pixels.dtype.newbyteorder(">"))
    assert swapped.tobytes() != pixels.tobytes() and (swapped == pixels).all()
    expected = hashlib.sha256(
        json.dumps(
            {"v": "segpipe-pixel-sample-1", "shape": [200, 230, 2], "dtype": "<" + dtype}
        ).encode()
    )
    for y0, y1 in sample_spans(200):
        for x0, x1 in sample_spans(230):
            expected.update(pixels[y0:y1, x0:x1].tobytes())
    assert pixel_sample_sha256(ArrayReader(swapped)) == expected.hexdigest()
    assert pixel_sample_sha256(ArrayReader(pixels)) == expected.hexdigest()
