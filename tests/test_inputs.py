"""The pixels a model is given (segpipe.execution.inputs): pixels a file marks invalid reach
it as the value its scaling maps to 0, however the file encodes them."""

import numpy as np
import pytest
import rasterio
from rasterio.transform import Affine
from test_execution import tiny_unet

import segpipe
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
