"""The Dask layer and the stitcher it shares with in-memory prediction: mirrored reads, the
overlap-tile stitcher against the pipeline and a whole-image pass, cluster layout,
per-worker models, external schedulers."""

import gc
import itertools
import os
import re
import subprocess
import sys
import threading
import time
import weakref
from concurrent.futures import Future

import distributed
import numpy as np
import pytest
import torch
import zarr
from conftest import blocks_run_by
from hypothesis import given, settings
from hypothesis import strategies as st

import segpipe
from segpipe import models
from segpipe.execution import cluster, plans, tasks
from segpipe.execution import stitching as stitching_module
from segpipe.execution.cluster import ClusterPlan, plan_local_cluster
from segpipe.execution.lease import RunEnded
from segpipe.execution.pipeline import ModelStage, StageClosed
from segpipe.execution.predictor import InferenceConfig, Predictor, activation_bytes_per_pixel
from segpipe.execution.stitching import (
    PredictionError,
    Stitching,
    bounds,
    model_errors,
    overlap_groups,
    predict_labels,
    predict_parts,
    predict_probabilities,
    predict_region,
)
from segpipe.geometry.blending import blend_lattice
from segpipe.geometry.pixels import to_float01
from segpipe.geometry.tiling import Box, Geometry, exact_side, exact_windows, tile_grid
from segpipe.io.readers import ArrayReader, ImageReadError, open_image, read_mirrored
from segpipe.models.contract import measure_contract
from segpipe.results import read_meta, tiles_done
from segpipe.synthetic import tissue_slide

CLASSES = ("background", "tissue", "nucleus")


@pytest.fixture(scope="module")
def reader(tmp_path_factory):
    image = np.random.default_rng(0).integers(0, 256, (37, 53, 3), dtype=np.uint8)
    path = tmp_path_factory.mktemp("img") / "image.zarr"
    arr = zarr.create_array(
        path, shape=image.shape, chunks=(16, 16, 3), dtype="uint8", dimension_names=("y", "x", "c")
    )
    arr[...] = image
    return open_image(path), image


@pytest.fixture(autouse=True)
def one_torch_thread():
    # Tiny models gain nothing from threads; restore the setting for other tests.
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


def tiny_unet(seed: int = 0) -> models.SegmentationModel:
    """A random valid-padding U-Net in eval mode."""
    torch.manual_seed(seed)
    net = models.build(
        "unet", class_names=CLASSES, in_channels=3, width=4, depth=2, padding="valid", dropout=0.0
    )
    return net.eval()


@pytest.mark.parametrize("in_memory", [False, True], ids=["zarr", "array"])
@pytest.mark.parametrize(
    "box",
    [
        Box(-5, 10, -7, 9),
        Box(30, 45, 40, 70),
        Box(-40, 80, -60, 110),
        Box(3, 9, 4, 8),
        Box(5, 20, -7, 9),  # inside on y only
        Box(-5, 10, 4, 30),  # inside on x only
    ],
)
def test_read_mirrored_equals_numpy_reflect(reader, box, in_memory):
    r, image = reader
    source = ArrayReader(image) if in_memory else r
    far = 200
    padded = np.pad(image, ((far, far), (far, far), (0, 0)), mode="reflect")
    expected = padded[box.y0 + far : box.y1 + far, box.x0 + far : box.x1 + far]
    np.testing.assert_array_equal(read_mirrored(source, box), expected)


# -- the one overlap-tile stitcher ------------------------------------------------------------


@pytest.mark.parametrize(
    ("mode", "tile", "task_tiles"),
    [("exact", 8, 1), ("exact", 16, 2), ("exact", 24, 3), ("blend", 16, 2)],
)
def test_in_memory_stitcher_equals_the_pipeline(reader, tmp_path, mode, tile, task_tiles):
    """The stitcher over a whole in-memory image gives the pipeline's probabilities: the same
    mirroring, crops and sinks, whatever the pipeline's blocks; to the bit in blend mode
    (the same windows of one lattice)."""
    r, image = reader
    net = tiny_unet()
    settings = {"window": 16, "overlap": 0.25} if mode == "blend" else {}
    out = segpipe.segment(
        r,
        tmp_path / "r.zarr",
        net,
        tile=tile,
        task_tiles=task_tiles,
        mode=mode,
        probability_dtype="float32",
        device="cpu",
        scheduler="sync",
        **settings,
    )
    piped = segpipe.open_result(out)["probabilities"].values
    shape = image.shape[:2]
    window = read_meta(out).config.window  # blend: as segment() snapped it to the model
    lattice = blend_lattice(shape, net.geometry, window=window, overlap=0.25) if window else None
    # One window a call, as the pipeline's narrow passes run them on a CPU of two cores or
    # more. On some CPUs oneDNN's convolutions round differently for other batch sizes and
    # window shapes (an AMD EPYC without AVX-512: batches of 4 and of 1 differ by up to 7e-6),
    # and the pipeline's exact windows cover its blocks: equal to float rounding there.
    stitched = predict_region(
        list(tile_grid(shape, tile)),
        ArrayReader(image),
        Predictor(net, InferenceConfig(device="cpu", amp=False)),
        Stitching(mode, tile, net.geometry, len(CLASSES), lattice=lattice),
        batch_size=1,
    )
    assert stitched.region == Box(0, shape[0], 0, shape[1])
    if mode == "blend":
        np.testing.assert_array_equal(stitched.probabilities, piped)
    np.testing.assert_allclose(stitched.probabilities, piped, rtol=0, atol=2e-5)
    if mode == "exact":
        # The model as it is (training's validation) differs only by float rounding: the
        # pipeline runs it channels-last.
        np.testing.assert_allclose(
            predict_probabilities(tiny_unet(), image, tile=tile), piped, atol=1e-5
        )


def whole_image_pass(model, image: np.ndarray) -> np.ndarray:
    """Probabilities (C, Y, X) of one forward pass over the whole image, mirrored by the halo
    (and to a size the model accepts), cropped back: the reference of exact mode."""
    g = model.geometry
    (ny, nx), halo = image.shape[:2], g.halo
    if g.shrinks:
        py, px = g.input_size(ny) - ny - halo, g.input_size(nx) - nx - halo
    else:  # same padding: the halo on both sides, then to the multiple; the crop cuts it off
        py, px = (halo + (-(n + 2 * halo)) % g.multiple for n in (ny, nx))
    padded = np.pad(image, ((halo, py), (halo, px), (0, 0)), mode="reflect")
    x = torch.from_numpy(to_float01(padded).transpose(2, 0, 1)[None].copy())
    with torch.inference_mode():
        p = torch.softmax(model(x), 1)[0].numpy()
    c = g.crop
    return p[:, c : c + ny, c : c + nx]


@pytest.mark.parametrize("side", [8, 16, 24, 48])
@pytest.mark.parametrize("task_tiles", [2, 3])
def test_windows_larger_than_tiles_equal_a_whole_image_pass(reader, tmp_path, side, task_tiles):
    """Exact mode with one window per block (or per 2 x 2, 3 x 3 tiles): the halo is paid
    once per window, and the result still equals one pass over the whole mirrored image."""
    r, image = reader
    net = tiny_unet(seed=2)
    tile = 8
    stitched = predict_region(
        list(tile_grid(image.shape[:2], tile)),
        ArrayReader(image),
        Predictor(net, InferenceConfig(device="cpu", amp=False)),
        Stitching("exact", tile, net.geometry, len(CLASSES), exact_side=side),
    )
    reference = whole_image_pass(net, image)
    np.testing.assert_allclose(stitched.probabilities, reference, atol=2e-6)
    # Through the pipeline, blocks of task_tiles^2 tiles with windows up to a block each.
    out = segpipe.segment(
        r,
        tmp_path / "r.zarr",
        net,
        tile=tile,
        task_tiles=task_tiles,
        probability_dtype="float32",
        device="cpu",
        scheduler="sync",
    )
    np.testing.assert_allclose(
        segpipe.open_result(out)["probabilities"].values, reference, atol=2e-6
    )


@pytest.fixture
def sides(monkeypatch: pytest.MonkeyPatch) -> list[int | None]:
    """The exact window side of every region a task predicts, as the tasks see it."""
    seen: list[int | None] = []
    predict = tasks.predict_parts

    def spy(tiles, reader, predictor, job, **kwargs):
        seen.append(job.exact_side)
        return predict(tiles, reader, predictor, job, **kwargs)

    monkeypatch.setattr(tasks, "predict_parts", spy)
    return seen


def test_segment_blocks_take_the_largest_window_memory_allows(reader, tmp_path, monkeypatch, sides):
    r, _ = reader
    net = tiny_unet()
    segpipe.segment(r, tmp_path / "a.zarr", net, tile=8, task_tiles=4, scheduler="sync")
    # 37 x 53 px in blocks of 32: the CPU's budget holds the whole level, so every block (the
    # last, 5 x 21 px, too) has one window, cut to it: 2 x 2 blocks.
    assert set(sides) == {56}
    assert read_meta(tmp_path / "a.zarr").summary.windows == 4
    sides.clear()
    monkeypatch.setattr(Predictor, "memory_budget", lambda self: 1)
    segpipe.segment(r, tmp_path / "b.zarr", net, tile=8, task_tiles=4, scheduler="sync")
    assert set(sides) == {8}, "no room: one window per tile"


def test_a_run_decides_its_window_side_once(reader, tmp_path, monkeypatch, sides):
    """A GPU's free memory shrinks as its allocator caches: blocks that each measured it
    would cut their windows in different shapes. The run measures it once, before any."""
    r, _ = reader
    budgets = iter([10**9])  # room for a block's window at first, then none
    monkeypatch.setattr(Predictor, "memory_budget", lambda self: next(budgets, 1))
    segpipe.segment(r, tmp_path / "a.zarr", tiny_unet(), tile=8, task_tiles=4, scheduler="sync")
    assert len(sides) == 4 and set(sides) == {56}
    assert read_meta(tmp_path / "a.zarr").summary.windows == 4, "a window per block"


@settings(max_examples=200, deadline=None)
@given(
    st.integers(1, 6),
    st.integers(1, 6),
    st.integers(1, 6),
    st.integers(1, 6),
    st.integers(1, 60) | st.just(10**9),
)
def test_a_side_for_the_run_cuts_each_block_as_a_side_of_its_own(by, bx, ey, ex, budget):
    """The run's side (up to the whole level) gives every block the windows the side of the
    block alone would: the same windows as when each block measured the budget itself."""
    g = Geometry(halo=6, multiple=4, input_offset=0, shrinks=True)
    tile, task_tiles = 8, 6
    shape = (task_tiles * tile + ey * tile - 3, task_tiles * tile + ex * tile - 5)
    grid = tile_grid(shape, tile)
    blocks = [tasks.Block((tuple(b),)) for b in grid.blocks(task_tiles)]
    # A resumed run whose only block left is the top-left by x bx tiles of one.
    part = tuple(t for t in blocks[0].tiles if t.index[0] < by and t.index[1] < bx)
    small = [tasks.Block((part,))]
    job = tasks.Job(
        reader=ArrayReader(np.zeros((*shape, 1), np.uint8)), level=0, output="",
        predictor_key="", mode="exact", tile=tile, geometry=g, num_classes=2,
    )  # fmt: skip
    side = tasks.with_exact_side(job, budget * 100).exact_side
    for run_blocks in (blocks, small):
        for b in run_blocks:
            region = bounds([t.box for t in b.tiles])
            own = exact_side(region, tile, g, budget * 100)
            assert exact_windows(region, side, g) == exact_windows(region, own, g)


def test_a_float_model_takes_floats_in_the_range_it_was_trained_on(tmp_path) -> None:
    """A contract that scales floats from their own range (measure_contract's percentiles for
    floats outside [0, 1]) takes them so; [0, 1] holds for the dtype rule, NaN for all."""
    net = tiny_unet()
    image = np.random.default_rng(0).uniform(0, 3000, (24, 40, 3)).astype(np.float32)
    net.pixel_contract = measure_contract([image])
    assert net.pixel_contract.scaling == "percentile"
    out = segpipe.segment(
        ArrayReader(image), tmp_path / "f.zarr", net, tile=8, device="cpu", scheduler="sync",
        probability_dtype="float32",
    )  # fmt: skip
    np.testing.assert_allclose(
        segpipe.open_result(out)["probabilities"].values,
        predict_probabilities(net, image, tile=8),
        atol=1e-5,
    )
    with pytest.raises(ImageReadError, match=r"must lie in \[0, 1\]"):
        predict_probabilities(tiny_unet(), image, tile=8)
    image[3, 5] = np.nan
    with pytest.raises(ImageReadError, match="NaN"):
        predict_probabilities(net, image, tile=8)


def test_predict_labels_equals_one_pass_over_the_mirrored_image() -> None:
    model = tiny_unet(seed=1)
    g = model.geometry
    image = tissue_slide((56, 72), seed=3).image
    tile = 16
    pred = predict_labels(model, image, tile=tile, batch_size=3)
    assert pred.shape == (56, 72)
    assert pred.dtype == np.uint8
    # Reference: pad once by the halo (and to an accepted size), run the whole image, crop.
    ny = g.input_size(56) - g.halo
    nx = g.input_size(72) - g.halo
    padded = np.pad(image, ((g.halo, ny - 56), (g.halo, nx - 72), (0, 0)), mode="reflect")
    x = torch.from_numpy(padded.transpose(2, 0, 1)[None].copy()).float() / 255
    with torch.inference_mode():
        whole = model(x).argmax(1)[0, :56, :72].numpy()
    # Equal up to float summation order flipping a near-tie now and then.
    assert np.mean(pred == whole) > 0.999


def test_sixteen_bit_images_are_scaled_like_eight_bit_ones() -> None:
    """Validation scales pixels by their dtype (pixels.to_float01), not by 255."""
    model = tiny_unet(seed=1)
    image = tissue_slide((40, 48), seed=4).image
    wide = image.astype(np.uint16) * 257  # the same intensities on the 16-bit scale
    np.testing.assert_array_equal(
        predict_labels(model, wide, tile=16), predict_labels(model, image, tile=16)
    )


def test_in_memory_prediction_leaves_the_model_as_it_is() -> None:
    """Training validates with it: the model keeps its mode, memory layout and weights."""
    model = tiny_unet().train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    predict_labels(model, tissue_slide(32, seed=2).image, tile=16)
    assert model.training
    for key, value in model.state_dict().items():
        assert value.is_contiguous(), key
        torch.testing.assert_close(value, before[key], rtol=0, atol=0)


def test_segment_leaves_the_callers_model_as_it_is(reader, tmp_path) -> None:
    """Segmenting mid-training: the module keeps its mode (Dropout on), memory layout and
    weights; the run's predictor works on a copy, as a worker's does on the pickled one."""
    r, _ = reader
    model = tiny_unet().train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    segpipe.segment(r, tmp_path / "r.zarr", model, tile=8, device="cpu", scheduler="sync")
    assert all(m.training for m in model.modules())
    for key, value in model.state_dict().items():
        assert value.is_contiguous(), f"{key} made channels-last"
        torch.testing.assert_close(value, before[key], rtol=0, atol=0)


def test_a_module_that_cannot_be_copied_segments(reader, tmp_path) -> None:
    """The run uses the caller's module itself (given back as it was), not a copy: one that
    holds a lock, which deepcopy refuses, segments like any other."""
    r, image = reader
    model = tiny_unet().train()
    model.lock = threading.Lock()
    out = segpipe.segment(
        r, tmp_path / "r.zarr", model, tile=8, device="cpu", scheduler="sync",
        probability_dtype="float32",
    )  # fmt: skip
    assert all(m.training for m in model.modules())
    np.testing.assert_allclose(
        segpipe.open_result(out)["probabilities"].values,
        predict_probabilities(tiny_unet(), image, tile=8),
        atol=1e-5,
    )


@pytest.mark.parametrize(
    ("device", "gpu", "lent_on"), [("cpu", True, "cpu"), ("auto", False, "cpu")]
)
def test_a_module_is_lent_on_the_device_the_run_names(
    reader, tmp_path, monkeypatch, device, gpu, lent_on
) -> None:
    """The device a run holds a shared module on is the one it runs on: "cpu" on a machine
    with a GPU too (a run on "cuda" beside it must be refused)."""
    lent, give = [], cluster.model_given_back

    def spy(model, device=None):
        lent.append(str(device))
        return give(model, device)

    monkeypatch.setattr(cluster, "model_given_back", spy)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: gpu)
    r, _ = reader
    segpipe.segment(r, tmp_path / "r.zarr", tiny_unet(), tile=8, device=device, scheduler="sync")
    assert lent == [lent_on]


def test_segmenting_under_inference_mode_leaves_the_model_trainable(reader, tmp_path) -> None:
    """A caller inside ``torch.inference_mode()`` (validating mid-training): the lent module's
    parameters and buffers are put on their device and back as ordinary tensors, not inference
    tensors the next backward could not save."""
    r, _ = reader
    model = tiny_unet().train()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    with torch.inference_mode():
        segpipe.segment(r, tmp_path / "r.zarr", model, tile=8, device="cpu", scheduler="sync")
    assert not any(t.is_inference() for t in [*model.parameters(), *model.buffers()])
    side = model.geometry.input_size(8)
    model(torch.rand(1, 3, side, side)).sum().backward()
    optimizer.step()


def test_bytes_per_pixel_count_only_the_probing_threads_forward() -> None:
    """Runs side by side share the caller's module: another run's forward pass on its own
    model thread, while this one probes, adds nothing to this one's bytes per pixel."""
    model = tiny_unet()
    alone = activation_bytes_per_pixel(model, torch.device("cpu"), 3)
    side = model.geometry.input_size(8)
    prober = threading.get_ident()

    def forward() -> None:
        with torch.inference_mode():
            model(torch.rand(1, 3, side, side))

    def another_runs_forward(module: torch.nn.Module, args: object) -> None:
        if threading.get_ident() == prober:  # mid-probe: a whole pass on another thread
            other = threading.Thread(target=forward)
            other.start()
            other.join()

    first_leaf = next(m for m in model.modules() if not list(m.children()))
    handle = first_leaf.register_forward_pre_hook(another_runs_forward)
    try:
        assert activation_bytes_per_pixel(model, torch.device("cpu"), 3) == alone
    finally:
        handle.remove()


class PlainModule(torch.nn.Module):
    """A module as segment() takes one: geometry and classes, nothing said of its channels."""

    def __init__(self, net: torch.nn.Module) -> None:
        super().__init__()
        self.net, self.geometry, self.num_classes = net, net.geometry, net.num_classes

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


@pytest.mark.parametrize("channels", [1, 4])
@pytest.mark.parametrize("mode", ["exact", "blend"])
def test_a_module_that_does_not_say_its_channels_segments_any_image(tmp_path, channels, mode):
    """The memory probe runs the model on the image's channels, not on 3: a plain module
    without ``in_channels`` segments a grey or a 4-band image like one pass over it."""
    torch.manual_seed(channels)
    net = models.build(
        "unet", class_names=CLASSES, in_channels=channels, width=4, depth=2, padding="valid",
        dropout=0.0,
    ).eval()  # fmt: skip
    model = PlainModule(net)
    assert not hasattr(model, "in_channels")
    image = np.random.default_rng(channels).integers(0, 256, (40, 30, channels), dtype=np.uint8)
    out = segpipe.segment(
        ArrayReader(image, name="img.tif"), tmp_path / "r.zarr", model, tile=16, mode=mode,
        probability_dtype="float32", device="cpu", scheduler="sync",
    )  # fmt: skip
    np.testing.assert_allclose(
        segpipe.open_result(out)["probabilities"].values, whole_image_pass(net, image), atol=1e-5
    )


def float_geotiff(path, image: np.ndarray, nodata: float | None) -> None:
    """``image`` (Y, X, C) float32 as a tiled GeoTIFF declaring ``nodata``."""
    import rasterio
    from rasterio.transform import Affine

    ny, nx, nc = image.shape
    with rasterio.open(
        path, "w", driver="GTiff", height=ny, width=nx, count=nc, dtype="float32",
        nodata=nodata, crs="EPSG:32633", transform=Affine(1, 0, 500000, 0, -1, 5000000),
    ) as ds:  # fmt: skip
        ds.write(image.transpose(2, 0, 1))


@pytest.mark.parametrize("foreground", ["nodata", "none"])
def test_a_float_raster_with_nan_as_nodata_segments(tmp_path, foreground):
    """NaN is a float raster's usual nodata: where the file declares it, the pixels it marks
    reach the model as 0 (a computed tile's halo, a tile partly nodata) and every computed
    pixel equals one pass over the image with NaN as 0; undeclared NaN is still refused."""
    image = np.random.default_rng(7).random((56, 48, 3)).astype(np.float32)
    image[:24, :20] = np.nan
    float_geotiff(tmp_path / "nan.tif", image, nodata=np.nan)
    net = tiny_unet(seed=3)
    tile = 16
    out = segpipe.segment(
        tmp_path / "nan.tif", tmp_path / "r.zarr", net, tile=tile, task_tiles=1,
        foreground=foreground, probability_dtype="float32", device="cpu", scheduler="sync",
    )  # fmt: skip
    probabilities = segpipe.open_result(out)["probabilities"].values
    reference = whole_image_pass(net, np.nan_to_num(image, nan=0.0))
    # Every tile holding data computed; with foreground "nodata" the all-NaN tile not.
    computed = np.ones(image.shape[:2], bool)
    if foreground == "nodata":
        computed[:tile, :tile] = False
    np.testing.assert_array_equal(probabilities.sum(0) > 0, computed)
    # float32 sums in another order per window: ~1e-6 of logits that reach ~15 (He init)
    np.testing.assert_allclose(probabilities[:, computed], reference[:, computed], atol=1e-5)
    # NaN the file does not mark: none declared, or one band of a pixel (GDAL: all bands).
    partial = image.copy()
    partial[40, 30, 1] = np.nan
    float_geotiff(tmp_path / "undeclared.tif", image, nodata=None)
    float_geotiff(tmp_path / "partial.tif", partial, nodata=np.nan)
    for name in ("undeclared.tif", "partial.tif"):
        with pytest.raises(ImageReadError, match=f"{name}: NaN or infinite pixels .* not mark"):
            segpipe.segment(
                tmp_path / name, tmp_path / f"{name}.zarr", net, tile=tile, device="cpu",
                scheduler="sync", foreground="none",
            )  # fmt: skip


def test_a_float_raster_with_a_finite_nodata_value_segments(tmp_path):
    """A finite nodata value (-9999) outside the [0, 1] a float model takes: where the file
    declares it, it reaches the model as 0, as NaN does; an undeclared one is still refused."""
    image = np.random.default_rng(8).random((56, 48, 3)).astype(np.float32)
    image[:24, :20] = -9999
    float_geotiff(tmp_path / "nodata.tif", image, nodata=-9999)
    float_geotiff(tmp_path / "undeclared.tif", image, nodata=None)
    net = tiny_unet(seed=3)
    out = segpipe.segment(
        tmp_path / "nodata.tif", tmp_path / "r.zarr", net, tile=16, task_tiles=1,
        foreground="none", probability_dtype="float32", device="cpu", scheduler="sync",
    )  # fmt: skip
    reference = whole_image_pass(net, np.where(image == -9999, 0, image))
    probabilities = segpipe.open_result(out)["probabilities"].values
    np.testing.assert_allclose(probabilities, reference, atol=1e-5)  # as the NaN case
    with pytest.raises(ImageReadError, match=r"undeclared\.tif: float pixels must lie in"):
        segpipe.segment(
            tmp_path / "undeclared.tif", tmp_path / "u.zarr", net, tile=16, device="cpu",
            scheduler="sync", foreground="none",
        )  # fmt: skip


class Failing(PlainModule):
    """Raises ``error`` on any input with a pixel of ``value`` in every channel."""

    def __init__(self, net: torch.nn.Module, error: BaseException, value: float) -> None:
        super().__init__(net)
        self.error, self.value = error, value

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if (x == self.value).all(dim=1).any():
            raise self.error
        return self.net(x)


class Interrupted(BaseException):
    """As a KeyboardInterrupt or a run's stop: no error of the model's."""


@pytest.mark.parametrize("through", ["segment", "predictor", "stage"])
def test_a_models_error_names_the_file_and_the_window(tmp_path, through):
    """An error inside the model's forward (a kernel's, a shape's, memory at one window) is a
    PredictionError naming the file, the window and the level, the model's error its cause;
    BaseExceptions (an interrupt, a run's stop) go through as they are."""
    image = np.random.default_rng(0).integers(1, 200, (40, 48, 3), dtype=np.uint8)
    image[30, 37] = 255
    net = tiny_unet()
    model = Failing(net, RuntimeError("kernel failed"), value=1.0)
    reader = ArrayReader(image, name="slide.tif")
    tiles = list(tile_grid(image.shape[:2], 8))
    stitching = Stitching("exact", 8, net.geometry, len(CLASSES))
    predictor = Predictor(model, InferenceConfig(device="cpu"))
    stage = ModelStage(predictor)
    predict = stage if through == "stage" else predictor

    def run() -> object:
        if through == "segment":
            out = tmp_path / "r.zarr"
            return segpipe.segment(reader, out, model, tile=8, device="cpu", scheduler="sync")
        return predict_region(tiles, reader, predict, stitching, batch_size=1)

    try:
        with pytest.raises(PredictionError, match=r"slide.tif: the model failed on the") as err:
            run()
        assert "RuntimeError: kernel failed" in str(err.value)
        assert isinstance(err.value.__cause__, RuntimeError)
        found = re.search(r"y (\d+):(\d+), x (\d+):(\d+) of level 0", str(err.value))
        assert found, err.value
        y0, y1, x0, x1 = map(int, found.groups())
        halo = net.geometry.halo  # the white pixel is in the named windows' input
        assert y0 - halo <= 30 < y1 + halo and x0 - halo <= 37 < x1 + halo
        model.error = Interrupted()
        with pytest.raises(Interrupted):
            run()
    finally:
        stage.close()


def test_a_non_finite_output_names_its_own_window_not_its_batchs_first():
    """One window of a batch gives NaN: the error names that window (its input holds the
    pixel that made it NaN), not the batch's first, far from that pixel."""
    image = np.random.default_rng(0).integers(1, 200, (40, 48, 3), dtype=np.uint8)
    image[33, 41] = 255
    net = tiny_unet()
    predictor = Predictor(net, InferenceConfig(device="cpu"))

    def nan_where_white(windows: np.ndarray) -> np.ndarray:
        p = predictor(windows)
        p[(windows == 255).all(axis=-1).any(axis=(1, 2))] = np.nan
        return p

    tiles = list(tile_grid(image.shape[:2], 8))
    stitching = Stitching("exact", 8, net.geometry, len(CLASSES))
    with pytest.raises(PredictionError, match="NaN or infinite for the window whose") as err:
        # all 30 windows in one batch, the first one's input far from the white pixel
        predict_region(tiles, ArrayReader(image), nan_where_white, stitching, batch_size=64)
    found = re.search(r"output is y (\d+):(\d+), x (\d+):(\d+) of level 0", str(err.value))
    assert found, err.value
    y0, y1, x0, x1 = map(int, found.groups())
    halo = net.geometry.halo
    assert y0 - halo <= 33 < y1 + halo and x0 - halo <= 41 < x1 + halo, err.value


@pytest.mark.parametrize("side", [None, 16])
def test_exact_windows_of_a_same_padding_model_equal_a_whole_image_pass(side):
    """A same-padding model's output has its input's size: each exact window's output is cut
    ``crop`` (the halo) pixels in, and the stitched result equals one pass over the whole
    mirrored image."""
    torch.manual_seed(0)
    net = models.build(
        "unet", class_names=CLASSES, width=4, depth=2, padding="same", dropout=0.0
    ).eval()
    assert not net.geometry.shrinks and net.geometry.crop > 0
    image = np.random.default_rng(3).integers(0, 256, (37, 53, 3), dtype=np.uint8)
    stitched = predict_region(
        list(tile_grid(image.shape[:2], 8)),
        ArrayReader(image),
        Predictor(net, InferenceConfig(device="cpu", amp=False)),
        Stitching("exact", 8, net.geometry, len(CLASSES), exact_side=side),
        batch_size=3,
    )
    np.testing.assert_allclose(stitched.probabilities, whole_image_pass(net, image), atol=2e-5)


def test_one_non_finite_pixel_fails_its_window():
    """A single infinite pixel (not a whole window of them) is caught, naming its window."""
    image = np.random.default_rng(0).integers(1, 200, (40, 48, 3), dtype=np.uint8)
    net = tiny_unet()
    predictor = Predictor(net, InferenceConfig(device="cpu"))
    calls = []

    def one_inf(windows: np.ndarray) -> np.ndarray:
        p = predictor(windows)
        calls.append(len(windows))
        if len(calls) == 2:
            p[1, 0, 3, 5] = np.inf  # second batch, its second window, one pixel of one class
        return p

    tiles = list(tile_grid(image.shape[:2], 8))
    stitching = Stitching("exact", 8, net.geometry, len(CLASSES))
    with pytest.raises(PredictionError, match=r"NaN or infinite .* output is y 0:8, x 40:48 "):
        # windows row-major, 4 a batch: the second batch's second window is tile (0, 5)
        predict_region(tiles, ArrayReader(image), one_inf, stitching, batch_size=4)


def test_predict_region_refuses_what_it_cannot_do():
    image = np.zeros((16, 16, 3), np.uint8)
    net = tiny_unet()
    predictor = Predictor(net, InferenceConfig(device="cpu"))
    tiles = list(tile_grid(image.shape[:2], 8))
    exact = Stitching("exact", 8, net.geometry, len(CLASSES))
    with pytest.raises(ValueError, match="batch_size must be >= 1"):
        predict_region(tiles, ArrayReader(image), predictor, exact, batch_size=0)
    lattice = blend_lattice(image.shape[:2], net.geometry, window=16, overlap=0.25)
    blend = Stitching("blend", 8, net.geometry, len(CLASSES), lattice=lattice)
    with pytest.raises(ValueError, match="boxes are for exact mode"):
        predict_region(tiles, ArrayReader(image), predictor, blend, boxes=[Box(0, 8, 0, 8)])


def test_overlap_groups_never_overlap():
    """A box that grows by joining one group may then reach a group it was checked against
    before: the groups still end disjoint, every box in exactly one whose bounds hold it."""
    # box 2 misses box 0 and joins box 1, whose grown bounds then reach box 0
    boxes = [Box(0, 2, 0, 2), Box(4, 6, 0, 10), Box(0, 5, 8, 12)]
    assert overlap_groups(boxes) == [(Box(0, 6, 0, 12), [0, 1, 2])]
    rng = np.random.default_rng(1)
    for _ in range(200):
        y0, x0 = rng.integers(0, 40, (2, 6))
        h, w = rng.integers(1, 12, (2, 6))
        boxes = [
            Box(int(a), int(a + b), int(c), int(c + d))
            for a, b, c, d in zip(y0, h, x0, w, strict=True)
        ]
        groups = overlap_groups(boxes)
        assert sorted(i for _, members in groups for i in members) == list(range(len(boxes)))
        for (a, _), (b, _) in itertools.combinations(groups, 2):
            assert a.intersect(b) is None, groups
        for bound, members in groups:
            assert all(boxes[i].intersect(bound) == boxes[i] for i in members)


def test_boxes_are_cut_in_windows_of_the_exact_side():
    """With boxes (a foreground's), each box is cut in steps of ``exact_side``, not of the
    tile: one window for a 32 px box under a 32 px side, the halo paid once."""
    image = np.random.default_rng(0).integers(0, 256, (48, 48, 3), dtype=np.uint8)
    net = tiny_unet()
    predictor = Predictor(net, InferenceConfig(device="cpu", amp=False))
    tiles = list(tile_grid(image.shape[:2], 8))
    boxes = [Box(0, 32, 0, 32), Box(40, 48, 40, 48)]
    wide = Stitching("exact", 8, net.geometry, len(CLASSES), exact_side=32)
    narrow = Stitching("exact", 8, net.geometry, len(CLASSES))
    one = predict_region(tiles, ArrayReader(image), predictor, wide, boxes=boxes)
    assert one.windows == 2
    tiled = predict_region(tiles, ArrayReader(image), predictor, narrow, boxes=boxes)
    assert tiled.windows == 16 + 1
    np.testing.assert_allclose(one.probabilities, tiled.probabilities, atol=2e-6)


class Logged(Future):
    """A done future that logs when its result is taken."""

    def __init__(self, log: list[str], k: int, value: np.ndarray) -> None:
        super().__init__()
        self.log, self.k = log, k
        self.set_result(value)

    def result(self, timeout=None):
        self.log.append(f"result {self.k}")
        return super().result(timeout)


def test_a_stage_gets_the_next_batch_before_this_one_is_waited_on():
    """A predictor with ``submit`` (a pipeline stage) is handed batch k + 1 before the result
    of batch k is taken, so the model never waits for the stitching thread."""
    image = np.random.default_rng(0).integers(0, 256, (24, 24, 3), dtype=np.uint8)
    net = tiny_unet()
    predictor = Predictor(net, InferenceConfig(device="cpu", amp=False))
    log: list[str] = []

    class Stage:
        def __call__(self, windows):
            raise AssertionError("a stage is submitted to")

        def submit(self, windows):
            k = sum(e.startswith("submit") for e in log)
            log.append(f"submit {k}")
            return Logged(log, k, predictor(windows))

    tiles = list(tile_grid(image.shape[:2], 8))  # 9 windows, 3 batches
    stitching = Stitching("exact", 8, net.geometry, len(CLASSES))
    predict_region(tiles, ArrayReader(image), Stage(), stitching, batch_size=3)
    assert log == ["submit 0", "submit 1", "result 0", "submit 2", "result 1", "result 2"]


def test_a_closed_stage_is_not_the_models_error():
    """StageClosed (the run ended), like the pipeline's own errors, passes as it is."""
    for own in (StageClosed("closed"), PredictionError("p")):
        with pytest.raises(type(own)) as err, model_errors("slide.tif", "a window"):
            raise own
        assert err.value is own
    failed = r"slide\.tif: the model failed on a window"
    with pytest.raises(PredictionError, match=failed), model_errors("slide.tif", "a window"):
        raise RuntimeError("kernel")


@pytest.mark.parametrize(
    "boxes", [None, [Box(0, 8, 0, 8), Box(88, 96, 88, 96)]], ids=["one-read", "two-reads"]
)
def test_reads_are_let_go_once_the_last_window_is_cut(monkeypatch, boxes):
    """The pixels read for the windows are let go once the last window is cut, before the
    parts are given: a task holds no read while its blocks are written. (The last read was
    still held by a loop variable and by the cut list of the paused generator.)"""
    reads: list[weakref.ref] = []
    read = stitching_module.read_mirrored

    def spied(reader, box, level=0):
        pixels = read(reader, box, level)
        base = pixels
        while base.base is not None:
            base = base.base
        reads.append(weakref.ref(base))
        return pixels

    monkeypatch.setattr(stitching_module, "read_mirrored", spied)
    image = np.random.default_rng(0).integers(0, 256, (96, 96, 3), dtype=np.uint8)
    net = tiny_unet()
    predictor = Predictor(net, InferenceConfig(device="cpu", amp=False))
    tiles = list(tile_grid(image.shape[:2], 8))
    stitching = Stitching("exact", 8, net.geometry, len(CLASSES))
    given = 0
    for _ in predict_parts(
        tiles, ArrayReader(image), predictor, stitching, boxes=boxes, batch_size=1
    ):
        gc.collect()
        given += 1
        assert len(reads) == (1 if boxes is None else 2)
        assert all(r() is None for r in reads), "a read still held as its part is given"
    assert given == 1


class EndsItsRun(PlainModule):
    """Ends every run's lease in this process at its first forward pass inside a block, as
    remove_predictor does when the run ends (cancelled, a sibling task failed)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if tasks._LEASES and not getattr(self, "ended", False):
            for lease in list(tasks._LEASES.values()):
                lease.end()
            self.ended = True
        return self.net(x)


def test_a_block_whose_run_ended_while_it_was_predicted_is_not_written(reader, tmp_path):
    """A task still predicting when its run ended must not write its block: a new run may
    have made the result at that path since. It raises RunEnded, and nothing is written."""
    r, _ = reader
    model = EndsItsRun(tiny_unet())
    out = tmp_path / "r.zarr"
    with pytest.raises(RunEnded, match="has ended in this process"):
        segpipe.segment(r, out, model, tile=8, device="cpu", scheduler="sync")
    assert model.ended
    assert not tiles_done(out).any()
    assert not zarr.open_group(out, mode="r")["0/mask"][...].any()
    assert tasks._LEASES == {}, "released after the run all the same"


def test_a_resumed_runs_speed_is_over_the_tiles_it_computed(tmp_path):
    """The summary's megapixels per second are this attempt's, as its seconds are: the pixels
    of the tiles it computed, not the whole image's (a resume that computed a few tiles read
    as many times faster than the machine is)."""
    image = np.random.default_rng(1).integers(0, 256, (96, 96, 3), dtype=np.uint8)
    model, out = tiny_unet(), tmp_path / "r.zarr"
    settings = dict(tile=32, task_tiles=1, device="cpu", scheduler="sync", foreground="none")

    class Stop(Exception):
        pass

    def stop_at_3(done, total):
        if done >= 3:
            raise Stop

    with pytest.raises(Stop):
        segpipe.segment(
            ArrayReader(image, name="slide.tif"), out, model, on_progress=stop_at_3, **settings
        )
    segpipe.segment(ArrayReader(image, name="slide.tif"), out, model, **settings)
    s = read_meta(out).summary
    computed = s.tiles_computed - s.tiles_skipped  # by this attempt
    assert (s.tiles_total, s.tiles_background, s.tiles_skipped) == (9, 0, 3)
    this_attempts = 96 * 96 * computed / s.tiles_total / 1e6
    # abs: the figure is rounded to 4 decimals (the whole image's would be 1.5 times it)
    assert s.megapixels_per_second == pytest.approx(this_attempts / s.seconds, rel=0.01, abs=6e-5)


def test_a_model_failing_its_memory_probe_is_named(tmp_path):
    """The run's first forward pass, on zeros, measures the model's memory: its failure names
    the file and the probe."""
    image = np.random.default_rng(0).integers(1, 200, (40, 48, 3), dtype=np.uint8)
    model = Failing(tiny_unet(), RuntimeError("kernel failed"), value=0.0)
    with pytest.raises(PredictionError, match=r"slide.tif: the model failed on its memory probe"):
        segpipe.segment(
            ArrayReader(image, name="slide.tif"), tmp_path / "r.zarr", model, tile=8,
            device="cpu", scheduler="sync",
        )  # fmt: skip


def test_stitching_refuses_what_it_cannot_do() -> None:
    g = Geometry(halo=4, multiple=4)
    with pytest.raises(ValueError, match="mode"):
        Stitching("overlap", 16, g, 2)
    with pytest.raises(ValueError, match="lattice"):
        Stitching("blend", 16, g, 2)
    with pytest.raises(ValueError, match="num_classes"):
        predict_labels(torch.nn.Identity(), np.zeros((8, 8, 3), np.uint8), tile=8)


@pytest.mark.parametrize(
    ("device", "cpus", "gpus", "workers", "dask_cuda", "expected"),
    [
        # one worker per device, I/O threads following the cores, the model all of them
        ("cpu", 2, 0, None, True, ClusterPlan(1, 2, 2, 0)),
        ("cpu", 16, 0, None, True, ClusterPlan(1, 8, 16, 0)),
        ("cpu", 16, 0, 8, True, ClusterPlan(8, 1, 16, 0)),
        ("cuda", 32, 4, None, True, ClusterPlan(4, 7, 8, 4, processes=True)),
        ("cuda", 32, 4, None, False, ClusterPlan(1, 8, 32, 4)),  # one worker: the first GPU
        # dask-cuda's workers as many as asked, one a GPU at most; one asked: threads here
        ("cuda", 32, 4, 2, True, ClusterPlan(2, 8, 16, 4, processes=True)),
        ("cuda", 32, 4, 8, True, ClusterPlan(4, 7, 8, 4, processes=True)),
        ("cuda", 32, 4, 1, True, ClusterPlan(1, 8, 32, 4)),
        # one GPU: a process per 4 cores share it (4 at most), each with its own GIL
        ("cuda", 32, 1, None, True, ClusterPlan(4, 7, 8, 1, processes=True)),
        ("cuda", 16, 1, None, False, ClusterPlan(4, 3, 4, 1, processes=True)),
        ("cuda", 8, 1, 3, True, ClusterPlan(3, 2, 2, 1, processes=True)),  # as many as asked
        ("cuda", 4, 1, None, True, ClusterPlan(1, 3, 4, 1)),  # too few cores to share
        ("cuda", 16, 1, 1, True, ClusterPlan(1, 8, 16, 1)),  # one asked: threads of this one
        # more workers asked than I/O threads: one thread each, never a worker of none
        ("cpu", 4, 0, 8, True, ClusterPlan(8, 1, 4, 0)),
        ("cpu", 2, 0, 3, True, ClusterPlan(3, 1, 2, 0)),
        # a CUDA plan is one GPU at least, even where torch counts none (the workers say so)
        ("cuda", 8, 0, None, True, ClusterPlan(2, 3, 4, 1, processes=True)),
    ],
)
def test_cluster_plan(device, cpus, gpus, workers, dask_cuda, expected, monkeypatch):
    monkeypatch.setattr(plans, "_dask_cuda_installed", lambda: dask_cuda)
    monkeypatch.setattr(plans, "main_reimport_is_safe", lambda: True)
    plan = plan_local_cluster(torch.device(device), cpus=cpus, gpus=gpus, n_workers=workers)
    assert plan == expected
    assert plan.resources == ({"GPU": 1} if device == "cuda" else {})


def test_several_gpus_without_dask_cuda_get_no_worker_processes_even_when_asked(monkeypatch):
    """Nothing would tell plain worker processes their GPU apart (and starting dask-cuda's
    cluster would fail): one threaded worker, on the first, though processes were asked."""
    monkeypatch.setattr(plans, "_dask_cuda_installed", lambda: False)
    plan = plan_local_cluster(torch.device("cuda"), cpus=16, gpus=2, processes=True)
    assert plan == ClusterPlan(1, 8, 16, gpus=2)
    one = plan_local_cluster(torch.device("cuda"), cpus=16, gpus=1, processes=True)
    assert one == ClusterPlan(4, 3, 4, gpus=1, processes=True), "one GPU: plain processes"


@pytest.mark.parametrize(("device", "gpus"), [("cuda", 4), ("cuda:1", 1), ("auto", 4)])
def test_a_gpu_named_by_its_index_is_planned_alone(device, gpus, monkeypatch):
    """dask-cuda's workers each see their own GPU as cuda:0: "cuda:1" in each would be
    another GPU (and a user who named GPU 1 would get them all). A GPU named by its index is
    that one, shared by plain worker processes, each running on cuda:1 itself."""
    monkeypatch.setattr(plans, "_dask_cuda_installed", lambda: True)
    monkeypatch.setattr(plans, "main_reimport_is_safe", lambda: True)
    monkeypatch.setattr(plans, "CPU_COUNT", 16)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 4)
    plan = plans.plan_for_device(device)
    assert plan.gpus == gpus and plan.processes
    assert plan.n_workers == 4  # a process per GPU, or 4 sharing the one named


@pytest.mark.parametrize("gpus", [1, 2])
def test_a_script_without_a_main_guard_gets_no_worker_processes(gpus, monkeypatch):
    """Spawned workers re-run a plain script's top level: without its guard, threads of this
    process (one worker), however many cores and GPUs; with it, the processes."""
    monkeypatch.setattr(plans, "_dask_cuda_installed", lambda: True)
    monkeypatch.setattr(plans, "main_reimport_is_safe", lambda: False)
    plan = plan_local_cluster(torch.device("cuda"), cpus=32, gpus=gpus)
    assert plan == ClusterPlan(1, 8, 32, gpus)
    monkeypatch.setattr(plans, "main_reimport_is_safe", lambda: True)
    assert plan_local_cluster(torch.device("cuda"), cpus=32, gpus=gpus).processes


@pytest.mark.parametrize("scheduler", ["sync", None])
def test_a_run_here_takes_this_process_threads_not_a_shared_gpu_workers(
    reader, tmp_path, monkeypatch, scheduler
):
    """Where the local cluster would be worker processes sharing a GPU, a run that runs its
    blocks in this process (sync, or an image too small to start them for) takes this
    process's I/O and torch threads (the threaded plan's), not one worker's share."""
    from segpipe.execution import segment as segment_module

    shared = ClusterPlan(4, 3, 4, gpus=1, processes=True)
    threaded = ClusterPlan(1, 5, 6, gpus=1)

    def plan_for_device(device, n_workers=None, *, processes=None):
        return threaded if processes is False else shared

    monkeypatch.setattr(segment_module, "plan_for_device", plan_for_device)
    monkeypatch.setattr(cluster, "plan_for_device", plan_for_device)
    seen = {}
    run_blocks, run_in_process = segment_module.run_blocks, cluster.run_in_process

    def blocks_spy(blocks, job, *, client, config, **kwargs):
        seen["client"], seen["torch"] = client, config.threads
        return run_blocks(blocks, job, client=client, config=config, **kwargs)

    def in_process_spy(work, items, on_result, *, threads):
        seen["io"] = threads
        return run_in_process(work, items, on_result, threads=threads)

    monkeypatch.setattr(segment_module, "run_blocks", blocks_spy)
    monkeypatch.setattr(cluster, "run_in_process", in_process_spy)
    r, _ = reader
    segpipe.segment(r, tmp_path / "a.zarr", tiny_unet(), tile=8, scheduler=scheduler)
    assert seen == {"client": None, "torch": 6, "io": 5}


@pytest.mark.skipif(not hasattr(os, "sched_setaffinity"), reason="sets CPU affinity (Linux)")
def test_a_cpu_plan_takes_the_cores_the_process_may_use_not_the_hosts():
    """Under taskset, Slurm or docker --cpuset-cpus: os.cpu_count() gave the host's cores,
    and 4 allowed cores of 64 ran 64 torch threads (and lanes) on 4."""
    code = (
        "import os; os.sched_setaffinity(0, {min(os.sched_getaffinity(0))}); "
        "from segpipe.execution.cluster import plan_for_device; "
        "print(plan_for_device('cpu').torch_threads, os.cpu_count())"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    threads, host = map(int, out.stdout.split())
    if host == 1:
        pytest.skip("one core: the host's count is the allowed one")
    assert threads == 1


def test_connect_rejects_unknown_schedulers():
    with (
        pytest.raises(TypeError, match="scheduler must be"),
        cluster.connect(42, ClusterPlan(1, 1, 1)),
    ):
        pass


def test_model_is_loaded_once_per_process_not_per_tile(reader, tmp_path, monkeypatch):
    r, _ = reader
    built = []
    original = Predictor.__init__

    def counting(self, *a, **k):
        built.append(1)
        original(self, *a, **k)

    monkeypatch.setattr(Predictor, "__init__", counting)
    torch.manual_seed(0)
    net = models.build("unet", width=4, depth=2)
    out = segpipe.segment(r, tmp_path / "r.zarr", net, tile=8, task_tiles=1, scheduler="sync")
    assert segpipe.open_result(out).attrs["segpipe"]["tiles_computed"] == 5 * 7
    assert len(built) == 1
    assert tasks._PREDICTORS == {}, "released after the run"
    assert tasks._READERS == {} and tasks._ARRAYS == {}, "the run's tiles and arrays too"


def test_a_task_of_an_ended_run_leaves_nothing_behind(reader):
    """A task still running when its run ended (cancelled, a sibling failed) must not make the
    run's cached reader, arrays or model thread again: nothing would drop them."""
    from types import SimpleNamespace

    r, _ = reader
    key = "ended-run"
    tasks.install_predictor(key, object)
    job = SimpleNamespace(predictor_key=key, reader=r, level=0, output="unused.zarr")
    cached = tasks._run_reader(job, 16)
    assert tasks._run_reader(job, 16) is cached
    tasks.remove_predictor(key)
    assert key not in tasks._READERS
    for late in (
        lambda: tasks._run_reader(job, 16),
        lambda: tasks._result_arrays(job),
        lambda: tasks.stage_for(key),
    ):
        with pytest.raises(RuntimeError, match="not loaded in this process"):
            late()
    assert key not in tasks._READERS and key not in tasks._ARRAYS and key not in tasks._STAGES


def test_the_file_of_an_ended_run_is_closed_on_its_workers(tmp_path):
    """Dropped from the run's registry, its reader kept the file open until a collection:
    a long-lived worker of an archive run held every finished image's file."""
    import pickle
    from types import SimpleNamespace

    import tifffile

    path = tmp_path / "slide.tif"
    tifffile.imwrite(path, np.zeros((64, 64, 3), np.uint8), tile=(16, 16), photometric="rgb")

    def open_on_it() -> int:
        fds = [f"/proc/self/fd/{fd}" for fd in os.listdir("/proc/self/fd")]
        return sum(1 for fd in fds if os.path.exists(fd) and os.path.realpath(fd) == str(path))

    original = open_image(path)
    original.read(0, 16, 0, 16)
    for copy in (True, False):  # a worker's copy; a "sync" run's reader, its opener's
        key = f"closed-run-{copy}"
        tasks.install_predictor(key, object)
        reader = pickle.loads(pickle.dumps(original)) if copy else original
        job = SimpleNamespace(predictor_key=key, reader=reader, level=0, output="unused")
        tasks._run_reader(job, 16).read(0, 16, 16, 32)
        assert open_on_it() == 1 + copy
        tasks.remove_predictor(key)
        assert open_on_it() == 1
    original.close()


def test_the_tile_cache_is_sized_for_whole_shard_blocks(reader, tmp_path, monkeypatch):
    """With a foreground mask a block holds its computed tiles only: the first one may be a
    tile high. The run's cache is sized for rows of whole shard blocks all the same."""
    from PIL import Image

    r, image = reader
    mask = np.zeros(image.shape[:2], np.uint8)
    mask[10:14, 10:14] = 255  # inside tile (1, 1) of 8 px: the first block's lower row only
    path = tmp_path / "mask.png"
    Image.fromarray(mask).save(path)
    bands = []

    def recording(reader, band, *, level=0):
        bands.append(band)
        return reader

    monkeypatch.setattr(tasks, "cached_reads", recording)
    torch.manual_seed(0)
    net = models.build("unet", width=4, depth=2)
    out = segpipe.segment(
        r, tmp_path / "r.zarr", net, tile=8, task_tiles=2, scheduler="sync", foreground=str(path)
    )
    assert read_meta(out).summary.tiles_computed == 1
    assert bands == [16]  # a shard block's rows, not the one computed tile's 8


def test_a_run_decodes_each_tile_of_its_image_once(reader, tmp_path, monkeypatch):
    r, _ = reader
    ty, tx = r.chunk_shape(0)
    decoded: list[tuple[int, int]] = []
    read = type(r).read

    def recording(self, y0, y1, x0, x1, level=0):
        decoded.extend(
            (i, j) for i in range(y0 // ty, -(-y1 // ty)) for j in range(x0 // tx, -(-x1 // tx))
        )
        return read(self, y0, y1, x0, x1, level)

    monkeypatch.setattr(type(r), "read", recording)
    # The result's identity samples a few regions before the tasks run: not the tasks' reads.
    from segpipe.execution import segment as segment_module

    sample = segment_module.pixel_sample_sha256

    def unrecorded_sample(reader):
        before = len(decoded)
        digest = sample(reader)
        del decoded[before:]
        return digest

    monkeypatch.setattr(segment_module, "pixel_sample_sha256", unrecorded_sample)
    torch.manual_seed(0)
    net = models.build("unet", width=4, depth=2)
    kw = dict(tile=16, task_tiles=1, scheduler="sync")
    cached = segpipe.open_result(segpipe.segment(r, tmp_path / "cached.zarr", net, **kw))
    # Every block's window reaches into its neighbours' tiles (halo), yet each tile is
    # decoded once: 3 x 4 tiles of 16 px.
    assert sorted(decoded) == [(i, j) for i in range(3) for j in range(4)]
    decoded.clear()
    monkeypatch.setattr(tasks, "cached_reads", lambda reader, *_, **__: reader)
    plain = segpipe.open_result(segpipe.segment(r, tmp_path / "plain.zarr", net, **kw))
    assert len(decoded) > 12, "without the cache, halos decode tiles again"
    np.testing.assert_array_equal(cached["probabilities"].values, plain["probabilities"].values)
    np.testing.assert_array_equal(cached["mask"].values, plain["mask"].values)


@pytest.mark.integration
def test_existing_scheduler_by_address(reader, tmp_path):
    r, _ = reader
    torch.manual_seed(0)
    net = models.build("unet", width=4, depth=2)
    ref = segpipe.segment(r, tmp_path / "ref.zarr", net, tile=16, scheduler="sync")
    with (
        distributed.LocalCluster(
            n_workers=1,
            threads_per_worker=1,
            processes=True,
            dashboard_address=None,
            resources={"GPU": 1},
        ) as local,
        distributed.Client(local) as client,
    ):
        out = segpipe.segment(
            r, tmp_path / "r.zarr", net, tile=16, scheduler=local.scheduler_address
        )
        assert blocks_run_by(local.scheduler_address) > 0, "the run went elsewhere"
        # the run cleaned up after itself on the shared cluster
        plugins = client.run(lambda dask_worker: list(dask_worker.plugins))
        assert not any("segpipe" in p for names in plugins.values() for p in names)
    np.testing.assert_array_equal(
        segpipe.open_result(out)["probabilities"].values,
        segpipe.open_result(ref)["probabilities"].values,
    )


@pytest.mark.integration
def test_a_worker_advertising_a_gpu_runs_as_many_blocks_as_it_has_threads(
    reader, tmp_path, monkeypatch
):
    """Its I/O threads feed its one model thread: tasks asked for the workers' GPU=1 (as
    dask-cuda and segpipe's own GPU clusters declare it), so each worker ran one block at a
    time, its device idle while that block read, stitched and wrote."""
    r, _ = reader
    net = models.build("unet", width=4, depth=2)
    live, peak, lock = [0], [0], threading.Lock()
    predict_parts = tasks.predict_parts

    def counted(*args, **kwargs):  # a block's passes, in its task (the workers are threads)
        with lock:
            live[0] += 1
            peak[0] = max(peak[0], live[0])
        try:
            time.sleep(0.2)  # long enough for the other threads' blocks to start
            yield from predict_parts(*args, **kwargs)
        finally:
            with lock:
                live[0] -= 1

    monkeypatch.setattr(tasks, "predict_parts", counted)
    with distributed.LocalCluster(
        n_workers=1, threads_per_worker=3, processes=False, dashboard_address=None,
        resources={"GPU": 1},
    ) as local, distributed.Client(local, set_as_default=False) as client:  # fmt: skip
        out = segpipe.segment(
            r, tmp_path / "r.zarr", net, tile=16, task_tiles=1, device="auto", amp=False,
            scheduler=client,
        )  # fmt: skip
    assert segpipe.open_result(out).attrs["segpipe"]["complete"]
    assert peak[0] == 3


@pytest.mark.parametrize("shape", [(96, 128), (100, 76), (20, 128), (100, 28)])
def test_blend_is_at_least_as_accurate_as_monai(shape):
    """Blend mode against one forward pass over the whole image, beside MONAI's
    sliding_window_inference with the same window, overlap and sigma: same-padding models'
    windows stay inside the image, so border pixels see the model's own zero padding. Strips
    shorter than a window (20, 28 px) too."""
    inferers = pytest.importorskip("monai.inferers")
    torch.manual_seed(0)
    net = models.build(
        "unet", class_names=CLASSES, width=4, depth=2, padding="same", dropout=0.0
    ).eval()
    image = tissue_slide(shape, seed=5).image
    x = torch.from_numpy(image.transpose(2, 0, 1)[None].astype(np.float32) / 255)

    def probabilities(t):
        return torch.softmax(net(t), 1)

    with torch.inference_mode():
        reference = probabilities(x)[0].numpy()
        theirs = inferers.sliding_window_inference(
            x, (32, 32), 4, probabilities, overlap=0.25, mode="gaussian", sigma_scale=0.125
        )[0].numpy()
    lattice = blend_lattice(shape, net.geometry, window=32, overlap=0.25)
    ours = predict_region(
        list(tile_grid(shape, 32)),
        ArrayReader(image),
        Predictor(net, InferenceConfig(device="cpu")),
        Stitching("blend", 32, net.geometry, len(CLASSES), lattice=lattice),
    ).probabilities
    assert np.abs(ours - reference).mean() <= np.abs(theirs - reference).mean()


@pytest.mark.parametrize("mode", ["exact", "exact-boxes", "blend"])
def test_parts_are_given_as_soon_as_their_windows_are_stitched(mode):
    """predict_parts gives each part (a task's shard blocks) once, equal to the whole
    region's prediction there, and before the windows of later parts are predicted; with
    boxes (a foreground's), a part no box touches is given too, all 0."""
    boxes = [Box(0, 48, 0, 32), Box(48, 96, 32, 64)] if mode == "exact-boxes" else None
    mode = mode.split("-")[0]
    torch.manual_seed(0)
    net = models.build(
        "unet", class_names=CLASSES, width=4, depth=2, padding="same", dropout=0.0
    ).eval()
    image = tissue_slide((96, 80), seed=5).image
    tiles = list(tile_grid((96, 80), 16))
    lattice = blend_lattice((96, 80), net.geometry, window=16, overlap=0.25)
    stitching = Stitching(
        mode, 16, net.geometry, len(CLASSES), lattice=lattice if mode == "blend" else None
    )
    predictor = Predictor(net, InferenceConfig(device="cpu"))
    predicted = []

    def predict(windows):
        predicted.append(len(windows))
        return predictor(windows)

    whole = predict_region(tiles, ArrayReader(image), predict, stitching, batch_size=2, boxes=boxes)
    total, predicted[:] = sum(predicted), []
    parts = [Box(0, 48, 0, 48), Box(0, 48, 48, 80), Box(48, 96, 0, 48), Box(48, 96, 48, 80)]
    given, seen = [], []
    for part in predict_parts(
        tiles, ArrayReader(image), predict, stitching, parts=parts, batch_size=2, boxes=boxes
    ):
        given.append(part.region)
        seen.append(sum(predicted))
        assert part.windows == whole.windows == total
        np.testing.assert_array_equal(
            part.probabilities, whole.probabilities[(slice(None), *part.region.slices)]
        )
    assert sorted(given, key=parts.index) == parts
    assert seen[0] < total, "the first part came before the last window was predicted"
    assert seen[-1] == total
    if boxes is not None:
        assert given[-1] == Box(0, 48, 48, 80)  # no box there: no window, given last
        np.testing.assert_array_equal(whole.probabilities[:, :48, 64:], 0)


@pytest.mark.parametrize(
    ("block", "classes", "side"),
    [
        (1024, 3, 4096),  # capped: a window in 21 per axis computed twice
        (1024, 9, 2048),  # 44 bytes a pixel: 4096² would take 704 MiB
        (512, 30, 1536),
        (768, 2, 3840),
        (1024, 200, 1024),  # never less than a block
    ],
)
def test_blend_task_side_fits_memory(block, classes, side):
    from segpipe.execution.tasks import BLEND_TASK_BYTES, blend_task_side

    got = blend_task_side(block, classes)
    assert got == side
    assert got % block == 0
    if got > block:  # what it holds fits the budget, and one more block would not
        assert 4 * (classes + 2) * got**2 <= BLEND_TASK_BYTES
        assert 4 * (classes + 2) * (got + block) ** 2 > BLEND_TASK_BYTES or got + block > 4096


def test_a_blend_window_no_pass_could_hold_is_refused_before_anything_is_made(tmp_path):
    """window=100000 on a 32 px image failed in a task with numpy's MemoryError (28 GiB for
    the mirrored read), naming no setting. 3 classes x 9464² px float32 is just over 1 GiB."""
    image = tissue_slide(32, seed=1).image
    for window in (100_000, 9464):
        with pytest.raises(ValueError, match=rf"window {window} px \(--window\) makes each"):
            segpipe.segment(ArrayReader(image), tmp_path / "r.zarr", tiny_unet(), tile=16,
                            mode="blend", window=window, scheduler="sync")  # fmt: skip
        assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("classes", [3, 12])
def test_a_blend_task_holds_what_its_side_assumes(tmp_path, monkeypatch, classes):
    """blend_task_side budgets 4 (classes + 2) bytes a pixel of a task's square: doubling the
    side of the one task over an image must not cost more than that a pixel added (NumPy's
    buffers, traced: the sums, the weights, the pixels read, what is written)."""
    import tracemalloc

    import segpipe.execution.segment as segment_module

    torch.manual_seed(0)
    names = tuple(f"class {i}" for i in range(classes))
    net = models.build("unet", class_names=names, width=4, depth=2, padding="same", dropout=0.0)
    image = tissue_slide((384, 384), seed=5).image
    # The least of three runs a side, interleaved: a run's peak also holds whatever windows
    # the I/O and model threads have in flight at that instant, which moves it by +-0.5 MB.
    peaks: dict[int, int] = {}
    for run in range(3):
        for side in (192, 384):
            monkeypatch.setattr(segment_module, "blend_task_side", lambda *_, side=side: side)
            tracemalloc.start()
            try:
                segpipe.segment(
                    ArrayReader(image), tmp_path / f"{side}-{run}.zarr", net.eval(), tile=64,
                    task_tiles=1, mode="blend", window=32, overlap=0.25, scheduler="sync",
                )  # fmt: skip
                peak = tracemalloc.get_traced_memory()[1]
            finally:
                tracemalloc.stop()
            peaks[side] = min(peaks.get(side, peak), peak)
    per_pixel = (peaks[384] - peaks[192]) / (384**2 - 192**2)
    assert 0 < per_pixel <= 4 * (classes + 2)


def test_blend_tasks_join_blocks_without_changing_a_bit(tmp_path, monkeypatch):
    """Blend tasks cover squares of shard blocks (a window across a task's edge is computed by
    both tasks): fewer windows, and every pixel the same to the bit, since each pixel sums the
    same lattice windows in the same order whichever task computes it."""
    import segpipe.execution.segment as segment_module

    torch.manual_seed(0)
    net = models.build(
        "unet", class_names=CLASSES, width=4, depth=2, padding="same", dropout=0.0
    ).eval()
    image = tissue_slide((96, 80), seed=5).image
    results, windows = [], []
    for side in (1, 32, 2048):  # blocks of 16 px alone, in 2 x 2 squares, all in one task
        monkeypatch.setattr(segment_module, "blend_task_side", lambda *_, side=side: side)
        out = segpipe.segment(
            ArrayReader(image), tmp_path / f"{side}.zarr", net, tile=16, task_tiles=1,
            mode="blend", window=16, overlap=0.25, probability_dtype="float32",
            scheduler="sync", batch_size=1,  # a window's bits depend on its batch's size
        )  # fmt: skip
        results.append(segpipe.open_result(out)["probabilities"].values)
        windows.append(read_meta(out).summary.windows)
        assert read_meta(out).summary.tiles_computed == 6 * 5
    np.testing.assert_array_equal(results[1], results[0])
    np.testing.assert_array_equal(results[2], results[0])
    lattice = blend_lattice((96, 80), net.geometry, window=16, overlap=0.25)
    assert (
        windows[0]
        > windows[1]
        > windows[2]
        == len(lattice.axis_origins(0)) * len(lattice.axis_origins(1))
    )
