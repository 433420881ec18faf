import dataclasses
import os

import numpy as np
import pytest
import xarray as xr
import zarr
from test_query import run_summary

from segpipe.config import SegmentConfig
from segpipe.geometry.tiling import Box
from segpipe.results import (
    IncompleteResultError,
    ResultMeta,
    ResultMismatchError,
    class_pixels,
    finalize_result,
    is_complete,
    mark_tiles_done,
    open_result,
    prepare_result,
    read_meta,
    tiles_done,
    write_tiles,
)

# Settings that live in ResultMeta.config (pixel_size_um is the result's own field too).
SETTINGS = {f.name for f in dataclasses.fields(SegmentConfig)} - {
    f.name for f in dataclasses.fields(ResultMeta)
}


def meta(**kw):
    """A 100 x 70 px result's metadata; settings of SegmentConfig among ``kw`` go to config."""
    config = dict(tile=32, mode="exact", level=0, task_tiles=1)
    config.update({k: kw.pop(k) for k in list(kw) if k in SETTINGS})
    base = dict(
        source="s.tif",
        shape=(100, 70),
        pixel_size_um=0.5,
        class_names=("bg", "fg"),
        model_name="m",
        model_sha256="0" * 64,
        halo=4,
    )
    base.update(kw)
    return ResultMeta(**base, config=SegmentConfig(**config))


def test_new_resumed_and_complete(tmp_path):
    path = tmp_path / "r.zarr"
    done = prepare_result(path, meta())
    assert done.shape == (4, 3) and not done.any()
    mark_tiles_done(path, {(0, 0): np.array([5, 6]), (3, 2): np.array([1, 0])})
    again = prepare_result(path, meta())
    assert again.sum() == 2 and again[0, 0] and again[3, 2]
    np.testing.assert_array_equal(class_pixels(path), [6, 6])
    assert not is_complete(path)
    finalize_result(path, run_summary(path))
    assert read_meta(path).summary.tiles_total == 12
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
    finalize_result(path, run_summary(path))
    ds = open_result(path)
    assert ds["x"].attrs["units"] == "pixel"
    np.testing.assert_array_equal(ds["x"].values[:3], [0, 1, 2])
    assert ds["mask"].dtype == np.uint8
    assert ds["probabilities"].dtype == np.float16


def write_everywhere(path, m, probabilities):
    """Write (C, y, x) probabilities block by block, as the tasks of a run do."""
    from segpipe.geometry.tiling import tile_grid

    for block in tile_grid(m.shape, m.tile).blocks(m.config.task_tiles):
        box = Box(block[0].box.y0, block[-1].box.y1, block[0].box.x0, block[-1].box.x1)
        write_tiles(path, box, probabilities[(slice(None), *box.slices)])


def random_probabilities(shape, c=2, seed=0):
    p = np.random.default_rng(seed).random((c, *shape))
    return (p / p.sum(0)).astype(np.float32)


def test_uint8_probabilities_decode_with_xarray_to_within_1_255(tmp_path):
    path = tmp_path / "r.zarr"
    m = meta(probability_dtype="uint8", task_tiles=2)
    prepare_result(path, m)
    probs = random_probabilities(m.shape)
    write_everywhere(path, m, probs)
    finalize_result(path, run_summary(path))
    stored = zarr.open_array(path / "probabilities")
    assert stored.dtype == np.uint8
    assert stored.attrs["scale_factor"] == pytest.approx(1 / 255)
    decoded = xr.open_zarr(path)["probabilities"]
    assert decoded.dtype.kind == "f"
    assert np.abs(decoded.values - probs).max() <= 1 / 255
    np.testing.assert_array_equal(xr.open_zarr(path)["mask"].values, probs.argmax(0))


def test_shards_are_task_blocks_and_empty_ones_are_not_written(tmp_path):
    path = tmp_path / "r.zarr"
    m = meta(task_tiles=2)  # 32 px tiles, 64 px shards
    prepare_result(path, m)
    assert zarr.open_array(path / "mask").shards == (64, 64)
    assert zarr.open_array(path / "probabilities").shards == (2, 64, 64)
    background = np.zeros((2, 64, 64), np.float32)
    background[0] = 1.0
    write_tiles(path, Box(0, 64, 0, 64), background)  # mask all 0: its shard is not stored
    write_tiles(path, Box(64, 100, 0, 64), random_probabilities((36, 64)))
    stored = sorted(
        os.path.relpath(os.path.join(d, f), path / "mask")
        for d, _, files in os.walk(path / "mask")
        for f in files
        if f != "zarr.json"
    )
    assert stored == [os.path.join("c", "1", "0")]


def test_levels_and_tree(tmp_path):
    path = tmp_path / "r.zarr"
    m = meta(min_level_size=16)  # 100 x 70 -> 50 x 35 -> 25 x 17
    prepare_result(path, m)
    probs = random_probabilities(m.shape)
    write_everywhere(path, m, probs)
    finalize_result(path, run_summary(path))
    tree = open_result(path, tree=True)
    assert [tree[k].sizes["x"] for k in tree.children] == [70, 35, 17]
    level2 = open_result(path, level=2)
    assert level2.attrs["level"] == 2 and level2.attrs["segpipe"]["complete"] is True
    # Level 2 pixel i covers level-0 pixels 4i..4i+3, centred at 0.5 * (4i + 1.5) um.
    np.testing.assert_allclose(level2["y"].values[:2], [0.75, 2.75])
    expected = probs[:, :100, :68].reshape(2, 25, 4, 17, 4).mean(axis=(2, 4))
    np.testing.assert_allclose(level2["probabilities"].values, expected, atol=2e-3)
    with pytest.raises(ValueError, match=r"levels 0\.\.2, not level 3"):
        open_result(path, level=3)


def test_incomplete_result_is_refused_at_every_level(tmp_path):
    path = tmp_path / "r.zarr"
    prepare_result(path, meta())
    with pytest.raises(IncompleteResultError, match="incomplete"):
        open_result(path, level=1)
    with pytest.raises(IncompleteResultError):
        open_result(path, tree=True)
    assert open_result(path, allow_incomplete=True)["mask"].shape == (100, 70)


def test_pyramid_tasks_are_whole_shards(tmp_path):
    from segpipe.results.pyramid import reduce_level

    path = tmp_path / "r.zarr"
    m = meta(tile=16, task_tiles=2, min_level_size=16)  # 32 px shards; 100 x 70 -> 50 x 35
    prepare_result(path, m)
    below = zarr.open_array(path / "probabilities")
    level1 = reduce_level(below, "mean", zarr.open_array(path / "levels/1/probabilities").shards)
    assert level1.shape == (2, 50, 35)
    assert level1.chunks[1:] == ((32, 18), (32, 3)), "one task per level-1 shard"


def test_a_result_written_before_segment_config_still_opens_and_resumes(tmp_path, small_slide):
    # Results written before SegmentConfig carried no "config" or "state" keys: their settings
    # are rebuilt from the identity, which kept its layout, so they open and count as done.
    import segpipe
    from segpipe.results import read_attrs

    out = tmp_path / "old.seg.zarr"
    settings = {"tile": 64, "mode": "blend", "window": 32, "task_tiles": 1}
    segpipe.segment(small_slide.image, out, scheduler="sync", **settings)
    current = read_attrs(out)
    legacy = {k: v for k, v in current.items() if k not in ("config", "state")}
    zarr.open_group(out, mode="r+").attrs["segpipe"] = legacy

    meta = read_meta(out)
    assert meta.complete and meta.state == "complete"
    written = current["config"]  # the resolved settings (the window snapped to the model)
    rebuilt = meta.config.result_settings()
    assert rebuilt == {k: written[k] for k in rebuilt}
    assert (rebuilt["tile"], rebuilt["mode"], rebuilt["task_tiles"]) == (64, "blend", 1)
    assert meta.identity() == current["identity"]
    assert segpipe.open_result(out)["mask"].shape == (300, 300)
    again = segpipe.segment(small_slide.image, out, scheduler="sync", **settings)
    assert read_meta(again).summary == meta.summary  # recognised as the same, complete result
