"""Hostile inputs: truncated, lying and mangled images end in segpipe's own error, naming the
file, within a time and memory bound, and never in a result marked complete."""

from __future__ import annotations

import contextlib
import json
import shutil
import tracemalloc
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import tifffile
import zarr
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from PIL import Image

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
