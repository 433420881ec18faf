"""The process-archive flow on Prefect's temporary local server, and served through a real one."""

import errno
import json
import shutil
from pathlib import Path

import pytest
import torch

import segpipe
from segpipe.archive import catalog, read_state
from segpipe.config import SegmentConfig
from segpipe.execution.stitching import PredictionError
from segpipe.io.readers import ImageReadError
from segpipe.results import is_complete, read_meta
from segpipe.results.tiles import ResultReplacedError

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def slides(tmp_path_factory):
    """Three small synthetic slides (pyramidal OME-TIFFs) to put into archives."""
    from segpipe.synthetic.demo import make_demo_slide

    folder = tmp_path_factory.mktemp("slides")
    return [make_demo_slide(folder, size=160, seed=s).image for s in (1, 2, 3)]


CONFIG = SegmentConfig(tile=64, scheduler="sync")


def _run(source, out, model, config=CONFIG, **kw):
    from segpipe.flows.archive import process_archive

    return process_archive(str(source), str(out), str(model), config, **kw)


def _artifacts(key):
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterKey

    with get_client(sync_client=True) as client:
        return client.read_artifacts(
            artifact_filter=ArtifactFilter(key=ArtifactFilterKey(any_=[key]))
        )


def test_second_run_segments_nothing_and_a_new_image_is_the_only_one_processed(
    prefect_harness, slides, random_checkpoint, tmp_path, capfd
):
    from segpipe.flows.archive import artifact_key

    source, out = tmp_path / "archive", tmp_path / "out"
    (source / "day-1").mkdir(parents=True)
    shutil.copy(slides[0], source / "day-1" / "a.ome.tif")
    shutil.copy(slides[1], source / "b.ome.tif")
    (source / "notes.txt").write_text("not an image")

    first = _run(source, out, random_checkpoint)
    assert first["segmented"] == ["b.ome.tif", "day-1/a.ome.tif"]
    assert first["failed"] == {}
    assert is_complete(out / "day-1" / "a.ome.tif.seg.zarr")
    assert (out / "day-1" / "a.ome.tif.thumb.png").is_file()

    capfd.readouterr()
    second = _run(source, out, random_checkpoint)
    assert second["segmented"] == []
    assert second["skipped"] == ["b.ome.tif", "day-1/a.ome.tif"]
    assert second["summary"] == "2 images: nothing to segment, 2 up to date"
    assert "nothing to segment, 2 up to date" in capfd.readouterr().err  # Prefect's log

    shutil.copy(slides[2], source / "day-1" / "c.ome.tif")
    third = _run(source, out, random_checkpoint)
    assert third["segmented"] == ["day-1/c.ome.tif"]
    assert sorted(third["skipped"]) == ["b.ome.tif", "day-1/a.ome.tif"]

    ds = catalog.open_catalog(out)
    assert list(ds["image"].values) == ["b.ome.tif", "day-1/a.ome.tif", "day-1/c.ome.tif"]
    # Artifacts: one report per image (a version per run that segmented it), a table per run.
    reports = _artifacts(artifact_key("report", str(out.absolute()), "day-1/c.ome.tif"))
    assert len(reports) == 1
    assert "nucleus" in reports[0].data
    tables = _artifacts(artifact_key("archive", str(out.absolute())))
    assert len(tables) == 3
    latest = max(tables, key=lambda a: a.created)
    assert "1 segmented, 2 up to date" in latest.description

    # An image deleted (or renamed) is said to be gone; its record and result stay.
    (source / "b.ome.tif").unlink()
    fourth = _run(source, out, random_checkpoint)
    assert fourth["gone"] == ["b.ome.tif"] and third["gone"] == []
    assert fourth["summary"] == (
        "2 images: nothing to segment, 2 up to date, 1 recorded but gone from the archive "
        "(b.ome.tif)"
    )
    ds = catalog.open_catalog(out, check_sources=True)
    assert dict(zip(ds["image"].values, ds["source_exists"].values, strict=True)) == {
        "b.ome.tif": False,
        "day-1/a.ome.tif": True,
        "day-1/c.ome.tif": True,
    }
    assert is_complete(out / "b.ome.tif.seg.zarr")


def test_the_list_of_images_gone_fails_no_run(
    prefect_harness, random_checkpoint, tmp_path, monkeypatch
):
    """A damaged catalog record of another image (a disk, an edit) failed every run at its
    end, after all its images were done: the list of images gone is a view, like the
    artifacts, and no error of it fails a run."""
    source, out = tmp_path / "archive", tmp_path / "out"
    source.mkdir()
    catalog.record_path(out, "a.ome.tif").parent.mkdir(parents=True)
    catalog.record_path(out, "a.ome.tif").write_text('{"image": "a.ome.tif", "class_na')
    gone = {"image": "b.ome.tif", "class_names": [], "source": str(source / "b.ome.tif")}
    catalog.record_path(out, "b.ome.tif").write_text(json.dumps(gone))
    assert _run(source, out, random_checkpoint)["gone"] == ["b.ome.tif"]

    def no_answer(*args, **kw):
        raise OSError("the catalog's store does not answer")

    monkeypatch.setattr(catalog, "gone_images", no_answer)
    assert _run(source, out, random_checkpoint)["gone"] == []


def test_an_output_root_that_is_the_archive_is_refused_before_anything_is_written(
    prefect_harness, slides, random_checkpoint, tmp_path
):
    source = tmp_path / "archive"
    source.mkdir()
    shutil.copy(slides[0], source / "a.ome.tif")
    for out in (source, tmp_path):  # the archive itself, or a folder that holds it
        with pytest.raises(ValueError, match="is the archive"):
            _run(source, out, random_checkpoint)
    assert sorted(p.name for p in source.iterdir()) == ["a.ome.tif"]


def test_an_output_root_given_as_a_file_url_is_that_folder(
    prefect_harness, slides, random_checkpoint, tmp_path, monkeypatch
):
    """The CLI takes a file:// URL for the local path; the flow made Path("file:///...") of
    it, a folder "file:" in the working one, where every output and the catalog went."""
    monkeypatch.chdir(tmp_path)
    source, out = tmp_path / "archive", tmp_path / "out"
    source.mkdir()
    shutil.copy(slides[0], source / "a.ome.tif")
    assert _run(source, out.as_uri(), random_checkpoint)["segmented"] == ["a.ome.tif"]
    assert is_complete(out / "a.ome.tif.seg.zarr")
    assert not (tmp_path / "file:").exists()


def test_a_corrupt_file_is_reported_by_name_and_reason_and_the_others_finish(
    prefect_harness, slides, random_checkpoint, tmp_path
):
    from segpipe.flows.archive import artifact_key

    source, out = tmp_path / "archive", tmp_path / "out"
    source.mkdir()
    shutil.copy(slides[0], source / "good.ome.tif")
    good = (source / "good.ome.tif").read_bytes()
    (source / "broken.tif").write_bytes(good[: len(good) // 3])  # truncated mid-file

    result = _run(source, out, random_checkpoint, retry_delay_s=0)
    assert result["segmented"] == ["good.ome.tif"]
    assert list(result["failed"]) == ["broken.tif"]
    reason = result["failed"]["broken.tif"]
    assert "ImageReadError" in reason
    assert str(source / "broken.tif") in reason
    table = _artifacts(artifact_key("archive", str(out.absolute())))[0]
    rows = {row["image"]: row for row in table.data} if isinstance(table.data, list) else None
    if rows is None:  # the API hands the table back as JSON text
        import json

        rows = {row["image"]: row for row in json.loads(table.data)}
    assert rows["broken.tif"]["status"] == "failed"
    assert "broken.tif" in rows["broken.tif"]["reason"]
    assert "broken.tif" in table.description
    assert list(catalog.open_catalog(out)["image"].values) == ["good.ome.tif"]
    state = read_state(out / "broken.tif.seg.json")
    assert state["status"] == "failed"


def test_a_transient_failure_is_retried_by_prefect(
    prefect_harness, slides, random_checkpoint, tmp_path, monkeypatch
):
    source, out = tmp_path / "archive", tmp_path / "out"
    source.mkdir()
    shutil.copy(slides[0], source / "a.ome.tif")
    real, calls = segpipe.segment, []

    def flaky(*args, **kwargs):
        calls.append(args[0])
        if len(calls) == 1:
            raise OSError("connection to the Dask scheduler lost")
        return real(*args, **kwargs)

    monkeypatch.setattr(segpipe, "segment", flaky)
    result = _run(source, out, random_checkpoint, retry_delay_s=0)
    assert result["segmented"] == ["a.ome.tif"]
    assert len(calls) == 2


def test_a_failed_image_is_held_by_the_next_run_until_it_passes_retry_failed(
    prefect_harness, slides, random_checkpoint, tmp_path, monkeypatch
):
    """The run's result names each image held back after failing, with why and until when,
    and a held image fails no fail_on_error run (it did not fail in this one); retry_failed
    reaches each image's task, which tries it again now, not hours later."""
    source, out = tmp_path / "archive", tmp_path / "out"
    source.mkdir()
    shutil.copy(slides[0], source / "a.ome.tif")

    def corrupt(*args, **kwargs):
        raise ValueError("corrupt tile directory")

    with monkeypatch.context() as patch:
        patch.setattr(segpipe, "segment", corrupt)
        first = _run(source, out, random_checkpoint)
    assert list(first["failed"]) == ["a.ome.tif"]

    held = _run(source, out, random_checkpoint, fail_on_error=True)
    assert (held["failed"], held["segmented"]) == ({}, [])
    assert list(held["held"]) == ["a.ome.tif"]
    reason = held["held"]["a.ome.tif"]
    assert "failed 1 time" in reason and "(or now: --retry-failed, retry_failed=True)" in reason
    assert "ValueError: corrupt tile directory" in reason

    again = _run(source, out, random_checkpoint, retry_failed=True)
    assert (again["segmented"], again["held"]) == (["a.ome.tif"], {})


def test_fail_on_error_leaves_a_run_without_failures_to_return_its_result(
    prefect_harness, slides, random_checkpoint, tmp_path
):
    """fail_on_error ends a run Failed only when an image failed in it: a clean nightly run
    raising ArchiveFailedError would page someone for nothing and fail the deployment."""
    source, out = tmp_path / "archive", tmp_path / "out"
    source.mkdir()
    shutil.copy(slides[0], source / "a.ome.tif")
    result = _run(source, out, random_checkpoint, fail_on_error=True)
    assert (result["segmented"], result["failed"]) == (["a.ome.tif"], {})


def _two_images_under_a_limit(tmp_path: Path, slides: list, limit: str) -> tuple[Path, Path]:
    """An archive of two images (and its output root) and a global concurrency limit of one
    slot named ``limit`` on the test's Prefect server."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.actions import GlobalConcurrencyLimitCreate

    with get_client(sync_client=True) as client:
        client.create_global_concurrency_limit(GlobalConcurrencyLimitCreate(name=limit, limit=1))
    source, out = tmp_path / "archive", tmp_path / "out"
    source.mkdir()
    shutil.copy(slides[0], source / "a.ome.tif")
    shutil.copy(slides[1], source / "b.ome.tif")
    return source, out


def test_a_global_concurrency_limit_serialises_segmentation_across_images(
    prefect_harness, slides, random_checkpoint, tmp_path, monkeypatch
):
    import threading
    import time

    source, out = _two_images_under_a_limit(tmp_path, slides, "segpipe-test-gpu")
    real, running, most = segpipe.segment, [0], [0]
    lock = threading.Lock()

    def counted(*args, **kwargs):
        with lock:
            running[0] += 1
            most[0] = max(most[0], running[0])
        try:
            time.sleep(0.5)  # long enough for the other image's task to try
            return real(*args, **kwargs)
        finally:
            with lock:
                running[0] -= 1

    monkeypatch.setattr(segpipe, "segment", counted)
    result = _run(
        source, out, random_checkpoint, max_concurrent=2, concurrency_limit="segpipe-test-gpu"
    )
    assert sorted(result["segmented"]) == ["a.ome.tif", "b.ome.tif"]
    assert most[0] == 1


def test_an_image_waiting_to_retry_leaves_its_global_slot_to_others(
    prefect_harness, slides, random_checkpoint, tmp_path, monkeypatch
):
    """The slot (one GPU) was held across Prefect's wait before a retry: the other image
    waited for it the whole delay. Now the first attempt's failure frees it at once."""
    import threading

    source, out = _two_images_under_a_limit(tmp_path, slides, "segpipe-test-retry")
    real, calls, lock = segpipe.segment, [], threading.Lock()

    def first_fails(*args, **kwargs):
        with lock:
            calls.append(Path(args[0]).name)
            first = len(calls) == 1
        if first:
            raise OSError("connection to the Dask scheduler lost")
        return real(*args, **kwargs)

    monkeypatch.setattr(segpipe, "segment", first_fails)
    result = _run(
        source, out, random_checkpoint, max_concurrent=2, retry_delay_s=8,
        concurrency_limit="segpipe-test-retry",
    )  # fmt: skip
    assert sorted(result["segmented"]) == ["a.ome.tif", "b.ome.tif"]
    assert len(calls) == 3 and calls[1] != calls[0], calls  # the other, during the wait


def test_no_more_than_max_concurrent_images_are_in_flight_at_once(
    prefect_harness, slides, random_checkpoint, tmp_path, monkeypatch
):
    """max_concurrent bounds the images a run segments at once (each holds its slide's tiles
    and its share of the machine): a third image starting beside two would overcommit it."""
    import threading

    source, out = tmp_path / "archive", tmp_path / "out"
    source.mkdir()
    for name, slide in zip("abc", slides, strict=True):
        shutil.copy(slide, source / f"{name}.ome.tif")
    real, running, most = segpipe.segment, [0], [0]
    changed = threading.Condition()

    def counted(*args, **kwargs):
        with changed:
            running[0] += 1
            most[0] = max(most[0], running[0])
            changed.notify_all()
            # Held until a third image runs beside (never, max_concurrent kept) or 3 s: long
            # enough for the second to start on a loaded machine.
            changed.wait_for(lambda: running[0] > 2, timeout=3.0)
        try:
            return real(*args, **kwargs)
        finally:
            with changed:
                running[0] -= 1

    monkeypatch.setattr(segpipe, "segment", counted)
    result = _run(source, out, random_checkpoint, max_concurrent=2)
    assert result["segmented"] == ["a.ome.tif", "b.ome.tif", "c.ome.tif"]
    assert most[0] == 2, f"{most[0]} images in flight at once, max_concurrent=2"


def test_a_run_loads_the_model_once_and_only_result_settings_make_images_due(
    prefect_harness, slides, random_checkpoint, tmp_path, monkeypatch
):
    from segpipe import models

    source, out = tmp_path / "archive", tmp_path / "out"
    source.mkdir()
    shutil.copy(slides[0], source / "a.ome.tif")
    shutil.copy(slides[1], source / "b.ome.tif")
    real_load, loads = models.load, []
    monkeypatch.setattr(models, "load", lambda m: loads.append(m) or real_load(m))

    first = _run(source, out, random_checkpoint, max_concurrent=2)
    assert sorted(first["segmented"]) == ["a.ome.tif", "b.ome.tif"]
    assert loads == [str(random_checkpoint)], "loaded once for both images"
    meta = read_meta(out / "a.ome.tif.seg.zarr")
    assert meta.model_name == str(random_checkpoint)

    faster = CONFIG.replace(batch_size=8, n_workers=3)  # execution settings only
    assert _run(source, out, random_checkpoint, faster)["skipped"] == ["a.ome.tif", "b.ome.tif"]
    other = CONFIG.replace(probability_dtype="uint8")  # a result setting
    again = _run(source, out, random_checkpoint, other)
    assert again["segmented"] == ["a.ome.tif", "b.ome.tif"]
    assert read_meta(out / "a.ome.tif.seg.zarr").config.probability_dtype == "uint8"
    assert read_state(out / "a.ome.tif.seg.json")["params"] == other.result_settings()


def _wrapped(cause: Exception, as_=PredictionError) -> Exception:
    """What stitching.model_errors raises for an error of the model's at a window (or a
    reader, ``as_=ImageReadError``, for an error reading a file)."""
    try:
        raise as_("/in/a.tif: the model failed on window 3") from cause
    except as_ as error:
        return error


@pytest.mark.parametrize(
    ("error", "retry"),
    [
        (OSError("network"), True),
        (RuntimeError("worker died"), True),
        (ImageReadError("/in/a.tif: corrupt"), False),
        (ValueError("tile 500 px is not a multiple"), False),
        # The model's NaN or failure at a window: the same again (it ran three times).
        (PredictionError("/in/a.tif: the model's output is NaN"), False),
        (_wrapped(torch.OutOfMemoryError("CUDA out of memory")), True),  # other jobs may end
        # torch's CPU allocator: a plain RuntimeError
        (_wrapped(RuntimeError("DefaultCPUAllocator: can't allocate memory: you tried")), True),
        (_wrapped(RuntimeError("shape mismatch")), False),
        # A network share's or object store's read error may pass; a bad file's does not.
        (_wrapped(OSError(errno.EIO, "Input/output error"), ImageReadError), True),
        (_wrapped(ConnectionResetError(errno.ECONNRESET, "reset"), ImageReadError), True),
        (_wrapped(TimeoutError("read timed out"), ImageReadError), True),
        (_wrapped(OSError(errno.EINVAL, "Invalid argument"), ImageReadError), False),
        (_wrapped(ValueError("buffer too small"), ImageReadError), False),
        (_wrapped(FileNotFoundError(errno.ENOENT, "gone"), ImageReadError), False),
        # An NFS server that restarted: a stale handle, which a new open does not see again.
        (_wrapped(OSError(errno.ESTALE, "Stale file handle"), ImageReadError), True),
        # A read out of memory (other images beside it): an ImageReadError since a damaged
        # chunk claiming 2**50 bytes must name its file, but memory may be free next time.
        (_wrapped(MemoryError(), ImageReadError), True),
        # CUDA's own text when the caching allocator is bypassed: a plain RuntimeError.
        (_wrapped(RuntimeError("CUDA error: out of memory")), True),
        # The same text from a model wrapper's own exception type (TorchScript's too).
        (_wrapped(Exception("forward failed: CUDA out of memory")), True),
        # A missing file, unwrapped (an OSError otherwise retried): it will not reappear.
        (FileNotFoundError(errno.ENOENT, "No such file or directory", "/in/a.tif"), False),
        # An object store's SlowDown / 503 and InternalError / 500, as s3fs gives them.
        (_wrapped(OSError(errno.EBUSY, "Please reduce your request rate"), ImageReadError), True),
        (_wrapped(OSError(errno.EREMOTEIO, "InternalError"), ImageReadError), True),
        # Another run replaced the result (an overwrite): this run stops, not fights it.
        (ResultReplacedError("/out/a.seg.zarr was replaced by another run"), False),
    ],
)
def test_only_transient_errors_are_retried(error, retry):
    from prefect.states import Failed

    from segpipe.flows.retries import is_transient

    assert is_transient(None, None, Failed(data=error)) is retry


def test_the_deployment_file_names_the_flow_a_schedule_and_valid_parameters():
    from pathlib import Path

    import yaml
    from prefect.flows import load_flow_from_entrypoint

    root = Path(__file__).resolve().parents[1]
    spec = yaml.safe_load((root / "deploy" / "prefect.yaml").read_text())
    (deployment,) = spec["deployments"]
    assert deployment["entrypoint"] == "flows/archive.py:process_archive"
    assert deployment["schedules"][0]["cron"] == "0 2 * * *"
    assert deployment["work_pool"]["name"]
    flow = load_flow_from_entrypoint(str(root / deployment["entrypoint"]))
    assert flow.name == "process-archive"
    flow.validate_parameters(deployment["parameters"])  # raises on a wrong name or type


# -- the archive deployment served to a real Prefect server, a run triggered through its API --


def _wait_for(what, check, timeout_s, proc=None, log=None):
    import time

    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            pytest.fail(f"{what}: process exited with {proc.returncode}:\n{log.read_text()}")
        try:
            if check():
                return
        except Exception:  # not up yet: connection refused, 404, ...
            pass
        time.sleep(0.5)
    pytest.fail(f"{what}: not ready after {timeout_s} s" + (f":\n{log.read_text()}" if log else ""))


def _stop(proc):
    import signal
    import subprocess

    if proc.poll() is None:
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


@pytest.mark.slow
def test_served_deployment_runs_through_a_real_prefect_server(
    prefect_api_url, slides, random_checkpoint, tmp_path
):
    """`serve_archive` in a process of its own, registered with the session's Prefect server
    (a uvicorn process on 127.0.0.1, as `prefect server start`'s), runs what the server
    schedules for it."""
    import json
    import os
    import subprocess
    import sys
    from pathlib import Path

    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId
    from prefect.deployments import run_deployment

    source, out = tmp_path / "archive", tmp_path / "out"
    source.mkdir()
    shutil.copy(slides[0], source / "a.ome.tif")
    shutil.copy(slides[1], source / "b.ome.tif")

    env = {
        **os.environ,
        "PREFECT_API_URL": prefect_api_url,
        # the served runner asks for scheduled runs each second, not each 10 (Prefect's default)
        "PREFECT_RUNNER_POLL_FREQUENCY": "1",
    }
    env.pop("PREFECT_API_KEY", None)
    serve_log = tmp_path / "serve.log"
    name = f"served-{tmp_path.name}"  # the session's server outlives this test
    parameters = {"config": {"tile": 64, "scheduler": "sync"}, "retry_delay_s": 0}
    served = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import json, sys; from segpipe.flows.archive import serve_archive; "
            "serve_archive(sys.argv[1], sys.argv[2], sys.argv[3], name=sys.argv[5], "
            "**json.loads(sys.argv[4]))",
            str(source),
            str(out),
            str(random_checkpoint),
            json.dumps(parameters),
            name,
        ],
        env=env,
        cwd=Path(__file__).resolve().parents[1],
        stdout=serve_log.open("w"),
        stderr=subprocess.STDOUT,
    )
    try:
        with get_client(sync_client=True) as client:
            _wait_for(
                "served deployment",
                lambda: client.read_deployment_by_name(f"process-archive/{name}"),
                180,
                served,
                serve_log,
            )
            deployment = client.read_deployment_by_name(f"process-archive/{name}")
            assert deployment.schedules[0].schedule.cron == "0 2 * * *"
        run = run_deployment(
            f"process-archive/{name}", timeout=120, poll_interval=1, as_subflow=False
        )
        assert run.state.is_completed(), (run.state, serve_log.read_text()[-3000:])
        with get_client(sync_client=True) as client:
            artifacts = client.read_artifacts(
                flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[run.id]))
            )
            result = client.read_flow_run(run.id).state
        by_type = {}
        for artifact in artifacts:
            by_type.setdefault(artifact.type, []).append(artifact)
        assert len(by_type["markdown"]) == 2
        assert all("| nucleus |" in a.data for a in by_type["markdown"])
        (table,) = by_type["table"]
        assert "2 segmented" in table.description
        assert result.is_completed()
        assert is_complete(out / "a.ome.tif.seg.zarr")
        assert list(catalog.open_catalog(out)["image"].values) == ["a.ome.tif", "b.ome.tif"]
    finally:
        _stop(served)


def test_one_local_cluster_serves_the_run_and_a_finished_image_frees_its_slot_at_once(
    prefect_harness, slides, random_checkpoint, tmp_path, monkeypatch
):
    import threading

    import distributed

    monkeypatch.delenv("DASK_SCHEDULER_ADDRESS", raising=False)
    source, out = tmp_path / "archive", tmp_path / "out"
    source.mkdir()
    for name, slide in zip("abcd", (*slides, slides[0]), strict=True):
        shutil.copy(slide, source / f"{name}.ome.tif")
    real, events, schedulers = segpipe.segment, [], set()
    lock, d_started = threading.Lock(), threading.Event()

    def timed(source, output, module, config, **kwargs):
        name = str(source).rsplit("/", 1)[-1][0]
        with lock:
            events.append(("start", name))
            schedulers.add(config.scheduler)
        if name == "d":
            d_started.set()
        if name == "a":
            # The slow slide: b, c and d pass it by, d once b or c has freed its slot. Not a
            # fixed sleep: on a loaded machine b and c took longer than 4 s. Without the
            # slots freed, d starts only after a: the wait runs out and the test fails.
            d_started.wait(120)
        result = real(source, output, module, config, **kwargs)
        with lock:
            events.append(("end", name))
        return result

    monkeypatch.setattr(segpipe, "segment", timed)
    result = _run(source, out, random_checkpoint, SegmentConfig(tile=64), max_concurrent=2)

    assert result["segmented"] == ["a.ome.tif", "b.ome.tif", "c.ome.tif", "d.ome.tif"]
    assert events.index(("start", "c")) < events.index(("end", "a")), events
    assert events.index(("start", "d")) < events.index(("end", "a")), events
    (address,) = schedulers  # one cluster for every image of the run
    # In this process (inproc://): the image tasks are threads of the flow's process.
    assert address.startswith(("inproc://", "tcp://"))
    assert (
        read_state(out / "a.ome.tif.seg.json")["params"] == SegmentConfig(tile=64).result_settings()
    )
    with pytest.raises(OSError, match="Timed out trying to connect"):
        distributed.Client(address, timeout="2s")  # closed with the run


def test_a_flow_run_that_lost_its_claim_stops_segmenting(
    prefect_harness, slides, random_checkpoint, tmp_path, monkeypatch
):
    """The flow's segment task hands segment the archive's claim check: another run taking
    the image over after the first task stops this one there, not when segment returns."""
    import json

    from segpipe.archive import image_paths

    source, out = tmp_path / "archive", tmp_path / "out"
    source.mkdir()
    shutil.copy(slides[0], source / "a.ome.tif")
    lock = image_paths(out, "a.ome.tif").lock
    real, reported = segpipe.segment, []

    def taken_over(*args, on_progress=None, **kwargs):
        def after_each_task(done, todo):
            reported.append(done)
            lock.write_text(json.dumps({"owner": "the other run", "token": "theirs"}))
            if on_progress is not None:
                on_progress(done, todo)

        return real(*args, on_progress=after_each_task, **kwargs)

    monkeypatch.setattr(segpipe, "segment", taken_over)
    result = _run(source, out, random_checkpoint, CONFIG.replace(task_tiles=1))
    assert "ClaimLostError" in result["failed"]["a.ome.tif"]
    assert reported == [1], "no task reported after the first"
    assert read_state(image_paths(out, "a.ome.tif").state)["status"] == "running"


# -- run-wide checks, a stopped run, artifacts that cannot be made -------------------------


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"lock_ttl_s": 0}, "lock_ttl_s must be > 0 seconds, got 0"),
        ({"retries": -1}, "retries must be >= 0, got -1"),
        ({"retry_delay_s": -1.0}, "retry_delay_s must be >= 0 seconds, got -1.0"),
        ({"max_concurrent": 0}, "max_concurrent must be >= 1, got 0"),
        ({"min_age_s": -5}, "min_age_s must be >= 0 seconds, got -5"),
        ({"concurrency_limit": "no-such-gpu"}, "concurrency limit 'no-such-gpu' does not exist"),
    ],
)
def test_a_run_wide_mistake_fails_the_run_once_before_any_image(
    prefect_harness, slides, random_checkpoint, tmp_path, options, message
):
    """Not one failure per image (each recorded and held back for hours): the run fails at
    its start, naming the parameter (or the limit), and writes nothing."""
    source, out = tmp_path / "archive", tmp_path / "out"
    source.mkdir()
    shutil.copy(slides[0], source / "a.ome.tif")
    with pytest.raises(ValueError, match=message):
        _run(source, out, random_checkpoint, **options)
    assert not out.exists()


@pytest.mark.parametrize(
    ("options", "error", "message"),
    [
        ({"max_concurrent": 0}, ValueError, "max_concurrent must be >= 1, got 0"),
        ({"min_age_s": -5}, ValueError, "min_age_s must be >= 0 seconds, got -5"),
        ({"lock_ttl_s": 0}, ValueError, "lock_ttl_s must be > 0 seconds, got 0"),
        ({"concurrency_limit": "no-such-gpu"}, ValueError, "'no-such-gpu' does not exist"),
        ({"output_root": "a-file/out"}, OSError, r"output_root .*a-file/out cannot be written"),
        ({"config": {"foreground": "gone.png"}}, OSError, "foreground mask gone.png cannot be"),
        ({"cron": "bad cron"}, ValueError, 'Invalid cron string: "bad cron"'),
        ({"timezone": "Europe/Pari"}, ValueError, "'Europe/Pari' is no IANA time zone name"),
    ],
)
def test_serve_refuses_what_a_run_would_refuse_before_serving(
    prefect_harness, tmp_path, monkeypatch, options, error, message
):
    """Only the parameters' types were checked: a misspelt limit or a bad option was found
    by the first scheduled run, at 2 a.m., while the served process looked fine."""
    from segpipe.flows.archive import process_archive, serve_archive

    served = []
    monkeypatch.setattr(process_archive, "serve", lambda **kw: served.append(kw))
    monkeypatch.chdir(tmp_path)
    (tmp_path / "a-file").write_text("not a folder")
    given = {"output_root": str(tmp_path / "out"), **options}
    with pytest.raises(error, match=message):
        serve_archive(str(tmp_path), model="tissue-unet", **given)
    assert served == []
    assert not (tmp_path / "out").exists()  # a bad cron string left the output root made
    # The same parameters, right, are served.
    serve_archive(str(tmp_path), str(tmp_path / "out"), config={"tile": 256}, min_age_s=60)
    assert served[0]["parameters"]["min_age_s"] == 60
    assert served[0]["parameters"]["config"]["tile"] == 256


def test_a_missing_limit_without_a_prefect_server_says_a_limit_needs_one(monkeypatch):
    """With no PREFECT_API_URL each run starts a temporary server of its own: "create it
    with prefect gcl create" was advice that could not make a limit shared by runs."""
    import contextlib

    import prefect.client.orchestration
    from prefect.exceptions import ObjectNotFound
    from prefect.settings import PREFECT_API_URL, temporary_settings

    from segpipe.flows.limits import require_limit

    class NoLimits:
        api_url = "http://ephemeral-prefect/api"

        def read_global_concurrency_limit_by_name(self, name):
            raise ObjectNotFound(http_exc=Exception("404"))

    @contextlib.contextmanager
    def get_client(sync_client=False):
        yield NoLimits()

    monkeypatch.setattr(prefect.client.orchestration, "get_client", get_client)
    monkeypatch.delenv("PREFECT_API_URL", raising=False)
    with (
        temporary_settings(restore_defaults={PREFECT_API_URL}),
        pytest.raises(
            ValueError, match=r"'gpu': a concurrency limit needs a running Prefect"
        ) as err,
    ):
        require_limit("gpu")
    assert "PREFECT_API_URL" in str(err.value)
    with (
        temporary_settings({PREFECT_API_URL: "http://prefect:4200/api"}),
        pytest.raises(ValueError, match="does not exist on the Prefect server"),
    ):
        require_limit("gpu")


def test_an_archive_failed_error_survives_pickling():
    """Prefect pickles a failed run's exception into its result: unpickling it called
    __init__ with the message, not the summary, and the run's result could not be read."""
    import pickle

    from segpipe.flows.archive import ArchiveFailedError

    summary = {"failed": {"x.tif": "ImageReadError: not a TIFF"}, "summary": "1 failed"}
    copy = pickle.loads(pickle.dumps(ArchiveFailedError(summary)))
    assert isinstance(copy, ArchiveFailedError)
    assert copy.summary == summary
    assert str(copy) == str(ArchiveFailedError(summary))


def test_a_scheduler_no_one_answers_fails_the_run_once_before_any_image(
    prefect_harness, slides, random_checkpoint, tmp_path, monkeypatch
):
    """Each image failed on it in turn (30 s each, more with retries), was recorded as failed
    and then held back for hours once the cluster was up again."""
    import socket

    from segpipe.execution import schedulers

    with socket.socket() as s:  # a port nothing listens on once closed
        s.bind(("127.0.0.1", 0))
        address = f"tcp://127.0.0.1:{s.getsockname()[1]}"
    monkeypatch.setattr(schedulers, "CONNECT_TIMEOUT", "1s")
    source, out = tmp_path / "archive", tmp_path / "out"
    source.mkdir()
    for name in ("a.ome.tif", "b.ome.tif"):
        shutil.copy(slides[0], source / name)
    with pytest.raises(ConnectionError, match=f"cannot reach the Dask scheduler at {address}"):
        _run(source, out, random_checkpoint, CONFIG.replace(scheduler=address))
    assert not list(out.glob("*.seg.*")), "no image recorded"


def test_an_output_root_that_cannot_be_written_fails_the_run_once(
    prefect_harness, slides, random_checkpoint, tmp_path
):
    source = tmp_path / "archive"
    source.mkdir()
    shutil.copy(slides[0], source / "a.ome.tif")
    (tmp_path / "a-file").write_text("not a folder")
    with pytest.raises(OSError, match=r"output_root .*a-file/out cannot be written"):
        _run(source, tmp_path / "a-file" / "out", random_checkpoint)


def test_a_missing_foreground_mask_fails_the_run_once(
    prefect_harness, slides, random_checkpoint, tmp_path
):
    """Each image hashed the mask before its sidecar was written: every image failed, every
    run, with nothing recorded to back off by."""
    source = tmp_path / "archive"
    source.mkdir()
    shutil.copy(slides[0], source / "a.ome.tif")
    config = CONFIG.replace(foreground=str(tmp_path / "gone.png"))
    with pytest.raises(FileNotFoundError, match=r"foreground mask .*gone\.png cannot be read"):
        _run(source, tmp_path / "out", random_checkpoint, config)
    assert not list((tmp_path / "out").rglob("*.seg.*"))


def test_a_limit_is_taken_leniently_and_the_wait_for_a_slot_gives_way_to_a_stop(monkeypatch):
    """The run checked the limit exists: a slot is taken without strict (a limit deleted since
    fails no image after its "running" sidecar, a failed lease renewal cancels no
    segmentation in its middle); waiting for one ends when the run stops."""
    import contextlib
    import threading

    import prefect.concurrency.sync

    from segpipe.archive import RunStopped
    from segpipe.flows.limits import global_slot

    calls, stop = [], threading.Event()

    @contextlib.contextmanager
    def concurrency(name, **kwargs):
        calls.append(kwargs)
        # A wait that misses the stop would ask for ever: end it as this test's failure.
        assert len(calls) <= 10, "the wait for a slot went on after the run stopped"
        if len(calls) > 1:  # the first is free, then all are taken until the run stops
            if len(calls) == 3:
                stop.set()
            raise TimeoutError("no slot free")
        yield

    monkeypatch.setattr(prefect.concurrency.sync, "concurrency", concurrency)
    with global_slot("gpu", stop):
        pass
    assert calls[0]["strict"] is False
    assert calls[0]["raise_on_lease_renewal_failure"] is False
    with pytest.raises(RunStopped), global_slot("gpu", stop):
        pytest.fail("no slot was free")
    assert len(calls) == 3


def test_a_finished_runs_stop_is_forgotten_and_its_key_finds_an_unset_one():
    """Every run of a served process registers its stop: a finished run's stayed for the
    process's life, and its key still found it, set, where the run had been stopped."""
    from segpipe.flows import limits

    with limits.run_stop() as (key, stop):
        assert limits.stop_of(key) is stop
        stop.set()  # the run is stopped
    assert key not in limits._STOPS
    assert limits.stop_of(key) is not stop
    assert not limits.stop_of(key).is_set()


@pytest.mark.slow
def test_a_stopped_run_waits_for_its_images_which_are_interrupted_not_failed(
    prefect_harness, slides, random_checkpoint, tmp_path, monkeypatch
):
    """Ctrl-C (SIGTERM, a cancellation) reaches the flow's main thread only: the image
    segmenting in a task thread stops at its next progress report and is recorded
    "interrupted", not counted, before the run's local cluster is closed under it."""
    import signal
    import threading
    import time

    from segpipe.archive import image_paths

    monkeypatch.delenv("DASK_SCHEDULER_ADDRESS", raising=False)
    source, out = tmp_path / "archive", tmp_path / "out"
    source.mkdir()
    shutil.copy(slides[0], source / "a.ome.tif")
    real, reported = segpipe.segment, []

    def interrupted(*args, on_progress=None, **kwargs):
        def after_each_task(done, todo):
            reported.append(done)
            if len(reported) == 1:  # Ctrl-C, as the terminal sends it
                signal.pthread_kill(threading.main_thread().ident, signal.SIGINT)
                time.sleep(0.5)
            on_progress(done, todo)

        return real(*args, on_progress=after_each_task, **kwargs)

    monkeypatch.setattr(segpipe, "segment", interrupted)
    # Python's own Ctrl-C handler: a process started in the background by a non-interactive
    # shell (CI's, nohup's) inherits SIGINT ignored, and Python then installs none.
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        with pytest.raises(KeyboardInterrupt):
            _run(source, out, random_checkpoint, SegmentConfig(tile=64, task_tiles=1))
    finally:
        signal.signal(signal.SIGINT, previous)
    paths = image_paths(out, "a.ome.tif")
    state = read_state(paths.state)
    assert (state["status"], state["failures"]) == ("interrupted", 0), state
    assert state["reason"].startswith("RunStopped")
    assert not is_complete(paths.result) and not paths.lock.exists()
    assert len(reported) < 9, "stopped before its last task"


def test_an_artifact_the_api_refuses_changes_no_image_outcome(
    prefect_harness, slides, random_checkpoint, tmp_path, monkeypatch
):
    """Report and run-table artifacts are only views of what the run recorded: the API
    failing them leaves the segmented image segmented (its sidecar says complete) and a
    failed one failed, and the run ends with its result."""
    import segpipe.flows.archive

    source, out = tmp_path / "archive", tmp_path / "out"
    source.mkdir()
    shutil.copy(slides[0], source / "good.ome.tif")
    (source / "broken.tif").write_bytes(b"II*\x00 not a tiff")

    def api_down(*args, **kwargs):
        raise RuntimeError("503 Service Unavailable")

    monkeypatch.setattr(segpipe.flows.archive, "create_markdown_artifact", api_down)
    monkeypatch.setattr(segpipe.flows.archive, "create_table_artifact", api_down)
    result = _run(source, out, random_checkpoint, retry_delay_s=0)
    assert result["segmented"] == ["good.ome.tif"]
    assert list(result["failed"]) == ["broken.tif"]
    assert read_state(out / "good.ome.tif.seg.json")["status"] == "complete"


def test_images_run_in_other_processes_whose_task_runner_pickles_their_parameters(
    prefect_harness, slides, random_checkpoint, tmp_path
):
    """deploy/README.md's "images on the cluster": a task runner that sends the image tasks to
    other processes (prefect-dask's, here Prefect's process pool) pickles their parameters.
    The run's stop goes by a key (an Event cannot be pickled, and setting it would not reach
    another process)."""
    from prefect.task_runners import ProcessPoolTaskRunner

    from segpipe.flows.archive import process_archive

    source, out = tmp_path / "archive", tmp_path / "out"
    source.mkdir()
    shutil.copy(slides[0], source / "a.ome.tif")
    run = process_archive.with_options(task_runner=ProcessPoolTaskRunner(max_workers=1))
    summary = run(str(source), str(out), str(random_checkpoint), CONFIG)
    assert (summary["segmented"], summary["failed"]) == (["a.ome.tif"], {})
    assert read_meta(out / "a.ome.tif.seg.zarr").summary.tiles_computed > 0


def test_an_image_that_killed_a_run_goes_last_in_the_next(
    slides, random_checkpoint, tmp_path, monkeypatch
):
    """First in order, a file that kills the process (the OOM killer, a crash in a C decoder)
    killed every night's run before the images after it: they were never segmented."""
    from pathlib import Path

    from segpipe import archive
    from segpipe.archive import discover_images, image_paths

    source, out = tmp_path / "archive", tmp_path / "out"
    source.mkdir()
    for name, slide in zip(("a.ome.tif", "b.ome.tif", "c.ome.tif"), slides, strict=True):
        shutil.copy(slide, source / name)
    state = image_paths(out, "a.ome.tif").state
    left: list[str] = []

    def dies(*args, **kwargs):  # the sidecar as a SIGKILL here would leave it
        left.append(state.read_text())
        raise RuntimeError("killed")

    (first, *_) = discover_images(str(source))
    loaded = archive.load_model(random_checkpoint)
    with monkeypatch.context() as patch:
        patch.setattr("segpipe.execution.segment.segment", dies)
        with pytest.raises(RuntimeError, match="killed"):
            archive.process_image(first, out, loaded, config=CONFIG)
    state.write_text(left[0])
    assert read_state(state)["status"] == "running"
    real, order = segpipe.segment, []

    def recorded(src, *args, **kwargs):
        order.append(Path(str(src)).name)
        return real(src, *args, **kwargs)

    monkeypatch.setattr(segpipe, "segment", recorded)
    result = _run(source, out, random_checkpoint, max_concurrent=1)
    assert order == ["b.ome.tif", "c.ome.tif", "a.ome.tif"]
    assert result["segmented"] == ["a.ome.tif", "b.ome.tif", "c.ome.tif"], "reported as found"
