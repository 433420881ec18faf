"""segpipe.io.files: the state of a file a reader opened, and whether it changed since."""

import os
import pickle

import numpy as np
import pytest
import tifffile

from segpipe.io.files import changed_file, file_state
from segpipe.io.places import overlap
from segpipe.io.readers import ImageReadError, open_image


def _replace_keeping_size_and_mtime(path):
    """Another file of the same size saved over ``path`` by a rename, its mtime kept (a scan
    copied with cp -p or rsync -t, then moved into place)."""
    before = os.stat(path)
    new = path.with_name("new.bin")
    new.write_bytes(b"B" * before.st_size)
    os.utime(new, ns=(before.st_atime_ns, before.st_mtime_ns))
    os.replace(new, path)


def _rewrite_longer(path):
    path.write_bytes(path.read_bytes() + b"more")


@pytest.mark.parametrize(
    "change", [_replace_keeping_size_and_mtime, _rewrite_longer], ids=["saved-over", "rewritten"]
)
def test_a_file_saved_over_or_rewritten_is_changed(tmp_path, change):
    path = tmp_path / "scan.bin"
    path.write_bytes(b"A" * 4096)
    states = {str(path): file_state(path)}
    assert changed_file(states) is None
    change(path)
    assert os.stat(path).st_size >= 4096
    assert changed_file(states) == str(path)


def test_only_a_regular_file_has_a_state(tmp_path):
    assert file_state(tmp_path) is None
    assert file_state(tmp_path / "missing") is None
    assert changed_file({str(tmp_path / "missing"): None}) is None


def test_a_reader_sent_to_a_worker_refuses_a_scan_saved_over_its_file(tmp_path):
    """A worker opens the file by its path: another scan of the same size renamed over it,
    its mtime kept, was read as if it were the one the run opened."""
    path = tmp_path / "scan.tif"
    tifffile.imwrite(path, np.zeros((64, 64), np.uint8))
    sent = pickle.dumps(open_image(path))
    before = os.stat(path)
    tifffile.imwrite(tmp_path / "new.tif", np.full((64, 64), 200, np.uint8))
    os.utime(tmp_path / "new.tif", ns=(before.st_atime_ns, before.st_mtime_ns))
    os.replace(tmp_path / "new.tif", path)
    assert os.stat(path).st_size == before.st_size
    with pytest.raises(ImageReadError, match=r"scan\.tif changed since it was opened"):
        pickle.loads(sent).read(0, 8, 0, 8, 0)


@pytest.mark.parametrize(
    ("a", "b", "relation"),
    [
        ("local://{tmp}/out.zarr", "{tmp}/out.zarr/scan.tif", "holds"),
        ("{tmp}/out.zarr", "local://{tmp}/out.zarr", "is"),
        ("s3a://b/out.zarr", "s3://b/out.zarr/scan.svs", "holds"),
        ("gcs://b/scan.svs", "gs://b/scan.svs", "is"),
        ("s3://b/d/../out.zarr", "s3://b/out.zarr", "is"),
        ("simplecache::s3://b/scan.svs", "s3://b/scan.svs", "is"),
        ("s3://b/out.zarr", "s3://c/out.zarr", None),
        ("s3://b/out.zarr", "memory://b/out.zarr", None),
        ("s3://b/out.zarr", "/b/out.zarr", None),
    ],
)
def test_overlap_tells_places_apart_not_spellings(a, b, relation, tmp_path):
    """A URL of the local disk (local://), a protocol's other name (s3a, gcs), a '..' or a
    chain named no place a local path or the usual URL names: check_not_source let an
    overwrite delete the scan a result held."""
    a, b = (x.format(tmp=tmp_path) for x in (a, b))
    assert overlap(a, b) == relation


def test_an_overwrite_by_a_local_url_of_a_result_holding_its_source_is_refused(tmp_path):
    from test_results import meta

    from segpipe.io.files import URLPath
    from segpipe.results import prepare_result
    from segpipe.results.schema import ResultMismatchError

    result = tmp_path / "r.zarr"
    prepare_result(result, meta(source=str(tmp_path / "old.tif")))
    scan = result / "scan.tif"
    scan.write_bytes(b"the only copy")
    with pytest.raises(ResultMismatchError, match="source"):
        prepare_result(URLPath(f"local://{result}"), meta(source=str(scan)), overwrite=True)
    assert scan.read_bytes() == b"the only copy"
