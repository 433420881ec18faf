"""Object storage end to end, against a real S3 server: moto's, started on 127.0.0.1.

Images are read from ``s3://`` by byte ranges, results written through Zarr's store, and the
archive's claims, state sidecars, reports and catalog live in the bucket too. Every result is
compared with a run on local files; what crosses the wire is counted by a proxy in front of
the server, not by the client library.
"""

from __future__ import annotations

import datetime as dt
import gc
import http.client
import json
import socket
import threading
import time
import uuid
import weakref
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
from segpipe.io.readers import ArrayReader, open_image  # noqa: E402
from segpipe.results import (  # noqa: E402
    DamagedResultError,
    ResultMismatchError,
    delete_result,
    is_complete,
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


def _environment_credentials(s3: S3, monkeypatch: pytest.MonkeyPatch) -> None:
    """The moto server's credentials and endpoint in AWS_*, as the command line takes them."""
    import s3fs

    endpoint = s3.options["client_kwargs"]["endpoint_url"]
    environment = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing"}
    environment |= {"AWS_ENDPOINT_URL": endpoint, "AWS_DEFAULT_REGION": "us-east-1"}
    for name, value in environment.items():
        monkeypatch.setenv(name, value)
    s3fs.S3FileSystem.clear_instance_cache()  # one made before would keep the old environment


def test_a_result_on_s3_opens_with_the_environments_credentials_and_a_lost_shard_is_refused(
    s3, small_slide, random_checkpoint, reference, monkeypatch
):
    """A URL without storage_options (the credentials in AWS_*, as the flows pass results on)
    opened a whole result as damaged: the missing-shard check looked for each shard on the
    local disk. With options, it skipped the check, and a lost shard read as background."""
    import s3fs

    source = s3.upload(small_slide.image, "env/slide.ome.tif")
    url = s3.url("env/slide.seg.zarr")
    segpipe.segment(source, url, str(random_checkpoint), CONFIG, storage_options=s3.options)
    _environment_credentials(s3, monkeypatch)
    np.testing.assert_array_equal(
        segpipe.open_result(url)["mask"].values, segpipe.open_result(reference)["mask"].values
    )
    shards = s3.fs.find(f"{BUCKET}/env/slide.seg.zarr/0/mask/c")
    s3.fs.rm_file(shards[0])
    s3fs.S3FileSystem.clear_instance_cache()
    for options in (None, s3.options):
        with pytest.raises(DamagedResultError, match=r"stored shard.* missing"):
            segpipe.open_result(url, storage_options=options)


def test_info_describes_an_image_at_a_url(s3, small_slide, monkeypatch, capsys):
    """`segpipe info s3://bucket/a.tif` ended in a traceback: describe_image took the URL
    for an open reader ('URLPath' object has no attribute 'level_shapes')."""
    from segpipe.cli import main

    url = s3.upload(small_slide.image, "info/slide.ome.tif")
    _environment_credentials(s3, monkeypatch)
    assert main(["info", url, "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert (info["path"], info["levels"][0]) == (url, [300, 300, 3])


def test_a_result_in_a_bucket_that_does_not_exist_is_named(small_slide, random_checkpoint, s3):
    """s3fs says "The specified bucket does not exist", naming no bucket and no URL."""
    url = f"s3://no-such-bucket-{uuid.uuid4().hex[:8]}/r.seg.zarr"
    with pytest.raises(FileNotFoundError) as caught:
        segpipe.segment(
            small_slide.image, url, str(random_checkpoint), CONFIG, storage_options=s3.options
        )
    assert caught.value.filename == url
    assert caught.value.strerror == "cannot be written (The specified bucket does not exist)"


def test_an_ingest_into_a_bucket_that_does_not_exist_is_named(small_slide, s3):
    from segpipe.io.ingest import ingest

    url = URLPath(f"s3://no-such-bucket-{uuid.uuid4().hex[:8]}/i.zarr", s3.options)
    with pytest.raises(FileNotFoundError) as caught:
        ingest(small_slide.image, url)
    assert caught.value.filename == str(url)
    assert caught.value.strerror == "cannot be written (The specified bucket does not exist)"


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


def test_a_closed_s3_reader_keeps_none_of_the_files_it_opened(s3, tmp_path, monkeypatch):
    """Each read after a close opens the URL again; a close lets go of every file opened
    before it (closed), so a reader that is read and closed for hours holds no more."""
    pixels = np.random.default_rng(4).integers(0, 255, (128, 128, 3), dtype=np.uint8)
    local = tmp_path / "small.tif"
    tifffile.imwrite(local, pixels, tile=(64, 64), photometric="rgb")
    url = s3.upload(local, "closing/small.tif")
    opened, open_read = [], URLPath.open_read

    def recorded(self: URLPath) -> Any:
        f = open_read(self)
        opened.append(weakref.ref(f))
        return f

    monkeypatch.setattr(URLPath, "open_read", recorded)
    reader = open_image(url, storage_options=s3.options)
    for _ in range(3):
        np.testing.assert_array_equal(reader.read(64, 128, 0, 64), pixels[64:, :64])
        reader.close()
    gc.collect()
    assert len(opened) >= 3
    assert [ref() for ref in opened] == [None] * len(opened)


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


def test_a_takeover_of_an_s3_lock_whose_owner_beat_since_it_was_read_fails(s3, monkeypatch):
    """A claimer finds the lock stale and takes it over If-Match the ETag it read; the owner
    was only slow and beats meanwhile. Each beat must give the lock a new ETag (S3's is the
    MD5 of the bytes: the record counts its beats), else the takeover of a live owner's lock
    succeeds and two runs segment the image."""
    import types

    from segpipe.archive import object_claims

    lock = location(s3.url("claims/d.svs.lock"), s3.options)
    owner = try_claim(lock, owner="slow", ttl_s=600)
    assert owner is not None
    real_read = object_claims.read_lock

    def owner_beats_meanwhile(path):
        data = real_read(path)  # after the takeover read the lock's ETag
        owner._touch()
        return data

    later = types.SimpleNamespace(time=lambda: time.time() + 3600)  # the lock looks stale
    monkeypatch.setattr(object_claims, "time", later)
    monkeypatch.setattr(object_claims, "read_lock", owner_beats_meanwhile)
    assert try_claim(lock, owner="taker", ttl_s=600) is None
    monkeypatch.undo()
    owner.check()
    assert (read_lock(lock) or {}).get("owner") == "slow"
    owner.release()
    assert read_lock(lock) is None


def test_a_failed_s3_heartbeat_is_counted_not_taken_for_a_renewal(s3, monkeypatch):
    """A heartbeat's PUT refused while the lock is still this claim's (a 503, the network)
    raises, so the beat counts it and gives the claim up after a ttl of them, before another
    run takes the lock over; it was swallowed as if renewed. One refused because another run
    took the lock over ends quietly: the claim's next check says it is lost."""
    lock = location(s3.url("claims/e.svs.lock"), s3.options)
    claim = try_claim(lock, owner="mine", ttl_s=600)
    assert claim is not None
    fs, _ = lock.filesystem()

    def slow_down(*args, **kwargs):
        raise OSError("503 Slow Down")

    monkeypatch.setattr(fs, "pipe_file", slow_down)
    with pytest.raises(OSError, match="Slow Down"):
        claim._touch()
    monkeypatch.undo()
    claim._touch()  # renewed again
    claim.check()
    s3.fs.pipe_file(f"{BUCKET}/claims/e.svs.lock", b'{"owner": "new", "token": "n", "ttl_s": 60}')
    claim._touch()  # If-Match refused: taken over, nothing raised, nothing written
    with pytest.raises(ClaimLostError):
        claim.check()
    claim.release()
    assert (read_lock(lock) or {}).get("owner") == "new"


def test_claims_on_a_store_that_ignores_if_match_on_writes_are_refused(s3, monkeypatch):
    """A claim's heartbeat writes If-Match its last ETag: on a store that ignored it, a run
    that lost its lock would overwrite the new owner's. The store is probed once, refused."""
    from segpipe.archive import object_claims

    monkeypatch.setattr(object_claims, "_CONDITIONAL_WRITES", {})
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


class _Killed(BaseException):
    """The process dying mid-call: no handler of Exception runs."""


def test_an_ingest_replaced_at_a_url_and_killed_while_deleting_never_reads_as_complete(
    monkeypatch,
):
    """Object storage renames nothing: the old copy is deleted object by object. Killed
    halfway, its root still said complete with chunks gone (read back as zeros, and reused);
    marked unfinished first, the next ingest redoes it."""
    from segpipe.io import files
    from segpipe.io.ingest import ingest

    fs, bucket = _bucket()
    url = URLPath(f"memory://{bucket}/img.zarr")
    pixels = np.random.default_rng(0).integers(1, 255, (128, 128, 3), dtype=np.uint8)
    ingest(ArrayReader(pixels), url, chunk=32, min_level_size=32)
    objects = len(fs.find(f"{bucket}/img.zarr"))
    remove = files.remove_literal

    def killed_halfway(fs, paths, recursive=False):
        paths = [paths] if isinstance(paths, str) else list(paths)
        remove(fs, paths[: len(paths) // 2], recursive=recursive)
        raise _Killed

    monkeypatch.setattr(files, "remove_literal", killed_halfway)
    with pytest.raises(_Killed):
        ingest(ArrayReader(pixels), url, chunk=32, min_level_size=32, overwrite=True)
    monkeypatch.undo()
    assert 1 < len(fs.find(f"{bucket}/img.zarr")) < objects  # half deleted
    root = json.loads(url.joinpath("zarr.json").read_text())
    assert root["attributes"]["segpipe"]["complete"] is False
    again = ingest(ArrayReader(pixels), url, chunk=32, min_level_size=32)  # no overwrite asked
    np.testing.assert_array_equal(open_image(again).read(0, 128, 0, 128), pixels)


# --- names fsspec reads as a glob pattern ([ ] * ?) ------------------------------------------

# Each matches res1.zarr and resA.zarr as a pattern (fsspec's rm deleted those, kept its own).
GLOB_NAMES = ["res[1A].zarr", "res*.zarr", "res?.zarr"]


@pytest.fixture(scope="module")
def background_checkpoint(tmp_path_factory) -> Path:
    """A U-Net that calls every pixel background: its mask shards are all 0, and Zarr deletes
    such a shard as it writes it (``write_empty_chunks=False``), through the store."""
    import torch

    from segpipe import models

    net = models.build("unet", class_names=("background", "tissue", "nucleus"), width=4, depth=2)
    with torch.no_grad():
        net.head.conv.weight.zero_()
        net.head.conv.bias.copy_(torch.tensor([8.0, 0.0, 0.0]))
    return models.save(net, tmp_path_factory.mktemp("ckpt") / "background-unet.pt")


def _tiny_image(path: Path, seed: int = 5, *, zero_corner: bool = False) -> Path:
    """A 128 x 128 RGB TIFF of random pixels (its top-left 64 x 64 all 0 if asked)."""
    pixels = np.random.default_rng(seed).integers(1, 255, (128, 128, 3), dtype=np.uint8)
    if zero_corner:
        pixels[:64, :64] = 0
    tifffile.imwrite(path, pixels, photometric="rgb")
    return path


def _objects(fs: Any, folder: str) -> dict[str, bytes]:
    """Every object below ``folder``, by key."""
    return {key: fs.cat_file(key) for key in fs.find(folder)}


def _copy(fs: Any, source: str, target: str) -> None:
    fs.pipe({key.replace(source, target, 1): data for key, data in _objects(fs, source).items()})


def _without(objects: dict[str, bytes], folder: str) -> dict[str, bytes]:
    return {key: data for key, data in objects.items() if not key.startswith(f"{folder}/")}


def _check_result_at_a_glob_name(
    fs: Any, folder: str, url: str, name: str, image: str, checkpoints: tuple[Path, Path], options
) -> None:
    """Results ``res1.zarr`` and ``resA.zarr`` in ``folder`` (``url`` the folder's URL); one
    at ``name`` created, resumed, overwritten, deleted: theirs stay byte for byte."""
    random, background = (str(c) for c in checkpoints)
    segpipe.segment(image, f"{url}/res1.zarr", random, CONFIG, storage_options=options)
    _copy(fs, f"{folder}/res1.zarr", f"{folder}/resA.zarr")
    before, mine = _objects(fs, folder), f"{folder}/{name}"

    # Every mask shard of this one is empty: Zarr deletes it, at the siblings' keys too.
    out = segpipe.segment(image, f"{url}/{name}", background, CONFIG, storage_options=options)
    assert str(out) == f"{url}/{name}" and read_meta(out).complete
    assert not segpipe.open_result(out)["mask"].values.any()
    assert fs.find(mine) and _without(_objects(fs, folder), mine) == before
    resumed = segpipe.segment(image, out, background, CONFIG, storage_options=options)
    assert read_meta(resumed).complete and _without(_objects(fs, folder), mine) == before

    uint8 = CONFIG.replace(probability_dtype="uint8")
    segpipe.segment(image, out, background, uint8, overwrite=True, storage_options=options)
    assert read_meta(out).config.probability_dtype == "uint8"
    assert _without(_objects(fs, folder), mine) == before

    delete_result(out)
    assert _objects(fs, folder) == before  # its objects and its marker gone, nothing else


@pytest.mark.parametrize("name", GLOB_NAMES)
def test_a_result_at_a_glob_name_touches_no_result_the_pattern_matches(
    name, random_checkpoint, background_checkpoint, tmp_path
):
    fs, bucket = _bucket()
    image = str(_tiny_image(tmp_path / "tiny.tif"))
    checkpoints = (random_checkpoint, background_checkpoint)
    _check_result_at_a_glob_name(fs, bucket, f"memory://{bucket}", name, image, checkpoints, None)


@pytest.mark.parametrize("name", GLOB_NAMES)
def test_a_result_at_a_glob_name_on_s3_touches_no_result_the_pattern_matches(
    s3, name, random_checkpoint, background_checkpoint, tmp_path
):
    folder = f"glob-{uuid.uuid4().hex[:8]}"
    image = s3.upload(_tiny_image(tmp_path / "tiny.tif"), f"{folder}/tiny.tif")
    checkpoints = (random_checkpoint, background_checkpoint)
    _check_result_at_a_glob_name(
        s3.fs, f"{BUCKET}/{folder}", s3.url(folder), name, image, checkpoints, s3.options
    )


@pytest.mark.parametrize("name", GLOB_NAMES)
def test_a_killed_create_at_a_glob_name_removes_its_own_objects_only(name, monkeypatch):
    fs, bucket = _bucket()
    prepare_result(URLPath(f"memory://{bucket}/res1.zarr"), meta())
    _copy(fs, f"{bucket}/res1.zarr", f"{bucket}/resA.zarr")
    before = _objects(fs, bucket)
    monkeypatch.setenv("SEGPIPE_FAULT", "result.skeleton:raise")
    with pytest.raises(InjectedFault):
        prepare_result(URLPath(f"memory://{bucket}/{name}"), meta())
    assert _objects(fs, bucket) == before


def _check_ingest_at_a_glob_name(
    fs: Any, folder: str, url: str, name: str, tmp_path: Path, options: dict[str, Any] | None
) -> None:
    """Ingests ``res1.zarr`` and ``resA.zarr`` in ``folder`` (``url`` the folder's URL); one
    at ``name`` created, reused and replaced: theirs stay byte for byte."""
    from segpipe.io.ingest import ingest, ingested_image

    settings: dict[str, Any] = {"chunk": 64, "min_level_size": 64, "pixel_size_um": 0.5}
    sibling = URLPath(f"{url}/res1.zarr", options)
    ingest(_tiny_image(tmp_path / "other.tif", seed=1), sibling, **settings)
    _copy(fs, f"{folder}/res1.zarr", f"{folder}/resA.zarr")
    before, mine = _objects(fs, folder), f"{folder}/{name}"

    # Its first chunk is 0: Zarr deletes such a chunk as it writes it, at the siblings' keys too.
    source = _tiny_image(tmp_path / "tiny.tif", zero_corner=True)
    pixels = tifffile.imread(source)
    out = ingest(source, URLPath(f"{url}/{name}", options), **settings)
    assert str(out) == f"{url}/{name}"
    np.testing.assert_array_equal(open_image(out).read(0, 128, 0, 128), pixels)
    assert _without(_objects(fs, folder), mine) == before
    created = out.joinpath("zarr.json").modified()
    assert ingested_image(source, out, chunk=64, pixel_size_um=0.5) == out
    assert out.joinpath("zarr.json").modified() == created, "reused, not written again"

    replaced = ingest(source, out, **(settings | {"pixel_size_um": 2.0}), overwrite=True)
    assert open_image(replaced).pixel_size_um == 2.0
    np.testing.assert_array_equal(open_image(replaced).read(0, 128, 0, 128), pixels)
    assert _without(_objects(fs, folder), mine) == before


@pytest.mark.parametrize("name", GLOB_NAMES)
def test_an_ingest_at_a_glob_name_touches_no_ingest_the_pattern_matches(name, tmp_path):
    fs, bucket = _bucket()
    _check_ingest_at_a_glob_name(fs, bucket, f"memory://{bucket}", name, tmp_path, None)


@pytest.mark.parametrize("name", GLOB_NAMES)
def test_an_ingest_at_a_glob_name_on_s3_touches_no_ingest_the_pattern_matches(s3, name, tmp_path):
    folder = f"glob-{uuid.uuid4().hex[:8]}"
    folder_url = s3.url(folder)
    _check_ingest_at_a_glob_name(
        s3.fs, f"{BUCKET}/{folder}", folder_url, name, tmp_path, s3.options
    )


@pytest.mark.parametrize("protocol", ["file", "memory"])
@pytest.mark.parametrize("name", GLOB_NAMES)
def test_remove_literal_deletes_the_paths_named_and_none_their_pattern_matches(
    protocol, name, tmp_path
):
    from segpipe.io.files import remove_literal

    if protocol == "file":
        fs, folder = fsspec.filesystem("file", auto_mkdir=True), str(tmp_path)
    else:
        fs, folder = _bucket()
    mine = f"{folder}/{name}"
    names = ("res1.zarr", "resA.zarr", name)
    fs.pipe({f"{folder}/{n}/{key}": n.encode() for n in names for key in ("zarr.json", "0/c/0")})
    fs.makedirs(f"{mine}/empty")  # a folder the file system keeps with no file in it
    others = _without(_objects(fs, folder), mine)

    remove_literal(fs, [f"{mine}/0/c/0", f"{mine}/gone"])  # one gone already: no error
    assert fs.find(mine) == [f"{mine}/zarr.json"]
    assert _without(_objects(fs, folder), mine) == others
    remove_literal(fs, mine, recursive=True)
    assert not fs.exists(mine), "its folders are gone too"
    assert _objects(fs, folder) == others
    remove_literal(fs, mine, recursive=True)  # nothing there: nothing to do


def test_remove_literal_deletes_plain_names_in_bulk_and_the_others_key_by_key_on_s3(s3):
    """S3: a folder of 300 plain keys goes in one bulk request (DeleteObjects), not one
    DELETE each; one with ``[1]`` key by key, its sibling the pattern matches kept."""
    from segpipe.io.files import remove_literal

    fs = s3fs.S3FileSystem(**s3.counted)
    folder = f"{BUCKET}/bulk-{uuid.uuid4().hex[:8]}"
    plain, named = f"{folder}/res1.zarr", f"{folder}/res[1].zarr"
    fs.pipe(
        {f"{plain}/c/{i}": b"x" for i in range(300)} | {f"{named}/c/{i}": b"y" for i in range(3)}
    )

    def deletes() -> tuple[int, int]:
        """(bulk deletes, single deletes) since the last call."""
        sent = [(method, path) for method, path, _ in s3.proxy.requests]
        s3.proxy.requests.clear()
        bulk = sum(method == "POST" and path.endswith("?delete") for method, path in sent)
        return bulk, sum(method == "DELETE" for method, _ in sent)

    s3.proxy.requests.clear()
    remove_literal(fs, named, recursive=True)
    assert deletes() == (0, 3)
    assert not fs.find(named) and len(fs.find(plain)) == 300
    remove_literal(fs, plain, recursive=True)
    assert deletes() == (1, 0)
    assert not fs.find(folder)


@pytest.mark.parametrize("denied", [False, True])
def test_remove_literal_deletes_key_by_key_what_a_bulk_delete_left(monkeypatch, denied):
    """s3fs's bulk delete ignores a key it failed to delete (no error, no report): what is
    still listed after it is deleted key by key, whose error (here: denied) is raised."""
    from segpipe.io.files import remove_literal

    fs, bucket = _bucket()
    keys = [f"{bucket}/res/c/{i}" for i in range(5)]
    fs.pipe(dict.fromkeys(keys, b"x"))
    rm_file, bulk, single = fs.rm_file, [], []

    def forgetful(paths: list[str]) -> None:
        bulk.append(paths)
        for path in paths[1:]:  # the first one kept, without a word
            rm_file(path)

    def delete(path: str) -> None:
        single.append(path)
        if denied:
            raise PermissionError(f"{path}: Access Denied")
        rm_file(path)

    monkeypatch.setattr(fs, "rm", forgetful)
    monkeypatch.setattr(fs, "rm_file", delete)
    if denied:
        with pytest.raises(PermissionError, match="Access Denied"):
            remove_literal(fs, f"{bucket}/res", recursive=True)
        assert fs.find(f"{bucket}/res") == keys[:1]
    else:
        remove_literal(fs, f"{bucket}/res", recursive=True)
        assert not fs.exists(f"{bucket}/res")
    assert (bulk, single) == ([keys], keys[:1])


def test_a_url_folder_with_glob_characters_lists_only_its_own_objects():
    fs, bucket = _bucket()
    fs.pipe({f"{bucket}/{key}": b"" for key in ("out[1]/a.json", "out[1]/b.txt", "out1/c.json")})
    folder = URLPath(f"memory://{bucket}/out[1]")
    assert folder.glob("*.json") == [folder.joinpath("a.json")]
    assert URLPath(f"memory://{bucket}/nothing").glob("*") == []


@pytest.mark.parametrize("name", GLOB_NAMES)
def test_an_export_at_a_glob_name_replaces_no_export_the_pattern_matches(name, reference):
    from segpipe.analysis.ngff import export_ngff04

    fs, bucket = _bucket()
    export_ngff04(reference, f"memory://{bucket}/res1.zarr")
    _copy(fs, f"{bucket}/res1.zarr", f"{bucket}/resA.zarr")
    before, mine = _objects(fs, bucket), f"{bucket}/{name}"
    export_ngff04(reference, f"memory://{bucket}/{name}")
    exported = _objects(fs, mine)
    assert exported and _without(_objects(fs, bucket), mine) == before
    export_ngff04(reference, f"memory://{bucket}/{name}", overwrite=True)
    assert _objects(fs, mine) == exported
    assert _without(_objects(fs, bucket), mine) == before


def test_an_s3_archive_image_with_glob_characters_is_segmented_and_replaced_alone(
    s3, random_checkpoint, tmp_path
):
    """``slide [1].tif`` was failed (its result URL refused); as a pattern it matches
    ``slide 1.tif``, whose result its replacement must never touch."""
    folder = f"archive-{uuid.uuid4().hex[:8]}"
    for name, seed in [("slide 1.tif", 1), ("slide [1].tif", 2)]:
        s3.upload(_tiny_image(tmp_path / f"{seed}.tif", seed), f"{folder}/in/{name}")
    images = discover_images(s3.url(f"{folder}/in"), storage_options=s3.options)
    assert [i.key for i in images] == ["slide 1.tif", "slide [1].tif"]
    root, checkpoint = s3.url(f"{folder}/out"), str(random_checkpoint)
    for image in images:
        done = process_image(image, root, checkpoint, config=CONFIG, storage_options=s3.options)
        assert done.status == "segmented", done
    plain = f"{BUCKET}/{folder}/out/slide 1.tif.seg.zarr"
    before = _objects(s3.fs, plain)

    uint8 = CONFIG.replace(probability_dtype="uint8")  # a result setting: due again
    again = process_image(images[1], root, checkpoint, config=uint8, storage_options=s3.options)
    assert again.status == "segmented", again
    assert again.result == f"{root}/slide [1].tif.seg.zarr"
    assert read_meta(location(again.result, s3.options)).config.probability_dtype == "uint8"
    assert _objects(s3.fs, plain) == before


def test_a_file_written_atomically_has_the_mode_of_any_file_the_user_writes(tmp_path):
    """mkstemp makes its file 0600; the renamed file is the user's usual 0666 less umask, as a
    report, a sidecar or a table written in a shared output root must be readable by others."""
    import os

    from segpipe.io.files import write_text_atomic

    mask = os.umask(0o022)
    os.umask(mask)
    out = write_text_atomic(tmp_path / "table.csv", "a,b\n")
    (tmp_path / "plain.csv").write_text("a,b\n")
    assert out.stat().st_mode & 0o777 == (tmp_path / "plain.csv").stat().st_mode & 0o777


def test_a_source_urls_password_is_stored_nowhere(small_slide, random_checkpoint):
    """An image read at http://user:password@host/... was recorded with its password in the
    result's attributes (its identity, the source it names) and in the log."""
    import functools
    import threading
    from http.server import SimpleHTTPRequestHandler

    import fsspec

    class Quiet(SimpleHTTPRequestHandler):
        def log_message(self, *args):
            pass

    folder = small_slide.image.parent
    served = functools.partial(Quiet, directory=str(folder))
    with ThreadingHTTPServer(("127.0.0.1", 0), served) as server:
        threading.Thread(target=server.serve_forever, daemon=True).start()
        host = f"127.0.0.1:{server.server_address[1]}"
        url = f"http://alice:PASSWORD123@{host}/{small_slide.image.name}"
        out = segpipe.segment(url, "memory://creds/r.seg.zarr", random_checkpoint,
                              tile=64, scheduler="sync")  # fmt: skip
        server.shutdown()
    fs = fsspec.filesystem("memory")
    assert not [key for key in fs.find("/creds") if b"PASSWORD123" in fs.cat_file(key)]
    assert read_meta(out).source == f"http://{host}/{small_slide.image.name}"
    fs.rm("/creds", recursive=True)


@pytest.mark.parametrize("url", ["memory://rootres", "memory://rootres/"])
def test_a_result_at_a_stores_root_is_refused_and_writes_nothing_here(
    random_checkpoint, tmp_path, monkeypatch, url
):
    """Its creation marker, beside it, went to a local folder "memory:" of the working one
    (and the run failed naming that local path, or went on where the folder existed)."""
    monkeypatch.chdir(tmp_path)
    image = ArrayReader(np.zeros((64, 64, 3), np.uint8))
    with pytest.raises(ValueError, match="memory://rootres is a store's root"):
        segpipe.segment(image, url, random_checkpoint, tile=64, scheduler="sync")
    assert list(tmp_path.iterdir()) == []


def test_an_ingest_from_a_url_path_carries_its_options_and_reads_its_pixels():
    """A URLPath source (a URL with its storage_options) was taken for a reader: ingest and
    ingested_image failed with "'URLPath' object has no attribute 'shape'"."""
    import io

    import fsspec
    import tifffile

    from segpipe.io.files import URLPath
    from segpipe.io.ingest import ingest, ingested_image

    pixels = np.random.default_rng(0).integers(0, 255, (100, 120, 3), dtype=np.uint8)
    data = io.BytesIO()
    tifffile.imwrite(data, pixels, photometric="rgb")
    fs = fsspec.filesystem("memory")
    fs.pipe("/urlpath-ingest/src.tif", data.getvalue())
    source = URLPath("memory://urlpath-ingest/src.tif")
    for made in (
        ingest(source, URLPath("memory://urlpath-ingest/a.zarr"), chunk=64),
        ingested_image(source, URLPath("memory://urlpath-ingest/b.zarr")),
    ):
        np.testing.assert_array_equal(open_image(made).read(0, 100, 0, 120), pixels)
    fs.rm("/urlpath-ingest", recursive=True)


def test_a_replacement_meeting_a_late_write_during_its_deletion_finishes_on_s3(
    s3, random_checkpoint, tmp_path, monkeypatch
):
    """An object the replaced run wrote while the result was deleted (its late tile record):
    s3fs's rmdir of its prefix raised a bare FileExistsError naming nothing, the deletion
    marker was left, and the path was stuck."""
    import segpipe.io.files as files

    image = tmp_path / "tiny.tif"
    tifffile.imwrite(image, np.zeros((64, 64, 3), np.uint8), photometric="rgb")
    source, out = s3.upload(image, "late/tiny.tif"), s3.url("late/tiny.seg.zarr")
    segpipe.segment(source, out, str(random_checkpoint), CONFIG, storage_options=s3.options)
    real, late = files._remove_folders, []

    def late_write_first(fs, root):
        if not late:  # once, as the other run's last write lands
            late.append(fs.pipe_file(f"{root}/_segpipe/tiles_done/c/0/0", b"late"))
        return real(fs, root)

    monkeypatch.setattr(files, "_remove_folders", late_write_first)
    uint8 = CONFIG.replace(probability_dtype="uint8")
    again = segpipe.segment(source, out, str(random_checkpoint), uint8, overwrite=True,
                            storage_options=s3.options)  # fmt: skip
    assert late and read_meta(again).config.probability_dtype == "uint8" and is_complete(again)
    assert not s3.fs.exists(f"{BUCKET}/late/.tiny.seg.zarr.deleting")
