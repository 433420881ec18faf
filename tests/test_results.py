import os

import numpy as np
import pytest
import zarr

from segpipe.results import (
    ResultMeta,
    ResultMismatchError,
    class_pixels,
    finalize_result,
    is_complete,
    mark_tiles_done,
    open_result,
    prepare_result,
    tiles_done,
    write_tiles,
)
from segpipe.tiling import Box


def meta(**kw):
    base = dict(
        source="s.tif",
        shape=(100, 70),
        level=0,
        pixel_size_um=0.5,
        class_names=("bg", "fg"),
        model_name="m",
        model_sha256="0" * 64,
        tile=32,
        halo=4,
        mode="exact",
    )
    base.update(kw)
    return ResultMeta(**base)


def test_new_resumed_and_complete(tmp_path):
    path = tmp_path / "r.zarr"
    done = prepare_result(path, meta())
    assert done.shape == (4, 3) and not done.any()
    mark_tiles_done(path, {(0, 0): np.array([5, 6]), (3, 2): np.array([1, 0])})
    again = prepare_result(path, meta())
    assert again.sum() == 2 and again[0, 0] and again[3, 2]
    np.testing.assert_array_equal(class_pixels(path), [6, 6])
    assert not is_complete(path)
    finalize_result(path, {"tiles_total": 12})
    assert is_complete(path)
    assert tiles_done(path).all()


def test_empty_chunks_are_not_written(tmp_path):
    path = tmp_path / "r.zarr"
    prepare_result(path, meta())
    background = np.zeros((2, 32, 32), np.float32)
    background[0] = 1.0  # class 0 everywhere: the mask chunk equals its fill value
    counts = write_tiles(path, Box(0, 32, 0, 32), background)
    np.testing.assert_array_equal(counts, [32 * 32, 0])
    mixed = background.copy()
    mixed[:, :4] = mixed[::-1, :4]
    write_tiles(path, Box(32, 64, 0, 32), mixed)
    chunks = sorted(
        os.path.relpath(os.path.join(d, f), path / "mask")
        for d, _, files in os.walk(path / "mask")
        for f in files
        if f != "zarr.json"
    )
    assert chunks == [os.path.join("c", "1", "0")]
    assert zarr.open_array(path / "mask")[0:32, 0:32].max() == 0
    assert (path / "probabilities" / "c" / "0" / "0" / "0").exists()


def test_mismatch_and_foreign_directories(tmp_path):
    path = tmp_path / "r.zarr"
    prepare_result(path, meta())
    with pytest.raises(ResultMismatchError, match="differs in: model_sha256, tile"):
        prepare_result(path, meta(tile=64, model_sha256="1" * 64))
    prepare_result(path, meta(tile=64), overwrite=True)
    assert zarr.open_array(path / "mask").chunks == (64, 64)

    plain = zarr.create_array(tmp_path / "user.zarr", shape=(4,), dtype="uint8")
    plain[...] = 7
    with pytest.raises(ResultMismatchError, match="not a segpipe result"):
        prepare_result(tmp_path / "user.zarr", meta(), overwrite=True)
    assert zarr.open_array(tmp_path / "user.zarr")[...].tolist() == [7] * 4


def test_open_result_coordinates_without_pixel_size(tmp_path):
    path = tmp_path / "r.zarr"
    prepare_result(path, meta(pixel_size_um=None))
    finalize_result(path, {})
    ds = open_result(path)
    assert ds["x"].attrs["units"] == "pixel"
    np.testing.assert_array_equal(ds["x"].values[:3], [0, 1, 2])
    assert ds["mask"].dtype == np.uint8
    assert ds["probabilities"].dtype == np.float16
