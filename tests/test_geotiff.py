"""GeoTIFFs through segpipe.io.readers: any CRS kept (WKT when no authority code names it), the
affine transform, nodata values, internal mask and alpha bands, multiband uint16 and float32.

Each raster is written by rasterio (GDAL) and read back; the expected CRS, transform and valid
pixels come from what was written, not from segpipe's own reading.
"""

from __future__ import annotations

import numpy as np
import pytest
import rasterio
import tifffile
import torch
from rasterio.crs import CRS
from rasterio.enums import Resampling
from rasterio.transform import from_origin

import segpipe
from segpipe import models
from segpipe.geometry.tiling import Box, mirror_indices
from segpipe.io.describe import describe_image
from segpipe.io.ome import PixelGrid
from segpipe.io.readers import (
    ArrayReader,
    Georeference,
    ImageReadError,
    open_image,
    read_mirrored,
    valid_mask,
)

# A transverse Mercator no EPSG code names (GRS80, central meridian 10.5°, false easting 400 km).
CUSTOM = "+proj=tmerc +lat_0=0 +lon_0=10.5 +k=0.9996 +x_0=400000 +y_0=0 +ellps=GRS80 +units=m"
SHAPE = (200, 300)
TRANSFORM = from_origin(512_000.0, 5_403_000.0, 2.0, 2.0)


def _bands(n: int, dtype: str) -> np.ndarray:
    rng = np.random.default_rng(5)
    yy, xx = np.mgrid[: SHAPE[0], : SHAPE[1]]
    base = np.stack([(yy * (b + 1) + xx * (n - b)) * 7.0 for b in range(n)])
    return (base + rng.integers(1, 50, (n, *SHAPE))).astype(dtype)


def write_raster(path, data, *, crs=CUSTOM, overviews=(2,), **profile):
    """A tiled GeoTIFF of ``data`` (band, y, x) with GDAL overviews (nearest)."""
    kw = {
        "driver": "GTiff",
        "width": data.shape[2],
        "height": data.shape[1],
        "count": data.shape[0],
        "dtype": data.dtype,
        "crs": None if crs is None else CRS.from_user_input(crs),
        "transform": TRANSFORM,
        "tiled": True,
        "blockxsize": 64,
        "blockysize": 64,
        **profile,
    }
    with rasterio.open(path, "w", **kw) as ds:
        ds.write(data)
        if overviews:
            ds.build_overviews(list(overviews), Resampling.nearest)
    return path


@pytest.fixture(scope="module")
def multiband(tmp_path_factory):
    """4-band uint16 with nodata 0 over a 60 x 90 corner and a hole inside the image."""
    data = _bands(4, "uint16")
    data[:, :60, :90] = 0
    data[:, 120:140, 150:200] = 0
    data[2, 10:20, 200:220] = 0  # nodata in one band only: still valid (not all bands)
    path = tmp_path_factory.mktemp("geo") / "multiband.tif"
    return write_raster(path, data, nodata=0), data


def test_multiband_uint16_reads_back(multiband):
    path, data = multiband
    reader = open_image(path)
    assert reader.level_shapes == ((200, 300, 4), (100, 150, 4))
    assert reader.dtype == np.uint16
    np.testing.assert_array_equal(reader.read(0, 200, 0, 300), data.transpose(1, 2, 0))
    with rasterio.open(path, overview_level=0) as ds:  # GDAL's overview is level 1
        np.testing.assert_array_equal(reader.level(1).compute(), ds.read().transpose(1, 2, 0))


def test_custom_crs_is_kept_as_wkt_with_the_transform(multiband):
    path, _ = multiband
    geo = open_image(path).georeference
    assert CRS.from_user_input(CUSTOM).to_epsg() is None  # truly no EPSG code
    assert geo.crs.startswith(("PROJCS[", "PROJCRS["))  # WKT, not "EPSG:32767"
    assert CRS.from_user_input(geo.crs) == CRS.from_user_input(CUSTOM)
    assert CRS.from_wkt(geo.crs_wkt) == CRS.from_user_input(CUSTOM)
    assert geo.transform == tuple(TRANSFORM)[:6]
    grid = PixelGrid.of(None, geo.crs, geo.transform)  # what results build their coordinates from
    assert grid.units == "metre"
    assert grid.origin == (5_403_000.0 - 1.0, 512_000.0 + 1.0)  # pixel centres


def test_epsg_crs_stays_an_authority_code(tmp_path):
    path = write_raster(tmp_path / "utm.tif", _bands(3, "uint8"), crs="EPSG:32633")
    geo = open_image(path).georeference
    assert geo.crs == "EPSG:32633"
    assert geo.crs_name == "EPSG:32633"


@pytest.mark.parametrize(
    ("crs", "resembles"),
    [
        # International 1924 ellipsoid, no datum: PROJ takes it for ED50 / UTM 33N at 70%
        ("+proj=utm +zone=33 +ellps=intl +units=m +no_defs", "EPSG:23033"),
        # GRS80 and UTM 33N's parameters, no datum: ETRS89 / UTM 33N at 70%
        (
            "+proj=tmerc +lat_0=0 +lon_0=15 +k=0.9996 +x_0=500000 +y_0=0 +ellps=GRS80 +units=m",
            "EPSG:25833",
        ),
    ],
    ids=["intl-utm", "grs80-tmerc"],
)
def test_a_crs_only_resembling_an_epsg_one_is_kept_as_wkt(tmp_path, crs, resembles):
    """Named by the code it resembles, a CRS gains a datum the file never stated (ED50 for an
    unknown datum on the International ellipsoid): a shift of ~100 m on reprojection."""
    path = write_raster(tmp_path / "near.tif", _bands(1, "uint8"), crs=crs, overviews=())
    with rasterio.open(path) as ds:
        written = ds.crs
    assert ":".join(written.to_authority(confidence_threshold=70)) == resembles  # the trap
    geo = open_image(path).georeference
    assert not geo.crs.startswith("EPSG:")
    assert CRS.from_wkt(geo.crs) == written
    assert geo.transform == tuple(TRANSFORM)[:6]


def test_local_engineering_crs(tmp_path):
    local = 'LOCAL_CS["site grid",UNIT["metre",1],AXIS["X",EAST],AXIS["Y",NORTH]]'
    path = write_raster(tmp_path / "local.tif", _bands(1, "uint8"), crs=local)
    geo = open_image(path).georeference
    assert "site grid" in geo.crs
    assert geo.crs_name == "site grid"
    assert geo.transform == tuple(TRANSFORM)[:6]


def test_nodata_valid_mask(multiband):
    path, data = multiband
    reader = open_image(path)
    assert reader.nodata == (0.0, 0.0, 0.0, 0.0)
    assert reader.mask_kind == "nodata"
    expected = (data != 0).any(axis=0)  # GDAL: invalid only where every band is nodata
    np.testing.assert_array_equal(reader.valid_mask(0, 200, 0, 300), expected)
    with rasterio.open(path) as ds:  # and GDAL's own dataset mask agrees
        np.testing.assert_array_equal(ds.dataset_mask() > 0, expected)
    np.testing.assert_array_equal(reader.valid_mask(50, 70, 80, 100), expected[50:70, 80:100])
    level1 = (reader.level(1).compute() != 0).any(axis=-1)
    np.testing.assert_array_equal(reader.valid_mask(0, 100, 0, 150, level=1), level1)


def test_valid_mask_follows_read_mirrored(multiband):
    """The mask of a halo'd box leaving the image mirrors as its pixels do."""
    path, _ = multiband
    reader = open_image(path)
    box = Box(-8, 40, 250, 310)
    pixels = read_mirrored(reader, box)
    np.testing.assert_array_equal(valid_mask(reader, box), (pixels != 0).any(axis=-1))


def test_internal_mask_band(tmp_path):
    data = _bands(3, "uint8")
    mask = np.full(SHAPE, 255, np.uint8)
    mask[100:, 200:] = 0  # even edges: any nearest overview of it is mask[::2, ::2]
    path = tmp_path / "masked.tif"
    with rasterio.Env(GDAL_TIFF_INTERNAL_MASK=True):
        kw = dict(driver="GTiff", width=300, height=200, count=3, dtype="uint8", tiled=True)
        with rasterio.open(path, "w", crs=CUSTOM, transform=TRANSFORM, **kw) as ds:
            ds.write(data)
            ds.write_mask(mask)
            ds.build_overviews([2], Resampling.nearest)
    assert any(p.is_mask for p in tifffile.TiffFile(path).pages)  # the mask is inside the TIFF
    reader = open_image(path)
    assert reader.shape == (200, 300, 3)  # the image, not its mask
    np.testing.assert_array_equal(reader.read(0, 200, 0, 300), data.transpose(1, 2, 0))
    assert reader.mask_kind == "mask"
    assert reader.nodata is None
    np.testing.assert_array_equal(reader.valid_mask(0, 200, 0, 300), mask > 0)
    np.testing.assert_array_equal(reader.valid_mask(0, 100, 0, 150, level=1), mask[::2, ::2] > 0)


def test_alpha_band(tmp_path):
    data = _bands(4, "uint8")
    data[3] = 255
    data[3, :30, :45] = 0
    path = write_raster(tmp_path / "rgba.tif", data, overviews=(), photometric="RGB", alpha="YES")
    reader = open_image(path)
    assert reader.mask_kind == "alpha"
    assert reader.channel_names == ("red", "green", "blue", "alpha")
    np.testing.assert_array_equal(reader.valid_mask(0, 200, 0, 300), data[3] > 0)
    with rasterio.open(path) as ds:
        np.testing.assert_array_equal(ds.dataset_mask() > 0, data[3] > 0)


def test_an_alpha_band_described_otherwise_is_still_the_alpha(tmp_path):
    """GDAL's colour interpretation, not a band's description, says which band is alpha: an
    RGB model then leaves it out (models.channels_taken)."""
    from segpipe.models import PixelContract, channels_taken

    data = _bands(4, "uint8")
    data[3] = 255
    data[3, :30, :45] = 0
    path = write_raster(tmp_path / "rgba.tif", data, overviews=(), photometric="RGB", alpha="YES")
    with rasterio.open(path, "r+") as ds:
        ds.set_band_description(4, "Alpha (scanner mask)")
        ds.set_band_description(1, "Red")
    reader = open_image(path)
    assert reader.channel_names == ("Red", "green", "blue", "alpha")
    assert channels_taken(PixelContract(channels=3), reader) == 3
    np.testing.assert_array_equal(reader.valid_mask(0, 200, 0, 300), data[3] > 0)


@pytest.mark.parametrize("copy", ["file", "ingest"])
def test_an_alpha_band_beside_a_nodata_value_is_the_mask(tmp_path, copy):
    """With a nodata value GDAL flags every band "nodata", the alpha too: read so, transparent
    pixels of any colour were valid, and an opaque black one invalid; GDAL's mask is the alpha."""
    from segpipe.io.ingest import ingest

    data = _bands(4, "uint8")
    data[data == 0] = 1
    data[3] = 255
    data[3, :, :100] = 0  # transparent, coloured
    data[:3, :50, :] = 0  # black (the nodata value), opaque right of column 100
    path = write_raster(
        tmp_path / "rgba.tif", data, overviews=(), photometric="RGB", alpha="YES", nodata=0
    )
    if copy == "ingest":
        path = ingest(path, tmp_path / "rgba.zarr", chunk=64)
    reader = open_image(path)
    assert reader.mask_kind == "alpha"
    np.testing.assert_array_equal(reader.valid_mask(0, 200, 0, 300), data[3] > 0)
    with rasterio.open(write_raster(tmp_path / "again.tif", data, overviews=(), photometric="RGB",
                                    alpha="YES", nodata=0)) as ds:  # fmt: skip
        np.testing.assert_array_equal(ds.dataset_mask() > 0, data[3] > 0)


def test_a_band_described_alpha_beside_nodata_is_no_alpha_in_the_copy_either(tmp_path):
    """The ingested copy took a band whose description is "alpha" (GDAL's colour
    interpretation says otherwise) for the alpha over the nodata value: the file and its copy
    disagreed on which pixels hold data."""
    from segpipe.io.ingest import ingest

    data = np.full((2, 128, 128), 7, np.uint16)
    data[:, :32] = 0  # every band at nodata: no data
    data[1, 64:] = 0  # the band described "alpha" at 0, the other not: data
    path = write_raster(tmp_path / "two.tif", data, overviews=(), nodata=0)
    with rasterio.open(path, "r+") as ds:
        ds.set_band_description(2, "alpha")
    expected = (data != 0).any(axis=0)
    for reader in (open_image(path), open_image(ingest(path, tmp_path / "two.zarr", chunk=64))):
        assert reader.mask_kind == "nodata"
        np.testing.assert_array_equal(reader.valid_mask(0, 128, 0, 128), expected)


def test_a_min_is_white_geotiffs_nodata_marks_the_stored_value_not_the_shown_one(tmp_path):
    """GDAL's nodata is a stored value, but min-is-white pixels are given out inverted: taken
    as a shown value, the empty pixels (stored 0, shown 255) read as data and real black ones
    (stored 255) were masked out."""
    stored = np.tile(np.array([0, 0, 50, 255, 128, 0, 255, 7], np.uint8), (6, 1))
    stored[2:4, :3] = 0
    path = tmp_path / "white.tif"
    with rasterio.open(
        path, "w", driver="GTiff", width=8, height=6, count=1, dtype="uint8",
        crs="EPSG:32633", transform=TRANSFORM, nodata=0, photometric="MINISWHITE",
    ) as ds:  # fmt: skip
        ds.write(stored[None])
    with rasterio.open(path) as ds:  # the reference: GDAL's dataset mask
        gdal_valid = ds.dataset_mask() > 0
    np.testing.assert_array_equal(gdal_valid, stored != 0)
    reader = open_image(path)
    np.testing.assert_array_equal(reader.read(0, 6, 0, 8)[..., 0], 255 - stored)
    np.testing.assert_array_equal(reader.valid_mask(0, 6, 0, 8), gdal_valid)
    np.testing.assert_array_equal(reader.valid_mask(2, 5, 1, 6), gdal_valid[2:5, 1:6])


def test_float32_single_band_nodata(tmp_path):
    data = _bands(1, "float32")
    data[0, 150:, :] = -9999.0
    reader = open_image(write_raster(tmp_path / "dem.tif", data, nodata=-9999.0))
    assert reader.shape == (200, 300, 1)
    assert reader.dtype == np.float32
    assert reader.nodata == (-9999.0,)
    np.testing.assert_array_equal(reader.valid_mask(0, 200, 0, 300), data[0] != -9999.0)


def test_plain_tiff_has_no_mask(tmp_path):
    tifffile.imwrite(tmp_path / "plain.tif", _bands(3, "uint8").transpose(1, 2, 0))
    reader = open_image(tmp_path / "plain.tif")
    assert reader.georeference is None and reader.mask_kind is None and reader.nodata is None
    assert reader.valid_mask(0, 10, 0, 10) is None
    assert valid_mask(reader, Box(0, 10, 0, 10)).all()


@pytest.mark.parametrize("crs", [CUSTOM, None], ids=["crs", "no-crs"])
@pytest.mark.parametrize(
    "affine",
    [(2.0, 0.5, 0.5, -2.0), (2.0, 0.3, 0.0, -2.0), (2.0, 0.0, 0.3, -2.0), (0.0, 2.0, 2.0, 0.0)],
)
def test_rotated_or_sheared_geotiff_is_refused(tmp_path, crs, affine):
    """Without a CRS the transform still says the pixels lie on a rotated grid; a turn by 90
    degrees (pixel sizes a and e of 0) was called a broken transform. A shear in y alone (d
    not 0, b 0) is one too: results' coordinates would drop it."""
    a, b, d, e = affine
    path = write_raster(tmp_path / "rot.tif", _bands(1, "uint8"), crs=crs, overviews=())
    with rasterio.open(path, "r+") as ds:
        ds.transform = rasterio.Affine(a, b, 512_000.0, d, e, 5_403_000.0)
    with pytest.raises(ImageReadError, match=r"rot\.tif: rotated/sheared GeoTIFF"):
        open_image(path)


def test_a_geotransform_without_a_crs_reads_unplaced_with_a_warning(tmp_path):
    """It was dropped without a word: results in pixels from 0, the file placed elsewhere."""
    path = write_raster(tmp_path / "nocrs.tif", _bands(1, "uint8"), crs=None, overviews=())
    with pytest.warns(UserWarning, match=r"nocrs\.tif: geotransform .* without a CRS"):
        reader = open_image(path)
    assert reader.georeference is None and reader.pixel_size_um is None


def test_describe_a_geotiff(multiband):
    path, _ = multiband
    info = describe_image(path)
    assert info.vendor == "geotiff"
    assert info.levels == ((200, 300, 4), (100, 150, 4))
    assert (info.dtype, info.channels) == ("uint16", 4)
    assert CRS.from_wkt(info.crs_wkt) == CRS.from_user_input(CUSTOM)
    assert info.transform == tuple(TRANSFORM)[:6]
    assert info.to_dict()["nodata"] == [0.0, 0.0, 0.0, 0.0]
    text = "\n".join(info.lines())
    assert "crs: custom Transverse Mercator" in text
    assert "transform: origin (x 512000, y 5403000), pixel 2 x -2" in text
    assert "invalid pixels: marked by nodata (nodata 0.0)" in text


def test_custom_crs_result_reads_in_rioxarray(tmp_path):
    """The WKT travels into the result: rioxarray reads the same CRS and transform."""
    import rioxarray  # noqa: F401  (registers .rio)

    torch.manual_seed(0)
    net = models.build("unet", class_names=("bg", "fg"), width=4, depth=2, padding="valid").eval()
    path = write_raster(tmp_path / "rgb.tif", _bands(3, "uint8")[:, :96, :128], overviews=())
    out = segpipe.segment(
        path, tmp_path / "r.zarr", net, tile=32, task_tiles=2, scheduler="sync", min_level_size=32
    )
    ds = segpipe.open_result(out)
    assert ds.rio.crs == CRS.from_user_input(CUSTOM)
    assert tuple(ds.rio.transform())[:6] == tuple(TRANSFORM)[:6]


def test_info_gives_a_georeferenced_results_areas_in_its_crs_units(tmp_path, capsys):
    """info showed fractions only, its JSON an area of None for every class (no µm pixel
    size), while query gave the areas in metres²."""
    import json

    from segpipe.cli import main

    torch.manual_seed(0)
    net = models.build("unet", class_names=("bg", "fg"), width=4, depth=2, padding="valid").eval()
    path = write_raster(tmp_path / "rgb.tif", _bands(3, "uint8")[:, :96, :128], overviews=())
    out = segpipe.segment(path, tmp_path / "r.zarr", net, tile=32, scheduler="sync")
    queried = segpipe.query.class_areas(out).compute()
    expected = (queried["pixels"].values * 2.0 * 2.0).tolist()  # 2 m pixels
    assert main(["info", str(out), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["area_units"] == "metre**2" and info["pixel_size_um"] is None
    assert [c["area"] for c in info["classes"]] == expected
    assert info["summary"]["class_area"] == expected
    assert info["summary"]["area_units"] == "metre**2"
    assert queried["area"].values.tolist() == expected
    assert main(["info", str(out)]) == 0
    text = capsys.readouterr().out
    assert f"{expected[1]:,.1f} m²" in text


def test_info_gives_a_georeferenced_results_foreground_area_in_its_crs_units(tmp_path, capsys):
    """Its foreground (nodata left out) had an area in µm² only: None, the CRS in metres."""
    import json

    from segpipe.cli import main

    torch.manual_seed(0)
    net = models.build("unet", class_names=("bg", "fg"), width=4, depth=2, padding="valid").eval()
    data = _bands(3, "uint8")[:, :96, :128]
    data[:, :, :40] = 0  # nodata
    path = write_raster(tmp_path / "rgb.tif", data, overviews=(), nodata=0)
    out = segpipe.segment(path, tmp_path / "r.zarr", net, tile=32, scheduler="sync")
    assert main(["info", str(out), "--json"]) == 0
    summary = json.loads(capsys.readouterr().out)["summary"]
    assert summary["foreground_pixels"] > 0 and summary["foreground_area_um2"] is None
    assert summary["foreground_area"] == summary["foreground_pixels"] * 2.0 * 2.0
    assert main(["info", str(out)]) == 0
    text = capsys.readouterr().out
    area = f"{summary['foreground_area']:,.1f} m²"
    assert f"foreground: {100 * summary['foreground_fraction']:.2f} % of the image, {area}" in text


def test_ingest_keeps_nodata_and_the_valid_mask(multiband, tmp_path):
    """The flows ingest first: the OME-Zarr copy must still say which pixels hold no data."""
    from segpipe.io.ingest import ingest

    path, data = multiband
    store = open_image(ingest(path, tmp_path / "multiband.zarr", chunk=64))
    assert store.nodata == (0.0, 0.0, 0.0, 0.0)
    assert store.georeference == open_image(path).georeference
    np.testing.assert_array_equal(store.valid_mask(0, 200, 0, 300), (data != 0).any(axis=0))


def test_pixel_valid_mask_rules():
    """BaseReader's own rule (readers without GDAL): all bands at nodata, NaN, or alpha 0."""
    from segpipe.io.readers import ArrayReader

    pixels = np.array([[[0, 0], [0, 5]], [[7, 0], [np.nan, np.nan]]], dtype=np.float32)
    reader = ArrayReader(pixels)
    assert reader.valid_mask(0, 2, 0, 2) is None
    reader.mask_kind, reader.nodata = "nodata", (0.0, 0.0)
    assert reader.valid_mask(0, 2, 0, 2).tolist() == [[False, True], [True, True]]
    reader.nodata = (float("nan"), float("nan"))
    assert reader.valid_mask(0, 2, 0, 2).tolist() == [[True, True], [True, False]]
    reader.nodata = (0.0, None)  # a band without nodata is valid everywhere
    assert reader.valid_mask(0, 2, 0, 2).all()
    reader.mask_kind, reader.channel_names = "alpha", ("grey", "alpha")
    assert reader.valid_mask(0, 2, 0, 2).tolist() == [[False, True], [False, False]]


def test_geotiff_at_a_url_keeps_crs_nodata_and_mask(multiband):
    """GDAL reads a remote GeoTIFF's metadata through the same fsspec filesystem as tifffile."""
    import fsspec

    path, data = multiband
    fsspec.filesystem("memory").pipe("/segpipe-geotiff/multiband.tif", path.read_bytes())
    reader = open_image("memory://segpipe-geotiff/multiband.tif")
    assert reader.georeference == open_image(path).georeference
    assert reader.nodata == (0.0, 0.0, 0.0, 0.0)
    np.testing.assert_array_equal(reader.valid_mask(0, 200, 0, 300), (data != 0).any(axis=0))


# GeoKey directory naming EPSG:32633 (GTModelType projected, ProjectedCSType 32633).
_UTM_KEYS = (34735, 3, 8, (1, 1, 0, 1, 3072, 0, 1, 32633))


def _scale_tie(sx, sy, x=500_000.0, y=5_000_000.0):
    return [(33550, 12, 3, (sx, sy, 0.0)), (33922, 12, 6, (0, 0, 0, x, y, 0))]


def _model_transform(a, e):
    return [(34264, 12, 16, (a, 0, 0, 500_000.0, 0, e, 0, 5_000_000.0, *[0] * 7, 1))]


@pytest.mark.parametrize(
    ("tags", "crs"),
    [
        pytest.param(_scale_tie(float("nan"), 10.0), "EPSG:32633", id="nan-pixel-scale"),
        pytest.param(_scale_tie(float("nan"), 10.0), None, id="nan-pixel-scale-no-crs"),
        pytest.param(_scale_tie(10.0, 10.0, x=float("nan")), "EPSG:32633", id="nan-tiepoint"),
        pytest.param(_model_transform(float("inf"), -10.0), "EPSG:32633", id="inf-transform"),
        pytest.param(_model_transform(0.0, -10.0), "EPSG:32633", id="zero-pixel-size"),
        pytest.param(_model_transform(10.0, 0.0), "EPSG:32633", id="zero-y-pixel-size"),
    ],
)
def test_a_geotransform_not_finite_or_of_pixel_size_0_is_refused(tmp_path, tags, crs):
    """A NaN transform reached results and zarr.json (as bare NaN, not JSON); none of these
    places any pixel anywhere."""
    path = tmp_path / "broken.tif"
    keys = [_UTM_KEYS] if crs else []
    tifffile.imwrite(path, np.zeros((64, 64), np.uint16), tile=(32, 32), extratags=tags + keys)
    with rasterio.open(path) as ds:  # GDAL does hand the broken transform on
        a, _, c, _, e, f = tuple(ds.transform)[:6]
        assert not all(np.isfinite([a, c, e, f])) or 0 in (a, e)
        assert (ds.crs is None) == (crs is None)
    with pytest.raises(
        ImageReadError, match=r"broken\.tif: geotransform .* not finite or has a pixel size of 0"
    ):
        open_image(path)


def _two_geotiffs(path):
    """A TIFF of two GeoTIFF images: a 32 x 32 one at 4 m and nodata 1 first (not flagged
    reduced), the 128 x 128 one at 1 m and nodata 0, left half 0, second."""
    big = np.full((128, 128), 9, np.uint8)
    big[:, :64] = 0
    with tifffile.TiffWriter(path) as tif:
        for image, scale, nodata in ((np.full((32, 32), 7, np.uint8), 4.0, "1"), (big, 1.0, "0")):
            tags = [*_scale_tie(scale, scale), _UTM_KEYS, (42113, 2, 0, nodata)]
            tif.write(image, extratags=tags, metadata=None)
    return path, big


def test_a_geotiff_of_several_images_is_placed_by_the_image_read(tmp_path):
    """GDAL reads a file's first image: the largest, second, was read with the first's
    transform (4 m pixels, 4x its extent) and nodata."""
    path, big = _two_geotiffs(tmp_path / "two.tif")
    with pytest.warns(UserWarning, match="holds 2 images"):
        reader = open_image(path)
    assert reader.level_shapes == ((128, 128, 1),)
    with rasterio.open(f"GTIFF_DIR:2:{path}") as ds:
        assert reader.georeference == Georeference("EPSG:32633", tuple(ds.transform)[:6])
    assert reader.georeference.transform[0] == 1.0
    assert reader.nodata == (0.0,)
    np.testing.assert_array_equal(reader.valid_mask(0, 128, 0, 128), big != 0)


@pytest.mark.filterwarnings("ignore:.*holds 2 images:UserWarning")
def test_a_geotiff_of_several_images_gdal_cannot_open_the_read_one_of_is_refused(tmp_path):
    """At a URL GDAL cannot be pointed at a later IFD: refused, naming both images."""
    import fsspec

    path, _ = _two_geotiffs(tmp_path / "two.tif")
    fsspec.filesystem("memory").pipe("/segpipe-geotiff/two.tif", path.read_bytes())
    with pytest.raises(ImageReadError) as info:
        open_image("memory://segpipe-geotiff/two.tif")
    message = str(info.value)
    assert message.startswith("memory://segpipe-geotiff/two.tif: ")
    assert "128 x 128 px" in message
    assert "32 x 32 px" in message


def test_an_overview_without_a_mask_of_its_own_takes_level_0s(tmp_path):
    """A mask band added after the overviews were built has no overview masks: GDAL calls
    every pixel of the overview valid (and still flags it per_dataset)."""
    data = _bands(3, "uint8")
    mask = np.full(SHAPE, 255, np.uint8)
    mask[:, 120:] = 0
    mask[40:80, 20:60] = 0  # even edges: any nearest overview of it is mask[::2, ::2]
    path = write_raster(tmp_path / "late_mask.tif", data, overviews=())
    with rasterio.open(path, "r+") as ds:
        ds.build_overviews([2], Resampling.nearest)
    with rasterio.Env(GDAL_TIFF_INTERNAL_MASK=True), rasterio.open(path, "r+") as ds:
        ds.write_mask(mask)
    with rasterio.open(path, overview_level=0) as ds:  # the defect this works around
        assert (ds.dataset_mask() > 0).all()
    assert sum(p.is_mask for p in tifffile.TiffFile(path).pages) == 1  # level 0's only
    reader = open_image(path)
    assert reader.mask_kind == "mask"
    expected = mask[::2, ::2] > 0
    np.testing.assert_array_equal(reader.valid_mask(0, 100, 0, 150, level=1), expected)
    # A narrow window samples the same level-0 pixels as the whole level does.
    np.testing.assert_array_equal(
        reader.valid_mask(30, 45, 59, 61, level=1), expected[30:45, 59:61]
    )
    np.testing.assert_array_equal(reader.valid_mask(0, 200, 0, 300), mask > 0)


@pytest.mark.parametrize("level", [0, 1])
def test_a_south_up_geotiff_keeps_its_rows_going_north_end_to_end(tmp_path, level):
    """A positive y pixel size (row 0 the southernmost): the result's y coordinates grow down
    the rows, its transform is GDAL's for the level, and the crs polygons, areas and regions
    lie where the pixels are, not mirrored about the middle row."""
    import rioxarray  # noqa: F401  (registers .rio)
    from shapely.geometry import shape
    from test_vectors import Bright

    from segpipe import vectors
    from segpipe.analysis.regions import select_region

    south_up = rasterio.Affine(2.0, 0.0, 512_000.0, 0.0, 2.0, 5_000_000.0)
    data = np.zeros((3, 64, 96), np.uint8)
    data[:, 10:20, 30:50] = 255  # even edges: level 1's rows 5..10, columns 15..25
    path = write_raster(tmp_path / "south.tif", data, crs="EPSG:32633", transform=south_up)
    out = segpipe.segment(
        path, tmp_path / "r.zarr", Bright(), foreground="none", tile=16, task_tiles=1,
        scheduler="sync", level=level,
    )  # fmt: skip
    ds = segpipe.open_result(out)
    with rasterio.open(path, **({"overview_level": level - 1} if level else {})) as src:
        gdal = src.transform
        rows, cols = np.arange(src.height), np.arange(src.width)
    assert gdal.e > 0  # the reference: GDAL reads it south-up at this level too
    _, y = rasterio.transform.xy(gdal, rows, np.zeros_like(rows))
    x, _ = rasterio.transform.xy(gdal, np.zeros_like(cols), cols)
    np.testing.assert_allclose(ds["y"].values, y)  # pixel centres, growing northwards
    np.testing.assert_allclose(ds["x"].values, x)
    assert tuple(ds.rio.transform())[:6] == pytest.approx(tuple(gdal)[:6])
    # The bright block's corners through the file's own transform, as GDAL places them.
    (x0, y0), (x1, y1) = south_up @ (30, 10), south_up @ (50, 20)
    assert y0 < y1  # row 10 south of row 20
    (feature,) = vectors.class_features(out, "object", coords="crs")
    assert shape(feature["geometry"]).bounds == (x0, y0, x1, y1)
    assert feature["properties"]["measurements"]["area"] == pytest.approx(20 * 10 * 4.0)
    inside = select_region(ds, (x0, y0, x1, y1))
    assert inside.sizes["y"] * inside.sizes["x"] == 200 // 4**level
    assert (inside["mask"].values == 1).all()


# The RPC tag of a scene (92 values: 12 offsets and scales, then the numerator and
# denominator of line and of sample, 20 terms each: line ~ latitude, sample ~ longitude) and
# the GeoKeys naming WGS 84 (GTModelType 2, geographic; GeographicType 4326).
_RPC = np.zeros(92)
_RPC[:12] = (0, 0, 32, 32, 45.0, 10.0, 100.0, 32, 32, 0.01, 0.01, 100.0)
_RPC[[14, 32, 53, 72]] = 1


def _tiepoints(*points):
    return (33922, 12, 6 * len(points), tuple(v for p in points for v in p))


_TIE = (0, 0, 0, 500_000.0, 5_000_000.0, 0)
_SCALE = (33550, 12, 3, (10.0, 10.0, 0.0))


@pytest.mark.parametrize(
    "tags",
    [
        pytest.param([_SCALE, _tiepoints(_TIE)], id="tiepoint-and-scale"),
        pytest.param([_SCALE, _tiepoints((5, 3, 0, 500_000.0, 5_000_000.0, 0))], id="off-corner"),
        # GDAL takes the first tiepoint with the scale and leaves the rest: an affine still.
        pytest.param(
            [_SCALE, _tiepoints(_TIE, (64, 64, 0, 500_640.0, 4_999_360.0, 0))], id="two-and-scale"
        ),
        pytest.param([(33550, 12, 2, (10.0, 10.0)), _tiepoints(_TIE)], id="scale-of-2"),
        # A tiepoint tag of 7 values: GDAL reads the first 6 as one tiepoint.
        pytest.param([_SCALE, (33922, 12, 7, (*_TIE, 9.0))], id="7-value-tiepoint"),
        pytest.param(_model_transform(10.0, -10.0), id="model-transformation"),
    ],
)
def test_a_geotransform_is_read_as_gdal_reads_it(tmp_path, tags):
    path = tmp_path / "placed.tif"
    tifffile.imwrite(
        path, np.zeros((64, 64), np.uint16), tile=(32, 32), extratags=[*tags, _UTM_KEYS]
    )
    geo = open_image(path).georeference
    with rasterio.open(path) as ds:
        assert not ds.gcps[0]
        assert geo == Georeference("EPSG:32633", tuple(ds.transform)[:6])


_GCPS = [(i, j, 0, 5e5 + 10 * i, 5e6 - 10 * j, 0) for i in (0, 64) for j in (0, 64)]


@pytest.mark.filterwarnings("ignore::rasterio.errors.NotGeoreferencedWarning")  # the reference's
@pytest.mark.parametrize("crs", [True, False], ids=["crs", "no-crs"])
@pytest.mark.parametrize(
    ("tags", "how"),
    [
        # GDAL makes ground control points of tiepoints without a usable pixel scale.
        pytest.param([_tiepoints(_TIE)], "1 ground control point", id="tiepoint-no-scale"),
        pytest.param([_tiepoints(*_GCPS)], "4 ground control point", id="gcps"),
        pytest.param(
            [(33550, 12, 1, (10.0,)), _tiepoints(_TIE)], "1 ground control point", id="scale-of-1"
        ),
        pytest.param([(50844, 12, 92, tuple(_RPC))], "RPCs", id="rpcs"),
    ],
)
def test_a_raster_placed_by_gcps_or_rpcs_is_read_unplaced_with_a_warning(tmp_path, tags, how, crs):
    """Pixels in a sensor's geometry (a Sentinel-1 GRD, an L1 scene) are still an image to
    segment: read unplaced (results in pixels), and said, not refused."""
    path = tmp_path / "scene.tif"
    keys = [_UTM_KEYS] if crs else []
    image = np.arange(64 * 64, dtype=np.uint16).reshape(64, 64)
    tifffile.imwrite(path, image, tile=(32, 32), extratags=tags + keys)
    with rasterio.open(path) as ds:  # the reference: GDAL has no geotransform of them
        assert (ds.gcps[0] or ds.rpcs) and ds.transform.is_identity
    with pytest.warns(UserWarning, match=rf"scene\.tif: placed by {how}.*read unplaced"):
        reader = open_image(path)
    assert reader.georeference is None
    np.testing.assert_array_equal(reader.read(0, 64, 0, 64)[..., 0], image)


@pytest.mark.filterwarnings("ignore::rasterio.errors.NotGeoreferencedWarning")  # the reference's
@pytest.mark.parametrize("crs", [True, False], ids=["crs", "no-crs"])
@pytest.mark.parametrize(
    ("tags", "message"),
    [
        # Tags GDAL makes nothing of: it hands on the scale alone, at 0, 0, or the identity.
        pytest.param(
            [_SCALE, (33922, 12, 2, (5e5, 5e6))],
            "ModelPixelScaleTag of 3 value.*ModelTiepointTag of 2 value",
            id="2-value-tiepoint",
        ),
        pytest.param(
            [_SCALE, (33922, 12, 5, _TIE[:5])], "ModelTiepointTag of 5 value", id="5-value-tiepoint"
        ),
        pytest.param([(33922, 12, 2, (5e5, 5e6))], "ModelTiepointTag of 2", id="2-values-no-scale"),
        # Tiepoints of another count than 6 a point, without a scale: no list of ground
        # control points either, a damaged tag (GDAL makes one of its first 6 values).
        pytest.param(
            [(33922, 12, 7, (*_TIE, 9.0))], "ModelTiepointTag of 7 value", id="7-values-no-scale"
        ),
        pytest.param([_SCALE], "no geotransform of its ModelPixelScaleTag", id="scale-no-tiepoint"),
        pytest.param(
            [(34264, 12, 6, (10.0, 0, 5e5, 0, -10.0, 5e6))],
            "ModelTransformationTag of 6",
            id="6-value-model-transformation",
        ),
        # A pixel size of 0: GDAL makes a ground control point of the tiepoint, drops the
        # CRS and hands on the identity; read unplaced without a word, results in pixels.
        pytest.param(
            _scale_tie(0.0, 10.0),
            r"ModelPixelScaleTag of 3 value.*ModelTiepointTag of 6 value.*\(0\.0, 10\.0\) hold a 0",
            id="x-pixel-scale-0",
        ),
        pytest.param(
            [(33550, 12, 2, (10.0, 0.0)), _tiepoints(_TIE, (64, 64, 0, 5e5, 5e6, 0))],
            r"ModelPixelScaleTag of 2 value.*\(10\.0, 0\.0\) hold a 0",
            id="y-pixel-scale-0-two-tiepoints",
        ),
    ],
)
def test_a_georeference_that_is_no_affine_is_refused_naming_the_file(tmp_path, tags, message, crs):
    """Read as not georeferenced, or at 0, 0 (a scale without a tiepoint), these lost or
    misplaced where their pixels lie without a word."""
    path = tmp_path / "unplaced.tif"
    keys = [_UTM_KEYS] if crs else []
    tifffile.imwrite(path, np.zeros((64, 64), np.uint16), tile=(32, 32), extratags=tags + keys)
    with rasterio.open(path) as ds:  # the reference: GDAL has no geotransform of them
        assert ds.transform.is_identity or (ds.transform.c, ds.transform.f) == (0, 0)
    with pytest.raises(ImageReadError, match=rf"unplaced\.tif: .*{message}"):
        open_image(path)


def test_a_tiff_with_gdal_tags_but_no_placement_is_still_read_unplaced(tmp_path):
    """GDAL's nodata tag alone sends a TIFF through GDAL, which finds no geotransform: no tag
    placed it, so it is read, not georeferenced."""
    path = tmp_path / "nodata.tif"
    tifffile.imwrite(path, np.zeros((64, 64), np.uint16), extratags=[(42113, 2, 2, "0", True)])
    reader = open_image(path)
    assert reader.georeference is None and reader.nodata == (0.0,)


def _masked_raster(path, *, overviews_first=False, mask=None):
    """A GeoTIFF with an internal mask band (GDAL_TIFF_INTERNAL_MASK; ``mask``, by default
    0 at rows 100:, columns 200:) and one overview, built before the mask (which then has no
    overview mask) or after it."""
    data = _bands(3, "uint8")
    if mask is None:
        mask = np.full(SHAPE, 255, np.uint8)
        mask[100:, 200:] = 0
    kw = dict(driver="GTiff", width=300, height=200, count=3, dtype="uint8", tiled=True)
    with (
        rasterio.Env(GDAL_TIFF_INTERNAL_MASK=True),
        rasterio.open(path, "w", crs=CUSTOM, transform=TRANSFORM, **kw) as ds,
    ):
        ds.write(data)
        if overviews_first:
            ds.build_overviews([2], Resampling.nearest)
        ds.write_mask(mask)
        if not overviews_first:
            ds.build_overviews([2], Resampling.nearest)
    return path


def _overwrite(path, at, value: bytes):
    with open(path, "r+b") as f:
        f.seek(at)
        f.write(value)


@pytest.mark.parametrize("damage", ["mask-tile-width-0", "overview-bits-per-sample-255"])
def test_a_directory_gdal_refuses_fails_at_open_naming_the_file(tmp_path, damage):
    """GDAL's own errors (CPLE_AppDefinedError, CPLE_NotSupportedError) are no RasterioError:
    raised from a dataset's properties, not from rasterio.open, they escaped as they were."""
    path = _masked_raster(tmp_path / "damaged.tif")
    with tifffile.TiffFile(path) as tif:
        pages = list(tif.pages)
        mask = next(p for p in pages if p.is_mask and p.shape[:2] == SHAPE)
        overview = next(p for p in pages if not p.is_mask and p.shape[:2] == (100, 150))
        if damage == "mask-tile-width-0":
            at, value = mask.tags[322].valueoffset, bytes(4)
        else:  # 3 samples: BitsPerSample's values lie outside the entry
            at, value = overview.tags[258].valueoffset, np.full(3, 255, "<u2").tobytes()
    _overwrite(path, at, value)
    with pytest.raises(ImageReadError, match=r"damaged\.tif: GDAL cannot read its metadata"):
        open_image(path)


@pytest.mark.parametrize("level", [0, 1])
def test_a_damaged_mask_tile_fails_naming_the_file_level_and_window(tmp_path, level):
    """The pixels read; the mask band's tiles do not decode: rasterio's RasterioIOError (whose
    cause is GDAL's CPLE error) escaped valid_mask naming neither the file nor the window.
    Level 1 has no mask of its own, so it reads level 0's."""
    path = _masked_raster(tmp_path / "badmask.tif", overviews_first=True)
    with tifffile.TiffFile(path) as tif:
        mask = next(p for p in tif.pages if p.is_mask)
        tiles = list(zip(mask.dataoffsets, mask.databytecounts, strict=True))
    for offset, count in tiles:
        _overwrite(path, offset, b"\xff" * count)
    reader = open_image(path)
    assert reader.mask_kind == "mask"
    reader.read(0, 32, 0, 32, level=level)  # the pixels are whole
    with pytest.raises(
        ImageReadError,
        match=rf"badmask\.tif: GDAL cannot read the valid-pixel mask of level {level} at "
        r"y 0:32, x 0:32.*CPLE_",
    ):
        reader.valid_mask(0, 32, 0, 32, level=level)


@pytest.mark.parametrize("interleave", ["band", "pixel"])
def test_a_jpeg_geotiff_of_rgb_bands_reads_as_gdal_reads_it(tmp_path, interleave):
    """Band-interleaved, GDAL writes each band a one-component JPEG stream, which tifffile
    decoded as RGB: "Bogus JPEG colorspace" at the first read. Both interleavings read to the
    bit as GDAL reads them, overviews too."""
    smooth = np.clip(_bands(3, "float64") / 9, 0, 255).astype(np.uint8)  # JPEG: no noise
    path = write_raster(
        tmp_path / f"{interleave}.tif", smooth, compress="jpeg", interleave=interleave
    )
    with tifffile.TiffFile(path) as tif:
        assert tif.pages.first.planarconfig == (2 if interleave == "band" else 1)
    reader = open_image(path)
    with rasterio.open(path) as ds:
        np.testing.assert_array_equal(
            reader.read(0, SHAPE[0], 0, SHAPE[1]), np.moveaxis(ds.read(), 0, -1)
        )
        with rasterio.open(path, overview_level=0) as overview:
            ny, nx = overview.height, overview.width
            want = np.moveaxis(overview.read(), 0, -1)
    np.testing.assert_array_equal(reader.read(0, ny, 0, nx, level=1), want)


def test_overviews_of_a_second_gdaladdo_run_are_named_as_overviews_left_out(tmp_path):
    """A second gdaladdo run appends its overviews after the first's (512, 128, 256): tifffile
    puts the 256 apart, and the warning said "holds 2 images ... save it as a file of its
    own", which no user could make sense of. The levels read agree with GDAL's."""
    path = tmp_path / "twice.tif"
    profile = dict(
        driver="GTiff", height=512, width=512, count=1, dtype="uint8", crs="EPSG:32633",
        transform=from_origin(5e5, 4e6, 2.0, 2.0), tiled=True, blockxsize=64, blockysize=64,
    )  # fmt: skip
    data = np.random.default_rng(0).integers(1, 200, (1, 512, 512)).astype("uint8")
    with rasterio.open(path, "w", **profile) as ds:
        ds.write(data)
        ds.build_overviews([4], Resampling.average)
    with rasterio.open(path, "r+") as ds:
        ds.build_overviews([2], Resampling.average)
    with pytest.warns(UserWarning, match=r"leaving out the overview series 1 \(256x256\), st"):
        reader = open_image(path)
    assert [s[:2] for s in reader.level_shapes] == [(512, 512), (128, 128)]
    with rasterio.open(path) as ds:
        quarter = ds.read(1, out_shape=(128, 128))
    np.testing.assert_array_equal(reader.read(0, 128, 0, 128, level=1)[..., 0], quarter)


@pytest.mark.parametrize("source", ["gdal overview", "ingest"])
def test_a_reduced_level_of_odd_size_is_georeferenced_as_it_was_made(tmp_path, source):
    """GDAL's overview of 123 px is 62 px spanning the whole extent (the ratio); an ingest's
    level is 61 exact 2 x 2 means, the odd column dropped (twice the pixel): given the ratio,
    its last pixel lay half a level-0 pixel off."""
    import rioxarray  # noqa: F401  (registers .rio)
    from test_vectors import Bright

    from segpipe.io.ingest import ingest

    utm = from_origin(500_000.0, 5_400_000.0, 0.5, 0.5)
    data = np.zeros((3, 101, 123), np.uint8)
    path = write_raster(tmp_path / "odd.tif", data, crs="EPSG:32633", transform=utm)
    if source == "ingest":
        path = ingest(path, tmp_path / "odd.zarr", chunk=32, min_level_size=16)
    reader = open_image(path)
    out = segpipe.segment(
        reader, tmp_path / "r.zarr", Bright(), foreground="none", tile=16, task_tiles=1,
        scheduler="sync", level=1,
    )  # fmt: skip
    got = segpipe.open_result(out).rio.transform()
    if source == "ingest":
        assert reader.level_shapes[1][:2] == (50, 61)
        assert (got.a, got.e) == (2 * utm.a, 2 * utm.e)
    else:
        with rasterio.open(path, overview_level=0) as src:
            assert (src.height, src.width) == (51, 62)
            assert tuple(got)[:6] == pytest.approx(tuple(src.transform)[:6])


def test_valid_mask_of_a_reduced_level_follows_its_mask_band(tmp_path):
    """A box of level 1 takes level 1's mask (the mask band's overview), mirrored as the
    level's pixels are, not level 0's mask of the same indices."""
    mask = np.full(SHAPE, 255, np.uint8)
    mask[100:, 200:] = 0  # level 1: rows 50:, columns 100: (mask[::2, ::2])
    reader = open_image(_masked_raster(tmp_path / "masked.tif", mask=mask))
    assert reader.mask_kind == "mask"
    level1 = mask[::2, ::2] > 0  # level 1 is 100 x 150
    for box in (Box(30, 90, 70, 140), Box(60, 108, 120, 158)):  # inside; leaving it
        iy, ix = mirror_indices(box.y0, box.y1, 100), mirror_indices(box.x0, box.x1, 150)
        np.testing.assert_array_equal(valid_mask(reader, box, level=1), level1[np.ix_(iy, ix)])


def test_an_alpha_channel_anywhere_among_the_channels_is_the_mask():
    """The channel named "alpha" marks the valid pixels wherever it is, not the last one."""
    pixels = np.array([[[0, 9, 9], [255, 0, 0]], [[255, 9, 0], [0, 0, 9]]], dtype=np.uint8)
    reader = ArrayReader(pixels)
    reader.mask_kind, reader.channel_names = "alpha", ("alpha", "red", "green")
    assert reader.valid_mask(0, 2, 0, 2).tolist() == [[False, True], [True, False]]


def test_valid_mask_array_of_a_reduced_level_is_that_levels_mask(tmp_path):
    """Chunk by chunk, the lazy mask of level 1 is level 1's mask band, not level 0's
    mask read at level 1's indices."""
    from segpipe.io.readers.masks import valid_mask_array

    mask = np.full(SHAPE, 255, np.uint8)
    mask[100:, 200:] = 0
    mask[:40, :60] = 0
    reader = open_image(_masked_raster(tmp_path / "masked.tif", mask=mask))
    lazy = valid_mask_array(reader, 32, level=1)
    assert lazy.shape == (100, 150) and lazy.dtype == np.uint8
    np.testing.assert_array_equal(lazy.compute(), (mask[::2, ::2] > 0).astype(np.uint8))
