"""GeoJSON polygons: one per object, exact pixel outlines, rasterised back to the mask."""

import json
import shutil

import numpy as np
import pytest
import shapely
import tifffile
import torch
import xarray as xr
import zarr
from rasterio import features
from scipy import ndimage
from shapely import affinity
from shapely.geometry import shape
from test_ngff import guarded, guarded_store  # noqa: F401 (guarded_store: a fixture)
from test_query import make_result, squares_on_chunk_corners

import segpipe
from segpipe import open_result, query, vectors
from segpipe.geometry.tiling import Geometry
from segpipe.io.writers import write_pyramidal_tiff
from segpipe.palette import class_color
from segpipe.results import FOREGROUND_LABEL, label_path, read_meta


@pytest.fixture(scope="module")
def result(tmp_path_factory):
    labels, areas = squares_on_chunk_corners()
    path, _ = make_result(tmp_path_factory.mktemp("v") / "r.zarr", labels)
    return path, labels, areas


def rasterise(feats, shape_yx, scale=1.0, shift=0.0):
    """Burn features (in pixel-edge units ``scale * (p + shift)``) back into a (y, x) mask."""
    geoms = []
    for f in feats:
        g = shape(f["geometry"])
        g = affinity.affine_transform(g, [1 / scale, 0, 0, 1 / scale, -shift, -shift])
        geoms.append((g, 1))
    return features.rasterize(geoms, out_shape=shape_yx, fill=0, dtype="uint8").astype(bool)


def test_one_polygon_per_object_across_chunk_corners(result):
    path, labels, areas = result
    feats = vectors.class_features(path, "nucleus", coords="pixel")
    assert len(feats) == len(areas)
    assert all(f["geometry"]["type"] == "Polygon" for f in feats)
    assert sorted(shape(f["geometry"]).area for f in feats) == sorted(areas)
    np.testing.assert_array_equal(rasterise(feats, labels.shape), labels == 2)
    props = feats[0]["properties"]
    assert props["classification"]["name"] == "nucleus"
    assert props["classification"]["color"] == list(class_color(2))
    assert props["objectType"] == "detection"
    table = query.object_table(path, "nucleus")
    assert {f["properties"]["measurements"]["label"] for f in feats} == set(table["label"])
    # Large regions (tissue) as QuPath annotations instead, on request.
    (ring,) = vectors.class_features(path, "tissue", object_type="annotation")
    assert ring["properties"]["objectType"] == "annotation"
    with pytest.raises(ValueError, match="object_type must be one of"):
        vectors.class_features(path, "tissue", object_type="cell")


def test_ring_keeps_its_hole(result):
    path, labels, _ = result
    (ring,) = vectors.class_features(path, "tissue", coords="pixel")
    geom = shape(ring["geometry"])
    assert len(geom.interiors) == 1
    assert geom.area == (labels == 1).sum() == 144 - 36
    assert geom.bounds == (26.0, 26.0, 38.0, 38.0)


def test_micron_coordinates_follow_the_pixel_centres(result):
    path = result[0]
    (ring,) = vectors.class_features(path, "tissue", coords="micron")
    # 0.5 um pixels whose centres are at 0.5 * i: pixel 26 starts at 12.75 um.
    assert shape(ring["geometry"]).bounds == (12.75, 12.75, 18.75, 18.75)
    assert ring["properties"]["measurements"]["area"] == pytest.approx(108 * 0.25)


def test_coarser_level_in_level0_pixels(result):
    path = result[0]
    feats = vectors.class_features(path, "tissue", coords="pixel", level=1)
    mask1 = open_result(path, level=1)["mask"].values == 1
    assert sum(shape(f["geometry"]).area for f in feats) == 4 * mask1.sum()
    np.testing.assert_array_equal(rasterise(feats, mask1.shape, scale=2.0), mask1)


def test_export_geojson_file(result, tmp_path):
    path = result[0]
    out = vectors.export_geojson(path, tmp_path / "o.geojson", coords="pixel")
    data = json.loads(out.read_text())
    assert data["type"] == "FeatureCollection"
    names = [f["properties"]["classification"]["name"] for f in data["features"]]
    assert names.count("nucleus") == 5 and names.count("tissue") == 1
    assert "background" not in names
    # min_area is in µm²: the 36 px squares (9 µm²) go, the 120 px L (30 µm²) stays.
    small = vectors.export_geojson(path, tmp_path / "s.geojson", classes=["nucleus"], min_area=10)
    (kept,) = json.loads(small.read_text())["features"]
    assert kept["properties"]["measurements"]["area_px"] == 120
    # Below a file: refused before the objects are found (it failed after, "File exists").
    with pytest.raises(NotADirectoryError, match=r"o\.geojson is a file, not a folder"):
        vectors.export_geojson(path, tmp_path / "o.geojson" / "x.geojson")
    with pytest.raises(ValueError, match="no class 'stroma'"):
        vectors.export_geojson(path, tmp_path / "x.geojson", classes=["stroma"])
    # A bare name was read letter by letter: "no class 'n'".
    with pytest.raises(TypeError, match=r"classes must be a list of class names.*\['nucleus'\]"):
        vectors.export_geojson(path, tmp_path / "x.geojson", classes="nucleus")
    # NaN kept no object, an empty file as if none were found
    for bad in (float("nan"), -5.0, float("inf")):
        with pytest.raises(
            ValueError, match=r"min_area \(--min-area\) must be a finite number >= 0"
        ):
            vectors.export_geojson(path, tmp_path / "x.geojson", min_area=bad)
    assert not (tmp_path / "x.geojson").exists()
    same = vectors.export_geojson(
        path, tmp_path / "n.geojson", classes=["nucleus"], min_area=np.int64(10)
    )
    assert json.loads(same.read_text()) == json.loads(small.read_text())
    # An empty list asks for no class: it exported every class but background, as None does.
    with pytest.raises(ValueError, match="no classes to export"):
        vectors.export_geojson(path, tmp_path / "x.geojson", classes=[])
    assert not (tmp_path / "x.geojson").exists()
    with pytest.raises(ValueError, match="coords must be one of"):
        vectors.class_features(path, "nucleus", coords="lonlat")


@pytest.mark.parametrize("overwrite", [False, True])
def test_an_existing_folder_as_the_geojson_output_is_refused_as_a_folder(
    result, tmp_path, overwrite
):
    """A folder given as the output is named as one before the polygons are traced, not
    said to exist and need overwrite (which could not replace it), and is left as it was."""
    folder = tmp_path / "out"
    folder.mkdir()
    (folder / "keep.txt").write_text("mine")
    with pytest.raises(IsADirectoryError, match=r"out is a folder; name a \.geojson file"):
        vectors.export_geojson(result[0], folder, overwrite=overwrite)
    assert [p.name for p in folder.iterdir()] == ["keep.txt"]


@pytest.mark.usefixtures("guarded_store")
def test_export_geojson_to_a_url_with_storage_options(result, tmp_path):
    path, _, areas = result
    local = vectors.export_geojson(path, tmp_path / "n.geojson", classes=["nucleus"])
    out = vectors.export_geojson(path, guarded("vectors/n.geojson"), classes=["nucleus"])
    assert out == guarded("vectors/n.geojson")
    assert json.loads(out.read_text()) == json.loads(local.read_text())
    assert len(json.loads(out.read_text())["features"]) == len(areas)


def test_crs_coordinates_are_the_pixel_polygons_through_the_transform(tmp_path):
    from test_query import UTM

    labels, _ = squares_on_chunk_corners()
    path, _ = make_result(tmp_path / "g.zarr", labels, pixel_size_um=None, **UTM)
    pixel = vectors.class_features(path, "tissue", coords="pixel")
    crs = vectors.class_features(path, "tissue", coords="crs")
    a, _, c, _, e, f = UTM["transform"]
    moved = affinity.affine_transform(shape(pixel[0]["geometry"]), [a, 0, 0, e, c, f])
    assert shape(crs[0]["geometry"]).equals(moved)
    # A region (y falls southwards): the ring's rows 26..30 only, still in place.
    region = (500041.0, 5400000 - 61.0, 500081.0, 5400000 - 21.0)
    (part,) = vectors.class_features(path, "tissue", coords="crs", region=region)
    assert shape(part["geometry"]).bounds == (c + 26 * a, f + 31 * e, c + 38 * a, f + 26 * e)
    assert shape(part["geometry"]).area == pytest.approx(4.0 * (labels[11:31, 20:40] == 1).sum())
    out = vectors.export_geojson(path, tmp_path / "g.geojson", coords="crs")
    assert json.loads(out.read_text())["crs"]["properties"]["name"].endswith("EPSG::32633")
    with pytest.raises(ValueError, match="no pixel size"):
        vectors.class_features(path, "tissue", coords="micron")


def test_a_crs_with_no_code_is_kept_in_the_properties(tmp_path):
    """GeoJSON's crs member takes a URN only: a WKT CRS (no EPSG code) was written nowhere,
    though the docstring said the FeatureCollection names the CRS."""
    from rasterio.crs import CRS
    from test_query import UTM

    labels, _ = squares_on_chunk_corners()
    wkt = CRS.from_proj4("+proj=tmerc +lat_0=0 +lon_0=15.5 +k=1 +x_0=0 +y_0=0 +ellps=GRS80").wkt
    path, _ = make_result(
        tmp_path / "g.zarr", labels, pixel_size_um=None, crs=wkt, transform=UTM["transform"]
    )
    written = json.loads(
        vectors.export_geojson(path, tmp_path / "g.geojson", coords="crs").read_text()
    )
    assert "crs" not in written and written["properties"]["crs_wkt"] == wkt
    assert CRS.from_wkt(written["properties"]["crs_wkt"]) == CRS.from_wkt(wkt)
    pixel = json.loads(vectors.export_geojson(path, tmp_path / "p.geojson").read_text())
    assert "crs_wkt" not in pixel["properties"]  # pixel coordinates are in no CRS
    # An authority with digits and "_" in its name is a code, named as EPSG's are.
    path, _ = make_result(
        tmp_path / "m.zarr",
        labels,
        pixel_size_um=None,
        crs="IAU_2015:30110",
        **{"transform": UTM["transform"]},
    )
    written = json.loads(
        vectors.export_geojson(path, tmp_path / "m.geojson", coords="crs").read_text()
    )
    assert written["crs"]["properties"]["name"] == "urn:ogc:def:crs:IAU_2015::30110"
    assert "crs_wkt" not in written["properties"]


def test_coordinates_a_result_cannot_give_are_refused_before_the_objects_are_found(
    tmp_path, monkeypatch
):
    """ "no pixel size" came after a whole pass over the mask for the first class."""
    labels, _ = squares_on_chunk_corners()
    path, _ = make_result(tmp_path / "g.zarr", labels, pixel_size_um=None)
    from segpipe.analysis import vectors as module

    monkeypatch.setattr(module, "object_labels", lambda *a, **k: pytest.fail("labelled"))
    for coords, why in (("micron", "no pixel size"), ("crs", "not georeferenced")):
        with pytest.raises(ValueError, match=why):
            vectors.class_features(path, "tissue", coords=coords)


def seam_labels():
    """A tissue ring (hole on the chunk corner (32, 32)) and a nucleus square, each across
    3 x 3 chunks of 16 px."""
    labels = np.zeros((64, 112), np.uint8)
    labels[8:56, 8:56] = 1
    labels[24:40, 24:40] = 0
    labels[10:50, 66:106] = 2
    return labels


@pytest.mark.parametrize(
    ("grid", "coords"),
    [
        ({"pixel_size_um": 0.2527}, "micron"),  # Aperio 40x
        (
            {
                "pixel_size_um": None,
                "crs": "EPSG:32633",
                "transform": (0.3, 0.0, 500000.1, 0.0, -0.3, 5400000.7),  # north up
            },
            "crs",
        ),
    ],
    ids=["micron", "crs"],
)
def test_objects_across_chunks_stay_one_polygon_whatever_the_pixel_size(tmp_path, grid, coords):
    """A pixel size that is not a power of two: the edge two chunks share came out of two
    float transforms a last bit apart, and the object as a MultiPolygon of its chunks'
    pieces with hairline gaps."""
    labels = seam_labels()
    path, _ = make_result(tmp_path / "r.zarr", labels, **grid)
    if coords == "micron":
        s = grid["pixel_size_um"]
        # Pixel centres at s * i: pixel (i, j) spans [(j - 0.5) s, (j + 0.5) s].
        to = [s, 0, 0, s, -s / 2, -s / 2]
    else:
        a, _, c, _, e, f = grid["transform"]
        to = [a, 0, 0, e, c, f]
    pixel_area = abs(to[0] * to[3])
    for name, k, holes in [("tissue", 1, 1), ("nucleus", 2, 0)]:
        (feat,) = vectors.class_features(path, name, coords=coords)
        geom = shape(feat["geometry"])
        assert geom.geom_type == "Polygon"
        assert len(geom.interiors) == holes
        count = int((labels == k).sum())
        assert feat["properties"]["measurements"]["area_px"] == count
        assert geom.area == pytest.approx(count * pixel_area, rel=1e-6)
        # RFC 7946 also where the transform flips y: exterior counter-clockwise, holes not.
        assert geom.exterior.is_ccw
        assert not any(ring.is_ccw for ring in geom.interiors)
        ys, xs = np.nonzero(labels == k)
        box = shapely.box(xs.min(), ys.min(), xs.max() + 1, ys.max() + 1)
        np.testing.assert_allclose(
            geom.bounds, affinity.affine_transform(box, to).bounds, rtol=0, atol=1e-9
        )


def test_crs_needs_a_georeferenced_result(result):
    with pytest.raises(ValueError, match="not georeferenced"):
        vectors.class_features(result[0], "tissue", coords="crs")


@pytest.mark.parametrize("coords", ["pixel", "micron"])
def test_detections_carry_measurements_read_back_from_the_file(result, tmp_path, coords):
    path, labels, _ = result
    out = vectors.export_geojson(path, tmp_path / "m.geojson", classes=["nucleus"], coords=coords)
    data = json.loads(out.read_text(encoding="utf-8"))
    assert data["properties"]["area_units"] == "micrometer²"
    ds = open_result(path)
    probs = ds["probabilities"].values  # (class, y, x)
    names = list(ds["class"].values)
    pixel_area_um2 = 0.5 * 0.5
    scale, shift = (1.0, 0.0) if coords == "pixel" else (0.5, -0.5)
    assert len(data["features"]) == 5
    for feat in data["features"]:
        props = feat["properties"]
        assert props["objectType"] == "detection"
        assert set(props) == {"objectType", "name", "classification", "measurements"}
        m = props["measurements"]
        pixels = rasterise([feat], labels.shape, scale=scale, shift=shift)
        assert (labels[pixels] == 2).all()
        assert m["area_px"] == pixels.sum()
        assert m["area"] == pytest.approx(pixels.sum() * pixel_area_um2)
        assert m["mean_probability"] == pytest.approx(probs[2][pixels].mean())
        for k, name in enumerate(names):
            assert m[f"mean_probability {name}"] == pytest.approx(probs[k][pixels].mean())


# -- a source level > 0 segmented ------------------------------------------------------------

SOURCE = (203, 149)  # (y, x) level 0; level 1 is 101 x 74, the odd last row and column dropped
LEVEL1 = (101, 74)
# Rectangles (y0, y1, x0, x1) of level 1, painted at twice that on level 0; the second
# crosses chunk corners, the last reaches level 1's bottom and right edges.
OBJECTS = [(10, 20, 5, 15), (30, 50, 25, 45), (75, 95, 30, 50), (60, 101, 60, 74)]
RUN = {"level": 1, "tile": 16, "task_tiles": 1, "scheduler": "sync"}


class Bright(torch.nn.Module):
    """Class 1 where the first channel is above half its range, class 0 elsewhere."""

    geometry = Geometry(halo=0, multiple=1)
    class_names = ("background", "object")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        bright = (x[:, :1] > 0.5).float()
        return torch.cat([1 - bright, bright], dim=1)


def expected_bounds():
    """Each object's level-1 box in the source's level-0 pixels: twice its level-1 pixels,
    as level 1 was made (2 x 2 source pixels each), not the size ratio 203 / 101."""
    return np.array(sorted((2 * x0, 2 * y0, 2 * x1, 2 * y1) for y0, y1, x0, x1 in OBJECTS))


def bounds(result):
    feats = vectors.class_features(result, "object", coords="pixel")
    return np.array(sorted(shape(f["geometry"]).bounds for f in feats))


@pytest.fixture(scope="module")
def level1_run(tmp_path_factory):
    """(result, source): a two-level OME-TIFF with bright rectangles, segmented at level 1."""
    folder = tmp_path_factory.mktemp("level1")
    image = np.zeros((*SOURCE, 3), np.uint8)
    for y0, y1, x0, x1 in OBJECTS:
        image[2 * y0 : 2 * y1, 2 * x0 : 2 * x1] = 255
    source = write_pyramidal_tiff(
        folder / "slide.ome.tif", image, pixel_size_um=0.25, tile=32, min_level_size=64
    )
    result = segpipe.segment(source, folder / "r.zarr", Bright(), foreground="none", **RUN)
    level1 = np.zeros(LEVEL1, bool)
    for y0, y1, x0, x1 in OBJECTS:
        level1[y0:y1, x0:x1] = True
    # The reference holds: the result is level 1, its objects the rectangles.
    np.testing.assert_array_equal(open_result(result)["mask"].values == 1, level1)
    return result, source


def test_pixel_coordinates_of_a_coarser_level_are_the_sources_level_0(level1_run):
    result, _ = level1_run
    np.testing.assert_allclose(bounds(result), expected_bounds(), rtol=0, atol=1e-9)
    # Level 1's edges: the source's last column and row (148, 202) are in no level-1 pixel.
    assert bounds(result)[:, 2:].max(axis=0) == pytest.approx([148, 202])
    feats = vectors.class_features(result, "object", coords="pixel")
    # Rectangles, each still one polygon; area_px stays pixels of the segmented level.
    for f in feats:
        x0, y0, x1, y1 = shape(f["geometry"]).bounds
        assert shape(f["geometry"]).area == pytest.approx((x1 - x0) * (y1 - y0))
        assert f["properties"]["measurements"]["area_px"] == (x1 - x0) * (y1 - y0) / 4


def test_the_polygons_fed_back_as_a_foreground_file_choose_their_objects(level1_run, tmp_path):
    result, source = level1_run
    polygons = vectors.export_geojson(result, tmp_path / "objects.geojson", coords="pixel")
    again = segpipe.segment(
        source, tmp_path / "again.zarr", Bright(), foreground=str(polygons), **RUN
    )
    objects = open_result(result)["mask"].values == 1
    meta = read_meta(again)
    chosen = zarr.open_group(again, mode="r")[label_path(FOREGROUND_LABEL, 0, layout=meta.layout)]
    chosen = chosen[...] == 1
    # Every object pixel, and none beyond the pixels its outline touches.
    assert chosen[objects].all()
    assert not (chosen & ~ndimage.binary_dilation(objects, np.ones((3, 3), bool))).any()
    np.testing.assert_array_equal(open_result(again)["mask"].values == 1, objects)
    assert meta.summary.tiles_background > 0


def test_a_result_not_recording_the_source_size_reads_it_from_the_source(level1_run, tmp_path):
    result, _ = level1_run
    old = shutil.copytree(result, tmp_path / "old.zarr")
    group = zarr.open_group(old, mode="r+")
    attrs = {k: v for k, v in group.attrs["segpipe"].items() if k != "source_shape"}
    group.attrs["segpipe"] = attrs
    np.testing.assert_allclose(bounds(old), expected_bounds(), rtol=0, atol=1e-9)
    assert read_meta(old).source_shape is None

    def moved_to(path):
        group.attrs["segpipe"] = {**attrs, "identity": {**attrs["identity"], "source": str(path)}}

    moved_to(tmp_path / "gone.ome.tif")
    with pytest.raises(ValueError, match=r"old\.zarr .*gone\.ome\.tif.*coords='micron'"):
        bounds(old)
    assert vectors.class_features(old, "object", coords="micron")  # needs no source
    other = np.zeros((50, 60, 3), np.uint8)  # another image at the path: no level 1
    moved_to(write_pyramidal_tiff(tmp_path / "other.ome.tif", other, pixel_size_um=0.25))
    with pytest.raises(ValueError, match="not the image segmented"):
        bounds(old)


def test_a_coarser_source_level_sits_where_the_finer_results_pyramid_puts_it(tmp_path):
    """Microns: a result segmented at source level 1 has its first pixel at the centre of
    the 2 x 2 source pixels it covers, as level 1 of the level-0 result has; its micron
    polygons are its level-0-pixel polygons in microns, and OME says the same."""
    import json

    image = np.zeros((128, 96, 3), np.uint8)
    image[20:60, 30:70] = 255
    source = write_pyramidal_tiff(
        tmp_path / "even.ome.tif", image, pixel_size_um=0.5, tile=32, min_level_size=32
    )
    settings = {"tile": 16, "task_tiles": 1, "scheduler": "sync", "foreground": "none"}
    settings["min_level_size"] = 32  # the fine result has a level 1 to compare with
    fine = segpipe.segment(source, tmp_path / "fine.zarr", Bright(), level=0, **settings)
    coarse = segpipe.segment(source, tmp_path / "coarse.zarr", Bright(), level=1, **settings)
    a, b = open_result(fine, level=1), open_result(coarse)
    np.testing.assert_allclose(b.x.values, a.x.values[: b.sizes["x"]])
    np.testing.assert_allclose(b.y.values, a.y.values[: b.sizes["y"]])
    assert b.x.values[0] == pytest.approx(0.25)  # (2 - 1) / 2 source pixels of 0.5 µm
    pixel = vectors.class_features(coarse, "object", coords="pixel")
    micron = vectors.class_features(coarse, "object", coords="micron")
    for p, m in zip(pixel, micron, strict=True):
        x0, y0, x1, y1 = shape(p["geometry"]).bounds  # level-0 pixel edges
        expected = (x0 * 0.5 - 0.25, y0 * 0.5 - 0.25, x1 * 0.5 - 0.25, y1 * 0.5 - 0.25)
        assert shape(m["geometry"]).bounds == pytest.approx(expected)
    ome = json.loads((tmp_path / "coarse.zarr" / "zarr.json").read_text())["attributes"]["ome"]
    level0 = ome["multiscales"][0]["datasets"][0]["coordinateTransformations"]
    assert level0[1] == {"type": "translation", "translation": [0.0, 0.25, 0.25]}


def test_a_coarser_level_of_an_image_without_a_pixel_size_is_in_level_0_pixels(tmp_path):
    """No pixel size: a result segmented at level 1 had coordinates, areas and regions in
    its own pixels, while query said "level-0 px²" and its GeoJSON polygons were in level-0
    pixels (their areas 4x the file's own measurements). Now all are level-0 pixels."""
    image = np.zeros((128, 98, 3), np.uint8)
    image[20:60, 30:70] = 255
    source = tmp_path / "nopx.tif"  # two levels, no resolution tags
    with tifffile.TiffWriter(source) as tif:
        tif.write(image, tile=(32, 32), subifds=1, photometric="rgb")
        tif.write(image[::2, ::2], tile=(32, 32), subfiletype=1, photometric="rgb")
    settings = {"tile": 16, "task_tiles": 1, "scheduler": "sync", "foreground": "none"}
    settings["min_level_size"] = 32
    fine = segpipe.segment(source, tmp_path / "fine.zarr", Bright(), level=0, **settings)
    coarse = segpipe.segment(source, tmp_path / "coarse.zarr", Bright(), level=1, **settings)
    _, b = xr.align(open_result(fine, level=1), open_result(coarse), join="exact")
    assert b.x.values[:2].tolist() == [0.5, 2.5] and b.x.attrs["units"] == "pixel"
    areas = query.class_areas(coarse).sel({"class": "object"})
    assert int(areas["pixels"]) == 20 * 20
    assert float(areas["area"]) == 40 * 40 and areas["area"].attrs["units"] == "pixel**2"
    (feature,) = vectors.class_features(coarse, "object", coords="pixel")
    assert shape(feature["geometry"]).bounds == (30, 20, 70, 60)
    assert shape(feature["geometry"]).area == feature["properties"]["measurements"]["area"]
    region = (30.0, 20.0, 70.0, 60.0)  # the polygon's box selects the object, whole
    assert int(query.class_areas(coarse, region=region).sel({"class": "object"})["pixels"]) == 400


@pytest.mark.parametrize(
    "size",
    [(128, 99), (129, 96), (129, 99)],
    ids=["x", "y", "xy"],
)
def test_a_coarser_level_of_odd_side_lines_up_with_the_finer_results_pyramid(tmp_path, size):
    """Level 1 of an odd side (99 -> 49) is made of 2 x 2 source pixels, the last column
    dropped: a result segmented there has exactly the coordinates of level 1 of the level-0
    result (not steps of 99 / 49 source pixels), and its pixel and micron polygons agree,
    up to the far edge (column 98 of level 0, not 99)."""
    image = np.zeros((*size, 3), np.uint8)
    image[20 : size[0], 30 : size[1]] = 255  # reaches the bottom and right edges
    source = write_pyramidal_tiff(
        tmp_path / "odd.ome.tif", image, pixel_size_um=0.5, tile=32, min_level_size=32
    )
    settings = {"tile": 16, "task_tiles": 1, "scheduler": "sync", "foreground": "none"}
    settings["min_level_size"] = 32
    fine = segpipe.segment(source, tmp_path / "fine.zarr", Bright(), level=0, **settings)
    coarse = segpipe.segment(source, tmp_path / "coarse.zarr", Bright(), level=1, **settings)
    _, b = xr.align(open_result(fine, level=1), open_result(coarse), join="exact")
    assert dict(b.sizes) == {"y": size[0] // 2, "x": size[1] // 2, "class": 2}
    (pixel,) = vectors.class_features(coarse, "object", coords="pixel")
    (micron,) = vectors.class_features(coarse, "object", coords="micron")
    x0, y0, x1, y1 = shape(pixel["geometry"]).bounds  # level-0 pixel edges
    assert (x0, y0, x1, y1) == (30, 20, size[1] // 2 * 2, size[0] // 2 * 2)
    expected = (x0 * 0.5 - 0.25, y0 * 0.5 - 0.25, x1 * 0.5 - 0.25, y1 * 0.5 - 0.25)
    assert shape(micron["geometry"]).bounds == pytest.approx(expected, abs=1e-9)


@pytest.mark.usefixtures("guarded_store")
def test_an_old_url_result_opens_its_url_source_with_the_results_options(level1_run):
    """A URL result written before results recorded the source's size reads it from its
    source; a source on the result's file system is reached with the result's options."""
    from test_ngff import GuardedFileSystem

    result, source = level1_run
    fs = GuardedFileSystem(key="k")
    fs.put(str(source), "/in/slide.ome.tif")
    fs.put(str(result), "/old.zarr", recursive=True)
    old = guarded("old.zarr")
    group = zarr.open_group(old, mode="r+")
    attrs = {k: v for k, v in group.attrs["segpipe"].items() if k != "source_shape"}
    identity = {**attrs["identity"], "source": "guarded://in/slide.ome.tif"}
    group.attrs["segpipe"] = {**attrs, "identity": identity}
    assert read_meta(old).source_shape is None
    np.testing.assert_allclose(bounds(old), expected_bounds(), rtol=0, atol=1e-9)


@pytest.mark.parametrize("connectivity", [1, 2])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_polygons_of_random_objects_are_valid_and_rasterise_back(tmp_path, connectivity, seed):
    """Speckle full of corner-touching pixels, cut by 16-pixel chunks: every outline is a
    valid (Multi)Polygon (QuPath, JTS and GEOS refuse self-touching rings), one per
    component, and each burns back to exactly its component's pixels."""
    labels = np.where(np.random.default_rng(seed).random((40, 48)) < 0.45, 2, 0).astype(np.uint8)
    path, _ = make_result(tmp_path / "r.zarr", labels)
    feats = vectors.class_features(path, "nucleus", coords="pixel", connectivity=connectivity)
    components, n = ndimage.label(
        labels == 2, structure=ndimage.generate_binary_structure(2, connectivity)
    )
    assert len(feats) == n
    invalid = [shapely.is_valid_reason(shape(f["geometry"])) for f in feats]
    assert [r for r in invalid if r != "Valid Geometry"] == []
    burnt = sorted(tuple(np.flatnonzero(rasterise([f], labels.shape))) for f in feats)
    expected = sorted(tuple(np.flatnonzero(components == k)) for k in range(1, n + 1))
    assert burnt == expected
    # RFC 7946 3.1.6: exteriors counter-clockwise, holes clockwise, in every feature (the
    # union of an object's pieces across chunks reversed some; pieces of one kept rasterio's)
    parts = [
        p for f in feats for p in getattr(shape(f["geometry"]), "geoms", [shape(f["geometry"])])
    ]
    assert parts and all(p.exterior.is_ccw for p in parts)
    holes = [ring for p in parts for ring in p.interiors]
    assert holes and not any(ring.is_ccw for ring in holes)


def test_a_class_given_twice_is_exported_once(result, tmp_path):
    path = result[0]
    once = vectors.export_geojson(path, tmp_path / "1.geojson", classes=["nucleus"])
    twice = vectors.export_geojson(
        path, tmp_path / "2.geojson", classes=["nucleus", "tissue", "nucleus"]
    )
    feats = json.loads(twice.read_text())["features"]
    names = [f["properties"]["classification"]["name"] for f in feats]
    assert names == ["nucleus"] * 5 + ["tissue"]  # in the order first asked
    assert feats[:5] == json.loads(once.read_text())["features"]


def test_a_result_being_exported_to_geojson_is_held_and_one_replaced_is_not_written(
    tmp_path, monkeypatch
):
    """Replaced between two classes, the export mixed two results, or failed with a bare
    KeyError."""
    from test_ngff import _restamp

    from segpipe.analysis import vectors as module
    from segpipe.results import ResultBusyError, ResultReplacedError, delete_result

    labels, _ = squares_on_chunk_corners()
    path, _ = make_result(tmp_path / "r.zarr", labels)
    real, refused = module.class_features, []

    def features_then_replace(*args, **kwargs):
        with pytest.raises(ResultBusyError) as busy:
            delete_result(path)
        refused.append(busy.value)
        return real(*args, **kwargs)

    monkeypatch.setattr(module, "class_features", features_then_replace)
    out = vectors.export_geojson(path, tmp_path / "o.geojson")
    assert len(refused) == 2 and json.loads(out.read_text())["features"]

    def features_then_restamp(*args, **kwargs):
        _restamp(path)
        return real(*args, **kwargs)

    monkeypatch.setattr(module, "class_features", features_then_restamp)
    with pytest.raises(ResultReplacedError):
        vectors.export_geojson(path, tmp_path / "p.geojson")
    assert not (tmp_path / "p.geojson").exists()


@pytest.mark.parametrize(("min_area", "kept"), [(4, [4, 9]), (5, [9]), (9, [9]), (10, [])])
def test_min_area_keeps_an_object_of_exactly_that_area(tmp_path, min_area, kept):
    """min_area drops the objects smaller than it: one of exactly min_area stays."""
    labels = np.zeros((32, 32), np.uint8)
    labels[4:6, 4:6] = 2  # 4 px
    labels[20:23, 20:23] = 2  # 9 px
    path, _ = make_result(tmp_path / "r.zarr", labels, pixel_size_um=None)  # areas in pixels
    feats = vectors.class_features(path, "nucleus", min_area=min_area)
    assert sorted(f["properties"]["measurements"]["area"] for f in feats) == kept
