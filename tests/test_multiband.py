"""Issue 12's raster path end to end: a 4-band uint16 GeoTIFF folder trains without conversion,
the model segments a 4-band GeoTIFF with nodata (nodata tiles not computed, CRS and transform in
the result as rioxarray reads them) and refuses a 3-band image before any work.

Rasters are written by rasterio (GDAL); what is expected (valid tiles, CRS, transform, truth) comes
from what was written, not from segpipe's reading of it.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import rasterio
import tifffile
from rasterio.crs import CRS
from rasterio.transform import from_origin

import segpipe
from segpipe import models, training
from segpipe.models import PixelContractError
from segpipe.results import read_meta

pytestmark = pytest.mark.integration

CUSTOM = "+proj=tmerc +lat_0=0 +lon_0=10.5 +k=0.9996 +x_0=400000 +y_0=0 +ellps=GRS80 +units=m"
TRANSFORM = from_origin(512_000.0, 5_403_000.0, 2.0, 2.0)
TILE = 32


def _scene(seed: int, shape: tuple[int, int]) -> tuple[np.ndarray, np.ndarray]:
    """(4, y, x) 12-bit bands in uint16 (each band its own brightness of the squares) and the
    (y, x) labels."""
    rng = np.random.default_rng(seed)
    labels = np.zeros(shape, np.uint8)
    for _ in range(shape[0] * shape[1] // 1200):
        y, x = rng.integers(6, np.array(shape) - 6)
        labels[y - 5 : y + 5, x - 5 : x + 5] = 1
    bands = [
        400 + 100 * b + (1500 + 400 * b) * labels.astype(np.float64) + rng.normal(0, 100, shape)
        for b in range(4)
    ]
    return np.stack(bands).clip(1, 4095).astype(np.uint16), labels


def _write(path: Path, data: np.ndarray, **profile) -> Path:
    with rasterio.open(
        path, "w", driver="GTiff", width=data.shape[2], height=data.shape[1],
        count=data.shape[0], dtype=data.dtype, crs=CRS.from_user_input(CUSTOM),
        transform=TRANSFORM, tiled=True, blockxsize=32, blockysize=32, **profile,
    ) as ds:  # fmt: skip
        ds.write(data)
    return path


@pytest.fixture(scope="module")
def band4_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("band4")
    for split, seeds in (("train", [0, 1, 2]), ("val", [9])):
        for sub in ("images", "labels"):
            (root / split / sub).mkdir(parents=True)
        for s in seeds:
            data, labels = _scene(s, (96, 96))
            _write(root / split / "images" / f"{s}.tif", data)
            tifffile.imwrite(root / split / "labels" / f"{s}.tif", labels)
        (root / split / "classes.txt").write_text("background\nroof\n")
    config = training.TrainConfig(
        dataset="folder", train_folder=str(root / "train"), val_folder=str(root / "val"),
        steps=60, batch_size=4, patch=32, val_tile=32, lr=2e-2, loss_weights="balanced",
        num_threads=1, progress=False,
    )  # fmt: skip
    contract = training.pixel_contract_for(config)
    net = training.initial_model(
        "unet", class_names=training.class_names_for(config), contract=contract,
        width=8, depth=1, padding="same",
    )  # fmt: skip
    result = training.train(net, config)
    path = root / "band4.pt"
    training.save_trained(net, config, result, path, half=False)
    return path


def test_a_4_band_uint16_model_records_what_it_was_trained_on(band4_model: Path) -> None:
    net = models.load(band4_model)
    c = net.pixel_contract
    assert c is not None and (c.channels, c.dtype) == (4, "uint16")
    assert net.in_channels == 4


def test_a_4_band_geotiff_with_nodata_segments_with_its_crs_and_skips_nodata(
    band4_model: Path, tmp_path: Path
) -> None:
    import rioxarray  # noqa: F401  (registers .rio)
    import xarray as xr

    data, truth = _scene(5, (160, 224))
    valid = np.ones(truth.shape, bool)
    valid[:64, :] = False  # two rows of tiles of nodata
    valid[64:, 160:] = False  # and a block on the right
    data[:, ~valid] = 0
    image = _write(tmp_path / "scene.tif", data, nodata=0)

    out = segpipe.segment(image, tmp_path / "scene.seg.zarr", band4_model, tile=TILE,
                          task_tiles=1, scheduler="sync", min_level_size=32)  # fmt: skip
    meta = read_meta(out)
    expected = np.array(
        [[valid[y : y + TILE, x : x + TILE].any() for x in range(0, 224, TILE)]
         for y in range(0, 160, TILE)]
    )  # fmt: skip
    assert meta.config.foreground == "nodata"
    assert meta.summary is not None
    assert (meta.summary.tiles_computed, meta.summary.tiles_background) == (
        int(expected.sum()),
        int((~expected).sum()),
    )
    ds = xr.open_zarr(out, group="0")
    assert ds.rio.crs == CRS.from_user_input(CUSTOM)
    assert tuple(ds.rio.transform())[:6] == tuple(TRANSFORM)[:6]
    mask = ds["mask"].values
    assert (mask[~valid] == 0).all()
    probabilities = ds["probabilities"].values
    assert (probabilities[:, ~valid] == 0).all()  # never computed: the fill value
    got, want = mask[valid] == 1, truth[valid] == 1
    assert 2 * np.sum(got & want) / (got.sum() + want.sum()) > 0.8


def test_the_4_band_model_refuses_a_3_band_image(band4_model: Path, tmp_path: Path) -> None:
    data, _ = _scene(6, (64, 64))
    rgb = _write(tmp_path / "rgb.tif", data[:3])
    with pytest.raises(PixelContractError) as err:
        segpipe.segment(rgb, tmp_path / "rgb.seg.zarr", band4_model, tile=TILE, scheduler="sync")
    message = str(err.value)
    assert str(rgb) in message and str(band4_model) in message
    assert "trained on 4" in message
    assert not (tmp_path / "rgb.seg.zarr").exists()  # refused before any work
