"""Tests for segpipe.io.ingest: OME-Zarr 0.5 layout, round trip, no clobbering, interruption."""

from __future__ import annotations

import io
import itertools
import json
import os
import shutil
import uuid
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any, cast

import dask
import dask.threaded
import numpy as np
import pytest
import tifffile
import zarr
from dask.callbacks import Callback

import segpipe.io.ingest
from segpipe.geometry.pixels import pyramid_shapes
from segpipe.io.files import URLPath
from segpipe.io.imagestore import INGEST_VERSION
from segpipe.io.ingest import ingest, ingested_image, is_segpipe_image
from segpipe.io.locks import StoreBusyError, store_lock
from segpipe.io.readers import ArrayReader, ImageReadError, open_image
from segpipe.progress import reporting


def _image() -> np.ndarray:
    rng = np.random.default_rng(5)
    return rng.integers(0, 256, (300, 517, 3), dtype=np.uint8)


def _mean2x_reference(a: np.ndarray) -> np.ndarray:
    """2x2 block mean of (C, Y, X) with round-half-up, odd last row/column dropped."""
    y, x = a.shape[1] // 2 * 2, a.shape[2] // 2 * 2
    s = (
        a[:, 0:y:2, 0:x:2].astype(np.int64)
        + a[:, 1:y:2, 0:x:2]
        + a[:, 0:y:2, 1:x:2]
        + a[:, 1:y:2, 1:x:2]
    )
    return ((s + 2) // 4).astype(a.dtype)


def _ome_tiff(path: Path, img: np.ndarray, pixel_size_um: float | None = 0.5) -> Path:
    """A tiled OME-TIFF written with tifffile directly (64 px tiles, not the Zarr chunks)."""
    meta: dict[str, Any] = {"axes": "YXS"}
    if pixel_size_um is not None:
        meta |= {"PhysicalSizeX": pixel_size_um, "PhysicalSizeY": pixel_size_um}
    tifffile.imwrite(path, img, tile=(64, 64), photometric="rgb", metadata=meta, ome=True)
    return path


def _unlocked(paths: Iterator[Path]) -> list[Path]:
    """``paths`` sorted, without the lock files an ingest leaves beside its output (never
    deleted: segpipe.io.locks), even one it then refuses."""
    return sorted(p for p in paths if not (p.name.startswith(".") and p.name.endswith(".lock")))


def _files(root: Path) -> dict[str, bytes | None]:
    """Everything under ``root``, lock files included, by relative path: a file's bytes, or
    None for a folder or a link."""
    return {
        str(p.relative_to(root)): p.read_bytes() if p.is_file() and not p.is_symlink() else None
        for p in root.rglob("*")
    }


def _attrs(path: Path | URLPath) -> dict[str, Any]:
    return json.loads(path.joinpath("zarr.json").read_text())["attributes"]


@pytest.mark.parametrize(
    ("chunk", "message"),
    [(1, "chunk must be an integer >= 2"), ("512", "integer >= 2"), (20000, "1.1 GiB")],
)
def test_a_chunk_no_store_can_hold_is_refused_before_anything_is_written(
    tmp_path: Path, chunk: int, message: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """--chunk 70000 on a 512 px slide grew to 22 GB before the OOM killer ended it."""
    source = _ome_tiff(tmp_path / "in.ome.tif", _image())
    # A chunk let through fails here at once, not after copying 155k chunks or 1.1 GiB ones.
    monkeypatch.setattr(segpipe.io.ingest, "_copy", _never_copied)
    with pytest.raises(ValueError, match=message):
        ingest(source, tmp_path / "out.ome.zarr", chunk=chunk)
    assert not (tmp_path / "out.ome.zarr").exists()


def _never_copied(*args: object, **kwargs: object) -> None:
    raise AssertionError("a chunk the size check should refuse was let through to the copy")


def test_the_chunk_bound_counts_bytes_so_a_16_bit_chunk_over_1_gib_is_refused(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """30,000² px of one uint16 band: 0.84 Gi samples, but 1.7 GiB a chunk."""
    source = tmp_path / "grey16.tif"
    tifffile.imwrite(source, _image()[..., 0].astype(np.uint16) * 257, tile=(64, 64))
    monkeypatch.setattr(segpipe.io.ingest, "_copy", _never_copied)
    with pytest.raises(ValueError, match=r"1\.7 GiB \(1 channels x 30000² px uint16\)"):
        ingest(source, tmp_path / "out.zarr", chunk=30000)
    assert not (tmp_path / "out.zarr").exists()


def test_a_chunk_of_exactly_1_gib_is_taken_and_one_px_more_a_side_is_refused(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    source = tmp_path / "grey8.tif"
    tifffile.imwrite(source, _image()[..., 0], tile=(64, 64))  # one uint8 band: 1 B a pixel
    copied: list[int] = []

    def recorded(reader: Any, out: Any, px: Any, sample: str, *, chunk: int, **_: int) -> None:
        copied.append(chunk)  # the size check passed; no 1 GiB chunk is written here

    monkeypatch.setattr(segpipe.io.ingest, "_copy", recorded)
    ingest(source, tmp_path / "a.zarr", chunk=2**15)  # 32768² x 1 B = 2**30 B exactly
    assert copied == [2**15]
    with pytest.raises(ValueError, match="GiB"):
        ingest(source, tmp_path / "b.zarr", chunk=2**15 + 1)
    assert copied == [2**15]


def test_a_chunk_too_large_is_refused_before_overwrite_deletes_the_previous_ingest(
    tmp_path: Path,
) -> None:
    source = _ome_tiff(tmp_path / "in.ome.tif", _image())
    out = ingest(source, tmp_path / "out.zarr", chunk=128, min_level_size=64)
    before = _files(out)
    with pytest.raises(ValueError, match=r"1\.1 GiB"):
        ingest(source, out, chunk=20000, overwrite=True)
    assert _files(out) == before
    assert open_image(out).shape == (300, 517, 3)  # still a complete ingest


def test_an_overwrite_from_a_source_that_cannot_be_read_keeps_the_previous_ingest(
    tmp_path: Path,
) -> None:
    """The store was deleted first, then the first read of the new source's pixels failed:
    neither copy was left. A tile under the pixel sample overwritten with 0xff bytes."""
    image = _image()
    good, bad = tmp_path / "good.tif", tmp_path / "bad.tif"
    for path in (good, bad):
        tifffile.imwrite(path, image, photometric="rgb", tile=(64, 64), compression="zlib")
    with tifffile.TiffFile(bad) as tif:
        offset, count = tif.pages[0].dataoffsets[0], tif.pages[0].databytecounts[0]
    data = bytearray(bad.read_bytes())
    data[offset : offset + count] = b"\xff" * count
    bad.write_bytes(bytes(data))
    out = ingest(good, tmp_path / "out.zarr", chunk=128, min_level_size=64)
    before = _files(out)
    with pytest.raises(ImageReadError, match=r"bad\.tif: cannot read level 0"):
        ingest(bad, out, chunk=128, min_level_size=64, overwrite=True)
    assert _files(out) == before
    np.testing.assert_array_equal(open_image(out).level(0)[:], image)


def test_a_numpy_integer_chunk_ingests_as_the_int(tmp_path: Path) -> None:
    """np.int64(128) passed the check, then zarr failed on it ('not JSON serializable'),
    leaving an empty store folder that later ingests refused."""
    source = _ome_tiff(tmp_path / "in.ome.tif", _image())
    got = ingest(source, tmp_path / "np.zarr", chunk=np.int64(128), min_level_size=64)
    want = ingest(source, tmp_path / "int.zarr", chunk=128, min_level_size=64)
    assert _attrs(got) == _attrs(want)
    a, b = zarr.open_group(str(got), mode="r"), zarr.open_group(str(want), mode="r")
    for k in ("0", "1", "2"):
        assert cast(zarr.Array, a[k]).chunks == cast(zarr.Array, b[k]).chunks == (3, 128, 128)
        np.testing.assert_array_equal(a[k][...], b[k][...])


@pytest.mark.parametrize("chunk", [128, 100])
def test_round_trip_layout_and_pixels(tmp_path: Path, chunk: int) -> None:
    img = _image()
    out = ingest(
        _ome_tiff(tmp_path / "in.ome.tif", img),
        tmp_path / "out.ome.zarr",
        chunk=chunk,
        min_level_size=64,
    )
    assert out == tmp_path / "out.ome.zarr"

    attrs = _attrs(out)
    assert attrs["segpipe"]["kind"] == "image"
    assert attrs["segpipe"]["complete"] is True
    ome = attrs["ome"]
    assert ome["version"] == "0.5"
    (ms,) = ome["multiscales"]
    assert ms["axes"] == [
        {"name": "c", "type": "channel"},
        {"name": "y", "type": "space", "unit": "micrometer"},
        {"name": "x", "type": "space", "unit": "micrometer"},
    ]
    assert [d["path"] for d in ms["datasets"]] == ["0", "1", "2"]
    # Level k's pixel centres sit in the middle of the 2**k level-0 pixels they average: the
    # same half-pixel translation a result's levels carry (one OME multiscales writer).
    assert [d["coordinateTransformations"] for d in ms["datasets"]] == [
        [{"type": "scale", "scale": [1.0, 0.5 * 2**k, 0.5 * 2**k]}]
        + (
            [{"type": "translation", "translation": [0.0, 0.25 * (2**k - 1), 0.25 * (2**k - 1)]}]
            if k
            else []
        )
        for k in range(3)
    ]

    expected = [img.transpose(2, 0, 1)]
    expected += [_mean2x_reference(expected[-1])]
    expected += [_mean2x_reference(expected[-1])]
    root = zarr.open_group(str(out), mode="r")
    assert root.metadata.zarr_format == 3
    for k, want in enumerate(expected):
        arr = root[str(k)]
        assert arr.metadata.dimension_names == ("c", "y", "x")
        assert arr.chunks == (3, chunk, chunk)
        assert arr.dtype == np.uint8
        assert [c.to_dict()["name"] for c in arr.metadata.codecs] == ["bytes", "zstd"]
        np.testing.assert_array_equal(arr[:], want)

    reader = open_image(out)
    assert reader.pixel_size_um == pytest.approx(0.5)
    assert reader.level_shapes == ((300, 517, 3), (150, 258, 3), (75, 129, 3))
    np.testing.assert_array_equal(reader.level(0).compute(), img)
    np.testing.assert_array_equal(
        reader.read(40, 75, 100, 129, level=2), expected[2].transpose(1, 2, 0)[40:75, 100:129]
    )


def test_unknown_pixel_size_has_no_unit(tmp_path: Path) -> None:
    src = _ome_tiff(tmp_path / "in.ome.tif", _image(), pixel_size_um=None)
    assert open_image(src).pixel_size_um is None
    out = ingest(src, tmp_path / "out.zarr", min_level_size=64)
    (ms,) = _attrs(out)["ome"]["multiscales"]
    assert all("unit" not in axis for axis in ms["axes"])
    assert ms["datasets"][1]["coordinateTransformations"][0]["scale"] == [1.0, 2.0, 2.0]
    assert open_image(out).pixel_size_um is None


def test_an_origin_in_microns_is_dropped_when_the_pixel_size_is_unknown(tmp_path: Path) -> None:
    """Without a pixel size the levels are in level-0 pixels: a reader's ``origin_um`` is not
    written as a translation in pixels (no built-in reader has one without a pixel size; a
    Reader passed in may)."""
    reader = ArrayReader(_image())
    reader.origin_um = (100.0, 200.0)
    out = ingest(reader, tmp_path / "out.zarr", chunk=128, min_level_size=64)
    (ms,) = _attrs(out)["ome"]["multiscales"]
    assert ms["datasets"][0]["coordinateTransformations"] == [
        {"type": "scale", "scale": [1.0, 1.0, 1.0]}
    ]
    copy = open_image(out)
    assert (copy.pixel_size_um, copy.origin_um) == (None, (0.0, 0.0))


@pytest.mark.parametrize("as_reader", [False, True], ids=["path", "reader"])
def test_pixel_size_override(tmp_path: Path, as_reader: bool) -> None:
    src = _ome_tiff(tmp_path / "in.ome.tif", _image(), pixel_size_um=0.5)
    source = open_image(src) if as_reader else src
    out = ingest(source, tmp_path / "out.zarr", pixel_size_um=0.25, min_level_size=512)
    assert open_image(out).pixel_size_um == pytest.approx(0.25)
    assert open_image(out).level_shapes == ((300, 517, 3),)


def test_refuses_to_clobber(tmp_path: Path) -> None:
    src = _ome_tiff(tmp_path / "in.ome.tif", _image())
    out = ingest(src, tmp_path / "out.zarr")
    with pytest.raises(FileExistsError, match="overwrite=True") as info:
        ingest(src, out)
    assert str(out) in str(info.value)
    # a previous ingest may be replaced
    ingest(src, out, overwrite=True, pixel_size_um=2.0)
    assert open_image(out).pixel_size_um == 2.0


@pytest.mark.parametrize("kind", ["directory", "other-zarr", "file"])
def test_overwrite_never_deletes_unrelated_paths(tmp_path: Path, kind: str) -> None:
    src = _ome_tiff(tmp_path / "in.ome.tif", _image())
    victim = tmp_path / "precious"
    if kind == "directory":
        victim.mkdir()
        (victim / "thesis.txt").write_text("years of work")
    elif kind == "other-zarr":
        zarr.create_group(str(victim), attributes={"segpipe": {"kind": "result"}})
    else:
        victim.write_text("not a directory")
    before = _unlocked(tmp_path.rglob("*"))
    with pytest.raises(FileExistsError, match="not a segpipe image ingest") as info:
        ingest(src, victim, overwrite=True)
    assert str(victim) in str(info.value)
    assert _unlocked(tmp_path.rglob("*")) == before


def test_refuses_to_write_over_its_source(tmp_path: Path) -> None:
    out = ingest(_ome_tiff(tmp_path / "in.ome.tif", _image()), tmp_path / "a.zarr")
    with pytest.raises(ValueError, match="overlaps its source"):
        ingest(out, out, overwrite=True)


@pytest.mark.parametrize(
    ("source", "output", "via"),
    [
        ("x.zarr/0", "x.zarr", ingest),
        ("link.zarr/0", "x.zarr", ingest),
        ("x.zarr", "x.zarr/copy.zarr", ingest),
        ("x.zarr", "link.zarr/copy.zarr", ingest),
        ("x.zarr/0", "x.zarr", ingested_image),
    ],
)
def test_an_output_inside_its_source_or_holding_it_is_refused_before_anything_changes(
    tmp_path: Path, source: str, output: str, via: Any
) -> None:
    """Re-chunking an ingest from its own level 0 (``x.zarr/0`` into ``x.zarr``) cleared the
    output, and the source with it, before a pixel was read: both were lost. An output that
    holds its source or lies in it, through a link too, is refused naming both, before
    anything is deleted or created."""
    ingest(_ome_tiff(tmp_path / "in.ome.tif", _image()), tmp_path / "x.zarr", chunk=128)
    (tmp_path / "link.zarr").symlink_to(tmp_path / "x.zarr", target_is_directory=True)
    before = _files(tmp_path)
    options = {"overwrite": True} if via is ingest else {}
    with pytest.raises(ValueError, match="overlaps its source") as info:
        via(tmp_path / source, tmp_path / output, chunk=256, **options)
    assert f"output {tmp_path / output} overlaps its source {tmp_path / source};" in str(info.value)
    assert _files(tmp_path) == before


def test_a_url_output_inside_its_source_or_holding_it_is_refused(
    tmp_path: Path, memory_url: str
) -> None:
    import fsspec

    fs = fsspec.filesystem("memory")
    store = f"{memory_url}/x.zarr"
    ingest(_ome_tiff(tmp_path / "in.ome.tif", _image()), store, chunk=128)
    before = {path: fs.cat_file(path) for path in fs.find(memory_url)}
    for source, output in [(f"{store}/0", store), (store, f"{store}/copy.zarr/")]:
        with pytest.raises(ValueError, match="overlaps its source") as info:
            ingest(source, output, chunk=256, overwrite=True)
        assert source in str(info.value) and output.rstrip("/") in str(info.value)
    assert {path: fs.cat_file(path) for path in fs.find(memory_url)} == before


@pytest.mark.parametrize("opened", [False, True])
def test_an_ingested_image_replaced_meanwhile_is_not_copied(tmp_path: Path, opened: bool) -> None:
    """Copying an ingested image took no lock on it: a re-ingest replacing it meanwhile went
    on, and the copy was marked complete with zeros where its chunks had gone. The copy holds
    its source's lock shared, as a segmentation does: a run writing the source stops it at
    once, before it makes anything."""
    src = ingest(_ome_tiff(tmp_path / "in.ome.tif", _image()), tmp_path / "src.zarr", chunk=128)
    source = open_image(src) if opened else src
    out = tmp_path / "out.zarr"
    with store_lock(src), pytest.raises(StoreBusyError, match="writing it") as info:
        ingest(source, out)
    assert f"{src} is in use by another segpipe run" in str(info.value)
    assert not out.exists()
    if opened:
        cast(Any, source).close()


def test_an_ingested_image_being_copied_is_not_replaced(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """While an ingest copies an ingested image, a re-ingest into that image (``--overwrite``)
    stops at once naming the reader, and the copy is the source's pixels."""
    tif = _ome_tiff(tmp_path / "in.ome.tif", _image())
    src, out = ingest(tif, tmp_path / "src.zarr", chunk=128), tmp_path / "out.zarr"
    before, copy, refused = _files(src), segpipe.io.ingest._copy, []

    def replaced_meanwhile(reader: Any, to: Path, *args: Any, **kwargs: Any) -> None:
        if to == out:  # the copy has begun: another run (here, its own lock) replaces src
            with pytest.raises(StoreBusyError, match="reading it") as info:
                ingest(tif, src, chunk=64, overwrite=True)
            refused.append(info.value)
        copy(reader, to, *args, **kwargs)

    monkeypatch.setattr(segpipe.io.ingest, "_copy", replaced_meanwhile)
    ingest(src, out, chunk=128)
    assert len(refused) == 1 and f"{src} is in use" in str(refused[0])
    assert _files(src) == before
    np.testing.assert_array_equal(open_image(out).read(0, 300, 0, 517), _image())


def test_interrupted_ingest_is_marked_incomplete(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    src = _ome_tiff(tmp_path / "in.ome.tif", _image())
    out = tmp_path / "out.zarr"

    def crash(*args: object, **kwargs: object) -> None:
        raise RuntimeError("worker lost while writing level 1")

    with monkeypatch.context() as m:
        m.setattr(segpipe.io.ingest, "downsample_mean_2x", crash)
        with pytest.raises(RuntimeError, match="level 1"):
            ingest(src, out, min_level_size=64)

    segpipe_attrs = _attrs(out)["segpipe"]
    assert (segpipe_attrs["kind"], segpipe_attrs["complete"]) == ("image", False)
    assert is_segpipe_image(out)
    # level 0 is there, but nobody should take it for a finished image
    np.testing.assert_array_equal(
        zarr.open_array(str(out / "0"), mode="r")[:], _image().transpose(2, 0, 1)
    )
    with pytest.raises(ImageReadError, match="never finished"):
        open_image(out)
    ingest(src, out, min_level_size=64)  # an unfinished ingest is redone without overwrite
    assert _attrs(out)["segpipe"]["complete"] is True


def test_grey_uint16_source(tmp_path: Path) -> None:
    grey = _image()[..., 0].astype(np.uint16) * 257
    src = tmp_path / "grey.tif"
    tifffile.imwrite(src, grey, tile=(64, 64))
    out = ingest(src, tmp_path / "grey.zarr", chunk=64, min_level_size=100)
    root = zarr.open_group(str(out), mode="r")
    assert root["0"].shape == (1, 300, 517)
    assert root["0"].dtype == np.uint16
    np.testing.assert_array_equal(root["1"][:], _mean2x_reference(grey[None]))


def test_progress_bar(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    ingest(_ome_tiff(tmp_path / "in.ome.tif", _image()), tmp_path / "p.zarr", progress=True)
    assert "100%" in capsys.readouterr().err  # segpipe.progress lines on stderr, not Dask's bar


def _client_get(dsk: Any, keys: Any, **kwargs: Any) -> Any:
    """Stands in for ``distributed.Client.get``: runs the graph on Dask's threads, and no
    local callback reaches it."""
    assert "callbacks" not in kwargs, "local callbacks given to a distributed scheduler"
    return dask.threaded.get(dsk, keys, **kwargs)


_client_get.__module__ = "distributed.client"  # what _ChunkCounter tells a client by


def test_on_a_distributed_scheduler_each_level_counts_whole_once_stored(tmp_path: Path) -> None:
    """A client runs no local Dask callbacks, so no chunk is counted as its tasks finish;
    the stage still ends at its total."""
    source = _ome_tiff(tmp_path / "in.ome.tif", _image())
    events: list[Any] = []
    with dask.config.set(scheduler=_client_get), reporting(events.append):
        ingest(source, tmp_path / "out.zarr", chunk=128, min_level_size=64)
    per_level = [-(-y // 128) * -(-x // 128) for y, x in pyramid_shapes((300, 517), 64)]
    assert per_level == [15, 6, 2]
    assert (events[0].kind, events[0].total) == ("start", sum(per_level))
    assert [e.done for e in events if e.kind == "advance"] == [15, 21, 23]
    assert (events[-1].kind, events[-1].done, events[-1].ok) == ("end", 23, True)


def test_every_ingest_progress_event_moves_the_count_on(tmp_path: Path) -> None:
    """Dask runs many tasks a chunk: a listener (a progress artifact) is not sent one event
    per task with nothing new."""
    source = _ome_tiff(tmp_path / "in.ome.tif", _image())
    events: list[Any] = []
    with reporting(events.append):
        ingest(source, tmp_path / "out.zarr", chunk=128, min_level_size=64)
    dones = [e.done for e in events if e.kind == "advance"]
    assert dones and all(a < b for a, b in itertools.pairwise(dones)), dones
    assert dones[-1] == events[0].total == 15 + 6 + 2


class _StoredChunks(Callback):
    def __init__(self) -> None:
        super().__init__()
        self.stored = 0

    def _posttask(self, key: Any, result: Any, dsk: Any, state: Any, worker_id: Any) -> None:
        name = key[0] if isinstance(key, tuple) else key
        self.stored += str(name).startswith("store-map")


def test_a_users_own_active_dask_callback_still_sees_the_ingest(tmp_path: Path) -> None:
    """Callbacks given to one computation replace the active ones: ingest passes a user's
    (``with ProgressBar():``) along with its chunk counter."""
    source = _ome_tiff(tmp_path / "in.ome.tif", _image())
    with _StoredChunks() as seen:
        ingest(source, tmp_path / "out.zarr", chunk=128, min_level_size=64)
    assert seen.stored >= 15 + 6 + 2  # a store task for each chunk of levels 0, 1 and 2


def test_ingested_image_passes_the_strict_ome_validator(tmp_path: Path) -> None:
    from ome_zarr_models import open_ome_zarr
    from ome_zarr_models.v05.image import Image

    src = _ome_tiff(tmp_path / "in.ome.tif", _image())
    out = ingest(src, tmp_path / "out.ome.zarr", chunk=64, min_level_size=64)
    image = open_ome_zarr(zarr.open_group(str(out), mode="r"))
    assert isinstance(image, Image)
    assert len(image.ome_attributes.multiscales[0].datasets) == 3


@pytest.mark.parametrize("dtype", ["q", "Q"])
def test_64_bit_integer_tiffs_ingest_with_exact_levels(tmp_path: Path, dtype: str) -> None:
    # tifffile gives 64-bit integers as C's long long ("q"), which zarr has no type for.
    info = np.iinfo(dtype)
    rng = np.random.default_rng(4)
    data = rng.integers(info.max // 2, info.max, (40, 60), dtype=np.dtype(dtype).str)
    data[:2, :2] = info.max  # a sum of four overflows 64 bits
    tifffile.imwrite(tmp_path / "labels.tif", data.astype(dtype), tile=(16, 16))
    assert tifffile.imread(tmp_path / "labels.tif").dtype.char == dtype

    out = ingest(tmp_path / "labels.tif", tmp_path / "labels.zarr", chunk=16, min_level_size=8)
    group = zarr.open_group(str(out), mode="r")
    level0, level1 = group["0"][0], group["1"][0]
    assert level0.dtype == np.dtype(dtype).str
    np.testing.assert_array_equal(level0, data)
    blocks = data.reshape(20, 2, 30, 2).transpose(0, 2, 1, 3).reshape(20, 30, 4)
    expected = [[(sum(map(int, four)) + 2) // 4 for four in row] for row in blocks]
    assert [[int(v) for v in row] for row in level1] == expected


def test_a_64_bit_footprints_edge_averages_its_valid_pixels_exactly() -> None:
    big = np.iinfo(np.int64).max
    block = np.array([[[big, big, -1, 5], [big, -1, -1, 7]]], dtype=np.int64)
    out = segpipe.io.ingest._valid_mean_2x(block, (-1.0,))
    assert out.dtype == np.int64
    assert out.tolist() == [[[big, 6]]]  # three valid values of 2**63 - 1; (5 + 7) / 2


def test_valid_pixels_whose_mean_rounds_to_nodata_stay_valid(tmp_path: Path) -> None:
    """Three dark valid pixels of an RGB nodata=0 raster (1,0,0), (0,1,0), (0,0,1) averaged
    to (0,0,0): level 1 read them as nodata, and a run at level 1 left them out."""
    rasterio = pytest.importorskip("rasterio")
    data = np.zeros((3, 64, 64), np.uint8)
    data[:, 10, 10], data[:, 10, 11], data[:, 11, 10] = (1, 0, 0), (0, 1, 0), (0, 0, 1)
    profile = {"driver": "GTiff", "width": 64, "height": 64, "count": 3, "dtype": "uint8"}
    transform = rasterio.Affine(10, 0, 5e5, 0, -10, 5e6)
    with rasterio.open(
        tmp_path / "dark.tif", "w", nodata=0, crs="EPSG:32633", transform=transform, **profile
    ) as ds:
        ds.write(data)
    out = ingest(tmp_path / "dark.tif", tmp_path / "dark.zarr", chunk=32, min_level_size=16)
    reader = open_image(out)
    assert reader.read(5, 6, 5, 6, 1).ravel().tolist() == [1, 0, 0]
    valid = reader.valid_mask(0, 32, 0, 32, level=1)
    assert valid.sum() == 1 and valid[5, 5]


@pytest.mark.parametrize(
    ("dtype", "nodata"),
    [("int16", -9999.0), ("float32", np.nan), ("float32", -np.inf)],  # -inf: written as text
)
def test_reduced_levels_average_only_valid_pixels(
    tmp_path: Path, dtype: str, nodata: float
) -> None:
    """The footprint's edge: a level-1 pixel is nodata (no valid pixel below it) or the mean
    of the valid pixels below it, never a mix of data and nodata that reads as valid."""
    rasterio = pytest.importorskip("rasterio")
    rng = np.random.default_rng(3)
    data = rng.integers(1000, 3001, (2, 70, 90)).astype(dtype)
    yy, xx = np.mgrid[:70, :90]
    outside = (yy > 40) | (xx + yy > 100)  # odd last row, and a diagonal: 1 to 4 valid of 4
    data[:, outside] = nodata
    src = tmp_path / "dem.tif"
    profile = {"driver": "GTiff", "width": 90, "height": 70, "count": 2, "dtype": dtype}
    with rasterio.open(
        src,
        "w",
        nodata=nodata,
        transform=rasterio.Affine(2, 0, 4e5, 0, -2, 5e6),
        crs="EPSG:32632",
        **profile,
    ) as ds:
        ds.write(data)

    out = ingest(src, tmp_path / "dem.zarr", chunk=33, min_level_size=16)
    level1 = zarr.open_group(str(out), mode="r")["1"][:]

    blocks = data.reshape(2, 35, 2, 45, 2).astype(np.float64)
    valid = ~outside.reshape(35, 2, 45, 2)
    count = valid.sum(axis=(1, 3))
    mean = np.where(valid, blocks, 0).sum(axis=(2, 4)) / np.maximum(count, 1)
    expected = np.floor(mean + 0.5) if dtype == "int16" else mean
    expected = np.where(count > 0, expected, nodata).astype(dtype)
    assert ((count > 0) & (count < 4)).any() and (count == 0).any()  # mixed and empty blocks
    np.testing.assert_array_equal(level1, expected)

    is_nodata = np.isnan(level1) if np.isnan(nodata) else level1 == nodata
    in_range = (level1 >= 1000) & (level1 <= 3000)
    assert (is_nodata.all(axis=0) | in_range.all(axis=0)).all()
    # a block of rows 40 (valid) and 41 (nodata): the mean of its two valid pixels
    np.testing.assert_allclose(
        level1[:, 20, 0], data[:, 40, 0:2].astype(float).mean(axis=1), atol=0.5
    )
    np.testing.assert_array_equal(open_image(out).valid_mask(0, 35, 0, 45, level=1), count > 0)
    # The metadata is strict JSON (no bare NaN, which other tools refuse), read back as NaN.
    text = (out / "zarr.json").read_text()
    json.loads(text, parse_constant=lambda c: pytest.fail(f"{c} in zarr.json"))
    assert np.array_equal(open_image(out).nodata, (nodata, nodata), equal_nan=True)


def _geotiff(path: Path, data: np.ndarray, valid: np.ndarray, mask_band: bool) -> Path:
    """A GeoTIFF of ``data`` (C, Y, X) uint8 and ``valid`` as its internal mask band, or as
    an alpha band (0 / 255) after ``data``'s RGB."""
    rasterio = pytest.importorskip("rasterio")
    alpha = valid.astype(np.uint8) * 255
    bands = data if mask_band else np.concatenate([data, alpha[None]])
    profile: dict[str, Any] = {"width": data.shape[2], "height": data.shape[1], "tiled": True}
    if not mask_band:
        profile |= {"photometric": "RGB", "alpha": "YES"}
    with (
        rasterio.Env(GDAL_TIFF_INTERNAL_MASK=True),
        rasterio.open(
            path, "w", driver="GTiff", count=len(bands), dtype="uint8", crs="EPSG:32633",
            transform=rasterio.Affine(2, 0, 5e5, 0, -2, 5e6), **profile,
        ) as ds,
    ):  # fmt: skip
        ds.write(bands)
        if mask_band:
            ds.write_mask(alpha)
    return path


def _rgba_png(path: Path, data: np.ndarray, valid: np.ndarray) -> Path:
    from PIL import Image

    alpha = valid.astype(np.uint8) * 255
    Image.fromarray(np.dstack([data.transpose(1, 2, 0), alpha])).save(path)
    return path


@pytest.mark.parametrize(
    ("write", "kind"),
    [
        pytest.param(lambda t, d, v: _geotiff(t / "m.tif", d, v, True), "mask", id="mask-band"),
        pytest.param(lambda t, d, v: _geotiff(t / "a.tif", d, v, False), "alpha", id="geo-alpha"),
        pytest.param(lambda t, d, v: _rgba_png(t / "a.png", d, v), "alpha", id="png-alpha"),
    ],
)
def test_a_mask_band_or_alpha_is_carried_and_reduced_levels_follow_it(
    tmp_path: Path, write: Any, kind: str
) -> None:
    """The OME-Zarr copy says which pixels hold data as its source does, with the source's own
    bands (a mask band apart from them), and a level-1 pixel is valid where any of its 2x2
    is, each band the mean of those (0 where none is)."""
    from ome_zarr_models import open_ome_zarr

    data = np.random.default_rng(4).integers(0, 256, (3, 70, 90), dtype=np.uint8)
    yy, xx = np.mgrid[:70, :90]
    valid = ~((yy < 30) & (xx < 41) | (xx + yy > 120))  # an odd edge: 1 to 4 valid of 4
    source = open_image(write(tmp_path, data, valid))
    assert source.mask_kind == kind
    np.testing.assert_array_equal(source.valid_mask(0, 70, 0, 90), valid)
    bands = data if kind == "mask" else np.concatenate([data, valid[None] * np.uint8(255)])

    out = ingest(source, tmp_path / "m.zarr", chunk=32, min_level_size=16)
    store = open_image(out)
    assert store.shape == (70, 90, len(bands)) and store.mask_kind == kind
    np.testing.assert_array_equal(store.read(0, 70, 0, 90), bands.transpose(1, 2, 0))
    np.testing.assert_array_equal(store.valid_mask(0, 70, 0, 90), valid)
    np.testing.assert_array_equal(store.valid_mask(10, 50, 20, 77), valid[10:50, 20:77])

    blocks = valid.reshape(35, 2, 45, 2)
    count = blocks.sum(axis=(1, 3))
    total = np.where(blocks, bands.reshape(-1, 35, 2, 45, 2), 0).sum(axis=(2, 4))
    mean = np.where(count > 0, np.floor(total / np.maximum(count, 1) + 0.5), 0).astype(np.uint8)
    assert ((count > 0) & (count < 4)).any() and (count == 0).any()  # mixed and empty blocks
    np.testing.assert_array_equal(store.valid_mask(0, 35, 0, 45, level=1), count > 0)
    np.testing.assert_array_equal(store.read(0, 35, 0, 45, level=1), mean.transpose(1, 2, 0))
    if kind == "mask":  # the image and its label image pass the strict OME validator
        for group in (out, out / "labels" / "valid"):
            open_ome_zarr(zarr.open_group(str(group), mode="r"))


def test_the_validity_masks_levels_are_the_max_of_2x2_and_its_metadata_says_so(
    tmp_path: Path,
) -> None:
    """labels/valid: a reduced pixel is valid where any of its 2x2 is (their max), and its
    OME type says "max"; it said the labels' usual "mode" (the majority), which a viewer or
    a tool rebuilding the levels from it would follow."""
    data = np.random.default_rng(6).integers(0, 256, (1, 40, 52), dtype=np.uint8)
    yy, xx = np.mgrid[:40, :52]
    valid = (xx + yy > 30) | ((yy % 4 == 0) & (xx % 4 == 0))  # blocks of 1 valid pixel of 4
    out = ingest(_geotiff(tmp_path / "m.tif", data, valid, True), tmp_path / "m.zarr",
                 chunk=16, min_level_size=8)  # fmt: skip
    group = zarr.open_group(str(out / "labels" / "valid"), mode="r")
    (multiscale,) = group.attrs["ome"]["multiscales"]
    assert multiscale["type"] == "max"
    assert multiscale["metadata"]["description"].startswith("max of 2x2 blocks")
    expected = valid.astype(np.uint8)
    levels = [d["path"] for d in multiscale["datasets"]]
    assert len(levels) == 3  # 40 x 52, 20 x 26, 10 x 13
    for path in levels:
        np.testing.assert_array_equal(group[path][:], expected)
        ny, nx = expected.shape
        blocks = expected[: ny // 2 * 2, : nx // 2 * 2].reshape(ny // 2, 2, nx // 2, 2)
        expected = blocks.max(axis=(1, 3))


def test_a_band_merely_described_alpha_is_averaged_as_any_other(tmp_path: Path) -> None:
    """A GeoTIFF band whose description is "alpha" but which GDAL does not take as alpha
    holds data: the reduced levels are the plain 2x mean, not zeroed where that band is 0."""
    rasterio = pytest.importorskip("rasterio")
    data = np.random.default_rng(7).integers(1, 255, (2, 64, 64), dtype=np.uint8)
    data[1, ::3, ::2] = 0  # the band described "alpha" is 0 here and there
    src = tmp_path / "described.tif"
    with rasterio.open(
        src, "w", driver="GTiff", width=64, height=64, count=2, dtype="uint8",
        crs="EPSG:32633", transform=rasterio.Affine(2, 0, 5e5, 0, -2, 5e6),
    ) as ds:  # fmt: skip
        ds.write(data)
        ds.set_band_description(2, "alpha")
    source = open_image(src)
    assert source.channel_names == ("band 1", "alpha") and source.mask_kind is None
    out = ingest(src, tmp_path / "described.zarr", chunk=16, min_level_size=16)
    root = zarr.open_group(str(out), mode="r")
    np.testing.assert_array_equal(root["0"][:], data)
    np.testing.assert_array_equal(root["1"][:], _mean2x_reference(data))
    np.testing.assert_array_equal(root["2"][:], _mean2x_reference(_mean2x_reference(data)))
    # Its copy holds data in that band too: read by the names, its 0s were no data (704 px).
    copy = open_image(out)
    assert copy.mask_kind is None and copy.valid_mask(0, 64, 0, 64) is None
    # A copy made before this was recorded is made again, not read with those holes.
    attrs = json.loads((out / "zarr.json").read_text())
    del attrs["attributes"]["segpipe"]["mask_kind"]
    (out / "zarr.json").write_text(json.dumps(attrs))
    assert open_image(out).mask_kind == "alpha", "the stale copy, as it read"
    assert open_image(ingested_image(src, out, chunk=16)).mask_kind is None


def test_nodata_of_some_bands_only_reduces_levels_by_the_plain_mean(tmp_path: Path) -> None:
    """A band without nodata makes every pixel valid (as GDAL reads it): a block whose mean
    rounds to the other band's nodata keeps that mean, bit for bit the plain 2x mean."""
    data = np.random.default_rng(8).integers(0, 3, (2, 64, 64), dtype=np.uint8)
    src = tmp_path / "partial.ome.zarr"
    space = {"type": "space", "unit": "micrometer"}
    ms = {
        "axes": [{"name": "c", "type": "channel"}, {"name": "y", **space}, {"name": "x", **space}],
        "datasets": [
            {"path": "0", "coordinateTransformations": [{"type": "scale", "scale": [1, 0.5, 0.5]}]}
        ],
    }
    root = zarr.open_group(str(src), mode="w", zarr_format=3)
    root.create_array("0", data=data, chunks=(2, 32, 32), dimension_names="cyx")
    root.update_attributes({"ome": {"version": "0.5", "multiscales": [ms]},
                            "segpipe": {"nodata": [0.0, None]}})  # fmt: skip
    assert open_image(src).nodata == (0.0, None)
    out = ingest(src, tmp_path / "copy.zarr", chunk=16, min_level_size=16)
    copy = zarr.open_group(str(out), mode="r")
    level1 = _mean2x_reference(data)
    assert (level1 == 0).all(axis=0).any(), "blocks whose mean is the nodata in both bands"
    np.testing.assert_array_equal(copy["1"][:], level1)
    np.testing.assert_array_equal(copy["2"][:], _mean2x_reference(level1))
    assert open_image(out).nodata == (0.0, None)


def test_an_ingest_is_reused_only_for_the_same_pixels_by_this_version(tmp_path: Path) -> None:
    """A complete ingest of the same path is reused; one of another image saved at that path,
    or one an older ingest version wrote (no mask label image, unnamed alpha...), is redone."""
    from segpipe.io.ingest import INGEST_VERSION

    img = _image()
    src, store = _ome_tiff(tmp_path / "in.ome.tif", img), tmp_path / "in.image.zarr"
    out = ingested_image(src, store)
    stamp = (out / "zarr.json").stat().st_mtime_ns
    assert ingested_image(src, store) == out
    assert (out / "zarr.json").stat().st_mtime_ns == stamp, "reused, not written again"

    group = zarr.open_group(out, mode="r+")
    attrs = dict(group.attrs["segpipe"])
    assert attrs["version"] == INGEST_VERSION
    group.attrs["segpipe"] = {k: v for k, v in attrs.items() if k != "version"}  # older
    ingested_image(src, store)
    assert zarr.open_group(out, mode="r").attrs["segpipe"]["version"] == INGEST_VERSION

    other = img.copy()
    other[: img.shape[0] // 2] = 255 - other[: img.shape[0] // 2]
    _ome_tiff(src, other)  # another image at the same path, same shape
    np.testing.assert_array_equal(
        open_image(ingested_image(src, store)).read(0, 4, 0, 4), other[:4, :4]
    )


def test_a_source_edited_in_place_outside_the_sampled_pixels_is_ingested_again(
    tmp_path: Path,
) -> None:
    """Rows painted over away from the pixel sample's regions, saved under the same name:
    the stale copy was reused (and segmented). The file's size and mtime now tell; an
    ingest made before they were recorded is still reused by its sample alone."""
    rng = np.random.default_rng(12)
    img = rng.integers(0, 255, (1024, 1024, 3), dtype=np.uint8)
    src, store = tmp_path / "in.tif", tmp_path / "in.image.zarr"
    tifffile.imwrite(src, img, tile=(256, 256), photometric="rgb")
    out = ingested_image(src, store)
    edited = img.copy()
    edited[:100] = 255  # e.g. a label area painted white
    tifffile.imwrite(src, edited, tile=(256, 256), photometric="rgb")
    np.testing.assert_array_equal(
        open_image(ingested_image(src, store)).read(0, 100, 0, 1024), edited[:100]
    )

    group = zarr.open_group(out, mode="r+")
    group.attrs["segpipe"] = {k: v for k, v in group.attrs["segpipe"].items() if k != "source_stat"}
    os.utime(src, ns=(1, 1))
    stamp = (out / "zarr.json").stat().st_mtime_ns
    assert ingested_image(src, store) == out
    assert (out / "zarr.json").stat().st_mtime_ns == stamp, "reused, not written again"


def test_a_complete_ingest_of_a_source_gone_is_used_with_a_warning(tmp_path: Path) -> None:
    img = _image()
    src, store = _ome_tiff(tmp_path / "in.ome.tif", img), tmp_path / "in.image.zarr"
    out = ingested_image(src, store)
    src.unlink()
    with pytest.warns(UserWarning, match="is gone"):
        assert ingested_image(src, store) == out
    np.testing.assert_array_equal(open_image(out).read(0, 8, 0, 8), img[:8, :8])


def test_a_copy_of_a_source_gone_is_refused_for_another_pixel_size(tmp_path: Path) -> None:
    """A copy at 0.5 µm/px of a source gone was served where 0.25 µm/px was asked for."""
    src, store = _ome_tiff(tmp_path / "in.ome.tif", _image()), tmp_path / "in.image.zarr"
    ingested_image(src, store, pixel_size_um=0.5)
    src.unlink()
    with pytest.raises(ImageReadError, match=str(src)):
        ingested_image(src, store, pixel_size_um=0.25)
    assert _attrs(store)["segpipe"]["pixel_size_um"] == 0.5, "the copy is kept"


@pytest.fixture
def memory_url() -> Iterator[str]:
    """A prefix of its own in fsspec's in-memory file system (one per process), removed after."""
    import fsspec

    name = f"segpipe-ingest-{uuid.uuid4().hex[:8]}"
    yield f"memory://{name}"
    fs = fsspec.filesystem("memory")
    if fs.exists(f"/{name}"):
        fs.rm(f"/{name}", recursive=True)


def _put_tiff(url: str, img: np.ndarray) -> str:
    """``img`` as a tiled TIFF object at ``url`` (an in-memory fsspec URL)."""
    import fsspec

    data = io.BytesIO()
    tifffile.imwrite(data, img, tile=(64, 64), photometric="rgb")
    fsspec.filesystem("memory").pipe(url.removeprefix("memory:/"), data.getvalue())
    return url


def test_an_ingest_into_a_url_is_written_there(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, memory_url: str
) -> None:
    """A URL store (segment_slide puts the image beside a URL result) is written through
    fsspec, never into a local folder named ``memory:``, and reused and replaced there."""
    img = _image()
    src = _ome_tiff(tmp_path / "in.ome.tif", img)
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    monkeypatch.chdir(cwd)
    store = f"{memory_url}/a.image.zarr"
    out = ingested_image(src, store, chunk=128)
    assert isinstance(out, URLPath) and str(out) == store
    assert not any(cwd.iterdir())
    np.testing.assert_array_equal(open_image(out).read(0, 300, 0, 517), img)
    created = out.joinpath("zarr.json").modified()
    assert ingested_image(src, store, chunk=128) == out
    assert out.joinpath("zarr.json").modified() == created, "reused, not written again"

    with pytest.raises(FileExistsError, match="overwrite=True"):
        ingest(src, store)
    ingest(src, store, overwrite=True, pixel_size_um=2.0, min_level_size=64)
    replaced = open_image(out)
    assert replaced.pixel_size_um == 2.0 and len(replaced.level_shapes) == 3
    np.testing.assert_array_equal(replaced.read(0, 300, 0, 517), img)
    assert not any(cwd.iterdir())


def test_an_ingest_killed_part_way_is_redone_by_the_next_without_overwrite(
    tmp_path: Path,
) -> None:
    """A killed ingest leaves an unfinished store of its own (``complete: false``); the next
    plain ingest redoes it, as the busy message promises, to the same bytes as one never
    killed. A finished one still needs ``overwrite``."""
    import signal
    import subprocess
    import sys

    img = _image()
    src, store = _ome_tiff(tmp_path / "in.ome.tif", img), tmp_path / "in.image.zarr"
    killed_after_level_0 = (
        "import os, signal, segpipe.io.ingest as m; "
        "m._halve = lambda *a, **k: os.kill(os.getpid(), signal.SIGKILL); "
        f"m.ingest({str(src)!r}, {str(store)!r}, chunk=64, min_level_size=64)"
    )
    run = subprocess.run([sys.executable, "-c", killed_after_level_0], check=False)
    assert run.returncode == -signal.SIGKILL
    assert _attrs(store)["segpipe"]["complete"] is False and (store / "0" / "c").is_dir()

    ingest(src, store, chunk=64, min_level_size=64)
    assert _attrs(store)["segpipe"]["complete"] is True
    fresh = ingest(src, tmp_path / "fresh.image.zarr", chunk=64, min_level_size=64)
    for level in ("0", "1", "2"):
        a, b = zarr.open_array(store / level, mode="r"), zarr.open_array(fresh / level, mode="r")
        np.testing.assert_array_equal(a[:], b[:])
    with pytest.raises(FileExistsError, match="overwrite=True"):
        ingest(src, store, chunk=64, min_level_size=64)


def _delete_half(files: list[Path], metadata_first: bool) -> None:
    """Delete half of ``files`` as a kill part-way would leave them: the ``zarr.json`` files
    first or last, as a listing's order may have it."""
    files = sorted(files, key=lambda f: (f.name == "zarr.json") != metadata_first)
    for f in files[: len(files) // 2]:
        f.unlink()
    raise RuntimeError("killed while deleting")


@pytest.mark.parametrize("metadata_first", [False, True], ids=["chunks-first", "zarr.json-first"])
def test_an_overwrite_killed_while_deleting_is_redone_not_read_as_zeros(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, metadata_first: bool
) -> None:
    """A deletion killed half-way never leaves a store that reads as complete with chunks
    gone (they read as 0) nor a folder both ``overwrite`` settings refuse: the next call
    ingests again."""
    img = _image()
    src, store = _ome_tiff(tmp_path / "in.ome.tif", img), tmp_path / "in.image.zarr"
    ingest(src, store, chunk=64)

    def killed(path: str | Path, *args: object, **kwargs: object) -> None:
        _delete_half([f for f in Path(path).rglob("*") if f.is_file()], metadata_first)

    with monkeypatch.context() as m:
        m.setattr(shutil, "rmtree", killed)
        with pytest.raises(RuntimeError, match="killed"):
            ingest(src, store, chunk=64, overwrite=True)

    out = ingested_image(src, store, chunk=64)
    np.testing.assert_array_equal(open_image(out).read(0, 300, 0, 517), img)
    assert _unlocked(tmp_path.iterdir()) == [store, src]


def test_a_url_overwrite_killed_while_deleting_is_redone(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, memory_url: str
) -> None:
    import fsspec

    from segpipe.io import files

    img = _image()
    src, store = _ome_tiff(tmp_path / "in.ome.tif", img), f"{memory_url}/in.image.zarr"
    ingest(src, store, chunk=64)
    fs = fsspec.filesystem("memory")

    def killed(_: object, keys: list[str], **kwargs: object) -> None:
        for key in sorted(keys)[: len(keys) // 2]:
            fs.rm_file(key)
        raise RuntimeError("killed while deleting")

    with monkeypatch.context() as m:
        m.setattr(files, "remove_literal", killed)
        with pytest.raises(RuntimeError, match="killed"):
            ingest(src, store, chunk=64, overwrite=True)

    with pytest.raises(ImageReadError, match="never finished"):
        open_image(store)  # the root was marked before any chunk went
    np.testing.assert_array_equal(
        open_image(ingested_image(src, store, chunk=64)).read(0, 300, 0, 517), img
    )


def test_a_url_source_is_compared_again(tmp_path: Path, memory_url: str) -> None:
    """A source at a URL is there (pixels compared, not "gone"), and another image saved at
    that URL is ingested again."""
    src, store = f"{memory_url}/a.tif", tmp_path / "a.image.zarr"
    _put_tiff(src, np.full((70, 90, 3), 10, np.uint8))
    assert open_image(ingested_image(src, store)).read(0, 2, 0, 2).tolist() == [[[10] * 3] * 2] * 2
    _put_tiff(src, np.full((70, 90, 3), 200, np.uint8))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        out = ingested_image(src, store)
    assert open_image(out).read(0, 2, 0, 2).tolist() == [[[200] * 3] * 2] * 2
    assert _attrs(out)["segpipe"]["source"] == src

    URLPath(src).unlink()
    with pytest.warns(UserWarning, match="is gone"):
        assert ingested_image(src, store) == out


def test_reuse_follows_the_pixel_size_and_chunk_asked_for(tmp_path: Path) -> None:
    """A store is reused only where an ingest now would write the same: the pixel size asked
    for (else the file's) and the chunk side."""
    src, store = _ome_tiff(tmp_path / "in.ome.tif", _image()), tmp_path / "in.image.zarr"
    assert open_image(ingested_image(src, store, pixel_size_um=0.25)).pixel_size_um == 0.25
    assert open_image(ingested_image(src, store)).pixel_size_um == 0.5
    stamp = (store / "zarr.json").stat().st_mtime_ns
    ingested_image(src, store, pixel_size_um=0.5)  # the file's own: the same store
    assert (store / "zarr.json").stat().st_mtime_ns == stamp, "reused, not written again"

    out = ingested_image(src, store, chunk=64)
    assert zarr.open_array(str(store / "0"), mode="r").chunks == (3, 64, 64)
    assert _attrs(out)["segpipe"]["chunk"] == 64


def test_a_symlinked_ingest_output_is_refused_never_moved(tmp_path: Path) -> None:
    """Replacing an ingest renames it aside: through a link that moved the link, which the
    deletion then refused and the next ingest silently left. A link is refused, naming it and
    its target, with or without ``overwrite``; neither the link nor its target changes."""
    src = _ome_tiff(tmp_path / "in.ome.tif", _image())
    target = ingest(src, tmp_path / "target.zarr", chunk=128, min_level_size=512)
    link, dangling = tmp_path / "link.zarr", tmp_path / "dangling.zarr"
    link.symlink_to(target, target_is_directory=True)
    dangling.symlink_to(tmp_path / "nowhere.zarr", target_is_directory=True)
    before = _unlocked(tmp_path.rglob("*"))
    for path, to in [(link, target), (dangling, tmp_path / "nowhere.zarr")]:
        for overwrite in (False, True):
            with pytest.raises(FileExistsError, match="symbolic link") as info:
                ingest(src, path, chunk=64, overwrite=overwrite)
            assert f"{path} is a symbolic link to {to}" in str(info.value)
    with pytest.raises(FileExistsError, match="symbolic link"):
        ingested_image(src, link, chunk=64)  # not reusable (another chunk side): replaced
    assert _unlocked(tmp_path.rglob("*")) == before
    assert link.readlink() == target and _attrs(target)["segpipe"]["chunk"] == 128


def _as_version(store: Path, version: int) -> None:
    """Make the ingest at ``store`` read as an older version wrote it (no ``chunk`` before 3)."""
    group = zarr.open_group(store, mode="r+")
    attrs = {k: v for k, v in group.attrs["segpipe"].items() if k != "chunk"}
    group.attrs["segpipe"] = {**attrs, "version": version}


def test_a_version_2_ingest_is_reused_for_its_stored_chunk_side(tmp_path: Path) -> None:
    """Version 2 recorded no chunk side: its level-0 array says it. A version-1 ingest (no
    mask label image, unnamed alpha...) is redone."""
    src, store = _ome_tiff(tmp_path / "in.ome.tif", _image()), tmp_path / "in.image.zarr"
    ingested_image(src, store, chunk=128)
    _as_version(store, 2)
    stamp = (store / "zarr.json").stat().st_mtime_ns
    assert ingested_image(src, store, chunk=128) == store
    assert (store / "zarr.json").stat().st_mtime_ns == stamp, "reused, not written again"

    ingested_image(src, store, chunk=64)  # another chunk side: redone
    assert (_attrs(store)["segpipe"]["version"], _attrs(store)["segpipe"]["chunk"]) == (
        INGEST_VERSION,
        64,
    )
    _as_version(store, 1)
    ingested_image(src, store, chunk=64)
    assert _attrs(store)["segpipe"]["version"] == INGEST_VERSION


@pytest.mark.parametrize("version", [2, 3])
def test_an_older_ingest_of_nodata_by_value_is_redone(tmp_path: Path, version: int) -> None:
    """Its reduced levels may read valid pixels whose mean rounded to nodata as nodata (the
    fix of version 4): reused, a run at level 1 still left them out."""
    rasterio = pytest.importorskip("rasterio")
    data = np.full((3, 64, 64), 9, np.uint8)
    profile = {"driver": "GTiff", "width": 64, "height": 64, "count": 3, "dtype": "uint8"}
    src, store = tmp_path / "dem.tif", tmp_path / "dem.image.zarr"
    transform = rasterio.Affine(10, 0, 5e5, 0, -10, 5e6)
    with rasterio.open(src, "w", nodata=0, crs="EPSG:32633", transform=transform, **profile) as ds:
        ds.write(data)
    ingested_image(src, store, chunk=32)
    _as_version(store, version)
    if version == 3:  # _as_version drops the chunk side, which a version 3 records
        group = zarr.open_group(store, mode="r+")
        group.attrs["segpipe"] = {**group.attrs["segpipe"], "chunk": 32}
    ingested_image(src, store, chunk=32)
    assert _attrs(store)["segpipe"]["version"] == INGEST_VERSION, "redone"
    stamp = (store / "zarr.json").stat().st_mtime_ns
    ingested_image(src, store, chunk=32)
    assert (store / "zarr.json").stat().st_mtime_ns == stamp, "this version's: reused"


def test_a_version_2_ingest_of_a_source_gone_is_used_with_a_warning(tmp_path: Path) -> None:
    """The copy is all there is, whatever its chunk side; a version-1 copy is not used."""
    img = _image()
    src, store = _ome_tiff(tmp_path / "in.ome.tif", img), tmp_path / "in.image.zarr"
    ingested_image(src, store, chunk=128)
    _as_version(store, 2)
    src.unlink()
    with pytest.warns(UserWarning, match="is gone"):
        assert ingested_image(src, store) == store
    np.testing.assert_array_equal(open_image(store).read(0, 8, 0, 8), img[:8, :8])
    _as_version(store, 1)
    with pytest.raises(ImageReadError, match=str(src)):
        ingested_image(src, store)


@pytest.mark.parametrize("given_reader", [False, True])
def test_ingest_closes_only_the_reader_it_opened(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, given_reader: bool
) -> None:
    src = _ome_tiff(tmp_path / "in.ome.tif", _image())
    reader = open_image(src)
    closed: list[object] = []
    close = type(reader).close
    monkeypatch.setattr(type(reader), "close", lambda self: closed.append(self) or close(self))
    ingest(reader if given_reader else src, tmp_path / "out.zarr", min_level_size=512)
    assert len(closed) == (0 if given_reader else 1)


def _pyramid_tiff(path: Path, side: int, factor: int, levels: int) -> Path:
    """An RGB TIFF of ``side`` px with ``levels - 1`` SubIFD levels, each ``factor`` x smaller."""
    img = np.random.default_rng(0).integers(0, 256, (side, side, 3), dtype=np.uint8)
    with tifffile.TiffWriter(path) as tw:
        tw.write(img, subifds=levels - 1, tile=(64, 64), photometric="rgb")
        for k in range(1, levels):
            tw.write(img[:: factor**k, :: factor**k], subfiletype=1, tile=(64, 64))
    return path


@pytest.mark.parametrize(
    ("factor", "level", "expected"),
    [(4, 1, 2), (2, 1, 1), (2, 2, 2), (4, None, None), (4, 0, 0)],
)
def test_a_source_level_is_the_ingested_level_of_its_pixel_size(
    tmp_path: Path, factor: int, level: int | None, expected: int | None
) -> None:
    """The copy's pyramid steps 2x: a scanner's 4x level 1 is its level 2 (the flow
    segmented the copy's level 1, pixels half the size asked for)."""
    from segpipe.io.imagestore import ingested_level

    source = _pyramid_tiff(tmp_path / "s.tif", 1024, factor, 3 if factor == 2 else 2)
    image = ingested_image(source, tmp_path / "s.zarr")
    assert [s[:2] for s in open_image(image).level_shapes] == [(1024, 1024), (512, 512), (256, 256)]
    assert ingested_level(source, image, level) == expected


@pytest.mark.parametrize(
    ("factor", "level", "message"),
    [(3, 1, r"level 1 is a 3x downsample, .* levels of 1x, 2x, 4x only"), (4, 2, "levels 0-1")],
)
def test_a_source_level_the_ingested_copy_lacks_is_refused(
    tmp_path: Path, factor: int, level: int, message: str
) -> None:
    from segpipe.io.imagestore import ingested_level

    source = _pyramid_tiff(tmp_path / "s.tif", 1024, factor, 2)
    image = ingested_image(source, tmp_path / "s.zarr")
    with pytest.raises(ValueError, match=rf"^{source}: .*{message}|^{source} has {message}"):
        ingested_level(source, image, level)


def test_ingested_level_closes_the_readers_it_opens(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Each call left the source's and the copy's files open until the garbage collector
    came by: a long run of queries ran out of file descriptors."""
    from segpipe.io import imagestore

    source = _pyramid_tiff(tmp_path / "s.tif", 1024, 2, 2)
    image = ingested_image(source, tmp_path / "s.zarr")
    opened: list[Any] = []
    closed: list[Any] = []

    def spying(path: Any, **kwargs: Any) -> Any:
        reader = open_image(path, **kwargs)
        close = reader.close  # type: ignore[attr-defined]
        monkeypatch.setattr(reader, "close", lambda: closed.append(reader) or close())
        opened.append(reader)
        return reader

    monkeypatch.setattr(imagestore, "open_image", spying)
    assert imagestore.ingested_level(source, image, 1) == 1
    assert len(opened) == 2
    assert {id(r) for r in closed} == {id(r) for r in opened}


@pytest.mark.parametrize("change", ["nodata", "crs"])
def test_an_ingest_is_redone_when_its_source_changed_what_the_copy_keeps(
    tmp_path: Path, change: str
) -> None:
    """A GeoTIFF's nodata or CRS fixed in place (gdal_edit.py) changes no pixel: the copy of
    the old metadata was reused, its CRS going into results and its glass computed."""
    import rasterio
    from rasterio.transform import from_origin

    src, store = tmp_path / "dem.tif", tmp_path / "dem.zarr"
    data = np.arange(1, 300 * 300 + 1, dtype=np.float32).reshape(1, 300, 300)
    data[0, :50] = -9999.0
    profile = {"driver": "GTiff", "width": 300, "height": 300, "count": 1, "dtype": "float32"}
    transform = from_origin(500000, 5400000, 10, 10)
    with rasterio.open(src, "w", crs="EPSG:32633", transform=transform, **profile) as ds:
        ds.write(data)
    ingested_image(src, store)
    assert open_image(store).nodata is None
    with rasterio.open(src, "r+") as ds:
        if change == "nodata":
            ds.nodata = -9999.0
        else:
            ds.crs = rasterio.crs.CRS.from_epsg(32632)
    source, copy = open_image(src), open_image(ingested_image(src, store))
    assert copy.nodata == source.nodata
    assert copy.georeference.crs_name == source.georeference.crs_name
    before = _attrs(store)["segpipe"]
    ingested_image(src, store)
    assert _attrs(store)["segpipe"] == before, "reused once it stands for the source again"


@pytest.mark.parametrize("change", ["nodata", "crs"])
def test_a_url_source_whose_kept_metadata_alone_changed_is_ingested_again(
    tmp_path: Path, memory_url: str, change: str
) -> None:
    """A URL GeoTIFF re-uploaded with its nodata or CRS fixed (same pixels, no file stat to
    tell) had its stale copy reused."""
    import fsspec
    import rasterio
    from rasterio.transform import from_origin

    src, store = f"{memory_url}/dem.tif", tmp_path / "dem.zarr"
    data = np.arange(1, 300 * 300 + 1, dtype=np.float32).reshape(1, 300, 300)
    data[0, :50] = -9999.0
    profile = {"driver": "GTiff", "width": 300, "height": 300, "count": 1, "dtype": "float32"}
    transform = from_origin(500000, 5400000, 10, 10)

    def put(crs: str, nodata: float | None) -> None:
        local = tmp_path / "upload.tif"
        with rasterio.open(local, "w", crs=crs, transform=transform, nodata=nodata, **profile) as d:
            d.write(data)
        fsspec.filesystem("memory").pipe(src.removeprefix("memory:/"), local.read_bytes())

    put("EPSG:32633", None)
    ingested_image(src, store)
    assert open_image(store).nodata is None
    put(*(("EPSG:32633", -9999.0) if change == "nodata" else ("EPSG:32632", None)))
    source, copy = open_image(src), open_image(ingested_image(src, store))
    assert copy.nodata == source.nodata
    assert copy.georeference.crs_name == source.georeference.crs_name


@pytest.mark.parametrize("change", ["alpha band", "mask band"])
def test_a_url_source_whose_mask_alone_changed_is_ingested_again(
    tmp_path: Path, memory_url: str, change: str
) -> None:
    """A URL GeoTIFF re-uploaded with its 4th band made an alpha band, or with a mask band
    added (same pixels, no file stat to tell): its stale copy, reused, read the masked-out
    rows as data, which were segmented."""
    import fsspec
    import rasterio

    src, store = f"{memory_url}/rgb.tif", tmp_path / "rgb.zarr"
    data = np.random.default_rng(9).integers(1, 255, (4, 300, 300), dtype=np.uint8)
    data[3] = 255
    data[3, :50] = 0  # the first 50 rows masked out, by the alpha band or the mask band
    valid = np.repeat(np.arange(300)[:, None] >= 50, 300, axis=1)
    profile: dict[str, Any] = {
        "driver": "GTiff", "width": 300, "height": 300, "dtype": "uint8", "crs": "EPSG:32633",
        "transform": rasterio.Affine(10, 0, 5e5, 0, -10, 5.4e6),
    }  # fmt: skip

    def put(masked: bool) -> None:
        local = tmp_path / f"upload-{masked}.tif"
        if change == "alpha band":  # the same 4 bands named alike, nodata 0 in each
            extra = (
                {"photometric": "RGB", "alpha": "YES"} if masked else {"photometric": "MINISBLACK"}
            )
            with rasterio.open(local, "w", count=4, nodata=0, **profile, **extra) as d:
                d.write(data)
                if not masked:
                    for band, name in enumerate(("red", "green", "blue", "alpha"), 1):
                        d.set_band_description(band, name)
        else:  # the same 3 bands, then with an internal mask band
            with (
                rasterio.Env(GDAL_TIFF_INTERNAL_MASK=True),
                rasterio.open(local, "w", count=3, **profile) as d,
            ):
                d.write(data[:3])
                if masked:
                    d.write_mask(data[3])
        fsspec.filesystem("memory").pipe(src.removeprefix("memory:/"), local.read_bytes())

    put(masked=False)
    first = open_image(ingested_image(src, store))
    everywhere = first.valid_mask(0, 300, 0, 300)
    assert everywhere is None or everywhere.all()  # every pixel holds data
    put(masked=True)
    source, copy = open_image(src), open_image(ingested_image(src, store))
    assert source.channel_names == first.channel_names and source.nodata == first.nodata
    kind = "alpha" if change == "alpha band" else "mask"
    assert source.mask_kind == copy.mask_kind == kind
    np.testing.assert_array_equal(source.valid_mask(0, 300, 0, 300), valid)
    np.testing.assert_array_equal(copy.valid_mask(0, 300, 0, 300), valid)


def test_an_ingest_names_its_source_by_an_absolute_path(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Recorded as typed ("slide.ome.tif"), the source was another file seen from another
    working folder: the same unchanged file's copy was deleted and written again."""
    _ome_tiff(tmp_path / "slide.ome.tif", _image())
    monkeypatch.chdir(tmp_path)
    ingested_image("slide.ome.tif", "slide.zarr")
    assert _attrs(tmp_path / "slide.zarr")["segpipe"]["source"] == str(tmp_path / "slide.ome.tif")
    monkeypatch.chdir(tmp_path.parent)

    def redone(*args: Any, **kwargs: Any) -> None:
        raise AssertionError("ingested again")

    monkeypatch.setattr(segpipe.io.ingest, "ingest", redone)
    assert (
        ingested_image(tmp_path / "slide.ome.tif", tmp_path / "slide.zarr")
        == tmp_path / "slide.zarr"
    )


def test_a_source_store_moved_away_mid_copy_leaves_no_complete_copy(tmp_path: Path) -> None:
    """Renamed aside (moved by the user, or by another tool) after the copy began: its
    chunks read as zeros without an error, and the copy was marked complete."""
    src = ingest(_ome_tiff(tmp_path / "s.ome.tif", _image()), tmp_path / "src.zarr", chunk=64)
    reader = open_image(src)
    real, reads = reader._read_native, []

    def moved_after_a_few(level: int, key: Any) -> np.ndarray:
        reads.append(level)
        if len(reads) == 20:
            src.rename(tmp_path / "moved.zarr")
        return real(level, key)

    reader._read_native = moved_after_a_few  # type: ignore[method-assign]
    with pytest.raises(ImageReadError, match=r"src\.zarr changed while it was ingested"):
        ingest(reader, tmp_path / "out.zarr", chunk=64)
    assert len(reads) > 20, "read on after the move, as zeros"
    assert zarr.open_group(tmp_path / "out.zarr", mode="r").attrs["segpipe"]["complete"] is False


def test_a_source_file_edited_mid_copy_leaves_no_complete_copy(tmp_path: Path) -> None:
    """Edited in place (same size) outside the sampled pixels while it was copied: the copy
    mixed old and new pixels and was marked complete for that run."""
    src = _ome_tiff(tmp_path / "s.ome.tif", _image())
    reader = open_image(src)
    real, reads = reader._read_native, []

    def edited_after_a_few(level: int, key: Any) -> np.ndarray:
        reads.append(level)
        if len(reads) == 20:  # past the pixel sample's reads
            os.utime(src, ns=(1, 1))  # its mtime, as an editor's save changes it
        return real(level, key)

    reader._read_native = edited_after_a_few  # type: ignore[method-assign]
    with pytest.raises(ImageReadError, match=r"s\.ome\.tif changed while it was ingested"):
        ingest(reader, tmp_path / "out.zarr", chunk=64)
    assert len(reads) > 20
    assert zarr.open_group(tmp_path / "out.zarr", mode="r").attrs["segpipe"]["complete"] is False


def test_a_bit_flipped_in_an_ingested_chunk_is_refused_naming_the_store(tmp_path):
    """Ingested chunks had no checksum (results' have): one flipped bit read back as changed
    pixels without a word, and was segmented."""
    image = np.random.default_rng(0).integers(0, 255, (300, 300, 3), dtype=np.uint8)
    tifffile.imwrite(tmp_path / "s.tif", image, photometric="rgb", tile=(128, 128))
    store = ingest(tmp_path / "s.tif", tmp_path / "s.zarr")
    np.testing.assert_array_equal(np.asarray(open_image(store).level(0)), image)
    chunk = Path(store) / "0" / "c" / "0" / "0" / "0"
    data = bytearray(chunk.read_bytes())
    data[len(data) // 2] ^= 0x10
    chunk.write_bytes(bytes(data))
    with pytest.raises(ImageReadError, match=f"{store}: cannot read level 0"):
        np.asarray(open_image(store).level(0))


def _translated_ome_zarr(path: Path, origin: tuple[float, float]) -> Path:
    """A one-level (c, y, x) OME-Zarr 0.5 image of ``_image()``'s first 64 x 80 px at 0.5 µm,
    its first pixel centred at ``origin`` (y, x) µm."""
    space = {"type": "space", "unit": "micrometer"}
    transforms = [
        {"type": "scale", "scale": [1.0, 0.5, 0.5]},
        {"type": "translation", "translation": [0.0, *origin]},
    ]
    ms = {
        "axes": [{"name": "c", "type": "channel"}, {"name": "y", **space}, {"name": "x", **space}],
        "datasets": [{"path": "s0", "coordinateTransformations": transforms}],
    }
    root = zarr.open_group(str(path), mode="w", zarr_format=3)
    root.create_array("s0", data=_image()[:64, :80].transpose(2, 0, 1), dimension_names="cyx")
    root.update_attributes({"ome": {"version": "0.5", "multiscales": [ms]}})
    return path


def test_an_ingest_keeps_where_its_source_lies_and_is_redone_when_that_moves(
    tmp_path: Path,
) -> None:
    """An OME-Zarr's translation was dropped: the copy, and every result of it, lay at 0."""
    src = _translated_ome_zarr(tmp_path / "t.ome.zarr", (100.0, 200.0))
    out = ingest(src, tmp_path / "copy.zarr", chunk=32, min_level_size=16)
    (ms,) = _attrs(out)["ome"]["multiscales"]
    # level k's centres: the origin plus half of the 2**k - 1 level-0 pixels of 0.5 µm before
    assert [d["coordinateTransformations"][1] for d in ms["datasets"]] == [
        {"type": "translation", "translation": [0.0, 100.0, 200.0]},
        {"type": "translation", "translation": [0.0, 100.25, 200.25]},
        {"type": "translation", "translation": [0.0, 100.75, 200.75]},
    ]
    copy = open_image(out)
    assert (copy.pixel_size_um, copy.origin_um) == (0.5, (100.0, 200.0))
    np.testing.assert_array_equal(copy.read(0, 64, 0, 80), _image()[:64, :80])

    store = ingested_image(src, tmp_path / "reused.zarr", chunk=32)
    assert open_image(store).origin_um == (100.0, 200.0)
    _translated_ome_zarr(src, (-3.0, 7.5))  # the same pixels, placed elsewhere
    assert open_image(ingested_image(src, store, chunk=32)).origin_um == (-3.0, 7.5)


def test_an_ingest_of_a_source_at_0_writes_no_translation_and_is_reused(tmp_path: Path) -> None:
    """Copies of sources at 0 (all of them before translations were read) keep their
    attributes, so they are reused as before."""
    src = _translated_ome_zarr(tmp_path / "t.ome.zarr", (0.0, 0.0))
    store = ingested_image(src, tmp_path / "copy.zarr", chunk=32)
    attrs = _attrs(store)
    assert "origin_um" not in attrs["segpipe"]
    assert attrs["ome"]["multiscales"][0]["datasets"][0]["coordinateTransformations"] == [
        {"type": "scale", "scale": [1.0, 0.5, 0.5]}
    ]
    stamp = (store / "zarr.json").stat().st_mtime_ns
    assert ingested_image(src, store, chunk=32) == store
    assert (store / "zarr.json").stat().st_mtime_ns == stamp, "reused, not written again"


@pytest.mark.parametrize(
    ("before", "after"), [((0.0, 100.0), (0.0, 200.0)), ((100.0, 0.0), (200.0, 0.0))]
)
def test_an_ingest_is_redone_when_its_source_moves_along_one_axis_only(
    tmp_path: Path, before: tuple[float, float], after: tuple[float, float]
) -> None:
    """An OME-Zarr (a folder: no file stat) placed at 0 on one axis: moved along the other,
    its stale copy was reused, and every result of it lay 100 µm off."""
    src = _translated_ome_zarr(tmp_path / "t.ome.zarr", before)
    store = ingested_image(src, tmp_path / "copy.zarr", chunk=32)
    assert open_image(store).origin_um == before
    _translated_ome_zarr(src, after)  # the same pixels, placed elsewhere
    copy = open_image(ingested_image(src, store, chunk=32))
    assert copy.origin_um == after
    (ms,) = _attrs(store)["ome"]["multiscales"]
    assert ms["datasets"][0]["coordinateTransformations"][1]["translation"] == [0.0, *after]


def test_a_geotiffs_sidecar_mask_edited_alone_redoes_its_copy(tmp_path: Path) -> None:
    """GDAL keeps a GeoTIFF's mask band in ``<name>.msk`` where asked: a footprint fixed
    there leaves the .tif's size, mtime and pixels as they were, and its stale copy (and
    the copy's valid mask) was reused."""
    rasterio = pytest.importorskip("rasterio")
    data = np.random.default_rng(0).integers(1, 255, (3, 40, 60), dtype=np.uint8)
    half = np.full((40, 60), 255, np.uint8)
    half[:, 30:] = 0
    path = tmp_path / "ortho.tif"
    with (
        rasterio.Env(GDAL_TIFF_INTERNAL_MASK=False),
        rasterio.open(
            path, "w", driver="GTiff", width=60, height=40, count=3, dtype="uint8",
            crs="EPSG:32633", transform=rasterio.Affine(2, 0, 5e5, 0, -2, 5e6),
        ) as ds,
    ):  # fmt: skip
        ds.write(data)
        ds.write_mask(half)
    assert (tmp_path / "ortho.tif.msk").is_file()
    store = ingested_image(path, tmp_path / "ortho.zarr", chunk=32)
    assert int(open_image(store).valid_mask(0, 40, 0, 60).sum()) == 40 * 30
    stat = path.stat()
    with rasterio.Env(GDAL_TIFF_INTERNAL_MASK=False), rasterio.open(path, "r+") as ds:
        ds.write_mask(np.full((40, 60), 255, np.uint8))
    assert (path.stat().st_size, path.stat().st_mtime_ns) == (stat.st_size, stat.st_mtime_ns)
    store = ingested_image(path, tmp_path / "ortho.zarr", chunk=32)
    assert int(open_image(store).valid_mask(0, 40, 0, 60).sum()) == 40 * 60
