"""GeoJSON polygons: one per object, exact pixel outlines, rasterised back to the mask."""

import json

import numpy as np
import pytest
from rasterio import features
from shapely import affinity
from shapely.geometry import shape
from test_query import make_result, squares_on_chunk_corners

from segpipe import open_result, query, vectors
from segpipe.palette import class_color


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
    with pytest.raises(ValueError, match="no class 'stroma'"):
        vectors.export_geojson(path, tmp_path / "x.geojson", classes=["stroma"])
    with pytest.raises(ValueError, match="coords must be one of"):
        vectors.class_features(path, "nucleus", coords="lonlat")


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
    assert shape(part["geometry"]).area == pytest.approx(4.0 * (labels[10:31, 20:41] == 1).sum())
    out = vectors.export_geojson(path, tmp_path / "g.geojson", coords="crs")
    assert json.loads(out.read_text())["crs"]["properties"]["name"].endswith("EPSG::32633")
    with pytest.raises(ValueError, match="no pixel size"):
        vectors.class_features(path, "tissue", coords="micron")


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
