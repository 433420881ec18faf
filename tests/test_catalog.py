"""segpipe.archive.catalog: records written atomically, assembled into an xarray Dataset
along image."""

import json
import logging
import re
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest

import segpipe
from segpipe.archive import catalog


@pytest.fixture(scope="module")
def result(tmp_path_factory, random_checkpoint):
    """One complete result of a small synthetic slide (0.5 µm per pixel)."""
    from segpipe.synthetic.demo import make_demo_slide

    folder = tmp_path_factory.mktemp("catalog")
    slide = make_demo_slide(folder, size=128, seed=2)
    return segpipe.segment(
        slide.image, folder / "a.seg.zarr", random_checkpoint, tile=64, scheduler="sync"
    )


def _write_record(root, image, fractions, classes=("background", "tissue", "nucleus")):
    path = catalog.record_path(root, image)
    path.parent.mkdir(parents=True, exist_ok=True)
    pixels = [round(f * 10_000) for f in fractions]
    record = {
        "image": image,
        "class_names": list(classes),
        "class_pixels": pixels,
        "class_fraction": list(fractions),
        "class_area_um2": [p * 0.25 for p in pixels],
        "pixel_size_um": 0.5,
        "height": 100,
        "width": 100,
        "result": f"{image}.seg.zarr",
    }
    path.write_text(json.dumps(record))


def test_record_holds_the_results_statistics(tmp_path, result):
    catalog.record_result(tmp_path, "day-1/a.svs", result, source="/scans/day-1/a.svs")
    ds = catalog.open_catalog(tmp_path)
    mask = segpipe.open_result(result)["mask"].values
    counts = np.bincount(mask.ravel(), minlength=3)
    assert list(ds["image"].values) == ["day-1/a.svs"]
    assert list(ds["class"].values) == ["background", "tissue", "nucleus"]
    np.testing.assert_array_equal(ds["class_pixels"].values[0], counts)
    np.testing.assert_allclose(ds["class_fraction"].values[0], counts / counts.sum(), rtol=1e-5)
    np.testing.assert_allclose(ds["class_area_um2"].values[0], counts * 0.5**2)
    assert ds["source"].values[0] == "/scans/day-1/a.svs"
    assert (ds["height"].values[0], ds["width"].values[0]) == (128, 128)
    assert ds["tiles_total"].values[0] == 4


def test_records_of_images_gone_since_are_told_apart_and_kept(tmp_path):
    """A slide renamed or deleted in the archive kept its record, counted in every statistic
    as if it were there, with nothing to tell it apart."""
    scans = tmp_path / "scans"
    scans.mkdir()
    for key in ("a.svs", "b.svs", "c.svs"):
        (scans / key).write_bytes(b"scan")
        catalog.record_path(tmp_path, key).parent.mkdir(parents=True, exist_ok=True)
        _write_record(tmp_path, key, [0.5, 0.4, 0.1])
        path = catalog.record_path(tmp_path, key)
        record = json.loads(path.read_text())
        path.write_text(json.dumps({**record, "source": str(scans / key)}))
    (scans / "b.svs").rename(scans / "d.svs")
    (scans / "c.svs").unlink()
    ds = catalog.open_catalog(tmp_path, check_sources=True)
    assert ds["source_exists"].dtype == bool
    assert list(ds["source_exists"].values) == [True, False, False]
    assert catalog.gone_images(tmp_path) == ["b.svs", "c.svs"]
    assert catalog.gone_images(tmp_path, present={"c.svs"}) == ["b.svs"]  # found: not looked at
    assert len(catalog.read_records(tmp_path)) == 3


def _with_sources(root, sources):
    """A record per key of ``sources`` (key -> its source)."""
    for key, source in sources.items():
        _write_record(root, key, [0.5, 0.4, 0.1])
        path = catalog.record_path(root, key)
        path.write_text(json.dumps({**json.loads(path.read_text()), "source": source}))


def test_a_damaged_record_is_left_out_of_the_gone_list_with_a_warning(tmp_path, caplog):
    """The gone list parsed every record: one damaged record of another image (a disk, an
    edit) failed every archive run at its end, after all its images were done."""
    caplog.set_level(logging.WARNING, logger="segpipe.archive")  # whatever ran before
    _with_sources(tmp_path, {"a.svs": str(tmp_path / "a.svs"), "b.svs": str(tmp_path / "b.svs")})
    (tmp_path / "a.svs").write_bytes(b"scan")
    damaged = catalog.record_path(tmp_path, "c.svs")
    damaged.write_text('{"image": "c.svs", "class_na')
    assert catalog.gone_images(tmp_path) == ["b.svs"]
    assert f"{damaged}: catalog record cannot be parsed" in caplog.text
    with pytest.raises(ValueError, match="cannot be parsed"):  # the catalog still refuses it
        catalog.open_catalog(tmp_path)


def test_a_source_that_cannot_be_looked_at_is_not_gone(tmp_path, monkeypatch, caplog):
    """A folder of the archive made unreadable (a permission change): Path.exists raised
    PermissionError, failing the gone list (and the run) and open_catalog."""
    caplog.set_level(logging.WARNING, logger="segpipe.archive")  # whatever ran before
    locked = tmp_path / "locked"
    _with_sources(tmp_path, {k: str(locked / k) for k in ("a.svs", "b.svs")})
    _with_sources(tmp_path, {"c.svs": str(tmp_path / "c.svs")})  # gone, and known to be
    exists = Path.exists

    def refused(self):
        if self.parent == locked:
            raise PermissionError(13, "Permission denied", str(self))
        return exists(self)

    monkeypatch.setattr(Path, "exists", refused)
    assert catalog.gone_images(tmp_path) == ["c.svs"]
    ds = catalog.open_catalog(tmp_path, check_sources=True)
    assert list(ds["source_exists"].values) == [True, True, False]  # unknown: not known gone
    said = [r.getMessage() for r in caplog.records if "cannot tell" in r.getMessage()]
    assert len(said) == 2  # once a call, not once a record
    assert f"cannot tell whether {locked / 'a.svs'} exists" in said[0]
    assert "Permission denied" in said[0] and "nor 1 other source(s)" in said[0]


def test_open_catalog_looks_at_sources_only_when_asked(tmp_path, monkeypatch, caplog):
    """A local catalog of an archive on S3 made a request per record, with none of the
    archive's storage options (a raw NoCredentialsError, or requests to AWS)."""
    caplog.set_level(logging.WARNING, logger="segpipe.archive")  # whatever ran before
    from segpipe.io.files import URLPath

    _with_sources(tmp_path, {k: f"s3://scans/{k}" for k in ("a.svs", "b.svs")})
    looked = []

    def no_answer(self):
        looked.append(self.url)
        raise RuntimeError("Unable to locate credentials")

    monkeypatch.setattr(URLPath, "filesystem", no_answer)
    ds = catalog.open_catalog(tmp_path)
    assert looked == [] and "source_exists" not in ds
    ds = catalog.open_catalog(tmp_path, check_sources=True)
    assert list(ds["source_exists"].values) == [True, True]  # not known to be gone
    assert looked == ["s3://scans/a.svs", "s3://scans/b.svs"]
    assert "cannot tell whether s3://scans/a.svs exists (Unable to locate" in caplog.text
    assert catalog.gone_images(tmp_path) == []


def test_a_source_at_a_url_is_gone_when_its_store_has_no_such_file(tmp_path):
    import fsspec

    fs = fsspec.filesystem("memory")
    fs.pipe("/segpipe-catalog-test/a.svs", b"scan")
    _with_sources(tmp_path, {k: f"memory://segpipe-catalog-test/{k}" for k in ("a.svs", "b.svs")})
    try:
        ds = catalog.open_catalog(tmp_path, {}, check_sources=True)
        assert list(ds["source_exists"].values) == [True, False]
        assert catalog.gone_images(tmp_path, (), {}) == ["b.svs"]
    finally:
        fs.rm("/segpipe-catalog-test", recursive=True)


def test_a_record_naming_no_source_is_gone(tmp_path):
    """A record that names no source (written by hand, or emptied) proves no image of the
    archive is still there: it is listed gone, for a user to look at, never taken as present
    (its empty path read as the current folder, which exists)."""
    _with_sources(tmp_path, {"a.svs": "", "b.svs": str(tmp_path / "b.svs")})
    _write_record(tmp_path, "c.svs", [0.5, 0.4, 0.1])  # no source at all
    (tmp_path / "b.svs").write_bytes(b"scan")
    assert catalog.gone_images(tmp_path) == ["a.svs", "c.svs"]
    ds = catalog.open_catalog(tmp_path, check_sources=True)
    assert list(ds["source_exists"].values) == [False, True, False]


def test_query_images_by_class_fraction(tmp_path):
    _write_record(tmp_path, "a.svs", [0.9, 0.09, 0.01])
    _write_record(tmp_path, "b.svs", [0.5, 0.4, 0.1])
    _write_record(tmp_path, "c.svs", [0.2, 0.6, 0.2])
    ds = catalog.open_catalog(tmp_path)
    nucleus = ds["class_fraction"].sel({"class": "nucleus"}, drop=True)
    assert list(ds["image"][nucleus > 0.05].values) == ["b.svs", "c.svs"]
    assert list(ds.where(nucleus > 0.15, drop=True)["image"].values) == ["c.svs"]


def test_results_of_models_with_other_classes_share_the_union(tmp_path):
    _write_record(tmp_path, "a.svs", [0.5, 0.5], classes=("background", "tissue"))
    _write_record(tmp_path, "b.tif", [0.7, 0.3], classes=("background", "building"))
    ds = catalog.open_catalog(tmp_path)
    assert list(ds["class"].values) == ["background", "tissue", "building"]
    assert np.isnan(ds["class_fraction"].sel({"image": "a.svs", "class": "building"}).item())
    assert ds["class_pixels"].sel({"image": "b.tif", "class": "tissue"}).item() == 0


def test_an_empty_catalog_has_no_images(tmp_path):
    ds = catalog.open_catalog(tmp_path)
    assert ds.sizes["image"] == 0


def test_records_come_in_the_order_of_their_image_keys(tmp_path):
    """Records are listed by image key, as the catalog's image axis and every report show
    them, not by their files' names (lower-cased slugs): "Z.svs" sorts before "a.svs"."""
    for key in ("b.svs", "a.svs", "Z.svs"):
        _write_record(tmp_path, key, [0.5, 0.4, 0.1])
    keys = ["Z.svs", "a.svs", "b.svs"]
    assert [r["image"] for r in catalog.read_records(tmp_path)] == keys
    assert list(catalog.open_catalog(tmp_path)["image"].values) == keys


def test_record_paths_are_distinct_for_keys_that_slug_alike(tmp_path):
    assert catalog.record_path(tmp_path, "a/b.tif") != catalog.record_path(tmp_path, "a-b.tif")


def test_a_record_is_replaced_and_removed(tmp_path, result):
    catalog.record_result(tmp_path, "a.svs", result, fingerprint={"size": 1})
    catalog.record_result(tmp_path, "a.svs", result, fingerprint={"size": 2})
    (record,) = catalog.read_records(tmp_path)
    assert record["fingerprint"] == {"size": 2}
    catalog.remove_record(tmp_path, "a.svs")
    assert catalog.read_records(tmp_path) == []


def test_runs_finishing_at_once_lose_no_record(tmp_path, result):
    keys = [f"day-{i % 4}/slide-{i}.svs" for i in range(24)]
    # Every key written twice, from different threads, all at once.
    with ThreadPoolExecutor(8) as pool:
        list(pool.map(lambda k: catalog.record_result(tmp_path, k, result), keys + keys))
    ds = catalog.open_catalog(tmp_path)
    assert sorted(ds["image"].values) == sorted(keys)
    assert not list((tmp_path / catalog.CATALOG_DIR).rglob(".*.part"))


def test_an_incomplete_result_is_refused(tmp_path, result):
    import shutil

    import zarr

    copy = shutil.copytree(result, tmp_path / "copy.seg.zarr")
    group = zarr.open_group(copy, mode="r+")
    group.attrs["segpipe"] = {**group.attrs["segpipe"], "complete": False}
    with pytest.raises(ValueError, match="not complete"):
        catalog.record_result(tmp_path, "a.svs", copy)


@pytest.mark.parametrize(
    ("text", "problem"),
    [
        ('{"image": "b.svs", "class_na', r"cannot be parsed \(.*line 1 column"),
        ('{"result": "b.svs.seg.zarr"}', "no image key"),
        ('["b.svs"]', "no image key"),
        # JSON of a record, a field wrong: zip's or int()'s error named neither
        ('{"image": "b.svs", "class_names": ["a", "b"], "class_pixels": [1]}', r"not 2 numbers"),
        ('{"image": "b.svs", "class_names": ["a"], "class_fraction": 0.5}', r"not 1 numbers"),
        ('{"image": "b.svs", "class_names": ["a"], "height": "128px"}', r"height '128px', not a"),
    ],
    ids=["torn", "no-image", "no-object", "short-list", "scalar-list", "string-height"],
)
def test_a_damaged_record_is_refused_naming_its_file(tmp_path, text, problem):
    """One damaged record fails the catalog naming its file and what is wrong with it, not
    with a bare JSONDecodeError or KeyError that names neither."""
    _write_record(tmp_path, "a.svs", [0.5, 0.4, 0.1])
    damaged = catalog.record_path(tmp_path, "b.svs")
    damaged.write_text(text)
    with pytest.raises(ValueError, match=f"^{re.escape(str(damaged))}: .*{problem}"):
        catalog.open_catalog(tmp_path)
