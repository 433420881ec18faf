"""segment(): stitched results against one whole-image forward pass, resume, refusals."""

import importlib
import os
import re
import shutil

import dask.array as da
import numpy as np
import pytest
import torch
import xarray as xr
import zarr
from PIL import Image

import segpipe
from segpipe import models
from segpipe.geometry.tiling import mirror_indices
from segpipe.io.identity import pixel_sample_sha256
from segpipe.io.readers import ArrayReader
from segpipe.results import IncompleteResultError, ResultMismatchError, read_meta

CLASSES = ("background", "tissue", "nucleus")


def write_zarr_image(path, image, pixel_size_um=None):
    arr = zarr.create_array(
        path,
        shape=image.shape,
        chunks=(64, 64, image.shape[2]),
        dtype=image.dtype,
        dimension_names=("y", "x", "c"),
    )
    arr[...] = image
    return path


@pytest.fixture(scope="module")
def image():
    rng = np.random.default_rng(0)
    # Smooth structure plus noise, so the random network's classes change across the image.
    yy, xx = np.mgrid[0:150, 0:203]
    base = 127 + 80 * np.sin(yy / 9.0)[..., None] * np.cos(xx / 13.0)[..., None]
    return np.clip(base + rng.normal(0, 30, (150, 203, 3)), 0, 255).astype(np.uint8)


@pytest.fixture(scope="module")
def source(image, tmp_path_factory):
    return write_zarr_image(tmp_path_factory.mktemp("src") / "image.zarr", image)


def unet(padding, seed=0):
    torch.manual_seed(seed)
    return models.build("unet", class_names=CLASSES, width=4, depth=2, padding=padding).eval()


def mirrored(image, y0, y1, x0, x1):
    iy = mirror_indices(y0, y1, image.shape[0])
    ix = mirror_indices(x0, x1, image.shape[1])
    return image[np.ix_(iy, ix)]


def whole_image_probabilities(net, image, margin):
    """One forward pass over the whole image, mirrored by ``margin`` (and to the size rule)."""
    g = net.geometry
    h, w = image.shape[:2]
    pad = g.halo if g.shrinks else margin
    ny, nx = g.input_size(h + 2 * (pad - g.halo)), g.input_size(w + 2 * (pad - g.halo))
    x = mirrored(image, -pad, ny - pad, -pad, nx - pad).astype(np.float32) / 255
    with torch.inference_mode():
        logits = net(torch.from_numpy(x).permute(2, 0, 1)[None])
    p = torch.softmax(logits, 1)[0].numpy()
    c = g.crop if g.shrinks else pad
    return p[:, c : c + h, c : c + w]


@pytest.mark.parametrize("tile", [32, 48, 64])
@pytest.mark.parametrize("task_tiles", [1, 2])
def test_exact_mode_equals_whole_image_pass(source, image, tmp_path, tile, task_tiles):
    net = unet("valid")
    expected = whole_image_probabilities(net, image, 0)
    out = segpipe.segment(
        source,
        tmp_path / "r.zarr",
        net,
        tile=tile,
        task_tiles=task_tiles,
        scheduler="sync",
        probability_dtype="float32",
        batch_size=3,
    )
    got = zarr.open_array(out / "0" / "probabilities", mode="r")[...]
    assert got.shape == expected.shape
    assert np.abs(got - expected).max() <= 1e-4
    mask = zarr.open_array(out / "0" / "mask", mode="r")[...]
    np.testing.assert_array_equal(mask, got.argmax(0))


ODD_SETTINGS = dict(
    tile=32, min_level_size=32, scheduler="sync", probability_dtype="float32", foreground="none"
)


@pytest.fixture(scope="module")
def one_tile_blocks(source, tmp_path_factory):
    """The result of blocks of one tile (levels 150, 75 and 37 px)."""
    out = tmp_path_factory.mktemp("one") / "r.zarr"
    return segpipe.segment(source, out, unet("valid"), task_tiles=1, **ODD_SETTINGS)


@pytest.mark.parametrize("task_tiles", [3, 5, 6])
def test_blocks_of_an_odd_number_of_tiles_give_the_same_result(
    source, tmp_path, one_tile_blocks, task_tiles
):
    """Blocks of 3, 5 or 6 tiles of 32 px (shards that halve into parts of a 32 px chunk)
    make a result that opens, every level as blocks of one tile make it."""
    out = segpipe.segment(
        source, tmp_path / "r.zarr", unet("valid"), task_tiles=task_tiles, **ODD_SETTINGS
    )
    assert read_meta(out).summary.tiles_computed == 5 * 7
    for level in range(3):
        got, expected = (segpipe.open_result(p, level) for p in (out, one_tile_blocks))
        assert got["mask"].shape == expected["mask"].shape
        np.testing.assert_array_equal(got["mask"].values, expected["mask"].values)
        p, q = got["probabilities"].values, expected["probabilities"].values
        assert np.abs(p - q).max() <= 1e-5


def test_a_relative_checkpoint_and_mask_file_are_stored_absolute(source, tmp_path, monkeypatch):
    """The source was stored absolute but a checkpoint and a mask file as typed, relative to
    a working folder the result does not record (``info`` showed ``tmp/.../m.pt``)."""
    shutil.copytree(source, tmp_path / "image.zarr")
    net = unet("valid")
    models.save(net, tmp_path / "m.pt")
    mask = np.zeros((150, 203), np.uint8)  # the image's shape
    mask[20:60, 20:60] = 255
    Image.fromarray(mask).save(tmp_path / "mask.png")
    monkeypatch.chdir(tmp_path)
    settings = dict(tile=32, scheduler="sync", foreground="mask.png")
    out = segpipe.segment("image.zarr", "r.zarr", "m.pt", **settings)
    meta = read_meta(out)
    assert meta.model_name == str(tmp_path / "m.pt")
    assert meta.config.foreground == str(tmp_path / "mask.png")
    # A shipped model's name stays a name, not a path in this folder.
    segment_module = importlib.import_module("segpipe.execution.segment")
    assert segment_module._model_label("tissue-unet", None) == "tissue-unet"


def test_relative_paths_reach_the_tasks_absolute_and_resume(source, tmp_path, monkeypatch):
    """A relative source and output are made absolute before the tasks get them (a Dask
    worker in another folder would open other files), the same result as their absolute
    paths make: an interrupted run resumes by either."""
    segment_module = importlib.import_module("segpipe.execution.segment")
    shutil.copytree(source, tmp_path / "image.zarr")
    monkeypatch.chdir(tmp_path)
    jobs, real = [], segment_module.run_blocks

    def spy(blocks, job, **kwargs):
        jobs.append(job)
        return real(blocks, job, **kwargs)

    class Stop(Exception):
        pass

    def stop(done, total):
        raise Stop

    monkeypatch.setattr(segment_module, "run_blocks", spy)
    settings = dict(tile=32, task_tiles=1, scheduler="sync", foreground="none")
    net = unet("valid")
    with pytest.raises(Stop):
        segpipe.segment("image.zarr", "r.zarr", net, on_progress=stop, **settings)
    (job,) = jobs
    assert job.output == str(tmp_path / "r.zarr")
    assert os.fspath(job.reader.path) == str(tmp_path / "image.zarr")
    assert read_meta(tmp_path / "r.zarr").source == str(tmp_path / "image.zarr")
    # Resumed by the absolute paths: the same result, not another's.
    out = segpipe.segment(tmp_path / "image.zarr", tmp_path / "r.zarr", net, **settings)
    assert read_meta(out).summary.tiles_skipped == 1
    # And by the relative names again: found complete, returned absolute.
    finished = read_meta(out).finished
    assert segpipe.segment("image.zarr", "r.zarr", net, **settings) == tmp_path / "r.zarr"
    assert read_meta(out).finished == finished


def test_float16_store_rounds_only(source, image, tmp_path):
    net = unet("valid")
    expected = whole_image_probabilities(net, image, 0)
    out = segpipe.segment(source, tmp_path / "r.zarr", net, tile=64, scheduler="sync")
    got = zarr.open_array(out / "0" / "probabilities", mode="r")
    assert got.dtype == np.float16
    assert np.abs(got[...].astype(np.float32) - expected).max() <= 1e-3
    top2 = np.sort(expected, axis=0)[-2:]
    decided = (top2[1] - top2[0]) > 1e-3
    mask = zarr.open_array(out / "0" / "mask", mode="r")[...]
    np.testing.assert_array_equal(mask[decided], expected.argmax(0)[decided])


def seam_masks(shape, step, offset=0):
    on = np.zeros(shape, dtype=bool)
    for axis in (0, 1):
        idx = np.arange(shape[axis])
        lines = ((idx - offset) % step == 0) | ((idx - offset) % step == step - 1)
        if axis == 0:
            on[lines, :] = True
        else:
            on[:, lines] = True
    return on


def blend(source, out, net, tile, window=64, overlap=0.5):
    return segpipe.segment(
        source,
        out,
        net,
        tile=tile,
        mode="blend",
        window=window,
        overlap=overlap,
        scheduler="sync",
        probability_dtype="float32",
    )


def test_blend_mode_same_padding_error_is_bounded_and_seamless(source, image, tmp_path):
    net = unet("same")  # depth 2: receptive-field margin 23 px
    out = blend(source, tmp_path / "r.zarr", net, tile=48)
    config = read_meta(out).config
    assert (config.window, config.overlap) == (64, 0.5)
    got = zarr.open_array(out / "0" / "probabilities", mode="r")[...]
    # Same padding: blend windows stay inside the image, as a whole-image pass with the
    # model's own zero padding sees it (margin 0), not the mirrored image.
    expected = whole_image_probabilities(net, image, margin=0)
    err = np.abs(got - expected).max(axis=0)
    # Measured on this fixture (window 64, overlap 0.5): mean 0.0022, max 0.078; 48 px windows
    # give 0.012 / 0.40, 96 px 0.0005 / 0.013. Bounds with headroom, not equality.
    assert err.mean() < 0.01
    assert err.max() < 0.2
    # No seam: pixels on tile (chunk) borders and on window borders are no worse than the rest.
    stride, margin = 32, 0  # of window 64, overlap 0.5, multiple 4, inside the image
    for on in (seam_masks(err.shape, 48), seam_masks(err.shape, stride, -margin)):
        assert err[on].mean() <= 2 * err[~on].mean()


def test_a_blend_window_off_the_size_rule_is_the_next_one_on_it(source, tmp_path):
    """Same padding, halo 23 and multiple 4: a 30 px window is 32, not grown by the halo."""
    out = blend(source, tmp_path / "r.zarr", unet("same"), tile=48, window=30)
    assert read_meta(out).config.window == 32


def test_blend_mode_does_not_depend_on_tiling(source, tmp_path):
    """Windows lie on one global lattice, so chunk borders cannot show: any tiling agrees."""
    net = unet("same")
    a = zarr.open_array(blend(source, tmp_path / "a.zarr", net, tile=32) / "0/probabilities")[...]
    b = zarr.open_array(blend(source, tmp_path / "b.zarr", net, tile=96) / "0/probabilities")[...]
    np.testing.assert_allclose(a, b, rtol=0, atol=1e-6)


def test_open_result_and_open_zarr_agree_with_memory(source, image, tmp_path):
    net = unet("valid")
    expected = whole_image_probabilities(net, image, 0)
    out = segpipe.segment(
        source, tmp_path / "r.zarr", net, tile=64, scheduler="sync", pixel_size_um=0.25
    )
    ds = segpipe.open_result(out)
    plain = xr.open_zarr(out, group="0")
    for d in (ds, plain):
        assert d["mask"].dims == ("y", "x")
        assert d["probabilities"].dims == ("class", "y", "x")
        assert list(d["class"].values) == list(CLASSES)
        assert d["y"].attrs["units"] == "micrometer"
        np.testing.assert_allclose(d["x"].values[:3], [0.0, 0.25, 0.5])
        assert d["probabilities"].chunks is not None, "lazy, dask-backed"
        np.testing.assert_allclose(
            d["probabilities"].values.astype(np.float32), expected, atol=1e-3
        )
        nucleus = d["probabilities"].sel({"class": "nucleus"})
        np.testing.assert_allclose(nucleus.values.astype(np.float32), expected[2], atol=1e-3)
    meta = ds.attrs["segpipe"]
    assert meta["complete"] is True
    assert meta["model_sha256"] == models.fingerprint(net)
    assert meta["tiles_total"] == 3 * 4
    assert sum(meta["class_pixels"]) == image.shape[0] * image.shape[1]
    counts = np.bincount(ds["mask"].values.ravel(), minlength=3)
    assert meta["class_pixels"] == counts.tolist()
    np.testing.assert_allclose(meta["class_area_um2"], counts * 0.0625)


class FailingUNet(models.unet.UNet):
    """The same network (same fingerprint) whose forward fails after ``budget`` calls."""

    budget = 10**9

    def forward(self, x):
        FailingUNet.budget -= 1
        if FailingUNet.budget < 0:
            raise RuntimeError("simulated crash")
        return super().forward(x)


def test_interrupted_run_resumes_only_missing_tiles(source, image, tmp_path):
    net = unet("valid")
    flaky = FailingUNet(net.config, class_names=CLASSES)
    flaky.load_state_dict(net.state_dict())
    flaky.eval()
    assert models.fingerprint(flaky) == models.fingerprint(net)
    out = tmp_path / "r.zarr"

    # The predictor's memory probe (one small forward) and five one-window blocks succeed,
    # the sixth crashes.
    FailingUNet.budget = 6
    with pytest.raises(RuntimeError, match="simulated crash"):
        segpipe.segment(source, out, flaky, tile=32, task_tiles=1, batch_size=1, scheduler="sync")
    meta = read_meta(out)
    assert meta.complete is False
    with pytest.raises(IncompleteResultError, match="incomplete"):
        segpipe.open_result(out)

    segpipe.segment(source, out, net, tile=32, task_tiles=1, scheduler="sync")
    meta = read_meta(out)
    total = 5 * 7  # ceil(150/32) x ceil(203/32)
    assert meta.complete is True
    assert meta.summary is not None
    # The result's tiles, whichever run computed them; 5 of them this run found done.
    assert (meta.summary.tiles_total, meta.summary.tiles_computed, meta.summary.tiles_skipped) == (
        total,
        total,
        5,
    )
    expected = whole_image_probabilities(net, image, 0)
    got = segpipe.open_result(out)["probabilities"].values.astype(np.float32)
    assert np.abs(got - expected).max() <= 1e-3

    # A complete result is not recomputed.
    segpipe.segment(source, out, net, tile=32, task_tiles=1, scheduler="sync")
    assert read_meta(out).finished == meta.finished


def test_segment_closes_the_image_it_opened_and_only_that(source, tmp_path, monkeypatch):
    """An image given by path is opened by segment and closed when the run ends, finished or
    refused; a Reader given is the caller's."""
    segment_module = importlib.import_module("segpipe.execution.segment")
    open_image, closed = segment_module.open_image, []

    def spied(*args, **kwargs):
        reader = open_image(*args, **kwargs)
        reader.close = lambda: closed.append(reader)
        return reader

    monkeypatch.setattr(segment_module, "open_image", spied)
    net = unet("valid")
    segpipe.segment(source, tmp_path / "a.zarr", net, tile=32, scheduler="sync")
    assert len(closed) == 1
    with pytest.raises(ValueError, match="level 3 does not exist"):
        segpipe.segment(source, tmp_path / "b.zarr", net, tile=32, level=3, scheduler="sync")
    assert len(closed) == 2
    # The level just past the last: one off, it was an IndexError naming nothing.
    probe = open_image(source)
    last = len(probe.level_shapes)
    probe.close()
    with pytest.raises(ValueError, match=rf"level {last} does not exist \(levels 0\.\."):
        segpipe.segment(source, tmp_path / "b.zarr", net, tile=32, level=last, scheduler="sync")
    assert len(closed) == 3
    given = spied(source)
    segpipe.segment(given, tmp_path / "c.zarr", net, tile=32, scheduler="sync")
    assert len(closed) == 3, "the caller's reader is left open"


def test_keywords_and_a_config_make_the_same_result(source, tmp_path):
    from segpipe import SegmentConfig

    net = unet("valid")
    by_keywords = segpipe.segment(source, tmp_path / "k.zarr", net, tile=32, scheduler="sync")
    config = SegmentConfig(tile=32, scheduler="sync")
    by_config = segpipe.segment(source, tmp_path / "c.zarr", net, config)
    assert read_meta(by_keywords).config == read_meta(by_config).config
    resolved = {"amp": None, "foreground": "auto", "level": None}  # what segment() decides
    assert read_meta(by_config).config.replace(**resolved) == config
    np.testing.assert_array_equal(
        zarr.open_array(by_keywords / "0" / "probabilities")[...],
        zarr.open_array(by_config / "0" / "probabilities")[...],
    )
    # The same result again: found complete, whichever way the settings come.
    finished = read_meta(by_config).finished
    segpipe.segment(source, by_config, net, tile=32, scheduler="sync")
    assert read_meta(by_config).finished == finished


def test_a_module_is_recorded_by_the_name_given(source, tmp_path):
    net = unet("valid")
    plain = segpipe.segment(source, tmp_path / "a.zarr", net, tile=32, scheduler="sync")
    assert read_meta(plain).model_name == "unet", "no name given: the architecture's"
    named = segpipe.segment(
        source, tmp_path / "b.zarr", net, tile=32, scheduler="sync", model_name="my-unet"
    )
    assert read_meta(named).model_name == "my-unet"
    assert read_meta(named).model_sha256 == models.fingerprint(net)


def test_refuses_to_clobber(source, tmp_path):
    net = unet("valid")
    user_dir = tmp_path / "precious"
    user_dir.mkdir()
    (user_dir / "notes.txt").write_text("mine")
    with pytest.raises(ResultMismatchError, match="not a segpipe result"):
        segpipe.segment(source, user_dir, net, tile=32, scheduler="sync", overwrite=True)
    assert (user_dir / "notes.txt").read_text() == "mine"

    out = segpipe.segment(source, tmp_path / "r.zarr", net, tile=32, scheduler="sync")
    with pytest.raises(ResultMismatchError, match=r"differs in: tile: 32 stored, 64 in this run\)"):
        segpipe.segment(source, out, net, tile=64, scheduler="sync")
    segpipe.segment(source, out, net, tile=64, scheduler="sync", overwrite=True)
    assert read_meta(out).tile == 64


def test_an_output_holding_the_source_is_refused_before_any_work(image, tmp_path, monkeypatch):
    """Refused after the image's foreground mask was computed (minutes for a slide) and the
    model loaded: now before either."""
    import segpipe.execution.segment as run

    scans = tmp_path / "scans"
    scans.mkdir()
    source = write_zarr_image(scans / "image.zarr", image)

    def no_work(*args, **kwargs):
        raise AssertionError("work done before the output was checked")

    monkeypatch.setattr(run, "foreground_of", no_work)
    monkeypatch.setattr(run.models, "load", no_work)
    for output, relation in [(scans, "holds"), (source, "is"), (source / "r.zarr", "is inside")]:
        with pytest.raises(ResultMismatchError, match=f"{relation} the source image"):
            segpipe.segment(source, output, "tissue-unet", foreground="tissue", scheduler="sync")
    assert sorted(p.name for p in scans.iterdir()) == ["image.zarr"]


def test_a_result_holding_the_runs_checkpoint_is_not_replaced(image, tmp_path, random_checkpoint):
    """The model's checkpoint filed in the result a run replaces (named otherwise by
    model_name, so the result's identity does not name it): the overwrite deleted it, then
    recorded a result made of a file that no longer existed."""

    source = write_zarr_image(tmp_path / "image.zarr", image)
    out = segpipe.segment(source, tmp_path / "r.zarr", random_checkpoint, scheduler="sync")
    inside = shutil.copy(random_checkpoint, out / "model.pt")
    with pytest.raises(ResultMismatchError, match=re.escape(f"holds the input {inside}")):
        segpipe.segment(source, out, inside, model_name="mine", tile=128, overwrite=True,
                        scheduler="sync")  # fmt: skip
    assert os.path.isfile(inside)


class Shaped:
    shape = (8, 8, 3)


class Unread:
    path, pixel_size_um, dtype = "<unread>", None, np.dtype(np.uint8)


class DuckReader:
    """What a run reads of a reader, without the rest of the Reader protocol (no ``shape``,
    ``level``): such readers segmented, then a runtime Protocol check refused them."""

    def __init__(self, image):
        self._inner = ArrayReader(image)
        self.path, self.pixel_size_um = "<duck>", None
        self.level_shapes, self.dtype = self._inner.level_shapes, self._inner.dtype

    def read(self, y0, y1, x0, x1, level=0):
        return self._inner.read(y0, y1, x0, x1, level)


def test_a_duck_typed_reader_segments(image, tmp_path):
    net = unet("valid")
    small = image[:64, :64]
    out = segpipe.segment(DuckReader(small), tmp_path / "r.zarr", net, tile=32, scheduler="sync")
    got = zarr.open_array(out / "0" / "probabilities", mode="r")[...].astype(np.float32)
    np.testing.assert_allclose(got, whole_image_probabilities(net, small, 0), atol=1e-3)
    # A tissue mask reads its level(k): without one it failed with a bare AttributeError.
    with pytest.raises(TypeError, match=r"<duck>: a foreground mask reads .*level\(k\), .*"
                       r"\(DuckReader\) lacks: .*foreground='none'"):  # fmt: skip
        segpipe.segment(
            DuckReader(small), tmp_path / "t.zarr", net, tile=32, foreground="tissue",
            scheduler="sync",
        )  # fmt: skip


@pytest.mark.parametrize(
    ("arguments", "message"),
    [
        ({"config": {"tile": 32}}, "config must be a SegmentConfig, got dict"),
        ({"source": np.zeros((8, 8, 3), np.uint8)}, "source must be .* got ndarray .*ArrayReader"),
        ({"source": da.zeros((8, 8, 3), np.uint8)}, "got Array .*ArrayReader"),
        ({"source": None}, "source must be an image path or a Reader, got NoneType"),
        # Not an array: no ArrayReader hint; a would-be reader hears what it lacks.
        ({"source": Shaped()}, r"a Reader, got Shaped$"),
        ({"source": Unread()}, r"got Unread \(a Reader needs level_shapes, read\)$"),
        ({"output": None}, "output must be a path, got NoneType"),
        ({"model": 3}, "model must be .* got int"),
    ],
)
def test_a_wrong_argument_type_is_named_before_any_work(source, tmp_path, arguments, message):
    """A dict config failed deep in the run with 'dict' object has no attribute 'replace', an
    array source with no attribute 'path'."""
    given = {"source": source, "output": tmp_path / "r.zarr", "model": "tissue-unet"}
    given.update(arguments)
    with pytest.raises(TypeError, match=message):
        segpipe.segment(**given, scheduler="sync")
    assert not (tmp_path / "r.zarr").exists()


@pytest.mark.parametrize("own", [None, 0.25])
def test_a_pixel_size_set_over_a_readers_own_is_refused(image, tmp_path, own):
    """Only a path was opened with pixel_size_um: a reader's own size (none, or another)
    chose the level, the foreground and the areas, while the result recorded the setting."""
    reader = ArrayReader(image, pixel_size_um=own)
    out = tmp_path / "r.zarr"
    with pytest.raises(ValueError, match=rf"pixel_size_um=0\.5 set, .*reader.*\({own} um/px\)"):
        segpipe.segment(reader, out, unet("valid"), tile=32, pixel_size_um=0.5, scheduler="sync")
    assert not out.exists()
    if own is not None:  # the reader's own size, given again, is no conflict
        segpipe.segment(reader, out, unet("valid"), tile=32, pixel_size_um=own, scheduler="sync")
        assert read_meta(out).pixel_size_um == own


def test_exact_mode_refuses_tile_statistics(source, tmp_path):
    net = unet("valid")
    net.head.conv = torch.nn.Sequential(torch.nn.GroupNorm(1, 4), net.head.conv)
    with pytest.raises(ValueError, match=r"per-tile statistics.*mode=.blend."):
        segpipe.segment(source, tmp_path / "r.zarr", net, tile=32, scheduler="sync")
    assert not (tmp_path / "r.zarr").exists()


def test_tile_must_fit_the_model(source, tmp_path):
    with pytest.raises(ValueError, match="multiple of the model's size multiple 4; try 36"):
        segpipe.segment(source, tmp_path / "r.zarr", unet("valid"), tile=33, scheduler="sync")


@pytest.mark.integration
def test_local_cluster_matches_in_process(source, image, tmp_path):
    net = unet("valid")
    expected = whole_image_probabilities(net, image, 0)
    out = segpipe.segment(
        source, tmp_path / "r.zarr", net, tile=32, n_workers=2, probability_dtype="float32"
    )
    got = zarr.open_array(out / "0" / "probabilities", mode="r")[...]
    assert np.abs(got - expected).max() <= 1e-4
    assert read_meta(out).summary.tiles_computed == 35


# --- a source replaced at its path ------------------------------------------------------------

SAME = dict(tile=32, task_tiles=1, scheduler="sync", probability_dtype="float32")


def interrupted(source, out, net, windows=6):
    """Start a run of ``net`` that crashes after the memory probe and ``windows - 1`` blocks."""
    flaky = FailingUNet(net.config, class_names=CLASSES)
    flaky.load_state_dict(net.state_dict())
    flaky.eval()
    FailingUNet.budget = windows
    try:
        with pytest.raises(RuntimeError, match="simulated crash"):
            segpipe.segment(source, out, flaky, batch_size=1, **SAME)
    finally:
        FailingUNet.budget = 10**9
    assert not read_meta(out).complete


def rewrite(path, pixels, chunk=64):
    """Save ``pixels`` at ``path`` in place of what was there (a re-scan under its name)."""
    shutil.rmtree(path)
    arr = zarr.create_array(
        path, shape=pixels.shape, chunks=(chunk, chunk, 3), dtype=pixels.dtype,
        dimension_names=("y", "x", "c"),
    )  # fmt: skip
    arr[...] = pixels


def test_an_unfinished_result_of_a_replaced_source_is_refused(source, image, tmp_path):
    """Another image of the same shape saved at the source's path would mix two images' tiles
    in one result if resumed: refused naming the key; overwrite makes the new image's result."""
    net, src, out = unet("valid"), tmp_path / "image.zarr", tmp_path / "r.zarr"
    shutil.copytree(source, src)
    interrupted(src, out, net)
    other = image[::-1].copy()  # same shape, same values, other pixels
    rewrite(src, other)
    with pytest.raises(ResultMismatchError, match=r"differs in: source_sha256 \(the source's pix"):
        segpipe.segment(src, out, net, **SAME)
    assert not read_meta(out).complete  # left as it was
    segpipe.segment(src, out, net, overwrite=True, **SAME)
    meta = read_meta(out)
    assert meta.summary.tiles_skipped == 0
    got = zarr.open_array(out / "0" / "probabilities", mode="r")[...]
    assert np.abs(got - whole_image_probabilities(net, other, 0)).max() <= 1e-4


def test_a_complete_result_of_a_replaced_source_is_not_returned(source, image, tmp_path):
    net, src, out = unet("valid"), tmp_path / "image.zarr", tmp_path / "r.zarr"
    shutil.copytree(source, src)
    finished = read_meta(segpipe.segment(src, out, net, **SAME)).finished
    rewrite(src, np.ascontiguousarray(image[:, ::-1]))
    with pytest.raises(ResultMismatchError, match="source_sha256"):
        segpipe.segment(src, out, net, **SAME)
    assert read_meta(out).finished == finished


def test_a_source_saved_again_with_the_same_pixels_resumes_and_returns(source, image, tmp_path):
    """Equal pixels are the same source, however they are stored (other chunks here)."""
    net, src, out = unet("valid"), tmp_path / "image.zarr", tmp_path / "r.zarr"
    shutil.copytree(source, src)
    interrupted(src, out, net)
    rewrite(src, image, chunk=32)
    segpipe.segment(src, out, net, **SAME)
    meta = read_meta(out)
    assert meta.complete and meta.summary.tiles_skipped == 5
    assert meta.source_sha256 == pixel_sample_sha256(ArrayReader(image))  # in any format
    rewrite(src, image, chunk=48)
    segpipe.segment(src, out, net, **SAME)
    assert read_meta(out).finished == meta.finished  # returned as it is


def test_a_result_from_before_source_sha256_still_resumes(source, image, tmp_path):
    """An unfinished result whose identity has no source_sha256 (written by a release before
    it) is resumed, not refused as another result, and keeps the identity it had."""
    net, out = unet("valid"), tmp_path / "r.zarr"
    interrupted(source, out, net)
    group = zarr.open_group(out, mode="r+")
    attrs = group.attrs["segpipe"]
    identity = {k: v for k, v in attrs["identity"].items() if k != "source_sha256"}
    assert identity != attrs["identity"]
    group.attrs["segpipe"] = {**attrs, "identity": identity}
    segpipe.segment(source, out, net, **SAME)
    meta = read_meta(out)
    assert meta.complete and meta.summary.tiles_skipped == 5 and meta.source_sha256 is None
    got = zarr.open_array(out / "0" / "probabilities", mode="r")[...]
    assert np.abs(got - whole_image_probabilities(net, image, 0)).max() <= 1e-4
    segpipe.segment(source, out, net, **SAME)
    assert read_meta(out).finished == meta.finished
