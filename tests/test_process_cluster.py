"""A real cluster of separate processes started from the command line (``dask scheduler``,
``dask worker``): the CLI and the archive flow run on it and match a run in this process."""

import shutil
import subprocess
import sys
import time
from pathlib import Path

import distributed
import numpy as np
import pytest
import zarr
from conftest import blocks_run_by

from segpipe.config import SegmentConfig

pytestmark = pytest.mark.integration

# One torch thread on both sides: the same split of every reduction, so the same bits.
SETTINGS = {
    "tile": 32,
    "task_tiles": 1,
    "probability_dtype": "float32",
    "device": "cpu",
    "threads": 1,
}


def _stored(result: Path) -> dict[str, np.ndarray]:
    return {
        name: zarr.open_array(result / "0" / name, mode="r")[...]
        for name in ("probabilities", "mask")
    }


def _assert_same(result: Path, reference: Path) -> None:
    """The same mask, and probabilities to float rounding: a worker process of one torch
    thread runs wide passes, this process narrow ones of one window, and on some CPUs
    oneDNN's convolutions round differently for other batch sizes (an AMD EPYC without
    AVX-512: up to 5e-7 here)."""
    got, want = _stored(result), _stored(reference)
    np.testing.assert_array_equal(got["mask"], want["mask"])
    np.testing.assert_allclose(got["probabilities"], want["probabilities"], rtol=0, atol=1e-5)


def _stop(procs: list[subprocess.Popen[bytes]]) -> None:
    for proc in procs:
        if proc.poll() is None:
            proc.terminate()
    for proc in procs:
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


@pytest.fixture
def process_cluster(tmp_path):
    """A scheduler and two single-threaded workers (one with ``GPU=1``), each its own process;
    yields the scheduler's address."""
    dask_cli = str(Path(sys.executable).with_name("dask"))
    file, log = tmp_path / "scheduler.json", tmp_path / "cluster.log"
    common = ["--scheduler-file", str(file), "--no-dashboard"]
    procs: list[subprocess.Popen[bytes]] = []
    with log.open("wb") as out:

        def start(*args: str) -> None:
            procs.append(subprocess.Popen([dask_cli, *args], stdout=out, stderr=subprocess.STDOUT))

        try:
            start("scheduler", "--host", "127.0.0.1", "--port", "0", *common)
            start("worker", *common, "--nthreads", "1")
            start("worker", *common, "--nthreads", "1", "--resources", "GPU=1")
            deadline = time.monotonic() + 60
            while not file.exists():
                if time.monotonic() > deadline or any(p.poll() is not None for p in procs):
                    pytest.fail(f"no scheduler file:\n{log.read_text()}")
                time.sleep(0.2)
            with distributed.Client(scheduler_file=str(file), timeout="30s") as client:
                client.wait_for_workers(2, timeout=60)
                address = client.scheduler.address
            yield address
        finally:
            _stop(procs)


def test_the_cli_and_the_archive_flow_on_a_cluster_of_processes_match_a_run_in_this_process(
    process_cluster, prefect_harness, small_slide, random_checkpoint, tmp_path
):
    import segpipe
    from segpipe.flows.archive import process_archive

    source = small_slide.image
    reference = tmp_path / "sync.seg.zarr"
    segpipe.segment(
        str(source),
        str(reference),
        str(random_checkpoint),
        SegmentConfig(**SETTINGS, scheduler="sync"),
    )

    cli = tmp_path / "cli.seg.zarr"
    # fmt: off
    command = [
        str(Path(sys.executable).with_name("segpipe")), "segment", str(source), str(cli),
        "--model", str(random_checkpoint), "--scheduler", process_cluster,
        "--tile", "32", "--task-tiles", "1", "--probability-dtype", "float32",
        "--device", "cpu", "--threads", "1", "--quiet",
    ]
    # fmt: on
    done = subprocess.run(command, capture_output=True, text=True, timeout=120, check=False)
    assert done.returncode == 0, done.stdout + done.stderr
    _assert_same(cli, reference)
    on_cluster = blocks_run_by(process_cluster)
    assert on_cluster > 0, "the CLI's run went elsewhere"

    archive, out = tmp_path / "archive", tmp_path / "out"
    archive.mkdir()
    shutil.copy(source, archive / "slide.ome.tif")
    config = SegmentConfig(**SETTINGS, scheduler=process_cluster)
    result = process_archive(str(archive), str(out), str(random_checkpoint), config)
    assert result["segmented"] == ["slide.ome.tif"], result
    _assert_same(out / "slide.ome.tif.seg.zarr", reference)
    assert blocks_run_by(process_cluster) > on_cluster, "the flow's run went elsewhere"
