"""Queries against numpy/scipy on the whole image: areas, thresholds, objects across chunks."""

import json

import numpy as np
import pandas as pd
import pytest
import xarray as xr
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy import ndimage

import segpipe
from segpipe import query
from segpipe.config import SegmentConfig
from segpipe.geometry.tiling import Box, tile_grid
from segpipe.results import (
    ResultMeta,
    RunSummary,
    class_pixels,
    finalize_result,
    mark_tiles_done,
    prepare_result,
    read_meta,
    tiles_done,
    write_tiles,
)
from segpipe.results.store import quiet_consolidated

CLASSES = ("background", "tissue", "nucleus")
UTM = {"crs": "EPSG:32633", "transform": (2.0, 0.0, 500000.0, 0.0, -2.0, 5400000.0)}


def make_result(
    path,
    labels,
    *,
    tile=16,
    task_tiles=2,
    pixel_size_um=0.5,
    dtype="float32",
    seed=0,
    classes=CLASSES,
    min_level_size=8,
    **meta_kw,
):
    """A complete result whose mask is ``labels``, written block by block as segment does.

    Probabilities: the labelled class gets a random value in [0.6, 0.9], the rest share what
    is left, so the argmax is ``labels`` and mean probabilities are not trivial.
    """
    ny, nx = labels.shape
    c = len(classes)
    rng = np.random.default_rng(seed)
    top = rng.uniform(0.6, 0.9, labels.shape)
    probs = np.repeat(((1 - top) / (c - 1))[None], c, axis=0)
    np.put_along_axis(probs, labels[None].astype(np.int64), top[None], axis=0)
    meta = ResultMeta(
        source="synthetic",
        shape=(ny, nx),
        pixel_size_um=pixel_size_um,
        class_names=tuple(classes),
        model_name="truth",
        model_sha256="0" * 64,
        halo=0,
        config=SegmentConfig(
            tile=tile,
            mode="exact",
            level=0,
            probability_dtype=dtype,
            task_tiles=task_tiles,
            min_level_size=min_level_size,
        ),
        **meta_kw,
    )
    prepare_result(path, meta)
    for block in tile_grid((ny, nx), tile).blocks(task_tiles):
        box = Box(
            min(t.box.y0 for t in block),
            max(t.box.y1 for t in block),
            min(t.box.x0 for t in block),
            max(t.box.x1 for t in block),
        )
        counts = write_tiles(path, box, probs[(slice(None), *box.slices)])
        mark_tiles_done(path, {block[0].index: counts})
    finish(path)
    return path, probs


def finish(path):
    """Finalise a result as segment's driver does once every tile is recorded: the tiles
    these tests wrote without recording them are recorded first (no counts)."""
    todo = np.argwhere(~tiles_done(path))
    classes = len(read_meta(path).class_names)
    mark_tiles_done(path, {(int(y), int(x)): np.zeros(classes, np.int64) for y, x in todo})
    return finalize_result(path, run_summary(path))


def run_summary(path):
    """A run summary as segment writes it at the end: every tile computed, the class counts
    those the tiles recorded."""
    tiles = int(tiles_done(path).size)
    counts = tuple(int(n) for n in class_pixels(path))
    return RunSummary(
        tiles_total=tiles,
        tiles_computed=tiles,
        tiles_skipped=0,
        windows=tiles,
        seconds=1.0,
        megapixels_per_second=1.0,
        class_pixels=counts,
    )


def squares_on_chunk_corners(shape=(64, 80), chunk=16):
    """Nucleus squares centred on chunk corners (each cut into 4 chunks), a tissue ring
    around a corner, and an L that leaves and re-enters chunks. Returns labels, count, areas."""
    labels = np.zeros(shape, np.uint8)
    nuclei = []
    for cy, cx in [(16, 16), (16, 48), (48, 32), (32, 64)]:
        labels[cy - 3 : cy + 3, cx - 4 : cx + 2] = 2
        nuclei.append(36)
    # An L spanning three chunks: down column 70..72 from row 2 to 40, then left along rows 40..42
    labels[2:42, 70:72] = 2
    labels[40:42, 50:72] = 2
    nuclei.append(40 * 2 + 20 * 2)
    # A tissue ring round the corner (32, 32): one object with a hole.
    labels[26:38, 26:38] = 1
    labels[29:35, 29:35] = 0
    return labels, nuclei


@pytest.fixture(scope="module")
def corners(tmp_path_factory):
    labels, areas = squares_on_chunk_corners()
    path, probs = make_result(tmp_path_factory.mktemp("q") / "r.zarr", labels)
    return path, labels, probs, areas


def test_objects_straddling_chunk_corners_are_counted_once(corners):
    path, _, _, areas = corners
    table = query.object_table(path, "nucleus", chunks=(16, 16))
    assert len(table) == len(areas)
    assert sorted(table["area_px"]) == sorted(areas)
    np.testing.assert_allclose(table["area"], table["area_px"] * 0.25)
    ring = query.object_table(path, "tissue", chunks=(16, 16))
    assert len(ring) == 1 and ring["area_px"].item() == 144 - 36


@pytest.mark.parametrize("chunks", [None, (7, 9), {"y": 7, "x": 9}])
def test_objects_of_a_loaded_result_are_those_of_the_lazy_one(corners, chunks):
    """``open_result(...).load()`` holds numpy arrays: object queries failed on them with
    "'numpy.ndarray' object has no attribute 'rechunk'", where areas and masks worked."""
    path, labels, _, _ = corners
    loaded = segpipe.open_result(path).load()
    table = query.object_table(loaded, "nucleus", chunks=chunks)
    lazy = query.object_table(path, "nucleus", chunks=chunks)

    def by_place(t):  # labels follow the chunks: a loaded result is one unless told
        return t.drop(columns="label").sort_values(["bbox_y0", "bbox_x0"], ignore_index=True)

    pd.testing.assert_frame_equal(by_place(table), by_place(lazy))
    objects, _ = query.object_labels(loaded, "nucleus", chunks=chunks)
    lab, n = ndimage.label(labels == 2)
    assert objects.values.max() == n == len(table)
    np.testing.assert_array_equal(objects.values > 0, lab > 0)


# By dimension name too, as xarray takes them: dask's rechunk refused {"y": 7, "x": 9}.
@pytest.mark.parametrize("chunks", [(16, 16), (7, 9), (64, 80), {"y": 7, "x": 9}, {"x": 16}])
@pytest.mark.parametrize("connectivity", [1, 2])
def test_object_table_against_whole_image_scipy(corners, chunks, connectivity):
    path, labels, probs, _ = corners
    table = query.object_table(path, "nucleus", chunks=chunks, connectivity=connectivity)
    fg = labels == 2
    lab, n = ndimage.label(fg, ndimage.generate_binary_structure(2, connectivity))
    idx = np.arange(1, n + 1)
    com = np.array(ndimage.center_of_mass(fg, lab, idx))
    boxes = ndimage.find_objects(lab)
    expected = sorted(
        (
            int(ndimage.sum_labels(fg, lab, i)),
            com[i - 1][0] * 0.5,
            com[i - 1][1] * 0.5,
            (
                boxes[i - 1][0].start,
                boxes[i - 1][1].start,
                boxes[i - 1][0].stop,
                boxes[i - 1][1].stop,
            ),
            ndimage.mean(probs[2], lab, i),
        )
        for i in idx
    )
    got = sorted(
        (
            r.area_px,
            r.centroid_y,
            r.centroid_x,
            (r.bbox_y0, r.bbox_x0, r.bbox_y1, r.bbox_x1),
            r.mean_probability,
        )
        for r in table.itertuples()
    )
    assert len(got) == n
    for g, e in zip(got, expected, strict=True):
        assert g[0] == e[0] and g[3] == e[3]
        np.testing.assert_allclose(g[1:3], e[1:3])
        np.testing.assert_allclose(g[4], e[4], rtol=1e-6)


def test_diagonal_touch_across_a_chunk_corner(tmp_path):
    labels = np.zeros((48, 48), np.uint8)
    labels[12:16, 12:16] = 2  # chunk (0, 0), ends at the corner (16, 16)
    labels[16:20, 16:20] = 2  # chunk (1, 1): meets the first only at that corner
    labels[4:8, 16:20] = 2  # chunk (0, 1), alone
    labels[12:16, 32:36] = 2  # chunk (0, 2), starts at the corner (16, 32)
    labels[16:20, 28:32] = 2  # chunk (1, 1): meets it across the anti-diagonal
    path, _ = make_result(tmp_path / "r.zarr", labels)
    assert len(query.object_table(path, "nucleus", connectivity=1, chunks=16)) == 5
    eight = query.object_table(path, "nucleus", connectivity=2, chunks=16)
    assert sorted(eight["area_px"]) == [16, 32, 32]


@settings(max_examples=15)
@given(
    seed=st.integers(0, 2**16),
    cy=st.integers(3, 24),
    cx=st.integers(3, 24),
    connectivity=st.sampled_from([1, 2]),
)
def test_random_blobs_match_whole_image_labelling(seed, cy, cx, connectivity):
    rng = np.random.default_rng(seed)
    fg = ndimage.gaussian_filter(rng.random((40, 50)), 2) > 0.5
    ds = xr.Dataset(
        {
            "mask": (("y", "x"), fg.astype(np.uint8) * 2),
            "probabilities": (("class", "y", "x"), np.stack([1 - fg, fg * 0.0, fg * 1.0])),
        },
        coords={"y": np.arange(40.0), "x": np.arange(50.0), "class": list(CLASSES)},
    ).chunk({"y": cy, "x": cx})
    table = query.object_table(ds, "nucleus", connectivity=connectivity)
    lab, n = ndimage.label(fg, ndimage.generate_binary_structure(2, connectivity))
    assert len(table) == n
    assert sorted(table["area_px"]) == sorted(np.bincount(lab.ravel())[1:].tolist())
    labels, _ = query.object_labels(ds, "nucleus", connectivity=connectivity)
    got = labels.values
    # The same partition: a one-to-one map between our labels and scipy's.
    pairs = np.unique(np.stack([got[fg], lab[fg]]), axis=1)
    assert pairs.shape[1] == n == len(np.unique(pairs[0])) == len(np.unique(pairs[1]))
    assert (got[~fg] == 0).all()


def test_class_areas_whole_and_region(corners):
    path, labels, _, _ = corners
    areas = query.class_areas(path)
    assert areas["pixels"].chunks is not None, "lazy"
    counts = np.bincount(labels.ravel(), minlength=3)
    np.testing.assert_array_equal(areas["pixels"].values, counts)
    np.testing.assert_allclose(areas["area"].values, counts * 0.25)
    assert areas["area"].attrs["units"] == "micrometer**2"
    np.testing.assert_allclose(areas["fraction"].values, counts / labels.size)
    # Region in microns: pixel centres in [10, 20) um in x (pixels 20..39), [5, 15) um in y
    # (10..29): 20 x 20 pixels of 0.25 um^2, 100 um^2 like the region.
    part = query.class_areas(path, region=(10.0, 5.0, 20.0, 15.0)).compute()
    sub = labels[10:30, 20:40]
    assert float(part["area"].sum()) == 100.0
    np.testing.assert_array_equal(part["pixels"].values, np.bincount(sub.ravel(), minlength=3))
    np.testing.assert_allclose(part["fraction"].sum(), 1.0)


def test_class_areas_are_not_described_as_classes(corners):
    """The counts carry their own names and units, none of the mask's CF flag attributes
    (``flag_values``, ``flag_meanings``), which CF-aware tools would read as class codes;
    nor is a thresholded mask described as a probability."""
    areas = query.class_areas(corners[0])
    assert areas["pixels"].attrs == {"long_name": "pixels of the class"}
    assert areas["area"].attrs == {"long_name": "area of the class", "units": "micrometer**2"}
    assert areas["fraction"].attrs["units"] == "1"
    assert all("flag" not in key for v in areas.data_vars.values() for key in v.attrs)
    above = query.threshold_mask(corners[0], "nucleus", 0.75)
    assert above.attrs == {"long_name": "nucleus probability above 0.75"}


@pytest.mark.parametrize(
    ("grid", "step"),
    [({}, 0.5), ({"pixel_size_um": None}, 1.0), ({"pixel_size_um": None, **UTM}, 2.0)],
    ids=["micron", "pixel", "crs"],
)
@pytest.mark.parametrize("shape", [(1, 40), (16, 40)], ids=["one-row", "pyramid"])
@pytest.mark.parametrize("opener", ["open_result", "xarray"])
def test_a_level_one_pixel_high_has_its_pixels_area(tmp_path, grid, step, shape, opener):
    """Every level of a result, down to the top of a pyramid built to one pixel (16 x 40:
    its level 4 is 1 x 2) and a one-row image, knows the spacing of an axis one pixel long:
    class and object areas are pixels times the level's pixel area (``step * 2**k``
    squared), not that of the other axis's step alone. Opened by plain xarray too (the
    README's ``xr.open_zarr(path, group="0")``): the spacing is stored with the coordinate,
    where only open_result added it and plain xarray's areas took a step of 1."""
    labels = np.zeros(shape, np.uint8)
    labels[:, 4:30] = 1
    labels[:, 10:12] = 2
    path, _ = make_result(tmp_path / "r.zarr", labels, min_level_size=1, **grid)
    levels = segpipe.results.result_levels(path)
    assert levels[-1][0] == 1  # an axis of one pixel at the top
    for k in range(len(levels)):
        if opener == "xarray":
            ds = xr.open_zarr(path, group=str(k))
        else:
            ds = segpipe.open_result(path, level=k)
        side = step * 2**k
        assert ds["x"].attrs["step"] == side
        assert ds["y"].attrs["step"] == (-side if "crs" in grid else side)  # north up
        counts = np.bincount(ds["mask"].values.ravel(), minlength=3)
        areas = query.class_areas(ds).compute()
        np.testing.assert_allclose(areas["area"].values, counts * side**2)
        table = query.object_table(ds, "tissue")
        np.testing.assert_allclose(table["area"], table["area_px"] * side**2)


@pytest.mark.parametrize("level", [0, 1])
@pytest.mark.parametrize("thin", ["row", "column"])
def test_a_region_one_pixel_thin_has_its_pixels_area(corners, level, thin):
    """A region holding one row (or column) of pixel centres: its area is its pixels times
    the level's pixel area (0.25 µm² at level 0, 1 µm² at level 1), not the other axis's
    step alone (a one-pixel coordinate has no spacing of its own). Objects there too."""
    path = corners[0]
    ds = segpipe.open_result(path, level=level)
    y, x = float(ds["y"][8]), float(ds["x"][8])
    region = (x - 0.01, y - 0.01, x + 6.0, y + 0.01)
    if thin == "column":
        region = (x - 0.01, y - 0.01, x + 0.01, y + 6.0)
    part = query.class_areas(path, region=region, level=level).compute()
    pixel = 0.25 * 4**level
    assert int(part["pixels"].sum()) > 1
    np.testing.assert_allclose(part["area"].values, part["pixels"].values * pixel)


@pytest.mark.parametrize("axis", ["x", "y"])
@pytest.mark.parametrize("cut", [20.0, 20.1, 20.25])  # on a pixel centre, beside, between
def test_abutting_regions_share_no_pixel(corners, axis, cut):
    """Two halves meeting at ``cut`` (µm) hold every pixel of the image once: their pixels
    and areas add up to the whole's exactly, whether the cut falls on a pixel centre or not."""
    path, labels, _, _ = corners
    whole = query.class_areas(path).compute()
    end = (40.0, 32.0)  # past the last pixel centres, 39.5 and 31.5 µm
    if axis == "x":
        halves = [(0.0, 0.0, cut, end[1]), (cut, 0.0, *end)]
    else:
        halves = [(0.0, 0.0, end[0], cut), (0.0, cut, *end)]
    parts = [query.class_areas(path, region=h).compute() for h in halves]
    np.testing.assert_array_equal(sum(p["pixels"].values for p in parts), whole["pixels"].values)
    np.testing.assert_array_equal(sum(p["area"].values for p in parts), whole["area"].values)
    # The first half: the pixels whose centre (0.5 µm apart from 0) lies before the cut.
    n = int(np.ceil(cut / 0.5))
    first = labels[:, :n] if axis == "x" else labels[:n]
    np.testing.assert_array_equal(
        parts[0]["pixels"].values, np.bincount(first.ravel(), minlength=3)
    )


@pytest.mark.parametrize("geo", [False, True])
def test_a_region_inside_one_pixel_keeps_that_pixel(tmp_path, geo):
    """A region thinner than a pixel that holds no pixel centre keeps the pixel it lies in."""
    labels = np.arange(6 * 8).reshape(6, 8) % 3
    kw = {"pixel_size_um": None, **UTM} if geo else {}
    path, _ = make_result(tmp_path / "r.zarr", labels.astype(np.uint8), tile=8, **kw)
    ds = segpipe.open_result(path)
    y, x = float(ds["y"][2]), float(ds["x"][5])
    step = 2.0 if geo else 0.5
    region = (x + 0.1 * step, y + 0.1 * step, x + 0.3 * step, y + 0.2 * step)
    part = query.class_areas(path, region=region).compute()
    assert part["pixels"].values.tolist() == np.bincount([labels[2, 5]], minlength=3).tolist()
    assert float(part["area"].sum()) == step * step


def test_region_outside_the_image_is_refused(corners):
    path = corners[0]
    with pytest.raises(ValueError, match="holds no pixel"):
        query.class_areas(path, region=(1000, 1000, 2000, 2000))
    with pytest.raises(ValueError, match="x0 <= x1"):
        query.class_areas(path, region=(5, 0, 1, 1))


def test_a_region_with_its_y_corners_swapped_is_refused(corners):
    """(x0, y1, x1, y0), as a north-up bounding box is often written, is refused naming the
    order, as swapped x corners are, not read as a row or as a region holding no pixel."""
    path = corners[0]
    for region in ((0.0, 10.0, 20.0, 2.0), (0.0, 1.2, 3.0, 1.1)):
        with pytest.raises(ValueError, match=r"with x0 <= x1 and y0 <= y1"):
            query.class_areas(path, region=region)


def test_threshold_mask_and_objects_from_it(corners):
    path, _, probs, _ = corners
    above = query.threshold_mask(path, "nucleus", 0.75)
    assert above.dims == ("y", "x") and above.chunks is not None
    np.testing.assert_array_equal(above.values, probs[2] > 0.75)
    with pytest.raises(ValueError, match="no class 'stroma'"):
        query.threshold_mask(path, "stroma", 0.5)
    table = query.object_table(path, "nucleus", threshold=0.75)
    _, n = ndimage.label(probs[2] > 0.75)
    assert len(table) == n


@pytest.mark.parametrize("threshold", [0.7, 0.62])
def test_a_threshold_compares_stored_float16_with_the_threshold_itself(tmp_path, threshold):
    """float16 rounds 0.7 up to 0.70020 (0.62 to 0.62012): a pixel stored at that value is
    above the threshold, and NumPy's own float16 comparison would leave it out."""
    path = tmp_path / "f16.zarr"
    make_result(path, np.ones((64, 64), dtype=np.uint8), dtype="float16")
    stored = segpipe.open_result(path)["probabilities"].sel({"class": "tissue"}).values
    assert stored.dtype == np.float16
    rounded = np.float16(threshold)
    assert float(rounded) > threshold and (stored == rounded).any(), "the case this test is about"
    above = query.threshold_mask(path, "tissue", threshold).values
    np.testing.assert_array_equal(above, stored.astype(np.float64) > threshold)


@pytest.mark.parametrize("threshold", [0.8, 0.6])
def test_a_threshold_compares_stored_uint8_codes_as_their_exact_fraction(tmp_path, threshold):
    """A uint8 code k stands for k/255; read back as float32, 204 (exactly 0.8) became
    0.80000001, "above 0.8", for 254 of the 256 codes' thresholds."""
    import zarr

    path = tmp_path / "u8.zarr"
    make_result(path, np.ones((64, 64), dtype=np.uint8), dtype="uint8")
    codes = zarr.open_array(path / "0" / "probabilities")[list(CLASSES).index("tissue")]
    assert codes.dtype == np.uint8
    assert (codes == round(threshold * 255)).any(), "the case this test is about"
    above = query.threshold_mask(path, "tissue", threshold).values
    np.testing.assert_array_equal(above, codes / 255 > threshold)
    # A result written before SegmentConfig says its dtype in its identity alone.
    root = zarr.open_group(path, mode="r+", use_consolidated=False)
    legacy = {k: v for k, v in root.attrs["segpipe"].items() if k not in ("config", "state")}
    root.attrs["segpipe"] = legacy
    with quiet_consolidated():
        zarr.consolidate_metadata(path)
    above = query.threshold_mask(path, "tissue", threshold).values
    np.testing.assert_array_equal(above, codes / 255 > threshold)
    # A level opened by xarray alone (the README's open_zarr) carries no segpipe attribute.
    with quiet_consolidated():
        plain = xr.open_zarr(path, group="0")
    above = query.threshold_mask(plain, "tissue", threshold).values
    np.testing.assert_array_equal(above, codes / 255 > threshold)


def test_objects_in_a_region_keep_level_pixel_indices(corners):
    path = corners[0]
    # x 20..30 um, y 4..12 um: pixels x 40..60, y 8..24 hold the square centred on (16, 48).
    table = query.object_table(path, "nucleus", region=(20.0, 4.0, 30.0, 12.0))
    assert len(table) == 1
    row = table.iloc[0]
    assert (row.bbox_y0, row.bbox_x0, row.bbox_y1, row.bbox_x1) == (13, 44, 19, 50)
    assert row.centroid_y == pytest.approx(15.5 * 0.5)


def test_centroids_of_objects_in_a_region_are_in_the_results_coordinates(corners):
    """A region's objects have the centroids they have in the whole image (x and y in µm
    from the image's origin), not ones measured from the region's corner."""
    path = corners[0]
    whole = query.object_table(path, "nucleus").set_index(["bbox_y0", "bbox_x0"])
    part = query.object_table(path, "nucleus", region=(20.0, 4.0, 30.0, 12.0))
    (row,) = part.itertuples()
    assert (row.centroid_y, row.centroid_x) == pytest.approx((15.5 * 0.5, 46.5 * 0.5))
    same = whole.loc[(row.bbox_y0, row.bbox_x0)]
    assert (row.centroid_y, row.centroid_x) == pytest.approx((same.centroid_y, same.centroid_x))


def test_works_on_a_coarser_level(corners):
    path = corners[0]
    ds = segpipe.open_result(path, level=1)
    areas = query.class_areas(path, level=1)
    np.testing.assert_array_equal(
        areas["pixels"].values, np.bincount(ds["mask"].values.ravel(), minlength=3)
    )
    np.testing.assert_allclose(areas["area"].values, areas["pixels"].values * 1.0)


def test_a_level_of_the_results_tree_is_queried_as_that_level(corners):
    """A level of open_result(path, tree=True) was taken for a path and refused as "no
    segpipe result: its zarr.json is no Zarr group metadata"."""
    path = corners[0]
    level = segpipe.open_result(path, tree=True)["1"]
    expected = query.class_areas(path, level=1)
    xr.testing.assert_equal(query.class_areas(level), expected)
    assert len(query.object_table(level, "nucleus")) == len(
        query.object_table(path, "nucleus", level=1)
    )
    with pytest.raises(TypeError, match="not the whole tree"):
        query.class_areas(segpipe.open_result(path, tree=True))


def test_describe_and_region_report(corners, tmp_path):
    path, labels, _, areas = corners
    info = query.describe(path)
    assert info["complete"] is True
    assert info["shape"] == [64, 80] and info["levels"][1] == [32, 40]
    assert [c["name"] for c in info["classes"]] == list(CLASSES)
    assert info["classes"][2]["pixels"] == int((labels == 2).sum())
    assert info["classes"][2]["area_um2"] == pytest.approx((labels == 2).sum() * 0.25)
    assert info["provenance"]["model"] == "truth"

    report = query.region_report(path, class_name="nucleus", objects=True)
    assert [c["name"] for c in report["classes"]] == ["nucleus"]
    assert report["objects"]["count"] == len(areas)
    assert report["area_units"] == "micrometer**2"

    unfinished = tmp_path / "u.zarr"
    prepare_result(
        unfinished,
        ResultMeta(
            "s", (40, 40), None, CLASSES, "m", "0" * 64, 0, SegmentConfig(tile=16, task_tiles=1)
        ),
    )
    info = query.describe(unfinished)
    assert (info["complete"], info["tiles_done"], info["tiles_total"]) == (False, 0, 9)


def test_georeferenced_areas_and_regions_in_crs_units(tmp_path):
    labels, _ = squares_on_chunk_corners()
    path, _ = make_result(tmp_path / "r.zarr", labels, pixel_size_um=None, **UTM)
    ds = segpipe.open_result(path)
    assert ds["y"].attrs["units"] == "metre"
    assert float(ds["y"][0]) == 5400000.0 - 1.0 and float(ds["x"][0]) == 500000.0 + 1.0
    areas = query.class_areas(path)
    assert areas["area"].attrs["units"] == "metre**2"
    np.testing.assert_allclose(areas["area"].values, np.bincount(labels.ravel()) * 4.0)
    # Pixels 20..40 in x and 10..30 in y: their centres in metres; y falls southwards.
    region = (500041.0, 5400000 - 61.0, 500081.0, 5400000 - 21.0)
    part = query.class_areas(path, region=region).compute()
    # Centres in [y0, y1): y0 (row 30) in, y1 (row 10) out; x: columns 20..39.
    np.testing.assert_array_equal(
        part["pixels"].values, np.bincount(labels[11:31, 20:40].ravel(), minlength=3)
    )
    (clipped,) = query.object_table(path, "tissue", region=region).itertuples()
    assert (clipped.bbox_y0, clipped.bbox_x0, clipped.bbox_y1, clipped.bbox_x1) == (26, 26, 31, 38)
    ring = query.object_table(path, "tissue").iloc[0]
    assert ring.centroid_y == pytest.approx(5400000.0 - 2 * 32.0)
    assert ring.area == pytest.approx(108 * 4.0)


# ---- the CLI's query and export: an existing output is refused unless --overwrite ------------


def _cli(*argv):
    from segpipe.cli import main

    return main([str(a) for a in argv])


@pytest.fixture
def small(tmp_path):
    """A result, a user's folder and a PNG beside it, in ``tmp_path``."""
    labels, _ = squares_on_chunk_corners()
    path, _ = make_result(tmp_path / "r.seg.zarr", labels)
    (tmp_path / "userdir").mkdir()
    (tmp_path / "userdir" / "a.txt").write_text("mine")
    (tmp_path / "keep.png").write_bytes(b"\x89PNG\r\n\x1a\n not a table")
    return path


def file_tree(path):
    """Every file (its bytes) and folder (None) under ``path``: what "left as it was" means.
    Lock files are segpipe's own (segpipe.io.locks: kept, their holder rewritten by each run)."""
    return {
        str(p.relative_to(path)): p.read_bytes() if p.is_file() else None
        for p in sorted(path.rglob("*"))
        if not (p.name.startswith(".") and p.name.endswith(".lock"))
    }


@pytest.mark.parametrize(
    ("output", "message"),
    [
        ("userdir", "userdir exists and is not a segpipe NGFF export"),
        ("r.seg.zarr", "output r.seg.zarr is the result r.seg.zarr"),
        (".", "output . holds the result r.seg.zarr"),
    ],
)
def test_cli_export_overwrite_deletes_no_folder_an_export_did_not_write(
    small, tmp_path, monkeypatch, capsys, output, message
):
    monkeypatch.chdir(tmp_path)
    before = file_tree(tmp_path)
    assert _cli("-q", "export", small.name, output, "--format", "ngff-0.4", "--overwrite") == 2
    assert message in capsys.readouterr().err
    assert file_tree(tmp_path) == before


@pytest.mark.parametrize(
    "argv",
    [
        ["export", "{result}", "{target}", "--format", "geojson"],
        ["export", "{result}", "--geojson", "{target}"],  # the deprecated spelling
        ["query", "{result}", "--class", "nucleus", "--objects", "--table", "{target}"],
    ],
    ids=["export", "export-geojson-flag", "query-table"],
)
def test_cli_replaces_an_existing_file_only_with_overwrite(small, tmp_path, capsys, argv):
    """And only a file of the kind it writes: --overwrite replaced any file, the result's
    source image, another store's zarr.json."""
    target = tmp_path / "keep.png"
    argv = [a.format(result=small, target=target) for a in argv]
    before = file_tree(tmp_path)
    assert _cli("-q", *argv) == 2
    assert f"{target} exists; pass " in capsys.readouterr().err
    assert file_tree(tmp_path) == before
    assert _cli("-q", *argv, "--overwrite") == 2
    assert f"{target} exists and is no " in capsys.readouterr().err
    assert file_tree(tmp_path) == before
    target.unlink()
    assert _cli("-q", *argv) == 0  # written once, then replaced
    assert _cli("-q", *argv, "--overwrite") == 0
    text = target.read_text(encoding="utf-8")
    if argv[0] == "query":
        assert text.splitlines()[0].startswith("label,")
        assert len(text.splitlines()) == 1 + len(squares_on_chunk_corners()[1])
    else:
        assert json.loads(text)["type"] == "FeatureCollection"
    # No stray file; the result's lock file from an export, which holds the result shared.
    left = {p.name for p in tmp_path.iterdir()} - {".r.seg.zarr.lock"}
    assert sorted(left) == ["keep.png", "r.seg.zarr", "userdir"]


def test_a_damaged_result_is_named_by_query_and_export(tmp_path):
    """A result's chunk cut short: zarr's "Stored and computed checksum do not match" named
    neither the result nor the array; query and both exports now name the result. An error
    of segpipe's own (an unknown class) passes as it is, and no export is left behind."""
    from segpipe.analysis.ngff import export_ngff04
    from segpipe.results import DamagedResultError
    from segpipe.vectors import export_geojson

    labels = np.zeros((40, 40), np.uint8)
    labels[5:20, 5:20], labels[25:35, 10:30] = 1, 2
    path, _ = make_result(tmp_path / "r.seg.zarr", labels)
    # An own error raised while the reads are watched is not taken for damage.
    with pytest.raises(ValueError, match="no class 'stroma'") as own:
        query.region_report(path, class_name="stroma")
    assert not isinstance(own.value, DamagedResultError)
    for array in ("mask", "probabilities"):
        chunk = next(f for f in sorted((path / "0" / array / "c").rglob("*")) if f.is_file())
        chunk.write_bytes(chunk.read_bytes()[: chunk.stat().st_size // 2])
    damaged = rf"^{path} is damaged: a stored chunk cannot be read \(ValueError: .*checksum"
    for report in (
        lambda: query.region_report(path),
        lambda: query.region_report(path, class_name="nucleus", threshold=0.5),
        lambda: query.region_report(path, class_name="tissue", objects=True),
    ):
        with pytest.raises(DamagedResultError, match=damaged):
            report()
    with pytest.raises(DamagedResultError, match=damaged):
        export_geojson(path, tmp_path / "o.geojson")
    with pytest.raises(DamagedResultError, match=damaged):
        export_ngff04(path, tmp_path / "o.zarr")
    # The Python functions that compute at once from a path (not a lazy Dataset) too.
    from segpipe.analysis.objects import object_table
    from segpipe.analysis.vectors import class_features

    with pytest.raises(DamagedResultError, match=damaged):
        object_table(path, "tissue")
    with pytest.raises(DamagedResultError, match=damaged):
        class_features(path, "tissue")
    # The lock files of the output and of the result (held shared while it is read).
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        ".o.zarr.lock",
        ".r.seg.zarr.lock",
        "r.seg.zarr",
    ]


@pytest.mark.parametrize("array", ["mask", "probabilities"])
def test_a_result_missing_a_shard_of_computed_tiles_is_refused_naming_it(tmp_path, array):
    """Zarr reads a missing shard as its fill value: a deleted file read as background
    (probabilities 0), and every query gave other areas and objects without a word. A shard
    of glass alone is left unwritten, and its absence is no damage."""
    from segpipe.results import DamagedResultError, open_result

    labels = np.zeros((40, 40), np.uint8)
    labels[5:20, 5:20] = 1  # the first tile's only
    path, _ = make_result(tmp_path / "r.seg.zarr", labels, tile=20, task_tiles=1)
    stored = sorted(f for f in (path / "0" / array / "c").rglob("*") if f.is_file())
    assert len(stored) == (1 if array == "mask" else 4), "glass shards are not written"
    np.testing.assert_array_equal(open_result(path)["mask"].values, labels)
    stored[0].unlink()
    key = stored[0].relative_to(path).as_posix()
    with pytest.raises(DamagedResultError, match=rf"^{path} is damaged: 1 .* \({key}\)"):
        open_result(path)
    with pytest.raises(DamagedResultError, match="missing"):
        query.region_report(path)


def test_a_complete_result_whose_tile_counts_are_gone_is_refused_not_read_as_glass(tmp_path):
    """An overwrite at a URL racing the run's end left a complete root over deleted data: its
    tile counts read as zeros, so no shard was looked for, and every pixel read class 0."""
    import shutil

    from segpipe.results import DamagedResultError, open_result

    labels = np.zeros((40, 40), np.uint8)
    labels[5:20, 5:20] = 1
    path, _ = make_result(tmp_path / "r.seg.zarr", labels, tile=20, task_tiles=1)
    open_result(path)
    shutil.rmtree(path / "_segpipe" / "class_pixels" / "c")
    shutil.rmtree(path / "0" / "mask" / "c")
    with pytest.raises(DamagedResultError, match="per-tile class counts are not those it was"):
        open_result(path)


@pytest.mark.parametrize("damage", ["gone", "garbled"])
def test_a_result_whose_level_0_array_metadata_is_damaged_is_named(tmp_path, damage):
    """zarr's "No array found in store file://r.seg.zarr at path 0/mask" came out raw from
    segpipe info and export."""
    from segpipe.results import DamagedResultError, open_result

    labels = np.zeros((40, 40), np.uint8)
    labels[5:20, 5:20] = 1
    path, _ = make_result(tmp_path / "r.seg.zarr", labels, tile=20, task_tiles=1)
    document = path / "0" / "mask" / "zarr.json"
    document.unlink() if damage == "gone" else document.write_text("{}")
    with pytest.raises(DamagedResultError, match=rf"^{path} is damaged: its array 0/mask"):
        open_result(path)


def test_a_damaged_result_is_rebuilt_as_its_error_says(random_checkpoint, tmp_path):
    """The error said "segment it again with overwrite", which finds the result complete and
    alike and computes nothing: the damage stayed. Deleting it, as it now says, rebuilds it."""
    import segpipe
    from segpipe.io.readers import ArrayReader
    from segpipe.results import DamagedResultError, delete_result, open_result

    image = np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8)
    path = tmp_path / "r.seg.zarr"

    def run(**settings: object) -> None:
        reader = ArrayReader(image, name="a.tif")
        segpipe.segment(reader, path, random_checkpoint, scheduler="sync", tile=32, **settings)

    run()
    intact = open_result(path)["probabilities"].values
    for array in ("mask", "probabilities"):
        chunk = next(f for f in sorted((path / "0" / array / "c").rglob("*")) if f.is_file())
        chunk.write_bytes(chunk.read_bytes()[: chunk.stat().st_size // 2])
    with pytest.raises(DamagedResultError) as damaged:
        query.region_report(path)
    assert "delete it (segpipe.results.delete_result) and segment" in str(damaged.value)
    run(overwrite=True)  # what it said before: nothing computed, still damaged
    with pytest.raises(DamagedResultError):
        query.region_report(path)
    delete_result(path)
    run()
    np.testing.assert_array_equal(open_result(path)["probabilities"].values, intact)


def test_a_flipped_byte_in_a_stored_shard_is_refused_never_read_as_other_pixels(
    random_checkpoint, tmp_path
):
    """Chunks were compressed without zstd's checksum: a flipped bit inside one decoded to
    other pixels (a reviewer counted 210 nuclei for 115). Every byte flip sampled either
    fails the read or leaves what is read unchanged (a flag or padding byte)."""
    import shutil

    import segpipe
    from segpipe.io.readers import ArrayReader
    from segpipe.results import open_result

    image = np.random.default_rng(1).integers(0, 256, (96, 96, 3), dtype=np.uint8)
    intact = tmp_path / "r.seg.zarr"
    reader = ArrayReader(image, name="a.tif")
    segpipe.segment(reader, intact, random_checkpoint, scheduler="sync", tile=32)

    def arrays(path: object) -> list[np.ndarray]:
        ds = open_result(path)
        return [ds["mask"].values, ds["probabilities"].values]

    want, rng = arrays(intact), np.random.default_rng(2)
    shards = [f for a in ("mask", "probabilities") for f in (intact / "0" / a / "c").rglob("*")]
    shards = [f for f in shards if f.is_file()]
    refused, copy = 0, tmp_path / "flipped.seg.zarr"
    shutil.copytree(intact, copy)  # one byte flipped at a time, then put back
    for shard in shards:
        target = copy / shard.relative_to(intact)
        stored = target.read_bytes()
        for at in rng.choice(len(stored), size=20, replace=False):
            data = bytearray(stored)
            data[at] ^= 0x10
            target.write_bytes(bytes(data))
            try:
                got = arrays(copy)
            except (ValueError, RuntimeError):
                refused += 1
                continue
            finally:
                target.write_bytes(stored)
            for g, w in zip(got, want, strict=True):
                np.testing.assert_array_equal(g, w, err_msg=f"{target} byte {at} flipped")
    assert refused > 0
    np.testing.assert_array_equal(arrays(copy)[1], want[1])  # each flip was put back


@pytest.mark.parametrize(
    "argv",
    [
        ["export", "{result}", "{target}", "--format", "geojson", "--overwrite"],
        [
            "query",
            "{result}",
            "--class",
            "nucleus",
            "--objects",
            "--table",
            "{target}",
            "--overwrite",
        ],
    ],
    ids=["export", "query-table"],
)
def test_an_output_in_the_result_is_refused(small, tmp_path, capsys, argv):
    """``RESULT/zarr.json`` with --overwrite replaced the result's root with a table or a
    GeoJSON: the result was gone."""
    target = small / "zarr.json"
    before = file_tree(tmp_path)
    argv = [a.format(result=small, target=target) for a in argv]
    assert _cli("-q", *argv) == 2
    assert f"{target} is inside the result {small}" in capsys.readouterr().err
    assert file_tree(tmp_path) == before


@pytest.mark.parametrize("falling", [False, True], ids=["ascending", "falling"])
@pytest.mark.parametrize(
    ("lo", "hi", "pixel"),
    [(0.80, 0.85, 2), (0.1, 0.2, 0), (-0.2, -0.1, 0), (2.6, 2.7, 5), (2.3, 2.35, 5)],
)
def test_a_region_between_centres_keeps_the_pixel_whose_footprint_holds_it(lo, hi, pixel, falling):
    """Centres 0, 0.5, .. 2.5 µm, footprints ±0.25 µm: a region holding no centre keeps the
    pixel whose footprint holds its middle, not the one below it, and the first pixel too
    (it was refused as "holds no pixel")."""
    from segpipe.analysis.regions import region_slice

    centres = np.arange(6) * 0.5
    assert not ((centres >= lo) & (centres < hi)).any(), "the case this test is about"
    assert abs((lo + hi) / 2 - centres[pixel]) < 0.25  # the footprint that holds the middle
    step = -0.5 if falling else 0.5
    axis = centres[::-1] if falling else centres
    assert axis[region_slice(axis, lo, hi, step)].tolist() == [centres[pixel]]
    # The same through a Dataset: column j holds class j % 3.
    ys = np.array([1.0, 0.5]) if falling else np.array([0.5, 1.0])
    mask = np.broadcast_to(np.round(axis / 0.5).astype(np.uint8) % 3, (2, 6))
    ds = xr.Dataset(
        {"mask": (("y", "x"), mask)}, coords={"y": ys, "x": axis, "class": list(CLASSES)}
    )
    areas = query.class_areas(ds, region=(lo, 0.0, hi, 2.0))
    assert areas["pixels"].values.tolist() == np.bincount([pixel % 3] * 2, minlength=3).tolist()


@pytest.mark.parametrize("threshold", [0.0, 1.0])
def test_thresholds_of_zero_and_one_are_probabilities(threshold):
    """[0, 1] is closed: 0 selects every pixel of some probability, 1 none."""
    p = np.array([[1.0, 0.6, 0.0, 0.1]], np.float32)
    ds = xr.Dataset(
        {
            "mask": (("y", "x"), np.zeros((1, 4), np.uint8)),
            "probabilities": (("class", "y", "x"), np.stack([1 - p, p, 0 * p])),
        },
        coords={"y": [0.0], "x": np.arange(4.0), "class": list(CLASSES)},
    )
    above = query.threshold_mask(ds, "tissue", threshold).values
    np.testing.assert_array_equal(above, p > threshold)
    for bad in (-0.01, 1.01):
        with pytest.raises(ValueError, match="threshold must be a probability in"):
            query.threshold_mask(ds, "tissue", bad)


@pytest.mark.parametrize("flip", ["none", "transpose", "left-right", "up-down"])
def test_diagonal_touch_across_a_chunk_edge_away_from_its_corners(flip):
    """Two blobs meeting at one corner pixel pair across a chunk edge (not at a chunk
    corner): one 8-connected object, as scipy labels the whole image."""
    fg = np.zeros((8, 8), bool)
    fg[2:4, 0:2] = True  # chunk (0, 0), on its bottom edge
    fg[4:6, 2:4] = True  # chunk (1, 0): meets it at (3, 1)-(4, 2)
    fg = {"none": fg, "transpose": fg.T, "left-right": fg[:, ::-1], "up-down": fg[::-1]}[flip]
    ds = xr.Dataset(
        {
            "mask": (("y", "x"), fg.astype(np.uint8) * 2),
            "probabilities": (("class", "y", "x"), np.stack([1.0 - fg, 0.0 * fg, 1.0 * fg])),
        },
        coords={"y": np.arange(8.0), "x": np.arange(8.0), "class": list(CLASSES)},
    ).chunk({"y": 4, "x": 4})
    for connectivity in (1, 2):
        lab, n = ndimage.label(fg, ndimage.generate_binary_structure(2, connectivity))
        table = query.object_table(ds, "nucleus", connectivity=connectivity)
        assert sorted(table["area_px"]) == sorted(np.bincount(lab.ravel())[1:].tolist())
    assert n == 1  # the case this test is about: 8-connected, one object of 8 pixels
