"""The pixel contract: measured on training data, kept in the checkpoint, applied identically by
training and inference, and the checks that refuse images a model cannot take."""

from __future__ import annotations

import dataclasses
import math
import warnings
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import tifffile
import torch
from PIL import Image

import segpipe
from segpipe import models, training
from segpipe.execution.predictor import window_probabilities
from segpipe.geometry.pixels import to_float01
from segpipe.geometry.tiling import Geometry
from segpipe.io.readers import ArrayReader
from segpipe.models import (
    OutOfDistributionWarning,
    PixelContract,
    PixelContractError,
    check_source,
    choose_level,
    measure_contract,
)
from segpipe.models.contract import sampled_pixels
from segpipe.models.source_checks import channels_taken

PX = 0.65  # µm per pixel of the generated 16-bit images


def _scene(seed: int, shape: tuple[int, int] = (96, 96)) -> tuple[np.ndarray, np.ndarray]:
    """A 12-bit grey image in uint16 (bright squares on a dim background) and its labels."""
    rng = np.random.default_rng(seed)
    labels = np.zeros(shape, np.uint8)
    for _ in range(8):
        y, x = rng.integers(6, np.array(shape) - 6)
        labels[y - 5 : y + 5, x - 5 : x + 5] = 1
    image = 300 + 2500 * labels.astype(np.float64) + rng.normal(0, 120, shape)
    return image.clip(0, 4095).astype(np.uint16), labels


def _write_folder(root: Path, seeds: list[int]) -> Path:
    for sub in ("images", "labels"):
        (root / sub).mkdir(parents=True, exist_ok=True)
    for s in seeds:
        image, labels = _scene(s)
        res = (1e4 / PX, 1e4 / PX)  # pixels per cm
        tifffile.imwrite(root / "images" / f"{s}.tif", image, resolution=res, resolutionunit=3)
        tifffile.imwrite(root / "labels" / f"{s}.tif", labels)
    (root / "classes.txt").write_text("background\nnucleus\n")
    return root


# -- the contract as a value ------------------------------------------------------------------


def test_range_scaling_maps_lo_hi_onto_0_1_per_channel() -> None:
    c = PixelContract(
        channels=2, dtype="uint16", scaling="range", lo=(100.0, 0.0), hi=(4195.0, 1000.0)
    )
    x = np.array([[[100, 0], [4195, 500], [2147, 1000]]], dtype=np.uint16)
    expected = (x.astype(np.float64) - [100, 0]) / [4095, 1000]
    np.testing.assert_allclose(c.scale(x), expected, rtol=1e-6)
    assert c.scale(x).dtype == np.float32


def test_dtype_scaling_is_the_old_rule() -> None:
    x = np.arange(0, 65535, 4099, dtype=np.uint16).reshape(1, -1, 1)
    assert np.array_equal(PixelContract(channels=1).scale(x), to_float01(x))


def test_measured_percentiles_match_numpy() -> None:
    rng = np.random.default_rng(1)
    images = [rng.integers(0, 4096, (40, 50, 2), dtype=np.uint16) for _ in range(3)]
    c = measure_contract(images, percentiles=(1, 99))
    assert (c.scaling, c.dtype, c.channels) == ("percentile", "uint16", 2)
    flat = np.concatenate([i.reshape(-1, 2) for i in images]).astype(np.float64)
    np.testing.assert_allclose(c.lo, np.percentile(flat, 1, axis=0))
    np.testing.assert_allclose(c.hi, np.percentile(flat, 99, axis=0))
    scaled = (flat - c.lo) / (np.array(c.hi) - c.lo)
    np.testing.assert_allclose(c.mean, scaled.mean(0), rtol=1e-5)
    np.testing.assert_allclose(c.std, scaled.std(0), rtol=1e-5)


@pytest.mark.parametrize("width", [100, 101])
def test_a_sample_of_large_images_sees_every_column(width: int) -> None:
    """Every k-th pixel of an image k divides the width of is the same columns of every row:
    an image of alternating dark and bright columns was measured as all dark. The sample
    stays deterministic, and the same from a dask array."""
    import dask.array as da

    image = np.zeros((200, width, 1), np.uint16)
    image[:, 1::2] = 1000
    c = measure_contract([image], percentiles=(0, 100), max_samples=10_000)
    assert (c.lo, c.hi) == ((0.0,), (1000.0,))
    assert c.mean is not None and c.mean[0] == pytest.approx(0.5, abs=0.02)
    assert measure_contract([image], percentiles=(0, 100), max_samples=10_000) == c
    lazy = da.from_array(image, chunks=(64, 48, 1))
    assert measure_contract([lazy], percentiles=(0, 100), max_samples=10_000) == c


@pytest.mark.parametrize(
    ("dtype", "high", "scaling"),
    [("uint8", 255, "dtype"), ("uint16", 4095, "percentile"), ("float32", 1, "dtype")],
)
def test_auto_scaling_by_dtype(dtype: str, high: int, scaling: str) -> None:
    image = (np.random.default_rng(0).random((20, 20, 1)) * high).astype(dtype)
    assert measure_contract([image]).scaling == scaling


@pytest.mark.parametrize(("low", "high"), [(0.0, 1000.0), (0.0, 1.5), (-0.5, 0.5)])
def test_float_pixels_beyond_0_1_are_measured_not_taken_as_unit(low: float, high: float) -> None:
    """Only floats within [0, 1] keep the dtype rule: others (a reflectance raster in
    0..1000, a slight overshoot) would reach the model far outside its [0, 1] input."""
    image = np.random.default_rng(0).uniform(low, high, (30, 40, 1)).astype(np.float32)
    c = measure_contract([image])
    assert c.scaling == "percentile"
    flat = image.reshape(-1).astype(np.float64)
    np.testing.assert_allclose(c.lo, [np.percentile(flat, 0.5)])
    np.testing.assert_allclose(c.hi, [np.percentile(flat, 99.5)])


@pytest.mark.parametrize(
    ("dtype", "values", "flat_hi"),
    [("float32", (0.1, 0.6), 1.0), ("float32", (0.2, 0.25), 1.0), ("uint16", (100, 101), 65535.0)],
)
def test_a_narrow_channel_keeps_its_measured_range(
    dtype: str, values: tuple[float, float], flat_hi: float
) -> None:
    """Only a flat channel (hi == lo) falls back to its dtype's range; one of a small spread
    (a float channel within 0.1..0.6, integers one apart) is scaled by what was measured."""
    rng = np.random.default_rng(0)
    narrow = rng.choice(np.array(values, dtype=dtype), (20, 30))
    image = np.stack([narrow, np.full_like(narrow, values[0])], axis=-1)  # narrow, flat
    c = measure_contract([image], scaling="percentile", percentiles=(0, 100))
    assert c.lo == (float(np.float32(values[0])),) * 2
    assert c.hi == (float(np.float32(values[1])), float(np.float32(values[0])) + flat_hi)


@pytest.mark.parametrize(
    ("shape", "max_samples"), [((90, 111), 3000), ((7, 13), 4), ((64, 64), 1000)]
)
def test_sampled_pixels_draw_one_pixel_from_each_equal_run(
    shape: tuple[int, int], max_samples: int
) -> None:
    """Run ``i`` of ``m`` covers pixels ``n * i // m`` to ``n * (i + 1) // m`` in row-major
    order, so the runs end at the image's last pixel: the last rows are measured too."""
    n = shape[0] * shape[1]
    image = np.arange(n, dtype=np.int64).reshape(*shape, 1)  # each pixel holds its index
    picked = sampled_pixels(image, max_samples, 1)[:, 0]
    assert len(picked) == max_samples
    starts = [n * i // max_samples for i in range(max_samples + 1)]
    assert all(starts[i] <= v < starts[i + 1] for i, v in enumerate(picked.tolist()))


def test_as_dict_round_trips_and_bad_contracts_are_refused() -> None:
    c = measure_contract([_scene(0)[0][..., None]], pixel_size_um=PX, channel_names=["dapi"])
    assert PixelContract.from_dict(c.as_dict()) == c
    with pytest.raises(ValueError, match="one per channel"):
        PixelContract(channels=2, channel_names=("a",))
    with pytest.raises(ValueError, match="hi > lo"):
        PixelContract(channels=1, scaling="range", lo=(5.0,), hi=(5.0,))
    with pytest.raises(ValueError, match="unknown pixel contract entries"):
        PixelContract.from_dict({"channels": 1, "gamma": 2})


@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf])
@pytest.mark.parametrize("name", ["lo", "hi", "percentiles", "mean", "std"])
def test_non_finite_contract_values_are_refused(name: str, bad: float) -> None:
    """They would scale every pixel to NaN (and load from a checkpoint without a word)."""
    values = {"lo": (0.0,), "hi": (1.0,), "percentiles": (1.0, 99.0), "mean": (0.5,), "std": (0.2,)}
    values[name] = (bad,) * len(values[name])
    with pytest.raises(ValueError, match=rf"PixelContract\.{name} must be finite numbers"):
        PixelContract(channels=1, scaling="percentile", **values)  # type: ignore[arg-type]


def test_non_finite_training_pixels_are_left_out() -> None:
    """NaN and inf (a float raster's no-data) are not measured: the contract is the one of
    the pixels finite in every channel. A channel with nothing else is refused."""
    image = (np.random.default_rng(0).random((64, 64, 2)) * 3).astype(np.float32)
    image[0, :40] = np.nan
    image[5, :7, 1] = -np.inf
    finite = image.reshape(-1, 2)[np.isfinite(image.reshape(-1, 2)).all(axis=1)]
    assert len(finite) == 64 * 64 - 47
    assert measure_contract([image]) == measure_contract([finite[:, None, :]])
    image[..., 1] = np.nan
    with pytest.raises(ValueError, match=r"no pixel with finite values.*infinite: \[1\]"):
        measure_contract([image])


def test_training_folders_keep_dtype_and_channels(tmp_path: Path) -> None:
    (item,) = training.datasets.read_folder(_write_folder(tmp_path, [3]))
    assert item.image.dtype == np.uint16 and item.image.shape == (96, 96, 1)
    assert item.pixel_size_um == pytest.approx(PX)


def test_a_folder_mixing_dtypes_is_refused(tmp_path: Path) -> None:
    root = _write_folder(tmp_path, [3, 4])
    tifffile.imwrite(root / "images" / "4.tif", _scene(4)[0].astype(np.uint8))
    with pytest.raises(ValueError, match="share one dtype"):
        training.datasets.read_folder(root)


def test_training_pairs_are_scaled_by_the_contract(tmp_path: Path) -> None:
    (item,) = training.datasets.read_folder(_write_folder(tmp_path, [3]))
    c = PixelContract(channels=1, dtype="uint16", scaling="range", lo=(0.0,), hi=(4095.0,))
    g = Geometry(halo=0)
    image, labels = training.patch_pair(item, 10, 20, g, 16, scale=c.scale)
    expected = item.image[10:26, 20:36, 0] / 4095
    np.testing.assert_allclose(image[0], expected, rtol=1e-6)
    assert np.array_equal(labels, item.labels[10:26, 20:36])


# -- checkpoints ---------------------------------------------------------------------------


def _one_channel_model(contract: PixelContract | None) -> models.SegmentationModel:
    torch.manual_seed(0)
    net = models.build(
        "unet", class_names=["bg", "fg"], in_channels=1, width=2, depth=1, padding="same"
    )
    net.pixel_contract = contract
    return net.eval()


def test_checkpoint_keeps_the_contract_and_the_predictor_applies_it(tmp_path: Path) -> None:
    c = PixelContract(
        channels=1, dtype="uint16", scaling="range", lo=(0.0,), hi=(4095.0,), pixel_size_um=PX
    )
    net = _one_channel_model(c)
    loaded = models.load(models.save(net, tmp_path / "m.pt"))
    assert loaded.pixel_contract == c
    assert models.fingerprint(loaded) != models.fingerprint(_one_channel_model(None))
    windows = _scene(2, (32, 32))[0][None, ..., None]
    x = torch.from_numpy(windows.astype(np.float32).transpose(0, 3, 1, 2) / 4095)
    with torch.no_grad():
        expected = torch.softmax(net(x), dim=1).numpy()
    np.testing.assert_allclose(window_probabilities(loaded, windows), expected, atol=1e-5)


def test_shipped_models_without_a_contract_keep_the_dtype_rule() -> None:
    for name in models.shipped():
        net = models.load(name)
        assert net.pixel_contract is None  # written before contracts
        contract = models.pixel_contract_of(net)
        assert contract == PixelContract(channels=net.in_channels)


# -- inference checks ------------------------------------------------------------------------


class _Pyramid:
    """A reader-shaped value: three levels, 0.25 µm at level 0."""

    path = "slide.tif"
    dtype = np.dtype(np.uint8)

    def __init__(self, pixel_size_um: float | None = 0.25, channels: int = 3) -> None:
        self.pixel_size_um = pixel_size_um
        self.level_shapes = tuple((800 // 2**k, 800 // 2**k, channels) for k in range(3))

    def read(self, y0: int, y1: int, x0: int, x1: int, level: int = 0) -> np.ndarray:
        return np.full((y1 - y0, x1 - x0, self.level_shapes[0][2]), 128, np.uint8)


def test_level_closest_to_the_model_pixel_size() -> None:
    assert choose_level(PixelContract(channels=3, pixel_size_um=0.5), _Pyramid()) == 1
    assert choose_level(PixelContract(channels=3, pixel_size_um=0.9), _Pyramid()) == 2
    assert choose_level(PixelContract(channels=3, pixel_size_um=0.5), _Pyramid(None)) == 0
    assert choose_level(PixelContract(channels=3), _Pyramid()) == 0


def test_a_level_far_from_the_model_pixel_size_is_refused_with_the_way_out() -> None:
    c = PixelContract(channels=3, pixel_size_um=0.5)
    check_source(c, _Pyramid(), 1, model="m")  # 0.5 µm: fine
    with pytest.raises(PixelContractError, match=r"slide.tif level 0 has 0.25 µm.*--pixel-size"):
        check_source(c, _Pyramid(), 0, model="m", level_fixed=True)


def test_unknown_pixel_size_and_odd_intensities_warn() -> None:
    c = PixelContract(channels=3, pixel_size_um=0.5, mean=(0.9,) * 3, std=(0.05,) * 3)
    with pytest.warns(OutOfDistributionWarning) as seen:
        check_source(c, _Pyramid(None), 0, model="m")
    messages = " ".join(str(w.message) for w in seen)
    assert "pixel size unknown" in messages and "intensities unlike" in messages
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        check_source(PixelContract(channels=3, pixel_size_um=0.25), _Pyramid(), 0, model="m")


def test_a_fixed_range_model_refuses_another_dtype() -> None:
    c = PixelContract(channels=3, dtype="uint16", scaling="range", lo=(0.0,) * 3, hi=(4095.0,) * 3)
    with pytest.raises(PixelContractError, match=r"stores uint8 pixels.*uint16"):
        check_source(c, _Pyramid(), 0, model="m")


class _FloatPyramid(_Pyramid):
    dtype = np.dtype(np.float64)

    def read(self, y0: int, y1: int, x0: int, x1: int, level: int = 0) -> np.ndarray:
        return np.full((y1 - y0, x1 - x0, self.level_shapes[0][2]), 0.5, np.float64)


def test_a_fixed_range_float_model_takes_floats_of_any_width() -> None:
    """float64 pixels are the same numbers as float32 ones (scaled as float32 either way);
    integers of another width, or floats for an integer model, are not."""
    c = PixelContract(channels=3, dtype="float32", scaling="range", lo=(0.0,) * 3, hi=(2.0,) * 3)
    check_source(c, _FloatPyramid(), 0, model="m")
    as_uint16 = dataclasses.replace(c, dtype="uint16")
    with pytest.raises(PixelContractError, match=r"stores float64 pixels.*uint16"):
        check_source(as_uint16, _FloatPyramid(), 0, model="m")


@pytest.mark.parametrize(
    ("pixel_size_um", "fits"), [(0.37, False), (0.375, True), (0.625, True), (0.63, False)]
)
def test_pixel_size_tolerance_is_relative_to_the_model_pixel_size(
    pixel_size_um: float, fits: bool
) -> None:
    """0.25: 0.375 to 0.625 µm for a 0.5 µm model, as PixelContract's docstring says."""
    c = PixelContract(channels=3, pixel_size_um=0.5)
    if fits:
        check_source(c, _Pyramid(pixel_size_um), 0, model="m")
    else:
        with pytest.raises(PixelContractError, match="tolerance ±25%"):
            check_source(c, _Pyramid(pixel_size_um), 0, model="m")


# -- end to end: a 16-bit grey folder, trained and segmented without conversion -----------------


@pytest.fixture(scope="module")
def grey_model(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("grey16")
    train_dir = _write_folder(root / "train", [0, 1, 2])
    val_dir = _write_folder(root / "val", [7])
    config = training.TrainConfig(
        dataset="folder",
        train_folder=str(train_dir),
        val_folder=str(val_dir),
        steps=60,
        batch_size=4,
        patch=32,
        val_tile=32,
        lr=2e-2,
        loss_weights="balanced",
        num_threads=1,
        progress=False,
    )
    contract = training.pixel_contract_for(config)
    net = training.initial_model(
        "unet",
        class_names=training.class_names_for(config),
        contract=contract,
        width=8,
        depth=1,
        padding="same",
    )
    result = training.train(net, config)
    path = root / "grey.pt"
    training.save_trained(net, config, result, path, half=False)
    return path, val_dir / "images" / "7.tif"


def test_uint16_grey_folder_trains_and_segments_without_conversion(
    grey_model: tuple[Path, Path], tmp_path: Path
) -> None:
    path, image = grey_model
    net = models.load(path)
    c = net.pixel_contract
    assert c is not None and (c.channels, c.dtype, c.scaling) == (1, "uint16", "percentile")
    assert c.pixel_size_um == pytest.approx(PX)
    assert net.in_channels == 1
    # Trained on what it now records: its normalisation is the training pixels' statistics.
    np.testing.assert_allclose(net.input_mean, c.mean, rtol=1e-3)
    with warnings.catch_warnings():
        warnings.simplefilter("error", OutOfDistributionWarning)
        out = segpipe.segment(image, tmp_path / "r.zarr", path, scheduler="sync", tile=32)
    mask = segpipe.open_result(out)["mask"].values
    truth = _scene(7)[1]
    dice = 2 * np.sum((mask == 1) & (truth == 1)) / (np.sum(mask == 1) + np.sum(truth == 1))
    assert dice > 0.8


def test_the_grey_model_refuses_an_rgb_image(grey_model: tuple[Path, Path], tmp_path: Path) -> None:
    path, _ = grey_model
    rgb = tmp_path / "rgb.tif"
    tifffile.imwrite(rgb, np.zeros((64, 64, 3), np.uint16), photometric="rgb")
    with pytest.raises(PixelContractError) as err:
        segpipe.segment(rgb, tmp_path / "r.zarr", path, scheduler="sync", tile=32)
    message = str(err.value)
    assert str(rgb) in message and str(path) in message
    assert "3 channels (RGB)" in message and "trained on 1" in message
    assert not (tmp_path / "r.zarr").exists()  # refused before any work


def test_in_memory_prediction_uses_the_contract(grey_model: tuple[Path, Path]) -> None:
    net = models.load(grey_model[0])
    c = net.pixel_contract
    assert c is not None and c.lo is not None and c.hi is not None
    image = _scene(7)[0][..., None]
    scaled_by_hand = (image.astype(np.float64) - c.lo[0]) / (c.hi[0] - c.lo[0])
    x = torch.from_numpy(scaled_by_hand.astype(np.float32).transpose(2, 0, 1)[None].copy())
    with torch.no_grad():
        by_hand = torch.softmax(net(x), dim=1).numpy()
    np.testing.assert_allclose(window_probabilities(net, image[None]), by_hand, atol=1e-5)


def test_the_level_closest_to_the_model_pixel_size_is_segmented(
    grey_model: tuple[Path, Path], tmp_path: Path
) -> None:
    """A scan at half the model's pixel size: level 1 of its pyramid is segmented, and the
    result is in that level's pixels; level 0, fixed by hand, is refused with the way out."""
    path, _ = grey_model
    fine = np.kron(_scene(7)[0], np.ones((2, 2), np.uint16))  # 192 x 192 at PX / 2
    source = ArrayReader(fine, pixel_size_um=PX / 2)
    pyramid = segpipe.ingest(source, tmp_path / "fine.zarr", min_level_size=48)
    out = segpipe.segment(pyramid, tmp_path / "r.zarr", path, scheduler="sync", tile=32)
    meta = segpipe.results.read_meta(out)
    assert (meta.config.level, meta.shape) == (1, (96, 96))
    assert meta.pixel_size_um == pytest.approx(PX)
    with pytest.raises(PixelContractError, match=r"level 0 has 0.325 µm.*--level"):
        segpipe.segment(pyramid, tmp_path / "r0.zarr", path, scheduler="sync", tile=32, level=0)


# -- an alpha channel is a validity mask, not image content ------------------------------------


class _WithAlpha(_Pyramid):
    """A 4-channel reader-shaped value: grey 128 and a last channel 255, named as given."""

    def __init__(self, names: tuple[str, ...], mask_kind: str | None = "alpha") -> None:
        super().__init__(None, len(names))
        self.channel_names, self.mask_kind = names, mask_kind

    def read(self, y0: int, y1: int, x0: int, x1: int, level: int = 0) -> np.ndarray:
        pixels = super().read(y0, y1, x0, x1, level)
        pixels[..., -1] = 255
        return pixels


_RGBA = ("red", "green", "blue", "alpha")


@pytest.mark.parametrize(
    ("names", "mask_kind", "model_channels", "taken"),
    [
        (_RGBA, "alpha", 3, 3),
        (_RGBA, None, 3, 3),  # an opaque RGBA PNG (its alpha marks nothing) is still RGBA
        (("grey", "alpha"), "alpha", 1, 1),
        (_RGBA, "alpha", 4, 4),  # a model trained on RGBA keeps its alpha
        (_RGBA, "alpha", None, 4),  # a plain module that says nothing: all, as before
        (("red", "green", "blue", "nir"), None, 3, None),
        (("red", "green", "blue", "nir"), "alpha", 3, None),
        (_RGBA, "alpha", 2, None),
    ],
)
def test_an_alpha_channel_is_left_out_for_a_model_taking_one_channel_fewer(
    names: tuple[str, ...], mask_kind: str | None, model_channels: int | None, taken: int | None
) -> None:
    """The model gets the leading channels it takes; anything else is refused as before. The
    intensity check samples the model's channels only: an opaque alpha (1.0 scaled) beside
    them would read as a bright image."""
    reader = _WithAlpha(names, mask_kind)
    c = None
    if model_channels is not None:
        # grey 128 scaled is 0.5; an opaque alpha, where the model takes one, 1.0
        mean = tuple(1.0 if k == 3 else 0.5 for k in range(model_channels))
        c = PixelContract(channels=model_channels, mean=mean, std=(0.05,) * model_channels)
    if taken is None:
        with pytest.raises(PixelContractError, match="has 4 channels but model 'm' was trained"):
            check_source(c, reader, 0, model="m")
        return
    assert channels_taken(c, reader, 0) == taken
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        check_source(c, reader, 0, model="m")


def _rgba_scene(shape: tuple[int, int] = (60, 90)) -> np.ndarray:
    """``shape`` RGBA uint8: noise with a bright square, a transparent column of 16 px tiles
    (x 64:), a transparent corner and a half-transparent (still valid) band."""
    rng = np.random.default_rng(5)
    rgb = rng.integers(0, 120, (*shape, 3), dtype=np.uint8)
    rgb[20:40, 10:50] = 220
    alpha = np.full(shape, 255, np.uint8)
    alpha[40:45] = 128
    alpha[:, 64:] = 0
    alpha[:25, :20] = 0
    # Transparent pixels keep their colours, as many exports do (the RGB reference has them).
    return np.dstack([rgb, alpha])


def _png(path: Path, pixels: np.ndarray) -> Path:
    Image.fromarray(pixels, "RGBA" if pixels.shape[2] == 4 else "RGB").save(path)
    return path


def _tiff(path: Path, pixels: np.ndarray) -> Path:
    extra = {"extrasamples": ["unassalpha"]} if pixels.shape[2] == 4 else {}
    tifffile.imwrite(path, pixels, photometric="rgb", tile=(32, 32), **extra)
    return path


@pytest.mark.parametrize("mode", ["exact", "blend"])
@pytest.mark.parametrize("write", [_png, _tiff], ids=["png", "tiff"])
def test_an_rgba_image_is_segmented_by_an_rgb_model_as_its_rgb(
    tmp_path: Path, write: Callable[[Path, np.ndarray], Path], mode: str
) -> None:
    """The same probabilities as the image's RGB alone, wherever a tile is computed; with
    foreground "nodata" and "auto" (no pixel size: not a slide) a wholly transparent tile is
    not computed."""
    pixels = _rgba_scene()
    suffix = ".png" if write is _png else ".tif"
    rgba = write(tmp_path / f"rgba{suffix}", pixels)
    rgb = _png(tmp_path / "rgb.png", pixels[..., :3])
    torch.manual_seed(0)
    net = models.build(
        "unet", class_names=("bg", "fg"), in_channels=3, width=4, depth=2, padding="valid"
    ).eval()
    net.pixel_contract = measure_contract([pixels[..., :3]])  # mean and std: the sample checked
    assert net.pixel_contract.channels == 3
    tile = 16
    settings = dict(tile=tile, task_tiles=1, mode=mode, scheduler="sync")
    reference = segpipe.segment(rgb, tmp_path / "rgb.zarr", net, foreground="none", **settings)
    expected = segpipe.open_result(reference)["probabilities"].values
    opaque = pixels[..., 3] > 0
    has_data = np.array(
        [
            [opaque[y : y + tile, x : x + tile].any() for x in range(0, 90, tile)]
            for y in range(0, 60, tile)
        ]
    )
    for foreground in ("none", "nodata", "auto"):
        with warnings.catch_warnings():
            warnings.simplefilter("error", OutOfDistributionWarning)
            out = segpipe.segment(
                rgba, tmp_path / f"{foreground}.zarr", net, foreground=foreground, **settings
            )
        got = segpipe.open_result(out)["probabilities"].values
        meta = segpipe.results.read_meta(out)
        assert meta.config.foreground == ("none" if foreground == "none" else "nodata")
        summary = meta.summary
        assert summary is not None
        if foreground == "none":
            np.testing.assert_array_equal(got, expected)
            continue
        computed = got.sum(axis=0) > 0  # a computed pixel's probabilities sum to one
        assert computed[opaque].all()
        np.testing.assert_array_equal(got[:, computed], expected[:, computed])
        assert summary.tiles_background == (~has_data).sum()
        assert not computed[:, 64:].any()
