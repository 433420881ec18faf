"""Tests for segpipe.io.readers: each format read back against the numpy it was written from."""

from __future__ import annotations

import hashlib
import io
import json
import os
import pickle
import re
import struct
import subprocess
import sys
import threading
import time
import warnings
import zlib
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import dask.array as da
import numpy as np
import pytest
import tifffile
import zarr
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from segpipe.io.maskfiles import mask_file_sha256, read_mask_file
from segpipe.io.readers import ArrayReader, ImageReadError, Reader, open_image, pillow
from segpipe.io.readers.cached import CachedReader, cached_reads
from segpipe.io.readers.photometric import unpremultiply

SHAPE = (300, 517)  # sides deliberately not multiples of the 64 px tiles


def _rgb(dtype: type = np.uint8) -> np.ndarray:
    """Deterministic (300, 517, 3) test image: gradients plus noise, distinct channels."""
    rng = np.random.default_rng(7)
    yy, xx = np.mgrid[: SHAPE[0], : SHAPE[1]]
    base = np.stack([yy * 0.8, xx * 0.45, (yy + xx) * 0.3], axis=-1)
    img = base + rng.integers(0, 20, (*SHAPE, 3))
    scale = 1 if np.dtype(dtype) == np.uint8 else 257
    return (np.clip(img, 0, 255) * scale).astype(dtype)


def _half(a: np.ndarray) -> np.ndarray:
    """What a writer stores as the next level in these fixtures (strided, not averaged)."""
    return a[::2, ::2]


def write_svs(path: Path, img: np.ndarray, mpp: float = 0.499) -> Path:
    """An Aperio-like SVS: tiled baseline, thumbnail, one reduced level, label and macro."""
    kw = {"photometric": "rgb", "metadata": None, "compression": "zlib"}
    head = "Aperio Image Library v12.0.15 \r\n"
    with tifffile.TiffWriter(path) as tif:
        tif.write(
            img, tile=(64, 64), description=f"{head}517x300 (64x64)|AppMag = 20|MPP = {mpp}", **kw
        )
        tif.write(img[::8, ::8], description=f"{head}thumbnail", **kw)
        tif.write(_half(img), tile=(64, 64), description=f"{head}level 1", **kw)
        tif.write(img[:40, :60], subfiletype=1, description=f"{head}label 60x40", **kw)
        tif.write(img[:50, :70], subfiletype=9, description=f"{head}macro 70x50", **kw)
    return path


def write_ome_tiff(path: Path, img: np.ndarray, size_nm: float = 250.0) -> Path:
    """Pyramidal OME-TIFF (tifffile's recipe) with PhysicalSize given in nanometres."""
    opts = {"photometric": "rgb", "tile": (64, 64), "compression": "zlib"}
    meta = {
        "axes": "YXS",
        "PhysicalSizeX": size_nm,
        "PhysicalSizeXUnit": "nm",
        "PhysicalSizeY": size_nm,
        "PhysicalSizeYUnit": "nm",
    }
    with tifffile.TiffWriter(path, bigtiff=True, ome=True) as tif:
        tif.write(img, subifds=1, metadata=meta, **opts)
        tif.write(_half(img), subfiletype=1, **opts)
    return path


def write_ome_zarr(
    path: Path, img: np.ndarray, scale: float = 500.0, unit: str = "nanometer"
) -> Path:
    """A two-level OME-Zarr 0.5 image with (c, y, x) arrays."""
    levels = [img, _half(img)]
    space = {"type": "space", "unit": unit}
    ome = {
        "version": "0.5",
        "multiscales": [
            {
                "axes": [
                    {"name": "c", "type": "channel"},
                    {"name": "y", **space},
                    {"name": "x", **space},
                ],
                "datasets": [
                    {
                        "path": f"s{k}",
                        "coordinateTransformations": [
                            {"type": "scale", "scale": [1.0, scale * 2**k, scale * 2**k]}
                        ],
                    }
                    for k in range(len(levels))
                ],
            }
        ],
    }
    root = zarr.create_group(str(path), attributes={"ome": ome})
    for k, level in enumerate(levels):
        arr = root.create_array(
            f"s{k}",
            shape=(3, *level.shape[:2]),
            chunks=(3, 64, 64),
            dtype=level.dtype,
            dimension_names=("c", "y", "x"),
        )
        arr[:] = level.transpose(2, 0, 1)
    return path


# name -> (writer(tmp_path, img) -> path, expected (Y, X, C) level 0, level count, pixel size)
def _tiff_plain(tmp: Path, img: np.ndarray) -> Path:
    tifffile.imwrite(tmp / "plain.tif", img, tile=(64, 64), photometric="rgb")
    return tmp / "plain.tif"


def _tiff_grey_inch(tmp: Path, img: np.ndarray) -> Path:
    # 2540 pixels per inch = 10 µm per pixel; strips, not tiles
    tifffile.imwrite(tmp / "grey.tiff", img[..., 0], resolution=(2540, 2540), resolutionunit="INCH")
    return tmp / "grey.tiff"


def _tiff_planar_cm(tmp: Path, img: np.ndarray) -> Path:
    # planar RGB reads as (S, Y, X); 40000 pixels per cm = 0.25 µm per pixel
    tifffile.imwrite(
        tmp / "planar.tif",
        img.transpose(2, 0, 1),
        photometric="rgb",
        planarconfig="separate",
        tile=(64, 64),
        resolution=(40000, 40000),
        resolutionunit="CENTIMETER",
    )
    return tmp / "planar.tif"


def _tiff_uint16(tmp: Path, img: np.ndarray) -> Path:
    tifffile.imwrite(tmp / "u16.btf", img, tile=(64, 64), bigtiff=True, photometric="rgb")
    return tmp / "u16.btf"


def _zarr_array(dims: tuple[str, ...]) -> Callable[[Path, np.ndarray], Path]:
    def write(tmp: Path, img: np.ndarray) -> Path:
        data = {
            ("y", "x", "c"): img,
            ("c", "y", "x"): img.transpose(2, 0, 1),
            ("y", "x"): img[..., 0],
        }[dims]
        path = tmp / f"{''.join(dims)}.zarr"
        arr = zarr.create_array(
            str(path),
            shape=data.shape,
            chunks=(50,) * data.ndim,
            dtype=data.dtype,
            dimension_names=dims,
        )
        arr[:] = data
        return path

    return write


def _png(tmp: Path, img: np.ndarray) -> Path:
    Image.fromarray(img).save(tmp / "small.png")
    return tmp / "small.png"


def _png_grey16(tmp: Path, img: np.ndarray) -> Path:
    Image.fromarray(img[..., 0].astype(np.uint16) * 250).save(tmp / "grey16.png")
    return tmp / "grey16.png"


FORMATS = [
    pytest.param(lambda t, i: write_svs(t / "slide.svs", i), np.uint8, 2, 0.499, id="svs"),
    pytest.param(
        lambda t, i: write_ome_tiff(t / "img.ome.tif", i), np.uint8, 2, 0.25, id="ome-tiff"
    ),
    pytest.param(_tiff_plain, np.uint8, 1, None, id="tiff-plain"),
    pytest.param(_tiff_grey_inch, np.uint8, 1, 10.0, id="tiff-grey-inch"),
    pytest.param(_tiff_planar_cm, np.uint8, 1, 0.25, id="tiff-planar-cm"),
    pytest.param(_tiff_uint16, np.uint16, 1, None, id="bigtiff-uint16"),
    pytest.param(
        lambda t, i: write_ome_zarr(t / "img.ome.zarr", i), np.uint8, 2, 0.5, id="ome-zarr"
    ),
    pytest.param(_zarr_array(("y", "x", "c")), np.uint8, 1, None, id="zarr-yxc"),
    pytest.param(_zarr_array(("c", "y", "x")), np.uint16, 1, None, id="zarr-cyx"),
    pytest.param(_zarr_array(("y", "x")), np.uint8, 1, None, id="zarr-yx"),
    pytest.param(_png, np.uint8, 1, None, id="png"),
    pytest.param(_png_grey16, np.uint16, 1, None, id="png-grey16"),
]


def _expected(path: Path, img: np.ndarray) -> np.ndarray:
    """Level 0 as written, independently of segpipe (grey writers keep channel 0)."""
    if path.name == "grey16.png":
        return img[..., :1].astype(np.uint16) * 250
    if path.name.startswith(("grey", "yx.")):
        return img[..., :1]
    return img


@pytest.mark.parametrize(("write", "dtype", "n_levels", "px"), FORMATS)
def test_reads_back_what_was_written(
    tmp_path: Path,
    write: Callable[[Path, np.ndarray], Path],
    dtype: type,
    n_levels: int,
    px: float | None,
) -> None:
    img = _rgb(dtype)
    path = write(tmp_path, img)
    expected = _expected(path, img)
    reader = open_image(path)
    assert isinstance(reader, Reader)
    assert reader.path == str(path)
    assert reader.shape == expected.shape
    assert reader.dtype == expected.dtype
    assert len(reader.level_shapes) == n_levels
    assert reader.pixel_size_um == (pytest.approx(px) if px is not None else None)

    level0 = reader.level(0)
    assert isinstance(level0, da.Array)
    assert level0.dtype == expected.dtype
    np.testing.assert_array_equal(level0.compute(), expected)

    window = reader.read(37, 211, 101, 450)
    assert window.shape == (211 - 37, 450 - 101, expected.shape[2])
    np.testing.assert_array_equal(window, expected[37:211, 101:450])

    if n_levels > 1:
        half = _half(expected)
        assert reader.level_shapes[1] == half.shape
        assert reader.level(1).shape == half.shape
        np.testing.assert_array_equal(reader.read(10, 100, 20, 200, level=1), half[10:100, 20:200])


@pytest.mark.parametrize(("write", "dtype", "n_levels", "px"), FORMATS)
def test_pickled_reader_reads(
    tmp_path: Path,
    write: Callable[[Path, np.ndarray], Path],
    dtype: type,
    n_levels: int,
    px: float | None,
) -> None:
    img = _rgb(dtype)
    path = write(tmp_path, img)
    reader = open_image(path)
    reader.read(0, 10, 0, 10)  # open the handles before pickling
    clone = pickle.loads(pickle.dumps(reader))
    np.testing.assert_array_equal(clone.read(5, 250, 7, 500), reader.read(5, 250, 7, 500))
    # a dask graph carries the reader too
    lazy = pickle.loads(pickle.dumps(reader.level(n_levels - 1)))
    np.testing.assert_array_equal(lazy.compute(), reader.level(n_levels - 1).compute())


@pytest.mark.parametrize("kind", ["tiff", "png"])
def test_a_reader_reopened_after_its_file_was_replaced_refuses_to_read(tmp_path, kind):
    """A worker's copy opens by path: a re-scan saved over the source after the run had
    checked it (source_sha256) was segmented, the result recording the first image."""
    path = tmp_path / f"scan.{'tif' if kind == 'tiff' else 'png'}"

    def save(value: int) -> None:
        pixels = np.full((64, 96, 3), value, np.uint8)
        part = path.with_name(f"new{path.suffix}")
        if kind == "tiff":
            tifffile.imwrite(part, pixels)
        else:
            Image.fromarray(pixels).save(part)
        os.replace(part, path)  # as a scanner or a copy saves over it

    save(200)
    reader = open_image(path)
    shipped = pickle.dumps(reader)
    save(10)
    with pytest.raises(ImageReadError, match=r"scan\.\w+ changed since it was opened"):
        pickle.loads(shipped).read(0, 4, 0, 4)
    assert open_image(path).read(0, 1, 0, 1).ravel().tolist() == [10, 10, 10]


@pytest.mark.parametrize("side", [128, 256], ids=["smaller", "same-shape"])
def test_a_zarr_store_ingested_again_is_not_read_by_a_workers_copy(tmp_path, side):
    """A store written over after open: a worker's copy read the new array through the old
    layout, a 100 px window coming back 28 px, or the other image's pixels without a word."""
    import shutil

    from segpipe.io.ingest import ingest

    def ingested(value: int, side: int) -> Path:
        source = tmp_path / f"src{value}.tif"
        tifffile.imwrite(source, np.full((side, side, 3), value, np.uint8), photometric="rgb")
        return ingest(source, tmp_path / "img.zarr", chunk=64, overwrite=True)

    store = ingested(200, 256)
    shipped = pickle.dumps(open_image(store))
    shutil.rmtree(store)
    ingested(10, side)
    with pytest.raises(ImageReadError, match=r"img\.zarr changed since it was opened"):
        pickle.loads(shipped).read(100, 200, 100, 200)


def test_an_ome_zarr_exported_again_alike_is_not_read_by_a_workers_copy(tmp_path):
    """Written anew under its name, of the same size and metadata (attributes, shapes, chunks
    all equal): a worker's copy read the other pixels without a word."""
    import shutil

    path = write_ome_zarr(tmp_path / "img.zarr", _rgb())
    shipped = pickle.dumps(open_image(path))
    shutil.rmtree(path)
    write_ome_zarr(path, 255 - _rgb())
    with pytest.raises(ImageReadError, match=r"img\.zarr changed since it was opened"):
        pickle.loads(shipped).read(0, 4, 0, 4)


def test_a_worker_on_another_machine_reads_the_file_it_was_sent(tmp_path, monkeypatch):
    """Each machine of a cluster numbers an NFS mount (st_dev) its own way: compared, every
    worker copy on another node was refused as a changed file."""
    path = tmp_path / "scan.tif"
    tifffile.imwrite(path, np.full((64, 96, 3), 7, np.uint8))
    shipped = pickle.dumps(open_image(path))
    from segpipe.io import files

    class Elsewhere:  # os, as this machine's stat sees the mount: another device number
        def __getattr__(self, name: str) -> object:
            return getattr(os, name)

        def stat(self, p, *args, **kwargs):
            s = os.stat(p, *args, **kwargs)
            fields = ("st_mode", "st_ino", "st_size", "st_mtime_ns", "st_mtime")
            return SimpleNamespace(**{f: getattr(s, f) for f in fields}, st_dev=s.st_dev + 1)

    monkeypatch.setattr(files, "os", Elsewhere())  # segpipe's file_state only
    assert pickle.loads(shipped).read(0, 1, 0, 1).ravel().tolist() == [7, 7, 7]


def test_svs_picks_main_pyramid_not_thumbnail_label_macro(tmp_path: Path) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)  # a scanner's extra images, no news
        reader = open_image(write_svs(tmp_path / "s.svs", _rgb()))
    assert reader.level_shapes == ((300, 517, 3), (150, 259, 3))


def test_a_file_of_several_images_warns_naming_those_left_out(tmp_path: Path) -> None:
    path = tmp_path / "three.ome.tif"
    with tifffile.TiffWriter(path, ome=True) as tif:
        for side in (64, 256, 200):
            tif.write(np.zeros((side, side), np.uint8))
    with pytest.warns(UserWarning, match=r"three\.ome\.tif: holds 3 images") as caught:
        reader = open_image(path)
    assert reader.shape == (256, 256, 1)
    (message,) = [str(w.message) for w in caught if "holds 3 images" in str(w.message)]
    assert "series 1 'Image1' (256x256)" in message
    assert "leaving out series 0 'Image0' (64x64), series 2 'Image2' (200x200)" in message


@pytest.mark.parametrize(
    ("other", "kw"),
    [
        (np.zeros((60, 60, 3), np.uint8), {"photometric": "rgb"}),  # 10,800 values
        # a stack, refused when read
        (
            np.zeros((4, 60, 60), np.uint8),
            {"photometric": "minisblack", "metadata": {"axes": "ZYX"}},
        ),
    ],
)
def test_a_file_of_several_images_reads_the_one_of_most_pixels_not_values(
    tmp_path: Path, other: np.ndarray, kw: dict[str, Any]
) -> None:
    """Samples and Z planes were counted as pixels: a 60 x 60 RGB image was read, not the
    100 x 100 grey one beside it, and a 4-plane stack beside it was read and refused."""
    path = tmp_path / "two.tif"
    with tifffile.TiffWriter(path) as tif:
        tif.write(np.full((100, 100), 7, np.uint8), photometric="minisblack")
        tif.write(other, **kw)
    with pytest.warns(UserWarning, match=r"reading the largest, series 0 \(100x100\)"):
        reader = open_image(path)
    assert reader.shape == (100, 100, 1)
    reader.close()


def test_of_two_images_of_one_size_the_one_of_more_samples_is_read(tmp_path: Path) -> None:
    """Of images with as many pixels, the one with more values (RGB beside grey) is the
    image: the first written was read instead, the RGB one left out."""
    path = tmp_path / "two.tif"
    rgb = np.random.default_rng(8).integers(0, 256, (64, 64, 3), dtype=np.uint8)
    with tifffile.TiffWriter(path) as tif:
        tif.write(np.zeros((64, 64), np.uint8), photometric="minisblack")
        tif.write(rgb, photometric="rgb")
    with pytest.warns(UserWarning, match=r"reading the largest, series 1 \(64x64x3\)"):
        reader = open_image(path)
    assert reader.shape == (64, 64, 3)
    np.testing.assert_array_equal(reader.read(0, 64, 0, 64), rgb)
    reader.close()


def test_tiff_chunks_follow_tiles(tmp_path: Path) -> None:
    reader = open_image(write_ome_tiff(tmp_path / "t.ome.tif", _rgb()))
    chunks = reader.level(0).chunks
    assert chunks[0] == (64, 64, 64, 64, 44)
    assert chunks[1][:-1] == (64,) * 8


def test_tiff_tiles_decode_beside_each_other_not_on_zarrs_loop(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """tifffile decodes a tile inside zarr's one event-loop thread unless told to use
    threads (its default on machines under 6 cores): every I/O thread's reads took turns."""
    path = tmp_path / "t.tif"
    image = _rgb()
    tifffile.imwrite(path, image, tile=(64, 64), compression="zlib", photometric="rgb")
    threads: set[str] = set()
    decode = tifffile.TiffPage.decode

    def spying(page: tifffile.TiffPage) -> Callable[..., object]:
        inner = decode.__get__(page)

        def run(*args: object, **kwargs: object) -> object:
            threads.add(threading.current_thread().name)
            return inner(*args, **kwargs)

        return run

    monkeypatch.setattr(tifffile.TiffPage, "decode", property(spying))
    reader = open_image(path)
    np.testing.assert_array_equal(reader.read(0, 300, 0, 517), image)
    assert threads and "zarr_io" not in threads, threads


def test_jpeg_reads_what_pillow_decodes(tmp_path: Path) -> None:
    path = tmp_path / "photo.jpg"
    Image.fromarray(_rgb()).save(path, quality=90)
    reference = np.asarray(Image.open(path))
    np.testing.assert_array_equal(open_image(path).level(0).compute(), reference)


def test_a_palette_png_with_transparent_entries_reads_as_rgba_masked_by_its_alpha(
    tmp_path: Path,
) -> None:
    """A palette's tRNS makes some of its colours transparent: read as RGB, those pixels
    were segmented as data."""
    indices = (np.arange(40 * 60).reshape(40, 60) % 3).astype(np.uint8)
    indices[:10, :20] = 0  # a transparent corner
    path = tmp_path / "keyed.png"
    img = Image.fromarray(indices, "P")
    img.putpalette([0, 0, 0, 200, 30, 30, 10, 220, 40] + [0] * 759)
    img.save(path, transparency=bytes([0, 128, 255]))  # index 0 clear, 1 half, 2 opaque
    with Image.open(path) as ref:
        reference = np.asarray(ref.convert("RGBA"))
    reader = open_image(path)
    assert reader.shape == (40, 60, 4) and reader.mask_kind == "alpha"
    assert reader.channel_names == ("red", "green", "blue", "alpha")
    np.testing.assert_array_equal(reader.read(0, 40, 0, 60), reference)
    np.testing.assert_array_equal(reader.valid_mask(0, 40, 0, 60), indices != 0)


def test_palette_png_becomes_rgb(tmp_path: Path) -> None:
    path = tmp_path / "palette.png"
    Image.fromarray(_rgb()).convert("P").save(path)
    reference = np.asarray(Image.open(path).convert("RGB"))
    reader = open_image(path)
    assert reader.shape == (*SHAPE, 3)
    np.testing.assert_array_equal(reader.read(0, 300, 0, 517), reference)


@pytest.mark.parametrize(
    ("scale", "unit", "expected"),
    [(0.5, "micrometer", 0.5), (500.0, "nanometer", 0.5), (0.001, "millimeter", 1.0)],
)
def test_ome_zarr_pixel_size_units(
    tmp_path: Path, scale: float, unit: str, expected: float
) -> None:
    reader = open_image(write_ome_zarr(tmp_path / "u.zarr", _rgb(), scale=scale, unit=unit))
    assert reader.pixel_size_um == pytest.approx(expected)


def test_ome_zarr_dimension_names_disagreeing_with_its_axes_are_refused(tmp_path: Path) -> None:
    """Arrays named (c, x, y) under multiscales axes (c, y, x) were read transposed, with the
    x axis's pixel size given to y (one warning that they differ): NGFF 0.5 wants them equal."""
    path = write_ome_zarr(tmp_path / "t.zarr", _rgb())
    for k in (0, 1):
        meta = json.loads((path / f"s{k}" / "zarr.json").read_text())
        meta["dimension_names"] = ["c", "x", "y"]
        (path / f"s{k}" / "zarr.json").write_text(json.dumps(meta))
    why = r"array 's0' names its dimensions \('c', 'x', 'y'\) and the multiscales axes"
    with pytest.raises(ImageReadError, match=why) as info:
        open_image(path)
    assert str(path) in str(info.value)


@pytest.mark.parametrize(
    "write",
    [
        pytest.param(lambda t: write_svs(t / "o.svs", _rgb()), id="svs"),
        pytest.param(lambda t: write_ome_tiff(t / "o.ome.tif", _rgb()), id="ome-tiff"),
        pytest.param(lambda t: write_ome_zarr(t / "o.zarr", _rgb()), id="ome-zarr"),
        pytest.param(lambda t: _png(t, _rgb()), id="png"),
    ],
)
def test_pixel_size_argument_wins(tmp_path: Path, write: Callable[[Path], Path]) -> None:
    path = write(tmp_path)
    assert open_image(path, pixel_size_um=0.123).pixel_size_um == 0.123
    clone = pickle.loads(pickle.dumps(open_image(path, pixel_size_um=0.123)))
    assert clone.pixel_size_um == 0.123


def test_ome_tiff_anisotropic_pixels_warn_and_take_x(tmp_path: Path) -> None:
    path = tmp_path / "aniso.ome.tif"
    meta = {"axes": "YXS", "PhysicalSizeX": 0.5, "PhysicalSizeY": 0.7}
    tifffile.imwrite(path, _rgb(), photometric="rgb", metadata=meta, ome=True)
    with pytest.warns(UserWarning, match="differs in X"):
        reader = open_image(path)
    assert reader.pixel_size_um == pytest.approx(0.5)


@pytest.mark.parametrize("value", [0.0, -1.0, float("nan"), float("inf")])
def test_bad_pixel_size_argument(tmp_path: Path, value: float) -> None:
    with pytest.raises(ValueError, match="pixel_size_um"):
        open_image(_png(tmp_path, _rgb()), pixel_size_um=value)


# ---- errors name the file ------------------------------------------------------------------


def _random_bytes_tif(tmp: Path) -> Path:
    path = tmp / "noise.tif"
    path.write_bytes(np.random.default_rng(0).bytes(4096))
    return path


def _not_a_png(tmp: Path) -> Path:
    path = tmp / "fake.png"
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + b"garbage" * 20)
    return path


def _damaged_png16(how: str) -> Callable[[Path], Path]:
    """A 16-bit RGB PNG (segpipe decodes those with imagecodecs) cut short, or with bytes of
    its compressed pixels inverted."""

    def write(tmp: Path) -> Path:
        import imagecodecs

        data = bytearray(imagecodecs.png_encode(_rgb(np.uint16)))
        if how == "truncated":
            data = data[: len(data) * 9 // 10]
        else:
            middle = len(data) // 2
            data[middle : middle + 50] = bytes(b ^ 0xFF for b in data[middle : middle + 50])
        path = tmp / f"{how}16.png"
        path.write_bytes(bytes(data))
        return path

    return write


def _z_stack(tmp: Path) -> Path:
    path = tmp / "stack.tif"
    tifffile.imwrite(
        path, np.zeros((3, 40, 50), np.uint8), photometric="minisblack", metadata={"axes": "ZYX"}
    )
    return path


def _t_series_zarr(tmp: Path) -> Path:
    path = tmp / "time.zarr"
    zarr.create_array(str(path), shape=(2, 40, 50), dtype="u1", dimension_names=("t", "y", "x"))
    return path


def _complex_tiff(tmp: Path) -> Path:
    path = tmp / "complex.tif"
    tifffile.imwrite(path, np.zeros((40, 50), np.complex64))
    return path


def _complex_zarr(tmp: Path) -> Path:
    path = tmp / "complex.zarr"
    zarr.create_array(str(path), shape=(40, 50), dtype="c8", dimension_names=("y", "x"))
    return path


def _unknown_ext(tmp: Path) -> Path:
    path = tmp / "image.bmp"
    Image.fromarray(_rgb()).save(path)
    return path


def _plain_dir(tmp: Path) -> Path:
    path = tmp / "not_zarr"
    path.mkdir()
    (path / "notes.txt").write_text("hello")
    return path


def _zarr_without_dims(tmp: Path) -> Path:
    path = tmp / "nodims.zarr"
    zarr.create_array(str(path), shape=(40, 50), dtype="u1")
    return path


def _group_without_multiscales(tmp: Path) -> Path:
    path = tmp / "group.zarr"
    root = zarr.create_group(str(path))
    root.create_array("a", shape=(4, 4), dtype="u1", dimension_names=("y", "x"))
    return path


def _incomplete_ingest(tmp: Path) -> Path:
    path = write_ome_zarr(tmp / "partial.zarr", _rgb())
    zarr.open_group(str(path), mode="r+").update_attributes(
        {"segpipe": {"kind": "image", "complete": False}}
    )
    return path


@pytest.mark.parametrize(
    ("make", "fragment"),
    [
        pytest.param(lambda t: t / "missing.svs", "no such file", id="missing"),
        pytest.param(_unknown_ext, "unknown image format", id="unknown-extension"),
        pytest.param(_random_bytes_tif, "not a readable TIFF", id="random-bytes-tif"),
        pytest.param(_not_a_png, "not a readable PNG", id="corrupt-png"),
        pytest.param(_damaged_png16("truncated"), "not a readable PNG", id="truncated-png16"),
        pytest.param(_damaged_png16("corrupt"), "not a readable PNG", id="corrupt-png16"),
        pytest.param(_z_stack, "Z=3", id="z-stack"),
        pytest.param(_t_series_zarr, "T=2", id="t-series-zarr"),
        pytest.param(_complex_tiff, "complex64", id="complex-tiff"),
        pytest.param(_complex_zarr, "complex64", id="complex-zarr"),
        pytest.param(_plain_dir, "not a readable Zarr", id="plain-directory"),
        pytest.param(_zarr_without_dims, "dimension_names", id="zarr-without-dims"),
        pytest.param(_group_without_multiscales, "multiscales", id="group-no-multiscales"),
        pytest.param(_incomplete_ingest, "never finished", id="incomplete-ingest"),
    ],
)
def test_open_errors_name_the_file(
    tmp_path: Path, make: Callable[[Path], Path], fragment: str
) -> None:
    path = make(tmp_path)
    with pytest.raises(ImageReadError, match=fragment) as info:
        open_image(path)
    assert str(path) in str(info.value)


@pytest.mark.parametrize("cut", ["half", "one-byte"])
def test_truncated_tiff_is_refused_on_open_naming_the_file(tmp_path: Path, cut: str) -> None:
    path = tmp_path / "cut.tif"
    tifffile.imwrite(path, _rgb(), tile=(64, 64), compression="zlib", photometric="rgb")
    data = path.read_bytes()
    with tifffile.TiffFile(path) as tif:
        page = tif.pages[0]
        end = max(
            int(o) + int(n) for o, n in zip(page.dataoffsets, page.databytecounts, strict=True)
        )
    assert end == len(data)  # the last tile ends the file
    # The IFD is at the start and still lists every tile; half of them lie past the end, or
    # the last one's last byte does.
    path.write_bytes(data[: len(data) // 2] if cut == "half" else data[:-1])
    with pytest.raises(ImageReadError, match="truncated") as info:
        open_image(path)
    assert str(path) in str(info.value)
    if cut == "one-byte":
        assert f"extend to byte {end:,} but the file has {end - 1:,} bytes" in str(info.value)


def test_corrupt_tiff_tiles_fail_on_read_naming_the_file(tmp_path: Path) -> None:
    path = tmp_path / "bad.tif"
    tifffile.imwrite(path, _rgb(), tile=(64, 64), compression="zlib", photometric="rgb")
    with tifffile.TiffFile(path) as tif:
        offset = int(tif.pages[0].dataoffsets[3])
    data = bytearray(path.read_bytes())
    data[offset : offset + 64] = bytes(64)  # zeros over one tile's zlib stream
    path.write_bytes(bytes(data))
    reader = open_image(path)
    with pytest.raises(ImageReadError, match="corrupt or truncated") as info:
        reader.read(0, 300, 0, 517)
    assert str(path) in str(info.value)
    with pytest.raises(ImageReadError, match="corrupt or truncated"):
        reader.level(0).compute()


def test_png_too_large_is_refused(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(pillow, "MAX_PILLOW_PIXELS", 100 * 100)
    path = _png(tmp_path, _rgb())
    with pytest.raises(ImageReadError, match="tiled pyramidal TIFF") as info:
        open_image(path)
    assert str(path) in str(info.value)


@pytest.mark.filterwarnings("ignore::PIL.Image.DecompressionBombWarning")  # past the limit
def test_the_png_size_limit_applied_is_segpipes_not_pillows(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Pillow's own limit far under the image, as its 179 million pixels are under segpipe's
    # 400 million: Pillow refuses twice Image.MAX_IMAGE_PIXELS.
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)
    path = _png(tmp_path, _rgb())
    with ThreadPoolExecutor(4) as pool:
        for reader in pool.map(lambda _: open_image(path), range(8)):
            np.testing.assert_array_equal(reader.read(0, 300, 0, 517), _rgb())
    assert Image.MAX_IMAGE_PIXELS == 1000  # as it was, for other code
    monkeypatch.setattr(pillow, "MAX_PILLOW_PIXELS", 100_000)  # 517 x 300 = 155,100
    with pytest.raises(ImageReadError, match=r"limit 100,000 pixels.*got 517x300"):
        open_image(path)
    monkeypatch.setattr(pillow, "MAX_PILLOW_PIXELS", 50_000)  # Pillow refuses past twice it
    with pytest.raises(ImageReadError, match=r"limit 50,000 pixels.*more than 100,000"):
        open_image(path)
    assert Image.MAX_IMAGE_PIXELS == 1000


def _png_of_height(data: bytes, height: int, width: int | None = None) -> bytes:
    """A PNG's bytes with its header (IHDR) stating ``height`` (and ``width``), CRC fixed."""
    head = bytearray(data[:33])
    head[16:24] = struct.pack(">II", width or struct.unpack(">I", data[16:20])[0], height)
    head[29:33] = struct.pack(">I", zlib.crc32(bytes(head[12:29])))
    return bytes(head) + data[33:]


def _png_bytes(pixels: np.ndarray, how: str) -> bytes:
    """``pixels`` as a PNG: by Pillow, or (16-bit RGB, which Pillow does not write) by
    imagecodecs, which segpipe decodes with too."""
    import imagecodecs

    if how == "imagecodecs":
        return bytes(imagecodecs.png_encode(pixels))
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, "PNG")
    return buffer.getvalue()


@pytest.mark.parametrize(
    ("pixels", "how"),
    [
        pytest.param(_rgb(), "pillow", id="rgb8"),
        pytest.param(_rgb()[..., 0], "pillow", id="grey8"),
        pytest.param(_rgb()[..., 0].astype(np.uint16) * 250, "pillow", id="grey16"),
        pytest.param(_rgb(np.uint16), "imagecodecs", id="rgb16"),
    ],
)
@pytest.mark.parametrize("extra_rows", [1, 300])
def test_a_png_declaring_rows_its_data_lack_is_refused_naming_the_file(
    tmp_path: Path, pixels: np.ndarray, how: str, extra_rows: int
) -> None:
    """Pillow ended the image where the data ended and read the rows after them as 0: a
    header (IHDR) stating 600 rows over 300 read as an image, ingested and marked complete."""
    good = _png_bytes(pixels, how)
    (tmp_path / "good.png").write_bytes(good)
    np.testing.assert_array_equal(
        open_image(tmp_path / "good.png").read(0, 300, 0, 517).reshape(pixels.shape), pixels
    )
    path = tmp_path / "taller.png"
    path.write_bytes(_png_of_height(good, 300 + extra_rows))
    with pytest.raises(ImageReadError, match=r"taller\.png: its image data \(IDAT\) inflate to"):
        open_image(path)


def test_a_png_declaring_more_than_its_data_can_inflate_to_is_refused_undecoded(
    tmp_path: Path,
) -> None:
    """A 16-bit grey PNG of 310 x 300 stating 1,000,000 rows took 35 s and 620 MB to decode
    before anything said so; deflate gives 1032 bytes at most from one, so 20 bytes of data
    cannot hold 4,000 x 4,000 pixels. Refused before a byte is inflated."""
    path = tmp_path / "huge.png"
    path.write_bytes(_png_of_height(_png_bytes(np.zeros((16, 16), np.uint8), "pillow"), 4000, 4000))
    with pytest.raises(ImageReadError, match=r"huge\.png: the 4,000 x 4,000 pixels .* at most"):
        open_image(path)


def _jpeg_of_height(data: bytes, height: int) -> bytes:
    """A JPEG's bytes with its frame header (SOF0, SOF2) stating ``height``."""
    at = min(i for i in (data.find(b"\xff\xc0"), data.find(b"\xff\xc2")) if i >= 0)
    return data[: at + 5] + struct.pack(">H", height) + data[at + 7 :]


@pytest.mark.parametrize(
    "options",
    [
        pytest.param({"quality": 90}, id="baseline"),
        pytest.param({"progressive": True}, id="progressive"),
        pytest.param({"quality": 90, "restart_marker_rows": 1}, id="restart-intervals"),
        pytest.param({"quality": 100, "subsampling": 0, "optimize": True}, id="444-optimized"),
    ],
)
@pytest.mark.parametrize("grey", [False, True], ids=["rgb", "grey"])
@pytest.mark.parametrize("extra_rows", [16, 300])
def test_a_jpeg_declaring_rows_its_scans_lack_is_refused_naming_the_file(
    tmp_path: Path, options: dict[str, Any], grey: bool, extra_rows: int
) -> None:
    """libjpeg makes up the blocks past a scan's end ("Premature end of JPEG file", a warning
    Pillow drops): a frame header (SOF) stating more rows read as an image, ingested and marked
    complete. Restart intervals of one block row each: the lie ends at an interval's end."""
    pixels = _rgb()[..., 0] if grey else _rgb()
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, "JPEG", **options)
    good = tmp_path / "good.jpg"
    good.write_bytes(buffer.getvalue())
    with Image.open(good) as img:
        np.testing.assert_array_equal(
            open_image(good).read(0, 300, 0, 517).reshape(pixels.shape), np.asarray(img)
        )
    path = tmp_path / "taller.jpg"
    path.write_bytes(_jpeg_of_height(buffer.getvalue(), 300 + extra_rows))
    with pytest.raises(ImageReadError, match=r"taller\.jpg: its coded data end before"):
        open_image(path)


def test_a_jpeg_declaring_more_than_its_bytes_can_code_is_refused_undecoded(
    tmp_path: Path,
) -> None:
    """A Huffman-coded JPEG spends a bit at least on each 8 x 8 block: a 16 x 16 one stating
    8,000 x 8,000 pixels was decoded into 192 MB of made-up pixels."""
    buffer = io.BytesIO()
    Image.fromarray(_rgb()[:16, :16]).save(buffer, "JPEG")
    data = _jpeg_of_height(buffer.getvalue(), 8000)
    at = data.find(b"\xff\xc0") + 7
    path = tmp_path / "huge.jpg"
    path.write_bytes(data[:at] + struct.pack(">H", 8000) + data[at + 2 :])
    with pytest.raises(ImageReadError, match=r"huge\.jpg: .* 8,000 x 8,000 pixels, more than"):
        open_image(path)


@pytest.mark.parametrize("level", [-1, 2, 5])
def test_level_out_of_range(tmp_path: Path, level: int) -> None:
    path = write_ome_tiff(tmp_path / "l.ome.tif", _rgb())
    reader = open_image(path)
    with pytest.raises(ImageReadError, match="out of range") as info:
        reader.level(level)
    assert str(path) in str(info.value)
    with pytest.raises(ImageReadError, match="out of range"):
        reader.read(0, 1, 0, 1, level=level)


@pytest.mark.parametrize(
    "window",
    [(0, 301, 0, 10), (0, 10, 0, 518), (-1, 10, 0, 10), (10, 10, 0, 5), (0, 10, 7, 3)],
)
def test_window_out_of_bounds(tmp_path: Path, window: tuple[int, int, int, int]) -> None:
    path = _png(tmp_path, _rgb())
    with pytest.raises(ImageReadError, match="outside level 0") as info:
        open_image(path).read(*window)
    assert str(path) in str(info.value)


def test_reader_reopens_after_close(tmp_path: Path) -> None:
    reader = open_image(write_svs(tmp_path / "c.svs", _rgb()))
    first = reader.read(0, 64, 0, 64)
    reader.close()
    np.testing.assert_array_equal(reader.read(0, 64, 0, 64), first)


def _record_closes(monkeypatch: pytest.MonkeyPatch, cls: type, closes: list[object]) -> None:
    """Append to ``closes`` each handle of ``cls`` closed while open (an fsspec file is
    closed again as it is collected, a TiffFile states no ``closed``)."""
    close = cls.close

    def recording(self: object) -> None:
        if not getattr(self, "closed", False):
            closes.append(self)
        close(self)

    monkeypatch.setattr(cls, "close", recording)


def closed_during_a_held_read(
    reader: Reader,
    window: tuple[int, int, int, int],
    inside: threading.Event,
    go: threading.Event,
    closes: list,
) -> tuple[list, np.ndarray]:
    """``reader.close()`` while another thread's read of ``window`` (y0, y1, x0, x1) is held
    (the test's hook sets ``inside`` there and waits for ``go``): the handles ``closes`` had
    recorded right after the close, and the read's pixels once it is let go."""
    with ThreadPoolExecutor(1) as pool:
        read = pool.submit(reader.read, *window)
        assert inside.wait(timeout=5)
        reader.close()
        closed_by_close = list(closes)
        go.set()
        return closed_by_close, read.result(timeout=10)


@pytest.mark.parametrize("is_url", [False, True], ids=["local", "url"])
def test_close_under_a_read_leaves_the_handles_to_the_read(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, is_url: bool
) -> None:
    """As a pipeline closing its reader while a dask thread is still reading tiles: the read
    gives its pixels (closed under it, it failed as if the file were damaged), its handles
    (the TiffFile; for a URL, the fsspec file too) are closed once, as it ends, and a read
    after close opens the file again."""
    import fsspec.implementations.local

    from segpipe.io.files import URLPath

    img = _rgb()
    path = tmp_path / "t.tif"
    tifffile.imwrite(path, img, tile=(64, 64), photometric="rgb", compression="zlib")
    closes: list[object] = []
    _record_closes(monkeypatch, tifffile.TiffFile, closes)
    _record_closes(monkeypatch, fsspec.implementations.local.LocalFileOpener, closes)
    reader = open_image(URLPath(f"file://{path}") if is_url else path)
    assert reader.read(0, 64, 0, 64).shape == (64, 64, 3)  # the file handle in tifffile's cache
    inside, go, read_bytes = threading.Event(), threading.Event(), tifffile.FileCache.read

    def held_read(self: object, *args: object, **kwargs: object) -> bytes:
        inside.set()
        go.wait(timeout=5)
        return read_bytes(self, *args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(tifffile.FileCache, "read", held_read)
    handles = 2 if is_url else 1
    closed_by_close, pixels = closed_during_a_held_read(
        reader, (128, 192, 256, 320), inside, go, closes
    )
    np.testing.assert_array_equal(pixels, img[128:192, 256:320])
    assert closed_by_close == [] and len(closes) == handles  # by the read, as it ended
    assert isinstance(closes[0], tifffile.TiffFile)
    np.testing.assert_array_equal(reader.read(64, 128, 0, 64), img[64:128, :64])
    reader.close()  # no read in it: at once
    assert len(closes) == 2 * handles and not set(map(id, closes[:handles])) & set(
        map(id, closes[handles:])
    )


@pytest.mark.slow
def test_level_computes_in_worker_processes(tmp_path: Path) -> None:
    reader = open_image(write_ome_tiff(tmp_path / "p.ome.tif", _rgb()))
    out = reader.level(0).compute(scheduler="processes", num_workers=2)
    np.testing.assert_array_equal(out, _rgb())


# -- cached reads (segpipe.io.readers.cached) -----------------------------------------------


def _recording(reader: Reader) -> list[tuple[int, int, int, int]]:
    """Record the windows ``reader.read`` is asked for, from now on."""
    calls: list[tuple[int, int, int, int]] = []
    read = reader.read

    def recorded(y0: int, y1: int, x0: int, x1: int, level: int = 0) -> np.ndarray:
        calls.append((y0, y1, x0, x1))
        return read(y0, y1, x0, x1, level)

    reader.read = recorded  # type: ignore[method-assign]
    return calls


@pytest.fixture(params=["tiff", "zarr"])
def tiled(request: pytest.FixtureRequest, tmp_path: Path) -> Reader:
    """The test image as a TIFF of 64 px tiles or a C-first Zarr of 50 px chunks."""
    if request.param == "tiff":
        return open_image(write_ome_tiff(tmp_path / "t.ome.tif", _rgb()))
    return open_image(_zarr_array(("c", "y", "x"))(tmp_path, _rgb()))


# The reader is only read: one per test serves every example.
@settings(
    max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(windows=st.lists(st.tuples(*[st.floats(0, 1)] * 4), min_size=1, max_size=12))
def test_cached_reads_give_the_readers_pixels_within_the_budget(tiled, windows) -> None:
    ty, tx = tiled.chunk_shape(0)
    tile_bytes = ty * tx * 3
    cached = CachedReader(tiled, max_bytes=tile_bytes * 40)  # fewer tiles than the image's
    ny, nx, _ = tiled.shape
    for a, b, c, d in windows:
        y0, x0 = int(a * (ny - 1)), int(c * (nx - 1))
        y1, x1 = y0 + 1 + int(b * (ny - 1 - y0)), x0 + 1 + int(d * (nx - 1 - x0))
        np.testing.assert_array_equal(cached.read(y0, y1, x0, x1), tiled.read(y0, y1, x0, x1))
        assert cached.cached_bytes <= cached.max_bytes


def test_cached_tiles_of_one_position_at_two_levels_are_each_levels_own(tmp_path: Path) -> None:
    """A pyramid level's tile (0, 0) is another image's than level 0's: the cache keys its
    tiles by level too, or the second read would get the first level's pixels."""
    reader = open_image(write_ome_tiff(tmp_path / "t.ome.tif", _rgb()))
    assert len(reader.level_shapes) >= 2
    cached = CachedReader(reader)
    for level in (0, 1, 0):
        np.testing.assert_array_equal(
            cached.read(0, 40, 0, 40, level), reader.read(0, 40, 0, 40, level), f"level {level}"
        )


def test_cached_reads_decode_a_neighbours_halo_tiles_once(tmp_path: Path) -> None:
    reader = open_image(write_ome_tiff(tmp_path / "t.ome.tif", _rgb()))
    cached = CachedReader(reader)
    calls = _recording(reader)
    # Two blocks of 128 px side by side, each with a 10 px halo, as exact-mode windows read.
    first = cached.read(0, 138, 0, 138)
    assert calls == [(0, 192, 0, 192)]  # the 64 px tiles the window touches, whole
    second = cached.read(0, 138, 118, 266)
    assert calls[1:] == [(0, 192, 192, 320)]  # only the tiles the first did not decode
    cached.read(0, 138, 118, 266)
    assert len(calls) == 2  # a window read again decodes nothing
    # A block below and right of the first: its tiles kept are a corner; the rest, an L, is
    # read as two rectangles (their bounding box would decode the corner again).
    fresh = CachedReader(reader)
    fresh.read(0, 138, 0, 138)
    del calls[:]
    below = fresh.read(118, 266, 118, 266)
    assert calls == [(64, 192, 192, 320), (192, 300, 64, 320)]
    np.testing.assert_array_equal(below, _rgb()[118:266, 118:266])
    np.testing.assert_array_equal(first, _rgb()[:138, :138])
    np.testing.assert_array_equal(second, _rgb()[:138, 118:266])


def test_a_cached_window_ending_on_tile_edges_decodes_no_tile_past_them(tiled: Reader) -> None:
    ty, tx = tiled.chunk_shape(0)
    cached = CachedReader(tiled)
    calls = _recording(tiled)
    window = cached.read(ty, 3 * ty, tx, 2 * tx)  # tile rows 1-2 of tile column 1, exactly
    assert calls == [(ty, 3 * ty, tx, 2 * tx)]
    assert cached.cached_bytes == 2 * ty * tx * 3
    np.testing.assert_array_equal(window, _rgb()[ty : 3 * ty, tx : 2 * tx])


@pytest.mark.parametrize("tile", [(16, 32), (32, 16)], ids=["wide", "tall"])
def test_cached_reads_of_oblong_tiles_give_the_files_pixels(
    tmp_path: Path, tile: tuple[int, int]
) -> None:
    path = tmp_path / "oblong.tif"
    tifffile.imwrite(path, _rgb(), tile=tile, photometric="rgb")
    cached = CachedReader(open_image(path))
    # Many tiles a rectangle, the edge tiles cut short; then a window half of it kept.
    for y0, y1, x0, x1 in [(5, 120, 7, 200), (0, 300, 150, 517)]:
        np.testing.assert_array_equal(cached.read(y0, y1, x0, x1), _rgb()[y0:y1, x0:x1])


def test_cached_reads_for_bands_keep_the_halo_rows_above_each_band(tmp_path: Path) -> None:
    """Blocks read in bands left to right, each with its halo (exact mode), decode every
    tile once: the band's budget keeps the tile rows above it its halo needs, across the
    whole width (a budget of the band alone drops them before the band below reads them)."""
    ny, nx, t, band, halo = 96, 256, 16, 32, 4  # 16 tiles wide: the band, not _MIN_TILES
    path = tmp_path / "wide.tif"
    image = np.random.default_rng(7).integers(0, 256, (ny, nx, 3), dtype=np.uint8)
    tifffile.imwrite(path, image, tile=(t, t), photometric="rgb")
    reader = open_image(path)
    cached = cached_reads(reader, band)
    calls = _recording(reader)
    for y in range(0, ny, band):
        for x in range(0, nx, band):
            y0, y1 = max(y - halo, 0), min(y + band + halo, ny)
            x0, x1 = max(x - halo, 0), min(x + band + halo, nx)
            np.testing.assert_array_equal(cached.read(y0, y1, x0, x1), image[y0:y1, x0:x1])
    decoded = [
        (i, j)
        for y0, y1, x0, x1 in calls
        for i in range(y0 // t, -(-y1 // t))
        for j in range(x0 // t, -(-x1 // t))
    ]
    assert sorted(decoded) == [(i, j) for i in range(ny // t) for j in range(nx // t)]


def test_cached_reads_leave_arrays_and_whole_width_tiles_alone(tmp_path: Path) -> None:
    image = ArrayReader(_rgb())
    assert cached_reads(image) is image  # nothing to decode
    tifffile.imwrite(tmp_path / "strips.tif", _rgb(), photometric="rgb", rowsperstrip=16)
    strips = open_image(tmp_path / "strips.tif")  # untiled: strips of the whole width
    assert strips.chunk_shape(0) == (16, SHAPE[1])
    cached = CachedReader(strips, max_bytes=strips.chunk_shape(0)[0] * SHAPE[1] * 3 * 8)
    calls = _recording(strips)
    cached.read(10, 20, 30, 40)
    assert calls == [(10, 20, 30, 40)] and cached.cached_bytes == 0


def test_cached_reads_refuse_windows_outside_the_image_naming_the_file(tiled: Reader) -> None:
    with pytest.raises(ImageReadError, match=str(tiled.path).replace(".", r"\.")):
        CachedReader(tiled).read(0, SHAPE[0] + 1, 0, 10)


@pytest.mark.parametrize("level", [0.5, 1.0, 2])
def test_cached_reads_refuse_levels_as_the_reader_does(tiled: Reader, level: float) -> None:
    with pytest.raises(ImageReadError, match=f"level {level!r} out of range") as info:
        CachedReader(tiled).read(0, 10, 0, 10, level)  # type: ignore[arg-type]
    assert str(tiled.path) in str(info.value)


def test_cached_reads_from_threads(tiled: Reader) -> None:
    cached = CachedReader(tiled, max_bytes=tiled.chunk_shape(0)[0] ** 2 * 3 * 40)
    rng = np.random.default_rng(3)
    boxes = [
        (y, y + int(rng.integers(1, 120)), x, x + int(rng.integers(1, 200)))
        for y, x in zip(rng.integers(0, 180, 64), rng.integers(0, 317, 64), strict=True)
    ]
    failures: list[BaseException] = []

    def work(part: list[tuple[int, int, int, int]]) -> None:
        try:
            for y0, y1, x0, x1 in part:
                np.testing.assert_array_equal(cached.read(y0, y1, x0, x1), _rgb()[y0:y1, x0:x1])
        except BaseException as exc:
            failures.append(exc)

    threads = [threading.Thread(target=work, args=(boxes[i::4],)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not failures, failures[0]


@pytest.mark.parametrize("short", ["rows", "columns"])
def test_a_region_reader_giving_short_regions_is_refused_naming_the_file(short: str) -> None:
    """OpenSlide and wsidicom read regions; one that comes back smaller than asked (a lying
    or damaged file) is an error, never pixels padded with whatever the cache's buffer held."""
    from segpipe.io.readers.base import BaseReader, RegionLevel

    full = _rgb()

    class ShortRegions(BaseReader):
        def __init__(self) -> None:
            super().__init__(Path("short.svs"), None)
            ny, nx, nc = full.shape
            self._set_layout(["YXC"], [(ny, nx, nc)], [(64, 64, nc)], full.dtype)

        def _open_level(self, level: int) -> RegionLevel:
            def region(y0: int, y1: int, x0: int, x1: int) -> np.ndarray:
                if short == "rows":  # 8 short where it can be
                    return full[y0 : max(y0 + 1, y1 - 8), x0:x1]
                return full[y0:y1, x0 : max(x0 + 1, x1 - 8)]

            return RegionLevel(self.level_shapes[0], self.dtype, region)

    reader = ShortRegions()
    for read in (reader.read, CachedReader(reader).read):
        with pytest.raises(ImageReadError, match=r"short\.svs: cannot read level 0 .*came back"):
            read(0, 100, 0, 100)


def test_a_pyramid_level_with_other_channels_than_level_0_is_refused_naming_the_file() -> None:
    """A reduced level is the same image: one with another channel count (a mask or an
    overview stored as a level) would give tiles that do not stack with level 0's."""
    from segpipe.io.readers.base import BaseReader

    class OtherChannels(BaseReader):
        def __init__(self) -> None:
            super().__init__(Path("levels.svs"), None)
            shapes = [(128, 128, 3), (64, 64, 4)]
            self._set_layout(["YXC", "YXC"], shapes, [(64, 64, 3), (64, 64, 4)], np.dtype("u1"))

        def _open_level(self, level: int) -> np.ndarray:
            raise AssertionError("never read")

    with pytest.raises(
        ImageReadError,
        match=r"levels\.svs: pyramid level 1 \(64, 64, 4\) .* is not a reduction of level 0",
    ):
        OtherChannels()


@pytest.mark.parametrize(("tile", "held"), [(16, 16 * 16 * 3), (160, 19 * 4096)])
def test_cached_tiles_count_the_memory_they_hold(tmp_path: Path, tile: int, held: int) -> None:
    """A small tile is copied on the heap and counts its bytes; a large one gets pages of its
    own and counts them whole (160 x 160 x 3 = 76800 bytes take 19 pages of 4 KiB)."""
    import mmap

    path = tmp_path / "t.tif"
    tifffile.imwrite(path, _rgb(), tile=(tile, tile), photometric="rgb")
    cached = CachedReader(open_image(path), max_bytes=1 << 24)
    np.testing.assert_array_equal(cached.read(0, 5, 0, 5), _rgb()[:5, :5])
    assert mmap.PAGESIZE != 4096 or cached.cached_bytes == held
    (owner,) = cached._tiles.values()
    while isinstance(owner, np.ndarray) and owner.base is not None:
        owner = owner.base
    owner = owner.obj if isinstance(owner, memoryview) else owner
    assert isinstance(owner, mmap.mmap) == (tile == 160)


def test_a_sharded_zarr_is_cached_by_its_inner_chunks(tmp_path: Path) -> None:
    """A read decodes a sharded array's inner chunks, not its shards: those are its tiles
    (a 128 px shard of 3 channels would be more than a 32nd of a small budget, and pass by)."""
    path = tmp_path / "sharded.zarr"
    array = zarr.create_array(
        path,
        shape=(*SHAPE, 3),
        chunks=(32, 32, 3),
        shards=(128, 128, 3),
        dtype="uint8",
        dimension_names=("y", "x", "c"),
    )
    array[...] = _rgb()
    reader = open_image(path)
    assert reader.chunk_shape(0) == (32, 32)
    assert reader.level(0).chunks[0][0] == 128  # Dask still takes a shard a task
    cached = CachedReader(reader, max_bytes=32 * 32 * 3 * 64)
    np.testing.assert_array_equal(cached.read(40, 100, 70, 200), _rgb()[40:100, 70:200])
    assert cached.cached_bytes == 3 * 5 * 32 * 32 * 3  # rows 32-127, columns 64-223


@pytest.mark.parametrize("made_by", ["zarr", "ingest"])
def test_an_empty_shard_file_is_refused_not_read_as_zeros(tmp_path: Path, made_by: str) -> None:
    """Zarr reads a shard file of zero bytes (an interrupted copy's) as a shard without
    chunks: its pixels came back as the fill value, zeros, without a word."""
    path = tmp_path / "sharded.zarr"
    if made_by == "zarr":
        array = zarr.create_array(
            path, shape=(*SHAPE, 3), chunks=(32, 32, 3), shards=(128, 128, 3), dtype="uint8",
            dimension_names=("y", "x", "c"),
        )  # fmt: skip
        array[...] = _rgb()
    else:
        from segpipe.io.ingest import ingest

        tifffile.imwrite(tmp_path / "src.tif", _rgb(), photometric="rgb")
        ingest(tmp_path / "src.tif", path, chunk=64)
    reader = open_image(path)
    keys = sorted(p.relative_to(path).parts for p in path.rglob("*") if p.is_file())
    first = next(k for k in keys if "c" in k and "labels" not in k)  # level 0's, at (0, 0)
    path.joinpath(*first).write_bytes(b"")
    with pytest.raises(ImageReadError, match=r"sharded\.zarr.*empty file \(0 bytes\)"):
        reader.read(0, 16, 0, 16)
    with pytest.raises(ImageReadError, match=r"empty file \(0 bytes\)"):
        open_image(path).read(0, 16, 0, 16)


def test_a_cached_reader_says_what_its_reader_says(tiled: Reader) -> None:
    cached = CachedReader(tiled)
    assert cached.chunk_shape(0) == tiled.chunk_shape(0)
    assert (cached.mask_kind, cached.nodata) == (tiled.mask_kind, tiled.nodata)
    with pytest.raises(AttributeError):
        cached.no_such_attribute  # noqa: B018


@pytest.mark.parametrize("tiled", ["tiff"], indirect=True)
def test_a_read_waits_for_the_rectangle_it_needs_only(tiled: Reader) -> None:
    """A thread needing a tile another read is decoding waits for that tile's rectangle, not
    for the other read's whole set (which may go on decoding a slow row below)."""
    cached = CachedReader(tiled, max_bytes=1 << 24)
    cached.read(0, 64, 0, 64)  # tile (0, 0) kept: the next read's missing tiles are an L
    gates = {0: threading.Event(), 64: threading.Event()}  # by the rows a rectangle starts at
    original = tiled.read

    def gated(y0: int, y1: int, x0: int, x1: int, level: int = 0) -> np.ndarray:
        assert gates[y0].wait(10), "never released"
        return original(y0, y1, x0, x1, level)

    tiled.read = gated  # type: ignore[method-assign]
    results: dict[str, np.ndarray] = {}

    def read(name: str, *window: int) -> None:
        results[name] = cached.read(*window)

    first = threading.Thread(target=read, args=("L", 0, 128, 0, 128))
    first.start()  # decodes tile (0, 1), then tiles (1, 0) and (1, 1)
    deadline = time.monotonic() + 10
    while (0, 0, 1) not in cached._decoding and time.monotonic() < deadline:
        time.sleep(0.001)
    second = threading.Thread(target=read, args=("tile", 0, 64, 64, 128))
    second.start()  # waits for tile (0, 1)
    time.sleep(0.2)  # for it to reach the wait (were it later, it would find the tile kept)
    gates[0].set()
    second.join(5)
    assert not second.is_alive(), "it waited for the row below too"
    gates[64].set()
    first.join(10)
    np.testing.assert_array_equal(results["L"], _rgb()[:128, :128])
    np.testing.assert_array_equal(results["tile"], _rgb()[:64, 64:128])


@pytest.mark.parametrize("tiled", ["tiff"], indirect=True)
@pytest.mark.parametrize(
    "window",
    [(0, 64, 0, 64), (256, 300, 512, 517)],  # a tile inside; the corner tile, cut by both edges
    ids=["inner", "corner"],
)
def test_a_read_waiting_on_a_failed_read_decodes_the_tile_itself(
    tiled: Reader, window: tuple[int, int, int, int]
) -> None:
    key = (0, window[0] // 64, window[2] // 64)  # (level, row, column) of the window's tile
    cached = CachedReader(tiled, max_bytes=1 << 24)
    release, failed = threading.Event(), []
    original = tiled.read

    def failing_once(y0: int, y1: int, x0: int, x1: int, level: int = 0) -> np.ndarray:
        if not failed:
            failed.append(True)
            assert release.wait(10)
            raise ImageReadError("t.tif: damaged tile")
        return original(y0, y1, x0, x1, level)

    tiled.read = failing_once  # type: ignore[method-assign]
    errors: list[BaseException] = []

    def first() -> None:
        try:
            cached.read(*window)
        except ImageReadError as exc:
            errors.append(exc)

    reader = threading.Thread(target=first)
    reader.start()
    deadline = time.monotonic() + 10
    while key not in cached._decoding and time.monotonic() < deadline:
        time.sleep(0.001)
    waiter_result: list[np.ndarray] = []
    waiter = threading.Thread(target=lambda: waiter_result.append(cached.read(*window)))
    waiter.start()
    time.sleep(0.2)  # for it to reach the wait
    release.set()
    reader.join(10)
    waiter.join(10)
    assert len(errors) == 1 and cached._decoding == {}
    assert waiter_result, "the waiting read failed (its error is in the warnings)"
    y0, y1, x0, x1 = window
    np.testing.assert_array_equal(waiter_result[0], _rgb()[y0:y1, x0:x1])


def _relevel(path: Path, level: int, data: np.ndarray) -> None:
    """Replace ``level``'s array of a write_ome_zarr image with ``data`` (c, y, x)."""
    root = zarr.open_group(str(path), mode="r+")
    root.create_array(f"s{level}", data=data, chunks=data.shape, overwrite=True)


def test_an_ome_zarr_level_of_another_dtype_is_refused(tmp_path: Path) -> None:
    """Level 1 float32 under a uint8 level 0: read through the reader's uint8 buffers (the
    tile cache), 0.7 became 0 without a word."""
    path = write_ome_zarr(tmp_path / "a.ome.zarr", _rgb()[:64, :48])
    _relevel(path, 1, np.full((3, 32, 24), 0.7, np.float32))
    with pytest.raises(ImageReadError, match=r"a\.ome\.zarr.*different dtypes"):
        open_image(path)


def test_ome_zarr_levels_listed_smallest_first_are_refused(tmp_path: Path) -> None:
    """A file listing its thumbnail first would be read as a thumbnail-sized image."""
    path = write_ome_zarr(tmp_path / "b.ome.zarr", _rgb()[:64, :48])
    _relevel(path, 0, np.zeros((3, 16, 12), np.uint8))
    with pytest.raises(ImageReadError, match=r"b\.ome\.zarr.*level 1 .*not a reduction"):
        open_image(path)


@pytest.mark.parametrize(
    ("shards", "field", "fragment"),
    [
        pytest.param(None, "grid", r"chunk_grid chunk_shape of \(0, 0, 0\)", id="chunks"),
        pytest.param((3, 32, 24), "grid", r"\(its shards\) of \(0, 0, 0\)", id="shards"),
        pytest.param((3, 32, 24), "codec", "ZeroDivisionError", id="inner-chunks"),
    ],
)
def test_an_ome_zarr_level_of_chunks_without_pixels_is_refused_at_open(
    tmp_path: Path, shards: tuple[int, ...] | None, field: str, fragment: str
) -> None:
    """zarr opened a level whose zarr.json states a chunk side of 0, and every read of it
    then divided by it: a ZeroDivisionError from Dask, naming no store (a traceback from
    ``segpipe segment --level 1``). Its inner chunks' side: zarr divides by it at open."""
    path = write_ome_zarr(tmp_path / "d.ome.zarr", _rgb()[:64, :48])
    root = zarr.open_group(str(path), mode="r+")
    level = _half(_rgb()[:64, :48]).transpose(2, 0, 1)
    root.create_array("s1", data=level, chunks=(3, 16, 12), shards=shards, overwrite=True)
    meta_file = path / "s1" / "zarr.json"
    meta = json.loads(meta_file.read_text())
    if field == "grid":
        meta["chunk_grid"]["configuration"]["chunk_shape"] = [0, 0, 0]
    else:
        meta["codecs"][0]["configuration"]["chunk_shape"] = [0, 0, 0]
    meta_file.write_text(json.dumps(meta))
    with pytest.raises(ImageReadError, match=r"d\.ome\.zarr: level 1 \(array 's1'") as info:
        open_image(path)
    assert re.search(fragment, str(info.value))


def test_an_ome_physical_size_that_is_no_number_names_the_file_and_gives_way(
    tmp_path: Path,
) -> None:
    path = tmp_path / "c.ome.tif"
    meta = {"axes": "YXS", "PhysicalSizeX": 0.5, "PhysicalSizeY": 0.5}
    tifffile.imwrite(path, _rgb(), photometric="rgb", metadata=meta, ome=True)
    data = path.read_bytes()
    assert data.count(b'PhysicalSizeX="0.5"') == 1  # replaced by as many bytes
    path.write_bytes(data.replace(b'PhysicalSizeX="0.5"', b'PhysicalSizeX="abc"'))
    with pytest.raises(ImageReadError, match=r"c\.ome\.tif.*PhysicalSizeX 'abc' is not a number"):
        open_image(path)
    with pytest.warns(UserWarning, match="is not a number; using pixel_size_um=0.25"):
        assert open_image(path, pixel_size_um=0.25).pixel_size_um == 0.25


def test_ome_imperial_length_units_are_lengths(tmp_path: Path) -> None:
    path = tmp_path / "d.ome.tif"
    meta = {"axes": "YXS", "PhysicalSizeX": 2e-5, "PhysicalSizeXUnit": "in"}
    meta |= {"PhysicalSizeY": 2e-5, "PhysicalSizeYUnit": "in"}
    tifffile.imwrite(path, _rgb(), photometric="rgb", metadata=meta, ome=True)
    assert open_image(path).pixel_size_um == pytest.approx(0.508)


@pytest.mark.parametrize("channels", [3, 4])
def test_a_16_bit_colour_png_keeps_its_16_bits(tmp_path: Path, channels: int) -> None:
    """Pillow reads 16-bit RGB(A) PNGs as 8 bits (60000 became 234): segpipe decodes them
    itself, every value as written; 8-bit PNGs stay Pillow's. A 16-bit alpha marks nodata."""
    import imagecodecs

    pixels = np.random.default_rng(2).integers(0, 65536, (40, 50, channels), dtype=np.uint16)
    if channels == 4:
        pixels[:5, :7, 3] = 0
    path = tmp_path / "wide.png"
    path.write_bytes(imagecodecs.png_encode(pixels))
    reader = open_image(path)
    assert reader.dtype == np.uint16 and reader.shape == (40, 50, channels)
    np.testing.assert_array_equal(reader.read(0, 40, 0, 50), pixels)
    if channels == 4:
        assert reader.mask_kind == "alpha"
        np.testing.assert_array_equal(reader.valid_mask(0, 40, 0, 50), pixels[..., 3] > 0)
    narrow = open_image(_png(tmp_path, _rgb()))
    assert narrow.dtype == np.uint8


# -- alpha as the validity mask, EXIF orientation -----------------------------------------------


def _with_alpha(channels: int) -> np.ndarray:
    """(60, 90, channels) uint8 whose last channel is an alpha with a transparent corner and
    a half-transparent (still valid) band."""
    alpha = np.full((60, 90), 255, np.uint8)
    alpha[:25, :40] = 0
    alpha[40:45] = 128
    return np.dstack([_rgb()[:60, :90, : channels - 1], alpha])


def _png_alpha(tmp: Path, pixels: np.ndarray) -> Path:
    Image.fromarray(pixels, "RGBA" if pixels.shape[2] == 4 else "LA").save(tmp / "a.png")
    return tmp / "a.png"


def _tiff_alpha(planar: bool, extra: str) -> Callable[[Path, np.ndarray], Path]:
    def write(tmp: Path, pixels: np.ndarray) -> Path:
        tifffile.imwrite(
            tmp / "a.tif",
            pixels.transpose(2, 0, 1) if planar else pixels,
            photometric="rgb" if pixels.shape[2] == 4 else "minisblack",
            planarconfig="separate" if planar else "contig",
            extrasamples=[extra],
            tile=(32, 32),
        )
        return tmp / "a.tif"

    return write


def _unpremultiplied(stored: np.ndarray, white: float) -> np.ndarray:
    """``(..., C + 1)`` colour stored premultiplied by its last channel, the alpha, as viewers
    show it, computed apart from segpipe (in float64, exact for these integers): colour *
    white / alpha rounded down (as openslide-python does), at most white; floats not rounded;
    as stored where the alpha is 0."""
    colour, alpha = stored[..., :-1].astype(np.float64), stored[..., -1:].astype(np.float64)
    with np.errstate(divide="ignore", invalid="ignore"):
        shown = colour * white / alpha
    if stored.dtype.kind != "f":
        shown = np.minimum(np.floor(shown), white)
    shown = np.where(alpha > 0, shown, colour)
    return np.concatenate([shown, alpha], axis=-1).astype(stored.dtype)


@pytest.mark.parametrize(
    ("write", "channels", "premultiplied"),
    [
        pytest.param(_png_alpha, 4, False, id="png-rgba"),
        pytest.param(_png_alpha, 2, False, id="png-la"),
        pytest.param(_tiff_alpha(False, "unassalpha"), 4, False, id="tiff-rgba"),
        pytest.param(_tiff_alpha(True, "assocalpha"), 4, True, id="tiff-planar-premultiplied"),
        pytest.param(_tiff_alpha(False, "unassalpha"), 2, False, id="tiff-la"),
    ],
)
def test_an_alpha_channel_marks_transparent_pixels_invalid(
    tmp_path: Path, write: Callable[[Path, np.ndarray], Path], channels: int, premultiplied: bool
) -> None:
    """As GDAL reads a GeoTIFF's alpha band: the channel named "alpha", 0 where no data."""
    pixels = _with_alpha(channels)
    reader = open_image(write(tmp_path, pixels))
    assert reader.mask_kind == "alpha"
    names = ("red", "green", "blue", "alpha") if channels == 4 else ("grey", "alpha")
    assert reader.channel_names == names
    shown = _unpremultiplied(pixels, 255) if premultiplied else pixels
    np.testing.assert_array_equal(reader.read(0, 60, 0, 90), shown)
    np.testing.assert_array_equal(reader.valid_mask(0, 60, 0, 90), pixels[..., -1] > 0)
    clone = pickle.loads(pickle.dumps(reader))
    np.testing.assert_array_equal(clone.valid_mask(20, 30, 35, 45), pixels[20:30, 35:45, -1] > 0)


@pytest.mark.parametrize(
    "write", [_png_alpha, _tiff_alpha(False, "unassalpha")], ids=["png", "tiff"]
)
def test_tiles_wholly_transparent_are_not_computed(
    tmp_path: Path, write: Callable[[Path, np.ndarray], Path]
) -> None:
    """foreground "nodata" and "auto" (no pixel size: not a slide) leave out exactly the tiles
    with no opaque pixel; the others are segmented as without a mask, by an RGB model (the
    alpha marks data, the model does not see it)."""
    import torch

    import segpipe
    from segpipe import models
    from segpipe.models import PixelContract
    from segpipe.results import read_meta

    pixels = _with_alpha(4)
    pixels[:, 64:, 3] = 0  # a transparent column of tiles
    path = write(tmp_path, pixels)
    tile = 16
    opaque = pixels[..., 3] > 0
    expected = np.array(
        [
            [opaque[y : y + tile, x : x + tile].any() for x in range(0, 90, tile)]
            for y in range(0, 60, tile)
        ]
    )
    torch.manual_seed(0)
    net = models.build(
        "unet", class_names=("bg", "fg"), in_channels=3, width=4, depth=2, padding="valid"
    ).eval()
    net.pixel_contract = PixelContract(channels=3, dtype="uint8")
    settings = dict(tile=tile, task_tiles=1, level=0, scheduler="sync")
    off = segpipe.segment(path, tmp_path / "off.zarr", net, foreground="none", **settings)
    where = np.kron(expected, np.ones((tile, tile), bool))[:60, :90]
    for mode in ("nodata", "auto"):
        on = segpipe.segment(path, tmp_path / f"{mode}.zarr", net, foreground=mode, **settings)
        meta = read_meta(on)
        assert meta.config.foreground == "nodata"
        assert (meta.summary.tiles_computed, meta.summary.tiles_background) == (
            expected.sum(),
            (~expected).sum(),
        )
        m_on, m_off = segpipe.open_result(on)["mask"].values, segpipe.open_result(off)["mask"]
        np.testing.assert_array_equal(m_on[where], m_off.values[where])
        assert (m_on[~where] == 0).all()


def test_an_opaque_png_alpha_marks_nothing(tmp_path: Path) -> None:
    """Checked once as the PNG is decoded: no mask pass where no pixel is transparent."""
    pixels = _with_alpha(4)
    pixels[..., 3] = np.maximum(pixels[..., 3], 1)
    reader = open_image(_png_alpha(tmp_path, pixels))
    assert reader.mask_kind is None and reader.valid_mask(0, 60, 0, 90) is None
    assert reader.channel_names == ("red", "green", "blue", "alpha")


def _png_with_trns(path: Path, samples: np.ndarray, bits: int, trns: tuple[int, ...]) -> Path:
    """A grey or RGB PNG of ``(Y, X, C)`` ``samples`` at ``bits`` per sample with a tRNS
    colour, written chunk by chunk (Pillow writes neither 16-bit RGB nor 2-bit grey)."""
    import struct
    import zlib

    def chunk(kind: bytes, body: bytes) -> bytes:
        return (
            struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))
        )

    ny, nx, nc = samples.shape
    if bits < 8:  # packed, leftmost pixel in the high bits
        per = 8 // bits
        v = samples[..., 0].astype(np.uint8).reshape(ny, nx // per, per)
        rows = sum(v[..., i] << (8 - bits * (i + 1)) for i in range(per)).astype(np.uint8)
    else:
        rows = samples.astype(">u2" if bits == 16 else np.uint8).reshape(ny, -1)
    raw = b"".join(b"\x00" + row.tobytes() for row in rows)
    ihdr = struct.pack(">IIBBBBB", nx, ny, bits, 2 if nc == 3 else 0, 0, 0, 0)
    path.write_bytes(
        b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"tRNS", struct.pack(f">{nc}H", *trns))
        + chunk(b"IDAT", zlib.compress(raw)) + chunk(b"IEND", b"")
    )  # fmt: skip
    return path


@pytest.mark.parametrize(
    ("bits", "channels", "shown"),
    [
        pytest.param(8, 1, 1, id="grey8"),
        pytest.param(16, 1, 1, id="grey16"),
        pytest.param(2, 1, 85, id="grey2"),  # Pillow shows 0-3 as 0-255, the tRNS as stored
        pytest.param(8, 3, 1, id="rgb8"),
        pytest.param(16, 3, 1, id="rgb16"),
    ],
)
def test_a_png_trns_colour_marks_its_pixels_invalid_as_gdal_does(
    tmp_path: Path, bits: int, channels: int, shown: int
) -> None:
    """A pixel holding the tRNS colour on every channel holds no data (as GDAL reads it); one
    matching on some channels only is valid. Pixels read as written, channels as written."""
    top = 2**bits - 1
    samples = np.random.default_rng(4).integers(0, top + 1, (24, 32, channels))
    key = (top // 3,) * channels
    samples[:6, :8] = key  # a transparent corner
    samples[10, 3:6, 0] = key[0]  # some channels only, for RGB
    path = _png_with_trns(tmp_path / "keyed.png", samples, bits, key)
    reader = open_image(path)
    expected = ~(samples == key[0]).all(axis=-1)
    assert reader.shape == (24, 32, channels) and reader.mask_kind == "nodata"
    np.testing.assert_array_equal(reader.read(0, 24, 0, 32), samples * shown)
    np.testing.assert_array_equal(reader.valid_mask(0, 24, 0, 32), expected)
    rasterio = pytest.importorskip("rasterio")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # NotGeoreferencedWarning
        with rasterio.open(path) as ds:
            np.testing.assert_array_equal(reader.valid_mask(0, 24, 0, 32), ds.dataset_mask() > 0)


def test_a_png_trns_colour_no_pixel_holds_marks_nothing(tmp_path: Path) -> None:
    path = tmp_path / "grey.png"
    Image.fromarray(_rgb()[:20, :30, 0] | 1, "L").save(path, transparency=0)
    reader = open_image(path)
    assert reader.nodata == (0.0,) and reader.mask_kind is None
    assert reader.valid_mask(0, 20, 0, 30) is None


def _png16_with_exif(path: Path, pixels: np.ndarray, exif: Image.Exif | bytes) -> Path:
    """A 16-bit PNG (Pillow writes none) with an eXIf chunk before its pixels."""
    import zlib

    import imagecodecs

    png = bytes(imagecodecs.png_encode(pixels))
    body = (exif if isinstance(exif, bytes) else exif.tobytes()).removeprefix(b"Exif\x00\x00")
    chunk = b"eXIf" + body
    at = png.index(b"IDAT") - 4
    path.write_bytes(
        png[:at] + len(body).to_bytes(4, "big") + chunk + zlib.crc32(chunk).to_bytes(4, "big")
        + png[at:]
    )  # fmt: skip
    return path


@pytest.mark.parametrize("orientation", range(1, 9))
@pytest.mark.parametrize("bits", [8, 16])
def test_exif_orientation_turns_the_pixels_as_viewers_show_them(
    tmp_path: Path, orientation: int, bits: int
) -> None:
    from PIL import ImageOps

    pixels = _rgb()[:30, :50]
    exif = Image.Exif()
    exif[0x0112] = orientation
    path = tmp_path / "turned.png"
    Image.fromarray(pixels).save(path, exif=exif)
    with Image.open(path) as img:  # as viewers show it
        shown = np.asarray(ImageOps.exif_transpose(img))
    if bits == 16:  # Pillow writes no 16-bit colour PNG, nor turns one
        path = _png16_with_exif(tmp_path / "turned16.png", pixels.astype(np.uint16) * 257, exif)
        shown = shown.astype(np.uint16) * 257
    reader = open_image(path)
    assert reader.shape == shown.shape
    np.testing.assert_array_equal(reader.read(0, shown.shape[0], 0, shown.shape[1]), shown)


@pytest.mark.parametrize(
    "exif",
    [
        pytest.param(b"Exif\x00\x00MM\x00*\x00\x00\x00", id="ifd-offset-cut-short"),
        pytest.param(b"Exif\x00\x00XX\x00*\x00\x00\x00\x08", id="not-a-tiff-header"),
    ],
)
@pytest.mark.parametrize("bits", [8, 16])
def test_an_exif_that_does_not_parse_reads_as_stored_with_a_warning(
    tmp_path: Path, exif: bytes, bits: int
) -> None:
    """Pillow decodes such a PNG and viewers show it as stored: orientation 1, not a refusal;
    the warning names the file, once (not again as the reader re-opens)."""
    pixels = _rgb()[:30, :50]
    path = tmp_path / "odd_exif.png"
    if bits == 8:
        Image.fromarray(pixels).save(path, exif=exif)
    else:
        pixels = pixels.astype(np.uint16) * 257
        _png16_with_exif(path, pixels, exif)
    with pytest.warns(UserWarning, match=r"odd_exif\.png: its EXIF does not parse"):
        reader = open_image(path)
    reader.close()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        np.testing.assert_array_equal(reader.read(0, 30, 0, 50), pixels)


def test_a_jpeg_photo_taken_sideways_reads_upright(tmp_path: Path) -> None:
    """Orientation 6: stored 40 x 60, shown 60 x 40 turned clockwise, the bright quadrant
    (stored top left) shown top right."""
    stored = np.full((40, 60, 3), 30, np.uint8)
    stored[:20, :30] = 220
    exif = Image.Exif()
    exif[0x0112] = 6
    Image.fromarray(stored).save(tmp_path / "photo.jpg", exif=exif, quality=95)
    shown = np.rot90(stored, -1)
    reader = open_image(tmp_path / "photo.jpg")
    assert reader.shape == shown.shape == (60, 40, 3)
    pixels = reader.read(0, 60, 0, 40).astype(int)
    assert np.abs(pixels - shown).mean() < 3
    assert pixels[:30, 20:].min() > 150 and pixels[30:, :].max() < 100


# -- a TIFF's Orientation (tag 274) -----------------------------------------------------------

# TIFF 6.0's Orientation table: where the stored row 0 and column 0 are shown, by numpy alone.
_SHOWN: dict[int, Callable[[np.ndarray], np.ndarray]] = {
    1: lambda a: a,  # row 0 top, column 0 left
    2: lambda a: a[:, ::-1],  # row 0 top, column 0 right
    3: lambda a: np.rot90(a, 2),  # row 0 bottom, column 0 right
    4: lambda a: a[::-1],  # row 0 bottom, column 0 left
    5: lambda a: a.swapaxes(0, 1),  # row 0 left, column 0 top
    6: lambda a: np.rot90(a, -1),  # row 0 right, column 0 top
    7: lambda a: np.rot90(a, -1)[::-1],  # row 0 right, column 0 bottom
    8: lambda a: np.rot90(a, 1),  # row 0 left, column 0 bottom
}


def _turned_tiff(path: Path, stored: np.ndarray, orientation: int, **kw: object) -> Path:
    tifffile.imwrite(path, stored, extratags=[(274, "H", 1, orientation, True)], **kw)
    return path


def test_the_orientation_table_is_what_viewers_show() -> None:
    """The reference of the tests below agrees with Pillow's exif_transpose."""
    from PIL import ImageOps

    stored = _rgb()[:30, :50]
    for orientation, shown in _SHOWN.items():
        img = Image.fromarray(stored)
        img.getexif()[0x0112] = orientation
        np.testing.assert_array_equal(shown(stored), np.asarray(ImageOps.exif_transpose(img)))


@pytest.mark.parametrize("orientation", range(1, 9))
@pytest.mark.parametrize("layout", ["tiled-pyramid", "stripped"])
def test_a_tiff_orientation_turns_every_level_as_viewers_show_it(
    tmp_path: Path, orientation: int, layout: str
) -> None:
    """Shapes, whole levels and windows of every level as the stored pixels turned; sides
    that are no multiple of the tiles or strips, rows and columns of different lengths."""
    stored = _rgb()[:90, :130]
    path = tmp_path / "turned.tif"
    turn = [(274, "H", 1, orientation, True)]
    if layout == "stripped":
        tifffile.imwrite(path, stored, photometric="rgb", rowsperstrip=16, extratags=turn)
        levels = [stored]
    else:
        levels = [stored, _half(stored), _half(_half(stored))]
        kw = {"photometric": "rgb", "tile": (32, 32), "extratags": turn}
        with tifffile.TiffWriter(path) as tif:
            tif.write(stored, subifds=2, **kw)
            for reduced in levels[1:]:
                tif.write(reduced, subfiletype=1, **kw)
    reader = open_image(path)
    shown = [_SHOWN[orientation](level) for level in levels]
    assert reader.level_shapes == tuple(s.shape for s in shown)
    for k, pixels in enumerate(shown):
        np.testing.assert_array_equal(reader.level(k).compute(), pixels)
        h, w, _ = pixels.shape
        y0, y1, x0, x1 = h // 5, h - h // 3, w // 7, w - w // 4
        np.testing.assert_array_equal(reader.read(y0, y1, x0, x1, level=k), pixels[y0:y1, x0:x1])
        np.testing.assert_array_equal(reader.read(0, 1, 0, 1, level=k), pixels[:1, :1])
    clone = pickle.loads(pickle.dumps(reader))  # as a Dask worker gets it
    np.testing.assert_array_equal(clone.read(0, 9, 0, 5, level=0), shown[0][:9, :5])


@pytest.mark.parametrize("orientation", range(1, 9))
def test_a_turned_window_decodes_only_the_stored_tiles_under_it(
    tmp_path: Path, orientation: int
) -> None:
    """Every tile but those the window's pixels are stored in is garbage: the window reads,
    the whole level does not."""
    stored = _rgb()[:70, :100]
    path = _turned_tiff(
        tmp_path / "t.tif", stored, orientation, photometric="rgb", tile=(16, 16),
        compression="zlib",
    )  # fmt: skip
    ny, nx = 5, 7  # tiles down and across
    where = np.arange(70 * 100).reshape(70, 100)  # each shown pixel's stored index
    y0, y1, x0, x1 = 3, 20, 40, 47
    used = _SHOWN[orientation](where)[y0:y1, x0:x1].ravel()
    tiles = set((used // 100 // 16 * nx + used % 100 // 16).tolist())
    with tifffile.TiffFile(path) as tif:
        page = tif.pages.first
        spans = list(zip(page.dataoffsets, page.databytecounts, strict=True))
    assert len(spans) == ny * nx and len(tiles) < len(spans) // 2
    data = bytearray(path.read_bytes())
    for i, (offset, count) in enumerate(spans):
        if i not in tiles:
            data[offset : offset + count] = b"\xff" * count
    path.write_bytes(bytes(data))
    reader = open_image(path)
    np.testing.assert_array_equal(
        reader.read(y0, y1, x0, x1), _SHOWN[orientation](stored)[y0:y1, x0:x1]
    )
    with pytest.raises(ImageReadError, match="corrupt"):
        reader.level(0).compute()


@pytest.mark.parametrize("reduced", [None, 3, 1])
def test_a_pyramid_is_turned_as_its_level_0_says(tmp_path: Path, reduced: int | None) -> None:
    """A reduced level without the tag is turned as level 0; one stating another orientation
    is refused, naming the file and both. Orientation 1 too: stated, it is no tag left out,
    and turning that level as level 0 says would read it wrongly."""
    stored = _rgb()[:64, :96]
    path = tmp_path / "p.tif"
    with tifffile.TiffWriter(path) as tif:
        tif.write(stored, subifds=1, tile=(16, 16), extratags=[(274, "H", 1, 6, True)])
        extra = [] if reduced is None else [(274, "H", 1, reduced, True)]
        tif.write(_half(stored), subfiletype=1, tile=(16, 16), extratags=extra)
    if reduced is not None:
        stated = rf"level 1 states Orientation {reduced}.*level 0 6"
        with pytest.raises(ImageReadError, match=stated) as e:
            open_image(path)
        assert str(path) in str(e.value)
        return
    reader = open_image(path)
    assert reader.level_shapes == ((96, 64, 3), (48, 32, 3))
    np.testing.assert_array_equal(reader.read(0, 48, 0, 32, level=1), _SHOWN[6](_half(stored)))


def test_a_geotiff_with_an_orientation_is_refused(tmp_path: Path) -> None:
    """GDAL places a GeoTIFF's stored raster by its georeference, ignoring the tag."""
    nodata = (42113, "s", 0, "0", True)  # GDAL's nodata tag: the reader goes through GDAL
    path = tmp_path / "geo.tif"
    tifffile.imwrite(
        path, _rgb()[:40, :50, 0], extratags=[(274, "H", 1, 8, True), nodata]
    )  # fmt: skip
    with pytest.raises(ImageReadError, match=r"GeoTIFF.*Orientation 8") as info:
        open_image(path)
    assert str(path) in str(info.value)
    tifffile.imwrite(path, _rgb()[:40, :50, 0], extratags=[(274, "H", 1, 1, True), nodata])
    assert open_image(path).shape == (40, 50, 1)


# -- associated (premultiplied) alpha ---------------------------------------------------------


def _premultiplied_rgba(dtype: type) -> np.ndarray:
    """(60, 90, 4) RGBA of ``dtype`` stored premultiplied: colour at most its alpha (a few
    above it, as a careless writer stores them), alpha 0 over colour in a corner."""
    white = 1.0 if np.dtype(dtype).kind == "f" else np.iinfo(dtype).max
    rng = np.random.default_rng(3)
    alpha = rng.uniform(0, 1, (60, 90, 1))
    alpha[:10, :20] = 0
    alpha[20:25] = 1
    colour = rng.uniform(0, 1, (60, 90, 3)) * alpha
    colour[:10, :20] = 0.3  # colour where nothing is opaque: stays as stored
    colour[50:] = np.minimum(colour[50:] * 1.5, 1)
    pixels = np.concatenate([colour, alpha], axis=-1) * white
    return pixels.astype(dtype) if white == 1.0 else np.round(pixels).astype(dtype)


@pytest.mark.parametrize("dtype", [np.uint8, np.uint16, np.float32])
@pytest.mark.parametrize("extra", ["assocalpha", "unassalpha"])
@pytest.mark.parametrize("orientation", [1, 6])
def test_associated_alpha_colour_reads_divided_by_its_alpha(
    tmp_path: Path, dtype: type, extra: str, orientation: int
) -> None:
    """Premultiplied colour as viewers show it, at every level and in every window, the
    alpha as stored; unassociated alpha's colour as stored."""
    stored = _premultiplied_rgba(dtype)
    white = 1.0 if np.dtype(dtype).kind == "f" else np.iinfo(dtype).max
    path = tmp_path / "rgba.tif"
    kw = {
        "photometric": "rgb",
        "extrasamples": [extra],
        "tile": (16, 16),
        "extratags": [(274, "H", 1, orientation, True)],
    }
    with tifffile.TiffWriter(path) as tif:
        tif.write(stored, subifds=1, **kw)
        tif.write(_half(stored), subfiletype=1, **kw)
    expected = _unpremultiplied(stored, white) if extra == "assocalpha" else stored
    shown = [_SHOWN[orientation](a) for a in (expected, _half(expected))]
    reader = open_image(path)
    assert reader.dtype == dtype and reader.channel_names == ("red", "green", "blue", "alpha")
    np.testing.assert_array_equal(reader.level(0).compute(), shown[0])
    np.testing.assert_array_equal(reader.read(7, 25, 3, 28, level=1), shown[1][7:25, 3:28])
    np.testing.assert_array_equal(reader.read(3, 50, 5, 40)[..., 1:3], shown[0][3:50, 5:40, 1:3])
    valid = _SHOWN[orientation](stored[..., 3] > 0)
    np.testing.assert_array_equal(reader.valid_mask(0, *valid.shape[:1], 0, valid.shape[1]), valid)
    if extra == "assocalpha":  # the test sees colour that was changed
        assert not np.array_equal(expected[..., :3], stored[..., :3])


def test_premultiplied_colour_is_rounded_as_openslide_python_rounds_it(tmp_path: Path) -> None:
    """Every 8-bit colour of every alpha, against openslide-python's own un-premultiplying of
    OpenSlide's ARGB (what segpipe's OpenSlide reader hands out)."""
    convert = pytest.importorskip("openslide._convert")
    import ctypes

    alpha, colour = np.meshgrid(np.arange(256), np.arange(256), indexing="ij")
    colour = np.minimum(colour, alpha)  # premultiplied colour never passes its alpha
    rgba = np.stack([colour, colour, colour, alpha], axis=-1).astype(np.uint8)
    argb = (alpha << 24 | colour << 16 | colour << 8 | colour).astype(np.uint32).ravel()
    buffer = (ctypes.c_uint32 * argb.size).from_buffer(argb)
    convert.argb2rgba(buffer)
    openslide_rgba = argb.view(np.uint8).reshape(256, 256, 4)
    tifffile.imwrite(
        tmp_path / "all.tif", rgba, photometric="rgb", extrasamples=["assocalpha"],
        tile=(64, 64),
    )  # fmt: skip
    read = open_image(tmp_path / "all.tif").read(0, 256, 0, 256)
    np.testing.assert_array_equal(read, openslide_rgba)


@pytest.mark.parametrize("white", [1.0, 255.0])
def test_unpremultiplied_float_colour_is_on_the_scale_of_its_white(white: float) -> None:
    """Float colour comes back as colour * white / alpha: on the scale of the white given
    (the reader gives 1; a caller whose floats run to 255 gives 255)."""
    stored = _premultiplied_rgba(np.float32) * np.float32(white)
    shown = unpremultiply(stored[..., :3], stored[..., 3:], white)
    expected = _unpremultiplied(stored, white)[..., :3]
    assert shown.dtype == np.float32
    np.testing.assert_allclose(shown, expected, rtol=1e-6)


def test_associated_alpha_of_12_bit_samples_is_divided_on_a_12_bit_scale(tmp_path: Path) -> None:
    """12-bit samples are stored in uint16s: their white is 4095. Taken as 65535, colour came
    out 16 times too bright, far past 12 bits."""
    stored = _premultiplied_rgba(np.uint16) >> 4  # colour still at most about its alpha
    path = tmp_path / "rgba12.tif"
    tifffile.imwrite(
        path, stored, photometric="rgb", extrasamples=["assocalpha"], bitspersample=12,
        tile=(16, 16),
    )  # fmt: skip
    with tifffile.TiffFile(path) as tif:
        assert tif.pages.first.bitspersample == 12
    reader = open_image(path)
    shown = reader.read(0, 60, 0, 90)
    np.testing.assert_array_equal(shown, _unpremultiplied(stored, 4095))
    assert shown.max() <= 4095


def test_associated_alpha_of_signed_samples_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "signed.tif"
    tifffile.imwrite(
        path, np.zeros((20, 30, 4), np.int16), photometric="rgb", extrasamples=["assocalpha"]
    )  # fmt: skip
    with pytest.raises(ImageReadError, match="associated alpha in int16") as info:
        open_image(path)
    assert str(path) in str(info.value)


@pytest.mark.parametrize("extra", ["unassalpha", "assocalpha"])
def test_an_alpha_after_another_extra_sample_is_the_alpha_read(tmp_path: Path, extra: str) -> None:
    """RGB with extra samples (unspecified, alpha): the fourth sample was taken as the alpha,
    masking out every pixel where it is 0 and dividing premultiplied colour by it."""
    stored = _premultiplied_rgba(np.uint8)
    other = np.random.default_rng(9).integers(0, 256, (60, 90, 1), dtype=np.uint8)
    other[:30] = 0  # where it is 0, the alpha is not
    pixels = np.concatenate([stored[..., :3], other, stored[..., 3:]], axis=-1)
    path = tmp_path / "rgbxa.tif"
    tifffile.imwrite(
        path, pixels, photometric="rgb", extrasamples=["unspecified", extra], tile=(16, 16)
    )
    shown = _unpremultiplied(stored, 255) if extra == "assocalpha" else stored
    expected = np.concatenate([shown[..., :3], other, stored[..., 3:]], axis=-1)
    reader = open_image(path)
    assert reader.mask_kind == "alpha"
    assert reader.channel_names == ("red", "green", "blue", "band 4", "alpha")
    np.testing.assert_array_equal(reader.read(0, 60, 0, 90), expected)
    np.testing.assert_array_equal(reader.read(5, 40, 10, 50)[..., :3], expected[5:40, 10:50, :3])
    np.testing.assert_array_equal(reader.valid_mask(0, 60, 0, 90), stored[..., 3] > 0)


# -- what a TIFF's samples mean (PhotometricInterpretation) ----------------------------------


def test_a_palette_tiff_reads_as_its_colormaps_rgb_at_every_level(tmp_path: Path) -> None:
    indices = (_rgb()[..., 0] + _rgb()[..., 1]).astype(np.uint8)
    colormap = np.random.default_rng(5).integers(0, 65536, (3, 256)).astype(np.uint16)
    path = tmp_path / "palette.tif"
    kw = {"photometric": "palette", "colormap": colormap, "tile": (64, 64)}
    with tifffile.TiffWriter(path) as tif:
        tif.write(indices, subifds=1, **kw)
        tif.write(_half(indices), subfiletype=1, **kw)
    expected = np.moveaxis(colormap[:, indices], 0, -1)  # 16-bit RGB, the colormap's own
    reader = open_image(path)
    assert reader.level_shapes == ((300, 517, 3), (150, 259, 3))
    assert (reader.dtype, reader.channel_names) == (np.uint16, ("red", "green", "blue"))
    np.testing.assert_array_equal(reader.read(37, 211, 101, 450), expected[37:211, 101:450])
    np.testing.assert_array_equal(reader.read(0, 300, 0, 517)[..., 1:2], expected[..., 1:2])
    np.testing.assert_array_equal(reader.level(1).compute(), _half(expected))
    with Image.open(path) as img:  # Pillow shows the colormap's top 8 bits
        shown = np.asarray(img.convert("RGB"))
    np.testing.assert_array_equal(reader.read(0, 300, 0, 517) >> 8, shown)


@pytest.mark.parametrize(("top", "dtype"), [(255, np.uint8), (256, np.uint16)])
def test_a_palette_tiff_of_8_bit_colours_reads_as_8_bit_rgb(
    tmp_path: Path, top: int, dtype: type
) -> None:
    """Some writers store 8-bit colours in the 16-bit ColorMap: a colormap reaching 255 and
    no higher is 8-bit RGB (a model would see it 257 times too dark as 16 bits); one value
    past 255 makes it 16-bit."""
    indices = (np.arange(40 * 50).reshape(40, 50) % 256).astype(np.uint8)
    colormap = np.random.default_rng(6).integers(0, top, (3, 256)).astype(np.uint16)
    colormap[1, 7] = top  # the colormap's largest value, index 7 in every row
    path = tmp_path / "palette.tif"
    tifffile.imwrite(path, indices, photometric="palette", colormap=colormap)
    reader = open_image(path)
    assert reader.dtype == dtype
    pixels = reader.read(0, 40, 0, 50)
    assert pixels.dtype == dtype
    np.testing.assert_array_equal(pixels, np.moveaxis(colormap[:, indices], 0, -1))


def test_a_palette_geotiffs_nodata_index_marks_the_pixels_without_data(tmp_path: Path) -> None:
    import rasterio
    from rasterio.transform import Affine

    indices = (np.arange(64 * 96).reshape(64, 96) % 4).astype(np.uint8)
    colours = {0: (0, 0, 0, 255), 1: (255, 0, 0, 255), 2: (0, 255, 0, 255), 3: (0, 0, 255, 255)}
    path = tmp_path / "classes.tif"
    shape = {"width": 96, "height": 64, "count": 1, "dtype": "uint8", "photometric": "palette"}
    place = {"crs": "EPSG:32633", "transform": Affine(1, 0, 5e5, 0, -1, 0), "nodata": 0}
    with rasterio.open(path, "w", driver="GTiff", **shape, **place) as ds:
        ds.write(indices[None])
        ds.write_colormap(1, colours)
    reader = open_image(path)
    rgb = np.array([colours[i][:3] for i in range(4)], np.uint16) * 257  # GDAL writes 16 bits
    np.testing.assert_array_equal(reader.read(0, 64, 0, 96), rgb[indices])
    np.testing.assert_array_equal(reader.valid_mask(0, 64, 0, 96), indices != 0)


def _inverted(stored: np.ndarray) -> np.ndarray:
    """Min-is-white samples as min-is-black, computed apart from segpipe."""
    if stored.dtype == bool:
        return ~stored
    if stored.dtype.kind == "f":
        return 1 - stored
    info = np.iinfo(stored.dtype)
    return (info.max + info.min - stored.astype(np.int64)).astype(stored.dtype)


@pytest.mark.parametrize("dtype", [bool, np.uint8, np.uint16, np.int16, np.float32])
def test_min_is_white_reads_as_viewers_show_it(tmp_path: Path, dtype: type) -> None:
    grey = _rgb()[..., 0]
    stored = {bool: grey > 100, np.float32: grey / 255}.get(dtype, grey).astype(dtype)
    if dtype is np.int16:
        stored = (grey.astype(np.int16) - 128) * 200
    path = tmp_path / "white.tif"
    tifffile.imwrite(path, stored, photometric="miniswhite", tile=(64, 64))
    reader = open_image(path)
    assert reader.dtype == stored.dtype
    np.testing.assert_array_equal(reader.read(0, 300, 0, 517)[..., 0], _inverted(stored))


@pytest.mark.parametrize(("dtype", "bits"), [(np.uint16, 12), (np.uint8, 4)])
def test_min_is_white_is_inverted_within_its_bits_per_sample(
    tmp_path: Path, dtype: type, bits: int
) -> None:
    """A 12-bit sample is stored in a uint16: white is 4095, not 65535. A 4-bit one, in a
    uint8, is then scaled to 0-255 (test_samples_of_fewer_than_8_bits_read_scaled_...)."""
    stored = (_rgb(np.uint16)[..., 0] >> (16 - bits)).astype(dtype)
    path = tmp_path / "white.tif"
    tifffile.imwrite(path, stored, photometric="miniswhite", bitspersample=bits, tile=(64, 64))
    with tifffile.TiffFile(path) as tif:
        assert (tif.pages.first.bitspersample, tif.pages.first.dtype) == (bits, stored.dtype)
    reader = open_image(path)
    assert reader.dtype == stored.dtype
    white = 2**bits - 1
    scale = 255 // white if dtype == np.uint8 else 1  # 17 for 4 bits
    np.testing.assert_array_equal(reader.read(0, 300, 0, 517)[..., 0], (white - stored) * scale)


def test_min_is_white_levels_and_alpha(tmp_path: Path) -> None:
    """Each level's grey is inverted, its alpha not; the alpha still marks what is empty."""
    stored = _with_alpha(2)
    path = tmp_path / "white_alpha.tif"
    kw = {"photometric": "miniswhite", "extrasamples": ["unassalpha"], "tile": (16, 16)}
    with tifffile.TiffWriter(path) as tif:
        tif.write(stored, subifds=1, **kw)
        tif.write(_half(stored), subfiletype=1, **kw)
    expected = np.stack([255 - stored[..., 0], stored[..., 1]], axis=-1)
    reader = open_image(path)
    assert reader.channel_names == ("grey", "alpha")
    np.testing.assert_array_equal(reader.read(0, 60, 0, 90), expected)
    np.testing.assert_array_equal(reader.read(0, 60, 0, 90)[..., 1:], expected[..., 1:])
    np.testing.assert_array_equal(reader.read(5, 25, 7, 40, level=1), _half(expected)[5:25, 7:40])
    np.testing.assert_array_equal(reader.valid_mask(0, 60, 0, 90), stored[..., 1] > 0)


def test_a_min_is_white_mask_file_marks_what_shows_white(tmp_path: Path) -> None:
    """A mask drawn in a viewer: what shows white is marked. (One tifffile wrote from an
    array is read as stored: test_foreground.py.)"""
    shows_white = np.zeros((60, 90), bool)
    shows_white[10:30, 20:50] = True
    mask = tmp_path / "mask.tif"
    # a set bit shows black; no tifffile JSON description nor Software tag, as an imaging
    # program writes it
    tifffile.imwrite(
        mask, ~shows_white, photometric="miniswhite", metadata=None, software="GIMP 2.10"
    )
    image = ArrayReader(np.zeros((60, 90, 3), np.uint8))
    np.testing.assert_array_equal(read_mask_file(mask, image, (60, 90)), shows_white)


@pytest.mark.parametrize(
    ("photometric", "samples", "named"),
    [("separated", 4, "CMYK"), ("cielab", 3, "CIELAB"), ("ycbcr", 3, "YCbCr")],
)
def test_tiffs_of_colours_segpipe_cannot_show_are_refused_naming_file_and_kind(
    tmp_path: Path, photometric: str, samples: int, named: str
) -> None:
    path = tmp_path / f"{photometric}.tif"
    tifffile.imwrite(path, np.zeros((40, 50, samples), np.uint8), photometric=photometric)
    with pytest.raises(ImageReadError, match=f"{named}.*PhotometricInterpretation") as info:
        open_image(path)
    assert str(path) in str(info.value)
    image = ArrayReader(np.zeros((40, 50, 3), np.uint8))
    with pytest.raises(ImageReadError, match=named):  # nor is its ink taken for an alpha
        read_mask_file(path, image, (40, 50))


# -- mask files' identity (segpipe.io.maskfiles) ---------------------------------------------


def _mask_store(path: Path, pixels: np.ndarray) -> Path:
    arr = zarr.create_array(
        str(path), shape=pixels.shape, chunks=(32, 32), dtype=pixels.dtype,
        dimension_names=("y", "x"),
    )  # fmt: skip
    arr[:] = pixels
    return path


def test_a_mask_directory_hashes_by_its_files_names_and_bytes(tmp_path: Path) -> None:
    pixels = (_rgb()[:64, :96, 1] > 20).astype(np.uint8)
    first = mask_file_sha256(_mask_store(tmp_path / "a.zarr", pixels))
    assert first == mask_file_sha256(_mask_store(tmp_path / "b.zarr", pixels))
    edited = pixels.copy()
    edited[40, 70] ^= 1
    assert mask_file_sha256(_mask_store(tmp_path / "c.zarr", edited)) != first
    moved = _mask_store(tmp_path / "d.zarr", pixels)
    chunk = next(p for p in sorted(moved.rglob("*")) if p.is_file() and p.name != "zarr.json")
    chunk.rename(chunk.with_name("9"))  # the same bytes under another name
    assert mask_file_sha256(moved) != first
    png = _png(tmp_path, _rgb())  # a file: its bytes' sha256, as before
    assert mask_file_sha256(png) == hashlib.sha256(png.read_bytes()).hexdigest()


@pytest.mark.parametrize("kind", ["file", "directory"])
def test_a_mask_is_hashed_once_until_it_is_written(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, kind: str
) -> None:
    """An archive run asked for one mask's hash three or four times per image; an edit
    keeping the size and the mtime (set back) still changes the ctime, and the hash."""
    pixels = (_rgb()[:64, :96, 1] > 20).astype(np.uint8)
    mask = _png(tmp_path, _rgb()) if kind == "file" else _mask_store(tmp_path / "m.zarr", pixels)
    target = mask if kind == "file" else next(p for p in mask.rglob("c/*/*") if p.is_file())
    reads: list[object] = []
    real_open = open

    def counted(file: object, *args: object, **kwargs: object) -> object:
        reads.append(file)
        return real_open(file, *args, **kwargs)  # type: ignore[call-overload]

    monkeypatch.setattr("builtins.open", counted)
    first = mask_file_sha256(mask)
    opened = len(reads)
    assert opened and mask_file_sha256(mask) == first and len(reads) == opened
    before = target.stat()
    data = bytearray(target.read_bytes())
    data[-1] ^= 0xFF
    time.sleep(0.01)
    target.write_bytes(bytes(data))
    os.utime(target, ns=(before.st_atime_ns, before.st_mtime_ns))
    assert (
        target.stat().st_size == before.st_size and target.stat().st_mtime_ns == before.st_mtime_ns
    )
    assert mask_file_sha256(mask) != first


# ---- OpenSlide -------------------------------------------------------------------------------


def _generic_tiled_tiff(path: Path, shape: tuple[int, int]) -> list[np.ndarray]:
    """A tiled pyramid TIFF OpenSlide opens as generic-tiff: levels of halved sides, rounded
    down; the levels as stored."""
    ny, nx = shape
    img = np.random.default_rng(8).integers(0, 256, (ny, nx, 3), dtype=np.uint8)
    levels = [img[:: 2**k, :: 2**k][: ny // 2**k, : nx // 2**k] for k in range(3)]
    with tifffile.TiffWriter(path) as tif:
        for k, level in enumerate(levels):
            tif.write(
                level, tile=(64, 64), photometric="rgb", compression="zlib", subfiletype=int(k > 0)
            )
    return levels


@pytest.mark.parametrize(
    ("shape", "kept"),
    [
        pytest.param((304, 512), 3, id="sides-halve-exactly"),
        pytest.param((301, 517), 1, id="downsample-2.005"),  # OpenSlide would resample
    ],
)
def test_openslide_levels_are_the_stored_levels(
    tmp_path: Path, shape: tuple[int, int], kept: int
) -> None:
    pytest.importorskip("openslide")
    from segpipe.io.readers import OpenSlideReader

    stored = _generic_tiled_tiff(tmp_path / "pyramid.tif", shape)
    reader = OpenSlideReader(tmp_path / "pyramid.tif")
    for k, shape in enumerate(reader.level_shapes):
        level = next(level for level in stored if level.shape == shape)
        np.testing.assert_array_equal(reader.level(k).compute(), level)
        np.testing.assert_array_equal(reader.read(37, 54, 91, 110, k), level[37:54, 91:110])
    assert reader.level_shapes == tuple(level.shape for level in stored[:kept])


def test_a_corrupt_openslide_tile_names_the_window_and_spares_the_others(tmp_path: Path) -> None:
    """OpenSlide keeps a decoding error on its handle: the reader opens a new one."""
    pytest.importorskip("openslide")
    from segpipe.io.readers import OpenSlideReader

    path = tmp_path / "bad.tif"
    stored = _generic_tiled_tiff(path, (304, 512))
    with tifffile.TiffFile(path) as tif:
        offset, size = tif.pages[0].dataoffsets[5], tif.pages[0].databytecounts[5]
    data = bytearray(path.read_bytes())
    data[offset : offset + size] = b"\xff" * size  # level 0, tile y 0:64, x 320:384
    path.write_bytes(bytes(data))
    reader = OpenSlideReader(path)
    match = r"bad\.tif: OpenSlide cannot read level 0 at y 0:64, x 320:384"
    with pytest.raises(ImageReadError, match=match):
        reader.read(0, 64, 320, 384)
    with pytest.raises(ImageReadError, match=match):
        reader.valid_mask(0, 64, 320, 384)
    np.testing.assert_array_equal(reader.read(100, 164, 0, 64), stored[0][100:164, :64])
    assert reader.valid_mask(100, 164, 0, 64).all()


# ---- describe_image ------------------------------------------------------------------------------


@pytest.mark.skipif(not Path("/proc/self/fd").is_dir(), reason="counts /proc/self/fd")
def test_describing_a_file_leaves_no_file_open(tmp_path: Path) -> None:
    import gc

    from segpipe.io.describe import describe_image

    path = write_svs(tmp_path / "slide.svs", _rgb())
    describe_image(path)  # imports done

    def open_files() -> int:
        return len(list(Path("/proc/self/fd").iterdir()))

    gc.disable()  # the cycle collector would close what is left open
    try:
        before = open_files()
        infos = [describe_image(path) for _ in range(10)]
        assert open_files() == before
    finally:
        gc.enable()
    assert infos[0].levels == ((300, 517, 3), (150, 259, 3))


# ---- damaged and lying TIFF structure: refused at open, naming the file and the tag ----------


def _tiled(path: Path, side: int = 64, **kw: object) -> Path:
    """A classic tiled RGB TIFF, ``side`` px square in 32 px tiles, written by tifffile."""
    rgb = np.random.default_rng(0).integers(1, 255, (side, side, 3), dtype=np.uint8)
    tifffile.imwrite(path, rgb, **{"tile": (32, 32), "photometric": "rgb", "metadata": None, **kw})
    return path


def _pyramid(path: Path, levels: int = 3, *, bigtiff: bool = False) -> Path:
    """A 128 x 160 RGB OME-TIFF with ``levels - 1`` reduced levels as SubIFDs of level 0."""
    rgb = np.random.default_rng(1).integers(1, 255, (128, 160, 3), dtype=np.uint8)
    kw = {"tile": (32, 32), "photometric": "rgb"}
    with tifffile.TiffWriter(path, bigtiff=bigtiff, ome=True) as tif:
        tif.write(rgb, subifds=levels - 1, metadata={"axes": "YXS"}, **kw)
        for k in range(1, levels):
            tif.write(rgb[:: 2**k, :: 2**k], subfiletype=1, **kw)
    return path


def _tag(path: Path, code: int, level: int = 0) -> tuple[int, int, bool]:
    """Where tag ``code`` of ``level``'s first IFD is: its entry's offset, its value's offset,
    and whether the file is a BigTIFF."""
    with tifffile.TiffFile(path) as tif:
        tag = tif.series[0].levels[level].keyframe.tags[code]
        return tag.offset, tag.valueoffset, tif.is_bigtiff


def _set_tag(path: Path, code: int, count: int, value: int, level: int = 0) -> None:
    """Overwrite the IFD entry of tag ``code`` of ``level``: a LONG (or LONG8 in a BigTIFF) of
    ``count`` values, ``value`` itself or where they are."""
    entry, _, big = _tag(path, code, level)
    packed = struct.pack("<HHQQ", code, 16, count, value) if big else None
    data = bytearray(path.read_bytes())
    data[entry : entry + (20 if big else 12)] = packed or struct.pack(
        "<HHII", code, 4, count, value
    )
    path.write_bytes(bytes(data))


def _refused(path: Path, *fragments: str) -> str:
    """Open ``path``; it must be refused with ImageReadError naming it and ``fragments``."""
    with pytest.raises(ImageReadError) as info:
        open_image(path)
    message = str(info.value)
    assert str(path) in message
    for fragment in fragments:
        assert fragment in message, message
    return message


def test_a_tag_whose_values_run_past_the_end_of_the_file_is_refused(tmp_path: Path) -> None:
    """Values starting inside the file but cut off by its end: tifffile drops the tag, only
    logging it, and an SVS read as a plain TIFF lost its vendor and pixel size."""
    path = tmp_path / "cut.svs"
    desc = "Aperio Image Library v12.0.15 \r\n64x64 (32x32) RAW|AppMag = 20|MPP = 0.5000"
    _tiled(path, description=desc)
    assert open_image(path).pixel_size_um == 0.5  # whole, it reads as Aperio
    entry, values, _ = _tag(path, 270)
    data = bytearray(path.read_bytes())
    assert values + len(desc) < len(data)
    struct.pack_into("<I", data, entry + 4, len(data) - values + 10)  # count: 10 bytes past
    path.write_bytes(bytes(data))
    _refused(path, "tag 270 (ImageDescription)", f"past the end of the file ({len(data):,} bytes)")


def _header_cut(tmp: Path) -> Path:
    path = _tiled(tmp / "cut.tif", bigtiff=True)
    path.write_bytes(path.read_bytes()[:7])  # b"II+\0\x08\0\0": inside the BigTIFF header
    return path


def _ifd_claiming_4096_tags(tmp: Path) -> Path:
    path = tmp / "lying_count.ome.tif"
    planes = np.zeros((3, 64, 64), np.uint16)
    tifffile.imwrite(path, planes, ome=True, metadata={"axes": "CYX"}, tile=(32, 32))
    with tifffile.TiffFile(path) as tif:
        second = tif.pages[1].offset
    data = bytearray(path.read_bytes())
    data[second : second + 2] = struct.pack("<H", 4096)  # 49 KB of entries in a 26 KB file
    path.write_bytes(bytes(data))
    return path


@pytest.mark.parametrize(
    ("damage", "fragments"),
    [
        pytest.param(_header_cut, ["not a readable TIFF"], id="bigtiff-header-cut"),
        pytest.param(_ifd_claiming_4096_tags, ["IFD 1", "truncated"], id="ifd-count-lies"),
    ],
)
def test_a_tiff_cut_in_its_header_or_ifd_is_refused_naming_the_file(
    tmp_path: Path, damage: Callable[[Path], Path], fragments: list[str]
) -> None:
    """tifffile unpacks the cut bytes with struct (struct.error, no ValueError)."""
    _refused(damage(tmp_path), *fragments)


def test_a_reader_reopening_a_tiff_cut_since_names_the_file(tmp_path: Path) -> None:
    path = _tiled(tmp_path / "gone.tif")
    reader = pickle.loads(pickle.dumps(open_image(path)))  # re-opens the file on first read
    path.write_bytes(path.read_bytes()[:7])
    with pytest.raises(ImageReadError, match=r"gone\.tif changed since it was opened"):
        reader.read(0, 8, 0, 8)


def _chain(path: Path, pages: int) -> list[int]:
    """Write a tiled RGB image and ``pages - 1`` reduced images of it as a chain of IFDs, with
    no metadata saying what they are; their offsets."""
    rgb = np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8)
    kw = {"tile": (32, 32), "photometric": "rgb", "metadata": None}
    with tifffile.TiffWriter(path) as tif:
        tif.write(rgb, **kw)
        for _ in range(pages - 1):
            tif.write(rgb[::2, ::2], subfiletype=1, **kw)
    with tifffile.TiffFile(path) as tif:
        return [page.offset for page in tif.pages]


_OPEN = (
    "import sys\n"
    "from segpipe.io.readers import ImageReadError, open_image\n"
    "try:\n"
    "    open_image(sys.argv[1])\n"
    "except ImageReadError as exc:\n"
    "    print(exc)\n"
)


@pytest.mark.parametrize(
    ("pages", "last_to"),
    [(2, 1), (2, 0), (150, 60)],  # the last cycle past the 100th IFD, where tifffile looks
    ids=["itself", "ifd-0", "ifd-60-of-150"],
)
def test_a_tiff_whose_ifd_chain_loops_is_refused_at_once(
    tmp_path: Path, pages: int, last_to: int
) -> None:
    path = tmp_path / "loop.tif"
    offsets = _chain(path, pages)
    data = bytearray(path.read_bytes())
    last = offsets[-1]
    at = last + 2 + 12 * struct.unpack("<H", data[last : last + 2])[0]
    data[at : at + 4] = struct.pack("<I", offsets[last_to])  # the last IFD's next pointer
    path.write_bytes(bytes(data))
    # tifffile walks such a chain forever: a process of its own, killed if it does
    done = subprocess.run(
        [sys.executable, "-c", _OPEN, str(path)], capture_output=True, text=True, timeout=20
    )
    assert str(path) in done.stdout and "loops back" in done.stdout, done.stdout + done.stderr
    assert f"IFD {pages - 1} gives IFD {last_to}" in done.stdout


def _cut_at_tile_offsets(tmp: Path) -> Path:
    path = _tiled(tmp / "tiled.tif")
    path.write_bytes(path.read_bytes()[: _tag(path, 324)[1]])  # the IFD whole, no offsets
    return path


def _cut_at_strip_offsets(tmp: Path) -> Path:
    path = _tiled(tmp / "stripped.tif", tile=None, rowsperstrip=16)
    path.write_bytes(path.read_bytes()[: _tag(path, 273)[1]])
    return path


def _one_short(code: int, **kw: object) -> Callable[[Path], Path]:
    """The 4 tiles or strips of a 64 px image, tag ``code`` (TileOffsets or StripOffsets)
    listing 3 of them: tifffile reads the fourth as zeros."""

    def damage(tmp: Path) -> Path:
        path = _tiled(tmp / "short.tif", **kw)
        _set_tag(path, code, 3, _tag(path, code)[1])  # the same offsets, one fewer
        return path

    return damage


def _reduced_offsets_past_the_end(tmp: Path) -> Path:
    path = _pyramid(tmp / "pyramid.tif")
    _set_tag(path, 324, 6, 0xFFFFFF00, level=1)  # level 1's TileOffsets: unreadable
    return path


@pytest.mark.parametrize(
    ("damage", "fragment"),
    [
        pytest.param(_cut_at_tile_offsets, "level 0 lists 0 of the 4 tiles", id="tiles"),
        pytest.param(_cut_at_strip_offsets, "level 0 lists 0 of the 4 strips", id="strips"),
        pytest.param(_reduced_offsets_past_the_end, "level 1 lists 0 of the 6 tiles", id="level-1"),
        pytest.param(_one_short(324), "level 0 lists 3 of the 4 tiles", id="tiles-one-short"),
        pytest.param(
            _one_short(273, tile=None, rowsperstrip=16),
            "level 0 lists 3 of the 4 strips",
            id="strips-one-short",
        ),
    ],
)
def test_a_tiff_listing_fewer_tiles_than_its_size_needs_is_refused(
    tmp_path: Path, damage: Callable[[Path], Path], fragment: str
) -> None:
    """tifffile reads a page without its offsets tag (cut off, or its value past the end) as
    zeros, and estimates a byte count for it."""
    _refused(damage(tmp_path), fragment, "would read as zeros")


@pytest.mark.parametrize("kind", ["tiff", "zarr"])
def test_an_empty_reduced_level_is_refused_naming_it(tmp_path: Path, kind: str) -> None:
    if kind == "tiff":
        path = _pyramid(tmp_path / "pyramid.tif", bigtiff=True)
        _set_tag(path, 257, 1, 0, level=2)  # level 2's ImageLength
    else:
        path = write_ome_zarr(tmp_path / "a.ome.zarr", _rgb()[:64, :48])
        root = zarr.open_group(str(path), mode="r+")
        root.create_array("s1", shape=(3, 0, 24), chunks=(3, 8, 8), dtype="u1", overwrite=True)
    level = 2 if kind == "tiff" else 1
    _refused(path, f"pyramid level {level} (0, ", "is empty")


def _svs_chain(path: Path) -> Path:
    """Baseline, thumbnail and two reduced levels, each an IFD of the main chain (Aperio)."""
    base = np.random.default_rng(7).integers(0, 255, (256, 256, 3), dtype=np.uint8)
    kw = {"photometric": "rgb", "metadata": None}
    head = "Aperio Image Library v12.0.5\r\n256x256 [0,0 256x256] (32x32) RAW|MPP = 0.4990"
    with tifffile.TiffWriter(path) as tif:
        tif.write(base, tile=(32, 32), description=head, **kw)
        tif.write(base[::4, ::4], description="Aperio thumbnail", **kw)
        tif.write(base[::2, ::2], tile=(32, 32), description="Aperio level 1", **kw)
        tif.write(base[::4, ::4], tile=(32, 32), description="Aperio level 2", **kw)
    return path


@pytest.mark.parametrize("layout", ["subifds", "ifd-chain"])
def test_a_pyramid_cut_inside_a_level_ifd_is_refused_not_read_short(
    tmp_path: Path, layout: str
) -> None:
    """Cut 2 bytes into the last SubIFD (tifffile drops it, and reads the file as one of 2
    levels), or at the thumbnail's IFD of an SVS (tifffile reads the baseline alone)."""
    if layout == "subifds":
        path = _pyramid(tmp_path / "pyramid.tif", bigtiff=True)
        with tifffile.TiffFile(path) as tif:
            cut = tif.series[0].levels[2].keyframe.offset + 2
        fragments = ["level 2's IFD at byte", "truncated"]
    else:
        path = _svs_chain(tmp_path / "slide.svs")
        with tifffile.TiffFile(path) as tif:
            assert len(tif.series[0].levels) == 3
            cut = tif.pages[1].offset
        fragments = [f"IFD 1 lies at byte {cut:,}, past the file's {cut:,} bytes", "truncated"]
    path.write_bytes(path.read_bytes()[:cut])
    _refused(path, *fragments)


def test_an_ome_pyramid_whose_last_subifd_tifffile_takes_for_none_is_refused(
    tmp_path: Path,
) -> None:
    """A SubIFD offset below 8 (inside the header) is none to tifffile, which then reads the
    OME-TIFF's pyramid a level short, saying so only in its log."""
    path = _pyramid(tmp_path / "pyramid.ome.tif", levels=3)
    _, values, _ = _tag(path, 330)  # SubIFDs: the offsets of levels 1 and 2
    data = bytearray(path.read_bytes())
    struct.pack_into("<I", data, values + 4, 4)
    path.write_bytes(bytes(data))
    with tifffile.TiffFile(path) as tif:
        assert len(tif.series[0].levels) == 2
    _refused(path, "lists 2 reduced levels (SubIFDs) but tifffile read 1", "level 2 holds none")


def _wider_than_its_tiles(tmp: Path) -> Path:
    path = _tiled(tmp / "wide.tif")
    _set_tag(path, 256, 1, 2**31 - 1)  # ImageWidth
    return path


def _reduced_level_taller_than_level_0(tmp: Path) -> Path:
    path = _pyramid(tmp / "pyramid.tif")
    _set_tag(path, 257, 1, 0xFFFFFFFF, level=1)  # ImageLength
    return path


def _level_1_larger(tmp: Path) -> Path:
    """A whole level 1, every tile listed, larger than level 0 (an OME-TIFF: tifffile takes
    a larger SubIFD of another TIFF for another image)."""
    path = tmp / "larger.ome.tif"
    kw = {"tile": (32, 32), "photometric": "rgb"}
    with tifffile.TiffWriter(path, ome=True) as tif:
        tif.write(np.zeros((64, 64, 3), np.uint8), subifds=1, metadata={"axes": "YXS"}, **kw)
        tif.write(np.zeros((128, 96, 3), np.uint8), subfiletype=1, **kw)
    return path


@pytest.mark.parametrize(
    ("damage", "fragment"),
    [
        pytest.param(_wider_than_its_tiles, "lists 4 of the 134,217,728 tiles", id="width"),
        pytest.param(_reduced_level_taller_than_level_0, "level 1 lists 6 of the", id="level-1"),
        pytest.param(_level_1_larger, "level 1 (128, 96, 3) (y, x, c) is not a reduction", id="up"),
    ],
)
def test_a_tiff_declaring_a_level_larger_than_it_holds_is_refused(
    tmp_path: Path, damage: Callable[[Path], Path], fragment: str
) -> None:
    """Without a refusal, building the dask grid of the declared size exhausts memory."""
    _refused(damage(tmp_path), fragment)


@pytest.mark.parametrize(
    ("code", "value", "fragments"),
    [
        pytest.param(277, 0xFFFFFFFF, ["4,294,967,295 samples", "SamplesPerPixel"], id="samples"),
        pytest.param(322, 0xFFFFFFFF, ["more than any writer writes", "TileWidth"], id="tile"),
        pytest.param(322, 2**22, ["larger than the level", "TileWidth"], id="tile-4m"),
    ],
)
@pytest.mark.parametrize("compression", [None, "zlib"])
def test_a_tiff_declaring_samples_or_tiles_no_image_has_is_refused(
    tmp_path: Path, code: int, value: int, fragments: list[str], compression: str | None
) -> None:
    """Reading one pixel of either would allocate gigabytes (a MemoryError)."""
    path = _tiled(tmp_path / "lying.tif", compression=compression)
    _set_tag(path, code, 1, value)
    _refused(path, "level 0", *fragments)


@pytest.mark.parametrize(
    ("layout", "code", "value"),
    [
        pytest.param({"tile": None, "rowsperstrip": 16}, 256, 2**31 - 1, id="strip-width"),
        pytest.param({}, 277, 2**16 - 1, id="tile-samples"),  # a SHORT, as TIFF has it
    ],
)
@pytest.mark.parametrize("compression", [None, "zlib", "packbits"])
def test_a_tiff_declaring_more_pixels_than_its_bytes_can_hold_is_refused(
    tmp_path: Path, layout: dict[str, object], code: int, value: int, compression: str | None
) -> None:
    """A lie the tile sizes alone do not show (a strip's width; samples within TIFF's range):
    decoded, one strip or tile would be gigabytes, from a few kB stored."""
    path = _tiled(tmp_path / "lying.tif", compression=compression, **layout)
    _set_tag(path, code, 1, value)
    _refused(path, "level 0", "bytes stored for one", "is damaged")


def test_tiles_larger_than_a_small_image_are_read(tmp_path: Path) -> None:
    """A COG or a pyramid's smallest level keeps its tile size past the image's sides."""
    rgb = np.random.default_rng(2).integers(0, 255, (40, 50, 3), dtype=np.uint8)
    path = tmp_path / "small.tif"
    tifffile.imwrite(path, rgb, tile=(512, 512), photometric="rgb", compression="zlib")
    np.testing.assert_array_equal(open_image(path).read(0, 40, 0, 50), rgb)


def test_tiles_16_times_a_levels_side_are_refused_though_their_codec_could_give_them(
    tmp_path: Path,
) -> None:
    """A 512 px level declaring 8,192 px tiles, 192 MiB each decoded: zstd's bound (32,768
    bytes a byte stored) lets its stored tiles give that much, so each read would decode
    tiles 256 times the level."""
    path = _tiled(tmp_path / "lying.tif", side=512, compression="zstd")
    _set_tag(path, 322, 1, 8192)  # TileWidth
    _set_tag(path, 323, 1, 8192)  # TileLength
    _refused(path, "level 0", "tiles of 8,192 x 8,192 pixels", "larger than the level")


def _sof_height_at(path: Path, tile: int) -> int:
    """Offset in the file of the height in tile ``tile``'s JPEG frame header (SOF0)."""
    with tifffile.TiffFile(path) as tif:
        start = int(tif.pages.first.dataoffsets[tile])
    return start + path.read_bytes()[start:].index(b"\xff\xc0") + 5


@pytest.mark.parametrize(("tile", "rows"), [(0, 96), (1, 64)])
def test_a_jpeg_tile_stating_the_rows_below_it_for_its_height_is_refused(
    tmp_path: Path, tile: int, rows: int
) -> None:
    """A tile's stream may be cropped to the image, never taller than its tile: the rows from
    its top to the image's bottom (96 rows for tile 0, looked at on open; 64 for tile 1, as
    it is read) would be decoded, the tags' tile height a lie."""
    pixels = np.zeros((96, 32, 3), np.uint8)
    pixels[...] = np.linspace(0, 250, 96, dtype=np.uint8)[:, None, None]
    path = tmp_path / "tall.tif"
    tifffile.imwrite(path, pixels, tile=(32, 32), photometric="rgb", compression="jpeg")
    at = _sof_height_at(path, tile)
    data = bytearray(path.read_bytes())
    data[at : at + 2] = rows.to_bytes(2, "big")
    path.write_bytes(bytes(data))
    stream = f"tile {tile} is a JPEG stream of {rows} x 32 pixels"
    if tile == 0:
        _refused(path, "level 0 (96 x 32 pixels)", stream)
        return
    reader = open_image(path)
    assert np.abs(reader.read(0, 32, 0, 32).astype(int) - pixels[:32]).mean() < 4
    with pytest.raises(ImageReadError, match=r"tall\.tif.*may be corrupt") as info:
        reader.read(32, 64, 0, 32)
    assert stream in str(info.value)


def test_planar_jpeg_tiles_cropped_to_the_image_read_in_every_plane(tmp_path: Path) -> None:
    """Band-separate JPEG, each edge tile's stream cropped to the image (as some writers
    write it): the tiles of planes 2 and 3 were placed as if past the image's bottom, and
    their cropped streams refused as lying."""
    import imagecodecs

    planes = np.zeros((3, 40, 50), np.uint8)
    for p in range(3):
        planes[p] = np.linspace(20 + 40 * p, 250 - 30 * p, 50, dtype=np.uint8)[None, :]
    tiles = [
        imagecodecs.jpeg_encode(np.ascontiguousarray(planes[p, y : y + 32, x : x + 32]), level=95)
        for p in range(3)
        for y in (0, 32)
        for x in (0, 32)
    ]
    path = tmp_path / "planar.tif"
    tifffile.imwrite(
        path, iter(tiles), shape=planes.shape, dtype=np.uint8, tile=(32, 32),
        photometric="rgb", planarconfig="separate", compression="jpeg",
    )  # fmt: skip
    reader = open_image(path)
    shown = np.moveaxis(planes, 0, -1)
    assert reader.shape == (40, 50, 3)
    assert np.abs(reader.read(0, 40, 0, 50).astype(int) - shown).mean() < 2
    assert np.abs(reader.read(33, 40, 35, 50).astype(int) - shown[33:, 35:]).mean() < 2


@pytest.mark.parametrize("count", [769, 765], ids=["flat", "short"])
def test_a_palette_tiff_whose_colormap_has_the_wrong_count_is_refused(
    tmp_path: Path, count: int
) -> None:
    """769 values come back flat from tifffile (not 3 x N); 765 leave index 255 colourless."""
    path = tmp_path / "palette.tif"
    colormap = np.random.default_rng(3).integers(0, 65535, (3, 256)).astype(np.uint16)
    indices = np.arange(64 * 64).reshape(64, 64).astype(np.uint8)
    tifffile.imwrite(path, indices, photometric="palette", colormap=colormap, tile=(32, 32))
    entry, values, _ = _tag(path, 320)
    data = bytearray(path.read_bytes())
    data[entry : entry + 12] = struct.pack("<HHII", 320, 3, count, values)
    path.write_bytes(bytes(data))
    _refused(path, f"ColorMap (TIFF tag 320) holds {count} values", "needs 3 x 256")


def test_a_palette_tiff_whose_colormap_is_longer_than_its_indices_need_reads_by_its_first(
    tmp_path: Path,
) -> None:
    """A ColorMap of more than 3 x 2**BitsPerSample values (a 9-bit palette beside 8-bit
    indices) still gives every index a colour: read by its first entries, not refused as
    damaged."""
    path = tmp_path / "palette.tif"
    indices = (np.arange(64 * 64).reshape(64, 64) % 256).astype(np.uint8)
    short = np.zeros((3, 256), np.uint16)
    tifffile.imwrite(path, indices, photometric="palette", colormap=short, tile=(32, 32))
    longer = np.random.default_rng(4).integers(256, 65536, (3, 512)).astype(np.uint16)
    entry, _, _ = _tag(path, 320)
    data = bytearray(path.read_bytes())
    data += bytes(len(data) % 2)  # values on a word boundary
    data[entry : entry + 12] = struct.pack("<HHII", 320, 3, longer.size, len(data))
    data += longer.astype("<u2").tobytes()  # reds, then greens, then blues
    path.write_bytes(bytes(data))
    reader = open_image(path)
    assert (reader.dtype, reader.channel_names) == (np.uint16, ("red", "green", "blue"))
    np.testing.assert_array_equal(reader.read(0, 64, 0, 64), np.moveaxis(longer[:, indices], 0, -1))


def test_pixels_not_of_the_declared_layout_are_refused_naming_the_file(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """As a palette level whose colormap is 1-D gave (y, x) for its (y, x, 3)."""

    class Flat:
        def __getitem__(self, key: tuple[slice, ...]) -> np.ndarray:
            return np.zeros((8, 8), np.uint8)

    reader = ArrayReader(np.zeros((8, 8, 3), np.uint8), name="mem.npy")
    monkeypatch.setattr(reader, "_open_level", lambda level: Flat())
    with pytest.raises(ImageReadError, match=r"mem\.npy: level 0 reads wrongly"):
        reader.read(0, 8, 0, 8)


def test_an_ome_xml_declaring_more_planes_than_the_file_holds_is_refused_before_tifffile(
    tmp_path: Path,
) -> None:
    """tifffile lists a page for each plane the OME-XML declares (SizeT 2**31: 16 GiB of
    them); the declared planes are bounded by the bytes of the file first."""
    path = tmp_path / "lying.ome.tif"
    planes = np.zeros((2, 32, 32), np.uint8)
    tifffile.imwrite(path, planes, metadata={"axes": "TYX"})
    with tifffile.TiffFile(path) as tif:
        xml = tif.pages.first.description.replace('SizeT="2"', 'SizeT="16777216"')
    assert 'SizeT="16777216"' in xml
    tifffile.imwrite(path, planes, description=xml, metadata=None)
    with pytest.raises(ImageReadError, match=r"lying\.ome\.tif: its OME-XML declares an image "):
        open_image(path)


@pytest.mark.parametrize("lie", ['SizeX="70"', 'SizeY="20"'])
def test_an_ome_xml_of_another_image_size_is_named_damaged_not_a_stack(
    tmp_path: Path, lie: str
) -> None:
    """tifffile gives up on an OME-XML at odds with the IFDs and lists plain pages: two
    channels were refused as "a stack, export one I plane", naming no damage."""
    path = tmp_path / "lying.ome.tif"
    tifffile.imwrite(path, np.zeros((2, 32, 48), np.uint16), metadata={"axes": "CYX"})
    with tifffile.TiffFile(path) as tif:
        xml = re.sub(lie.split("=")[0] + r'="\d+"', lie, tif.pages.first.description)
    tifffile.imwrite(path, np.zeros((2, 32, 48), np.uint16), description=xml, metadata=None)
    with pytest.raises(
        ImageReadError, match=r"lying\.ome\.tif: its OME-XML does not describe its images"
    ):
        open_image(path)


def test_a_valid_ome_xml_read_as_another_kind_is_not_called_damaged(tmp_path: Path) -> None:
    """tifffile reads its own shape metadata before OME-XML: such a file, its OME-XML right,
    was refused as "OME-XML damaged" (it is refused, as a stack, as it was before)."""
    path = tmp_path / "shaped.ome.tif"
    tifffile.imwrite(path, np.zeros((2, 32, 48), np.uint16), metadata={"axes": "CYX"})
    with tifffile.TiffFile(path) as tif:
        xml = tif.pages.first.description
    tifffile.imwrite(path, np.zeros((2, 32, 48), np.uint16), description=xml)
    with tifffile.TiffFile(path) as tif:
        assert tif.is_ome and tif.series[0].kind == "shaped"
    with pytest.raises(ImageReadError) as refused:
        open_image(path)
    assert "OME-XML" not in str(refused.value) and "not stacks" in str(refused.value)


def test_gdal_nodata_for_another_band_count_than_the_channels_read_is_refused(
    tmp_path: Path,
) -> None:
    """GDAL reads an OME-TIFF of planar channels as its first page, one band: its one nodata
    value would be matched to three channels."""
    path = tmp_path / "cyx.ome.tif"
    tifffile.imwrite(
        path, np.zeros((3, 32, 32), np.uint8), metadata={"axes": "CYX"},
        extratags=[(42113, "s", 0, "255", True)],
    )  # fmt: skip
    with pytest.raises(ImageReadError, match=r"cyx\.ome\.tif: GDAL gives 1 nodata values"):
        open_image(path)


def _two_level_ome_tiff(path: Path, top: tuple[int, int], reduced: tuple[int, int]) -> Path:
    rng = np.random.default_rng(0)
    with tifffile.TiffWriter(path, ome=True) as tw:
        meta = {"PhysicalSizeX": 0.5, "PhysicalSizeY": 0.5}
        tw.write(rng.integers(0, 255, top, np.uint8), tile=(16, 16), subifds=1, metadata=meta)
        tw.write(rng.integers(0, 255, reduced, np.uint8), tile=(16, 16), subfiletype=1)
    return path


@pytest.mark.parametrize(
    ("top", "reduced"),
    [
        ((1024, 1024), (512, 512)),
        ((1001, 301), (501, 151)),
        ((16, 4000), (1, 63)),
        ((7, 9), (3, 5)),
    ],
)
def test_a_level_reduced_alike_on_both_axes_is_read(tmp_path, top, reduced):
    reader = open_image(_two_level_ome_tiff(tmp_path / "a.ome.tif", top, reduced))
    assert [s[:2] for s in reader.level_shapes] == [top, reduced]


@pytest.mark.parametrize(("top", "reduced"), [((1024, 1024), (512, 256)), ((300, 40), (300, 20))])
def test_a_level_reduced_otherwise_on_each_axis_is_refused(tmp_path, top, reduced):
    """A level's pixel size is one number, taken from its rows: a level halved in y and
    quartered in x was read, a run there reporting half the area."""
    path = _two_level_ome_tiff(tmp_path / "a.ome.tif", top, reduced)
    ratio = rf"{top[0] / reduced[0]:.4g} in y and {top[1] / reduced[1]:.4g} in x"
    with pytest.raises(
        ImageReadError, match=rf"a\.ome\.tif: pyramid level 1 .* reduced by {ratio}"
    ):
        open_image(path)


def test_a_file_url_is_decoded_as_rfc_8089_says(tmp_path):
    """Path.as_uri() percent-encodes (a space is %20) and file://localhost/ is this machine:
    both were taken literally, and the file not found."""
    from segpipe.io.files import location

    folder = tmp_path / "a folder #1"
    folder.mkdir()
    path = folder / "slide ü.tif"
    tifffile.imwrite(path, np.zeros((8, 8), np.uint8))
    assert location(path.as_uri()) == path
    assert location(path.as_uri().replace("file://", "file://localhost")) == path
    assert open_image(path.as_uri()).shape == (8, 8, 1)
    with pytest.raises(ValueError, match="another host"):
        location("file://scanner-7/share/a.tif")
    # A '#' or '?' as typed (not %23, %3F) cut the path there: "res#v2.seg.zarr" was "res",
    # another result, which overwrite replaced.
    for typed in (f"file://{folder}/res#v2.seg.zarr", f"file://{folder}/res?v=2.seg.zarr"):
        with pytest.raises(ValueError, match=r"'\?' and '#' end the path; write them %3F"):
            location(typed)


# ---- non-finite values in metadata --------------------------------------------------------------


@pytest.mark.parametrize("nodata", [float("nan"), float("inf"), float("-inf")])
def test_a_non_finite_nodata_describes_as_strict_json(tmp_path: Path, nodata: float) -> None:
    """``segpipe info --json`` printed a NaN nodata as a bare NaN, which strict JSON parsers
    reject: it is the text an ingest records for it, which float() reads back."""
    import json

    import rasterio
    from rasterio.transform import Affine

    from segpipe.io.describe import describe_image

    path = tmp_path / "nodata.tif"
    place = {"crs": "EPSG:32633", "transform": Affine(1, 0, 500000, 0, -1, 5000000)}
    with rasterio.open(
        path, "w", driver="GTiff", height=8, width=8, count=1, dtype="float32",
        nodata=nodata, **place,
    ) as ds:  # fmt: skip
        ds.write(np.zeros((1, 8, 8), np.float32))

    def refuse(constant: str) -> None:
        raise ValueError(f"not strict JSON: {constant}")

    info = describe_image(path)
    assert info.nodata is not None and np.isnan(info.nodata[0]) == np.isnan(nodata)
    (recorded,) = json.loads(json.dumps(info.to_dict()), parse_constant=refuse)["nodata"]
    assert isinstance(recorded, str)
    np.testing.assert_equal(float(recorded), nodata)
    # An ingest's zarr.json too (an infinity went in bare), and its reader reads it back.
    from segpipe.io.ingest import ingest

    store = ingest(path, tmp_path / "nodata.zarr", chunk=8)
    json.loads((store / "zarr.json").read_text(), parse_constant=refuse)
    np.testing.assert_equal(open_image(store).nodata, (nodata,))


@pytest.mark.parametrize("scale", [float("nan"), 0.0, -1.0])
def test_an_ome_zarr_scale_that_is_no_positive_number_names_the_store_and_gives_way(
    tmp_path: Path, scale: float
) -> None:
    """A NaN, 0 or negative scale opened with its pixel size unknown and a warning that X and
    Y differ, where a text one was refused: refused as the OME-TIFF's, naming the store."""
    path = write_ome_zarr(tmp_path / "s.ome.zarr", _rgb()[:64, :48], scale=scale)
    with pytest.raises(
        ImageReadError, match=rf"s\.ome\.zarr: OME-Zarr scale of axis x is {scale}, not a pos"
    ):
        open_image(path)
    with pytest.warns(UserWarning, match=r"s\.ome\.zarr: .*; using pixel_size_um=0.25"):
        assert open_image(path, pixel_size_um=0.25).pixel_size_um == 0.25


# 16 x 16 grey, progressive, arithmetic-coded (jpegtran -arithmetic -progressive): Pillow
# and libjpeg decode it whole, without a warning.
_ARITHMETIC_JPEG = (
    "/9j/4AAQSkZJRgABAQAAAQABAAD/2wBDABALDA4MChAODQ4SERATGCgaGBYWGDEjJR0oOjM9PDkzODdASFxOQERX"
    "RTc4UG1RV19iZ2hnPk1xeXBkeFxlZ2P/ygALCAAQABABAREA/8wABAAQ/9oACAEBAAAAAcH/zAAEEAX/2gAIAQEA"
    "AQUCEOm1Lkv/zAAEEAX/2gAIAQEABj8CDgOdg+te4PfdB5TbzxL18ex0/8wABBAF/9oACAEBAAE/IdW9CoKO5XAT"
    "jn2aOBHh00t9lr6VRskKjBJId01wZ+2YDvz92ZZd0bD/2gAIAQEAAAAQIP/MAAQQBf/aAAgBAQABPxAs49LeA0DP"
    "lD+iaUv/AN2aihM1ziuqM8LjQmzWGqxP1XLFnqV9h0T+w6uMy46A/9k="
)


def test_an_arithmetic_coded_jpeg_reads_as_pillow_decodes_it(tmp_path):
    """The check for scans cut short put filler after each scan: an arithmetic decoder reads
    on past a whole scan, so every such file was refused as truncated."""
    import base64

    from PIL import Image

    path = tmp_path / "arithmetic.jpg"
    path.write_bytes(base64.b64decode("".join(_ARITHMETIC_JPEG)))
    with Image.open(path) as img:
        expected = np.asarray(img)
    np.testing.assert_array_equal(np.asarray(open_image(path).level(0))[..., 0], expected)


def _placed_ome_zarr(
    path: Path,
    dataset: list[dict[str, Any]],
    multiscale: list[dict[str, Any]] | None = None,
    unit: str | None = "micrometer",
) -> Path:
    """A one-level (c, y, x) OME-Zarr 0.5 image of 8 x 12 px whose level 0 has the
    coordinateTransformations ``dataset`` (and the multiscale ``multiscale``)."""
    space = {"type": "space", **({"unit": unit} if unit else {})}
    ms: dict[str, Any] = {
        "axes": [{"name": "c", "type": "channel"}, {"name": "y", **space}, {"name": "x", **space}],
        "datasets": [{"path": "0", "coordinateTransformations": dataset}],
    }
    if multiscale is not None:
        ms["coordinateTransformations"] = multiscale
    root = zarr.create_group(str(path), attributes={"ome": {"version": "0.5", "multiscales": [ms]}})
    root.create_array("0", data=np.zeros((3, 8, 12), np.uint8), dimension_names=("c", "y", "x"))
    return path


def _scale(*v: float) -> dict[str, Any]:
    return {"type": "scale", "scale": list(v)}


def _shift(*v: Any) -> dict[str, Any]:
    return {"type": "translation", "translation": list(v)}


@pytest.mark.parametrize(
    ("dataset", "multiscale", "unit", "pixel_size", "origin"),
    [
        pytest.param([_scale(1, 0.5, 0.5), _shift(0, 100, 200)], None, "micrometer", 0.5,
                     (100.0, 200.0), id="micrometer"),
        pytest.param([_scale(1, 500, 500), _shift(0, 1500, -2000)], None, "nanometer", 0.5,
                     (1.5, -2.0), id="nanometer"),
        # NGFF applies the dataset's transforms, then the multiscale's: (10 * 2 + 1, 20 * 2 + 3)
        pytest.param([_scale(1, 0.5, 0.5), _shift(0, 10, 20)], [_scale(1, 2, 2), _shift(0, 1, 3)],
                     "micrometer", 1.0, (21.0, 43.0), id="composed"),
        pytest.param([_scale(1, 0.5, 0.5)], None, "micrometer", 0.5, (0.0, 0.0), id="none"),
        # no unit: neither the pixel size nor where the pixels lie is known in microns
        pytest.param([_scale(1, 0.5, 0.5), _shift(0, 100, 200)], None, None, None, (0.0, 0.0),
                     id="no-unit"),
    ],
)  # fmt: skip
def test_an_ome_zarr_translation_is_where_its_first_pixel_centre_lies(
    tmp_path: Path,
    dataset: list[dict[str, Any]],
    multiscale: list[dict[str, Any]] | None,
    unit: str | None,
    pixel_size: float | None,
    origin: tuple[float, float],
) -> None:
    """Only the scale was read: a result of the image lay at 0, off its source in a viewer."""
    reader = open_image(_placed_ome_zarr(tmp_path / "t.ome.zarr", dataset, multiscale, unit))
    assert reader.pixel_size_um == pixel_size
    assert reader.origin_um == origin
    assert pickle.loads(pickle.dumps(reader)).origin_um == origin  # as Dask's workers get it


@pytest.mark.parametrize("value", [float("nan"), float("inf"), "far", None])
def test_an_ome_zarr_translation_that_is_no_finite_number_is_refused(
    tmp_path: Path, value: Any
) -> None:
    """As a scale that is no positive number: refused naming the store, read with a warning
    (and the first pixel at 0) where the user gives the pixel size."""
    path = _placed_ome_zarr(tmp_path / "t.ome.zarr", [_scale(1, 0.5, 0.5), _shift(0, 4, value)])
    with pytest.raises(
        ImageReadError,
        match=rf"t\.ome\.zarr: OME-Zarr translation of axis x is {re.escape(repr(value))}, not a",
    ):
        open_image(path)
    with pytest.warns(UserWarning, match=r"using pixel_size_um=0.25 and an origin of 0"):
        reader = open_image(path, pixel_size_um=0.25)
    assert (reader.pixel_size_um, reader.origin_um) == (0.25, (0.0, 0.0))


def test_an_ome_zarr_translation_given_by_path_is_warned_of_not_refused(tmp_path: Path) -> None:
    """NGFF 0.4 lets a binary array at "path" hold a translation: a valid file, refused as
    unreadable metadata (KeyError 'translation') once translations were read."""
    path_given = {"type": "translation", "path": "translation.bin"}
    path = _placed_ome_zarr(tmp_path / "t.ome.zarr", [_scale(1, 0.5, 0.5), path_given])
    with pytest.warns(UserWarning, match=r"t\.ome\.zarr: a translation given by path is not read"):
        reader = open_image(path)
    assert (reader.pixel_size_um, reader.origin_um) == (0.5, (0.0, 0.0))


@pytest.mark.parametrize("shape", [(5,), (2, 6, 8, 3)])
def test_an_in_memory_array_of_other_than_2_or_3_axes_is_refused_naming_it(shape):
    """A stack (Z, Y, X, C) or a line of pixels is no image: refused at once, naming the
    array and its shape, never read as (Y, X, C) of its first axes."""
    with pytest.raises(ImageReadError) as info:
        ArrayReader(np.zeros(shape, np.uint8), name="stack.npy")
    assert str(info.value) == (
        f"stack.npy: an in-memory image must be (Y, X) or (Y, X, C), got shape {shape}"
    )


def test_two_in_memory_arrays_of_one_name_and_shape_are_different_pixels_to_dask():
    """Every ArrayReader is "<in-memory array>" unless named: keys of the name and shape
    alone would have dask read one array's pixels for the other's in one graph."""
    a = np.zeros((40, 50, 3), np.uint8)
    b = a.copy()
    b[7, 9, 1] = 1
    ra, rb = ArrayReader(a), ArrayReader(b)
    assert ra.level(0).name != rb.level(0).name
    assert ra.level(0).name == ArrayReader(a.copy()).level(0).name  # the pixels name it
    np.testing.assert_array_equal((rb.level(0) - ra.level(0)).compute()[7, 9], [0, 1, 0])


@pytest.mark.parametrize("kind", ["tiff", "zarr"])
def test_an_image_this_user_may_not_read_is_said_so_not_called_corrupt(tmp_path, monkeypatch, kind):
    """A file of mode 000 (another user's scan) was "not a readable TIFF (corrupt,
    truncated or another format)", a Zarr store's "write or ingest the image again"."""
    import segpipe.io.readers as readers

    if kind == "tiff":
        path = tmp_path / "scan.tif"
        tifffile.imwrite(path, np.zeros((8, 8), np.uint8))
        denied = path
    else:
        path = tmp_path / "scan.zarr"
        zarr.create_array(path, shape=(8, 8), dtype="uint8", dimension_names=("y", "x"))
        denied = path / "zarr.json"

    def refused(file, *args, **kwargs):  # as the kernel answers a user without read rights
        if Path(file) == denied:
            raise PermissionError(13, "Permission denied", str(file))
        return open(file, *args, **kwargs)

    monkeypatch.setattr(readers, "open", refused, raising=False)
    with pytest.raises(ImageReadError, match=rf"{re.escape(str(denied))}: permission denied"):
        open_image(path)


def test_a_segpipe_result_given_as_an_image_is_named_so(small_slide, random_checkpoint, tmp_path):
    """A result given as SOURCE said its dimension names ('class', 'y', 'x') were not axis
    letters: true, and no help."""
    import segpipe

    result = tmp_path / "r.seg.zarr"
    segpipe.segment(small_slide.image, result, random_checkpoint, scheduler="sync")
    with pytest.raises(ImageReadError, match=r"r\.seg\.zarr: a segpipe result \(a segmentation"):
        open_image(result)
    assert segpipe.open_result(result)["mask"].shape == (300, 300)


@pytest.mark.parametrize("bits", [2, 4])
@pytest.mark.parametrize("photometric", ["minisblack", "miniswhite", "rgb"])
def test_samples_of_fewer_than_8_bits_read_scaled_to_0_255_as_viewers_show_them(
    tmp_path, bits, photometric
):
    """A 4-bit TIFF read 0-15 in uint8: the model saw an image 17 times too dark, and the
    result was 'complete'. Pillow shows it 0-255 (x17; 2 bits x85): so is it read now."""
    rng = np.random.default_rng(bits)
    shape = (37, 41, 3) if photometric == "rgb" else (37, 41)  # odd: packed across bytes
    stored = rng.integers(0, 2**bits, shape, dtype=np.uint8)
    path = tmp_path / f"{photometric}{bits}.tif"
    tifffile.imwrite(path, stored, bitspersample=bits, photometric=photometric)
    white = 2**bits - 1
    shown = white - stored if photometric == "miniswhite" else stored
    want = (shown.astype(int) * 255 // white).astype(np.uint8).reshape(37, 41, -1)
    reader = open_image(path)
    assert reader.dtype == np.uint8
    np.testing.assert_array_equal(reader.read(0, 37, 0, 41), want)
    if photometric != "rgb":  # Pillow opens packed grey, not packed RGB
        np.testing.assert_array_equal(np.asarray(Image.open(path))[..., None], want)
