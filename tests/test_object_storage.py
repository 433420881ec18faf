"""Object storage end to end, against a real S3 server: moto's, started on 127.0.0.1.

Images are read from ``s3://`` by byte ranges, results written through Zarr's store, and the
archive's claims, state sidecars, reports and catalog live in the bucket too. Every result is
compared with a run on local files; what crosses the wire is counted by a proxy in front of
the server, not by the client library.
"""

from __future__ import annotations

import datetime as dt
import http.client
import re
import socket
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import fsspec
import numpy as np
import pytest
import tifffile

moto_server = pytest.importorskip("moto.server")
s3fs = pytest.importorskip("s3fs")

from test_results import meta  # noqa: E402

import segpipe  # noqa: E402
from segpipe.archive import discover_images, process_image, read_state  # noqa: E402
from segpipe.archive.catalog import open_catalog  # noqa: E402
from segpipe.archive.claims import (  # noqa: E402
    ClaimLostError,
    UnsupportedStoreError,
    read_lock,
    try_claim,
)
from segpipe.config import SegmentConfig  # noqa: E402
from segpipe.faults import InjectedFault  # noqa: E402
from segpipe.io.files import URLPath, location  # noqa: E402
from segpipe.io.readers import open_image  # noqa: E402
from segpipe.results import (  # noqa: E402
    ResultMismatchError,
    delete_result,
    is_result,
    prepare_result,
    read_meta,
    remote,
)

BUCKET = "segpipe-test"
CONFIG = SegmentConfig(
    tile=64, task_tiles=2, probability_dtype="float32", device="cpu", scheduler="sync"
)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _options(endpoint: str) -> dict[str, Any]:
    return {
        "key": "testing",
        "secret": "testing",
        "client_kwargs": {"endpoint_url": endpoint, "region_name": "us-east-1"},
    }


class _CountingProxy(BaseHTTPRequestHandler):
    """Forwards each request to the S3 server and records (method, path, body bytes sent)."""

    protocol_version = "HTTP/1.1"
    server: _ProxyServer

    def _forward(self) -> None:
        length = int(self.headers.get("Content-Length") or 0)
        body = self.rfile.read(length) if length else None
        conn = http.client.HTTPConnection(*self.server.upstream, timeout=60)
        conn.request(self.command, self.path, body=body, headers=dict(self.headers.items()))
        response = conn.getresponse()
        data = response.read()
        conn.close()
        self.server.requests.append((self.command, self.path, len(data)))
        self.send_response_only(response.status)
        for name, value in response.getheaders():
            if name.lower() not in ("connection", "transfer-encoding", "content-length"):
                self.send_header(name, value)
        # HEAD answers with the object's length and no body
        size = response.getheader("Content-Length") if self.command == "HEAD" else len(data)
        self.send_header("Content-Length", str(size or 0))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(data)

    do_GET = do_HEAD = do_PUT = do_POST = do_DELETE = _forward

    def log_message(self, format: str, *args: Any) -> None:  # quiet
        pass


class _ProxyServer(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, upstream: tuple[str, int]) -> None:
        super().__init__(("127.0.0.1", 0), _CountingProxy)
        self.upstream = upstream
        self.requests: list[tuple[str, str, int]] = []


@dataclass
class S3:
    options: dict[str, Any]  # straight to the server
    counted: dict[str, Any]  # through the counting proxy
    proxy: _ProxyServer

    @property
    def fs(self) -> Any:
        return s3fs.S3FileSystem(**self.options)

    def url(self, key: str) -> str:
        return f"s3://{BUCKET}/{key}"

    def upload(self, local: Path, key: str) -> str:
        self.fs.put_file(str(local), f"{BUCKET}/{key}")
        return self.url(key)

    def bytes_read(self, key: str) -> int:
        """Body bytes of the GETs of ``key`` that went through the proxy."""
        path = f"/{BUCKET}/{key}"
        return sum(n for method, p, n in self.proxy.requests if method == "GET" and p == path)


@pytest.fixture(scope="module")
def s3() -> Iterator[S3]:
    import boto3

    port = _free_port()
    server = moto_server.ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    proxy = _ProxyServer(("127.0.0.1", port))
    thread = threading.Thread(target=proxy.serve_forever, daemon=True)
    thread.start()
    try:
        endpoint = f"http://127.0.0.1:{port}"
        boto3.client(
            "s3",
            endpoint_url=endpoint,
            aws_access_key_id="testing",
            aws_secret_access_key="testing",
            region_name="us-east-1",
        ).create_bucket(Bucket=BUCKET)
        counted = _options(f"http://127.0.0.1:{proxy.server_address[1]}")
        yield S3(options=_options(endpoint), counted=counted, proxy=proxy)
    finally:
        proxy.shutdown()
        proxy.server_close()
        server.stop()


@pytest.fixture(scope="module")
def reference(small_slide, random_checkpoint, tmp_path_factory) -> Path:
    """The slide segmented from and to local files, in this process."""
    out = tmp_path_factory.mktemp("reference") / "slide.seg.zarr"
    return Path(segpipe.segment(small_slide.image, out, str(random_checkpoint), CONFIG))


def _assert_same_result(got: Any, want: Path) -> None:
    a = segpipe.open_result(got, tree=True)
    b = segpipe.open_result(want, tree=True)
    assert sorted(a.children) == sorted(b.children)
    for level in b.children:
        for name in ("mask", "probabilities"):
            np.testing.assert_array_equal(
                a[level][name].values, b[level][name].values, err_msg=f"level {level} {name}"
            )
    assert read_meta(got).identity() | {"source": None} == read_meta(want).identity() | {
        "source": None
    }


def test_segment_reads_and_writes_s3_and_equals_a_local_run(
    s3, small_slide, random_checkpoint, reference
):
    source = s3.upload(small_slide.image, "direct/slide.ome.tif")
    out = segpipe.segment(
        source,
        s3.url("direct/slide.seg.zarr"),
        str(random_checkpoint),
        CONFIG,
        storage_options=s3.options,
    )
    assert isinstance(out, URLPath)
    assert str(out) == s3.url("direct/slide.seg.zarr")
    _assert_same_result(out, reference)
    assert read_meta(out).complete
    assert read_meta(out).source == source
    # Nothing is left beside it (the creation marker is gone) and a plain Zarr URL opens it.
    names = [p.rsplit("/", 1)[-1] for p in s3.fs.ls(f"{BUCKET}/direct")]
    assert sorted(names) == ["slide.ome.tif", "slide.seg.zarr"]
    import zarr

    group = zarr.open_group(str(out), mode="r", storage_options=s3.options)
    assert group.attrs["segpipe"]["state"] == "complete"
    # A user with the URL and the options (no URLPath at hand) opens it the same way.
    by_url = segpipe.open_result(str(out), storage_options=s3.options)
    np.testing.assert_array_equal(by_url["mask"].values, segpipe.open_result(reference)["mask"])


def test_a_window_of_an_s3_image_is_read_without_downloading_the_file(s3, tmp_path):
    pixels = np.random.default_rng(3).integers(0, 255, (1024, 1024, 3), dtype=np.uint8)
    local = tmp_path / "big.tif"
    tifffile.imwrite(local, pixels, tile=(64, 64), photometric="rgb")
    size = local.stat().st_size  # ~3 MB, uncompressed
    url = s3.upload(local, "window/big.tif")
    s3.proxy.requests.clear()

    reader = open_image(url, storage_options=s3.counted)
    window = reader.read(512, 576, 640, 704)
    reader.close()

    np.testing.assert_array_equal(window, pixels[512:576, 640:704])
    read = s3.bytes_read("window/big.tif")
    assert 0 < read < size // 4, f"read {read:,} of {size:,} bytes for one 64 x 64 tile"


@pytest.mark.integration
def test_the_archive_flow_runs_from_an_s3_archive_into_an_s3_output_root(
    s3, small_slide, random_checkpoint, reference, prefect_harness
):
    from segpipe.flows.archive import process_archive

    s3.upload(small_slide.image, "archive/day-1/slide.ome.tif")
    root = s3.url("out")

    run = process_archive(
        s3.url("archive"), root, str(random_checkpoint), CONFIG, storage_options=s3.options
    )
    assert run["segmented"] == ["day-1/slide.ome.tif"], run
    result = location(f"{root}/day-1/slide.ome.tif.seg.zarr", s3.options)
    _assert_same_result(result, reference)

    state = read_state(location(f"{root}/day-1/slide.ome.tif.seg.json", s3.options))
    assert state is not None and state["status"] == "complete"
    for name in ("slide.ome.tif.report.md", "slide.ome.tif.thumb.png"):
        assert s3.fs.exists(f"{BUCKET}/out/day-1/{name}"), name
    assert not s3.fs.exists(f"{BUCKET}/out/day-1/slide.ome.tif.lock")  # released
    catalog = open_catalog(root, storage_options=s3.options)
    assert list(catalog["image"].values) == ["day-1/slide.ome.tif"]
    summary = read_meta(reference).summary
    assert summary is not None
    assert catalog["class_pixels"].values[0].tolist() == list(summary.class_pixels)

    images = discover_images(s3.url("archive"), storage_options=s3.options)
    assert [i.key for i in images] == ["day-1/slide.ome.tif"]
    again = process_image(
        images[0], root, str(random_checkpoint), config=CONFIG, storage_options=s3.options
    )
    assert (again.status, again.reason) == ("skipped", "up to date")
    assert again.result == str(result)


def test_a_result_failing_while_created_on_s3_leaves_nothing_and_the_next_run_finishes(
    s3, small_slide, random_checkpoint, reference, monkeypatch
):
    source = s3.upload(small_slide.image, "fault/slide.ome.tif")
    out = s3.url("fault/slide.seg.zarr")
    monkeypatch.setenv("SEGPIPE_FAULT", "result.skeleton:raise")
    with pytest.raises(InjectedFault):
        segpipe.segment(source, out, str(random_checkpoint), CONFIG, storage_options=s3.options)
    # The skeleton's objects were uploaded, the root that makes them a result was not: removed.
    assert not s3.fs.find(f"{BUCKET}/fault/slide.seg.zarr")
    assert not s3.fs.exists(f"{BUCKET}/fault/.slide.seg.zarr.creating")

    monkeypatch.delenv("SEGPIPE_FAULT")
    done = segpipe.segment(source, out, str(random_checkpoint), CONFIG, storage_options=s3.options)
    _assert_same_result(done, reference)
    assert not s3.fs.exists(f"{BUCKET}/fault/.slide.seg.zarr.creating")


def test_claims_on_s3_exclude_each_other_and_a_stale_one_is_taken_over(s3):
    lock = location(s3.url("claims/a.svs.lock"), s3.options)
    first = try_claim(lock, owner="first", ttl_s=60)
    assert first is not None
    assert try_claim(lock, owner="second", ttl_s=60) is None
    first.release()
    assert read_lock(lock) is None

    # A dead owner's lock: no heartbeat for longer than its ttl (LastModified counts seconds).
    s3.fs.pipe_file(f"{BUCKET}/claims/a.svs.lock", b'{"owner": "dead", "token": "t", "ttl_s": 1}')
    time.sleep(2.1)
    taker = try_claim(lock, owner="taker", ttl_s=60)
    assert taker is not None
    assert (read_lock(lock) or {}).get("owner") == "taker"
    taker.check()
    taker.release()
    assert read_lock(lock) is None


def test_a_claim_that_lost_its_lock_neither_refreshes_nor_removes_the_new_one(s3):
    lock = location(s3.url("claims/b.svs.lock"), s3.options)
    slow = try_claim(lock, owner="slow", ttl_s=60)
    assert slow is not None
    # Another run took the lock over (as after a stale period): a new object, a new ETag.
    s3.fs.pipe_file(f"{BUCKET}/claims/b.svs.lock", b'{"owner": "new", "token": "n", "ttl_s": 60}')
    with pytest.raises(ClaimLostError):
        slow.check()
    slow.release()
    assert (read_lock(lock) or {}).get("owner") == "new"


def test_claims_on_a_store_that_ignores_if_match_on_writes_are_refused(s3, monkeypatch):
    """A claim's heartbeat writes If-Match its last ETag: on a store that ignored it, a run
    that lost its lock would overwrite the new owner's. The store is probed once, refused."""
    from segpipe.archive import claims

    monkeypatch.setattr(claims, "_CONDITIONAL_WRITES", {})
    lock = location(s3.url("claims/c.svs.lock"), s3.options)
    fs, _ = lock.filesystem()  # fsspec's one instance for these options
    real = fs.pipe_file

    def ignoring_if_match(path, data, *args, IfMatch=None, **kwargs):
        return real(path, data, *args, **kwargs)

    monkeypatch.setattr(fs, "pipe_file", ignoring_if_match)
    with pytest.raises(UnsupportedStoreError, match="If-Match"):
        try_claim(lock, owner="me")
    assert not s3.fs.find(f"{BUCKET}/claims", prefix=".segpipe-probe")


def test_claims_where_the_store_cannot_create_atomically_fail_with_what_to_do():
    with pytest.raises(UnsupportedStoreError, match="local or shared file system"):
        try_claim("memory://segpipe/claims/a.lock", owner="me")


def test_a_zarr_image_on_s3_reads_through_zarr_like_the_local_one(s3, small_slide):
    s3.fs.put(str(small_slide.truth), f"{BUCKET}/zarr/truth.zarr", recursive=True)
    local = open_image(small_slide.truth)
    remote = open_image(s3.url("zarr/truth.zarr"), storage_options=s3.options)
    assert remote.level_shapes == local.level_shapes
    np.testing.assert_array_equal(remote.read(10, 90, 20, 70), local.read(10, 90, 20, 70))


def test_an_s3_result_is_replaced_only_when_asked_and_other_data_never(
    s3, random_checkpoint, tmp_path
):
    image = tmp_path / "tiny.tif"
    pixels = np.random.default_rng(5).integers(0, 255, (64, 64, 3), dtype=np.uint8)
    tifffile.imwrite(image, pixels, photometric="rgb")
    source, out = s3.upload(image, "replace/tiny.tif"), s3.url("replace/tiny.seg.zarr")
    first = segpipe.segment(source, out, str(random_checkpoint), CONFIG, storage_options=s3.options)
    uint8 = CONFIG.replace(probability_dtype="uint8")
    with pytest.raises(ResultMismatchError, match="differs in"):
        segpipe.segment(source, out, str(random_checkpoint), uint8, storage_options=s3.options)
    assert read_meta(first).config.probability_dtype == "float32"

    second = segpipe.segment(
        source, out, str(random_checkpoint), uint8, overwrite=True, storage_options=s3.options
    )
    assert read_meta(second).config.probability_dtype == "uint8"
    stored = s3.fs.cat_file(f"{BUCKET}/replace/tiny.seg.zarr/0/probabilities/zarr.json")
    assert b'"uint8"' in stored
    assert not s3.fs.exists(f"{BUCKET}/replace/.tiny.seg.zarr.deleting")

    # Objects at the output that are no segpipe result are someone's data: never touched.
    s3.fs.pipe_file(f"{BUCKET}/replace/data.zarr/notes.txt", b"mine")
    with pytest.raises(ResultMismatchError, match="not a segpipe result"):
        segpipe.segment(
            source,
            s3.url("replace/data.zarr"),
            str(random_checkpoint),
            CONFIG,
            overwrite=True,
            storage_options=s3.options,
        )
    assert s3.fs.cat_file(f"{BUCKET}/replace/data.zarr/notes.txt") == b"mine"


# --- results at a URL, in fsspec's memory store ---------------------------------------------


def _bucket() -> tuple[Any, str]:
    """fsspec's memory file system (one per process) and a bucket of this test's own there."""
    return fsspec.filesystem("memory"), f"/segpipe-{uuid.uuid4().hex[:12]}"


@pytest.mark.parametrize("name", ["res[1A].zarr", "res*.zarr", "res?.zarr"])
def test_a_result_url_with_glob_characters_is_refused_and_other_data_kept(name):
    """fsspec reads [ ] * ? in a path as a glob pattern, in rm too: deleting ``res[1A]``
    deleted ``res1``'s and ``resA``'s objects and kept its own. Refused before any write."""
    fs, bucket = _bucket()
    users = {f"{bucket}/{n}/data.bin": n.encode() for n in ("res1.zarr", "resA.zarr", "re.zarr")}
    fs.pipe(users)
    url = URLPath(f"memory://{bucket}/{name}")
    refused = rf"{re.escape(str(url))}: .*glob pattern"
    with pytest.raises(ValueError, match=refused):
        prepare_result(url, meta())
    assert fs.find(bucket) == sorted(users)
    # One an earlier release made there resumes (nothing is deleted), but is never deleted.
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(remote, "check_literal_url", lambda url, what: None)
        prepare_result(url, meta())
    made = set(fs.find(bucket)) - set(users)
    assert made and not prepare_result(url, meta()).any()
    with pytest.raises(ValueError, match=refused):
        delete_result(url)
    assert set(fs.find(bucket)) == made | set(users)
    assert all(fs.cat_file(key) == data for key, data in users.items())


def test_an_earlier_releases_creation_marker_removes_its_prefix_once_old():
    """A marker of a release before markers listed their keys is empty: once old, what lies
    at the prefix without a root is that creation's, removed as that release did."""
    fs, bucket = _bucket()
    url = URLPath(f"memory://{bucket}/r.zarr")
    marker = f"{bucket}/.r.zarr.creating"
    fs.pipe({marker: b"", f"{bucket}/r.zarr/0/mask/zarr.json": b"{}"})
    fs.store[marker].created -= dt.timedelta(hours=1)
    assert not prepare_result(url, meta()).any()
    assert is_result(url) and not fs.exists(marker)


def test_a_create_at_a_url_that_fails_removes_what_it_wrote(monkeypatch):
    fs, bucket = _bucket()
    monkeypatch.setenv("SEGPIPE_FAULT", "result.skeleton:raise")
    with pytest.raises(InjectedFault):
        prepare_result(URLPath(f"memory://{bucket}/r.zarr"), meta())
    assert not fs.find(bucket)


def test_a_killed_create_at_a_url_is_removed_once_old_and_nothing_else_there(monkeypatch):
    """A kill leaves the objects a create wrote and its marker. The next run removed
    everything at the prefix whenever the root was missing: a run creating it right now, or
    data written there since. Now only the objects the marker lists, once it is old."""
    fs, bucket = _bucket()
    url = URLPath(f"memory://{bucket}/r.zarr")
    monkeypatch.setenv("SEGPIPE_FAULT", "result.skeleton:raise")
    monkeypatch.setattr(remote, "_remove_creation", lambda url, keys: None)  # killed: no clean-up
    with pytest.raises(InjectedFault):
        prepare_result(url, meta())
    monkeypatch.undo()
    marker = f"{bucket}/.r.zarr.creating"
    skeleton = set(fs.find(f"{bucket}/r.zarr"))
    assert f"{bucket}/r.zarr/_segpipe/tiles_done/zarr.json" in skeleton
    fs.pipe_file(f"{bucket}/r.zarr/notes.txt", b"mine")  # someone's, written since

    # A young marker may be a run creating the result now: nothing removed, the prefix refused.
    with pytest.raises(ResultMismatchError, match="being created by another run, or was left"):
        prepare_result(url, meta())
    assert set(fs.find(bucket)) == {*skeleton, marker, f"{bucket}/r.zarr/notes.txt"}

    fs.store[marker].created -= dt.timedelta(hours=1)
    with pytest.raises(ResultMismatchError, match="not a segpipe result"):
        prepare_result(url, meta())
    assert fs.find(bucket) == [f"{bucket}/r.zarr/notes.txt"]
    fs.rm_file(f"{bucket}/r.zarr/notes.txt")
    assert not prepare_result(url, meta()).any()
    assert is_result(url) and not fs.exists(marker)
