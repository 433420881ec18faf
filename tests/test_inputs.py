"""The pixels a model is given (segpipe.execution.inputs): pixels a file marks invalid reach
it as the value its scaling maps to 0, however the file encodes them."""

from types import SimpleNamespace

import numpy as np
import pytest
import rasterio
from rasterio.transform import Affine
from test_execution import tiny_unet

import segpipe
from segpipe.execution.inputs import model_pixels
from segpipe.geometry.tiling import Box
from segpipe.io.readers import ImageReadError
from segpipe.models import PixelContract
from segpipe.models.contract import measure_contract, scaling_affine


def geotiff(path, image: np.ndarray, nodata: float | None) -> None:
    """``image`` (Y, X, C) as a tiled GeoTIFF of its dtype declaring ``nodata``."""
    ny, nx, nc = image.shape
    with rasterio.open(
        path, "w", driver="GTiff", height=ny, width=nx, count=nc, dtype=image.dtype.name,
        nodata=nodata, crs="EPSG:32633", transform=Affine(1, 0, 500000, 0, -1, 5000000),
        tiled=True, blockxsize=16, blockysize=16,
    ) as ds:  # fmt: skip
        ds.write(image.transpose(2, 0, 1))


def probabilities(path, net, tmp_path) -> np.ndarray:
    out = segpipe.segment(
        path, tmp_path / f"{path.stem}.zarr", net, tile=16, task_tiles=1, foreground="none",
        probability_dtype="float32", device="cpu", scheduler="sync",
    )  # fmt: skip
    return segpipe.open_result(out)["probabilities"].values


def test_nodata_reaches_a_model_with_its_own_scaling_as_its_zero_however_encoded(tmp_path):
    """A percentile contract refuses only NaN and infinity, so a declared -9999 went into the
    model as it is (scaled to about -3), where NaN went in as 0: the valid pixels whose
    windows reach into nodata came out up to 0.94 apart. Both are now the contract's lo."""
    image = np.random.default_rng(0).uniform(0, 3000, (48, 48, 3)).astype(np.float32)
    net = tiny_unet(seed=3)
    net.pixel_contract = measure_contract([image], scaling="percentile")
    lo, _ = scaling_affine(net.pixel_contract, np.float32)
    encoded = {"nan": np.nan, "minus9999": -9999.0, "lo": None}  # lo: no nodata declared
    results = {}
    for name, nodata in encoded.items():
        corner = lo if nodata is None else nodata
        geotiff(tmp_path / f"{name}.tif", np.where(_corner(image), corner, image), nodata)
        results[name] = probabilities(tmp_path / f"{name}.tif", net, tmp_path)
    np.testing.assert_array_equal(results["nan"], results["minus9999"])
    np.testing.assert_array_equal(results["nan"], results["lo"])


@pytest.mark.parametrize("nodata", [0, 65535])
def test_an_integer_raster_nodata_reaches_the_model_as_0_whatever_its_value(tmp_path, nodata):
    image = np.random.default_rng(1).integers(1, 65535, (48, 48, 3), dtype=np.uint16)
    net = tiny_unet(seed=4)
    geotiff(tmp_path / "nodata.tif", np.where(_corner(image), nodata, image), nodata)
    geotiff(tmp_path / "zeros.tif", np.where(_corner(image), 0, image), None)
    np.testing.assert_array_equal(
        probabilities(tmp_path / "nodata.tif", net, tmp_path),
        probabilities(tmp_path / "zeros.tif", net, tmp_path),
    )


def _corner(image: np.ndarray) -> np.ndarray:
    """``(Y, X, 1)`` bool: the nodata corner of the tests' images, reached by the windows of
    the tiles beside it."""
    corner = np.zeros((*image.shape[:2], 1), bool)
    corner[:16, :20] = True
    return corner


# -- model_pixels on pixels in hand ------------------------------------------------------------

BOX = Box(0, 2, 0, 2)


@pytest.mark.parametrize(
    ("value", "refused"),
    [(1.0, False), (1.01, False), (-0.01, False), (1.02, True), (1.09, True), (-0.02, True)],
)
def test_float_pixels_a_model_takes_as_they_are_lie_in_0_1_within_a_hundredth(value, refused):
    """The dtype rule takes floats in [0, 1], with 0.01 of slack for resampling overshoot and
    none for [0, 255] data stored as float."""
    raw = np.full((2, 2, 3), 0.5, np.float32)
    raw[1, 0, 2] = value
    reader = SimpleNamespace(path="float.tif", level_shapes=[(2, 2, 3)])
    if not refused:
        np.testing.assert_array_equal(model_pixels(raw, reader, BOX, 0, None, 3), raw)
        return
    with pytest.raises(ImageReadError, match=r"float\.tif: float pixels must lie in \[0, 1\]"):
        model_pixels(raw, reader, BOX, 0, None, 3)


def test_colours_under_alpha_0_stay_and_only_what_the_model_cannot_take_is_replaced():
    """Under alpha 0 the colours are the file's own: they reach the model as they are; a NaN
    there (which the model cannot take) becomes the dtype rule's 0."""
    raw = np.array(
        [[[0.5, 0.5, 0.5, 1.0], [0.3, 0.6, 0.9, 0.0]],
         [[np.nan, 0.2, 0.4, 0.0], [0.5, 0.5, 0.5, 1.0]]],
        np.float32,
    )  # fmt: skip
    reader = SimpleNamespace(
        path="rgba.tif", mask_kind="alpha", nodata=None,
        channel_names=("red", "green", "blue", "alpha"),
    )  # fmt: skip
    expected = np.nan_to_num(raw[..., :3], nan=0.0)
    np.testing.assert_array_equal(model_pixels(raw, reader, BOX, 0, None, 3), expected)


@pytest.mark.parametrize(
    ("dtype", "lo", "stand_in"),
    [("uint8", 10.6, 11), ("uint8", 10.4, 10), ("uint16", 300.7, 301), ("uint8", 255.8, 255)],
)
def test_integer_nodata_becomes_the_integer_nearest_the_models_0(dtype, lo, stand_in):
    """A range contract maps ``lo`` to 0: nodata pixels become the integer nearest it (clipped
    to the dtype), not ``lo`` cut towards 0."""
    raw = np.array([[[0], [50]], [[0], [200]]], dtype)
    reader = SimpleNamespace(
        path="nodata.tif", mask_kind="nodata", nodata=(0.0,), channel_names=None
    )
    contract = PixelContract(channels=1, dtype=dtype, scaling="range", lo=(lo,), hi=(lo + 300,))
    got = model_pixels(raw, reader, BOX, 0, contract, 1)
    assert got.dtype == np.dtype(dtype)
    np.testing.assert_array_equal(got[..., 0], [[stand_in, 50], [stand_in, 200]])
