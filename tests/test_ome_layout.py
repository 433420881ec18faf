"""The result is OME-Zarr 0.5: a strict validator accepts it, napari's reader finds it, and
sharded writes from parallel workers equal a single-process run."""

import numpy as np
import pytest
import torch
import xarray as xr
import zarr

import segpipe
from segpipe import models
from segpipe.results import LABEL_NAME, read_meta

CLASSES = ("background", "tissue", "nucleus")


@pytest.fixture(scope="module")
def source(tmp_path_factory):
    rng = np.random.default_rng(3)
    yy, xx = np.mgrid[0:150, 0:203]
    base = 127 + 80 * np.sin(yy / 9.0)[..., None] * np.cos(xx / 13.0)[..., None]
    image = np.clip(base + rng.normal(0, 30, (150, 203, 3)), 0, 255).astype(np.uint8)
    path = tmp_path_factory.mktemp("src") / "image.zarr"
    arr = zarr.create_array(
        path, shape=image.shape, chunks=(64, 64, 3), dtype="uint8", dimension_names=("y", "x", "c")
    )
    arr[...] = image
    return path


@pytest.fixture(scope="module")
def net():
    torch.manual_seed(0)
    return models.build("unet", class_names=CLASSES, width=4, depth=2, padding="valid").eval()


def run(source, out, net, **kw):
    options = dict(tile=32, task_tiles=2, scheduler="sync", pixel_size_um=0.5, min_level_size=32)
    options["foreground"] = "none"  # every tile, one label image (masks: test_foreground.py)
    return segpipe.segment(source, out, net, **{**options, **kw})


@pytest.fixture(scope="module")
def result(source, net, tmp_path_factory):
    return run(source, tmp_path_factory.mktemp("res") / "r.zarr", net)


def validated_image(path):
    """The strict validator's Image of the result at ``path``, its ``labels`` group left out.

    ome-zarr-models (1.7, and its main branch) looks a label's dataset paths up as direct
    members in one check (``Labels._check_valid_dtypes``), so it fails on the nested
    ``<k>/mask`` paths that OME-Zarr allows and the result needs for ``xarray.open_datatree``;
    every other check runs here, and :class:`ImageLabel` checks each label image whole.
    """
    from ome_zarr_models.v05.image import Image
    from pydantic_zarr.v3 import GroupSpec

    spec = GroupSpec.from_zarr(zarr.open_group(path, mode="r"))
    members = {k: v for k, v in (spec.members or {}).items() if k != "labels"}
    return Image(attributes=spec.attributes, members=members)


def test_strict_validator_accepts_image_and_labels(result):
    from ome_zarr_models.v05.image_label import ImageLabel

    image = validated_image(result)
    (multiscale,) = image.ome_attributes.multiscales
    assert [a.name for a in multiscale.axes] == ["class", "y", "x"]
    assert [a.unit for a in multiscale.axes[1:]] == ["micrometer"] * 2
    assert len(multiscale.datasets) == 3  # 150 x 203 -> 75 x 101 -> 37 x 50
    labels = zarr.open_group(result / "labels", mode="r").attrs["ome"]
    assert labels == {"version": "0.5", "labels": [LABEL_NAME]}
    label = ImageLabel.from_zarr(zarr.open_group(result / "labels" / LABEL_NAME, mode="r"))
    meta = label.ome_attributes.image_label
    assert [p.model_dump()["class"] for p in meta.properties] == list(CLASSES)
    assert len(meta.colors) == len(CLASSES)
    assert len(label.ome_attributes.multiscales[0].datasets) == len(multiscale.datasets)


@pytest.mark.xfail(
    strict=True, raises=KeyError, reason="ome-zarr-models: nested label dataset paths"
)
def test_strict_validator_opens_the_whole_result(result):
    """Fails while ome-zarr-models' Labels check looks ``0/mask`` up as a direct member
    (``KeyError: '0/mask'``); when it passes, validate with ``open_ome_zarr`` above again."""
    from ome_zarr_models.v05.image import Image

    image = Image.from_zarr(zarr.open_group(result, mode="r"))
    assert image.labels is not None and image.labels.label_paths == [LABEL_NAME]


def test_xarray_opens_the_whole_result_as_a_tree_of_levels(result):
    tree = xr.open_datatree(result, engine="zarr")
    shapes = [(150, 203), (75, 101), (37, 50)]
    assert [(tree[k].sizes["y"], tree[k].sizes["x"]) for k in ("0", "1", "2")] == shapes
    labels = [tree[f"labels/{LABEL_NAME}/{k}"]["mask"].shape for k in range(3)]
    assert labels == shapes
    ours = segpipe.open_result(result, tree=True)
    for k in ("0", "1", "2"):
        np.testing.assert_array_equal(tree[k]["mask"].values, ours[k]["mask"].values)
        assert list(tree[k]["class"].values) == list(CLASSES)


def test_ome_zarr_py_reader_finds_image_and_labels(result):
    from ome_zarr.io import parse_url
    from ome_zarr.reader import Label, Multiscales, Reader

    nodes = list(Reader(parse_url(str(result)))())
    image = nodes[0]
    assert any(isinstance(s, Multiscales) for s in image.specs)
    assert [d.shape for d in image.data] == [(3, 150, 203), (3, 75, 101), (3, 37, 50)]
    labels = [n for n in nodes if any(isinstance(s, Label) for s in n.specs)]
    assert len(labels) == 1
    assert [d.shape for d in labels[0].data] == [(150, 203), (75, 101), (37, 50)]
    np.testing.assert_array_equal(
        np.asarray(labels[0].data[0]), segpipe.open_result(result)["mask"].values
    )


def test_probability_channels_are_named_and_coloured_by_class(result):
    from ome_zarr.io import parse_url
    from ome_zarr.reader import Reader

    from segpipe.palette import class_color

    channels = zarr.open_group(result, mode="r").attrs["ome"]["omero"]["channels"]
    assert [c["label"] for c in channels] == list(CLASSES)
    assert [bytes.fromhex(c["color"]) for c in channels] == [
        bytes(class_color(i)) for i in range(len(CLASSES))
    ]
    assert all(c["window"] == {"start": 0, "end": 1, "min": 0, "max": 1} for c in channels)
    # The strict validator still accepts the image, and keeps the channels it allows.
    image = validated_image(result)
    assert image.ome_attributes.model_dump()["omero"]["channels"][2]["label"] == "nucleus"
    # napari's reader names and tints one layer per class from them.
    node = next(iter(Reader(parse_url(str(result)))()))
    assert node.metadata["channel_names"] == list(CLASSES)
    assert node.metadata["contrast_limits"] == [[0, 1]] * len(CLASSES)
    assert node.metadata["colormap"][1] == [[0, 0, 0], [c / 255 for c in class_color(1)]]


def test_levels_are_reductions_of_level_zero_with_matching_coordinates(result):
    tree = segpipe.open_result(result, tree=True)
    assert list(tree.children) == ["0", "1", "2"]
    p0 = zarr.open_array(result / "0" / "probabilities", mode="r")[...].astype(np.float64)
    p1 = tree["1"]["probabilities"].values
    expected = p0[:, :150, :202].reshape(3, 75, 2, 101, 2).mean(axis=(2, 4))
    np.testing.assert_allclose(p1, expected, atol=1e-3)  # float16 storage
    m0, m1 = tree["0"]["mask"].values, tree["1"]["mask"].values
    blocks = m0[:150, :202].reshape(75, 2, 101, 2).transpose(0, 2, 1, 3).reshape(75, 101, 4)
    counts = (blocks[..., :, None] == blocks[..., None, :]).sum(-1)
    chosen = counts[np.arange(75)[:, None], np.arange(101)[None, :], 0]
    picked = (blocks == m1[..., None]) & (counts == counts.max(-1, keepdims=True))
    assert picked.any(-1).all(), "each level-1 label is a most frequent one of its block"
    assert (m1 == blocks[..., 0])[chosen == counts.max(-1)].all(), "ties go to top-left"
    x0 = tree["0"]["x"].values
    np.testing.assert_allclose(tree["1"]["x"].values, x0[:202].reshape(101, 2).mean(1))
    for k in ("1", "2"):
        level = xr.open_zarr(result, group=k)
        xr.testing.assert_identical(level.drop_attrs(), tree[k].to_dataset().drop_attrs())
        labels = zarr.open_array(result / "labels" / LABEL_NAME / k / "mask", mode="r")[...]
        np.testing.assert_array_equal(labels, tree[k]["mask"].values)


def test_shards_are_task_blocks_and_metadata_is_consolidated(result):
    root = zarr.open_group(result, mode="r")
    assert root["0/probabilities"].shards == (3, 64, 64)
    assert root["0/probabilities"].chunks == (3, 32, 32)
    assert root[f"labels/{LABEL_NAME}/0/mask"].shards == (64, 64)
    assert root.metadata.consolidated_metadata is not None
    files = list((result / "0" / "probabilities" / "c").rglob("*"))
    assert len([f for f in files if f.is_file()]) <= 3 * 4  # at most one file per shard


def test_task_tiles_is_part_of_the_identity(source, net, result):
    with pytest.raises(segpipe.results.ResultMismatchError, match="task_tiles"):
        run(source, result, net, task_tiles=1)


def test_uint8_probabilities_decode_with_plain_xarray(source, net, tmp_path):
    floats = run(source, tmp_path / "f.zarr", net, probability_dtype="float32")
    packed = run(source, tmp_path / "u.zarr", net, probability_dtype="uint8")
    assert zarr.open_array(packed / "0" / "probabilities", mode="r").dtype == np.uint8
    # napari's contrast limits span the stored 0..255, not 0..1 (every class saturated)
    channels = zarr.open_group(packed, mode="r").attrs["ome"]["omero"]["channels"]
    assert all(c["window"] == {"start": 0, "end": 255, "min": 0, "max": 255} for c in channels)
    plain = xr.open_zarr(packed, group="0")["probabilities"]
    assert plain.dtype.kind == "f"
    exact = zarr.open_array(floats / "0" / "probabilities", mode="r")[...]
    assert np.abs(plain.values - exact).max() <= 1 / 255
    assert np.abs(segpipe.open_result(packed)["probabilities"].values - exact).max() <= 1 / 255
    np.testing.assert_array_equal(
        segpipe.open_result(packed)["mask"].values, segpipe.open_result(floats)["mask"].values
    )


def test_partly_written_block_is_redone_whole(source, net, result, tmp_path):
    from segpipe.results import mark_tiles_done

    out = tmp_path / "r.zarr"
    FailingUNet.budget = 0
    flaky = FailingUNet(net.config, class_names=CLASSES)
    flaky.load_state_dict(net.state_dict())
    flaky.eval()
    with pytest.raises(RuntimeError, match="simulated"):
        run(source, out, flaky)
    # As if an older run had flushed one tile of a 2 x 2 block: the block is one shard.
    mark_tiles_done(out, {(0, 0): np.zeros(3, np.int64)})
    run(source, out, net)
    summary = read_meta(out).summary
    assert summary.tiles_computed == summary.tiles_total == 5 * 7
    np.testing.assert_array_equal(
        segpipe.open_result(out)["mask"].values, segpipe.open_result(result)["mask"].values
    )


class FailingUNet(models.unet.UNet):
    budget = 0

    def forward(self, x):
        FailingUNet.budget -= 1
        if FailingUNet.budget < 0:
            raise RuntimeError("simulated crash")
        return super().forward(x)


@pytest.mark.integration
def test_parallel_sharded_writes_equal_a_sync_run(source, net, result, tmp_path):
    import distributed

    with (
        distributed.LocalCluster(
            n_workers=2, threads_per_worker=1, processes=True, dashboard_address=":0"
        ) as cluster,
        distributed.Client(cluster) as client,
    ):
        out = run(source, tmp_path / "p.zarr", net, scheduler=client)
    sync, par = segpipe.open_result(result, tree=True), segpipe.open_result(out, tree=True)
    for k in sync.children:
        for name in ("mask", "probabilities"):
            np.testing.assert_array_equal(par[k][name].values, sync[k][name].values)
    assert read_meta(out).summary.tiles_computed == 5 * 7


# --- georeferenced input (GeoTIFF) -------------------------------------------------------------

GEOKEYS = {"model_type": (1024, 1), "raster_type": (1025, 1), "projected_crs": (3072, 32633)}


def write_geotiff(path, image, *, pixel_is_point=False):
    keys = dict(GEOKEYS, raster_type=(1025, 2 if pixel_is_point else 1))
    directory = [1, 1, 0, len(keys)]
    for key, value in keys.values():
        directory += [key, 0, 1, value]
    import tifffile

    tifffile.imwrite(
        path,
        image,
        photometric="rgb",
        tile=(64, 64),
        extratags=[
            (33550, "d", 3, (2.0, 2.0, 0.0), True),  # ModelPixelScale: 2 m pixels
            (33922, "d", 6, (0, 0, 0, 500000.0, 5400000.0, 0), True),  # ModelTiepoint
            (34735, "H", len(directory), directory, True),  # GeoKeyDirectory
        ],
    )
    return path


@pytest.fixture(scope="module")
def geotiff(source, tmp_path_factory):
    image = zarr.open_array(source, mode="r")[:100, :120]
    return write_geotiff(tmp_path_factory.mktemp("geo") / "aerial.tif", image)


@pytest.mark.parametrize("pixel_is_point", [False, True])
def test_geotiff_georeference_agrees_with_rasterio(source, tmp_path, pixel_is_point):
    import rasterio

    image = zarr.open_array(source, mode="r")[:40, :50]
    path = write_geotiff(tmp_path / "g.tif", image, pixel_is_point=pixel_is_point)
    geo = segpipe.open_image(path).georeference
    with rasterio.open(path) as ds:
        assert geo.crs == ds.crs.to_string() == "EPSG:32633"
        np.testing.assert_allclose(geo.transform, tuple(ds.transform)[:6])
    assert segpipe.open_image(source).georeference is None


def test_georeferenced_result_is_rioxarray_compatible(geotiff, net, tmp_path):
    import rioxarray  # noqa: F401  (registers the .rio accessor)

    out = run(geotiff, tmp_path / "g.zarr", net, pixel_size_um=None)
    validated_image(out)
    tree = xr.open_datatree(out, engine="zarr")
    levels = (segpipe.open_result(out), xr.open_zarr(out, group="0"), tree["0"].to_dataset())
    for ds in levels:
        assert ds.rio.crs.to_epsg() == 32633
        assert tuple(ds.rio.transform())[:6] == (2.0, 0.0, 500000.0, 0.0, -2.0, 5400000.0)
        assert ds["x"].attrs["units"] == "metre"
    for level1 in (segpipe.open_result(out, level=1), tree["1"].to_dataset()):
        assert level1.rio.crs.to_epsg() == 32633
        assert tuple(level1.rio.transform())[:6] == (4.0, 0.0, 500000.0, 0.0, -4.0, 5400000.0)
    assert read_meta(out).crs == "EPSG:32633"


def test_ingest_keeps_the_georeference(geotiff, net, tmp_path):
    """The flow ingests first: the CRS must survive the OME-Zarr copy (0.5 has no CRS field)."""
    import rioxarray  # noqa: F401

    from segpipe.io.ingest import ingest

    store = ingest(geotiff, tmp_path / "aerial.zarr", chunk=64)
    original = segpipe.open_image(geotiff).georeference
    assert segpipe.open_image(store).georeference == original
    direct = segpipe.open_result(run(geotiff, tmp_path / "direct.zarr", net, pixel_size_um=None))
    via = segpipe.open_result(run(store, tmp_path / "via.zarr", net, pixel_size_um=None))
    assert via.rio.crs == direct.rio.crs
    assert tuple(via.rio.transform()) == tuple(direct.rio.transform())
    np.testing.assert_array_equal(via["mask"].values, direct["mask"].values)


# --- a source placed by an OME-Zarr translation ------------------------------------------------

ORIGIN = (100.0, 200.0)  # (y, x) µm of the source's first pixel centre


def write_placed_ome_zarr(path, image, origin=ORIGIN):
    """``image`` (y, x, c) as a two-level OME-Zarr 0.5 image of 0.5 µm pixels whose level 0's
    first pixel is centred at ``origin`` (y, x) µm; level 1 the 2x2 blocks' top-left pixels,
    placed as NGFF places a 2x level: its centres 0.25 µm further in."""
    space = {"type": "space", "unit": "micrometer"}
    levels = [image, image[: image.shape[0] // 2 * 2 : 2, : image.shape[1] // 2 * 2 : 2]]
    datasets = [
        {
            "path": f"s{k}",
            "coordinateTransformations": [
                {"type": "scale", "scale": [1.0, 0.5 * 2**k, 0.5 * 2**k]},
                {"type": "translation", "translation": [0.0, *(o + 0.25 * k for o in origin)]},
            ],
        }
        for k in range(2)
    ]
    axes = [{"name": "c", "type": "channel"}, {"name": "y", **space}, {"name": "x", **space}]
    ms = {"name": "placed", "axes": axes, "datasets": datasets}
    ome = {"version": "0.5", "multiscales": [ms]}
    root = zarr.open_group(path, mode="w", zarr_format=3, attributes={"ome": ome})
    for k, level in enumerate(levels):
        root.create_array(f"s{k}", data=level.transpose(2, 0, 1), dimension_names=("c", "y", "x"))
    return path


@pytest.fixture(scope="module")
def placed(source, net, tmp_path_factory):
    """The result of the module's image as a placed OME-Zarr, with its file's pixel size."""
    folder = tmp_path_factory.mktemp("placed")
    image = write_placed_ome_zarr(folder / "placed.ome.zarr", zarr.open_array(source)[...])
    return image, run(image, folder / "placed.seg.zarr", net, pixel_size_um=None)


def _translations(ome):
    return [d["coordinateTransformations"][1] for d in ome["multiscales"][0]["datasets"]]


def test_a_placed_sources_result_lies_on_it_in_ome_and_xarray(placed, result):
    """An OME-Zarr source's translation was dropped: the result lay at 0, off its source in
    napari, its coordinates and micron GeoJSON in another frame."""
    _, out = placed
    # level k: the origin plus half of the 2**k - 1 level-0 pixels (0.5 µm) it spans before
    expected = [
        {"type": "translation", "translation": [0.0, 100.0, 200.0]},
        {"type": "translation", "translation": [0.0, 100.25, 200.25]},
        {"type": "translation", "translation": [0.0, 100.75, 200.75]},
    ]
    assert _translations(zarr.open_group(out, mode="r").attrs["ome"]) == expected
    label = zarr.open_group(out / "labels" / LABEL_NAME, mode="r").attrs["ome"]
    assert _translations(label) == [{**t, "translation": t["translation"][1:]} for t in expected]
    validated_image(out)
    for k, (y0, x0) in enumerate([(100.0, 200.0), (100.25, 200.25)]):
        ds, at_0 = xr.open_zarr(out, group=str(k)), xr.open_zarr(result, group=str(k))
        assert (float(ds.y[0]), float(ds.x[0])) == (y0, x0)
        np.testing.assert_allclose(ds.x.values, at_0.x.values + 200.0, rtol=0, atol=1e-9)
        np.testing.assert_allclose(ds.y.values, at_0.y.values + 100.0, rtol=0, atol=1e-9)
        np.testing.assert_array_equal(ds["mask"].values, at_0["mask"].values)  # same pixels
    assert read_meta(out).origin_um == ORIGIN
    assert read_meta(out).identity()["origin_um"] == [100.0, 200.0]


def test_info_says_where_a_placed_result_lies(placed, result, capsys):
    """`segpipe info` gave no sign of the origin that moves every coordinate by 100 µm."""
    from segpipe.analysis.summary import summarise
    from segpipe.cli import main

    _, out = placed
    assert summarise(out).origin_um == ORIGIN
    assert summarise(result).origin_um is None
    assert main(["info", str(out)]) == 0
    assert "origin: y 100, x 200 µm (the source's)" in capsys.readouterr().out.splitlines()
    assert main(["info", str(result)]) == 0
    assert "origin" not in capsys.readouterr().out


def test_a_placed_sources_micron_geojson_is_shifted_by_its_origin(placed, result):
    from shapely import get_coordinates
    from shapely.geometry import shape

    from segpipe.analysis.vectors import class_features

    _, out = placed
    found = 0
    for name in CLASSES[1:]:
        ours = class_features(out, name, coords="micron")
        at_0 = class_features(result, name, coords="micron")
        assert len(ours) == len(at_0)
        for a, b in zip(ours, at_0, strict=True):
            points = [get_coordinates(shape(f["geometry"])) for f in (a, b)]  # (n, 2): x, y
            np.testing.assert_allclose(points[0], points[1] + (200.0, 100.0), rtol=0, atol=1e-9)
        found += len(ours)
    assert found, "the net found no object to compare"


def test_a_level_1_result_lies_where_its_source_level_says(placed, net, tmp_path):
    """The source's level 1 is centred 0.25 µm in from its origin (its own translation says
    so): the result of that level, and its level 1, lie there and 0.5 µm further."""
    image, _ = placed
    out = run(image, tmp_path / "l1.zarr", net, pixel_size_um=None, level=1)
    assert read_meta(out).pixel_size_um == 1.0
    _, level1 = _translations(zarr.open_group(image, mode="r").attrs["ome"])
    assert level1["translation"] == [0.0, 100.25, 200.25]
    assert _translations(zarr.open_group(out, mode="r").attrs["ome"])[:2] == [
        {"type": "translation", "translation": [0.0, 100.25, 200.25]},
        {"type": "translation", "translation": [0.0, 100.75, 200.75]},
    ]
    ds = xr.open_zarr(out, group="0")
    assert (float(ds.y[0]), float(ds.x[0])) == (100.25, 200.25)


def test_a_placed_source_moved_is_another_result(source, net, tmp_path):
    """The same pixels placed elsewhere: a result resumed would keep the old coordinates."""
    pixels = zarr.open_array(source)[...]
    image = write_placed_ome_zarr(tmp_path / "i.ome.zarr", pixels, origin=(0.0, 5.0))
    out = run(image, tmp_path / "r.zarr", net, pixel_size_um=None)
    write_placed_ome_zarr(image, pixels)  # moved to ORIGIN
    with pytest.raises(segpipe.results.ResultMismatchError, match=r"origin_um: \[0\.0, 5\.0\]"):
        run(image, out, net, pixel_size_um=None)


def test_a_source_at_0_keeps_the_identity_results_had(result, source):
    """Results of sources without a translation (all results before it was read) resume: their
    identity is what it was, key for key."""
    meta = read_meta(result)
    assert meta.identity() == {
        "source": str(source),
        "shape": [150, 203],
        "level": 0,
        "pixel_size_um": 0.5,
        "class_names": list(CLASSES),
        "model_name": "unet",
        "model_sha256": meta.model_sha256,
        "tile": 32,
        "halo": meta.halo,
        "mode": "exact",
        "probability_dtype": "float16",
        "params": {"amp": meta.config.amp},
        "task_tiles": 2,
        "min_level_size": 32,
        "crs": None,
        "transform": None,
        "source_sha256": meta.source_sha256,
    }
    stored = zarr.open_group(result, mode="r").attrs["ome"]["multiscales"][0]["datasets"]
    assert stored[0]["coordinateTransformations"] == [{"type": "scale", "scale": [1.0, 0.5, 0.5]}]
