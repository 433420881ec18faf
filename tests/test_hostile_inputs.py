"""Hostile inputs: truncated, lying and mangled images end in segpipe's own error, naming the
file, within a time and memory bound, and never in a result marked complete."""

from __future__ import annotations

import contextlib
import json
import re
import shutil
import struct
import tracemalloc
from collections.abc import Iterator
from pathlib import Path

import imagecodecs
import numpy as np
import pytest
import tifffile
import zarr
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from PIL import Image
from test_vendor_formats import write_channel_set

import segpipe
from segpipe.io.readers import ImageReadError, open_image
from segpipe.results import is_complete

# Per example: a mangled file must be refused (or read) without a big allocation. Memory, not
# time, is the bound: wall time on a shared machine says nothing. Each call is measured on its
# own, two ways: the peak of what Python and numpy allocate (tracemalloc: an array the size a
# header declares counts even if never touched, which the resident set would not show), and
# how far the resident set grows (memory that C libraries such as torch or Pillow touch, which
# tracemalloc does not see; Linux lets a process reset its peak, elsewhere this part is
# skipped).
_MEMORY_MB = 1024


def _status_mb(field: str) -> int:
    with open("/proc/self/status") as f:
        line = next(line for line in f if line.startswith(f"{field}:"))
    return int(line.split()[1]) // 1024


def _reset_peak_rss() -> int | None:
    """Reset the process's peak resident set to now (Linux); the resident MiB, or None."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return _status_mb("VmRSS")
    except OSError:
        return None


@contextlib.contextmanager
def _no_big_allocation() -> Iterator[None]:
    """The block must allocate (Python and numpy) and touch less than ``_MEMORY_MB`` at
    its peak; checked when it ends without an exception."""
    was_tracing = tracemalloc.is_tracing()
    if not was_tracing:
        tracemalloc.start()
    tracemalloc.reset_peak()
    before = tracemalloc.get_traced_memory()[0]
    rss = _reset_peak_rss()
    try:
        yield
        peak_mb = (tracemalloc.get_traced_memory()[1] - before) / 2**20
    finally:
        if not was_tracing:
            tracemalloc.stop()
    assert peak_mb < _MEMORY_MB, f"allocated {peak_mb:.0f} MiB at the peak"
    if rss is not None:
        grown = _status_mb("VmHWM") - rss
        assert grown < _MEMORY_MB, f"the resident set grew by {grown} MiB at the peak"


def _rgb(ny: int = 96, nx: int = 80) -> np.ndarray:
    return np.random.default_rng(0).integers(0, 255, (ny, nx, 3), dtype=np.uint8)


def _tiff(path: Path) -> Path:
    tifffile.imwrite(path, _rgb(), tile=(32, 32), compression="zlib", photometric="rgb")
    return path


def _png(path: Path) -> Path:
    Image.fromarray(_rgb()).save(path)
    return path


def _zarr(path: Path) -> Path:
    arr = zarr.create_array(
        str(path), shape=(96, 80, 3), chunks=(32, 32, 3), dtype="uint8",
        dimension_names=("y", "x", "c"),
    )  # fmt: skip
    arr[...] = _rgb()
    return path


def _read_everything(path: Path) -> None:
    reader = open_image(path)
    for level in range(len(reader.level_shapes)):
        ny, nx, _ = reader.level_shapes[level]
        reader.read(0, ny, 0, nx, level=level)


def _bounded(fn, *args) -> None:
    """Run ``fn``; this call alone must stay below the memory bound."""
    with _no_big_allocation():
        fn(*args)


def _refused_or_read(path: Path) -> None:
    """Read the whole image; a refusal must be our error, naming the file."""
    message = ""
    try:
        _read_everything(path)
    except ImageReadError as exc:
        message = str(exc)
    assert not message or str(path) in message, f"the error does not name the file: {message}"


# --- the cases named in the issue ----------------------------------------------------------


def _lying_tiff(path: Path, side: int, tile: int = 4096) -> Path:
    """A classic TIFF whose header declares ``side`` x ``side`` grey pixels in tiles and lists
    every tile with offset 0 and 0 bytes: a header without data (written by hand, since any
    writer would write the pixels)."""
    import struct

    n = (-(-side // tile)) ** 2
    entries = [
        (256, 4, 1, side),  # ImageWidth
        (257, 4, 1, side),  # ImageLength
        (258, 3, 1, 8),  # BitsPerSample
        (259, 3, 1, 1),  # Compression: none
        (262, 3, 1, 1),  # PhotometricInterpretation: min-is-black
        (277, 3, 1, 1),  # SamplesPerPixel
        (322, 4, 1, tile),  # TileWidth
        (323, 4, 1, tile),  # TileLength
    ]
    ifd_size = 2 + 12 * (len(entries) + 2) + 4
    offsets_at = 8 + ifd_size
    counts_at = offsets_at + 4 * n
    entries += [(324, 4, n, offsets_at), (325, 4, n, counts_at)]  # TileOffsets, TileByteCounts
    ifd = struct.pack("<H", len(entries))
    for tag, kind, count, value in entries:
        packed = struct.pack("<H", value) + b"\0\0" if kind == 3 else struct.pack("<I", value)
        ifd += struct.pack("<HHI", tag, kind, count) + packed
    ifd += struct.pack("<I", 0)
    path.write_bytes(b"II" + struct.pack("<HI", 42, 8) + ifd + bytes(8 * n))
    return path


@pytest.mark.parametrize("bigtiff", [False, True])
def test_a_tiff_cut_to_its_header_is_refused_naming_it(tmp_path: Path, bigtiff: bool) -> None:
    """No IFD at all (found by the fuzzer): the error that names a set's files must not fail
    itself on a file with no first page (an IndexError escaped)."""
    path = tmp_path / "cut.ome.tif"
    tifffile.imwrite(path, _rgb(64, 64), photometric="rgb", tile=(32, 32), bigtiff=bigtiff)
    path.write_bytes(path.read_bytes()[: 16 if bigtiff else 8])
    # Its header's first IFD lies past the end (it was "not a readable TIFF: IndexError: 0")
    with pytest.raises(ImageReadError, match=r"IFD 0 lies at .* truncated") as info:
        open_image(path)
    assert str(path) in str(info.value)


def test_tiff_declaring_a_huge_image_with_no_data_is_refused_at_once(tmp_path: Path) -> None:
    path = _lying_tiff(tmp_path / "huge.tif", 1_000_000)
    assert path.stat().st_size < 1_000_000
    with _no_big_allocation(), pytest.raises(ImageReadError, match=r"huge\.tif") as info:
        open_image(path)
    assert "no pixel data" in str(info.value) or "MAX_IMAGE_PIXELS" in str(info.value)


def test_segment_of_a_lying_tiff_writes_no_result(tmp_path: Path) -> None:
    path = _lying_tiff(tmp_path / "empty.tif", 20_000)
    out = tmp_path / "out.seg.zarr"
    with pytest.raises(ImageReadError, match="lists no pixel data"):
        segpipe.segment(path, out, scheduler="sync")
    assert not out.exists()


@pytest.mark.parametrize("kind", ["tiff", "zarr"])
def test_zero_size_image_is_refused_naming_the_file(tmp_path: Path, kind: str) -> None:
    if kind == "tiff":
        path = tmp_path / "zero.tif"
        with pytest.warns(UserWarning, match="zero-size"):
            tifffile.imwrite(path, np.zeros((0, 16, 3), np.uint8))
    else:
        path = tmp_path / "zero.zarr"
        zarr.create_array(
            str(path), shape=(0, 16, 3), chunks=(8, 8, 3), dtype="uint8",
            dimension_names=("y", "x", "c"),
        )  # fmt: skip
    with pytest.raises(ImageReadError, match="the image is empty") as info:
        open_image(path)
    assert str(path) in str(info.value)
    assert "stack" not in str(info.value)
    out = tmp_path / "out.seg.zarr"
    with pytest.raises(ImageReadError):
        segpipe.segment(path, out, scheduler="sync")
    assert not is_complete(out)
    assert not out.exists()


def _cut_pyramid(path: Path, where: str) -> int:
    """Write a 4-level pyramidal OME-TIFF and cut it ``where``: amid the tiles of level 1 or
    2 (``"tiles 1"``), or at level 2's IFD, its tiles and level 1's whole (``"ifd 2"``).
    Returns the level cut."""
    from segpipe.io.writers import write_pyramidal_tiff

    pixels = np.random.default_rng(1).integers(0, 255, (512, 512, 3), dtype=np.uint8)
    write_pyramidal_tiff(path, pixels, pixel_size_um=0.5, tile=64, min_level_size=64)
    data = path.read_bytes()
    kind, level = where.split()
    with tifffile.TiffFile(path) as tif:
        assert len(tif.series[0].levels) == 4
        page = tif.series[0].levels[int(level)].keyframe
        start, end = int(min(page.dataoffsets)), int(max(page.dataoffsets))
        cut = page.offset if kind == "ifd" else (start + end) // 2
    path.write_bytes(data[:cut])
    return int(level)


@pytest.mark.parametrize("where", ["tiles 1", "tiles 2", "tiles 3", "ifd 2"])
def test_a_pyramid_cut_short_is_refused_at_open_naming_the_level(tmp_path: Path, where) -> None:
    path = tmp_path / "cut.ome.tif"
    level = _cut_pyramid(path, where)
    with pytest.raises(ImageReadError, match=f"level {level}.*truncated") as info:
        open_image(path)
    assert str(path) in str(info.value)


def _value_past_the_end(path: Path, code: int, level: int = 0) -> None:
    """Point tag ``code``'s out-of-line values (of ``level``'s first IFD, a classic TIFF) 1000
    bytes past the end of the file, as a header that lies or a file cut short there does."""
    import struct

    with tifffile.TiffFile(path) as tif:
        entry = tif.series[0].levels[level].keyframe.tags[code].offset
    data = bytearray(path.read_bytes())
    struct.pack_into("<I", data, entry + 8, len(data) + 1000)
    path.write_bytes(bytes(data))


@pytest.mark.parametrize(
    ("code", "pixels", "options"),
    [
        # tifffile's defaults read these as uint32 bit patterns, 1-bit booleans, a plain TIFF
        (339, np.random.default_rng(0).random((64, 64, 3), dtype=np.float32), {}),
        (258, _rgb(64, 64), {}),
        (270, _rgb(64, 64), {"description": "Aperio Image Library v12\n64x64 |MPP = 0.25|"}),
    ],
    ids=["SampleFormat", "BitsPerSample", "SVS description"],
)
def test_a_tag_whose_values_lie_past_the_end_is_refused(tmp_path: Path, code, pixels, options):
    """tifffile drops a tag whose out-of-line values lie past the end of the file, only logging
    it, and reads the image with its default: wrong pixels (or no pixel size) without a word."""
    path = tmp_path / "lie.tif"
    tifffile.imwrite(path, pixels, photometric="rgb", tile=(32, 32), **options)
    _value_past_the_end(path, code)
    with pytest.raises(ImageReadError, match=rf"tag {code} .*past the end of the file") as info:
        open_image(path)
    assert str(path) in str(info.value)


def test_a_private_tag_whose_values_lie_past_the_end_is_left_out_with_a_warning(
    tmp_path: Path,
) -> None:
    """A vendor's private tag (65000) cut off changes nothing read: tifffile reads the file,
    and so does segpipe, saying what it left out (it refused the whole image)."""
    path = tmp_path / "private.tif"
    pixels = _rgb(64, 64)
    tifffile.imwrite(path, pixels, photometric="rgb", extratags=[(65000, "B", 40, b"v" * 40)])
    _value_past_the_end(path, 65000)
    with pytest.warns(UserWarning, match="private tag 65000 has its values past the end"):
        reader = open_image(path)
    np.testing.assert_array_equal(reader.read(0, 64, 0, 64), pixels)


def test_a_pyramid_cut_amid_a_reduced_levels_tag_values_is_refused(tmp_path: Path) -> None:
    """Cut inside the last SubIFD's out-of-line values (its entries whole, its tiles gone):
    tifffile made that level a series of its own, and the pyramid opened one level short."""
    path = tmp_path / "cut.tif"
    rgb = _rgb(300, 260)
    with tifffile.TiffWriter(path) as tif:
        tif.write(rgb, tile=(64, 64), subifds=2, compression="zlib", photometric="rgb")
        for k in (2, 4):
            tif.write(rgb[::k, ::k], tile=(64, 64), subfiletype=1, compression="zlib",
                      photometric="rgb")  # fmt: skip
    with tifffile.TiffFile(path) as tif:
        last = tif.pages.first.subifds[1]
        tags = len(tif.series[0].levels[2].keyframe.tags)
    path.write_bytes(path.read_bytes()[: last + 2 + 12 * tags + 4 + 2])
    with pytest.raises(ImageReadError, match=r"IFD 0's SubIFD 1's tag 2.*truncated") as info:
        open_image(path)
    assert str(path) in str(info.value)


# --- fuzz: mangled bytes of each format ------------------------------------------------------

_FUZZ = settings(
    max_examples=40,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
    derandomize=True,
)


def _mangle(data: bytes, cut: float, flips: list[tuple[float, int]]) -> bytes:
    out = bytearray(data[: max(0, int(len(data) * cut))])
    for where, value in flips:
        if out:
            out[int(where * (len(out) - 1))] = value
    return bytes(out)


_cuts = st.one_of(st.just(1.0), st.floats(0.0, 1.0))
_flips = st.lists(st.tuples(st.floats(0.0, 1.0), st.integers(0, 255)), max_size=6)


@_FUZZ
@given(cut=_cuts, flips=_flips)
def test_mangled_tiff_ends_in_our_error(tmp_path: Path, cut: float, flips) -> None:
    good = _tiff(tmp_path / "good.tif").read_bytes()
    path = tmp_path / "fuzz.tif"
    path.write_bytes(_mangle(good, cut, flips))
    _bounded(_refused_or_read, path)


@_FUZZ
@given(cut=_cuts, flips=_flips)
def test_mangled_png_ends_in_our_error(tmp_path: Path, cut: float, flips) -> None:
    good = _png(tmp_path / "good.png").read_bytes()
    path = tmp_path / "fuzz.png"
    path.write_bytes(_mangle(good, cut, flips))
    _bounded(_refused_or_read, path)


_lies = st.sampled_from(
    [
        {},  # no lie: honest metadata over a chunk dropped or cut short
        {"shape": [10**7, 10**7, 3]},
        {"shape": [96, 80]},
        {"shape": [-1, 80, 3]},
        {"data_type": "complex128"},
        {"data_type": "bool"},
        {"dimension_names": ["a", "b", "c"]},
        {"dimension_names": None},
        {"chunk_grid": {"name": "regular", "configuration": {"chunk_shape": [0, 0, 0]}}},
        {"zarr_format": 2},
        {"node_type": "group"},
    ]
)


@_FUZZ
@given(lie=_lies, drop_chunks=st.booleans(), mangle_chunk=st.booleans())
@example(lie={}, drop_chunks=False, mangle_chunk=True)  # a cut chunk: undecodable
@example(lie={}, drop_chunks=True, mangle_chunk=False)  # a missing chunk: its fill value
def test_lying_zarr_ends_in_our_error(tmp_path: Path, lie, drop_chunks, mangle_chunk) -> None:
    path = tmp_path / "fuzz.zarr"
    shutil.rmtree(path, ignore_errors=True)
    _zarr(path)
    meta = json.loads((path / "zarr.json").read_text())
    meta.update(lie)
    (path / "zarr.json").write_text(json.dumps(meta))
    chunks = sorted(p for p in (path / "c").rglob("*") if p.is_file())
    if drop_chunks:
        chunks[0].unlink()
    elif mangle_chunk:
        chunks[0].write_bytes(chunks[0].read_bytes()[:5])
    _bounded(_refused_or_read, path)


# --- hostile checkpoints -------------------------------------------------------------------


def _checkpoint_payload(random_checkpoint: Path) -> dict:
    import torch

    return torch.load(random_checkpoint, map_location="cpu", weights_only=True)


def test_checkpoint_with_nan_weights_is_refused_by_name(random_checkpoint, tmp_path):
    import torch

    from segpipe import models

    payload = _checkpoint_payload(random_checkpoint)
    key = next(k for k, v in payload["state_dict"].items() if v.is_floating_point())
    payload["state_dict"][key] = payload["state_dict"][key].clone().fill_(float("nan"))
    path = tmp_path / "nan.pt"
    torch.save(payload, path)
    with pytest.raises(models.CheckpointError, match="NaN or infinite") as info:
        models.load(path)
    assert str(path) in str(info.value) and key in str(info.value)


def test_checkpoint_whose_config_lies_about_its_size_is_refused(random_checkpoint, tmp_path):
    import torch

    from segpipe import models

    payload = _checkpoint_payload(random_checkpoint)
    payload["config"] = {**payload["config"], "width": 200_000}
    path = tmp_path / "huge.pt"
    torch.save(payload, path)
    with (
        _no_big_allocation(),
        pytest.raises(models.CheckpointError, match="does not match its weights") as info,
    ):
        models.load(path)
    assert str(path) in str(info.value)


# --- non-finite numbers ----------------------------------------------------------------------


def _float_zarr(path: Path, pixels: np.ndarray) -> Path:
    arr = zarr.create_array(
        str(path), shape=pixels.shape, chunks=(64, 64, pixels.shape[2]), dtype=pixels.dtype,
        dimension_names=("y", "x", "c"),
    )  # fmt: skip
    arr[...] = pixels
    return path


@pytest.mark.parametrize(
    ("bad", "message"),
    [(np.nan, "NaN or infinite pixels"), (np.inf, "NaN or infinite pixels"), (200.0, r"\[0, 1\]")],
)
def test_non_finite_or_out_of_range_float_pixels_fail_naming_the_region(
    random_checkpoint, tmp_path, bad, message
):
    pixels = np.random.default_rng(1).random((96, 96, 3), dtype=np.float32)
    if bad == 200.0:
        pixels = pixels * 255  # [0, 255] data stored as float: not silently taken as [0, 1]
    else:
        pixels[70, 20, 1] = bad
    source = _float_zarr(tmp_path / "f.zarr", pixels)
    out = tmp_path / "out.seg.zarr"
    with pytest.raises(ImageReadError, match=message) as info:
        segpipe.segment(source, out, random_checkpoint, scheduler="sync", tile=32)
    assert str(source) in str(info.value)
    assert not is_complete(out)
    # Inside the image, not the window's mirrored halo past its edges (it said y -44:76).
    found = re.search(r"at y (-?\d+):(\d+), x (-?\d+):(\d+) of level 0", str(info.value))
    y0, y1, x0, x1 = map(int, found.groups())
    assert 0 <= y0 < y1 <= 96 and 0 <= x0 < x1 <= 96, info.value
    if bad != 200.0:
        assert "(first at y 70, x 20)" in str(info.value)


def test_nan_model_output_fails_with_the_window_and_nothing_is_complete(
    random_checkpoint, small_slide, tmp_path
):
    from segpipe import models
    from segpipe.execution.stitching import PredictionError

    net = models.load(random_checkpoint)

    class NaNAfterFourWindows(type(net)):  # the same network, NaN from its fifth call on
        calls = 0

        def forward(self, x):
            type(self).calls += 1
            out = super().forward(x)
            return out * float("nan") if type(self).calls > 4 else out

    broken = NaNAfterFourWindows(net.config, class_names=net.class_names)
    broken.load_state_dict(net.state_dict())
    broken.eval()
    out = tmp_path / "out.seg.zarr"
    with pytest.raises(PredictionError, match=r"NaN or infinite for the window whose output is y"):
        segpipe.segment(
            small_slide.image, out, broken, scheduler="sync", tile=32, task_tiles=1, batch_size=1
        )
    assert not is_complete(out)
    with pytest.raises(segpipe.results.IncompleteResultError):
        segpipe.open_result(out)


# --- lying segpipe ingests and PNG chunks ---------------------------------------------------


def _ingest(tmp_path: Path, *, masked: bool) -> Path:
    """A segpipe ingest (OME-Zarr, levels of 128, 64 and 32 px) of an RGB TIFF, or of a GeoTIFF
    with an internal mask band, which the ingest keeps as its label image labels/valid."""
    from segpipe.io.ingest import ingest

    source = tmp_path / "source.tif"
    pixels = _rgb(128, 128)
    if masked:
        import rasterio
        from rasterio.transform import from_origin

        with (
            rasterio.Env(GDAL_TIFF_INTERNAL_MASK=True),
            rasterio.open(
                source, "w", driver="GTiff", width=128, height=128, count=3, dtype="uint8",
                crs="EPSG:32633", transform=from_origin(500_000, 6_000_000, 2, 2),
                tiled=True, blockxsize=32, blockysize=32,
            ) as ds,
        ):  # fmt: skip
            ds.write(np.moveaxis(pixels, -1, 0))
            mask = np.full((128, 128), 255, np.uint8)
            mask[:30, 60:] = 0
            ds.write_mask(mask)
    else:
        tifffile.imwrite(source, pixels, photometric="rgb")
    store = tmp_path / "image.zarr"
    ingest(source, store, chunk=32, min_level_size=32)
    return store


def test_an_ingest_chunk_claiming_a_petabyte_is_refused_naming_the_store(tmp_path: Path) -> None:
    """A zstd frame header stating 2**50 bytes makes numcodecs raise a bare MemoryError(''):
    the read named neither the store nor the chunk."""
    import struct

    store = _ingest(tmp_path, masked=False)
    chunk = store / "0" / "c" / "0" / "0" / "0"
    data = chunk.read_bytes()
    assert data[:4] == b"\x28\xb5\x2f\xfd" and data[4] & 0x20  # one zstd frame, one segment
    # Frame header descriptor: an 8-byte content size (flag 3) in place of the one it had.
    size_bytes = {0: 1, 1: 2, 2: 4, 3: 8}[data[4] >> 6]
    header = bytes([(data[4] & 0x3F) | 0xC0]) + struct.pack("<Q", 2**50)
    chunk.write_bytes(data[:4] + header + data[5 + size_bytes :])
    reader = open_image(store)
    with pytest.raises(ImageReadError, match=r"image\.zarr: cannot read level 0 at .*MemoryError"):
        reader.read(0, 32, 0, 32)


def _edit_json(path: Path, edit) -> None:
    meta = json.loads(path.read_text())
    edit(meta)
    path.write_text(json.dumps(meta))


@pytest.mark.parametrize("shape", [[32, 32], [128, 128]])
def test_an_ingest_whose_mask_level_is_not_its_levels_shape_is_refused(tmp_path: Path, shape):
    """Level 1 is 64 x 64: a smaller mask gave short masks that no longer lined up with the
    pixels (an IndexError in valid_mask), a larger one masks of another resolution, silently."""
    store = _ingest(tmp_path, masked=True)
    assert open_image(store).mask_kind == "mask"
    _edit_json(store / "labels/valid/1/zarr.json", lambda meta: meta.update(shape=shape))
    with pytest.raises(
        ImageReadError, match=r"valid-pixel mask 'labels/valid/1' has shape .* not level 1's"
    ) as info:
        open_image(store)
    assert str(store) in str(info.value)


@pytest.mark.parametrize(
    ("name", "values"),
    [("nodata", [0]), ("channel_names", ["alpha"]), ("channel_names", ["r", "g", "b", "alpha"])],
)
def test_an_ingest_whose_channel_attributes_miscount_its_channels_is_refused(
    tmp_path: Path, name, values
):
    """A short nodata failed each mask read with a bare ValueError; a lone "alpha" made red
    the alpha, calling every pixel whose red is 0 invalid; a fourth name an IndexError."""
    store = _ingest(tmp_path, masked=False)
    _edit_json(
        store / "zarr.json", lambda meta: meta["attributes"]["segpipe"].update({name: values})
    )
    with pytest.raises(
        ImageReadError, match=rf"segpipe\.{name} holds {len(values)} value\(s\) .* 3 channel"
    ) as info:
        open_image(store)
    assert str(store) in str(info.value)


@pytest.mark.parametrize("mode", ["rgb8", "grey16"])
def test_a_png_chunk_stating_more_than_the_file_holds_is_refused_at_once(tmp_path: Path, mode):
    """Pillow read the rest of an IDAT stated 0xFFFFFFFF bytes long in one read, allocating
    4 GiB (a MemoryError under an address-space limit) for a 3 KiB image."""
    path = tmp_path / "lying.png"
    if mode == "rgb8":
        _png(path)
    else:
        Image.fromarray(_rgb()[..., 0].astype(np.uint16) * 250).save(path)
    data = bytearray(path.read_bytes())
    at = data.index(b"IDAT") - 4
    data[at : at + 4] = (0xFFFFFFFF).to_bytes(4, "big")
    path.write_bytes(bytes(data))
    with (
        _no_big_allocation(),
        pytest.raises(ImageReadError, match=r"'IDAT' chunk .* states 4,294,967,295 bytes") as info,
    ):
        open_image(path)
    assert str(path) in str(info.value)


@pytest.mark.parametrize(("level", "shape"), [(1, [3, 0, 64]), (2, [3, 32, 0])])
def test_an_ingest_with_an_empty_reduced_level_is_refused_naming_it(tmp_path: Path, level, shape):
    """The last level empty opened, promising a level no window reads from; a middle one was
    refused as the next level being no reduction of it. BaseReader's layout check sees every
    level, Zarr's as any format's."""
    store = _ingest(tmp_path, masked=False)
    _edit_json(store / f"{level}/zarr.json", lambda meta: meta.update(shape=shape))
    with pytest.raises(ImageReadError, match=rf"level {level} .* is empty") as info:
        open_image(store)
    assert str(store) in str(info.value)


# --- tiles and strips declared larger than their codec's bytes decode to ---------------------


def _set_long(path: Path, code: int, value: int, level: int = 0) -> None:
    """Overwrite the IFD entry of tag ``code`` of ``level``'s first IFD (a classic TIFF) with
    one LONG, ``value``."""
    import struct

    with tifffile.TiffFile(path) as tif:
        entry = tif.series[0].levels[level].keyframe.tags[code].offset
    data = bytearray(path.read_bytes())
    data[entry : entry + 12] = struct.pack("<HHII", code, 4, 1, value)
    path.write_bytes(bytes(data))


def _two_levels(path: Path, compression: str, layout: str) -> Path:
    """An RGB OME-TIFF of 128 x 128 and 64 x 64 pixels (a SubIFD), in tiles of 32 x 32 or
    strips of 16 rows."""
    rgb = _rgb(128, 128)
    kw = {"tile": (32, 32)} if layout == "tiles" else {"rowsperstrip": 16}
    kw |= {"photometric": "rgb", "compression": compression}
    with tifffile.TiffWriter(path, ome=True) as tif:
        tif.write(rgb, subifds=1, metadata={"axes": "YXS"}, **kw)
        tif.write(rgb[::2, ::2], subfiletype=1, **kw)
    return path


# Lies within the other checks' bounds (tiles of at most 2 GiB, no larger than the level, as
# many listed as the size needs): tiles of 1,024 x 524,288 pixels (1.5 GiB) in 2 x 2; strips
# of 2**31 - 1 pixels (96 GiB). Tag numbers: ImageWidth, ImageLength, TileWidth, TileLength.
_LIES = {
    "tiles": {256: 2**20, 257: 2**11, 322: 2**19, 323: 2**10},
    "strips": {256: 2**31 - 1},
}


# A level 0 lying about its size no longer matches the OME-XML: tifffile reads two images.
@pytest.mark.filterwarnings("ignore:.*holds 2 images:UserWarning")
@pytest.mark.parametrize("level", [0, 1])
@pytest.mark.parametrize("layout", ["tiles", "strips"])
@pytest.mark.parametrize(
    ("compression", "fragment"),
    [
        ("lzw", "bytes stored for one"),
        ("zstd", "bytes stored for one"),
        ("lzma", "bytes stored for one"),
        ("jpeg", "is a JPEG stream of"),
    ],
)
def test_tiles_or_strips_declared_far_larger_than_their_stream_are_refused_at_open(
    tmp_path: Path, compression: str, fragment: str, layout: str, level: int
) -> None:
    """LZW, zstd and LZMA were given a buffer of the declared size to decode into (1.5 GiB a
    tile; a strip's 96 GiB a MemoryError) before the data was found short; JPEG decoded the
    32 px stream into the declared tile, 1.5 GiB filled with grey, and read it."""
    path = _two_levels(tmp_path / "lying.ome.tif", compression, layout)
    for code, value in _LIES[layout].items():
        _set_long(path, code, value, level)
    with (
        _no_big_allocation(),
        pytest.raises(ImageReadError, match=rf"level {level} .*{fragment}") as info,
    ):
        open_image(path)
    assert str(path) in str(info.value)


# Each bounded codec at its encoder's highest level (where it has levels)
_BOUNDED = {"lzw": None, "zstd": 22, "lzma": 9, "zlib": 9, "packbits": None, None: None}


def _zeros(path: Path, compression: str | None, layout: str) -> Path:
    """1024 x 1024 RGB zeros (3 MiB) in one tile or one strip: the most any honest tile or
    strip of that size gives from its bytes."""
    level = _BOUNDED.get(compression)
    tifffile.imwrite(
        path, np.zeros((1024, 1024, 3), np.uint8), photometric="rgb", metadata=None,
        compression=compression, compressionargs={"level": level} if level else None,
        **({"tile": (1024, 1024)} if layout == "tile" else {"rowsperstrip": 1024}),
    )  # fmt: skip
    return path


@pytest.mark.parametrize("layout", ["tile", "strip"])
@pytest.mark.parametrize("compression", [*_BOUNDED, "jpeg", "webp", "jpeg2000"])
def test_zero_tiles_and_strips_the_best_compressed_open_and_read(
    tmp_path: Path, compression: str | None, layout: str
) -> None:
    path = _zeros(tmp_path / "zeros.tif", compression, layout)
    with contextlib.closing(open_image(path)) as reader:
        pixels = reader.read(0, 1024, 0, 1024)
    assert pixels.shape == (1024, 1024, 3)
    assert not pixels.any()


@pytest.mark.parametrize("compression", list(_BOUNDED))
def test_a_strip_of_zeros_declared_a_thousand_times_wider_is_refused(
    tmp_path: Path, compression: str | None
) -> None:
    path = _zeros(tmp_path / "zeros.tif", compression, "strip")
    _set_long(path, 256, 1024 * 1000)  # ImageWidth
    with pytest.raises(ImageReadError, match=r"level 0 .* bytes stored for one") as info:
        open_image(path)
    assert str(path) in str(info.value)


@pytest.mark.parametrize(
    ("code", "encode"),
    [
        pytest.param(5, lambda data: imagecodecs.lzw_encode(data), id="lzw"),
        pytest.param(50000, lambda data: imagecodecs.zstd_encode(data, level=22), id="zstd"),
        pytest.param(34925, lambda data: imagecodecs.lzma_encode(data, level=9), id="lzma"),
    ],
)
def test_each_codec_bound_holds_for_its_encoder_and_refuses_a_thousandfold_lie(
    code: int, encode
) -> None:
    """64 MiB of zeros, the most compressible input, at the encoder's highest level: its
    bytes must give no more than the bound says, and 1000 times as much must be refused
    (by _check_chunks' test: over 4 times the bound's bytes and 1 MiB)."""
    from segpipe.io.readers.tiff_checks import _MOST_EXPANDED

    decoded = 2**26
    stored = len(encode(bytes(decoded)))
    assert decoded <= _MOST_EXPANDED[code] * stored
    assert 1000 * decoded > 4 * _MOST_EXPANDED[code] * stored + 2**20


def _first_sof(path: Path, tile: int = 0) -> int:
    """Offset in the file of the height in a tile's JPEG frame header (SOF0)."""
    with tifffile.TiffFile(path) as tif:
        page = tif.pages.first
        start = int(page.dataoffsets[tile])
    return start + path.read_bytes()[start:].index(b"\xff\xc0") + 5


def test_a_jpeg_tile_whose_frame_header_lies_is_refused_at_open(tmp_path: Path) -> None:
    """Decoding it allocated and zeroed 10 GiB for 60,000 x 60,000 RGB pixels, then failed."""
    path = tmp_path / "sof.tif"
    tifffile.imwrite(path, _rgb(64, 64), tile=(32, 32), photometric="rgb", compression="jpeg")
    at = _first_sof(path)
    data = bytearray(path.read_bytes())
    data[at : at + 4] = (60_000).to_bytes(2, "big") * 2  # height, width
    path.write_bytes(bytes(data))
    with (
        _no_big_allocation(),
        pytest.raises(ImageReadError, match=r"level 0 .*60,000 x 60,000 pixels") as info,
    ):
        open_image(path)
    assert str(path) in str(info.value)


def _lying_fourth_tile(path: Path, padding: int) -> Path:
    """A 512 x 512 RGB JPEG TIFF of 256 px tiles whose tile 3 states 20,000 x 20,000 pixels
    in its frame header, after an application segment (APP1) of ``padding`` bytes (0: none).
    (Tiles of 256 px: for smaller ones tifffile stores the byte counts as SHORTs.)"""
    pixels = _rgb(512, 512)
    tiles = [
        bytearray(imagecodecs.jpeg_encode(pixels[y : y + 256, x : x + 256], level=90))
        for y in (0, 256)
        for x in (0, 256)
    ]
    sof = tiles[3].index(b"\xff\xc0") + 5
    tiles[3][sof : sof + 4] = (20_000).to_bytes(2, "big") * 2  # height, width
    if padding:
        app1 = b"\xff\xe1" + (padding - 2).to_bytes(2, "big") + bytes(padding - 4)
        tiles[3][2:2] = app1  # after SOI
    tifffile.imwrite(
        path, iter(bytes(t) for t in tiles), shape=pixels.shape, dtype=np.uint8,
        tile=(256, 256), photometric="rgb", compression="jpeg",
    )  # fmt: skip
    return path


@pytest.mark.parametrize("padding", [0, 65_535], ids=["sof-first", "sof-past-64-kib"])
def test_a_later_jpeg_tile_whose_frame_header_lies_is_refused_as_it_is_read(
    tmp_path: Path, padding: int
):
    """The open looks at the first stored tile's frame header alone; a later tile's is looked
    at as it is decoded, in its whole stream (an application segment may push the header past
    64 KiB), before the decoder allocates the 20,000 x 20,000 pixels (1.1 GiB) it states. The
    tiles beside it still read."""
    path = _lying_fourth_tile(tmp_path / "sof3.tif", padding)
    with contextlib.closing(open_image(path)) as reader:
        with tifffile.TiffFile(path) as tif:  # tiles 0 and 1 alone, by tifffile
            want = zarr.open(tif.series[0].aszarr(), mode="r")[:256]
        np.testing.assert_array_equal(reader.read(0, 256, 0, 512), want)
        with (
            _no_big_allocation(),
            pytest.raises(ImageReadError, match="may be corrupt") as info,
        ):
            reader.read(256, 512, 0, 512)
    assert str(path) in str(info.value)
    assert "tile 3 is a JPEG stream of 20,000 x 20,000 pixels (its SOF marker)" in str(info.value)


@pytest.mark.parametrize("cut", [0.5, 0.99])
def test_a_jpeg_tile_cut_short_is_refused_as_it_is_read_and_a_padded_one_reads(
    tmp_path: Path, cut: float
) -> None:
    """libjpeg decodes a stream cut short with a warning, its missing rows grey (OpenSlide:
    "Premature end of JPEG file"); zeros after a whole stream's end marker are padding."""
    pixels = _rgb(512, 512)
    tiles = [
        imagecodecs.jpeg_encode(pixels[y : y + 256, x : x + 256], level=90)
        for y in (0, 256)
        for x in (0, 256)
    ]
    honest, cut_short = tmp_path / "padded.tif", tmp_path / "cut.tif"
    for path, last in (
        # padded to a sector, 0xFF fill, a newline: libjpeg stops at the end marker
        (honest, tiles[3] + bytes(70) + b"\xff\xff\n"),
        (cut_short, tiles[3][: int(len(tiles[3]) * cut)]),
    ):
        tifffile.imwrite(
            path, iter([*tiles[:3], last]), shape=pixels.shape, dtype=np.uint8,
            tile=(256, 256), photometric="rgb", compression="jpeg",
        )  # fmt: skip
    with contextlib.closing(open_image(honest)) as reader:
        np.testing.assert_array_equal(reader.read(0, 512, 0, 512), tifffile.imread(honest))
    with contextlib.closing(open_image(cut_short)) as reader:
        np.testing.assert_array_equal(reader.read(0, 256, 0, 512), tifffile.imread(honest)[:256])
        with pytest.raises(ImageReadError, match="no end-of-image marker: it is cut short") as info:
            reader.read(256, 512, 256, 512)
    assert str(cut_short) in str(info.value)


def _cropped_jpeg(path: Path, pixels: np.ndarray) -> Path:
    """A 32 px tile holding an image smaller than it, its JPEG stream of the image's size (as
    some writers write the tiles at an image's edge)."""
    tifffile.imwrite(
        path, iter([imagecodecs.jpeg_encode(pixels, level=95)]), shape=pixels.shape,
        dtype=np.uint8, tile=(32, 32), photometric="rgb", compression="jpeg",
    )  # fmt: skip
    return path


def _sparse_jpeg(path: Path, pixels: np.ndarray) -> Path:
    """A GDAL JPEG TIFF of 32 px tiles whose first two tiles (all zeros) are not stored."""
    import rasterio

    ny, nx, _ = pixels.shape
    with rasterio.open(
        path, "w", driver="GTiff", width=nx, height=ny, count=3, dtype="uint8",
        compress="JPEG", tiled=True, blockxsize=32, blockysize=32, sparse_ok=True,
    ) as ds:  # fmt: skip
        ds.write(np.moveaxis(pixels, -1, 0))
    return path


@pytest.mark.filterwarnings("ignore::rasterio.errors.NotGeoreferencedWarning")
@pytest.mark.parametrize("write", [_cropped_jpeg, _sparse_jpeg])
def test_jpeg_tiles_cropped_to_the_image_or_stored_sparsely_are_read(tmp_path: Path, write):
    """The frame header looked at is the first stored tile's, of the size of that tile's part
    inside the image where a writer crops it."""
    shape = (20, 25, 3) if write is _cropped_jpeg else (70, 90, 3)
    pixels = np.zeros(shape, np.uint8)
    pixels[...] = np.linspace(0, 250, shape[1], dtype=np.uint8)[None, :, None]  # smooth: JPEG
    if write is _sparse_jpeg:
        pixels[:32, :64] = 0
    path = write(tmp_path / "honest.tif", pixels)
    with tifffile.TiffFile(path) as tif:
        first = next(i for i, c in enumerate(tif.pages.first.databytecounts) if c)
    assert first == (0 if write is _cropped_jpeg else 2)
    with contextlib.closing(open_image(path)) as reader:
        read = reader.read(0, shape[0], 0, shape[1])
    assert np.abs(read.astype(int) - pixels).mean() < 4


@pytest.mark.filterwarnings("ignore::rasterio.errors.NotGeoreferencedWarning")
def test_a_sparse_jpeg_tiff_lying_about_its_tiles_is_refused(tmp_path: Path) -> None:
    """Its first tiles store nothing: the frame header compared is the first stored one's."""
    pixels = _rgb(70, 90)
    pixels[:32, :64] = 0
    path = _sparse_jpeg(tmp_path / "sparse.tif", pixels)
    for code, value in _LIES["tiles"].items():
        _set_long(path, code, value)
    with pytest.raises(ImageReadError, match=r"level 0 .* its tile 2 is a JPEG stream") as info:
        open_image(path)
    assert str(path) in str(info.value)


@pytest.mark.parametrize(
    ("layout", "tag", "value", "stored"),
    [
        ({"tile": (64, 64)}, 322, 2**31, "256x384 pixels of uint8 in tiles of 64x2147483648"),
        (
            {"rowsperstrip": 16},
            256,
            2**31 - 1,
            "256x2147483647 pixels of uint8 in strips of 16x2147483647",
        ),
    ],
    ids=["TileWidth", "ImageWidth of strips"],
)
def test_a_file_of_an_ome_set_lying_about_its_tiles_is_refused_at_open(
    tmp_path: Path, layout: dict[str, object], tag: int, value: int, stored: str
) -> None:
    """tifffile decodes each file's tiles by that file's own keyframe; the level's alone (in
    the file opened) was checked: 128 GiB a tile, 32 GiB a strip, allocated at the first
    read (a MemoryError under an address-space limit)."""
    zlib = {"compression": "zlib", **layout}
    opened, other, _ = write_channel_set(tmp_path, layouts=(zlib, zlib))
    with tifffile.TiffFile(other, mode="r+b") as tif:
        tif.pages.first.tags[tag].overwrite(value)
    with _no_big_allocation(), pytest.raises(ImageReadError) as info:
        open_image(opened).read(0, 256, 0, 384)
    assert str(info.value).startswith(
        f"{other} (a file of {opened}'s OME-TIFF set): level 0 is {stored}, in {opened} "
    )


@pytest.mark.parametrize("level", [0, 1])
def test_an_image_whose_size_tag_tifffile_drops_is_refused_not_passed_over(
    tmp_path: Path, level: int
) -> None:
    """An ImageWidth entry whose count is damaged: tifffile drops the tag and lists a series
    of width 0, which was passed over, its 2x reduced level (another series) read as the
    whole image; a reduced level's, and the pyramid was read without it."""
    import struct

    path = tmp_path / "damaged.tif"
    rgb = _rgb(200, 300)
    kw = {"tile": (64, 64), "photometric": "rgb", "compression": "zlib", "metadata": None}
    with tifffile.TiffWriter(path) as tif:
        tif.write(rgb, subifds=1, **kw)
        tif.write(rgb[::2, ::2], subfiletype=1, **kw)
    with tifffile.TiffFile(path) as tif:
        keyframe = tif.series[0].levels[level].keyframe
        entry = keyframe.tags["ImageWidth"].offset
    data = bytearray(path.read_bytes())
    data[entry + 4 : entry + 8] = struct.pack("<I", 0x0C000001)  # its count: the tag is dropped
    path.write_bytes(bytes(data))
    with pytest.raises(ImageReadError, match=r"\(\d+x0x3\) is empty: a size tag") as info:
        open_image(path)
    assert str(info.value).startswith(f"{path}: series ")


# --- tiles laid out for another width, tiles whose bytes are lost -----------------------------


def _tiled(path: Path) -> Path:
    """An RGB TIFF of 128 x 128 pixels in 16 tiles of 32 x 32, each of its own colours."""
    tifffile.imwrite(path, _rgb(128, 128), tile=(32, 32), photometric="rgb")
    return path


def _set_value(path: Path, code: int, index: int, value: int) -> None:
    """Overwrite value ``index`` of tag ``code`` (an array of LONG or SHORT) of the first IFD."""
    with tifffile.TiffFile(path) as tif:
        tag = tif.pages[0].tags[code]
        fmt, at = {3: "<H", 4: "<I"}[tag.dtype], tag.valueoffset
    data = bytearray(path.read_bytes())
    struct.pack_into(fmt, data, at + index * struct.calcsize(fmt), value)
    path.write_bytes(bytes(data))


def test_tiles_laid_out_for_another_width_are_refused_not_read_out_of_place(tmp_path: Path):
    """ImageWidth 80 over 4 tiles a row: tifffile placed them 3 a row, the image scrambled,
    and ingest and segment finished 'complete'. Fewer rows (ImageLength) read as they were."""
    path = _tiled(tmp_path / "narrow.tif")
    _set_long(path, 256, 80)  # ImageWidth
    says = r"narrow\.tif: level 0 lists 16 tiles, no whole number of rows of the 3 its width \(80 "
    with pytest.raises(ImageReadError, match=says + r"pixels in tiles of 32\)"):
        open_image(path)
    short = tmp_path / "short.tif"
    _set_long(_tiled(short), 257, 80)  # ImageLength
    np.testing.assert_array_equal(open_image(short).read(0, 80, 0, 128), _rgb(128, 128)[:80])


def test_a_tile_of_no_bytes_at_an_offset_is_refused_a_sparse_one_reads_as_zeros(tmp_path: Path):
    """TileByteCounts 0 where TileOffsets still point at the tile read as zeros, 'complete';
    tifffile's own imread fails there. A sparse tile (GDAL's: offset and count 0) stays."""
    lost = _tiled(tmp_path / "lost.tif")
    _set_value(lost, 325, 3, 0)  # TileByteCounts
    says = r"lost\.tif: level 0 lists tile 3 \(1 in all\) at byte [\d,]+ with a byte count of 0"
    with pytest.raises(ImageReadError, match=says + ": its bytes are lost"):
        open_image(lost)
    sparse = _tiled(tmp_path / "sparse.tif")
    _set_value(sparse, 324, 3, 0)  # TileOffsets
    _set_value(sparse, 325, 3, 0)
    pixels = open_image(sparse).read(0, 128, 0, 128)
    want = _rgb(128, 128)
    want[:32, 96:] = 0
    np.testing.assert_array_equal(pixels, want)


def test_a_tiff_cut_before_its_ifd_at_the_end_says_so(tmp_path: Path) -> None:
    """libtiff and Pillow write the IFD after the pixels: cut short, the file said
    'IndexError: 0' (tifffile drops an IFD past the end before segpipe looked)."""
    whole = tmp_path / "whole.tif"
    Image.fromarray(_rgb(96, 80)).save(whole, compression="tiff_lzw")
    data = whole.read_bytes()
    assert struct.unpack("<I", data[4:8])[0] > len(data) // 2  # its IFD last
    cut = tmp_path / "cut.tif"
    cut.write_bytes(data[: len(data) // 2])
    with pytest.raises(ImageReadError, match=r"cut\.tif: IFD 0 lies at byte [\d,]+, past the "):
        open_image(cut)


def test_a_lone_tiff_image_of_width_0_is_refused_naming_the_tags(tmp_path: Path) -> None:
    """It said 'ZeroDivisionError: integer division or modulo by zero'."""
    path = _tiled(tmp_path / "zero.tif")
    _set_long(path, 256, 0)  # ImageWidth
    with pytest.raises(ImageReadError, match=r"zero\.tif: the image is empty: IFD 0 declares "
                       r"128 x 0 pixels \(ImageLength, ImageWidth"):  # fmt: skip
        open_image(path)


@pytest.mark.parametrize("kind", ["loop", "dangling"])
def test_a_broken_symbolic_link_is_named_so_not_missing(tmp_path: Path, kind: str) -> None:
    link = tmp_path / "a.tif"
    if kind == "loop":
        (tmp_path / "b.tif").symlink_to(link)
        link.symlink_to(tmp_path / "b.tif")
    else:
        link.symlink_to(tmp_path / "gone.tif")
    why = "a symbolic link loop" if kind == "loop" else "a symbolic link to nothing"
    with pytest.raises(ImageReadError, match=rf"a\.tif: {why} \("):
        open_image(link)


@pytest.mark.parametrize("reduced", ["rgba", "grey"])
def test_a_pyramid_level_of_other_samples_than_level_0_is_refused_at_open(tmp_path, reduced):
    """An RGBA (or grey) SubIFD under an RGB level 0: tifffile lays it out as RGB; reading it
    failed mid-run ('shape does not match keyframe size'), leaving a 'computing' result, or
    opening did ('IndexError: index 1 out of range(1)')."""
    path = tmp_path / "mixed.ome.tif"
    rgb = _rgb(128, 128)
    half = rgb[::2, ::2]
    lower = (
        np.dstack([half, np.full(half.shape[:2], 255, np.uint8)])
        if reduced == "rgba"
        else half[..., 0]
    )
    with tifffile.TiffWriter(path, ome=True) as tif:
        tif.write(rgb, subifds=1, tile=(32, 32), photometric="rgb", metadata={"axes": "YXS"})
        tif.write(
            lower,
            subfiletype=1,
            tile=(32, 32),
            photometric="rgb" if reduced == "rgba" else "minisblack",
        )
    n = 4 if reduced == "rgba" else 1
    with pytest.raises(ImageReadError, match=rf"mixed\.ome\.tif: level 1 stores {n} samples per "
                       r"pixel, level 0 3 \(SamplesPerPixel"):  # fmt: skip
        open_image(path)


@pytest.mark.parametrize("channels", [3, 2])
def test_an_ome_xml_cut_short_is_said_so_not_read_as_plain_pages_silently(tmp_path, channels):
    """An OME-XML whose end is lost (tifffile wants it to end in 'OME>') was no OME at all:
    its pixel size unknown without a word, its two channels called a stack of 2 planes."""
    path = tmp_path / "cut.ome.tif"
    if channels == 3:
        pixels, meta, kw = (
            _rgb(64, 80),
            {"axes": "YXS", "PhysicalSizeX": 0.5},
            {"photometric": "rgb"},
        )
    else:
        pixels, meta, kw = _rgb(64, 80)[..., :2].transpose(2, 0, 1), {"axes": "CYX"}, {}
    tifffile.imwrite(path, pixels, ome=True, metadata=meta, **kw)
    data = path.read_bytes()
    assert data.count(b"</OME>") == 1
    path.write_bytes(data.replace(b"</OME>", b"\0" * 6))
    if channels == 3:
        with pytest.warns(UserWarning, match=r"cut\.ome\.tif: OME-XML is cut short; pixel size"):
            assert open_image(path).pixel_size_um is None
    else:
        refused = pytest.raises(ImageReadError, match=r"OME-XML does not describe its images")
        with pytest.warns(UserWarning, match="OME-XML is cut short"), refused:
            open_image(path)
