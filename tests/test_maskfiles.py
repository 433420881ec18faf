"""segpipe.io.maskfiles: a user's mask file over an image (a georeferenced mask must lie on a
georeferenced image; pixel GeoJSON is not taken for degrees), and its fingerprint, against
masks drawn with numpy and hashes taken with hashlib."""

import hashlib
import json
import os
import shutil
import time
from pathlib import Path

import numpy as np
import pytest
from rasterio.crs import CRS
from rasterio.transform import Affine

import segpipe
from segpipe.io import maskfiles
from segpipe.io.maskfiles import mask_file_sha256, read_mask_file

UTM = "EPSG:32633"
IMAGE = Affine(10, 0, 5e5, 0, -10, 5e6)  # 40 x 60 pixels of 10 m


def _geotiff(path, data, transform, crs=UTM):
    import rasterio

    profile = dict(driver="GTiff", width=data.shape[1], height=data.shape[0], count=1)
    with rasterio.open(path, "w", dtype=data.dtype, crs=crs, transform=transform, **profile) as ds:
        ds.write(data[None])
    return path


def _left_half(path, transform, crs=UTM):
    """A 20 x 30 mask of 20 m pixels whose left half is foreground."""
    half = np.zeros((20, 30), np.uint8)
    half[:, :15] = 1
    return _geotiff(path, half, transform, crs)


@pytest.mark.parametrize(
    "transform",
    [
        Affine(20, 0, 5e5, 0, -21, 5e6),  # rows of 21 m: 420 m of y over the image's 400
        Affine(20, 0, 5e5, 0, -19, 5e6),  # rows of 19 m: 380 m
        Affine(20, 0, 5e5 + 10, 0, -20, 5e6),  # half a mask pixel east
        Affine(20, 0, 5e5, 0, -20, 5e6 - 10),  # half a mask pixel south
        Affine(20, 0, 5e5 + 2, 0, -20, 5e6),  # a tenth of a mask pixel east
    ],
    ids=["taller", "shorter", "half-pixel-east", "half-pixel-south", "tenth-pixel-east"],
)
def test_a_georeferenced_mask_off_the_image_in_either_axis_is_refused(tmp_path, transform):
    """Stretched over the image, it would mark ground it does not cover: only a hundredth of
    a mask pixel is rounding."""
    image = segpipe.open_image(_geotiff(tmp_path / "image.tif", np.ones((40, 60), np.uint8), IMAGE))
    mask = _left_half(tmp_path / "mask.tif", transform)
    with pytest.raises(
        ValueError, match=r"mask\.tif is georeferenced .* does not lie on the image"
    ):
        read_mask_file(mask, image, (40, 60))


def test_a_mask_on_the_image_grid_in_another_spelling_of_its_crs_is_taken(tmp_path):
    """One custom transverse Mercator written by two tools (the projection named "unknown" by
    one, "my local grid" by the other): the same CRS, which a comparison of the texts
    refused."""
    crs = CRS.from_proj4(
        "+proj=tmerc +lat_0=0 +lon_0=10.5 +k=0.9996 +x_0=500000 +y_0=0 +datum=WGS84 +units=m"
    )
    renamed = CRS.from_wkt(crs.to_wkt().replace('PROJCS["unknown"', 'PROJCS["my local grid"', 1))
    assert renamed.to_wkt() != crs.to_wkt() and renamed == crs
    image = _geotiff(tmp_path / "image.tif", np.ones((40, 60), np.uint8), IMAGE, crs)
    mask = _left_half(tmp_path / "mask.tif", Affine(20, 0, 5e5, 0, -20, 5e6), renamed)
    expected = np.zeros((40, 60), bool)
    expected[:, :30] = True
    np.testing.assert_array_equal(
        read_mask_file(mask, segpipe.open_image(image), (40, 60)), expected
    )


@pytest.mark.parametrize(
    ("x", "y"),
    [((5, 9), (500, 504)), ((500, 504), (50, 54))],
    ids=["x-like-longitude", "y-like-latitude"],
)
def test_pixel_polygons_with_only_one_axis_near_the_footprint_in_degrees_are_pixels(tmp_path, x, y):
    """Over an image at longitude 10..11, latitude 50..51, a small polygon in pixels whose x
    (or y) alone lies within degrees of the footprint is no longitude/latitude: both must."""
    path = tmp_path / "image.tif"
    transform = Affine(0.001, 0, 10, 0, -0.001, 51)
    image = segpipe.open_image(
        _geotiff(path, np.ones((1000, 1000), np.uint8), transform, "EPSG:4326")
    )
    ring = [[x[0], y[0]], [x[1], y[0]], [x[1], y[1]], [x[0], y[1]], [x[0], y[0]]]
    mask = tmp_path / "m.geojson"
    mask.write_text(json.dumps({"type": "Polygon", "coordinates": [ring]}))
    expected = np.zeros((100, 100), bool)
    expected[y[0] // 10, x[0] // 10] = True  # cells of 10 x 10 pixels
    np.testing.assert_array_equal(read_mask_file(mask, image, (100, 100)), expected)


def test_a_mask_rewritten_in_place_with_its_mtime_kept_hashes_anew(tmp_path):
    """Same inode, same size, mtime restored (cp -p over it, rsync -t): only the ctime says it
    changed, and a hash kept by the rest of the file's state was the old file's."""
    path = tmp_path / "mask.png"
    path.write_bytes(b"A" * 4096)
    before = os.stat(path)
    assert mask_file_sha256(path) == hashlib.sha256(b"A" * 4096).hexdigest()
    with open(path, "r+b") as f:
        f.write(b"B" * 4096)
    os.utime(path, ns=(before.st_atime_ns, before.st_mtime_ns))
    while os.stat(path).st_ctime_ns == before.st_ctime_ns:  # a coarse clock: let it tick
        time.sleep(0.001)
        os.utime(path, ns=(before.st_atime_ns, before.st_mtime_ns))
    after = os.stat(path)
    assert (after.st_ino, after.st_size, after.st_mtime_ns) == (
        before.st_ino,
        before.st_size,
        before.st_mtime_ns,
    )
    assert mask_file_sha256(path) == hashlib.sha256(b"B" * 4096).hexdigest()


def _zarr_folder(root, chunks):
    for key, data in {"zarr.json": b'{"zarr_format": 3}', **chunks}.items():
        (root / key).parent.mkdir(parents=True, exist_ok=True)
        (root / key).write_bytes(data)
    return root


def test_zarr_masks_with_their_chunks_at_other_keys_hash_apart(tmp_path):
    """A chunk's key is where it lies in the mask: the same bytes at c/0/1 and at c/1/0 are
    two masks. The same folder copied elsewhere is the same mask."""
    a = _zarr_folder(tmp_path / "a.zarr", {"c/0/1": b"\x01" * 64})
    b = _zarr_folder(tmp_path / "b.zarr", {"c/1/0": b"\x01" * 64})
    assert mask_file_sha256(a) != mask_file_sha256(b)
    copy = shutil.copytree(a, tmp_path / "elsewhere" / "a.zarr")
    assert mask_file_sha256(copy) == mask_file_sha256(a)


def test_zarr_masks_whose_names_and_bytes_run_together_alike_hash_apart(tmp_path):
    """An empty chunk c/0 then c/1 holding 1, and c/0 alone holding the bytes of "c/1\\0"
    and 1: names and bytes strung together are one stream; each file's size tells them
    apart."""
    a = _zarr_folder(tmp_path / "a.zarr", {"c/0": b"", "c/1": b"\x01"})
    b = _zarr_folder(tmp_path / "b.zarr", {"c/0": b"c/1\x00\x01"})
    assert mask_file_sha256(a) != mask_file_sha256(b)


def test_a_zarr_masks_hash_does_not_depend_on_the_order_its_files_are_listed(tmp_path, monkeypatch):
    """Another filesystem (or a copy of the folder) lists the same files in another order:
    the same mask, the same hash."""
    chunks = {f"c/{i}/{j}": bytes([i, j]) * 8 for i in range(3) for j in range(3)}
    mask = _zarr_folder(tmp_path / "m.zarr", chunks)
    listed = mask_file_sha256(mask)
    real = Path.rglob
    monkeypatch.setattr(Path, "rglob", lambda self, pattern: reversed(list(real(self, pattern))))
    monkeypatch.setattr(maskfiles, "_HASHES", {})  # hash it anew, in the other order
    assert mask_file_sha256(mask) == listed


def test_the_hashes_kept_are_the_newest_and_no_more_than_the_limit(tmp_path, monkeypatch):
    """A long archive run hashes many masks: the oldest hash is let go, the newest kept."""
    monkeypatch.setattr(maskfiles, "_HASHES", {})
    monkeypatch.setattr(maskfiles, "_KEPT_HASHES", 3)
    paths = []
    for i in range(5):
        paths.append(tmp_path / f"mask{i}.png")
        paths[-1].write_bytes(bytes([i]) * 100)
        assert mask_file_sha256(paths[-1]) == hashlib.sha256(bytes([i]) * 100).hexdigest()
    assert len(maskfiles._HASHES) == 3
    opened = []
    real_open = open

    def counted(file, *args, **kwargs):
        opened.append(file)
        return real_open(file, *args, **kwargs)

    monkeypatch.setattr("builtins.open", counted)
    for path in paths[2:]:  # the three newest: kept
        mask_file_sha256(path)
    assert opened == []
    mask_file_sha256(paths[0])  # the oldest: hashed anew
    assert opened == [paths[0]]


def test_a_speck_is_under_1_percent_of_the_images_shorter_side(tmp_path):
    """Over a 200 x 2000 px image at longitude 10..12, latitude 50.8..51, a 5 px polygon in
    pixels near the footprint in degrees spans 2.5% of the 200 px side: no speck, so pixels
    (1% of the longer side, 20 px, would have refused it)."""
    transform = Affine(0.001, 0, 10, 0, -0.001, 51)
    image = segpipe.open_image(
        _geotiff(tmp_path / "image.tif", np.ones((200, 2000), np.uint8), transform, "EPSG:4326")
    )
    ring = [[10, 50], [15, 50], [15, 55], [10, 55], [10, 50]]
    mask = tmp_path / "m.geojson"
    mask.write_text(json.dumps({"type": "Polygon", "coordinates": [ring]}))
    expected = np.zeros((20, 200), bool)
    expected[5, 1] = True  # cells of 10 x 10 pixels
    np.testing.assert_array_equal(read_mask_file(mask, image, (20, 200)), expected)


@pytest.mark.parametrize(
    "x1", [64.8, 70.0], ids=["in the odd column", "across the image's edge into it"]
)
def test_polygons_only_in_the_column_a_coarser_level_drops_are_told_so(tmp_path, x1):
    """Level 1 of a 65 px wide image is 32 px: level 0's last column is in none of its
    pixels. A polygon with area only there, reaching past the image's edge, was told "no
    polygon overlaps the image ... coordinates must be level-0 pixels", which they are."""
    import types

    reader = types.SimpleNamespace(
        path="img.tif", level_shapes=((64, 65, 3), (32, 32, 3)), georeference=None
    )
    ring = [[64.2, 10], [x1, 10], [x1, 20], [64.2, 20], [64.2, 10]]
    path = tmp_path / "m.geojson"
    path.write_text(json.dumps({"type": "Polygon", "coordinates": [ring]}))
    with pytest.raises(ValueError, match="cover no pixel of level 1") as refused:
        read_mask_file(path, reader, (32, 32), level=1)
    assert str(refused.value) == (
        f"foreground mask {path}: its polygons (x 64.2..{x1:g}, y 10..20) meet the image but "
        "cover no pixel of level 1 (32 x 32 px: it leaves out level 0's last odd row or "
        "column) (holes filling them?); draw them over the pixels to segment"
    )
    # Level 0 has that column: the polygon marks it.
    mask = read_mask_file(path, reader, (64, 65), level=0)
    assert mask[10:20, 64].all() and mask.sum() == 10
